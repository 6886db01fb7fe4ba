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
//! a prefix joins the captured set, the conntrack entries whose original
//! destination is inside it and that capture did not translate are
//! deleted (UDP; TCP only while the handshake has not completed, as an
//! established connection that works elsewhere must not be cut), and each
//! flow's next packet is captured like a new flow's.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use relay_protocol::Cidr;
use tracing::{debug, info};

use super::output;

/// Most entries deleted per prefix and protocol in one update (each is
/// one `conntrack -D`); more wait for the prefix's next addition.
const MAX_DELETED: usize = 512;

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

/// `conntrack -L` arguments listing the entries of `proto` whose original
/// destination is inside `c` (IPv4): UDP all, TCP those still in
/// `SYN_SENT` (the handshake not completed).
pub(crate) fn list_args(c: &Cidr, proto: &str) -> Option<Vec<String>> {
    let std::net::IpAddr::V4(addr) = c.addr() else {
        return None;
    };
    let len = u32::from(c.prefix_len());
    let mask = Ipv4Addr::from(u32::MAX.checked_shl(32 - len).unwrap_or(0));
    let mut args: Vec<String> = vec!["-L".into(), "-p".into(), proto.into()];
    if proto == "tcp" {
        args.extend(["--state".into(), "SYN_SENT".into()]);
    }
    args.extend([
        "-d".into(),
        addr.to_string(),
        "--mask-dst".into(),
        mask.to_string(),
    ]);
    Some(args)
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

/// Deletes the untranslated UDP and half-open TCP entries towards each of
/// `added` (prefixes that just joined the captured set). A failure is
/// logged, not an error: capture is in place either way.
pub(super) async fn delete_bypassing(added: &BTreeSet<Cidr>) {
    let mut deleted = 0usize;
    for c in added {
        for proto in ["udp", "tcp"] {
            let Some(args) = list_args(c, proto) else {
                continue;
            };
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let listing = match output("conntrack", &args).await {
                Ok(l) => l,
                Err(e) => {
                    debug!(error = %e, prefix = %c, "listing conntrack entries failed");
                    continue;
                }
            };
            for t in untranslated(&listing).into_iter().take(MAX_DELETED) {
                let args = t.delete_args();
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                match output("conntrack", &args).await {
                    Ok(_) => deleted += 1,
                    Err(e) => debug!(error = %e, ?t, "deleting a conntrack entry failed"),
                }
            }
        }
    }
    if deleted > 0 {
        info!(
            deleted,
            "flows that began while their destination was not captured were reset to be captured"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_untranslated_entries_are_picked() {
        // As conntrack v1.4.7 prints them: a UDP flow that went past
        // capture, one capture translated, a half-open TCP connection.
        let listing = "\
udp      17 28 src=10.244.2.2 dst=10.244.8.5 sport=35438 dport=53 [UNREPLIED] src=10.244.8.5 dst=10.244.2.2 sport=53 dport=35438 mark=0 use=2
udp      17 28 src=10.244.2.2 dst=10.244.8.6 sport=54860 dport=53 [UNREPLIED] src=169.254.70.1 dst=10.244.2.2 sport=15001 dport=54860 mark=0 use=1
tcp      6 118 SYN_SENT src=10.244.2.2 dst=10.244.8.5 sport=58870 dport=80 [UNREPLIED] src=10.244.8.5 dst=10.244.2.2 sport=80 dport=58870 mark=0 use=2
";
        let got = untranslated(listing);
        assert_eq!(got.len(), 2, "{got:?}");
        assert_eq!(
            got[0].delete_args().join(" "),
            "-D -p udp -s 10.244.2.2 -d 10.244.8.5 --sport 35438 --dport 53"
        );
        assert_eq!(got[1].proto, "tcp");
        assert!(untranslated("").is_empty());
    }

    #[test]
    fn listing_arguments_name_the_prefix_and_its_mask() {
        let c: Cidr = "10.244.8.0/24".parse().unwrap();
        assert_eq!(
            list_args(&c, "udp").unwrap().join(" "),
            "-L -p udp -d 10.244.8.0 --mask-dst 255.255.255.0"
        );
        assert_eq!(
            list_args(&c, "tcp").unwrap().join(" "),
            "-L -p tcp --state SYN_SENT -d 10.244.8.0 --mask-dst 255.255.255.0"
        );
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(list_args(&all, "udp")
            .unwrap()
            .join(" ")
            .ends_with("--mask-dst 0.0.0.0"));
        let v6: Cidr = "fd00::/64".parse().unwrap();
        assert!(list_args(&v6, "udp").is_none());
    }
}
