//! The single-relay agent's routes in its table: read back
//! ([`parse_routes`], `show_table`), the `ip -batch` that makes them the
//! wanted prefixes through a next hop ([`plan`]), and running it (`sync`).
//!
//! Apart from the loop so that the plan, text in and text out, is tested
//! without a kernel; `show_table` serves the multipath agent too, whose
//! routes live in the same kind of table.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write;

use relay_protocol::Cidr;

use super::{ip, NextHop};

/// Our routes now on this host (in our table), with their next hops.
async fn installed(proto: u8, table: u32) -> anyhow::Result<BTreeMap<Cidr, NextHop>> {
    Ok(parse_routes(&show_table(table, proto).await?))
}

/// `ip -4 route show table T proto P`; empty while table `T` has never
/// held a route (newer kernels then refuse the dump: "FIB table does not
/// exist").
pub(crate) async fn show_table(table: u32, proto: u8) -> anyhow::Result<String> {
    let (t, p) = (table.to_string(), proto.to_string());
    match ip(&["-4", "route", "show", "table", &t, "proto", &p], None).await {
        Err(e) if format!("{e:#}").contains("table does not exist") => Ok(String::new()),
        r => r,
    }
}

/// Parses `ip -4 route show [table T] proto P`: prefix → next hop.
pub fn parse_routes(out: &str) -> BTreeMap<Cidr, NextHop> {
    out.lines()
        .filter(|l| !l.starts_with(char::is_whitespace))
        .filter_map(|l| {
            let words: Vec<&str> = l.split_whitespace().collect();
            let c = words.first()?.parse().ok()?;
            Some((c, NextHop::parse(&words[1..])))
        })
        .collect()
}

/// The `ip -batch` commands that make our routes in `table` exactly
/// `want` through `hop` (`None`: only removals), and how many routes they
/// add or change and remove. A route whose next hop differs (the CNI
/// moved its tunnel, or the agent's target changed) is replaced.
pub fn plan(
    have: &BTreeMap<Cidr, NextHop>,
    want: &BTreeSet<Cidr>,
    hop: Option<&NextHop>,
    proto: u8,
    table: u32,
) -> (String, usize, usize) {
    let mut batch = String::new();
    let mut removed = 0;
    for c in have.keys().filter(|c| !want.contains(c)) {
        let _ = writeln!(batch, "route del {c} proto {proto} table {table}");
        removed += 1;
    }
    let mut set = 0;
    if let Some(hop) = hop {
        for c in want {
            if !have.get(c).is_some_and(|h| hop.satisfied_by(h)) {
                // `via X` without `onlink` in a table of its own: the
                // kernel checks the gateway in that table, then (finding
                // nothing) through the whole FIB, so `main`'s connected
                // route still resolves it.
                let _ = writeln!(
                    batch,
                    "route replace {c}{} proto {proto} table {table}",
                    hop.args()
                );
                set += 1;
            }
        }
    }
    (batch, set, removed)
}

/// Makes this host's routes of protocol `proto` in `table` exactly `want`
/// through `hop` (`None`: removes them all).
pub(super) async fn sync(
    want: &BTreeSet<Cidr>,
    hop: Option<&NextHop>,
    proto: u8,
    table: u32,
) -> anyhow::Result<(usize, usize)> {
    let have = installed(proto, table).await?;
    let (batch, set, removed) = plan(&have, want, hop, proto, table);
    if !batch.is_empty() {
        ip(&["-4", "-force", "-batch", "-"], Some(&batch)).await?;
    }
    Ok((set, removed))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::tests::c;

    #[test]
    fn routes_follow_a_changed_next_hop_and_only_ours_go() {
        let flannel =
            NextHop::from_fibmatch("10.244.1.0/24 via 10.244.1.0 dev flannel.1 onlink").unwrap();
        let want: BTreeSet<Cidr> = [c("10.244.7.0/24"), c("10.244.8.0/24")].into();
        // As `ip -4 route show table 7250 proto 250` prints them (no
        // proto or table word).
        let have = parse_routes(
            "10.244.7.0/24 via 10.244.1.0 dev flannel.1 onlink \n10.244.9.0/24 via 10.0.0.1 dev eth0 \n",
        );
        let (b, set, removed) = plan(&have, &want, Some(&flannel), 250, 7250);
        assert_eq!(
            b,
            "route del 10.244.9.0/24 proto 250 table 7250\n\
             route replace 10.244.8.0/24 via 10.244.1.0 dev flannel.1 onlink proto 250 table 7250\n"
        );
        assert_eq!((set, removed), (1, 1));
        // In step: nothing to do.
        let have = parse_routes(
            "10.244.7.0/24 via 10.244.1.0 dev flannel.1 onlink \n10.244.8.0/24 via 10.244.1.0 dev flannel.1 onlink \n",
        );
        assert_eq!(plan(&have, &want, Some(&flannel), 250, 7250).0, "");
        // The CNI's route now goes another way: every route is replaced.
        let moved =
            NextHop::from_fibmatch("10.244.1.0/24 via 10.0.0.1 dev flannel.1 onlink").unwrap();
        let (b, set, _) = plan(&have, &want, Some(&moved), 250, 7250);
        assert_eq!(set, 2, "{b}");
        assert!(b.contains(
            "route replace 10.244.7.0/24 via 10.0.0.1 dev flannel.1 onlink proto 250 table 7250"
        ));
        // `--via`: the device the kernel chose is not compared.
        let via = NextHop {
            via: Some("10.0.0.1".parse().unwrap()),
            ..NextHop::default()
        };
        let have = parse_routes(
            "10.244.7.0/24 via 10.0.0.1 dev eth0 \n10.244.8.0/24 via 10.0.0.1 dev eth0 \n",
        );
        assert_eq!(plan(&have, &want, Some(&via), 250, 7250).0, "");
        // On exit, no next hop: only removals.
        let (b, set, removed) = plan(&have, &BTreeSet::new(), None, 250, 7250);
        assert_eq!((set, removed), (0, 2), "{b}");
    }
}
