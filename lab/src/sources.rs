//! Capture by source, seen from outside: a host that is neither a node's
//! pod nor the node itself (a LAN device at an edge site, a WAN host)
//! must not get through the tunnel, even when it routes the tunnel's
//! prefixes through the node. The seed matrix's negative cells use
//! [`not_tunnelled`].

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use tokio::net::{TcpStream, UdpSocket};

use crate::netns::{NetnsLab, Proto, Role};
use crate::scenario::sa;

/// Flows the capture on `node` left uncaptured because of their source
/// (its `src_refused` counter).
pub fn refused_counter(lab: &NetnsLab, node: Role) -> Result<u64> {
    let out = lab.exec(
        node,
        &[
            "nft",
            "list",
            "counter",
            "inet",
            "edge_relay",
            "src_refused",
        ],
    )?;
    relay_transport::capture::parse_counter_packets(&out)
        .with_context(|| format!("no packet count in {out:?}"))
}

/// A host route in `from` for `to` via `gateway`, removed on drop (the
/// namespace goes with the lab anyway; this keeps later cells unaffected).
struct HostRoute<'a> {
    lab: &'a NetnsLab,
    from: Role,
    to: String,
}

impl<'a> HostRoute<'a> {
    fn add(lab: &'a NetnsLab, from: Role, to: Ipv4Addr, gateway: Ipv4Addr) -> Result<Self> {
        let to = format!("{to}/32");
        lab.exec(
            from,
            &["ip", "route", "add", &to, "via", &gateway.to_string()],
        )?;
        Ok(HostRoute { lab, from, to })
    }
}

impl Drop for HostRoute<'_> {
    fn drop(&mut self) {
        let _ = self.lab.exec(self.from, &["ip", "route", "del", &self.to]);
    }
}

/// Routes `target` from `from` via `gateway` (the node whose capture is
/// under test, `node`), tries it (an HTTP GET over TCP, or a query over
/// UDP, each bounded by 3 s) and expects no answer, with `node`'s capture
/// counting the flow as refused by source. The counter is what tells "not
/// captured because of the source" from "lost for another reason".
pub fn not_tunnelled(
    lab: &NetnsLab,
    from: Role,
    gateway: Ipv4Addr,
    node: Role,
    target: SocketAddr,
    proto: Proto,
) -> Result<String> {
    let SocketAddr::V4(t4) = target else {
        bail!("the lab is IPv4 only: {target}");
    };
    let before = refused_counter(lab, node)?;
    let _route = HostRoute::add(lab, from, *t4.ip(), gateway)?;
    let t = Instant::now();
    let answer = lab.run_in(from, Duration::from_secs(10), move || async move {
        let limit = Duration::from_secs(3);
        match proto {
            Proto::Tcp => {
                let s = tokio::time::timeout(limit, TcpStream::connect(target)).await??;
                let (code, body) =
                    tokio::time::timeout(limit, crate::http_get(s, &target.to_string(), "/", None))
                        .await??;
                Ok::<_, anyhow::Error>(format!("HTTP {code}: {}", body.trim_end()))
            }
            Proto::Udp => {
                let s = UdpSocket::bind(sa(Ipv4Addr::UNSPECIFIED, 0)).await?;
                s.connect(target).await?;
                s.send(b"query from a stranger").await?;
                let mut buf = [0u8; 512];
                let n = tokio::time::timeout(limit, s.recv(&mut buf)).await??;
                Ok(String::from_utf8_lossy(&buf[..n]).to_string())
            }
        }
    });
    let took = t.elapsed();
    if let Ok(reply) = answer {
        bail!("{from} reached {target} through {node}: {reply}");
    }
    let after = refused_counter(lab, node)?;
    ensure!(
        after > before,
        "no answer, but {node}'s capture did not count it as refused by source \
         (src_refused {before} → {after})"
    );
    Ok(format!(
        "no answer ({took:.1?}); {node} src_refused +{}",
        after - before
    ))
}
