//! Transport layer shared by `relay-server` and `edge-client`.
//!
//! The session layer above this crate sees only [`TunnelConn`] and
//! [`BiStream`]; which transport carries them (QUIC today, TLS over TCP
//! with yamux as the fallback) is decided here.
//!
//! Modules:
//! - [`tls`]: PEM loading, rustls client/server configs (mutual TLS, one
//!   crypto provider: ring), checking a peer certificate against a node name.
//! - [`quic`]: quinn endpoints with relay-tuned transport settings.
//! - [`conn`]: [`TunnelConn`] and [`BiStream`], the transport-neutral
//!   connection and stream types, with reset/stop.
//! - [`mod@splice`]: copies a TCP connection and a tunnel stream both ways with
//!   half-close and reset carried across, metering bytes as they pass.
//! - [`devcerts`]: a development PKI (CA, relay and node certificates).
//! - [`fd_limit`]: the open-file soft limit raised to the hard one at start.
//! - [`issue`]: node certificates the relay issues (certificate bootstrap).
//! - [`udp`]: UDP flows over datagrams; the capture side of UDP.
//! - [`tcp`]: the TLS+TCP+yamux fallback transport.
//! - [`capture`]: kernel capture of traffic (nftables redirect + policy routing)
//!   of the prefixes to send through the tunnel, from allowed sources.
//! - [`capture_config`]: what capture installs and its config file section.
//! - [`conntrack`]: original destinations of redirected TCP and UDP.
//! - [`http`]: serving a small HTTP API with bounded request heads.
//! - [`reload`]: server TLS (certificate, client CA, CRLs) replaced while
//!   running, for new handshakes only.
//! - [`log_sample`]: failure lines logged at most once per call site per
//!   10 s, with the count of the ones left out ([`sampled!`]).
//! - [`saved`]: tables kept on disk across restarts (JSON with a format
//!   version, written atomically, at most once a second).
//! - [`node_addrs`]: this node's own IPv4 addresses (not kube-proxy's
//!   ClusterIPs), for node-port capture and the route agent.
//! - [`stall`]: a QUIC stream whose local reader stopped holds its data on
//!   top of the connection's receive window, not out of it.
//! - [`listen`]: listening sockets bound from configuration, taking IPv4
//!   as well on `[::]` whatever `net.ipv6.bindv6only` says.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod addr;
pub mod capture;
pub mod capture_config;
mod clock_skew;
pub mod config_file;
pub mod conn;
pub mod conntrack;
pub mod devcerts;
pub mod fd_limit;
pub mod grant;
pub mod http;
pub mod issue;
pub mod listen;
pub mod log_sample;
pub mod memory;
pub mod node_addrs;
pub mod proxy;
pub mod quic;
mod quic_runtime;
pub mod reload;
pub mod saved;
pub mod splice;
mod splice_local;
pub mod stall;
pub mod tcp;
// The namespace set-up shared with relay-server's tests.
#[cfg(any(test, feature = "test-netns"))]
#[doc(hidden)]
pub mod test_netns;
// The log capture shared with relay-server's and relay-kube's tests (and
// this crate's).
#[cfg(any(test, feature = "test-log"))]
#[doc(hidden)]
pub mod test_log;
pub mod tls;
pub mod udp;
mod udp_capture;

pub use conn::{BiStream, DatagramRefused, RecvHalf, SendHalf, TransportKind, TunnelConn};
pub use quic::{QuicFile, QuicTuning};
pub use splice::{splice, splice_tunnels, Direction, Meter, SpliceOutcome};
pub use tls::{TlsError, TlsMaterial};
