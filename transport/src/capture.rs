//! Transparent capture of traffic towards a set of prefixes, with nftables
//! TPROXY and policy routing, in a table and a routing table of our own.
//!
//! What gets installed (names and numbers from [`CaptureConfig`]):
//! ```text
//! table inet <nft_table> {
//!   set dst4 { type ipv4_addr; flags interval; }      # the captured prefixes
//!   set dst6 { type ipv6_addr; flags interval; }
//!   set skip4, skip6                                   # never captured (own routes)
//!   chain pre { type filter hook prerouting priority mangle;
//!     ip daddr @skip4 return;  ip6 daddr @skip6 return
//!     ip  daddr @dst4 meta l4proto { tcp, udp } tproxy ip  to 127.0.0.1:<port> accept
//!     ip6 daddr @dst6 meta l4proto { tcp, udp } tproxy ip6 to [::1]:<port>     accept }
//! }
//! ip rule  fwmark <own_mark> lookup main      pref <rule_pref - 1>   # our own sockets bypass
//! ip rule  to <skip prefix> lookup main      pref <rule_pref - 1>   # one per skipped prefix
//! ip rule  to <prefix> lookup <route_table>   pref <rule_pref>       # one per captured prefix
//! ip route local default dev lo table <route_table>
//! ```
//! Forwarded packets (from pods, from other cloud nodes) are caught in
//! prerouting. Locally generated packets (hostNetwork processes) are routed
//! by the `to <prefix>` rules into the local table, loop through `lo`, and
//! are caught in prerouting there. The listener is bound to loopback, so
//! nothing reachable from the network listens.
//!
//! Everything is removed by [`Capture::teardown`], and [`Capture::install`]
//! first removes whatever a crashed previous run left.

use std::collections::BTreeSet;
use std::fmt::Write;
use std::time::Duration;

use relay_protocol::Cidr;
use tokio::io::AsyncWriteExt;
use tokio::process::Command;
use tracing::{debug, warn};

/// Names and numbers of what capture installs.
#[derive(Debug, Clone)]
pub struct CaptureConfig {
    /// nftables table name (family `inet`).
    pub nft_table: String,
    /// Routing table holding the `local default dev lo` route.
    pub route_table: u32,
    /// Priority of the per-prefix rules; the own-socket bypass uses one less.
    pub rule_pref: u32,
    /// Port of the transparent listeners (TCP and UDP), on loopback.
    pub port: u16,
    /// Firewall mark of our own sockets, which must never be captured.
    pub own_mark: u32,
}

impl Default for CaptureConfig {
    fn default() -> Self {
        CaptureConfig {
            nft_table: "edge_relay".into(),
            route_table: 7100,
            rule_pref: 7100,
            port: 15001,
            own_mark: 0x7100,
        }
    }
}

/// The `[capture]` section of either side's config file.
#[derive(Debug, serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct CaptureFile {
    /// Install capture (default false).
    #[serde(default)]
    pub enabled: bool,
    /// Transparent listener port on loopback (default 15001).
    pub port: Option<u16>,
    /// nftables table name (default `edge_relay`).
    pub nft_table: Option<String>,
    /// Routing table id (default 7100).
    pub route_table: Option<u32>,
    /// Policy rule priority (default 7100; the bypass rules use one less).
    pub rule_pref: Option<u32>,
    /// Firewall mark of our own sockets (default 0x7100).
    pub mark: Option<u32>,
}

impl CaptureFile {
    /// The capture config if enabled; errors are `(field, message)` with
    /// the field relative to `[capture]`.
    pub fn resolve(&self) -> Result<Option<CaptureConfig>, (&'static str, String)> {
        if !self.enabled {
            return Ok(None);
        }
        let d = CaptureConfig::default();
        let c = CaptureConfig {
            nft_table: self.nft_table.clone().unwrap_or(d.nft_table),
            route_table: self.route_table.unwrap_or(d.route_table),
            rule_pref: self.rule_pref.unwrap_or(d.rule_pref),
            port: self.port.unwrap_or(d.port),
            own_mark: self.mark.unwrap_or(d.own_mark),
        };
        if c.port == 0 {
            return Err(("port", "must not be 0".into()));
        }
        if c.nft_table.is_empty()
            || !c
                .nft_table
                .chars()
                .all(|ch| ch.is_ascii_alphanumeric() || ch == '_')
        {
            return Err(("nft_table", "letters, digits and _ only".into()));
        }
        if [0, 253, 254, 255].contains(&c.route_table) {
            return Err((
                "route_table",
                "0, 253, 254, 255 are the kernel's tables".into(),
            ));
        }
        if c.rule_pref < 2 || c.rule_pref >= 32766 {
            return Err((
                "rule_pref",
                "must be between 2 and 32765 (before the main table)".into(),
            ));
        }
        if c.own_mark == 0 {
            return Err(("mark", "must not be 0".into()));
        }
        Ok(Some(c))
    }
}

/// A capture command failed.
#[derive(Debug, thiserror::Error)]
#[error("{cmd}: {msg}")]
pub struct CaptureError {
    /// The command line (or script name) that failed.
    pub cmd: String,
    /// Its error output.
    pub msg: String,
}

/// Runs a command with a bound, feeding `stdin`; fails with its stderr.
async fn run(prog: &str, args: &[&str], stdin: Option<&str>) -> Result<(), CaptureError> {
    let cmd = format!("{prog} {}", args.join(" "));
    let fail = |msg: String| CaptureError {
        cmd: cmd.clone(),
        msg,
    };
    let mut c = Command::new(prog);
    c.args(args)
        .stdin(if stdin.is_some() {
            std::process::Stdio::piped()
        } else {
            std::process::Stdio::null()
        })
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let mut child = c.spawn().map_err(|e| fail(e.to_string()))?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes())
            .await
            .map_err(|e| fail(e.to_string()))?;
        drop(pipe);
    }
    let out = tokio::time::timeout(Duration::from_secs(10), child.wait_with_output())
        .await
        .map_err(|_| fail("timed out after 10s".into()))?
        .map_err(|e| fail(e.to_string()))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(fail(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ))
    }
}

/// Installed capture state; [`Capture::apply`] moves it to a new prefix set.
#[derive(Debug)]
pub struct Capture {
    cfg: CaptureConfig,
    installed: BTreeSet<Cidr>,
    skipped: BTreeSet<Cidr>,
}

impl Capture {
    /// Removes leftovers of a previous run, then installs the table, the
    /// bypass rule and the local route, with no prefix captured yet.
    pub async fn install(cfg: CaptureConfig) -> Result<Capture, CaptureError> {
        remove_all(&cfg).await;
        let t = &cfg.nft_table;
        let p = cfg.port;
        let script = format!(
            "table inet {t} {{\n\
             set dst4 {{ type ipv4_addr; flags interval; }}\n\
             set dst6 {{ type ipv6_addr; flags interval; }}\n\
             set skip4 {{ type ipv4_addr; flags interval; }}\n\
             set skip6 {{ type ipv6_addr; flags interval; }}\n\
             chain pre {{ type filter hook prerouting priority mangle; policy accept;\n\
             ip daddr @skip4 return\n\
             ip6 daddr @skip6 return\n\
             ip daddr @dst4 meta l4proto {{ tcp, udp }} tproxy ip to 127.0.0.1:{p} accept\n\
             ip6 daddr @dst6 meta l4proto {{ tcp, udp }} tproxy ip6 to [::1]:{p} accept\n\
             }}\n}}\n"
        );
        run("nft", &["-f", "-"], Some(&script)).await?;
        let table = cfg.route_table.to_string();
        let mark = format!("{:#x}", cfg.own_mark);
        let bypass = (cfg.rule_pref - 1).to_string();
        run(
            "ip",
            &[
                "-4", "rule", "add", "fwmark", &mark, "lookup", "main", "pref", &bypass,
            ],
            None,
        )
        .await?;
        run(
            "ip",
            &[
                "-4",
                "route",
                "add",
                "local",
                "0.0.0.0/0",
                "dev",
                "lo",
                "table",
                &table,
            ],
            None,
        )
        .await?;
        // IPv6 may be disabled in a namespace or host; IPv4 capture still works.
        if let Err(e) = async {
            run(
                "ip",
                &[
                    "-6", "rule", "add", "fwmark", &mark, "lookup", "main", "pref", &bypass,
                ],
                None,
            )
            .await?;
            run(
                "ip",
                &[
                    "-6", "route", "add", "local", "::/0", "dev", "lo", "table", &table,
                ],
                None,
            )
            .await
        }
        .await
        {
            warn!(error = %e, "IPv6 capture unavailable");
        }
        Ok(Capture {
            cfg,
            installed: BTreeSet::new(),
            skipped: BTreeSet::new(),
        })
    }

    /// The configuration in force.
    pub fn config(&self) -> &CaptureConfig {
        &self.cfg
    }

    /// The prefixes captured now.
    pub fn installed(&self) -> &BTreeSet<Cidr> {
        &self.installed
    }

    /// Captures exactly `want`.
    ///
    /// The nft sets are rewritten whole in one transaction (`flush` + `add`
    /// in a single `nft -f`, so there is no instant with an empty set):
    /// interval sets refuse overlapping elements, and a cluster range such
    /// as `10.244.0.0/16` legitimately overlaps per-node `/24`s, so the set
    /// gets the minimal cover of `want`. Policy rules may overlap and are
    /// changed by difference in one `ip -batch`.
    ///
    /// `skip` lists prefixes never to capture even inside a captured one
    /// (an edge's own pod CIDR inside the cluster range it sends to the
    /// relay): they return early in nft and have bypass rules ahead of the
    /// capture rules.
    pub async fn apply(
        &mut self,
        want: &BTreeSet<Cidr>,
        skip: &BTreeSet<Cidr>,
    ) -> Result<(), CaptureError> {
        if *want == self.installed && *skip == self.skipped {
            return Ok(());
        }
        let t = &self.cfg.nft_table;
        let mut nft = String::new();
        for (prefix, set) in [("dst", want), ("skip", skip)] {
            let cover = minimal_cover(set);
            for (v4, fam) in [(true, "4"), (false, "6")] {
                let _ = writeln!(nft, "flush set inet {t} {prefix}{fam}");
                let elems: Vec<String> = cover
                    .iter()
                    .filter(|c| c.addr().is_ipv4() == v4)
                    .map(|c| c.to_string())
                    .collect();
                if !elems.is_empty() {
                    let _ = writeln!(
                        nft,
                        "add element inet {t} {prefix}{fam} {{ {} }}",
                        elems.join(", ")
                    );
                }
            }
        }
        run("nft", &["-f", "-"], Some(&nft)).await?;
        let (table, pref) = (self.cfg.route_table, self.cfg.rule_pref);
        let bypass = pref - 1;
        for (fam, v4) in [("-4", true), ("-6", false)] {
            let mut rules = String::new();
            let of = |c: &&Cidr| c.addr().is_ipv4() == v4;
            for c in self.installed.difference(want).filter(of) {
                let _ = writeln!(rules, "rule del to {c} lookup {table} pref {pref}");
            }
            for c in self.skipped.difference(skip).filter(of) {
                let _ = writeln!(rules, "rule del to {c} lookup main pref {bypass}");
            }
            for c in want.difference(&self.installed).filter(of) {
                let _ = writeln!(rules, "rule add to {c} lookup {table} pref {pref}");
            }
            for c in skip.difference(&self.skipped).filter(of) {
                let _ = writeln!(rules, "rule add to {c} lookup main pref {bypass}");
            }
            if rules.is_empty() {
                continue;
            }
            // `-force` applies every line even if one fails (a rule that
            // already exists or is already gone); the sets above decide what
            // is caught, so a failed line is logged, not retried forever.
            if let Err(e) = run("ip", &[fam, "-force", "-batch", "-"], Some(&rules)).await {
                warn!(error = %e, "some policy rules did not apply");
            }
        }
        debug!(
            prefixes = want.len(),
            skipped = skip.len(),
            "capture updated"
        );
        self.installed = want.clone();
        self.skipped = skip.clone();
        Ok(())
    }

    /// Removes everything capture installed.
    pub async fn teardown(self) {
        remove_all(&self.cfg).await;
    }
}

/// Removes our table, our rules and our routing table's routes; every step
/// is allowed to find nothing.
async fn remove_all(cfg: &CaptureConfig) {
    let _ = run("nft", &["delete", "table", "inet", &cfg.nft_table], None).await;
    let table = cfg.route_table.to_string();
    for fam in ["-4", "-6"] {
        // Delete every rule pointing at our table or at our bypass priority;
        // bounded, since each round removes at least one rule.
        for _ in 0..100_000 {
            if run("ip", &[fam, "rule", "del", "lookup", &table], None)
                .await
                .is_err()
            {
                break;
            }
        }
        let bypass = (cfg.rule_pref - 1).to_string();
        for _ in 0..100 {
            if run("ip", &[fam, "rule", "del", "pref", &bypass], None)
                .await
                .is_err()
            {
                break;
            }
        }
        let _ = run("ip", &[fam, "route", "flush", "table", &table], None).await;
    }
}

/// The prefixes of `set` not contained in another prefix of `set`.
pub fn minimal_cover(set: &BTreeSet<Cidr>) -> Vec<Cidr> {
    let mut by_len: Vec<Cidr> = set.iter().copied().collect();
    by_len.sort_by_key(|c| c.prefix_len());
    let mut kept: Vec<Cidr> = Vec::new();
    for c in by_len {
        if !kept.iter().any(|k| k.contains_cidr(&c)) {
            kept.push(c);
        }
    }
    kept
}

/// Marks a socket as ours so capture never catches its traffic (needs
/// CAP_NET_ADMIN; a no-op when `mark` is 0).
pub fn mark_socket(sock: socket2::SockRef<'_>, mark: u32) -> std::io::Result<()> {
    if mark == 0 {
        return Ok(());
    }
    sock.set_mark(mark)
}

/// A TCP listener for captured connections: `IP_TRANSPARENT`, bound to
/// loopback (`127.0.0.1:port` or `[::1]:port`). An accepted socket's local
/// address is the connection's original destination.
pub fn transparent_tcp_listener(
    addr: std::net::SocketAddr,
) -> std::io::Result<tokio::net::TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if addr.is_ipv4() {
        s.set_ip_transparent_v4(true)?;
    } else {
        s.set_only_v6(true)?;
        s.set_ip_transparent_v6(true)?;
    }
    s.set_reuse_address(true)?;
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    s.listen(1024)?;
    tokio::net::TcpListener::from_std(s.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cover_drops_contained_prefixes() {
        let set: BTreeSet<Cidr> = [
            "10.244.0.0/16",
            "10.244.7.0/24",
            "10.96.0.0/12",
            "10.244.7.5/32",
            "fd00::/64",
            "fd00::1/128",
        ]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
        let mut cover: Vec<String> = minimal_cover(&set).iter().map(|c| c.to_string()).collect();
        cover.sort();
        assert_eq!(cover, ["10.244.0.0/16", "10.96.0.0/12", "fd00::/64"]);
    }
}
