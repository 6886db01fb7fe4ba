//! Where the relay's knowledge of the cluster comes from: the Kubernetes
//! API with `[kubernetes]`, else the static `[nodes]` table. Chosen once
//! at start-up; the rest of the relay sees only the traits.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;
#[cfg(feature = "kubernetes")]
use tracing::info;

use super::StartError;
use crate::config::RelayConfig;
use crate::directory::{Directory, StaticDirectory};
use crate::services::{NoServices, ServiceSource};
use crate::status::{NoStatus, StatusSink};

/// What the relay needs from its source of truth: the directory, the
/// status sink, (with `[bootstrap]`) token verification, and the upkeep of
/// the Node conditions; the cluster with `[kubernetes]`, else the static
/// `[nodes]` table and none.
type Sources = (
    Arc<dyn Directory>,
    Arc<dyn StatusSink>,
    Option<Arc<dyn crate::bootstrap::TokenAuthority>>,
    Arc<dyn ServiceSource>,
    Upkeep,
);

/// The sweep for stale Node conditions and their flush at shutdown
/// (`crate::k8s::ConditionUpkeep`), where conditions are written.
#[cfg(feature = "kubernetes")]
pub(super) type Upkeep = Option<Arc<crate::k8s::ConditionUpkeep>>;
/// Nothing to keep without the `kubernetes` feature.
#[cfg(not(feature = "kubernetes"))]
pub(super) type Upkeep = Option<std::convert::Infallible>;

pub(super) async fn directory_and_status(
    cfg: &RelayConfig,
    background: &CancellationToken,
) -> Result<Sources, StartError> {
    #[cfg(feature = "kubernetes")]
    if let Some(k) = &cfg.kubernetes {
        let kube = crate::k8s::start(k, cfg, background.clone()).await?;
        info!("node claims from the Kubernetes API");
        let services = kube
            .services
            .unwrap_or_else(|| Arc::new(NoServices::default()));
        return Ok((
            kube.directory,
            kube.status,
            kube.tokens,
            services,
            kube.conditions,
        ));
    }
    let _ = background;
    Ok((
        Arc::new(StaticDirectory::new(&cfg.nodes)),
        Arc::new(NoStatus),
        None,
        Arc::new(NoServices::default()),
        None,
    ))
}
