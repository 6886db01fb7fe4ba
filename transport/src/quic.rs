//! quinn endpoints with transport settings tuned for a relay.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{IdleTimeout, TransportConfig, VarInt};

use crate::tls::{TlsError, TlsMaterial};

/// Transport knobs shared by both sides of a QUIC session.
#[derive(Debug, Clone)]
pub struct QuicTuning {
    /// Keep-alive interval: well under the ~30 s UDP binding lifetime of
    /// carrier-grade NATs, so the binding never expires while idle. On
    /// QUIC the edge sends a QUIC PING when nothing arrived for this long
    /// (the relay only after half its idle timeout, as a backstop); on the
    /// TCP fallback both sides ping on the control stream at this pace.
    pub keepalive: Duration,
    /// A peer silent for this long is considered dead.
    pub idle_timeout: Duration,
    /// Concurrent bidirectional streams the *peer* may open towards us, at
    /// most: a connection starts with a smaller grant, raised as the peer
    /// uses it (see [`crate::grant`]).
    pub max_bidi_streams: u32,
    /// Per-stream receive window: what one stalled stream can buffer. This
    /// is the per-stream flow control that keeps one slow reader from
    /// stalling the others.
    pub stream_window: u32,
    /// Upper bound of path MTU discovery (UDP payload bytes). Discovery
    /// starts at 1200 and probes upward, so a higher bound costs nothing on
    /// a 1500-byte path and lets jumbo-frame paths use bigger packets; the
    /// per-packet cost is what bounds throughput.
    pub max_udp_payload: u16,
    /// Packet size to start with (default 1200, the QUIC minimum). Only
    /// for paths known to carry more: a path that drops bigger packets
    /// breaks the connection rather than slowing it.
    pub initial_mtu: u16,
    /// Connection-wide window, both ways: at most this many bytes of all
    /// streams together are buffered for a session, received and not yet
    /// read (quinn's default is unbounded: 2^62), and written and not yet
    /// acknowledged. The memory ceiling per session; at least
    /// `stream_window`.
    pub conn_window: u32,
    /// A spliced connection that moves no byte either way for this long is
    /// reset (see [`crate::splice::set_idle_timeout`]; process-wide, set
    /// when an endpoint is built).
    pub stream_idle_timeout: Duration,
}

/// UDP socket buffers asked for (SO_RCVBUF / SO_SNDBUF). The kernel
/// default (208 KiB here) overflows at Gbit/s rates on loopback, and every
/// dropped packet is a loss to QUIC's congestion control. The kernel caps
/// the request at `net.core.rmem_max` / `wmem_max`; what was granted is
/// logged. One socket per endpoint, so this is per process, not per
/// session.
const UDP_SOCKET_BUFFER: usize = 4 * 1024 * 1024;

/// Asks for bigger socket buffers; best effort (a smaller grant is logged
/// and the endpoint works anyway).
fn size_socket_buffers(sock: &socket2::Socket) {
    let _ = sock.set_recv_buffer_size(UDP_SOCKET_BUFFER);
    let _ = sock.set_send_buffer_size(UDP_SOCKET_BUFFER);
    // Linux reports twice the usable size (bookkeeping overhead included).
    let (r, w) = (
        sock.recv_buffer_size().unwrap_or(0),
        sock.send_buffer_size().unwrap_or(0),
    );
    if r < UDP_SOCKET_BUFFER || w < UDP_SOCKET_BUFFER {
        tracing::info!(
            recv = r,
            send = w,
            wanted = UDP_SOCKET_BUFFER,
            "UDP socket buffers smaller than asked (raise net.core.rmem_max / wmem_max for Gbit/s)"
        );
    }
}

impl Default for QuicTuning {
    fn default() -> Self {
        QuicTuning {
            // 8 s: an idle edge's uplink carries about 1.5 MB a day per
            // relay replica (two small packets per interval and a control
            // ping every two minutes), still well under the shortest usual
            // CGNAT binding lifetime (30 s). Longer would save bytes but
            // stretch what a relay crash costs an idle edge: it learns of
            // the restarted relay (a stateless reset) at its next
            // keep-alive.
            keepalive: Duration::from_secs(8),
            // Three keep-alives: a dead path is declared within 24 s,
            // while two lost or late keep-alives in a row cost nothing.
            idle_timeout: Duration::from_secs(24),
            max_bidi_streams: 10_000,
            stream_window: 1024 * 1024,
            max_udp_payload: 1452,
            initial_mtu: 1200,
            conn_window: 8 * 1024 * 1024,
            stream_idle_timeout: crate::splice::DEFAULT_IDLE_TIMEOUT,
        }
    }
}

impl QuicTuning {
    /// Checks the settings, naming the offending field (as in the config
    /// file's `[quic]` section). Used for files and for configs built by
    /// code alike, so neither can start with a value that panics later.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        let t = self;
        if t.initial_mtu < 1200 || t.initial_mtu > t.max_udp_payload {
            return Err((
                "initial_mtu",
                "must be between 1200 and max_udp_payload".into(),
            ));
        }
        if !(1200..=65527).contains(&t.max_udp_payload) {
            return Err(("max_udp_payload", "must be between 1200 and 65527".into()));
        }
        if t.keepalive.is_zero() {
            return Err(("keepalive", "must be greater than zero".into()));
        }
        if t.keepalive >= t.idle_timeout {
            return Err(("keepalive", "must be shorter than idle_timeout".into()));
        }
        if IdleTimeout::try_from(t.idle_timeout).is_err() {
            return Err(("idle_timeout", "too large".into()));
        }
        if t.max_bidi_streams == 0 {
            return Err(("max_streams", "must be at least 1".into()));
        }
        if t.stream_window < 16 * 1024 {
            return Err(("stream_window", "must be at least 16384".into()));
        }
        if t.conn_window < t.stream_window {
            return Err(("conn_window", "must be at least stream_window".into()));
        }
        if t.stream_idle_timeout < Duration::from_secs(1) {
            return Err(("stream_idle_timeout", "must be at least 1s".into()));
        }
        Ok(())
    }
}

impl QuicTuning {
    /// The relay's defaults: the same, but edges may open 256 streams at
    /// once (their control stream and connections to cloud ranges; more
    /// wait for credit). quinn preallocates state for every stream the peer
    /// may open, so granting edges 10,000 cost ~900 KiB of relay memory per
    /// idle session (loadtest `sessions`); an idle session now holds the
    /// first grant of 32 (the whole session ~42 KiB) and a busy one up to
    /// 256.
    pub fn relay_default() -> Self {
        QuicTuning {
            max_bidi_streams: 256,
            ..QuicTuning::default()
        }
    }
}

impl QuicTuning {
    /// Endpoint settings: the largest UDP payload the endpoint accepts must
    /// allow what MTU discovery may reach.
    fn endpoint_config(
        &self,
        base: quinn::EndpointConfig,
    ) -> std::io::Result<quinn::EndpointConfig> {
        let mut e = base;
        e.max_udp_payload_size(self.max_udp_payload)
            .map_err(|e| std::io::Error::other(format!("max_udp_payload: {e}")))?;
        Ok(e)
    }

    /// `keep_alive`: after how long without a packet from the peer this
    /// side sends a QUIC PING. Edges: the keep-alive; the relay: half its
    /// idle timeout (see [`server_endpoint_with`]).
    fn transport(&self, keep_alive: Duration) -> Result<TransportConfig, TlsError> {
        let mut t = TransportConfig::default();
        t.keep_alive_interval(Some(keep_alive));
        t.max_idle_timeout(Some(
            IdleTimeout::try_from(self.idle_timeout)
                .map_err(|_| TlsError::Verifier("idle timeout out of range".into()))?,
        ));
        // The peer starts with a small grant, raised as it is used by
        // whoever accepts its streams (see `crate::grant`).
        t.max_concurrent_bidi_streams(VarInt::from_u32(crate::grant::initial_grant(
            self.max_bidi_streams,
        )));
        // Unidirectional streams are not used by the protocol.
        t.max_concurrent_uni_streams(VarInt::from_u32(0));
        t.stream_receive_window(VarInt::from_u32(self.stream_window));
        // Bounded connection windows (see `conn_window`).
        t.receive_window(VarInt::from_u32(self.conn_window));
        t.send_window(u64::from(self.conn_window));
        // Datagrams carry UDP flows; 1 MiB of receive buffer per connection.
        t.datagram_receive_buffer_size(Some(1024 * 1024));
        t.datagram_send_buffer_size(DATAGRAM_SEND_BUFFER);
        let mut mtu = quinn::MtuDiscoveryConfig::default();
        mtu.upper_bound(self.max_udp_payload);
        t.mtu_discovery_config(Some(mtu));
        t.initial_mtu(self.initial_mtu);
        Ok(t)
    }
}

/// Datagrams (UDP flows' payloads) queued for sending per connection
/// before the oldest is dropped. quinn puts datagrams into each packet
/// before stream data, and its default queue is 1 MiB: a pod sending UDP
/// faster than a 2 Mbit/s uplink made every other UDP flow (DNS
/// forwarded through the tunnel among them) wait 4 s behind it, and
/// starved the streams meanwhile. 128 KiB is half a second at 2 Mbit/s
/// and still a burst of some hundred datagrams on a fast path. What it
/// drops is counted (`udp_dropped_total{reason="queue_full"}`, see
/// [`crate::udp::send_payload`]).
pub const DATAGRAM_SEND_BUFFER: usize = 128 << 10;

/// Connection IDs the relay issues: [`CID_NONCE`] random bytes and a tag
/// keyed from the relay's private key ([`CID_TAG`] bytes of an HMAC), so a
/// restarted relay, or another replica, recognises its predecessor's IDs
/// and answers them with a stateless reset.
///
/// The random part must be long: quinn's own keyed generator
/// (`HashedConnectionIdGenerator`) draws 3 random bytes, 16 million IDs, and
/// a relay that restarts under 1,000 edges issues some 5,000 new ones (a
/// handful per connection), so one edge in a few restarts found its old ID
/// reissued to another edge's new connection: its packets went to that
/// connection, failed to decrypt and were dropped, no reset came, and it
/// waited out its liveness bound (20 to 24 s instead of 8.5 s; `loadtest
/// replicas`, seen in about one run in three). With 8 random bytes a repeat
/// is out of reach. The 12-byte ID costs 4 bytes more than quinn's on every
/// packet an edge sends.
struct KeyedCids {
    key: ring::hmac::Key,
}

/// Random bytes in a relay connection ID.
const CID_NONCE: usize = 8;
/// Keyed-tag bytes in a relay connection ID: a packet with a made-up ID is
/// answered with a reset once in 2^32.
const CID_TAG: usize = 4;

impl KeyedCids {
    fn tag(&self, nonce: &[u8]) -> [u8; CID_TAG] {
        let mac = ring::hmac::sign(&self.key, nonce);
        let mut tag = [0u8; CID_TAG];
        tag.copy_from_slice(&mac.as_ref()[..CID_TAG]);
        tag
    }
}

impl quinn_proto::ConnectionIdGenerator for KeyedCids {
    fn generate_cid(&mut self) -> quinn_proto::ConnectionId {
        let mut id = [0u8; CID_NONCE + CID_TAG];
        rand::Rng::fill(&mut rand::rng(), &mut id[..CID_NONCE]);
        let tag = self.tag(&id[..CID_NONCE]);
        id[CID_NONCE..].copy_from_slice(&tag);
        quinn_proto::ConnectionId::new(&id)
    }

    fn validate(&self, cid: &quinn_proto::ConnectionId) -> Result<(), quinn_proto::InvalidCid> {
        if cid.len() != CID_NONCE + CID_TAG {
            return Err(quinn_proto::InvalidCid);
        }
        let (nonce, tag) = cid.split_at(CID_NONCE);
        if self.tag(nonce)[..] == tag[..] {
            Ok(())
        } else {
            Err(quinn_proto::InvalidCid)
        }
    }

    fn cid_len(&self) -> usize {
        CID_NONCE + CID_TAG
    }

    fn cid_lifetime(&self) -> Option<Duration> {
        None
    }
}

/// Endpoint keys that survive a relay restart. quinn draws the
/// stateless-reset key and the connection-ID key at random per process, so
/// a restarted relay drops its predecessor's packets as invalid and the
/// edges learn of the restart only when their idle timeout expires (20 s
/// and more, measured in `lab/tests/faults.rs`). Derived from the relay's
/// private key instead, the new process recognises the old connection IDs
/// and answers with stateless resets the edges accept: they reconnect at
/// once. Replicas sharing a key share these too, which is what lets any
/// replica reset a connection meant for another.
fn restart_safe_endpoint(tls: &TlsMaterial) -> quinn::EndpointConfig {
    let derive = |label: &[u8]| {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        ctx.update(b"edge-relay endpoint key/");
        ctx.update(label);
        ctx.update(tls.key.secret_der());
        ctx.finish()
    };
    let reset = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, derive(b"stateless-reset").as_ref());
    let cid = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, derive(b"connection-id").as_ref());
    let mut e = quinn::EndpointConfig::new(Arc::new(reset));
    e.cid_generator(move || Box::new(KeyedCids { key: cid.clone() }));
    // quinn sends at most one stateless reset per 20 ms by default, for the
    // whole endpoint, and packets read in one batch share a timestamp, so
    // even a short interval answers one packet per batch. After a crash,
    // 1,000 edges that each need one took 24 s to be told (`loadtest
    // replicas`), and the last ones found out by their own liveness bound;
    // 150 connections pinging at once, 3.6 s with one per 100 µs
    // (`tests/restart_resets.rs`; 5 ms without a limit). The limit guards
    // against floods of garbage; here only packets whose connection ID
    // carries our keyed tag get a reset (a made-up one passes once in 2^32,
    // see `KeyedCids`), each reset is smaller than the packet that caused
    // it, and it costs two HMACs (tag and token) beside the packet's own
    // processing: no limit.
    e.min_reset_interval(MIN_RESET_INTERVAL);
    e
}

/// The shortest interval between two stateless resets the relay sends:
/// none (see `restart_safe_endpoint`).
const MIN_RESET_INTERVAL: Duration = Duration::ZERO;

/// A relay endpoint bound to `addr`, requiring client certificates.
pub fn server_endpoint(
    addr: SocketAddr,
    tls: &TlsMaterial,
    tuning: &QuicTuning,
    bootstrap: bool,
) -> Result<quinn::Endpoint, std::io::Error> {
    let rustls = relay_server_tls(tls, bootstrap).map_err(std::io::Error::other)?;
    server_endpoint_with(addr, rustls, tls, tuning)
}

/// [`server_endpoint`] with a given TLS server config (the relay's
/// reloadable one, see [`crate::reload`]); `tls` only seeds the endpoint's
/// stateless-reset and connection-id keys, which must survive restarts and
/// reloads alike.
pub fn server_endpoint_with(
    addr: SocketAddr,
    rustls: rustls::ServerConfig,
    tls: &TlsMaterial,
    tuning: &QuicTuning,
) -> Result<quinn::Endpoint, std::io::Error> {
    let crypto = QuicServerConfig::try_from(rustls).map_err(std::io::Error::other)?;
    // Tells a refused client certificate to the accept loop that asked
    // (`reload::refused`); otherwise quinn's own.
    let crypto = crate::reload::refused::RefusalAwareQuic::new(crypto);
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    // `tuning.max_bidi_streams` is what edges may open (see
    // `QuicTuning::relay_default`). The relay's QUIC keep-alive is only
    // a backstop, at half its idle timeout: the edge, behind its NAT, is
    // the side that keeps the binding warm (every keep-alive), and a relay
    // timer at the same interval, reset by the edge's PING, would fire
    // just before the edge's next one and take over the exchange, so that
    // a path dead only upstream would still deliver the relay's PINGs to
    // the edge. The backstop keeps a session whose edge pings less often
    // than the relay's idle timeout allows (configs that differ).
    let backstop = (tuning.idle_timeout / 2).max(Duration::from_millis(100));
    cfg.transport_config(Arc::new(
        tuning.transport(backstop).map_err(std::io::Error::other)?,
    ));
    // Address validation costs a round trip per handshake; relays face a
    // known population of edges and we prefer fast reconnect storms.
    cfg.migration(true);
    let sock = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    size_socket_buffers(&sock);
    crate::listen::dual_stack(socket2::SockRef::from(&sock), addr)?;
    sock.bind(&addr.into())?;
    let sock: std::net::UdpSocket = sock.into();
    crate::splice::set_idle_timeout(tuning.stream_idle_timeout);
    crate::stall::configure(tuning.conn_window, tuning.stream_window);
    let runtime = crate::quic_runtime::Batching::tokio()
        .ok_or_else(|| std::io::Error::other("no async runtime"))?;
    let endpoint = tuning.endpoint_config(restart_safe_endpoint(tls))?;
    quinn::Endpoint::new(endpoint, Some(cfg), sock, runtime)
}

/// The relay's TLS server config for edges: the tunnel's ALPN, plus the
/// certificate bootstrap's (where clients present no certificate yet) when
/// `bootstrap` is on. Shared by the QUIC endpoint and the TCP fallback.
pub fn relay_server_tls(
    tls: &TlsMaterial,
    bootstrap: bool,
) -> Result<rustls::ServerConfig, crate::TlsError> {
    let state = crate::reload::ReloadableServerTls::new(tls, &[], bootstrap)?;
    relay_server_tls_with(&state, bootstrap)
}

/// [`relay_server_tls`] resolving certificates and verifying clients
/// through `state`, so that replacing them there reaches every listener.
pub fn relay_server_tls_with(
    state: &Arc<crate::reload::ReloadableServerTls>,
    bootstrap: bool,
) -> Result<rustls::ServerConfig, crate::TlsError> {
    if bootstrap {
        state.server_config(&[
            relay_protocol::ALPN,
            relay_protocol::bootstrap::BOOTSTRAP_ALPN,
        ])
    } else {
        state.server_config(&[relay_protocol::ALPN])
    }
}

/// A client (edge) endpoint: bound to an ephemeral port, never listening.
/// A non-zero `mark` tags its UDP socket so capture rules let it pass.
pub fn client_endpoint(
    bind: SocketAddr,
    tls: &TlsMaterial,
    tuning: &QuicTuning,
    mark: u32,
) -> Result<quinn::Endpoint, std::io::Error> {
    let rustls = tls
        .client_config(relay_protocol::ALPN)
        .map_err(std::io::Error::other)?;
    client_endpoint_with(bind, rustls, tuning, mark)
}

/// [`client_endpoint`] with a given TLS client config (the certificate
/// bootstrap's, without a client certificate).
pub fn client_endpoint_with(
    bind: SocketAddr,
    rustls: rustls::ClientConfig,
    tuning: &QuicTuning,
    mark: u32,
) -> Result<quinn::Endpoint, std::io::Error> {
    let crypto = QuicClientConfig::try_from(rustls).map_err(std::io::Error::other)?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(crypto));
    cfg.transport_config(Arc::new(
        tuning
            .transport(tuning.keepalive)
            .map_err(std::io::Error::other)?,
    ));
    let sock = socket2::Socket::new(
        socket2::Domain::for_address(bind),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    crate::capture::mark_socket(socket2::SockRef::from(&sock), mark)?;
    size_socket_buffers(&sock);
    sock.bind(&bind.into())?;
    crate::splice::set_idle_timeout(tuning.stream_idle_timeout);
    crate::stall::configure(tuning.conn_window, tuning.stream_window);
    let runtime = crate::quic_runtime::Batching::tokio()
        .ok_or_else(|| std::io::Error::other("no async runtime"))?;
    let mut ep = quinn::Endpoint::new(
        tuning.endpoint_config(quinn::EndpointConfig::default())?,
        None,
        sock.into(),
        runtime,
    )?;
    ep.set_default_client_config(cfg);
    Ok(ep)
}

/// The `[quic]` section of either side's config file.
#[derive(Debug, Default, serde::Deserialize)]
pub struct QuicFile {
    /// Keep-alive interval (default 8s; keep well under 30s for CGNAT).
    #[serde(default, with = "humantime_serde")]
    pub keepalive: Option<Duration>,
    /// Idle timeout (default 24s): a silent peer is dead after this.
    #[serde(default, with = "humantime_serde")]
    pub idle_timeout: Option<Duration>,
    /// Concurrent streams the peer may open (default 10000).
    pub max_streams: Option<u32>,
    /// Per-stream receive window in bytes (default 1 MiB, at least 16 KiB).
    pub stream_window: Option<u32>,
    /// Upper bound of path MTU discovery, UDP payload bytes (default 1452;
    /// 1200 to 65527).
    pub max_udp_payload: Option<u16>,
    /// Starting packet size (default 1200); only for paths known to carry
    /// it. At most `max_udp_payload`.
    pub initial_mtu: Option<u16>,
    /// Connection-wide window in bytes, both ways (default 8 MiB, at least
    /// `stream_window`): the memory ceiling of one session's streams.
    pub conn_window: Option<u32>,
    /// A tunnelled connection idle (no byte either way) this long is reset
    /// (default 4h, at least 1s).
    #[serde(default, with = "humantime_serde")]
    pub stream_idle_timeout: Option<Duration>,
}

impl QuicFile {
    /// Applies defaults and checks the values; errors are
    /// `(field, message)` with the field relative to `[quic]`.
    pub fn resolve(&self, d: QuicTuning) -> Result<QuicTuning, (&'static str, String)> {
        let t = QuicTuning {
            keepalive: self.keepalive.unwrap_or(d.keepalive),
            idle_timeout: self.idle_timeout.unwrap_or(d.idle_timeout),
            max_bidi_streams: self.max_streams.unwrap_or(d.max_bidi_streams),
            stream_window: self.stream_window.unwrap_or(d.stream_window),
            max_udp_payload: self.max_udp_payload.unwrap_or(d.max_udp_payload),
            initial_mtu: self.initial_mtu.unwrap_or(d.initial_mtu),
            conn_window: self.conn_window.unwrap_or(d.conn_window),
            stream_idle_timeout: self.stream_idle_timeout.unwrap_or(d.stream_idle_timeout),
        };
        t.validate()?;
        Ok(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A relay's IDs validate in any process holding its key and in no
    /// other; made-up IDs do not; and IDs carry 8 random bytes, so two
    /// lives of a relay never hand out the same one in practice (with
    /// quinn's 3 bytes, 20,000 IDs drawn twice met each other).
    #[test]
    fn keyed_cids_validate_across_lives_and_do_not_repeat() {
        use quinn_proto::ConnectionIdGenerator;
        let key = |k: &[u8]| ring::hmac::Key::new(ring::hmac::HMAC_SHA256, k);
        let mut first = KeyedCids {
            key: key(b"relay key"),
        };
        let second = KeyedCids {
            key: key(b"relay key"),
        };
        let stranger = KeyedCids {
            key: key(b"another relay"),
        };
        let mut seen = std::collections::HashSet::new();
        for _ in 0..20_000 {
            let id = first.generate_cid();
            assert_eq!(id.len(), 12);
            assert!(second.validate(&id).is_ok(), "a restarted relay knows it");
            assert!(stranger.validate(&id).is_err());
            assert!(seen.insert(id), "an ID repeated");
        }
        let mut mine = 0;
        for _ in 0..20_000 {
            let made_up: [u8; 12] = rand::random();
            mine += usize::from(
                second
                    .validate(&quinn_proto::ConnectionId::new(&made_up))
                    .is_ok(),
            );
        }
        assert_eq!(mine, 0, "made-up IDs passed as ours");
        assert!(second
            .validate(&quinn_proto::ConnectionId::new(&[1, 2, 3, 4, 5, 6, 7, 8]))
            .is_err());
        // quinn's own generator, for contrast: its 3 random bytes repeat.
        let mut hashed = quinn_proto::HashedConnectionIdGenerator::from_key(7);
        let mut ids = std::collections::HashSet::new();
        let repeats = (0..20_000)
            .filter(|_| !ids.insert(hashed.generate_cid()))
            .count();
        assert!(repeats > 0, "expected repeats among 20,000 of quinn's IDs");
    }

    #[test]
    fn quic_file_defaults_and_validation() {
        let t = QuicFile::default().resolve(QuicTuning::default()).unwrap();
        assert!(
            t.keepalive < Duration::from_secs(30),
            "keep-alive must beat CGNAT timeouts"
        );
        let bad = QuicFile {
            keepalive: Some(Duration::from_secs(30)),
            idle_timeout: Some(Duration::from_secs(20)),
            ..Default::default()
        };
        assert_eq!(
            bad.resolve(QuicTuning::default()).unwrap_err().0,
            "keepalive"
        );
        let bad = QuicFile {
            stream_window: Some(10),
            ..Default::default()
        };
        assert_eq!(
            bad.resolve(QuicTuning::default()).unwrap_err().0,
            "stream_window"
        );
        let bad = QuicFile {
            conn_window: Some(64 * 1024),
            ..Default::default()
        };
        assert_eq!(
            bad.resolve(QuicTuning::default()).unwrap_err().0,
            "conn_window"
        );
        let ok = QuicFile {
            conn_window: Some(16 << 20),
            ..Default::default()
        };
        assert_eq!(
            ok.resolve(QuicTuning::default()).unwrap().conn_window,
            16 << 20
        );
    }

    /// The connection windows are bounded (quinn's default is 2^62) and
    /// the endpoint asks for big socket buffers.
    #[tokio::test]
    async fn windows_bounded_and_buffers_sized() {
        let t = QuicTuning::default();
        assert!(t.conn_window >= t.stream_window);
        assert!(u64::from(t.conn_window) <= 64 << 20);
        t.transport(t.keepalive).unwrap();
        let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None).unwrap();
        size_socket_buffers(&sock);
        // Granted up to net.core.rmem_max; never less than the default.
        assert!(sock.recv_buffer_size().unwrap() >= 208 * 1024);
    }
}
