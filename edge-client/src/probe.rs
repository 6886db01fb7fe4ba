//! `edge-client --probe-ready`: the status endpoint's `/readyz`, asked
//! from the command line and printed, for kubelet's exec probe.
//!
//! Why not kubelet's HTTP probe: when it fails, kubelet's Event says only
//! "HTTP probe failed with statuscode: 503". When an exec probe fails, the
//! Event carries what the command printed. So with this probe
//! `kubectl describe pod` (or `kubectl get events`) on the edge's pod says
//! why the edge has no session ("refused by the relay: certificate
//! expired ...") even though `kubectl logs` cannot reach that node: it goes
//! through the tunnel that is down. Kubelet sends its Events to the
//! apiserver directly, not through the tunnel.
//!
//! The attempt counter is left out of what is printed: kubelet folds
//! Events with the same message into one with a count.
//!
//! Blocking std sockets with a bound on each step: a probe is one short
//! request from a fresh process, and kubelet's own timeout kills it anyway.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::time::Duration;

/// Most of an answer read: `/readyz` says one line; kubelet keeps at
/// most 10 KiB of a probe's output for its Event.
const MAX_ANSWER: u64 = 16 * 1024;

/// What `/readyz` said.
#[derive(Debug, PartialEq, Eq)]
pub struct Readiness {
    /// 200: a session is registered.
    pub ready: bool,
    /// The body: what the edge is doing, and why it is not ready.
    pub text: String,
}

/// Asks `/readyz` of the status endpoint at `listen` (the configuration's
/// `status_listen`; an unspecified address is asked on loopback), each
/// step bounded by `timeout`.
pub fn readiness(listen: SocketAddr, timeout: Duration) -> std::io::Result<Readiness> {
    let addr = match listen.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::new(Ipv4Addr::LOCALHOST.into(), listen.port())
        }
        IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::new(Ipv6Addr::LOCALHOST.into(), listen.port())
        }
        _ => listen,
    };
    let mut s = TcpStream::connect_timeout(&addr, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    write!(
        s,
        "GET /readyz HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    s.take(MAX_ANSWER).read_to_end(&mut raw)?;
    let raw = String::from_utf8_lossy(&raw);
    let (head, body) = raw.split_once("\r\n\r\n").ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "the status endpoint's answer has no end of head",
        )
    })?;
    let status = head
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse::<u16>().ok())
        .ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("not an HTTP answer: {:?}", head.lines().next()),
            )
        })?;
    Ok(Readiness {
        ready: status == 200,
        text: steady(body.trim_end()),
    })
}

/// `/readyz`'s text without the attempt counter ("connecting: attempt 12;
/// last: ..." becomes "connecting; last: ..."): kubelet folds repeated
/// Events with the same message into one with a count, and a counter in
/// it would make every failed probe an Event of its own (a fleet-wide
/// outage: one per edge per probe).
fn steady(text: &str) -> String {
    let Some(rest) = text.strip_prefix("connecting: attempt ") else {
        return text.to_string();
    };
    let after = rest.trim_start_matches(|c: char| c.is_ascii_digit());
    if after.len() == rest.len() {
        return text.to_string();
    }
    format!("connecting{after}")
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_attempt_counter_is_left_out() {
        use super::steady;
        assert_eq!(
            steady("connecting: attempt 12; last: relay refused: overloaded"),
            "connecting; last: relay refused: overloaded"
        );
        assert_eq!(steady("connecting: attempt 1"), "connecting");
        assert_eq!(
            steady("connected: session 9 with relay a"),
            "connected: session 9 with relay a"
        );
        assert_eq!(steady("connecting: attempt x"), "connecting: attempt x");
    }

    use std::sync::Arc;

    use relay_protocol::RejectReason;
    use tokio::sync::watch;
    use tokio_util::sync::CancellationToken;

    use super::*;
    use crate::client::EdgeState;

    /// The real status endpoint on loopback, asked as kubelet's exec probe
    /// asks it (from a blocking thread, as a separate process would).
    #[tokio::test]
    async fn the_probe_prints_why_the_edge_is_not_ready() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let at = l.local_addr().unwrap();
        let (tx, state) = watch::channel(EdgeState::Rejected {
            reason: RejectReason::IdentityMismatch,
            message: "client certificate does not name node \"edge-7\"".into(),
        });
        let stop = CancellationToken::new();
        let server = tokio::spawn(crate::status::serve(
            l,
            state,
            Arc::default(),
            None,
            stop.clone(),
        ));
        let ask =
            |listen| tokio::task::spawn_blocking(move || readiness(listen, Duration::from_secs(5)));
        let r = ask(at).await.unwrap().unwrap();
        assert_eq!(
            r,
            Readiness {
                ready: false,
                text: "refused by the relay: identity_mismatch: client certificate does not name node \"edge-7\"".into(),
            }
        );
        tx.send_replace(EdgeState::Connected {
            session_id: 9,
            generation: 1,
            relay_id: "relay-a".into(),
            tunnel_routes: vec![],
            routes_complete: true,
            served_routes: vec![],
            replicas: None,
            draining: false,
        });
        // `0.0.0.0:<port>` (a status endpoint opened to the LAN) is
        // asked on loopback.
        let any = SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), at.port());
        let r = ask(any).await.unwrap().unwrap();
        assert!(r.ready, "{r:?}");
        assert_eq!(r.text, "connected: session 9 with relay relay-a");
        stop.cancel();
        server.await.unwrap();
        // Nothing listening: an error, which the command reports as not
        // ready.
        assert!(ask(at).await.unwrap().is_err());
    }
}
