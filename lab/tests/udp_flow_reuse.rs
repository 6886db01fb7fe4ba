//! Captured UDP flows against conntrack's view of them (network-namespace
//! lab).
//!
//! Capture DNATs every captured UDP flow to one local address and port, so
//! the edge keys a flow by its client address alone and learns its
//! original destination from conntrack once. Two things follow:
//! - a flow must not outlive its conntrack entry: once the entry is gone,
//!   the same client port sending to another destination gets a new entry
//!   with the same reply tuple, and its packets landed on the old flow,
//!   which carried them to the old destination (whose answers conntrack
//!   then dressed up as the new one's). The edge now ends a captured flow
//!   a second before `nf_conntrack_udp_timeout`. The test sets that
//!   sysctl (per network namespace) to 5 s in the edge's namespace;
//!   before the fix the second query was answered by the first
//!   destination, from the flow still open for the default 60 s.
//! - at `max_udp_flows`, flows that are not streams (no traffic both ways
//!   past their first 2 s: conntrack's "assured") are evicted first, then
//!   the one quiet longest either way: a flow whose server pushes a
//!   datagram every 100 ms after one client "subscribe" stays. Before the
//!   fix only client packets counted, and a burst of four DNS queries
//!   closed the push flow; by last activity alone it still did (the burst
//!   fits between two pushes).
//!
//! Run: `REQUIRE_LAB=1 cargo test -p relay-lab --test udp_flow_reuse`.
//! Time budget: about 15 s (the two tests run side by side).

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use relay_lab::netns::{self, NetnsLab, Role};
use relay_lab::scenario::{
    edge_config_in, edge_metric, launch, netns_start, relay_config_in, sa, services, start_edge,
    start_relay, udp_from, within, Running, DNS, EDGE_STATUS,
};
use tokio::net::UdpSocket;

/// conntrack's UDP timeout set in the edge's namespace for the first test.
const CT_TIMEOUT_SECS: u64 = 5;

/// One query to `target` from `port` in `ns`: the name of whoever answered
/// (the lab's responders answer `name:query`).
fn query_from_port(lab: &NetnsLab, ns: Role, port: u16, target: SocketAddr) -> Result<String> {
    lab.run_in(ns, Duration::from_secs(10), move || async move {
        let s = UdpSocket::bind(sa(Ipv4Addr::UNSPECIFIED, port)).await?;
        s.connect(target).await?;
        let query = format!("q{:015}", rand::random::<u32>());
        let mut buf = [0u8; 512];
        // The first packet also sets the flow up: one retransmission.
        for _ in 0..2 {
            s.send(query.as_bytes()).await?;
            if let Ok(r) = tokio::time::timeout(Duration::from_secs(2), s.recv(&mut buf)).await {
                let reply = String::from_utf8_lossy(&buf[..r?]).to_string();
                let (name, echoed) = reply.split_once(':').context("bad reply")?;
                ensure!(echoed == query, "reply to another query: {reply}");
                return Ok(name.to_string());
            }
        }
        anyhow::bail!("no reply from {target}")
    })
}

/// Waits until edge1 captures the cloud pods' prefixes.
fn captured(lab: &NetnsLab) -> Result<()> {
    within(Duration::from_secs(10), || {
        let set = lab.exec(
            Role::Edge1,
            &["nft", "list", "set", "inet", "edge_relay", "dst4"],
        )?;
        Ok(set.contains("10.244.1.0/24") && set.contains("10.244.2.0/24"))
    })
    .context("edge1 never captured the cloud pods")?;
    Ok(())
}

/// epod1:41000 asks cpod1, is answered, stays quiet past conntrack's UDP
/// timeout, then asks cpod2 from the same port: cpod2 must answer.
#[test]
fn a_client_port_reused_after_conntrack_forgot_it_reaches_its_new_destination() -> Result<()> {
    let Some((_t0, lab, pki)) = netns_start("client port reused for a new destination")? else {
        return Ok(());
    };
    let _svcs = [
        services(&lab, Role::Cpod1, "cpod1")?,
        services(&lab, Role::Cpod2, "cpod2")?,
    ];
    // Per network namespace since Linux 3.x: the edge reads it at start.
    let sysctl = "/proc/sys/net/netfilter/nf_conntrack_udp_timeout";
    lab.exec(
        Role::Edge1,
        &["sh", "-c", &format!("echo {CT_TIMEOUT_SECS} > {sysctl}")],
    )?;
    let here = lab.exec(Role::Edge1, &["cat", sysctl])?;
    ensure!(
        here.trim() == CT_TIMEOUT_SECS.to_string(),
        "edge1's nf_conntrack_udp_timeout is {here:?}"
    );
    let elsewhere = lab.exec(Role::Relay, &["cat", sysctl])?;
    ensure!(
        elsewhere.trim() != CT_TIMEOUT_SECS.to_string(),
        "the sysctl is not per namespace here ({elsewhere:?} on the relay)"
    );
    let relay = start_relay(&lab, relay_config_in(&lab, &pki)?)?;
    // The default 60 s udp_idle: longer than conntrack's 5 s.
    let edge1 = start_edge(&lab, 1, edge_config_in(&lab, &pki, 1)?)?;
    captured(&lab)?;
    let (cpod1, cpod2) = (sa(netns::CPOD1_IP, DNS), sa(netns::CPOD2_IP, DNS));
    let first = query_from_port(&lab, Role::Epod1, 41000, cpod1)?;
    ensure!(first == "cpod1", "cpod1 asked, {first} answered");
    // The entry (one query, one answer) expires 5 s after the answer.
    std::thread::sleep(Duration::from_secs(CT_TIMEOUT_SECS) + Duration::from_millis(1500));
    let entries = lab.exec(Role::Edge1, &["conntrack", "-L", "-p", "udp"]);
    let second = query_from_port(&lab, Role::Epod1, 41000, cpod2)?;
    ensure!(
        second == "cpod2",
        "cpod2 asked from the port cpod1 was asked from {CT_TIMEOUT_SECS}.5 s before, \
         {second} answered (conntrack before: {entries:?})"
    );
    edge1.stop()?;
    relay.stop()?;
    Ok(())
}

/// The push server's port on cpod2.
const PUSH: u16 = 5400;

/// A server that answers any datagram with `count` datagrams, one per
/// 100 ms, to its sender.
fn push_server(lab: &NetnsLab, count: usize) -> Result<Running> {
    launch(lab, Role::Cpod2, "push", move |ready, stop| async move {
        let udp = Arc::new(UdpSocket::bind(sa(Ipv4Addr::UNSPECIFIED, PUSH)).await?);
        let h = tokio::spawn(async move {
            let mut buf = [0u8; 512];
            while let Ok((_, from)) = udp.recv_from(&mut buf).await {
                let u = udp.clone();
                tokio::spawn(async move {
                    for i in 0..count {
                        let _ = u.send_to(format!("push{i}").as_bytes(), from).await;
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                });
            }
        });
        let _ = ready.send(Ok(()));
        let _ = stop.await;
        h.abort();
        Ok(())
    })
}

/// At max_udp_flows = 3, epod1 subscribes to cpod2's push server, then
/// sends four DNS queries from new ports: the pushes must keep arriving.
#[test]
fn a_server_push_flow_survives_a_burst_of_new_flows() -> Result<()> {
    let Some((_t0, lab, pki)) = netns_start("push flow against eviction")? else {
        return Ok(());
    };
    let _svcs = [services(&lab, Role::Cpod2, "cpod2")?];
    let _push = push_server(&lab, 70)?;
    let relay = start_relay(&lab, relay_config_in(&lab, &pki)?)?;
    let mut ec = edge_config_in(&lab, &pki, 1)?;
    ec.capture
        .as_mut()
        .context("lab edge without capture")?
        .max_udp_flows = 3;
    ec.status_listen = Some(EDGE_STATUS);
    let edge1 = start_edge(&lab, 1, ec)?;
    captured(&lab)?;
    let target = sa(netns::CPOD2_IP, PUSH);
    // The client listens this long after the first push; the burst
    // starts 3 s after it, once the flow is a stream (traffic both ways
    // past its first 2 s, as conntrack marks an entry assured, and past
    // the capture's 250 ms slack on that: at 2.3 s, the last push before
    // the burst could still fall short of it on a busy machine, and the
    // push flow was evicted as a non-stream in 1 CI run of several).
    let listen = Duration::from_millis(6000);
    let (first_tx, first_rx) = std::sync::mpsc::channel();
    let (pushes, burst_end) = std::thread::scope(|s| -> Result<_> {
        let client = s.spawn(|| {
            lab.run_in(Role::Epod1, Duration::from_secs(15), move || async move {
                let s = UdpSocket::bind(sa(Ipv4Addr::UNSPECIFIED, 0)).await?;
                s.connect(target).await?;
                s.send(b"subscribe").await?;
                let mut buf = [0u8; 64];
                let n = tokio::time::timeout(Duration::from_secs(5), s.recv(&mut buf))
                    .await
                    .context("no first push")??;
                let first = Instant::now();
                let _ = first_tx.send(());
                let mut got = vec![(first, n)];
                while first.elapsed() < listen {
                    let wait = tokio::time::timeout(Duration::from_millis(200), s.recv(&mut buf));
                    if let Ok(Ok(n)) = wait.await {
                        got.push((Instant::now(), n));
                    }
                }
                Ok::<_, anyhow::Error>(got)
            })
        });
        // No first push: the client's error says so.
        if first_rx.recv_timeout(Duration::from_secs(6)).is_ok() {
            std::thread::sleep(Duration::from_millis(3000));
            for _ in 0..4 {
                let who =
                    udp_from(&lab, Role::Epod1, sa(netns::CPOD2_IP, DNS)).context("a DNS query")?;
                ensure!(who == "cpod2", "a DNS query answered by {who}");
            }
        }
        let burst_end = Instant::now();
        let pushes = client
            .join()
            .map_err(|_| anyhow::anyhow!("push client panicked"))??;
        Ok((pushes, burst_end))
    })?;
    let after = pushes.iter().filter(|(t, _)| *t > burst_end).count();
    let evicted = edge_metric(&lab, 1, "edge_udp_flows_evicted_total").context("edge metrics")?;
    ensure!(evicted >= 1.0, "no flow was evicted ({evicted})");
    // About 25 pushes arrive after the burst when the flow stays.
    ensure!(
        after >= 15,
        "the push flow went quiet after the burst: {} pushes in all, {after} after it \
         ({evicted} flows evicted)",
        pushes.len()
    );
    edge1.stop()?;
    relay.stop()?;
    Ok(())
}
