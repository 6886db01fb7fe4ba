//! Opening a captured connection's stream when the picked session's path
//! may have died.
//!
//! Each captured connection goes on one session (see
//! `supervisor::sessions`). A path that dies without a word (the relay's
//! node lost, a black hole between the site and one replica) is found
//! quiet only after a keep-alive and more of silence, and dead later
//! still; until then every new connection would go to it and wait out its
//! open timeout. On QUIC a live path answers anything sent within a round
//! trip and the relay's ACK delay (25 ms, resent after a probe timeout
//! when lost), so an open followed by [`hedge_after`] with nothing at all
//! arriving on its connection shows the path dead: the open then goes to a
//! spare session too (another replica whose relay lists the destination)
//! and the first to answer wins.
//!
//! Nothing of the connection's payload is sent before the answer, so the
//! loser carries none: at most its relay dials the target once more, and
//! that connection ends at once (its stream is finished when dropped).
//! The TCP fallback is never hedged: yamux acknowledges a new stream only
//! when the relay's side takes it, and an idle connection may then be
//! silent far longer than a round trip. On either transport, an open that
//! fails because the picked session's connection has closed (between the
//! look at the sessions and the open) goes to the spare at once.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use relay_protocol::{StreamOpen, StreamReply, StreamStatus};
use relay_transport::conn::{open_stream, BiStream};
use relay_transport::{TransportKind, TunnelConn};
use tracing::debug;

/// How long an open waits for anything to arrive on its QUIC connection
/// before it goes to the spare too: four round trips, at least a second
/// (several probe timeouts on any path with a sub-200 ms round trip).
pub(super) fn hedge_after(rtt: Duration) -> Duration {
    (rtt * 4).max(Duration::from_secs(1))
}

/// Opens `open` on `picked`, bounded by `timeout`; when `picked` is QUIC,
/// there is a `spare`, and nothing arrives on `picked` for
/// [`hedge_after`] its round trip, on `spare` as well (counted in
/// `hedged`): the first success is kept. When both fail, a relay's own
/// answer is preferred to a timeout, the spare's when both are answers.
/// An open that fails at once because `picked`'s connection is gone (it
/// ended after capture took its snapshot of the sessions) goes to the
/// spare, whatever the transport.
pub(super) async fn open_hedged(
    picked: &TunnelConn,
    spare: Option<&TunnelConn>,
    open: &StreamOpen,
    timeout: Duration,
    hedged: &AtomicU64,
) -> Result<BiStream, StreamReply> {
    let start = tokio::time::Instant::now();
    let heard = picked.arrivals();
    let first = open_stream(picked, open, timeout);
    tokio::pin!(first);
    let Some(spare) = spare else {
        return first.await;
    };
    // The picked session's answer, or the spare's when the picked
    // connection has closed.
    let or_spare = async |r: Result<BiStream, StreamReply>| match r {
        Err(_) if closed(picked) => {
            open_stream(spare, open, timeout.saturating_sub(start.elapsed())).await
        }
        r => r,
    };
    if picked.kind() != TransportKind::Quic {
        return or_spare(first.await).await;
    }
    tokio::select! {
        r = &mut first => return or_spare(r).await,
        _ = tokio::time::sleep(hedge_after(picked.rtt()).min(timeout)) => {}
    }
    if picked.arrivals() != heard {
        // The path answers: the relay is dialling (or slow), not gone.
        return first.await;
    }
    hedged.fetch_add(1, Relaxed);
    debug!(
        waited_ms = start.elapsed().as_millis() as u64,
        "nothing heard on the picked session since the open; opening on a spare too"
    );
    let second = open_stream(spare, open, timeout.saturating_sub(start.elapsed()));
    tokio::pin!(second);
    tokio::select! {
        r = &mut first => match r {
            Ok(bi) => Ok(bi),
            Err(a) => second.await.map_err(|b| either(a, b, picked, spare)),
        },
        r = &mut second => match r {
            Ok(bi) => Ok(bi),
            Err(b) => first.await.map_err(|a| either(a, b, picked, spare)),
        },
    }
}

/// Whether `conn` is closed (an open on it then failed for that, not by
/// the relay's answer).
fn closed(conn: &TunnelConn) -> bool {
    futures::FutureExt::now_or_never(conn.closed()).is_some()
}

/// Of two failed opens' replies (`a` on `picked`, `b` on the spare), the
/// one to report: a relay's answer before a timeout or a failure of a
/// closed connection, the spare's when both are answers or neither is.
fn either(a: StreamReply, b: StreamReply, picked: &TunnelConn, spare: &TunnelConn) -> StreamReply {
    let answered =
        |e: &StreamReply, conn: &TunnelConn| e.status != StreamStatus::Timeout && !closed(conn);
    if answered(&a, picked) && !answered(&b, spare) {
        a
    } else {
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;

    use relay_protocol::codec::{read_frame, write_frame};
    use relay_protocol::{StreamStatus, Target, L4};
    use relay_transport::devcerts::DevPki;
    use relay_transport::QuicTuning;
    use tokio::net::UdpSocket;

    /// A relay stand-in: a real QUIC endpoint that answers every open
    /// with `Ok` and counts the opens it saw.
    fn relay(pki: &DevPki, seen: Arc<AtomicU64>) -> SocketAddr {
        let ep = relay_transport::quic::server_endpoint(
            "127.0.0.1:0".parse().unwrap(),
            &pki.relay_material().unwrap(),
            &QuicTuning::relay_default(),
            false,
        )
        .unwrap();
        let addr = ep.local_addr().unwrap();
        tokio::spawn(async move {
            while let Some(inc) = ep.accept().await {
                let seen = seen.clone();
                tokio::spawn(async move {
                    let Ok(conn) = inc.await else { return };
                    while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                        let seen = seen.clone();
                        tokio::spawn(async move {
                            let _: StreamOpen = read_frame(&mut recv).await.unwrap();
                            seen.fetch_add(1, Relaxed);
                            write_frame(&mut send, &StreamReply::ok()).await.unwrap();
                            // Held open until the edge ends the stream.
                            let _ = recv.read_to_end(1 << 16).await;
                        });
                    }
                });
            }
        });
        addr
    }

    /// A UDP forwarder in front of `to` that drops everything both ways
    /// while `dark` is set: a path that dies without a word.
    async fn forwarder(to: SocketAddr, dark: Arc<AtomicBool>) -> SocketAddr {
        let front = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        let back = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        back.connect(to).await.unwrap();
        let addr = front.local_addr().unwrap();
        let client: Arc<std::sync::Mutex<Option<SocketAddr>>> = Default::default();
        let (f, b, d, c) = (front.clone(), back.clone(), dark.clone(), client.clone());
        tokio::spawn(async move {
            let mut buf = vec![0u8; 65_536];
            while let Ok((n, from)) = f.recv_from(&mut buf).await {
                *c.lock().unwrap() = Some(from);
                if !d.load(Relaxed) {
                    let _ = b.send(&buf[..n]).await;
                }
            }
        });
        tokio::spawn(async move {
            let mut buf = vec![0u8; 65_536];
            while let Ok(n) = back.recv(&mut buf).await {
                let to = *client.lock().unwrap();
                if let (Some(to), false) = (to, dark.load(Relaxed)) {
                    let _ = front.send_to(&buf[..n], to).await;
                }
            }
        });
        addr
    }

    async fn connect(pki: &DevPki, addr: SocketAddr) -> TunnelConn {
        let ep = relay_transport::quic::client_endpoint(
            "127.0.0.1:0".parse().unwrap(),
            &pki.node_material("edge-a").unwrap(),
            &QuicTuning::default(),
            0,
        )
        .unwrap();
        TunnelConn::Quic(ep.connect(addr, "relay.test").unwrap().await.unwrap())
    }

    fn open() -> StreamOpen {
        StreamOpen {
            target: Target::Addr("10.96.0.10:80".parse().unwrap()),
            source: None,
            l4: L4::Tcp,
        }
    }

    /// Real QUIC on loopback, one relay's path cut by a forwarder that
    /// drops everything: an open on it goes to the spare once nothing has
    /// arrived for the hedge delay, and succeeds there; on a live path
    /// nothing is hedged, and a lone session waits out its timeout.
    #[tokio::test]
    async fn an_open_on_a_silent_path_goes_to_the_spare_too() {
        relay_transport::tls::install_default_provider();
        let pki = DevPki::generate(&["relay.test"], &["edge-a"]).unwrap();
        let (seen_a, seen_b) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let dark = Arc::new(AtomicBool::new(false));
        let a = forwarder(relay(&pki, seen_a.clone()), dark.clone()).await;
        let b = relay(&pki, seen_b.clone());
        let (a, b) = (connect(&pki, a).await, connect(&pki, b).await);
        let hedged = AtomicU64::new(0);
        let timeout = Duration::from_secs(5);

        // Both paths live: the picked one answers, nothing hedged.
        let bi = open_hedged(&a, Some(&b), &open(), timeout, &hedged).await;
        assert!(bi.is_ok());
        assert_eq!(hedged.load(Relaxed), 0);
        assert_eq!((seen_a.load(Relaxed), seen_b.load(Relaxed)), (1, 0));

        // The picked path dies: the spare answers after the hedge delay.
        dark.store(true, Relaxed);
        let at = std::time::Instant::now();
        let bi = open_hedged(&a, Some(&b), &open(), timeout, &hedged).await;
        let took = at.elapsed();
        assert!(bi.is_ok(), "{:?}", bi.err());
        assert_eq!(hedged.load(Relaxed), 1);
        assert_eq!(seen_b.load(Relaxed), 1, "the spare took the open");
        assert_eq!(seen_a.load(Relaxed), 1, "the dark relay saw nothing");
        let delay = hedge_after(a.rtt());
        assert!(
            took >= delay && took < delay + Duration::from_secs(2),
            "answered after {took:?}, hedge delay {delay:?}"
        );

        // No spare: the open waits out its bound on the silent path.
        let short = Duration::from_millis(1500);
        let r = open_hedged(&a, None, &open(), short, &hedged).await;
        assert_eq!(r.err().map(|e| e.status), Some(StreamStatus::Timeout));
        assert_eq!(hedged.load(Relaxed), 1);

        // The picked session's connection is gone (it ended after the
        // sessions were looked at): the open goes to the spare at once.
        a.close(0, "gone");
        let at = std::time::Instant::now();
        let bi = open_hedged(&a, Some(&b), &open(), timeout, &hedged).await;
        assert!(bi.is_ok(), "{:?}", bi.err());
        assert!(
            at.elapsed() < hedge_after(Duration::ZERO),
            "{:?}",
            at.elapsed()
        );
        assert_eq!(seen_b.load(Relaxed), 2);
        assert_eq!(
            hedged.load(Relaxed),
            1,
            "not a hedge: the picked one failed"
        );
    }

    #[test]
    fn the_hedge_delay_is_four_round_trips_and_at_least_a_second() {
        let ms = Duration::from_millis;
        assert_eq!(hedge_after(ms(0)), ms(1000));
        assert_eq!(hedge_after(ms(50)), ms(1000));
        assert_eq!(hedge_after(ms(600)), ms(2400));
    }
}
