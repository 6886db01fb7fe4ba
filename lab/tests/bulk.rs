//! A smoke of `lab-bulk` (relay_lab::bulk): one 1-second iperf3 test per
//! path, one stream, through the real `relay-server` and `edge-client`
//! binaries (the ones `cargo test --workspace` builds) in the namespace
//! lab. Checks the plumbing, not the figures: every path that ran moved
//! data (iperf3 exited 0 with a report, which `Bench::measure` requires)
//! and the tunnel's and rathole's processes were read for CPU.
//!
//! rathole runs when `loadtest/peers/install-rathole.sh` installed it
//! (CI does not: the reason is printed). Needs root and iperf3 (skips
//! otherwise; `REQUIRE_LAB=1` makes that a failure).

use std::time::Instant;

use relay_lab::bulk::{self, procs::binary_next_to_exe, Options, Path};
use relay_lab::netns::{self, Role};

fn strict() -> bool {
    std::env::var("REQUIRE_LAB").is_ok_and(|v| v == "1")
        || std::env::var("CI").is_ok_and(|v| v == "true")
}

#[test]
fn every_path_moves_data_with_iperf3() {
    if netns::require_root().is_some() {
        return;
    }
    relay_lab::init();
    let t = Instant::now();
    let iperf3 = match bulk::find_iperf3() {
        Ok(p) => p,
        // Where lab tests must run (REQUIRE_LAB=1, CI; .ci/run installs
        // iperf3) its absence is a failure, as a missing lab would be.
        Err(e) if strict() => panic!("{e:#} (REQUIRE_LAB=1 or CI=true: not skipping)"),
        Err(e) => {
            eprintln!("\n!!!!!!!! SKIPPING the bulk smoke: {e:#}\n");
            return;
        }
    };
    let rathole = bulk::default_rathole();
    if let Err(why) = &rathole {
        println!("rathole SKIPPED: {why}");
    }
    let opts = Options {
        seconds: 1,
        runs: 1,
        streams: vec![1],
        cloud_pod: Role::Cpod2,
        relay_bin: binary_next_to_exe("relay-server", "relay-server/src", true).unwrap(),
        edge_bin: binary_next_to_exe("edge-client", "edge-client/src", true).unwrap(),
        iperf3,
        rathole,
    };
    let with_rathole = opts.rathole.is_ok();
    let report = bulk::run(opts, |s| println!("{s:?}")).unwrap();
    println!("{}", report.table());
    let mut expected = vec![Path::Tunnel, Path::Direct];
    if with_rathole {
        expected.push(Path::Rathole);
    }
    for path in expected {
        let s = report
            .samples
            .iter()
            .find(|s| s.path == path)
            .unwrap_or_else(|| panic!("no sample for {path:?}"));
        // A debug build on a busy 2-core machine still moves tens of MB/s;
        // 1 MiB in a second only rules out a path that never carried data.
        assert!(s.bytes > 1 << 20, "{path:?} moved only {} bytes", s.bytes);
        assert_eq!(s.relay_cpu.is_some(), path != Path::Direct, "{s:?}");
    }
    println!("bulk smoke took {:?}", t.elapsed());
}
