//! The runtime quinn's tasks run on: tokio's, with each of quinn's driver
//! tasks, while it is busy, letting the tasks already queued on its
//! worker run before it.
//!
//! quinn turns what the tunnel's stream tasks write into packets in one
//! driver task per connection, woken by each write. On tokio's
//! multi-threaded scheduler a task woken by another runs right after it
//! (the worker's LIFO slot), so with many streams busy at once the driver
//! ran after every single write and sent each request in a packet, and a
//! `sendmsg`, of its own, while the other streams' writes waited behind
//! it in the queue. Sent to the back of the queue instead, the driver
//! finds the writes of every stream that ran meanwhile and sends them
//! together: fuller packets, one segmented send. Measured at 64 busy
//! connections (docs/benchmarks.md, change 26): `sendmsg` calls per
//! request 0.94 → 0.34, 15 % fewer system calls in all.
//!
//! Only while busy: when the gaps between the driver's runs average
//! less than [`BUSY`]. Deferring costs a trip through the queue and,
//! when the other worker is parked, a wake-up of it; with one request at
//! a time in flight there is nothing to gather and the driver runs at
//! once, as before.

use std::fmt;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use quinn::{AsyncTimer, AsyncUdpSocket, Runtime};

/// A driver whose runs come less than this apart, on average, is busy
/// and is deferred once per wake-up. At 64 connections in flight the
/// relay's driver runs every few microseconds; at a thousand requests a
/// second, mostly hundreds apart.
const BUSY: Duration = Duration::from_micros(25);

/// quinn's tokio runtime with the tasks it spawns (the endpoint's driver
/// and each connection's) deferred while busy, as the module explains.
pub(crate) struct Batching(Arc<dyn Runtime>);

impl Batching {
    /// Wraps quinn's default runtime (tokio's); `None` outside a runtime.
    pub(crate) fn tokio() -> Option<Arc<dyn Runtime>> {
        Some(Arc::new(Batching(quinn::default_runtime()?)))
    }
}

impl fmt::Debug for Batching {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Batching").field(&self.0).finish()
    }
}

impl Runtime for Batching {
    fn new_timer(&self, i: Instant) -> Pin<Box<dyn AsyncTimer>> {
        self.0.new_timer(i)
    }

    fn spawn(&self, future: Task) {
        self.0.spawn(Box::pin(Deferred::new(future, BUSY)))
    }

    fn wrap_udp_socket(&self, t: std::net::UdpSocket) -> io::Result<Arc<dyn AsyncUdpSocket>> {
        self.0.wrap_udp_socket(t)
    }

    fn now(&self) -> Instant {
        self.0.now()
    }
}

/// A task quinn spawns.
type Task = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Runs `inner`; a poll that finds it busy first sends the task to the
/// back of its worker's queue (it wakes itself and returns `Pending`),
/// and polls `inner` when it comes round. Busy: the gaps between the end
/// of one poll and the start of the next, averaged over the last few
/// (weights 1/4, 3/16, …), are under `busy`. An average, not the last
/// gap alone: a request answered quickly at the edge wakes the driver
/// twice within microseconds even when requests are a millisecond apart,
/// and deferring those gathers nothing and costs a wake-up of the other
/// worker (measured: a `futex` call per four requests at 1,000 req/s).
struct Deferred {
    inner: Task,
    busy: Duration,
    /// When `inner`'s last poll ended.
    last: Option<Instant>,
    /// The average gap, in nanoseconds.
    gap_ns: u64,
    /// This poll is the one after a deferral: run `inner` now.
    deferred: bool,
}

/// A gap counts at most this much in the average, so that a burst after
/// a quiet spell is seen as busy within a dozen runs.
const GAP_CAP_NS: u64 = 1_000_000;

impl Deferred {
    fn new(inner: Task, busy: Duration) -> Self {
        Self {
            inner,
            busy,
            last: None,
            gap_ns: GAP_CAP_NS,
            deferred: false,
        }
    }
}

impl Future for Deferred {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if let (false, Some(last)) = (self.deferred, self.last) {
            let gap =
                u64::try_from(last.elapsed().as_nanos()).map_or(GAP_CAP_NS, |g| g.min(GAP_CAP_NS));
            self.gap_ns = (self.gap_ns * 3 + gap) / 4;
            if u128::from(self.gap_ns) < self.busy.as_nanos() {
                self.deferred = true;
                // A task that wakes itself while being polled is queued at
                // the back (tokio treats it as a yield), not in the LIFO
                // slot.
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
        }
        self.deferred = false;
        let done = self.inner.as_mut().poll(cx);
        self.last = Some(Instant::now());
        done
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
    use std::task::{Wake, Waker};

    /// Counts its wake-ups.
    #[derive(Default)]
    struct Count(AtomicUsize);

    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Relaxed);
        }
    }

    /// A [`Deferred`] around a future that is never done, counting how
    /// often that future ran and how often the wrapper woke itself.
    struct Probe {
        d: Pin<Box<Deferred>>,
        polls: Arc<AtomicUsize>,
        wakes: Arc<Count>,
    }

    impl Probe {
        fn new(busy: Duration) -> Self {
            let polls = Arc::new(AtomicUsize::new(0));
            let p = polls.clone();
            let inner: Task = Box::pin(std::future::poll_fn(move |_| {
                p.fetch_add(1, Relaxed);
                Poll::Pending
            }));
            Probe {
                d: Box::pin(Deferred::new(inner, busy)),
                polls,
                wakes: Arc::default(),
            }
        }

        /// Polls once (never done); then (runs, self-wakes) so far.
        fn poll(&mut self) -> (usize, usize) {
            let waker = Waker::from(self.wakes.clone());
            assert!(self
                .d
                .as_mut()
                .poll(&mut Context::from_waker(&waker))
                .is_pending());
            (self.polls.load(Relaxed), self.wakes.0.load(Relaxed))
        }
    }

    #[test]
    fn a_busy_driver_yields_once_before_each_run() {
        // Every gap is under an hour: run, defer, run, defer, run.
        let mut p = Probe::new(Duration::from_secs(3600));
        let seen: Vec<_> = (0..5).map(|_| p.poll()).collect();
        assert_eq!(seen, [(1, 0), (1, 1), (2, 1), (2, 2), (3, 2)]);
    }

    #[test]
    fn one_quick_wake_after_a_quiet_spell_is_not_busy() {
        let mut p = Probe::new(Duration::from_micros(740));
        // The average starts at the cap (1 ms): after one quick gap it is
        // at least 750 us, not busy, however quick the gap.
        assert_eq!(p.poll(), (1, 0));
        assert_eq!(p.poll(), (2, 0));
        // A second quick gap (under 700 us) brings it under 740 us: busy.
        assert_eq!(p.poll(), (2, 1));
    }

    #[test]
    fn an_idle_driver_runs_at_once() {
        let mut p = Probe::new(Duration::ZERO);
        let seen: Vec<_> = (0..5).map(|_| p.poll()).collect();
        assert_eq!(seen, [(1, 0), (2, 0), (3, 0), (4, 0), (5, 0)]);
    }

    #[test]
    fn what_the_driver_returns_passes_through() {
        let mut d = Box::pin(Deferred::new(Box::pin(async {}), Duration::ZERO));
        let mut cx = Context::from_waker(Waker::noop());
        assert!(d.as_mut().poll(&mut cx).is_ready());
    }
}
