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
/// status sink and (with `[bootstrap]`) token verification; the cluster
/// with `[kubernetes]`, else the static `[nodes]` table and none.
type Sources = (
    Arc<dyn Directory>,
    Arc<dyn StatusSink>,
    Option<Arc<dyn crate::bootstrap::TokenAuthority>>,
    Arc<dyn ServiceSource>,
);

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
        return Ok((kube.directory, kube.status, kube.tokens, services));
    }
    let _ = background;
    Ok((
        Arc::new(StaticDirectory::new(&cfg.nodes)),
        Arc::new(NoStatus),
        None,
        Arc::new(NoServices::default()),
    ))
}
