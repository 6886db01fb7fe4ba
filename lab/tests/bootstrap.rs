//! Identity without hand-made certificates, end to end on loopback: an
//! edge that holds only a projected service-account token obtains a node
//! certificate from the relay, connects, and renews it; a token bound to
//! node A never yields node B's certificate.
//!
//! No kube-apiserver can run on this machine: TokenReview and the pod the
//! token is bound to come from `relay-kube-standin`, a stand-in speaking
//! the apiserver's REST shapes — NOT a real apiserver. The relay reaches it
//! through an ordinary kubeconfig.
//!
//! The TCP fallback's QUIC probe as a planned move has its tests in
//! `tests/bootstrap/moves.rs`, and a slow apiserver's in
//! `tests/bootstrap/slow_api.rs` (a subdirectory, so cargo does not take
//! them for test binaries of their own); the lab set-up here serves all.

use relay_lab::TempDir;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{ensure, Context, Result};
use edge_client::config::TransportMode;
use edge_client::config::{BootstrapConfig, Identity};
use edge_client::{EdgeClient, EdgeConfig, EdgeState};
use relay_kube_standin::{daemonset_pod, kubelet_node, StandIn};
use relay_protocol::RejectReason;
use relay_server::config::{BootstrapSettings, KubeSettings, TlsReload};
use relay_server::{Relay, RelayConfig};
use relay_transport::devcerts::DevPki;
use relay_transport::issue::NodeIssuer;
use relay_transport::reload::{crls_from_pem, TlsPaths};
use relay_transport::tls::{cert_names_node, certs_from_pem};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[path = "bootstrap/moves.rs"]
mod moves;
#[path = "bootstrap/slow_api.rs"]
mod slow_api;

const BOUND: Duration = Duration::from_secs(20);
const NS: &str = "edge-relay";

struct Lab {
    standin: StandIn,
    pki: DevPki,
    relay: Relay,
    dir: TempDir,
}

/// A stand-in with Nodes edge-0 and edge-1, each running an edge-client
/// pod, and a relay issuing certificates that live `lifetime`.
async fn lab(lifetime: Duration) -> Result<Lab> {
    lab_with(lifetime, |_, _, _| Ok(())).await
}

/// [`lab`], with the relay's config changed by `tweak` (given the lab's
/// PKI and directory) before it starts.
async fn lab_with(
    lifetime: Duration,
    tweak: impl FnOnce(&mut RelayConfig, &DevPki, &std::path::Path) -> Result<()>,
) -> Result<Lab> {
    relay_lab::init();
    let standin = StandIn::spawn().await?;
    for i in 0..2u8 {
        let ip = format!("127.0.0.{}", 2 + i);
        standin.upsert_node(kubelet_node(
            &format!("edge-{i}"),
            &[&format!("127.1.{i}.0/24")],
            &[("InternalIP", &ip)],
        ));
        standin.upsert_pod(daemonset_pod(
            NS,
            &format!("edge-client-{i}"),
            &format!("uid-{i}"),
            &format!("edge-{i}"),
            "edge-client",
            "edge-client",
        ));
    }
    // No node certificates: edges get theirs from the relay.
    let pki = DevPki::generate(&["localhost"], &[])?;
    let (ca_cert, ca_key) = pki.ca_pem_pair();
    let mut cfg = RelayConfig::loopback(pki.relay_material()?);
    cfg.kubernetes = Some(KubeSettings {
        edge_address_ranges: relay_lab::loopback_node_ranges(),
        kubeconfig: Some(standin.kubeconfig_path().to_path_buf()),
        ..KubeSettings::default()
    });
    cfg.bootstrap = Some(BootstrapSettings {
        issuer: Arc::new(NodeIssuer::from_pem(&ca_cert, &ca_key, lifetime)?),
        issuer_cert: certs_from_pem(ca_cert.as_bytes(), "ca")?.remove(0),
        namespace: NS.into(),
        service_account: "edge-client".into(),
        daemonsets: vec!["edge-client".into()],
    });
    let dir = std::env::temp_dir().join(format!(
        "bootstrap-{}-{}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::create_dir_all(&dir)?;
    tweak(&mut cfg, &pki, &dir)?;
    let relay = Relay::spawn(cfg).await?;
    Ok(Lab {
        standin,
        pki,
        relay,
        dir: TempDir(dir),
    })
}

impl Lab {
    /// An edge for `node` holding `token` and nothing else.
    fn edge(&self, node: &str, token: &str) -> Result<(EdgeClient, PathBuf)> {
        self.edge_with(node, token, |_| {})
    }

    /// [`Lab::edge`], its config changed by `tweak`.
    fn edge_with(
        &self,
        node: &str,
        token: &str,
        tweak: impl FnOnce(&mut EdgeConfig),
    ) -> Result<(EdgeClient, PathBuf)> {
        let token_file = self.dir.0.join(format!("{node}-token"));
        std::fs::write(&token_file, token)?;
        let state_dir = self.dir.0.join(format!("{node}-state"));
        // EdgeConfig::new wants an identity; replace it with the bootstrap.
        let placeholder = DevPki::generate(&["localhost"], &[node])?.node_material(node)?;
        let mut cfg = EdgeConfig::new(
            node,
            self.relay.quic_addr().to_string(),
            "localhost",
            placeholder,
        );
        cfg.identity = Identity::Bootstrap(BootstrapConfig {
            token_file,
            state_dir: state_dir.clone(),
            relay_ca: certs_from_pem(self.pki.ca_cert.as_bytes(), "ca")?,
        });
        tweak(&mut cfg);
        Ok((EdgeClient::spawn(cfg), state_dir))
    }

    fn token(&self, node: &str, pod: &str, uid: &str, audience: &str) -> String {
        self.standin.mint_token(
            node,
            pod,
            uid,
            audience,
            SystemTime::now() + Duration::from_secs(3600),
        )
    }
}

async fn rejected(e: &EdgeClient) -> Result<(RejectReason, String)> {
    let mut w = e.watch();
    let s = tokio::time::timeout(
        BOUND,
        w.wait_for(|s| matches!(s, EdgeState::Rejected { .. })),
    )
    .await
    .context("no rejection")??
    .clone();
    match s {
        EdgeState::Rejected { reason, message } => Ok((reason, message)),
        _ => unreachable!(),
    }
}

/// Stand-in, not a real apiserver (see the module doc).
#[tokio::test]
async fn an_edge_with_only_a_token_obtains_a_certificate_connects_and_renews() -> Result<()> {
    // 30 s certificates: renewal is due 18 to 24 s after issuance.
    let lab = lab(Duration::from_secs(30)).await?;
    let token = lab.token("edge-0", "edge-client-0", "uid-0", "edge-relay");
    let (e0, state_dir) = lab.edge("edge-0", &token)?;
    let (_, first_gen) = e0.wait_connected(BOUND).await.context("edge-0 connects")?;
    let pem = std::fs::read_to_string(state_dir.join("edge-0.pem"))?;
    let der = certs_from_pem(pem.as_bytes(), "kept")?;
    assert!(
        cert_names_node(&der[0], "edge-0"),
        "the certificate names edge-0 only"
    );
    assert!(!cert_names_node(&der[0], "edge-1"));
    let key_mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(state_dir.join("edge-0-key.pem"))?.permissions(),
    );
    assert_eq!(key_mode & 0o777, 0o600, "the private key is private");
    // A tunnelled connection open across the renewal (a `kubectl logs -f`,
    // an exec): the renewal is a planned move, so the old session drains
    // instead of being closed under it.
    let (echo, _echo_task) = relay_lab::spawn_echo("127.0.0.2:0".parse()?).await?;
    let proxy = lab.relay.connect_addr().context("connect listener")?;
    let mut held = relay_lab::connect_via(proxy, &echo.to_string()).await?;
    echo_line(&mut held, b"before the renewal\n").await?;
    // Renewal: a new certificate and a new session, the routes kept.
    let mut w = e0.watch();
    let renewed = tokio::time::timeout(
        Duration::from_secs(45),
        w.wait_for(
            |s| matches!(s, EdgeState::Connected { generation, .. } if *generation > first_gen),
        ),
    )
    .await
    .context("no renewed session within 45 s")?
    .context("the edge's state channel closed before a renewed session")?;
    drop(renewed);
    // The connection opened before the renewal still carries bytes once
    // the new session is up, and new connections go to the new session.
    echo_line(&mut held, b"after the renewal\n")
        .await
        .context("the connection held across the renewal was cut")?;
    let mut fresh = relay_lab::connect_via(proxy, &echo.to_string()).await?;
    echo_line(&mut fresh, b"a new connection\n").await?;
    let admin = lab.relay.admin_addr().context("admin")?;
    let (_, m) = relay_lab::admin_get(admin, "/metrics", None).await?;
    ensure!(
        m.contains("\nrelay_sessions_draining 1\n"),
        "the old session is not counted as draining: {m}"
    );
    // And it keeps doing so past the edge's own wait for the relay's
    // drain notice (its handshake timeout, 10 s): the old connection is
    // kept because the relay drains it, not by luck of timing. (The old
    // certificate has 10 s left; the relay's drain lasts at least its
    // drain grace, 30 s.)
    tokio::time::sleep(Duration::from_secs(11)).await;
    echo_line(&mut held, b"11 s after the renewal\n")
        .await
        .context("the connection held across the renewal was cut after it")?;
    // The held connection ends as its client ends it: the half-close goes
    // through and comes back, no reset.
    close_cleanly(&mut held).await?;
    // Its last stream done, the drained session closes at once: within
    // 100 ms (its drain task is woken by the stream's end). This bound
    // does not prove the wake-up: the 250 ms polling it replaced (by
    // then at its slowest pace) closed 0 to 250 ms after the end, so it
    // passed this bound about 2 times in 5.
    let t = std::time::Instant::now();
    loop {
        let (_, m) = relay_lab::admin_get(admin, "/metrics", None).await?;
        if m.contains("\nrelay_sessions_draining 0\n") {
            break;
        }
        ensure!(
            t.elapsed() < Duration::from_millis(100),
            "the drained session outlived its last stream by {:?}: {m}",
            t.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    eprintln!(
        "the drained session closed {:?} after its last stream's end",
        t.elapsed()
    );
    drop(fresh);
    let pem2 = std::fs::read_to_string(state_dir.join("edge-0.pem"))?;
    ensure!(pem2 != pem, "the certificate was not replaced");
    let rows = relay_lab::sessions(lab.relay.admin_addr().context("admin")?).await?;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].routes.len(), 2, "{rows:?}");
    let (_, m) =
        relay_lab::admin_get(lab.relay.admin_addr().context("admin")?, "/metrics", None).await?;
    assert!(
        m.contains("relay_bootstrap_total{outcome=\"issued\"} 2"),
        "{m}"
    );
    e0.shutdown().await;
    lab.relay.shutdown(Duration::from_secs(1)).await;
    Ok(())
}

/// Writes `line` on `s` and reads it back (an echo), within 5 s.
async fn echo_line(s: &mut tokio::net::TcpStream, line: &[u8]) -> Result<()> {
    s.write_all(line).await?;
    let mut back = vec![0u8; line.len()];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut back))
        .await
        .context("no echo within 5 s")??;
    ensure!(back == line, "echo differs: {back:?}");
    Ok(())
}

/// Ends a held connection as its client would: the half-close goes
/// through and comes back within 5 s, with no reset and no bytes left.
async fn close_cleanly(held: &mut tokio::net::TcpStream) -> Result<()> {
    held.shutdown().await?;
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), held.read_to_end(&mut rest))
        .await
        .context("no clean end within 5 s")?
        .context("the held connection ended with an error, not its close")?;
    ensure!(rest.is_empty(), "unexpected bytes at the end: {rest:?}");
    Ok(())
}

/// Stand-in, not a real apiserver (see the module doc). A certificate due
/// for renewal but still valid keeps the edge connectable while the
/// bootstrap fails (here a token the relay refuses; in production the
/// apiserver's TokenReview down): a session that ends then comes back on
/// it at once, where it used to wait for a renewal that could not come.
#[tokio::test]
async fn a_due_certificate_still_reconnects_while_the_bootstrap_fails() -> Result<()> {
    // 40 s certificates: renewal is due 24 to 32 s after issuance (drawn
    // in 0.6 to 0.8 of the life), so at 33 s it is due.
    let lab = lab(Duration::from_secs(40)).await?;
    let token = lab.token("edge-0", "edge-client-0", "uid-0", "edge-relay");
    let (e0, state_dir) = lab.edge("edge-0", &token)?;
    let (_, first_gen) = e0.wait_connected(BOUND).await.context("edge-0 connects")?;
    let issued = std::time::Instant::now();
    let pem = std::fs::read_to_string(state_dir.join("edge-0.pem"))?;
    std::fs::write(lab.dir.0.join("edge-0-token"), "not a token")?;
    tokio::time::sleep(Duration::from_secs(33).saturating_sub(issued.elapsed())).await;
    let admin = lab.relay.admin_addr().context("admin")?;
    let (code, body) = relay_lab::admin_request(admin, "DELETE", "/v1/sessions/edge-0").await?;
    ensure!(code < 300, "kick: {code} {body}");
    let mut w = e0.watch();
    tokio::time::timeout(
        Duration::from_secs(5),
        w.wait_for(
            |s| matches!(s, EdgeState::Connected { generation, .. } if *generation > first_gen),
        ),
    )
    .await
    .with_context(|| format!("no new session within 5 s: {:?}", e0.state()))??;
    ensure!(
        issued.elapsed() < Duration::from_secs(36),
        "the certificate was close to expiry: the test proves nothing"
    );
    let pem2 = std::fs::read_to_string(state_dir.join("edge-0.pem"))?;
    ensure!(
        pem2 == pem,
        "the certificate was replaced, yet the bootstrap fails"
    );
    e0.shutdown().await;
    lab.relay.shutdown(Duration::from_secs(1)).await;
    Ok(())
}

/// Stand-in, not a real apiserver (see the module doc). A bootstrapped
/// edge whose certificate the relay refuses (revoked: its key leaked)
/// obtains a new one with its token and comes back, rather than dialling
/// with the refused one until it expires.
#[tokio::test]
async fn an_edge_whose_certificate_is_revoked_bootstraps_a_new_one() -> Result<()> {
    let lab = lab_with(Duration::from_secs(3600), |cfg, pki, dir| {
        pki.write_to(dir)?;
        let crl = dir.join("crl.pem");
        std::fs::write(&crl, pki.crl_revoking(&[])?)?;
        cfg.tls_crls = crls_from_pem(&std::fs::read(&crl)?, "crl")?;
        cfg.tls_reload = Some(TlsReload {
            paths: TlsPaths {
                cert: dir.join("relay.pem"),
                key: dir.join("relay-key.pem"),
                client_ca: dir.join("ca.pem"),
                crl: Some(crl),
            },
            interval: Duration::from_secs(3600),
        });
        Ok(())
    })
    .await?;
    // edge-0 over QUIC, edge-1 over the TLS+TCP fallback.
    let mut revoked = Vec::new();
    let mut edges = Vec::new();
    for (i, transport) in [TransportMode::Quic, TransportMode::Tcp]
        .into_iter()
        .enumerate()
    {
        let node = format!("edge-{i}");
        let token = lab.token(
            &node,
            &format!("edge-client-{i}"),
            &format!("uid-{i}"),
            "edge-relay",
        );
        let (e, state_dir) = lab.edge_with(&node, &token, |c| c.transport = transport)?;
        let (_, generation) = e
            .wait_connected(BOUND)
            .await
            .with_context(|| format!("{node} connects"))?;
        let pem = std::fs::read_to_string(state_dir.join(format!("{node}.pem")))?;
        revoked.push(pem.clone());
        edges.push((node, e, state_dir, generation, pem));
    }
    let refs: Vec<&str> = revoked.iter().map(String::as_str).collect();
    std::fs::write(lab.dir.0.join("crl.pem"), lab.pki.crl_revoking(&refs)?)?;
    // The reload closes both live sessions (their certificates verified
    // again with the new list): each edge is refused at its reconnection
    // and bootstraps a new certificate.
    let t = std::time::Instant::now();
    lab.relay.reload_tls()?;
    for (node, e, state_dir, first_gen, pem) in edges {
        let mut w = e.watch();
        tokio::time::timeout(
            Duration::from_secs(20),
            w.wait_for(
                |s| matches!(s, EdgeState::Connected { generation, .. } if *generation > first_gen),
            ),
        )
        .await
        .with_context(|| format!("{node} not back within 20 s: {:?}", e.state()))??;
        let pem2 = std::fs::read_to_string(state_dir.join(format!("{node}.pem")))?;
        ensure!(pem2 != pem, "{node} back with the revoked certificate");
        eprintln!(
            "{node} revoked: back on a new certificate {:?} after the reload",
            t.elapsed()
        );
        e.shutdown().await;
    }
    lab.relay.shutdown(Duration::from_secs(1)).await;
    Ok(())
}

/// Stand-in, not a real apiserver (see the module doc).
#[tokio::test]
async fn tokens_that_do_not_prove_the_node_are_refused() -> Result<()> {
    let lab = lab(Duration::from_secs(3600)).await?;
    // Node A's token, an edge claiming node B.
    let a = lab.token("edge-0", "edge-client-0", "uid-0", "edge-relay");
    let (thief, state) = lab.edge("edge-1", &a)?;
    let (r, m) = rejected(&thief).await?;
    assert_eq!(r, RejectReason::IdentityMismatch);
    assert!(m.contains("bound to node \"edge-0\""), "{m}");
    assert!(
        !state.join("edge-1.pem").exists(),
        "no certificate for edge-1"
    );
    thief.shutdown().await;
    // A token for another audience.
    let other = lab.token("edge-1", "edge-client-1", "uid-1", "some-other-api");
    let (e, _) = lab.edge("edge-1", &other)?;
    let (r, m) = rejected(&e).await?;
    assert_eq!(r, RejectReason::IdentityMismatch);
    assert!(m.contains("audience"), "{m}");
    e.shutdown().await;
    // A pod that is gone (replaced: its uid differs), and a token that is
    // not a token at all.
    let stale = lab.token("edge-1", "edge-client-1", "uid-old", "edge-relay");
    let (e, _) = lab.edge("edge-1", &stale)?;
    let (r, m) = rejected(&e).await?;
    assert_eq!(r, RejectReason::IdentityMismatch);
    assert!(m.contains("replaced"), "{m}");
    e.shutdown().await;
    let (e, _) = lab.edge("edge-1", "garbage")?;
    assert_eq!(rejected(&e).await?.0, RejectReason::IdentityMismatch);
    e.shutdown().await;
    // A node with no Node object (bootstrap takes no client certificate:
    // anyone may ask, under any name): refused without a TokenReview, and
    // without an Event written for the invented name.
    let reviews = |s: &StandIn| {
        s.requests()
            .iter()
            .filter(|r| r.path.ends_with("/tokenreviews"))
            .count()
    };
    // Once the Nodes are loaded (before, a request is reviewed).
    let admin = lab.relay.admin_addr().context("admin")?;
    let t = std::time::Instant::now();
    while relay_lab::admin_get(admin, "/readyz", None).await?.0 != 200 {
        ensure!(t.elapsed() < BOUND, "the relay never became ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let before = reviews(&lab.standin);
    let (e, _) = lab.edge("no-such-node", "garbage")?;
    let (r, m) = rejected(&e).await?;
    assert_eq!(r, RejectReason::IdentityMismatch);
    assert!(m.contains("no Node object"), "{m}");
    e.shutdown().await;
    assert_eq!(
        reviews(&lab.standin),
        before,
        "a TokenReview for an unknown node"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let events = lab.standin.events();
    assert!(
        !events
            .iter()
            .any(|ev| ev.to_string().contains("no-such-node")),
        "an Event for an unknown node: {events:?}"
    );
    assert!(
        events.iter().any(|ev| ev.to_string().contains("edge-1")),
        "refusals for a real node are still Events: {events:?}"
    );
    // A pod of another DaemonSet on the right node.
    let m = intruder_refused(&lab, "edge-1").await?;
    assert!(m.contains("DaemonSet edge-client"), "{m}");
    assert!(
        relay_lab::sessions(lab.relay.admin_addr().context("admin")?)
            .await?
            .is_empty()
    );
    lab.relay.shutdown(Duration::from_secs(1)).await;
    Ok(())
}

/// A pod of an unlisted DaemonSet on `node` asks for a certificate: the
/// refusal (`identity_mismatch`) and its message.
async fn intruder_refused(lab: &Lab, node: &str) -> Result<String> {
    lab.standin.upsert_pod(daemonset_pod(
        NS,
        "intruder",
        "uid-x",
        node,
        "edge-client",
        "not-edge-client",
    ));
    let t = lab.token(node, "intruder", "uid-x", "edge-relay");
    let (e, _) = lab.edge(node, &t)?;
    let (r, m) = rejected(&e).await?;
    e.shutdown().await;
    ensure!(r == RejectReason::IdentityMismatch, "{r:?}: {m}");
    Ok(m)
}

/// Sites behind an HTTP proxy run their own DaemonSet, with their own
/// config: a relay listing both DaemonSets (`bootstrap.daemonset = [..]`)
/// gives a pod of either a certificate, and its refusal of any other
/// names both.
#[tokio::test]
async fn a_pod_of_a_second_listed_daemonset_gets_a_certificate() -> Result<()> {
    let lab = lab_with(Duration::from_secs(3600), |cfg, _, _| {
        cfg.bootstrap
            .as_mut()
            .context("bootstrap")?
            .daemonsets
            .push("edge-client-proxied".into());
        Ok(())
    })
    .await?;
    lab.standin.upsert_pod(daemonset_pod(
        NS,
        "proxied-1",
        "uid-p",
        "edge-1",
        "edge-client",
        "edge-client-proxied",
    ));
    let t = lab.token("edge-1", "proxied-1", "uid-p", "edge-relay");
    let (e1, _) = lab.edge("edge-1", &t)?;
    e1.wait_connected(BOUND)
        .await
        .context("a pod of the second DaemonSet connects")?;
    e1.shutdown().await;
    let m = intruder_refused(&lab, "edge-0").await?;
    assert!(
        m.contains("DaemonSet edge-client or edge-client-proxied"),
        "{m}"
    );
    lab.relay.shutdown(Duration::from_secs(1)).await;
    Ok(())
}
