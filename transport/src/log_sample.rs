//! Sampled log lines for failure paths that fire once per connection;
//! and [`OncePerSet`], a warning about a set of things left out given once
//! per distinct set.
//!
//! During an outage the failures come at the rate of the clients' retries,
//! not at a rate anyone chose: a pod retrying every 10 ms against an edge
//! whose relay is away, or a scraper polling a thousand offline edges
//! through the relay. One line per event made the log volume follow that
//! rate (SD-card wear and full disks on small edge boards). With
//! [`sampled!`](crate::sampled) each call site logs its first event at
//! once, counts the ones that follow within [`WINDOW`] without logging
//! them, and its next line after the window says how many it left out:
//! `… (and 412 more like it in the last 10 s)`, also as the field
//! `suppressed`.
//!
//! Only the log line is sampled: the counters and metrics next to each
//! call site still count every event.
//!
//! The state is two atomics per call site (a `static` the macro declares),
//! not per peer, so memory is bounded however many peers fail; the
//! suppressed path is a load and an add, with no lock and no allocation.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// How long a call site stays quiet after a line: at most one line per
/// site per window.
pub const WINDOW: Duration = Duration::from_secs(10);

/// One call site's sampling state. Declared as a `static` by
/// [`sampled!`](crate::sampled); usable directly where the line needs
/// building by hand.
#[derive(Debug)]
pub struct LogSampler {
    window_ms: u64,
    /// The first instant this site saw; times are kept as milliseconds
    /// after it so they fit an atomic.
    epoch: OnceLock<Instant>,
    /// When the last line was logged, in milliseconds after `epoch`, plus
    /// one (0: never).
    last: AtomicU64,
    /// Events left out since the last line.
    suppressed: AtomicU64,
}

/// What the line to log says about the events before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sampled {
    /// Events this site left out since its previous line.
    pub suppressed: u64,
    /// Time since the previous line (zero for the site's first line).
    pub since: Duration,
}

impl LogSampler {
    /// A site that logs at most one line per `window`.
    pub const fn new(window: Duration) -> Self {
        LogSampler {
            window_ms: window.as_millis() as u64,
            epoch: OnceLock::new(),
            last: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// Whether the event seen at `now` is logged: `Some` with what was left
    /// out before it, or `None` (the event is counted for the next line).
    ///
    /// Under a race for a new window exactly one caller wins; the losers
    /// count themselves as left out, and an event counted while the winner
    /// takes the count may be reported in the winner's line or the next
    /// one, never in both and never in neither (unless the site never
    /// logs again).
    pub fn admit(&self, now: Instant) -> Option<Sampled> {
        let epoch = *self.epoch.get_or_init(|| now);
        // An instant before the epoch (a caller that read the clock before
        // another initialised it) counts as the epoch itself.
        let t = (now.saturating_duration_since(epoch).as_millis() as u64).saturating_add(1);
        let last = self.last.load(Ordering::Acquire);
        if last != 0 && t < last.saturating_add(self.window_ms) {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        if self
            .last
            .compare_exchange(last, t, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            // Another event opened the new window first and logs for it.
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        let suppressed = self.suppressed.swap(0, Ordering::AcqRel);
        let since = match last {
            0 => Duration::ZERO,
            _ => Duration::from_millis(t - last),
        };
        Some(Sampled { suppressed, since })
    }
}

/// The clock [`sampled!`](crate::sampled) reads: tokio's, so a test with a
/// paused runtime clock drives the windows without sleeping; outside such a
/// test it is the monotonic clock.
pub fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

#[doc(hidden)]
pub use tracing as __tracing;

/// Logs a `tracing` event at `$level` (`info`, `warn`, ...) at most once per
/// [`WINDOW`] from this call site; the line after a quiet window says how
/// many it left out. The message is a string literal and comes first, the
/// fields follow as in `tracing`'s macros:
///
/// ```
/// # let (peer, why) = ("10.0.0.1:5000", "no route");
/// relay_transport::sampled!(info, "connection refused", %peer, reason = why);
/// ```
///
/// logs `connection refused peer=10.0.0.1:5000 reason="no route"` for the
/// first event, then, at the first event 10 s or more later,
/// `connection refused (and 412 more like it in the last 10 s) peer=...
/// reason=... suppressed=412`. Counting the event is the caller's job, as
/// before: only the line is sampled.
#[macro_export]
macro_rules! sampled {
    ($level:ident, $msg:literal $(, $($field:tt)+)?) => {{
        static SITE: $crate::log_sample::LogSampler =
            $crate::log_sample::LogSampler::new($crate::log_sample::WINDOW);
        if let ::std::option::Option::Some(s) = SITE.admit($crate::log_sample::now()) {
            if s.suppressed == 0 {
                $crate::log_sample::__tracing::$level!($($($field)+ ,)? $msg);
            } else {
                $crate::log_sample::__tracing::$level!(
                    $($($field)+ ,)?
                    suppressed = s.suppressed,
                    "{} (and {} more like it in the last {} s)",
                    $msg,
                    s.suppressed,
                    s.since.as_secs()
                );
            }
        }
    }};
}

/// A set of things left out (the IPv6 prefixes of a table only IPv4 is
/// taken from) to be logged once per distinct set, not on every change
/// of what holds it, and named, the first [`NAMED`] of them.
#[derive(Debug)]
pub struct OncePerSet<T> {
    last: std::collections::BTreeSet<T>,
}

impl<T> Default for OncePerSet<T> {
    fn default() -> Self {
        OncePerSet {
            last: std::collections::BTreeSet::new(),
        }
    }
}

/// How many members of a set [`OncePerSet::changed`] names.
pub const NAMED: usize = 4;

impl<T: Ord + Clone + std::fmt::Display> OncePerSet<T> {
    /// The set's members to log (the first [`NAMED`], then `and N more`)
    /// when `set` is not empty and differs from the last one given;
    /// `None` otherwise.
    pub fn changed(&mut self, set: &std::collections::BTreeSet<T>) -> Option<String> {
        if *set == self.last {
            return None;
        }
        self.last = set.clone();
        if set.is_empty() {
            return None;
        }
        let mut names: Vec<String> = set.iter().take(NAMED).map(ToString::to_string).collect();
        if set.len() > NAMED {
            names.push(format!("and {} more", set.len() - NAMED));
        }
        Some(names.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The sampler at injected instants: each row is milliseconds after the
    /// start and what `admit` answers there (`(suppressed, since in ms)` for
    /// a line).
    #[test]
    fn first_logs_a_burst_is_counted_and_the_next_window_reports_it() {
        type Row = (u64, Option<(u64, u64)>);
        let cases: &[(&str, &[Row])] = &[
            ("the first event logs at once", &[(0, Some((0, 0)))]),
            (
                "a burst within the window is left out",
                &[(0, Some((0, 0))), (1, None), (5_000, None), (9_999, None)],
            ),
            (
                "the first event after the window reports the burst",
                &[
                    (0, Some((0, 0))),
                    (10, None),
                    (20, None),
                    (30, None),
                    (10_000, Some((3, 10_000))),
                    (10_001, None),
                ],
            ),
            (
                "a quiet hour: the count is since the previous line",
                &[
                    (0, Some((0, 0))),
                    (1, None),
                    (3_600_000, Some((1, 3_600_000))),
                ],
            ),
            (
                "a lone event after a window reports none left out",
                &[
                    (0, Some((0, 0))),
                    (10_000, Some((0, 10_000))),
                    (25_000, Some((0, 15_000))),
                ],
            ),
            (
                "the window runs from the last line, not from the first event",
                &[
                    (0, Some((0, 0))),
                    (12_000, Some((0, 12_000))),
                    (21_999, None),
                    (22_000, Some((1, 10_000))),
                ],
            ),
        ];
        for (name, steps) in cases {
            let s = LogSampler::new(WINDOW);
            let start = Instant::now();
            for &(at, want) in steps.iter() {
                let got = s.admit(start + Duration::from_millis(at));
                let want = want.map(|(suppressed, since)| Sampled {
                    suppressed,
                    since: Duration::from_millis(since),
                });
                assert_eq!(got, want, "{name}: at {at} ms");
            }
        }
    }

    /// An instant earlier than the site's first (clocks read on two threads
    /// in either order) is inside the window, not a new one.
    #[test]
    fn an_earlier_instant_is_inside_the_window() {
        let s = LogSampler::new(WINDOW);
        let start = Instant::now() + Duration::from_secs(60);
        assert!(s.admit(start).is_some());
        assert_eq!(s.admit(start - Duration::from_secs(30)), None);
        let next = s.admit(start + WINDOW).unwrap();
        assert_eq!(next.suppressed, 1);
    }

    /// Threads racing on one site: one line, and every other event in the
    /// next line's count.
    #[test]
    fn racing_threads_log_once_and_lose_no_count() {
        let s = LogSampler::new(WINDOW);
        let start = Instant::now();
        let logged = AtomicU64::new(0);
        std::thread::scope(|scope| {
            for _ in 0..8 {
                scope.spawn(|| {
                    for _ in 0..10_000 {
                        if s.admit(start).is_some() {
                            logged.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                });
            }
        });
        assert_eq!(logged.load(Ordering::Relaxed), 1);
        let next = s.admit(start + WINDOW).unwrap();
        assert_eq!(next.suppressed, 79_999);
    }

    /// The macro compiles with and without fields and at any level (no
    /// subscriber here: what it logs is shown by the edge's
    /// `an_outage_with_a_pod_retrying_every_10_ms_logs_a_line_per_window`).
    #[test]
    fn the_macro_takes_fields_or_none() {
        let peer: std::net::SocketAddr = "10.0.0.1:5000".parse().unwrap();
        for _ in 0..3 {
            crate::sampled!(info, "no fields");
            crate::sampled!(warn, "fields", %peer, reason = "no_route", n = 3);
            crate::sampled!(debug, "debug too", ?peer);
        }
    }

    /// A set is named once, the first few of it; the same set again says
    /// nothing, another one is named; an empty one says nothing, and the
    /// set after it is named again.
    #[test]
    fn a_set_is_named_once_until_it_changes() {
        let set = |v: &[u32]| {
            v.iter()
                .copied()
                .collect::<std::collections::BTreeSet<u32>>()
        };
        let mut once = OncePerSet::default();
        assert_eq!(once.changed(&set(&[])), None);
        assert_eq!(once.changed(&set(&[2, 1])).as_deref(), Some("1, 2"));
        assert_eq!(once.changed(&set(&[1, 2])), None);
        assert_eq!(
            once.changed(&set(&[6, 5, 4, 3, 2, 1])).as_deref(),
            Some("1, 2, 3, 4, and 2 more")
        );
        assert_eq!(once.changed(&set(&[])), None);
        assert_eq!(once.changed(&set(&[1, 2])).as_deref(), Some("1, 2"));
    }
}
