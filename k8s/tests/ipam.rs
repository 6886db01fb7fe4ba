//! IpamDirectory against `relay-kube-standin`, a kube-apiserver stand-in
//! (real HTTPS, real list/watch framing), not a real apiserver, serving
//! Calico's BlockAffinities, Calico's IPAMConfigs and Cilium's CiliumNodes
//! only once a test installs their CRD (404 before, as on a cluster
//! without that CNI).

mod common;

use std::time::Duration;

use common::{count, setup, wait_until, BOUND};
use relay_kube::ipam::StrictAffinity;
use relay_kube::{IpamDirectory, IpamKind, IpamOptions, IpamState};
use relay_kube_standin::crds::{block_affinity, cilium_node, ipam_config};
use relay_kube_standin::{Crd, PolicyRule};
use relay_protocol::Cidr;
use relay_transport::test_log::Captured;

fn prefixes_of(dir: &IpamDirectory, node: &str) -> Vec<String> {
    dir.prefixes()
        .get(node)
        .map(|v| v.iter().map(Cidr::to_string).collect())
        .unwrap_or_default()
}

/// Confirmed, undeleted BlockAffinities give their node its block, from
/// the first list and then over the watch; pending, deleted and removed
/// ones do not.
#[tokio::test]
async fn calico_blocks_are_listed_then_watched() {
    let (standin, client) = setup().await;
    standin.install_crd(Crd::CalicoBlockAffinities);
    standin.upsert_custom(
        Crd::CalicoBlockAffinities,
        block_affinity("edge-1", "10.70.1.0/26", "confirmed", false),
    );
    standin.upsert_custom(
        Crd::CalicoBlockAffinities,
        block_affinity("edge-1", "10.70.1.64/26", "pending", false),
    );
    standin.upsert_custom(
        Crd::CalicoBlockAffinities,
        block_affinity("edge-2", "10.70.2.0/26", "confirmed", true),
    );
    let dir = IpamDirectory::spawn(&client, &IpamOptions::default());
    wait_until("settled", BOUND, || dir.is_settled()).await;
    assert_eq!(dir.state(IpamKind::CalicoBlockAffinity), IpamState::Listed);
    assert_eq!(dir.state(IpamKind::CiliumNode), IpamState::Absent);
    assert_eq!(prefixes_of(&dir, "edge-1"), ["10.70.1.0/26"]);
    assert!(prefixes_of(&dir, "edge-2").is_empty(), "deleted");

    // Watched: the pending block confirmed, a new node's block.
    standin.upsert_custom(
        Crd::CalicoBlockAffinities,
        block_affinity("edge-1", "10.70.1.64/26", "confirmed", false),
    );
    let edge3 = block_affinity("edge-3", "fd00:70:3::/122", "confirmed", false);
    let edge3_name = edge3["metadata"]["name"].as_str().unwrap().to_string();
    standin.upsert_custom(Crd::CalicoBlockAffinities, edge3);
    wait_until("watched", BOUND, || {
        prefixes_of(&dir, "edge-1") == ["10.70.1.0/26", "10.70.1.64/26"]
            && prefixes_of(&dir, "edge-3") == ["fd00:70:3::/122"]
    })
    .await;
    // Released, then deleted.
    standin.upsert_custom(
        Crd::CalicoBlockAffinities,
        block_affinity("edge-1", "10.70.1.0/26", "pendingDeletion", false),
    );
    assert!(standin.delete_custom(Crd::CalicoBlockAffinities, &edge3_name));
    wait_until("released and deleted", BOUND, || {
        prefixes_of(&dir, "edge-1") == ["10.70.1.64/26"] && prefixes_of(&dir, "edge-3").is_empty()
    })
    .await;
    assert!(count(&standin, "watch blockaffinities") >= 1);
    assert_eq!(dir.watch_errors(), 0);
}

/// A CiliumNode's `spec.ipam.podCIDRs` are its node's.
#[tokio::test]
async fn cilium_node_ranges_are_listed_then_watched() {
    let (standin, client) = setup().await;
    standin.install_crd(Crd::CiliumNodes);
    standin.upsert_custom(Crd::CiliumNodes, cilium_node("edge-1", &["10.0.1.0/24"]));
    let dir = IpamDirectory::spawn(&client, &IpamOptions::default());
    wait_until("settled", BOUND, || dir.is_settled()).await;
    assert_eq!(dir.state(IpamKind::CiliumNode), IpamState::Listed);
    assert_eq!(dir.state(IpamKind::CalicoBlockAffinity), IpamState::Absent);
    assert_eq!(prefixes_of(&dir, "edge-1"), ["10.0.1.0/24"]);
    standin.upsert_custom(
        Crd::CiliumNodes,
        cilium_node("edge-1", &["10.0.1.0/24", "fd00:1::/64"]),
    );
    wait_until("watched", BOUND, || {
        prefixes_of(&dir, "edge-1") == ["10.0.1.0/24", "fd00:1::/64"]
    })
    .await;
    standin.delete_custom(Crd::CiliumNodes, "edge-1");
    wait_until("deleted", BOUND, || dir.prefixes().is_empty()).await;
}

/// Without the CRDs: settled at once, no prefixes, no watch, no errors,
/// and no second probe before `retry` (30 s); a CRD installed later is
/// found by a later probe, and one removed drops its prefixes.
#[tokio::test]
async fn without_the_crds_nothing_is_watched_until_they_appear() {
    let (standin, client) = setup().await;
    let quiet = IpamDirectory::spawn(&client, &IpamOptions::default());
    wait_until("settled", BOUND, || quiet.is_settled()).await;
    assert_eq!(
        quiet.state(IpamKind::CalicoBlockAffinity),
        IpamState::Absent
    );
    assert_eq!(quiet.state(IpamKind::CiliumNode), IpamState::Absent);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(count(&standin, "list blockaffinities"), 1);
    assert_eq!(count(&standin, "list ciliumnodes"), 1);
    assert_eq!(count(&standin, "watch blockaffinities"), 0);
    assert_eq!((quiet.probes(), quiet.watch_errors()), (2, 0));
    assert!(quiet.last_error().is_none());
    drop(quiet);

    let opts = IpamOptions {
        rediscover: Duration::from_millis(500),
        ..IpamOptions::default()
    };
    let dir = IpamDirectory::spawn(&client, &opts);
    wait_until("settled", BOUND, || dir.is_settled()).await;
    standin.upsert_custom(
        Crd::CalicoBlockAffinities,
        block_affinity("edge-1", "10.70.1.0/26", "confirmed", false),
    );
    wait_until("found by a later probe", BOUND, || {
        prefixes_of(&dir, "edge-1") == ["10.70.1.0/26"]
    })
    .await;
    standin.remove_crd(Crd::CalicoBlockAffinities);
    wait_until("dropped with the CRD", BOUND, || dir.prefixes().is_empty()).await;
}

/// Through an API outage the last prefixes are kept.
#[tokio::test]
async fn an_outage_keeps_the_last_prefixes() {
    let (standin, client) = setup().await;
    standin.upsert_custom(Crd::CiliumNodes, cilium_node("edge-1", &["10.0.1.0/24"]));
    let dir = IpamDirectory::spawn(
        &client,
        &IpamOptions {
            watch_timeout_secs: 1,
            ..IpamOptions::default()
        },
    );
    wait_until("listed", BOUND, || prefixes_of(&dir, "edge-1").len() == 1).await;
    standin.set_unavailable(true);
    standin.inject_gone();
    wait_until("a watch error", BOUND, || dir.watch_errors() > 0).await;
    assert_eq!(prefixes_of(&dir, "edge-1"), ["10.0.1.0/24"]);
    standin.set_unavailable(false);
    standin.upsert_custom(Crd::CiliumNodes, cilium_node("edge-1", &["10.0.2.0/24"]));
    wait_until("back", BOUND, || {
        prefixes_of(&dir, "edge-1") == ["10.0.2.0/24"]
    })
    .await;
}

/// IpamOptions for the stray-404 tests: watches renewed every second (a
/// stray 404 is answered to a new request, not an open watch), probes
/// again after 200 ms, and `rediscover` left at its 5 minutes, which no
/// test outlasts.
fn quick_retry() -> IpamOptions {
    IpamOptions {
        watch_timeout_secs: 1,
        retry: Duration::from_millis(200),
        ..IpamOptions::default()
    }
}

/// The requests for `plural` from log index `from` on: (status, verb).
fn requests_for(
    standin: &relay_kube_standin::StandIn,
    from: usize,
    plural: &str,
) -> Vec<(u16, String)> {
    standin
        .requests_from(from)
        .into_iter()
        .filter(|r| r.path.ends_with(plural))
        .map(|r| (r.status, r.attrs.map(|a| a.verb).unwrap_or_default()))
        .collect()
}

/// A stray 404 to a watch of a CRD that still exists (kube-apiserver
/// answers one, e.g. after an etcd restart) keeps the prefixes, at every
/// moment, and the watch resumes after `retry`, not `rediscover`.
#[tokio::test]
async fn a_stray_404_keeps_the_prefixes() {
    let (standin, client) = setup().await;
    standin.upsert_custom(
        Crd::CalicoBlockAffinities,
        block_affinity("edge-1", "10.70.1.0/26", "confirmed", false),
    );
    let dir = IpamDirectory::spawn(&client, &quick_retry());
    wait_until("listed", BOUND, || {
        prefixes_of(&dir, "edge-1") == ["10.70.1.0/26"]
    })
    .await;
    let from = standin.request_count();
    standin.stray_not_found(Crd::CalicoBlockAffinities, 1);
    let deadline = tokio::time::Instant::now() + BOUND;
    loop {
        assert_eq!(
            prefixes_of(&dir, "edge-1"),
            ["10.70.1.0/26"],
            "kept through the stray 404"
        );
        assert_eq!(dir.state(IpamKind::CalicoBlockAffinity), IpamState::Listed);
        let seen = requests_for(&standin, from, "blockaffinities");
        let stray = seen.iter().position(|(status, _)| *status == 404);
        if stray.is_some_and(|i| seen[i + 1..].contains(&(200, "watch".to_string()))) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no watch after the stray 404 within {BOUND:?}: {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Followed again.
    standin.upsert_custom(
        Crd::CalicoBlockAffinities,
        block_affinity("edge-2", "10.70.2.0/26", "confirmed", false),
    );
    wait_until("watched again", BOUND, || {
        prefixes_of(&dir, "edge-2") == ["10.70.2.0/26"]
    })
    .await;
    assert_eq!(prefixes_of(&dir, "edge-1"), ["10.70.1.0/26"]);
}

/// A 404 to the watch confirmed by the next probe's 404 is a removed CRD:
/// the prefixes go. Looked for again after `retry`, it is found (here it
/// never went) and listed again.
#[tokio::test]
async fn a_404_confirmed_by_the_next_probe_drops_the_prefixes() {
    let (standin, client) = setup().await;
    standin.upsert_custom(
        Crd::CalicoBlockAffinities,
        block_affinity("edge-1", "10.70.1.0/26", "confirmed", false),
    );
    let dir = IpamDirectory::spawn(&client, &quick_retry());
    wait_until("listed", BOUND, || {
        prefixes_of(&dir, "edge-1") == ["10.70.1.0/26"]
    })
    .await;
    let from = standin.request_count();
    // The watch's next request, then the probe.
    standin.stray_not_found(Crd::CalicoBlockAffinities, 2);
    wait_until("dropped", BOUND, || dir.prefixes().is_empty()).await;
    let seen = requests_for(&standin, from, "blockaffinities");
    let verbs: Vec<&str> = seen
        .iter()
        .filter(|(status, _)| *status == 404)
        .map(|(_, v)| v.as_str())
        .collect();
    assert_eq!(
        verbs,
        ["watch", "list"],
        "dropped only after the probe's 404"
    );
    wait_until("found again after retry", BOUND, || {
        prefixes_of(&dir, "edge-1") == ["10.70.1.0/26"]
    })
    .await;
    assert_eq!(dir.state(IpamKind::CalicoBlockAffinity), IpamState::Listed);
}

/// A 404 to the first probe (a stray one: the CRD is there) is probed
/// again after `retry`, not after `rediscover`'s 5 minutes.
#[tokio::test]
async fn a_404_at_start_is_probed_again_soon() {
    let (standin, client) = setup().await;
    standin.upsert_custom(Crd::CiliumNodes, cilium_node("edge-1", &["10.0.1.0/24"]));
    standin.stray_not_found(Crd::CiliumNodes, 1);
    let dir = IpamDirectory::spawn(&client, &quick_retry());
    wait_until("settled", BOUND, || dir.is_settled()).await;
    wait_until("found by the second probe", BOUND, || {
        prefixes_of(&dir, "edge-1") == ["10.0.1.0/24"]
    })
    .await;
    let seen = requests_for(&standin, 0, "ciliumnodes");
    assert_eq!(seen[0], (404, "list".to_string()));
    assert_eq!(seen[1], (200, "list".to_string()));
}

/// IpamOptions for the strictAffinity tests: Calico's IPAMConfig read
/// again every 300 ms, 100 ms after a failed or unconfirmed read.
fn quick_reread() -> IpamOptions {
    IpamOptions {
        rediscover: Duration::from_millis(300),
        retry: Duration::from_millis(100),
        ..IpamOptions::default()
    }
}

/// (status, verb) of every request for Calico's IPAMConfig since `from`.
fn config_reads(standin: &relay_kube_standin::StandIn, from: usize) -> Vec<(u16, String)> {
    standin
        .requests_from(from)
        .into_iter()
        .filter(|r| r.path.contains("/ipamconfigs"))
        .map(|r| (r.status, r.attrs.map(|a| a.verb).unwrap_or_default()))
        .collect()
}

/// Calico's strictAffinity is read only once a confirmed block is known;
/// no IPAMConfig `default` (Calico's default, false) and `false` are
/// reported as letting nodes borrow, `true` is not, and a field left out
/// is false, as Calico reads it.
#[tokio::test]
async fn calico_strict_affinity_unset_or_false_is_reported_true_is_not() {
    let (standin, client) = setup().await;
    standin.install_crd(Crd::CalicoBlockAffinities);
    let dir = IpamDirectory::spawn(&client, &quick_reread());
    wait_until("settled", BOUND, || dir.is_settled()).await;
    // No block: Calico's IPAM is not in use here, nothing to read.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(dir.calico_strict_affinity(), StrictAffinity::Unused);
    assert!(config_reads(&standin, 0).is_empty());

    // A confirmed block, no IPAMConfig (nor its CRD): unset.
    standin.upsert_custom(
        Crd::CalicoBlockAffinities,
        block_affinity("edge-1", "10.70.1.0/26", "confirmed", false),
    );
    wait_until("unset", BOUND, || {
        dir.calico_strict_affinity() == StrictAffinity::Unset
    })
    .await;
    assert!(dir.calico_strict_affinity().lets_nodes_borrow());
    assert_eq!(config_reads(&standin, 0)[0], (404, "get".to_string()));

    standin.upsert_custom(Crd::CalicoIpamConfigs, ipam_config(Some(false)));
    wait_until("off", BOUND, || {
        dir.calico_strict_affinity() == StrictAffinity::Off
    })
    .await;
    assert!(dir.calico_strict_affinity().lets_nodes_borrow());

    standin.upsert_custom(Crd::CalicoIpamConfigs, ipam_config(Some(true)));
    wait_until("strict", BOUND, || {
        dir.calico_strict_affinity() == StrictAffinity::Strict
    })
    .await;
    assert!(!dir.calico_strict_affinity().lets_nodes_borrow());

    standin.upsert_custom(Crd::CalicoIpamConfigs, ipam_config(None));
    wait_until("field left out: off", BOUND, || {
        dir.calico_strict_affinity() == StrictAffinity::Off
    })
    .await;

    // The blocks are gone: nothing to report.
    standin.remove_crd(Crd::CalicoBlockAffinities);
    wait_until("unused", BOUND, || {
        dir.calico_strict_affinity() == StrictAffinity::Unused
    })
    .await;
    // Throughout, the block was routed as before.
    assert_eq!(dir.watch_errors(), 0);
}

/// Once the IPAMConfig was read, one 404 (a stray one, or the object
/// deleted) keeps what was read until a second read, `retry` later,
/// agrees; then it is unset.
#[tokio::test]
async fn a_deleted_calico_ipam_config_is_unset_after_a_second_404() {
    let (standin, client) = setup().await;
    standin.upsert_custom(
        Crd::CalicoBlockAffinities,
        block_affinity("edge-1", "10.70.1.0/26", "confirmed", false),
    );
    standin.upsert_custom(Crd::CalicoIpamConfigs, ipam_config(Some(true)));
    let dir = IpamDirectory::spawn(&client, &quick_reread());
    wait_until("strict", BOUND, || {
        dir.calico_strict_affinity() == StrictAffinity::Strict
    })
    .await;
    let from = standin.request_count();
    assert!(standin.delete_custom(Crd::CalicoIpamConfigs, "default"));
    let deadline = tokio::time::Instant::now() + BOUND;
    loop {
        let now = dir.calico_strict_affinity();
        let not_found = config_reads(&standin, from)
            .iter()
            .filter(|(status, _)| *status == 404)
            .count();
        match now {
            StrictAffinity::Strict => {}
            StrictAffinity::Unset => {
                assert!(not_found >= 2, "unset after {not_found} 404");
                break;
            }
            other => panic!("{other:?}"),
        }
        assert!(tokio::time::Instant::now() < deadline, "still {now:?}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// The warning lines `log` has captured that mention `what`.
fn warnings_about(log: &Captured, what: &str) -> Vec<String> {
    log.text()
        .lines()
        .filter(|l| l.contains("WARN") && l.contains(what))
        .map(str::to_string)
        .collect()
}

/// `list` and `watch` on both IPAM resources, as the manifests grant
/// them, and nothing on IPAMConfigs.
fn ipam_rules_without_ipam_configs() -> Vec<PolicyRule> {
    [
        ("crd.projectcalico.org", "blockaffinities"),
        ("cilium.io", "ciliumnodes"),
    ]
    .into_iter()
    .map(|(group, resource)| PolicyRule {
        api_groups: vec![group.into()],
        resources: vec![resource.into()],
        verbs: vec!["list".into(), "watch".into()],
        resource_names: vec![],
        non_resource_urls: vec![],
        namespace: None,
    })
    .collect()
}

/// Without RBAC for Calico's IPAMConfig: one warning naming what to
/// grant, however often it is read again (every `rediscover`, not in a
/// loop), and the blocks are served as before; granted, it is read.
#[tokio::test]
async fn a_forbidden_calico_ipam_config_is_warned_once_and_blocks_still_route() {
    let (standin, client) = setup().await;
    // The test's runtime has one thread, which polls the directory's tasks.
    let (log, _log) = Captured::start();
    standin.set_rbac(Some(ipam_rules_without_ipam_configs()));
    standin.upsert_custom(
        Crd::CalicoBlockAffinities,
        block_affinity("edge-1", "10.70.1.0/26", "confirmed", false),
    );
    standin.upsert_custom(Crd::CalicoIpamConfigs, ipam_config(Some(true)));
    let dir = IpamDirectory::spawn(&client, &quick_reread());
    wait_until("forbidden", BOUND, || {
        dir.calico_strict_affinity() == StrictAffinity::Forbidden
    })
    .await;
    assert_eq!(prefixes_of(&dir, "edge-1"), ["10.70.1.0/26"]);
    let from = standin.request_count();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let reads = config_reads(&standin, from);
    // Every 300 ms: about 5, never a tight loop.
    assert!(
        (2..=8).contains(&reads.len()) && reads.iter().all(|(s, v)| *s == 403 && v == "get"),
        "{reads:?}"
    );
    assert_eq!(dir.calico_strict_affinity(), StrictAffinity::Forbidden);
    assert_eq!(prefixes_of(&dir, "edge-1"), ["10.70.1.0/26"]);
    assert_eq!(dir.state(IpamKind::CalicoBlockAffinity), IpamState::Listed);
    let warned = warnings_about(&log, "ipamconfigs.crd.projectcalico.org");
    assert_eq!(warned.len(), 1, "{warned:?}");
    assert!(
        warned[0].contains("403") && warned[0].contains("strictAffinity"),
        "{}",
        warned[0]
    );

    // Granted (get on that one object): read, strict, no new warning.
    let mut rules = ipam_rules_without_ipam_configs();
    rules.push(PolicyRule {
        api_groups: vec!["crd.projectcalico.org".into()],
        resources: vec!["ipamconfigs".into()],
        verbs: vec!["get".into()],
        resource_names: vec!["default".into()],
        non_resource_urls: vec![],
        namespace: None,
    });
    standin.set_rbac(Some(rules));
    wait_until("strict", BOUND, || {
        dir.calico_strict_affinity() == StrictAffinity::Strict
    })
    .await;
    assert_eq!(
        warnings_about(&log, "ipamconfigs.crd.projectcalico.org").len(),
        1
    );
    assert_eq!(prefixes_of(&dir, "edge-1"), ["10.70.1.0/26"]);
}
