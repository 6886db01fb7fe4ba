//! `bulk`: N concurrent streams each moving S bytes to a sink at the edge,
//! through the tunnel and directly; Gbit/s and CPU seconds per GiB of the
//! relay and edge processes. With `--bare-quic`, the same transfer over
//! quinn alone (see [`crate::bare`]) in the same invocation, and the
//! tunnel's ratios to it.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use relay_lab::{edge_ip, edge_name};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::bare::BareClient;
use crate::common::{
    cpu_secs, fmt_bytes, get, machine, median, spawn_sink, write_json, Bench, Counter, Progress,
    Table, Via,
};

/// Arguments of `bulk`.
#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    /// Stream counts to run, comma separated (each is one configuration).
    #[arg(long, value_delimiter = ',', default_value = "1,8")]
    streams: Vec<usize>,
    /// Total bytes per configuration, split evenly across its streams.
    #[arg(long, value_parser = crate::common::parse_bytes, default_value = "2GiB")]
    total: u64,
    /// Bytes per stream instead of `--total` split evenly.
    #[arg(long, value_parser = crate::common::parse_bytes, conflicts_with = "total")]
    bytes: Option<u64>,
    /// Repetitions (the table shows the median).
    #[arg(long, default_value_t = 1)]
    runs: usize,
    /// Write results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Also run the same transfer over bare QUIC (quinn alone, same
    /// endpoint and TLS setup; the ceiling) and print tunnel / bare ratios.
    #[arg(long)]
    bare_quic: bool,
    /// Also run the transfer through rathole (this binary, e.g.
    /// `target/peers/bin/rathole` from `loadtest/peers/install-rathole.sh`)
    /// on the same loopback path, and print tunnel / rathole ratios.
    #[arg(long)]
    rathole: Option<PathBuf>,
    /// Draw throughput and CPU per GiB against the stream counts (medians,
    /// every path) into this SVG file.
    #[arg(long)]
    svg: Option<PathBuf>,
    /// The edge's `transport` (`quic`, or `tcp`: the TLS-over-TCP
    /// fallback with yamux, as a site whose UDP is blocked runs it).
    #[arg(long, default_value = "quic", value_parser = ["quic", "tcp"])]
    transport: String,
}

/// One path of a configuration: where the bytes go.
#[derive(Clone, Copy)]
enum Path {
    Via(Via),
    BareQuic,
}

impl Path {
    fn label(&self) -> &'static str {
        match self {
            Path::Via(v) => v.label(),
            Path::BareQuic => "bare-quic",
        }
    }
}

const CHUNK: usize = 256 * 1024;

/// Moves `per_stream` bytes on each of `n` connections; returns seconds.
async fn run_once(via: Via, n: usize, per_stream: u64, sent: Counter) -> Result<f64> {
    let mut conns = Vec::with_capacity(n);
    for _ in 0..n {
        conns.push(via.open().await?);
    }
    let t0 = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for mut s in conns {
        let sent = sent.clone();
        tasks.spawn(async move {
            let buf = vec![0x5au8; CHUNK];
            let mut left = per_stream;
            while left > 0 {
                let k = left.min(CHUNK as u64) as usize;
                s.write_all(&buf[..k]).await?;
                left -= k as u64;
                sent.fetch_add(k as u64, Relaxed);
            }
            s.shutdown().await?;
            let mut got = [0u8; 8];
            s.read_exact(&mut got)
                .await
                .context("reading the sink's count")?;
            let got = u64::from_be_bytes(got);
            ensure!(
                got == per_stream,
                "sink counted {got} bytes, {per_stream} were sent"
            );
            anyhow::Ok(())
        });
    }
    // Bounded: even 1 Mbit/s would move 2 GiB in ~5 hours; a stall shows
    // as no progress long before this.
    let limit = Duration::from_secs(600);
    tokio::time::timeout(limit, async {
        while let Some(r) = tasks.join_next().await {
            r??;
        }
        anyhow::Ok(())
    })
    .await
    .with_context(|| format!("bulk transfer did not finish within {limit:?}"))??;
    Ok(t0.elapsed().as_secs_f64())
}

/// Runs `bulk`.
pub(crate) async fn run(a: Args) -> Result<()> {
    ensure!(!a.streams.is_empty(), "--streams needs at least one count");
    for &n in &a.streams {
        ensure!(
            (1..=1024).contains(&n),
            "--streams: each count must be between 1 and 1024 (got {n})"
        );
    }
    ensure!(
        (1..=20).contains(&a.runs),
        "--runs must be between 1 and 20 (got {})",
        a.runs
    );
    if let Some(b) = a.bytes {
        ensure!(
            (1..=(64u64 << 30)).contains(&b),
            "--bytes must be between 1 byte and 64 GiB (got {b})"
        );
    } else {
        ensure!(
            a.total >= a.streams.iter().copied().max().unwrap_or(1) as u64 && a.total <= 256 << 30,
            "--total must be at least one byte per stream and at most 256 GiB (got {})",
            a.total
        );
    }
    let mut bench = Bench::new(1)?;
    bench.edge_top = format!("transport = \"{}\"\n", a.transport);
    let relay = bench.start_relay().await?;
    let edge = bench.start_edge(0, &relay, None).await?;
    let (sink, _task) = spawn_sink(edge_ip(0)).await?;
    let mut paths = vec![
        Path::Via(Via::Tunnel {
            proxy: relay.connect,
            target: sink,
        }),
        Path::Via(Via::Direct(sink)),
    ];
    // The bare sink is a process like the edge; its CPU is the receiver's.
    let bare = if a.bare_quic {
        let (child, addr) = bench.start_bare_sink().await?;
        let client = BareClient::connect(&bench.pki_dir(), &edge_name(0), addr).await?;
        paths.push(Path::BareQuic);
        Some((child, client))
    } else {
        None
    };
    let peer = match &a.rathole {
        Some(bin) => {
            let r = crate::rathole::start(&bench, bin, sink, crate::rathole::futures_probe::sink)
                .await?;
            paths.push(Path::Via(Via::Peer {
                addr: r.addr,
                name: "rathole",
            }));
            Some(r)
        }
        None => None,
    };
    println!(
        "bulk: {} | relay pid {} | edge pid {} | sink {sink}",
        machine(),
        relay.child.pid(),
        edge.pid()
    );
    let mut table = Table::new(&[
        "streams",
        "bytes/stream",
        "path",
        "Gbit/s (median)",
        "runs",
        "relay CPU s/GiB",
        "edge CPU s/GiB",
    ]);
    let mut results = Vec::new();
    let mut ratios = Vec::new();
    // Medians per path and stream count, for the plot.
    let mut plotted: Vec<Plotted> = Vec::new();
    for &n in &a.streams {
        let per = a.bytes.unwrap_or(a.total / n as u64);
        // (Gbit/s, relay or sender CPU, edge or receiver CPU) per path.
        let mut medians: Vec<(&str, f64, f64, f64)> = Vec::new();
        // Runs interleave the paths (run 1 of every path, then run 2...),
        // so a change in the shared machine's load hits every path alike.
        let mut runs: Vec<[Vec<f64>; 3]> = vec![Default::default(); paths.len()];
        for r in 0..a.runs {
            for (&via, [gbps, relay_cpu, edge_cpu]) in paths.iter().zip(runs.iter_mut()) {
                let sent: Counter = Arc::new(AtomicU64::new(0));
                let total = per * n as u64;
                let s2 = sent.clone();
                let _p = Progress::start(
                    format!(
                        "bulk {n}x{} {} run {}",
                        fmt_bytes(per as f64),
                        via.label(),
                        r + 1
                    ),
                    move || {
                        format!(
                            "{} of {} sent",
                            fmt_bytes(get(&s2) as f64),
                            fmt_bytes(total as f64)
                        )
                    },
                );
                // Bare QUIC: the sender is this process, the receiver the sink.
                // rathole: its server plays the relay, its client the edge.
                let pids = match (via, &bare, &peer) {
                    (Path::BareQuic, Some((sink, _)), _) => (std::process::id(), sink.pid()),
                    (Path::Via(Via::Peer { .. }), _, Some(r)) => (r.server.pid(), r.client.pid()),
                    _ => (relay.child.pid(), edge.pid()),
                };
                let (rc0, ec0) = (cpu_secs(pids.0)?, cpu_secs(pids.1)?);
                let secs = match (via, &bare) {
                    (Path::Via(v), _) => run_once(v, n, per, sent.clone()).await?,
                    (Path::BareQuic, Some((_, c))) => {
                        c.run_once(n, per, CHUNK, sent.clone()).await?
                    }
                    (Path::BareQuic, None) => unreachable!("bare-quic path without a sink"),
                };
                let (rc1, ec1) = (cpu_secs(pids.0)?, cpu_secs(pids.1)?);
                ensure!(get(&sent) == total, "sent {} of {total}", get(&sent));
                let gib = total as f64 / (1u64 << 30) as f64;
                gbps.push(total as f64 * 8.0 / secs / 1e9);
                relay_cpu.push((rc1 - rc0) / gib);
                edge_cpu.push((ec1 - ec0) / gib);
            }
        }
        for (&via, [gbps, relay_cpu, edge_cpu]) in paths.iter().zip(&runs) {
            let tunnel = !matches!(via, Path::Via(Via::Direct(_)));
            medians.push((
                via.label(),
                median(gbps),
                median(relay_cpu),
                median(edge_cpu),
            ));
            plotted.push(Plotted {
                path: via.label(),
                streams: n,
                gbps: median(gbps),
                cpu: tunnel.then(|| (median(relay_cpu), median(edge_cpu))),
            });
            let cpu = |v: &[f64]| {
                if tunnel {
                    format!("{:.2}", median(v))
                } else {
                    "-".into()
                }
            };
            table.row(vec![
                n.to_string(),
                fmt_bytes(per as f64),
                via.label().into(),
                format!("{:.2}", median(gbps)),
                gbps.iter()
                    .map(|g| format!("{g:.2}"))
                    .collect::<Vec<_>>()
                    .join(" "),
                cpu(relay_cpu),
                cpu(edge_cpu),
            ]);
            results.push(json!({
                "streams": n,
                "bytes_per_stream": per,
                "path": via.label(),
                "gbit_per_s": gbps,
                "gbit_per_s_median": median(gbps),
                "relay_cpu_s_per_gib": if tunnel { json!(relay_cpu) } else { json!(null) },
                "edge_cpu_s_per_gib": if tunnel { json!(edge_cpu) } else { json!(null) },
            }));
        }
        let find = |l: &str| medians.iter().find(|m| m.0 == l).copied();
        for other in ["bare-quic", "rathole"] {
            let (Some(t), Some(b)) = (find("tunnel"), find(other)) else {
                continue;
            };
            ratios.push(vec![
                n.to_string(),
                format!("tunnel / {other}"),
                format!("{:.2}", t.1 / b.1),
                format!("{:.2}", t.2 / b.2),
                format!("{:.2}", t.3 / b.3),
            ]);
            results.push(json!({
                "streams": n,
                "ratio": format!("tunnel / {other}"),
                "gbit_per_s": t.1 / b.1,
                "relay_cpu_per_gib": t.2 / b.2,
                "edge_cpu_per_gib": t.3 / b.3,
            }));
        }
    }
    table.print();
    if !ratios.is_empty() {
        println!(
            "\nbare-quic: relay column = QUIC sender (this process), edge column = QUIC receiver (sink process); rathole: relay column = its server, edge column = its client."
        );
        let mut t = Table::new(&[
            "streams",
            "ratio",
            "Gbit/s",
            "relay CPU per GiB",
            "edge CPU per GiB",
        ]);
        for r in ratios {
            t.row(r);
        }
        t.print();
    }
    if let Some(p) = &a.svg {
        std::fs::write(p, plot(&a.streams, &plotted))
            .with_context(|| format!("writing {}", p.display()))?;
        println!("plot written to {}", p.display());
    }
    write_json(
        a.json.as_deref(),
        &json!({"bench": "bulk", "machine": machine(), "relay": bench.bins.describe(), "results": results}),
    )
}

/// One point of the `--svg` plot: medians of a path at a stream count.
struct Plotted {
    path: &'static str,
    streams: usize,
    gbps: f64,
    /// Relay-side and edge-side CPU s/GiB; `None` for direct (no relay).
    cpu: Option<(f64, f64)>,
}

/// The `--svg` plot: one colour per path; throughput for every path, CPU
/// per GiB (relay side solid, edge side dashed) for the paths that have a
/// relay and an edge (not direct).
fn plot(streams: &[usize], m: &[Plotted]) -> String {
    use crate::svg::Line;
    let mut labels: Vec<&str> = Vec::new();
    for r in m {
        if !labels.contains(&r.path) {
            labels.push(r.path);
        }
    }
    let mut gbps = Vec::new();
    let mut cpu = Vec::new();
    for (color, &label) in labels.iter().enumerate() {
        let rows: Vec<&Plotted> = m.iter().filter(|r| r.path == label).collect();
        gbps.push(Line {
            label: label.into(),
            points: rows.iter().map(|r| (r.streams, r.gbps)).collect(),
            color,
            dashed: false,
        });
        for (side, edge) in [("relay", false), ("edge", true)] {
            let points: Vec<(usize, f64)> = rows
                .iter()
                .filter_map(|r| r.cpu.map(|c| (r.streams, if edge { c.1 } else { c.0 })))
                .collect();
            if !points.is_empty() {
                cpu.push(Line {
                    label: format!("{label} {side}"),
                    points,
                    color,
                    dashed: edge,
                });
            }
        }
    }
    crate::svg::streams_plot(
        &format!(
            "bulk: throughput and CPU per GiB by streams ({})",
            machine()
        ),
        streams,
        &gbps,
        &cpu,
    )
}
