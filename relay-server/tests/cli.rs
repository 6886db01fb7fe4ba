//! The `relay-server` binary's command line: `--help` works, and
//! `check-config` on a bad file fails with a message naming the field.
//! (Being an integration test of this package, it also makes `cargo test
//! --workspace` build `target/<profile>/relay-server`, which the lab's
//! fault tests run as a real process.)

use std::path::PathBuf;
use std::process::{Command, Output};

fn relay_server(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_relay-server"))
        .args(args)
        .env_remove("RELAY_CONFIG")
        .output()
        .expect("run relay-server")
}

/// A fresh directory for this test's files.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("relay-cli-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create scratch dir");
    dir
}

/// A dev PKI and a minimal static `relay.toml` (one node) in `dir`; the
/// config's path.
fn static_config(dir: &std::path::Path) -> std::path::PathBuf {
    let pki =
        relay_transport::devcerts::DevPki::generate(&["localhost"], &["edge-1"]).expect("pki");
    pki.write_to(dir).expect("write pki");
    let file = dir.join("relay.toml");
    let text = format!(
        "[listen]\nquic = \"127.0.0.1:0\"\n[tls]\ncert = \"{d}/relay.pem\"\nkey = \"{d}/relay-key.pem\"\nclient_ca = \"{d}/ca.pem\"\n[nodes]\n\"edge-1\" = [\"10.244.7.0/24\"]\n",
        d = dir.display()
    );
    std::fs::write(&file, text).expect("write config");
    file
}

/// `relay-server --config F check-config` (`--config` is an option of the
/// command, not of the subcommand).
fn check_config(file: &std::path::Path) -> Output {
    relay_server(&[
        "--config",
        file.to_str().expect("utf-8 path"),
        "check-config",
    ])
}

#[test]
fn help_exits_zero() {
    let out = relay_server(&["--help"]);
    assert!(out.status.success(), "--help: {:?}", out);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("check-config"), "{text}");
}

/// Runs `check-config` on `text` and expects a failure naming `field`.
fn rejected(name: &str, text: &str, field: &str) {
    let dir = scratch(name);
    let file = dir.join("relay.toml");
    std::fs::write(&file, text).expect("write config");
    let out = check_config(&file);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(!out.status.success(), "bad config accepted: {out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(field), "error does not name {field}: {err}");
}

#[test]
fn check_config_names_the_bad_field() {
    // Valid TOML and valid fields, but a keep-alive no shorter than the
    // idle timeout: rejected before any certificate is read.
    rejected(
        "keepalive",
        "[listen]\n\
         [tls]\ncert = \"relay.pem\"\nkey = \"relay-key.pem\"\nclient_ca = \"ca.pem\"\n\
         [quic]\nkeepalive = \"30s\"\nidle_timeout = \"20s\"\n",
        "quic.keepalive",
    );
    // An edge-only capture field in the relay's file.
    rejected(
        "udp-flows",
        "[listen]\n\
         [tls]\ncert = \"relay.pem\"\nkey = \"relay-key.pem\"\nclient_ca = \"ca.pem\"\n\
         [capture]\nenabled = true\nmax_udp_flows = 64\n",
        "capture.max_udp_flows",
    );
    rejected(
        "unknown",
        "[listen]\nquic = \"0.0.0.0:8443\"\nbogus_field = 1\n",
        "bogus_field",
    );
}

#[test]
fn config_may_follow_the_subcommand_and_a_good_config_passes() {
    // The form README.md shows: `relay-server check-config --config F`.
    let dir = scratch("good");
    let file = static_config(&dir);
    let out = relay_server(&[
        "check-config",
        "--config",
        file.to_str().expect("utf-8 path"),
    ]);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(out.status.success(), "good config refused: {out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("ok (relay_id relay-0, 1 nodes)"),
        "{out:?}"
    );
}

/// The route agent refuses to send its token in clear to an admin API
/// off loopback (it used to, over plain HTTP), before touching the network
/// or any route.
#[test]
fn route_agent_refuses_a_token_over_plain_http() {
    let dir = scratch("agent");
    let token = dir.join("token");
    std::fs::write(&token, "0123456789abcdef0123\n").expect("write token");
    let out = relay_server(&[
        "route-agent",
        "--admin",
        "192.0.2.1:9090",
        "--via",
        "192.0.2.1",
        "--token-file",
        token.to_str().expect("utf-8 path"),
    ]);
    assert!(!out.status.success(), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--ca-file"), "{err}");
    // A CA file that does not exist is reported, naming the flag.
    let out = relay_server(&[
        "route-agent",
        "--admin",
        "192.0.2.1:9090",
        "--via",
        "192.0.2.1",
        "--token-file",
        token.to_str().expect("utf-8 path"),
        "--ca-file",
        "/nonexistent/ca.pem",
    ]);
    assert!(!out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--ca-file"),
        "{out:?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// `dev-certs --ca-key` without `--node`: the PKI of a certificate
/// bootstrap install (deploy/README.md), where edges get their
/// certificates from the relay. The CA key is written 0600, is not
/// overwritten, and a relay.toml whose `[bootstrap]` uses it passes
/// `check-config` (which loads the issuer and checks it is in
/// `tls.client_ca`).
#[test]
fn dev_certs_can_write_the_issuing_ca_key_for_the_bootstrap() {
    use std::os::unix::fs::PermissionsExt;
    let dir = scratch("issuer");
    let pki = dir.join("pki");
    let pki_s = pki.to_str().expect("utf-8 path");
    let out = relay_server(&["dev-certs", "--out", pki_s, "--ca-key"]);
    assert!(out.status.success(), "{out:?}");
    let key = pki.join("ca-key.pem");
    let mode = std::fs::metadata(&key)
        .expect("ca-key.pem written")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "ca-key.pem mode {mode:o}");
    assert!(!pki.join("edge-1.pem").exists());
    // Without --ca-key no key is written; with it, an existing one is kept.
    let plain = dir.join("plain");
    let out = relay_server(&["dev-certs", "--out", plain.to_str().expect("utf-8")]);
    assert!(
        out.status.success() && !plain.join("ca-key.pem").exists(),
        "{out:?}"
    );
    let before = std::fs::read(&key).expect("read key");
    std::fs::remove_file(pki.join("ca.pem")).expect("rm ca.pem");
    let out = relay_server(&["dev-certs", "--out", pki_s, "--ca-key"]);
    assert!(!out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("refusing to overwrite"),
        "{out:?}"
    );
    assert_eq!(std::fs::read(&key).expect("read key"), before);
    assert!(!pki.join("ca.pem").exists(), "refused run wrote files");

    let fresh = dir.join("fresh");
    let f = fresh.to_str().expect("utf-8");
    assert!(relay_server(&["dev-certs", "--out", f, "--ca-key"])
        .status
        .success());
    let file = dir.join("relay.toml");
    let text = format!(
        "[listen]\nquic = \"127.0.0.1:0\"\n[tls]\ncert = \"{f}/relay.pem\"\nkey = \"{f}/relay-key.pem\"\nclient_ca = \"{f}/ca.pem\"\n\
         [kubernetes]\nenabled = true\n[bootstrap]\nca_cert = \"{f}/ca.pem\"\nca_key = \"{f}/ca-key.pem\"\n"
    );
    std::fs::write(&file, text).expect("write config");
    let out = check_config(&file);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(out.status.success(), "bootstrap config refused: {out:?}");
}

/// `RELAY_LEASE_NAMESPACE` (with `RELAY_ADVERTISE`) turns Lease membership
/// on from the environment, as deploy/kubernetes/components/replicas does:
/// on a file without `[kubernetes]` the check then fails naming the field.
#[test]
fn lease_namespace_from_the_environment_turns_lease_membership_on() {
    let dir = scratch("lease-env");
    let file = static_config(&dir);
    let run = |env: &[(&str, &str)]| {
        Command::new(env!("CARGO_BIN_EXE_relay-server"))
            .args(["check-config", "--config", file.to_str().expect("utf-8")])
            .env_remove("RELAY_CONFIG")
            .envs(env.iter().copied())
            .output()
            .expect("run relay-server")
    };
    let plain = run(&[("RELAY_ADVERTISE", "192.0.2.1:8443")]);
    let leases = run(&[
        ("RELAY_ADVERTISE", "192.0.2.1:8443"),
        ("RELAY_LEASE_NAMESPACE", "edge-relay"),
    ]);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(plain.status.success(), "{plain:?}");
    assert!(!leases.status.success(), "{leases:?}");
    let err = String::from_utf8_lossy(&leases.stderr);
    assert!(err.contains("lease_namespace"), "{err}");
}

/// A ConfigMap updated before every pod runs the new binary: a file that
/// declares a newer `config_version` passes this binary's check with its
/// unknown keys reported as warnings (no crash loop mid-rollout); the same
/// keys without the declaration are typos, refused by name.
#[test]
fn a_newer_config_version_is_tolerated_and_typos_are_not() {
    let dir = scratch("config-version");
    let file = static_config(&dir);
    let current = std::fs::read_to_string(&file).expect("read config");
    let newer = format!("future_knob = 1\n{current}[limits]\nfuture_limit = 3\n");
    let check = |text: &str| {
        std::fs::write(&file, text).expect("write config");
        relay_server(&["check-config", "--config", file.to_str().expect("utf-8")])
    };
    let out = check(&newer);
    assert!(!out.status.success(), "typos accepted: {out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("`future_knob`") && stderr.contains("`limits.future_limit`"),
        "{stderr}"
    );
    let out = check(&format!("config_version = 2\n{newer}"));
    assert!(out.status.success(), "newer file refused: {out:?}");
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        all.contains("future_knob") && all.contains("limits.future_limit"),
        "the ignored keys must be reported: {all}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
