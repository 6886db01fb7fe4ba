//! Where the agents' routes live: the routing table and the one policy
//! rule consulting it ([`RouteTable`], with its defaults), and the removal
//! of what an agent before that table left in `main`
//! ([`remove_from_main`]).
//!
//! Apart from the loop because both agents, the single-relay one and the
//! multipath one ([`crate::multipath`]), keep their routes this way: the
//! rule's check every poll, its removal on exit and the upgrade from
//! `main` are one piece of policy routing, whatever fills the table.

use super::{ip, parse_routes};

/// Default routing table of the agent's routes (`--table`). Clear of the
/// tables the kernel reserves (253 to 255), of Calico's default
/// `routeTableRanges` (1 to 250) and of the relay node's capture table
/// (`[capture] route_table`, default 7100; a different node anyway).
pub const DEFAULT_TABLE: u32 = 7250;
/// Default preference of the rule consulting that table (`--rule-pref`):
/// ahead of `main` (32766), after `local` (0), apart from the capture's
/// 7099 and 7100 (relay node).
pub const DEFAULT_RULE_PREF: u32 = 7250;

/// Where the agent's routes live: routing table `table`, consulted by the
/// one policy rule `pref <pref> lookup <table>`, which the agent adds and
/// keeps (checked every poll) and removes on exit.
///
/// Reverse-path filtering: a strict `rp_filter` validates a packet's
/// source with a lookup through the whole FIB, policy rules included
/// (`fib_validate_source`, as the reverse flow with `iif lo`). Replies from
/// an edge prefix come back over the overlay's device, and the rule sends
/// that lookup to our route on the same device: they pass, as they did
/// with the route in `main`, and better than with a CNI's competing route
/// for the prefix in `main` out of another device, which the rule now
/// shadows. The rule has no selector (no `iif`, no `fwmark`), so it
/// applies to forwarded, local and validation lookups alike.
///
/// The relay node itself is unaffected: the agent runs on the other
/// nodes, and its rule preference is apart from the capture's rules.
/// Mind that a rule ahead of `main` beats `main` whatever the prefix
/// lengths: an edge prefix covering cluster ranges would take them over
/// on this node, where in `main` longer cluster routes won. The agents
/// refuse a prefix holding one of this node's addresses or the next hop
/// ([`refuse_prefixes`](super::refuse_prefixes)); narrower overlaps are not detected.
///
/// A start keeps the rule and routes a killed run left: the relay may be
/// unreachable then, and they keep sending edge traffic to the relay
/// node until the first successful poll brings the table in step. It
/// removes only the leftover routes the filter would refuse (a prefix
/// holding one of this node's addresses or a next hop: with the rule in
/// place it could cut this node off from the relay, and the agent from
/// the poll that would correct it). A rule left under other
/// `--table`/`--rule-pref` values is not recognised.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouteTable {
    /// The routing table (`ip route ... table <table>`).
    pub table: u32,
    /// The rule's preference; must be below `main`'s 32766.
    pub pref: u32,
}

impl Default for RouteTable {
    fn default() -> Self {
        RouteTable {
            table: DEFAULT_TABLE,
            pref: DEFAULT_RULE_PREF,
        }
    }
}

impl RouteTable {
    /// Refuses a reserved table (0, `default`, `main`, `local`) or a
    /// preference not strictly between `local`'s rule and `main`'s.
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            ![0, 253, 254, 255].contains(&self.table),
            "routing table {}: reserved (0, 253 default, 254 main, 255 local)",
            self.table
        );
        anyhow::ensure!(
            (1..32766).contains(&self.pref),
            "rule preference {}: must be 1 to 32765, ahead of main's rule (32766)",
            self.pref
        );
        Ok(())
    }

    /// Whether `ip -4 rule show` lists our rule (`PREF: from all lookup
    /// TABLE`). The table is compared as a number: the agent's image
    /// names no table in `rt_tables`.
    pub fn rule_listed(&self, listing: &str) -> bool {
        let (pref, table) = (self.pref.to_string(), self.table.to_string());
        listing.lines().any(|l| {
            l.split_once(':').is_some_and(|(p, rest)| {
                p.trim() == pref
                    && rest.split_whitespace().collect::<Vec<_>>()
                        == ["from", "all", "lookup", table.as_str()]
            })
        })
    }

    /// Adds our rule unless it is there (checked first: older kernels
    /// accept duplicates); whether it was added.
    pub async fn ensure_rule(&self) -> anyhow::Result<bool> {
        if self.rule_listed(&ip(&["-4", "rule", "show"], None).await?) {
            return Ok(false);
        }
        let (pref, table) = (self.pref.to_string(), self.table.to_string());
        ip(
            &["-4", "rule", "add", "pref", &pref, "lookup", &table],
            None,
        )
        .await?;
        Ok(true)
    }

    /// Removes our rule (and any duplicate of it); nothing else at our
    /// preference. How many it removed.
    pub async fn remove_rule(&self) -> anyhow::Result<usize> {
        let (pref, table) = (self.pref.to_string(), self.table.to_string());
        // Bounded: a handful of duplicates at most (see `ensure_rule`).
        for n in 0..16 {
            if !self.rule_listed(&ip(&["-4", "rule", "show"], None).await?) {
                return Ok(n);
            }
            ip(
                &["-4", "rule", "del", "pref", &pref, "lookup", &table],
                None,
            )
            .await?;
        }
        anyhow::bail!("rule pref {pref} lookup {table} keeps coming back")
    }
}

/// Removes routes of protocol `proto` from `main`: what an agent before
/// [`RouteTable`] installed there (the upgrade path; an agent that exits
/// cleanly removes its own, one killed leaves them). Ours by the same
/// rule as always, the protocol number, so nothing else goes. Done once
/// our table and rule are in place, so edge traffic never falls back to
/// the default route in between; left, they would do no harm while the
/// rule shadows them, but would come back to life if it went.
pub async fn remove_from_main(proto: u8) -> anyhow::Result<usize> {
    let out = ip(
        &[
            "-4",
            "route",
            "show",
            "table",
            "main",
            "proto",
            &proto.to_string(),
        ],
        None,
    )
    .await?;
    let batch: String = parse_routes(&out)
        .keys()
        .map(|c| format!("route del {c} proto {proto} table main\n"))
        .collect();
    if !batch.is_empty() {
        ip(&["-4", "-force", "-batch", "-"], Some(&batch)).await?;
    }
    Ok(batch.lines().count())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_rule_ahead_of_main_is_recognised_and_reserved_tables_refused() {
        let t = RouteTable::default();
        assert_eq!((t.table, t.pref), (7250, 7250));
        t.validate().unwrap();
        // Not the capture's defaults (relay node: table 7100, prefs 7099
        // and 7100).
        assert_ne!(t.table, 7100);
        assert!(![7099, 7100].contains(&t.pref));
        let listing = "0:\tfrom all lookup local \n\
                       7100:\tfrom all to 10.244.7.0/24 iif lo lookup 7100 \n\
                       7250:\tfrom all lookup 7250 \n\
                       32766:\tfrom all lookup main \n32767:\tfrom all lookup default \n";
        assert!(t.rule_listed(listing));
        // Someone else's rule at our preference, or ours at another one:
        // not ours.
        assert!(!t.rule_listed("7250:\tfrom all fwmark 0x1 lookup 7250 \n"));
        assert!(!t.rule_listed("7251:\tfrom all lookup 7250 \n"));
        assert!(!t.rule_listed("7250:\tfrom all lookup 7251 \n"));
        for bad in [
            RouteTable {
                table: 254,
                pref: 7250,
            },
            RouteTable {
                table: 255,
                pref: 7250,
            },
            RouteTable {
                table: 0,
                pref: 7250,
            },
            RouteTable {
                table: 7250,
                pref: 32766,
            },
            RouteTable {
                table: 7250,
                pref: 0,
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
    }
}
