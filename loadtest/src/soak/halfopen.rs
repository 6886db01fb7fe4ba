//! Half-open CONNECT clients. `halfopen-process` (hidden) opens `count`
//! TCP connections to the relay's CONNECT listener from its own source
//! address and treats each as one of three kinds: `silent` (sends
//! nothing), `partial` (sends part of a CONNECT head and never finishes
//! it), `after200` (finishes CONNECT, then goes silent with the tunnel
//! open). It keeps every socket until `hold` has passed, recording what
//! the relay answered (the status of the first response line, or how
//! the connection ended), then closes them all and prints the counts as
//! JSON. Several such processes hold more sockets than one process's
//! `RLIMIT_NOFILE` allows.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::Semaphore;

/// `halfopen-process --proxy A --target T --kind K --count N --src IP --hold D`.
#[derive(clap::Args, Debug)]
pub(crate) struct ProcArgs {
    #[arg(long)]
    proxy: SocketAddr,
    #[arg(long)]
    target: SocketAddr,
    #[arg(long)]
    kind: String,
    #[arg(long)]
    count: u64,
    #[arg(long)]
    src: IpAddr,
    #[arg(long, value_parser = crate::common::parse_duration)]
    hold: Duration,
}

/// Connections opening at once per process: the listen backlog
/// (somaxconn) is 4096 and a SYN dropped there costs a 1 s retransmit.
const OPENING: usize = 256;

/// What the relay answered on one connection.
async fn one(
    a: &ProcArgs,
    held: Arc<AtomicU64>,
    opened: tokio::sync::OwnedSemaphorePermit,
    end: Instant,
) -> String {
    let s = match TcpSocket::new_v4() {
        Ok(s) => s,
        Err(e) => return format!("socket: {}", e.kind()),
    };
    if let Err(e) = s.bind(SocketAddr::new(a.src, 0)) {
        return format!("bind: {}", e.kind());
    }
    let mut s: TcpStream = match s.connect(a.proxy).await {
        Ok(s) => s,
        Err(e) => return format!("connect: {}", e.kind()),
    };
    let head = format!("CONNECT {t} HTTP/1.1\r\nHost: {t}\r\n\r\n", t = a.target);
    let sent = match a.kind.as_str() {
        "silent" => Ok(()),
        // Everything but the blank line that ends the head.
        "partial" => s.write_all(&head.as_bytes()[..head.len() - 2]).await,
        _ => s.write_all(head.as_bytes()).await,
    };
    drop(opened);
    if let Err(e) = sent {
        return format!("write: {}", e.kind());
    }
    held.fetch_add(1, Relaxed);
    let mut buf = [0u8; 512];
    let mut n = 0;
    let answer = loop {
        let left = end.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, s.read(&mut buf[n..])).await {
            Err(_) => break "no answer, held".to_string(),
            Ok(Ok(0)) => break "closed without an answer".to_string(),
            Ok(Err(e)) => break format!("read: {}", e.kind()),
            Ok(Ok(k)) => {
                n += k;
                if buf[..n].contains(&b'\n') || n == buf.len() {
                    let line = buf[..n].split(|b| *b == b'\n').next().unwrap_or_default();
                    let line = String::from_utf8_lossy(line);
                    break line.split_whitespace().nth(1).unwrap_or("?").to_string();
                }
            }
        }
    };
    // An after200 tunnel stays open, silent, until the end of the hold;
    // refused ones were closed by the relay and are dropped now.
    if answer == "200" {
        let left = end.saturating_duration_since(Instant::now());
        let more = tokio::time::timeout(left, s.read(&mut buf)).await;
        held.fetch_sub(1, Relaxed);
        return match more {
            Err(_) => "200, held silent to the end".into(),
            Ok(Ok(0)) => "200, then closed by the relay".into(),
            Ok(Ok(_)) => "200, then unexpected bytes".into(),
            Ok(Err(e)) => format!("200, then read: {}", e.kind()),
        };
    }
    held.fetch_sub(1, Relaxed);
    answer
}

/// Runs `halfopen-process`.
pub(crate) async fn process(a: ProcArgs) -> Result<()> {
    ensure!(
        ["silent", "partial", "after200"].contains(&a.kind.as_str()),
        "--kind must be silent, partial or after200"
    );
    ensure!(a.count <= 100_000, "--count at most 100000");
    let a = Arc::new(a);
    let end = Instant::now() + a.hold;
    let held = Arc::new(AtomicU64::new(0));
    let opening = Arc::new(Semaphore::new(OPENING));
    let mut set = tokio::task::JoinSet::new();
    let mut peak = 0;
    for _ in 0..a.count {
        let permit = opening.clone().acquire_owned().await?;
        peak = peak.max(held.load(Relaxed));
        let (a, held) = (a.clone(), held.clone());
        set.spawn(async move { one(&a, held, permit, end).await });
    }
    let opened_s = a
        .hold
        .saturating_sub(end.saturating_duration_since(Instant::now()));
    let mut counts: BTreeMap<String, u64> = BTreeMap::new();
    let sampler = {
        let held = held.clone();
        tokio::spawn(async move {
            let mut peak = 0;
            loop {
                peak = peak.max(held.load(Relaxed));
                tokio::time::sleep(Duration::from_millis(100)).await;
                if Instant::now() >= end {
                    return peak;
                }
            }
        })
    };
    while let Some(r) = set.join_next().await {
        *counts.entry(r?).or_default() += 1;
    }
    let peak = peak.max(sampler.await?);
    println!(
        "{}",
        serde_json::json!({"kind": a.kind, "count": a.count, "answers": counts,
            "peak_held": peak, "all_opened_after_s": opened_s.as_secs_f64()})
    );
    Ok(())
}
