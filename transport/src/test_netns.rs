//! The network namespace that tests installing routes, rules and nftables
//! for real run in (capture's here, the route agent's in `relay-server`):
//! its set-up and the `ip` runner they share. Built for tests only (this
//! crate's, or with feature `test-netns`, which `relay-server`'s
//! dev-dependency turns on); not an API.
//!
//! How a test gets into a namespace of its own is its own business: a
//! thread of this crate's tests unshares itself, `relay-server`'s re-run
//! their binary under `unshare -n` so that processes they spawn share it.

use std::io::ErrorKind;
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

/// Runs `ip ARGS` in the calling thread's network namespace; its output.
/// Panics when `ip` cannot run or fails.
pub fn ip(args: &[&str]) -> String {
    let out = Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("ip {args:?}: {e}"));
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Gives the calling thread's network namespace, a fresh one, what the
/// tests route over: `lo` up, and a veth `up0` at 192.0.2.1/24 (its peer
/// `up1` up, so that `up0` has a carrier) holding the main table's default
/// route via 192.0.2.254.
///
/// Panics, before changing anything, when this thread's namespace is
/// pid 1's (the host's, or a container's own) or cannot be told apart
/// from it: the tests' rules and routes would cut it off.
pub fn set_up() {
    let netns = |path: &str| std::fs::read_link(path).ok();
    let own = netns("/proc/thread-self/ns/net")
        .unwrap_or_else(|| panic!("cannot read /proc/thread-self/ns/net; refusing to set up"));
    assert!(
        netns("/proc/1/ns/net").as_ref() != Some(&own),
        "this is pid 1's network namespace ({}); refusing to set up",
        own.display()
    );
    for cmd in [
        "link set lo up",
        "link add up0 type veth peer name up1",
        "link set up1 up",
        "addr add 192.0.2.1/24 dev up0",
        "link set up0 up",
        "route add default via 192.0.2.254 dev up0",
    ] {
        ip(&cmd.split(' ').collect::<Vec<_>>());
    }
}

/// For namespace tests that cannot run here (`why`: not root, no
/// `unshare`): a failure under `REQUIRE_LAB=1` or `CI=true`, where they
/// must run, else a `SKIPPED` line.
pub fn skip(why: &str) {
    let required = std::env::var("REQUIRE_LAB").is_ok_and(|v| v == "1")
        || std::env::var("CI").is_ok_and(|v| v == "true");
    assert!(!required, "{why}");
    eprintln!("SKIPPED: {why}");
}

/// A TCP connect from the calling thread's namespace, bounded at 2 s:
/// `Ok` when it connected, else its error kind, with how long it took.
pub fn connect(to: SocketAddr) -> (Result<(), ErrorKind>, Duration) {
    let t0 = Instant::now();
    let r = TcpStream::connect_timeout(&to, Duration::from_secs(2))
        .map(drop)
        .map_err(|e| e.kind());
    (r, t0.elapsed())
}

/// Refused at once by a reject rule: a reset within `at_once`, not a
/// timeout (nor a connection).
pub fn assert_refused(what: &str, (r, took): (Result<(), ErrorKind>, Duration), at_once: Duration) {
    assert_eq!(r, Err(ErrorKind::ConnectionRefused), "{what} ({took:?})");
    assert!(took < at_once, "{what}: refused after {took:?}");
}
