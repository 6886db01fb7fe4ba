//! What a clean exit leaves ([`Capture::stop`]): the capture address on
//! `lo` (see `remove_on_exit`), and for `hold_after_exit`,
//! filter rules that refuse traffic to the prefixes capture took, so that
//! between this process and the next (a DaemonSet rollout pulling its new
//! image over a cellular uplink, a restart after a config change) a pod's
//! connection to a cloud pod fails at once instead of leaving by the
//! node's default route, where a site LAN reusing the cluster's ranges
//! could answer it. The prefixes sit in a set whose elements time out, so
//! an uninstalled client's rules stop refusing on their own; the next
//! [`Capture::install`] removes the table.
//!
//! ```text
//! table inet <nft_table> {
//!   set dst4  { type ipv4_addr; flags interval,timeout; timeout <hold>; }  # what was captured
//!   set skip4 { type ipv4_addr; flags interval; }                          # never refused
//!   set src4  { type ipv4_addr; flags interval; }                          # forwarded sources
//!   chain held_fwd { type filter hook forward priority filter;
//!     ip daddr @skip4 return
//!     ip daddr @dst4 ip saddr @src4 meta l4proto tcp reject with tcp reset
//!     ip daddr @dst4 ip saddr @src4 reject with icmpx admin-prohibited }
//!   chain held_out { type filter hook output priority filter;
//!     meta mark <own_mark> return
//!     ip daddr @skip4 return
//!     ip daddr @dst4 meta l4proto tcp reject with tcp reset
//!     ip daddr @dst4 reject with icmpx admin-prohibited }
//! }
//! ```
//! Filter chains see a ClusterIP's traffic after kube-proxy's DNAT, so a
//! Service whose endpoints are cloud pods is refused too, and one whose
//! endpoints are on this node is not.

use std::collections::BTreeSet;
use std::fmt::Write;

use relay_protocol::Cidr;
use tracing::{info, warn};

use super::{cover_list, remove_on_exit, remove_routing, run, Capture};

impl Capture {
    /// Ends capture on a clean exit: removes it, and for
    /// `hold_after_exit` refuses what it took (see the module docs). With
    /// nothing captured, a zero hold, or a kernel that refuses the held
    /// rules, everything is simply removed.
    pub async fn stop(self) {
        let hold = self.cfg.hold_after_exit;
        if hold.is_zero() || self.installed.is_empty() {
            remove_on_exit(&self.cfg).await;
            return;
        }
        // The capture table is replaced by the held one in one transaction
        // (`add` first, so that `delete` finds a table to delete): between
        // two commands a pod's new connection would leave by the default
        // route, refused by neither.
        let t = &self.cfg.nft_table;
        let script = format!("add table inet {t}\ndelete table inet {t}\n")
            + &held_script(
                t,
                self.cfg.own_mark,
                hold.as_secs().max(1),
                &self.installed,
                &self.skipped,
                self.sources.as_ref(),
            );
        match run("nft", &["-f", "-"], Some(&script)).await {
            Ok(()) => {
                remove_routing(&self.cfg).await;
                info!(
                    prefixes = self.installed.len(),
                    hold_secs = hold.as_secs(),
                    "capture removed; traffic to its prefixes is refused until the next start or the hold ends"
                );
            }
            Err(e) => {
                warn!(error = %e, "could not leave the held rules; capture removed");
                remove_on_exit(&self.cfg).await;
            }
        }
    }
}

/// The held table (see the module docs): `sources` `None` is every source.
pub(super) fn held_script(
    table: &str,
    own_mark: u32,
    hold_secs: u64,
    captured: &BTreeSet<Cidr>,
    skipped: &BTreeSet<Cidr>,
    sources: Option<&BTreeSet<Cidr>>,
) -> String {
    let elements = |set: &BTreeSet<Cidr>| -> String {
        cover_list(set)
            .map(|list| format!(" elements = {{ {list} }};"))
            .unwrap_or_default()
    };
    let all: BTreeSet<Cidr> = Cidr::containing(std::net::Ipv4Addr::UNSPECIFIED.into(), 0)
        .into_iter()
        .collect();
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
        elements(sources.unwrap_or(&all))
    );
    let _ = writeln!(
        s,
        "chain held_fwd {{ type filter hook forward priority filter; policy accept;\n\
         ip daddr @skip4 return\n\
         ip daddr @dst4 ip saddr @src4 meta l4proto tcp reject with tcp reset\n\
         ip daddr @dst4 ip saddr @src4 reject with icmpx admin-prohibited\n\
         }}"
    );
    let _ = writeln!(
        s,
        "chain held_out {{ type filter hook output priority filter; policy accept;\n\
         meta mark {own_mark:#x} return\n\
         ip daddr @skip4 return\n\
         ip daddr @dst4 meta l4proto tcp reject with tcp reset\n\
         ip daddr @dst4 reject with icmpx admin-prohibited\n\
         }}"
    );
    s.push_str("}\n");
    s
}
