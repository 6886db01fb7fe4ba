//! `EdgeTunnelReady` left `True` with nothing behind it (see `kube.rs`): a
//! relay killed while its edges were up writes no "down", so the relay
//! that starts next corrects the Nodes it finds `True` with no session
//! once the edges had time to come back; and a relay that stops writes its
//! sessions' "down" before it goes. Stand-in, not a real apiserver (see
//! the module doc).

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use relay_kube_standin::k8s_openapi::api::core::v1::NodeCondition;
use relay_kube_standin::StandIn;
use relay_server::Relay;
use relay_transport::devcerts::DevPki;

use super::{eventually, node, node_name, relay_config, KubeLab, BOUND};

/// The grace the tests give edges to come back (production:
/// `relay_server::k8s::STALE_CONDITION_GRACE`, 26 s).
const GRACE: Duration = Duration::from_secs(3);

/// `EdgeTunnelReady: True` as a relay that is gone wrote it.
fn left_true() -> NodeCondition {
    NodeCondition {
        type_: "EdgeTunnelReady".into(),
        status: "True".into(),
        reason: Some("SessionUp".into()),
        message: Some("tunnel up over quic via relay relay-gone".into()),
        ..Default::default()
    }
}

/// A relay killed with its edges up left edge-0 and edge-1 `True`; edge-0
/// died meanwhile, edge-1 comes back to the new relay at once. After the
/// grace, edge-0 is written `False` (`NoSession`), so the `EdgeTunnelDown`
/// alert can fire; edge-1, whose session came up within the grace, is
/// written once (its new session), never `False`. Before, both stayed
/// `True` for ever: only a session's end in the same process wrote "down".
#[tokio::test]
async fn a_node_left_true_by_a_relay_that_died_is_written_false_after_the_grace() -> Result<()> {
    relay_lab::init();
    let standin = StandIn::spawn().await?;
    for i in 0..2 {
        standin.upsert_node(node(i));
        standin
            .apply_conditions_as(&node_name(i), "edge-relay", vec![left_true()])
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    }
    let pki = DevPki::generate(&["localhost"], &["edge-0", "edge-1"])?;
    let mut cfg = relay_config(&standin, &pki, None)?;
    if let Some(k) = cfg.kubernetes.as_mut() {
        k.stale_condition_grace = GRACE;
    }
    let started = std::time::Instant::now();
    let relay = Relay::spawn(cfg).await?;
    let lab = KubeLab {
        standin,
        pki,
        relay,
    };
    let e1 = lab.edge("edge-1")?;
    e1.wait_connected(BOUND).await.context("edge-1")?;
    ensure!(
        started.elapsed() < GRACE,
        "edge-1 took {:?} to connect: longer than the test's grace",
        started.elapsed()
    );
    let (status, reason, message) = eventually("edge-0 False", async || {
        Ok(lab.condition("edge-0").filter(|c| c.0 == "False"))
    })
    .await?;
    let took = started.elapsed();
    assert_eq!((status.as_str(), reason.as_str()), ("False", "NoSession"));
    assert!(message.starts_with("no tunnel session: "), "{message}");
    ensure!(
        took >= GRACE,
        "edge-0 written False after {took:?}, within the grace"
    );
    eprintln!("edge-0 False {took:?} after the relay started (grace {GRACE:?})");
    // edge-1: its session's condition, written once.
    let (status, reason, _) = eventually("edge-1 SessionUp", async || {
        Ok(lab
            .condition("edge-1")
            .filter(|c| c.0 == "True" && c.1 == "SessionUp" && c.2.contains("relay-0")))
    })
    .await?;
    assert_eq!((status.as_str(), reason.as_str()), ("True", "SessionUp"));
    // Past the next sweep's hold-off: nothing more for edge-1.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let writes = |node: &str| {
        let path = format!("/api/v1/nodes/{node}/status");
        lab.standin
            .requests()
            .iter()
            .filter(|r| r.method == "PATCH" && r.path == path)
            .count()
    };
    assert_eq!(writes("edge-1"), 1, "edge-1 written once: its session");
    assert_eq!(writes("edge-0"), 1, "edge-0 written once: False");
    assert_eq!(
        lab.condition("edge-1").map(|c| c.0).as_deref(),
        Some("True")
    );
    e1.shutdown().await;
    lab.relay.shutdown(Duration::from_secs(1)).await;
    Ok(())
}

/// A relay that stops writes its sessions' "down" before it goes, though
/// the writes wait behind their hold-off (every node went up seconds
/// before) and 16 at a time behind a slow apiserver: every Node reads
/// `False` once `shutdown` returns. Before, the writer stopped with the
/// sessions' end and the queued writes were lost: the Nodes said `True`
/// with no relay to correct them.
#[tokio::test]
async fn every_node_is_written_false_when_the_relay_stops() -> Result<()> {
    const N: u8 = 24;
    let lab = KubeLab::start(N, &[]).await?;
    let edges = (0..N)
        .map(|i| lab.edge(&node_name(i)))
        .collect::<Result<Vec<_>>>()?;
    for (i, e) in edges.iter().enumerate() {
        e.wait_connected(BOUND)
            .await
            .with_context(|| format!("edge-{i}"))?;
    }
    eventually("every condition True", async || {
        Ok((0..N)
            .all(|i| lab.condition(&node_name(i)).is_some_and(|c| c.0 == "True"))
            .then_some(()))
    })
    .await?;
    lab.standin
        .set_latency(Duration::from_millis(20), Duration::from_millis(150));
    let t = std::time::Instant::now();
    lab.relay.shutdown(Duration::from_secs(1)).await;
    let stopped = t.elapsed();
    let left: Vec<String> = (0..N)
        .map(node_name)
        .filter(|n| {
            relay_lab::cluster::condition_of(&lab.standin, n).is_none_or(|c| c.0 != "False")
        })
        .collect();
    ensure!(
        left.is_empty(),
        "{} of {N} Nodes not False after shutdown: {left:?}",
        left.len()
    );
    eprintln!("{N} Nodes False; shutdown took {stopped:?}");
    for e in edges {
        e.shutdown().await;
    }
    Ok(())
}
