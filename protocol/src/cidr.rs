//! An IP prefix (`10.244.1.0/24`, `192.168.1.10/32`, `fd00::/64`).
//!
//! Canonical by construction: host bits must be zero, so two equal prefixes
//! always compare equal and the relay's route table can key on them.
//! On the wire (binary serde formats) a `Cidr` is `(IpAddr, u8)`; in
//! human-readable formats (TOML config, JSON admin API) it is the usual
//! string form.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Why a string or a pair of address and length is not a valid prefix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CidrError {
    /// The address part does not parse as an IPv4 or IPv6 address.
    #[error("invalid address in prefix {0:?}")]
    Address(String),
    /// The length is not a number or is longer than the address family allows.
    #[error("invalid prefix length in {0:?} (at most 32 for IPv4, 128 for IPv6)")]
    Length(String),
    /// Bits after the prefix length are set (`10.0.0.1/24`); write `10.0.0.0/24`.
    #[error("prefix {0:?} has host bits set; did you mean {1}?")]
    HostBits(String, String),
}

/// A validated IP prefix: address with all host bits zero, plus its length.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

fn max_len(addr: &IpAddr) -> u8 {
    match addr {
        IpAddr::V4(_) => 32,
        IpAddr::V6(_) => 128,
    }
}

/// `addr` with every bit after `prefix` cleared. `prefix` must be valid.
fn mask(addr: IpAddr, prefix: u8) -> IpAddr {
    match addr {
        IpAddr::V4(a) => {
            let bits = u32::from(a);
            let m = if prefix == 0 {
                0
            } else {
                u32::MAX << (32 - prefix)
            };
            IpAddr::V4((bits & m).into())
        }
        IpAddr::V6(a) => {
            let bits = u128::from(a);
            let m = if prefix == 0 {
                0
            } else {
                u128::MAX << (128 - prefix)
            };
            IpAddr::V6((bits & m).into())
        }
    }
}

impl Cidr {
    /// A prefix from an address and a length; rejects host bits and bad lengths.
    pub fn new(addr: IpAddr, prefix: u8) -> Result<Self, CidrError> {
        if prefix > max_len(&addr) {
            return Err(CidrError::Length(format!("{addr}/{prefix}")));
        }
        let masked = mask(addr, prefix);
        if masked != addr {
            return Err(CidrError::HostBits(
                format!("{addr}/{prefix}"),
                format!("{masked}/{prefix}"),
            ));
        }
        Ok(Cidr { addr, prefix })
    }

    /// The prefix covering exactly one address (`/32` or `/128`).
    pub fn host(addr: IpAddr) -> Self {
        Cidr {
            prefix: max_len(&addr),
            addr,
        }
    }

    /// The network address (host bits zero).
    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    /// The prefix length in bits.
    pub fn prefix_len(&self) -> u8 {
        self.prefix
    }

    /// True when this prefix is a single address.
    pub fn is_host(&self) -> bool {
        self.prefix == max_len(&self.addr)
    }

    /// Whether `ip` falls inside this prefix (never across address families).
    pub fn contains(&self, ip: &IpAddr) -> bool {
        ip.is_ipv4() == self.addr.is_ipv4() && mask(*ip, self.prefix) == self.addr
    }

    /// Whether every address of `other` is inside this prefix.
    pub fn contains_cidr(&self, other: &Cidr) -> bool {
        other.prefix >= self.prefix && self.contains(&other.addr)
    }

    /// Whether the two prefixes share at least one address.
    pub fn overlaps(&self, other: &Cidr) -> bool {
        self.contains_cidr(other) || other.contains_cidr(self)
    }

    /// The prefix of length `prefix` that contains `ip`; `None` if too long.
    pub fn containing(ip: IpAddr, prefix: u8) -> Option<Cidr> {
        (prefix <= max_len(&ip)).then(|| Cidr {
            addr: mask(ip, prefix),
            prefix,
        })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl fmt::Debug for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for Cidr {
    type Err = CidrError;

    /// Parses `a.b.c.d/n`, `v6::/n`, or a bare address (a host prefix).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        match s.split_once('/') {
            None => s
                .parse::<IpAddr>()
                .map(Cidr::host)
                .map_err(|_| CidrError::Address(s.to_string())),
            Some((a, l)) => {
                let addr = a
                    .parse::<IpAddr>()
                    .map_err(|_| CidrError::Address(s.to_string()))?;
                let prefix = l
                    .parse::<u8>()
                    .map_err(|_| CidrError::Length(s.to_string()))?;
                Cidr::new(addr, prefix)
            }
        }
    }
}

impl Serialize for Cidr {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            s.collect_str(self)
        } else {
            (self.addr, self.prefix).serialize(s)
        }
    }
}

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        if d.is_human_readable() {
            let s = String::deserialize(d)?;
            s.parse().map_err(D::Error::custom)
        } else {
            let (addr, prefix) = <(IpAddr, u8)>::deserialize(d)?;
            Cidr::new(addr, prefix).map_err(D::Error::custom)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_displays() {
        let c: Cidr = "10.244.1.0/24".parse().unwrap();
        assert_eq!(c.to_string(), "10.244.1.0/24");
        assert_eq!(
            "192.168.1.10".parse::<Cidr>().unwrap().to_string(),
            "192.168.1.10/32"
        );
        assert_eq!("fd00::/64".parse::<Cidr>().unwrap().prefix_len(), 64);
        assert_eq!("::1".parse::<Cidr>().unwrap().prefix_len(), 128);
    }

    #[test]
    fn rejects_bad_input_with_a_reason() {
        assert!(
            matches!("10.0.0.1/24".parse::<Cidr>(), Err(CidrError::HostBits(_, s)) if s == "10.0.0.0/24")
        );
        assert!(matches!(
            "10.0.0.0/33".parse::<Cidr>(),
            Err(CidrError::Length(_))
        ));
        assert!(matches!(
            "10.0.0.0/x".parse::<Cidr>(),
            Err(CidrError::Length(_))
        ));
        assert!(matches!(
            "ten/8".parse::<Cidr>(),
            Err(CidrError::Address(_))
        ));
        assert!(matches!("".parse::<Cidr>(), Err(CidrError::Address(_))));
    }

    #[test]
    fn containment_and_overlap() {
        let net: Cidr = "10.244.0.0/16".parse().unwrap();
        let sub: Cidr = "10.244.7.0/24".parse().unwrap();
        let other: Cidr = "10.245.0.0/16".parse().unwrap();
        assert!(net.contains(&"10.244.7.5".parse().unwrap()));
        assert!(!net.contains(&"10.245.0.1".parse().unwrap()));
        assert!(!net.contains(&"::ffff:10.244.0.1".parse().unwrap()));
        assert!(net.contains_cidr(&sub) && !sub.contains_cidr(&net));
        assert!(net.overlaps(&sub) && sub.overlaps(&net));
        assert!(!net.overlaps(&other));
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains(&"1.2.3.4".parse().unwrap()));
        assert_eq!(
            Cidr::containing("10.1.2.3".parse().unwrap(), 8)
                .unwrap()
                .to_string(),
            "10.0.0.0/8"
        );
        assert!(Cidr::containing("10.1.2.3".parse().unwrap(), 33).is_none());
    }
}
