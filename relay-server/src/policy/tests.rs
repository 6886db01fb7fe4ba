//! The policy's decision table, communities from the config, labels and
//! wildcards, the relay's own listeners, and denials as stream replies.

use super::*;

fn policy() -> Policy {
    let groups = HashMap::from([
        (
            "north".to_string(),
            vec!["edge-1".to_string(), "edge-2".to_string()],
        ),
        ("south".to_string(), vec!["edge-3".to_string()]),
    ]);
    let p = Policy::new(
        vec![
            "10.96.0.0/12".parse().unwrap(),
            "10.244.0.0/24".parse().unwrap(),
        ],
        Communities::new(&groups),
    );
    p.add_own_listener("10.244.0.1:8443".parse().unwrap());
    p.add_own_listener("127.0.0.1:9090".parse().unwrap());
    p.add_own_listener("0.0.0.0:15001".parse().unwrap());
    // A cloud worker added after start: its pod CIDR, outside
    // tunnel_routes, joined from the directory (see `cloud_nodes`).
    p.set_cloud_nodes(&[WORKER.parse().unwrap()], |_| None);
    p
}

/// The pod CIDR of a cloud worker that joined after start.
const WORKER: &str = "10.245.3.0/24";

/// The table: origin, target, owner → verdict or reason.
#[test]
fn decision_table() {
    use DenyReason::*;
    use Verdict::*;
    let p = policy();
    type Row<'a> = (
        Origin<'a>,
        &'a str,
        Option<&'a str>,
        Result<Verdict, DenyReason>,
    );
    let rows: &[Row] = &[
        // Cloud ingress reaches edges; CONNECT also the cloud ranges (see
        // `connect_reaches_the_cloud_but_never_an_edge_without_a_session`
        // for cloud Nodes), captured traffic nothing else.
        (Origin::Connect, "10.244.7.5:80", Some("edge-1"), Ok(ToEdge)),
        (
            Origin::Captured,
            "10.244.7.5:53",
            Some("edge-1"),
            Ok(ToEdge),
        ),
        (Origin::Connect, "10.96.0.10:443", None, Ok(ToCloud)),
        (Origin::Captured, "10.96.0.10:443", None, Err(NoRoute)),
        (Origin::Connect, "10.244.0.1:8443", None, Err(RelayItself)),
        (Origin::Connect, "10.0.0.9:10250", None, Err(NoRoute)),
        (Origin::Connect, "127.0.0.1:10250", None, Err(NoRoute)),
        (Origin::Connect, "[::ffff:127.0.0.1]:22", None, Err(NoRoute)),
        // An edge that claims a loopback address serves its own.
        (Origin::Connect, "127.0.0.2:80", Some("edge-1"), Ok(ToEdge)),
        // Edge to cloud: inside tunnel_routes only.
        (Origin::Edge("edge-1"), "10.96.0.10:53", None, Ok(ToCloud)),
        (Origin::Edge("edge-1"), "10.244.0.9:80", None, Ok(ToCloud)),
        (
            Origin::Edge("edge-1"),
            "10.0.0.1:80",
            None,
            Err(OutsideCloudRanges),
        ),
        (
            Origin::Edge("edge-1"),
            "8.8.8.8:53",
            None,
            Err(OutsideCloudRanges),
        ),
        // A cloud Node's own pod range joined the cloud ranges: edges and
        // CONNECT reach it, captured traffic does not; its neighbour
        // range (no Node's) stays outside.
        (Origin::Edge("edge-1"), "10.245.3.9:80", None, Ok(ToCloud)),
        (Origin::Connect, "10.245.3.9:80", None, Ok(ToCloud)),
        (Origin::Captured, "10.245.3.9:80", None, Err(NoRoute)),
        (
            Origin::Edge("edge-1"),
            "10.245.4.9:80",
            None,
            Err(OutsideCloudRanges),
        ),
        (Origin::Connect, "10.245.4.9:80", None, Err(NoRoute)),
        // Never the relay itself, in any spelling.
        (
            Origin::Edge("edge-1"),
            "127.0.0.1:9090",
            None,
            Err(ForbiddenAddress),
        ),
        (
            Origin::Edge("edge-1"),
            "[::1]:9090",
            None,
            Err(ForbiddenAddress),
        ),
        (
            Origin::Edge("edge-1"),
            "[::ffff:127.0.0.1]:9090",
            None,
            Err(ForbiddenAddress),
        ),
        (
            Origin::Edge("edge-1"),
            "169.254.169.254:80",
            None,
            Err(ForbiddenAddress),
        ),
        (
            Origin::Edge("edge-1"),
            "[fe80::1]:80",
            None,
            Err(ForbiddenAddress),
        ),
        (
            Origin::Edge("edge-1"),
            "0.0.0.0:80",
            None,
            Err(ForbiddenAddress),
        ),
        (
            Origin::Edge("edge-1"),
            "224.0.0.1:5353",
            None,
            Err(ForbiddenAddress),
        ),
        (
            Origin::Edge("edge-1"),
            "255.255.255.255:67",
            None,
            Err(ForbiddenAddress),
        ),
        (
            Origin::Edge("edge-1"),
            "10.244.0.1:8443",
            None,
            Err(RelayItself),
        ),
        (
            Origin::Edge("edge-1"),
            "[::ffff:10.244.0.1]:8443",
            None,
            Err(RelayItself),
        ),
        // The relay's own address on another port is an ordinary cloud target.
        (
            Origin::Edge("edge-1"),
            "10.244.0.1:10250",
            None,
            Ok(ToCloud),
        ),
        // Edge to edge: only within a community, never to itself.
        (
            Origin::Edge("edge-1"),
            "10.244.8.5:80",
            Some("edge-2"),
            Ok(ToEdge),
        ),
        (
            Origin::Edge("edge-2"),
            "10.244.7.5:80",
            Some("edge-1"),
            Ok(ToEdge),
        ),
        (
            Origin::Edge("edge-1"),
            "10.244.9.5:80",
            Some("edge-3"),
            Err(NoCommunity),
        ),
        (
            Origin::Edge("edge-9"),
            "10.244.7.5:80",
            Some("edge-1"),
            Err(NoCommunity),
        ),
        (
            Origin::Edge("edge-1"),
            "10.244.7.5:80",
            Some("edge-1"),
            Err(OwnRoute),
        ),
        // Service endpoints the relay picked: any edge (no community
        // needed, even the asking edge's own), any cloud address, never
        // the relay's own host.
        (Origin::Service, "10.244.8.5:80", Some("edge-2"), Ok(ToEdge)),
        (Origin::Service, "10.244.1.2:80", None, Ok(ToCloud)),
        (Origin::Service, "10.0.0.9:443", None, Ok(ToCloud)),
        (
            Origin::Service,
            "127.0.0.1:9090",
            None,
            Err(ForbiddenAddress),
        ),
        (
            Origin::Service,
            "[::ffff:169.254.1.1]:80",
            None,
            Err(ForbiddenAddress),
        ),
    ];
    let mut wrong = Vec::new();
    for (origin, target, owner, want) in rows {
        let t = canonical(target.parse().unwrap());
        let got = p
            .authorize(*origin, t, Proto::Tcp, *owner, &Claim::Nobody)
            .map_err(|d| d.reason);
        if got != *want {
            wrong.push(format!(
                "{origin:?} → {target} (owner {owner:?}): got {got:?}, want {want:?}"
            ));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn label_communities_join_nodes_and_share_names_with_the_config() {
    let cfg = Communities::new(&HashMap::from([(
        "shops".to_string(),
        vec!["a".to_string()],
    )]));
    let p = Policy::new(vec![], cfg);
    assert!(!p.edges_may_talk("a", "b"));
    let e0 = p.epoch();
    let labels = HashMap::from([
        ("b".to_string(), BTreeSet::from(["shops".to_string()])),
        ("c".to_string(), BTreeSet::from(["depot".to_string()])),
        ("d".to_string(), BTreeSet::from(["depot".to_string()])),
    ]);
    assert!(p.set_label_communities(labels.clone()));
    assert!(p.epoch() > e0);
    assert!(
        p.edges_may_talk("a", "b") && p.edges_may_talk("b", "a"),
        "same name as the config's"
    );
    assert!(p.edges_may_talk("c", "d") && !p.edges_may_talk("a", "c"));
    assert!(!p.set_label_communities(labels), "unchanged: no new epoch");
    p.set_label_communities(HashMap::new());
    assert!(!p.edges_may_talk("c", "d"), "label removed");
}

#[test]
fn a_wildcard_community_joins_every_edge_and_none_isolates() {
    let all = Communities::new(&HashMap::from([("all".to_string(), vec!["*".to_string()])]));
    assert!(all.share("a", "b"));
    let none = Communities::new(&HashMap::new());
    assert!(none.is_empty() && !none.share("a", "b"));
    let p = Policy::new(vec![], all);
    assert!(p.edges_may_talk("a", "b") && !p.edges_may_talk("a", "a"));
}

#[test]
fn a_wildcard_listener_covers_every_local_address_only() {
    let p = policy();
    // 127.0.0.1 is local, but forbidden anyway; the capture port on a
    // non-local address is someone else's service.
    assert!(p.is_relay_itself("127.0.0.1:15001".parse().unwrap()));
    assert!(!p.is_relay_itself("10.96.0.10:15001".parse().unwrap()));
}

/// An edge's stream to an address another edge claims, with no session
/// serving it (that edge offline), is not dialled by the relay in the
/// cloud network, even inside the cloud ranges.
#[test]
fn an_edge_never_reaches_an_offline_edges_address_through_the_cloud() {
    let p = policy();
    let t = canonical("10.244.0.9:80".parse().unwrap());
    let ask = |claim: &Claim| {
        p.authorize(Origin::Edge("edge-1"), t, Proto::Tcp, None, claim)
            .map_err(|d| d.reason)
    };
    assert_eq!(ask(&Claim::Nobody), Ok(Verdict::ToCloud));
    assert_eq!(ask(&Claim::Edge("edge-2".into())), Err(DenyReason::NoRoute));
}

#[test]
fn denials_map_to_stream_statuses() {
    let d = Denied::new(DenyReason::NoRoute, "x".into());
    assert_eq!(d.reply().status, StreamStatus::NoRoute);
    // The status names the reason already: not repeated in the message
    // (CONNECT said `502 Bad Gateway: no_route: no_route: ...`).
    assert_eq!(d.reply().message, "x");
    let d = Denied::new(DenyReason::NoCommunity, "x".into());
    assert_eq!(d.reply().status, StreamStatus::Denied);
    assert!(d.reply().message.starts_with("no_community: "));
}

/// A CONNECT no session serves (the apiserver's egress selector sends it
/// every kubelet and pod call): a cloud Node's address or pod CIDR is
/// dialled by the relay, except its own listeners; an address an edge
/// node claims never is, connected or not; anything else is unrouted.
#[test]
fn connect_reaches_the_cloud_but_never_an_edge_without_a_session() {
    use DenyReason::*;
    use Verdict::*;
    let p = policy();
    let edge = Claim::Edge("edge-1".into());
    let rows: &[(&str, &Claim, Result<Verdict, DenyReason>)] = &[
        // A cloud node's kubelet, outside tunnel_routes.
        ("10.0.0.9:10250", &Claim::Cloud, Ok(ToCloud)),
        ("10.0.0.9:10250", &Claim::Nobody, Err(NoRoute)),
        // An edge's address or pod, even inside the cloud ranges.
        ("10.244.0.7:80", &edge, Err(NoRoute)),
        ("192.168.1.10:10250", &edge, Err(NoRoute)),
        // The relay's own node is a cloud node, but not its listeners,
        // nor loopback however it is claimed.
        ("10.244.0.1:10250", &Claim::Cloud, Ok(ToCloud)),
        ("10.244.0.1:8443", &Claim::Cloud, Err(RelayItself)),
        ("127.0.0.1:10250", &Claim::Cloud, Err(ForbiddenAddress)),
        (
            "[::ffff:169.254.169.254]:80",
            &Claim::Cloud,
            Err(ForbiddenAddress),
        ),
    ];
    for (target, claim, want) in rows {
        let t = canonical(target.parse().unwrap());
        let got = p
            .authorize(Origin::Connect, t, Proto::Tcp, None, claim)
            .map_err(|d| d.reason);
        assert_eq!(got, *want, "CONNECT {target} claimed by {claim:?}");
        // Captured traffic is never dialled by the relay.
        let captured = p.authorize(Origin::Captured, t, Proto::Tcp, None, claim);
        assert_eq!(captured.map_err(|d| d.reason), Err(NoRoute), "{target}");
    }
    // listen.connect_cloud = false: CONNECT reaches edges only again.
    let mut edges_only = policy();
    edges_only.set_connect_cloud(false);
    for target in ["10.0.0.9:10250", "10.96.0.10:443"] {
        let t = canonical(target.parse().unwrap());
        let got = edges_only.authorize(Origin::Connect, t, Proto::Tcp, None, &Claim::Cloud);
        assert_eq!(got.map_err(|d| d.reason), Err(NoRoute), "{target}");
    }
    let t = canonical("10.244.7.5:80".parse().unwrap());
    let to_edge = edges_only.authorize(
        Origin::Connect,
        t,
        Proto::Tcp,
        Some("edge-1"),
        &Claim::Nobody,
    );
    assert_eq!(to_edge, Ok(ToEdge));
}

/// A Service endpoint no session serves: dialled by the relay when it is
/// in the cloud, never when an edge claims it (an endpoint on an edge
/// whose tunnel is down stays Ready while its kubelet reaches the
/// apiserver directly); served by the session when there is one.
#[test]
fn service_endpoints_on_an_edge_without_a_session_are_never_dialled() {
    use DenyReason::*;
    use Verdict::*;
    let p = policy();
    let edge = Claim::Edge("edge-1".into());
    type Row<'a> = (
        &'a str,
        Option<&'a str>,
        &'a Claim,
        Result<Verdict, DenyReason>,
    );
    let rows: &[Row] = &[
        ("10.244.7.5:80", None, &edge, Err(NoRoute)),
        ("192.168.1.10:10250", None, &edge, Err(NoRoute)),
        ("10.244.7.5:80", Some("edge-1"), &edge, Ok(ToEdge)),
        ("10.244.1.2:80", None, &Claim::Cloud, Ok(ToCloud)),
        ("10.0.0.9:443", None, &Claim::Nobody, Ok(ToCloud)),
        ("127.0.0.1:80", None, &Claim::Cloud, Err(ForbiddenAddress)),
    ];
    for (target, owner, claim, want) in rows {
        let t = canonical(target.parse().unwrap());
        let got = p
            .authorize(Origin::Service, t, Proto::Tcp, *owner, claim)
            .map_err(|d| d.reason);
        assert_eq!(got, *want, "endpoint {target} (owner {owner:?}, {claim:?})");
    }
}

/// The cloud Nodes' pod ranges join the cloud ranges and leave them as the
/// directory says; an edge's claim wins over one (an address it claims,
/// or a route it serves); the address checks and `connect_cloud` stay.
#[test]
fn cloud_nodes_pod_ranges_follow_the_directory_and_yield_to_edges() {
    use DenyReason::*;
    use Verdict::*;
    let p = policy();
    let worker: Cidr = WORKER.parse().unwrap();
    let ask = |p: &Policy, origin, target: &str, claim: &Claim| {
        let t = canonical(target.parse().unwrap());
        p.authorize(origin, t, Proto::Tcp, None, claim)
            .map_err(|d| d.reason)
    };
    let edge = Origin::Edge("edge-1");
    assert!(p.cloud_ranges().contains(&worker));
    assert!(!p.configured_ranges().contains(&worker));
    // The same set again changes nothing (no feed is woken).
    let before = p.cloud_ranges();
    assert!(!p.set_cloud_nodes(&[worker], |_| None));
    assert!(Arc::ptr_eq(&before, &p.cloud_ranges()));
    // An address an offline edge claims inside it is still refused.
    let offline = Claim::Edge("edge-2".into());
    assert_eq!(ask(&p, edge, "10.245.3.9:80", &offline), Err(NoRoute));
    assert_eq!(
        ask(&p, Origin::Connect, "10.245.3.9:80", &offline),
        Err(NoRoute)
    );
    // listen.connect_cloud = false: CONNECT still reaches edges only.
    let mut edges_only = policy();
    edges_only.set_connect_cloud(false);
    assert_eq!(
        ask(
            &edges_only,
            Origin::Connect,
            "10.245.3.9:80",
            &Claim::Nobody
        ),
        Err(NoRoute)
    );
    // Node addresses, ranges inside tunnel_routes and too wide ranges do
    // not join; an edge serving part of a range keeps the whole range out.
    let candidates: Vec<Cidr> = [WORKER, "10.0.0.9/32", "10.244.0.0/25", "10.0.0.0/8"]
        .iter()
        .map(|c| c.parse().unwrap())
        .collect();
    let served: Cidr = "10.245.3.128/25".parse().unwrap();
    assert!(p.set_cloud_nodes(&candidates, |c| c
        .overlaps(&served)
        .then(|| (served, "edge-3".to_string()))));
    assert_eq!(
        *p.cloud_ranges(),
        p.configured_ranges().iter().copied().collect()
    );
    assert_eq!(
        ask(&p, edge, "10.245.3.9:80", &Claim::Nobody),
        Err(OutsideCloudRanges)
    );
    assert_eq!(
        ask(&p, edge, "10.0.0.9:80", &Claim::Nobody),
        Err(OutsideCloudRanges)
    );
    assert_eq!(
        ask(&p, edge, "10.1.0.9:80", &Claim::Nobody),
        Err(OutsideCloudRanges)
    );
    // The edge gone, the range joins again; the Node gone, it leaves.
    assert!(p.set_cloud_nodes(&candidates, |_| None));
    assert_eq!(ask(&p, edge, "10.245.3.9:80", &Claim::Nobody), Ok(ToCloud));
    assert!(p.set_cloud_nodes(&[], |_| None));
    assert_eq!(
        ask(&p, edge, "10.245.3.9:80", &Claim::Nobody),
        Err(OutsideCloudRanges)
    );
    // Never the relay's own host, joined range or not.
    assert!(p.set_cloud_nodes(&["127.0.0.0/16".parse().unwrap()], |_| None));
    assert_eq!(
        ask(&p, edge, "127.0.0.1:80", &Claim::Nobody),
        Err(ForbiddenAddress)
    );
}
