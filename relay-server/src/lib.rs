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
//! - [`bootstrap`]: node certificates for edges that hold only a token.
//! - [`handshake`]: identity, claims from the directory, registration.
//! - [`session`]: the session handle, its actor, opening streams to an edge.
//! - [`registry`]: live sessions, the longest-prefix route table and the
//!   journal of route changes.
//! - [`policy`]: the one authorisation seam every ingress asks.
//! - [`routefeed`]: what each edge is told to route through the tunnel
//!   (bounded deltas, or whole lists for older edges).
//! - [`connect`]: the HTTP CONNECT ingress.
//! - [`directory`]: who may claim what (the `[nodes]` table or the
//!   cluster's Nodes), with repeated site LANs handled.
//! - [`tunnel`]: stream paths shared by every ingress; transparent capture
//!   and streams opened by edges (edge → cloud, edge → edge).
//! - `k8s` (feature `kubernetes`): Nodes as the directory; the Node
//!   condition and Events as the status sink.
//! - [`follow`]: sessions follow directory changes (node deleted, CIDRs
//!   changed).
//! - [`status`]: what operators see outside the relay (Node condition,
//!   Events) behind one trait.
//! - [`admin`]: the admin API (sessions, routes, health, metrics).
//! - [`metrics`]: counters and the Prometheus rendering.
//! - [`agent`]: the route agent for the other cloud nodes.
//! - [`multipath`]: the route agent with several replicas (resilient
//!   nexthop groups).
//! - [`replicas`]: scale-out: the replica set (Leases or a static list)
//!   that edges are told to connect to.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod admin;
pub mod agent;
pub mod bootstrap;
pub mod config;
pub mod connect;
pub mod directory;
pub mod follow;
pub mod handshake;
#[cfg(feature = "kubernetes")]
pub mod k8s;
pub mod metrics;
pub mod multipath;
pub mod policy;
pub mod registry;
pub mod replicas;
pub mod routefeed;
pub mod server;
pub mod session;
pub mod status;
pub mod tunnel;

pub use config::{FileConfig, Limits, RelayConfig, Secret};
pub use server::{Relay, StartError};
