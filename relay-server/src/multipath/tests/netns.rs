//! The agent for real, in a network namespace of the test's own
//! (never the host's routes, rules or nexthops): the test binary runs
//! itself again under `unshare -n`. Its replicas' admin APIs are fakes
//! answering a fixed route table.
//!
//! A file of its own for its size: the namespace harness (which the
//! single-relay agent's tests in `crate::agent` use too) and the tests of
//! the multipath loop that need it.

use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use super::*;
use crate::agent::RouteTable;

/// Set for the run in the namespace, to the outer run's network
/// namespace (`/proc/self/ns/net`'s link, `net:[4026531840]`).
const INSIDE: &str = "RELAY_SERVER_TEST_IN_NETNS";

/// The network namespace of process `pid` (`self`, `1`), as its
/// `/proc/PID/ns/net` link names it.
fn netns_id(pid: &str) -> Option<String> {
    let link = std::fs::read_link(format!("/proc/{pid}/ns/net")).ok()?;
    Some(link.to_string_lossy().into_owned())
}

/// Whether this run is the one in a namespace of its own: `outer`
/// is [`INSIDE`]'s value (`None`: unset, the outer run), `own`
/// this process's namespace, `init` pid 1's when readable. An
/// error when [`INSIDE`] is set but does not name another
/// namespace than this one (set in the environment by hand, or
/// left over), or this is pid 1's: then nothing may be touched.
pub(crate) fn netns_guard(
    outer: Option<&str>,
    own: Option<&str>,
    init: Option<&str>,
) -> Result<bool, String> {
    let Some(outer) = outer else {
        return Ok(false);
    };
    let named = |s: &str| s.starts_with("net:[") && s.ends_with(']');
    match own {
        _ if !named(outer) => Err(format!(
            "{INSIDE}={outer:?} names no network namespace; refusing to set up routes here"
        )),
        None => Err("cannot read /proc/self/ns/net; refusing to set up routes here".into()),
        Some(own) if own == outer => Err(format!(
            "{INSIDE} is set, but this is that same network namespace ({own}); refusing to set up routes here"
        )),
        Some(own) if init == Some(own) => Err(format!(
            "{INSIDE} is set, but this is pid 1's network namespace ({own}); refusing to set up routes here"
        )),
        Some(_) => Ok(true),
    }
}

/// `true` in the namespace (run the test's body); `false` when
/// the run there of test `name` (as libtest lists it) passed, or
/// when namespaces are not available (not root; a failure under
/// `REQUIRE_LAB=1` or `CI=true`). The namespace is set up by
/// `relay_transport::test_netns::set_up`: `lo` up and `up0`,
/// 192.0.2.1/24, holding the default route via 192.0.2.254. The
/// run in the namespace panics before changing anything unless
/// its namespace differs from the outer run's ([`netns_guard`]).
fn in_netns(name: &str) -> bool {
    let outer = std::env::var_os(INSIDE).map(|v| v.to_string_lossy().into_owned());
    let inside = netns_guard(
        outer.as_deref(),
        netns_id("self").as_deref(),
        netns_id("1").as_deref(),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    if inside {
        relay_transport::test_netns::set_up();
        return true;
    }
    let can = Command::new("unshare")
        .args(["-n", "true"])
        .status()
        .is_ok_and(|s| s.success());
    if !can {
        relay_transport::test_netns::skip("multipath namespace tests need root (unshare -n)");
        return false;
    }
    let exe = std::env::current_exe().expect("test binary");
    let out = Command::new("unshare")
        .arg("-n")
        .arg(exe)
        .args(["--exact", name, "--nocapture", "--test-threads=1"])
        .env(INSIDE, netns_id("self").expect("/proc/self/ns/net"))
        .output()
        .expect("unshare");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{name} in a namespace:\n{text}");
    assert!(text.contains("1 passed"), "{name} did not run:\n{text}");
    false
}

/// A namespace test: runs `body` on a current-thread runtime in
/// the run [`in_netns`] starts in a namespace of its own, which it
/// selects by the calling test's name (libtest names each test's
/// thread after it); the outer run only checks that it passed.
/// `body` is never polled in the outer run.
pub(crate) fn netns_test(body: impl std::future::Future<Output = ()>) {
    let thread = std::thread::current();
    let name = thread
        .name()
        .filter(|n| *n != "main")
        .expect("netns_test runs on a test's own thread, named after it");
    if in_netns(name) {
        rt().block_on(body);
    }
}

/// `ip ARGS` in this namespace; its output.
pub(crate) use relay_transport::test_netns::ip as sh;

/// A replica's admin API answering `GET /v1/routes` with `routes`
/// (changeable), until the task is aborted.
pub(crate) async fn fake_replica(routes: Arc<Mutex<Vec<&'static str>>>) -> SocketAddr {
    fake_replica_while(routes, Arc::new(AtomicBool::new(true))).await
}

/// [`fake_replica`] answering only while `up` holds; 503 otherwise
/// (the agent's poll fails as with a relay away).
pub(crate) async fn fake_replica_while(
    routes: Arc<Mutex<Vec<&'static str>>>,
    up: Arc<AtomicBool>,
) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            let rows: Vec<String> = routes
                .lock()
                .unwrap()
                .iter()
                .map(|c| format!("{{\"cidr\":\"{c}\"}}"))
                .collect();
            let answer = match up.load(Ordering::SeqCst) {
                true => format!(
                    "HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n[{}]",
                    rows.join(",")
                ),
                false => {
                    "HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\n\r\n".to_string()
                }
            };
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let _ = s.write_all(answer.as_bytes()).await;
            });
        }
    });
    addr
}

/// `route_agent_polls_total{result="RESULT"}` in `status`.
pub(crate) fn polls(status: &AgentStatus, result: &str) -> u64 {
    let key = format!("route_agent_polls_total{{result=\"{result}\"}} ");
    status
        .render()
        .lines()
        .find_map(|l| l.strip_prefix(key.as_str())?.parse().ok())
        .unwrap_or(0)
}

/// An address nothing listens on.
async fn dead_addr() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    l.local_addr().expect("addr")
}

fn config(replicas: &[(SocketAddr, &str)]) -> MultipathConfig {
    MultipathConfig {
        replicas: replicas
            .iter()
            .map(|(admin, via)| ReplicaTarget {
                admin: *admin,
                via: via.parse().unwrap(),
                tls: None,
            })
            .collect(),
        token: None,
        interval: Duration::from_millis(50),
        proto: 250,
        table: RouteTable::default(),
        on_exit: crate::agent::OnExit::Remove,
    }
}

/// Waits (10 s at most) until `f` holds.
pub(crate) async fn until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(tokio::time::Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits (10 s at most) until `status` reads ready with `n` routes.
pub(crate) async fn until_routes(status: &AgentStatus, n: usize) {
    let want = format!("ready: {n} routes");
    until(&want, || {
        status.readiness().is_ok_and(|l| l.starts_with(&want))
    })
    .await
}

pub(crate) fn rule_listed() -> bool {
    RouteTable::default().rule_listed(&sh(&["-4", "rule", "show"]))
}

pub(crate) fn table() -> String {
    sh(&["-4", "route", "show", "table", "7250"])
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// The status the single-relay agent serves, from the multipath
/// agent's polls; a killed run's rule and routes kept while no
/// replica answers, except a route holding this node's address,
/// removed at start; such a prefix refused and counted.
#[test]
fn the_status_follows_the_replicas_and_a_prefix_holding_this_node_is_refused() {
    netns_test(async {
        // What a killed run left: its rule, its nexthop and groups,
        // a route to an edge and one holding this node's address
        // (192.0.2.1).
        sh(&["-4", "rule", "add", "pref", "7250", "lookup", "7250"]);
        let (nh, g) = (NEXTHOP_BASE.to_string(), GROUP_BASE.to_string());
        let g2 = (GROUP_BASE + 1).to_string();
        sh(&[
            "nexthop",
            "add",
            "id",
            &nh,
            "via",
            "192.0.2.2",
            "dev",
            "up0",
        ]);
        for g in [&g, &g2] {
            sh(&[
                "nexthop",
                "add",
                "id",
                g,
                "group",
                &nh,
                "type",
                "resilient",
                "buckets",
                "64",
                "idle_timer",
                "10",
            ]);
        }
        for (prefix, g) in [("10.244.9.0/24", &g), ("192.0.0.0/16", &g2)] {
            sh(&[
                "route", "add", prefix, "nhid", g, "proto", "250", "table", "7250",
            ]);
        }
        let routes = Arc::new(Mutex::new(vec![]));
        let up = Arc::new(AtomicBool::new(false));
        let live = fake_replica_while(routes.clone(), up.clone()).await;
        let dead = dead_addr().await;
        let cfg = config(&[(live, "192.0.2.2"), (dead, "192.0.2.3")]);
        let status = Arc::<AgentStatus>::default();
        let stop = CancellationToken::new();
        let agent = tokio::spawn(run_with_status(cfg, stop.clone(), status.clone()));
        until("two polls with no replica answering", || {
            polls(&status, "relay_unreachable") >= 2
        })
        .await;
        assert!(
            rule_listed(),
            "a previous run's rule went:\n{}",
            sh(&["rule"])
        );
        let t = table();
        assert!(t.contains("10.244.9.0/24 nhid"), "{t}");
        assert!(!t.contains("192.0.0.0/16"), "{t}");
        // Where this node's traffic for that edge goes meanwhile.
        let get = sh(&["-4", "route", "get", "10.244.9.5"]);
        assert!(get.contains("via 192.0.2.2 dev up0"), "{get}");
        // This node's subnet among the edges' prefixes: refused.
        *routes.lock().unwrap() = vec!["10.244.7.0/24", "192.0.0.0/16", "10.9.9.9/32"];
        up.store(true, Ordering::SeqCst);
        until_routes(&status, 2).await;
        let t = table();
        assert!(
            t.contains("10.244.7.0/24 nhid") && t.contains("10.9.9.9 nhid"),
            "{t}"
        );
        assert!(
            !t.contains("192.0.0.0/16") && !t.contains("10.244.9.0/24"),
            "{t}"
        );
        assert!(rule_listed());
        let m = status.render();
        assert!(m.contains("\nroute_agent_prefixes_refused 1\n"), "{m}");
        assert!(m.contains("\nroute_agent_routes_installed 2\n"), "{m}");
        assert!(m.contains("\nroute_agent_ready 1\n"), "{m}");
        stop.cancel();
        agent.await.expect("agent");
        assert_eq!(table(), "");
        assert!(!rule_listed());
        assert_eq!(sh(&["nexthop", "show"]), "");
    });
}

/// The multipath agent stopped with [`OnExit::Keep`] leaves its
/// routes, groups, nexthops and rule for the next agent;
/// [`remove_installed`] (`route-agent --cleanup`) then removes them all.
#[test]
fn kept_routes_nexthops_and_rule_go_with_cleanup() {
    netns_test(async {
        let routes = Arc::new(Mutex::new(vec!["10.244.7.0/24", "10.244.8.0/24"]));
        let live = fake_replica(routes).await;
        let mut cfg = config(&[(live, "192.0.2.2")]);
        cfg.on_exit = OnExit::Keep;
        let status = Arc::<AgentStatus>::default();
        let stop = CancellationToken::new();
        let agent = tokio::spawn(run_with_status(cfg, stop.clone(), status.clone()));
        until_routes(&status, 2).await;
        stop.cancel();
        agent.await.expect("agent");
        let t = table();
        assert!(
            t.contains("10.244.7.0/24 nhid") && t.contains("10.244.8.0/24 nhid"),
            "{t}"
        );
        assert!(rule_listed());
        let nexthops = sh(&["nexthop", "show"]);
        assert_eq!(
            nexthops.lines().count(),
            3,
            "one member, two groups:\n{nexthops}"
        );
        remove_installed(RouteTable::default(), 250)
            .await
            .expect("cleanup");
        assert_eq!(table(), "");
        assert!(!rule_listed());
        assert_eq!(sh(&["nexthop", "show"]), "");
        // Nothing left: a second cleanup finds nothing and succeeds.
        remove_installed(RouteTable::default(), 250)
            .await
            .expect("cleanup again");
    });
}

/// The run meant for a namespace of its own refuses to set up
/// anything unless [`INSIDE`] names a namespace other than its own.
#[test]
fn the_namespace_setup_runs_only_in_a_namespace_of_its_own() {
    let (outer, own) = ("net:[4026531840]", "net:[4026532001]");
    assert_eq!(netns_guard(None, Some(own), Some(outer)), Ok(false));
    assert_eq!(netns_guard(Some(outer), Some(own), Some(outer)), Ok(true));
    assert_eq!(netns_guard(Some(outer), Some(own), None), Ok(true));
    for (var, own, init) in [
        // Set by hand (the marker older tests used) or left over.
        ("1", Some(own), Some(outer)),
        ("", Some(own), Some(outer)),
        // The outer run's own namespace, or pid 1's.
        (outer, Some(outer), Some(outer)),
        ("net:[4026532002]", Some(outer), Some(outer)),
        // Unreadable.
        (outer, None, None),
    ] {
        assert!(
            netns_guard(Some(var), own, init).is_err(),
            "{var:?} {own:?} {init:?}"
        );
    }
    // For real, in a throwaway namespace: the variable naming the
    // namespace the run is in. It must fail before its setup
    // (which would otherwise pass in a fresh namespace).
    if !Command::new("unshare")
        .args(["-n", "true"])
        .status()
        .is_ok_and(|s| s.success())
    {
        eprintln!("SKIPPED: the namespace guard's run needs root (unshare -n)");
        return;
    }
    let exe = std::env::current_exe().expect("test binary");
    let name = "multipath::tests::netns::no_replica_answering_is_not_ready_and_keeps_the_routes";
    let out = Command::new("unshare")
        .args(["-n", "sh", "-c"])
        .arg(format!(
            "export {INSIDE}=$(readlink /proc/self/ns/net); exec \"$0\" --exact {name} --nocapture --test-threads=1"
        ))
        .arg(exe)
        .output()
        .expect("unshare");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains("is set, but this is that same network namespace"),
        "{text}"
    );
}

/// No replica answering fails the poll as the relay's absence
/// does, keeping the routes.
#[test]
fn no_replica_answering_is_not_ready_and_keeps_the_routes() {
    netns_test(async {
        let routes = Arc::new(Mutex::new(vec!["10.244.7.0/24"]));
        let dead = dead_addr().await;
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let live = l.local_addr().expect("addr");
        drop(l);
        // Serves, then goes (same port).
        let (stop_fake, fake) = {
            let routes = routes.clone();
            let stop = CancellationToken::new();
            let s = stop.clone();
            let l = TcpListener::bind(live).await.expect("rebind");
            (
                stop,
                tokio::spawn(async move {
                    loop {
                        tokio::select! {
                            _ = s.cancelled() => return,
                            a = l.accept() => {
                                let Ok((mut c, _)) = a else { return };
                                let body = format!(
                                    "[{{\"cidr\":\"{}\"}}]",
                                    routes.lock().unwrap()[0]
                                );
                                let mut buf = [0u8; 4096];
                                let _ = c.read(&mut buf).await;
                                let _ = c.write_all(format!("HTTP/1.1 200 OK\r\n\r\n{body}").as_bytes()).await;
                            }
                        }
                    }
                }),
            )
        };
        let cfg = config(&[(live, "192.0.2.2"), (dead, "192.0.2.3")]);
        let status = Arc::<AgentStatus>::default();
        let stop = CancellationToken::new();
        let agent = tokio::spawn(run_with_status(cfg, stop.clone(), status.clone()));
        until_routes(&status, 1).await;
        stop_fake.cancel();
        fake.await.unwrap();
        until("not ready", || status.readiness().is_err()).await;
        let why = status.readiness().unwrap_err();
        assert!(
            why.contains("last failure: relay_unreachable: no replica answers"),
            "{why}"
        );
        assert!(table().contains("10.244.7.0/24 nhid"), "{}", table());
        stop.cancel();
        agent.await.expect("agent");
    });
}

/// A replica's admin API listing `routes`, until `busy` is set;
/// then answering the relay's "overloaded" 503, each after taking
/// a permit of `gate` (so a test can hold one back), and counting
/// them in `busy_answers` (before the permit).
async fn fake_busy_replica(
    routes: &'static [&'static str],
    busy: Arc<AtomicBool>,
    gate: Arc<tokio::sync::Semaphore>,
    busy_answers: Arc<std::sync::atomic::AtomicU64>,
) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let (busy, gate, n) = (busy.clone(), gate.clone(), busy_answers.clone());
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let answer = if busy.load(Ordering::SeqCst) {
                    n.fetch_add(1, Ordering::SeqCst);
                    gate.acquire().await.expect("gate").forget();
                    format!(
                        "HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{}",
                        crate::admin::OVERLOADED.len(),
                        crate::admin::OVERLOADED
                    )
                } else {
                    let rows: Vec<String> = routes
                        .iter()
                        .map(|c| format!("{{\"cidr\":\"{c}\"}}"))
                        .collect();
                    format!(
                        "HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n[{}]",
                        rows.join(",")
                    )
                };
                let _ = s.write_all(answer.as_bytes()).await;
            });
        }
    });
    addr
}

/// A replica answering 503 "overloaded" is alive: its last table
/// stays in the groups for [`BUSY_POLLS`] - 1 busy polls in a
/// row, and it is left out at the next one (as one that does not
/// answer); once it answers again it is back.
#[test]
fn a_busy_replica_keeps_its_routes_for_a_bound() {
    netns_test(async {
        use std::sync::atomic::AtomicU64;
        let a = fake_replica(Arc::new(Mutex::new(vec!["10.244.7.0/24"]))).await;
        let (busy, answers) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicU64::new(0)),
        );
        // Every busy answer but the last one within the bound.
        let gate = Arc::new(tokio::sync::Semaphore::new(BUSY_POLLS as usize - 1));
        let b = fake_busy_replica(
            &["10.244.7.0/24"],
            busy.clone(),
            gate.clone(),
            answers.clone(),
        )
        .await;
        let cfg = config(&[(a, "192.0.2.2"), (b, "192.0.2.3")]);
        let status = Arc::<AgentStatus>::default();
        let stop = CancellationToken::new();
        let agent = tokio::spawn(run_with_status(cfg, stop.clone(), status.clone()));
        let group = || sh(&["nexthop", "show"]);
        let both = format!(
            "id {GROUP_BASE} group {}/{} ",
            NEXTHOP_BASE,
            NEXTHOP_BASE + 1
        );
        let only_a = format!("id {GROUP_BASE} group {} ", NEXTHOP_BASE);
        until("both replicas in the group", || group().contains(&both)).await;
        busy.store(true, Ordering::SeqCst);
        // The last busy answer within the bound is held back: the
        // polls before it are done (each replica is polled by a task of
        // its own: the busy answers kept the group as it was).
        until("the bound's last busy poll", || {
            answers.load(Ordering::SeqCst) == BUSY_POLLS
        })
        .await;
        let g = group();
        assert!(g.contains(&both), "a busy replica was left out: {g}");
        assert!(status.readiness().is_ok());
        // The bound passed: left out.
        gate.add_permits(1000);
        until("replica b left out", || group().contains(&only_a)).await;
        // Answering again: back in.
        busy.store(false, Ordering::SeqCst);
        until("both again", || group().contains(&both)).await;
        stop.cancel();
        agent.await.expect("agent");
    });
}

/// An older agent's route in `main` stays while installing ours
/// fails (it is all that routes the prefix then), and goes once
/// ours are in place.
#[test]
fn main_keeps_an_older_agents_routes_until_ours_are_installed() {
    netns_test(async {
        sh(&[
            "route",
            "add",
            "10.244.7.0/24",
            "via",
            "192.0.2.2",
            "proto",
            "250",
        ]);
        let routes = Arc::new(Mutex::new(vec!["10.244.7.0/24"]));
        let live = fake_replica(routes).await;
        // Behind the default gateway, not on a link: the kernel
        // refuses the nexthop ("invalid gateway").
        let cfg = config(&[(live, "203.0.113.5")]);
        let status = Arc::<AgentStatus>::default();
        let stop = CancellationToken::new();
        let agent = tokio::spawn(run_with_status(cfg, stop.clone(), status.clone()));
        until("two failed polls", || {
            status
                .render()
                .contains("route_agent_polls_total{result=\"install_failed\"} 2\n")
        })
        .await;
        let main = sh(&["-4", "route", "show", "proto", "250"]);
        assert!(main.contains("10.244.7.0/24 via 192.0.2.2"), "{main}");
        assert!(!rule_listed());
        // The replica's node now on a link: installed, rule added,
        // `main`'s leftover gone.
        sh(&["route", "add", "203.0.113.0/24", "dev", "up0"]);
        until_routes(&status, 1).await;
        assert!(rule_listed());
        until("main cleared", || {
            sh(&["-4", "route", "show", "proto", "250"]).is_empty()
        })
        .await;
        stop.cancel();
        agent.await.expect("agent");
    });
}

/// A replica's admin API on `l` listing `routes`, one answer per
/// connection; once `silent` is set it reads each request and never
/// answers (the connection held open), counting those in `held`.
async fn fake_replica_falling_silent(
    l: TcpListener,
    routes: &'static [&'static str],
    silent: Arc<AtomicBool>,
    held: Arc<std::sync::atomic::AtomicU64>,
) -> SocketAddr {
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let (silent, held) = (silent.clone(), held.clone());
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                if silent.load(Ordering::SeqCst) {
                    held.fetch_add(1, Ordering::SeqCst);
                    // Held until the peer goes (or the test ends).
                    let _ = s.read(&mut buf).await;
                    return;
                }
                let rows: Vec<String> = routes
                    .iter()
                    .map(|c| format!("{{\"cidr\":\"{c}\"}}"))
                    .collect();
                let answer = format!(
                    "HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n[{}]",
                    rows.join(",")
                );
                let _ = s.write_all(answer.as_bytes()).await;
            });
        }
    });
    addr
}

/// Replicas whose nodes die without a word (no RST): A accepts each
/// connection and never answers, B's address stops answering at all
/// (its SYNs go to a neighbour that drops them). While their polls are
/// outstanding, replica C's changes (a prefix dropped, one added) are
/// installed within about two intervals, not after A's and B's polls
/// time out; A and B leave the group, in place, once theirs have
/// ([`crate::agent::poll::POLL_TIMEOUT`]) plus an interval.
#[test]
fn a_silent_replica_holds_up_no_other_replicas_change() {
    netns_test(async {
        use crate::agent::poll::POLL_TIMEOUT;
        use std::sync::atomic::AtomicU64;
        use tokio::time::Instant;
        const INTERVAL: Duration = Duration::from_millis(200);
        // For `ip` runs and this test's own 20 ms polling of the table.
        const MARGIN: Duration = Duration::from_secs(1);
        const P1: &str = "10.244.7.0/24";
        let (p1, p2, p3) = (P1, "10.244.8.0/24", "10.244.9.0/24");
        let a_silent = Arc::new(AtomicBool::new(false));
        let a_held = Arc::new(AtomicU64::new(0));
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let a = fake_replica_falling_silent(l, &[P1], a_silent.clone(), a_held.clone()).await;
        // B on an address of this namespace's own, until it goes.
        sh(&["addr", "add", "192.0.2.77/32", "dev", "lo"]);
        let l = TcpListener::bind("192.0.2.77:0").await.expect("bind");
        let b =
            fake_replica_falling_silent(l, &[P1], Arc::new(AtomicBool::new(false)), Arc::default())
                .await;
        let c_routes = Arc::new(Mutex::new(vec![p1, p2]));
        let c = fake_replica(c_routes.clone()).await;
        let mut cfg = config(&[(a, "192.0.2.2"), (b, "192.0.2.3"), (c, "192.0.2.4")]);
        cfg.interval = INTERVAL;
        let status = Arc::<AgentStatus>::default();
        let stop = CancellationToken::new();
        let agent = tokio::spawn(run_with_status(cfg, stop.clone(), status.clone()));
        let group = || sh(&["nexthop", "show"]);
        let all = format!(
            "id {GROUP_BASE} group {}/{}/{} ",
            NEXTHOP_BASE,
            NEXTHOP_BASE + 1,
            NEXTHOP_BASE + 2
        );
        let only_c = format!("id {GROUP_BASE} group {} ", NEXTHOP_BASE + 2);
        until("every replica in p1's group, p2 routed", || {
            group().contains(&all) && table().contains(&format!("{p2} nhid"))
        })
        .await;
        let g = group();
        assert!(
            g.contains(&format!(
                "{all}type resilient buckets {BUCKETS} idle_timer {IDLE_TIMER} "
            )),
            "{g}"
        );
        // A and B go silent: A answers no more; B's address goes, and
        // what is sent to it now leaves on up0 for a neighbour whose
        // frames up1 drops (not its address): SYNs unanswered.
        a_silent.store(true, Ordering::SeqCst);
        sh(&["addr", "del", "192.0.2.77/32", "dev", "lo"]);
        sh(&[
            "neigh",
            "replace",
            "192.0.2.77",
            "lladdr",
            "02:00:00:00:00:77",
            "dev",
            "up0",
            "nud",
            "permanent",
        ]);
        let gone = Instant::now();
        until("a poll of A held unanswered", || {
            a_held.load(Ordering::SeqCst) >= 1
        })
        .await;
        // B's next poll is under way too, its SYN unanswered.
        until("a SYN of B's poll unanswered", || {
            let out = Command::new("ss")
                .args(["-Htn", "state", "syn-sent", "dst", "192.0.2.77"])
                .output()
                .expect("ss");
            !out.stdout.is_empty()
        })
        .await;
        let bound = 2 * INTERVAL + MARGIN;
        // C drops p2 (only C listed it): its route goes.
        *c_routes.lock().unwrap() = vec![p1];
        let t = Instant::now();
        until("p2's route gone", || !table().contains(p2)).await;
        let dropped = t.elapsed();
        assert!(
            dropped <= bound,
            "C's drop took {dropped:?}, more than {bound:?}"
        );
        // C adds p3: routed.
        *c_routes.lock().unwrap() = vec![p1, p3];
        let t = Instant::now();
        until("p3 routed", || table().contains(&format!("{p3} nhid"))).await;
        let added = t.elapsed();
        assert!(
            added <= bound,
            "C's add took {added:?}, more than {bound:?}"
        );
        // Meanwhile A's and B's polls were still outstanding: both still
        // in the group.
        let g = group();
        assert!(
            gone.elapsed() < POLL_TIMEOUT && g.contains(&all),
            "C's changes were not made while A's and B's polls were outstanding ({:?}): {g}",
            gone.elapsed()
        );
        // Their polls time out: out of the group, the same group.
        until("A and B out of p1's group", || group().contains(&only_c)).await;
        let left = gone.elapsed();
        eprintln!(
            "C's drop installed in {dropped:?}, its add in {added:?}; A and B out after {left:?}"
        );
        let most = POLL_TIMEOUT + INTERVAL + MARGIN;
        assert!(
            left <= most,
            "A and B left after {left:?}, more than {most:?}"
        );
        assert!(status.readiness().is_ok(), "{:?}", status.readiness());
        stop.cancel();
        agent.await.expect("agent");
        assert_eq!(table(), "");
        assert_eq!(sh(&["nexthop", "show"]), "");
    });
}
