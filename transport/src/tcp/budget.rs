//! How much data the TCP fallback's streams may queue inside yamux, all
//! together, before their writers wait.
//!
//! yamux serves its streams' queued frames in turn, one frame (up to
//! 16 KiB) per stream per round, with no priorities. Each stream may queue
//! up to its 256 KiB window, so with a hundred uploads over a slow uplink
//! megabytes wait inside yamux and a control message (a ping, a route
//! update) waits a whole round behind them: 160 uploads at 2 Mbit/s made
//! it wait half a minute. Data streams therefore share one budget of bytes
//! handed to yamux and not yet written to the connection
//! ([`QUEUE_BUDGET`]); past it their writes wait until the connection has
//! written enough. The session's control stream is exempt, so what stands
//! before a control frame is at most the budget, the socket's unsent
//! low-water mark and the path's own queue. Interactive streams
//! (`kubectl exec` keystrokes) get the same shorter wait, since their
//! frames join a round of at most the budget.
//!
//! "Written" counts every byte yamux writes (headers, window updates,
//! control and datagram frames too), so the queue is estimated on the
//! low side and never below zero: the budget can only be loose, never
//! leave a writer waiting for bytes that will not be written. A write
//! reserves its bytes before handing them to yamux (and gives back what
//! yamux did not take), so the connection cannot write a frame before
//! it was counted. Every frame a data stream queued is written in time:
//! yamux takes window credit before it queues a frame, and frames of a
//! stream dropped meanwhile still go out.
//!
//! The datagram stream is a data stream here: with the budget full its
//! writer waits, and the fallback's datagram queue may fill and drop
//! (counted `queue_full`), as UDP behind a full link would. What still
//! stands before a control frame besides the budget: TLS's own send
//! buffer, the socket's unsent low-water mark (`TCP_NOTSENT_LOWAT`) and
//! the path's queue.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering::Relaxed, Ordering::SeqCst};
use std::sync::Mutex;
use std::task::{Context, Poll, Waker};

/// Bytes data streams may have queued inside yamux at once (see the
/// module docs). Enough to keep the socket fed on a fast path: the
/// kernel's own buffer and the bytes in flight are not counted in it.
pub(super) const QUEUE_BUDGET: i64 = 256 * 1024;

/// The most yamux takes from one write (its `split_send_size`): what a
/// write reserves before handing yamux its bytes.
pub(super) const MAX_FRAME: usize = 16 * 1024;

/// The shared budget of one connection.
#[derive(Debug, Default)]
pub(super) struct SendBudget {
    /// Bytes handed to yamux by data streams, less bytes written to the
    /// connection since; never below zero.
    queued: AtomicI64,
    waiters: Mutex<Vec<Waker>>,
    has_waiters: AtomicBool,
}

impl SendBudget {
    /// Ready when a data stream may hand yamux more; otherwise the task is
    /// woken once the queue has drained to half the budget.
    pub(super) fn poll_room(&self, cx: &mut Context<'_>) -> Poll<()> {
        if self.queued.load(Relaxed) < QUEUE_BUDGET {
            return Poll::Ready(());
        }
        let mut w = self.waiters.lock().unwrap_or_else(|p| p.into_inner());
        // One entry per task: a splice polls its write side again on
        // every wake-up of its read side.
        if !w.iter().any(|x| x.will_wake(cx.waker())) {
            w.push(cx.waker().clone());
        }
        // Sequentially consistent with `written`'s decrement and look at
        // `has_waiters`: one of the two sides sees the other, so a drain
        // between the first look and this one cannot wake nobody.
        self.has_waiters.store(true, SeqCst);
        if self.queued.load(SeqCst) < QUEUE_BUDGET {
            return Poll::Ready(());
        }
        Poll::Pending
    }

    /// A data stream is about to hand yamux up to `n` bytes: counted
    /// before the connection can write them.
    pub(super) fn reserve(&self, n: usize) {
        self.queued.fetch_add(n as i64, SeqCst);
    }

    /// The connection wrote `n` bytes, or a write gave back `n` bytes of
    /// its reservation that yamux did not take.
    pub(super) fn written(&self, n: usize) {
        let left = self.queued.fetch_sub(n as i64, SeqCst) - n as i64;
        if left < 0 {
            self.queued.fetch_max(0, SeqCst);
        }
        if left <= QUEUE_BUDGET / 2 && self.has_waiters.load(SeqCst) {
            let woken = {
                let mut w = self.waiters.lock().unwrap_or_else(|p| p.into_inner());
                self.has_waiters.store(false, SeqCst);
                std::mem::take(&mut *w)
            };
            for w in woken {
                w.wake();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::sync::Arc;
    use std::task::Wake;

    struct Count(AtomicUsize);
    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Relaxed);
        }
    }

    /// Past the budget a writer waits, and is woken once the connection
    /// has written the queue down to half of it; bytes written beyond
    /// what data streams queued (headers, control frames) leave no credit
    /// behind.
    #[test]
    fn writers_wait_past_the_budget_until_half_is_written() {
        let b = SendBudget::default();
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let waker = Waker::from(count.clone());
        let mut cx = Context::from_waker(&waker);
        assert!(b.poll_room(&mut cx).is_ready());
        b.reserve(QUEUE_BUDGET as usize);
        assert!(b.poll_room(&mut cx).is_pending());
        // Polled again (a splice's read side woke it): one entry.
        assert!(b.poll_room(&mut cx).is_pending());
        assert_eq!(b.waiters.lock().unwrap().len(), 1);
        b.written(QUEUE_BUDGET as usize / 4);
        assert_eq!(count.0.load(Relaxed), 0, "not yet at half");
        assert!(b.poll_room(&mut cx).is_ready());
        b.reserve(QUEUE_BUDGET as usize / 4);
        assert!(b.poll_room(&mut cx).is_pending());
        b.written(QUEUE_BUDGET as usize / 2);
        assert_eq!(count.0.load(Relaxed), 1, "woken once, at half");
        // More written than queued: the queue is empty, not in credit.
        b.written(10 * QUEUE_BUDGET as usize);
        b.reserve(QUEUE_BUDGET as usize);
        assert!(b.poll_room(&mut cx).is_pending());
    }
}
