//! Dialling the relay: the transport a mode asks for (QUIC, or TLS over
//! TCP as the fallback), the TLS identity to present, and the hello
//! exchange that turns a connection into a registered session.

use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;

use relay_protocol::codec::{self, decode, decode_with_rest, read_frame_bytes, write_frame};
use relay_protocol::{
    capability, close_code, ClientHello, HelloReply, Rejection, ServerHelloExt, PROTOCOL_VERSION,
};
use relay_transport::{quic, BiStream, TunnelConn};
use tracing::warn;

use crate::client::EdgeStats;
use crate::config::{EdgeConfig, TransportMode};
use crate::identity::{clock_hint, Credentials, IdentityError};

/// Why an attempt ended without a session.
#[derive(Debug)]
pub(crate) enum AttemptError {
    Rejected(Rejection),
    Failed(String),
}

/// An established, registered session.
pub(crate) struct Connected {
    /// The QUIC endpoint (none on the TCP fallback).
    pub(crate) endpoint: Option<quinn::Endpoint>,
    pub(crate) conn: TunnelConn,
    pub(crate) hello: relay_protocol::ServerHello,
    /// What the relay says we serve (relays that decide claims).
    pub(crate) ext: Option<ServerHelloExt>,
    pub(crate) control: BiStream,
}

pub(crate) fn failed(what: &str, e: &dyn std::fmt::Display) -> AttemptError {
    AttemptError::Failed(format!("{what}: {e}"))
}

/// Dials the relay over the transport a mode asks for (in `Auto`: QUIC,
/// falling back to TLS over TCP when QUIC cannot complete a handshake
/// within `quic_fallback_after`), with a given TLS client config: the
/// tunnel's (node certificate) or the certificate bootstrap's (none).
pub(crate) struct Dialer<'a> {
    pub(crate) cfg: &'a EdgeConfig,
    pub(crate) stats: &'a EdgeStats,
    pub(crate) mode: TransportMode,
}

impl Dialer<'_> {
    /// A connection to the relay (no hello yet), and its QUIC endpoint.
    pub(crate) async fn dial(
        &self,
        tls: rustls::ClientConfig,
    ) -> Result<(Option<quinn::Endpoint>, TunnelConn), String> {
        let cfg = self.cfg;
        let addr: SocketAddr = tokio::net::lookup_host(&cfg.relay)
            .await
            .map_err(|e| format!("resolve {}: {e}", cfg.relay))?
            .next()
            .ok_or_else(|| format!("resolve {}: no address", cfg.relay))?;
        let mark = cfg.capture.as_ref().map(|c| c.own_mark).unwrap_or(0);
        let tcp = |tls: rustls::ClientConfig| async move {
            relay_transport::tcp::connect_with(
                addr,
                &cfg.server_name,
                tls,
                mark,
                cfg.handshake_timeout,
            )
            .await
            .map_err(|e| e.0)
        };
        match self.mode {
            TransportMode::Quic => {
                let (ep, c) = quic_transport(cfg, addr, mark, tls).await?;
                Ok((Some(ep), c))
            }
            TransportMode::Tcp => Ok((None, tcp(tls).await?)),
            TransportMode::Auto => {
                let quic = quic_transport(cfg, addr, mark, tls.clone());
                match tokio::time::timeout(cfg.quic_fallback_after, quic).await {
                    Ok(Ok((ep, c))) => Ok((Some(ep), c)),
                    quic => {
                        let why = match quic {
                            Ok(Err(e)) => e,
                            _ => format!("no QUIC handshake within {:?}", cfg.quic_fallback_after),
                        };
                        self.stats.fallbacks.fetch_add(1, Relaxed);
                        warn!(reason = %why, "QUIC unavailable; falling back to TLS over TCP");
                        Ok((None, tcp(tls).await?))
                    }
                }
            }
        }
    }
}

/// A QUIC connection to `addr` (no hello yet).
async fn quic_transport(
    cfg: &EdgeConfig,
    addr: SocketAddr,
    mark: u32,
    tls: rustls::ClientConfig,
) -> Result<(quinn::Endpoint, TunnelConn), String> {
    // A fresh endpoint per attempt: matches the relay's address family and
    // starts from a new source port if the old NAT binding went bad.
    let bind: SocketAddr = if addr.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        ([0u16; 8], 0).into()
    };
    let endpoint = quic::client_endpoint_with(bind, tls, &cfg.quic, mark)
        .map_err(|e| format!("endpoint: {e}"))?;
    let connecting = endpoint
        .connect(addr, &cfg.server_name)
        .map_err(|e| format!("connect {addr}: {e}"))?;
    let conn = connecting
        .await
        .map_err(|e| clock_hint(&format!("QUIC/TLS to {addr}: {e}")))?;
    Ok((endpoint, TunnelConn::Quic(conn)))
}

/// Obtains the certificate to dial with (bootstrapping or renewing it
/// first when needed), dials the relay over the transport `mode` asks for,
/// then says hello.
pub(crate) async fn connect(
    cfg: &EdgeConfig,
    stats: &EdgeStats,
    mode: TransportMode,
    creds: &Credentials,
) -> Result<Connected, AttemptError> {
    let dialer = Dialer { cfg, stats, mode };
    let material = creds.material(cfg, &dialer).await.map_err(|e| match e {
        IdentityError::Refused(r) => AttemptError::Rejected(r),
        IdentityError::Failed(m) => AttemptError::Failed(m),
    })?;
    let tls = material
        .client_config(relay_protocol::ALPN)
        .map_err(|e| failed("tls config", &e))?;
    let (endpoint, conn) = dialer.dial(tls).await.map_err(AttemptError::Failed)?;
    let (hello, ext, control) = say_hello(cfg, stats, &conn).await?;
    Ok(Connected {
        endpoint,
        conn,
        hello,
        ext,
        control,
    })
}

async fn say_hello(
    cfg: &EdgeConfig,
    stats: &EdgeStats,
    conn: &TunnelConn,
) -> Result<
    (
        relay_protocol::ServerHello,
        Option<ServerHelloExt>,
        BiStream,
    ),
    AttemptError,
> {
    let mut control = conn
        .open_bi()
        .await
        .map_err(|e| failed("open control stream", &e))?;
    // Pings, pongs and route updates must not wait behind bulk uploads in
    // our own send buffers (they would look like a dead path).
    control
        .send
        .set_priority(relay_transport::conn::CONTROL_PRIORITY);
    let hello = ClientHello {
        version: PROTOCOL_VERSION,
        node: cfg.node.clone(),
        routes: cfg.routes.clone(),
        primary_addr: cfg.primary_addr,
        capabilities: crate::dns::capabilities(cfg.dns.is_some()),
        agent: concat!("edge-client/", env!("CARGO_PKG_VERSION")).to_string(),
        fallbacks: stats.fallbacks.load(Relaxed).min(u32::MAX as u64) as u32,
    };
    write_frame(&mut control.send, &hello)
        .await
        .map_err(|e| failed("send hello", &e))?;
    let body = read_frame_bytes(&mut control.recv, codec::MAX_FRAME_LEN)
        .await
        .map_err(|e| failed("read hello reply", &e))?;
    let (reply, rest) =
        decode_with_rest::<HelloReply>(&body).map_err(|e| failed("read hello reply", &e))?;
    match reply {
        HelloReply::Accepted(h) => {
            // Only a relay that knows the capability appends what we serve.
            let ext = if h.capabilities & capability::SERVED_ROUTES != 0 && !rest.is_empty() {
                Some(
                    decode::<ServerHelloExt>(rest)
                        .map_err(|e| failed("read hello extension", &e))?,
                )
            } else {
                None
            };
            Ok((h, ext, control))
        }
        HelloReply::Rejected(r) => {
            conn.close(close_code::NORMAL, "rejected");
            Err(AttemptError::Rejected(r))
        }
    }
}
