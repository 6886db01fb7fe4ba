//! iperf3 in the lab: the client run of one measurement and what its
//! `--json` report says ([`Transfer`], the receiver's side).

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use super::procs::run_bounded;
use crate::netns::{NetnsLab, Role};

/// The receiver's view of one iperf3 test (`end.sum_received`), plus the
/// sender's retransmissions.
#[derive(Clone, Copy, Debug)]
pub struct Transfer {
    /// Bytes the receiver got.
    pub bytes: u64,
    /// Over how long (seconds).
    pub seconds: f64,
    /// Bits per second at the receiver.
    pub bits_per_second: f64,
    /// TCP retransmissions the sender counted (`end.sum_sent.retransmits`).
    pub retransmits: Option<u64>,
}

/// Parses iperf3's `--json` report (the client's, which carries the
/// receiver's sums in both directions).
pub fn parse(json: &str) -> Result<Transfer> {
    let v: serde_json::Value =
        serde_json::from_str(json).context("iperf3 --json output is not JSON")?;
    if let Some(e) = v.get("error").and_then(|e| e.as_str()) {
        bail!("iperf3: {e}");
    }
    let r = &v["end"]["sum_received"];
    Ok(Transfer {
        bytes: r["bytes"].as_u64().context("end.sum_received.bytes")?,
        seconds: r["seconds"].as_f64().context("end.sum_received.seconds")?,
        bits_per_second: r["bits_per_second"]
            .as_f64()
            .context("end.sum_received.bits_per_second")?,
        retransmits: v["end"]["sum_sent"]["retransmits"].as_u64(),
    })
}

/// Runs `iperf3 -c <args> --json` in `ns` (bounded by `limit`); fails
/// unless it exits 0 with a report.
pub fn client(
    lab: &NetnsLab,
    iperf3: &Path,
    ns: Role,
    args: &[String],
    limit: Duration,
) -> Result<Transfer> {
    let what = format!("ip netns exec {ns} iperf3 {}", args.join(" "));
    let out = run_bounded(
        Command::new("ip")
            .args(["netns", "exec", lab.ns(ns)])
            .arg(iperf3)
            .args(args)
            .arg("--json"),
        &what,
        limit,
    )?;
    // iperf3 writes its errors into the JSON report as well; parse first
    // so the message says what went wrong.
    let parsed = parse(&out.stdout);
    if !out.status.success() {
        let why = parsed.err().map(|e| format!("{e:#}")).unwrap_or_default();
        bail!(
            "`{what}` exited {}: {why} {}",
            out.status,
            out.stderr.trim()
        );
    }
    parsed.with_context(|| format!("`{what}`"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_receiver_sums_and_errors() {
        let ok = r#"{"start":{},"end":{"sum_sent":{"bytes":1100,"retransmits":3},
            "sum_received":{"bytes":1000,"seconds":1.0,"bits_per_second":8000.0}}}"#;
        let t = parse(ok).unwrap();
        assert_eq!((t.bytes, t.retransmits), (1000, Some(3)));
        assert_eq!(t.bits_per_second, 8000.0);
        let err = r#"{"start":{},"end":{},"error":"unable to connect to server"}"#;
        assert!(format!("{:#}", parse(err).unwrap_err()).contains("unable to connect"));
    }
}
