//! Shared machinery of the benchmarks: argument parsing helpers, the dev
//! PKI and config files, the relay / edge child processes (killed on drop),
//! resident memory from `/proc`, the services under test, the CONNECT
//! client, progress lines and the result tables.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tokio::task::JoinHandle;

mod bench;
mod child;
mod kube;
mod traffic;

pub(crate) use bench::*;
pub(crate) use child::*;
pub(crate) use kube::*;
pub(crate) use traffic::*;

/// Parses `2GiB`, `256MiB`, `64KiB`, `1000` (bytes); also `k`/`M`/`G` as
/// binary multiples, since nobody means 10^9 when sizing a buffer.
pub(crate) fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size (examples: 1024, 64KiB, 256MiB, 2GiB)"))?;
    let mul: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" | "kb" => 1 << 10,
        "m" | "mib" | "mb" => 1 << 20,
        "g" | "gib" | "gb" => 1 << 30,
        other => {
            return Err(format!(
                "unknown size unit {other:?} in {s:?} (use KiB, MiB, GiB)"
            ))
        }
    };
    n.checked_mul(mul)
        .ok_or_else(|| format!("{s:?} is too large"))
}

/// Parses a humantime duration (`10s`, `500ms`).
pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{s:?}: {e} (examples: 500ms, 10s, 1m)"))
}

/// Human bytes: `2.00 GiB`.
pub(crate) fn fmt_bytes(b: f64) -> String {
    const U: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut v = b;
    let mut i = 0;
    while v.abs() >= 1024.0 && i < U.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    format!("{v:.2} {}", U[i])
}

/// Median of a non-empty slice (mean of the middle two for even lengths).
pub(crate) fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

pub(crate) use relay_lab::procfs::{cpu_seconds as cpu_secs, rss_bytes};

/// One line describing the machine, for reports.
pub(crate) fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    format!("{cores} cores, {cpu}, Linux {kernel}")
}

/// Prints a progress line to stderr every two seconds until dropped.
pub(crate) struct Progress(JoinHandle<()>);

impl Progress {
    /// Starts reporting `what` with `f()` as the detail.
    pub(crate) fn start(
        what: impl Into<String>,
        f: impl Fn() -> String + Send + 'static,
    ) -> Progress {
        let what = what.into();
        let t0 = Instant::now();
        Progress(tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(2));
            tick.tick().await;
            loop {
                tick.tick().await;
                eprintln!("  .. {what}: {} ({:.0?})", f(), t0.elapsed());
            }
        }))
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A shared counter for progress lines.
pub(crate) type Counter = Arc<AtomicU64>;

/// Reads a counter.
pub(crate) fn get(c: &Counter) -> u64 {
    c.load(Relaxed)
}

/// A result table: printed aligned, one header row.
pub(crate) struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with these columns.
    pub(crate) fn new(header: &[&str]) -> Table {
        Table {
            header: header.iter().map(|s| s.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    /// Adds a row.
    pub(crate) fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    /// Adds a `figure | median | runs` row: the label, the median of
    /// `runs`, and every run, all formatted with `fmt`.
    pub(crate) fn stat(
        &mut self,
        label: impl Into<String>,
        runs: &[f64],
        fmt: impl Fn(f64) -> String,
    ) {
        let all = runs.iter().map(|x| fmt(*x)).collect::<Vec<_>>().join(", ");
        self.rows.push(vec![label.into(), fmt(median(runs)), all]);
    }

    /// Prints the table to stdout.
    pub(crate) fn print(&self) {
        let cols = self.header.len();
        let mut w = vec![0; cols];
        for r in std::iter::once(&self.header).chain(&self.rows) {
            for (i, c) in r.iter().enumerate().take(cols) {
                w[i] = w[i].max(c.chars().count());
            }
        }
        let line = |r: &Vec<String>| {
            let cells: Vec<String> = r
                .iter()
                .enumerate()
                .map(|(i, c)| format!("{c:<width$}", width = w[i.min(cols - 1)]))
                .collect();
            println!("| {} |", cells.join(" | "));
        };
        line(&self.header);
        println!(
            "|{}|",
            w.iter()
                .map(|n| "-".repeat(n + 2))
                .collect::<Vec<_>>()
                .join("|")
        );
        for r in &self.rows {
            line(r);
        }
    }
}

/// Writes the JSON result if asked to.
pub(crate) fn write_json(path: Option<&Path>, v: &serde_json::Value) -> Result<()> {
    if let Some(p) = path {
        std::fs::write(p, serde_json::to_string_pretty(v)? + "\n")
            .with_context(|| format!("writing {}", p.display()))?;
        eprintln!("wrote {}", p.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_and_nonsense_is_refused() {
        assert_eq!(parse_bytes("2GiB"), Ok(2 << 30));
        assert_eq!(parse_bytes("1024"), Ok(1024));
        assert_eq!(parse_bytes("64k"), Ok(64 << 10));
        assert!(parse_bytes("-1").is_err());
        assert!(parse_bytes("3 parsecs").is_err());
        assert!(parse_bytes("99999999999999999999G").is_err());
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
    }
}
