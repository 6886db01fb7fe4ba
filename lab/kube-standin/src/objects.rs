//! The stand-in's objects and replies: response builders, the state's
//! bookkeeping (resourceVersions, history, watchers), and the objects
//! tests build (a kubelet's Node, a DaemonSet's Pod).

#[allow(clippy::wildcard_imports)]
use super::*;

pub(crate) type Body = BoxBody<Bytes, Infallible>;

pub(crate) fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).boxed()
}

pub(crate) fn json_response(code: StatusCode, v: &Value) -> Response<Body> {
    let mut r = Response::new(full(v.to_string()));
    *r.status_mut() = code;
    r.headers_mut().insert(
        "content-type",
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

/// A `Status` object as the apiserver returns for failures.
pub(crate) fn status_body(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

pub(crate) fn failure(code: StatusCode, reason: &str, message: &str) -> Response<Body> {
    json_response(code, &status_body(code.as_u16(), reason, message))
}

/// A request body as JSON (kube sends JSON, which is YAML; that is all the
/// stand-in parses), or the 400 `BadRequest` the apiserver answers,
/// naming `what`.
pub(crate) fn parse_body<T: serde::de::DeserializeOwned>(
    body: &[u8],
    what: &str,
) -> Result<T, Box<Response<Body>>> {
    serde_json::from_slice(body).map_err(|e| {
        Box::new(failure(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            &format!("{what}: {e}"),
        ))
    })
}

pub(crate) fn now_time() -> Time {
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
pub(crate) fn list_item(node: &impl serde::Serialize) -> Value {
    let mut v = serde_json::to_value(node).unwrap_or(Value::Null);
    if let Some(o) = v.as_object_mut() {
        o.remove("kind");
        o.remove("apiVersion");
    }
    v
}

pub(crate) fn managed_entry(
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
    pub(crate) fn bump(&mut self) -> u64 {
        self.rv += 1;
        self.rv
    }

    /// Records a watch event and returns the line to broadcast.
    pub(crate) fn record(&mut self, kind: &str, node: &Node) -> (u64, Bytes) {
        self.record_obj(Res::Nodes, kind, node)
    }

    /// Records a watch event of any collection.
    pub(crate) fn record_obj(
        &mut self,
        res: Res,
        kind: &str,
        obj: &impl serde::Serialize,
    ) -> (u64, Bytes) {
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
    pub(crate) fn refresh_managed_fields(&mut self, name: &str) {
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
pub(crate) fn object_key(meta: &mut ObjectMeta) -> (String, String) {
    let ns = meta
        .namespace
        .get_or_insert_with(|| "default".to_string())
        .clone();
    (ns, meta.name.clone().unwrap_or_default())
}

/// Sets uid, creation time and resourceVersion as the apiserver does
/// (kept from `old` on replacement); returns the watch event type.
pub(crate) fn stamp(meta: &mut ObjectMeta, old: Option<&ObjectMeta>, rv: u64) -> &'static str {
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

/// A Node as a kubelet registers and reports it: pod CIDRs in
/// `spec.podCIDRs` (and the first in the legacy `spec.podCIDR`),
/// `addresses` as `(type, address)` pairs (`InternalIP`, `ExternalIP`,
/// `Hostname`), and the rest a real Node carries, at a real Node's size
/// (~13 KiB of JSON): the `kubernetes.io/hostname`, os and arch labels;
/// the annotations k3s, flannel, Calico and a CSI driver write (a few KB);
/// `status.images` (50, the kubelet's default `nodeStatusMaxImages`),
/// `nodeInfo`, capacity and allocatable, the daemon endpoint, and the
/// conditions the kubelet reports (`MemoryPressure`, `DiskPressure`,
/// `PIDPressure`, `Ready`) with the CNI's `NetworkUnavailable`. None of
/// it makes the node an edge, a cloud node, a control-plane node or puts
/// it in a zone or community: only the arguments say what it claims.
pub fn kubelet_node(name: &str, pod_cidrs: &[&str], addresses: &[(&str, &str)]) -> Node {
    use k8s_openapi::api::core::v1::{
        ContainerImage, DaemonEndpoint, NodeAddress, NodeCondition, NodeDaemonEndpoints, NodeSpec,
        NodeStatus, NodeSystemInfo,
    };
    use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
    let seed = name.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    let first_ip = addresses
        .iter()
        .find(|(t, _)| *t == "InternalIP")
        .map_or("10.0.0.1", |(_, a)| *a);
    let labels = [
        ("kubernetes.io/hostname", name),
        ("kubernetes.io/os", "linux"),
        ("kubernetes.io/arch", "amd64"),
        ("beta.kubernetes.io/os", "linux"),
        ("beta.kubernetes.io/arch", "amd64"),
        ("node.kubernetes.io/instance-type", "k3s"),
    ];
    let node_args = json!([
        "agent",
        "--node-name",
        name,
        "--node-ip",
        first_ip,
        "--with-node-id",
        "--kubelet-arg",
        "max-pods=110",
        "--kubelet-arg",
        "image-gc-high-threshold=85",
        "--kubelet-arg",
        "image-gc-low-threshold=80",
        "--kubelet-arg",
        "eviction-hard=memory.available<100Mi,nodefs.available<10%",
        "--kubelet-arg",
        "kube-reserved=cpu=200m,memory=256Mi",
        "--kubelet-arg",
        "system-reserved=cpu=100m,memory=128Mi",
        "--node-label",
        "node.kubernetes.io/instance-type=k3s",
        "--flannel-iface",
        "eth0",
        "--server",
        "https://k3s.cluster.example:6443",
        "--token",
        "********",
        "--data-dir",
        "/var/lib/rancher/k3s",
        "--resolv-conf",
        "/etc/rancher/k3s/resolv.conf",
        "--protect-kernel-defaults",
        "--selinux",
        "--prefer-bundled-bin",
    ]);
    let node_env = json!({
        "K3S_DATA_DIR": "/var/lib/rancher/k3s/data/".to_string() + &hex(seed, 64),
        "K3S_URL": "https://k3s.cluster.example:6443",
        "K3S_TOKEN": "********",
        "NO_PROXY": "127.0.0.0/8,10.0.0.0/8,172.16.0.0/12,192.168.0.0/16,.svc,.cluster.local",
        "HTTP_PROXY": "http://proxy.shop.example:3128",
        "HTTPS_PROXY": "http://proxy.shop.example:3128",
    });
    let annotations = [
        ("alpha.kubernetes.io/provided-node-ip", first_ip.to_string()),
        (
            "csi.volume.kubernetes.io/nodeid",
            json!({
                "driver.longhorn.io": name,
                "ebs.csi.aws.com": format!("i-{}", hex(seed ^ 1, 17)),
                "smb.csi.k8s.io": name,
                "nfs.csi.k8s.io": name,
            })
            .to_string(),
        ),
        (
            "flannel.alpha.coreos.com/backend-data",
            json!({"VNI": 1, "VtepMAC": mac(seed)}).to_string(),
        ),
        ("flannel.alpha.coreos.com/backend-type", "vxlan".to_string()),
        (
            "flannel.alpha.coreos.com/kube-subnet-manager",
            "true".to_string(),
        ),
        ("flannel.alpha.coreos.com/public-ip", first_ip.to_string()),
        ("projectcalico.org/IPv4Address", format!("{first_ip}/24")),
        (
            "projectcalico.org/IPv4VXLANTunnelAddr",
            "10.244.0.1".to_string(),
        ),
        ("k3s.io/hostname", name.to_string()),
        ("k3s.io/internal-ip", first_ip.to_string()),
        ("k3s.io/node-args", node_args.to_string()),
        (
            "k3s.io/node-config-hash",
            hex(seed ^ 2, 52).to_uppercase() + "====",
        ),
        ("k3s.io/node-env", node_env.to_string()),
        ("node.alpha.kubernetes.io/ttl", "0".to_string()),
        (
            "volumes.kubernetes.io/controller-managed-attach-detach",
            "true".to_string(),
        ),
    ];
    let repos = [
        "docker.io/rancher/mirrored-pause",
        "docker.io/rancher/mirrored-coredns-coredns",
        "docker.io/rancher/local-path-provisioner",
        "docker.io/rancher/mirrored-metrics-server",
        "docker.io/rancher/klipper-helm",
        "docker.io/rancher/klipper-lb",
        "docker.io/rancher/mirrored-library-traefik",
        "docker.io/rancher/mirrored-library-busybox",
        "registry.k8s.io/kube-proxy",
        "registry.k8s.io/pause",
        "quay.io/calico/node",
        "quay.io/calico/cni",
        "quay.io/calico/kube-controllers",
        "docker.io/flannel/flannel",
        "docker.io/flannel/flannel-cni-plugin",
        "docker.io/longhornio/longhorn-manager",
        "docker.io/longhornio/longhorn-engine",
        "docker.io/longhornio/longhorn-instance-manager",
        "docker.io/longhornio/csi-node-driver-registrar",
        "quay.io/prometheus/node-exporter",
        "quay.io/prometheus-operator/prometheus-config-reloader",
        "docker.io/grafana/promtail",
        "ghcr.io/edge-relay/edge-client",
        "registry.shop.example/pos/checkout",
        "registry.shop.example/pos/inventory-sync",
    ];
    let images = (0..50_u64)
        .map(|i| {
            let repo = repos[usize::try_from(i).unwrap_or(0) % repos.len()];
            let tag = format!("v{}.{}.{}", 1 + i % 4, i % 29, (i * 7) % 13);
            ContainerImage {
                names: Some(vec![
                    format!("{repo}@sha256:{}", hex(seed ^ (i << 8), 64)),
                    format!("{repo}:{tag}"),
                ]),
                size_bytes: Some(
                    i64::try_from(700_000 + (i * 3_141_592) % 180_000_000).unwrap_or(0),
                ),
            }
        })
        .collect();
    let now = now_time();
    let condition = |type_: &str, status: &str, reason: &str, message: &str| NodeCondition {
        type_: type_.into(),
        status: status.into(),
        reason: Some(reason.into()),
        message: Some(message.into()),
        last_heartbeat_time: Some(now.clone()),
        last_transition_time: Some(now.clone()),
    };
    let resources = |cpu: &str, memory: &str, storage: &str| {
        [
            ("cpu", cpu),
            ("ephemeral-storage", storage),
            ("hugepages-1Gi", "0"),
            ("hugepages-2Mi", "0"),
            ("memory", memory),
            ("pods", "110"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), Quantity(v.to_string())))
        .collect()
    };
    Node {
        metadata: ObjectMeta {
            name: Some(name.into()),
            labels: Some(
                labels
                    .into_iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            ),
            annotations: Some(
                annotations
                    .into_iter()
                    .map(|(k, v)| (k.to_string(), v))
                    .collect(),
            ),
            ..Default::default()
        },
        spec: Some(NodeSpec {
            pod_cidr: pod_cidrs.first().map(|s| s.to_string()),
            pod_cidrs: Some(pod_cidrs.iter().map(|s| s.to_string()).collect()),
            provider_id: Some(format!("k3s://{name}")),
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
            allocatable: Some(resources("3800m", "7868212Ki", "56438196598")),
            capacity: Some(resources("4", "8131380Ki", "58017428Ki")),
            conditions: Some(vec![
                condition(
                    "NetworkUnavailable",
                    "False",
                    "FlannelIsUp",
                    "Flannel is running on this node",
                ),
                condition(
                    "MemoryPressure",
                    "False",
                    "KubeletHasSufficientMemory",
                    "kubelet has sufficient memory available",
                ),
                condition(
                    "DiskPressure",
                    "False",
                    "KubeletHasNoDiskPressure",
                    "kubelet has no disk pressure",
                ),
                condition(
                    "PIDPressure",
                    "False",
                    "KubeletHasSufficientPID",
                    "kubelet has sufficient PID available",
                ),
                condition(
                    "Ready",
                    "True",
                    "KubeletReady",
                    "kubelet is posting ready status. AppArmor enabled",
                ),
            ]),
            daemon_endpoints: Some(NodeDaemonEndpoints {
                kubelet_endpoint: Some(DaemonEndpoint { port: 10250 }),
            }),
            images: Some(images),
            node_info: Some(NodeSystemInfo {
                architecture: "amd64".into(),
                boot_id: uuid(seed ^ 3),
                container_runtime_version: "containerd://1.7.23-k3s2".into(),
                kernel_version: "6.1.0-28-amd64".into(),
                kube_proxy_version: "v1.31.4+k3s1".into(),
                kubelet_version: "v1.31.4+k3s1".into(),
                machine_id: hex(seed ^ 4, 32),
                operating_system: "linux".into(),
                os_image: "Debian GNU/Linux 12 (bookworm)".into(),
                system_uuid: uuid(seed ^ 5),
                ..Default::default()
            }),
            ..Default::default()
        }),
    }
}

/// `len` hex digits, a stable function of `seed` (digests, machine ids).
fn hex(seed: u64, len: usize) -> String {
    let mut x = seed | 1;
    let mut out = String::with_capacity(len + 16);
    while out.len() < len {
        // xorshift64*
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.push_str(&format!("{:016x}", x.wrapping_mul(0x2545_f491_4f6c_dd1d)));
    }
    out.truncate(len);
    out
}

fn uuid(seed: u64) -> String {
    let h = hex(seed, 32);
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

fn mac(seed: u64) -> String {
    let h = hex(seed, 12);
    (0..6)
        .map(|i| &h[2 * i..2 * i + 2])
        .collect::<Vec<_>>()
        .join(":")
}
