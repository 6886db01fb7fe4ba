//! IPv6 tunnel prefixes refused, not leaked (an edge's capture: see
//! [`Capture::refuse_ipv6`]).
//!
//! Capture is IPv4 only (its listeners, NAT and routes are), but a
//! dual-stack cluster's tunnel routes list IPv6 prefixes too: a
//! dual-stack Node's second pod CIDR, the cloud's IPv6 pod and service
//! ranges. Left alone, a pod's (or the node's own) connection to one of
//! them leaves by the site's default route: onto the site LAN or the
//! Internet, unencrypted, where a site network reusing the range could
//! even answer it. These filter chains, in the capture table, refuse it
//! at once instead (a TCP reset, ICMPv6 "administratively prohibited"
//! for the rest) and count it:
//!
//! ```text
//! table inet <nft_table> {
//!   set dst6  { type ipv6_addr; flags interval; }  # the IPv6 tunnel prefixes (none captured)
//!   set skip6 { type ipv6_addr; flags interval; }  # never refused: what the edge serves, its
//!                                                  # connected IPv6 subnets and routed ones
//!                                                  # (main table, not default), the tunnel's peers
//!   set src6  { type ipv6_addr; flags interval; }  # forwarded sources refused (::/0 until
//!                                                  # apply_sources: its IPv6 prefixes)
//!   counter v6_refused {}                          # packets refused, both chains
//!   chain v6_fwd { type filter hook forward priority filter;
//!     meta nfproto != ipv6 return                  # IPv4: one rule, not five
//!     ip6 daddr { <never> } return
//!     ip6 daddr @skip6 return
//!     ip6 daddr @dst6 ip6 saddr @src6 meta l4proto tcp counter name v6_refused reject with tcp reset
//!     ip6 daddr @dst6 ip6 saddr @src6 counter name v6_refused reject with icmpx admin-prohibited }
//!   chain v6_out { type filter hook output priority filter;
//!     meta nfproto != ipv6 return
//!     meta mark <own_mark> return
//!     ip6 daddr { <never> } return
//!     ip6 daddr @skip6 return
//!     ip6 daddr @dst6 meta l4proto tcp counter name v6_refused reject with tcp reset
//!     ip6 daddr @dst6 counter name v6_refused reject with icmpx admin-prohibited }
//! }
//! ```
//!
//! `<never>` is `::1, fe80::/10, ff00::/8, 64:ff9b::/96, 64:ff9b:1::/48`
//! ([`NEVER`]: loopback, link-local, multicast, NAT64's prefixes).
//!
//! The two chains see every packet the node forwards or sends, IPv4 and
//! the tunnel's own included, so their first rule lets all that is not
//! IPv6 go at once: one comparison per packet rather than five.
//!
//! `skip6` mirrors `skip4`: the edge's plan (`edge-client`'s `subnets`)
//! exempts what it serves and the subnets it is connected to, for IPv6 as
//! for IPv4, so a site LAN inside a wider cloud range is still reached on
//! the LAN. For IPv6 alone it also exempts the destinations of the main
//! routing table's routes other than the default one ([`routed_ipv6`],
//! read on the edge's 10 s recheck): what is refused is what would leave
//! by the default route, and a route of the site's own (another VLAN's
//! `/64` by the site router, where another edge's IPv6 Node address is
//! that edge's served route; a site VPN's subnet; a router
//! advertisement's on-link `/64` for a DHCPv6 address, itself a `/128`)
//! takes it elsewhere, as it did before the refusal. IPv4 capture is not
//! changed by them: it captures inside such routes as ever. The tunnel's
//! own peers are exempt too (a relay reached at an
//! IPv6 address inside a tunnel route): our sockets carry the own mark,
//! but a refused peer would end the session for good, as a captured one
//! once did (see the capture module docs). Loopback, link-local and
//! multicast are never refused whatever the routes say: a `::/0` route
//! would otherwise cut neighbour discovery and the node's own loopback.
//! Nor are NAT64's prefixes (`64:ff9b::/96`, `64:ff9b:1::/48`): on an
//! IPv6-only site behind DNS64 and NAT64 every IPv4 name a host process
//! looks up answers inside them, and a wide IPv6 tunnel route would
//! otherwise cut all of it. A carrier's network-specific NAT64 prefix is
//! not known here: the edge adds the one it discovered to the skips
//! (`edge-client`'s `subnets::Lans`), and the relay's own address behind
//! it is exempt as a peer anyway.
//!
//! Filter chains see a ClusterIP's traffic after kube-proxy's DNAT (as
//! the held refusals do, `capture/park.rs`): a Service whose endpoints are
//! cloud pods is refused, one whose endpoints are on this node is not.
//!
//! A kernel (or nft) that refuses these rules (a node booted with IPv6
//! disabled has no ICMPv6 reject) gets a warning, once per process, and
//! capture runs without them: refusing IPv6 must never cost the IPv4
//! capture. Each [`Capture::repair`] that finds capture whole tries their
//! install again (once per repair: the edge's 10 s tick), and one that
//! finds their chains gone (while they were on the node) installs
//! capture again with them, as for any other missing piece. The relay's
//! capture does not turn this on: see docs/architecture.md ("Known
//! limits").

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};

use relay_protocol::Cidr;
use tracing::{debug, info, warn};

use super::{output, parse_counter_packets, rewrite_set, run, Capture, CaptureError};
use crate::capture_config::CaptureConfig;

/// The IPv6 refusal's state on the node.
#[derive(Debug, Default)]
pub(super) struct Refusal6 {
    /// Whether its chains are in the capture table (the kernel and nft
    /// took them at install).
    pub(super) installed: bool,
    /// What `dst6` holds.
    dst: BTreeSet<Cidr>,
    /// What `skip6` holds.
    skip: BTreeSet<Cidr>,
    /// What `src6` holds; `None` until the first
    /// [`Capture::apply_sources`]: every source.
    src: Option<BTreeSet<Cidr>>,
}

impl Refusal6 {
    /// What the held table refuses for IPv6 after a stop (see
    /// `capture/park.rs`): what the sets hold now, when the refusal is on
    /// the node; `None` when it is not (the kernel refused its rules, or
    /// it was never turned on: the relay's capture).
    pub(super) fn held(&self) -> Option<super::park::Held6<'_>> {
        self.installed.then_some(super::park::Held6 {
            dst: &self.dst,
            skip: &self.skip,
            src: self.src.as_ref(),
        })
    }
}

/// Whether the kernel's refusal was warned about: once per process, not
/// at every repair's install.
static WARNED: AtomicBool = AtomicBool::new(false);

/// Destinations never refused (see the module docs; the held table's
/// IPv6 rules too, `capture/park.rs`): loopback, link-local, multicast,
/// and NAT64's well-known prefix (RFC 6052) and local-use one (RFC 8215),
/// which an IPv6-only site's DNS64 hands its host processes for every
/// IPv4 name.
pub(super) const NEVER: &str = "::1, fe80::/10, ff00::/8, 64:ff9b::/96, 64:ff9b:1::/48";

/// The chains and sets of the module docs, added to table `table`.
pub(super) fn script(table: &str, own_mark: u32) -> String {
    format!(
        "table inet {table} {{\n\
         set dst6 {{ type ipv6_addr; flags interval; }}\n\
         set skip6 {{ type ipv6_addr; flags interval; }}\n\
         set src6 {{ type ipv6_addr; flags interval; elements = {{ ::/0 }} }}\n\
         counter v6_refused {{ }}\n\
         chain v6_fwd {{ type filter hook forward priority filter; policy accept;\n\
         meta nfproto != ipv6 return\n\
         ip6 daddr {{ {NEVER} }} return\n\
         ip6 daddr @skip6 return\n\
         ip6 daddr @dst6 ip6 saddr @src6 meta l4proto tcp counter name v6_refused reject with tcp reset\n\
         ip6 daddr @dst6 ip6 saddr @src6 counter name v6_refused reject with icmpx admin-prohibited\n\
         }}\n\
         chain v6_out {{ type filter hook output priority filter; policy accept;\n\
         meta nfproto != ipv6 return\n\
         meta mark {own_mark:#x} return\n\
         ip6 daddr {{ {NEVER} }} return\n\
         ip6 daddr @skip6 return\n\
         ip6 daddr @dst6 meta l4proto tcp counter name v6_refused reject with tcp reset\n\
         ip6 daddr @dst6 counter name v6_refused reject with icmpx admin-prohibited\n\
         }}\n}}\n"
    )
}

/// Adds the refusal to the installed capture table, in a transaction of
/// its own so that a kernel refusing it leaves the rest of capture as it
/// was; whether it is in place.
pub(super) async fn install(cfg: &CaptureConfig) -> bool {
    let script = script(&cfg.nft_table, cfg.own_mark);
    #[cfg(test)]
    let installed = match tests::refused_by_the_kernel() {
        true => Err(CaptureError {
            cmd: "nft -f -".into(),
            msg: "refused by the test (as a kernel without ICMPv6 reject)".into(),
        }),
        false => run("nft", &["-f", "-"], Some(&script)).await,
    };
    #[cfg(not(test))]
    let installed = run("nft", &["-f", "-"], Some(&script)).await;
    match installed {
        Ok(()) => true,
        Err(e) if !WARNED.swap(true, Ordering::Relaxed) => {
            warn!(
                error = %e,
                "the kernel or nft refused the IPv6 refusal rules: capture runs without them, and connections to the tunnel's IPv6 prefixes leave by the default route"
            );
            false
        }
        Err(e) => {
            debug!(error = %e, "the IPv6 refusal rules were refused again");
            false
        }
    }
}

/// The packet count of the `v6_refused` counter's listing; `None` when
/// it cannot be read there: a 0 would look like a counter made anew, and
/// the edge's total would count the old value twice.
fn counter_reading(listing: &str) -> Option<u64> {
    let packets = parse_counter_packets(listing);
    if packets.is_none() {
        debug!(%listing, "no packet count in the IPv6 refusal counter's listing");
    }
    packets
}

/// The destinations of the main routing table's IPv6 routes other than
/// the default one (see the module docs): where the node's own routing
/// takes IPv6 somewhere else than the default route (a site router's
/// route to another VLAN, a site VPN's, a router advertisement's on-link
/// `/64`), which the refusal leaves alone. Read with
/// `ip -6 -j route show table main`; an edge reads it on its 10 s
/// recheck, as its interface addresses.
pub async fn routed_ipv6() -> Result<BTreeSet<Cidr>, CaptureError> {
    let listing = output("ip", &["-6", "-j", "route", "show", "table", "main"]).await?;
    parse_routes6(&listing).map_err(|msg| CaptureError {
        cmd: "ip -6 -j route show table main".into(),
        msg,
    })
}

/// The routes [`routed_ipv6`] keeps from an `ip -j` route listing:
/// unicast ones (no `type`, or `unicast`: not `unreachable`, `blackhole`,
/// `prohibit`, `throw`), not the default (`default`, any `/0`), not on
/// `lo`, as prefixes (a bare address is a `/128`). Nor link-local and
/// multicast ones: the refusal never refuses them anyway, and every
/// interface has its `fe80::/64`.
fn parse_routes6(listing: &str) -> Result<BTreeSet<Cidr>, String> {
    #[derive(serde::Deserialize)]
    struct Route {
        dst: String,
        #[serde(rename = "type")]
        kind: Option<String>,
        dev: Option<String>,
    }
    let listing = listing.trim();
    if listing.is_empty() {
        // An old `ip` prints nothing for an empty table.
        return Ok(BTreeSet::new());
    }
    let routes: Vec<Route> = serde_json::from_str(listing).map_err(|e| e.to_string())?;
    Ok(routes
        .into_iter()
        .filter(|r| r.kind.as_deref().is_none_or(|k| k == "unicast"))
        .filter(|r| r.dev.as_deref() != Some("lo") && r.dst != "default")
        .filter_map(|r| r.dst.parse::<Cidr>().ok())
        .filter(|c| match c.addr() {
            IpAddr::V6(a) => c.prefix_len() > 0 && !a.is_unicast_link_local() && !a.is_multicast(),
            IpAddr::V4(_) => false,
        })
        .collect())
}

/// The IPv6 prefixes of `set`.
fn v6(set: &BTreeSet<Cidr>) -> BTreeSet<Cidr> {
    set.iter().filter(|c| c.addr().is_ipv6()).copied().collect()
}

/// What `skip6` holds: the IPv6 prefixes of `skip` and each IPv6 peer's
/// address (an IPv4-mapped peer is an IPv4 one).
pub(super) fn skip_set(skip: &BTreeSet<Cidr>, peers: &BTreeSet<IpAddr>) -> BTreeSet<Cidr> {
    let peers = peers
        .iter()
        .map(|p| p.to_canonical())
        .filter(IpAddr::is_ipv6)
        .map(Cidr::host);
    v6(skip).into_iter().chain(peers).collect()
}

impl Capture {
    /// Refuses traffic to the IPv6 prefixes [`Capture::apply`] is given,
    /// from now on and after every [`Capture::repair`] (see
    /// `capture/refuse6.rs`): an edge's capture, whose IPv6 tunnel routes
    /// would otherwise leave by the site's default route. A kernel that
    /// refuses the rules is warned about once, and capture goes on
    /// without them ([`Capture::refuses_ipv6`] false).
    pub async fn refuse_ipv6(&mut self) {
        if self.cfg.refuse_ipv6 {
            return;
        }
        // In the config, so that a repair's install puts it back.
        self.cfg.refuse_ipv6 = true;
        if self.on_node {
            self.refuse6.installed = install(&self.cfg).await;
        }
    }

    /// Whether the IPv6 refusal's rules are on the node.
    pub fn refuses_ipv6(&self) -> bool {
        self.refuse6.installed
    }

    /// Packets the IPv6 refusal refused (its `v6_refused` counter, which
    /// starts again from 0 when a repair installs capture anew); `None`
    /// while its rules are not on the node.
    pub async fn refused_ipv6(&self) -> Option<u64> {
        if !self.refuse6.installed {
            return None;
        }
        let t = &self.cfg.nft_table;
        let out = output("nft", &["list", "counter", "inet", t, "v6_refused"]).await;
        match out {
            Ok(listing) => counter_reading(&listing),
            Err(e) => {
                debug!(error = %e, "reading the IPv6 refusal counter");
                None
            }
        }
    }

    /// On a repair that found capture whole: when the IPv6 refusal is
    /// asked for ([`Capture::refuse_ipv6`]) but not on the node (its
    /// install failed), its install is tried again, once per call,
    /// warned about once per process as at first; whether it got on the
    /// node now. Its sets start empty: the owner's next
    /// [`Capture::apply`] and [`Capture::apply_sources`] fill them.
    pub(super) async fn retry_refusal6(&mut self) -> bool {
        if !self.cfg.refuse_ipv6 || !self.on_node || self.refuse6.installed {
            return false;
        }
        if !install(&self.cfg).await {
            return false;
        }
        info!("the IPv6 refusal rules are installed (their first install had failed)");
        self.refuse6 = Refusal6 {
            installed: true,
            ..Refusal6::default()
        };
        true
    }

    /// Makes `dst6` the IPv6 prefixes of `want` and `skip6` those of
    /// `skip` and the IPv6 peers, in one transaction, when they changed.
    /// A failure is logged and tried again at the next apply, never
    /// returned: the IPv4 capture must go on whatever this does.
    pub(super) async fn apply_refused6(
        &mut self,
        want: &BTreeSet<Cidr>,
        skip: &BTreeSet<Cidr>,
        peers: &BTreeSet<IpAddr>,
    ) {
        if !self.refuse6.installed {
            return;
        }
        let (dst, skip) = (v6(want), skip_set(skip, peers));
        if dst == self.refuse6.dst && skip == self.refuse6.skip {
            return;
        }
        let t = &self.cfg.nft_table;
        let nft = rewrite_set(t, "dst6", &dst) + &rewrite_set(t, "skip6", &skip);
        match run("nft", &["-f", "-"], Some(&nft)).await {
            Ok(()) => {
                debug!(
                    refused = dst.len(),
                    skipped = skip.len(),
                    "IPv6 refusal updated"
                );
                self.refuse6.dst = dst;
                self.refuse6.skip = skip;
            }
            Err(e) => warn!(error = %e, "updating the IPv6 refusal failed; will retry"),
        }
    }

    /// Makes `src6` the IPv6 prefixes of `sources` (see
    /// [`Capture::apply_sources`]). As for IPv4's `src4`, forwarded traffic
    /// from other sources is left alone: it is a LAN device routing
    /// through the node, not the tunnel's traffic, which IPv4 routes as if
    /// capture were not there (`src_refused`); refusing it for IPv6 alone
    /// would make the node route other hosts' traffic differently by
    /// family. An edge's sources are what it serves, whose IPv6 prefixes
    /// (a dual-stack Node's second pod CIDR, its IPv6 addresses) are its
    /// pods' IPv6 sources. Failures as for [`Capture::apply_refused6`].
    pub(super) async fn apply_sources6(&mut self, sources: &BTreeSet<Cidr>) {
        if !self.refuse6.installed {
            return;
        }
        let src = v6(sources);
        if self.refuse6.src.as_ref() == Some(&src) {
            return;
        }
        let nft = rewrite_set(&self.cfg.nft_table, "src6", &src);
        match run("nft", &["-f", "-"], Some(&nft)).await {
            Ok(()) => self.refuse6.src = Some(src),
            Err(e) => warn!(error = %e, "updating the IPv6 refusal's sources failed; will retry"),
        }
    }
}

#[cfg(test)]
#[path = "refuse6_tests.rs"]
mod tests;
