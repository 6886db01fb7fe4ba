//! The route agent (`--via-pod-network`) next to a CNI that manages the
//! **main** table as Calico's Felix does, in the network-namespace lab
//! with the cloud fabric and its VXLAN overlay (`LabOptions::cloud_overlay`).
//!
//! The Felix model, a bounded loop in cloud2's namespace (every 300 ms for
//! 10 s): it deletes every route in `main` of the agent's protocol (250)
//! or on the tunnel device (`flannel.1`) without Felix's own protocol
//! (80), as `removeExternalRoutes` does at each resync; and it asserts its
//! own route for each edge pod CIDR in `main`, toward a VXLAN endpoint
//! nobody answers for (calico-node on an edge advertising its block). The
//! overlay's routes to the other nodes' pods are Felix's (retagged proto
//! 80 first), so the overlay itself keeps working. cloud2 runs with strict
//! reverse-path filtering, so the replies from the edge pods, arriving on
//! `flannel.1`, are validated against the FIB with the agent's rule.
//!
//! What must hold:
//! - a route of protocol 250 that an older agent left in `main` is gone
//!   once the agent has its own table in place (the upgrade path);
//! - while the loop runs, cloud2's pod reaches an edge pod (the two in
//!   turn) on **every** attempt, each bounded to 2 s: the agent's routes
//!   sit in table 7250 behind one rule ahead of `main`, where neither the
//!   pruning nor the competing route reaches them. (With the routes in
//!   `main`, as before, the loop deletes or replaces them between polls
//!   and attempts fail.);
//! - after the loop the agent still has one rule and all its routes; on
//!   exit it removes them and its rule, and leaves Felix's routes alone.
//!
//! Needs root; skips loudly otherwise, and fails instead of skipping under
//! CI=true or REQUIRE_LAB=1. Time budget: under 40 s (lab and sessions
//! about 10 s, the loop 10 s).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use relay_lab::netns::{self, LabOptions, NetnsLab, Role, VTEPS, VTEP_DEV};
use relay_lab::route_agent;
use relay_lab::scenario::{
    edge_config, netns_start_with, relay_config, sa, services, start_edge, start_relay, within,
    Table, ADMIN_PORT, HTTP,
};
use relay_server::agent::{pod_network_probe, Toward};

/// How often the agent polls here (shorter than the default 2 s, still
/// longer than the loop's period).
const POLL: Duration = Duration::from_millis(500);
/// The Felix model's period and how long it runs.
const FELIX_EVERY: Duration = Duration::from_millis(300);
const FELIX_FOR: Duration = Duration::from_secs(10);
/// Felix's route protocol number (`proto 80` in `ip route`).
const FELIX_PROTO: &str = "80";
/// The VXLAN endpoint Felix's competing routes point at: no VTEP has it.
const DEAD_VTEP: &str = "10.244.9.0";
/// The test's time budget.
const BUDGET: Duration = Duration::from_secs(40);

/// The Felix model's loop: stops at its deadline, or when dropped (the
/// scope joins the thread), and then removes its competing routes.
struct Felix<'a> {
    lab: &'a NetnsLab,
    stop: AtomicBool,
    /// Passes done (the first one before traffic is measured).
    passes: AtomicUsize,
    /// Routes it deleted, over all passes.
    deleted: AtomicUsize,
}

impl Felix<'_> {
    /// One resync: prune `main`, then assert Felix's own routes.
    fn pass(&self) -> Result<()> {
        let main = self.lab.exec(
            Role::Cloud2,
            &["ip", "-4", "route", "show", "table", "main"],
        )?;
        let mut batch = String::new();
        for line in main.lines().filter(|l| !l.starts_with(char::is_whitespace)) {
            let w: Vec<&str> = line.split_whitespace().collect();
            let proto = w.windows(2).find(|p| p[0] == "proto").map(|p| p[1]);
            let on_tunnel = w.windows(2).any(|p| p == ["dev", VTEP_DEV]);
            if proto == Some("250") || (on_tunnel && proto != Some(FELIX_PROTO)) {
                batch += &format!("route del {} table main\n", line.trim());
            }
        }
        for site in netns::SITES {
            batch += &format!(
                "route replace {} via {DEAD_VTEP} dev {VTEP_DEV} onlink proto {FELIX_PROTO}\n",
                netns::edge_pod_cidr(site)
            );
        }
        let n = batch.lines().count() - netns::SITES.len();
        self.run_batch(&batch)?;
        self.deleted.fetch_add(n, Ordering::Relaxed);
        Ok(())
    }

    fn run_batch(&self, batch: &str) -> Result<()> {
        let f = tempfile_in_tmp(batch)?;
        let r = self
            .lab
            .exec(Role::Cloud2, &["ip", "-force", "-batch", &f])
            .map(|_| ());
        let _ = std::fs::remove_file(&f);
        r
    }

    /// Runs passes until the deadline or `stop`.
    fn run(&self, until: Instant) -> Result<()> {
        while Instant::now() < until && !self.stop.load(Ordering::Relaxed) {
            let t = Instant::now();
            self.pass()?;
            self.passes.fetch_add(1, Ordering::Relaxed);
            std::thread::sleep(FELIX_EVERY.saturating_sub(t.elapsed()));
        }
        Ok(())
    }
}

impl Drop for Felix<'_> {
    fn drop(&mut self) {
        let batch: String = netns::SITES
            .iter()
            .map(|s| {
                format!(
                    "route del {} proto {FELIX_PROTO} table main\n",
                    netns::edge_pod_cidr(*s)
                )
            })
            .collect();
        let _ = self.run_batch(&batch);
    }
}

/// Writes `text` to a fresh file under the temporary directory (for `ip
/// -batch`, which `exec` cannot feed on stdin); its path.
fn tempfile_in_tmp(text: &str) -> Result<String> {
    static N: AtomicUsize = AtomicUsize::new(0);
    let p = std::env::temp_dir().join(format!(
        "felix-{}-{}.batch",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::write(&p, text).with_context(|| format!("writing {}", p.display()))?;
    Ok(p.display().to_string())
}

/// One HTTP GET from cloud2's pod to `to`, all of it within 2 s (a SYN
/// lost to a missing or dead route would be retried only after 1 s).
fn attempt(lab: &NetnsLab, to: std::net::Ipv4Addr) -> Result<String> {
    let target = sa(to, HTTP);
    lab.run_in(Role::Cpod2, Duration::from_secs(5), move || async move {
        tokio::time::timeout(Duration::from_secs(2), async {
            let s = tokio::net::TcpStream::connect(target).await?;
            let (code, body) = relay_lab::http_get(s, &target.to_string(), "/", None).await?;
            anyhow::ensure!(code == 200, "HTTP {code}");
            Ok(body.trim_end().to_string())
        })
        .await
        .context("no answer within 2 s")?
    })
}

#[test]
fn the_route_agent_survives_a_cni_pruning_the_main_table() -> Result<()> {
    let options = LabOptions {
        cloud_overlay: true,
        ..LabOptions::default()
    };
    let Some((t0, lab, pki)) = netns_start_with("route agent beside Felix", options)? else {
        return Ok(());
    };
    let _svcs = [
        services(&lab, Role::Epod1, "epod1")?,
        services(&lab, Role::Epod2, "epod2")?,
    ];
    let relay = start_relay(&lab, relay_config(&pki)?)?;
    let _edges = [
        start_edge(&lab, 1, edge_config(&pki, 1)?)?,
        start_edge(&lab, 2, edge_config(&pki, 2)?)?,
    ];
    let mut m = Table::new(&["case", "path", "result"]);

    // Strict reverse-path filtering on cloud2 (in its namespace only).
    lab.exec(
        Role::Cloud2,
        &[
            "sysctl",
            "-qw",
            "net/ipv4/conf/all/rp_filter=1",
            &format!("net/ipv4/conf/{VTEP_DEV}/rp_filter=1"),
        ],
    )?;
    // The overlay's routes are Felix's; an older agent left a route in
    // main for edge 2's pods, through a next hop long gone.
    for peer in VTEPS.iter().filter(|v| v.role != Role::Cloud2) {
        let via = peer.addr.to_string();
        lab.exec(
            Role::Cloud2,
            &[
                "ip",
                "route",
                "replace",
                peer.pod_cidr,
                "via",
                &via,
                "dev",
                VTEP_DEV,
                "onlink",
                "proto",
                FELIX_PROTO,
            ],
        )?;
    }
    let e2 = netns::edge_pod_cidr(2).to_string();
    lab.exec(
        Role::Cloud2,
        &[
            "ip", "route", "add", &e2, "via", DEAD_VTEP, "dev", VTEP_DEV, "onlink", "proto", "250",
        ],
    )?;

    let probe = pod_network_probe(netns::CPOD1_CIDR.parse()?);
    let admin = sa(netns::RELAY_LAN_IP, ADMIN_PORT);
    let agent =
        route_agent::start_toward(&lab, Role::Cloud2, admin, Toward::PodNetwork(probe), POLL)?;
    let overlay = format!("via {} dev {VTEP_DEV} onlink", VTEPS[0].addr);
    m.note(
        &[
            "routes in the agent's table, one rule",
            "cloud2: table 7250 via 10.244.1.0 dev flannel.1 onlink",
        ],
        within(Duration::from_secs(10), || {
            let routes = route_agent::routes(&lab, Role::Cloud2)?;
            Ok(route_agent::rules(&lab, Role::Cloud2)? == 1
                && netns::SITES.iter().all(|s| {
                    let c = netns::edge_pod_cidr(*s).to_string();
                    routes
                        .lines()
                        .any(|l| l.starts_with(&format!("{c} ")) && l.contains(&overlay))
                }))
        })
        .map(|d| format!("after {d:?}")),
    );
    m.note(
        &[
            "an older agent's route in main removed",
            "cloud2: main proto 250",
        ],
        within(Duration::from_secs(5), || {
            Ok(route_agent::routes_in_main(&lab, Role::Cloud2)?
                .trim()
                .is_empty())
        })
        .map(|d| format!("after {d:?}")),
    );

    // Felix at work; cloud2's pod keeps reaching the edge pods.
    let felix = Felix {
        lab: &lab,
        stop: AtomicBool::new(false),
        passes: AtomicUsize::new(0),
        deleted: AtomicUsize::new(0),
    };
    let (attempts, failures) = std::thread::scope(|scope| -> Result<(usize, Vec<String>)> {
        let until = Instant::now() + FELIX_FOR;
        let felix = &felix;
        let looping = scope.spawn(move || felix.run(until));
        // Stops the loop however this closure ends.
        struct Stop<'f, 'l>(&'f Felix<'l>);
        impl Drop for Stop<'_, '_> {
            fn drop(&mut self) {
                self.0.stop.store(true, Ordering::Relaxed);
            }
        }
        let _stop = Stop(felix);
        within(Duration::from_secs(5), || {
            Ok(felix.passes.load(Ordering::Relaxed) > 0 || looping.is_finished())
        })?;
        let (mut attempts, mut failures) = (0, Vec::new());
        while !looping.is_finished() {
            let site = netns::SITES[attempts % netns::SITES.len()];
            let started = Instant::now();
            let want = format!("epod{site}");
            match attempt(&lab, netns::edge_pod_ip(site)) {
                Ok(who) if who.strip_prefix("hello from ").unwrap_or(&who) == want => {}
                Ok(who) => failures.push(format!("{want}: answered by {who}")),
                Err(e) => failures.push(format!(
                    "{want} at pass {}: {e:#} ({:?})",
                    felix.passes.load(Ordering::Relaxed),
                    started.elapsed()
                )),
            }
            attempts += 1;
            std::thread::sleep(Duration::from_millis(100));
        }
        looping
            .join()
            .map_err(|_| anyhow::anyhow!("the Felix model panicked"))??;
        Ok((attempts, failures))
    })?;
    let passes = felix.passes.load(Ordering::Relaxed);
    m.push(
        &[
            "Felix model ran",
            "cloud2: main pruned every 300 ms for 10 s",
        ],
        format!(
            "{} ({passes} passes, {} routes deleted)",
            if passes >= 10 { "ok" } else { "TOO FEW" },
            felix.deleted.load(Ordering::Relaxed)
        ),
        passes >= 10,
    );
    m.push(
        &[
            "cloud pod → edge pods on every attempt during it",
            "cpod2 → epod1/epod2:80 (rp_filter strict)",
        ],
        match failures.first() {
            None if attempts >= 20 => format!("ok ({attempts} attempts)"),
            None => format!("TOO FEW ATTEMPTS ({attempts})"),
            Some(f) => format!("{} of {attempts} FAILED, first: {f}", failures.len()),
        },
        failures.is_empty() && attempts >= 20,
    );
    m.note(
        &[
            "the agent's table intact after it",
            "cloud2: table 7250, rule pref 7250",
        ],
        (|| {
            let rules = route_agent::rules(&lab, Role::Cloud2)?;
            anyhow::ensure!(rules == 1, "{rules} rules");
            let routes = route_agent::routes(&lab, Role::Cloud2)?;
            anyhow::ensure!(routes.contains(&overlay), "routes: {routes}");
            Ok(format!("{} routes", routes.lines().count()))
        })(),
    );

    agent.stop()?;
    m.note(
        &[
            "on exit: its routes and rule gone, Felix's kept",
            "cloud2: table 7250, rule, main proto 80",
        ],
        (|| {
            let rules = route_agent::rules(&lab, Role::Cloud2)?;
            anyhow::ensure!(rules == 0, "{rules} rules left");
            let left = route_agent::routes(&lab, Role::Cloud2)?;
            anyhow::ensure!(left.trim().is_empty(), "left behind: {left}");
            let felix_routes = route_agent::routes_of(&lab, Role::Cloud2, "main", FELIX_PROTO)?;
            let e1 = netns::edge_pod_cidr(1).to_string();
            anyhow::ensure!(
                felix_routes.contains(&e1),
                "Felix's route for {e1} gone: {felix_routes}"
            );
            Ok("ok".to_string())
        })(),
    );
    drop(felix);
    relay.stop()?;
    let took = t0.elapsed();
    m.push(
        &["time budget", "under 40 s"],
        format!("{} ({took:?})", if took < BUDGET { "ok" } else { "OVER" }),
        took < BUDGET,
    );
    m.conclude("lab-route-agent-felix.txt", t0)
}
