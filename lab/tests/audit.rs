//! The CONNECT audit log: one `tracing` event with target `audit` per
//! CONNECT connection, naming the client (certificate subject, Unix
//! credentials or address), the target, the outcome and the bytes each
//! way. Its own test binary: it installs a process-wide subscriber that
//! records those events.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use relay_lab::{connect_via, edge_ip, spawn_echo, spawn_http, Lab};
use relay_transport::devcerts::DevPki;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tracing::field::{Field, Visit};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::Layer;

type Line = HashMap<String, String>;

/// Records every event with target `audit` as field → value.
#[derive(Clone, Default)]
struct Recorder(Arc<Mutex<Vec<Line>>>);

struct Fields<'a>(&'a mut Line);

impl Visit for Fields<'_> {
    fn record_debug(&mut self, f: &Field, v: &dyn std::fmt::Debug) {
        self.0.insert(f.name().to_string(), format!("{v:?}"));
    }
    fn record_str(&mut self, f: &Field, v: &str) {
        self.0.insert(f.name().to_string(), v.to_string());
    }
    fn record_u64(&mut self, f: &Field, v: u64) {
        self.0.insert(f.name().to_string(), v.to_string());
    }
}

impl<S: tracing::Subscriber> Layer<S> for Recorder {
    fn on_event(&self, e: &tracing::Event<'_>, _: Context<'_, S>) {
        if e.metadata().target() != "audit" {
            return;
        }
        assert_eq!(*e.metadata().level(), tracing::Level::INFO);
        let mut line = Line::new();
        e.record(&mut Fields(&mut line));
        if let Ok(mut v) = self.0.lock() {
            v.push(line);
        }
    }
}

impl Recorder {
    /// Waits (bounded) for an audit line matching `f` and returns it.
    async fn wait_for(&self, what: &str, f: impl Fn(&Line) -> bool) -> Line {
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(10) {
            if let Some(l) = self.0.lock().unwrap().iter().find(|l| f(l)) {
                return l.clone();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("no audit line for {what}: {:?}", self.0.lock().unwrap());
    }
}

fn get<'a>(l: &'a Line, k: &str) -> &'a str {
    l.get(k).map(String::as_str).unwrap_or("")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_connect_leaves_one_audit_line() -> anyhow::Result<()> {
    let rec = Recorder::default();
    tracing::subscriber::set_global_default(tracing_subscriber::registry().with(rec.clone()))?;
    let dir = std::env::temp_dir().join(format!("audit-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let sock = dir.join("connect.sock");
    let apiserver_pki = DevPki::generate(&["localhost"], &["kube-apiserver"])?;
    let mut lab = Lab::start(1, |c| c.connect_unix = Some(sock.clone())).await?;
    let (echo, _e) = spawn_echo(SocketAddr::new(edge_ip(0), 0)).await?;

    // Plain TCP, tunnelled: 5 bytes up, 5 back.
    let mut s = connect_via(lab.connect_addr(), &echo.to_string()).await?;
    let client = format!("addr:{}", s.local_addr()?);
    s.write_all(b"hello").await?;
    let mut back = [0u8; 5];
    s.read_exact(&mut back).await?;
    s.shutdown().await?;
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).await?;
    drop(s);
    let l = rec
        .wait_for("the tunnelled CONNECT", |l| get(l, "client") == client)
        .await;
    assert_eq!(get(&l, "target"), echo.to_string(), "{l:?}");
    assert_eq!(get(&l, "node"), "edge-0", "{l:?}");
    assert_eq!(get(&l, "dst"), echo.to_string(), "{l:?}");
    assert_eq!(get(&l, "code"), "200", "{l:?}");
    assert_eq!(get(&l, "outcome"), "ok", "{l:?}");
    assert_eq!(get(&l, "bytes_up"), "5", "{l:?}");
    assert_eq!(get(&l, "bytes_down"), "5", "{l:?}");
    assert!(l.contains_key("duration_ms"), "{l:?}");

    // Refused: no session serves the target.
    let mut s = TcpStream::connect(lab.connect_addr()).await?;
    let client = format!("addr:{}", s.local_addr()?);
    s.write_all(b"CONNECT 127.0.0.250:80 HTTP/1.1\r\n\r\n")
        .await?;
    let mut all = Vec::new();
    s.read_to_end(&mut all).await?;
    let l = rec
        .wait_for("the refused CONNECT", |l| get(l, "client") == client)
        .await;
    assert_eq!(
        (get(&l, "code"), get(&l, "outcome"), get(&l, "target")),
        ("502", "no_route", "127.0.0.250:80"),
        "{l:?}"
    );
    assert_eq!(get(&l, "bytes_up"), "0", "{l:?}");

    // Not CONNECT at all: still one line.
    let mut s = TcpStream::connect(lab.connect_addr()).await?;
    let client = format!("addr:{}", s.local_addr()?);
    s.write_all(b"GET / HTTP/1.1\r\n\r\n").await?;
    s.read_to_end(&mut all).await?;
    let l = rec
        .wait_for("the GET", |l| get(l, "client") == client)
        .await;
    assert_eq!((get(&l, "code"), get(&l, "outcome")), ("405", "method"));

    // Unix socket: the kernel's peer credentials.
    let (web, _w) = spawn_http(SocketAddr::new(edge_ip(0), 0), "edge-0").await?;
    let mut s = tokio::net::UnixStream::connect(&sock).await?;
    let target = format!("edge-0:{}", web.port());
    s.write_all(
        format!("CONNECT {target} HTTP/1.1\r\n\r\nGET / HTTP/1.1\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    )
    .await?;
    let mut all = String::new();
    s.read_to_string(&mut all).await?;
    // The line is written when the connection ends, both ways.
    drop(s);
    let me = format!("unix:uid={},", nix::unistd::getuid());
    let l = rec
        .wait_for("the Unix-socket CONNECT", |l| get(l, "target") == target)
        .await;
    assert!(get(&l, "client").starts_with(&me), "{l:?}");
    assert!(
        get(&l, "client").contains(&format!("pid={}", std::process::id())),
        "{l:?}"
    );
    assert_eq!(
        (get(&l, "code"), get(&l, "outcome")),
        ("200", "ok"),
        "{l:?}"
    );
    assert_eq!(get(&l, "dst"), format!("{}:{}", edge_ip(0), web.port()));

    // TLS with a client certificate: its subject.
    for e in lab.edges.drain(..) {
        e.shutdown().await;
    }
    lab.relay.shutdown(Duration::from_secs(1)).await;
    let tls_for_connect = apiserver_pki.relay_material()?;
    let lab = Lab::start(1, |c| c.connect_tls = Some(tls_for_connect)).await?;
    let client_cfg = apiserver_pki
        .node_material("kube-apiserver")?
        .client_config(b"http/1.1")?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client_cfg));
    let tcp = TcpStream::connect(lab.connect_addr()).await?;
    let mut tls = connector.connect("localhost".try_into()?, tcp).await?;
    tls.write_all(b"CONNECT tls-target.invalid:443 HTTP/1.1\r\n\r\n")
        .await?;
    let mut all = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut all)).await?;
    drop(tls);
    let l = rec
        .wait_for("the TLS CONNECT", |l| {
            get(l, "target") == "tls-target.invalid:443"
        })
        .await;
    assert!(
        get(&l, "client").starts_with("cert:") && get(&l, "client").contains("kube-apiserver"),
        "{l:?}"
    );
    assert_eq!(get(&l, "code"), "502", "{l:?}");
    lab.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
