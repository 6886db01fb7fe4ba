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
    /// carrier-grade NATs, so the binding never expires while idle.
    pub keepalive: Duration,
    /// A peer silent for this long is considered dead.
    pub idle_timeout: Duration,
    /// Concurrent bidirectional streams the *peer* may open towards us.
    pub max_bidi_streams: u32,
    /// Per-stream receive window: what one stalled stream can buffer. This
    /// is the per-stream flow control that keeps one slow reader from
    /// stalling the others.
    pub stream_window: u32,
}

impl Default for QuicTuning {
    fn default() -> Self {
        QuicTuning {
            keepalive: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(20),
            max_bidi_streams: 10_000,
            stream_window: 1024 * 1024,
        }
    }
}

impl QuicTuning {
    fn transport(&self) -> Result<TransportConfig, TlsError> {
        let mut t = TransportConfig::default();
        t.keep_alive_interval(Some(self.keepalive));
        t.max_idle_timeout(Some(
            IdleTimeout::try_from(self.idle_timeout)
                .map_err(|_| TlsError::Verifier("idle timeout out of range".into()))?,
        ));
        t.max_concurrent_bidi_streams(VarInt::from_u32(self.max_bidi_streams));
        // Unidirectional streams are not used by the protocol.
        t.max_concurrent_uni_streams(VarInt::from_u32(0));
        t.stream_receive_window(VarInt::from_u32(self.stream_window));
        // Datagrams carry UDP flows; 1 MiB of receive buffer per connection.
        t.datagram_receive_buffer_size(Some(1024 * 1024));
        Ok(t)
    }
}

/// Most bidirectional streams an edge may have open towards the relay at
/// once (its control stream, and streams to cloud ranges; more wait for
/// credit). quinn preallocates ~90 bytes of state per stream the peer may
/// open, per connection, so this is relay memory per idle session.
const EDGE_OPENED_STREAMS: u32 = 256;

/// A relay endpoint bound to `addr`, requiring client certificates.
pub fn server_endpoint(
    addr: SocketAddr,
    tls: &TlsMaterial,
    tuning: &QuicTuning,
) -> Result<quinn::Endpoint, std::io::Error> {
    let rustls = tls
        .server_config(relay_protocol::ALPN)
        .map_err(std::io::Error::other)?;
    let crypto = QuicServerConfig::try_from(rustls).map_err(std::io::Error::other)?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let mut transport = tuning.transport().map_err(std::io::Error::other)?;
    // The relay opens most streams (bounded by the *edge's* limit). quinn
    // preallocates state for every stream the peer may open, so granting
    // edges 10,000 cost ~900 KiB of relay memory per idle session
    // (loadtest `sessions`).
    transport.max_concurrent_bidi_streams(VarInt::from_u32(
        tuning.max_bidi_streams.min(EDGE_OPENED_STREAMS),
    ));
    cfg.transport_config(Arc::new(transport));
    // Address validation costs a round trip per handshake; relays face a
    // known population of edges and we prefer fast reconnect storms.
    cfg.migration(true);
    quinn::Endpoint::server(cfg, addr)
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
    let crypto = QuicClientConfig::try_from(rustls).map_err(std::io::Error::other)?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(crypto));
    cfg.transport_config(Arc::new(tuning.transport().map_err(std::io::Error::other)?));
    let sock = socket2::Socket::new(
        socket2::Domain::for_address(bind),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    crate::capture::mark_socket(socket2::SockRef::from(&sock), mark)?;
    sock.bind(&bind.into())?;
    let runtime =
        quinn::default_runtime().ok_or_else(|| std::io::Error::other("no async runtime"))?;
    let mut ep =
        quinn::Endpoint::new(quinn::EndpointConfig::default(), None, sock.into(), runtime)?;
    ep.set_default_client_config(cfg);
    Ok(ep)
}

/// The `[quic]` section of either side's config file.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuicFile {
    /// Keep-alive interval (default 5s; keep well under 30s for CGNAT).
    #[serde(default, with = "humantime_serde")]
    pub keepalive: Option<Duration>,
    /// Idle timeout (default 20s): a silent peer is dead after this.
    #[serde(default, with = "humantime_serde")]
    pub idle_timeout: Option<Duration>,
    /// Concurrent streams the peer may open (default 10000).
    pub max_streams: Option<u32>,
    /// Per-stream receive window in bytes (default 1 MiB, at least 16 KiB).
    pub stream_window: Option<u32>,
}

impl QuicFile {
    /// Applies defaults and checks the values; errors are
    /// `(field, message)` with the field relative to `[quic]`.
    pub fn resolve(&self) -> Result<QuicTuning, (&'static str, String)> {
        let d = QuicTuning::default();
        let t = QuicTuning {
            keepalive: self.keepalive.unwrap_or(d.keepalive),
            idle_timeout: self.idle_timeout.unwrap_or(d.idle_timeout),
            max_bidi_streams: self.max_streams.unwrap_or(d.max_bidi_streams),
            stream_window: self.stream_window.unwrap_or(d.stream_window),
        };
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
        Ok(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quic_file_defaults_and_validation() {
        let t = QuicFile::default().resolve().unwrap();
        assert!(
            t.keepalive < Duration::from_secs(30),
            "keep-alive must beat CGNAT timeouts"
        );
        let bad = QuicFile {
            keepalive: Some(Duration::from_secs(30)),
            idle_timeout: Some(Duration::from_secs(20)),
            ..Default::default()
        };
        assert_eq!(bad.resolve().unwrap_err().0, "keepalive");
        let bad = QuicFile {
            stream_window: Some(10),
            ..Default::default()
        };
        assert_eq!(bad.resolve().unwrap_err().0, "stream_window");
    }
}
