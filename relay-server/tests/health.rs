//! The probe listener (`listen.health`, relay-server/src/health.rs) with
//! real sockets: kubelet's probes are answered while every admin TLS
//! handshake slot is held by idle connections (the admin API's bounds are
//! the port's, shared with whoever reaches it), and while more idle
//! connections than its own limit are held to the probe listener itself;
//! its answers are the admin API's.

use std::net::SocketAddr;
use std::time::Duration;

use relay_server::{Relay, RelayConfig, StartError};
use relay_transport::devcerts::DevPki;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Generous: a prompt answer takes milliseconds; kubelet's probe timeout
/// in the manifests is 3 s.
const ANSWER_BOUND: Duration = Duration::from_secs(5);

fn config() -> (RelayConfig, DevPki) {
    relay_transport::tls::install_default_provider();
    let pki = DevPki::generate(&["localhost"], &[]).expect("pki");
    let cfg = RelayConfig::loopback(pki.relay_material().expect("material"));
    (cfg, pki)
}

/// `GET path` over plain HTTP; `(status, body)`.
async fn get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: probe\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut out = String::new();
    s.read_to_string(&mut out).await?;
    let status = out
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    Ok((status, body.to_string()))
}

/// `GET path` on the probe listener, answered within [`ANSWER_BOUND`].
async fn probe(addr: SocketAddr, path: &str) -> (u16, String) {
    tokio::time::timeout(ANSWER_BOUND, get(addr, path))
        .await
        .unwrap_or_else(|_| {
            panic!("{path} on the probe listener not answered within {ANSWER_BOUND:?}")
        })
        .expect("probe request")
}

/// `n` connections to `addr`, held open and silent.
async fn hold_idle(addr: SocketAddr, n: usize) -> Vec<TcpStream> {
    let mut held = Vec::with_capacity(n);
    for _ in 0..n {
        held.push(TcpStream::connect(addr).await.expect("idle connection"));
    }
    held
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_are_answered_while_idle_clients_hold_every_admin_slot() {
    let (mut cfg, pki) = config();
    // The admin API as in the manifests: HTTPS, through its 64 bounded
    // handshake slots.
    cfg.admin_tls = Some(pki.relay_material().expect("material"));
    let relay = Relay::spawn(cfg).await.expect("relay");
    let admin = relay.admin_addr().expect("admin");
    let health = relay.health_addr().expect("probe listener");
    let _held = hold_idle(admin, 80).await;
    // The admin port is saturated: another connection is neither answered
    // nor closed (with a slot free, the TLS acceptor would read this
    // non-TLS request and close the connection at once).
    let mut s = TcpStream::connect(admin).await.expect("connect admin");
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: probe\r\n\r\n")
        .await
        .expect("write");
    let mut buf = [0u8; 64];
    assert!(
        tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf))
            .await
            .is_err(),
        "the admin port is not saturated: the test shows nothing"
    );
    // kubelet's probes, on their own listener, are answered.
    assert_eq!(probe(health, "/healthz").await, (200, "ok\n".into()));
    let (code, body) = probe(health, "/readyz").await;
    assert_eq!(code, 200, "{body}");
    assert!(body.starts_with("ready"), "{body}");
    relay.shutdown(Duration::ZERO).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_are_answered_past_the_probe_listeners_own_limit() {
    let (cfg, _pki) = config();
    let relay = Relay::spawn(cfg).await.expect("relay");
    let health = relay.health_addr().expect("probe listener");
    // Far more idle connections than its slots: were a new connection to
    // wait for a slot, it would queue behind all of them, each slot freed
    // only by the head timeout.
    let n = relay_server::health::MAX_CONNECTIONS * 8;
    let _held = hold_idle(health, n).await;
    assert_eq!(probe(health, "/healthz").await, (200, "ok\n".into()));
    let (code, body) = probe(health, "/readyz").await;
    assert_eq!(code, 200, "{body}");
    relay.shutdown(Duration::ZERO).await;
}

#[tokio::test]
async fn the_probe_listener_answers_as_the_admin_api_and_serves_nothing_else() {
    let (cfg, _pki) = config();
    let relay = Relay::spawn(cfg).await.expect("relay");
    let admin = relay.admin_addr().expect("admin");
    let health = relay.health_addr().expect("probe listener");
    for path in ["/healthz", "/readyz"] {
        let want = get(admin, path).await.expect("admin");
        assert_eq!(want.0, 200, "{path}: {}", want.1);
        assert_eq!(probe(health, path).await, want, "{path}");
    }
    for path in ["/v1/sessions", "/v1/routes", "/metrics"] {
        assert_eq!(probe(health, path).await.0, 404, "{path}");
        assert_eq!(get(admin, path).await.expect("admin").0, 200, "{path}");
    }
    relay.shutdown(Duration::ZERO).await;
}

#[tokio::test]
async fn the_probe_listener_is_loopback_only_and_its_default_address_may_be_taken() {
    let (base, _pki) = config();
    let mut open = base.clone();
    open.health_listen = Some(SocketAddr::from(([0, 0, 0, 0], 0)));
    match Relay::spawn(open).await {
        Err(StartError::Config(e)) => assert_eq!(e.field, "listen.health", "{e}"),
        Err(e) => panic!("wrong error {e}"),
        Ok(_) => panic!("a probe listener on 0.0.0.0 was accepted"),
    }
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let mut set = base.clone();
    set.health_listen = Some(taken.local_addr().expect("addr"));
    match Relay::spawn(set.clone()).await {
        Err(StartError::Bind { what, .. }) => assert_eq!(what, "health"),
        Err(e) => panic!("wrong error {e}"),
        Ok(_) => panic!("started without its configured probe listener"),
    }
    // The file's default address, taken: the relay starts without it.
    set.health_listen_defaulted = true;
    let relay = Relay::spawn(set).await.expect("relay");
    assert_eq!(relay.health_addr(), None);
    relay.shutdown(Duration::ZERO).await;
}
