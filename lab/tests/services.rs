//! ClusterIP capture ahead of kube-proxy, in the network-namespace lab.
//!
//! kube-proxy is modelled where it runs (the relay node's root namespace,
//! NAT prerouting and output at -100, and its nftables mode's chains at
//! -110). The relay node installs capture with `Capture::apply_services`
//! for some ClusterIP ports; a host process on the relay node (output
//! hook) and a pod on it (prerouting hook) must reach the capture listener
//! with the ClusterIP:port as the original destination, while ClusterIPs
//! not captured still go through kube-proxy's DNAT to their endpoint. A
//! UDP flow that went through kube-proxy before its port was captured must
//! be captured on its next packet (the stale conntrack entry is deleted).
//!
//! A second test drives the lab's kube-proxy model from Services and
//! EndpointSlices served by the apiserver stand-in (relay-kube-standin, not
//! a real apiserver), through relay-kube's `ServiceDirectory`, regenerating
//! the rules on every change as kube-proxy does.
//!
//! Needs root; skips loudly otherwise, and fails instead of skipping under
//! CI=true or REQUIRE_LAB=1. Traffic stays inside the lab's namespaces.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use relay_lab::netns::{self, KubeProxyMode, KubeService, NetnsLab, Proto, Role};
use relay_lab::scenario::{http_from, launch, sa, services, udp_from, Running, DNS, HTTP};
use relay_transport::capture::{self, Capture, CaptureConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

type Services = BTreeSet<(SocketAddr, capture::Proto)>;

/// Captured ClusterIP ports answer with this prefix and the original
/// destination.
const CAPTURED: &str = "captured ";

/// Capture on the relay node (`initial` ClusterIP ports, `node_ports`) with
/// a listener that answers every captured TCP connection and UDP datagram
/// with `captured <original destination>`.
/// Service sets sent on `changes` are applied in order; each is
/// acknowledged on `applied`.
fn start_capture(
    lab: &NetnsLab,
    initial: Services,
    node_ports: BTreeSet<(u16, capture::Proto)>,
    mut changes: tokio::sync::mpsc::UnboundedReceiver<Services>,
    applied: std::sync::mpsc::Sender<Result<()>>,
) -> Result<Running> {
    launch(lab, Role::Relay, "capture", move |ready, stop| async move {
        let cfg = CaptureConfig::default();
        let (port, local) = (cfg.port, cfg.redirect_address);
        let mut cap = Capture::install(cfg).await?;
        cap.apply_services(&initial, &Services::new()).await?;
        cap.apply_node_ports(&node_ports).await?;
        let tcp = capture::capture_tcp_listener(port)?;
        // Capture translates the destination to its own address, whatever
        // the client (a pod, a local process): one socket there.
        let mut udp_tasks = Vec::new();
        {
            let s = UdpSocket::bind(sa(local, port)).await?;
            udp_tasks.push(tokio::spawn(async move {
                let mut buf = [0u8; 512];
                while let Ok((_, SocketAddr::V4(from))) = s.recv_from(&mut buf).await {
                    let here = SocketAddrV4::new(local, port);
                    let what = match relay_transport::conntrack::original_dst_udp(here, from).await
                    {
                        Ok(orig) => format!("{CAPTURED}{orig}"),
                        Err(e) => format!("no original destination: {e}"),
                    };
                    let _ = s.send_to(what.as_bytes(), from).await;
                }
            }));
        }
        let accept = tokio::spawn(async move {
            while let Ok((mut s, _)) = tcp.accept().await {
                let what = match relay_transport::conntrack::original_dst_tcp(&s) {
                    Ok(orig) => format!("{CAPTURED}{orig}\n"),
                    Err(e) => format!("no original destination: {e}\n"),
                };
                let _ = s.write_all(what.as_bytes()).await;
            }
        });
        let _ = ready.send(Ok(()));
        let mut stop = stop;
        loop {
            tokio::select! {
                _ = &mut stop => break,
                Some(set) = changes.recv() => {
                    let r = cap.apply_services(&set, &Services::new()).await.map_err(anyhow::Error::from);
                    let _ = applied.send(r);
                }
            }
        }
        accept.abort();
        for t in udp_tasks {
            t.abort();
        }
        cap.teardown().await;
        Ok(())
    })
}

/// Connects to `target` from `ns` and reads what the far end says first
/// (the capture listener speaks first; an HTTP server would not).
fn first_words(lab: &NetnsLab, ns: Role, target: SocketAddr) -> Result<String> {
    lab.run_in(ns, Duration::from_secs(10), move || async move {
        let mut s = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(target))
            .await
            .context("connect timed out")??;
        let mut buf = Vec::new();
        tokio::time::timeout(Duration::from_secs(3), s.read_to_end(&mut buf))
            .await
            .context("nothing said within 3 s")??;
        Ok(String::from_utf8_lossy(&buf).trim().to_string())
    })
}

/// Sends `q` on the connected socket `s` (up to three tries) and returns
/// the reply.
async fn ask_on(s: &UdpSocket, q: &str) -> Result<String> {
    let mut buf = [0u8; 512];
    for _ in 0..3 {
        s.send(q.as_bytes()).await?;
        if let Ok(r) = tokio::time::timeout(Duration::from_secs(2), s.recv(&mut buf)).await {
            return Ok(String::from_utf8_lossy(&buf[..r?]).to_string());
        }
    }
    bail!("no UDP reply")
}

/// One datagram from a fresh socket in `ns` to `target`; the raw reply.
fn udp_ask(lab: &NetnsLab, ns: Role, target: SocketAddr) -> Result<String> {
    lab.run_in(ns, Duration::from_secs(10), move || async move {
        let s = UdpSocket::bind(sa(Ipv4Addr::UNSPECIFIED, 0)).await?;
        s.connect(target).await?;
        ask_on(&s, "q").await
    })
}

fn expect_captured(lab: &NetnsLab, ns: Role, target: SocketAddr) {
    match first_words(lab, ns, target) {
        Ok(w) => assert_eq!(w, format!("{CAPTURED}{target}"), "{ns} → {target}"),
        Err(e) => panic!("{ns} → {target}: not captured: {e:#}"),
    }
}

#[test]
fn cluster_ips_are_captured_before_kube_proxy() -> Result<()> {
    if let Some(skip) = netns::require_root() {
        eprintln!("SKIPPED ClusterIP capture: {skip}");
        return Ok(());
    }
    relay_lab::init();
    let lab = NetnsLab::new()?;
    let _cpod2 = services(&lab, Role::Cpod2, "cpod2")?;
    // Every ClusterIP has its endpoint on cloud2's pod, reachable from the
    // relay node by plain routing: if kube-proxy's DNAT wins, cpod2 answers.
    let captured_tcp = sa(Ipv4Addr::new(10, 96, 0, 40), HTTP);
    let plain_tcp = sa(Ipv4Addr::new(10, 96, 0, 41), HTTP);
    let dns = sa(Ipv4Addr::new(10, 96, 0, 53), DNS);
    let kube = [
        KubeService::new(
            "default/captured:http",
            captured_tcp,
            Proto::Tcp,
            &[sa(netns::CPOD2_IP, HTTP)],
        )?,
        KubeService::new(
            "default/plain:http",
            plain_tcp,
            Proto::Tcp,
            &[sa(netns::CPOD2_IP, HTTP)],
        )?,
        KubeService::new(
            "kube-system/dns:dns",
            dns,
            Proto::Udp,
            &[sa(netns::CPOD2_IP, DNS)],
        )?,
    ];
    lab.sync_services(KubeProxyMode::Iptables, &kube)?;

    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let (ack_tx, ack_rx) = std::sync::mpsc::channel();
    let apply = |set: Services| -> Result<()> {
        tx.send(set).context("capture task gone")?;
        ack_rx
            .recv_timeout(Duration::from_secs(15))
            .context("no answer from the capture task")?
    };
    let tcp_only: Services = [(captured_tcp, capture::Proto::Tcp)].into();
    let cap = start_capture(&lab, tcp_only.clone(), BTreeSet::new(), rx, ack_tx)?;

    for mode in [KubeProxyMode::Iptables, KubeProxyMode::Nftables] {
        lab.sync_services(mode, &kube)?;
        // Captured: the host process (output) and the pod (prerouting).
        expect_captured(&lab, Role::Relay, captured_tcp);
        expect_captured(&lab, Role::Cpod1, captured_tcp);
        // Not captured: kube-proxy's DNAT to the endpoint.
        for ns in [Role::Relay, Role::Cpod1] {
            let body = http_from(&lab, ns, plain_tcp)
                .with_context(|| format!("{ns} → {plain_tcp} ({mode:?})"))?;
            assert!(body.contains("cpod2"), "{ns} → {plain_tcp}: {body}");
        }
    }

    // A UDP flow through kube-proxy first, then its port is captured: the
    // same socket's next datagram must reach the capture listener.
    let (go_tx, go_rx) = tokio::sync::oneshot::channel::<()>();
    let (first_tx, first_rx) = std::sync::mpsc::channel::<String>();
    let flow = lab.spawn_in(Role::Cpod1, move || async move {
        let s = UdpSocket::bind(sa(Ipv4Addr::UNSPECIFIED, 0)).await?;
        s.connect(dns).await?;
        let first = ask_on(&s, "before").await?;
        let _ = first_tx.send(first);
        go_rx.await?;
        ask_on(&s, "after").await
    });
    let first = first_rx
        .recv_timeout(Duration::from_secs(15))
        .context("first UDP reply")?;
    assert_eq!(first, "cpod2:before", "kube-proxy's DNAT before capture");
    let with_dns: Services = [
        (captured_tcp, capture::Proto::Tcp),
        (dns, capture::Proto::Udp),
    ]
    .into();
    apply(with_dns)?;
    let _ = go_tx.send(());
    let after = flow
        .join()
        .map_err(|_| anyhow::anyhow!("UDP flow panicked"))??;
    assert_eq!(
        after,
        format!("{CAPTURED}{dns}"),
        "same UDP socket, now captured"
    );
    // And a new resolver socket from the relay node's host.
    assert_eq!(
        udp_ask(&lab, Role::Relay, dns)?,
        format!("{CAPTURED}{dns}"),
        "host process, UDP"
    );

    // Removing the capture hands the flows back to kube-proxy.
    apply(tcp_only)?;
    assert_eq!(udp_from(&lab, Role::Cpod1, dns)?, "cpod2");
    apply(Services::new())?;
    let body = http_from(&lab, Role::Relay, captured_tcp)?;
    assert!(body.contains("cpod2"), "uncaptured again: {body}");

    let lb = lab.run_in(Role::Relay, Duration::from_secs(10), || async {
        Ok(capture::socket_lb_suspected().await)
    })?;
    assert_eq!(lb, None, "no socket-level load balancer in the lab");
    // Cilium's own pair of links on its node (`cilium_host` and
    // `cilium_net`, a veth pair): the sign the relay and edges warn about
    // at start.
    lab.exec(
        Role::Relay,
        &[
            "ip",
            "link",
            "add",
            "cilium_host",
            "type",
            "veth",
            "peer",
            "name",
            "cilium_net",
        ],
    )?;
    let lb = lab.run_in(Role::Relay, Duration::from_secs(10), || async {
        Ok(capture::socket_lb_suspected().await)
    })?;
    lab.exec(Role::Relay, &["ip", "link", "del", "cilium_host"])?;
    assert_eq!(lb.as_deref(), Some("link cilium_host"));

    cap.stop()?;
    let tables = lab.exec(Role::Relay, &["nft", "list", "tables"])?;
    assert!(!tables.contains("edge_relay"), "capture left: {tables}");
    Ok(())
}

/// Node ports are captured on the node's IPv4 addresses only: a
/// dual-stack node's kube-proxy also serves them on its IPv6 addresses,
/// and capture, whose listeners are IPv4, must leave those alone (a
/// redirect there would reach no listener: the connection refused, where
/// kube-proxy would have served it). A process listening on the node port
/// over IPv6 stands for that service here.
#[test]
fn node_ports_over_ipv6_are_left_to_kube_proxy() -> Result<()> {
    if let Some(skip) = netns::require_root() {
        eprintln!("SKIPPED node ports over IPv6: {skip}");
        return Ok(());
    }
    relay_lab::init();
    let lab = NetnsLab::new()?;
    const NODE_PORT: u16 = 30099;
    let said = lab.run_in(Role::Relay, Duration::from_secs(30), || async {
        let cfg = CaptureConfig::default();
        let port = cfg.port;
        let mut cap = Capture::install(cfg).await?;
        cap.apply_node_ports(&[(NODE_PORT, capture::Proto::Tcp)].into())
            .await?;
        let captured = capture::capture_tcp_listener(port)?;
        let v6 = tokio::net::TcpListener::bind("[::1]:30099").await?;
        let serve = |l: tokio::net::TcpListener, what: &'static str| {
            tokio::spawn(async move {
                while let Ok((mut s, _)) = l.accept().await {
                    let _ = s.write_all(what.as_bytes()).await;
                }
            })
        };
        let tasks = [serve(captured, "captured"), serve(v6, "kube-proxy")];
        let first_words = async |to: SocketAddr| -> String {
            let said = async {
                let mut s = TcpStream::connect(to).await?;
                let mut buf = Vec::new();
                s.read_to_end(&mut buf).await?;
                anyhow::Ok(String::from_utf8_lossy(&buf).to_string())
            };
            match tokio::time::timeout(Duration::from_secs(3), said).await {
                Ok(Ok(w)) => w,
                Ok(Err(e)) => format!("error: {e}"),
                Err(_) => "timed out".to_string(),
            }
        };
        let over_v4 = first_words(sa(Ipv4Addr::LOCALHOST, NODE_PORT)).await;
        let over_v6 = first_words("[::1]:30099".parse()?).await;
        for t in tasks {
            t.abort();
        }
        cap.teardown().await;
        Ok((over_v4, over_v6))
    })?;
    assert_eq!(said.0, "captured", "the node port over IPv4 is captured");
    assert_eq!(
        said.1, "kube-proxy",
        "the node port over IPv6 must be left alone"
    );
    Ok(())
}

/// A UDP node port whose capture begins: a flow to this node's own address
/// on that port, which went past capture before, moves to capture on its
/// next datagram (its conntrack entry deleted), while a flow the node
/// forwards to another host's port of the same number keeps its entry (and
/// so its NAT binding, where it has one). Deleting every entry with that
/// destination port, as before, deleted the forwarded one too.
#[test]
fn udp_node_port_capture_deletes_only_this_nodes_flows() -> Result<()> {
    if let Some(skip) = netns::require_root() {
        eprintln!("SKIPPED UDP node port capture: {skip}");
        return Ok(());
    }
    relay_lab::init();
    let lab = NetnsLab::new()?;
    const NODE_PORT: u16 = 30098;
    // What answers on the port before capture: on the relay node, a
    // process standing for kube-proxy's endpoint; on cloud2's pod, another
    // host's service on the same port number.
    // Bound to the address asked (a socket on the wildcard address would
    // answer from the address facing the client, which its connected
    // socket drops).
    let answer = |ns: Role, at: Ipv4Addr, name: &'static str| {
        launch(&lab, ns, name, move |ready, stop| async move {
            let s = UdpSocket::bind(sa(at, NODE_PORT)).await?;
            let _ = ready.send(Ok(()));
            let serve = async {
                let mut buf = [0u8; 512];
                while let Ok((n, from)) = s.recv_from(&mut buf).await {
                    let said = format!("{name}:{}", String::from_utf8_lossy(&buf[..n]));
                    let _ = s.send_to(said.as_bytes(), from).await;
                }
            };
            tokio::select! { _ = serve => {}, _ = stop => {} }
            Ok(())
        })
    };
    let _here = answer(Role::Relay, netns::RELAY_LAN_IP, "node")?;
    let _there = answer(Role::Cpod2, netns::CPOD2_IP, "cpod2")?;
    let local = sa(netns::RELAY_LAN_IP, NODE_PORT);
    let forwarded = sa(netns::CPOD2_IP, NODE_PORT);
    let (go_tx, go_rx) = tokio::sync::oneshot::channel::<()>();
    let (first_tx, first_rx) = std::sync::mpsc::channel::<(String, String)>();
    let flows = lab.spawn_in(Role::Cpod1, move || async move {
        let a = UdpSocket::bind(sa(Ipv4Addr::UNSPECIFIED, 0)).await?;
        a.connect(local).await?;
        let b = UdpSocket::bind(sa(Ipv4Addr::UNSPECIFIED, 0)).await?;
        b.connect(forwarded).await?;
        let first_a = ask_on(&a, "before").await.context("this node's address")?;
        let first_b = ask_on(&b, "before").await.context("forwarded")?;
        let _ = first_tx.send((first_a, first_b));
        tokio::time::timeout(Duration::from_secs(30), go_rx).await??;
        anyhow::Ok((ask_on(&a, "after").await?, ask_on(&b, "after").await?))
    });
    let Ok(first) = first_rx.recv_timeout(Duration::from_secs(15)) else {
        let why = flows
            .join()
            .map_err(|_| anyhow::anyhow!("UDP flows panicked"))?;
        bail!("no first UDP replies: {why:?}");
    };
    assert_eq!(first, ("node:before".into(), "cpod2:before".into()));
    let entry = |dst: Ipv4Addr| -> Result<bool> {
        let ip = dst.to_string();
        let port = NODE_PORT.to_string();
        let args = [
            "conntrack",
            "-L",
            "-p",
            "udp",
            "--orig-dst",
            &ip,
            "--dport",
            &port,
        ];
        // conntrack -L exits 0 with entries, 1 with none on some versions.
        Ok(lab
            .exec(Role::Relay, &args)
            .is_ok_and(|out| out.contains(&format!("dport={NODE_PORT}"))))
    };
    assert!(
        entry(netns::RELAY_LAN_IP)? && entry(netns::CPOD2_IP)?,
        "both flows tracked"
    );
    let (_tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let (ack_tx, _ack_rx) = std::sync::mpsc::channel();
    let cap = start_capture(
        &lab,
        Services::new(),
        [(NODE_PORT, capture::Proto::Udp)].into(),
        rx,
        ack_tx,
    )?;
    let kept = entry(netns::CPOD2_IP)?;
    let deleted = !entry(netns::RELAY_LAN_IP)?;
    let _ = go_tx.send(());
    let after = flows
        .join()
        .map_err(|_| anyhow::anyhow!("UDP flows panicked"))??;
    cap.stop()?;
    assert!(
        deleted,
        "the flow to this node's address past capture was not deleted"
    );
    assert!(
        kept,
        "the forwarded flow's entry was deleted with this node's"
    );
    assert_eq!(
        after,
        (format!("{CAPTURED}{local}"), "cpod2:after".to_string()),
        "this node's flow captured, the forwarded one unchanged"
    );
    Ok(())
}

/// The lab's kube-proxy input from a service table: every IPv4 TCP/UDP
/// ClusterIP port with its usable endpoints, as kube-proxy programs them.
fn kube_services(table: &relay_kube::ServiceTable) -> Result<Vec<KubeService>> {
    let mut out = Vec::new();
    for ((vip, proto), e) in table.cluster_ips() {
        let proto = match proto {
            relay_kube::Protocol::Tcp => Proto::Tcp,
            relay_kube::Protocol::Udp => Proto::Udp,
            relay_kube::Protocol::Sctp => continue,
        };
        if !vip.is_ipv4() {
            continue;
        }
        let eps: Vec<SocketAddr> = e.endpoints.iter().map(|ep| ep.addr()).collect();
        let name = format!("{}/{}:{}", e.namespace, e.name, e.port_name);
        out.push(KubeService::new(&name, *vip, proto, &eps)?);
    }
    Ok(out)
}

/// Test objects: Service `shop/web` (ClusterIP 10.96.0.20, port `http`
/// 80 → targetPort `web`) and its slice with `endpoints` as (IP, node,
/// ready).
fn web_objects(
    endpoints: &[(Ipv4Addr, &str, bool)],
) -> (
    relay_kube_standin::k8s_openapi::api::core::v1::Service,
    relay_kube_standin::k8s_openapi::api::discovery::v1::EndpointSlice,
) {
    use relay_kube_standin::k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
    use relay_kube_standin::k8s_openapi::api::discovery::v1::{
        Endpoint, EndpointConditions, EndpointPort, EndpointSlice,
    };
    use relay_kube_standin::k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    use relay_kube_standin::k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    let meta = |name: &str| ObjectMeta {
        namespace: Some("shop".into()),
        name: Some(name.into()),
        labels: Some([("kubernetes.io/service-name".to_string(), "web".to_string())].into()),
        ..Default::default()
    };
    let svc = Service {
        metadata: meta("web"),
        spec: Some(ServiceSpec {
            cluster_ip: Some("10.96.0.20".into()),
            cluster_ips: Some(vec!["10.96.0.20".into()]),
            ports: Some(vec![ServicePort {
                name: Some("http".into()),
                port: 80,
                protocol: Some("TCP".into()),
                target_port: Some(IntOrString::String("web".into())),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        status: None,
    };
    let slice = EndpointSlice {
        metadata: meta("web-1"),
        address_type: "IPv4".into(),
        ports: Some(vec![EndpointPort {
            name: Some("http".into()),
            port: Some(i32::from(HTTP)),
            protocol: Some("TCP".into()),
            ..Default::default()
        }]),
        endpoints: endpoints
            .iter()
            .map(|(ip, node, ready)| Endpoint {
                addresses: vec![ip.to_string()],
                node_name: Some(node.to_string()),
                conditions: Some(EndpointConditions {
                    ready: Some(*ready),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .collect(),
    };
    (svc, slice)
}

/// Runs against the apiserver stand-in (relay-kube-standin on loopback),
/// not a real apiserver.
#[test]
fn kube_proxy_model_follows_services_and_endpointslices() -> Result<()> {
    if let Some(skip) = netns::require_root() {
        eprintln!("SKIPPED kube-proxy model from the stand-in: {skip}");
        return Ok(());
    }
    relay_lab::init();
    let lab = NetnsLab::new()?;
    let _cpod1 = services(&lab, Role::Cpod1, "cpod1")?;
    let _cpod2 = services(&lab, Role::Cpod2, "cpod2")?;
    let rt = tokio::runtime::Runtime::new()?;
    let _enter = rt.enter();
    let standin = rt.block_on(relay_kube_standin::StandIn::spawn())?;
    let client = rt.block_on(
        relay_kube::KubeClientConfig::Kubeconfig {
            path: standin.kubeconfig_path().to_path_buf(),
            context: None,
        }
        .client(&relay_kube::ClientOptions::default()),
    )?;
    // cpod2 ready, cpod1 not: only cpod2 may answer.
    let (svc, slice) = web_objects(&[
        (netns::CPOD2_IP, "cloud2", true),
        (netns::CPOD1_IP, "relay", false),
    ]);
    standin.upsert_service(svc);
    standin.upsert_endpointslice(slice);
    let dir = relay_kube::ServiceDirectory::spawn(&client, &Default::default());
    rt.block_on(dir.wait_synced(Duration::from_secs(20)))?;
    let web = sa(Ipv4Addr::new(10, 96, 0, 20), HTTP);
    let sync = |want: Option<SocketAddr>| -> Result<()> {
        // kube-proxy regenerates after every change; wait for the change
        // to reach the table first.
        let t = std::time::Instant::now();
        loop {
            let table = dir.table();
            let got = table
                .lookup(web, relay_kube::Protocol::Tcp)
                .map(|e| e.endpoints.iter().map(|e| e.addr()).collect::<Vec<_>>());
            if got == Some(want.into_iter().collect()) {
                return lab.sync_services(KubeProxyMode::Nftables, &kube_services(&table)?);
            }
            anyhow::ensure!(t.elapsed() < Duration::from_secs(20), "table: {got:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    sync(Some(sa(netns::CPOD2_IP, HTTP)))?;
    for ns in [Role::Cloud2, Role::Cpod1, Role::Apiserver] {
        assert_eq!(http_from(&lab, ns, web)?, "hello from cpod2", "{ns}");
    }
    // The rollout: cpod2 no longer ready, cpod1 ready.
    let (_, slice) = web_objects(&[
        (netns::CPOD2_IP, "cloud2", false),
        (netns::CPOD1_IP, "relay", true),
    ]);
    standin.upsert_endpointslice(slice);
    sync(Some(sa(netns::CPOD1_IP, HTTP)))?;
    for ns in [Role::Cloud2, Role::Cpod2, Role::Relay] {
        assert_eq!(http_from(&lab, ns, web)?, "hello from cpod1", "{ns}");
    }
    // The slice goes: no endpoints, kube-proxy rejects.
    assert!(standin.delete_endpointslice("shop", "web-1"));
    sync(None)?;
    let rules = lab.kube_proxy_rules(Role::Cloud2)?;
    assert!(rules.contains("shop/web:http has no endpoints"), "{rules}");
    assert!(http_from(&lab, Role::Cloud2, web).is_err());
    drop(dir);
    drop(standin);
    Ok(())
}
