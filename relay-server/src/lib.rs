//! The cloud side of the edge relay.
//!
//! Edges dial in over QUIC with mutual TLS and register the prefixes they
//! serve; cloud clients reach those prefixes through the HTTP CONNECT
//! ingress (what kube-apiserver's egress selector speaks), and operators
//! watch it all through the admin API.
//!
//! Modules:
//! - [`config`]: TOML file config and the runtime [`RelayConfig`].
//! - [`server`]: [`Relay::spawn`], listeners, graceful shutdown.
//! - [`session`]: handshake, per-session actor, opening streams to an edge.
//! - [`registry`]: live sessions, the longest-prefix route table and the
//!   journal of route changes.
//! - [`policy`]: the one authorisation seam every ingress asks.
//! - [`routefeed`]: what each edge is told to route through the tunnel
//!   (bounded deltas, or whole lists for older edges).
//! - [`connect`]: the HTTP CONNECT ingress.
//! - [`tunnel`]: stream paths shared by every ingress; transparent capture
//!   and streams opened by edges (edge → cloud, edge → edge).
//! - [`admin`]: the admin API (sessions, routes, health, metrics).
//! - [`metrics`]: counters and the Prometheus rendering.
//! - [`agent`]: the route agent for the other cloud nodes.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod admin;
pub mod agent;
pub mod config;
pub mod connect;
pub mod metrics;
pub mod policy;
pub mod registry;
pub mod routefeed;
pub mod server;
pub mod session;
pub mod tunnel;

pub use config::{FileConfig, Limits, RelayConfig, Secret};
pub use server::{Relay, StartError};
