//! `replicas`: R relay replicas (processes, a static `[replicas]` list) and
//! N simulated edges (in this process) given only replica 0's address.
//! Every edge ends up with a session on each replica; reported: relay
//! memory per replica and per session, the time until every edge is on
//! every replica, and after one replica is killed (SIGKILL) and started
//! again on the same address, the time until every edge is back on it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use serde_json::json;

use crate::common::{fmt_bytes, machine, write_json, Bench, RelayProc, Table};
use crate::sessions::{check_edges, spawn_edges, stop_edges};

/// Arguments of `replicas`.
#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    /// Simulated edges.
    #[arg(long, default_value_t = 1000)]
    edges: usize,
    /// Relay replicas (processes).
    #[arg(long, default_value_t = 3)]
    replicas: usize,
    /// Write results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

fn free_udp_port() -> Result<u16> {
    Ok(std::net::UdpSocket::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// `[replicas]` of replica `me` among `set` (id, address).
fn replicas_toml(me: usize, set: &[(String, SocketAddr)]) -> String {
    let mut t = format!("[replicas]\nadvertise = \"{}\"\n", set[me].1);
    for (i, (id, addr)) in set.iter().enumerate() {
        if i != me {
            t.push_str(&format!(
                "[[replicas.peers]]\nid = \"{id}\"\naddress = \"{addr}\"\n"
            ));
        }
    }
    t
}

async fn start(bench: &Bench, me: usize, set: &[(String, SocketAddr)]) -> Result<RelayProc> {
    let any = SocketAddr::from(([127, 0, 0, 1], 0));
    bench
        .start_named_relay(&set[me].0, set[me].1, any, &replicas_toml(me, set))
        .await
}

/// Waits until every relay in `relays` lists `n` sessions; returns the time
/// from `t0`.
async fn all_on(relays: &[&RelayProc], n: usize, t0: Instant, limit: Duration) -> Result<Duration> {
    loop {
        let mut done = true;
        for r in relays {
            done &= r.session_count().await? as usize == n;
        }
        if done {
            return Ok(t0.elapsed());
        }
        let mut counts = Vec::new();
        for r in relays {
            counts.push(r.session_count().await?);
        }
        ensure!(
            t0.elapsed() < limit,
            "not every edge on every replica within {limit:?}: sessions per replica {counts:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// How many of `relay`'s sessions run on the TCP fallback (each edge here
/// reaches every replica over UDP, so every one of them is a fallback
/// that should not have happened).
async fn on_tcp(relay: &RelayProc) -> Result<usize> {
    Ok(relay
        .admin
        .sessions()
        .await?
        .iter()
        .filter(|s| s.transport == "tcp")
        .count())
}

/// Runs `replicas`.
pub(crate) async fn run(a: Args) -> Result<()> {
    check_edges(a.edges)?;
    ensure!(
        (2..=8).contains(&a.replicas),
        "--replicas must be between 2 and 8 (got {})",
        a.replicas
    );
    let bench = Bench::new(a.edges)?;
    println!(
        "replicas: {} | {} replicas, {} simulated edges",
        machine(),
        a.replicas,
        a.edges
    );
    let set: Vec<(String, SocketAddr)> = (0..a.replicas)
        .map(|i| {
            Ok((
                format!("relay-{i}"),
                SocketAddr::from(([127, 0, 0, 1], free_udp_port()?)),
            ))
        })
        .collect::<Result<_>>()?;
    let mut relays = Vec::new();
    for i in 0..a.replicas {
        relays.push(
            start(&bench, i, &set)
                .await
                .with_context(|| format!("replica {i}"))?,
        );
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let idle: Vec<u64> = relays.iter().map(RelayProc::rss).collect::<Result<_>>()?;
    let t0 = Instant::now();
    let edges = spawn_edges(&bench, a.edges, &relays[0])?;
    let limit = Duration::from_secs(300);
    let joined = all_on(&relays.iter().collect::<Vec<_>>(), a.edges, t0, limit).await?;
    eprintln!(
        "  every edge on all {} replicas after {:.2}s",
        a.replicas,
        joined.as_secs_f64()
    );
    let mut tcp_after_start = Vec::new();
    for r in &relays {
        tcp_after_start.push(on_tcp(r).await?);
    }
    eprintln!("  sessions on the TCP fallback, per replica: {tcp_after_start:?}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let full: Vec<u64> = relays.iter().map(RelayProc::rss).collect::<Result<_>>()?;

    // Replica 1 dies and comes back on the same address.
    let victim = 1;
    drop(relays.remove(victim));
    let t_kill = Instant::now();
    let back = start(&bench, victim, &set).await?;
    let ready = t_kill.elapsed();
    let t_ready = Instant::now();
    let again = all_on(&[&back], a.edges, t_ready, limit).await?;
    eprintln!(
        "  replica {victim} killed and ready again in {:.2}s; every edge back on it {:.2}s later",
        ready.as_secs_f64(),
        again.as_secs_f64()
    );
    let tcp_after_restart = on_tcp(&back).await?;
    eprintln!("  sessions on the TCP fallback on the restarted replica: {tcp_after_restart}");
    for r in &relays {
        ensure!(
            r.session_count().await? as usize == a.edges,
            "a surviving replica lost sessions"
        );
    }
    stop_edges(edges).await;

    let mut t = Table::new(&["figure", "value", ""]);
    for (i, (before, after)) in idle.iter().zip(&full).enumerate() {
        t.row(vec![
            format!("replica {i} RSS, idle → {} sessions", a.edges),
            format!(
                "{} → {}",
                fmt_bytes(*before as f64),
                fmt_bytes(*after as f64)
            ),
            format!(
                "{:.1} KiB per session",
                (*after as f64 - *before as f64) / a.edges as f64 / 1024.0
            ),
        ]);
    }
    t.row(vec![
        format!(
            "time until all {} edges are on all {} replicas",
            a.edges, a.replicas
        ),
        format!("{:.2} s", joined.as_secs_f64()),
        String::new(),
    ]);
    t.row(vec![
        "one replica SIGKILLed and restarted: every edge back on it".to_string(),
        format!("{:.2} s after it was ready", again.as_secs_f64()),
        "(dead path noticed within 3 × keep-alive, then backoff)".to_string(),
    ]);
    t.row(vec![
        "sessions on the TCP fallback, per replica, after the start".to_string(),
        format!("{tcp_after_start:?}"),
        "(UDP works here: each is a needless fallback)".to_string(),
    ]);
    t.row(vec![
        "… on the restarted replica".to_string(),
        tcp_after_restart.to_string(),
        String::new(),
    ]);
    t.print();
    write_json(
        a.json.as_deref(),
        &json!({"bench": "replicas", "machine": machine(), "relay": bench.bins.describe(),
                "edges": a.edges, "replicas": a.replicas,
                "relay_rss_idle": idle, "relay_rss_full": full,
                "all_on_all_s": joined.as_secs_f64(),
                "restart_ready_s": ready.as_secs_f64(),
                "back_after_restart_s": again.as_secs_f64(),
                "tcp_sessions_after_start": tcp_after_start,
                "tcp_sessions_after_restart": tcp_after_restart}),
    )
}
