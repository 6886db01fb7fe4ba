//! The edge side of the edge relay.
//!
//! Runs on each edge node (DaemonSet or systemd). Dials out to the relay
//! over QUIC with the node's client certificate, registers the prefixes it
//! serves, and serves the streams the relay opens: read the header, check
//! the target is inside what this node advertised, dial it (bounded),
//! answer, splice. Nothing here listens on the network but the optional
//! status endpoint (loopback unless configured otherwise).
//!
//! Modules:
//! - [`config`]: TOML file config and the runtime [`EdgeConfig`].
//! - [`client`]: [`EdgeClient`], the reconnect loop and the session.
//! - `supervisor`: one session per relay replica when the relay
//!   advertises a replica set (else the one session, as before).
//! - [`serve`]: serving the relay's streams within what this edge serves.
//! - [`services`]: the ClusterIP table the relay sends: what capture takes
//!   ahead of kube-proxy, and local endpoints preferred.
//! - `identity`: the node certificate: given, or obtained from the relay
//!   with a service-account token and renewed.
//! - `subnets`: the node's connected LANs, which capture never takes
//!   (sites reuse LAN ranges; a neighbour is reached on-link).
//! - [`backoff`]: capped exponential backoff with full jitter.
//! - [`liveness`]: the control-stream ping check and its dead-path bound.
//! - `status`: the status endpoint (`/healthz`, `/readyz`, `/metrics`)
//!   when `status_listen` is set.
//! - [`dns`]: the node-local resolver: cluster names answered at the edge
//!   (also while the cloud is away), the rest forwarded.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod backoff;
mod capture;
mod capture_state;
pub mod client;
pub mod config;
mod dial;
pub mod dns;
mod identity;
pub mod liveness;
mod nat64;
pub mod probe;
mod relay_addrs;
pub mod serve;
pub mod services;
mod session;
mod status;
mod subnets;
mod supervisor;
#[cfg(test)]
mod test_resolver;

pub use client::{CaptureReport, EdgeClient, EdgeState, EdgeStats, StartError};
pub use config::{EdgeConfig, FileConfig, TransportMode};
