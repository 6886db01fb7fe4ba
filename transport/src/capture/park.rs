//! What a clean exit leaves ([`Capture::stop`]): the capture address on
//! `lo` (see `remove_on_exit`), and for `hold_after_exit`,
//! filter rules that refuse traffic to the prefixes capture took, so that
//! between this process and the next (a DaemonSet rollout pulling its new
//! image over a cellular uplink, a restart after a config change) a pod's
//! connection to a cloud pod fails at once instead of leaving by the
//! node's default route, where a site LAN reusing the cluster's ranges
//! could answer it. The prefixes sit in sets whose elements time out, so
//! an uninstalled client's rules stop refusing on their own.
//!
//! The refusals live in a table of their own (`<nft_table>_held`), not in
//! the capture table: [`Capture::install`] replaces the capture table, and
//! had it removed the refusals too, a starting process would let pod
//! traffic to the tunnel routes out by the default route from its install
//! until its first [`Capture::apply`] (a proxy name to look up, the
//! service sets to write first: up to a second or more). The first
//! successful apply removes the held table (the filter hooks see captured
//! traffic already rewritten to the capture address, so the two can be on
//! the node together: the held rules refuse only what is not captured
//! yet).
//!
//! ```text
//! table inet <nft_table>_held {
//!   set dst4  { type ipv4_addr; flags interval,timeout; timeout <hold>; }  # what was captured
//!   set skip4 { type ipv4_addr; flags interval; }                          # never refused
//!   set src4  { type ipv4_addr; flags interval; }                          # forwarded sources
//!   # with the IPv6 refusal on the node at the stop (see capture/refuse6.rs): what it refused
//!   set dst6  { type ipv6_addr; flags interval,timeout; timeout <hold>; }  # the IPv6 tunnel prefixes
//!   set skip6 { type ipv6_addr; flags interval; }                          # never refused
//!   set src6  { type ipv6_addr; flags interval; }                          # forwarded sources (::/0: all)
//!   # <never>: loopback, link-local, multicast, NAT64's prefixes (refuse6::NEVER)
//!   chain held_fwd { type filter hook forward priority filter;
//!     ip daddr @skip4 return
//!     ip daddr @dst4 ip saddr @src4 meta l4proto tcp reject with tcp reset
//!     ip daddr @dst4 ip saddr @src4 reject with icmpx admin-prohibited
//!     ip6 daddr { <never> } return                       # IPv6 refusal only
//!     ip6 daddr @skip6 return
//!     ip6 daddr @dst6 ip6 saddr @src6 meta l4proto tcp reject with tcp reset
//!     ip6 daddr @dst6 ip6 saddr @src6 reject with icmpx admin-prohibited }
//!   chain held_out { type filter hook output priority filter;
//!     meta mark <own_mark> return
//!     ip daddr @skip4 return
//!     ip daddr @dst4 meta l4proto tcp reject with tcp reset
//!     ip daddr @dst4 reject with icmpx admin-prohibited
//!     ip6 daddr { <never> } return                       # IPv6 refusal only
//!     ip6 daddr @skip6 return
//!     ip6 daddr @dst6 meta l4proto tcp reject with tcp reset
//!     ip6 daddr @dst6 reject with icmpx admin-prohibited }
//! }
//! ```
//! The IPv6 part is there when the stopping process's capture table
//! refused the tunnel's IPv6 prefixes (an edge's, on a kernel that took
//! those rules): without it, between two processes those prefixes would
//! leave by the default route again, as they did before the refusal.
//!
//! Filter chains see a ClusterIP's traffic after kube-proxy's DNAT, so a
//! Service whose endpoints are cloud pods is refused too, and one whose
//! endpoints are on this node is not. An older release kept these chains
//! in the capture table itself; the first start after an upgrade removes
//! them with it at install.

use std::collections::BTreeSet;
use std::fmt::Write;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use relay_protocol::Cidr;
use tracing::{debug, info, warn};

use super::refuse6::NEVER;
use super::{cover_list, remove_on_exit, remove_routing, run, Capture};

impl Capture {
    /// Ends capture on a clean exit: removes it, and for
    /// `hold_after_exit` refuses what it took, and what its IPv6 refusal
    /// refused (see the module docs). With nothing captured or refused, a
    /// zero hold, or a kernel that refuses the held rules, everything is
    /// simply removed.
    pub async fn stop(self) {
        let hold = self.cfg.hold_after_exit;
        let v6 = self.refuse6.held();
        let refused6 = v6.as_ref().map_or(0, |v6| v6.dst.len());
        if hold.is_zero() || (self.installed.is_empty() && refused6 == 0) {
            remove_on_exit(&self.cfg).await;
            return;
        }
        // The capture table is replaced by the held one in one transaction
        // (`add` first, so that `delete` finds a table to delete): between
        // two commands a pod's new connection would leave by the default
        // route, refused by neither.
        let t = &self.cfg.nft_table;
        let h = held_table(&self.cfg);
        let script = format!(
            "add table inet {t}\ndelete table inet {t}\nadd table inet {h}\ndelete table inet {h}\n"
        ) + &held_script(
            &h,
            self.cfg.own_mark,
            hold.as_secs().max(1),
            &self.installed,
            &self.skipped,
            self.sources.as_ref(),
            v6.as_ref(),
        );
        match run("nft", &["-f", "-"], Some(&script)).await {
            Ok(()) => {
                remove_routing(&self.cfg).await;
                info!(
                    prefixes = self.installed.len(),
                    ipv6_prefixes = refused6,
                    hold_secs = hold.as_secs(),
                    "capture removed; traffic to its prefixes is refused until the next start captures them or the hold ends"
                );
            }
            Err(e) => {
                warn!(error = %e, "could not leave the held rules; capture removed");
                remove_on_exit(&self.cfg).await;
            }
        }
    }

    /// Removes a previous run's held table, once per run (see the module
    /// docs): called when an apply succeeded, so what the refusals
    /// covered is captured again or no longer wanted. A failure other than
    /// "no such table" is tried again at the next apply; the held set's
    /// elements time out anyway.
    pub(super) async fn release_held(&mut self) {
        if !self.held_pending {
            return;
        }
        let h = held_table(&self.cfg);
        match run("nft", &["delete", "table", "inet", &h], None).await {
            Ok(()) => {
                info!(table = %h, "the previous run's held refusals are removed: capture is in place");
                self.held_pending = false;
            }
            Err(e) if e.to_string().contains("No such file") => self.held_pending = false,
            Err(e) => debug!(error = %e, "removing the held refusals; will retry"),
        }
    }
}

/// The name of the held table for `cfg`'s capture table.
pub(super) fn held_table(cfg: &crate::capture_config::CaptureConfig) -> String {
    format!("{}_held", cfg.nft_table)
}

/// The IPv6 refusal's part of the held table (see `capture/refuse6.rs`):
/// what its sets held at the stop.
#[derive(Debug)]
pub(super) struct Held6<'a> {
    /// `dst6`: the IPv6 tunnel prefixes refused.
    pub(super) dst: &'a BTreeSet<Cidr>,
    /// `skip6`: never refused.
    pub(super) skip: &'a BTreeSet<Cidr>,
    /// `src6`: the forwarded sources refused; `None` is every source.
    pub(super) src: Option<&'a BTreeSet<Cidr>>,
}

/// The held table (see the module docs): `sources` `None` is every
/// source; `v6` the IPv6 refusal's sets when it was on the node (`None`:
/// IPv4 only).
pub(super) fn held_script(
    table: &str,
    own_mark: u32,
    hold_secs: u64,
    captured: &BTreeSet<Cidr>,
    skipped: &BTreeSet<Cidr>,
    sources: Option<&BTreeSet<Cidr>>,
    v6: Option<&Held6<'_>>,
) -> String {
    // Interval sets refuse overlapping elements: the minimal cover, as
    // `rewrite_set` writes them; no `elements` at all for an empty set.
    let elements = |set: &BTreeSet<Cidr>| -> String {
        cover_list(set)
            .map(|list| format!(" elements = {{ {list} }};"))
            .unwrap_or_default()
    };
    let every =
        |addr: IpAddr| -> BTreeSet<Cidr> { Cidr::containing(addr, 0).into_iter().collect() };
    let mut s = String::new();
    let _ = writeln!(s, "table inet {table} {{");
    let _ = writeln!(
        s,
        "set dst4 {{ type ipv4_addr; flags interval,timeout; timeout {hold_secs}s;{} }}",
        elements(captured)
    );
    let _ = writeln!(
        s,
        "set skip4 {{ type ipv4_addr; flags interval;{} }}",
        elements(skipped)
    );
    let _ = writeln!(
        s,
        "set src4 {{ type ipv4_addr; flags interval;{} }}",
        elements(sources.unwrap_or(&every(Ipv4Addr::UNSPECIFIED.into())))
    );
    // The IPv6 refusal's rules, appended to each chain (its sets above).
    let (mut fwd6, mut out6) = (String::new(), String::new());
    if let Some(v6) = v6 {
        let _ = writeln!(
            s,
            "set dst6 {{ type ipv6_addr; flags interval,timeout; timeout {hold_secs}s;{} }}",
            elements(v6.dst)
        );
        let _ = writeln!(
            s,
            "set skip6 {{ type ipv6_addr; flags interval;{} }}",
            elements(v6.skip)
        );
        let _ = writeln!(
            s,
            "set src6 {{ type ipv6_addr; flags interval;{} }}",
            elements(v6.src.unwrap_or(&every(Ipv6Addr::UNSPECIFIED.into())))
        );
        fwd6 = format!(
            "ip6 daddr {{ {NEVER} }} return\n\
             ip6 daddr @skip6 return\n\
             ip6 daddr @dst6 ip6 saddr @src6 meta l4proto tcp reject with tcp reset\n\
             ip6 daddr @dst6 ip6 saddr @src6 reject with icmpx admin-prohibited\n"
        );
        out6 = format!(
            "ip6 daddr {{ {NEVER} }} return\n\
             ip6 daddr @skip6 return\n\
             ip6 daddr @dst6 meta l4proto tcp reject with tcp reset\n\
             ip6 daddr @dst6 reject with icmpx admin-prohibited\n"
        );
    }
    let _ = writeln!(
        s,
        "chain held_fwd {{ type filter hook forward priority filter; policy accept;\n\
         ip daddr @skip4 return\n\
         ip daddr @dst4 ip saddr @src4 meta l4proto tcp reject with tcp reset\n\
         ip daddr @dst4 ip saddr @src4 reject with icmpx admin-prohibited\n\
         {fwd6}}}"
    );
    let _ = writeln!(
        s,
        "chain held_out {{ type filter hook output priority filter; policy accept;\n\
         meta mark {own_mark:#x} return\n\
         ip daddr @skip4 return\n\
         ip daddr @dst4 meta l4proto tcp reject with tcp reset\n\
         ip daddr @dst4 reject with icmpx admin-prohibited\n\
         {out6}}}"
    );
    s.push_str("}\n");
    s
}
