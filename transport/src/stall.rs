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
//! completes, and while it is, the connection's receive window is raised by
//! one stream window for it: what the stalled stream can hold, it holds on
//! top of the window, and the other streams keep the whole configured
//! window. At most [`MAX_STALLED`] streams per connection are covered (24:
//! the window then stands at `conn_window + 24 × stream_window`, 32 MiB at
//! the defaults, the per-session memory bound while streams are stalled);
//! past that, stalled streams take from the shared window as before. When
//! a write completes the window is lowered again (quinn takes the
//! reduction out of credit not yet granted, never out of credit the peer
//! holds).
//!
//! The TCP fallback needs none of this: yamux's connection window is at
//! least its stream table times the stream window, so no set of stalled
//! streams can fill it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::Duration;

use quinn::VarInt;

/// How long a write to the local side waits before its stream counts as
/// stalled. Long enough that a reader merely slower than the tunnel (its
/// socket buffer full for milliseconds at a time) does not toggle the
/// window on every write; short against the liveness bounds (seconds).
pub const STALL_AFTER: Duration = Duration::from_secs(1);

/// Stalled streams per connection the receive window grows for, at most.
pub const MAX_STALLED: u32 = 24;

/// The windows of the QUIC endpoints this process built (process-wide, as
/// [`crate::splice::set_idle_timeout`]: set when an endpoint is built).
static CONN_WINDOW: AtomicU32 = AtomicU32::new(0);
static STREAM_WINDOW: AtomicU32 = AtomicU32::new(0);

/// Streams stalled now, all connections; and stalls since the start.
static STALLED_NOW: AtomicU64 = AtomicU64::new(0);
static STALLS_TOTAL: AtomicU64 = AtomicU64::new(0);

/// Stalled streams per connection (by quinn's `stable_id`), only while
/// there are any: an entry goes with its last stall.
static STALLED: Mutex<Option<HashMap<usize, u32>>> = Mutex::new(None);

/// Records the windows connections are built with (called where endpoints
/// are built, from their tuning).
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

/// The receive window for `stalled` streams stalled on a connection.
fn window(conn: u32, stream: u32, stalled: u32) -> u64 {
    u64::from(conn) + u64::from(stalled.min(MAX_STALLED)) * u64::from(stream)
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

    /// Marks the stream stalled until the guard is dropped: the
    /// connection's receive window grows by a stream window meanwhile.
    pub fn stalled(&self) -> Stalled {
        let id = self.conn.stable_id();
        {
            // Resized under the lock, so two streams of one connection
            // changing state at once cannot leave the older size last.
            let mut map = STALLED.lock().unwrap_or_else(|p| p.into_inner());
            let n = map.get_or_insert_with(HashMap::new).entry(id).or_insert(0);
            *n += 1;
            self.resize(*n);
        }
        STALLED_NOW.fetch_add(1, Relaxed);
        STALLS_TOTAL.fetch_add(1, Relaxed);
        Stalled {
            stalls: self.clone(),
        }
    }

    /// Sets the window for `n` stalled streams (past [`MAX_STALLED`] it
    /// stays at its cap); nothing while no endpoint configured the windows.
    /// quinn grants a larger window at once and takes a smaller one out of
    /// credit not yet granted.
    fn resize(&self, n: u32) {
        let (conn, stream) = (CONN_WINDOW.load(Relaxed), STREAM_WINDOW.load(Relaxed));
        if conn == 0 || n > MAX_STALLED {
            return;
        }
        if let Ok(w) = VarInt::from_u64(window(conn, stream, n)) {
            self.conn.set_receive_window(w);
        }
    }
}

/// A stream marked stalled ([`Stalls::stalled`]); dropping it unmarks it.
#[derive(Debug)]
pub struct Stalled {
    stalls: Stalls,
}

impl Drop for Stalled {
    fn drop(&mut self) {
        let id = self.stalls.conn.stable_id();
        {
            let mut map = STALLED.lock().unwrap_or_else(|p| p.into_inner());
            let map = map.get_or_insert_with(HashMap::new);
            let n = match map.get_mut(&id) {
                Some(n) if *n > 1 => {
                    *n -= 1;
                    *n
                }
                _ => {
                    map.remove(&id);
                    0
                }
            };
            self.stalls.resize(n);
        }
        STALLED_NOW.fetch_sub(1, Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One stream window per stalled stream on top of the connection's,
    /// up to the cap: 32 MiB at the defaults.
    #[test]
    fn the_window_grows_a_stream_window_per_stalled_stream_up_to_the_cap() {
        let (c, s) = (8 << 20, 1 << 20);
        assert_eq!(window(c, s, 0), 8 << 20);
        assert_eq!(window(c, s, 1), 9 << 20);
        assert_eq!(window(c, s, MAX_STALLED), 32 << 20);
        assert_eq!(window(c, s, MAX_STALLED + 10), 32 << 20);
    }
}
