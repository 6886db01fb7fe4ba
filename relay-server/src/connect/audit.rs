//! The audit line of a CONNECT connection ([`Audit`]) and what it says
//! about the client: where it came from ([`Peer`]) and who it proved to be
//! ([`Client`], from a TLS certificate or Unix credentials). Separate from
//! the serving path, which only fills the record in.

use std::net::SocketAddr;

use tracing::info;

/// The audit record of one CONNECT connection, emitted exactly once when
/// dropped (so every exit path, early refusals and panics included, leaves
/// its line): target `audit`, level info, message `connect`, with fields
/// `client` (who: `cert:<subject>` for TLS client certificates,
/// `unix:uid=..,gid=..,pid=..` for the Unix socket, `addr:<ip:port>` for
/// plain TCP), `peer`, `target` (the authority as requested), `node` and
/// `dst` (where it went, once resolved), `code` (HTTP status; 0 when none
/// was sent), `outcome` (`ok` or the failure's label), `bytes_up` (client
/// → target), `bytes_down`, `duration_ms`.
#[derive(Debug)]
pub struct Audit {
    client: Client,
    peer: Peer,
    pub(super) target: String,
    pub(super) node: String,
    pub(super) dst: Option<SocketAddr>,
    code: u16,
    pub(super) outcome: &'static str,
    bytes_up: u64,
    bytes_down: u64,
    started: std::time::Instant,
}

/// Where a CONNECT client came from: kept as is and formatted only when a
/// line that names it is written (the audit line is at info; formatting
/// every peer up front cost each connection its share of the relay's CPU).
#[derive(Debug, Clone, Copy)]
pub(super) enum Peer {
    /// A TCP client (plain or TLS).
    Tcp(SocketAddr),
    /// A client of the Unix socket.
    Unix,
}

impl Peer {
    /// The client's address, as the stream's source.
    pub(super) fn addr(self) -> Option<SocketAddr> {
        match self {
            Peer::Tcp(a) => Some(a),
            Peer::Unix => None,
        }
    }
}

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Peer::Tcp(a) => a.fmt(f),
            Peer::Unix => f.write_str("unix"),
        }
    }
}

/// Who a CONNECT client is, as its audit line names it.
#[derive(Debug)]
pub(super) enum Client {
    /// Known by its address only (plain TCP): `addr:<ip:port>`.
    Addr(Peer),
    /// Proved an identity (a TLS certificate, Unix credentials), already
    /// written out (`cert:...`, `unix:...`).
    Named(String),
}

impl std::fmt::Display for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Client::Addr(p) => write!(f, "addr:{p}"),
            Client::Named(n) => f.write_str(n),
        }
    }
}

/// An address the audit line shows, or nothing before it is known.
struct Shown(Option<SocketAddr>);

impl std::fmt::Display for Shown {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(a) => a.fmt(f),
            None => Ok(()),
        }
    }
}

impl Audit {
    pub(super) fn new(client: Client, peer: Peer) -> Self {
        Audit {
            client,
            peer,
            target: String::new(),
            node: String::new(),
            dst: None,
            code: 0,
            outcome: "no_request",
            bytes_up: 0,
            bytes_down: 0,
            started: std::time::Instant::now(),
        }
    }

    /// Records the status sent and its label.
    pub(super) fn answer(&mut self, code: u16, outcome: &'static str) {
        self.code = code;
        self.outcome = outcome;
    }

    /// Records the end of the splice: bytes each way, and whether either
    /// side reset (outcome `reset` rather than `ok`).
    pub(super) fn spliced(&mut self, up: u64, down: u64, reset: bool) {
        self.bytes_up = up;
        self.bytes_down = down;
        if reset {
            self.outcome = "reset";
        }
    }
}

impl Drop for Audit {
    fn drop(&mut self) {
        info!(
            target: "audit",
            client = %self.client,
            peer = %self.peer,
            target = %self.target,
            node = %self.node,
            dst = %Shown(self.dst),
            code = self.code,
            outcome = self.outcome,
            bytes_up = self.bytes_up,
            bytes_down = self.bytes_down,
            duration_ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX),
            "connect"
        );
    }
}

/// The identity a TLS client proved: its leaf certificate's subject.
pub(super) fn tls_identity(certs: Option<&[rustls::pki_types::CertificateDer<'_>]>) -> Client {
    let Some(leaf) = certs.and_then(|c| c.first()) else {
        return Client::Named("cert:none".to_string());
    };
    Client::Named(match x509_parser::parse_x509_certificate(leaf.as_ref()) {
        Ok((_, cert)) => format!("cert:{}", cert.subject()),
        // Verified by rustls already, so not expected; still say so.
        Err(_) => "cert:unparsable".to_string(),
    })
}

/// The identity of a Unix-socket client: its kernel-reported credentials.
pub(super) fn unix_identity(s: &tokio::net::UnixStream) -> Client {
    Client::Named(match s.peer_cred() {
        Ok(c) => format!(
            "unix:uid={},gid={},pid={}",
            c.uid(),
            c.gid(),
            c.pid().map_or_else(|| "?".to_string(), |p| p.to_string())
        ),
        Err(_) => "unix:unknown".to_string(),
    })
}
