//! `lab-bulk`: bulk throughput in the namespace lab, this project against
//! rathole and no tunnel at all, in one invocation (see
//! `relay_lab::bulk` for exactly what each path is). Root required.
//!
//! ```text
//! cargo build --release -p relay-server -p edge-client -p relay-lab --bins
//! target/release/lab-bulk --seconds 5 --runs 3 --streams 1,8 \
//!     [--rathole target/peers/bin/rathole] [--cloud-pod cpod2] [--json FILE]
//! ```
//!
//! `relay-server` and `edge-client` are taken from the directory of this
//! executable (`--bin-dir` to override). SIGINT/SIGTERM stop the run; the
//! lab's namespaces and processes are removed either way.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use relay_lab::bulk::{self, procs::binary_next_to_exe, Options};
use relay_lab::netns::{self, Role};

const USAGE: &str = "usage: lab-bulk [--seconds N] [--runs N] [--streams 1,8] [--rathole PATH] \
[--cloud-pod cpod1|cpod2] [--json FILE] [--bin-dir DIR]";

struct Args {
    opts: Options,
    json: Option<PathBuf>,
}

fn parse_args() -> Result<Args> {
    let mut seconds = 5;
    let mut runs = 3;
    let mut streams = vec![1, 8];
    let mut rathole = None;
    let mut cloud_pod = Role::Cpod2;
    let mut json = None;
    let mut bin_dir: Option<PathBuf> = None;
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "-h" || flag == "--help" {
            println!("{USAGE}");
            std::process::exit(0);
        }
        let value = it
            .next()
            .with_context(|| format!("{flag} needs a value\n{USAGE}"))?;
        match flag.as_str() {
            "--seconds" => seconds = value.parse().context("--seconds")?,
            "--runs" => runs = value.parse().context("--runs")?,
            "--streams" => {
                streams = value
                    .split(',')
                    .map(|s| s.trim().parse::<u32>())
                    .collect::<Result<_, _>>()
                    .context("--streams: a list like 1,8")?
            }
            "--rathole" => rathole = Some(PathBuf::from(value)),
            "--cloud-pod" => {
                cloud_pod = match value.as_str() {
                    "cpod1" => Role::Cpod1,
                    "cpod2" => Role::Cpod2,
                    _ => bail!("--cloud-pod: cpod1 or cpod2"),
                }
            }
            "--json" => json = Some(PathBuf::from(value)),
            "--bin-dir" => bin_dir = Some(PathBuf::from(value)),
            _ => bail!("unknown argument {flag}\n{USAGE}"),
        }
    }
    anyhow::ensure!(
        seconds > 0 && runs > 0 && !streams.is_empty() && !streams.contains(&0),
        "--seconds, --runs and every stream count must be positive"
    );
    let bin = |name: &str, src: &str| match &bin_dir {
        Some(d) => Ok(d.join(name)),
        // Not strict: a benchmark run while the tree is being edited
        // should still run, and the warning says what it measured.
        None => binary_next_to_exe(name, src, false),
    };
    let rathole = match rathole {
        Some(p) if p.is_file() => Ok(p),
        Some(p) => bail!("--rathole {}: no such file", p.display()),
        None => bulk::default_rathole(),
    };
    Ok(Args {
        opts: Options {
            seconds,
            runs,
            streams,
            cloud_pod,
            relay_bin: bin("relay-server", "relay-server/src")?,
            edge_bin: bin("edge-client", "edge-client/src")?,
            iperf3: bulk::find_iperf3()?,
            rathole,
        },
        json,
    })
}

/// A thread that turns SIGINT/SIGTERM into [`bulk::request_stop`]: the
/// run then unwinds through its destructors, which remove the lab (the
/// default action would end the process with the namespaces left behind).
fn watch_signals() -> Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (mut int, mut term) = rt.block_on(async {
        Ok::<_, std::io::Error>((
            signal(SignalKind::interrupt())?,
            signal(SignalKind::terminate())?,
        ))
    })?;
    std::thread::spawn(move || {
        rt.block_on(async {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
        });
        eprintln!("lab-bulk: stopping (signal); cleaning up the lab");
        bulk::request_stop();
    });
    Ok(())
}

fn main() -> Result<()> {
    let args = parse_args()?;
    if let Some(skip) = netns::require_root() {
        bail!("{skip}");
    }
    relay_lab::init();
    watch_signals()?;
    let o = &args.opts;
    println!(
        "bulk in the namespace lab: {} -> relay node -> (QUIC | rathole noise) through nat1's masquerade -> edge1 -> epod1; iperf3, {} s per test, {} run(s), streams {:?}",
        o.cloud_pod, o.seconds, o.runs, o.streams
    );
    println!("direct = {}", bulk::DIRECT_MEANS);
    if let Err(why) = &o.rathole {
        println!("rathole SKIPPED: {why}");
    }
    let report = bulk::run(args.opts, |s| {
        eprintln!(
            "run {} {:>7} P{}: {:6.2} Gbit/s, {} bytes, retransmits {}, relay-side {}, edge-side {} CPU s/GiB",
            s.run + 1,
            s.path.as_str(),
            s.streams,
            s.gbps,
            s.bytes,
            s.retransmits.map_or("-".into(), |r| r.to_string()),
            s.relay_per_gib().map_or("-".into(), |v| format!("{v:.2}")),
            s.edge_per_gib().map_or("-".into(), |v| format!("{v:.2}")),
        )
    })?;
    println!("load average at start: {}\n", report.load_at_start);
    print!("{}", report.table());
    if let Some(path) = args.json {
        std::fs::write(&path, serde_json::to_string_pretty(&report.to_json())?)
            .with_context(|| format!("writing {}", path.display()))?;
        println!("\nJSON: {}", path.display());
    }
    Ok(())
}
