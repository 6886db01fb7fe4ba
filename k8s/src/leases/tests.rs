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

#[test]
fn expiry_is_judged_with_the_skew_margin_and_collection_after_gc_after() {
    let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    let l = lease("r1", Some(t0), 15, Some("10.0.0.1:8443"));
    let (margin, gc) = (Duration::from_secs(5), Duration::from_secs(60));
    let at = |s: u64| {
        judge(&l, t0 + Duration::from_secs(s), margin, gc)
            .unwrap()
            .1
    };
    assert_eq!(at(0), LeaseState::Live);
    // Past its duration, but within the margin a fast clock could explain.
    assert_eq!(at(19), LeaseState::Live);
    assert_eq!(at(20), LeaseState::Expired);
    assert_eq!(at(74), LeaseState::Expired);
    assert_eq!(at(75), LeaseState::Collectable);
    // A renew time in our future (the holder's clock runs ahead) is live.
    assert_eq!(
        judge(&l, t0 - Duration::from_secs(30), margin, gc)
            .unwrap()
            .1,
        LeaseState::Live
    );
    // Never renewed: nothing to judge by, collect it.
    let never = lease("r2", None, 15, Some("x:1"));
    assert_eq!(
        judge(&never, t0, margin, gc).unwrap().1,
        LeaseState::Collectable
    );
    // Not a replica Lease: ignored entirely.
    assert!(judge(&lease("kube-scheduler", Some(t0), 15, None), t0, margin, gc).is_none());
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
    let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    let leases: Vec<Arc<Lease>> = vec![
        Arc::new(lease("r2", Some(t0), 15, Some("b:1"))),
        Arc::new(lease(
            "r1",
            Some(t0 - Duration::from_secs(10)),
            15,
            Some("a:1"),
        )),
        Arc::new(lease(
            "r3",
            Some(t0 - Duration::from_secs(100)),
            15,
            Some("c:1"),
        )),
        Arc::new(lease("other", Some(t0), 15, None)),
    ];
    let m = live_members(&leases, t0, Duration::from_secs(5));
    let ids: Vec<&str> = m.iter().map(|m| m.id.as_str()).collect();
    assert_eq!(ids, ["r1", "r2"]);
    assert_eq!(m[0].address, "a:1");
}
