//! Route agent: runs on the *other* cloud nodes and keeps a route to the
//! relay node for every prefix the relay serves, adding and removing them
//! as edge sessions come and go.
//!
//! Where the routes point ([`Toward`]): `<edge prefix> via <relay node
//! address>` (`--via`), which needs a network that delivers a packet for
//! an edge pod address to the relay node's MAC (a bridge, host-gw routing,
//! BGP without encapsulation); or the way this node already reaches the
//! relay node's *pods* (`--via-pod-network`), copied from the kernel each
//! poll: with an overlay CNI (Flannel VXLAN, Calico IPIP or VXLAN) that is
//! the CNI's tunnel device and the relay node's tunnel endpoint, so edge
//! traffic is encapsulated node to node like pod traffic. Cloud fabrics
//! (AWS's source/destination check, GCP's and Azure's routing by
//! destination) drop a packet whose inner addresses are pod addresses on
//! the node network, and the replies, which come back over the overlay,
//! would fail a strict reverse-path check against a route out of the LAN
//! interface; both need the second mode there.
//!
//! It reads `GET /v1/routes` from the relay's admin API (over HTTPS when
//! given the CA of the admin API's certificate: the bearer token must not
//! cross the network in clear) through [`RoutesPoll`]: one connection kept
//! from poll to poll, and the last table's ETag sent back, so an unchanged
//! table is a 304 and the last one is installed again. It needs only the
//! read-only admin token (`admin.read_token_file`). It owns only
//! routes tagged with its own protocol number (`proto`, default 250), so it
//! never touches a route it did not install. On exit it removes them.
//!
//! The routes live in the agent's own routing table ([`RouteTable`],
//! default 7250), consulted by one policy rule ahead of `main` (`pref
//! 7250 lookup 7250`), not in `main`: CNIs manage `main`. Calico's Felix
//! deletes, at every resync, routes on its devices (`vxlan.calico`,
//! `tunl0`) that it did not program (`removeExternalRoutes`, on by
//! default), which took `--via-pod-network`'s routes away until the next
//! poll; and a CNI may hold its own route for an edge prefix in `main`
//! (calico-node on an edge advertising its block through a VXLAN endpoint
//! nobody here can reach), which an equal-length route of ours would
//! fight over. A table nobody else writes is left alone, and the rule
//! makes its routes win whatever `main` holds. One rule, whatever the
//! number of prefixes. Only the routing decision moves: the `onlink`
//! tunnel routes copied from `main` need nothing of `main` to forward.
//!
//! It refuses an edge prefix holding one of this node's addresses or the
//! next hop ([`refuse_prefixes`]): behind a rule ahead of `main`, such a
//! prefix would send this node's traffic for its own subnet (its
//! neighbours, the apiserver) to the relay. A start keeps a killed run's
//! rule and routes, so that edge traffic still goes to the relay node if
//! the relay is unreachable, and removes only those leftovers the filter
//! would refuse ([`RouteTable`]).
//!
//! With `--status-listen` it serves `/healthz`, `/readyz` and `/metrics`
//! ([`status`]), which [`run_with_status`] keeps up to date.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use relay_protocol::Cidr;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::Secret;

pub mod poll;
pub mod status;
pub use poll::{Busy, Polled, RoutesPoll};
use status::{AgentStatus, PollFailure};

/// What the agent needs.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// The relay's admin API address.
    pub admin: SocketAddr,
    /// Bearer token for the admin API, if it requires one.
    pub token: Option<Secret>,
    /// HTTPS to the admin API; `None`: plain HTTP (loopback, or explicitly
    /// allowed with `--allow-insecure-http`).
    pub tls: Option<AgentTls>,
    /// How often to poll.
    pub interval: Duration,
    /// Route protocol number marking our routes (see `/etc/iproute2/rt_protos`).
    pub proto: u8,
}

/// How the agent verifies the admin API's certificate.
#[derive(Clone)]
pub struct AgentTls {
    /// Trusts only the CA file given (`--ca-file`).
    pub config: std::sync::Arc<rustls::ClientConfig>,
    /// The name (or IP) the admin API's certificate must carry.
    pub server_name: rustls::pki_types::ServerName<'static>,
}

impl std::fmt::Debug for AgentTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentTls")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

impl AgentTls {
    /// HTTPS trusting only the CA certificates in `ca` (PEM), expecting
    /// `server_name` on the admin API's certificate.
    pub fn new(ca: &std::path::Path, server_name: &str) -> anyhow::Result<Self> {
        let config = relay_transport::tls::ca_only_client_config(ca, b"http/1.1")?;
        let server_name = rustls::pki_types::ServerName::try_from(server_name.to_string())
            .map_err(|e| anyhow::anyhow!("server name {server_name:?}: {e}"))?;
        Ok(AgentTls {
            config: std::sync::Arc::new(config),
            server_name,
        })
    }
}

/// A relay's route table as an agent reads it (IPv4 prefixes only).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RouteView {
    /// Prefixes a live session serves.
    pub live: BTreeSet<Cidr>,
    /// Prefixes of offline edges, which the relay captures and refuses at
    /// once (an older relay lists none).
    pub offline: BTreeSet<Cidr>,
}

impl RouteView {
    /// Live and offline prefixes alike: what the single-relay agent routes.
    pub fn all(self) -> BTreeSet<Cidr> {
        self.live.into_iter().chain(self.offline).collect()
    }
}

/// Fetches the relay's route table (IPv4 prefixes only): live and offline
/// edges' prefixes alike, all to be routed to the relay (an offline
/// edge's are refused there at once instead of leaving by this node's
/// default route). One request on a connection of its own; the agents'
/// loops poll through a [`RoutesPoll`] instead, which keeps the connection
/// and the last table's ETag.
pub async fn fetch(cfg: &AgentConfig) -> anyhow::Result<BTreeSet<Cidr>> {
    Ok(fetch_view(cfg).await?.all())
}

/// Fetches the relay's route table, live and offline prefixes apart
/// (`GET /v1/routes?offline=1`; an older relay ignores the query and lists
/// live ones only). One request, as [`fetch`].
pub async fn fetch_view(cfg: &AgentConfig) -> anyhow::Result<RouteView> {
    Ok(RoutesPoll::default().poll(cfg).await?.view)
}

async fn ip(args: &[&str], stdin: Option<&str>) -> anyhow::Result<String> {
    Ok(relay_transport::capture::command("ip", args, stdin).await?)
}

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
/// ([`refuse_prefixes`]); narrower overlaps are not detected.
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

/// This node's IPv4 interface addresses, except kube-proxy's ClusterIPs
/// ([`relay_transport::node_addrs::node_ipv4_addresses`]).
pub(crate) fn own_addrs() -> anyhow::Result<Vec<IpAddr>> {
    let own = relay_transport::node_addrs::node_ipv4_addresses()
        .map_err(|e| anyhow::anyhow!("listing this node's addresses (getifaddrs): {e}"))?;
    Ok(own.into_iter().map(IpAddr::from).collect())
}

/// Splits `want` into the prefixes safe to route and those refused, each
/// with the first address of `keep` it contains. `keep` is what must not
/// be sent to the relay: this node's own addresses and the next hops the
/// routes go through (a route for a prefix holding its own gateway would
/// resolve that gateway through itself).
///
/// This node's own addresses are matched by the `local` table, whose rule
/// (priority 0) comes before ours, so their own traffic stays anyway; what
/// refusing a prefix holding one protects is the rest of the subnet it
/// covers: this node's neighbours (the apiserver, the relay node among
/// them), which `main`'s connected route reaches and our rule ahead of
/// `main` would send to the relay whatever the prefix lengths.
///
/// Not quadratic: for each address of `keep`, one set lookup per prefix
/// length present in `want` (at most 33 for IPv4), whatever the number
/// of prefixes.
pub fn refuse_prefixes(
    want: &BTreeSet<Cidr>,
    keep: &[IpAddr],
) -> (BTreeSet<Cidr>, BTreeMap<Cidr, IpAddr>) {
    let lens: BTreeSet<u8> = want.iter().map(Cidr::prefix_len).collect();
    let mut refused = BTreeMap::new();
    for a in keep {
        for len in &lens {
            // `None`: longer than the address (an IPv6 prefix length).
            if let Some(c) = Cidr::containing(*a, *len) {
                if want.contains(&c) {
                    refused.entry(c).or_insert(*a);
                }
            }
        }
    }
    let ok = want
        .iter()
        .filter(|c| !refused.contains_key(*c))
        .copied()
        .collect();
    (ok, refused)
}

/// At start, before the first poll: removes the routes of protocol
/// `proto` that a previous run (killed, so it did not remove them on
/// exit) left in `table` and that [`refuse_prefixes`] would refuse, with
/// this node's addresses and `hops` (the next hops) to keep; nothing else.
/// Such a route, behind the rule the previous run also left, could send
/// this node's traffic to the relay node (the admin API included), and
/// so keep the poll that would remove it from ever succeeding. The other
/// leftovers stay, as does the rule: while the relay is unreachable they
/// keep sending edge traffic to the relay node, as the routes of a
/// running agent do; the first successful poll brings them in step.
pub(crate) async fn remove_refused_leftovers(table: RouteTable, proto: u8, hops: &[IpAddr]) {
    let removed = async {
        let have = parse_routes(&show_table(table.table, proto).await?);
        if have.is_empty() {
            return anyhow::Ok(BTreeMap::new());
        }
        let mut keep = own_addrs()?;
        keep.extend(hops);
        let (_, refused) = refuse_prefixes(&have.keys().copied().collect(), &keep);
        let batch: String = refused
            .keys()
            .map(|c| format!("route del {c} proto {proto} table {}\n", table.table))
            .collect();
        if !batch.is_empty() {
            ip(&["-4", "-force", "-batch", "-"], Some(&batch)).await?;
        }
        Ok(refused)
    };
    match removed.await {
        Ok(refused) => {
            for (c, a) in refused {
                info!(prefix = %c, contains = %a, table = table.table, "removed a previous run's route holding this node's own address or a next hop");
            }
        }
        Err(e) => {
            warn!(error = %format!("{e:#}"), "removing a previous run's routes that hold this node's addresses failed")
        }
    }
}

/// [`refuse_prefixes`] for an agent's loop: warns once per refused prefix
/// (again only if it was accepted in between) and records how many the
/// poll refused in `status`.
#[derive(Debug, Default)]
pub(crate) struct Refusals {
    warned: BTreeSet<Cidr>,
}

impl Refusals {
    /// The prefixes of `want` that contain none of `keep`.
    pub(crate) fn filter(
        &mut self,
        want: &BTreeSet<Cidr>,
        keep: &[IpAddr],
        status: &AgentStatus,
    ) -> BTreeSet<Cidr> {
        let (ok, refused) = refuse_prefixes(want, keep);
        for (c, a) in &refused {
            if !self.warned.contains(c) {
                warn!(prefix = %c, contains = %a, "refusing to route an edge prefix holding this node's own address or the next hop (it would take over this node's own traffic); fix the relay's [nodes] or the edge's routes");
            }
        }
        self.warned = refused.keys().copied().collect();
        status.refused(refused.len());
        ok
    }
}

/// Where the agent sends edge prefixes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Toward {
    /// `<prefix> via <addr>`, out of whichever interface reaches `addr`
    /// (`--via`): the relay node's address on a network that delivers
    /// any destination to its MAC.
    Via(IpAddr),
    /// The route this node has for `addr`, an address in the relay node's
    /// pod range (`--via-pod-network`): same gateway, device and `onlink`
    /// flag, looked up again every poll (`ip route get fibmatch`).
    PodNetwork(IpAddr),
}

/// A route's next hop: what the agent installs, or reads back.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NextHop {
    /// Gateway (`via`); `None`: a device route.
    pub via: Option<IpAddr>,
    /// Output device (`dev`); `None`: the kernel picks it from `via`.
    pub dev: Option<String>,
    /// The gateway is reachable on `dev` without a connected route (as
    /// overlay CNIs install their tunnel routes).
    pub onlink: bool,
}

impl NextHop {
    /// Reads the next hop from the words of an `ip route` line (the
    /// prefix and anything unrelated are skipped).
    pub fn parse(words: &[&str]) -> NextHop {
        let mut hop = NextHop::default();
        let mut i = 0;
        while i < words.len() {
            match words[i] {
                "via" => {
                    // `via inet6 fe80::1` for an IPv6 gateway of an IPv4
                    // route (BGP unnumbered).
                    let mut a = words.get(i + 1).copied();
                    if matches!(a, Some("inet" | "inet6")) {
                        i += 1;
                        a = words.get(i + 1).copied();
                    }
                    hop.via = a.and_then(|a| a.parse().ok());
                    i += 1;
                }
                "dev" => {
                    hop.dev = words.get(i + 1).map(|d| d.to_string());
                    i += 1;
                }
                "onlink" => hop.onlink = true,
                _ => {}
            }
            i += 1;
        }
        hop
    }

    /// The next hop of the route `ip -4 route get fibmatch` printed: the
    /// one this node uses toward the relay node's pods. Refuses what
    /// would send edge traffic anywhere but to that node: the default
    /// route (no route for the pod range here), a local or unreachable
    /// type (an address of this node, a blackhole), multipath.
    pub fn from_fibmatch(out: &str) -> anyhow::Result<NextHop> {
        let line = out.lines().next().unwrap_or_default();
        let words: Vec<&str> = line.split_whitespace().collect();
        anyhow::ensure!(!words.is_empty(), "no route");
        anyhow::ensure!(
            !out.lines()
                .skip(1)
                .any(|l| l.trim_start().starts_with("nexthop")),
            "a multipath route ({line:?}): not supported"
        );
        match words[0] {
            "default" | "0.0.0.0/0" => anyhow::bail!(
                "only the default route ({line:?}): this node has no route to the relay node's \
                 pod range; check the address given to --via-pod-network"
            ),
            "local" | "broadcast" | "anycast" | "multicast" => anyhow::bail!(
                "an address of this node ({line:?}): the agent belongs on the other nodes"
            ),
            "unreachable" | "blackhole" | "prohibit" | "throw" | "nat" => {
                anyhow::bail!("not a forwarding route ({line:?})")
            }
            _ => {}
        }
        let hop = NextHop::parse(&words[1..]);
        anyhow::ensure!(hop.dev.is_some(), "no device in {line:?}");
        Ok(hop)
    }

    /// `via X dev D onlink`, as `ip route replace` takes it.
    fn args(&self) -> String {
        let mut a = String::new();
        match self.via {
            Some(IpAddr::V6(v)) => {
                let _ = write!(a, " via inet6 {v}");
            }
            Some(v) => {
                let _ = write!(a, " via {v}");
            }
            None => {}
        }
        if let Some(d) = &self.dev {
            let _ = write!(a, " dev {d}");
        }
        if self.onlink {
            a += " onlink";
        }
        a
    }

    /// Whether an installed route's next hop `have` is what `self` asks
    /// for; a device `self` leaves to the kernel is not compared.
    fn satisfied_by(&self, have: &NextHop) -> bool {
        self.via == have.via
            && self.onlink == have.onlink
            && (self.dev.is_none() || self.dev == have.dev)
    }
}

/// The address probed for `--via-pod-network`'s prefix: its first host
/// address (the network address itself may be an address of the CNI's
/// own device, as Flannel's VTEPs are).
pub fn pod_network_probe(c: Cidr) -> IpAddr {
    match c.addr() {
        IpAddr::V4(a) if c.prefix_len() < 31 => IpAddr::V4((u32::from(a) + 1).into()),
        IpAddr::V6(a) if c.prefix_len() < 127 => IpAddr::V6((u128::from(a) + 1).into()),
        a => a,
    }
}

/// The next hop to install now.
async fn resolve(toward: Toward) -> anyhow::Result<NextHop> {
    match toward {
        Toward::Via(v) => Ok(NextHop {
            via: Some(v),
            ..NextHop::default()
        }),
        Toward::PodNetwork(a) => {
            let out = ip(&["-4", "route", "get", "fibmatch", &a.to_string()], None).await?;
            NextHop::from_fibmatch(&out).map_err(|e| e.context(format!("route to {a}")))
        }
    }
}

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
async fn sync(
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

/// Runs until `stop` with routes `toward` the relay node in the default
/// [`RouteTable`], then removes every route it installed and its rule.
/// With [`Toward::PodNetwork`] the next hop is looked up every poll; when
/// the CNI changes it, the routes follow.
pub async fn run(cfg: AgentConfig, toward: Toward, stop: CancellationToken) {
    run_with_status(cfg, toward, stop, Arc::default()).await
}

/// [`run`], recording each poll's outcome in `status` (what the status
/// endpoint, [`status::serve`], answers from).
pub async fn run_with_status(
    cfg: AgentConfig,
    toward: Toward,
    stop: CancellationToken,
    status: Arc<AgentStatus>,
) {
    run_in_table(cfg, toward, RouteTable::default(), stop, status).await
}

/// [`run_with_status`] with the routes in `table` (`--table`,
/// `--rule-pref`).
pub async fn run_in_table(
    cfg: AgentConfig,
    toward: Toward,
    table: RouteTable,
    stop: CancellationToken,
    status: Arc<AgentStatus>,
) {
    info!(admin = %cfg.admin, ?toward, table = table.table, rule_pref = table.pref, "route agent started");
    // A killed run's rule and routes stay (the relay may be away now):
    // only those the filter below would refuse go.
    let mut hops = match toward {
        Toward::Via(v) | Toward::PodNetwork(v) => vec![v],
    };
    if let Toward::PodNetwork(_) = toward {
        hops.extend(resolve(toward).await.ok().and_then(|h| h.via));
    }
    remove_refused_leftovers(table, cfg.proto, &hops).await;
    let mut refusals = Refusals::default();
    let mut failing = false;
    // Whether `main` still needs its leftovers removed (once per run).
    let mut main_checked = false;
    let mut last_hop: Option<NextHop> = None;
    let mut hop_failing = false;
    let mut relay = RoutesPoll::default();
    loop {
        let hop = match resolve(toward).await {
            Ok(h) => {
                if last_hop.as_ref() != Some(&h) {
                    info!(next_hop = %h.args().trim(), "next hop toward the relay node");
                    last_hop = Some(h.clone());
                }
                hop_failing = false;
                Ok(h)
            }
            // Keep the routes we have: a CNI restarting may remove its
            // routes for a moment.
            Err(e) => {
                if !hop_failing {
                    warn!(error = %format!("{e:#}"), "no next hop toward the relay node's pods; keeping the current routes");
                    hop_failing = true;
                }
                Err(e)
            }
        };
        // A 304 gives the last table again: installed as any other (the
        // kernel's routes and the next hop are checked every poll).
        match (relay.poll(&cfg).await.map(|p| p.view.all()), hop) {
            (Ok(want), Ok(hop)) => match own_addrs() {
                Err(e) => {
                    warn!(error = %e, "reading this node's addresses failed");
                    status.failed(PollFailure::InstallFailed, &e);
                }
                Ok(mut keep) => {
                    // Not the next hop, nor (`--via-pod-network`) the
                    // relay node's pod address it is looked up by.
                    keep.extend(hop.via);
                    if let Toward::PodNetwork(a) = toward {
                        keep.push(a);
                    }
                    let want = refusals.filter(&want, &keep, &status);
                    match install(&want, &hop, &cfg, table, &mut main_checked).await {
                        Ok((set, removed)) => {
                            if set + removed > 0 {
                                info!(set, removed, total = want.len(), "routes synced");
                            }
                            failing = false;
                            status.synced(want.len());
                        }
                        Err(e) => {
                            warn!(error = %e, "installing routes failed");
                            status.failed(PollFailure::InstallFailed, &e);
                        }
                    }
                }
            },
            (Ok(_), Err(e)) => status.failed(PollFailure::NoNextHop, &e),
            // Keep the routes we have: if the relay is briefly away, traffic
            // to edges still goes to the relay node, which answers at once.
            (Err(e), _) => {
                if !failing {
                    warn!(error = %e, "cannot read the relay's routes; keeping the current ones");
                    failing = true;
                }
                status.failed(PollFailure::RelayUnreachable, &e);
            }
        }
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep(cfg.interval) => {}
        }
    }
    match sync(&BTreeSet::new(), None, cfg.proto, table.table).await {
        Ok((_, removed)) => info!(removed, "route agent stopped; its routes removed"),
        Err(e) => warn!(error = %e, "removing routes on exit failed"),
    }
    if let Err(e) = table.remove_rule().await {
        warn!(error = %e, "removing the routing rule on exit failed");
    }
}

/// One poll's installation: our routes into our table, then the rule
/// that consults it (every poll, so a rule someone removed comes back;
/// not before there is a route to consult, so an agent with nothing to
/// route changes nothing), then, once, what an older agent left in `main`
/// ([`remove_from_main`]).
async fn install(
    want: &BTreeSet<Cidr>,
    hop: &NextHop,
    cfg: &AgentConfig,
    table: RouteTable,
    main_checked: &mut bool,
) -> anyhow::Result<(usize, usize)> {
    let done = sync(want, Some(hop), cfg.proto, table.table).await?;
    if !want.is_empty() && table.ensure_rule().await? {
        info!(table = table.table, pref = table.pref, "routing rule added");
    }
    if !*main_checked {
        let n = remove_from_main(cfg.proto).await?;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn c(s: &str) -> Cidr {
        s.parse().unwrap()
    }

    #[test]
    fn the_cnis_route_to_the_relay_nodes_pods_is_copied_or_refused() {
        // Flannel VXLAN, Calico IPIP, a host-gw route.
        let h =
            NextHop::from_fibmatch("10.244.1.0/24 via 10.244.1.0 dev flannel.1 onlink \n").unwrap();
        assert_eq!(h.args(), " via 10.244.1.0 dev flannel.1 onlink");
        let h = NextHop::from_fibmatch("10.244.1.0/26 via 10.0.0.1 dev tunl0 proto bird onlink \n")
            .unwrap();
        assert_eq!(h.args(), " via 10.0.0.1 dev tunl0 onlink");
        let h = NextHop::from_fibmatch("10.244.1.0/24 via 10.0.0.1 dev eth0 \n").unwrap();
        assert_eq!(h.args(), " via 10.0.0.1 dev eth0");
        let h = NextHop::from_fibmatch("10.244.1.0/24 dev wg0 scope link \n").unwrap();
        assert_eq!(h.args(), " dev wg0");
        for (out, why) in [
            ("default via 10.0.0.254 dev eth0 \n", "default route"),
            (
                "local 10.244.1.0 dev flannel.1 proto kernel scope host src 10.244.1.0 \n",
                "this node",
            ),
            ("blackhole 10.244.1.0/24 proto bird \n", "forwarding"),
            (
                "10.244.1.0/24 proto bird \n\tnexthop via 10.0.0.1 dev eth0 weight 1 \n\tnexthop via 10.0.0.9 dev eth0 weight 1 \n",
                "multipath",
            ),
        ] {
            let e = NextHop::from_fibmatch(out).unwrap_err().to_string();
            assert!(e.contains(why), "{out:?}: {e}");
        }
        assert_eq!(
            pod_network_probe(c("10.244.1.0/24")).to_string(),
            "10.244.1.1"
        );
        assert_eq!(pod_network_probe(c("10.244.1.7")).to_string(), "10.244.1.7");
    }

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

    /// An edge prefix holding this node's address (its subnet, its
    /// neighbours) or the next hop is refused; another host's /32 is not.
    #[test]
    fn prefixes_holding_this_nodes_addresses_or_the_next_hop_are_refused() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        // As `own_addrs` lists them: lo, eth0, flannel.1; not kube-proxy
        // IPVS's ClusterIPs (10.96.0.1 and .10 on kube-ipvs0).
        let own = [ip("127.0.0.1"), ip("10.0.3.17"), ip("10.244.3.0")];
        let via = ip("192.168.9.1");
        let keep: Vec<IpAddr> = own.iter().copied().chain([via]).collect();
        for (prefix, refused_for) in [
            // `[nodes]` listing the VPC's range: this node's own subnet.
            ("10.0.0.0/16", Some("10.0.3.17")),
            ("0.0.0.0/0", Some("127.0.0.1")),
            // The cluster's whole pod range, this node's block in it.
            ("10.244.0.0/16", Some("10.244.3.0")),
            // The next hop inside.
            ("192.168.0.0/16", Some("192.168.9.1")),
            ("192.168.9.1/32", Some("192.168.9.1")),
            // A neighbour's /32, an edge's pod block: fine.
            ("10.0.3.18/32", None),
            ("10.245.7.0/24", None),
            // The service range, whose ClusterIPs kube-ipvs0 holds: the
            // `local` table answers for those whatever our rule routes.
            ("10.96.0.0/12", None),
        ] {
            let want = BTreeSet::from([c(prefix)]);
            let (ok, refused) = refuse_prefixes(&want, &keep);
            match refused_for {
                Some(a) => {
                    assert!(ok.is_empty(), "{prefix} accepted");
                    assert_eq!(refused.get(&c(prefix)), Some(&ip(a)), "{prefix}");
                }
                None => {
                    assert_eq!(ok, want, "{prefix} refused");
                    assert!(refused.is_empty());
                }
            }
        }
        // The filter counts what it refused, every poll.
        let status = status::AgentStatus::default();
        let mut r = Refusals::default();
        let want = BTreeSet::from([c("10.0.0.0/16"), c("10.245.7.0/24")]);
        assert_eq!(
            r.filter(&want, &keep, &status),
            BTreeSet::from([c("10.245.7.0/24")])
        );
        assert!(status
            .render()
            .contains("\nroute_agent_prefixes_refused 1\n"));
        r.filter(&BTreeSet::from([c("10.245.7.0/24")]), &keep, &status);
        assert!(status
            .render()
            .contains("\nroute_agent_prefixes_refused 0\n"));
    }

    /// The refusal's lookup by prefix length refuses what a scan of every
    /// prefix against every address does, naming the same (first) address.
    #[test]
    fn the_refusal_lookup_agrees_with_a_scan() {
        let mut x: u32 = 0x2545_f491;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x
        };
        // Addresses and prefixes crowded into 10.0.0.0/20, so that many
        // prefixes hold several addresses.
        let keep: Vec<IpAddr> = (0..300)
            .map(|_| IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 | (next() & 0xfff))))
            .chain(["192.0.2.1".parse().unwrap(), "::1".parse().unwrap()])
            .collect();
        let want: BTreeSet<Cidr> = (0..2000)
            .filter_map(|_| {
                let len = (next() % 33) as u8;
                let a = IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 | (next() & 0xfff)));
                Cidr::containing(a, len)
            })
            .chain([c("2001:db8::/32")])
            .collect();
        let (ok, refused) = refuse_prefixes(&want, &keep);
        assert!(!ok.is_empty() && !refused.is_empty());
        for p in &want {
            let scan = keep.iter().find(|a| p.contains(a));
            assert_eq!(refused.get(p), scan, "{p}");
            assert_eq!(ok.contains(p), scan.is_none(), "{p}");
        }
    }

    /// The single-relay agent for real, in a namespace of the test's own
    /// (see `crate::multipath::tests::netns`): a killed run's rule and
    /// routes stay while the relay is unreachable, except a route holding
    /// this node's address, removed at start; the first successful poll
    /// brings the rest in step; a prefix holding this node's address or
    /// the next hop is not installed.
    #[test]
    fn a_previous_runs_rule_and_routes_stay_and_prefixes_holding_this_node_are_refused() {
        use crate::multipath::tests::netns::*;
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::{Arc, Mutex};
        netns_test(async {
            // What a killed run left: its rule, a route to an edge, and one
            // holding this node's address (192.0.2.1) and the next hop.
            sh(&["-4", "rule", "add", "pref", "7250", "lookup", "7250"]);
            for prefix in ["10.244.9.0/24", "192.0.0.0/16"] {
                sh(&[
                    "route",
                    "add",
                    prefix,
                    "via",
                    "192.0.2.2",
                    "proto",
                    "250",
                    "table",
                    "7250",
                ]);
            }
            let routes = Arc::new(Mutex::new(vec![]));
            let up = Arc::new(AtomicBool::new(false));
            let cfg = crate::agent::poll::tests::config(
                fake_replica_while(routes.clone(), up.clone()).await,
            );
            let status = Arc::<status::AgentStatus>::default();
            let stop = CancellationToken::new();
            let toward = Toward::Via("192.0.2.2".parse().unwrap());
            let agent = tokio::spawn(run_with_status(cfg, toward, stop.clone(), status.clone()));
            until("two polls with the relay unreachable", || {
                polls(&status, "relay_unreachable") >= 2
            })
            .await;
            assert!(
                rule_listed(),
                "a previous run's rule went:\n{}",
                sh(&["rule"])
            );
            assert_eq!(table(), "10.244.9.0/24 via 192.0.2.2 dev up0 proto 250 \n");
            // Where this node's traffic for that edge goes meanwhile.
            let get = sh(&["-4", "route", "get", "10.244.9.5"]);
            assert!(get.contains("via 192.0.2.2 dev up0"), "{get}");
            // The relay answers: this node's subnet, and a prefix holding
            // the next hop, refused; the leftover edge route gone.
            *routes.lock().unwrap() = vec!["10.244.7.0/24", "192.0.0.0/16", "192.0.2.2/32"];
            up.store(true, Ordering::SeqCst);
            until("one route", || {
                status
                    .readiness()
                    .is_ok_and(|l| l.starts_with("ready: 1 routes"))
            })
            .await;
            assert_eq!(table(), "10.244.7.0/24 via 192.0.2.2 dev up0 proto 250 \n");
            assert!(rule_listed());
            assert!(status
                .render()
                .contains("\nroute_agent_prefixes_refused 2\n"));
            stop.cancel();
            agent.await.expect("agent");
            assert_eq!(table(), "");
            assert!(!rule_listed());
        });
    }

    /// The single-relay agent against a real relay, in a namespace of the
    /// test's own: after the first poll reads the table, every poll sends
    /// its ETag on the one connection, gets 304 and installs the same
    /// table again (the route stays, the polls count as synced); a change
    /// is installed.
    #[test]
    fn polls_answered_304_keep_the_routes_on_one_connection() {
        use crate::admin::tests::{relay_configured, until_sessions, StandIn};
        use crate::agent::poll::tests::Proxy;
        use crate::multipath::tests::netns::*;
        netns_test(async {
            let (relay, pki) = relay_configured(2, |_| {}).await;
            let edge = StandIn::connect(&relay, &pki, 0).await;
            until_sessions(&relay, 1).await;
            let proxy = Proxy::start(relay.admin_addr().expect("admin")).await;
            let cfg = crate::agent::poll::tests::config(proxy.addr);
            let status = Arc::<status::AgentStatus>::default();
            let stop = CancellationToken::new();
            let toward = Toward::Via("192.0.2.2".parse().unwrap());
            let agent = tokio::spawn(run_with_status(cfg, toward, stop.clone(), status.clone()));
            until("one route", || {
                status
                    .readiness()
                    .is_ok_and(|l| l.starts_with("ready: 1 routes"))
            })
            .await;
            until("six polls", || polls(&status, "ok") >= 6).await;
            assert_eq!(table(), "10.99.0.1 via 192.0.2.2 dev up0 proto 250 \n");
            let sent = proxy.sent();
            let asked = sent.matches("GET /v1/routes?offline=1 ").count();
            assert!(asked >= 6, "{sent}");
            assert_eq!(
                sent.matches("\r\nIf-None-Match: ").count(),
                asked - 1,
                "every poll after the first sends the ETag:\n{sent}"
            );
            assert_eq!(proxy.opened(), 1, "one connection for every poll");
            // A second edge: read, and installed.
            let second = StandIn::connect(&relay, &pki, 1).await;
            until("two routes", || {
                status
                    .readiness()
                    .is_ok_and(|l| l.starts_with("ready: 2 routes"))
            })
            .await;
            assert!(table().contains("10.99.0.2 via 192.0.2.2"), "{}", table());
            stop.cancel();
            agent.await.expect("agent");
            drop((edge, second));
            relay.shutdown(Duration::ZERO).await;
        });
    }

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
