//! Bad input over TCP: CONNECT heads (trickled, endless, wrong method,
//! signed port, refused targets), admin API requests (wrong token, a
//! drain grace of days, trickled and endless heads) and random bytes to
//! the TLS-over-TCP fallback listener. Each answer is named by its status
//! code and the relay's label (`502 no_route`).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::Result;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How long a client waits for the relay's whole answer.
const ANSWER: Duration = Duration::from_secs(30);

/// `"<code> <label>"` of an answer's status line (`HTTP/1.1 502 Bad
/// Gateway: no_route: ...` → `502 no_route`), or the code alone.
fn status(text: &str) -> String {
    let line = text.lines().next().unwrap_or_default();
    let code = line.split(' ').nth(1).unwrap_or("?");
    match line.split(": ").nth(1) {
        Some(label) => format!("{code} {label}"),
        None => code.to_string(),
    }
}

/// Reads the answer until the relay closes (bounded); names it.
async fn answer(s: &mut (impl AsyncRead + Unpin)) -> String {
    let mut v = Vec::new();
    match tokio::time::timeout(ANSWER, s.read_to_end(&mut v)).await {
        Err(_) if v.is_empty() => format!("no answer within {ANSWER:?}"),
        Ok(Err(_)) if v.is_empty() => "reset before an answer".into(),
        Ok(Ok(_)) if v.is_empty() => "closed without an answer".into(),
        _ => status(&String::from_utf8_lossy(&v)),
    }
}

/// Sends `req` in one write and names the answer.
pub(crate) async fn request(addr: SocketAddr, req: &[u8]) -> Result<String> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(req).await?;
    Ok(answer(&mut s).await)
}

/// A CONNECT to `authority` (`connect_via`'s request); names the refusal,
/// `200` if the tunnel opened.
pub(crate) async fn connect(proxy: SocketAddr, authority: &str) -> Result<String> {
    match relay_lab::connect_via(proxy, authority).await {
        Ok(_) => Ok("200".into()),
        Err(e) => match e.downcast::<relay_lab::Refused>() {
            Ok(r) => Ok(status(&r.status_line)),
            Err(e) => Err(e),
        },
    }
}

/// Sends `head` one byte every 100 ms (then more header bytes, forever)
/// until the relay answers or closes, or `hold` passes; names the answer
/// and, for a relay that cut the client off, after how long (in whole
/// seconds, rounded: the label groups repetitions).
pub(crate) async fn trickle(addr: SocketAddr, head: &[u8], hold: Duration) -> Result<String> {
    let s = TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    let (mut r, mut w) = s.into_split();
    let t = Instant::now();
    let head = head.to_vec();
    let writer = async move {
        for b in head.iter().chain(std::iter::repeat(&b'a')) {
            if w.write_all(&[*b]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let reader = async {
        let mut v = Vec::new();
        let _ = r.read_to_end(&mut v).await;
        v
    };
    tokio::select! {
        v = reader => {
            // Rounded, not truncated: a cut-off at 0.98 s is "after 1 s".
            let secs = t.elapsed().as_secs_f64().round();
            Ok(if v.is_empty() {
                format!("closed without an answer after {secs} s")
            } else {
                format!("{} after {secs} s", status(&String::from_utf8_lossy(&v)))
            })
        }
        _ = writer => Ok("write failed without an answer".into()),
        _ = tokio::time::sleep(hold) => Ok(format!("still open after {} s (closed by the client)", hold.as_secs())),
    }
}

/// Sends `head`, then header lines without end (up to `max` bytes, or
/// until the relay stops reading), and names the answer.
pub(crate) async fn endless(addr: SocketAddr, head: &[u8], max: usize) -> Result<String> {
    let s = TcpStream::connect(addr).await?;
    let (mut r, mut w) = s.into_split();
    let writer = async move {
        let _ = w.write_all(head).await;
        let junk = format!("X-Junk: {}\r\n", "a".repeat(100));
        let mut sent = 0;
        while sent < max && w.write_all(junk.as_bytes()).await.is_ok() {
            sent += junk.len();
        }
        // Keep the write half open: a FIN is not what an attacker sends.
        std::future::pending::<()>().await;
    };
    tokio::select! {
        o = answer(&mut r) => Ok(o),
        _ = writer => unreachable!("the writer never ends"),
    }
}

/// 64 random bytes where a TLS ClientHello belongs (the TCP fallback
/// listener); names what the relay did.
pub(crate) async fn tls_garbage(addr: SocketAddr) -> Result<String> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(&super::quic::random_bytes(64)).await?;
    let mut v = Vec::new();
    Ok(
        match tokio::time::timeout(ANSWER, s.read_to_end(&mut v)).await {
            Err(_) => format!("still open after {ANSWER:?}"),
            Ok(Err(_)) => "reset".into(),
            // rustls answers garbage with an alert record (type 21).
            Ok(Ok(_)) if v.first() == Some(&21) => "TLS alert, closed".into(),
            Ok(Ok(_)) => "closed".into(),
        },
    )
}
