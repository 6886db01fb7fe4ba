//! The wire format spoken between `relay-server` and `edge-client`.
//!
//! This crate has no sockets and no clock: it defines the messages and how
//! they are framed, and the async crates drive it over a transport (QUIC
//! streams today, yamux streams over TLS later; both carry the same bytes).
//!
//! Modules:
//! - [`bootstrap`]: certificate bootstrap from a service-account token.
//! - [`cidr`]: the [`Cidr`] type used for routes (validated, canonical).
//! - [`messages`]: handshake ([`ClientHello`], [`HelloReply`]), control
//!   messages ([`Control`]), per-stream header ([`StreamOpen`]) and reply
//!   ([`StreamReply`]).
//! - [`codec`]: the one place that knows about bincode; length-delimited
//!   frames with a hard size limit checked before any allocation.
//! - [`datagram`]: the header of a UDP datagram carried over the tunnel.
//! - [`names`]: Service names for the edge's resolver
//!   ([`Control::ServiceNames`]).
//!
//! Every stream, control or data, starts with frames: a 4-byte big-endian
//! length followed by that many bytes of bincode (see `docs/architecture.md`).
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod bootstrap;
pub mod cidr;
pub mod codec;
pub mod datagram;
pub mod messages;
pub mod names;

pub use cidr::{Cidr, CidrError};
pub use codec::{CodecError, FrameError, Incoming, MAX_FRAME_LEN};
pub use messages::*;
pub use names::*;

/// The protocol version this build speaks. Bumped on any incompatible change
/// to the messages below; the golden-byte tests fail when the encoding moves.
pub const PROTOCOL_VERSION: u16 = 1;

/// How often an edge announcing
/// [`capability::QUIC_LIVENESS`] pings on the control stream of a QUIC
/// session (QUIC's own PINGs keep the path in between). It checks that the
/// relay's session task answers, not just its QUIC stack, and measures the
/// control round trip for operators. A relay takes such an edge's control
/// stream for wedged after [`QUIC_CONTROL_SILENCE_LIMIT`] without a message.
pub const QUIC_CONTROL_PING: std::time::Duration = std::time::Duration::from_secs(120);

/// See [`QUIC_CONTROL_PING`]: three missed pings. A relay pings such an
/// edge itself after 1.5 intervals of silence, well before this.
pub const QUIC_CONTROL_SILENCE_LIMIT: std::time::Duration =
    std::time::Duration::from_secs(3 * QUIC_CONTROL_PING.as_secs());

/// Keep-alive intervals without an answer (TCP) or without anything
/// received (QUIC) after which a path is dead: the edge's rule for what
/// reaches it, and the relay's for a QUIC edge that told it its interval
/// ([`Control::Keepalive`]). One or two late or lost answers cost nothing;
/// a dead path is still declared within 3 × keep-alive.
pub const DEAD_AFTER_KEEPALIVES: u32 = 2;

/// ALPN identifier negotiated on QUIC and TLS, so a relay never mistakes an
/// unrelated TLS client for an edge (and vice versa).
pub const ALPN: &[u8] = b"edge-relay/1";

/// Application error codes used when closing a connection or resetting a
/// stream, so the peer can tell a deliberate close from a crash.
pub mod close_code {
    /// Normal shutdown (client or relay exiting).
    pub const NORMAL: u32 = 0;
    /// The session was replaced by a newer session of the same node.
    pub const SUPERSEDED: u32 = 1;
    /// The handshake was rejected; the reason was sent on the control stream.
    pub const REJECTED: u32 = 2;
    /// An operator removed the session through the admin API.
    pub const KICKED: u32 = 3;
    /// A protocol violation (bad frame, unexpected message).
    pub const PROTOCOL: u32 = 4;
    /// The relay is draining; reconnect (to another replica if possible).
    pub const GOING_AWAY: u32 = 5;
    /// The relay heard no packets from the edge for its silence limit (its
    /// idle timeout, or two of the edge's keep-alive intervals): the path
    /// from the edge is dead, even if what the relay sends still arrives
    /// (a policer dropping the edge's UDP after the handshake, which the
    /// edge's own liveness check cannot see). A new edge counts it as a
    /// dead path (a QUIC strike); an older one treats this unknown code as
    /// any other close by the relay, as it treated [`PROTOCOL`], which
    /// relays used for this before.
    pub const SILENT: u32 = 6;
    /// Stream reset because the other side of the splice failed.
    pub const STREAM_RESET: u32 = 16;
}
