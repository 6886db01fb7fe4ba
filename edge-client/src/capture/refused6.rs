//! The IPv6 refusal's figures for `/metrics`: whether its rules are on
//! the node and how many packets they refused (see
//! `relay_transport::capture::Capture::refuse_ipv6`).

use std::sync::atomic::Ordering::Relaxed;

use relay_transport::capture::Capture;

use crate::client::EdgeStats;

/// The refused count kept rising across repairs: nft's counter is in the
/// capture table, which a repair's install makes anew (from 0).
#[derive(Debug, Default)]
pub(super) struct Refused6 {
    /// What earlier tables counted.
    before: u64,
    /// What the current table counted at the last read.
    last: u64,
}

impl Refused6 {
    /// Reads the counter into `stats` (a short `nft list counter`: on the
    /// first pass and the 10 s tick, not on every change).
    pub(super) async fn read(&mut self, cap: &Capture, stats: &EdgeStats) {
        stats
            .capture_ipv6_refusing
            .store(u64::from(cap.refuses_ipv6()), Relaxed);
        if let Some(now) = cap.refused_ipv6().await {
            self.total(now, stats);
        }
    }

    /// Takes `now`, the current table's count, and publishes the total.
    fn total(&mut self, now: u64, stats: &EdgeStats) {
        if now < self.last {
            // A table made anew since the last read.
            self.before += self.last;
        }
        self.last = now;
        stats.capture_ipv6_refused.store(self.before + now, Relaxed);
    }

    /// Capture was installed anew (a repair): its counter starts from 0.
    pub(super) fn reinstalled(&mut self) {
        self.before += self.last;
        self.last = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_total_keeps_rising_across_new_tables() {
        let stats = EdgeStats::default();
        let mut r = Refused6::default();
        let total = |r: &mut Refused6, now| {
            r.total(now, &stats);
            stats.capture_ipv6_refused.load(Relaxed)
        };
        assert_eq!(total(&mut r, 3), 3);
        assert_eq!(total(&mut r, 5), 5);
        r.reinstalled();
        assert_eq!(total(&mut r, 2), 7);
        // A table made anew unseen (read lower than before).
        assert_eq!(total(&mut r, 1), 8);
        assert_eq!(total(&mut r, 4), 11);
    }
}
