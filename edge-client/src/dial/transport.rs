//! Dialling one of the relay's addresses over the transport a mode asks
//! for: QUIC, TLS over TCP (directly or through an HTTP proxy), or in
//! `Auto` QUIC falling back to TCP when QUIC gets no answer; the QUIC
//! probe that walks every address; and what a failed dial says about the
//! address: silence moves the address turn at once, and
//! [`UNPROVEN_TO_ADVANCE`] answers in a row that showed no working relay
//! (a TLS failure or stall, a connection accepted then closed) move it
//! too, while a relay's own refusal keeps it.

use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;

use relay_transport::tcp::{ConnectError, TcpDial};
use relay_transport::{quic, TunnelConn};
use tracing::warn;

use super::addrs::pick;
use super::Dialer;

/// Failed attempts in a row at one relay address that answered without
/// showing a working relay, after which the next attempt dials the next
/// address. Why not at once, as for silence: a real relay's answer can fail
/// once (a restart closing the connection it had just accepted); why not
/// never: an address recycled to something else (an ingress on the port,
/// a load balancer with no backends, a TLS-inspecting box, a replica with
/// the wrong CA) answers every time, and the edges whose order puts it
/// first never dialled the relay's healthy address. Three such attempts
/// cost about 10 s with the default backoff and fallback timer.
pub(super) const UNPROVEN_TO_ADVANCE: u64 = 3;

/// The same on the TCP fallback for the address that last gave this edge a
/// connection (`EdgeStats::relay_addr_proven`; a QUIC probe's success
/// counts too): there a relay restarting or over its handshake limits
/// accepts and closes connections, as a recycled address would, so the
/// address known to hold the relay needs more such failures in a row
/// (with the 8 s backoff cap, over a minute) before the turn leaves it.
/// On QUIC such a relay is silent or refuses, which never counts.
pub(super) const UNPROVEN_TO_ADVANCE_PROVEN: u64 = 10;
use crate::config::{EdgeConfig, TransportMode};
use crate::identity::clock_hint;

impl Dialer<'_> {
    /// TLS over TCP to the relay (no hello yet); a failure says whether
    /// the relay answered.
    pub(super) async fn tcp(
        &self,
        to: TcpDial<'_>,
        tls: rustls::ClientConfig,
    ) -> Result<(Option<quinn::Endpoint>, TunnelConn), ConnectError> {
        let cfg = self.cfg;
        let mark = cfg.capture.as_ref().map(|c| c.own_mark).unwrap_or(0);
        relay_transport::tcp::connect_detailed(
            to,
            &cfg.server_name,
            tls,
            mark,
            cfg.tcp_fallback_mss,
            cfg.handshake_timeout,
        )
        .await
        .map(|c| (None, c))
        // The same hint as on QUIC: sites where UDP is blocked see only
        // this transport's error.
        .map_err(|mut e| {
            e.lost.0 = clock_hint(&e.lost.0);
            e
        })
    }

    /// [`Dialer::dial`] to the address of `addrs` whose turn it is; after
    /// an attempt that got no answer there, the next attempt (after the
    /// backoff) takes the next one, and so it does after
    /// [`UNPROVEN_TO_ADVANCE`] attempts in a row whose answer showed no
    /// working relay (see [`AddrFailed::unproven`]). A relay's own refusal
    /// keeps the turn (that address reaches the relay), as does a
    /// connection made (its hello may still be rejected: the relay that
    /// rejects it proved itself with its certificate).
    pub(super) async fn dial_any(
        &self,
        addrs: &[SocketAddr],
        tls: rustls::ClientConfig,
    ) -> Result<(Option<quinn::Endpoint>, TunnelConn), String> {
        let cfg = self.cfg;
        let turn = self.turn();
        if self.probe && self.mode == TransportMode::Quic && addrs.len() > 1 {
            return self.probe_each(addrs, turn, tls).await;
        }
        let addr = pick(addrs, turn).ok_or_else(|| format!("resolve {}: no address", cfg.relay))?;
        let failed = match self.dial_addr(addr, tls).await {
            Ok(c) => {
                self.unproven().prove(addr);
                return Ok(c);
            }
            Err(f) => f,
        };
        if addrs.len() < 2 || self.probe {
            return Err(failed.message);
        }
        if failed.silent {
            if self.advance(turn) {
                self.unproven().clear();
                if let Some(next) = pick(addrs, turn.wrapping_add(1)) {
                    warn!(relay = %cfg.relay, silent = %addr, %next, "no answer from this relay address; the next attempt dials the next one");
                }
            }
        } else if !failed.unproven {
            // The relay itself answered (refused): the address is right.
            self.unproven().clear();
        } else {
            let in_a_row = self.unproven().count(addr);
            // The higher count for a proven address is for TCP only: on
            // QUIC a relay restarting is silent and one over its limits
            // refuses, neither of which counts.
            let needed = if failed.over_tcp {
                self.unproven().needed(addr)
            } else {
                UNPROVEN_TO_ADVANCE
            };
            if in_a_row >= needed && self.advance(turn) {
                self.unproven().clear();
                if let Some(next) = pick(addrs, turn.wrapping_add(1)) {
                    warn!(relay = %cfg.relay, answered = %addr, %next, attempts = in_a_row, error = %failed.message, "this relay address answers but no working relay (TLS fails or the connection closes); the next attempt dials the next one");
                }
            }
        }
        Err(failed.message)
    }

    /// A QUIC probe from the TCP fallback, over each of the relay name's
    /// addresses from the one whose turn it is, each given
    /// `quic_fallback_after` (less where that many would not fit in the
    /// handshake timeout together): the address TCP works on may be one UDP does
    /// not reach (an IPv6 path that passes TCP only, say) while another
    /// carries QUIC. An address that answers QUIC takes the turn (later
    /// attempts start there); failures leave it (see [`Dialer::probe`]).
    async fn probe_each(
        &self,
        addrs: &[SocketAddr],
        turn: u64,
        tls: rustls::ClientConfig,
    ) -> Result<(Option<quinn::Endpoint>, TunnelConn), String> {
        let cfg = self.cfg;
        let mark = cfg.capture.as_ref().map(|c| c.own_mark).unwrap_or(0);
        let n = u32::try_from(addrs.len()).unwrap_or(u32::MAX).max(1);
        let wait = cfg.quic_fallback_after.min(cfg.handshake_timeout / n);
        let mut failed = Vec::new();
        for k in 0..addrs.len() as u64 {
            let Some(addr) = pick(addrs, turn.wrapping_add(k)) else {
                break;
            };
            let quic = quic_transport(cfg, addr, mark, tls.clone());
            match tokio::time::timeout(wait, quic).await {
                Ok(Ok((ep, c))) => {
                    if k > 0 {
                        let mut turns = self
                            .stats
                            .relay_addr_turns
                            .lock()
                            .unwrap_or_else(|e| e.into_inner());
                        turns.insert(cfg.relay.clone(), turn.wrapping_add(k));
                        warn!(relay = %cfg.relay, %addr, "QUIC answers at this relay address; later attempts start there");
                    }
                    self.unproven().prove(addr);
                    return Ok((Some(ep), c));
                }
                Ok(Err(e)) => failed.push(format!("{addr}: {}", e.into_failed().message)),
                Err(_) => failed.push(format!("{addr}: no QUIC handshake within {wait:?}")),
            }
        }
        Err(failed.join("; "))
    }

    /// [`Dialer::dial`] to one of the relay's addresses.
    async fn dial_addr(
        &self,
        addr: SocketAddr,
        tls: rustls::ClientConfig,
    ) -> Result<(Option<quinn::Endpoint>, TunnelConn), AddrFailed> {
        let cfg = self.cfg;
        let mark = cfg.capture.as_ref().map(|c| c.own_mark).unwrap_or(0);
        let target = tcp_target(cfg);
        let to = match &cfg.tcp_proxy {
            Some(proxy) => TcpDial::Proxy {
                proxy,
                target: &target,
            },
            None => TcpDial::Direct(SocketAddr::new(
                addr.ip(),
                cfg.tcp_fallback_port.unwrap_or(addr.port()),
            )),
        };
        let direct = matches!(to, TcpDial::Direct(_));
        match self.mode {
            TransportMode::Quic => {
                // Bounded here, not only by the caller's limit: an attempt
                // the caller drops never reaches the address turn, and an
                // unanswered handshake lasts until quinn's idle timeout.
                let wait = cfg.handshake_timeout;
                let (ep, c) = tokio::time::timeout(wait, quic_transport(cfg, addr, mark, tls))
                    .await
                    .unwrap_or_else(|_| {
                        Err(QuicAttemptError::Unanswered(format!(
                            "no QUIC handshake with {addr} within {wait:?}"
                        )))
                    })
                    .map_err(QuicAttemptError::into_failed)?;
                Ok((Some(ep), c))
            }
            // Through a proxy the address is not dialled at all: whatever
            // the proxy does says nothing about it.
            TransportMode::Tcp => self.tcp(to, tls).await.map_err(|e| AddrFailed {
                silent: direct && !e.reached,
                unproven: direct && e.reached,
                over_tcp: true,
                message: e.lost.0,
            }),
            TransportMode::Auto => {
                // Falling back is for paths that do not carry UDP: only a
                // QUIC attempt that got no answer at all counts. A relay
                // that answered (refused while draining, reset, a TLS
                // error) proves UDP gets through, and TCP to the same relay
                // would fare no better: that is an ordinary failed attempt.
                // An unanswered attempt right after a QUIC session is more
                // likely a relay restarting (its first Initial lost while
                // nothing listened, the next one due only after quinn's
                // backoff) than UDP newly blocked: one fresh attempt first,
                // so a fleet does not land on TCP after every restart.
                // And while QUIC carries another session of this edge (to
                // another replica, or the session a renewal replaces), UDP
                // demonstrably gets through: silence is a relay too busy to
                // answer yet (its handshakes queue behind a concurrency
                // limit when a thousand edges arrive at once), so the one
                // attempt may take the whole handshake bound.
                let (tries, wait) = if self.stats.quic_sessions_live.load(Relaxed) > 0 {
                    (1, cfg.handshake_timeout.max(cfg.quic_fallback_after))
                } else if self.quic_worked {
                    (2, cfg.quic_fallback_after)
                } else {
                    (1, cfg.quic_fallback_after)
                };
                let mut why = String::new();
                for _ in 0..tries {
                    let quic = quic_transport(cfg, addr, mark, tls.clone());
                    match tokio::time::timeout(wait, quic).await {
                        Ok(Ok((ep, c))) => return Ok((Some(ep), c)),
                        Ok(Err(
                            e @ (QuicAttemptError::Answered(_) | QuicAttemptError::Refused(_)),
                        )) => return Err(e.into_failed()),
                        Ok(Err(QuicAttemptError::Unanswered(e))) => why = e,
                        Err(_) => why = format!("no QUIC handshake within {wait:?}"),
                    }
                }
                self.stats.fallbacks.fetch_add(1, Relaxed);
                warn!(reason = %why, "QUIC unavailable; falling back to TLS over TCP");
                // QUIC got no answer here; the address is silent unless TCP
                // then reached the relay (UDP blocked, the address fine).
                // Through a proxy, TCP says nothing about this address (see
                // `TransportMode::Tcp`).
                self.tcp(to, tls).await.map_err(|e| AddrFailed {
                    silent: !e.reached,
                    unproven: direct && e.reached,
                    over_tcp: true,
                    message: e.lost.0,
                })
            }
        }
    }
}

/// Where the TCP fallback goes, as `host:port`: the relay's host, with
/// `tcp_fallback_port` when set (what a proxy is asked to CONNECT to).
pub(super) fn tcp_target(cfg: &EdgeConfig) -> std::borrow::Cow<'_, str> {
    match (cfg.tcp_fallback_port, cfg.relay.rsplit_once(':')) {
        (Some(port), Some((host, _))) => format!("{host}:{port}").into(),
        _ => cfg.relay.as_str().into(),
    }
}

/// Why a QUIC attempt failed: whether the relay answered decides whether
/// falling back to TCP can help.
#[derive(Debug)]
enum QuicAttemptError {
    /// Nothing came back (or no UDP socket to send from): the path may
    /// not carry UDP.
    Unanswered(String),
    /// Something answered and ended the attempt (a TLS error either way,
    /// a QUIC server of another protocol's close, a reset): UDP gets
    /// through, but nothing shows that a working relay is there.
    Answered(String),
    /// The relay refused: a QUIC `CONNECTION_REFUSED` (what the relay's
    /// `Incoming::refuse` sends while draining or over its handshake
    /// limit), or an application close, which can only arrive once the
    /// handshake's keys are up (the relay's certificate verified). UDP gets
    /// through and the address reaches the relay.
    Refused(String),
}

impl QuicAttemptError {
    fn into_failed(self) -> AddrFailed {
        let (message, silent, unproven) = match self {
            QuicAttemptError::Unanswered(m) => (m, true, false),
            QuicAttemptError::Answered(m) => (m, false, true),
            QuicAttemptError::Refused(m) => (m, false, false),
        };
        AddrFailed {
            message,
            silent,
            unproven,
            over_tcp: false,
        }
    }
}

/// A failed dial of one of the relay's addresses.
#[derive(Debug)]
struct AddrFailed {
    message: String,
    /// Nothing answered at the address (QUIC unanswered and no TCP
    /// connection after it, or a TCP connection refused or timed out before
    /// TLS began): this moves the address turn at once.
    silent: bool,
    /// Something answered at the address but showed no working relay: a
    /// TLS failure or stall (on TCP: anything after the connection was
    /// made; on QUIC: any close but a relay's refusal). Counted per
    /// address ([`UnprovenFailures`]); [`UNPROVEN_TO_ADVANCE`] in a row
    /// move the turn. `false` for silence, a relay's refusal, and a TCP
    /// attempt through a proxy (which says nothing about the address).
    unproven: bool,
    /// The failure was on the TCP fallback, where a relay restarting or
    /// over its handshake limits accepts and closes, as a recycled address
    /// would: only there does the address that last gave a connection get
    /// [`UNPROVEN_TO_ADVANCE_PROVEN`].
    over_tcp: bool,
}

impl Dialer<'_> {
    /// The relay name's count of unproven failures (see
    /// [`UnprovenFailures`]).
    fn unproven(&self) -> UnprovenFailures<'_> {
        UnprovenFailures {
            counts: &self.stats.relay_addr_unproven,
            proven: &self.stats.relay_addr_proven,
            relay: &self.cfg.relay,
        }
    }
}

/// Unproven failures in a row (see [`AddrFailed::unproven`]) at one of a
/// relay name's addresses (`EdgeStats::relay_addr_unproven`): the count
/// must outlive the attempt's `Dialer`, as the turn does, and only one
/// address of a name holds a count at a time (a failure at another address
/// starts over).
struct UnprovenFailures<'a> {
    counts: &'a std::sync::Mutex<std::collections::HashMap<String, (SocketAddr, u64)>>,
    proven: &'a std::sync::Mutex<std::collections::HashMap<String, SocketAddr>>,
    relay: &'a str,
}

impl UnprovenFailures<'_> {
    /// Counts one more at `addr` (starting over if the last was at another
    /// address); returns how many in a row there now are.
    fn count(&self, addr: SocketAddr) -> u64 {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        let entry = counts.entry(self.relay.to_string()).or_insert((addr, 0));
        if entry.0 != addr {
            *entry = (addr, 0);
        }
        entry.1 += 1;
        entry.1
    }

    /// Forgets the count: the address proved itself, or the turn moved.
    fn clear(&self) {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        counts.remove(self.relay);
    }

    /// `addr` gave a connection: the count starts over, and `addr` is the
    /// one known to hold the relay.
    fn prove(&self, addr: SocketAddr) {
        self.clear();
        let mut proven = self.proven.lock().unwrap_or_else(|e| e.into_inner());
        proven.insert(self.relay.to_string(), addr);
    }

    /// How many unproven failures in a row at `addr` move the turn.
    fn needed(&self, addr: SocketAddr) -> u64 {
        let proven = self.proven.lock().unwrap_or_else(|e| e.into_inner());
        if proven.get(self.relay) == Some(&addr) {
            UNPROVEN_TO_ADVANCE_PROVEN
        } else {
            UNPROVEN_TO_ADVANCE
        }
    }
}

/// A QUIC connection to `addr` (no hello yet).
async fn quic_transport(
    cfg: &EdgeConfig,
    addr: SocketAddr,
    mark: u32,
    tls: rustls::ClientConfig,
) -> Result<(quinn::Endpoint, TunnelConn), QuicAttemptError> {
    // A fresh endpoint per attempt: matches the relay's address family and
    // starts from a new source port if the old NAT binding went bad.
    let bind: SocketAddr = if addr.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        ([0u16; 8], 0).into()
    };
    let endpoint = quic::client_endpoint_with(bind, tls, &cfg.quic, mark)
        .map_err(|e| QuicAttemptError::Unanswered(format!("endpoint: {e}")))?;
    let connecting = endpoint
        .connect(addr, &cfg.server_name)
        .map_err(|e| QuicAttemptError::Unanswered(format!("connect {addr}: {e}")))?;
    let conn = connecting.await.map_err(|e| {
        let msg = clock_hint(&format!("QUIC/TLS to {addr}: {e}"));
        match e {
            quinn::ConnectionError::TimedOut | quinn::ConnectionError::LocallyClosed => {
                QuicAttemptError::Unanswered(msg)
            }
            quinn::ConnectionError::ConnectionClosed(c)
                if c.error_code == quinn::TransportErrorCode::CONNECTION_REFUSED =>
            {
                QuicAttemptError::Refused(msg)
            }
            quinn::ConnectionError::ApplicationClosed(_) => QuicAttemptError::Refused(msg),
            _ => QuicAttemptError::Answered(msg),
        }
    })?;
    Ok((endpoint, TunnelConn::Quic(conn)))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::client::EdgeStats;
    use crate::dial::test_support::{dialer_for, test_cfg};

    /// `tcp_fallback_port` replaces the relay's port in what the proxy is
    /// asked for, host names and IPv6 literals alike.
    #[test]
    fn the_fallback_port_goes_into_the_proxy_target() {
        let (mut cfg, _) = test_cfg("relay.example:4433");
        assert_eq!(tcp_target(&cfg), "relay.example:4433");
        cfg.tcp_fallback_port = Some(443);
        assert_eq!(tcp_target(&cfg), "relay.example:443");
        cfg.relay = "[2001:db8::1]:4433".into();
        assert_eq!(tcp_target(&cfg), "[2001:db8::1]:443");
    }

    /// A QUIC relay endpoint on a free loopback port, with `pki`'s relay
    /// certificate.
    fn loopback_relay(pki: &relay_transport::devcerts::DevPki) -> quinn::Endpoint {
        relay_transport::quic::server_endpoint(
            "127.0.0.1:0".parse().unwrap(),
            &pki.relay_material().unwrap(),
            &relay_transport::quic::QuicTuning::default(),
            false,
        )
        .unwrap()
    }

    /// A local TCP address nothing listens on (connections refused).
    fn refusing_tcp() -> SocketAddr {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    }

    /// Real sockets: the first address refuses the TCP connection (no
    /// answer), so the next attempt dials the second; that one accepts and
    /// closes at once (its TLS fails: the relay answered), so the turn
    /// stays and the attempt after dials it again.
    #[tokio::test]
    async fn after_a_silent_address_the_next_attempt_dials_the_next_and_stays() {
        let refused = refusing_tcp();
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let live = l.local_addr().unwrap();
        let (tx, mut reached) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                drop(s);
                let _ = tx.send(());
            }
        });
        let (cfg, client_tls) = test_cfg("relay.test:8443");
        let stats = EdgeStats::default();
        let dialer = dialer_for(&cfg, &stats, TransportMode::Tcp, false, false);
        let addrs = [refused, live];

        assert!(dialer.dial_any(&addrs, client_tls.clone()).await.is_err());
        assert_eq!(dialer.turn(), 1);
        assert!(
            reached.try_recv().is_err(),
            "the second address was dialled first"
        );
        assert!(dialer.dial_any(&addrs, client_tls.clone()).await.is_err());
        reached.recv().await.unwrap();
        assert_eq!(dialer.turn(), 1, "a TLS failure moved the turn");
        assert!(dialer.dial_any(&addrs, client_tls).await.is_err());
        reached.recv().await.unwrap();
    }

    /// A relay that answers QUIC with a refusal (draining, or over its
    /// handshake limit) is reached at that address: the next attempt dials
    /// it again, in `auto` (no TCP fallback: the answer shows UDP works)
    /// and in `quic` mode, rather than the next address (the blackholed
    /// IPv6 one on a dual-stack edge).
    #[tokio::test]
    async fn an_answered_refusal_does_not_advance() {
        let pki =
            relay_transport::devcerts::DevPki::generate(&["relay.test"], &["edge-a"]).unwrap();
        let (cfg, client_tls) = test_cfg("relay.test:8443");
        let relay = loopback_relay(&pki);
        let refusing = relay.local_addr().unwrap();
        let (tx, mut refused) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Some(incoming) = relay.accept().await {
                incoming.refuse();
                let _ = tx.send(());
            }
        });
        let stats = EdgeStats::default();
        let addrs = [refusing, refusing_tcp()];
        for mode in [TransportMode::Auto, TransportMode::Quic] {
            let dialer = dialer_for(&cfg, &stats, mode, false, false);
            // More than `UNPROVEN_TO_ADVANCE`: refusals never count.
            for _ in 0..=UNPROVEN_TO_ADVANCE {
                assert!(dialer.dial_any(&addrs, client_tls.clone()).await.is_err());
                refused.recv().await.unwrap();
                assert_eq!(dialer.turn(), 0, "{mode:?}: a refusal moved the turn");
            }
        }
        assert_eq!(
            stats.fallbacks.load(Relaxed),
            0,
            "an answer is no reason for TCP"
        );
    }

    /// In `auto`, an address silent on QUIC (nothing listens on its UDP
    /// port) whose TCP fallback is refused gave no answer at all: the
    /// next attempt dials the next address.
    #[tokio::test]
    async fn in_auto_an_address_silent_on_quic_and_tcp_advances() {
        let (mut cfg, client_tls) = test_cfg("relay.test:8443");
        cfg.quic_fallback_after = std::time::Duration::from_millis(200);
        let stats = EdgeStats::default();
        let dialer = dialer_for(&cfg, &stats, TransportMode::Auto, false, false);
        let addrs = [refusing_tcp(), refusing_tcp()];
        assert!(dialer.dial_any(&addrs, client_tls).await.is_err());
        assert_eq!(stats.fallbacks.load(Relaxed), 1, "QUIC got no answer");
        assert_eq!(dialer.turn(), 1);
    }

    /// Each relay name (one per replica's loop) has its own turn, and a
    /// QUIC probe's failure never moves one.
    #[tokio::test]
    async fn turns_are_per_relay_name_and_probes_leave_them() {
        let (cfg_a, client_tls) = test_cfg("relay-a.test:8443");
        let (cfg_b, _) = test_cfg("relay-b.test:8443");
        let stats = EdgeStats::default();
        let dialer = |cfg, probe| dialer_for(cfg, &stats, TransportMode::Tcp, false, probe);
        let addrs = [refusing_tcp(), refusing_tcp()];
        assert!(dialer(&cfg_a, false)
            .dial_any(&addrs, client_tls.clone())
            .await
            .is_err());
        assert_eq!(dialer(&cfg_a, false).turn(), 1);
        assert_eq!(
            dialer(&cfg_b, false).turn(),
            0,
            "another replica's turn moved"
        );
        assert!(dialer(&cfg_b, true)
            .dial_any(&addrs, client_tls)
            .await
            .is_err());
        assert_eq!(dialer(&cfg_b, false).turn(), 0, "a probe moved the turn");
        assert_eq!(dialer(&cfg_a, false).turn(), 1);
    }

    /// A QUIC probe walks the relay name's addresses: the one whose turn
    /// it is swallows UDP (TCP may work there, as on an IPv6 path that
    /// passes TCP only), the next answers QUIC; the probe gets its session
    /// there and moves the turn to it.
    #[tokio::test]
    async fn a_quic_probe_tries_each_address() {
        relay_transport::tls::install_default_provider();
        let pki =
            relay_transport::devcerts::DevPki::generate(&["relay.test"], &["edge-a"]).unwrap();
        let relay = loopback_relay(&pki);
        let live = relay.local_addr().unwrap();
        tokio::spawn(async move {
            while let Some(incoming) = relay.accept().await {
                tokio::spawn(async move {
                    if let Ok(conn) = incoming.await {
                        // Held until the edge closes it.
                        conn.closed().await;
                    }
                });
            }
        });
        let hole = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let silent = hole.local_addr().unwrap();
        let tls = pki.node_material("edge-a").unwrap();
        let client_tls = tls.client_config(relay_protocol::ALPN).unwrap();
        let mut cfg = EdgeConfig::new("edge-a", "relay.test:8443", "relay.test", tls);
        cfg.quic_fallback_after = Duration::from_millis(300);
        let stats = EdgeStats::default();
        let dialer = dialer_for(&cfg, &stats, TransportMode::Quic, false, true);
        let (ep, conn) = dialer
            .dial_any(&[silent, live], client_tls)
            .await
            .expect("the second address answers QUIC");
        assert!(ep.is_some());
        assert_eq!(conn.remote_addr(), live);
        assert_eq!(
            dialer.turn(),
            1,
            "the turn moved to the address QUIC answers"
        );
        drop(hole);
    }

    /// Real QUIC and TCP on one port, as the relay binds them, with a relay
    /// that answers a QUIC handshake only after 1.5 s (its handshake queue
    /// full): an edge with nothing to go by falls back to TCP after
    /// `quic_fallback_after`; an edge whose other session runs on QUIC
    /// waits for the answer and stays on QUIC.
    #[tokio::test]
    async fn with_quic_live_elsewhere_a_slow_answer_is_awaited_not_fallen_back_from() {
        use std::time::{Duration, Instant};
        relay_transport::tls::install_default_provider();
        let pki =
            relay_transport::devcerts::DevPki::generate(&["relay.test"], &["edge-a"]).unwrap();
        // An ephemeral UDP port whose TCP twin is free (another test may
        // hold it): a few tries.
        let mut bound = None;
        for _ in 0..20 {
            let relay = loopback_relay(&pki);
            let addr = relay.local_addr().unwrap();
            if let Ok(tcp) = tokio::net::TcpListener::bind(addr).await {
                bound = Some((relay, addr, tcp));
                break;
            }
        }
        let (relay, addr, tcp) = bound.expect("no UDP port with its TCP twin free in 20 tries");
        let busy = Duration::from_millis(1500);
        // Each handshake answered after `busy`, as a full queue would; the
        // abandoned first one times out on its own.
        let (done, mut answered) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Some(incoming) = relay.accept().await {
                let done = done.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(busy).await;
                    if let Ok(conn) = incoming.await {
                        let _ = done.send(conn);
                    }
                });
            }
        });
        // The fallback's TCP connection: counted, then closed (its TLS fails).
        let tcp_accepts = tokio::spawn(async move {
            let mut n = 0;
            while let Ok(Ok((s, _))) =
                tokio::time::timeout(Duration::from_secs(4), tcp.accept()).await
            {
                drop(s);
                n += 1;
            }
            n
        });
        let tls = pki.node_material("edge-a").unwrap();
        let client_tls = tls.client_config(relay_protocol::ALPN).unwrap();
        let mut cfg = EdgeConfig::new("edge-a", addr.to_string(), "relay.test", tls);
        cfg.quic_fallback_after = Duration::from_millis(300);
        cfg.handshake_timeout = Duration::from_secs(5);
        let stats = EdgeStats::default();
        let dialer = dialer_for(&cfg, &stats, TransportMode::Auto, false, false);

        // Nothing known about UDP: silence past the fallback timer moves to TCP.
        let first = dialer.dial_addr(addr, client_tls.clone()).await;
        assert!(first.is_err(), "the TCP side has no TLS server");
        assert_eq!(stats.fallbacks.load(Relaxed), 1);

        // Another session on QUIC: the same silence is waited out.
        stats.quic_sessions_live.store(1, Relaxed);
        let started = Instant::now();
        let (_ep, conn) = dialer.dial_addr(addr, client_tls).await.unwrap();
        assert_eq!(conn.kind(), relay_transport::TransportKind::Quic);
        assert!(started.elapsed() >= Duration::from_millis(300));
        assert_eq!(stats.fallbacks.load(Relaxed), 1, "no second fallback");
        let answered = tokio::time::timeout(Duration::from_secs(5), answered.recv()).await;
        assert!(matches!(answered, Ok(Some(_))), "the relay answered it");
        assert_eq!(tcp_accepts.await.unwrap(), 1);
    }

    /// A TCP listener that accepts each connection and closes it at once
    /// (a port recycled to something else, a load balancer with no
    /// backends); sends the number of each connection.
    async fn accepting_and_closing() -> (SocketAddr, tokio::sync::mpsc::UnboundedReceiver<usize>) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let at = l.local_addr().unwrap();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut i = 0;
            while let Ok((s, _)) = l.accept().await {
                drop(s);
                let _ = tx.send(i);
                i += 1;
            }
        });
        (at, rx)
    }

    /// An address that accepts TCP and closes at once keeps the turn for
    /// `UNPROVEN_TO_ADVANCE - 1` attempts; the next one moves it.
    #[tokio::test]
    async fn an_address_that_answers_but_is_no_relay_is_left_after_a_few_attempts() {
        let (cfg, client_tls) = test_cfg("relay.test:8443");
        let (closing, mut seen) = accepting_and_closing().await;
        let stats = EdgeStats::default();
        let dialer = dialer_for(&cfg, &stats, TransportMode::Tcp, false, false);
        let addrs = [closing, refusing_tcp()];
        for n in 1..=UNPROVEN_TO_ADVANCE {
            assert!(dialer.dial_any(&addrs, client_tls.clone()).await.is_err());
            assert_eq!(seen.recv().await, Some(usize::try_from(n - 1).unwrap()));
            let want = u64::from(n == UNPROVEN_TO_ADVANCE);
            assert_eq!(dialer.turn(), want, "after {n} attempts");
        }
        // The next address refuses (silent): the turn moves on again, and
        // the closing one starts from nothing.
        assert!(dialer.dial_any(&addrs, client_tls.clone()).await.is_err());
        assert_eq!(dialer.turn(), 2);
        assert!(dialer.dial_any(&addrs, client_tls).await.is_err());
        assert_eq!(dialer.turn(), 2, "the count started over");
    }

    /// A session made at the address in between starts the count over,
    /// and from then on that address needs more failures in a row on TCP
    /// (not on QUIC): a real relay (QUIC) dialled with a TLS config that
    /// does not trust it fails as a wrong-CA replica would; with the right
    /// one it works.
    #[tokio::test]
    async fn a_session_made_starts_the_count_over() {
        let pki =
            relay_transport::devcerts::DevPki::generate(&["relay.test"], &["edge-a"]).unwrap();
        let relay = loopback_relay(&pki);
        let live = relay.local_addr().unwrap();
        tokio::spawn(async move {
            while let Some(incoming) = relay.accept().await {
                tokio::spawn(async move {
                    if let Ok(conn) = incoming.await {
                        conn.closed().await;
                    }
                });
            }
        });
        let tls = pki.node_material("edge-a").unwrap();
        let trusting = tls.client_config(relay_protocol::ALPN).unwrap();
        let cfg = EdgeConfig::new("edge-a", "relay.test:8443", "relay.test", tls);
        // Another PKI's edge config: its CA did not sign the relay's.
        let (_, untrusting) = test_cfg("relay.test:8443");
        let stats = EdgeStats::default();
        let dialer = dialer_for(&cfg, &stats, TransportMode::Quic, false, false);
        let addrs = [live, refusing_tcp()];
        let untrusted = || dialer.dial_any(&addrs, untrusting.clone());
        for _ in 1..UNPROVEN_TO_ADVANCE {
            assert!(untrusted().await.is_err());
        }
        assert_eq!(dialer.turn(), 0);
        let trusting_again = trusting.clone();
        let (ep, conn) = dialer.dial_any(&addrs, trusting).await.unwrap();
        conn.close(0, "done");
        drop(ep);
        for _ in 1..UNPROVEN_TO_ADVANCE {
            assert!(untrusted().await.is_err());
        }
        assert_eq!(dialer.turn(), 0, "the count did not start over");
        // On QUIC the address that gave the connection gets no more: a
        // relay restarting is silent there, one over its limits refuses.
        assert!(untrusted().await.is_err());
        assert_eq!(dialer.turn(), 1);

        // On TCP it does: the same address (a listener accepting and
        // closing on the relay's port number stands for a relay over its
        // handshake limits) keeps the turn for
        // `UNPROVEN_TO_ADVANCE_PROVEN - 1` such failures.
        let Ok(l) = tokio::net::TcpListener::bind(live).await else {
            return; // The port is taken for TCP on this host: nothing to show.
        };
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                drop(s);
            }
        });
        let stats = EdgeStats::default();
        let quic = dialer_for(&cfg, &stats, TransportMode::Quic, false, false);
        let tcp = dialer_for(&cfg, &stats, TransportMode::Tcp, false, false);
        let (ep, conn) = quic.dial_any(&addrs, trusting_again).await.unwrap();
        conn.close(0, "done");
        drop(ep);
        for n in 1..UNPROVEN_TO_ADVANCE_PROVEN {
            assert!(tcp.dial_any(&addrs, untrusting.clone()).await.is_err());
            assert_eq!(tcp.turn(), 0, "after {n} failures on TCP");
        }
        assert!(tcp.dial_any(&addrs, untrusting.clone()).await.is_err());
        assert_eq!(tcp.turn(), 1);
    }

    /// QUIC: a server whose certificate the edge does not trust (a replica
    /// with the wrong CA, a TLS-inspecting box) answers every handshake
    /// with a TLS error: after `UNPROVEN_TO_ADVANCE` attempts the turn
    /// moves, in `quic` and in `auto` mode (where the answer also keeps
    /// the edge off TCP).
    #[tokio::test]
    async fn quic_tls_failures_at_an_address_move_the_turn() {
        let wrong_ca =
            relay_transport::devcerts::DevPki::generate(&["relay.test"], &["edge-a"]).unwrap();
        let (cfg, client_tls) = test_cfg("relay.test:8443");
        let relay = loopback_relay(&wrong_ca);
        let untrusted = relay.local_addr().unwrap();
        tokio::spawn(async move {
            while let Some(incoming) = relay.accept().await {
                tokio::spawn(async move {
                    let _ = incoming.await;
                });
            }
        });
        for mode in [TransportMode::Quic, TransportMode::Auto] {
            let stats = EdgeStats::default();
            let dialer = dialer_for(&cfg, &stats, mode, false, false);
            let addrs = [untrusted, refusing_tcp()];
            for n in 1..=UNPROVEN_TO_ADVANCE {
                let e = dialer
                    .dial_any(&addrs, client_tls.clone())
                    .await
                    .unwrap_err();
                let want = u64::from(n == UNPROVEN_TO_ADVANCE);
                assert_eq!(dialer.turn(), want, "{mode:?}: after {n} attempts ({e})");
            }
            assert_eq!(stats.fallbacks.load(Relaxed), 0, "{mode:?}: fell back");
        }
    }

    /// The count is of failures in a row at one address: one at another
    /// address starts it over, and clearing forgets it; other relay names
    /// and the turn itself are untouched.
    #[test]
    fn unproven_failures_count_in_a_row_per_address() {
        let counts = std::sync::Mutex::default();
        let proven = std::sync::Mutex::default();
        let a = UnprovenFailures {
            counts: &counts,
            proven: &proven,
            relay: "relay.test:8443",
        };
        let other = UnprovenFailures {
            counts: &counts,
            proven: &proven,
            relay: "relay-b.test:8443",
        };
        let (x, y): (SocketAddr, SocketAddr) = (
            "192.0.2.1:8443".parse().unwrap(),
            "[2001:db8::1]:8443".parse().unwrap(),
        );
        assert_eq!(a.count(x), 1);
        assert_eq!(a.count(x), 2);
        assert_eq!(other.count(x), 1);
        assert_eq!(a.count(y), 1, "another address starts over");
        assert_eq!(a.count(x), 1);
        a.clear();
        assert_eq!(a.count(y), 1);
        assert_eq!(other.count(x), 2, "another name's count");
        // The address that gave a connection needs more: a relay over its
        // handshake limits on TCP closes connections as a recycled
        // address would.
        assert_eq!(a.needed(x), UNPROVEN_TO_ADVANCE);
        a.prove(x);
        assert_eq!(a.needed(x), UNPROVEN_TO_ADVANCE_PROVEN);
        assert_eq!(a.needed(y), UNPROVEN_TO_ADVANCE);
        assert_eq!(other.needed(x), UNPROVEN_TO_ADVANCE, "another name's");
        assert_eq!(a.count(y), 1, "proving started the count over");
    }
}
