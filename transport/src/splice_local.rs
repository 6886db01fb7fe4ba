//! Copying bytes between two local sockets: a connection the relay
//! accepted (a CONNECT, captured traffic) and one it dialled into the
//! cloud itself. The same semantics and bounds as a tunnel splice (see
//! [`crate::splice`]): half-close carried across, an error on either side
//! resets both, and no byte either way for the idle bound resets both, so a
//! silent target cannot hold a task, two sockets and a connection permit
//! forever.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::splice::{
    both_ways, idle_timeout, Activity, LocalStream, PumpError, SpliceOutcome, INITIAL_READ_BUF,
};

/// Read size once a direction carries bulk traffic (`kubectl cp`, logs).
const BULK_READ_BUF: usize = 16 * 1024;

/// Splices `a` (the accepted side) with `b` (the dialled side) until both
/// directions end. `pending` holds bytes already read from `a` (after a
/// CONNECT header) that go to `b` first. In the outcome `to_tunnel` counts
/// bytes from `a` to `b`, `from_tunnel` the way back. A TCP socket must
/// come tuned, as for [`crate::splice::splice`].
pub async fn splice_local<A: LocalStream, B: LocalStream>(
    a: A,
    pending: &[u8],
    b: B,
) -> SpliceOutcome {
    splice_within(a, pending, b, idle_timeout()).await
}

/// [`splice_local`] with a given idle bound.
async fn splice_within<A: LocalStream, B: LocalStream>(
    a: A,
    pending: &[u8],
    b: B,
    idle: Duration,
) -> SpliceOutcome {
    let act = Activity::new();
    let (mut ar, mut aw) = a.halves();
    let (mut br, mut bw) = b.halves();
    let out = both_ways(
        pump(
            &mut ar,
            &mut bw,
            pending,
            &act,
            ("client read", "target write"),
        ),
        pump(&mut br, &mut aw, &[], &act, ("target read", "client write")),
        &act,
        idle,
    )
    .await;
    if out.reset.is_some() {
        A::abort(ar, aw);
        B::abort(br, bw);
    }
    out
}

/// Copies `r` into `w` (`pending` first) until EOF, then shuts `w` down;
/// `sides` names the read and the write side in errors.
async fn pump<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    r: &mut R,
    w: &mut W,
    pending: &[u8],
    act: &Activity,
    sides: (&str, &str),
) -> Result<u64, PumpError> {
    let fail = |bytes, side: &str, e: std::io::Error| PumpError {
        bytes,
        what: format!("{side}: {e}"),
    };
    let mut total = 0u64;
    if !pending.is_empty() {
        w.write_all(pending)
            .await
            .map_err(|e| fail(total, sides.1, e))?;
        total += pending.len() as u64;
    }
    // Small until a read fills it: a quiet connection (an idle
    // `kubectl exec`) holds 2 KiB per direction, not the bulk size.
    let mut buf = vec![0u8; INITIAL_READ_BUF];
    loop {
        let n = r
            .read(&mut buf)
            .await
            .map_err(|e| fail(total, sides.0, e))?;
        if n == 0 {
            w.shutdown().await.map_err(|e| fail(total, sides.1, e))?;
            return Ok(total);
        }
        act.touch();
        w.write_all(&buf[..n])
            .await
            .map_err(|e| fail(total, sides.1, e))?;
        total += n as u64;
        if n == buf.len() && buf.len() < BULK_READ_BUF {
            buf.resize(BULK_READ_BUF, 0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::{TcpListener, TcpStream};

    /// A connected pair of loopback TCP sockets.
    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (s, _) = l.accept().await.unwrap();
        (c, s)
    }

    /// Bytes and half-closes cross both ways; the counts say how many.
    #[tokio::test]
    async fn carries_bytes_and_half_close_both_ways() {
        let (mut client, accepted) = pair().await;
        let (dialled, mut target) = pair().await;
        let splice = tokio::spawn(async move { splice_local(accepted, b"GET", dialled).await });
        client.write_all(b" / 1.1").await.unwrap();
        client.shutdown().await.unwrap();
        let mut got = Vec::new();
        target.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"GET / 1.1");
        // The other direction still flows after the client's FIN, and is
        // larger than the first read buffer (it grows).
        let answer = vec![7u8; 100_000];
        target.write_all(&answer).await.unwrap();
        target.shutdown().await.unwrap();
        let mut back = Vec::new();
        client.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, answer);
        let out = splice.await.unwrap();
        assert_eq!((out.to_tunnel, out.from_tunnel), (9, 100_000));
        assert!(out.reset.is_none(), "{:?}", out.reset);
    }

    /// A target that accepts and then says nothing, to a client that says
    /// nothing either, is reset after the idle bound (shortened here), and
    /// the client sees the reset.
    #[tokio::test]
    async fn a_silent_pair_is_reset_after_the_idle_bound() {
        let (mut client, accepted) = pair().await;
        let (dialled, _target) = pair().await;
        let idle = Duration::from_millis(200);
        let out = tokio::time::timeout(
            Duration::from_secs(10),
            splice_within(accepted, &[], dialled, idle),
        )
        .await
        .expect("an idle splice must end");
        assert!(
            out.reset.as_deref().unwrap_or("").starts_with("idle"),
            "{:?}",
            out.reset
        );
        let mut buf = [0u8; 1];
        let r = client.read(&mut buf).await;
        assert!(r.is_err(), "the client must see a reset, got {r:?}");
    }
}
