//! The lab's cluster API: the apiserver stand-in (relay-kube-standin, an
//! HTTPS server speaking the Kubernetes API subset the product uses, not a
//! real kube-apiserver) listening on the apiserver host at
//! `10.0.0.3:6443`, where the relay reaches it over the cloud LAN as it
//! would a real control plane. It holds the lab's Nodes and the Services
//! a test declares; the lab's kube-proxy model on every node is programmed
//! from the same Services, so the relay and kube-proxy see one cluster.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use relay_kube_standin::k8s_openapi::api::core::v1::{
    LoadBalancerIngress, LoadBalancerStatus, Node, Service, ServicePort, ServiceSpec, ServiceStatus,
};
use relay_kube_standin::k8s_openapi::api::discovery::v1::{
    Endpoint, EndpointConditions, EndpointPort, EndpointSlice,
};
use relay_kube_standin::k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use relay_kube_standin::{kubelet_node, StandIn};
use relay_protocol::Cidr;
use relay_server::config::KubeSettings;
use relay_server::RelayConfig;
use relay_transport::devcerts::DevPki;

use crate::netns::{self, KubeProxyMode, KubeService, NetnsLab, Proto, Role};

/// Where the stand-in listens: the apiserver host's LAN address.
pub const APISERVER_PORT: u16 = 6443;

/// One Service with one port, as a test declares it: kube-proxy and the
/// relay both see it (through the stand-in's Service and EndpointSlice).
#[derive(Debug, Clone)]
pub struct LabService {
    /// Namespace.
    pub namespace: &'static str,
    /// Name.
    pub name: &'static str,
    /// ClusterIP and port (IPv4).
    pub vip: SocketAddr,
    /// Protocol.
    pub proto: Proto,
    /// Ready endpoints: `IP:targetPort` and the node each runs on.
    pub endpoints: Vec<(SocketAddr, &'static str)>,
    /// `nodePort`, for a `NodePort` Service.
    pub node_port: Option<u16>,
    /// `externalIPs` (the lab's kube-proxy model does not program them;
    /// the relay and edges capture them ahead of kube-proxy anyway).
    pub external_ips: Vec<std::net::Ipv4Addr>,
    /// The load balancer's ingress IPs (`status.loadBalancer`; a
    /// `LoadBalancer` Service then), as MetalLB's L2 mode gives a node's
    /// address; not programmed by the lab's kube-proxy model either.
    pub lb_ips: Vec<std::net::Ipv4Addr>,
    /// `spec.loadBalancerSourceRanges`.
    pub lb_source_ranges: Vec<&'static str>,
    /// `internalTrafficPolicy: Local` (each node's own endpoints only).
    pub internal_local: bool,
    /// `externalTrafficPolicy: Local` (the lab's kube-proxy model does not
    /// keep it: the cells that use it run where kube-proxy does not).
    pub external_local: bool,
    /// `sessionAffinity: ClientIP` (the lab's kube-proxy model does not
    /// keep it: nodes without capture still pick at random).
    pub client_ip_affinity: bool,
}

impl LabService {
    /// A ClusterIP Service whose ready `endpoints` (address, node) serve on
    /// the port every [`services`](crate::scenario::services) host listens
    /// on for `proto`: [`HTTP`](crate::scenario::HTTP) for TCP,
    /// [`DNS`](crate::scenario::DNS) for UDP.
    pub fn on_lab_ports(
        namespace: &'static str,
        name: &'static str,
        vip: SocketAddr,
        proto: Proto,
        endpoints: &[(std::net::Ipv4Addr, &'static str)],
    ) -> LabService {
        let port = match proto {
            Proto::Tcp => crate::scenario::HTTP,
            Proto::Udp => crate::scenario::DNS,
        };
        LabService {
            namespace,
            name,
            vip,
            proto,
            endpoints: endpoints
                .iter()
                .map(|(ip, node)| (crate::scenario::sa(*ip, port), *node))
                .collect(),
            node_port: None,
            external_ips: Vec::new(),
            lb_ips: Vec::new(),
            lb_source_ranges: Vec::new(),
            internal_local: false,
            external_local: false,
            client_ip_affinity: false,
        }
    }

    /// The Service and its one EndpointSlice, as the API holds them (port
    /// named `p`; the slice's port is the endpoints' target port).
    pub fn objects(&self) -> (Service, EndpointSlice) {
        let meta = |name: String| service_meta(self.namespace, self.name, name);
        let proto = match self.proto {
            Proto::Tcp => "TCP",
            Proto::Udp => "UDP",
        };
        let svc = Service {
            metadata: meta(self.name.into()),
            spec: Some(ServiceSpec {
                cluster_ip: Some(self.vip.ip().to_string()),
                cluster_ips: Some(vec![self.vip.ip().to_string()]),
                ports: Some(vec![ServicePort {
                    name: Some("p".into()),
                    port: i32::from(self.vip.port()),
                    protocol: Some(proto.into()),
                    node_port: self.node_port.map(i32::from),
                    ..Default::default()
                }]),
                external_ips: (!self.external_ips.is_empty())
                    .then(|| self.external_ips.iter().map(|ip| ip.to_string()).collect()),
                load_balancer_source_ranges: (!self.lb_source_ranges.is_empty()).then(|| {
                    self.lb_source_ranges
                        .iter()
                        .map(|r| r.to_string())
                        .collect()
                }),
                internal_traffic_policy: self.internal_local.then(|| "Local".into()),
                external_traffic_policy: self.external_local.then(|| "Local".into()),
                session_affinity: self.client_ip_affinity.then(|| "ClientIP".into()),
                type_: Some(
                    if !self.lb_ips.is_empty() {
                        "LoadBalancer"
                    } else if self.node_port.is_some() {
                        "NodePort"
                    } else {
                        "ClusterIP"
                    }
                    .into(),
                ),
                ..Default::default()
            }),
            status: (!self.lb_ips.is_empty()).then(|| ServiceStatus {
                load_balancer: Some(LoadBalancerStatus {
                    ingress: Some(
                        self.lb_ips
                            .iter()
                            .map(|ip| LoadBalancerIngress {
                                ip: Some(ip.to_string()),
                                ..Default::default()
                            })
                            .collect(),
                    ),
                }),
                ..Default::default()
            }),
        };
        let target = self.endpoints.first().map(|(a, _)| a.port());
        let slice = EndpointSlice {
            metadata: meta(format!("{}-1", self.name)),
            address_type: "IPv4".into(),
            ports: Some(vec![EndpointPort {
                name: Some("p".into()),
                port: target.map(i32::from),
                protocol: Some(proto.into()),
                ..Default::default()
            }]),
            endpoints: self
                .endpoints
                .iter()
                .map(|(a, node)| ready_endpoint(a.ip(), None, node))
                .collect(),
        };
        (svc, slice)
    }

    /// What the lab's kube-proxy model programs for it.
    pub fn kube_proxy(&self) -> Result<KubeService> {
        let eps: Vec<SocketAddr> = self.endpoints.iter().map(|(a, _)| *a).collect();
        let ks = KubeService::new(
            &format!("{}/{}:p", self.namespace, self.name),
            self.vip,
            self.proto,
            &eps,
        )?;
        let mut ks = match self.node_port {
            Some(np) => ks.with_node_port(np),
            None => ks,
        };
        if self.internal_local {
            ks.local_only = Some(self.endpoints.iter().map(|(_, n)| n.to_string()).collect());
        }
        Ok(ks)
    }
}

/// The running stand-in, with its own runtime (the lab's helpers run
/// theirs per call).
pub struct Cluster {
    standin: StandIn,
    rt: tokio::runtime::Runtime,
}

impl Cluster {
    /// Starts the stand-in on the apiserver host, with a Node for each
    /// edge (its pod CIDR and host address as InternalIP: with repeated
    /// LANs both edges' Nodes carry the same one) and for the two cloud
    /// nodes.
    pub fn start(lab: &NetnsLab) -> Result<Cluster> {
        let addr = SocketAddr::new(IpAddr::V4(netns::APISERVER_IP), APISERVER_PORT);
        let listener = lab.run_in(
            Role::Apiserver,
            Duration::from_secs(5),
            move || async move { Ok(std::net::TcpListener::bind(addr)?) },
        )?;
        let rt = tokio::runtime::Runtime::new()?;
        let standin = rt
            .block_on(StandIn::spawn_on(listener))
            .context("apiserver stand-in")?;
        for site in netns::SITES {
            standin.upsert_node(edge_node(lab, site));
        }
        let relay = netns::RELAY_LAN_IP.to_string();
        let cloud2 = netns::CLOUD2_LAN_IP.to_string();
        standin.upsert_node(kubelet_node(
            "relay",
            &[netns::CPOD1_CIDR],
            &[("InternalIP", &relay)],
        ));
        standin.upsert_node(kubelet_node(
            "cloud2",
            &[netns::CPOD2_CIDR],
            &[("InternalIP", &cloud2)],
        ));
        Ok(Cluster { standin, rt })
    }

    /// Stops the stand-in (every connection dropped, as when the
    /// apiserver restarts), waits `down`, and serves again on the same
    /// address in the apiserver host, with the same objects.
    pub fn restart_apiserver(&self, lab: &NetnsLab, down: Duration) -> Result<()> {
        let addr = self.standin.addr();
        self.standin.stop();
        std::thread::sleep(down);
        let listener = lab.run_in(
            Role::Apiserver,
            Duration::from_secs(5),
            move || async move { Ok(std::net::TcpListener::bind(addr)?) },
        )?;
        let _enter = self.rt.enter();
        self.standin
            .start_on(listener)
            .context("apiserver stand-in restart")
    }

    /// Drops every packet to the API port on the apiserver host (`true`),
    /// or lets them through again (`false`): the API unreachable, with no
    /// reset, as when a control plane or the path to it is down.
    pub fn blackhole(&self, lab: &NetnsLab, on: bool) -> Result<()> {
        let script = if on {
            format!(
                "table inet lab_api_blackhole {{\n chain input {{\n  type filter hook input priority -300;\n  tcp dport {APISERVER_PORT} drop\n }}\n}}\n"
            )
        } else {
            "delete table inet lab_api_blackhole".to_string()
        };
        lab.nft(Role::Apiserver, &script)
    }

    /// `EdgeTunnelReady` on `node` as the relay applied it (see
    /// [`condition_of`]).
    pub fn condition(&self, node: &str) -> Option<(String, String, String)> {
        condition_of(&self.standin, node)
    }

    /// Calico's IPAM instead of `podCIDR` on edge `site`: its Node gets no
    /// `spec.podCIDRs`, and a confirmed `BlockAffinity` (served once its
    /// CRD is installed in the stand-in) gives it the /26 of its pod CIDR
    /// that holds its pod, as Calico's IPAM records the blocks it hands a
    /// node. Returns that block.
    pub fn calico_block_for(&self, lab: &NetnsLab, site: u8) -> Result<Cidr> {
        let block = Cidr::containing(IpAddr::V4(netns::edge_pod_ip(site)), 26)
            .context("a /26 of an IPv4 address")?;
        let mut node = edge_node(lab, site);
        if let Some(spec) = node.spec.as_mut() {
            spec.pod_cidr = None;
            spec.pod_cidrs = None;
        }
        self.standin.upsert_node(node);
        self.standin.upsert_custom(
            relay_kube_standin::Crd::CalicoBlockAffinities,
            relay_kube_standin::crds::block_affinity(
                &format!("edge{site}"),
                &block.to_string(),
                "confirmed",
                false,
            ),
        );
        Ok(block)
    }

    /// The relay's `[kubernetes]` settings for this cluster.
    pub fn relay_settings(&self) -> KubeSettings {
        KubeSettings {
            kubeconfig: Some(self.kubeconfig().to_path_buf()),
            api_timeout: Duration::from_secs(3),
            ..KubeSettings::default()
        }
    }

    /// The lab relay's config (see
    /// [`relay_config_in`](crate::scenario::relay_config_in)) in in-cluster
    /// mode against this cluster: no static `[nodes]`, Node objects decide.
    pub fn relay_config_in(&self, lab: &NetnsLab, pki: &DevPki) -> Result<RelayConfig> {
        let mut cfg = crate::scenario::relay_config_in(lab, pki)?;
        cfg.nodes.clear();
        cfg.kubernetes = Some(self.relay_settings());
        Ok(cfg)
    }

    /// [`Cluster::relay_config_in`] with `tunnel_routes` left without the
    /// cloud node subnet, as the deploy base lists them (the cloud's pod
    /// CIDRs and Service range only).
    pub fn relay_config_without_cloud_lan(
        &self,
        lab: &NetnsLab,
        pki: &DevPki,
    ) -> Result<RelayConfig> {
        let mut cfg = self.relay_config_in(lab, pki)?;
        let lan: Cidr = netns::CLOUD_LAN.parse()?;
        cfg.tunnel_routes.retain(|c| *c != lan);
        Ok(cfg)
    }

    /// The kubeconfig pointing at the stand-in.
    pub fn kubeconfig(&self) -> &Path {
        self.standin.kubeconfig_path()
    }

    /// The stand-in itself.
    pub fn standin(&self) -> &StandIn {
        &self.standin
    }

    /// Declares `services` (replacing same-named ones) in the API and
    /// programs every node's kube-proxy model with them.
    pub fn set_services(
        &self,
        lab: &NetnsLab,
        mode: KubeProxyMode,
        services: &[LabService],
    ) -> Result<()> {
        let _enter = self.rt.enter();
        for s in services {
            let (svc, slice) = s.objects();
            self.standin.upsert_service(svc);
            self.standin.upsert_endpointslice(slice);
        }
        let kp = services
            .iter()
            .map(LabService::kube_proxy)
            .collect::<Result<Vec<_>>>()?;
        lab.sync_services(mode, &kp)
    }

    /// Declares a Service kube-proxy has nothing to program for (headless,
    /// see [`headless_without_ports`]) and its EndpointSlice in the API.
    pub fn declare(&self, svc: Service, slice: EndpointSlice) {
        let _enter = self.rt.enter();
        self.standin.upsert_service(svc);
        self.standin.upsert_endpointslice(slice);
    }
}

/// A headless Service without ports (`clusterIP: None`, no `ports`) and
/// its EndpointSlice as the EndpointSlice controller writes it: an empty
/// port list, one ready endpoint per `(address, hostname, node)`. kube-proxy
/// programs nothing for it; the cluster DNS answers its names.
pub fn headless_without_ports(
    namespace: &str,
    name: &str,
    endpoints: &[(IpAddr, Option<&str>, &str)],
) -> (Service, EndpointSlice) {
    let meta = |n: String| service_meta(namespace, name, n);
    let svc = Service {
        metadata: meta(name.into()),
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".into()),
            cluster_ips: Some(vec!["None".into()]),
            ..Default::default()
        }),
        status: None,
    };
    let slice = EndpointSlice {
        metadata: meta(format!("{name}-1")),
        address_type: "IPv4".into(),
        ports: Some(Vec::new()),
        endpoints: endpoints
            .iter()
            .map(|(ip, hostname, node)| ready_endpoint(*ip, *hostname, node))
            .collect(),
    };
    (svc, slice)
}

/// Metadata of Service `service`'s object `name` (the Service itself or
/// one of its EndpointSlices, which carry the Service's name as a label).
fn service_meta(namespace: &str, service: &str, name: String) -> ObjectMeta {
    ObjectMeta {
        namespace: Some(namespace.into()),
        name: Some(name),
        labels: Some(
            [(
                "kubernetes.io/service-name".to_string(),
                service.to_string(),
            )]
            .into(),
        ),
        ..Default::default()
    }
}

/// A ready EndpointSlice endpoint on `node`.
fn ready_endpoint(ip: IpAddr, hostname: Option<&str>, node: &str) -> Endpoint {
    Endpoint {
        addresses: vec![ip.to_string()],
        hostname: hostname.map(String::from),
        node_name: Some(node.to_string()),
        conditions: Some(EndpointConditions {
            ready: Some(true),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Edge `site`'s Node as its kubelet registers it: the pod CIDR and the
/// host address as InternalIP (with repeated LANs, both edges' Nodes carry
/// the same one), labelled an edge as the edge DaemonSet's node selector
/// requires.
pub fn edge_node(lab: &NetnsLab, site: u8) -> Node {
    let host = lab.edge_host_ip(site).to_string();
    let mut n = kubelet_node(
        &format!("edge{site}"),
        &[&netns::edge_pod_cidr(site).to_string()],
        &[("InternalIP", &host)],
    );
    n.metadata.labels = Some(
        [(
            relay_kube::nodes::EDGE_ROLE_LABEL.to_string(),
            String::new(),
        )]
        .into(),
    );
    n
}

/// `EdgeTunnelReady` on `node` as the relay applied it to `standin`:
/// (status, reason, message); `None` before the relay wrote it.
pub fn condition_of(standin: &StandIn, node: &str) -> Option<(String, String, String)> {
    let c = standin
        .node(node)?
        .status?
        .conditions?
        .into_iter()
        .find(|c| c.type_ == "EdgeTunnelReady")?;
    Some((
        c.status,
        c.reason.unwrap_or_default(),
        c.message.unwrap_or_default(),
    ))
}
