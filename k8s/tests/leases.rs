//! Relay replica membership from Leases, against `relay-kube-standin` (a
//! kube-apiserver stand-in on loopback, not a real apiserver): replicas
//! find each other, a stale Lease is ignored and then deleted, a replica
//! that stops renewing drops out, two processes with one id do not both
//! hold it, and the stand-in answers resourceVersion conflicts as the
//! apiserver does.

mod common;

use std::time::{Duration, SystemTime};

use common::{init_tracing, setup, wait_until, BOUND};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{DeleteParams, PostParams, Preconditions};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::Api;
use relay_kube::{MembershipOptions, ReplicaMembership, ADDRESS_ANNOTATION};
use relay_kube_standin::StandIn;

const NS: &str = "edge-relay";

/// Short timings so expiry happens within a test.
fn opts(id: &str, addr: &str) -> MembershipOptions {
    let mut o = MembershipOptions::new(NS, id, addr);
    o.lease_duration = Duration::from_secs(2);
    o.renew_every = Duration::from_millis(300);
    o.skew_margin = Duration::from_millis(500);
    o.gc_after = Duration::from_secs(2);
    o
}

fn ids(m: &ReplicaMembership) -> Vec<String> {
    m.members().into_iter().map(|m| m.id).collect()
}

fn stale_lease(name: &str, renewed_secs_ago: u64) -> Lease {
    let t = SystemTime::now() - Duration::from_secs(renewed_secs_ago);
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap();
    let ts = k8s_openapi::jiff::Timestamp::new(d.as_secs() as i64, 0).unwrap();
    Lease {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(NS.into()),
            annotations: Some(
                [(
                    ADDRESS_ANNOTATION.to_string(),
                    "198.18.0.99:8443".to_string(),
                )]
                .into(),
            ),
            ..ObjectMeta::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some(format!("{name}_dead")),
            lease_duration_seconds: Some(2),
            renew_time: Some(MicroTime(ts)),
            ..LeaseSpec::default()
        }),
    }
}

#[tokio::test]
async fn replicas_find_each_other_and_stale_leases_go() {
    let (standin, client) = setup().await;
    // A replica that died an hour ago and nobody cleaned up after.
    standin.upsert_lease(stale_lease("relay-old", 3600));
    let a = ReplicaMembership::spawn(&client, opts("relay-a", "198.18.0.1:8443"));
    let b = ReplicaMembership::spawn(&client, opts("relay-b", "198.18.0.2:8443"));
    wait_until("both replicas see both", BOUND, || {
        ids(&a) == ["relay-a", "relay-b"] && ids(&b) == ["relay-a", "relay-b"]
    })
    .await;
    assert_eq!(a.members()[1].address, "198.18.0.2:8443");
    // The stale one was never a member, and is collected.
    wait_until("the stale lease is deleted", BOUND, || {
        !standin.leases(NS).contains_key("relay-old")
    })
    .await;
    // The deleting replica counts it once the API has answered, which is
    // after the stand-in's store shows the Lease gone: wait for the count,
    // then give a second delete (which the preconditions must refuse) time
    // to show up.
    let collected = || {
        a.stats()
            .collected
            .load(std::sync::atomic::Ordering::Relaxed)
            + b.stats()
                .collected
                .load(std::sync::atomic::Ordering::Relaxed)
    };
    wait_until("the deletion is counted", BOUND, || collected() >= 1).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        collected(),
        1,
        "exactly one replica deleted it (preconditions)"
    );
    // The calls a replica makes, as the RBAC rules must allow them.
    let verbs: std::collections::BTreeSet<String> = standin
        .requests()
        .iter()
        .filter(|r| r.attrs.as_ref().is_some_and(|a| a.resource == "leases"))
        .map(|r| r.attrs.as_ref().unwrap().verb.clone())
        .collect();
    for v in ["get", "create", "update", "list", "watch", "delete"] {
        assert!(verbs.contains(v), "no {v} of leases in {verbs:?}");
    }
    // Renewal moves renewTime forward on the stored Lease.
    let renewed = |s: &StandIn| {
        s.leases(NS)["relay-b"]
            .spec
            .as_ref()
            .unwrap()
            .renew_time
            .clone()
            .unwrap()
            .0
    };
    let first = renewed(&standin);
    wait_until("relay-b renews", BOUND, || renewed(&standin) > first).await;

    // relay-b stops renewing (a SIGKILL leaves its Lease behind): it drops
    // out of relay-a's set after duration + margin, then is collected.
    drop(b);
    let t = std::time::Instant::now();
    wait_until("relay-b expires", BOUND, || ids(&a) == ["relay-a"]).await;
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(1500),
        "expired too early: {took:?}"
    );
    wait_until("relay-b's lease is collected", BOUND, || {
        !standin.leases(NS).contains_key("relay-b")
    })
    .await;

    // A graceful stop deletes the Lease at once.
    let c = ReplicaMembership::spawn(&client, opts("relay-c", "198.18.0.3:8443"));
    wait_until("relay-c joins", BOUND, || ids(&a) == ["relay-a", "relay-c"]).await;
    c.release().await.unwrap();
    wait_until("relay-c leaves at once", Duration::from_secs(2), || {
        ids(&a) == ["relay-a"]
    })
    .await;
}

#[tokio::test]
async fn two_processes_with_one_id_do_not_share_it() {
    let (standin, client) = setup().await;
    let first = ReplicaMembership::spawn(&client, opts("relay-a", "198.18.0.1:8443"));
    wait_until("first holds relay-a", BOUND, || ids(&first) == ["relay-a"]).await;
    let second = ReplicaMembership::spawn(&client, opts("relay-a", "198.18.0.7:8443"));
    wait_until("second notices the clash", BOUND, || {
        second
            .stats()
            .id_conflicts
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 2
    })
    .await;
    let lease = &standin.leases(NS)["relay-a"];
    assert_eq!(
        lease.spec.as_ref().unwrap().holder_identity.as_deref(),
        Some(first.holder())
    );
    assert_eq!(
        lease.metadata.annotations.as_ref().unwrap()[ADDRESS_ANNOTATION],
        "198.18.0.1:8443",
        "the second process never overwrote the address"
    );
    // Once the first is gone and its lease expired, the second takes over.
    drop(first);
    wait_until("second takes over", BOUND, || {
        standin.leases(NS)["relay-a"]
            .spec
            .as_ref()
            .unwrap()
            .holder_identity
            .as_deref()
            == Some(second.holder())
    })
    .await;
    wait_until("the set names the second's address", BOUND, || {
        second
            .members()
            .first()
            .is_some_and(|m| m.address == "198.18.0.7:8443")
    })
    .await;
}

#[tokio::test]
async fn the_standin_answers_lease_conflicts_like_the_apiserver() {
    init_tracing();
    let standin = StandIn::spawn().await.unwrap();
    let kc = Kubeconfig::read_from(standin.kubeconfig_path()).unwrap();
    let config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .unwrap();
    let api: Api<Lease> = Api::namespaced(kube::Client::try_from(config).unwrap(), NS);
    let pp = PostParams::default();
    let created = api.create(&pp, &stale_lease("x", 0)).await.unwrap();
    let code = |e: kube::Error| match e {
        kube::Error::Api(s) => s.code,
        e => panic!("not an API error: {e}"),
    };
    assert_eq!(
        code(api.create(&pp, &stale_lease("x", 0)).await.unwrap_err()),
        409
    );
    // Two writers read the same version; the second update loses.
    let mut w1 = api.get("x").await.unwrap();
    let mut w2 = w1.clone();
    w1.spec.as_mut().unwrap().holder_identity = Some("w1".into());
    w2.spec.as_mut().unwrap().holder_identity = Some("w2".into());
    let after = api.replace("x", &pp, &w1).await.unwrap();
    assert_eq!(code(api.replace("x", &pp, &w2).await.unwrap_err()), 409);
    assert_ne!(
        after.metadata.resource_version,
        created.metadata.resource_version
    );
    // A delete with a stale precondition is refused; with the current one
    // it goes through.
    let pre = |rv: Option<String>| DeleteParams {
        preconditions: Some(Preconditions {
            resource_version: rv,
            uid: None,
        }),
        ..DeleteParams::default()
    };
    assert_eq!(
        code(
            api.delete("x", &pre(created.metadata.resource_version.clone()))
                .await
                .unwrap_err()
        ),
        409
    );
    api.delete("x", &pre(after.metadata.resource_version.clone()))
        .await
        .unwrap();
    assert_eq!(code(api.get("x").await.unwrap_err()), 404);
    assert_eq!(code(api.replace("x", &pp, &w2).await.unwrap_err()), 404);
}

#[tokio::test]
async fn the_api_unreachable_longer_than_a_lease_keeps_the_last_set() {
    let (standin, client) = setup().await;
    let a = ReplicaMembership::spawn(&client, opts("relay-a", "198.18.0.1:8443"));
    let b = ReplicaMembership::spawn(&client, opts("relay-b", "198.18.0.2:8443"));
    wait_until("both see both", BOUND, || {
        ids(&a) == ["relay-a", "relay-b"] && ids(&b) == ["relay-a", "relay-b"]
    })
    .await;
    // Every request answers 503 for three lease durations: nobody can
    // renew, and by the clock every Lease expires; the set must not empty.
    standin.set_unavailable(true);
    let t = std::time::Instant::now();
    while t.elapsed() < Duration::from_secs(6) {
        assert_eq!(
            ids(&a),
            ["relay-a", "relay-b"],
            "set changed during the outage"
        );
        assert_eq!(
            ids(&b),
            ["relay-a", "relay-b"],
            "set changed during the outage"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        a.stats()
            .renew_errors
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0
    );
    standin.set_unavailable(false);
    // Back: renewals resume and the set is the live one again.
    let renewed = a
        .stats()
        .renewals
        .load(std::sync::atomic::Ordering::Relaxed);
    wait_until("renewals resume", BOUND, || {
        a.stats()
            .renewals
            .load(std::sync::atomic::Ordering::Relaxed)
            > renewed
    })
    .await;
    drop(b);
    wait_until("relay-b expires once the API is back", BOUND, || {
        ids(&a) == ["relay-a"]
    })
    .await;
}

/// The watch stalls while every other request is answered, as after a
/// network outage whose end the watch's TCP connection has not noticed
/// yet (retransmission backoff). Renewals succeed, but none reaches the
/// stores: judged by the clock, every Lease there (each replica's own
/// included) expires. The set must stay whole until the watch delivers its
/// backlog; a replica that really stops is still dropped afterwards.
#[tokio::test]
async fn a_stalled_watch_keeps_the_set_until_it_catches_up() {
    use std::sync::atomic::Ordering::Relaxed;
    let (standin, client) = setup().await;
    let a = ReplicaMembership::spawn(&client, opts("relay-a", "198.18.0.1:8443"));
    let b = ReplicaMembership::spawn(&client, opts("relay-b", "198.18.0.2:8443"));
    let both = ["relay-a", "relay-b"];
    wait_until("both see both", BOUND, || {
        ids(&a) == both && ids(&b) == both
    })
    .await;
    let renewed = a.stats().renewals.load(Relaxed);
    standin.hold_watches(true);
    let t = std::time::Instant::now();
    // Lease 2 s + margin 0.5 s: well past it.
    while t.elapsed() < Duration::from_secs(4) {
        let at = t.elapsed();
        assert_eq!(ids(&a), both, "relay-a's set {at:?} into a stalled watch");
        assert_eq!(ids(&b), both, "relay-b's set {at:?} into a stalled watch");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        a.stats().renewals.load(Relaxed) >= renewed + 5,
        "renewals went on while the watch stalled"
    );
    assert!(
        a.stats().store_behind.load(Relaxed) > 0,
        "the lag was noticed"
    );
    standin.hold_watches(false);
    let t = std::time::Instant::now();
    while t.elapsed() < Duration::from_secs(1) {
        assert_eq!(ids(&a), both, "relay-a's set as the backlog arrives");
        assert_eq!(ids(&b), both, "relay-b's set as the backlog arrives");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(b);
    wait_until("relay-b expires once the watch is current", BOUND, || {
        ids(&a) == ["relay-a"]
    })
    .await;
}

/// A renewal is stamped when its write goes out, not before a slow read
/// of the Lease: with reads taking 1.5 s, the renew time peers see was
/// 1.5 s old on arrival (a margin meant for clock skew spent on API
/// latency). Stand-in, not a real apiserver (see the module doc).
#[tokio::test]
async fn a_renewal_is_stamped_after_the_read() {
    let (standin, client) = setup().await;
    let mut o = opts("relay-a", "198.18.0.1:8443");
    o.renew_every = Duration::from_millis(200);
    o.lease_duration = Duration::from_secs(10);
    let _m = ReplicaMembership::spawn(&client, o);
    let renewed = || {
        standin
            .leases(NS)
            .get("relay-a")
            .and_then(|l| l.spec.as_ref()?.renew_time.clone())
    };
    wait_until("the first renewal", BOUND, || renewed().is_some()).await;
    standin.set_latency(Duration::from_millis(1500), Duration::ZERO);
    let first = renewed();
    // The next renewal to land after the reads slowed down: how old its
    // stamp is when it is seen (polled every 20 ms).
    let t = std::time::Instant::now();
    let seen = loop {
        assert!(t.elapsed() < BOUND, "no renewal with slow reads");
        let now = renewed();
        if now != first {
            break now.expect("a renew time");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let stamped = SystemTime::UNIX_EPOCH
        + Duration::from_secs(seen.0.as_second() as u64)
        + Duration::from_nanos(seen.0.subsec_nanosecond() as u64);
    let age = SystemTime::now()
        .duration_since(stamped)
        .unwrap_or_default();
    assert!(
        age < Duration::from_millis(800),
        "renew time {age:?} old when written"
    );
    standin.set_latency(Duration::ZERO, Duration::ZERO);
}
