//! The TCP fallback's QUIC probe as a planned move, for a bootstrapped
//! edge (see `bootstrap.rs`): a connection held across the move keeps
//! flowing; a move that fails after the relay registered it is served
//! again within seconds; a drain after probes that failed at the dial
//! keeps the streams. Each edge reaches the relay through a UDP gate
//! ([`udp_gate_to`]) that blocks UDP until the test opens it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use edge_client::config::TransportMode;
use edge_client::{EdgeClient, EdgeConfig, EdgeState};
use tokio::net::TcpStream;

use super::{close_cleanly, echo_line, lab, Lab, BOUND};

/// What [`udp_gate_to`]'s UDP does now.
#[derive(Default)]
struct Gate {
    /// Forwarded both ways when set, dropped while not.
    open: std::sync::atomic::AtomicBool,
    /// Relay-to-edge packets wait this long (ms) before they go on.
    down_delay_ms: std::sync::atomic::AtomicU64,
    /// Relay-to-edge packets are dropped (when sent on, after their
    /// delay: those waiting in the delay are lost too).
    down_blocked: std::sync::atomic::AtomicBool,
}

/// A network whose UDP is blocked until the gate opens: a UDP socket that
/// drops every packet while closed and forwards both ways once open (one
/// upstream socket per client address), and on the same port a TCP
/// forwarder to the relay (its TLS fallback).
async fn udp_gate_to(relay: std::net::SocketAddr, gate: Arc<Gate>) -> Result<std::net::SocketAddr> {
    use std::sync::atomic::Ordering::Relaxed;
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = tcp.local_addr()?;
    let udp = Arc::new(tokio::net::UdpSocket::bind(addr).await?);
    tokio::spawn(async move {
        let mut ups: std::collections::HashMap<std::net::SocketAddr, Arc<tokio::net::UdpSocket>> =
            Default::default();
        let mut buf = vec![0u8; 65536];
        while let Ok((n, from)) = udp.recv_from(&mut buf).await {
            if !gate.open.load(Relaxed) {
                continue;
            }
            let up = match ups.get(&from) {
                Some(u) => u.clone(),
                None => {
                    let Ok(u) = tokio::net::UdpSocket::bind("127.0.0.1:0").await else {
                        continue;
                    };
                    if u.connect(relay).await.is_err() {
                        continue;
                    }
                    let u = Arc::new(u);
                    let (back, down, gate) = (u.clone(), udp.clone(), gate.clone());
                    tokio::spawn(async move {
                        let mut buf = vec![0u8; 65536];
                        while let Ok(n) = back.recv(&mut buf).await {
                            let delay = gate.down_delay_ms.load(Relaxed);
                            let (pkt, down, gate) = (buf[..n].to_vec(), down.clone(), gate.clone());
                            tokio::spawn(async move {
                                tokio::time::sleep(Duration::from_millis(delay)).await;
                                if !gate.down_blocked.load(Relaxed) {
                                    let _ = down.send_to(&pkt, from).await;
                                }
                            });
                        }
                    });
                    ups.insert(from, u.clone());
                    u
                }
            };
            let _ = up.send(&buf[..n]).await;
        }
    });
    tokio::spawn(async move {
        while let Ok((mut client, _)) = tcp.accept().await {
            tokio::spawn(async move {
                if let Ok(mut up) = tokio::net::TcpStream::connect(relay).await {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut up).await;
                }
            });
        }
    });
    Ok(addr)
}

/// An edge on the TCP fallback behind [`udp_gate_to`] (UDP blocked until
/// the gate opens), with a tunnelled echo connection open on its TCP
/// session: what [`on_tcp`] sets up.
struct OnTcp {
    lab: Lab,
    /// The gate's UDP, closed.
    udp: Arc<Gate>,
    /// edge-0, connected over TCP.
    e0: EdgeClient,
    /// The TCP session's generation.
    first_gen: u64,
    admin: SocketAddr,
    /// The relay's CONNECT listener.
    proxy: SocketAddr,
    /// An echo server on edge-0's node address.
    echo: SocketAddr,
    echo_task: tokio::task::JoinHandle<()>,
    /// A connection to `echo` through the TCP session, echoed once.
    held: TcpStream,
}

/// A lab (hour-long certificates) and edge-0 in `Auto` behind a closed
/// [`udp_gate_to`], falling back to TCP after 500 ms; its config then
/// changed by `tweak` (its QUIC probe's pace). Ensures the relay holds one
/// session, on TCP, and opens and echoes once the `held` connection.
async fn on_tcp(tweak: impl FnOnce(&mut EdgeConfig)) -> Result<OnTcp> {
    let lab = lab(Duration::from_secs(3600)).await?;
    let token = lab.token("edge-0", "edge-client-0", "uid-0", "edge-relay");
    let udp = Arc::new(Gate::default());
    let gate = udp_gate_to(lab.relay.quic_addr(), udp.clone()).await?;
    let (e0, _) = lab.edge_with("edge-0", &token, |c| {
        c.relay = gate.to_string();
        c.transport = TransportMode::Auto;
        c.quic_fallback_after = Duration::from_millis(500);
        tweak(c);
    })?;
    let (_, first_gen) = e0.wait_connected(BOUND).await.context("edge-0 connects")?;
    let admin = lab.relay.admin_addr().context("admin")?;
    let rows = relay_lab::sessions(admin).await?;
    ensure!(rows.len() == 1 && rows[0].transport == "tcp", "{rows:?}");
    let (echo, echo_task) = relay_lab::spawn_echo("127.0.0.2:0".parse()?).await?;
    let proxy = lab.relay.connect_addr().context("connect listener")?;
    let mut held = relay_lab::connect_via(proxy, &echo.to_string()).await?;
    echo_line(&mut held, b"on tcp\n").await?;
    Ok(OnTcp {
        lab,
        udp,
        e0,
        first_gen,
        admin,
        proxy,
        echo,
        echo_task,
        held,
    })
}

/// Stand-in, not a real apiserver (see the module doc). The TCP
/// fallback's QUIC probe is a planned move too: an edge that fell back to
/// TCP (UDP blocked) moves to QUIC once UDP passes again, and a tunnelled
/// connection opened on the TCP session keeps echoing after the move and
/// ends with its client's close, not a reset.
#[tokio::test]
async fn a_connection_held_across_the_quic_probes_move_keeps_flowing() -> Result<()> {
    let OnTcp {
        lab,
        udp,
        e0,
        first_gen,
        mut held,
        echo_task: _echo_task,
        ..
    } = on_tcp(|c| c.quic_probe_interval = Duration::from_secs(2)).await?;
    udp.open.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut w = e0.watch();
    tokio::time::timeout(
        Duration::from_secs(30),
        w.wait_for(
            |s| matches!(s, EdgeState::Connected { generation, .. } if *generation > first_gen),
        ),
    )
    .await
    .context("no QUIC session within 30 s")??;
    let rows = relay_lab::sessions(lab.relay.admin_addr().context("admin")?).await?;
    ensure!(rows.len() == 1 && rows[0].transport == "quic", "{rows:?}");
    echo_line(&mut held, b"after the move to quic\n")
        .await
        .context("the connection held across the QUIC probe's move was cut")?;
    tokio::time::sleep(Duration::from_secs(11)).await;
    echo_line(&mut held, b"11 s after the move\n")
        .await
        .context("the connection held across the move was cut after it")?;
    close_cleanly(&mut held).await?;
    e0.shutdown().await;
    lab.relay.shutdown(Duration::from_secs(1)).await;
    Ok(())
}

/// Stand-in, not a real apiserver (see the module doc). A planned move
/// that fails after the relay registered its new session: the TCP
/// fallback's QUIC probe reaches the relay, which registers the QUIC
/// session and drains the TCP one (GOAWAY), but the hello reply is lost
/// (UDP towards the edge delayed 300 ms, then dropped once the session
/// shows in the admin API), so the probe's time limit fires and the edge
/// drops the QUIC connection. The node must be served again within
/// seconds (the edge closes the drained session and reconnects; the relay
/// closes it when the QUIC session ends). Before, the edge stayed on the
/// drained session, which takes no new streams, while the relay held the
/// node's routes offline: every connection to it was refused until the
/// held stream ended or the old certificate expired (an hour here).
#[tokio::test]
async fn a_move_that_fails_after_the_relay_registered_it_reconnects_within_seconds() -> Result<()> {
    use std::sync::atomic::Ordering::Relaxed;
    // `held`: a stream open on the TCP session: it keeps that session
    // draining.
    let OnTcp {
        lab,
        udp,
        e0,
        first_gen,
        admin,
        proxy,
        echo,
        echo_task: _echo_task,
        held,
    } = on_tcp(|c| {
        c.quic_probe_interval = Duration::from_secs(2);
        // The probe's limit: 2 x 2 s, plus 2 s for the relay's answer.
        c.handshake_timeout = Duration::from_secs(2);
    })
    .await?;
    // Every generation the edge is connected with from now on: the QUIC
    // session's must not be among them, else its hello reply got through
    // and the test proves nothing. (Watched, not read at the end: by then
    // a newer session has replaced whatever the edge had.)
    let seen = Arc::new(std::sync::Mutex::new(Vec::<u64>::new()));
    let recorder = {
        let (seen, mut w) = (seen.clone(), e0.watch());
        tokio::spawn(async move {
            loop {
                if let EdgeState::Connected { generation, .. } = &*w.borrow_and_update() {
                    let mut seen = seen.lock().unwrap();
                    if !seen.contains(generation) {
                        seen.push(*generation);
                    }
                }
                if w.changed().await.is_err() {
                    break;
                }
            }
        })
    };
    // UDP passes, slowly towards the edge; once the relay shows the QUIC
    // session, nothing more reaches the edge (its hello reply is still in
    // the delay).
    udp.down_delay_ms.store(300, Relaxed);
    udp.open.store(true, Relaxed);
    let t = std::time::Instant::now();
    let quic_gen = loop {
        let rows = relay_lab::sessions(admin).await?;
        if let Some(r) = rows.iter().find(|r| r.transport == "quic") {
            udp.down_blocked.store(true, Relaxed);
            break r.generation;
        }
        ensure!(
            t.elapsed() < Duration::from_secs(30),
            "no QUIC probe registered within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let blocked = std::time::Instant::now();
    // The node is served again: a new connection echoes.
    let served = loop {
        let attempt = async {
            let mut s = relay_lab::connect_via(proxy, &echo.to_string()).await?;
            echo_line(&mut s, b"served again\n").await
        };
        match tokio::time::timeout(Duration::from_secs(2), attempt).await {
            Ok(Ok(())) => break blocked.elapsed(),
            Ok(Err(e)) => eprintln!("{:?} after the block: {e:#}", blocked.elapsed()),
            Err(_) => eprintln!(
                "{:?} after the block: no answer within 2 s",
                blocked.elapsed()
            ),
        }
        ensure!(
            blocked.elapsed() < Duration::from_secs(15),
            "edge-0 not served again within 15 s of its failed move: {:?}, relay sessions {:?}",
            e0.state(),
            relay_lab::sessions(admin).await?
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    eprintln!("served again {served:?} after the hello reply was lost");
    let rows = relay_lab::sessions(admin).await?;
    ensure!(
        rows.len() == 1 && rows[0].generation > quic_gen && rows[0].generation > first_gen,
        "{rows:?}"
    );
    // The recorder saw the session that serves now (so it was watching),
    // and never the QUIC one.
    let t = std::time::Instant::now();
    while !seen.lock().unwrap().contains(&rows[0].generation) {
        ensure!(
            t.elapsed() < Duration::from_secs(2),
            "the recorder never saw the serving session {}: {:?}",
            rows[0].generation,
            seen.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    ensure!(
        !seen.lock().unwrap().contains(&quic_gen),
        "the edge got the QUIC session's reply (generation {quic_gen}): the test proves nothing: {:?}",
        seen.lock().unwrap()
    );
    recorder.abort();
    // No drained session is left behind (the failed move's old session
    // closed, within a moment of the new one registering).
    let t = std::time::Instant::now();
    loop {
        let (_, m) = relay_lab::admin_get(admin, "/metrics", None).await?;
        if m.contains("\nrelay_sessions_draining 0\n") {
            break;
        }
        ensure!(
            t.elapsed() < Duration::from_secs(5),
            "a session still draining: {m}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(held);
    e0.shutdown().await;
    lab.relay.shutdown(Duration::from_secs(1)).await;
    Ok(())
}

/// Stand-in, not a real apiserver (see the module doc). An operator's
/// drain (or a relay shutting down in a rolling update) of a TCP-fallback
/// edge whose QUIC probes fail at the dial (UDP blocked: they never get
/// as far as their hello, so the relay registered nothing) keeps the
/// session for its grace: a stream open on it keeps echoing. Before, any
/// failed probe marked a failed move, and a GOAWAY within 2 min of it (or
/// during the next probe, when that failed) was taken for the move's
/// drain: the edge closed the session at once and reset the streams the
/// grace was for.
#[tokio::test]
async fn a_drain_after_quic_probes_that_failed_at_the_dial_keeps_the_streams() -> Result<()> {
    // The gate stays closed for the whole test: every QUIC probe goes
    // unanswered.
    let OnTcp {
        lab,
        e0,
        first_gen,
        admin,
        mut held,
        echo_task: _echo_task,
        ..
    } = on_tcp(|c| {
        c.quic_probe_interval = Duration::from_secs(1);
        // A probe's limit: 2 x 2 s, plus 2 s for the relay's answer.
        c.handshake_timeout = Duration::from_secs(2);
    })
    .await?;
    // The first probe starts within 1 s and fails within its 6 s limit.
    tokio::time::sleep(Duration::from_secs(8)).await;
    let (code, body) =
        relay_lab::admin_request(admin, "DELETE", "/v1/sessions/edge-0?drain=true&grace=60s")
            .await?;
    ensure!(code == 202, "{code} {body}");
    // Past a probe's whole limit (one pending at the drain has failed by
    // then), the held stream still echoes on the session, which the edge
    // kept.
    let t = std::time::Instant::now();
    while t.elapsed() < Duration::from_secs(7) {
        echo_line(&mut held, b"draining\n").await.with_context(|| {
            format!("the held stream was cut {:?} after the drain", t.elapsed())
        })?;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    ensure!(
        matches!(e0.state(), EdgeState::Connected { generation, .. } if generation == first_gen),
        "the edge left the drained session: {:?}",
        e0.state()
    );
    let rows = relay_lab::sessions(admin).await?;
    ensure!(
        rows.len() == 1 && rows[0].generation == first_gen && rows[0].draining,
        "{rows:?}"
    );
    // The stream ends as its client ends it.
    close_cleanly(&mut held).await?;
    e0.shutdown().await;
    lab.relay.shutdown(Duration::from_secs(1)).await;
    Ok(())
}
