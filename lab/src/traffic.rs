//! Small helpers the loopback end-to-end tests share: bounded polling,
//! random payloads, and an echo round trip with half-close.

use std::time::{Duration, Instant};

use anyhow::Result;
use rand::RngCore;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Polls `f` every 20 ms until it returns true or `limit` passes; the
/// last answer of `f` is the result.
pub async fn eventually(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    f()
}

/// `n` random bytes (payloads that compression or patterns cannot fake).
pub fn random_bytes(n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    rand::rng().fill_bytes(&mut v);
    v
}

/// Sends `data`, half-closes, reads until EOF; returns what came back.
pub async fn echo_round_trip(mut s: TcpStream, data: &[u8]) -> Result<Vec<u8>> {
    let (mut r, mut w) = s.split();
    let send = async {
        w.write_all(data).await?;
        w.shutdown().await?;
        anyhow::Ok(())
    };
    let recv = async {
        let mut back = Vec::with_capacity(data.len());
        r.read_to_end(&mut back).await?;
        anyhow::Ok(back)
    };
    let (a, b) = tokio::join!(send, recv);
    a?;
    b
}
