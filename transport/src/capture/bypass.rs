//! Flows that began while a prefix was not captured, and would keep
//! bypassing capture after it is.
//!
//! Capture is NAT, and NAT chains see only a flow's first packet: a flow
//! conntrack already tracks keeps going wherever its first packet went.
//! A prefix that was not captured for a while (an edge offline on a relay
//! that did not know it, a relay or edge restarting) leaves such flows
//! behind: a UDP sender that transmits more often than conntrack's
//! unreplied timeout (30 s) stays on the default route for as long as it
//! sends, and a TCP connect keeps retrying its SYN there (~127 s). So when
//! addresses join the captured set, the conntrack entries whose original
//! destination is one of them and that capture did not translate are
//! deleted (UDP; TCP only while the handshake has not completed, as an
//! established connection that works elsewhere must not be cut), and each
//! flow's next packet is captured like a new flow's.
//!
//! This runs off [`Capture::apply`]'s path ([`Sweeper`]): an apply only
//! queues the addresses that became captured (its new cover minus what the
//! old one captured, minus the skipped prefixes, as address ranges), and
//! one task at a time lists the table once per protocol for everything
//! queued so far (two `conntrack -L` runs however many prefixes were
//! added: a relay starting with 20,000 prefixes does not run 40,000) and
//! matches the entries in-process.
//!
//! [`Capture::apply`]: super::Capture::apply

use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use relay_protocol::Cidr;
use tokio::task::AbortHandle;
use tracing::{debug, info, warn};

use super::output;

/// Most entries deleted per protocol in one sweep (each is one
/// `conntrack -D`); the rest keep their way until they end or their
/// addresses join the captured set again.
const MAX_DELETED: usize = 2048;

/// Bound on one sweep (two listings and the deletions); what it did not
/// get to is left, as above.
const SWEEP_BOUND: Duration = Duration::from_secs(60);

/// One connection's original tuple, as `conntrack -D` names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Tuple {
    /// `udp` or `tcp`.
    pub(crate) proto: String,
    /// Original source address.
    pub(crate) src: String,
    /// Original destination address.
    pub(crate) dst: String,
    /// Original source port.
    pub(crate) sport: String,
    /// Original destination port.
    pub(crate) dport: String,
}

impl Tuple {
    /// `conntrack` arguments deleting exactly this entry.
    pub(crate) fn delete_args(&self) -> Vec<String> {
        [
            "-D",
            "-p",
            &self.proto,
            "-s",
            &self.src,
            "-d",
            &self.dst,
            "--sport",
            &self.sport,
            "--dport",
            &self.dport,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }
}

/// The entries of a `conntrack -L` listing that no destination NAT
/// touched (the reply comes from the original destination): those that
/// went past capture.
pub(crate) fn untranslated(listing: &str) -> Vec<Tuple> {
    let mut out = Vec::new();
    for line in listing.lines() {
        let mut words = line.split_whitespace();
        let Some(proto) = words.next() else { continue };
        let field = |key: &str| -> Vec<&str> {
            line.split_whitespace()
                .filter_map(|w| w.strip_prefix(key))
                .collect()
        };
        let (src, dst, sport, dport) = (
            field("src="),
            field("dst="),
            field("sport="),
            field("dport="),
        );
        if src.len() < 2 || dst.len() < 2 || sport.len() < 2 || dport.len() < 2 {
            continue;
        }
        // Reply source = original destination: not translated.
        if src[1] != dst[0] || sport[1] != dport[0] {
            continue;
        }
        out.push(Tuple {
            proto: proto.to_string(),
            src: src[0].to_string(),
            dst: dst[0].to_string(),
            sport: sport[0].to_string(),
            dport: dport[0].to_string(),
        });
    }
    out
}

/// IPv4 addresses as inclusive ranges, sorted, disjoint and not adjacent.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Ranges(Vec<(u32, u32)>);

impl Ranges {
    /// The addresses of `set`'s IPv4 prefixes (overlaps merged: the same
    /// addresses as the set's minimal cover).
    pub(crate) fn of<'a>(set: impl IntoIterator<Item = &'a Cidr>) -> Ranges {
        let v = set
            .into_iter()
            .filter_map(|c| match c.addr() {
                IpAddr::V4(a) => {
                    let start = u32::from(a);
                    let host = u32::MAX.checked_shr(u32::from(c.prefix_len())).unwrap_or(0);
                    Some((start, start | host))
                }
                IpAddr::V6(_) => None,
            })
            .collect();
        Ranges::merged(v)
    }

    fn merged(mut v: Vec<(u32, u32)>) -> Ranges {
        v.sort_unstable();
        let mut out: Vec<(u32, u32)> = Vec::with_capacity(v.len());
        for (s, e) in v {
            match out.last_mut() {
                Some(last) if s <= last.1.saturating_add(1) => last.1 = last.1.max(e),
                _ => out.push((s, e)),
            }
        }
        Ranges(out)
    }

    /// Whether it holds no address.
    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The addresses in either.
    pub(crate) fn union(&self, other: &Ranges) -> Ranges {
        Ranges::merged(self.0.iter().chain(&other.0).copied().collect())
    }

    /// The addresses of `self` not in `other`.
    pub(crate) fn minus(&self, other: &Ranges) -> Ranges {
        let o = &other.0;
        let mut out = Vec::new();
        let mut j = 0;
        for &(s, e) in &self.0 {
            while j < o.len() && o[j].1 < s {
                j += 1;
            }
            let mut cur = s;
            let mut covered = false;
            for &(os, oe) in o[j..].iter().take_while(|r| r.0 <= e) {
                if os > cur {
                    out.push((cur, os - 1));
                }
                if oe >= e {
                    covered = true;
                    break;
                }
                cur = cur.max(oe + 1);
            }
            if !covered {
                out.push((cur, e));
            }
        }
        Ranges(out)
    }

    /// Whether `a` is one of the addresses.
    pub(crate) fn contains(&self, a: Ipv4Addr) -> bool {
        let a = u32::from(a);
        let i = self.0.partition_point(|r| r.1 < a);
        self.0.get(i).is_some_and(|r| r.0 <= a)
    }

    /// The fewest prefixes that hold exactly these addresses (each range
    /// cut into the largest aligned blocks that fit), in address order.
    /// The whole IPv4 space comes out as its two halves, never as
    /// `0.0.0.0/0`: capture's routing table keeps its zero-length prefix
    /// for the reply-mark route, which the `iif lo` rule suppresses (see
    /// `capture.rs`).
    pub(crate) fn prefixes(&self) -> Vec<Cidr> {
        let mut out = Vec::new();
        for &(s, e) in &self.0 {
            let (mut cur, end) = (u64::from(s), u64::from(e));
            while cur <= end {
                // The largest block aligned at `cur`, shrunk until it fits.
                let mut size = if cur == 0 {
                    1u64 << 32
                } else {
                    1u64 << cur.trailing_zeros().min(32)
                };
                while cur + size - 1 > end {
                    size >>= 1;
                }
                let len = 32 - size.trailing_zeros() as u8;
                let at = |a: u64, len: u8| {
                    let a = Ipv4Addr::from(u32::try_from(a).unwrap_or(u32::MAX));
                    Cidr::new(IpAddr::V4(a), len).ok()
                };
                if len == 0 {
                    out.extend(at(0, 1).into_iter().chain(at(1 << 31, 1)));
                } else {
                    out.extend(at(cur, len));
                }
                cur += size;
            }
        }
        out
    }

    /// The one prefix these addresses are, if they are exactly one.
    fn as_cidr(&self) -> Option<Cidr> {
        let [(s, e)] = self.0[..] else { return None };
        let size = u64::from(e - s) + 1;
        if !size.is_power_of_two() || u64::from(s) % size != 0 {
            return None;
        }
        let len = 32 - size.trailing_zeros() as u8;
        Cidr::new(IpAddr::V4(Ipv4Addr::from(s)), len).ok()
    }
}

/// The addresses an update from (`old`, `old_skip`) to (`new`,
/// `new_skip`) makes captured: inside a new prefix and no new skipped
/// one, and not captured before (inside an old prefix and no old
/// skipped one).
pub(crate) fn newly_captured(
    new: &std::collections::BTreeSet<Cidr>,
    new_skip: &std::collections::BTreeSet<Cidr>,
    old: &std::collections::BTreeSet<Cidr>,
    old_skip: &std::collections::BTreeSet<Cidr>,
) -> Ranges {
    let was = Ranges::of(old).minus(&Ranges::of(old_skip));
    Ranges::of(new).minus(&Ranges::of(new_skip)).minus(&was)
}

/// `conntrack -L` arguments listing the entries of `proto` that may be
/// towards `targets`: UDP all, TCP those still in `SYN_SENT` (the
/// handshake not completed); only those inside it when `targets` is one
/// prefix (the common update: one edge came), else the whole table,
/// matched in-process ([`to_delete`]).
pub(crate) fn list_args(targets: &Ranges, proto: &str) -> Vec<String> {
    let mut args: Vec<String> = vec!["-L".into(), "-p".into(), proto.into()];
    if proto == "tcp" {
        args.extend(["--state".into(), "SYN_SENT".into()]);
    }
    if let Some(c) = targets.as_cidr() {
        let len = u32::from(c.prefix_len());
        let mask = Ipv4Addr::from(u32::MAX.checked_shl(32 - len).unwrap_or(0));
        args.extend([
            "-d".into(),
            c.addr().to_string(),
            "--mask-dst".into(),
            mask.to_string(),
        ]);
    }
    args
}

/// The entries of `listing` to delete: untranslated ([`untranslated`])
/// and towards one of `targets`.
pub(crate) fn to_delete(listing: &str, targets: &Ranges) -> Vec<Tuple> {
    untranslated(listing)
        .into_iter()
        .filter(|t| t.dst.parse().is_ok_and(|a| targets.contains(a)))
        .collect()
}

/// Runs the deletions off the apply path, one sweep at a time: addresses
/// queued while one runs are swept together by the next.
#[derive(Debug, Default)]
pub(super) struct Sweeper {
    state: Arc<Mutex<SweepState>>,
}

#[derive(Debug, Default)]
struct SweepState {
    pending: Ranges,
    task: Option<AbortHandle>,
}

impl Sweeper {
    /// Queues `targets` (addresses that just became captured) and starts
    /// a sweep unless one runs (it takes them when it is done). Needs a
    /// Tokio runtime.
    pub(super) fn queue(&self, targets: Ranges) {
        if targets.is_empty() {
            return;
        }
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.pending = s.pending.union(&targets);
        if s.task.is_some() {
            return;
        }
        let state = self.state.clone();
        let task = tokio::spawn(async move {
            loop {
                let targets = {
                    let mut s = state.lock().unwrap_or_else(|e| e.into_inner());
                    let t = std::mem::take(&mut s.pending);
                    if t.is_empty() {
                        s.task = None;
                        return;
                    }
                    t
                };
                if tokio::time::timeout(SWEEP_BOUND, sweep(&targets))
                    .await
                    .is_err()
                {
                    warn!(
                        bound = ?SWEEP_BOUND,
                        "deleting flows that went past capture took too long; the rest keep their way"
                    );
                }
            }
        });
        s.task = Some(task.abort_handle());
    }
}

impl Drop for Sweeper {
    fn drop(&mut self) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = s.task.take() {
            t.abort();
        }
    }
}

/// Deletes the untranslated UDP and half-open TCP entries towards
/// `targets`: one listing per protocol. A failure is logged, not an
/// error: capture is in place either way.
async fn sweep(targets: &Ranges) {
    let (mut deleted, mut left) = (0usize, 0usize);
    for proto in ["udp", "tcp"] {
        let args = list_args(targets, proto);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let listing = match output("conntrack", &args).await {
            Ok(l) => l,
            Err(e) => {
                // Flows that went past capture keep their way until they
                // end: worth an operator's eye, once in a while.
                crate::sampled!(warn, "listing conntrack entries failed; flows that went past capture keep their way", error = %e);
                continue;
            }
        };
        // A whole table's listing (100,000 lines took 1.9 s to match in a
        // debug build) is matched off the runtime's workers.
        let owned = targets.clone();
        let found = match tokio::task::spawn_blocking(move || to_delete(&listing, &owned)).await {
            Ok(found) => found,
            Err(e) => {
                debug!(error = %e, "matching conntrack entries failed");
                continue;
            }
        };
        left += found.len().saturating_sub(MAX_DELETED);
        for t in found.into_iter().take(MAX_DELETED) {
            let args = t.delete_args();
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            match output("conntrack", &args).await {
                Ok(_) => deleted += 1,
                Err(e) => debug!(error = %e, ?t, "deleting a conntrack entry failed"),
            }
        }
    }
    if deleted > 0 || left > 0 {
        info!(
            deleted,
            left,
            "flows that began while their destination was not captured were reset to be captured"
        );
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    fn set(items: &[&str]) -> BTreeSet<Cidr> {
        items.iter().map(|s| s.parse().unwrap()).collect()
    }

    fn ranges(items: &[&str]) -> Ranges {
        Ranges::of(&set(items))
    }

    /// What `conntrack -L -p udp` and `conntrack -L -p tcp --state
    /// SYN_SENT` print (v1.4.7) on an edge whose own pod CIDR is
    /// 10.244.2.0/24, one line per case.
    const LISTING: &str = "\
udp      17 28 src=10.244.2.2 dst=10.244.8.5 sport=35438 dport=53 [UNREPLIED] src=10.244.8.5 dst=10.244.2.2 sport=53 dport=35438 mark=0 use=2
udp      17 28 src=10.244.2.2 dst=10.244.8.6 sport=54860 dport=53 [UNREPLIED] src=169.254.70.1 dst=10.244.2.2 sport=15001 dport=54860 mark=0 use=1
udp      17 29 src=10.244.2.3 dst=10.244.2.9 sport=40000 dport=8125 [UNREPLIED] src=10.244.2.9 dst=10.244.2.3 sport=8125 dport=40000 mark=0 use=1
udp      17 117 src=10.244.2.2 dst=10.96.0.10 sport=51000 dport=53 src=10.96.0.10 dst=10.244.2.2 sport=53 dport=51000 [ASSURED] mark=0 use=1
udp      17 25 src=192.168.1.20 dst=192.168.1.1 sport=68 dport=67 [UNREPLIED] src=192.168.1.1 dst=192.168.1.20 sport=67 dport=68 mark=0 use=1
tcp      6 118 SYN_SENT src=10.244.2.2 dst=10.250.3.7 sport=58870 dport=80 [UNREPLIED] src=10.250.3.7 dst=10.244.2.2 sport=80 dport=58870 mark=0 use=2
tcp      6 96 SYN_SENT src=10.244.2.4 dst=10.244.8.5 sport=41000 dport=443 [UNREPLIED] src=169.254.70.1 dst=10.244.2.4 sport=15001 dport=41000 mark=0 use=1
";

    fn deleted(targets: &Ranges) -> Vec<String> {
        to_delete(LISTING, targets)
            .iter()
            .map(|t| t.delete_args().join(" "))
            .collect()
    }

    #[test]
    fn only_untranslated_entries_towards_newly_captured_addresses_are_deleted() {
        // The service range was captured; the cluster range (and a /24
        // inside it, listed again) and another edge's prefix join, the
        // edge's own pod CIDR is skipped.
        let old = set(&["10.96.0.0/12"]);
        let new = set(&[
            "10.96.0.0/12",
            "10.244.0.0/16",
            "10.244.8.0/24",
            "10.250.3.0/24",
        ]);
        let skip = set(&["10.244.2.0/24"]);
        let targets = newly_captured(&new, &skip, &old, &BTreeSet::new());
        assert_eq!(
            deleted(&targets),
            [
                // Went past capture towards the cluster range.
                "-D -p udp -s 10.244.2.2 -d 10.244.8.5 --sport 35438 --dport 53",
                // A connect retrying its SYN towards the other prefix.
                "-D -p tcp -s 10.244.2.2 -d 10.250.3.7 --sport 58870 --dport 80",
            ]
        );
        // Left alone: what capture translated (10.244.8.6, the SYN to
        // 10.244.8.5:443), the own pod CIDR (10.244.2.9), what was
        // captured before (10.96.0.10) and what is not captured.
        // Both listings ran over the whole table (more than one prefix).
        assert_eq!(list_args(&targets, "udp").join(" "), "-L -p udp");
        assert_eq!(
            list_args(&targets, "tcp").join(" "),
            "-L -p tcp --state SYN_SENT"
        );

        // A /24 inside the captured /16, or the skip dropped inside a
        // prefix still captured: only what became captured.
        let now = newly_captured(&new, &skip, &new, &skip);
        assert!(now.is_empty() && deleted(&now).is_empty());
        let more = set(&["10.244.0.0/16", "10.244.8.0/24", "10.244.9.0/24"]);
        assert!(newly_captured(&more, &skip, &new, &skip).is_empty());
        let unskipped = newly_captured(&new, &BTreeSet::new(), &new, &skip);
        assert_eq!(unskipped, ranges(&["10.244.2.0/24"]));
        assert_eq!(
            deleted(&unskipped),
            ["-D -p udp -s 10.244.2.3 -d 10.244.2.9 --sport 40000 --dport 8125"]
        );
        // One prefix: the listing asks the kernel for it only.
        let one = newly_captured(&set(&["10.250.3.0/24"]), &skip, &BTreeSet::new(), &skip);
        assert_eq!(
            list_args(&one, "udp").join(" "),
            "-L -p udp -d 10.250.3.0 --mask-dst 255.255.255.0"
        );
        assert_eq!(
            list_args(&one, "tcp").join(" "),
            "-L -p tcp --state SYN_SENT -d 10.250.3.0 --mask-dst 255.255.255.0"
        );
        // IPv6 prefixes are not captured, so never listed.
        assert!(newly_captured(&set(&["fd00::/64"]), &skip, &old, &skip).is_empty());
    }

    #[test]
    fn untranslated_reads_conntrack_lines() {
        let got = untranslated(LISTING);
        assert_eq!(got.len(), 5, "{got:?}");
        assert_eq!(got[0].proto, "udp");
        assert_eq!(got[4].proto, "tcp");
        assert!(untranslated("").is_empty());
        assert!(untranslated(
            "conntrack v1.4.7 (conntrack-tools): 0 flow entries have been shown.\n"
        )
        .is_empty());
    }

    #[test]
    fn ranges_subtract_merge_and_match() {
        let a = ranges(&["10.0.0.0/8"]);
        let holes = ranges(&["10.0.0.0/24", "10.1.0.0/16", "10.255.255.255/32"]);
        let left = a.minus(&holes);
        assert_eq!(
            left.0,
            [
                (
                    u32::from(Ipv4Addr::new(10, 0, 1, 0)),
                    u32::from(Ipv4Addr::new(10, 0, 255, 255))
                ),
                (
                    u32::from(Ipv4Addr::new(10, 2, 0, 0)),
                    u32::from(Ipv4Addr::new(10, 255, 255, 254))
                ),
            ]
        );
        assert!(left.contains(Ipv4Addr::new(10, 0, 1, 0)));
        assert!(!left.contains(Ipv4Addr::new(10, 0, 0, 255)));
        assert!(!left.contains(Ipv4Addr::new(10, 1, 2, 3)));
        assert!(!left.contains(Ipv4Addr::new(10, 255, 255, 255)));
        assert!(!left.contains(Ipv4Addr::new(11, 0, 0, 0)));
        assert_eq!(left.union(&holes), a);
        // Adjacent prefixes merge; the whole space is one range.
        assert_eq!(
            ranges(&["10.0.0.0/25", "10.0.0.128/25"]),
            ranges(&["10.0.0.0/24"])
        );
        let all = ranges(&["0.0.0.0/0"]);
        assert_eq!(all.as_cidr(), Some("0.0.0.0/0".parse().unwrap()));
        assert!(all.minus(&all).is_empty());
        assert_eq!(
            ranges(&["10.0.0.0/24", "10.0.1.0/24"]).as_cidr(),
            Some("10.0.0.0/23".parse().unwrap())
        );
        assert_eq!(ranges(&["10.0.1.0/24", "10.0.2.0/24"]).as_cidr(), None);
    }

    /// Ranges back to prefixes: the fewest aligned blocks, holes punched
    /// where a skipped prefix or a peer sits, the whole space as halves.
    #[test]
    fn ranges_cut_into_the_fewest_prefixes() {
        let cut =
            |r: Ranges| -> Vec<String> { r.prefixes().iter().map(|c| c.to_string()).collect() };
        assert_eq!(
            cut(ranges(&["10.0.0.0/25", "10.0.0.128/25", "10.0.2.0/24"])),
            ["10.0.0.0/24", "10.0.2.0/24"]
        );
        assert_eq!(
            cut(ranges(&["10.0.0.0/22"]).minus(&ranges(&["10.0.1.0/26", "10.0.3.255/32"]))),
            [
                "10.0.0.0/24",
                "10.0.1.64/26",
                "10.0.1.128/25",
                "10.0.2.0/24",
                "10.0.3.0/25",
                "10.0.3.128/26",
                "10.0.3.192/27",
                "10.0.3.224/28",
                "10.0.3.240/29",
                "10.0.3.248/30",
                "10.0.3.252/31",
                "10.0.3.254/32",
            ]
        );
        assert_eq!(cut(ranges(&["0.0.0.0/0"])), ["0.0.0.0/1", "128.0.0.0/1"]);
        assert_eq!(cut(ranges(&["255.255.255.255/32"])), ["255.255.255.255/32"]);
        assert!(cut(ranges(&["10.0.0.0/8"]).minus(&ranges(&["10.0.0.0/8"]))).is_empty());
        // Odd bounds: every piece aligned, together exactly the range.
        let odd = Ranges(vec![(3, 17), (u32::MAX - 2, u32::MAX)]);
        let back = Ranges::of(&odd.prefixes());
        assert_eq!(back, odd);
    }
}
