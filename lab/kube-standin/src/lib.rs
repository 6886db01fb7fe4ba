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
//! | `/apis/events.k8s.io/v1/namespaces/{ns}/events[/{name}]` | create, merge-patch, list |
//! | `/apis/authentication.k8s.io/v1/tokenreviews` | create, answered from tokens minted with [`StandIn::mint_token`] |
//! | `/apis/coordination.k8s.io/v1/namespaces/{ns}/leases[/{name}]` | get, create, update (resourceVersion conflicts), delete (preconditions), list, watch ([`leases`]) |
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
//! watch), [`StandIn::set_unavailable`] (every request answers 503),
//! [`StandIn::stop`] / [`StandIn::start`] (the listener goes away and comes
//! back on the same port), and direct edits of the Node, Service and
//! EndpointSlice sets ([`StandIn::upsert_service`],
//! [`StandIn::upsert_endpointslice`] and their deletes). Watch events of
//! all three share one resourceVersion sequence and one history, as in
//! etcd.
//!
//! Module map: [`request`] (classification), [`rbac`] (rules and
//! matching), [`apply`] (server-side apply of conditions), this module
//! (server, state, hooks).

#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod apply;
pub mod leases;
pub mod rbac;
pub mod request;

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
/// The API types the stand-in serves, for tests that build objects.
pub use k8s_openapi;
pub use rbac::{cluster_role_rules, PolicyRule, RbacError};
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
}

impl RequestRecord {
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
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Res {
    Nodes,
    Services,
    EndpointSlices,
    Leases,
}

impl Res {
    /// `(kind, apiVersion)` of the objects.
    fn kind(self) -> (&'static str, &'static str) {
        match self {
            Res::Nodes => ("Node", "v1"),
            Res::Services => ("Service", "v1"),
            Res::EndpointSlices => ("EndpointSlice", "discovery.k8s.io/v1"),
            Res::Leases => ("Lease", "coordination.k8s.io/v1"),
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
    /// ClusterRole rules every request must be allowed by (`None`: no RBAC).
    rbac: Option<Vec<PolicyRule>>,
}

struct Shared {
    state: Mutex<State>,
    watch_tx: broadcast::Sender<Arc<Signal>>,
    bearer: String,
    bookmark_interval: Duration,
    open_watches: AtomicU64,
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

type Body = BoxBody<Bytes, Infallible>;

fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).boxed()
}

fn json_response(code: StatusCode, v: &Value) -> Response<Body> {
    let mut r = Response::new(full(v.to_string()));
    *r.status_mut() = code;
    r.headers_mut().insert(
        "content-type",
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

/// A `Status` object as the apiserver returns for failures.
fn status_body(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

fn failure(code: StatusCode, reason: &str, message: &str) -> Response<Body> {
    json_response(code, &status_body(code.as_u16(), reason, message))
}

fn now_time() -> Time {
    // jiff's `Timestamp::now` needs its std feature, which k8s-openapi
    // does not turn on by itself.
    let d = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = i64::try_from(d.as_secs()).unwrap_or(0);
    let nanos = i32::try_from(d.subsec_nanos()).unwrap_or(0);
    Time(Timestamp::new(secs, nanos).unwrap_or(Timestamp::UNIX_EPOCH))
}

/// Serialises an object the way list items come back: without kind/apiVersion.
fn list_item(node: &impl serde::Serialize) -> Value {
    let mut v = serde_json::to_value(node).unwrap_or(Value::Null);
    if let Some(o) = v.as_object_mut() {
        o.remove("kind");
        o.remove("apiVersion");
    }
    v
}

fn managed_entry(
    manager: &str,
    operation: &str,
    subresource: Option<&str>,
    fields: Value,
) -> ManagedFieldsEntry {
    ManagedFieldsEntry {
        api_version: Some("v1".into()),
        fields_type: Some("FieldsV1".into()),
        fields_v1: Some(FieldsV1(fields)),
        manager: Some(manager.into()),
        operation: Some(operation.into()),
        subresource: subresource.map(str::to_string),
        time: Some(now_time()),
    }
}

impl State {
    fn bump(&mut self) -> u64 {
        self.rv += 1;
        self.rv
    }

    /// Records a watch event and returns the line to broadcast.
    fn record(&mut self, kind: &str, node: &Node) -> (u64, Bytes) {
        self.record_obj(Res::Nodes, kind, node)
    }

    /// Records a watch event of any collection.
    fn record_obj(&mut self, res: Res, kind: &str, obj: &impl serde::Serialize) -> (u64, Bytes) {
        let rv = self.rv;
        let line = Bytes::from(format!("{}\n", json!({"type": kind, "object": obj})));
        self.history.push((rv, res, line.clone()));
        if self.history.len() > HISTORY {
            let drop = self.history.len() - HISTORY;
            self.history.drain(..drop);
            self.oldest_rv = self.history.first().map_or(self.rv, |(rv, _, _)| rv - 1);
        }
        (rv, line)
    }

    /// Rebuilds a node's managedFields from the condition owners (one Apply
    /// entry per manager on the status subresource) plus the kubelet's
    /// Update entry for the object itself.
    fn refresh_managed_fields(&mut self, name: &str) {
        let owners = self.owners.get(name).cloned().unwrap_or_default();
        let Some(node) = self.nodes.get_mut(name) else {
            return;
        };
        let mut by_manager: BTreeMap<String, serde_json::Map<String, Value>> = BTreeMap::new();
        for (t, m) in owners {
            by_manager.entry(m).or_default().insert(
                format!("k:{{\"type\":\"{t}\"}}"),
                json!({".": {}, "f:type": {}, "f:status": {}, "f:reason": {}, "f:message": {},
                       "f:lastTransitionTime": {}}),
            );
        }
        let mut entries = vec![managed_entry(
            "kubelet",
            "Update",
            None,
            json!({"f:metadata": {"f:labels": {".": {}}}, "f:spec": {"f:podCIDR": {}, "f:podCIDRs": {}}}),
        )];
        for (m, conds) in by_manager {
            entries.push(managed_entry(
                &m,
                "Apply",
                Some("status"),
                json!({"f:status": {"f:conditions": Value::Object(conds)}}),
            ));
        }
        node.metadata.managed_fields = Some(entries);
    }
}

/// A pod of DaemonSet `daemonset` as the controller creates it: running on
/// `node` under service account `service_account`, with uid `uid`.
pub fn daemonset_pod(
    namespace: &str,
    name: &str,
    uid: &str,
    node: &str,
    service_account: &str,
    daemonset: &str,
) -> Pod {
    use k8s_openapi::api::core::v1::PodSpec;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
    Pod {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(namespace.into()),
            uid: Some(uid.into()),
            owner_references: Some(vec![OwnerReference {
                api_version: "apps/v1".into(),
                kind: "DaemonSet".into(),
                name: daemonset.into(),
                uid: format!("uid-ds-{daemonset}"),
                controller: Some(true),
                ..Default::default()
            }]),
            ..Default::default()
        },
        spec: Some(PodSpec {
            node_name: Some(node.into()),
            service_account_name: Some(service_account.into()),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// `(namespace, name)` of an object; an empty namespace becomes `default`.
fn object_key(meta: &mut ObjectMeta) -> (String, String) {
    let ns = meta
        .namespace
        .get_or_insert_with(|| "default".to_string())
        .clone();
    (ns, meta.name.clone().unwrap_or_default())
}

/// Sets uid, creation time and resourceVersion as the apiserver does
/// (kept from `old` on replacement); returns the watch event type.
fn stamp(meta: &mut ObjectMeta, old: Option<&ObjectMeta>, rv: u64) -> &'static str {
    meta.resource_version = Some(rv.to_string());
    match old {
        Some(o) => {
            meta.uid = o.uid.clone();
            meta.creation_timestamp = o.creation_timestamp.clone();
            "MODIFIED"
        }
        None => {
            meta.uid = Some(format!(
                "uid-{}-{}-{rv}",
                meta.namespace.as_deref().unwrap_or_default(),
                meta.name.as_deref().unwrap_or_default()
            ));
            meta.creation_timestamp = Some(now_time());
            "ADDED"
        }
    }
}

/// A Node as a kubelet registers it: pod CIDRs in `spec.podCIDRs` (and the
/// first in the legacy `spec.podCIDR`), `addresses` as `(type, address)`
/// pairs (`InternalIP`, `ExternalIP`, `Hostname`), and the
/// `kubernetes.io/hostname` label.
pub fn kubelet_node(name: &str, pod_cidrs: &[&str], addresses: &[(&str, &str)]) -> Node {
    use k8s_openapi::api::core::v1::{NodeAddress, NodeSpec, NodeStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    Node {
        metadata: ObjectMeta {
            name: Some(name.into()),
            labels: Some([("kubernetes.io/hostname".to_string(), name.to_string())].into()),
            ..Default::default()
        },
        spec: Some(NodeSpec {
            pod_cidr: pod_cidrs.first().map(|s| s.to_string()),
            pod_cidrs: Some(pod_cidrs.iter().map(|s| s.to_string()).collect()),
            ..Default::default()
        }),
        status: Some(NodeStatus {
            addresses: Some(
                addresses
                    .iter()
                    .map(|(t, a)| NodeAddress {
                        type_: t.to_string(),
                        address: a.to_string(),
                    })
                    .collect(),
            ),
            ..Default::default()
        }),
    }
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
                owners: BTreeMap::new(),
                history: Vec::new(),
                oldest_rv: 100,
                events: BTreeMap::new(),
                tokens: HashMap::new(),
                pods: BTreeMap::new(),
                log: Vec::new(),
                unavailable: false,
                rbac: None,
            }),
            watch_tx,
            bearer,
            bookmark_interval: Duration::from_secs(1),
            open_watches: AtomicU64::new(0),
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

    /// Enforces RBAC with these ClusterRole rules from now on (`None`:
    /// everything is allowed, the default). A request no rule allows is
    /// answered 403 with a `Status` of reason `Forbidden`, after
    /// authentication (401 first) and before routing, as kube-apiserver
    /// does; it is logged like any other ([`StandIn::forbidden`]).
    pub fn set_rbac(&self, rules: Option<Vec<PolicyRule>>) {
        self.shared.lock().rbac = rules;
    }

    /// The requests answered 403 so far.
    pub fn forbidden(&self) -> Vec<RequestRecord> {
        self.shared
            .lock()
            .log
            .iter()
            .filter(|r| r.status == 403)
            .cloned()
            .collect()
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

    /// While set, every request answers 503 ServiceUnavailable and open
    /// watches are closed.
    pub fn set_unavailable(&self, unavailable: bool) {
        self.shared.lock().unavailable = unavailable;
        if unavailable {
            let _ = self.shared.watch_tx.send(Arc::new(Signal::Close));
        }
    }

    /// Sends an in-stream `ERROR` event with a 410 Gone `Status` on every
    /// open watch and ends them, and forgets the watch history, so the
    /// client must relist.
    pub fn inject_gone(&self) {
        {
            let mut st = self.shared.lock();
            st.history.clear();
            st.oldest_rv = st.rv;
        }
        let _ = self.shared.watch_tx.send(Arc::new(Signal::Gone));
    }

    /// Number of watch streams currently open.
    pub fn open_watches(&self) -> u64 {
        self.shared.open_watches.load(Ordering::SeqCst)
    }

    /// Current resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.shared.lock().rv
    }

    /// Creates or replaces a Node (ADDED or MODIFIED on watches). Status
    /// conditions owned through server-side apply are kept. Returns the
    /// new resourceVersion.
    pub fn upsert_node(&self, mut node: Node) -> u64 {
        let mut st = self.shared.lock();
        let name = node.metadata.name.clone().unwrap_or_default();
        let rv = st.bump();
        let kind = match st.nodes.get(&name) {
            Some(old) => {
                node.metadata.uid = old.metadata.uid.clone();
                node.metadata.creation_timestamp = old.metadata.creation_timestamp.clone();
                let kept = old.status.as_ref().and_then(|s| s.conditions.clone());
                let status = node.status.get_or_insert_with(Default::default);
                if status.conditions.is_none() {
                    status.conditions = kept;
                }
                "MODIFIED"
            }
            None => {
                node.metadata.uid = Some(format!("uid-{name}-{rv}"));
                node.metadata.creation_timestamp = Some(now_time());
                "ADDED"
            }
        };
        node.metadata.resource_version = Some(rv.to_string());
        st.nodes.insert(name.clone(), node);
        st.refresh_managed_fields(&name);
        self.publish(&mut st, kind, &name);
        rv
    }

    /// Deletes a Node (DELETED on watches); false if it did not exist.
    pub fn delete_node(&self, name: &str) -> bool {
        let mut st = self.shared.lock();
        let Some(mut node) = st.nodes.remove(name) else {
            return false;
        };
        st.owners.remove(name);
        let rv = st.bump();
        node.metadata.resource_version = Some(rv.to_string());
        let (_, line) = st.record("DELETED", &node);
        let _ = self
            .shared
            .watch_tx
            .send(Arc::new(Signal::Event(Res::Nodes, line)));
        true
    }

    fn publish(&self, st: &mut State, kind: &str, name: &str) {
        if let Some(node) = st.nodes.get(name).cloned() {
            let (_, line) = st.record(kind, &node);
            let _ = self
                .shared
                .watch_tx
                .send(Arc::new(Signal::Event(Res::Nodes, line)));
        }
    }

    /// Creates or replaces a Service (ADDED or MODIFIED on watches);
    /// `metadata.namespace` defaults to `default`. Returns the new
    /// resourceVersion.
    pub fn upsert_service(&self, mut svc: Service) -> u64 {
        let mut st = self.shared.lock();
        let key = object_key(&mut svc.metadata);
        let rv = st.bump();
        let kind = stamp(
            &mut svc.metadata,
            st.services.get(&key).map(|o| &o.metadata),
            rv,
        );
        st.services.insert(key, svc.clone());
        let (_, line) = st.record_obj(Res::Services, kind, &svc);
        let _ = self
            .shared
            .watch_tx
            .send(Arc::new(Signal::Event(Res::Services, line)));
        rv
    }

    /// Deletes a Service (DELETED on watches); false if it did not exist.
    pub fn delete_service(&self, namespace: &str, name: &str) -> bool {
        let mut st = self.shared.lock();
        let Some(mut svc) = st
            .services
            .remove(&(namespace.to_string(), name.to_string()))
        else {
            return false;
        };
        let rv = st.bump();
        svc.metadata.resource_version = Some(rv.to_string());
        let (_, line) = st.record_obj(Res::Services, "DELETED", &svc);
        let _ = self
            .shared
            .watch_tx
            .send(Arc::new(Signal::Event(Res::Services, line)));
        true
    }

    /// Creates or replaces an EndpointSlice (ADDED or MODIFIED on
    /// watches); `metadata.namespace` defaults to `default`. Returns the
    /// new resourceVersion.
    pub fn upsert_endpointslice(&self, mut slice: EndpointSlice) -> u64 {
        let mut st = self.shared.lock();
        let key = object_key(&mut slice.metadata);
        let rv = st.bump();
        let kind = stamp(
            &mut slice.metadata,
            st.slices.get(&key).map(|o| &o.metadata),
            rv,
        );
        st.slices.insert(key, slice.clone());
        let (_, line) = st.record_obj(Res::EndpointSlices, kind, &slice);
        let _ = self
            .shared
            .watch_tx
            .send(Arc::new(Signal::Event(Res::EndpointSlices, line)));
        rv
    }

    /// Deletes an EndpointSlice (DELETED on watches); false if it did not
    /// exist.
    pub fn delete_endpointslice(&self, namespace: &str, name: &str) -> bool {
        let mut st = self.shared.lock();
        let Some(mut slice) = st.slices.remove(&(namespace.to_string(), name.to_string())) else {
            return false;
        };
        let rv = st.bump();
        slice.metadata.resource_version = Some(rv.to_string());
        let (_, line) = st.record_obj(Res::EndpointSlices, "DELETED", &slice);
        let _ = self
            .shared
            .watch_tx
            .send(Arc::new(Signal::Event(Res::EndpointSlices, line)));
        true
    }

    /// Creates or replaces a Lease as another writer would (ADDED or
    /// MODIFIED on watches); `metadata.namespace` defaults to `default`.
    /// Returns the new resourceVersion.
    pub fn upsert_lease(&self, mut lease: Lease) -> u64 {
        let mut st = self.shared.lock();
        let key = object_key(&mut lease.metadata);
        let rv = st.bump();
        let kind = stamp(
            &mut lease.metadata,
            st.leases.get(&key).map(|o| &o.metadata),
            rv,
        );
        leases::store(&self.shared, &mut st, key, lease, kind);
        rv
    }

    /// The stored Leases of `namespace`, by name.
    pub fn leases(&self, namespace: &str) -> BTreeMap<String, Lease> {
        self.shared
            .lock()
            .leases
            .iter()
            .filter(|((ns, _), _)| ns == namespace)
            .map(|((_, n), l)| (n.clone(), l.clone()))
            .collect()
    }

    /// Number of stored (Services, EndpointSlices).
    pub fn service_counts(&self) -> (usize, usize) {
        let st = self.shared.lock();
        (st.services.len(), st.slices.len())
    }

    /// The stored Node.
    pub fn node(&self, name: &str) -> Option<Node> {
        self.shared.lock().nodes.get(name).cloned()
    }

    /// The field manager owning condition `type_` on `node`.
    pub fn condition_owner(&self, node: &str, type_: &str) -> Option<String> {
        self.shared
            .lock()
            .owners
            .get(node)
            .and_then(|o| o.get(type_).cloned())
    }

    /// Applies conditions as `manager` (e.g. the kubelet's `Ready`), the
    /// same merge the HTTP apply path uses.
    pub fn apply_conditions_as(
        &self,
        node: &str,
        manager: &str,
        conditions: Vec<NodeCondition>,
    ) -> Result<bool, Conflict> {
        let mut st = self.shared.lock();
        apply_status(&self.shared, &mut st, node, manager, conditions, true)
    }

    /// Mints a service-account token bound to a node and pod, valid for
    /// `audience` until `expires` (TokenReview answers from these).
    pub fn mint_token(
        &self,
        node: &str,
        pod_name: &str,
        pod_uid: &str,
        audience: &str,
        expires: SystemTime,
    ) -> String {
        let token = random_token();
        self.shared.lock().tokens.insert(
            token.clone(),
            Minted {
                node: node.into(),
                pod_name: pod_name.into(),
                pod_uid: pod_uid.into(),
                audience: audience.into(),
                expires,
            },
        );
        token
    }

    /// Creates or replaces a Pod (served on GET by namespace and name).
    pub fn upsert_pod(&self, mut pod: Pod) {
        let mut st = self.shared.lock();
        let rv = st.bump();
        pod.metadata.resource_version = Some(rv.to_string());
        let key = (
            pod.metadata.namespace.clone().unwrap_or_default(),
            pod.metadata.name.clone().unwrap_or_default(),
        );
        st.pods.insert(key, pod);
    }

    /// Deletes a Pod; false if it did not exist.
    pub fn delete_pod(&self, namespace: &str, name: &str) -> bool {
        let mut st = self.shared.lock();
        st.pods
            .remove(&(namespace.to_string(), name.to_string()))
            .is_some()
    }

    /// Every request so far, in order.
    pub fn requests(&self) -> Vec<RequestRecord> {
        self.shared.lock().log.clone()
    }

    /// Stored events.k8s.io/v1 Events (as JSON), ordered by namespace and name.
    pub fn events(&self) -> Vec<Value> {
        self.shared.lock().events.values().cloned().collect()
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

async fn accept_loop(listener: TcpListener, acceptor: TlsAcceptor, shared: Arc<Shared>) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            r = listener.accept() => {
                let Ok((tcp, _)) = r else { continue };
                let acceptor = acceptor.clone();
                let shared = shared.clone();
                conns.spawn(async move {
                    let Ok(Ok(tls)) = tokio::time::timeout(IO_TIMEOUT, acceptor.accept(tcp)).await else {
                        return;
                    };
                    let svc = hyper::service::service_fn(move |req| {
                        let shared = shared.clone();
                        async move { Ok::<_, Infallible>(handle(shared, req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                        .await;
                });
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Response<Body> {
    let method = req.method().as_str().to_string();
    let path = req.uri().path().to_string();
    let query = req.uri().query().map(str::to_string);
    let content_type = req
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let authorized = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v == format!("Bearer {}", shared.bearer));
    let attrs = classify(&method, &path, query.as_deref());
    let body = match tokio::time::timeout(
        IO_TIMEOUT,
        http_body_util::Limited::new(req.into_body(), MAX_BODY).collect(),
    )
    .await
    {
        Ok(Ok(b)) => b.to_bytes(),
        _ => Bytes::new(),
    };
    let (unavailable, permitted) = {
        let st = shared.lock();
        let permitted = st
            .rbac
            .as_ref()
            .is_none_or(|rules| rbac::allowed(rules, attrs.as_ref()));
        (st.unavailable, permitted)
    };
    let resp = if unavailable {
        failure(
            StatusCode::SERVICE_UNAVAILABLE,
            "ServiceUnavailable",
            "the server is currently unable to handle the request",
        )
    } else if !authorized {
        failure(StatusCode::UNAUTHORIZED, "Unauthorized", "Unauthorized")
    } else if !permitted {
        let message = match &attrs {
            Some(a) => rbac::forbidden_message(RBAC_USER, a),
            None => format!("forbidden: User {RBAC_USER:?} cannot {method} path {path:?}"),
        };
        failure(StatusCode::FORBIDDEN, "Forbidden", &message)
    } else {
        route(
            &shared,
            attrs.as_ref(),
            query.as_deref(),
            content_type.as_deref(),
            &body,
        )
    };
    shared.lock().log.push(RequestRecord {
        method,
        path,
        query,
        content_type,
        attrs,
        status: resp.status().as_u16(),
    });
    resp
}

fn route(
    shared: &Arc<Shared>,
    attrs: Option<&RequestAttributes>,
    query: Option<&str>,
    content_type: Option<&str>,
    body: &Bytes,
) -> Response<Body> {
    let Some(a) = attrs else {
        return failure(
            StatusCode::NOT_FOUND,
            "NotFound",
            "the server could not find the requested resource",
        );
    };
    let q = request::parse_query(query);
    match (
        a.group.as_str(),
        a.resource.as_str(),
        a.subresource.as_deref(),
        a.verb.as_str(),
    ) {
        ("", "nodes", None, "list") => list_nodes(shared),
        ("", "nodes", None, "watch") => watch(shared, &q, Res::Nodes),
        ("", "services", None, "list") if a.name.is_none() => list_of(shared, Res::Services),
        ("", "services", None, "watch") if a.name.is_none() => watch(shared, &q, Res::Services),
        ("discovery.k8s.io", "endpointslices", None, "list") if a.name.is_none() => {
            list_of(shared, Res::EndpointSlices)
        }
        ("discovery.k8s.io", "endpointslices", None, "watch") if a.name.is_none() => {
            watch(shared, &q, Res::EndpointSlices)
        }
        ("", "nodes", None | Some("status"), "get") => {
            let name = a.name.clone().unwrap_or_default();
            match shared.lock().nodes.get(&name) {
                Some(n) => json_response(
                    StatusCode::OK,
                    &serde_json::to_value(n).unwrap_or(Value::Null),
                ),
                None => failure(
                    StatusCode::NOT_FOUND,
                    "NotFound",
                    &format!("nodes \"{name}\" not found"),
                ),
            }
        }
        ("", "nodes", Some("status"), "patch") => {
            if content_type != Some("application/apply-patch+yaml") {
                return failure(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "UnsupportedMediaType",
                    "the stand-in only implements server-side apply on nodes/status",
                );
            }
            apply_node_status(shared, a.name.as_deref().unwrap_or_default(), &q, body)
        }
        ("coordination.k8s.io", "leases", None, _) => leases::handle(shared, a, &q, body),
        ("events.k8s.io", "events", None, verb) => events(shared, a, verb, content_type, body),
        ("authentication.k8s.io", "tokenreviews", None, "create") => token_review(shared, body),
        ("", "pods", None, "get") => {
            let key = (
                a.namespace.clone().unwrap_or_default(),
                a.name.clone().unwrap_or_default(),
            );
            match shared.lock().pods.get(&key) {
                Some(p) => json_response(
                    StatusCode::OK,
                    &serde_json::to_value(p).unwrap_or(Value::Null),
                ),
                None => failure(
                    StatusCode::NOT_FOUND,
                    "NotFound",
                    &format!("pods \"{}\" not found", key.1),
                ),
            }
        }
        _ => failure(
            StatusCode::NOT_FOUND,
            "NotFound",
            "the server could not find the requested resource",
        ),
    }
}

fn list_nodes(shared: &Shared) -> Response<Body> {
    let st = shared.lock();
    let items: Vec<Value> = st.nodes.values().map(list_item).collect();
    json_response(
        StatusCode::OK,
        &json!({"kind": "NodeList", "apiVersion": "v1",
                "metadata": {"resourceVersion": st.rv.to_string()}, "items": items}),
    )
}

/// A Service or EndpointSlice list (all namespaces, or the request's).
fn list_of(shared: &Shared, res: Res) -> Response<Body> {
    let st = shared.lock();
    let items: Vec<Value> = match res {
        Res::Nodes => st.nodes.values().map(list_item).collect(),
        Res::Services => st.services.values().map(list_item).collect(),
        Res::EndpointSlices => st.slices.values().map(list_item).collect(),
        Res::Leases => st.leases.values().map(list_item).collect(),
    };
    let (kind, api_version) = res.kind();
    json_response(
        StatusCode::OK,
        &json!({"kind": format!("{kind}List"), "apiVersion": api_version,
                "metadata": {"resourceVersion": st.rv.to_string()}, "items": items}),
    )
}

/// Synthetic ADDED lines for every stored object of `res`.
fn initial_events(st: &State, res: Res) -> Vec<Bytes> {
    fn line(o: &impl serde::Serialize) -> Bytes {
        Bytes::from(format!("{}\n", json!({"type": "ADDED", "object": o})))
    }
    match res {
        Res::Nodes => st.nodes.values().map(line).collect(),
        Res::Services => st.services.values().map(line).collect(),
        Res::EndpointSlices => st.slices.values().map(line).collect(),
        Res::Leases => st.leases.values().map(line).collect(),
    }
}

fn gone_line(rv: u64, oldest: u64) -> Bytes {
    let status = status_body(
        410,
        "Expired",
        &format!("too old resource version: {rv} ({oldest})"),
    );
    Bytes::from(format!("{}\n", json!({"type": "ERROR", "object": status})))
}

fn watch(shared: &Arc<Shared>, q: &BTreeMap<String, String>, res: Res) -> Response<Body> {
    let timeout = q
        .get("timeoutSeconds")
        .and_then(|s| s.parse::<u64>().ok())
        .unwrap_or(1800);
    let bookmarks = q.get("allowWatchBookmarks").is_some_and(|v| v == "true");
    let from = q
        .get("resourceVersion")
        .and_then(|s| s.parse::<u64>().ok())
        .unwrap_or(0);
    let (tx, mut rx) = mpsc::channel::<Bytes>(64);
    let mut backlog: Vec<Bytes> = Vec::new();
    let mut sub;
    let expired;
    {
        let st = shared.lock();
        // Subscribe under the lock: no event falls between backlog and live.
        sub = shared.watch_tx.subscribe();
        expired = from != 0 && from < st.oldest_rv;
        if from == 0 {
            // "Any" resourceVersion: a synthetic ADDED per object first.
            backlog = initial_events(&st, res);
        } else if expired {
            backlog.push(gone_line(from, st.oldest_rv));
        } else {
            let newer = st
                .history
                .iter()
                .filter(|(rv, r, _)| *rv > from && *r == res);
            backlog.extend(newer.map(|(_, _, l)| l.clone()));
        }
    }
    let shared2 = shared.clone();
    tokio::spawn(async move {
        shared2.open_watches.fetch_add(1, Ordering::SeqCst);
        let _ = stream_watch(
            &tx, backlog, expired, &mut sub, timeout, bookmarks, &shared2, res,
        )
        .await;
        shared2.open_watches.fetch_sub(1, Ordering::SeqCst);
    });
    let stream =
        futures::stream::poll_fn(move |cx| rx.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b)))));
    let mut r = Response::new(StreamBody::new(stream).boxed());
    r.headers_mut().insert(
        "content-type",
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

/// Feeds one watch: backlog, then live events, bookmarks, until the
/// timeout, a Gone/Close signal, or the client going away (`Err`).
#[allow(clippy::too_many_arguments)]
async fn stream_watch(
    tx: &mpsc::Sender<Bytes>,
    backlog: Vec<Bytes>,
    expired: bool,
    sub: &mut broadcast::Receiver<Arc<Signal>>,
    timeout: u64,
    bookmarks: bool,
    shared: &Shared,
    res: Res,
) -> Result<(), mpsc::error::SendError<Bytes>> {
    for line in backlog {
        tx.send(line).await?;
    }
    if expired {
        return Ok(());
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(timeout);
    let mut tick = tokio::time::interval(shared.bookmark_interval);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(deadline) => return Ok(()),
            _ = tick.tick() => {
                if bookmarks {
                    let rv = shared.lock().rv;
                    let (kind, api_version) = res.kind();
                    let line = json!({"type": "BOOKMARK", "object": {"kind": kind, "apiVersion": api_version,
                        "metadata": {"resourceVersion": rv.to_string()}}});
                    tx.send(Bytes::from(format!("{line}\n"))).await?;
                } else if tx.is_closed() {
                    return Ok(());
                }
            }
            sig = sub.recv() => match sig {
                Ok(s) => match &*s {
                    Signal::Event(r, line) if *r == res => tx.send(line.clone()).await?,
                    Signal::Event(..) => {}
                    Signal::Gone => {
                        let (rv, oldest) = { let st = shared.lock(); (st.rv, st.oldest_rv) };
                        tx.send(gone_line(rv.saturating_sub(1), oldest)).await?;
                        return Ok(());
                    }
                    Signal::Close => return Ok(()),
                },
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    // Too slow a watcher: the apiserver also ends it with 410.
                    let rv = shared.lock().rv;
                    tx.send(gone_line(rv, rv)).await?;
                    return Ok(());
                }
                Err(broadcast::error::RecvError::Closed) => return Ok(()),
            }
        }
    }
}

fn apply_status(
    shared: &Shared,
    st: &mut State,
    name: &str,
    manager: &str,
    conditions: Vec<NodeCondition>,
    force: bool,
) -> Result<bool, Conflict> {
    let State { nodes, owners, .. } = st;
    let Some(node) = nodes.get_mut(name) else {
        return Ok(false);
    };
    let owners = owners.entry(name.to_string()).or_default();
    let status = node.status.get_or_insert_with(Default::default);
    let list = status.conditions.get_or_insert_with(Vec::new);
    let changed = apply_conditions(list, owners, manager, conditions, force)?;
    if changed {
        st.refresh_managed_fields(name);
        let rv = st.bump();
        if let Some(n) = st.nodes.get_mut(name) {
            n.metadata.resource_version = Some(rv.to_string());
        }
        if let Some(node) = st.nodes.get(name).cloned() {
            let (_, line) = st.record("MODIFIED", &node);
            let _ = shared
                .watch_tx
                .send(Arc::new(Signal::Event(Res::Nodes, line)));
        }
    }
    Ok(changed)
}

fn apply_node_status(
    shared: &Shared,
    name: &str,
    q: &BTreeMap<String, String>,
    body: &Bytes,
) -> Response<Body> {
    let Some(manager) = q.get("fieldManager").filter(|m| !m.is_empty()) else {
        return failure(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "PATCH with apply requires fieldManager",
        );
    };
    let force = q.get("force").is_some_and(|v| v == "true");
    // kube sends JSON, which is YAML; that is all the stand-in parses.
    let patch: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => {
            return failure(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                &format!("apply patch: {e}"),
            )
        }
    };
    if patch.get("apiVersion") != Some(&json!("v1")) || patch.get("kind") != Some(&json!("Node")) {
        return failure(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "apply patch needs apiVersion v1 and kind Node",
        );
    }
    let conditions: Vec<NodeCondition> = match patch
        .pointer("/status/conditions")
        .cloned()
        .map(serde_json::from_value)
        .unwrap_or(Ok(Vec::new()))
    {
        Ok(c) => c,
        Err(e) => {
            return failure(
                StatusCode::UNPROCESSABLE_ENTITY,
                "Invalid",
                &format!("conditions: {e}"),
            )
        }
    };
    let mut st = shared.lock();
    if !st.nodes.contains_key(name) {
        return failure(
            StatusCode::NOT_FOUND,
            "NotFound",
            &format!("nodes \"{name}\" not found"),
        );
    }
    match apply_status(shared, &mut st, name, manager, conditions, force) {
        Ok(_) => {
            let node = st.nodes.get(name).map(|n| serde_json::to_value(n).unwrap_or(Value::Null));
            json_response(StatusCode::OK, &node.unwrap_or(Value::Null))
        }
        Err(c) => failure(
            StatusCode::CONFLICT,
            "Conflict",
            &format!("Apply failed with 1 conflict: conflict with \"{}\": .status.conditions[type=\"{}\"]", c.owner, c.type_),
        ),
    }
}

/// RFC 7386 JSON merge patch.
fn merge_patch(target: &mut Value, patch: &Value) {
    match (target.as_object_mut(), patch.as_object()) {
        (Some(t), Some(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        (_, Some(_)) => {
            *target = json!({});
            merge_patch(target, patch);
        }
        _ => *target = patch.clone(),
    }
}

fn events(
    shared: &Shared,
    a: &RequestAttributes,
    verb: &str,
    content_type: Option<&str>,
    body: &Bytes,
) -> Response<Body> {
    let ns = a.namespace.clone().unwrap_or_default();
    let mut st = shared.lock();
    match verb {
        "create" => {
            let mut ev: Value = match serde_json::from_slice(body) {
                Ok(v) => v,
                Err(e) => {
                    return failure(
                        StatusCode::BAD_REQUEST,
                        "BadRequest",
                        &format!("event: {e}"),
                    )
                }
            };
            let Some(name) = ev
                .pointer("/metadata/name")
                .and_then(Value::as_str)
                .map(str::to_string)
            else {
                return failure(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "Invalid",
                    "metadata.name: Required value",
                );
            };
            // The apiserver's validation of events.k8s.io/v1 Events.
            for field in [
                "eventTime",
                "reportingController",
                "reportingInstance",
                "action",
                "reason",
            ] {
                if ev.get(field).is_none_or(|v| v.is_null() || v == "") {
                    let message = format!("{field}: Required value");
                    return failure(StatusCode::UNPROCESSABLE_ENTITY, "Invalid", &message);
                }
            }
            if st.events.contains_key(&(ns.clone(), name.clone())) {
                return failure(
                    StatusCode::CONFLICT,
                    "AlreadyExists",
                    &format!("events.events.k8s.io \"{name}\" already exists"),
                );
            }
            let rv = st.bump();
            if let Some(m) = ev.get_mut("metadata").and_then(Value::as_object_mut) {
                m.insert("namespace".into(), json!(ns));
                m.insert("resourceVersion".into(), json!(rv.to_string()));
                m.insert("uid".into(), json!(format!("uid-event-{rv}")));
            }
            st.events.insert((ns, name), ev.clone());
            json_response(StatusCode::CREATED, &ev)
        }
        "patch" => {
            if content_type != Some("application/merge-patch+json") {
                return failure(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "UnsupportedMediaType",
                    "merge patch only",
                );
            }
            let name = a.name.clone().unwrap_or_default();
            let patch: Value = match serde_json::from_slice(body) {
                Ok(v) => v,
                Err(e) => {
                    return failure(
                        StatusCode::BAD_REQUEST,
                        "BadRequest",
                        &format!("patch: {e}"),
                    )
                }
            };
            let rv = st.bump();
            let Some(ev) = st.events.get_mut(&(ns, name.clone())) else {
                return failure(
                    StatusCode::NOT_FOUND,
                    "NotFound",
                    &format!("events.events.k8s.io \"{name}\" not found"),
                );
            };
            merge_patch(ev, &patch);
            if let Some(m) = ev.get_mut("metadata").and_then(Value::as_object_mut) {
                m.insert("resourceVersion".into(), json!(rv.to_string()));
            }
            json_response(StatusCode::OK, ev)
        }
        "list" => {
            let items: Vec<Value> = st
                .events
                .iter()
                .filter(|((n, _), _)| *n == ns)
                .map(|(_, v)| v.clone())
                .collect();
            json_response(
                StatusCode::OK,
                &json!({"kind": "EventList", "apiVersion": "events.k8s.io/v1",
                        "metadata": {"resourceVersion": st.rv.to_string()}, "items": items}),
            )
        }
        _ => failure(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            "not implemented by the stand-in",
        ),
    }
}

fn token_review(shared: &Shared, body: &Bytes) -> Response<Body> {
    let review: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => {
            return failure(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                &format!("tokenreview: {e}"),
            )
        }
    };
    let token = review
        .pointer("/spec/token")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let wanted: Vec<String> = review
        .pointer("/spec/audiences")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default();
    let st = shared.lock();
    let status = match st.tokens.get(token) {
        None => {
            json!({"authenticated": false, "error": "[invalid bearer token, square/go-jose: compact JWS format must have three parts]"})
        }
        Some(m) if m.expires <= SystemTime::now() => {
            json!({"authenticated": false, "error": "[invalid bearer token, service account token has expired]"})
        }
        Some(m) if !wanted.is_empty() && !wanted.contains(&m.audience) => json!({
            "authenticated": false,
            "error": format!("[invalid bearer token, token audiences [\"{}\"] is invalid for the target audiences {:?}]", m.audience, wanted),
        }),
        Some(m) => {
            let extra = json!({
                "authentication.kubernetes.io/credential-id": [format!("JTI={token:.8}")],
                "authentication.kubernetes.io/node-name": [m.node],
                "authentication.kubernetes.io/node-uid": [format!("uid-{}", m.node)],
                "authentication.kubernetes.io/pod-name": [m.pod_name],
                "authentication.kubernetes.io/pod-uid": [m.pod_uid],
            });
            let audiences = vec![m.audience.clone()];
            json!({
                "authenticated": true,
                "audiences": audiences,
                "user": {
                    "username": "system:serviceaccount:edge-relay:edge-client",
                    "uid": "uid-sa-edge-client",
                    "groups": ["system:serviceaccounts", "system:serviceaccounts:edge-relay", "system:authenticated"],
                    "extra": extra,
                },
            })
        }
    };
    let mut out = review.clone();
    if let Some(o) = out.as_object_mut() {
        o.insert("status".into(), status);
        o.insert("metadata".into(), json!({"creationTimestamp": null}));
    }
    json_response(StatusCode::CREATED, &out)
}
