//! UDP blocked at an edge's NAT while its session runs on QUIC (see the
//! list in `faults.rs`).

use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use relay_lab::netns::{self, NetnsLab, Role};
use relay_lab::scenario::{
    edge_config, edge_metric, edge_readiness, http_from, lab_pki, relay_config, sa, services,
    session, start_edge, start_relay, within, Table, EDGE_STATUS, HTTP,
};

use super::{secs, timed};

/// Keep-alive of both sides here (the dead-path bound is 3 of them).
const KEEPALIVE: Duration = Duration::from_secs(1);
/// The edge's QUIC probe interval on the TCP fallback here.
const PROBE: Duration = Duration::from_secs(3);
/// The backoff's cap here.
const BACKOFF_CAP: Duration = Duration::from_secs(2);

/// Fault 6: UDP blocked at edge2's NAT mid-session (a firewall change, a
/// carrier starting to drop QUIC). The edge's liveness check gives the
/// path up within 3 keep-alives; a path gone dead is not a relay
/// restarting, so one unanswered QUIC attempt (`quic_fallback`, 3 s) and
/// the edge is on TCP; cpod2 reaches epod2 again. UDP back: the QUIC
/// probe moves the edge back. Blocked again at once: a second quick loss
/// of QUIC in a row (as a middlebox that drops each UDP flow after a
/// while would cause, for ever) and the edge dials TCP first, without a
/// QUIC attempt, and probes QUIC at twice the interval.
pub(super) fn udp_blocked_mid_session(t: &mut Table) -> Result<()> {
    const F: &str = "UDP blocked mid-session at nat2";
    let idle = KEEPALIVE * 4;
    let lab = NetnsLab::new()?;
    let pki = lab_pki()?;
    let _svc = services(&lab, Role::Epod2, "epod2")?;
    let mut rcfg = relay_config(&pki)?;
    rcfg.quic.keepalive = KEEPALIVE;
    rcfg.quic.idle_timeout = idle;
    let _relay = start_relay(&lab, rcfg)?;
    let mut ecfg = edge_config(&pki, 2)?;
    ecfg.quic.keepalive = KEEPALIVE;
    ecfg.quic.idle_timeout = idle;
    ecfg.backoff.initial = Duration::from_millis(200);
    ecfg.backoff.max = BACKOFF_CAP;
    ecfg.quic_probe_interval = PROBE;
    ecfg.status_listen = Some(EDGE_STATUS);
    let fallback = ecfg.quic_fallback_after;
    let _edge = start_edge(&lab, 2, ecfg)?;
    let on = |transport: &str| -> Result<bool> {
        Ok(session(&lab, "edge2")?.is_some_and(|s| s.transport == transport))
    };
    within(Duration::from_secs(5), || on("quic")).context("edge2 not on QUIC before the fault")?;
    let epod2 = sa(netns::edge_pod_ip(2), HTTP);
    let serves = || -> Result<bool> {
        Ok(http_from(&lab, Role::Cpod2, epod2).is_ok_and(|b| b.ends_with("epod2")))
    };
    let counters = || -> Result<(f64, f64)> {
        Ok((
            edge_metric(&lab, 2, "edge_fallbacks_total")?,
            edge_metric(&lab, 2, "edge_quic_strikes")?,
        ))
    };

    // Dead path (3 keep-alives), the backoff, one QUIC attempt, TCP; a
    // second for TLS, the hello and this poll. Two QUIC attempts (as after
    // any QUIC session before) took one `quic_fallback` more.
    lab.block_udp(2)?;
    let bound = KEEPALIVE * 3 + BACKOFF_CAP + fallback + Duration::from_secs(1);
    let t0 = Instant::now();
    let lost = within(bound + Duration::from_secs(10), || {
        Ok(!edge_readiness(&lab, 2)?.0)
    });
    let got = within(bound + Duration::from_secs(10), || {
        Ok(on("tcp")? && serves()?)
    })
    .and_then(|_| {
        let c = counters()?;
        ensure!(c == (1.0, 1.0), "fallbacks, strikes = {c:?}, not (1, 1)");
        Ok((
            t0.elapsed(),
            "on TCP, cpod2 → epod2 served; 1 fallback, 1 strike".to_string(),
        ))
    });
    let first_ok = got.is_ok();
    // From the loss the edge noticed: the backoff (its first step here),
    // one QUIC attempt, TCP. Two attempts took 6 s and more.
    let after_loss = match (&lost, &got) {
        (Ok(l), Ok((d, _))) => Ok((
            d.saturating_sub(*l),
            format!("lost {} after the block", secs(*l)),
        )),
        _ => Err(anyhow::anyhow!(
            "lost: {lost:?}; on TCP: {:?}",
            got.as_ref().map(|g| g.0)
        )),
    };
    timed(t, &format!("{F}: edge2 on TCP, served"), Some(bound), got);
    timed(
        t,
        &format!("{F}: from the session's loss to TCP"),
        Some(fallback + Duration::from_secs(2)),
        after_loss,
    );
    ensure!(first_ok, "not on TCP: the rest would measure nothing");

    // UDP back: the probe (every 3 s here) moves the session to QUIC.
    lab.clear_nat_faults(2)?;
    let bound = PROBE + Duration::from_secs(2);
    let got = within(bound + Duration::from_secs(10), || on("quic"))
        .map(|d| (d, "the QUIC probe moved the session back".to_string()));
    let back_ok = got.is_ok();
    timed(
        t,
        &format!("{F}: UDP back, edge2 on QUIC"),
        Some(bound),
        got,
    );
    ensure!(back_ok, "not back on QUIC: the rest would measure nothing");

    // Blocked again: a second quick loss; TCP dialled first.
    lab.block_udp(2)?;
    let bound = KEEPALIVE * 3 + BACKOFF_CAP + Duration::from_secs(1);
    let got = within(bound + Duration::from_secs(10), || {
        Ok(on("tcp")? && serves()?)
    })
    .and_then(|d| {
        let c = counters()?;
        ensure!(
            c == (1.0, 2.0),
            "fallbacks, strikes = {c:?}, not (1, 2): TCP not dialled first"
        );
        Ok((
            d,
            "TCP dialled first: still 1 fallback, 2 strikes".to_string(),
        ))
    });
    timed(
        t,
        &format!("{F} again: edge2 on TCP, no QUIC attempt"),
        Some(bound),
        got,
    );

    // The probe now waits twice its interval from the TCP session's start.
    lab.clear_nat_faults(2)?;
    let got = within(PROBE * 2 + Duration::from_secs(10), || on("quic")).and_then(|d| {
        ensure!(
            d >= PROBE + Duration::from_secs(1),
            "back on QUIC {} after UDP returned: the probe interval was not doubled",
            secs(d)
        );
        Ok((d, format!("probe every {}", secs(PROBE * 2))))
    });
    timed(
        t,
        &format!("{F}: probe after 2 strikes"),
        Some(PROBE * 2 + Duration::from_secs(2)),
        got,
    );
    Ok(())
}
