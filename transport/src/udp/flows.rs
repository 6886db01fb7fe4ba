//! The loops that run one UDP flow: the far side's ([`serve_target`],
//! towards a connected socket to the target), the capture side's
//! ([`run_local_flow`] for a target reached directly, [`run_opened_flow`]
//! for one the far side accepted), the relay's bridge between two edges'
//! flows ([`bridge_flows`]), what ends a flow early ([`Stale`]), and the
//! socket to a target ([`connect_target`]).

use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use relay_protocol::datagram::StreamPayloads;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tracing::debug;

use super::{recv_datagram, send_payload, stream_payload, FlowHandle, UdpStats};
use crate::conn::{BiStream, TunnelConn};
use crate::udp_capture::{FlowIdle, Replier};

/// Resolves when a flow must end before it is idle: the Service endpoint
/// it was picked for has left its Service (kube-proxy deletes such a
/// flow's conntrack entry for the same reason). The flow ends as on
/// idleness, so the client's next datagram starts a new flow, picked
/// again.
pub type Stale = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// A [`Stale`] that never resolves: a flow to a fixed target.
pub fn never_stale() -> Stale {
    Box::pin(std::future::pending())
}

/// The far side of a flow: relays between the tunnel and a UDP socket
/// connected to `target` until `idle` passes without traffic or the
/// stream ends, or `stale` resolves. Finishes the stream on the way out.
pub async fn serve_target(
    mut bi: BiStream,
    conn: TunnelConn,
    mut flow: FlowHandle,
    sock: UdpSocket,
    idle: Duration,
    mut stale: Stale,
    stats: Arc<UdpStats>,
) {
    let mut frames = StreamPayloads::default();
    loop {
        // A send error (ICMP unreachable) is the target's answer; keep the
        // flow, as a UDP client would.
        tokio::select! {
            () = &mut stale => break,
            p = stream_payload(&mut bi.recv, &mut frames) => match p {
                Some(p) => { let _ = sock.send(&p).await; }
                None => break,
            },
            p = flow.recv() => match p {
                Some(p) => { let _ = sock.send(&p).await; }
                None => break,
            },
            r = recv_datagram(&sock) => match r {
                Ok(p) => if send_payload(&conn, &flow, &mut bi.send, &p, &stats).await.is_err() {
                    break;
                },
                Err(e) => debug!(error = %e, "udp target socket"),
            },
            _ = tokio::time::sleep(idle) => break,
        }
    }
    // Unregistered before the wait below: a datagram for the flow from now
    // on is counted (`dropped_unknown_flow`), not queued for nobody.
    drop(flow);
    let _ = tokio::io::AsyncWriteExt::shutdown(&mut bi.send).await;
}

/// Resolves when a captured flow has been quiet (no packet either way, see
/// [`Replier`]) for `idle`; re-armed on the way, so a busy flow costs no
/// timer reset per packet.
async fn quiet_past(reply: &Replier, idle: FlowIdle) {
    loop {
        // Looked at on each wake: a flow that became a stream meanwhile
        // (its conntrack entry kept longer) gets the longer bound.
        let bound = reply.idle_bound(&idle);
        let quiet = reply.quiet_for();
        if quiet >= bound {
            return;
        }
        tokio::time::sleep(bound - quiet).await;
    }
}

/// Ends a captured flow's queue from the capture loop: closed first, so
/// the loop's next packet for this client starts a new flow instead of
/// waiting in a queue nobody reads; those that got in before are counted
/// (`dropped_unknown_flow`, as datagrams for a flow that just ended).
fn close_from_client(from_client: &mut mpsc::Receiver<Bytes>, stats: &UdpStats) {
    from_client.close();
    while from_client.try_recv().is_ok() {
        stats.dropped_unknown_flow.fetch_add(1, Relaxed);
    }
}

/// The capture side of a flow to a target reached directly
/// ([`Pick::Local`](crate::udp::Pick::Local)): payloads from the local
/// client (`from_client`) go to `sock` (connected
/// to the target), its
/// datagrams back to the client through `reply`. Ends on idleness (no
/// packet either way for `idle`'s bound, see [`FlowIdle`]) or when
/// the listener drops `from_client`, or `stale` resolves. A send error (ICMP unreachable) is the
/// target's answer; the flow stays, as a UDP client's would.
pub async fn run_local_flow(
    sock: UdpSocket,
    mut from_client: mpsc::Receiver<Bytes>,
    reply: Replier,
    idle: FlowIdle,
    mut stale: Stale,
    stats: Arc<UdpStats>,
) {
    let quiet = quiet_past(&reply, idle);
    tokio::pin!(quiet);
    loop {
        tokio::select! {
            () = &mut stale => break,
            p = from_client.recv() => match p {
                Some(p) => { let _ = sock.send(&p).await; }
                None => break,
            },
            r = recv_datagram(&sock) => match r {
                Ok(p) => reply.send(&p).await,
                Err(e) => debug!(error = %e, "local udp target socket"),
            },
            () = &mut quiet => break,
        }
    }
    close_from_client(&mut from_client, &stats);
}

/// The capture side of a flow the far side accepted: payloads from the
/// local client (`from_client`) go out as datagrams; datagrams for the flow
/// go back to the client through `reply`. Ends on idleness (no packet
/// either way for `idle`'s bound, see [`FlowIdle`]), when the far
/// side ends the stream, when the listener drops `from_client`, or when
/// `stale` resolves.
pub async fn run_opened_flow(
    (mut bi, conn, mut flow): (BiStream, TunnelConn, FlowHandle),
    mut from_client: mpsc::Receiver<Bytes>,
    reply: Replier,
    idle: FlowIdle,
    mut stale: Stale,
    stats: Arc<UdpStats>,
) {
    let mut frames = StreamPayloads::default();
    let quiet = quiet_past(&reply, idle);
    tokio::pin!(quiet);
    loop {
        tokio::select! {
            () = &mut stale => break,
            p = stream_payload(&mut bi.recv, &mut frames) => match p {
                Some(p) => reply.send(&p).await,
                None => break,
            },
            p = from_client.recv() => match p {
                Some(p) => if send_payload(&conn, &flow, &mut bi.send, &p, &stats).await.is_err() {
                    break;
                },
                None => break,
            },
            p = flow.recv() => match p {
                Some(p) => reply.send(&p).await,
                None => break,
            },
            () = &mut quiet => break,
        }
    }
    // Both queues end before the wait below (see `close_from_client`;
    // the flow's datagrams from now on count as for an unknown flow).
    close_from_client(&mut from_client, &stats);
    drop(flow);
    let _ = tokio::io::AsyncWriteExt::shutdown(&mut bi.send).await;
}

/// Bridges two flows (edge to edge through the relay): datagrams of flow
/// `a` on `a_conn` go out as flow `b` on `b_conn`, and back, until idle,
/// either side ends, or `stale` resolves.
pub async fn bridge_flows(
    (mut a_bi, a_conn, mut a): (BiStream, TunnelConn, FlowHandle),
    (mut b_bi, b_conn, mut b): (BiStream, TunnelConn, FlowHandle),
    idle: Duration,
    mut stale: Stale,
    stats: Arc<UdpStats>,
) {
    let (mut a_frames, mut b_frames) = (StreamPayloads::default(), StreamPayloads::default());
    loop {
        // Whichever way a payload came from one side (datagram or stream),
        // it leaves on the other as its size allows there.
        let sent = tokio::select! {
            () = &mut stale => break,
            p = stream_payload(&mut a_bi.recv, &mut a_frames) => match p {
                Some(p) => send_payload(&b_conn, &b, &mut b_bi.send, &p, &stats).await,
                None => break,
            },
            p = stream_payload(&mut b_bi.recv, &mut b_frames) => match p {
                Some(p) => send_payload(&a_conn, &a, &mut a_bi.send, &p, &stats).await,
                None => break,
            },
            p = a.recv() => match p {
                Some(p) => send_payload(&b_conn, &b, &mut b_bi.send, &p, &stats).await,
                None => break,
            },
            p = b.recv() => match p {
                Some(p) => send_payload(&a_conn, &a, &mut a_bi.send, &p, &stats).await,
                None => break,
            },
            _ = tokio::time::sleep(idle) => break,
        };
        if sent.is_err() {
            break;
        }
    }
    // Unregistered before the waits below (see `serve_target`).
    drop((a, b));
    for bi in [&mut a_bi, &mut b_bi] {
        let _ = tokio::io::AsyncWriteExt::shutdown(&mut bi.send).await;
    }
}

/// A UDP socket connected to `target`, marked so capture lets it pass,
/// bound to `from` (the original client's address, see
/// [`crate::capture::CaptureConfig::keep_source`]) when given.
pub async fn connect_target(
    target: SocketAddr,
    from: Option<std::net::IpAddr>,
    mark: u32,
) -> std::io::Result<UdpSocket> {
    let bind: SocketAddr = if target.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        ([0u16; 8], 0).into()
    };
    let s = socket2::Socket::new(
        socket2::Domain::for_address(bind),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    crate::capture::mark_socket(socket2::SockRef::from(&s), mark)?;
    s.set_nonblocking(true)?;
    match from {
        Some(from) => crate::capture::bind_foreign(socket2::SockRef::from(&s), from)?,
        None => s.bind(&bind.into())?,
    }
    let sock = UdpSocket::from_std(s.into())?;
    sock.connect(target).await?;
    Ok(sock)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A flow that ends closes its queue before anything else: the capture
    /// loop's next packet for the client finds it closed (and starts a new
    /// flow with it) instead of waiting in it; one already queued counts.
    #[test]
    fn an_ending_flow_refuses_new_packets_and_counts_those_it_held() {
        let (tx, mut rx) = mpsc::channel(4);
        tx.try_send(Bytes::from_static(b"late")).unwrap();
        let stats = UdpStats::default();
        close_from_client(&mut rx, &stats);
        assert_eq!(stats.dropped_unknown_flow.load(Relaxed), 1);
        assert!(matches!(
            tx.try_send(Bytes::from_static(b"next")),
            Err(mpsc::error::TrySendError::Closed(_))
        ));
    }
}
