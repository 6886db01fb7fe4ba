//! Streams whose local reader stopped do not starve the rest of their QUIC
//! session.
//!
//! A QUIC session has one connection-wide receive window (`conn_window`,
//! 8 MiB by default) over per-stream windows (`stream_window`, 1 MiB). A
//! stream whose local side stopped reading (a paused `kubectl logs -f |
//! less`, a client that stopped reading a download) keeps up to its stream
//! window of received data inside quinn, and that counts against the
//! connection's window: with eight of them full, the peer may send nothing
//! more on the connection, on any stream, the control stream included, so
//! every other connection through the session stops and the session is
//! soon judged dead.
//!
//! So a splice whose write to its local side has waited [`STALL_AFTER`]
//! marks its stream stalled ([`Stalls::stalled`]) until the write
//! completes, and the first time a stream of a connection does, the
//! connection's receive window is raised to `conn_window + MAX_STALLED ×
//! stream_window` (32 MiB at the defaults), for the rest of the
//! connection: up to [`MAX_STALLED`] stalled streams then hold what they
//! can on top of the window the others share; past that, stalled streams
//! take from the shared window as before. 32 MiB is the per-session
//! receive bound once a stream has stalled.
//!
//! Why raised once and never lowered: quinn grants a larger window at
//! once but takes a smaller one out of credit it would grant as data is
//! read, and a later raise does not cancel that debt; raising per stalled
//! stream and lowering when it resumes granted a fresh stream window at
//! each resumption, without bound (a reader paging through `kubectl logs
//! | less` stalled and resumed once a second; a review reproduced 28 MiB
//! buffered against 9 promised). One raise to the cap needs no state per
//! connection (setting the same window again changes nothing) and keeps
//! the bound.
//!
//! The TCP fallback needs none of this: yamux's connection window is at
//! least its stream table times the stream window, so no set of stalled
//! streams can fill it.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use quinn::VarInt;

/// How long a write to the local side waits before its stream counts as
/// stalled. Long enough that a reader merely slower than the tunnel (its
/// socket buffer full for milliseconds at a time) is not counted stalled
/// at every write; short against the liveness bounds (seconds).
pub const STALL_AFTER: Duration = Duration::from_secs(1);

/// Stalled streams per connection the raised receive window makes room
/// for: each stream window's worth.
pub const MAX_STALLED: u32 = 24;

/// The windows of the QUIC endpoints this process built (process-wide, as
/// [`crate::splice::set_idle_timeout`]: set when an endpoint is built).
static CONN_WINDOW: AtomicU32 = AtomicU32::new(0);
static STREAM_WINDOW: AtomicU32 = AtomicU32::new(0);

/// Streams stalled now, all connections; and stalls since the start.
static STALLED_NOW: AtomicU64 = AtomicU64::new(0);
static STALLS_TOTAL: AtomicU64 = AtomicU64::new(0);

/// Records the windows connections are built with (called where endpoints
/// are built, from their tuning). A process builds its endpoints from one
/// tuning, the relay's or the edge's; were there several, the last one's
/// windows would be used for every connection.
pub(crate) fn configure(conn_window: u32, stream_window: u32) {
    CONN_WINDOW.store(conn_window, Relaxed);
    STREAM_WINDOW.store(stream_window, Relaxed);
}

/// Streams marked stalled now, over every connection (a gauge).
pub fn stalled_now() -> u64 {
    STALLED_NOW.load(Relaxed)
}

/// Streams marked stalled since the start (a counter).
pub fn stalls_total() -> u64 {
    STALLS_TOTAL.load(Relaxed)
}

/// The receive window of a connection once a stream of it has stalled.
fn raised_window(conn: u32, stream: u32) -> u64 {
    u64::from(conn) + u64::from(MAX_STALLED) * u64::from(stream)
}

/// The connection a QUIC stream belongs to, for marking the stream
/// stalled. Cheap to hold (a handle); keeps nothing alive that the stream
/// itself does not.
#[derive(Debug, Clone)]
pub struct Stalls {
    conn: quinn::Connection,
}

impl Stalls {
    /// For streams of `conn`.
    pub(crate) fn new(conn: quinn::Connection) -> Self {
        Stalls { conn }
    }

    /// Marks the stream stalled until the guard is dropped, and makes
    /// sure the connection's receive window stands raised (see the module
    /// docs; nothing while no endpoint configured the windows).
    pub fn stalled(&self) -> Stalled {
        let (conn, stream) = (CONN_WINDOW.load(Relaxed), STREAM_WINDOW.load(Relaxed));
        if conn != 0 {
            if let Ok(w) = VarInt::from_u64(raised_window(conn, stream)) {
                // The same value again after the first time: no change.
                self.conn.set_receive_window(w);
            }
        }
        STALLED_NOW.fetch_add(1, Relaxed);
        STALLS_TOTAL.fetch_add(1, Relaxed);
        Stalled { _private: () }
    }
}

/// A stream marked stalled ([`Stalls::stalled`]); dropping it unmarks it
/// (the window stays raised).
#[derive(Debug)]
pub struct Stalled {
    _private: (),
}

impl Drop for Stalled {
    fn drop(&mut self) {
        STALLED_NOW.fetch_sub(1, Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Room for 24 stalled streams' windows on top of the connection's:
    /// 32 MiB at the defaults.
    #[test]
    fn the_raised_window_makes_room_for_the_stalled_streams() {
        assert_eq!(raised_window(8 << 20, 1 << 20), 32 << 20);
    }
}
