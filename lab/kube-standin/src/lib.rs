//! A kube-apiserver stand-in for tests, on loopback.
//!
//! No kube-apiserver can run where our tests run, and a mocked client would
//! test nothing of what matters (paths, query parameters, watch framing,
//! content types, status codes). So `relay-kube` is tested through its
//! production path, kubeconfig → `kube::Client` → HTTPS, against this
//! server, which speaks the real REST shapes for the few resources we use:
//!
//! | path | verbs |
//! |---|---|
//! | `/api/v1/nodes` | list (with `metadata.resourceVersion`), watch (ADDED/MODIFIED/DELETED, BOOKMARK, expiry after `timeoutSeconds`, injected `ERROR` 410) |
//! | `/api/v1/services` | list, watch (same mechanics as Nodes; all namespaces) |
//! | `/apis/discovery.k8s.io/v1/endpointslices` | list, watch (same mechanics as Nodes; all namespaces) |
//! | `/api/v1/nodes/{name}`, `/status` | get; `PATCH application/apply-patch+yaml` on `/status` merges `status.conditions` by `type` per field manager ([`apply`]) |
//! | `/apis/events.k8s.io/v1/namespaces/{ns}/events[/{name}]` | create, merge-patch (both 422 for a note over 1024 bytes or an action over 128, as the apiserver's validation), list |
//! | `/apis/authentication.k8s.io/v1/tokenreviews` | create, answered from tokens minted with [`StandIn::mint_token`] |
//! | `/apis/coordination.k8s.io/v1/namespaces/{ns}/leases[/{name}]` | get, create, update (resourceVersion conflicts), delete (preconditions), list, watch ([`leases`]) |
//! | `/apis/crd.projectcalico.org/v1/blockaffinities`, `/apis/cilium.io/v2/ciliumnodes` | list, watch (same mechanics as Nodes), once the test installs the CRD ([`crds`]; 404 before, as without that CNI) |
//!
//! Everything else answers 404 with a `Status`. Every request needs the
//! bearer token written into the kubeconfig ([`StandIn::kubeconfig_path`]),
//! is classified once by [`request::classify`] into RBAC attributes, and is
//! logged ([`StandIn::requests`]) so tests can assert what the client did.
//! With [`StandIn::set_rbac`] / [`StandIn::spawn_with_rbac`] those
//! attributes are also checked against ClusterRole rules ([`rbac`], e.g.
//! read from the deploy manifests): a request no rule allows gets 403
//! `Forbidden`.
//!
//! Test hooks: [`StandIn::inject_gone`] (in-stream `ERROR` 410 on every open
//! watch), [`StandIn::stray_not_found`] (an installed CRD's next lists and
//! watches answer 404), [`StandIn::set_unavailable`] (every request answers 503),
//! [`StandIn::hold_watches`] (watches stall while requests are answered),
//! [`StandIn::stop`] / [`StandIn::start`] (the listener goes away and comes
//! back on the same port), and direct edits of the Node, Service and
//! EndpointSlice sets ([`StandIn::upsert_service`],
//! [`StandIn::upsert_endpointslice`] and their deletes). Watch events of
//! all three share one resourceVersion sequence and one history, as in
//! etcd.
//!
//! Module map: [`request`] (classification), [`rbac`] (rules and
//! matching), [`apply`] (server-side apply of conditions), [`leases`],
//! `objects` (replies, state bookkeeping, test objects), `serve` (accept
//! loop, routing, lists and watches), `writes` (status
//! apply, events, token reviews), `edits` (tests' direct edits of Nodes,
//! Services, EndpointSlices, Leases, Pods, and minted tokens), `hooks`
//! (test hooks and the request log), this module (state, startup and
//! lifecycle).

#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod apply;
pub mod crds;
mod edits;
mod hooks;
pub mod leases;
mod objects;
pub mod rbac;
pub mod request;
mod serve;
mod writes;

use objects::*;
pub use objects::{daemonset_pod, kubelet_node};

use serve::{accept_loop, watch};
use writes::{apply_node_status, apply_status, events, token_review};

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response, StatusCode};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, NodeCondition, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{
    FieldsV1, ManagedFieldsEntry, ObjectMeta, Time,
};
use k8s_openapi::jiff::Timestamp;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::{broadcast, mpsc};
use tokio::task::{JoinHandle, JoinSet};
use tokio_rustls::TlsAcceptor;

pub use apply::{apply_conditions, ConditionOwners, Conflict};
pub use crds::Crd;
/// The API types the stand-in serves, for tests that build objects.
pub use k8s_openapi;
pub use rbac::{cluster_role_rules, role_rules, PolicyRule, RbacError};
pub use request::{classify, RequestAttributes};

/// Requests larger than this are refused (413), like the apiserver's 3 MiB limit.
const MAX_BODY: usize = 3 << 20;
/// Watch events kept for resuming a watch from a resourceVersion; older
/// resourceVersions get 410 Gone, as after etcd compaction.
const HISTORY: usize = 1000;
/// Bounds a client's request body upload and TLS handshake.
const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// The user named in 403 messages: the relay's ServiceAccount, as bound by
/// `deploy/kubernetes/base/rbac.yaml`.
pub const RBAC_USER: &str = "system:serviceaccount:edge-relay:relay-server";

/// Errors starting the stand-in.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StandInError {
    /// Binding or writing the kubeconfig failed.
    #[error("stand-in i/o: {0}")]
    Io(#[from] std::io::Error),
    /// Certificate generation failed.
    #[error("stand-in certificates: {0}")]
    Cert(#[from] rcgen::Error),
    /// TLS configuration failed.
    #[error("stand-in tls: {0}")]
    Tls(#[from] rustls::Error),
}

/// One request as the stand-in saw it.
#[derive(Clone, Debug)]
pub struct RequestRecord {
    /// HTTP method.
    pub method: String,
    /// URL path.
    pub path: String,
    /// Raw query string.
    pub query: Option<String>,
    /// `Content-Type` of the request, if any.
    pub content_type: Option<String>,
    /// RBAC attributes; `None` for non-resource paths.
    pub attrs: Option<RequestAttributes>,
    /// Status code answered (for streamed watches, the initial 200).
    pub status: u16,
    /// When the request arrived.
    pub started: std::time::Instant,
    /// When it was answered (for streamed watches, when the stream began).
    pub answered: std::time::Instant,
}

impl RequestRecord {
    /// Whether this request and `other` were being served at the same
    /// time.
    pub fn overlaps(&self, other: &RequestRecord) -> bool {
        self.started < other.answered && other.started < self.answered
    }

    /// `verb resource[/subresource]`, e.g. `patch nodes/status`.
    pub fn verb_resource(&self) -> String {
        match &self.attrs {
            Some(a) => match &a.subresource {
                Some(s) => format!("{} {}/{}", a.verb, a.resource, s),
                None => format!("{} {}", a.verb, a.resource),
            },
            None => format!("{} {}", self.method, self.path),
        }
    }
}

struct Minted {
    node: String,
    pod_name: String,
    pod_uid: String,
    audience: String,
    expires: SystemTime,
}

/// The watchable collections.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Res {
    Nodes,
    Services,
    EndpointSlices,
    Leases,
    BlockAffinities,
    CiliumNodes,
    IpamConfigs,
}

impl Res {
    /// `(kind, apiVersion)` of the objects.
    fn kind(self) -> (&'static str, &'static str) {
        match self {
            Res::Nodes => ("Node", "v1"),
            Res::Services => ("Service", "v1"),
            Res::EndpointSlices => ("EndpointSlice", "discovery.k8s.io/v1"),
            Res::Leases => ("Lease", "coordination.k8s.io/v1"),
            Res::BlockAffinities => ("BlockAffinity", "crd.projectcalico.org/v1"),
            Res::CiliumNodes => ("CiliumNode", "cilium.io/v2"),
            Res::IpamConfigs => ("IPAMConfig", "crd.projectcalico.org/v1"),
        }
    }
}

enum Signal {
    /// One watch event line of a collection.
    Event(Res, Bytes),
    /// Send `ERROR` 410 and end the stream.
    Gone,
    /// End the stream without a word (server going away).
    Close,
}

struct State {
    rv: u64,
    nodes: BTreeMap<String, Node>,
    /// Services by (namespace, name).
    services: BTreeMap<(String, String), Service>,
    /// EndpointSlices by (namespace, name).
    slices: BTreeMap<(String, String), EndpointSlice>,
    /// Leases by (namespace, name).
    leases: BTreeMap<(String, String), Lease>,
    /// Installed CRDs' objects (JSON) by name; a collection is served only
    /// while its key is here ([`crds`]).
    crds: BTreeMap<Res, BTreeMap<String, Value>>,
    /// Lists and watches of an installed CRD still to be answered 404
    /// ([`StandIn::stray_not_found`]).
    stray_404: BTreeMap<Res, u32>,
    owners: BTreeMap<String, ConditionOwners>,
    history: Vec<(u64, Res, Bytes)>,
    /// Oldest resourceVersion a watch may resume from.
    oldest_rv: u64,
    events: BTreeMap<(String, String), Value>,
    tokens: HashMap<String, Minted>,
    /// Pods by (namespace, name), served on GET only (the relay checks the
    /// pod a bootstrap token is bound to).
    pods: BTreeMap<(String, String), Pod>,
    log: Vec<RequestRecord>,
    unavailable: bool,
    /// Added before answering a read (get, list) and a write (create,
    /// update, patch, delete); watches are not delayed. See
    /// [`StandIn::set_latency`].
    latency: (Duration, Duration),
    /// ClusterRole rules every request must be allowed by (`None`: no RBAC).
    rbac: Option<Vec<PolicyRule>>,
}

struct Shared {
    state: Mutex<State>,
    watch_tx: broadcast::Sender<Arc<Signal>>,
    bearer: String,
    bookmark_interval: Duration,
    open_watches: AtomicU64,
    /// While true, open watches deliver nothing (see
    /// [`StandIn::hold_watches`]).
    hold: tokio::sync::watch::Sender<bool>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panicking test thread must not wedge every later request.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The running stand-in. Dropping it stops the server and removes its
/// kubeconfig directory.
pub struct StandIn {
    shared: Arc<Shared>,
    addr: SocketAddr,
    acceptor: TlsAcceptor,
    server: Mutex<Option<JoinHandle<()>>>,
    dir: PathBuf,
    kubeconfig: PathBuf,
}

impl StandIn {
    /// Starts the stand-in on `127.0.0.1:0` with a fresh CA, server
    /// certificate and client bearer token, and writes the kubeconfig.
    pub async fn spawn() -> Result<StandIn, StandInError> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        StandIn::spawn_on(listener).await
    }

    /// [`StandIn::spawn`] on a listener bound elsewhere, e.g. in a lab
    /// network namespace (a socket stays in the namespace it was created
    /// in, whichever thread serves it): the server certificate names the
    /// listener's address, and the kubeconfig points at it.
    pub async fn spawn_on(listener: std::net::TcpListener) -> Result<StandIn, StandInError> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        listener.set_nonblocking(true)?;
        let listener = TcpListener::from_std(listener)?;
        let addr = listener.local_addr()?;
        let ca_key = rcgen::KeyPair::generate()?;
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new())?;
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(rcgen::DnType::CommonName, "relay-kube-standin CA");
        let ca_pem = ca.self_signed(&ca_key)?.pem();
        let issuer = rcgen::Issuer::new(ca, ca_key);
        let key = rcgen::KeyPair::generate()?;
        let mut sans = vec!["127.0.0.1".to_string(), "localhost".to_string()];
        if !addr.ip().is_loopback() {
            sans.push(addr.ip().to_string());
        }
        let mut params = rcgen::CertificateParams::new(sans)?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "kube-apiserver");
        let cert = params.signed_by(&key, &issuer)?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut tls = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.der().clone()],
                rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            )?;
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        let acceptor = TlsAcceptor::from(Arc::new(tls));

        static SEQ: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "relay-kube-standin-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir)?;
        let ca_path = dir.join("ca.crt");
        std::fs::write(&ca_path, ca_pem)?;
        let bearer = random_token();
        let kubeconfig = dir.join("kubeconfig");
        // JSON is YAML; kube reads either.
        let kc = json!({
            "apiVersion": "v1", "kind": "Config", "current-context": "standin",
            "clusters": [{"name": "standin", "cluster": {
                "server": format!("https://{addr}"),
                "certificate-authority": ca_path.to_string_lossy()}}],
            "users": [{"name": "edge-relay", "user": {"token": bearer}}],
            "contexts": [{"name": "standin", "context": {"cluster": "standin", "user": "edge-relay"}}],
        });
        std::fs::write(
            &kubeconfig,
            serde_json::to_vec_pretty(&kc).unwrap_or_default(),
        )?;

        let (watch_tx, _) = broadcast::channel(4096);
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                rv: 100,
                nodes: BTreeMap::new(),
                services: BTreeMap::new(),
                slices: BTreeMap::new(),
                leases: BTreeMap::new(),
                crds: BTreeMap::new(),
                stray_404: BTreeMap::new(),
                owners: BTreeMap::new(),
                history: Vec::new(),
                oldest_rv: 100,
                events: BTreeMap::new(),
                tokens: HashMap::new(),
                pods: BTreeMap::new(),
                log: Vec::new(),
                unavailable: false,
                latency: (Duration::ZERO, Duration::ZERO),
                rbac: None,
            }),
            watch_tx,
            bearer,
            bookmark_interval: Duration::from_secs(1),
            open_watches: AtomicU64::new(0),
            hold: tokio::sync::watch::channel(false).0,
        });
        let s = StandIn {
            shared,
            addr,
            acceptor,
            server: Mutex::new(None),
            dir,
            kubeconfig,
        };
        s.serve(listener);
        Ok(s)
    }

    /// [`StandIn::spawn`], enforcing RBAC with `rules` from the start (the
    /// client's first LIST is already checked).
    pub async fn spawn_with_rbac(rules: Vec<PolicyRule>) -> Result<StandIn, StandInError> {
        let s = StandIn::spawn().await?;
        s.set_rbac(Some(rules));
        Ok(s)
    }

    fn serve(&self, listener: TcpListener) {
        let task = tokio::spawn(accept_loop(
            listener,
            self.acceptor.clone(),
            self.shared.clone(),
        ));
        let mut g = self.server.lock().unwrap_or_else(|p| p.into_inner());
        *g = Some(task);
    }

    /// The kubeconfig (server URL, CA file, bearer token) for the client.
    pub fn kubeconfig_path(&self) -> &Path {
        &self.kubeconfig
    }

    /// The server's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops listening and drops every connection (open watches end
    /// without a final event), as when the apiserver goes away.
    pub fn stop(&self) {
        let task = self.server.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(t) = task {
            t.abort();
        }
        let _ = self.shared.watch_tx.send(Arc::new(Signal::Close));
    }

    /// Listens again on the same address after [`StandIn::stop`].
    pub async fn start(&self) -> Result<(), StandInError> {
        let listener = TcpListener::bind(self.addr).await?;
        self.serve(listener);
        Ok(())
    }

    /// [`StandIn::start`] on a listener bound elsewhere (e.g. again in the
    /// lab network namespace [`StandIn::spawn_on`] served from); it must be
    /// bound to the same address, which the kubeconfig and the server
    /// certificate name.
    pub fn start_on(&self, listener: std::net::TcpListener) -> Result<(), StandInError> {
        if listener.local_addr()? != self.addr {
            return Err(StandInError::Io(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!(
                    "the stand-in serves {}, not {}",
                    self.addr,
                    listener.local_addr()?
                ),
            )));
        }
        listener.set_nonblocking(true)?;
        self.serve(TcpListener::from_std(listener)?);
        Ok(())
    }
}

impl Drop for StandIn {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn random_token() -> String {
    use rand::Rng;
    let mut rng = rand::rng();
    (0..32)
        .map(|_| char::from(b"abcdefghijklmnopqrstuvwxyz0123456789"[rng.random_range(0..36)]))
        .collect()
}
