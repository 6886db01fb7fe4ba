//! Hardening on loopback: bounds on operator input, the CONNECT audit
//! log, insecure setups refused, the edge's QUIC probe owned by its
//! session.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use edge_client::EdgeClient;
use relay_lab::traffic::eventually;
use relay_lab::{admin_request, edge_config, sessions, Lab};
use relay_server::agent::{AgentConfig, AgentTls};
use relay_server::Secret;
use tokio::net::{TcpListener, TcpStream, UdpSocket};

/// A drain grace beyond a day used to reach `Instant + grace` in the drain
/// task and panic there (after a 202); now it is refused up front and the
/// session is untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_drain_grace_is_refused() -> anyhow::Result<()> {
    let lab = Lab::start(1, |_| {}).await?;
    let admin = lab.admin_addr();
    for grace in ["18446744073709551615s", "25h"] {
        let path = format!("/v1/sessions/edge-0?drain=true&grace={grace}");
        let (code, body) = admin_request(admin, "DELETE", &path).await?;
        assert_eq!(code, 400, "grace {grace}: {body}");
        assert!(body.contains("at most"), "{body}");
    }
    let s = sessions(admin).await?;
    assert_eq!(s.len(), 1);
    assert!(!s[0].draining, "a refused drain must not start draining");
    // A day is still accepted.
    let (code, body) =
        admin_request(admin, "DELETE", "/v1/sessions/edge-0?drain=true&grace=24h").await?;
    assert_eq!(code, 202, "{body}");
    tokio::time::timeout(Duration::from_secs(5), lab.stop()).await?;
    Ok(())
}

/// A UDP "gate" in front of the relay's QUIC port, with a TCP forwarder on
/// the same port number: while closed it swallows UDP (a network that
/// blocks it), counting packets; once opened it forwards both ways.
struct UdpGate {
    addr: SocketAddr,
    open: Arc<AtomicBool>,
    swallowed: Arc<AtomicU64>,
    _tasks: Vec<AbortOnDrop>,
}

/// Aborts a helper task when the test ends.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn udp_gate(relay: SocketAddr) -> anyhow::Result<UdpGate> {
    let tcp = TcpListener::bind("127.0.0.1:0").await?;
    let addr = tcp.local_addr()?;
    let udp = Arc::new(UdpSocket::bind(addr).await?);
    let open = Arc::new(AtomicBool::new(false));
    let swallowed = Arc::new(AtomicU64::new(0));
    let (o, n) = (open.clone(), swallowed.clone());
    let pump = tokio::spawn(async move {
        let mut ups: HashMap<SocketAddr, Arc<UdpSocket>> = HashMap::new();
        let mut buf = vec![0u8; 65536];
        while let Ok((len, from)) = udp.recv_from(&mut buf).await {
            if !o.load(Relaxed) {
                n.fetch_add(1, Relaxed);
                continue;
            }
            let up = match ups.get(&from) {
                Some(u) => u.clone(),
                None => {
                    let Ok(u) = UdpSocket::bind("127.0.0.1:0").await else {
                        continue;
                    };
                    if u.connect(relay).await.is_err() {
                        continue;
                    }
                    let u = Arc::new(u);
                    let (back, down) = (udp.clone(), u.clone());
                    tokio::spawn(async move {
                        let mut b = vec![0u8; 65536];
                        while let Ok(len) = down.recv(&mut b).await {
                            let _ = back.send_to(&b[..len], from).await;
                        }
                    });
                    ups.insert(from, u.clone());
                    u
                }
            };
            let _ = up.send(&buf[..len]).await;
        }
    });
    let fwd = tokio::spawn(async move {
        while let Ok((mut client, _)) = tcp.accept().await {
            tokio::spawn(async move {
                if let Ok(mut up) = TcpStream::connect(relay).await {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut up).await;
                }
            });
        }
    });
    Ok(UdpGate {
        addr,
        open,
        swallowed,
        _tasks: vec![AbortOnDrop(pump), AbortOnDrop(fwd)],
    })
}

/// The background QUIC probe of an edge on the TCP fallback used to be a
/// detached task: after the edge shut down (or its session was lost) a
/// probe still in its handshake carried on, and when UDP worked again it
/// registered a QUIC session for a node whose client was gone (or
/// superseded a fresher session). It is now owned by the session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quic_probe_dies_with_its_session() -> anyhow::Result<()> {
    let mut lab = Lab::start(1, |_| {}).await?;
    if let Some(e) = lab.edges.pop() {
        e.shutdown().await;
    }
    let gate = udp_gate(lab.relay.quic_addr()).await?;
    let mut cfg = edge_config(&lab.pki, 0, gate.addr)?;
    cfg.quic_fallback_after = Duration::from_millis(300);
    cfg.quic_probe_interval = Duration::from_millis(200);
    let edge = EdgeClient::spawn(cfg);
    edge.wait_connected(Duration::from_secs(10))
        .await
        .context("edge did not connect over the fallback")?;
    let row = &sessions(lab.admin_addr()).await?[0];
    assert_eq!(row.transport, "tcp", "{row:?}");
    let shared = lab.relay.shared().clone();
    let accepted = shared.metrics.sessions_accepted.load(Relaxed);
    // A probe is in its handshake once Initial packets arrive after the
    // session is up.
    let before = gate.swallowed.load(Relaxed);
    assert!(
        eventually(Duration::from_secs(5), || gate.swallowed.load(Relaxed)
            > before)
        .await,
        "no QUIC probe started"
    );
    edge.shutdown().await;
    gate.open.store(true, Relaxed);
    // QUIC retransmits its Initial after 1 s, 2 s, 4 s: a surviving probe
    // would get through within about 7 s and register.
    let registered = eventually(Duration::from_secs(8), || {
        shared.metrics.sessions_accepted.load(Relaxed) > accepted
    })
    .await;
    assert!(
        !registered,
        "a QUIC probe outlived its edge client and registered a session"
    );
    lab.stop().await;
    Ok(())
}

const TOKEN: &str = "hardening-token-0123456789";

/// The admin API over HTTPS (the relay's own certificate), read by the
/// route agent's HTTPS client trusting only the CA file; plain HTTP to it
/// gets nothing, and the token still matters.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_api_over_tls_and_the_route_agent() -> anyhow::Result<()> {
    let lab = Lab::start(1, |cfg| {
        cfg.admin_tls = Some(cfg.tls.clone());
        cfg.admin_token = Some(Secret::new(TOKEN));
    })
    .await?;
    let dir = std::env::temp_dir().join(format!("hardening-admin-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    lab.pki.write_to(&dir)?;
    let admin = lab.admin_addr();
    let agent = |token: &str, tls: bool| -> anyhow::Result<AgentConfig> {
        Ok(AgentConfig {
            admin,
            token: Some(Secret::new(token)),
            tls: if tls {
                Some(AgentTls::new(&dir.join("ca.pem"), "localhost")?)
            } else {
                None
            },
            interval: Duration::from_secs(1),
            proto: 250,
        })
    };
    let routes = relay_server::agent::fetch(&agent(TOKEN, true)?).await?;
    let want: relay_protocol::Cidr = "127.0.0.2/32".parse()?;
    assert!(routes.contains(&want), "{routes:?}");
    let e = relay_server::agent::fetch(&agent("wrong-token-0123456789", true)?)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("401"), "{e:#}");
    // Plain HTTP to the TLS listener: no HTTP answer, no routes.
    assert!(relay_server::agent::fetch(&agent(TOKEN, false)?)
        .await
        .is_err());
    assert!(admin_request(admin, "GET", "/healthz").await.is_err());
    // A CA that did not sign the relay's certificate is refused.
    let other = relay_transport::devcerts::DevPki::generate(&["localhost"], &["x"])?;
    let odir = dir.join("other");
    other.write_to(&odir)?;
    let mut bad = agent(TOKEN, false)?;
    bad.tls = Some(AgentTls::new(&odir.join("ca.pem"), "localhost")?);
    assert!(relay_server::agent::fetch(&bad).await.is_err());
    let _ = std::fs::remove_dir_all(&dir);
    lab.stop().await;
    Ok(())
}

/// An admin request head trickled a byte at a time used to hold its
/// connection and task for as long as the client liked (`axum::serve`
/// arms no header read timeout), as many connections as it liked; found
/// by `loadtest soak --phases badinput`. Now the head must arrive within
/// `limits.connect_header_timeout`, as a CONNECT head must.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trickled_admin_request_head_is_cut_off() -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let lab = Lab::start(1, |c| {
        c.limits.connect_header_timeout = Duration::from_millis(500);
    })
    .await?;
    let (mut r, mut w) = TcpStream::connect(lab.admin_addr()).await?.into_split();
    let t = Instant::now();
    let trickle = async {
        for b in b"GET /healthz HTTP/1.1\r\nX-Slow: "
            .iter()
            .chain(std::iter::repeat(&b'a'))
        {
            if w.write_all(&[*b]).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let mut got = Vec::new();
    tokio::select! {
        _ = r.read_to_end(&mut got) => {}
        _ = trickle => {}
        _ = tokio::time::sleep(Duration::from_secs(5)) => {}
    }
    let held = t.elapsed();
    assert!(
        held >= Duration::from_millis(400) && held < Duration::from_secs(3),
        "a trickled admin head was held {held:?} (bound 500 ms)"
    );
    assert!(got.is_empty(), "{}", String::from_utf8_lossy(&got));
    // A prompt request is served as before.
    let (code, _) = admin_request(lab.admin_addr(), "GET", "/healthz").await?;
    assert_eq!(code, 200);
    lab.stop().await;
    Ok(())
}
