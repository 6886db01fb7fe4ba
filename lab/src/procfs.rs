//! What a process costs, read from `/proc/<pid>`: open fds, resident
//! memory, threads and CPU time; and the kernel's network counters
//! (`/proc/net/snmp`, `/proc/net/netstat`). The benchmarks and soaks of
//! `loadtest` and the lab's per-process tests read their figures here, so
//! every table counts the same way.

use std::process::Command;
use std::sync::OnceLock;

use anyhow::{Context, Result};

/// One process's figures at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Figures {
    /// Entries of `/proc/<pid>/fd`.
    pub fds: u64,
    /// `VmRSS`, in bytes.
    pub rss: u64,
    /// `Threads` of `/proc/<pid>/status`.
    pub threads: u64,
}

/// Reads `pid`'s [`Figures`] now.
pub fn figures(pid: u32) -> Result<Figures> {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .with_context(|| format!("listing /proc/{pid}/fd"))?
        .count() as u64;
    let status = status(pid)?;
    Ok(Figures {
        fds,
        rss: rss_from_status(&status).with_context(|| format!("/proc/{pid}/status"))?,
        threads: status
            .lines()
            .find_map(|l| l.strip_prefix("Threads:"))
            .and_then(|v| v.trim().parse().ok())
            .with_context(|| format!("/proc/{pid}/status: no Threads line"))?,
    })
}

fn status(pid: u32) -> Result<String> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))
}

/// `VmRSS` of a `/proc/<pid>/status` text, in bytes.
fn rss_from_status(status: &str) -> Result<u64> {
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .context("no VmRSS line")?
        .split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .context("bad VmRSS line")?;
    Ok(kb * 1024)
}

/// Resident set size of `pid`, in bytes (`VmRSS`).
pub fn rss_bytes(pid: u32) -> Result<u64> {
    rss_from_status(&status(pid)?).with_context(|| format!("/proc/{pid}/status"))
}

/// Clock ticks per second of `/proc/<pid>/stat`'s times (`getconf
/// CLK_TCK`; 100 on every Linux this runs on, which is the fallback).
fn clock_ticks() -> f64 {
    static TICKS: OnceLock<f64> = OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// utime + stime of `pid` (all its threads), in seconds: fields 14 and 15
/// of `/proc/<pid>/stat`, counted after the command name, which may itself
/// hold spaces and parentheses (hence the last `)`).
pub fn cpu_seconds(pid: u32) -> Result<f64> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .with_context(|| format!("{path}: no command name"))?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state): utime is field 14, stime 15.
    let tick = |i: usize| -> Result<f64> {
        Ok(f.get(i)
            .with_context(|| format!("{path}: too few fields"))?
            .parse::<u64>()? as f64)
    };
    Ok((tick(11)? + tick(12)?) / clock_ticks())
}

/// One counter of the kernel's network statistics: `name` in the `group`
/// (`Udp`, `TcpExt`, ...) of a `/proc/net/snmp` or `/proc/net/netstat`
/// text, where each group is a line of names followed by a line of
/// values.
pub fn net_counter(text: &str, group: &str, name: &str) -> Result<u64> {
    let prefix = format!("{group}:");
    let mut lines = text.lines().filter(|l| l.starts_with(&prefix));
    let (names, values) = (
        lines.next().with_context(|| format!("no {group} line"))?,
        lines.next().with_context(|| format!("no {group} values"))?,
    );
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(k, _)| *k == name)
        .and_then(|(_, v)| v.parse().ok())
        .with_context(|| format!("no {group} {name}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_has_figures() {
        let me = std::process::id();
        let f = figures(me).unwrap();
        // stdin/stdout/stderr at least; a test runner has several threads.
        assert!(f.fds >= 3, "{f:?}");
        assert!(f.threads >= 1, "{f:?}");
        assert!(f.rss > 1 << 20, "{f:?}");
        assert!(rss_bytes(me).unwrap() > 0);
        // Burn a little CPU so the counter has something to show.
        let t = std::time::Instant::now();
        let mut x = 0u64;
        while t.elapsed() < std::time::Duration::from_millis(50) {
            x = x.wrapping_add(std::hint::black_box(1));
        }
        assert!(x > 0);
        assert!(cpu_seconds(me).unwrap() > 0.0);
    }

    #[test]
    fn network_counters_are_read_by_group_and_name() {
        let snmp = "Udp: InDatagrams NoPorts InErrors RcvbufErrors\n\
                    Udp: 10 2 7 5\n\
                    UdpLite: InDatagrams NoPorts InErrors RcvbufErrors\n\
                    UdpLite: 0 0 0 0\n";
        assert_eq!(net_counter(snmp, "Udp", "RcvbufErrors").unwrap(), 5);
        assert_eq!(net_counter(snmp, "UdpLite", "InDatagrams").unwrap(), 0);
        assert!(net_counter(snmp, "Udp", "Nope").is_err());
        assert!(net_counter(snmp, "TcpExt", "ListenOverflows").is_err());
        // This machine's own, as the soaks read them.
        let netstat = std::fs::read_to_string("/proc/net/netstat").unwrap();
        assert!(net_counter(&netstat, "TcpExt", "ListenOverflows").is_ok());
    }

    #[test]
    fn a_missing_process_is_an_error() {
        // pid_max is at most 2^22: this pid cannot exist.
        assert!(figures(u32::MAX).is_err());
        assert!(cpu_seconds(u32::MAX).is_err());
    }
}
