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
//! read-only admin token (`admin.read_token_file`), read again from its
//! file when the file changes and after a 401, so a rotated Secret needs
//! no restart of the agent (nor of the relay). It owns only
//! routes tagged with its own protocol number (`proto`, default 250), so it
//! never touches a route it did not install. On exit it removes them,
//! unless told to leave them for the next agent ([`OnExit`]).
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

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use relay_protocol::Cidr;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::Secret;

mod next_hop;
pub mod poll;
mod refuse;
mod routes;
pub mod status;
mod table;
use next_hop::resolve;
pub use next_hop::{pod_network_probe, NextHop, Toward};
pub use poll::{Busy, Polled, RoutesPoll};
pub use refuse::refuse_prefixes;
pub(crate) use refuse::{own_addrs, remove_refused_leftovers, Refusals};
pub(crate) use routes::show_table;
use routes::sync;
pub use routes::{parse_routes, plan};
use status::{AgentStatus, PollFailure};
pub use table::{remove_from_main, RouteTable, DEFAULT_RULE_PREF, DEFAULT_TABLE};

/// What the agent needs.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// The relay's admin API address.
    pub admin: SocketAddr,
    /// Bearer token for the admin API, if it requires one. One made with
    /// [`Secret::from_file`] (`--token-file`) is read again when the file
    /// changes and after a 401 (see [`poll`]).
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
///
/// The CA file is read again when it changes (its
/// [`relay_transport::reload::FileStamp`], checked before each new
/// connection): the relay CA's ConfigMap is
/// updated in place when the CA is rotated (cert-manager with
/// `rotationPolicy: Always`), and an agent holding the old CA would fail
/// every poll from its next connection on, keeping stale routes, until
/// restarted. A file that cannot be read or parsed keeps the CA last read
/// (and is logged).
#[derive(Clone)]
pub struct AgentTls {
    /// The CA file (`--ca-file`).
    ca: std::path::PathBuf,
    /// The config trusting only that file's CAs, and the file's stamp
    /// when it was read.
    current: std::sync::Arc<
        std::sync::Mutex<(
            std::sync::Arc<rustls::ClientConfig>,
            relay_transport::reload::Stamp,
        )>,
    >,
    /// The name (or IP) the admin API's certificate must carry.
    pub server_name: rustls::pki_types::ServerName<'static>,
}

impl std::fmt::Debug for AgentTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentTls")
            .field("ca", &self.ca)
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

impl AgentTls {
    /// HTTPS trusting only the CA certificates in `ca` (PEM), expecting
    /// `server_name` on the admin API's certificate.
    pub fn new(ca: &std::path::Path, server_name: &str) -> anyhow::Result<Self> {
        let stamp = relay_transport::reload::stamp_of(&[ca]);
        let config = relay_transport::tls::ca_only_client_config(ca, b"http/1.1")?;
        let server_name = rustls::pki_types::ServerName::try_from(server_name.to_string())
            .map_err(|e| anyhow::anyhow!("server name {server_name:?}: {e}"))?;
        Ok(AgentTls {
            ca: ca.to_path_buf(),
            current: std::sync::Arc::new(std::sync::Mutex::new((
                std::sync::Arc::new(config),
                stamp,
            ))),
            server_name,
        })
    }

    /// The client config for a new connection: from the CA file as it is
    /// now, read again if it changed since the last read.
    pub fn config(&self) -> std::sync::Arc<rustls::ClientConfig> {
        let stamp = relay_transport::reload::stamp_of(&[self.ca.as_path()]);
        let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        if current.1 != stamp {
            match relay_transport::tls::ca_only_client_config(&self.ca, b"http/1.1") {
                Ok(c) => {
                    tracing::info!(ca = %self.ca.display(), "CA file changed: read again");
                    *current = (std::sync::Arc::new(c), stamp);
                }
                Err(e) => {
                    // Not taken as read: tried again at the next
                    // connection (a file caught mid-write reads whole
                    // then).
                    tracing::warn!(ca = %self.ca.display(), error = %e, "CA file changed but cannot be used; the CA read before stays");
                }
            }
        }
        current.0.clone()
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

/// What an agent does with its routes and rule when it stops.
///
/// A route-agent DaemonSet is updated one node at a time, and its new pod
/// is created only once the old one is gone (it cannot surge: it runs in
/// the host network, on a fixed status port): an old agent that removed
/// its routes on the way out left that node's pods without a way to any
/// edge until the new pod had pulled its image, started and polled. With
/// [`OnExit::Keep`] the routes and rule stay and the next agent, which
/// keeps what it finds at its start (see [`RouteTable`]), takes them over
/// without a gap. Uninstalling then needs its own step
/// ([`remove_installed`], `route-agent --cleanup`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnExit {
    /// Remove every route it installed and its rule (the default).
    #[default]
    Remove,
    /// Leave them for the next agent (`--keep-routes-on-exit`).
    Keep,
}

/// Removes the single-relay agent's routes (protocol `proto` in
/// `table.table`) and its rule: what it does on a stop with
/// [`OnExit::Remove`]. How many routes went.
pub async fn remove_installed(table: RouteTable, proto: u8) -> anyhow::Result<usize> {
    let (_, removed) = sync(&BTreeSet::new(), None, proto, table.table).await?;
    table.remove_rule().await?;
    Ok(removed)
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
    run_in_table(
        cfg,
        toward,
        RouteTable::default(),
        stop,
        status,
        OnExit::Remove,
    )
    .await
}

/// [`run_with_status`] with the routes in `table` (`--table`,
/// `--rule-pref`), left in place on exit with [`OnExit::Keep`].
pub async fn run_in_table(
    cfg: AgentConfig,
    toward: Toward,
    table: RouteTable,
    stop: CancellationToken,
    status: Arc<AgentStatus>,
    on_exit: OnExit,
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
    if on_exit == OnExit::Keep {
        info!("route agent stopped; its routes and rule kept for the next agent");
        return;
    }
    match remove_installed(table, cfg.proto).await {
        Ok(removed) => info!(removed, "route agent stopped; its routes and rule removed"),
        Err(e) => warn!(error = %format!("{e:#}"), "removing routes on exit failed"),
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

    /// Parses a prefix: one helper for the tests of `next_hop`, `routes`
    /// and `refuse` too, rather than a copy in each.
    pub(super) fn c(s: &str) -> Cidr {
        s.parse().unwrap()
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
            until_routes(&status, 1).await;
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

    /// A route-agent DaemonSet update, in a namespace of the test's own:
    /// the old agent, stopped with [`OnExit::Keep`], leaves its route and
    /// rule, so this node's edge traffic still goes to the relay node
    /// while no agent runs; the next agent takes them over (kept while it
    /// cannot reach the relay, brought in step by its first poll) and,
    /// stopped with [`OnExit::Remove`], removes them.
    #[test]
    fn an_agent_keeping_its_routes_on_exit_hands_them_to_the_next() {
        use crate::multipath::tests::netns::*;
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::{Arc, Mutex};
        netns_test(async {
            let routes = Arc::new(Mutex::new(vec!["10.244.7.0/24"]));
            let up = Arc::new(AtomicBool::new(true));
            let admin = fake_replica_while(routes.clone(), up.clone()).await;
            let toward = Toward::Via("192.0.2.2".parse().unwrap());
            let start = |on_exit| {
                let status = Arc::<status::AgentStatus>::default();
                let stop = CancellationToken::new();
                let task = tokio::spawn(run_in_table(
                    crate::agent::poll::tests::config(admin),
                    toward,
                    RouteTable::default(),
                    stop.clone(),
                    status.clone(),
                    on_exit,
                ));
                (status, stop, task)
            };
            let (status, stop, old) = start(OnExit::Keep);
            until_routes(&status, 1).await;
            stop.cancel();
            old.await.expect("agent");
            // No agent runs: the route and rule are still there.
            assert_eq!(table(), "10.244.7.0/24 via 192.0.2.2 dev up0 proto 250 \n");
            assert!(rule_listed(), "{}", sh(&["rule"]));
            let get = sh(&["-4", "route", "get", "10.244.7.5"]);
            assert!(get.contains("via 192.0.2.2 dev up0"), "{get}");
            // The next agent starts while the relay is away: it keeps them.
            up.store(false, Ordering::SeqCst);
            *routes.lock().unwrap() = vec!["10.244.7.0/24", "10.244.8.0/24"];
            let (status, stop, new) = start(OnExit::Remove);
            until("two polls with the relay unreachable", || {
                polls(&status, "relay_unreachable") >= 2
            })
            .await;
            assert_eq!(table(), "10.244.7.0/24 via 192.0.2.2 dev up0 proto 250 \n");
            assert!(rule_listed());
            up.store(true, Ordering::SeqCst);
            until_routes(&status, 2).await;
            assert!(
                table().contains("10.244.8.0/24 via 192.0.2.2"),
                "{}",
                table()
            );
            stop.cancel();
            new.await.expect("agent");
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
            until_routes(&status, 1).await;
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
            until_routes(&status, 2).await;
            assert!(table().contains("10.99.0.2 via 192.0.2.2"), "{}", table());
            stop.cancel();
            agent.await.expect("agent");
            drop((edge, second));
            relay.shutdown(Duration::ZERO).await;
        });
    }
}
