//! The cloud side of the edge relay.
//!
//! Edges dial in over QUIC with mutual TLS and register the prefixes they
//! serve; cloud clients reach those prefixes through the HTTP CONNECT
//! ingress (what kube-apiserver's egress selector speaks), and operators
//! watch it all through the admin API.
//!
//! Modules:
//! - [`config`]: TOML file config and the runtime [`RelayConfig`];
//!   [`config_tls`] its certificate sections, [`config_kube`] its
//!   `[kubernetes]` and `[bootstrap]` sections.
//! - [`tls_reload`]: the relay's TLS identity and CRLs reloaded on SIGHUP
//!   and on file change, for new handshakes; a changed client CA or CRL
//!   also has live sessions verified again (`session::cert_check`).
//! - [`token_reload`]: the admin tokens re-read from their files on
//!   change and on SIGHUP (relay), and on change and after a 401 (route
//!   agent), so a rotated Secret needs no restart.
//! - [`server`]: [`Relay::spawn`], listeners, graceful shutdown.
//! - [`bootstrap`]: node certificates for edges that hold only a token.
//! - [`handshake`]: identity, claims from the directory, registration.
//! - [`session`]: the session handle, its actor, opening streams to an edge.
//! - [`liveness`]: when an edge is gone: the relay-wide sweep that ends
//!   silent sessions, the control-stream check, the keep-alive tick phase.
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
//! - [`services`]: Services with edge endpoints: the relay node's
//!   ClusterIP capture set, endpoint choice, each edge's Service feed;
//!   `k8s_services` (feature `kubernetes`) feeds it from the API.
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
pub mod bucket;
pub mod config;
pub mod config_kube;
pub mod config_tls;
pub mod connect;
mod connect_head;
pub mod directory;
mod endpoint_watch;
pub mod follow;
pub mod handshake;
pub mod health;
#[cfg(feature = "kubernetes")]
pub mod k8s;
#[cfg(feature = "kubernetes")]
pub mod k8s_services;
pub mod liveness;
pub mod metrics;
pub mod multipath;
mod offline;
pub mod policy;
pub mod registry;
pub mod replicas;
mod route;
pub mod routefeed;
pub mod server;
pub mod service_feed;
pub mod services;
pub mod session;
pub mod status;
pub mod tls_reload;
pub mod token_reload;
pub mod topology;
pub mod tunnel;
mod tunnel_udp;

pub use config::{FileConfig, Limits, RelayConfig, Secret};
pub use server::{Relay, StartError};
