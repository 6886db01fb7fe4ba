//! Which addresses and names reach a node (see `kube.rs`): addresses an
//! edge's kubelet lists that cannot be its own are not routed to it; a
//! name both a node reports and a Service has goes to neither; two sites
//! sharing a node address both work, each node by its name.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use relay_kube_standin::kubelet_node;
use relay_lab::cluster::LabService;
use relay_lab::netns::Proto;
use relay_lab::{connect_via, sessions, spawn_http};
use relay_protocol::Cidr;

use super::{connect_answer, eventually, fetch, node, node_ip, pod_cidr, KubeLab, BOUND};

/// An edge's kubelet writes its Node's addresses: those that cannot be
/// its own (the metadata address, a public one, another node's pod
/// address) are not routed to it, so its sessions serve only its pod CIDR
/// and its own address, and a CONNECT to the metadata address is refused
/// rather than sent to the edge. Stand-in, not a real apiserver (see the
/// module doc).
#[tokio::test]
async fn addresses_an_edge_cannot_have_are_not_routed_to_it() -> Result<()> {
    let lab = KubeLab::start(2, &[]).await?;
    let mut n = node(0);
    let other_pod = pod_cidr(1).replace(".0/24", ".9");
    if let Some(st) = n.status.as_mut() {
        for ip in ["169.254.169.254", "8.8.8.8", other_pod.as_str()] {
            st.addresses.get_or_insert_with(Vec::new).push(
                relay_kube_standin::k8s_openapi::api::core::v1::NodeAddress {
                    type_: "InternalIP".into(),
                    address: ip.into(),
                },
            );
        }
    }
    lab.standin.upsert_node(n);
    let e0 = lab.edge("edge-0")?;
    e0.wait_connected(BOUND).await.context("edge-0 connects")?;
    let mut got = lab.routes_of("edge-0").await?.context("session")?;
    got.sort();
    let mut want: Vec<Cidr> = vec![pod_cidr(0).parse()?, Cidr::host(node_ip(0))];
    want.sort();
    assert_eq!(got, want, "only the pod CIDR and the edge's own address");
    let (code, line) = connect_answer(lab.connect(), "169.254.169.254:80").await?;
    ensure!(
        code != 200 && !line.contains("edge-0"),
        "CONNECT to the metadata address: {code} {line}"
    );
    e0.shutdown().await;
    lab.relay.shutdown(Duration::from_secs(1)).await;
    Ok(())
}

/// IPv6 addresses an edge's kubelet lists are vetted with no IPv6 range
/// in `kubernetes.edge_address_ranges` (here the lab's loopback range
/// only, as a list of IPv4 LAN ranges would be): a global one
/// (`2001:db8:ee::5`) is refused, in the session's `refused` list, and a
/// CONNECT to it is not sent to the edge; a unique local one
/// (`fd00:aa::7`) is routed to it. A relay whose list holds the global
/// address's prefix takes it (and, that list replacing `fc00::/7`, not the
/// unique local one). Stand-in, not a real apiserver (see the module doc).
#[tokio::test]
async fn a_global_ipv6_node_address_is_taken_only_inside_a_listed_range() -> Result<()> {
    let lab = KubeLab::start(1, &[]).await?;
    let (global, ula): (IpAddr, IpAddr) = ("2001:db8:ee::5".parse()?, "fd00:aa::7".parse()?);
    let mut n = node(0);
    if let Some(st) = n.status.as_mut() {
        for ip in [global, ula] {
            st.addresses.get_or_insert_with(Vec::new).push(
                relay_kube_standin::k8s_openapi::api::core::v1::NodeAddress {
                    type_: "InternalIP".into(),
                    address: ip.to_string(),
                },
            );
        }
    }
    lab.standin.upsert_node(n);
    // Streams the relay opened to edge-0 so far (one per CONNECT sent to
    // it, whether or not the edge then reaches the address).
    let streams = async |admin: SocketAddr| -> Result<u64> {
        Ok(sessions(admin)
            .await?
            .into_iter()
            .find(|r| r.node == "edge-0")
            .context("edge-0's session")?
            .streams_total)
    };
    let e0 = lab.edge("edge-0")?;
    e0.wait_connected(BOUND).await.context("edge-0 connects")?;
    let row = eventually("edge-0's Node addresses vetted", async || {
        Ok(sessions(lab.admin())
            .await?
            .into_iter()
            .find(|r| r.node == "edge-0" && r.routes.contains(&Cidr::host(ula))))
    })
    .await?;
    assert_eq!(row.refused, vec![Cidr::host(global)], "{row:?}");
    assert!(!row.routes.contains(&Cidr::host(global)), "{row:?}");
    let before = streams(lab.admin()).await?;
    let _ = connect_via(lab.connect(), &format!("[{global}]:80")).await;
    assert_eq!(
        streams(lab.admin()).await?,
        before,
        "a CONNECT to the refused address went to edge-0"
    );
    let _ = connect_via(lab.connect(), &format!("[{ula}]:80")).await;
    assert_eq!(streams(lab.admin()).await?, before + 1, "to the ULA one");
    e0.shutdown().await;

    // A relay whose operator lists the global address's prefix.
    let mut cfg = super::relay_config(&lab.standin, &lab.pki, None)?;
    if let Some(k) = cfg.kubernetes.as_mut() {
        k.edge_address_ranges.push("2001:db8:ee::/48".parse()?);
    }
    let relay = relay_server::Relay::spawn(cfg).await?;
    let admin = relay.admin_addr().context("admin")?;
    let e0 = lab.edge_of(&relay, "edge-0")?;
    e0.wait_connected(BOUND).await.context("edge-0 connects")?;
    let row = eventually("edge-0's Node addresses vetted", async || {
        Ok(sessions(admin)
            .await?
            .into_iter()
            .find(|r| r.node == "edge-0" && r.routes.contains(&Cidr::host(global))))
    })
    .await?;
    assert_eq!(row.refused, vec![Cidr::host(ula)], "{row:?}");
    let before = streams(admin).await?;
    let _ = connect_via(
        relay.connect_addr().context("connect")?,
        &format!("[{global}]:80"),
    )
    .await;
    assert_eq!(streams(admin).await?, before + 1, "to the listed one");
    e0.shutdown().await;
    relay.shutdown(Duration::from_secs(1)).await;
    lab.relay.shutdown(Duration::from_secs(1)).await;
    Ok(())
}

/// A name that is both one a node reports (its Hostname `edge-0.shop`)
/// and a Service's (`edge-0` in namespace `shop`) goes to neither: the
/// apiserver's kubelet traffic must not go to whoever may create Services
/// in that namespace, nor a Service's to a node. The node stays reachable
/// by its Node name, the Service by its `.svc` name, even when an edge's
/// kubelet lists that among its Node's names. Stand-in, not a real
/// apiserver (see the module doc).
#[tokio::test]
async fn a_name_a_node_reports_and_a_service_has_goes_to_neither() -> Result<()> {
    let lab = KubeLab::start(2, &[]).await?;
    let mut n = node(0);
    if let Some(a) = n.status.as_mut().and_then(|st| st.addresses.as_mut()) {
        for a in a.iter_mut().filter(|a| a.type_ == "Hostname") {
            a.address = "edge-0.shop".into();
        }
        // And the edge's kubelet claims the Service's own name.
        a.push(
            relay_kube_standin::k8s_openapi::api::core::v1::NodeAddress {
                type_: "InternalDNS".into(),
                address: "edge-0.shop.svc".into(),
            },
        );
    }
    lab.standin.upsert_node(n);
    let (kubelet, _k) = spawn_http(SocketAddr::new(node_ip(0), 0), "edge-0 kubelet").await?;
    let impostor_ip: IpAddr = pod_cidr(1).replace(".0/24", ".7").parse()?;
    let (impostor, _i) = spawn_http(SocketAddr::new(impostor_ip, 0), "impostor").await?;
    let service = LabService {
        endpoints: vec![(impostor, "edge-1")],
        ..LabService::on_lab_ports(
            "shop",
            "edge-0",
            SocketAddr::new("10.96.0.31".parse()?, kubelet.port()),
            Proto::Tcp,
            &[],
        )
    };
    let (svc, slice) = service.objects();
    lab.standin.upsert_service(svc);
    lab.standin.upsert_endpointslice(slice);
    let (e0, e1) = (lab.edge("edge-0")?, lab.edge("edge-1")?);
    e0.wait_connected(BOUND).await.context("edge-0 connects")?;
    e1.wait_connected(BOUND).await.context("edge-1 connects")?;
    let by_service = format!("edge-0.shop.svc:{}", kubelet.port());
    let answer = eventually("the Service listed", async || {
        Ok(fetch(lab.connect(), &by_service).await.ok())
    })
    .await?;
    assert_eq!(
        answer, "impostor",
        "the Service's own name still reaches it"
    );
    for reported in ["edge-0.shop", "Edge-0.Shop."] {
        let reported = format!("{reported}:{}", kubelet.port());
        let (code, line) = connect_answer(lab.connect(), &reported).await?;
        ensure!(
            code == 502 && line.contains("both a name node edge-0 reports and a Service's"),
            "CONNECT {reported}: {code} {line}"
        );
    }
    let missing = format!("nosuch.shop.svc:{}", kubelet.port());
    let (code, line) = connect_answer(lab.connect(), &missing).await?;
    ensure!(
        code == 502 && line.contains("no Service named nosuch.shop.svc"),
        "CONNECT {missing}: {code} {line}"
    );
    let by_node = format!("edge-0:{}", kubelet.port());
    assert_eq!(fetch(lab.connect(), &by_node).await?, "edge-0 kubelet");
    e0.shutdown().await;
    e1.shutdown().await;
    lab.relay.shutdown(Duration::from_secs(1)).await;
    Ok(())
}

/// Two sites with the same LAN and the same node address: both up, pods
/// of both routed, the shared address routed for neither, each node
/// reachable by name. Stand-in, not a real apiserver (see the module doc).
#[tokio::test]
async fn two_sites_with_the_same_node_address_both_work() -> Result<()> {
    let lab = KubeLab::start(0, &["shop-a", "shop-b"]).await?;
    let shared_ip = "127.0.0.9";
    for (name, pod) in [("shop-a", "127.2.1.0/24"), ("shop-b", "127.2.2.0/24")] {
        lab.standin
            .upsert_node(kubelet_node(name, &[pod], &[("InternalIP", shared_ip)]));
    }
    let a = lab.edge("shop-a")?;
    let b = lab.edge("shop-b")?;
    a.wait_connected(BOUND).await.context("shop-a")?;
    b.wait_connected(BOUND).await.context("shop-b")?;
    for (name, pod) in [("shop-a", "127.2.1.0/24"), ("shop-b", "127.2.2.0/24")] {
        let routes = lab.routes_of(name).await?.context("session")?;
        assert_eq!(routes, vec![pod.parse::<Cidr>()?], "{name}: pod CIDR only");
    }
    let rows = sessions(lab.admin()).await?;
    let shared_host = Cidr::host(shared_ip.parse()?);
    assert!(
        rows.iter().all(|r| r.ambiguous == vec![shared_host]),
        "{rows:?}"
    );
    // Pods of both sites, by address.
    let (pa, _t1) = spawn_http("127.2.1.5:0".parse()?, "pod of shop-a").await?;
    let (pb, _t2) = spawn_http("127.2.2.5:0".parse()?, "pod of shop-b").await?;
    assert_eq!(
        fetch(lab.connect(), &pa.to_string()).await?,
        "pod of shop-a"
    );
    assert_eq!(
        fetch(lab.connect(), &pb.to_string()).await?,
        "pod of shop-b"
    );
    // The shared address by address: refused (it would be a coin toss)...
    let (kubelet, _t3) = spawn_http(format!("{shared_ip}:0").parse()?, "a kubelet").await?;
    assert!(connect_via(lab.connect(), &kubelet.to_string())
        .await
        .is_err());
    // ...by name: each node through its own session.
    for name in ["shop-a", "shop-b"] {
        let before = sessions(lab.admin())
            .await?
            .into_iter()
            .find(|r| r.node == name)
            .context("row")?
            .streams_total;
        fetch(lab.connect(), &format!("{name}:{}", kubelet.port())).await?;
        let after = sessions(lab.admin())
            .await?
            .into_iter()
            .find(|r| r.node == name)
            .context("row")?
            .streams_total;
        assert_eq!(after, before + 1, "{name} carried its own by-name stream");
    }
    let (_, msg) = eventually("condition names the shared address", async || {
        Ok(lab.condition("shop-a").filter(|c| c.0 == "True"))
    })
    .await
    .map(|c| (c.0, c.2))?;
    assert!(msg.contains(&format!("{shared_ip}/32")), "{msg}");
    a.shutdown().await;
    b.shutdown().await;
    lab.relay.shutdown(Duration::from_secs(1)).await;
    Ok(())
}
