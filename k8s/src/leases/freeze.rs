//! When the live set is published: [`Freeze`] keeps the last set through
//! an API outage and after it, and the set waits for the watch's store to
//! catch up with our own renewals. Separate from the loop that renews and
//! watches (`membership.rs`), which calls [`publish`] on every change.

use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use super::{live_members, renewed, Shared};

/// Keeping the last set through an API outage, and after it.
///
/// While the API is unreachable nobody's renewals reach us, so once ours
/// have failed for longer than a lease duration the set is frozen. When
/// the API answers again the Leases in our store are still the ones from
/// before the outage (last seen to change before it began): judging
/// them at once would drop every replica, ourselves included, until the
/// watch delivers the fresh renewals. So the set thaws only once a whole
/// lease duration has passed since the API came back, in which every live
/// replica has renewed (at least three times: `renew_every` ≤ a third of
/// it), *and* the store has caught up with our own latest renewal, so
/// those renewals are in it too; a replica that has not renewed by then is
/// really gone and is dropped.
#[derive(Debug, Default)]
pub(super) struct Freeze {
    /// The set is frozen.
    pub(super) frozen: bool,
    /// While frozen: when the API first answered again.
    back: Option<tokio::time::Instant>,
}

impl Freeze {
    /// Whether the live set may be published now, given the last time the
    /// API answered us and whether the store has caught up with our latest
    /// renewal.
    pub(super) fn thawed(
        &mut self,
        now: tokio::time::Instant,
        api_ok: tokio::time::Instant,
        lease: Duration,
        caught_up: bool,
    ) -> bool {
        if now.saturating_duration_since(api_ok) > lease {
            *self = Freeze {
                frozen: true,
                back: None,
            };
            return false;
        }
        if !self.frozen {
            return caught_up;
        }
        let back = *self.back.get_or_insert(api_ok);
        if caught_up && now.saturating_duration_since(back) >= lease {
            *self = Freeze::default();
            return true;
        }
        false
    }
}

/// Whether the store holds our Lease as the API last showed it (`seen`) or
/// later.
pub(super) fn caught_up(s: &Shared, seen: Option<SystemTime>) -> bool {
    let Some(seen) = seen else {
        return false;
    };
    s.store
        .state()
        .iter()
        .find(|l| l.metadata.name.as_deref() == Some(s.opts.id.as_str()))
        .and_then(|l| renewed(l))
        .is_some_and(|t| t >= seen)
}

/// Counts and reports a store lagging our renewals (`current` false) at a
/// renewal round: once per lag longer than a lease duration, and when it
/// ends.
pub(super) fn note_lag(
    s: &Shared,
    current: bool,
    since: &mut Option<(tokio::time::Instant, bool)>,
) {
    let lease = s.opts.lease_duration;
    if current {
        if let Some((t, true)) = since.take() {
            tracing::info!(
                lagged = ?t.elapsed(),
                "the lease watch caught up with our renewals; replica set current again"
            );
        }
        return;
    }
    s.stats.store_behind.fetch_add(1, Ordering::Relaxed);
    let (t, warned) = since.get_or_insert_with(|| (tokio::time::Instant::now(), false));
    // Reported once per lag, at the first round past a lease duration.
    if !*warned && t.elapsed() > lease {
        *warned = true;
        tracing::warn!(
            lag = ?t.elapsed(),
            "the lease watch has not delivered our renewals for longer than a lease: \
             keeping the last replica set until it catches up"
        );
    }
}

/// Publishes the live set, unless the store lags our renewals or the set is
/// frozen (see [`Freeze`]).
pub(super) fn publish(
    s: &Shared,
    freeze: &mut Freeze,
    api_ok: tokio::time::Instant,
    seen: Option<SystemTime>,
) {
    let current = caught_up(s, seen);
    if !freeze.thawed(
        tokio::time::Instant::now(),
        api_ok,
        s.opts.lease_duration,
        current,
    ) {
        tracing::debug!(
            current,
            "store behind our renewals, or API unreachable (or just back) for longer than a lease: \
             keeping the last replica set"
        );
        return;
    }
    let live = live_members(
        &s.store.state(),
        &s.sightings(),
        tokio::time::Instant::now(),
        s.opts.skew_margin,
    );
    s.members.send_if_modified(|m| {
        if *m == live {
            return false;
        }
        tracing::info!(replicas = ?live, "replica set changed");
        *m = live;
        true
    });
}
