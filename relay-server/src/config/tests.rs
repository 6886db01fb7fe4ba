//! Tests of the configuration: field-naming errors, the exposure rules
//! for files and for configs built by code, masked secrets.

use super::*;

#[test]
fn unknown_fields_and_bad_values_name_the_field() {
    let e = FileConfig::parse("[listen]\nquic = \"0.0.0.0:1\"\nbogus = 1\n").unwrap_err();
    assert!(e.to_string().contains("bogus"), "{e}");
    let e = FileConfig::parse(
        "[listen]\n[tls]\ncert=\"a\"\nkey=\"b\"\nclient_ca=\"c\"\n[nodes]\nedge-1 = [\"10.0.0.1/24\"]\n",
    )
    .unwrap_err();
    assert!(e.to_string().contains("host bits"), "{e}");
    let f = FileConfig::parse(
        "[listen]\n[tls]\ncert=\"/nonexistent/a\"\nkey=\"b\"\nclient_ca=\"c\"\n[limits]\nhandshake_timeout=\"0s\"\n",
    )
    .unwrap();
    let e = f.into_runtime().unwrap_err();
    assert_eq!(e.field, "limits.handshake_timeout");
    let f =
        FileConfig::parse("[listen]\n[tls]\ncert=\"/nonexistent/a\"\nkey=\"b\"\nclient_ca=\"c\"\n")
            .unwrap();
    let e = f.into_runtime().unwrap_err();
    assert_eq!(e.field, "tls");
    assert!(e.to_string().contains("/nonexistent/a"), "{e}");
}

/// Writes a dev PKI and a token into a fresh directory; returns the
/// `[tls]` and `[admin] token_file` lines pointing at them.
fn files() -> (PathBuf, String) {
    let dir = std::env::temp_dir().join(format!(
        "relay-config-test-{}-{}",
        std::process::id(),
        rand::random::<u32>()
    ));
    let pki = relay_transport::devcerts::DevPki::generate(&["localhost"], &["edge-1"]).unwrap();
    pki.write_to(&dir).unwrap();
    std::fs::write(dir.join("token"), "0123456789abcdef0123\n").unwrap();
    let d = dir.display();
    let tls = format!(
        "[tls]\ncert=\"{d}/relay.pem\"\nkey=\"{d}/relay-key.pem\"\nclient_ca=\"{d}/ca.pem\"\n"
    );
    (dir, tls)
}

fn load(listen: &str, tls: &str, admin: &str) -> Result<RelayConfig, ConfigError> {
    FileConfig::parse(&format!("[listen]\n{listen}\n{tls}[admin]\n{admin}\n"))?.into_runtime()
}

#[test]
fn insecure_exposure_is_refused_unless_allowed() {
    relay_transport::tls::install_default_provider();
    let (dir, tls) = files();
    let token = format!("token_file = \"{}/token\"", dir.display());
    // Defaults: admin on loopback, plaintext, no token: fine.
    let c = load("", &tls, "").unwrap();
    assert!(c.admin_tls.is_none());
    assert!(c.connect_cloud, "CONNECT reaches the cloud by default");
    assert!(
        !load("connect_cloud = false", &tls, "")
            .unwrap()
            .connect_cloud
    );
    // Plaintext CONNECT off loopback.
    let e = load("connect = \"0.0.0.0:8131\"", &tls, "").unwrap_err();
    assert_eq!(e.field, "listen.connect", "{e}");
    load("connect = \"127.0.0.1:8131\"", &tls, "").unwrap();
    load(
        "connect = \"0.0.0.0:8131\"\nallow_insecure_connect = true",
        &tls,
        "",
    )
    .unwrap();
    // Admin off loopback: a token is required ...
    let e = load("admin = \"0.0.0.0:9090\"", &tls, "").unwrap_err();
    assert_eq!(e.field, "admin.token_file", "{e}");
    // ... and TLS, which is then on by default (the relay's certificate).
    let c = load("admin = \"0.0.0.0:9090\"", &tls, &token).unwrap();
    assert!(c.admin_tls.is_some());
    let e = load(
        "admin = \"0.0.0.0:9090\"",
        &tls,
        &format!("{token}\ntls = false"),
    )
    .unwrap_err();
    assert_eq!(e.field, "admin.tls", "{e}");
    // Explicitly allowed.
    let c = load(
        "admin = \"0.0.0.0:9090\"\nallow_insecure_admin = true",
        &tls,
        "tls = false",
    )
    .unwrap();
    assert!(c.admin_tls.is_none() && c.admin_token.is_none());
    // Its own certificate; both halves or neither.
    let d = dir.display();
    let own = format!("{token}\ncert = \"{d}/edge-1.pem\"\nkey = \"{d}/edge-1-key.pem\"");
    load("admin = \"0.0.0.0:9090\"", &tls, &own).unwrap();
    let half = format!("{token}\ncert = \"{d}/edge-1.pem\"");
    let e = load("admin = \"0.0.0.0:9090\"", &tls, &half).unwrap_err();
    assert_eq!(e.field, "admin.cert", "{e}");
    // Built by code: the same rules.
    let mut c = load("", &tls, "").unwrap();
    c.admin_listen = Some(SocketAddr::from(([10, 0, 0, 1], 9090)));
    assert_eq!(c.validate().unwrap_err().field, "admin.token_file");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `admin.read_token_file`: a second token of its own, only beside the
/// full one; its file read as the full token's is, but an absent one is
/// no read token rather than a relay that does not start.
#[test]
fn a_read_only_token_needs_the_full_one_and_differs_from_it() {
    relay_transport::tls::install_default_provider();
    let (dir, tls) = files();
    let d = dir.display();
    std::fs::write(dir.join("read-token"), "read-token-0123456789\n").unwrap();
    std::fs::write(dir.join("short"), "short\n").unwrap();
    let (full, read) = (
        format!("token_file = \"{d}/token\""),
        format!("read_token_file = \"{d}/read-token\""),
    );
    // Off by default: behaviour unchanged.
    let c = load("", &tls, &full).unwrap();
    assert!(c.admin_token.is_some() && c.admin_read_token.is_none());
    let c = load("", &tls, &format!("{full}\n{read}")).unwrap();
    assert_eq!(
        c.admin_read_token.as_ref().map(Secret::expose),
        Some("read-token-0123456789")
    );
    // Alone, it would guard nothing.
    let e = load("", &tls, &read).unwrap_err();
    assert_eq!(e.field, "admin.read_token_file", "{e}");
    // The same token as the full one.
    let same = format!("{full}\nread_token_file = \"{d}/token\"");
    let e = load("", &tls, &same).unwrap_err();
    assert_eq!(e.field, "admin.read_token_file", "{e}");
    assert!(e.to_string().contains("of its own"), "{e}");
    // Short: refused.
    let e = load(
        "",
        &tls,
        &format!("{full}\nread_token_file = \"{d}/short\""),
    )
    .unwrap_err();
    assert_eq!(e.field, "admin.read_token_file", "{e}");
    // Absent (its optional Secret not created, an upgrade that skipped
    // the step): the relay starts without one, so its tunnels stay up;
    // read-token holders get 401.
    let c = load(
        "",
        &tls,
        &format!("{full}\nread_token_file = \"{d}/missing\""),
    )
    .unwrap();
    assert!(c.admin_token.is_some() && c.admin_read_token.is_none());
    let _ = std::fs::remove_dir_all(&dir);
}

/// `listen.health`: on by default at 127.0.0.1:9470 (the manifests'
/// probes), any loopback address, never another, not even with
/// `allow_insecure_admin`.
#[test]
fn the_probe_listener_is_on_by_default_and_loopback_only() {
    relay_transport::tls::install_default_provider();
    let (dir, tls) = files();
    let c = load("", &tls, "").unwrap();
    assert_eq!(c.health_listen, Some(crate::health::DEFAULT_ADDR));
    assert_eq!(
        crate::health::DEFAULT_ADDR,
        SocketAddr::from(([127, 0, 0, 1], 9470))
    );
    assert!(c.health_listen_defaulted);
    let c = load("health = \"[::1]:9471\"", &tls, "").unwrap();
    assert_eq!(c.health_listen, Some("[::1]:9471".parse().unwrap()));
    assert!(!c.health_listen_defaulted);
    for open in ["0.0.0.0:9470", "10.0.0.1:9470", "[::]:9470"] {
        for extra in ["", "\nallow_insecure_admin = true"] {
            let e = load(&format!("health = \"{open}\"{extra}"), &tls, "").unwrap_err();
            assert_eq!(e.field, "listen.health", "{open}: {e}");
        }
    }
    // Built by code: the same rule.
    let mut c = load("", &tls, "").unwrap();
    c.health_listen = Some(SocketAddr::from(([10, 0, 0, 1], 9470)));
    assert_eq!(c.validate().unwrap_err().field, "listen.health");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn secrets_are_masked() {
    assert_eq!(format!("{:?}", Secret::new("hunter2")), "MASKED");
}

#[test]
fn tcp_fallback_mss_defaults_to_a_small_mtu_safe_size() {
    relay_transport::tls::install_default_provider();
    let (_dir, tls) = files();
    let mss = |listen: &str| load(listen, &tls, "").map(|c| c.tcp_fallback_mss);
    assert_eq!(mss("").unwrap(), Some(1220));
    assert_eq!(mss("tcp_fallback_mss = 0").unwrap(), None);
    assert_eq!(mss("tcp_fallback_mss = 1400").unwrap(), Some(1400));
    let e = mss("tcp_fallback_mss = 100").unwrap_err();
    assert_eq!(e.field, "listen.tcp_fallback_mss", "{e}");
    assert!(e.to_string().contains("536 to 9000"), "{e}");
    // A config built by code is held to the same range (0 is `None` there).
    let mut c = load("", &tls, "").unwrap();
    c.tcp_fallback_mss = Some(0);
    assert_eq!(c.validate().unwrap_err().field, "listen.tcp_fallback_mss");
    // The fallback's own port: any but 0, which no edge could be told.
    let port = |listen: &str| load(listen, &tls, "").map(|c| c.tcp_fallback_port);
    assert_eq!(port("").unwrap(), None);
    assert_eq!(port("tcp_fallback_port = 443").unwrap(), Some(443));
    let e = port("tcp_fallback_port = 0").unwrap_err();
    assert_eq!(e.field, "listen.tcp_fallback_port", "{e}");
}

/// `connect_tls.crl` is read at start (and kept for reloading); a file
/// that holds no CRL is refused at start, naming the section and its
/// `crl`, the relay's `[tls]` untouched.
#[test]
fn connect_tls_crl_is_loaded_or_refused_at_start() {
    relay_transport::tls::install_default_provider();
    let (dir, tls) = files();
    let d = dir.display();
    let pki = relay_transport::devcerts::DevPki::generate(&["localhost"], &["edge-1"]).unwrap();
    // A list signed by another CA than the files' is still a readable
    // list; what matters here is that it is read and kept.
    std::fs::write(dir.join("crl.pem"), pki.crl_revoking(&[]).unwrap()).unwrap();
    std::fs::write(dir.join("not-a-crl.pem"), "nothing here\n").unwrap();
    let section = |crl: &str| {
        format!(
            "{tls}[connect_tls]\ncert=\"{d}/relay.pem\"\nkey=\"{d}/relay-key.pem\"\nclient_ca=\"{d}/ca.pem\"\n{crl}"
        )
    };
    let listen = "connect = \"127.0.0.1:8131\"";
    let c = load(listen, &section(&format!("crl=\"{d}/crl.pem\"\n")), "").unwrap();
    assert_eq!(c.connect_tls_crls.len(), 1);
    assert!(c.tls_crls.is_empty(), "[tls] has no crl of its own");
    let files = c.connect_tls_files.expect("reload paths");
    assert_eq!(files.crl, Some(dir.join("crl.pem")));
    let c = load(listen, &section(""), "").unwrap();
    assert!(c.connect_tls_crls.is_empty());
    let e = load(
        listen,
        &section(&format!("crl=\"{d}/not-a-crl.pem\"\n")),
        "",
    )
    .unwrap_err();
    assert_eq!(e.field, "connect_tls (or connect_tls.crl)", "{e}");
    assert!(e.to_string().contains("not-a-crl.pem"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `admin.token_grace`: 3m by default, `0s` allowed (refused at once), at
/// most 1h; handed to the token files' reloader.
#[test]
fn the_admin_token_grace_defaults_to_3m_and_is_at_most_1h() {
    relay_transport::tls::install_default_provider();
    let (dir, tls) = files();
    let d = dir.display();
    let full = format!("token_file = \"{d}/token\"");
    let grace = |c: &crate::RelayConfig| {
        c.admin_token_files
            .as_ref()
            .map(crate::token_reload::AdminTokens::grace)
    };
    let c = load("", &tls, &full).unwrap();
    assert_eq!(grace(&c), Some(std::time::Duration::from_secs(180)));
    let c = load("", &tls, &format!("{full}\ntoken_grace = \"0s\"")).unwrap();
    assert_eq!(grace(&c), Some(std::time::Duration::ZERO));
    let c = load("", &tls, &format!("{full}\ntoken_grace = \"1h\"")).unwrap();
    assert_eq!(grace(&c), Some(std::time::Duration::from_secs(3600)));
    let e = load("", &tls, &format!("{full}\ntoken_grace = \"61m\"")).unwrap_err();
    assert_eq!(e.field, "admin.token_grace", "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}
