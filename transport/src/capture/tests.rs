//! Tests of the pure pieces of capture: the minimal prefix cover, the
//! counter listing parser, the service set script and conntrack arguments.

use super::*;

#[test]
fn cover_drops_contained_prefixes() {
    let set: BTreeSet<Cidr> = [
        "10.244.0.0/16",
        "10.244.7.0/24",
        "10.96.0.0/12",
        "10.244.7.5/32",
        "fd00::/64",
        "fd00::1/128",
    ]
    .iter()
    .map(|s| s.parse().unwrap())
    .collect();
    let mut cover: Vec<String> = minimal_cover(&set).iter().map(|c| c.to_string()).collect();
    cover.sort();
    assert_eq!(cover, ["10.244.0.0/16", "10.96.0.0/12", "fd00::/64"]);
}

#[test]
fn counter_listing_parses() {
    let l = "table inet edge_relay {\n\tcounter src_refused {\n\t\tpackets 3 bytes 180\n\t}\n}\n";
    assert_eq!(parse_counter_packets(l), Some(3));
    assert_eq!(parse_counter_packets("no such counter"), None);
}

#[test]
fn service_set_script_and_conntrack_arguments() {
    let set: BTreeSet<(SocketAddr, Proto)> = [
        ("10.96.0.10:53".parse().unwrap(), Proto::Udp),
        ("10.96.0.10:53".parse().unwrap(), Proto::Tcp),
        ("[fd00::10]:53".parse().unwrap(), Proto::Udp),
    ]
    .into_iter()
    .collect();
    assert_eq!(
        services_script("edge_relay", "svc4", &set),
        "flush set inet edge_relay svc4\n\
         add element inet edge_relay svc4 { 10.96.0.10 . tcp . 53, 10.96.0.10 . udp . 53 }\n"
    );
    assert_eq!(
        services_script("t", "svcskip4", &BTreeSet::new()),
        "flush set inet t svcskip4\n"
    );
    assert_eq!(
        conntrack_delete_args("10.96.0.10:53".parse().unwrap(), Proto::Udp).join(" "),
        "-D -p udp --orig-dst 10.96.0.10 --dport 53"
    );
}

/// The `npaddr4` elements: every address by default, else the listed
/// prefixes with those inside another dropped (nft refuses overlaps).
#[test]
fn node_port_addresses_render_as_merged_set_elements() {
    let mut cfg = CaptureConfig::default();
    assert_eq!(node_port_address_elements(&cfg), "0.0.0.0/0");
    cfg.node_port_addresses = Some(
        ["10.0.0.0/24", "10.0.0.1/32", "192.168.1.10/32"]
            .iter()
            .map(|c| c.parse().unwrap())
            .collect(),
    );
    assert_eq!(
        node_port_address_elements(&cfg),
        "10.0.0.0/24, 192.168.1.10/32"
    );
}

/// A load-balancer port with source ranges: one element per IPv4 range no
/// other holds (`source . address . protocol . port`; nft refuses
/// overlapping intervals, which failed the whole update); IPv6 ranges and
/// addresses are left out (capture is IPv4).
#[test]
fn ranged_set_script_has_an_element_per_source_range() {
    let cidr = |s: &str| s.parse::<Cidr>().unwrap();
    let ranged: RangedSet = [
        (
            ("198.51.100.9:443".parse().unwrap(), Proto::Tcp),
            [
                cidr("10.0.0.0/8"),
                cidr("10.1.0.0/16"),
                cidr("192.0.2.7/32"),
                cidr("2001:db8::/32"),
            ]
            .into(),
        ),
        (
            ("[2001:db8::9]:443".parse().unwrap(), Proto::Tcp),
            [cidr("2001:db8::/32")].into(),
        ),
    ]
    .into_iter()
    .collect();
    assert_eq!(
        ranged_services_script("t", "svcextsrc4", &ranged),
        "flush set inet t svcextsrc4\n\
         add element inet t svcextsrc4 { 10.0.0.0/8 . 198.51.100.9 . tcp . 443, 192.0.2.7/32 . 198.51.100.9 . tcp . 443 }\n"
    );
    assert_eq!(
        ranged_services_script("t", "svcextsrc4", &RangedSet::new()),
        "flush set inet t svcextsrc4\n"
    );
}

/// The held table refuses the minimal cover of what was captured, from
/// every source when none were set, with the hold as the set's timeout.
#[test]
fn held_script_refuses_what_was_captured_for_the_hold() {
    let set = |l: &[&str]| -> BTreeSet<Cidr> { l.iter().map(|s| s.parse().unwrap()).collect() };
    let s = park::held_script(
        "edge_relay",
        0x1070,
        600,
        &set(&["10.244.0.0/16", "10.244.1.0/24", "10.96.0.0/12"]),
        &set(&["10.244.7.0/24"]),
        None,
    );
    assert!(
        s.contains(
            "flags interval,timeout; timeout 600s; elements = { 10.96.0.0/12, 10.244.0.0/16 };"
        ),
        "{s}"
    );
    assert!(
        s.contains("set skip4 { type ipv4_addr; flags interval; elements = { 10.244.7.0/24 }; }"),
        "{s}"
    );
    assert!(s.contains("elements = { 0.0.0.0/0 }"), "{s}");
    assert!(s.contains("meta mark 0x1070 return"), "{s}");
    let sourced = park::held_script(
        "t",
        1,
        5,
        &set(&["10.96.0.0/12"]),
        &BTreeSet::new(),
        Some(&set(&["10.244.7.0/24"])),
    );
    assert!(
        sourced
            .contains("set src4 { type ipv4_addr; flags interval; elements = { 10.244.7.0/24 }; }"),
        "{sourced}"
    );
    assert!(
        sourced.contains("set skip4 { type ipv4_addr; flags interval; }"),
        "{sourced}"
    );
}

/// A peer gets a bypass rule only inside a captured prefix (a relay with
/// thousands of edges behind NAT adds none), as a `/32`, IPv4 only (an
/// IPv4-mapped peer, as a relay on `[::]` sees one, counts as IPv4), and
/// skipped prefixes keep theirs.
#[test]
fn peers_inside_captured_prefixes_get_bypass_rules() {
    let cidrs = |v: &[&str]| -> BTreeSet<Cidr> { v.iter().map(|s| s.parse().unwrap()).collect() };
    let want = cidrs(&["10.0.0.0/16", "10.244.1.0/24"]);
    let skip = cidrs(&["10.244.1.0/26"]);
    let peers: BTreeSet<IpAddr> = ["::ffff:10.0.3.4", "198.18.0.11", "10.244.1.200", "fd00::1"]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
    let got: Vec<String> = bypass_rules(&want, &skip, &peers)
        .iter()
        .map(|c| c.to_string())
        .collect();
    assert_eq!(got, ["10.0.3.4/32", "10.244.1.0/26", "10.244.1.200/32"]);
    assert_eq!(bypass_rules(&want, &skip, &BTreeSet::new()), skip);
}
