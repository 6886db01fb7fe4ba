//! Client certificates the relay refuses at TLS, in Kubernetes mode: a
//! certificate our CA signed names its node for real, so its refusal
//! (expired, not valid yet, revoked) is an `EdgeSessionRejected` Event on
//! that Node, within the node's Event budget, unless the node is connected
//! (then the certificate was a copy: our CA signing it does not prove its
//! holder has the key); a certificate no CA of ours signed names whatever
//! its maker wrote, so it is logged as claimed and nothing is written to
//! the API for it.
//!
//! Against `relay-kube-standin`, NOT a real apiserver (see `kube.rs`).

use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context, Result};
use edge_client::{EdgeClient, EdgeConfig};
use relay_kube_standin::{kubelet_node, StandIn};
use relay_server::config::KubeSettings;
use relay_server::{Relay, RelayConfig};
use relay_transport::devcerts::DevPki;
use relay_transport::issue::{node_key, NodeIssuer};
use relay_transport::tls::TlsMaterial;

const BOUND: Duration = Duration::from_secs(15);

/// A client certificate for `node` from `ca`'s CA, issued at `issued`
/// (valid from 5 minutes before it for an hour), trusting `trust`'s CA
/// for the relay.
fn edge(ca: &DevPki, trust: &DevPki, node: &str, issued: SystemTime) -> Result<TlsMaterial> {
    let (c, k) = ca.ca_pem_pair();
    let issuer = NodeIssuer::from_pem(&c, &k, Duration::from_secs(3600))?;
    let (key, public) = node_key()?;
    let cert = issuer.issue(node, &public, issued)?.cert_pem;
    Ok(TlsMaterial::from_pem(&cert, &key, &trust.ca_cert)?)
}

/// Dials the relay over QUIC (or TLS/TCP) with `edge`'s certificate and
/// waits for the relay to close the connection.
async fn dial(relay: &Relay, edge: &TlsMaterial, tcp: bool) -> Result<()> {
    let bound = Duration::from_secs(5);
    if tcp {
        let addr = relay.tcp_fallback_addr().context("tcp fallback")?;
        let _ = relay_transport::tcp::connect(addr, "localhost", edge, 0, bound).await;
    } else {
        let ep = relay_transport::quic::client_endpoint(
            "127.0.0.1:0".parse()?,
            edge,
            &relay_transport::QuicTuning::default(),
            0,
        )?;
        if let Ok(c) = ep.connect(relay.quic_addr(), "localhost")?.await {
            let _ = tokio::time::timeout(bound, c.closed()).await;
        }
    }
    Ok(())
}

/// `relay_handshake_failures_total{reason}`.
fn failures(relay: &Relay, reason: &str) -> u64 {
    let prefix = format!("relay_handshake_failures_total{{reason=\"{reason}\"}} ");
    relay
        .shared()
        .metrics
        .render(0, 1)
        .lines()
        .find_map(|l| l.strip_prefix(&prefix)?.parse().ok())
        .unwrap_or(0)
}

/// Polls `f` every 50 ms until it holds, at most [`BOUND`].
async fn until(what: &str, mut f: impl FnMut() -> bool) -> Result<()> {
    let start = Instant::now();
    while !f() {
        if start.elapsed() > BOUND {
            bail!("{what}: not within {BOUND:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

#[tokio::test]
async fn a_refused_certificate_our_ca_signed_is_an_event_for_its_node_and_a_strangers_is_not(
) -> Result<()> {
    relay_lab::init();
    let standin = StandIn::spawn().await?;
    for (i, name) in ["edge-0", "edge-1", "edge-2"].iter().enumerate() {
        let ip = format!("127.0.0.{}", 2 + i);
        let cidr = format!("127.1.{i}.0/24");
        standin.upsert_node(kubelet_node(name, &[&cidr], &[("InternalIP", &ip)]));
    }
    let pki = DevPki::generate(&["localhost"], &[])?;
    let other = DevPki::generate(&["localhost"], &[])?;
    let mut cfg = RelayConfig::loopback(pki.relay_material()?);
    cfg.kubernetes = Some(KubeSettings {
        edge_address_ranges: relay_lab::loopback_node_ranges(),
        kubeconfig: Some(standin.kubeconfig_path().to_path_buf()),
        api_timeout: Duration::from_secs(3),
        ..KubeSettings::default()
    });
    let relay = Relay::spawn(cfg).await?;
    let now = SystemTime::now();

    // Another CA's certificate naming edge-1, a Node that exists: counted
    // and logged (as claimed), and nothing written about edge-1.
    let stranger = edge(&other, &pki, "edge-1", now)?;
    dial(&relay, &stranger, false).await?;
    dial(&relay, &stranger, true).await?;
    until("two unknown_ca refusals", || {
        failures(&relay, "unknown_ca") == 2
    })
    .await?;

    // edge-2 connected, and an expired certificate of edge-2 from our
    // CA presented by someone else (a copy of an old certificate, without
    // proof of its key): counted, but no Event on the healthy edge-2,
    // whose Event budget it would spend.
    let live = EdgeClient::spawn(EdgeConfig::new(
        "edge-2",
        relay.quic_addr().to_string(),
        "localhost",
        edge(&pki, &pki, "edge-2", now)?,
    ));
    until("edge-2's session", || {
        relay.shared().registry.get("edge-2").is_some()
    })
    .await?;
    let old_copy = edge(
        &pki,
        &pki,
        "edge-2",
        now - Duration::from_secs(2 * 24 * 3600),
    )?;
    dial(&relay, &old_copy, false).await?;
    until("edge-2's old certificate refused", || {
        failures(&relay, "cert_expired") == 1
    })
    .await?;

    // edge-0's certificate, from our CA, expired, and edge-0 not
    // connected: an Event on edge-0 saying so.
    let expired = edge(
        &pki,
        &pki,
        "edge-0",
        now - Duration::from_secs(2 * 24 * 3600),
    )?;
    dial(&relay, &expired, false).await?;
    until("an EdgeSessionRejected Event on edge-0", || {
        standin.events().iter().any(|e| {
            e["reason"] == "EdgeSessionRejected"
                && e["regarding"]["name"] == "edge-0"
                && e["action"] == "cert_expired"
                && e["note"].as_str().is_some_and(|n| {
                    n.contains("client certificate refused at TLS: certificate expired at")
                })
        })
    })
    .await?;
    assert_eq!(failures(&relay, "cert_expired"), 2);
    assert_eq!(failures(&relay, "tls"), 0);
    let events = standin.events();
    assert!(
        !events
            .iter()
            .any(|e| e["regarding"]["name"] == "edge-1" || e["action"] == "unknown_ca"),
        "an Event for a name no CA of ours signed: {events:#?}"
    );
    // Published before edge-0's would have been (one queue, in order).
    assert!(
        !events
            .iter()
            .any(|e| e["regarding"]["name"] == "edge-2" && e["action"] == "cert_expired"),
        "an Event on a connected node for a copy of its old certificate: {events:#?}"
    );
    live.shutdown().await;
    relay.shutdown(Duration::from_secs(1)).await;
    Ok(())
}
