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
