//! What the bulk benchmark measured: one [`Sample`] per path, stream count
//! and run; medians, the table printed on stdout and the JSON file.

use std::fmt::Write as _;

use serde_json::json;

/// The paths compared, in the order each run measures them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Path {
    /// This project: relay-server on the relay node, edge-client on edge1.
    Tunnel,
    /// rathole 0.5 with its noise transport: server on the relay node,
    /// client on edge1.
    Rathole,
    /// No tunnel: the kernel forwards the same hops (see the module docs of
    /// [`super`] for exactly what this path is).
    Direct,
}

impl Path {
    /// Its name in the table and the JSON file.
    pub fn as_str(self) -> &'static str {
        match self {
            Path::Tunnel => "tunnel",
            Path::Rathole => "rathole",
            Path::Direct => "direct",
        }
    }
}

/// One iperf3 test.
#[derive(Clone, Debug)]
pub struct Sample {
    /// Which path.
    pub path: Path,
    /// Parallel streams (`-P`).
    pub streams: u32,
    /// Run number (0-based).
    pub run: usize,
    /// Receiver-side throughput, Gbit/s.
    pub gbps: f64,
    /// Bytes received.
    pub bytes: u64,
    /// Sender's TCP retransmissions.
    pub retransmits: Option<u64>,
    /// CPU seconds of the relay-side process during the test (none for
    /// direct).
    pub relay_cpu: Option<f64>,
    /// CPU seconds of the edge-side process during the test.
    pub edge_cpu: Option<f64>,
}

const GIB: f64 = (1u64 << 30) as f64;

impl Sample {
    /// Relay-side CPU seconds per GiB received.
    pub fn relay_per_gib(&self) -> Option<f64> {
        self.relay_cpu.map(|c| c / (self.bytes as f64 / GIB))
    }

    /// Edge-side CPU seconds per GiB received.
    pub fn edge_per_gib(&self) -> Option<f64> {
        self.edge_cpu.map(|c| c / (self.bytes as f64 / GIB))
    }
}

/// The median (mean of the middle two for an even count); `None` when
/// empty.
pub fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

/// Medians of one path at one stream count.
#[derive(Clone, Debug)]
pub struct Summary {
    /// Which path.
    pub path: Path,
    /// Parallel streams.
    pub streams: u32,
    /// Median Gbit/s.
    pub gbps: f64,
    /// Median relay-side CPU s/GiB.
    pub relay_per_gib: Option<f64>,
    /// Median edge-side CPU s/GiB.
    pub edge_per_gib: Option<f64>,
    /// Every run's Gbit/s, in run order.
    pub runs: Vec<f64>,
}

/// The tunnel against another path at one stream count: tunnel's median
/// divided by the other's.
#[derive(Clone, Debug)]
pub struct Ratio {
    /// Parallel streams.
    pub streams: u32,
    /// `tunnel / <path>`.
    pub name: String,
    /// Throughput ratio (above 1: the tunnel is faster).
    pub gbps: f64,
    /// Relay-side CPU per GiB ratio (below 1: the tunnel is cheaper).
    pub relay_per_gib: Option<f64>,
    /// Edge-side CPU per GiB ratio.
    pub edge_per_gib: Option<f64>,
}

/// Everything one invocation measured.
#[derive(Clone, Debug, Default)]
pub struct Report {
    /// `/proc/loadavg` when the benchmark started.
    pub load_at_start: String,
    /// Seconds per iperf3 test.
    pub seconds: u32,
    /// Runs asked for.
    pub runs: usize,
    /// Stream counts asked for.
    pub streams: Vec<u32>,
    /// The cloud pod the iperf3 client (tunnel, rathole) and server
    /// (direct) ran in.
    pub cloud_pod: String,
    /// Why rathole was not measured, if it was not.
    pub rathole_skipped: Option<String>,
    /// The binaries measured (relay, edge, rathole).
    pub binaries: Vec<String>,
    /// Every test, in the order run.
    pub samples: Vec<Sample>,
}

fn f2(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v:.2}"))
}

impl Report {
    /// Medians per (stream count, path), stream counts as given, paths in
    /// run order; pairs with no sample are left out.
    pub fn summaries(&self) -> Vec<Summary> {
        let mut out = Vec::new();
        for &streams in &self.streams {
            for path in [Path::Tunnel, Path::Rathole, Path::Direct] {
                let s: Vec<&Sample> = self
                    .samples
                    .iter()
                    .filter(|s| s.path == path && s.streams == streams)
                    .collect();
                let Some(gbps) = median(s.iter().map(|s| s.gbps).collect()) else {
                    continue;
                };
                out.push(Summary {
                    path,
                    streams,
                    gbps,
                    relay_per_gib: median(s.iter().filter_map(|s| s.relay_per_gib()).collect()),
                    edge_per_gib: median(s.iter().filter_map(|s| s.edge_per_gib()).collect()),
                    runs: s.iter().map(|s| s.gbps).collect(),
                });
            }
        }
        out
    }

    /// The tunnel against each other path measured, per stream count.
    pub fn ratios(&self) -> Vec<Ratio> {
        let sums = self.summaries();
        let find = |p, n| sums.iter().find(|s| s.path == p && s.streams == n);
        let mut out = Vec::new();
        for &n in &self.streams {
            let Some(t) = find(Path::Tunnel, n) else {
                continue;
            };
            for other in [Path::Rathole, Path::Direct] {
                if let Some(o) = find(other, n) {
                    let div = |a: Option<f64>, b: Option<f64>| Some(a? / b?);
                    out.push(Ratio {
                        streams: n,
                        name: format!("tunnel / {}", other.as_str()),
                        gbps: t.gbps / o.gbps,
                        relay_per_gib: div(t.relay_per_gib, o.relay_per_gib),
                        edge_per_gib: div(t.edge_per_gib, o.edge_per_gib),
                    });
                }
            }
        }
        out
    }

    /// The markdown tables printed on stdout (and pasted into
    /// docs/benchmarks.md).
    pub fn table(&self) -> String {
        let mut t = String::new();
        let _ = writeln!(
            t,
            "| streams | path | Gbit/s | relay-side CPU s/GiB | edge-side CPU s/GiB | runs (Gbit/s) |\n|---|---|---|---|---|---|"
        );
        for s in self.summaries() {
            let runs: Vec<String> = s.runs.iter().map(|g| format!("{g:.2}")).collect();
            let _ = writeln!(
                t,
                "| {} | {} | {:.2} | {} | {} | {} |",
                s.streams,
                s.path.as_str(),
                s.gbps,
                f2(s.relay_per_gib),
                f2(s.edge_per_gib),
                runs.join(" ")
            );
        }
        let ratios = self.ratios();
        if !ratios.is_empty() {
            let _ = writeln!(
                t,
                "\n| streams | ratio | Gbit/s | relay-side CPU per GiB | edge-side CPU per GiB |\n|---|---|---|---|---|"
            );
            for r in ratios {
                let _ = writeln!(
                    t,
                    "| {} | {} | {:.2} | {} | {} |",
                    r.streams,
                    r.name,
                    r.gbps,
                    f2(r.relay_per_gib),
                    f2(r.edge_per_gib)
                );
            }
        }
        if let Some(why) = &self.rathole_skipped {
            let _ = writeln!(t, "\nrathole SKIPPED: {why}");
        }
        t
    }

    /// The JSON file of `--json`: settings, every sample, medians, ratios.
    pub fn to_json(&self) -> serde_json::Value {
        let samples: Vec<_> = self
            .samples
            .iter()
            .map(|s| {
                json!({
                    "path": s.path.as_str(), "streams": s.streams, "run": s.run,
                    "gbit_per_s": s.gbps, "bytes": s.bytes, "retransmits": s.retransmits,
                    "relay_cpu_s": s.relay_cpu, "edge_cpu_s": s.edge_cpu,
                    "relay_cpu_s_per_gib": s.relay_per_gib(), "edge_cpu_s_per_gib": s.edge_per_gib(),
                })
            })
            .collect();
        let medians: Vec<_> = self
            .summaries()
            .iter()
            .map(|s| {
                json!({
                    "path": s.path.as_str(), "streams": s.streams, "gbit_per_s": s.gbps,
                    "relay_cpu_s_per_gib": s.relay_per_gib, "edge_cpu_s_per_gib": s.edge_per_gib,
                    "runs_gbit_per_s": s.runs,
                })
            })
            .collect();
        let ratios: Vec<_> = self
            .ratios()
            .into_iter()
            .map(|r| {
                json!({"streams": r.streams, "ratio": r.name, "gbit_per_s": r.gbps,
                       "relay_cpu_per_gib": r.relay_per_gib, "edge_cpu_per_gib": r.edge_per_gib})
            })
            .collect();
        json!({
            "load_average_at_start": self.load_at_start,
            "seconds": self.seconds, "runs": self.runs, "streams": self.streams,
            "cloud_pod": self.cloud_pod, "binaries": self.binaries,
            "rathole_skipped": self.rathole_skipped,
            "direct_means": super::DIRECT_MEANS,
            "samples": samples, "medians": medians, "ratios": ratios,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_and_ratios() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![4.0, 1.0]), Some(2.5));
        assert_eq!(median(vec![]), None);
        let s = |path, gbps, cpu| Sample {
            path,
            streams: 1,
            run: 0,
            gbps,
            bytes: 1 << 30,
            retransmits: None,
            relay_cpu: cpu,
            edge_cpu: cpu,
        };
        let r = Report {
            streams: vec![1],
            samples: vec![
                s(Path::Tunnel, 3.0, Some(1.0)),
                s(Path::Rathole, 2.0, Some(2.0)),
                s(Path::Direct, 6.0, None),
            ],
            ..Report::default()
        };
        let ratios = r.ratios();
        assert_eq!(ratios.len(), 2);
        assert_eq!((ratios[0].gbps, ratios[0].relay_per_gib), (1.5, Some(0.5)));
        assert_eq!((ratios[1].gbps, ratios[1].relay_per_gib), (0.5, None));
        assert!(r
            .table()
            .contains("| 1 | tunnel | 3.00 | 1.00 | 1.00 | 3.00 |"));
    }
}
