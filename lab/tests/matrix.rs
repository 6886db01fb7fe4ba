//! The end-to-end matrix of the seed documents (FabEdge with SuperEdge test
//! tables), in the network-namespace lab: cloud → edge, edge → cloud and
//! edge → edge, from pods and from host-network processes, to pod IPs,
//! node addresses and ClusterIPs (kube-proxy's DNAT in the client's
//! namespace), over TCP (an HTTP page naming the host that served it) and
//! UDP (a DNS-sized query and reply). Then the control cell (relay stopped →
//! cloud → edge pod fails, as with plain Flannel) and route hygiene.
//!
//! Everything is real: relay-server and edge-client libraries run with
//! capture on (nftables TPROXY + policy routing) inside their namespaces,
//! edges behind masquerading NATs that drop inbound connections.
//! Needs root; skips loudly otherwise, and fails instead of skipping under
//! CI=true or REQUIRE_LAB=1.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use edge_client::{EdgeClient, EdgeConfig};
use relay_lab::netns::{self, NetnsLab, Proto, Role};
use relay_protocol::Cidr;
use relay_server::{Relay, RelayConfig};
use relay_transport::capture::CaptureConfig;
use relay_transport::devcerts::DevPki;
use tokio::net::{TcpStream, UdpSocket};

const HTTP: u16 = 80;
const KUBELET: u16 = 10250;
const DNS: u16 = 53;
const ADMIN_TOKEN: &str = "lab-admin-token-0123456789";
const AGENT_PROTO: u8 = 250;

fn cidr(s: &str) -> Cidr {
    s.parse().expect("valid prefix")
}

fn sa(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(ip), port)
}

/// A background task in a namespace that runs until told to stop.
struct Running {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    join: Option<std::thread::JoinHandle<Result<()>>>,
}

impl Running {
    fn stop(mut self) -> Result<()> {
        self.halt()
    }

    fn halt(&mut self) -> Result<()> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        match self.join.take() {
            Some(j) => j.join().map_err(|_| anyhow::anyhow!("thread panicked"))?,
            None => Ok(()),
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.halt();
    }
}

/// Starts `start` in `ns`; it reports readiness through `ready` once, then
/// runs until stopped. Waits (bounded) for readiness.
fn launch<F, Fut>(lab: &NetnsLab, ns: Role, what: &str, start: F) -> Result<Running>
where
    F: FnOnce(mpsc::Sender<Result<()>>, tokio::sync::oneshot::Receiver<()>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<()>>,
{
    let (ready_tx, ready_rx) = mpsc::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
    let err_tx = ready_tx.clone();
    let join = lab.spawn_in(ns, move || async move {
        let r = start(ready_tx, stop_rx).await;
        if let Err(e) = &r {
            let _ = err_tx.send(Err(anyhow::anyhow!("{e:#}")));
        }
        r
    });
    let running = Running {
        stop: Some(stop_tx),
        join: Some(join),
    };
    match ready_rx.recv_timeout(Duration::from_secs(20)) {
        Ok(Ok(())) => Ok(running),
        Ok(Err(e)) => Err(e.context(format!("starting {what}"))),
        Err(_) => bail!("{what} not ready within 20s"),
    }
}

/// HTTP pages on :80 (and :10250, the "kubelet") and a UDP responder on
/// :53, all naming `name`.
fn services(lab: &NetnsLab, ns: Role, name: &'static str) -> Result<Running> {
    launch(lab, ns, name, move |ready, stop| async move {
        let (_, h1) = relay_lab::spawn_http(sa(Ipv4Addr::UNSPECIFIED, HTTP), name).await?;
        let (_, h2) = relay_lab::spawn_http(
            sa(Ipv4Addr::UNSPECIFIED, KUBELET),
            &format!("{name}-kubelet"),
        )
        .await?;
        let udp = UdpSocket::bind(sa(Ipv4Addr::UNSPECIFIED, DNS)).await?;
        let h3 = tokio::spawn(async move {
            let mut buf = [0u8; 512];
            while let Ok((n, from)) = udp.recv_from(&mut buf).await {
                let reply = format!("{name}:{}", String::from_utf8_lossy(&buf[..n]));
                let _ = udp.send_to(reply.as_bytes(), from).await;
            }
        });
        let _ = ready.send(Ok(()));
        let _ = stop.await;
        for h in [h1, h2, h3] {
            h.abort();
        }
        Ok(())
    })
}

fn relay_config(pki: &DevPki) -> Result<RelayConfig> {
    let mut cfg = RelayConfig::loopback(pki.relay_material()?);
    cfg.quic_listen = sa(Ipv4Addr::UNSPECIFIED, 8443);
    cfg.connect_listen = Some(sa(netns::RELAY_LAN_IP, 8131));
    // On the cloud LAN, with a token: the route agent on cloud2 reads it.
    cfg.admin_listen = Some(sa(netns::RELAY_LAN_IP, 9090));
    cfg.admin_token = Some(relay_server::Secret::new(ADMIN_TOKEN));
    for site in netns::SITES {
        cfg.nodes.insert(
            format!("edge{site}"),
            vec![
                netns::edge_pod_cidr(site),
                Cidr::host(IpAddr::V4(netns::edge_host_ip(site))),
            ],
        );
    }
    cfg.tunnel_routes = vec![
        cidr(netns::CPOD1_CIDR),
        cidr(netns::CPOD2_CIDR),
        cidr(netns::SERVICE_CIDR),
        cidr(netns::CLOUD_LAN),
    ];
    cfg.capture = Some(CaptureConfig::default());
    Ok(cfg)
}

fn edge_config(pki: &DevPki, site: u8) -> Result<EdgeConfig> {
    let node = format!("edge{site}");
    let mut cfg = EdgeConfig::new(
        &node,
        sa(netns::RELAY_WAN_IP, 8443).to_string(),
        "relay.lab",
        pki.node_material(&node)?,
    );
    let host = IpAddr::V4(netns::edge_host_ip(site));
    cfg.routes = vec![netns::edge_pod_cidr(site), Cidr::host(host)];
    cfg.primary_addr = Some(host);
    cfg.capture = Some(CaptureConfig::default());
    Ok(cfg)
}

fn start_relay(lab: &NetnsLab, pki: &DevPki) -> Result<Running> {
    let cfg = relay_config(pki)?;
    launch(lab, Role::Relay, "relay", move |ready, stop| async move {
        let relay = Relay::spawn(cfg).await?;
        let _ = ready.send(Ok(()));
        let _ = stop.await;
        relay.shutdown(Duration::from_secs(2)).await;
        Ok(())
    })
}

/// The route agent on cloud2, polling the relay's admin API every 200 ms.
fn start_agent(lab: &NetnsLab) -> Result<Running> {
    let cfg = relay_server::agent::AgentConfig {
        admin: sa(netns::RELAY_LAN_IP, 9090),
        token: Some(relay_server::Secret::new(ADMIN_TOKEN)),
        via: IpAddr::V4(netns::RELAY_LAN_IP),
        interval: Duration::from_millis(200),
        proto: AGENT_PROTO,
    };
    launch(
        lab,
        Role::Cloud2,
        "route agent",
        move |ready, stop| async move {
            let token = tokio_util::sync::CancellationToken::new();
            let task = tokio::spawn(relay_server::agent::run(cfg, token.clone()));
            let _ = ready.send(Ok(()));
            let _ = stop.await;
            token.cancel();
            let _ = task.await;
            Ok(())
        },
    )
}

/// The route agent's routes on cloud2.
fn agent_routes(lab: &NetnsLab) -> Result<String> {
    lab.exec(
        Role::Cloud2,
        &[
            "ip",
            "-4",
            "route",
            "show",
            "proto",
            &AGENT_PROTO.to_string(),
        ],
    )
}

/// Polls `cond` every 50 ms for at most `limit`; returns the time it took.
fn within(limit: Duration, mut cond: impl FnMut() -> Result<bool>) -> Result<Duration> {
    let t = Instant::now();
    while t.elapsed() < limit {
        if cond()? {
            return Ok(t.elapsed());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("not within {limit:?}")
}

/// `GET path` on the relay's admin API, from inside the relay node.
fn admin(lab: &NetnsLab, path: &'static str) -> Result<String> {
    lab.run_in(Role::Relay, Duration::from_secs(10), move || async move {
        let (code, body) =
            relay_lab::admin_get(sa(netns::RELAY_LAN_IP, 9090), path, Some(ADMIN_TOKEN)).await?;
        anyhow::ensure!(code == 200, "{path}: HTTP {code}");
        Ok(body)
    })
}

fn start_edge(lab: &NetnsLab, pki: &DevPki, site: u8) -> Result<Running> {
    let cfg = edge_config(pki, site)?;
    let role = Role::edge(site)?;
    launch(
        lab,
        role,
        &format!("edge{site}"),
        move |ready, stop| async move {
            let edge = EdgeClient::start(cfg).await?;
            if edge.wait_connected(Duration::from_secs(15)).await.is_none() {
                bail!("edge did not connect: {:?}", edge.state());
            }
            let _ = ready.send(Ok(()));
            let _ = stop.await;
            edge.shutdown().await;
            Ok(())
        },
    )
}

/// Fetches `/` from `target` over plain TCP from inside `ns`; returns the body.
fn http_from(lab: &NetnsLab, ns: Role, target: SocketAddr) -> Result<String> {
    lab.run_in(ns, Duration::from_secs(15), move || async move {
        let s = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(target))
            .await
            .context("connect timed out")??;
        let (code, body) = relay_lab::http_get(s, &target.to_string(), "/", None).await?;
        anyhow::ensure!(code == 200, "HTTP {code}");
        Ok(body.trim_end().to_string())
    })
}

/// CONNECT through the relay's ingress from inside `ns`, then GET.
fn connect_from(lab: &NetnsLab, ns: Role, authority: &'static str) -> Result<String> {
    lab.run_in(ns, Duration::from_secs(15), move || async move {
        let s = relay_lab::connect_via(sa(netns::RELAY_LAN_IP, 8131), authority).await?;
        let (code, body) = relay_lab::http_get(s, authority, "/", None).await?;
        anyhow::ensure!(code == 200, "HTTP {code}");
        Ok(body.trim_end().to_string())
    })
}

/// One DNS-sized UDP query and its reply, from inside `ns`.
fn udp_from(lab: &NetnsLab, ns: Role, target: SocketAddr) -> Result<String> {
    lab.run_in(ns, Duration::from_secs(15), move || async move {
        let s = UdpSocket::bind(sa(Ipv4Addr::UNSPECIFIED, 0)).await?;
        s.connect(target).await?;
        // A 48-byte query, the size of a small DNS question.
        let query = format!("q{:046}", rand::random::<u32>());
        let mut buf = [0u8; 512];
        // The first packet also sets the flow up; one retransmission, as a
        // DNS resolver would, and no more.
        for _ in 0..2 {
            s.send(query.as_bytes()).await?;
            if let Ok(r) = tokio::time::timeout(Duration::from_secs(3), s.recv(&mut buf)).await {
                let n = r?;
                let reply = String::from_utf8_lossy(&buf[..n]).to_string();
                let (name, echoed) = reply.split_once(':').context("bad reply")?;
                anyhow::ensure!(echoed == query, "reply to another query");
                return Ok(name.to_string());
            }
        }
        bail!("no UDP reply")
    })
}

/// Expects a connection attempt to fail (refused, unreachable or reset)
/// within `limit`; returns how long it took.
fn fails_fast(lab: &NetnsLab, ns: Role, target: SocketAddr, limit: Duration) -> Result<Duration> {
    let t = Instant::now();
    match http_from(lab, ns, target) {
        Ok(body) => bail!("reached {target} ({body})"),
        Err(_) if t.elapsed() <= limit => Ok(t.elapsed()),
        Err(e) => bail!("failed, but only after {:?}: {e:#}", t.elapsed()),
    }
}

struct Matrix {
    rows: Vec<(String, String, String, bool)>,
}

impl Matrix {
    fn check(&mut self, case: &str, path: &str, expect: &str, got: Result<String>) {
        let (result, ok) = match got {
            Ok(who) if who.strip_prefix("hello from ").unwrap_or(&who) == expect => {
                (format!("ok ({who})"), true)
            }
            Ok(who) => (format!("WRONG HOST: {who}, expected {expect}"), false),
            Err(e) => (format!("FAIL: {e:#}"), false),
        };
        self.rows.push((case.into(), path.into(), result, ok));
    }

    fn note(&mut self, case: &str, path: &str, got: Result<String>) {
        let (result, ok) = match got {
            Ok(s) => (format!("ok ({s})"), true),
            Err(e) => (format!("FAIL: {e:#}"), false),
        };
        self.rows.push((case.into(), path.into(), result, ok));
    }

    fn render(&self) -> String {
        let w0 = self
            .rows
            .iter()
            .map(|r| r.0.len())
            .max()
            .unwrap_or(4)
            .max(4);
        let w1 = self
            .rows
            .iter()
            .map(|r| r.1.len())
            .max()
            .unwrap_or(4)
            .max(4);
        let mut out = format!(
            "| {:w0$} | {:w1$} | result\n|{}|{}|--------\n",
            "case",
            "path",
            "-".repeat(w0 + 2),
            "-".repeat(w1 + 2)
        );
        for (c, p, r, _) in &self.rows {
            out += &format!("| {c:w0$} | {p:w1$} | {r}\n");
        }
        out
    }
}

#[test]
fn seed_matrix_through_relay_installed_routes() -> Result<()> {
    if let Some(skip) = netns::require_root() {
        eprintln!("SKIPPED seed_matrix_through_relay_installed_routes: {skip}");
        return Ok(());
    }
    relay_lab::init();
    let t_build = Instant::now();
    let lab = NetnsLab::new()?;
    let build = t_build.elapsed();
    let pki = DevPki::generate(&["relay.lab"], &["edge1", "edge2"])?;

    // Services everywhere, each naming its host.
    let mut svcs = Vec::new();
    for (role, name) in [
        (Role::Cpod1, "cpod1"),
        (Role::Cpod2, "cpod2"),
        (Role::Cloud2, "cloud2"),
        (Role::Epod1, "epod1"),
        (Role::Epod2, "epod2"),
        (Role::Edge1, "edge1"),
        (Role::Edge2, "edge2"),
    ] {
        svcs.push(services(&lab, role, name)?);
    }
    // kube-proxy: ClusterIPs DNATed in the clients' namespaces.
    let svc_edge1 = sa(Ipv4Addr::new(10, 96, 0, 20), HTTP);
    let svc_cloud = sa(Ipv4Addr::new(10, 96, 0, 10), HTTP);
    let svc_edge2 = sa(Ipv4Addr::new(10, 96, 0, 30), HTTP);
    lab.add_cluster_ip(
        Role::Cpod2,
        svc_edge1,
        sa(netns::edge_pod_ip(1), HTTP),
        Proto::Tcp,
    )?;
    lab.add_cluster_ip(
        Role::Epod1,
        svc_cloud,
        sa(netns::CPOD1_IP, HTTP),
        Proto::Tcp,
    )?;
    lab.add_cluster_ip(
        Role::Epod1,
        svc_edge2,
        sa(netns::edge_pod_ip(2), HTTP),
        Proto::Tcp,
    )?;

    // cloud2 gets its edge routes from the route agent, not from the
    // lab's static routes.
    for r in [
        "10.244.7.0/24",
        "10.244.8.0/24",
        "192.168.1.0/24",
        "192.168.2.0/24",
    ] {
        lab.exec(Role::Cloud2, &["ip", "route", "del", r])?;
    }

    let t_up = Instant::now();
    let relay = start_relay(&lab, &pki)?;
    let edge1 = start_edge(&lab, &pki, 1)?;
    let edge2 = start_edge(&lab, &pki, 2)?;
    let up = t_up.elapsed();
    let agent = start_agent(&lab)?;
    let mut m = Matrix { rows: Vec::new() };
    m.note(
        "route agent installs edge routes",
        "cloud2: ip route proto 250",
        within(Duration::from_secs(5), || {
            let r = agent_routes(&lab)?;
            Ok([
                "10.244.7.0/24",
                "10.244.8.0/24",
                "192.168.1.10",
                "192.168.2.10",
            ]
            .iter()
            .all(|p| r.contains(p)))
        })
        .map(|d| format!("4 routes via 10.0.0.1 after {d:?}")),
    );
    // Edges learn each other's routes by route update; give the relay's
    // coalescing (100 ms) and the edges' capture update a moment.
    std::thread::sleep(Duration::from_millis(500));

    if std::env::var("MATRIX_DEBUG").is_ok() {
        for (role, cmd) in [
            (Role::Relay, vec!["ip", "-br", "link"]),
            (Role::Relay, vec!["ip", "rule"]),
            (Role::Relay, vec!["ip", "route", "show", "table", "7100"]),
            (Role::Relay, vec!["nft", "list", "ruleset"]),
            (Role::Edge1, vec!["ip", "-br", "link"]),
            (Role::Edge1, vec!["ip", "rule"]),
            (Role::Edge1, vec!["nft", "list", "ruleset"]),
            (
                Role::Edge1,
                vec![
                    "sysctl",
                    "net.ipv4.conf.all.rp_filter",
                    "net.ipv4.conf.cni0.rp_filter",
                    "net.bridge.bridge-nf-call-iptables",
                ],
            ),
        ] {
            eprintln!(
                "== {role:?}: {}\n{}",
                cmd.join(" "),
                lab.exec(role, &cmd).unwrap_or_else(|e| format!("{e:#}"))
            );
        }
    }
    let epod1 = netns::edge_pod_ip(1);
    let epod2 = netns::edge_pod_ip(2);
    let host1 = netns::edge_host_ip(1);
    // cloud → edge
    m.check(
        "cloud pod → edge pod",
        "cpod2@cloud2 → 10.244.7.5",
        "epod1",
        http_from(&lab, Role::Cpod2, sa(epod1, HTTP)),
    );
    m.check(
        "cloud pod (relay node) → edge pod",
        "cpod1@relay → 10.244.7.5",
        "epod1",
        http_from(&lab, Role::Cpod1, sa(epod1, HTTP)),
    );
    m.check(
        "cloud host → edge pod",
        "cloud2 (hostNetwork) → 10.244.7.5",
        "epod1",
        http_from(&lab, Role::Cloud2, sa(epod1, HTTP)),
    );
    m.check(
        "relay node host → edge pod",
        "relay (hostNetwork, local) → 10.244.8.5",
        "epod2",
        http_from(&lab, Role::Relay, sa(epod2, HTTP)),
    );
    m.check(
        "cloud pod → edge node",
        "cpod2 → 192.168.1.10",
        "edge1",
        http_from(&lab, Role::Cpod2, sa(host1, HTTP)),
    );
    m.check(
        "cloud pod → ClusterIP (edge endpoint)",
        "cpod2 → 10.96.0.20 ⇒ 10.244.7.5",
        "epod1",
        http_from(&lab, Role::Cpod2, svc_edge1),
    );
    m.check(
        "apiserver → edge kubelet (CONNECT)",
        "apiserver → CONNECT edge1:10250",
        "edge1-kubelet",
        connect_from(&lab, Role::Apiserver, "edge1:10250"),
    );
    m.check(
        "apiserver → edge pod (CONNECT)",
        "apiserver → CONNECT 10.244.8.5:80",
        "epod2",
        connect_from(&lab, Role::Apiserver, "10.244.8.5:80"),
    );
    m.check(
        "apiserver host → edge pod",
        "apiserver (hostNetwork) → 10.244.7.5",
        "epod1",
        http_from(&lab, Role::Apiserver, sa(epod1, HTTP)),
    );
    // edge → cloud
    m.check(
        "edge pod → cloud pod (relay node)",
        "epod1 → 10.244.1.2",
        "cpod1",
        http_from(&lab, Role::Epod1, sa(netns::CPOD1_IP, HTTP)),
    );
    m.check(
        "edge pod → cloud pod",
        "epod1 → 10.244.2.2",
        "cpod2",
        http_from(&lab, Role::Epod1, sa(netns::CPOD2_IP, HTTP)),
    );
    m.check(
        "edge host → cloud pod",
        "edge1 (hostNetwork) → 10.244.2.2",
        "cpod2",
        http_from(&lab, Role::Edge1, sa(netns::CPOD2_IP, HTTP)),
    );
    m.check(
        "edge pod → cloud node",
        "epod2 → 10.0.0.2",
        "cloud2",
        http_from(&lab, Role::Epod2, sa(netns::CLOUD2_LAN_IP, HTTP)),
    );
    m.check(
        "edge pod → ClusterIP (cloud endpoint)",
        "epod1 → 10.96.0.10 ⇒ 10.244.1.2",
        "cpod1",
        http_from(&lab, Role::Epod1, svc_cloud),
    );
    // edge → edge
    m.check(
        "edge pod → other edge's pod",
        "epod1 → 10.244.8.5",
        "epod2",
        http_from(&lab, Role::Epod1, sa(epod2, HTTP)),
    );
    m.check(
        "edge host → other edge's pod",
        "edge2 (hostNetwork) → 10.244.7.5",
        "epod1",
        http_from(&lab, Role::Edge2, sa(epod1, HTTP)),
    );
    m.check(
        "edge pod → other edge's node",
        "epod2 → 192.168.1.10",
        "edge1",
        http_from(&lab, Role::Epod2, sa(host1, HTTP)),
    );
    m.check(
        "edge pod → ClusterIP (other edge)",
        "epod1 → 10.96.0.30 ⇒ 10.244.8.5",
        "epod2",
        http_from(&lab, Role::Epod1, svc_edge2),
    );
    // UDP
    m.check(
        "UDP cloud pod → edge pod",
        "cpod2 → 10.244.7.5:53/udp",
        "epod1",
        udp_from(&lab, Role::Cpod2, sa(epod1, DNS)),
    );
    m.check(
        "UDP edge pod → cloud pod",
        "epod1 → 10.244.2.2:53/udp",
        "cpod2",
        udp_from(&lab, Role::Epod1, sa(netns::CPOD2_IP, DNS)),
    );
    m.check(
        "UDP edge pod → other edge's pod",
        "epod1 → 10.244.8.5:53/udp",
        "epod2",
        udp_from(&lab, Role::Epod1, sa(epod2, DNS)),
    );

    // Oversized UDP: counted and dropped, never silently truncated; the
    // admin API reports the effective payload size.
    let big = lab.run_in(Role::Cpod2, Duration::from_secs(10), move || async move {
        let s = UdpSocket::bind(sa(Ipv4Addr::UNSPECIFIED, 0)).await?;
        s.connect(sa(epod1, DNS)).await?;
        s.send(&[b'x'; 3000]).await?;
        let mut buf = [0u8; 4096];
        Ok(
            tokio::time::timeout(Duration::from_secs(2), s.recv(&mut buf))
                .await
                .is_err(),
        )
    });
    let counted = admin(&lab, "/metrics").map(|t| {
        t.lines()
            .find(|l| l.starts_with("relay_udp_dropped_total{reason=\"oversize\"}"))
            .unwrap_or_default()
            .to_string()
    });
    let max_payload = admin(&lab, "/v1/sessions/edge1").and_then(|b| {
        let row: relay_server::admin::SessionRow = serde_json::from_str(&b)?;
        Ok(row.udp_max_payload)
    });
    m.note(
        "UDP larger than the path: dropped and counted",
        "cpod2 → 10.244.7.5:53/udp, 3000 bytes",
        match (big, counted, max_payload) {
            (Ok(true), Ok(c), Ok(max)) if c.ends_with(" 1") && (1000..3000).contains(&max) => Ok(
                format!("no reply; {c}; admin reports udp_max_payload {max}"),
            ),
            (b, c, mp) => Err(anyhow::anyhow!(
                "no-reply={b:?} metric={c:?} max_payload={mp:?}"
            )),
        },
    );

    // Route hygiene: an edge leaves; its routes go from the relay within
    // seconds, and connections to its pods fail fast.
    let t = Instant::now();
    edge2.stop()?;
    let mut gone = None;
    while t.elapsed() < Duration::from_secs(10) {
        let set = lab.exec(
            Role::Relay,
            &["nft", "list", "set", "inet", "edge_relay", "dst4"],
        )?;
        let rules = lab.exec(Role::Relay, &["ip", "rule"])?;
        if !set.contains("10.244.8.0/24") && !rules.contains("10.244.8.0/24") {
            gone = Some(t.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    m.note(
        "edge leaves → its routes removed",
        "edge2 stops; relay nft set + ip rules",
        gone.map(|d| format!("gone after {d:?}"))
            .context("still installed after 10s"),
    );
    m.note(
        "edge leaves → its pods fail fast",
        "cpod2 → 10.244.8.5",
        fails_fast(&lab, Role::Cpod2, sa(epod2, HTTP), Duration::from_secs(2))
            .map(|d| format!("failed in {d:?}")),
    );
    m.note(
        "edge leaves → route agent withdraws its routes",
        "cloud2: ip route proto 250",
        within(Duration::from_secs(5), || {
            let r = agent_routes(&lab)?;
            Ok(!r.contains("10.244.8.0/24") && r.contains("10.244.7.0/24"))
        })
        .map(|d| format!("10.244.8.0/24 gone after {:?} more", d)),
    );
    let edge2_left = lab.exec(Role::Edge2, &["nft", "list", "tables"])?;
    m.note(
        "edge leaves → edge keeps nothing",
        "edge2: nft tables",
        if edge2_left.contains("edge_relay") {
            Err(anyhow::anyhow!("edge_relay table left: {edge2_left}"))
        } else {
            Ok("no edge_relay table".into())
        },
    );

    // Control: with the relay stopped, cloud → edge pod fails, as it does
    // with plain Flannel and no tunnel.
    relay.stop()?;
    m.note(
        "control: relay stopped → unreachable",
        "cpod2 → 10.244.7.5",
        fails_fast(&lab, Role::Cpod2, sa(epod1, HTTP), Duration::from_secs(6))
            .map(|d| format!("failed in {d:?}")),
    );
    let tables = lab.exec(Role::Relay, &["nft", "list", "tables"])?;
    let rules = lab.exec(Role::Relay, &["ip", "rule"])?;
    let table = lab.exec(Role::Relay, &["ip", "route", "show", "table", "7100"])?;
    m.note(
        "relay exits → nothing of its own remains",
        "relay: nft tables, ip rules, table 7100",
        if tables.contains("edge_relay")
            || rules.contains("7100")
            || rules.contains("7099")
            || !table.trim().is_empty()
        {
            Err(anyhow::anyhow!("left behind:\n{tables}\n{rules}\n{table}"))
        } else {
            Ok("clean".into())
        },
    );
    agent.stop()?;
    m.note(
        "route agent exits → its routes removed",
        "cloud2: ip route proto 250",
        agent_routes(&lab).and_then(|r| {
            if r.trim().is_empty() {
                Ok("none left".to_string())
            } else {
                Err(anyhow::anyhow!("left: {r}"))
            }
        }),
    );
    edge1.stop()?;
    drop(svcs);

    let t_down = Instant::now();
    drop(lab);
    let teardown = t_down.elapsed();
    let table = m.render();
    let summary = format!(
        "{table}\nlab build {build:?}, relay + 2 edges up {up:?}, lab teardown {teardown:?}; {} of {} cells passed\n",
        m.rows.iter().filter(|r| r.3).count(),
        m.rows.len()
    );
    println!("\n{summary}");
    let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/lab-matrix.txt");
    let _ = std::fs::write(out, &summary);
    let failed: Vec<&str> = m
        .rows
        .iter()
        .filter(|r| !r.3)
        .map(|r| r.0.as_str())
        .collect();
    assert!(failed.is_empty(), "failed cells: {failed:?}\n{summary}");
    Ok(())
}
