//! The Lease Role of `deploy/kubernetes/components/replicas` against the
//! calls Lease membership really makes.
//!
//! Runs against `relay-kube-standin` enforcing RBAC — NOT a real
//! apiserver: the base's rules (`deploy/kubernetes/base/rbac.yaml`: the
//! ClusterRole and the Role in the edge namespace) plus the component's
//! Role; a Role's rules match only in its namespace (as a RoleBinding
//! grants them). Two relay replicas in
//! Kubernetes mode reach it through an ordinary kubeconfig, so the
//! production client path is the one checked.
//!
//! 1. With exactly the manifests' rules, the whole membership lifecycle
//!    passes with zero 403s: both replicas create their Leases, renew them,
//!    list and watch the namespace's and see each other; a dead replica's
//!    expired Lease is collected; a graceful stop deletes its own Lease.
//! 2. With any one verb of the Role removed, the same lifecycle sees at
//!    least one 403 (and, for every verb but `watch`, a step does not
//!    happen within its bound; without `watch` the reflector limps on
//!    relists): no verb is unused.

use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, ensure, Context, Result};
use relay_kube_standin::k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use relay_kube_standin::k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use relay_kube_standin::{cluster_role_rules, role_rules, PolicyRule, StandIn};
use relay_server::config::KubeSettings;
use relay_server::replicas::{LeaseSettings, ReplicaSettings, ReplicaSource};
use relay_server::{Relay, RelayConfig};
use relay_transport::devcerts::DevPki;

const BASE_RBAC: &str = include_str!("../../deploy/kubernetes/base/rbac.yaml");
const LEASE_RBAC: &str =
    include_str!("../../deploy/kubernetes/components/replicas/rbac-leases.yaml");
const NS: &str = "edge-relay";
/// Each step of the lifecycle must happen within this.
const BOUND: Duration = Duration::from_secs(6);

fn manifest_rules() -> Result<Vec<PolicyRule>> {
    let mut rules = cluster_role_rules(BASE_RBAC, "edge-relay:relay-server")?;
    rules.extend(role_rules(BASE_RBAC, "edge-relay:relay-server")?);
    let role = role_rules(LEASE_RBAC, "edge-relay:replicas")?;
    ensure!(
        role.iter().all(|r| r.namespace.as_deref() == Some(NS)),
        "the Lease Role must be in {NS}"
    );
    rules.extend(role);
    Ok(rules)
}

async fn replica(standin: &StandIn, pki: &DevPki, id: &str) -> Result<Relay> {
    let mut cfg = RelayConfig::loopback(pki.relay_material()?);
    let port = std::net::UdpSocket::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    cfg.relay_id = id.into();
    cfg.quic_listen = addr;
    cfg.tcp_fallback = false;
    cfg.limits.drain_grace = Duration::from_millis(100);
    cfg.kubernetes = Some(KubeSettings {
        edge_address_ranges: relay_lab::loopback_node_ranges(),
        kubeconfig: Some(standin.kubeconfig_path().to_path_buf()),
        api_timeout: Duration::from_secs(2),
        node_status: false,
        events: false,
        services: false,
        ..KubeSettings::default()
    });
    cfg.replicas = Some(ReplicaSettings {
        advertise: addr.to_string(),
        source: ReplicaSource::Leases(LeaseSettings {
            namespace: NS.into(),
            lease_duration: Duration::from_secs(2),
            renew_every: Duration::from_millis(300),
            skew_margin: Duration::from_secs(1),
            gc_after: Duration::from_secs(3),
        }),
    });
    Ok(Relay::spawn(cfg).await?)
}

async fn eventually(what: &str, mut f: impl FnMut() -> bool) -> Result<()> {
    let t = Instant::now();
    while t.elapsed() < BOUND {
        if f() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("{what}: not within {BOUND:?}")
}

/// The membership lifecycle under `rules`; returns how it ended and the
/// 403s seen.
async fn lifecycle(rules: Vec<PolicyRule>) -> Result<(Result<()>, usize)> {
    relay_lab::init();
    let standin = StandIn::spawn_with_rbac(rules).await?;
    // A replica that died long ago: its Lease is to be collected.
    let long_ago = SystemTime::now() - Duration::from_secs(60);
    standin.upsert_lease(Lease {
        metadata: ObjectMeta {
            name: Some("relay-dead".into()),
            namespace: Some(NS.into()),
            annotations: Some(
                [(
                    relay_kube::ADDRESS_ANNOTATION.to_string(),
                    "127.0.0.1:9".to_string(),
                )]
                .into(),
            ),
            ..ObjectMeta::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some("relay-dead_1".into()),
            lease_duration_seconds: Some(2),
            renew_time: Some(MicroTime(long_ago.try_into()?)),
            ..LeaseSpec::default()
        }),
    });
    let pki = DevPki::generate(&["localhost"], &["edge-0"])?;
    let mut relays = Vec::new();
    let outcome = async {
        for id in ["relay-a", "relay-b"] {
            relays.push(replica(&standin, &pki, id).await?);
        }
        let set = |r: &Relay| -> Vec<String> {
            r.shared()
                .replicas
                .borrow()
                .iter()
                .map(|x| x.id.clone())
                .collect()
        };
        eventually("both replicas in both sets (create, list, watch)", || {
            relays.iter().all(|r| set(r) == ["relay-a", "relay-b"])
        })
        .await?;
        let renewed = |name: &str| {
            standin
                .leases(NS)
                .get(name)
                .and_then(|l| l.metadata.resource_version.clone())
        };
        let first = renewed("relay-a");
        eventually("relay-a's Lease renewed (update)", || {
            renewed("relay-a") != first
        })
        .await?;
        eventually("the dead replica's Lease collected (delete)", || {
            !standin.leases(NS).contains_key("relay-dead")
        })
        .await?;
        let a = relays.remove(0);
        a.shutdown(Duration::from_millis(100)).await;
        ensure!(
            !standin.leases(NS).contains_key("relay-a"),
            "relay-a's Lease outlived its graceful stop (get, delete)"
        );
        Ok(())
    }
    .await;
    for r in relays {
        r.shutdown(Duration::from_millis(100)).await;
    }
    let forbidden = standin
        .forbidden()
        .iter()
        .filter(|r| r.path.contains("/leases"))
        .count();
    Ok((outcome, forbidden))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lease_role_allows_the_whole_membership_lifecycle() -> Result<()> {
    let (outcome, forbidden) = lifecycle(manifest_rules()?).await?;
    outcome.context("with the manifests' rules")?;
    ensure!(forbidden == 0, "{forbidden} Lease requests answered 403");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_verb_of_the_lease_role_is_needed() -> Result<()> {
    let rules = manifest_rules()?;
    let idx = rules
        .iter()
        .position(|r| r.resources == ["leases"])
        .context("no Lease rule")?;
    let verbs = rules[idx].verbs.clone();
    ensure!(!verbs.is_empty());
    // All at once: each run has its own stand-in, and a failing run waits
    // out its step's bound.
    let runs = verbs.iter().map(|v| {
        let mut r = rules.clone();
        r[idx].verbs.retain(|x| x != v);
        let v = v.clone();
        async move { (v, lifecycle(r).await) }
    });
    for (verb, run) in futures::future::join_all(runs).await {
        let (outcome, forbidden) = run?;
        println!(
            "without {verb:>6}: {} ({forbidden} Lease requests 403)",
            match &outcome {
                Ok(()) => "lifecycle passed".to_string(),
                Err(e) => format!("{e:#}"),
            }
        );
        // The code calls it: denied, it is answered 403. (Without `watch`
        // the reflector still gets by on relists after each refusal, so
        // the steps may pass, late; the 403s are the failure.)
        ensure!(
            forbidden > 0,
            "no Lease request was refused without {verb}: the verb is unused"
        );
    }
    Ok(())
}
