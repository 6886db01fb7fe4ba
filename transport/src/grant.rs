//! Stream credit granted to the peer, grown as the peer uses it.
//!
//! quinn allocates a slot in two hash tables for every stream the peer may
//! open, as soon as it is granted, and parks a finished stream's receive
//! state (~320 B) in its slot for reuse. Granting the configured maximum
//! up front (`quic.max_streams`: 256 on the relay, 10,000 on the edge)
//! makes every idle session pay for streams it may never open: on the
//! relay ~21 KiB per idle session of 256 slots, on the edge ~900 KiB for
//! 10,000. So a connection starts with [`INITIAL_STREAM_GRANT`] and the
//! accepting side raises the grant (×4 a step, up to the configured
//! maximum) as soon as half of it is in use. A burst opening more streams
//! at once than the grant waits for the raise, about one round trip per
//! step (32 → 128 → 512 …); the grant never shrinks, so this happens once
//! per connection. The TCP fallback (yamux) has no per-slot state and is
//! given the maximum from the start.

use std::sync::atomic::{AtomicU32, Ordering::Relaxed};
use std::sync::Arc;

use quinn::VarInt;

use crate::conn::TunnelConn;

/// Streams a peer may open at once when a QUIC connection starts (or the
/// configured maximum, if lower).
pub const INITIAL_STREAM_GRANT: u32 = 32;

/// How many streams the peer may open at once, and how many it has open;
/// one per connection, owned by the loop accepting the peer's streams.
#[derive(Debug)]
pub struct StreamGrant {
    conn: TunnelConn,
    granted: u32,
    max: u32,
    open: Arc<AtomicU32>,
}

/// Counts one accepted stream as open until dropped (hold it as long as
/// the stream is served).
#[derive(Debug)]
pub struct OpenStream(Arc<AtomicU32>);

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

impl OpenStream {
    /// `serve`, counting the stream as open until it finishes (or is
    /// dropped unfinished): what both sides spawn per accepted stream.
    pub async fn serving<F: std::future::Future>(self, serve: F) -> F::Output {
        let out = serve.await;
        drop(self);
        out
    }
}

impl StreamGrant {
    /// The grant of a connection whose transport was configured with
    /// `max` as the peer's limit (see [`crate::QuicTuning`]): QUIC
    /// connections start at [`initial_grant`]`(max)`.
    pub fn new(conn: &TunnelConn, max: u32) -> Self {
        let granted = match conn {
            TunnelConn::Quic(_) => initial_grant(max),
            TunnelConn::Tcp(_) => max,
        };
        StreamGrant {
            conn: conn.clone(),
            granted,
            max,
            open: Arc::new(AtomicU32::new(0)),
        }
    }

    /// Records a stream the peer opened; raises the grant when more than
    /// half of it is in use.
    pub fn accepted(&mut self) -> OpenStream {
        let open = self.open.fetch_add(1, Relaxed) + 1;
        if let Some(next) = next_grant(self.granted, self.max, open) {
            if let TunnelConn::Quic(c) = &self.conn {
                c.set_max_concurrent_bi_streams(VarInt::from_u32(next));
            }
            tracing::debug!(from = self.granted, to = next, open, "stream grant raised");
            self.granted = next;
        }
        OpenStream(self.open.clone())
    }

    /// Streams the peer may open at once now.
    pub fn granted(&self) -> u32 {
        self.granted
    }
}

/// The grant a QUIC connection starts with when the peer's limit is `max`.
pub fn initial_grant(max: u32) -> u32 {
    max.min(INITIAL_STREAM_GRANT)
}

/// The grant to move to with `open` streams open under `granted`, if any:
/// ×4 (at most `max`) once more than half is in use.
fn next_grant(granted: u32, max: u32, open: u32) -> Option<u32> {
    (granted < max && open.saturating_mul(2) > granted).then(|| granted.saturating_mul(4).min(max))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_by_four_past_half_and_stops_at_the_maximum() {
        assert_eq!(initial_grant(256), 32);
        assert_eq!(initial_grant(10), 10);
        // Half in use is not yet past half.
        assert_eq!(next_grant(32, 256, 16), None);
        assert_eq!(next_grant(32, 256, 17), Some(128));
        assert_eq!(next_grant(128, 256, 65), Some(256));
        assert_eq!(next_grant(256, 256, 256), None);
        assert_eq!(next_grant(512, 10_000, 300), Some(2048));
        assert_eq!(next_grant(8192, 10_000, 5000), Some(10_000));
        // A grant configured below the initial one never moves.
        assert_eq!(next_grant(10, 10, 10), None);
    }

    #[tokio::test]
    async fn a_stream_counts_as_open_while_served_and_not_after() {
        let open = Arc::new(AtomicU32::new(1));
        let (tx, rx) = tokio::sync::oneshot::channel::<u8>();
        let task = tokio::spawn(OpenStream(open.clone()).serving(rx));
        tokio::task::yield_now().await;
        assert_eq!(open.load(Relaxed), 1, "still serving");
        tx.send(7).unwrap();
        assert_eq!(task.await.unwrap(), Ok(7));
        assert_eq!(open.load(Relaxed), 0, "released when served");
        // Dropped unfinished (an aborted task): released too.
        let open = Arc::new(AtomicU32::new(1));
        let (_tx, rx) = tokio::sync::oneshot::channel::<u8>();
        let task = tokio::spawn(OpenStream(open.clone()).serving(rx));
        task.abort();
        let _ = task.await;
        assert_eq!(open.load(Relaxed), 0, "released when dropped");
    }
}
