//! The edge resolver on real sockets, asked by real `dig` (Debian's
//! `bind9-dnsutils`): answers from the table, a pod's resolv.conf search
//! list, TCP after truncation, forwarding to a fake upstream on loopback,
//! and a restart from the saved table with the upstream down.
//!
//! Without `dig` the tests say so and pass, unless `CI` is set (CI
//! installs it, `.ci/run`), where they fail. The resolv.conf part needs
//! root (a private mount namespace); it is skipped loudly otherwise.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use edge_client::dns::{DnsConfig, Resolver};
use hickory_proto::op::{Message, Query};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{Name, RData, Record, RecordType};
use relay_protocol::{
    Control, NameEndpoint, NameKind, NamePort, NameProtocol, ServiceName, ServiceNameKey,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UdpSocket};
use tokio_util::sync::CancellationToken;

fn svc(name: &str, kind: NameKind, port: (&str, u16), eps: Vec<NameEndpoint>) -> ServiceName {
    ServiceName {
        key: ServiceNameKey {
            namespace: "shop".into(),
            name: name.into(),
        },
        kind,
        ports: vec![NamePort {
            name: port.0.into(),
            port: port.1,
            protocol: NameProtocol::Tcp,
        }],
        endpoints: eps,
    }
}

fn table() -> Vec<ServiceName> {
    let ep = |ip: String, host: Option<&str>| NameEndpoint {
        ip: ip.parse().unwrap(),
        hostname: host.map(String::from),
        ports: vec![5432],
    };
    vec![
        svc(
            "web",
            NameKind::ClusterIp(vec!["10.96.0.20".parse().unwrap()]),
            ("http", 80),
            vec![],
        ),
        svc(
            "db",
            NameKind::Headless,
            ("pg", 5432),
            vec![
                ep("10.244.7.5".into(), Some("db-0")),
                ep("10.244.7.6".into(), Some("db-1")),
            ],
        ),
        ServiceName {
            key: ServiceNameKey {
                namespace: "shop".into(),
                name: "alias".into(),
            },
            kind: NameKind::ExternalName("web.shop.svc.cluster.local".into()),
            ports: vec![],
            endpoints: vec![],
        },
        // 100 endpoints: more than a 1232-byte UDP answer holds.
        svc(
            "big",
            NameKind::Headless,
            ("pg", 5432),
            (0..100)
                .map(|i| ep(format!("10.244.8.{i}"), None))
                .collect(),
        ),
    ]
}

/// A stand-in for the cluster DNS: answers every A query with 192.0.2.1
/// over UDP and TCP, and counts queries.
struct FakeUpstream {
    addr: SocketAddr,
    queries: Arc<AtomicU64>,
    cancel: CancellationToken,
}

fn upstream_answer(q: &[u8]) -> Option<Vec<u8>> {
    let q = Message::from_vec(q).ok()?;
    let mut m = Message::response(q.metadata.id, q.metadata.op_code);
    m.metadata.recursion_available = true;
    m.add_queries(q.queries.iter().cloned());
    let name = q.queries.first()?.name().clone();
    m.add_answer(Record::from_rdata(name, 60, RData::A(A::new(192, 0, 2, 1))));
    m.to_vec().ok()
}

/// A UDP socket and a TCP listener on one loopback port. The UDP port the
/// kernel picks may be a TCP connection's (other tests run beside this
/// one; a busy host has thousands), so another pick until both are free.
async fn udp_and_tcp_on_one_port() -> (UdpSocket, SocketAddr, TcpListener) {
    let mut tries = 0;
    loop {
        let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = udp.local_addr().unwrap();
        match TcpListener::bind(addr).await {
            Ok(tcp) => return (udp, addr, tcp),
            Err(e) if tries < 50 => {
                tries += 1;
                eprintln!("{addr} taken for TCP ({e}); another port");
            }
            Err(e) => panic!("no port free for both UDP and TCP: {e}"),
        }
    }
}

impl FakeUpstream {
    async fn start() -> FakeUpstream {
        let (udp, addr, tcp) = udp_and_tcp_on_one_port().await;
        let queries = Arc::new(AtomicU64::new(0));
        let cancel = CancellationToken::new();
        let (n, c) = (queries.clone(), cancel.clone());
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            loop {
                tokio::select! {
                    _ = c.cancelled() => return,
                    r = udp.recv_from(&mut buf) => {
                        let (len, peer) = r.unwrap();
                        n.fetch_add(1, Relaxed);
                        if let Some(a) = upstream_answer(&buf[..len]) {
                            udp.send_to(&a, peer).await.unwrap();
                        }
                    }
                    r = tcp.accept() => {
                        let (mut s, _) = r.unwrap();
                        n.fetch_add(1, Relaxed);
                        tokio::spawn(async move {
                            let len = s.read_u16().await.unwrap();
                            let mut q = vec![0u8; len as usize];
                            s.read_exact(&mut q).await.unwrap();
                            let a = upstream_answer(&q).unwrap();
                            s.write_u16(a.len() as u16).await.unwrap();
                            s.write_all(&a).await.unwrap();
                        });
                    }
                }
            }
        });
        FakeUpstream {
            addr,
            queries,
            cancel,
        }
    }
}

fn state_dir(tag: &str) -> PathBuf {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let d = std::env::temp_dir().join(format!("edge-dns-{tag}-{}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn have_dig() -> bool {
    let ok = std::process::Command::new("dig")
        .arg("-v")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        assert!(
            std::env::var_os("CI").is_none(),
            "dig is required in CI (apt-get install bind9-dnsutils)"
        );
        eprintln!("SKIPPED: `dig` not found (apt-get install bind9-dnsutils)");
    }
    ok
}

/// Runs dig against `server` with `args`; returns its standard output.
async fn dig(server: SocketAddr, args: &[&str]) -> String {
    let out = tokio::process::Command::new("dig")
        .arg(format!("@{}", server.ip()))
        .arg("-p")
        .arg(server.port().to_string())
        .args(["+time=2", "+tries=1"])
        .args(args)
        .output()
        .await
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

async fn short(server: SocketAddr, args: &[&str]) -> Vec<String> {
    let mut a = vec!["+short"];
    a.extend_from_slice(args);
    let mut v: Vec<String> = dig(server, &a).await.lines().map(String::from).collect();
    v.sort();
    v
}

fn config(upstream: SocketAddr, dir: &std::path::Path) -> DnsConfig {
    let mut c = DnsConfig::new(upstream, dir.join("dns-names.json"));
    c.listen = "127.0.0.1:0".parse().unwrap();
    c.forward_timeout = Duration::from_millis(500);
    c
}

/// Feeds the table as the relay would: frames of a batch, applied only
/// when the last one arrives.
fn send_table(r: &Resolver, services: Vec<ServiceName>) {
    let mut batch = r.batch();
    // Removals of names not held are harmless; they make several frames.
    let remove: Vec<ServiceNameKey> = (0..3000)
        .map(|i| ServiceNameKey {
            namespace: format!("gone-{i:040}"),
            name: format!("svc-{i:040}"),
        })
        .collect();
    let frames = Control::service_names(true, "cluster.local", services, remove);
    assert!(frames.len() > 1, "the batch spans frames");
    let last = frames.len() - 1;
    for (i, f) in frames.into_iter().enumerate() {
        let Control::ServiceNames {
            reset,
            cluster_domain,
            upsert,
            remove,
            complete,
        } = f
        else {
            unreachable!()
        };
        let before = r.zone().map_or(0, |z| z.len());
        assert_eq!(
            batch.frame(reset, cluster_domain, upsert, remove, complete),
            i == last
        );
        if i < last {
            assert_eq!(
                r.zone().map_or(0, |z| z.len()),
                before,
                "half a batch is never served"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dig_resolves_cluster_names_locally_and_forwards_the_rest() {
    if !have_dig() {
        return;
    }
    let up = FakeUpstream::start().await;
    let dir = state_dir("main");
    let r = Resolver::spawn(config(up.addr, &dir), CancellationToken::new())
        .await
        .unwrap();
    let at = r.local_addr();

    // Before any table: even cluster names go to the upstream.
    assert_eq!(
        short(at, &["web.shop.svc.cluster.local"]).await,
        ["192.0.2.1"]
    );
    send_table(&r, table());

    assert_eq!(
        short(at, &["web.shop.svc.cluster.local"]).await,
        ["10.96.0.20"]
    );
    assert_eq!(
        short(at, &["db.shop.svc.cluster.local"]).await,
        ["10.244.7.5", "10.244.7.6"]
    );
    assert_eq!(
        short(at, &["db-1.db.shop.svc.cluster.local"]).await,
        ["10.244.7.6"]
    );
    assert_eq!(
        short(at, &["SRV", "_http._tcp.web.shop.svc.cluster.local"]).await,
        ["0 100 80 web.shop.svc.cluster.local."]
    );
    // An ExternalName in the cluster: the alias and its target's address
    // (stub resolvers do not chase CNAMEs themselves); a pod name: the
    // address it spells.
    assert_eq!(
        short(at, &["alias.shop.svc.cluster.local"]).await,
        ["10.96.0.20", "web.shop.svc.cluster.local."]
    );
    assert_eq!(
        short(at, &["10-244-7-9.shop.pod.cluster.local"]).await,
        ["10.244.7.9"]
    );
    let nx = dig(at, &["nope.shop.svc.cluster.local"]).await;
    assert!(nx.contains("status: NXDOMAIN"), "{nx}");
    assert!(nx.contains("flags: qr aa rd ra"), "{nx}");
    // Reverse lookups of a ClusterIP and of a headless endpoint, as
    // CoreDNS answers them.
    assert_eq!(
        short(at, &["-x", "10.96.0.20"]).await,
        ["web.shop.svc.cluster.local."]
    );
    assert_eq!(
        short(at, &["-x", "10.244.7.5"]).await,
        ["db-0.db.shop.svc.cluster.local."]
    );
    let before = up.queries.load(Relaxed);
    // Outside the cluster domain: forwarded, over UDP and over TCP.
    assert_eq!(short(at, &["example.com"]).await, ["192.0.2.1"]);
    assert_eq!(short(at, &["+tcp", "example.com"]).await, ["192.0.2.1"]);
    assert_eq!(up.queries.load(Relaxed) - before, 2);

    // Truncated over UDP (TC, the leading records that fit in 1,232
    // bytes: a stub resolver that never retries over TCP still gets
    // addresses), whole over TCP: dig retries by itself.
    let tc = dig(at, &["+ignore", "big.shop.svc.cluster.local"]).await;
    assert!(tc.contains(" tc "), "{tc}");
    assert!(tc.contains("ANSWER: 73"), "{tc}");
    let full = dig(at, &["big.shop.svc.cluster.local"]).await;
    assert!(full.contains("Truncated, retrying in TCP mode"), "{full}");
    assert!(full.contains("ANSWER: 100"), "{full}");
    assert!(r.stats().truncated.load(Relaxed) >= 2);
    assert!(r.stats().tcp_queries.load(Relaxed) >= 2);

    resolv_conf_search(at).await;

    // The cloud goes away: the upstream stops. Cluster names still
    // answer; other names fail fast and bounded (SERVFAIL after the
    // forward timeout).
    up.cancel.cancel();
    assert_eq!(
        short(at, &["web.shop.svc.cluster.local"]).await,
        ["10.96.0.20"]
    );
    assert_eq!(
        short(at, &["-x", "10.244.7.6"]).await,
        ["db-1.db.shop.svc.cluster.local."]
    );
    let t = Instant::now();
    let sf = dig(at, &["example.org"]).await;
    assert!(sf.contains("status: SERVFAIL"), "{sf}");
    assert!(
        t.elapsed() < Duration::from_millis(1900),
        "{:?}",
        t.elapsed()
    );

    // Restart with the upstream down: the saved table answers.
    r.shutdown().await;
    let dead = up.addr;
    let r = Resolver::spawn(config(dead, &dir), CancellationToken::new())
        .await
        .unwrap();
    let at = r.local_addr();
    assert_eq!(
        short(at, &["web.shop.svc.cluster.local"]).await,
        ["10.96.0.20"]
    );
    assert_eq!(
        short(at, &["db-0.db.shop.svc.cluster.local"]).await,
        ["10.244.7.5"]
    );
    let nx = dig(at, &["nope.shop.svc.cluster.local"]).await;
    assert!(nx.contains("status: NXDOMAIN"), "{nx}");
    r.shutdown().await;

    // A corrupt file is not a crash: the resolver starts and forwards.
    std::fs::write(dir.join("dns-names.json"), b"{not json").unwrap();
    let r = Resolver::spawn(config(dead, &dir), CancellationToken::new())
        .await
        .unwrap();
    assert!(r.zone().is_none());
    r.shutdown().await;
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A pod's resolv.conf (`ndots:5`, the namespace's search list) over
/// /etc/resolv.conf in a private mount namespace, read by dig's own
/// resolver: short names resolve through the search list.
async fn resolv_conf_search(at: SocketAddr) {
    if !nix_is_root() {
        eprintln!("SKIPPED: resolv.conf search test needs root (private mount namespace)");
        return;
    }
    let dir = state_dir("resolv");
    let conf = dir.join("resolv.conf");
    std::fs::write(
        &conf,
        format!(
            "nameserver {}\nsearch shop.svc.cluster.local svc.cluster.local cluster.local\noptions ndots:5\n",
            at.ip()
        ),
    )
    .unwrap();
    for (name, want) in [
        ("web", "10.96.0.20"),
        ("web.shop", "10.96.0.20"),
        ("web.shop.svc", "10.96.0.20"),
        ("db-0.db", "10.244.7.5"),
        // Not in the cluster: every search name is NXDOMAIN locally,
        // then the name as given is forwarded.
        ("example.com", "192.0.2.1"),
    ] {
        let script = format!(
            "mount --bind {} /etc/resolv.conf && exec dig -p {} +time=2 +tries=1 +search +short {name}",
            conf.display(),
            at.port()
        );
        let out = tokio::process::Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sh", "-c", &script])
            .output()
            .await
            .unwrap();
        let got = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            got.trim(),
            want,
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

fn nix_is_root() -> bool {
    std::process::Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0\n"))
}

/// Latency of a local answer against a forwarded one (and the fake
/// upstream asked directly): medians of sequential UDP queries on
/// loopback. Figures in docs/benchmarks.md; run with
/// `cargo test -p edge-client --test dns -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement, not a check; see docs/benchmarks.md"]
async fn latency_local_vs_forwarded() {
    let up = FakeUpstream::start().await;
    let dir = state_dir("bench");
    let r = Resolver::spawn(config(up.addr, &dir), CancellationToken::new())
        .await
        .unwrap();
    r.replace_table("cluster.local", table());
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut buf = vec![0u8; 4096];
    let mut measure = async |to: SocketAddr, name: &str| {
        let mut q = Message::query();
        q.metadata.recursion_desired = true;
        q.add_query(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
        let bytes = q.to_vec().unwrap();
        let mut v = Vec::new();
        for i in 0..2200 {
            let t = Instant::now();
            sock.send_to(&bytes, to).await.unwrap();
            let (n, _) = sock.recv_from(&mut buf).await.unwrap();
            let us = t.elapsed().as_secs_f64() * 1e6;
            assert!(Message::from_vec(&buf[..n]).unwrap().answers.len() == 1);
            if i >= 200 {
                v.push(us); // the first 200 warm up
            }
        }
        v.sort_by(f64::total_cmp);
        (v[v.len() / 2], v[v.len() * 99 / 100])
    };
    let direct = measure(up.addr, "example.com.").await;
    let local = measure(r.local_addr(), "web.shop.svc.cluster.local.").await;
    let fwd = measure(r.local_addr(), "example.com.").await;
    println!("2000 sequential UDP queries each, loopback (median / p99, µs):");
    println!(
        "  fake upstream asked directly: {:.0} / {:.0}",
        direct.0, direct.1
    );
    println!(
        "  local answer (cluster name):  {:.0} / {:.0}",
        local.0, local.1
    );
    println!(
        "  forwarded via the resolver:   {:.0} / {:.0}",
        fwd.0, fwd.1
    );
    println!("  forwarding adds (median):     {:.0}", fwd.0 - direct.0);
    r.shutdown().await;
    std::fs::remove_dir_all(&dir).unwrap();
}

/// An address another resolver holds (NodeLocal DNSCache's, say) does not
/// stop the edge: the resolver starts without listening, says so, and
/// takes the address once it is free, answering from then on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_address_held_elsewhere_is_retried_not_fatal() {
    let up = FakeUpstream::start().await;
    let dir = state_dir("held");
    // Held for both protocols, so the port is free for both once let go
    // (the resolver takes UDP and TCP on it).
    let holder = udp_and_tcp_on_one_port().await;
    let mut c = config(up.addr, &dir);
    c.listen = holder.1;
    c.bind_retry = Duration::from_millis(100);
    let r = Resolver::spawn(c, CancellationToken::new())
        .await
        .expect("a held address is not a start failure");
    assert!(!r.stats().listening.load(Relaxed));
    drop(holder);
    let t = Instant::now();
    while !r.stats().listening.load(Relaxed) && t.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(r.stats().listening.load(Relaxed), "never listened");
    let q = Message::query()
        .add_query(Query::query(
            Name::from_ascii("example.org.").unwrap(),
            RecordType::A,
        ))
        .to_vec()
        .unwrap();
    let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    s.send_to(&q, r.local_addr()).await.unwrap();
    let mut buf = [0u8; 512];
    let (n, _) = tokio::time::timeout(Duration::from_secs(5), s.recv_from(&mut buf))
        .await
        .expect("answered once listening")
        .unwrap();
    assert_eq!(Message::from_vec(&buf[..n]).unwrap().answers.len(), 1);
    r.shutdown().await;
    up.cancel.cancel();
    std::fs::remove_dir_all(&dir).unwrap();
}
