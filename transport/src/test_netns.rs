//! The network namespace that tests installing routes, rules and nftables
//! for real run in (capture's here, the route agent's in `relay-server`):
//! its set-up and the `ip` runner they share. Built for tests only (this
//! crate's, or with feature `test-netns`, which `relay-server`'s
//! dev-dependency turns on); not an API.
//!
//! How a test gets into a namespace of its own is its own business: a
//! thread of this crate's tests unshares itself, `relay-server`'s re-run
//! their binary under `unshare -n` so that processes they spawn share it.

use std::process::Command;

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
