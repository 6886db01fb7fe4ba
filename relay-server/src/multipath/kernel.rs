//! The multipath agent's side of the kernel: what this host holds of
//! ours (`installed`), the device each replica's next hop is reached
//! through, a [`plan`] run through `ip -batch` (`apply`), and one poll's
//! installation with the rule and `main`'s leftovers (`install`).
//!
//! Apart from the plan (`groups`) because everything here runs `ip`, and
//! so is exercised only in a network namespace of a test's own
//! (`tests::netns`).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use relay_protocol::Cidr;
use tracing::info;

use super::groups::{parse_installed, plan, Installed};
use super::{MultipathConfig, NEXTHOP_BASE};

pub(super) async fn ip(args: &[&str], stdin: Option<&str>) -> anyhow::Result<String> {
    Ok(relay_transport::capture::command("ip", args, stdin).await?)
}

pub(super) async fn installed(proto: u8, table: u32) -> anyhow::Result<Installed> {
    let routes = crate::agent::show_table(table, proto).await?;
    let nexthops = ip(&["nexthop", "show"], None).await?;
    Ok(parse_installed(&routes, &nexthops))
}

/// The device the kernel reaches `via` through (`ip route get`).
async fn device_of(via: IpAddr) -> Option<String> {
    let out = ip(&["route", "get", &via.to_string()], None).await.ok()?;
    let words: Vec<&str> = out.split_whitespace().collect();
    words
        .windows(2)
        .find(|p| p[0] == "dev")
        .map(|p| p[1].to_string())
}

/// What one [`apply`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Applied {
    /// `ip -batch` lines run.
    pub(super) changes: usize,
    /// Prefixes now routed through a group.
    pub(super) routes: usize,
    /// Wanted prefixes left unrouted: none of the replicas serving them
    /// has a nexthop (no route toward its VIA address).
    pub(super) unroutable: usize,
}

pub(super) async fn apply(
    want: &BTreeMap<Cidr, BTreeSet<usize>>,
    vias: &[IpAddr],
    proto: u8,
    table: u32,
) -> anyhow::Result<Applied> {
    let have = installed(proto, table).await?;
    let mut with_dev = Vec::new();
    for (i, v) in vias.iter().enumerate() {
        let dev = match have.nexthops.contains(&(NEXTHOP_BASE + i as u32)) {
            true => None,
            false => device_of(*v).await,
        };
        with_dev.push((*v, dev));
    }
    // A member whose nexthop could not be made is left out of groups.
    let made: BTreeSet<usize> = with_dev
        .iter()
        .enumerate()
        .filter(|(i, (_, d))| d.is_some() || have.nexthops.contains(&(NEXTHOP_BASE + *i as u32)))
        .map(|(i, _)| i)
        .collect();
    let routed: BTreeMap<Cidr, BTreeSet<usize>> = want
        .iter()
        .map(|(c, m)| {
            (
                *c,
                m.intersection(&made).copied().collect::<BTreeSet<usize>>(),
            )
        })
        .filter(|(_, m)| !m.is_empty())
        .collect();
    let batch = plan(&have, &routed, &with_dev)
        .replace("{proto}", &proto.to_string())
        .replace("{table}", &table.to_string());
    let changes = batch.lines().count();
    if changes > 0 {
        ip(&["-force", "-batch", "-"], Some(&batch)).await?;
    }
    Ok(Applied {
        changes,
        routes: routed.len(),
        unroutable: want.len() - routed.len(),
    })
}

/// One poll's installation, as the single-relay agent's: the prefixes
/// that hold none of `keep` (this node's addresses, the replicas' VIA
/// addresses: [`crate::agent::refuse_prefixes`]) into our table, then,
/// only once that worked, the rule consulting it (every poll, so one
/// someone removed comes back; not while there is no route) and, once,
/// an older agent's leftovers in `main`
/// ([`crate::agent::remove_from_main`]): never while our routes are not
/// in place, as edge traffic would then fall back to the default route.
pub(super) async fn install(
    want: &BTreeMap<Cidr, BTreeSet<usize>>,
    vias: &[IpAddr],
    cfg: &MultipathConfig,
    main_checked: &mut bool,
) -> anyhow::Result<Applied> {
    let done = apply(want, vias, cfg.proto, cfg.table.table).await?;
    if done.routes > 0 && cfg.table.ensure_rule().await? {
        info!(
            table = cfg.table.table,
            pref = cfg.table.pref,
            "routing rule added"
        );
    }
    if !*main_checked {
        let n = crate::agent::remove_from_main(cfg.proto).await?;
        if n > 0 {
            info!(
                removed = n,
                "removed routes an older agent left in the main table"
            );
        }
        *main_checked = true;
    }
    Ok(done)
}
