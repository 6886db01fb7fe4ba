//! Relay replica membership from Leases, against `relay-kube-standin` (a
//! kube-apiserver stand-in on loopback, not a real apiserver): replicas
//! find each other, a stale Lease is ignored and then deleted, a replica
//! that stops renewing drops out, two processes with one id do not both
//! hold it, replicas never drop one another with slow API calls or skewed
//! clocks, a held Lease is renewed without reading it, and the stand-in
//! answers resourceVersion conflicts as the apiserver does.

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
/// 1.5 s old on arrival. A held Lease is renewed without a read, so the
/// read is brought about by a conflict (someone else's write). Stand-in,
/// not a real apiserver (see the module doc).
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
    // Rewritten as it is: relay-a's next update is refused (409) and it
    // reads the Lease before writing it again.
    standin.upsert_lease(standin.leases(NS)["relay-a"].clone());
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

/// Every read and every write of the API taking 1 s (an apiserver queueing
/// requests under load; scaled with the 2 s Leases and 0.5 s margin here,
/// as 8 s calls would be against the default 15 s + 5 s): three replicas
/// never drop one another over several renewal rounds, and one that stops
/// is still dropped in time. Judged by the holders' written renew times,
/// each renewal arriving a call's latency after its stamp and the rounds
/// spaced by a read and a write, a peer's Lease looked up to three
/// latencies old (3 s against 2.5 s) before its next renewal landed; and
/// a loop that waited for its renewal before reading the watch fell ever
/// further behind it, so the set was never published again (a stopped
/// replica stayed in it). Stand-in, not a real apiserver (see the module
/// doc).
#[tokio::test]
async fn replicas_never_drop_each_other_while_every_call_is_slow() {
    use std::sync::atomic::Ordering::Relaxed;
    let (standin, client) = setup().await;
    let all = ["relay-a", "relay-b", "relay-c"];
    let mut ms: Vec<ReplicaMembership> = all
        .iter()
        .enumerate()
        .map(|(i, id)| {
            let mut o = opts(id, &format!("198.18.0.{}:8443", i + 1));
            // Nothing to collect here: deletes would be slow calls too.
            o.gc_after = Duration::from_secs(600);
            ReplicaMembership::spawn(&client, o)
        })
        .collect();
    wait_until("every replica sees every replica", BOUND, || {
        ms.iter().all(|m| ids(m) == all)
    })
    .await;
    // Every change of a set, however brief, marks its receiver changed.
    let mut sets: Vec<_> = ms.iter().map(ReplicaMembership::subscribe).collect();
    for rx in &mut sets {
        rx.borrow_and_update();
    }
    let latency = Duration::from_secs(1);
    standin.set_latency(latency, latency);
    let renewed = ms[0].stats().renewals.load(Relaxed);
    let t = std::time::Instant::now();
    while t.elapsed() < Duration::from_secs(8) {
        for (m, rx) in ms.iter().zip(&sets) {
            let at = t.elapsed();
            assert!(
                !rx.has_changed().unwrap(),
                "{}'s set changed {at:?} into 1 s calls (now {:?})",
                m.holder(),
                ids(m)
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        ms[0].stats().renewals.load(Relaxed) >= renewed + 3,
        "several renewal rounds went by"
    );
    // relay-c stops renewing: the others drop it after 2 s + 0.5 s of
    // seeing no change (plus up to a call for the set to be published),
    // and never each other: each set changes once, to the two, and stays.
    drop(ms.pop());
    sets.pop();
    let stopped = std::time::Instant::now();
    let two = ["relay-a", "relay-b"];
    let mut dropped = [None, None];
    while stopped.elapsed() < Duration::from_secs(6) {
        let at = stopped.elapsed();
        for (i, rx) in sets.iter_mut().enumerate() {
            if !rx.has_changed().unwrap() {
                continue;
            }
            let set: Vec<String> = rx
                .borrow_and_update()
                .iter()
                .map(|m| m.id.clone())
                .collect();
            assert!(
                set == two && dropped[i].is_none(),
                "set {i} changed to {set:?} {at:?} after relay-c stopped"
            );
            dropped[i] = Some(at);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for at in dropped {
        let at = at.expect("relay-c still listed 6 s after it stopped");
        assert!(
            at >= Duration::from_millis(1500) && at < Duration::from_secs(5),
            "relay-c dropped {at:?} after it stopped"
        );
    }
    for m in &ms {
        assert_eq!(m.stats().renew_errors.load(Relaxed), 0, "no call timed out");
    }
    standin.set_latency(Duration::ZERO, Duration::ZERO);
}

/// A peer whose clock runs a minute behind ours, and one whose clock runs
/// a minute ahead: each is a member while its Lease keeps changing, and
/// each is dropped a lease duration plus the margin after it stops, by our
/// clock. (The peers are the test writing their Leases, renewTime stamped
/// by their skewed clocks.) Judged by the written renew time, the one
/// behind was never a member and the one ahead outlived its renewals by
/// the minute.
#[tokio::test]
async fn peers_with_skewed_clocks_are_judged_by_when_their_leases_change() {
    let (standin, client) = setup().await;
    let a = ReplicaMembership::spawn(&client, opts("relay-a", "198.18.0.1:8443"));
    let peer = |name: &str, ahead: bool| {
        let now = SystemTime::now();
        let skew = Duration::from_secs(60);
        let stamped = if ahead { now + skew } else { now - skew };
        let d = stamped.duration_since(SystemTime::UNIX_EPOCH).unwrap();
        let ts =
            k8s_openapi::jiff::Timestamp::new(d.as_secs() as i64, d.subsec_micros() as i32 * 1000)
                .unwrap();
        let mut l = stale_lease(name, 0);
        let spec = l.spec.as_mut().unwrap();
        spec.holder_identity = Some(format!("{name}_skewed"));
        spec.renew_time = Some(MicroTime(ts));
        l
    };
    let renew_peers = || {
        standin.upsert_lease(peer("relay-behind", false));
        standin.upsert_lease(peer("relay-ahead", true));
    };
    let all = ["relay-a", "relay-ahead", "relay-behind"];
    let t = std::time::Instant::now();
    loop {
        assert!(
            t.elapsed() < BOUND,
            "the skewed peers never joined: {:?}",
            ids(&a)
        );
        renew_peers();
        if ids(&a) == all {
            break;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // Renewing every 0.3 s for longer than a lease: they stay (the set
    // never changes, however briefly).
    let mut set = a.subscribe();
    set.borrow_and_update();
    let t = std::time::Instant::now();
    while t.elapsed() < Duration::from_secs(4) {
        renew_peers();
        for _ in 0..15 {
            assert!(
                !set.has_changed().unwrap(),
                "a renewing skewed peer was dropped: {:?}",
                ids(&a)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    // They stop: both leave after 2 s + 0.5 s by our clock, not before 2 s.
    let stopped = std::time::Instant::now();
    wait_until("the stopped peers leave", BOUND, || ids(&a) == ["relay-a"]).await;
    let took = stopped.elapsed();
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(4),
        "dropped {took:?} after their last renewal"
    );
}

/// While a replica holds its Lease a renewal is one update, carrying the
/// resourceVersion of its own last write: no read before it (a read per
/// round doubled the time a renewal took on a slow API). It reads the
/// Lease only when the update is refused: 409 (someone else wrote it; still
/// ours, so renewed at once) or 404 (deleted; created again). The set never
/// changes meanwhile.
#[tokio::test]
async fn a_held_lease_is_renewed_without_reading_it_until_a_conflict_or_a_deletion() {
    use std::sync::atomic::Ordering::Relaxed;
    let (standin, client) = setup().await;
    let a = ReplicaMembership::spawn(&client, opts("relay-a", "198.18.0.1:8443"));
    wait_until("relay-a holds its lease", BOUND, || ids(&a) == ["relay-a"]).await;
    let mut set = a.subscribe();
    set.borrow_and_update();
    let calls = |from: usize, verb: &str| {
        standin
            .requests_from(from)
            .iter()
            .filter_map(|r| r.attrs.as_ref())
            .filter(|x| x.resource == "leases" && x.verb == verb)
            // A create names the Lease in its body only.
            .filter(|x| x.name.as_deref().unwrap_or("relay-a") == "relay-a")
            .count()
    };
    let from = standin.request_count();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(calls(from, "update") >= 3, "renewals went on");
    assert_eq!(
        calls(from, "get"),
        0,
        "a held lease was read before renewal"
    );

    // Someone else writes it (same holder: a kubectl edit, say): the next
    // update is a 409, then one read, and the Lease is renewed again.
    let conflicts = a.stats().rv_conflicts.load(Relaxed);
    let from = standin.request_count();
    let lease = standin.leases(NS)["relay-a"].clone();
    standin.upsert_lease(lease);
    wait_until("a 409, then a renewal", BOUND, || {
        a.stats().rv_conflicts.load(Relaxed) > conflicts && calls(from, "update") >= 3
    })
    .await;
    assert_eq!(calls(from, "get"), 1, "one read after the conflict");
    let holder = |s: &StandIn| {
        s.leases(NS)
            .get("relay-a")
            .and_then(|l| l.spec.as_ref()?.holder_identity.clone())
    };
    assert_eq!(holder(&standin).as_deref(), Some(a.holder()));

    // Deleted: the next update is a 404, then a read (404) and a create.
    let kc = Kubeconfig::read_from(standin.kubeconfig_path()).unwrap();
    let config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .unwrap();
    let api: Api<Lease> = Api::namespaced(kube::Client::try_from(config).unwrap(), NS);
    let from = standin.request_count();
    api.delete("relay-a", &DeleteParams::default())
        .await
        .unwrap();
    wait_until("relay-a creates its lease again", BOUND, || {
        calls(from, "create") == 1 && holder(&standin).as_deref() == Some(a.holder())
    })
    .await;
    assert_eq!(calls(from, "get"), 1, "one read after the deletion");
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(calls(from, "get"), 1, "renewed without reading it again");
    // The watch delivers the new Lease: the store keeps up with our
    // renewals (a round may find one in flight, not three in a row).
    let behind = a.stats().store_behind.load(Relaxed);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert!(
        a.stats().store_behind.load(Relaxed) <= behind + 1,
        "the store lags our renewals of the new Lease"
    );
    assert!(
        !set.has_changed().unwrap(),
        "the set changed: {:?}",
        ids(&a)
    );
}
