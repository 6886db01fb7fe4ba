//! Building a client: in-cluster (service-account token and CA mounted
//! into the pod) or from a kubeconfig file (development, tests).
//!
//! TLS is rustls with the ring provider, like the rest of the workspace.

use std::path::PathBuf;
use std::time::Duration;

use kube::config::{KubeConfigOptions, Kubeconfig};

use crate::KubeError;

/// Where the client's cluster, credentials and CA come from.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum KubeClientConfig {
    /// The pod's service account (`KUBERNETES_SERVICE_HOST`, mounted token and CA).
    InCluster,
    /// A kubeconfig file, optionally a named context in it.
    Kubeconfig {
        /// Path of the kubeconfig.
        path: PathBuf,
        /// Context to use; the file's current context if `None`.
        context: Option<String>,
    },
}

/// Transport bounds for the client.
#[derive(Clone, Debug)]
pub struct ClientOptions {
    /// TCP + TLS connect bound; also bounds each write of a request.
    pub connect_timeout: Duration,
    /// Bound on waiting for response bytes. Must exceed the watch timeout
    /// ([`crate::DirectoryOptions::watch_timeout_secs`]), since a quiet
    /// watch may send nothing until the apiserver ends it; it is also what
    /// ends a watch whose connection died silently (an apiserver load
    /// balancer failing over without a reset), after which the watcher
    /// watches again on a new connection. kube-apiserver ends other
    /// requests within its own 60 s request timeout.
    pub read_timeout: Duration,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            connect_timeout: Duration::from_secs(10),
            read_timeout: Duration::from_secs(90),
        }
    }
}

impl KubeClientConfig {
    /// Builds the client. Installs the ring rustls provider as the process
    /// default if none is installed yet (kube's rustls path uses the default).
    pub async fn client(&self, opts: &ClientOptions) -> Result<KubeClient, KubeError> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut config = match self {
            KubeClientConfig::InCluster => {
                kube::Config::incluster().map_err(|e| KubeError::Config(e.to_string()))?
            }
            KubeClientConfig::Kubeconfig { path, context } => {
                let kc = Kubeconfig::read_from(path)
                    .map_err(|e| KubeError::Config(format!("{}: {e}", path.display())))?;
                let options = KubeConfigOptions {
                    context: context.clone(),
                    ..Default::default()
                };
                kube::Config::from_custom_kubeconfig(kc, &options)
                    .await
                    .map_err(|e| KubeError::Config(format!("{}: {e}", path.display())))?
            }
        };
        config.connect_timeout = Some(opts.connect_timeout);
        config.read_timeout = Some(opts.read_timeout);
        config.write_timeout = Some(opts.connect_timeout);
        // kube's built-in retry of 429/503/504 backs off exponentially up to
        // 15 times (minutes in all), hiding an outage inside one call. Our
        // calls carry their own bounds and the watch has its own backoff,
        // so failures surface (and are counted) instead.
        config.default_retry = false;
        kube::Client::try_from(config)
            .map(KubeClient)
            .map_err(KubeError::from)
    }
}

/// A connection to the API, shared by the directory, writers and reviewer
/// (cheap to clone). Opaque, so no other crate needs `kube`.
#[derive(Clone)]
pub struct KubeClient(pub(crate) kube::Client);

impl std::fmt::Debug for KubeClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KubeClient")
    }
}

/// The last error of a watch (since start), for readiness to say why a
/// list never completed: a 403 for want of RBAC, the apiserver unreachable.
/// Kept short (the API's status code and reason, the resource): readiness
/// answers without a token, so the apiserver's address and the relay's
/// identity stay in the log.
#[derive(Debug, Default)]
pub struct LastError(std::sync::Mutex<Option<String>>);

impl LastError {
    /// Records `e`, from the watch of `what` (`nodes`, `endpointslices`),
    /// as the last error.
    pub fn set(&self, what: &str, e: &kube::runtime::watcher::Error) {
        use kube::runtime::watcher::Error as W;
        let api = |e: &kube::Error| match e {
            kube::Error::Api(s) => format!("HTTP {} {}", s.code, s.reason),
            _ => "the apiserver could not be reached or failed (see the log)".to_string(),
        };
        let summary = match e {
            W::InitialListFailed(e) | W::WatchStartFailed(e) | W::WatchFailed(e) => api(e),
            W::WatchError(s) => format!("HTTP {} {}", s.code, s.reason),
            W::NoResourceVersion => "no resourceVersion in the watch (see the log)".to_string(),
        };
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(format!("{what}: {summary}"));
    }

    /// The last error recorded, if any.
    pub fn get(&self) -> Option<String> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}
