//! Tests of the pure parts of membership: judging Leases, the live set,
//! and the freeze through an outage.

use super::freeze::Freeze;
use super::*;
use k8s_openapi::api::coordination::v1::LeaseSpec;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

fn lease(name: &str, renewed: Option<SystemTime>, secs: i32, addr: Option<&str>) -> Lease {
    Lease {
        metadata: ObjectMeta {
            name: Some(name.into()),
            annotations: addr.map(|a| [(ADDRESS_ANNOTATION.to_string(), a.to_string())].into()),
            ..ObjectMeta::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some(format!("{name}_1")),
            lease_duration_seconds: Some(secs),
            renew_time: renewed.map(micro_now),
            ..LeaseSpec::default()
        }),
    }
}

/// A Lease as its holder writes it at `renewed` (its clock), with `uid`.
fn version(name: &str, renewed: SystemTime) -> Lease {
    let mut l = lease(name, Some(renewed), 15, Some("10.0.0.1:8443"));
    l.metadata.uid = Some(format!("{name}-uid"));
    l
}

#[test]
fn expiry_is_judged_by_when_we_saw_the_lease_change_and_collection_after_gc_after() {
    let wall = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    let t0 = Instant::now();
    let (margin, gc) = (Duration::from_secs(5), Duration::from_secs(60));
    let l = version("r1", wall - Duration::from_secs(3));
    let mut seen = Sightings::default();
    seen.note(&l, t0, wall, gc);
    let at = |seen: &Sightings, l: &Lease, s: u64| {
        judge(l, seen, t0 + Duration::from_secs(s), margin, gc)
            .unwrap()
            .1
    };
    // Judged from when we saw it (t0), not from the renew time it carries
    // (3 s earlier): live for its duration plus the margin from t0.
    assert_eq!(at(&seen, &l, 0), LeaseState::Live);
    assert_eq!(at(&seen, &l, 19), LeaseState::Live);
    assert_eq!(at(&seen, &l, 20), LeaseState::Expired);
    // Seeing the same version again (a relist) is no renewal.
    seen.note(&l, t0 + Duration::from_secs(19), wall, gc);
    assert_eq!(at(&seen, &l, 20), LeaseState::Expired);
    assert_eq!(at(&seen, &l, 74), LeaseState::Expired);
    assert_eq!(at(&seen, &l, 75), LeaseState::Collectable);
    // Nor is anyone's write that leaves holder and renew time alone (an
    // annotation edited with kubectl: a new resourceVersion).
    let mut edited = l.clone();
    edited.metadata.resource_version = Some("99".into());
    seen.note(&edited, t0 + Duration::from_secs(30), wall, gc);
    assert_eq!(at(&seen, &edited, 75), LeaseState::Collectable);
    // A version not seen yet counts as seen now: live.
    let newer = version("r1", wall + Duration::from_secs(5));
    assert_eq!(at(&seen, &newer, 75), LeaseState::Live);
    // Never renewed: nothing to judge by, collect it.
    let never = lease("r2", None, 15, Some("x:1"));
    assert_eq!(
        judge(&never, &seen, t0, margin, gc).unwrap().1,
        LeaseState::Collectable
    );
    // Not a replica Lease: ignored entirely, and not recorded.
    let other = lease("kube-scheduler", Some(wall), 15, None);
    seen.note(&other, t0, wall, gc);
    assert!(judge(&other, &seen, t0, margin, gc).is_none());
    assert!(!seen.by_name.contains_key("kube-scheduler"));
}

/// A peer whose clock is a minute off ours, either way: live as long as
/// its Lease keeps changing, expired a lease duration plus the margin after
/// it stops, by our clock; its renew time never enters.
#[test]
fn a_skewed_peer_is_live_while_its_lease_changes_and_expires_by_our_clock() {
    let wall = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    let t0 = Instant::now();
    let (margin, gc) = (Duration::from_secs(5), Duration::from_secs(600));
    for skew in [-60i64, 60] {
        let theirs = |s: u64| {
            let at = wall + Duration::from_secs(s);
            let at = if skew < 0 {
                at - Duration::from_secs(60)
            } else {
                at + Duration::from_secs(60)
            };
            version("r1", at)
        };
        let mut seen = Sightings::default();
        let state = |seen: &Sightings, l: &Lease, s: u64| {
            judge(l, seen, t0 + Duration::from_secs(s), margin, gc)
                .unwrap()
                .1
        };
        // Renewed every 5 s for two minutes: live throughout.
        let mut last = theirs(0);
        for s in (0..=120).step_by(5) {
            last = theirs(s);
            seen.note(
                &last,
                t0 + Duration::from_secs(s),
                wall + Duration::from_secs(s),
                gc,
            );
            for d in 0..5 {
                assert_eq!(
                    state(&seen, &last, s + d),
                    LeaseState::Live,
                    "skew {skew} s, {} s in",
                    s + d
                );
            }
        }
        // It stops at 120 s: live until 120 + 15 + 5 by our clock, then
        // expired, whatever its renew time says.
        assert_eq!(state(&seen, &last, 139), LeaseState::Live, "skew {skew} s");
        assert_eq!(
            state(&seen, &last, 140),
            LeaseState::Expired,
            "skew {skew} s"
        );
        assert_eq!(
            live_members(
                &[Arc::new(last.clone())],
                &seen,
                t0 + Duration::from_secs(140),
                margin
            ),
            [],
            "skew {skew} s"
        );
    }
}

/// A Lease seen for the first time is taken as renewed then, whatever its
/// renew time says, unless that says it is due for collection; it is
/// collected only after we saw it unchanged for duration + `gc_after`.
#[test]
fn a_lease_seen_first_counts_as_renewed_then_unless_it_says_it_is_long_dead() {
    let wall = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    let t0 = Instant::now();
    let (margin, gc) = (Duration::from_secs(5), Duration::from_secs(600));
    let state = |seen: &Sightings, l: &Lease, s: u64| {
        judge(l, seen, t0 + Duration::from_secs(s), margin, gc)
            .unwrap()
            .1
    };
    let mut seen = Sightings::default();
    // Renewed a minute ago by its clock (dead, or its clock behind ours):
    // live for a lease duration plus the margin from now.
    let recent = version("recent", wall - Duration::from_secs(60));
    // A minute ahead of our clock: also from now, not for the minute more.
    let ahead = version("ahead", wall + Duration::from_secs(60));
    // Expired for longer than gc_after by its own renew time.
    let old = version("old", wall - Duration::from_secs(3600));
    for l in [&recent, &ahead, &old] {
        seen.note(l, t0, wall, gc);
    }
    assert_eq!(state(&seen, &recent, 19), LeaseState::Live);
    assert_eq!(state(&seen, &recent, 20), LeaseState::Expired);
    assert_eq!(state(&seen, &ahead, 19), LeaseState::Live);
    assert_eq!(state(&seen, &ahead, 20), LeaseState::Expired);
    assert_eq!(state(&seen, &old, 0), LeaseState::Expired);
    // Collected by what we saw only: 15 + 600 s after we first saw it.
    assert_eq!(state(&seen, &old, 614), LeaseState::Expired);
    assert_eq!(state(&seen, &old, 615), LeaseState::Collectable);
    assert_eq!(state(&seen, &recent, 615), LeaseState::Collectable);
    // The old one changing (its holder was alive, its clock an hour
    // behind): live from then.
    let renewed = version("old", wall - Duration::from_secs(3590));
    seen.note(&renewed, t0 + Duration::from_secs(10), wall, gc);
    assert_eq!(state(&seen, &renewed, 10), LeaseState::Live);
    assert_eq!(state(&seen, &renewed, 29), LeaseState::Live);
    // Deleted and created again under the same name: a new object, live.
    seen.forget("recent");
    let again = version("recent", wall - Duration::from_secs(3600));
    seen.note(&again, t0 + Duration::from_secs(30), wall, gc);
    assert_eq!(
        state(&seen, &again, 30),
        LeaseState::Expired,
        "new name: first sight"
    );
    let mut recreated = again.clone();
    recreated.metadata.uid = Some("other-uid".into());
    seen.note(&recreated, t0 + Duration::from_secs(31), wall, gc);
    assert_eq!(state(&seen, &recreated, 31), LeaseState::Live);
}

#[test]
fn the_set_stays_frozen_after_an_outage_until_the_watch_is_current() {
    let t0 = tokio::time::Instant::now();
    let lease = Duration::from_secs(15);
    let s = |x: u64| t0 + Duration::from_secs(x);
    let mut f = Freeze::default();
    // The API answered 10 s ago and the store holds our renewal: fine.
    assert!(f.thawed(s(10), s(0), lease, true));
    // The store lags our renewal: kept, but nothing is frozen.
    assert!(!f.thawed(s(11), s(10), lease, false));
    assert!(!f.frozen);
    // 16 s without an answer: frozen.
    assert!(!f.thawed(s(16), s(0), lease, true));
    assert!(!f.thawed(s(40), s(0), lease, true));
    // Our renewal succeeds at 41: still frozen for a lease duration,
    // whatever the store holds (the others have not renewed yet).
    assert!(!f.thawed(s(41), s(41), lease, true));
    assert!(!f.thawed(s(50), s(50), lease, true));
    // A lease duration later, the watch still delivering its backlog
    // (our latest renewal not in the store): still frozen.
    assert!(!f.thawed(s(56), s(56), lease, false));
    assert!(!f.thawed(s(60), s(60), lease, false));
    // Caught up: thaws.
    assert!(f.thawed(s(61), s(60), lease, true));
    assert!(!f.frozen);
    assert!(f.thawed(s(62), s(60), lease, true));
    // Another outage, the watch current early: still a lease duration.
    assert!(!f.thawed(s(80), s(62), lease, true));
    assert!(!f.thawed(s(81), s(81), lease, true));
    assert!(!f.thawed(s(90), s(90), lease, true));
    assert!(f.thawed(s(96), s(96), lease, true));
}

#[test]
fn live_members_are_sorted_and_exclude_expired_and_foreign_leases() {
    let wall = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    let t0 = Instant::now();
    let leases: Vec<Arc<Lease>> = vec![
        Arc::new(lease("r2", Some(wall), 15, Some("b:1"))),
        Arc::new(lease("r1", Some(wall), 15, Some("a:1"))),
        Arc::new(lease("r3", Some(wall), 15, Some("c:1"))),
        Arc::new(lease("other", Some(wall), 15, None)),
    ];
    let mut seen = Sightings::default();
    // r3 last changed 100 s ago, r1 10 s ago, r2 now.
    let ago = |s: u64| t0 + Duration::from_secs(100 - s);
    seen.note(&leases[2], ago(100), wall, Duration::from_secs(600));
    seen.note(&leases[1], ago(10), wall, Duration::from_secs(600));
    seen.note(&leases[0], ago(0), wall, Duration::from_secs(600));
    let m = live_members(&leases, &seen, ago(0), Duration::from_secs(5));
    let ids: Vec<&str> = m.iter().map(|m| m.id.as_str()).collect();
    assert_eq!(ids, ["r1", "r2"]);
    assert_eq!(m[0].address, "a:1");
}
