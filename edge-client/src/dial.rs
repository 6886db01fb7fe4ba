//! Dialling the relay: the transport a mode asks for (QUIC, or TLS over
//! TCP as the fallback), the TLS identity to present, and the hello
//! exchange that turns a connection into a registered session.
//!
//! The dial itself lives by concern in submodules: `addrs` (which of the
//! relay's addresses to dial, and whose turn it is) and `transport` (one
//! address over QUIC or TLS over TCP, the fallback between them, the QUIC
//! probe).

use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;

use relay_protocol::codec::{self, decode, decode_with_rest, read_frame_bytes, write_frame};
use relay_protocol::{
    capability, close_code, ClientHello, HelloReply, Rejection, ServerHelloExt, PROTOCOL_VERSION,
};
use relay_transport::tcp::TcpDial;
use relay_transport::{BiStream, TunnelConn};

use crate::client::EdgeStats;
use crate::config::{EdgeConfig, TransportMode};
use crate::identity::{Credentials, IdentityError};

mod addrs;
mod transport;

use addrs::dial_order;
use transport::tcp_target;

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

/// What an attempt whose certificate the relay refused with TLS alert
/// `alert` reports (after the hello failed with `e`, a connection lost).
fn refused_certificate(alert: &str, e: &AttemptError) -> String {
    let what = match e {
        AttemptError::Failed(m) => m.as_str(),
        AttemptError::Rejected(_) => "hello refused",
    };
    let hint = match alert {
        "CertificateExpired" => {
            " (expired or not yet valid by the relay's clock: renew it, or check this node's clock)"
        }
        "CertificateRevoked" => " (revoked: on the relay's CRL)",
        "UnknownCA" => " (issued by a CA the relay does not trust)",
        "DecryptError" => {
            " (its signature is not the relay's CA's: issued by another CA of the same name?)"
        }
        _ => "",
    };
    format!("the relay refused this edge's certificate: TLS alert {alert}{hint}; {what}")
}

/// Dials the relay over the transport a mode asks for (in `Auto`: QUIC,
/// falling back to TLS over TCP when QUIC cannot complete a handshake
/// within `quic_fallback_after`), with a given TLS client config: the
/// tunnel's (node certificate) or the certificate bootstrap's (none).
pub(crate) struct Dialer<'a> {
    pub(crate) cfg: &'a EdgeConfig,
    pub(crate) stats: &'a EdgeStats,
    pub(crate) mode: TransportMode,
    /// QUIC carried this edge's last session to the relay (in `Auto`: an
    /// unanswered QUIC attempt is tried once more before falling back).
    pub(crate) quic_worked: bool,
    /// A background QUIC probe from the TCP fallback: its failures never
    /// move the relay's address turn (see [`EdgeStats::relay_addr_turns`]).
    /// On a path without UDP every probe goes unanswered, and moving the
    /// turn each time would send the next real attempt to whichever
    /// address came up, a broken one included. It walks every address,
    /// and one that answers QUIC takes the turn ([`Dialer::probe_each`]).
    pub(crate) probe: bool,
}

impl Dialer<'_> {
    /// A connection to the relay (no hello yet), and its QUIC endpoint.
    pub(crate) async fn dial(
        &self,
        tls: rustls::ClientConfig,
    ) -> Result<(Option<quinn::Endpoint>, TunnelConn), String> {
        let cfg = self.cfg;
        let looked_up = self.look_up().await;
        let proxy = cfg
            .tcp_proxy
            .as_ref()
            .filter(|_| matches!(self.mode, TransportMode::Auto | TransportMode::Tcp));
        match self.addresses(looked_up, proxy.is_some()) {
            Ok(addrs) => {
                let mark = cfg.capture.as_ref().map(|c| c.own_mark).unwrap_or(0);
                let addrs = crate::nat64::reachable(addrs, mark).await;
                let routed = |a: &SocketAddr| crate::nat64::has_route(*a, mark);
                let mut ordered = dial_order(&addrs, &cfg.node, routed);
                if ordered.is_empty() && proxy.is_some() {
                    // Through a proxy the addresses need no route of their
                    // own: the TCP fallback dials the proxy (a site whose
                    // only way out is a proxy often has no default route).
                    // Only then: quinn takes a send to an unrouted address
                    // for sent, so QUIC there costs its whole wait.
                    ordered = dial_order(&addrs, &cfg.node, |_: &SocketAddr| true);
                }
                if ordered.is_empty() && !addrs.is_empty() {
                    // The uplink is down (its routes gone with it): every
                    // address would fail at once. Not the addresses'
                    // fault, so the turn stays where it was.
                    return Err(format!(
                        "no route to any of {}'s addresses {addrs:?} (is the uplink down?)",
                        cfg.relay
                    ));
                }
                self.dial_any(&ordered, tls).await
            }
            // Behind a proxy the site's resolver may know no outside
            // names: the proxy resolves the relay's.
            Err(e) => match proxy {
                Some(proxy) => {
                    tracing::debug!(relay = %cfg.relay, error = %e, "relay name not resolved here; TCP through the proxy");
                    self.tcp(
                        TcpDial::Proxy {
                            proxy,
                            target: &tcp_target(cfg),
                        },
                        tls,
                    )
                    .await
                    .map_err(|e| e.lost.0)
                }
                None => Err(format!("resolve {}: {e}", cfg.relay)),
            },
        }
    }
}

/// Obtains the certificate to dial with (bootstrapping or renewing it
/// first when needed), dials the relay over the transport `mode` asks for
/// (`quic_worked`, `probe`: see [`Dialer`]), then says hello.
pub(crate) async fn connect(
    cfg: &EdgeConfig,
    stats: &EdgeStats,
    mode: TransportMode,
    creds: &Credentials,
    quic_worked: bool,
    probe: bool,
) -> Result<Connected, AttemptError> {
    let hello_sent = std::sync::atomic::AtomicBool::new(false);
    connect_noting(cfg, stats, mode, creds, quic_worked, probe, &hello_sent).await
}

/// [`connect`], setting `hello_sent` just before the hello is written:
/// from then on the relay may have registered the session, whatever
/// becomes of the attempt (a planned move that fails after that may have
/// had the relay drain the session it left, see
/// `session::moves::MoveDrain`); before, it cannot have.
pub(crate) async fn connect_noting(
    cfg: &EdgeConfig,
    stats: &EdgeStats,
    mode: TransportMode,
    creds: &Credentials,
    quic_worked: bool,
    probe: bool,
    hello_sent: &std::sync::atomic::AtomicBool,
) -> Result<Connected, AttemptError> {
    let dialer = Dialer {
        cfg,
        stats,
        mode,
        quic_worked,
        probe,
    };
    let material = creds.material(cfg, &dialer).await.map_err(|e| match e {
        IdentityError::Refused(r) => AttemptError::Rejected(r),
        IdentityError::Failed(m) => AttemptError::Failed(m),
    })?;
    let tls = material
        .client_config(relay_protocol::ALPN)
        .map_err(|e| failed("tls config", &e))?;
    // A certificate the relay refuses (revoked, issued by a CA it no
    // longer trusts) would be refused on every attempt until it expires:
    // a bootstrapped edge gets a new one instead. Named, whatever the
    // identity: the failure's own text is only a connection lost, which
    // reads as a network fault.
    let refused = |alert: &str, e: AttemptError| {
        if matches!(cfg.identity, crate::config::Identity::Bootstrap(_)) {
            creds.refused(&material);
        }
        AttemptError::Failed(refused_certificate(alert, &e))
    };
    let (endpoint, conn) = match dialer.dial(tls).await {
        Ok(c) => c,
        // On the TCP fallback the refusal can end the connection while it
        // is still being set up (the client writes before the server has
        // checked its certificate): the setup's error carries the alert.
        Err(e) => {
            return Err(match relay_transport::conn::certificate_alert_in(&e) {
                Some(alert) => refused(alert, AttemptError::Failed(e)),
                None => AttemptError::Failed(e),
            })
        }
    };
    let (hello, ext, control) = match say_hello(cfg, stats, &conn, hello_sent).await {
        Ok(h) => h,
        Err(e) => {
            return Err(
                match conn
                    .refused_our_certificate(std::time::Duration::from_millis(500))
                    .await
                {
                    Some(alert) => refused(alert, e),
                    None => e,
                },
            )
        }
    };
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
    hello_sent: &std::sync::atomic::AtomicBool,
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
    hello_sent.store(true, std::sync::atomic::Ordering::Release);
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

/// What the submodules' tests share.
#[cfg(test)]
mod test_support {
    use super::*;

    /// A dialer for the tests.
    pub(super) fn dialer_for<'a>(
        cfg: &'a EdgeConfig,
        stats: &'a EdgeStats,
        mode: TransportMode,
        quic_worked: bool,
        probe: bool,
    ) -> Dialer<'a> {
        Dialer {
            cfg,
            stats,
            mode,
            quic_worked,
            probe,
        }
    }

    /// An edge config for `relay` with test certificates, and the client
    /// TLS config to dial with.
    pub(super) fn test_cfg(relay: &str) -> (EdgeConfig, rustls::ClientConfig) {
        relay_transport::tls::install_default_provider();
        let pki =
            relay_transport::devcerts::DevPki::generate(&["relay.test"], &["edge-a"]).unwrap();
        let tls = pki.node_material("edge-a").unwrap();
        let client_tls = tls.client_config(relay_protocol::ALPN).unwrap();
        (
            EdgeConfig::new("edge-a", relay, "relay.test", tls),
            client_tls,
        )
    }
}
