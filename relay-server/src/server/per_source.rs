//! Handshakes counted per source address, so that one address cannot hold
//! every handshake permit: on the TCP fallback its pending TLS handshakes,
//! on QUIC its attempts before and after it proved its address.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// A quarter of the permits (64 by default): the handshakes one address
/// may have pending on the TCP fallback, and on QUIC before it proved its
/// address (after, twice that: see [`QuicPending`]), so that one address
/// stalling its handshakes leaves permits for every other.
pub(super) fn share(max_concurrent_handshakes: usize) -> u32 {
    u32::try_from(max_concurrent_handshakes / 4)
        .unwrap_or(u32::MAX)
        .max(1)
}

/// The QUIC handshakes pending per source address, counted apart for
/// addresses not proven and proven (by a Retry token).
///
/// A flood of Initials spoofing an edge's address fills only the unproven
/// count: the edge's own attempt is then asked for a Retry and, proven,
/// counts apart from the flood. A proven address past its share waits for
/// one of its places instead of being refused: a site's edges behind one
/// carrier NAT address, hundreds reconnecting together after a relay
/// restart, all get in at the rate handshakes complete, where a refusal
/// would send each into its backoff. A proven address has two shares, so
/// a real address flooding holds at most three quarters of the permits;
/// its further attempts wait, bounded in number
/// ([`QuicPending::max_waiting`]) and time.
pub(super) struct QuicPending {
    /// Places for attempts from addresses not proven.
    pub(super) unproven: Arc<PerSource>,
    /// Places for attempts from proven addresses.
    pub(super) proven: Arc<PerSource>,
    /// Proven attempts waiting for a place of their address, all
    /// addresses together.
    waiting: Arc<AtomicUsize>,
    /// Most proven attempts waiting at once: as many as may queue for a
    /// permit (four times the permits), so a flood's waiting costs no
    /// more than a full queue.
    max_waiting: usize,
}

impl QuicPending {
    pub(super) fn new(max_concurrent_handshakes: usize) -> Self {
        QuicPending {
            unproven: PerSource::new(share(max_concurrent_handshakes)),
            // Two shares: a storm of edges behind one NAT address keeps
            // most of the permits busy (with one share, 1,000 edges from
            // one address took up to twice as long to be back after a
            // relay restart: `loadtest storm`), and a quarter of the
            // permits is still left to everyone else.
            // At most the permits less the unproven share, so the two
            // together never take them all (from 4 permits up).
            proven: PerSource::new(
                share(max_concurrent_handshakes)
                    .saturating_mul(2)
                    .min(
                        u32::try_from(max_concurrent_handshakes)
                            .unwrap_or(u32::MAX)
                            .saturating_sub(share(max_concurrent_handshakes)),
                    )
                    .max(1),
            ),
            waiting: Arc::default(),
            max_waiting: max_concurrent_handshakes.saturating_mul(4).max(1),
        }
    }

    /// A place for a proven attempt from `ip`: at once if its address has
    /// one free, else a wait of at most `limit` for one (`None` when it
    /// ran out); `Err` when too many attempts wait already.
    #[allow(clippy::type_complexity)]
    pub(super) fn proven_place(
        &self,
        ip: IpAddr,
        limit: Duration,
    ) -> Result<
        Result<SourceHeld, impl std::future::Future<Output = Option<SourceHeld>> + Send + 'static>,
        (),
    > {
        if let Some(held) = self.proven.take(ip) {
            return Ok(Ok(held));
        }
        if self.waiting.fetch_add(1, Relaxed) >= self.max_waiting {
            self.waiting.fetch_sub(1, Relaxed);
            return Err(());
        }
        let waiting = Waiting(self.waiting.clone());
        let wait = self.proven.clone().wait(ip, limit);
        Ok(Err(async move {
            let held = wait.await;
            drop(waiting);
            held
        }))
    }
}

/// One proven attempt waiting for a place, counted until dropped.
struct Waiting(Arc<AtomicUsize>);

impl Drop for Waiting {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

/// The handshakes pending per source address (an IPv6 address by its /64,
/// what one site gets), each address up to a cap.
pub(super) struct PerSource {
    cap: u32,
    sources: Mutex<HashMap<IpAddr, Source>>,
}

/// One address's places, and how many hold or wait for one (the entry
/// goes when none does).
struct Source {
    places: Arc<Semaphore>,
    users: u32,
}

/// One pending handshake's place, released when dropped.
pub(super) struct SourceHeld {
    _place: OwnedSemaphorePermit,
    _user: SourceUser,
}

/// A handshake holding or waiting for a place of its address.
struct SourceUser(Arc<PerSource>, IpAddr);

impl PerSource {
    pub(super) fn new(cap: u32) -> Arc<Self> {
        Arc::new(PerSource {
            cap,
            sources: Mutex::default(),
        })
    }

    fn key(ip: IpAddr) -> IpAddr {
        match ip.to_canonical() {
            IpAddr::V6(v6) => {
                let s = v6.segments();
                Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0).into()
            }
            v4 => v4,
        }
    }

    fn user(self: &Arc<Self>, ip: IpAddr) -> (SourceUser, Arc<Semaphore>) {
        let key = Self::key(ip);
        let mut m = self.sources.lock().unwrap_or_else(|e| e.into_inner());
        let s = m.entry(key).or_insert_with(|| Source {
            places: Arc::new(Semaphore::new(self.cap as usize)),
            users: 0,
        });
        s.users += 1;
        (SourceUser(self.clone(), key), s.places.clone())
    }

    /// A place for one more handshake from `ip`, unless it has its cap
    /// pending.
    pub(super) fn take(self: &Arc<Self>, ip: IpAddr) -> Option<SourceHeld> {
        let (user, places) = self.user(ip);
        let place = places.try_acquire_owned().ok()?;
        Some(SourceHeld {
            _place: place,
            _user: user,
        })
    }

    /// A place for one more handshake from `ip`, waiting at most `limit`
    /// for one of its pending handshakes to end.
    fn wait(
        self: Arc<Self>,
        ip: IpAddr,
        limit: Duration,
    ) -> impl std::future::Future<Output = Option<SourceHeld>> + Send + 'static {
        let (user, places) = self.user(ip);
        async move {
            let place = tokio::time::timeout(limit, places.acquire_owned())
                .await
                .ok()?
                .ok()?;
            Some(SourceHeld {
                _place: place,
                _user: user,
            })
        }
    }

    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.sources.lock().unwrap().is_empty()
    }
}

impl Drop for SourceUser {
    fn drop(&mut self) {
        let mut m = self.0.sources.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = m.get_mut(&self.1) {
            s.users -= 1;
            if s.users == 0 {
                m.remove(&self.1);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One address holds at most its share of places (64 of the default
    /// 256 permits), released as its handshakes end; others are
    /// unaffected; an IPv6 site counts by /64.
    #[test]
    fn one_address_cannot_hold_every_place() {
        const PER_SOURCE: u32 = 64;
        assert_eq!(share(256), PER_SOURCE);
        assert_eq!(share(2), 1, "a tiny limit still admits each address");
        let p = PerSource::new(share(256));
        let a: IpAddr = "198.51.100.7".parse().unwrap();
        let held: Vec<SourceHeld> = (0..PER_SOURCE).map(|_| p.take(a).unwrap()).collect();
        assert!(p.take(a).is_none());
        assert!(p.take("198.51.100.8".parse().unwrap()).is_some());
        drop(held);
        assert!(p.take(a).is_some());
        let v6 = |s: &str| s.parse::<IpAddr>().unwrap();
        let site: Vec<SourceHeld> = (0..PER_SOURCE)
            .map(|i| p.take(v6(&format!("2001:db8:1:2::{i:x}"))).unwrap())
            .collect();
        assert!(p.take(v6("2001:db8:1:2::ffff")).is_none());
        assert!(p.take(v6("2001:db8:1:3::1")).is_some());
        drop(site);
        assert!(p.is_empty(), "released places are forgotten");
    }

    /// A proven address past its share waits for its own places (not for
    /// anyone else's), at most so long, and only so many attempts wait.
    #[tokio::test]
    async fn a_proven_address_past_its_share_waits_for_its_own_places() {
        // Unproven and proven together never take every permit.
        for (permits, proven) in [(256, 128), (8, 4), (4, 2), (2, 1)] {
            let q = QuicPending::new(permits);
            assert_eq!(q.proven.cap, proven, "{permits} permits");
            assert!(q.unproven.cap + q.proven.cap < permits as u32 || permits < 4);
        }
        let q = QuicPending::new(4); // two places when proven, 16 may wait
        let a: IpAddr = "198.51.100.7".parse().unwrap();
        let limit = Duration::from_secs(5);
        let mut held = Vec::new();
        for _ in 0..2 {
            match q.proven_place(a, limit) {
                Ok(Ok(h)) => held.push(h),
                _ => panic!("a place at once"),
            }
        }
        let Ok(Err(wait)) = q.proven_place(a, limit) else {
            panic!("the third waits")
        };
        let wait = tokio::spawn(wait);
        tokio::task::yield_now().await;
        assert!(!wait.is_finished());
        assert!(
            matches!(
                q.proven_place("198.51.100.8".parse().unwrap(), limit),
                Ok(Ok(_))
            ),
            "another address is not held up"
        );
        held.pop();
        let h = wait.await.unwrap().expect("the freed place");
        drop((h, held));
        assert!(q.proven.is_empty());
        assert_eq!(q.waiting.load(Relaxed), 0);

        // Waiting is bounded in time...
        let _full: Vec<_> = (0..2).map(|_| q.proven.take(a).unwrap()).collect();
        let Ok(Err(wait)) = q.proven_place(a, Duration::from_millis(20)) else {
            panic!("waits")
        };
        assert!(wait.await.is_none(), "gave up after its limit");
        // ...and in number.
        let waits: Vec<_> = (0..16)
            .map(|_| match q.proven_place(a, limit) {
                Ok(Err(w)) => w,
                _ => panic!("waits"),
            })
            .collect();
        assert!(q.proven_place(a, limit).is_err(), "the 17th is refused");
        drop(waits);
        assert_eq!(q.waiting.load(Relaxed), 0);
    }
}
