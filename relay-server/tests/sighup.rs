//! The `relay-server` process reloads its certificate on SIGHUP: a renewed
//! certificate written over the old files is served to the next TLS
//! connection, a broken one is refused with the process still serving the
//! previous certificate. It takes a rotated admin token on SIGHUP too:
//! the token file replaced (a rename, as a Secret update is seen through
//! its path), the new token accepted and the old one refused, an empty
//! replacement changing nothing. (The file watcher is set to an hour so
//! only the signal can be what reloads.)

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use relay_transport::devcerts::DevPki;
use rustls::pki_types::{CertificateDer, ServerName};

const OLD: &str = "old-admin-token-0123456789";
const NEW: &str = "new-admin-token-0123456789";

/// The process, killed on drop (also when the test fails), and its files.
struct Relay {
    child: Child,
    dir: PathBuf,
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn signal(child: &Child, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .expect("run kill")
        .success();
    assert!(ok, "kill {sig} failed");
}

/// The leaf certificate a new TLS-over-TCP connection is served.
async fn served_leaf(pki: &DevPki, addr: &str) -> CertificateDer<'static> {
    let m = pki.node_material("edge-1").expect("edge material");
    let cfg = m
        .client_config(relay_protocol::ALPN)
        .expect("client config");
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(ServerName::try_from("localhost").expect("name"), tcp)
        .await
        .expect("tls handshake");
    tls.get_ref()
        .1
        .peer_certificates()
        .expect("peer certificates")[0]
        .clone()
}

fn leaf(pem: &str) -> CertificateDer<'static> {
    relay_transport::tls::certs_from_pem(pem.as_bytes(), "cert").expect("pem")[0].clone()
}

/// Starts `relay-server` with `config` (files in `dir`, removed with the
/// process); its ready file's contents once written.
fn start(config: &Path, dir: PathBuf) -> (Relay, serde_json::Value) {
    let ready = dir.join("ready.json");
    let child = Command::new(env!("CARGO_BIN_EXE_relay-server"))
        .args(["--config", &config.display().to_string()])
        .args(["--ready-file", &ready.display().to_string()])
        .env_remove("RELAY_CONFIG")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start relay-server");
    let relay = Relay { child, dir };
    let ready = wait_for(&ready);
    (relay, ready)
}

fn wait_for(path: &Path) -> serde_json::Value {
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(20) {
        if let Ok(text) = std::fs::read_to_string(path) {
            return serde_json::from_str(&text).expect("ready file is JSON");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("no ready file within 20 s");
}

#[tokio::test]
async fn sighup_reloads_the_certificate_and_a_broken_one_changes_nothing() {
    relay_transport::tls::install_default_provider();
    let dir = std::env::temp_dir().join(format!("relay-sighup-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let pki = DevPki::generate(&["localhost", "127.0.0.1"], &["edge-1"]).expect("pki");
    pki.write_to(&dir).expect("write pki");
    let d = dir.display();
    let config = dir.join("relay.toml");
    std::fs::write(
        &config,
        format!(
            "[listen]\nquic = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n\
             [tls]\ncert = \"{d}/relay.pem\"\nkey = \"{d}/relay-key.pem\"\nclient_ca = \"{d}/ca.pem\"\n\
             reload_interval = \"1h\"\n\
             [nodes]\n\"edge-1\" = [\"10.244.7.0/24\"]\n"
        ),
    )
    .expect("write config");
    let (relay, ready) = start(&config, dir);
    let addr = ready["quic"].as_str().expect("quic address").to_string();
    assert_eq!(served_leaf(&pki, &addr).await, leaf(&pki.relay.cert));

    // Renewed: new key and certificate over the old files, then SIGHUP.
    let renewed = pki.issue_relay(&["localhost", "127.0.0.1"]).expect("renew");
    std::fs::write(relay.dir.join("relay-key.pem"), &renewed.key).expect("write key");
    std::fs::write(relay.dir.join("relay.pem"), &renewed.cert).expect("write cert");
    signal(&relay.child, "-HUP");
    let t = Instant::now();
    let mut served = served_leaf(&pki, &addr).await;
    while served != leaf(&renewed.cert) && t.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(50)).await;
        served = served_leaf(&pki, &addr).await;
    }
    assert_eq!(served, leaf(&renewed.cert), "SIGHUP did not reload");

    // Broken: a key that is not the certificate's. SIGHUP must keep the
    // renewed certificate and the process.
    std::fs::write(relay.dir.join("relay-key.pem"), &pki.nodes[0].1.key).expect("write key");
    signal(&relay.child, "-HUP");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(served_leaf(&pki, &addr).await, leaf(&renewed.cert));
    let mut child = relay;
    assert!(
        child.child.try_wait().expect("try_wait").is_none(),
        "the relay exited"
    );
    signal(&child.child, "-TERM");
    let t = Instant::now();
    while child.child.try_wait().expect("try_wait").is_none()
        && t.elapsed() < Duration::from_secs(10)
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        child.child.try_wait().expect("try_wait").is_some(),
        "no exit on SIGTERM"
    );
}

/// Written apart, then renamed over `path`.
fn replace(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).expect("write");
    std::fs::rename(&tmp, path).expect("rename");
}

/// The status of `GET /v1/sessions` with `token`, over a new connection.
async fn status_with(addr: &str, token: &str) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(
        format!(
            "GET /v1/sessions HTTP/1.1\r\nHost: admin\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .expect("write");
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut out))
        .await
        .expect("answer in time")
        .expect("read");
    out.split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn sighup_takes_a_rotated_admin_token_and_an_empty_one_changes_nothing() {
    let dir = std::env::temp_dir().join(format!("relay-token-sighup-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let pki = DevPki::generate(&["localhost", "127.0.0.1"], &[]).expect("pki");
    pki.write_to(&dir).expect("write pki");
    let token = dir.join("token");
    std::fs::write(&token, format!("{OLD}\n")).expect("write token");
    let d = dir.display();
    let config = dir.join("relay.toml");
    std::fs::write(
        &config,
        format!(
            "[listen]\nquic = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\nhealth = \"127.0.0.1:0\"\n\
             [tls]\ncert = \"{d}/relay.pem\"\nkey = \"{d}/relay-key.pem\"\nclient_ca = \"{d}/ca.pem\"\n\
             reload_interval = \"1h\"\n\
             [admin]\ntoken_file = \"{d}/token\"\ntoken_grace = \"2s\"\n"
        ),
    )
    .expect("write config");
    let (relay, ready) = start(&config, dir);
    let admin = ready["admin"].as_str().expect("admin address").to_string();
    assert_eq!(status_with(&admin, OLD).await, 200);
    assert_eq!(status_with(&admin, NEW).await, 401);

    replace(&token, &format!("{NEW}\n"));
    let t = Instant::now();
    signal(&relay.child, "-HUP");
    while status_with(&admin, NEW).await != 200 {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "SIGHUP did not reload the token"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // admin.token_grace (2s here): the old token still accepted, then
    // refused.
    let old = status_with(&admin, OLD).await;
    assert!(
        old == 200 || t.elapsed() >= Duration::from_secs(2),
        "the old token refused within its grace ({:?})",
        t.elapsed()
    );
    while status_with(&admin, OLD).await != 401 {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the old token never revoked"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        t.elapsed() >= Duration::from_secs(2),
        "revoked before its grace: {:?}",
        t.elapsed()
    );

    // Empty: refused, the new token kept, the process still up.
    replace(&token, "");
    signal(&relay.child, "-HUP");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(status_with(&admin, NEW).await, 200);
    let mut relay = relay;
    assert!(
        relay.child.try_wait().expect("try_wait").is_none(),
        "the relay exited"
    );
}
