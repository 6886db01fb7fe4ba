//! Addresses no peer can have.

use std::net::{IpAddr, Ipv4Addr};

/// Whether `ip` is no unicast address a peer can have: unspecified,
/// loopback, link-local, multicast or broadcast. IPv6 forms that carry an
/// IPv4 address in their last 32 bits (mapped `::ffff:a.b.c.d`, translated
/// `::ffff:0:a.b.c.d` of `::ffff:0:0:0/96`, compatible `::a.b.c.d`,
/// NAT64's well-known `64:ff9b::/96`) are judged by that address: a NAT64
/// gateway would take `64:ff9b::a9fe:a9fe` to the metadata address. So is
/// 6to4's `2002::/16`, by the IPv4 address in its bits 16-48
/// (`2002:a9fe:a9fe::/48` is the metadata address's site). Network-specific
/// NAT64 prefixes (`64:ff9b:1::/48`, a carrier's own) are not known here
/// and are judged as IPv6.
pub fn is_special(ip: IpAddr) -> bool {
    match ip.to_canonical() {
        IpAddr::V4(a) => {
            a.is_unspecified()
                || a.is_loopback()
                || a.is_link_local()
                || a.is_multicast()
                || a.is_broadcast()
        }
        IpAddr::V6(a) => {
            let s = a.segments();
            let compatible = s[..6] == [0; 6] && !a.is_unspecified() && !a.is_loopback();
            let nat64 = s[..6] == [0x64, 0xff9b, 0, 0, 0, 0];
            let translated = s[..6] == [0, 0, 0, 0, 0xffff, 0];
            if compatible || nat64 || translated {
                let [.., w, x, y, z] = a.octets();
                return is_special(IpAddr::V4(Ipv4Addr::new(w, x, y, z)));
            }
            if s[0] == 0x2002 {
                let [_, _, w, x, y, z, ..] = a.octets();
                return is_special(IpAddr::V4(Ipv4Addr::new(w, x, y, z)));
            }
            a.is_unspecified() || a.is_loopback() || a.is_unicast_link_local() || a.is_multicast()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// IPv6 forms carrying an IPv4 address are judged by it.
    #[test]
    fn ipv6_forms_of_special_ipv4_addresses_are_special() {
        for (ip, special) in [
            ("64:ff9b::a9fe:a9fe", true),
            ("64:ff9b::7f00:1", true),
            ("::169.254.169.254", true),
            ("::ffff:127.0.0.1", true),
            ("::127.0.0.1", true),
            ("255.255.255.255", true),
            ("::1", true),
            ("::", true),
            ("fe80::1", true),
            // IPv4-translated (`::ffff:0:0:0/96`).
            ("::ffff:0:a9fe:a9fe", true),
            ("::ffff:0:7f00:1", true),
            ("::ffff:0:a00:5", false),
            // 6to4 (`2002::/16`): the IPv4 address in bits 16-48.
            ("2002:a9fe:a9fe::1", true),
            ("2002:7f00:1::", true),
            ("2002:e000:1::5", true),
            ("2002:ffff:ffff::1", true),
            ("2002:a00:5::1", false),
            ("2002:c000:201:1::1", false),
            ("2003:a9fe:a9fe::1", false),
            ("64:ff9b::a00:5", false),
            ("::10.0.0.5", false),
            ("fd00::1", false),
            ("10.0.0.5", false),
        ] {
            assert_eq!(is_special(ip.parse().unwrap()), special, "{ip}");
        }
    }
}
