//! What the scenario tests ask the lab from the outside: clients that
//! report what they reached (HTTP, CONNECT through the relay, a DNS-sized
//! UDP query, a connection expected to fail fast) and calls to the relay's
//! admin API (sessions, captured prefixes).
//!
//! Each runs inside a namespace through [`NetnsLab::run_in`], bounded, and
//! answers with what it saw, so a test can put it in a [`super::Table`]
//! cell rather than stop at the first failure.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use relay_server::admin::SessionRow;
use tokio::net::{TcpStream, UdpSocket};

use super::{sa, ADMIN_PORT, ADMIN_TOKEN, CONNECT_PORT};
use crate::netns::{self, NetnsLab, Role};

/// `method path` on the relay's admin API (with [`ADMIN_TOKEN`]), from
/// inside the relay node; returns `(status, body)`.
pub fn admin_call(
    lab: &NetnsLab,
    method: &'static str,
    path: impl Into<String>,
) -> Result<(u16, String)> {
    let path = path.into();
    lab.run_in(Role::Relay, Duration::from_secs(10), move || async move {
        let s = TcpStream::connect(sa(netns::RELAY_LAN_IP, ADMIN_PORT)).await?;
        crate::http_request(s, method, "admin", &path, Some(ADMIN_TOKEN)).await
    })
}

/// `GET path` on the relay's admin API; anything but 200 is an error.
pub fn admin(lab: &NetnsLab, path: &'static str) -> Result<String> {
    let (code, body) = admin_call(lab, "GET", path)?;
    anyhow::ensure!(code == 200, "{path}: HTTP {code}");
    Ok(body)
}

/// The relay's count of Service resolutions, summed over its labels: a
/// connection the relay was not asked about leaves it unchanged.
pub fn service_resolutions(lab: &NetnsLab) -> Result<u64> {
    Ok(admin(lab, "/metrics")?
        .lines()
        .filter(|l| l.starts_with("relay_service_resolutions_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum())
}

/// The value of one series of the relay's `/metrics`, unlabelled
/// (`relay_udp_flows`) or with its labels (`relay_udp_dropped_total{reason="oversize"}`);
/// an error when the relay does not export it.
pub fn metric(lab: &NetnsLab, series: &str) -> Result<f64> {
    crate::metric_sample(&admin(lab, "/metrics")?, series)
        .with_context(|| format!("no {series} in /metrics"))
}

/// The relay's sessions (`GET /v1/sessions`).
pub fn sessions(lab: &NetnsLab) -> Result<Vec<SessionRow>> {
    Ok(serde_json::from_str(&admin(lab, "/v1/sessions")?)?)
}

/// One node's session (`GET /v1/sessions/{node}`), `None` if it has none.
pub fn session(lab: &NetnsLab, node: &str) -> Result<Option<SessionRow>> {
    match admin_call(lab, "GET", format!("/v1/sessions/{node}"))? {
        (200, body) => Ok(Some(serde_json::from_str(&body)?)),
        (404, _) => Ok(None),
        (code, body) => bail!("GET /v1/sessions/{node}: HTTP {code}: {body}"),
    }
}

/// `GET path` on edge host `site`'s status endpoint, which its edge must
/// have been started with on [`EDGE_STATUS`](super::EDGE_STATUS).
fn edge_status(lab: &NetnsLab, site: u8, path: &'static str) -> Result<(u16, String)> {
    lab.run_in(Role::edge(site)?, Duration::from_secs(2), move || {
        crate::admin_get(super::EDGE_STATUS, path, None)
    })
}

/// Whether edge host `site`'s edge client says it is connected (`GET
/// /readyz`; the edge must have been started with its status endpoint on
/// [`EDGE_STATUS`](super::EDGE_STATUS)).
pub fn edge_ready(lab: &NetnsLab, site: u8) -> Result<bool> {
    edge_readiness(lab, site).map(|(ready, _)| ready)
}

/// [`edge_ready`] with the body: what the edge says it is doing (while
/// not ready: the attempt, and why its last session ended).
pub fn edge_readiness(lab: &NetnsLab, site: u8) -> Result<(bool, String)> {
    match edge_status(lab, site, "/readyz")? {
        (200, body) => Ok((true, body)),
        (503, body) => Ok((false, body)),
        (code, body) => bail!("edge{site} GET /readyz: HTTP {code}: {body}"),
    }
}

/// One series of edge host `site`'s `/metrics` (status endpoint on
/// [`EDGE_STATUS`](super::EDGE_STATUS)).
pub fn edge_metric(lab: &NetnsLab, site: u8, series: &str) -> Result<f64> {
    let (code, body) = edge_status(lab, site, "/metrics")?;
    anyhow::ensure!(code == 200, "edge{site} GET /metrics: HTTP {code}");
    crate::metric_sample(&body, series)
        .with_context(|| format!("no {series} in edge{site}'s /metrics"))
}

/// The prefixes the relay node captures now (`nft list set inet
/// edge_relay dst4`); empty when the table does not exist.
pub fn captured_prefixes(lab: &NetnsLab) -> Result<String> {
    capture_set(lab, Role::Relay)
}

/// The destinations `role` (the relay node or an edge node) captures now
/// (`nft list set inet edge_relay dst4`); empty when the table does not
/// exist.
pub fn capture_set(lab: &NetnsLab, role: Role) -> Result<String> {
    let tables = lab.exec(role, &["nft", "list", "tables"])?;
    // Not `edge_relay_held`, the table a stopped process leaves.
    if !tables.lines().any(|l| l.trim() == "table inet edge_relay") {
        return Ok(String::new());
    }
    lab.exec(role, &["nft", "list", "set", "inet", "edge_relay", "dst4"])
}

/// Waits up to `limit` until `role`'s capture covers `ip`; how long it
/// took. Capture is installed asynchronously once a session is up: the
/// relay's for the edge's routes, an edge's from the route list the
/// relay sends it, which may land after the edge reports itself
/// connected. A first probe towards `ip` from behind `role` made before
/// that leaves through the node's own routes instead (an unreachable
/// network, or a SYN whose retries follow the conntrack entry it made),
/// so it waits for this first.
pub fn wait_captured(
    lab: &NetnsLab,
    role: Role,
    ip: Ipv4Addr,
    limit: Duration,
) -> Result<Duration> {
    let t = Instant::now();
    loop {
        // A failed look (the table replaced between two commands) is a
        // "not yet"; the last one is reported if the time runs out.
        let look = capture_set(lab, role);
        if look.as_ref().is_ok_and(|set| set_covers(set, ip)) {
            return Ok(t.elapsed());
        }
        if t.elapsed() >= limit {
            let why = look
                .err()
                .map_or(String::new(), |e| format!(" (last look: {e:#})"));
            bail!("{role:?} did not capture {ip} within {limit:?}{why}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Whether the elements of an `nft list set` output (prefixes, addresses,
/// ranges) cover `ip`.
pub fn set_covers(set: &str, ip: Ipv4Addr) -> bool {
    let Some((_, rest)) = set.split_once("elements = {") else {
        return false;
    };
    let elements = rest.split('}').next().unwrap_or_default();
    elements
        .split(|c: char| c == ',' || c.is_whitespace())
        .filter(|e| !e.is_empty())
        .any(|e| {
            let (lo, hi) = if let Some((a, b)) = e.split_once('-') {
                match (a.parse::<Ipv4Addr>(), b.parse::<Ipv4Addr>()) {
                    (Ok(a), Ok(b)) => (u32::from(a), u32::from(b)),
                    _ => return false,
                }
            } else if let Some((a, len)) = e.split_once('/') {
                match (a.parse::<Ipv4Addr>(), len.parse::<u32>()) {
                    (Ok(a), Ok(len)) if len <= 32 => {
                        let size = 1u64 << (32 - len);
                        let lo = u32::from(a);
                        (lo, (lo as u64 + size - 1) as u32)
                    }
                    _ => return false,
                }
            } else {
                match e.parse::<Ipv4Addr>() {
                    Ok(a) => (u32::from(a), u32::from(a)),
                    Err(_) => return false,
                }
            };
            (lo..=hi).contains(&u32::from(ip))
        })
}

/// Fetches `/` from `target` over plain TCP from inside `ns`; returns the body.
pub fn http_from(lab: &NetnsLab, ns: Role, target: SocketAddr) -> Result<String> {
    lab.run_in(ns, Duration::from_secs(15), move || async move {
        let s = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(target))
            .await
            .context("connect timed out")??;
        let (code, body) = crate::http_get(s, &target.to_string(), "/", None).await?;
        anyhow::ensure!(code == 200, "HTTP {code}");
        Ok(body.trim_end().to_string())
    })
}

/// CONNECT through the relay's ingress from inside `ns`, then GET.
/// A refusal is an error holding a [`crate::Refused`].
pub fn connect_from(lab: &NetnsLab, ns: Role, authority: &'static str) -> Result<String> {
    lab.run_in(ns, Duration::from_secs(15), move || async move {
        let s = crate::connect_via(sa(netns::RELAY_LAN_IP, CONNECT_PORT), authority).await?;
        let (code, body) = crate::http_get(s, authority, "/", None).await?;
        anyhow::ensure!(code == 200, "HTTP {code}");
        Ok(body.trim_end().to_string())
    })
}

/// A CONNECT from inside `ns` that the relay must refuse within `limit`,
/// with `reason` in its status line (a label such as `relay_itself`, or
/// any text of the message); how long the refusal took.
pub fn connect_refused(
    lab: &NetnsLab,
    ns: Role,
    authority: &'static str,
    limit: Duration,
    reason: &str,
) -> Result<Duration> {
    let t = Instant::now();
    match connect_from(lab, ns, authority) {
        Ok(body) => bail!("reached {authority} ({body})"),
        Err(e) if t.elapsed() > limit => bail!("refused, but only after {:?}: {e:#}", t.elapsed()),
        Err(e) if format!("{e:#}").contains(reason) => Ok(t.elapsed()),
        Err(e) => bail!("refused, but not for {reason:?}: {e:#}"),
    }
}

/// Waits (at most 10 s each) until every `(ns, vip)` is answered by a
/// UDP query from inside `ns` ([`udp_from`]): the Services are captured
/// and reachable before a test starts its clients.
pub fn until_udp_answered(lab: &NetnsLab, pairs: &[(Role, SocketAddr)]) -> Result<()> {
    for &(ns, vip) in pairs {
        super::within(Duration::from_secs(10), || {
            Ok(udp_from(lab, ns, vip).is_ok())
        })
        .with_context(|| format!("{ns} never answered by {vip}"))?;
    }
    Ok(())
}

/// One DNS-sized UDP query and its reply, from inside `ns`.
pub fn udp_from(lab: &NetnsLab, ns: Role, target: SocketAddr) -> Result<String> {
    lab.run_in(ns, Duration::from_secs(15), move || async move {
        let s = UdpSocket::bind(sa(Ipv4Addr::UNSPECIFIED, 0)).await?;
        s.connect(target).await?;
        // A 48-byte query, the size of a small DNS question.
        let query = format!("q{:046}", rand::random::<u32>());
        let mut buf = [0u8; 512];
        // The first packet also sets the flow up; one retransmission, as a
        // DNS resolver would, and no more.
        for _ in 0..2 {
            s.send(query.as_bytes()).await?;
            if let Ok(r) = tokio::time::timeout(Duration::from_secs(3), s.recv(&mut buf)).await {
                let n = r?;
                let reply = String::from_utf8_lossy(&buf[..n]).to_string();
                let (name, echoed) = reply.split_once(':').context("bad reply")?;
                anyhow::ensure!(echoed == query, "reply to another query");
                return Ok(name.to_string());
            }
        }
        bail!("no UDP reply")
    })
}

/// Expects a connection attempt to fail (refused, unreachable or reset)
/// within `limit`; returns how long it took.
pub fn fails_fast(
    lab: &NetnsLab,
    ns: Role,
    target: SocketAddr,
    limit: Duration,
) -> Result<Duration> {
    let t = Instant::now();
    match http_from(lab, ns, target) {
        Ok(body) => bail!("reached {target} ({body})"),
        Err(_) if t.elapsed() <= limit => Ok(t.elapsed()),
        Err(e) => bail!("failed, but only after {:?}: {e:#}", t.elapsed()),
    }
}

/// One query of [`udp_client`]: when it was sent (since the client
/// started), and who answered it (the name before `:` in the answer), if
/// anyone did.
pub type UdpSample = (Duration, Option<String>);

/// A UDP client in `ns` that keeps one connected socket to `target` (as a
/// metrics agent, a syslog or statsd sender does) and sends a query every
/// 100 ms for `span`, waiting up to 300 ms for each answer (an answer
/// echoing another query is not its answer): its log, once done.
pub fn udp_client(
    lab: &NetnsLab,
    ns: Role,
    target: SocketAddr,
    span: Duration,
) -> std::thread::JoinHandle<Result<Vec<UdpSample>>> {
    lab.spawn_in(ns, move || async move {
        let s = UdpSocket::bind(sa(Ipv4Addr::UNSPECIFIED, 0)).await?;
        s.connect(target).await?;
        let t = Instant::now();
        let mut out = Vec::new();
        let mut buf = [0u8; 512];
        let mut n = 0u32;
        while t.elapsed() < span {
            n += 1;
            let query = format!("q{n:08}");
            let at = t.elapsed();
            let sent = tokio::time::Instant::now();
            s.send(query.as_bytes()).await?;
            let deadline = sent + Duration::from_millis(300);
            let mut who = None;
            while let Ok(Ok(k)) = tokio::time::timeout_at(deadline, s.recv(&mut buf)).await {
                let reply = String::from_utf8_lossy(&buf[..k]).to_string();
                if let Some((name, echoed)) = reply.split_once(':') {
                    if echoed == query {
                        who = Some(name.to_string());
                        break;
                    }
                }
            }
            out.push((at, who));
            tokio::time::sleep_until(sent + Duration::from_millis(100)).await;
        }
        Ok(out)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Prefixes, single addresses and ranges, over several lines as nft
    /// prints them; a set without elements covers nothing.
    #[test]
    fn set_elements_cover_what_they_say() {
        let set = "table inet edge_relay {\n\tset dst4 {\n\t\ttype ipv4_addr\n\t\tflags interval\n\t\telements = { 10.244.1.0/24, 10.244.2.0/24,\n\t\t\t     192.168.1.10, 10.0.0.5-10.0.0.9 }\n\t}\n}\n";
        let covers = |ip: &str| set_covers(set, ip.parse().unwrap());
        assert!(covers("10.244.1.0") && covers("10.244.2.255"));
        assert!(!covers("10.244.3.1") && !covers("10.244.0.255"));
        assert!(covers("192.168.1.10") && !covers("192.168.1.11"));
        assert!(covers("10.0.0.5") && covers("10.0.0.9") && !covers("10.0.0.10"));
        let empty = "table inet edge_relay {\n\tset dst4 {\n\t\ttype ipv4_addr\n\t}\n}\n";
        assert!(!set_covers(empty, "10.244.1.1".parse().unwrap()));
        assert!(set_covers(
            "elements = { 0.0.0.0/0 }",
            "8.8.8.8".parse().unwrap()
        ));
    }
}
