//! The cluster zone: which names the resolver answers itself, and how
//! (pure: no sockets, no clock).
//!
//! Names follow the Kubernetes DNS specification (what CoreDNS's
//! `kubernetes` plugin answers), under the cluster domain `D`:
//!
//! | name | answer |
//! |---|---|
//! | `svc.ns.svc.D` A/AAAA | ClusterIP Service: its ClusterIP of that family; headless: its ready endpoints' addresses |
//! | `svc.ns.svc.D` any type, ExternalName | CNAME to the target, followed: a target inside `D` adds its own records (at most [`MAX_CHAIN`] CNAMEs, no loops); one outside is forwarded (the upstream chases it), the bare CNAME if that fails |
//! | `host.svc.ns.svc.D` A/AAAA | a headless endpoint by `hostname`, or by its address with dashes (`10-244-7-5`); a name not held, when the relay cut the endpoints at [`ServiceName::MAX_ENDPOINTS`]: forwarded |
//! | `_port._proto.svc.ns.svc.D` SRV | ClusterIP: `0 100 port svc.ns.svc.D.`; headless: one per endpoint with its target port |
//! | `svc.ns.svc.D` SRV | the same for every named port |
//! | `_port._proto.svc.ns.svc.D` SRV, no such port, ports cut at [`ServiceName::MAX_PORTS`] | forwarded |
//! | `a-b-c-d.ns.pod.D` A, `fd00--5.ns.pod.D` AAAA | the address in the name (CoreDNS's `pods insecure`), NXDOMAIN if it is none; a namespace without Services here: forwarded |
//! | the apex SOA | the SOA |
//! | the apex, `svc.D`, `pod.D`, `ns.svc.D` / `ns.pod.D` of a known namespace | NODATA |
//! | anything else under `D` | NXDOMAIN |
//! | names outside `D`, other names under `pod.D`, any class but IN | forwarded |
//! | `d.c.b.a.in-addr.arpa` / 32-nibble `….ip6.arpa` PTR, a ClusterIP | `svc.ns.svc.D.` |
//! | the same, a headless endpoint's address (no ClusterIP's) | `host.svc.ns.svc.D.`, one per Service it is an endpoint of |
//! | other reverse names: unknown or partial addresses, malformed names, other types or classes | forwarded |
//!
//! Negative answers carry a SOA record for the domain, so stub resolvers
//! cache them for [`NEGATIVE_TTL`] seconds; positive answers have [`TTL`].
//!
//! Reverse names are answered as CoreDNS's default Corefile does
//! (`kubernetes cluster.local in-addr.arpa ip6.arpa { fallthrough
//! in-addr.arpa ip6.arpa }`): only PTR for an address the table holds;
//! everything else there falls through to the upstream, which owns the
//! rest of the reverse tree. Endpoints are known here for headless
//! Services only (the relay sends no others), so the PTR of a ClusterIP
//! Service's pod is forwarded, as before.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use hickory_proto::op::{Message, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, CNAME, PTR, SOA, SRV};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use relay_protocol::{NameKind, ServiceName};

/// TTL of local answers, in seconds (CoreDNS's default for the
/// `kubernetes` plugin): short, since endpoints move.
pub const TTL: u32 = 5;
/// How long a NXDOMAIN or NODATA may be cached (the SOA minimum).
pub const NEGATIVE_TTL: u32 = 5;

/// What to do with a query.
#[derive(Debug)]
pub enum Outcome {
    /// Answered from the table: the complete response.
    Answer(Message),
    /// Not ours (outside the cluster domain, another class, a name the
    /// table may lack): ask the upstream.
    Forward,
    /// Ask the upstream; if it cannot be asked (the cloud is away), this
    /// answer: an ExternalName alias to a name outside the cluster, which
    /// the upstream chases (its answer has the target's records too).
    ForwardOr(Message),
}

/// Most CNAMEs in one local answer (CoreDNS stops at 8 too).
pub const MAX_CHAIN: usize = 8;

/// Why a name has no records here.
enum Not {
    /// An answer with this code (NXDOMAIN, SERVFAIL).
    Code(ResponseCode),
    /// An ExternalName: an alias of this name.
    Alias(Name),
    /// The upstream knows better (the table was cut, or lacks the data).
    Forward,
}

fn nx() -> Not {
    Not::Code(ResponseCode::NXDomain)
}

/// The names of one cluster domain.
#[derive(Debug, Clone, Default)]
pub struct Zone {
    /// Lower case, no dots at the ends (`cluster.local`).
    domain: String,
    domain_labels: Vec<String>,
    services: BTreeMap<(String, String), ServiceName>,
    namespaces: BTreeSet<String>,
    /// The Service (key of `services`) whose ClusterIP each address is,
    /// for PTR answers (the first in key order if several claim one).
    cluster_ips: BTreeMap<IpAddr, (String, String)>,
    /// The headless Services each address is an endpoint of, for PTR
    /// answers of addresses that are no ClusterIP.
    endpoint_ips: BTreeMap<IpAddr, Vec<(String, String)>>,
    /// SOA serial: changes with every table.
    serial: u32,
}

impl Zone {
    /// A zone for `domain` holding `services` (entries that fail
    /// [`ServiceName::is_valid`] are left out); `serial` goes in the SOA.
    pub fn new(domain: &str, services: impl IntoIterator<Item = ServiceName>, serial: u32) -> Zone {
        let domain = domain.trim_matches('.').to_ascii_lowercase();
        let domain_labels = domain.split('.').map(String::from).collect();
        let mut z = Zone {
            domain,
            domain_labels,
            serial,
            ..Default::default()
        };
        for s in services.into_iter().filter(ServiceName::is_valid) {
            let key = (
                s.key.namespace.to_ascii_lowercase(),
                s.key.name.to_ascii_lowercase(),
            );
            z.namespaces.insert(key.0.clone());
            z.services.insert(key, s);
        }
        // The reverse index, built once per table so a PTR query costs a
        // lookup, not a walk over every endpoint.
        for (key, s) in &z.services {
            match &s.kind {
                NameKind::ClusterIp(ips) => {
                    for ip in ips {
                        z.cluster_ips
                            .entry(ip.to_canonical())
                            .or_insert_with(|| key.clone());
                    }
                }
                NameKind::Headless => {
                    for e in &s.endpoints {
                        let owners = z.endpoint_ips.entry(e.ip.to_canonical()).or_default();
                        if !owners.contains(key) {
                            owners.push(key.clone());
                        }
                    }
                }
                NameKind::ExternalName(_) => {}
            }
        }
        z
    }

    /// The cluster domain.
    pub fn domain(&self) -> &str {
        &self.domain
    }

    /// Number of Services.
    pub fn len(&self) -> usize {
        self.services.len()
    }

    /// Whether the zone holds no Service.
    pub fn is_empty(&self) -> bool {
        self.services.is_empty()
    }

    /// Every Service, for saving.
    pub fn services(&self) -> impl Iterator<Item = &ServiceName> {
        self.services.values()
    }

    /// Answers `query`, which must be a standard query with exactly one
    /// question (the server checks that first).
    pub fn answer(&self, query: &Message) -> Outcome {
        let Some(q) = query.queries.first() else {
            return Outcome::Forward;
        };
        // The table holds class IN data only; CHAOS and the rest are the
        // upstream's business (CoreDNS's plugin answers only IN).
        if q.query_class() != DNSClass::IN {
            return Outcome::Forward;
        }
        let qtype = q.query_type();
        if qtype == RecordType::PTR {
            let targets = reverse_address(q.name()).map_or_else(Vec::new, |ip| self.ptr(ip));
            if !targets.is_empty() {
                let mut resp = response(query);
                resp.add_answers(
                    targets
                        .into_iter()
                        .map(|t| Record::from_rdata(q.name().clone(), TTL, RData::PTR(PTR(t)))),
                );
                return Outcome::Answer(resp);
            }
            // Not an address held here: on to the forward names (a
            // reverse name is outside the cluster domain).
        }
        let Some(mut rel) = self.relative(q.name()) else {
            return Outcome::Forward;
        };
        let mut resp = response(query);
        // ExternalName aliases are followed here, as CoreDNS does: stub
        // resolvers (glibc, musl) expect the server to chase a CNAME and
        // give up on a bare one. `chain` holds the CNAMEs so far.
        let mut owner = q.name().clone();
        let mut chain: Vec<Record> = Vec::new();
        let mut seen: Vec<Vec<String>> = Vec::new();
        let r = loop {
            match self.records(&owner, &rel, qtype) {
                Err(Not::Alias(target)) => {
                    let cname = Record::from_rdata(owner, TTL, RData::CNAME(CNAME(target.clone())));
                    chain.push(cname);
                    if qtype == RecordType::CNAME {
                        break Ok(vec![]);
                    }
                    seen.push(rel);
                    match self.relative(&target) {
                        // Outside the cluster: the upstream chases it (its
                        // answer is the whole chain); the bare alias if it
                        // cannot be asked.
                        None => {
                            resp.add_answers(chain);
                            return Outcome::ForwardOr(resp);
                        }
                        // A loop, or too long a chain: the aliases so far.
                        Some(t) if seen.contains(&t) || chain.len() >= MAX_CHAIN => {
                            break Ok(vec![]);
                        }
                        Some(t) => (owner, rel) = (target, t),
                    }
                }
                Err(Not::Forward) if chain.is_empty() => return Outcome::Forward,
                Err(Not::Forward) => {
                    resp.add_answers(chain);
                    return Outcome::ForwardOr(resp);
                }
                Err(Not::Code(code)) => break Err(code),
                Ok(records) => break Ok(records),
            }
        };
        // A query for the CNAME itself is answered by it: positive, no SOA.
        let alias_asked = qtype == RecordType::CNAME && !chain.is_empty();
        resp.add_answers(chain);
        match r {
            Ok(_) if alias_asked => {}
            Ok(answers) if !answers.is_empty() => {
                // The additional section of SRV answers holds the targets'
                // addresses, after the answers proper.
                let (ans, add): (Vec<Record>, Vec<Record>) = answers.into_iter().partition(|r| {
                    qtype != RecordType::SRV
                        || !matches!(r.record_type(), RecordType::A | RecordType::AAAA)
                });
                resp.add_answers(ans);
                resp.add_additionals(add);
            }
            Ok(_) => {
                resp.add_authority(self.soa());
            }
            Err(code) => {
                resp.metadata.response_code = code;
                resp.add_authority(self.soa());
            }
        }
        Outcome::Answer(resp)
    }

    /// The records of the name `owner` (its labels before the domain:
    /// `rel`) for `qtype`.
    fn records(&self, owner: &Name, rel: &[String], qtype: RecordType) -> Result<Vec<Record>, Not> {
        match rel {
            [] if qtype == RecordType::SOA => Ok(vec![self.soa_at(owner)]),
            [] | [_] if rel.first().is_none_or(|l| l == "svc" || l == "pod") => Ok(vec![]),
            [ns, pod] if pod == "pod" => {
                if self.namespaces.contains(ns) {
                    Ok(vec![])
                } else {
                    // Namespaces are known here only by their Services.
                    Err(Not::Forward)
                }
            }
            [ip, ns, pod] if pod == "pod" => {
                if !self.namespaces.contains(ns) {
                    return Err(Not::Forward);
                }
                let ip = pod_address(ip).ok_or_else(nx)?;
                Ok(address_records(owner, &[ip], qtype))
            }
            [.., last] if last == "pod" => Err(Not::Forward),
            [ns, svc] if svc == "svc" => {
                if self.namespaces.contains(ns) {
                    Ok(vec![])
                } else {
                    Err(nx())
                }
            }
            [name, ns, svc] if svc == "svc" => self.service(owner, ns, name, qtype),
            [host, name, ns, svc] if svc == "svc" => self.endpoint(owner, ns, name, host, qtype),
            [port, proto, name, ns, svc] if svc == "svc" => {
                self.srv(owner, ns, name, Some((port, proto)), qtype)
            }
            _ => Err(nx()),
        }
    }

    /// The names of `ip` for PTR answers: the Service whose ClusterIP it
    /// is, else each headless Service's name for it as an endpoint (its
    /// hostname or dashed address, as the forward names); none when the
    /// table does not hold it.
    fn ptr(&self, ip: IpAddr) -> Vec<Name> {
        let ip = ip.to_canonical();
        if let Some((ns, name)) = self.cluster_ips.get(&ip) {
            return self.fqdn(&[name, ns, "svc"]).into_iter().collect();
        }
        let mut names: Vec<Name> = Vec::new();
        for key in self.endpoint_ips.get(&ip).into_iter().flatten() {
            let Some(s) = self.services.get(key) else {
                continue;
            };
            let (ns, name) = (key.0.as_str(), key.1.as_str());
            for e in s.endpoints.iter().filter(|e| e.ip.to_canonical() == ip) {
                // A hostname that makes no name gets no PTR (as no A).
                if let Some(n) = self.fqdn(&[&endpoint_label(e), name, ns, "svc"]) {
                    if !names.contains(&n) {
                        names.push(n);
                    }
                }
            }
        }
        names
    }

    /// The labels of `name` before the cluster domain, lower case, or
    /// `None` when `name` is outside it.
    fn relative(&self, name: &Name) -> Option<Vec<String>> {
        let labels: Vec<String> = name
            .iter()
            .map(|l| std::str::from_utf8(l).map(str::to_ascii_lowercase))
            .collect::<Result<_, _>>()
            .ok()?;
        let n = labels.len().checked_sub(self.domain_labels.len())?;
        (labels[n..] == self.domain_labels[..]).then(|| labels[..n].to_vec())
    }

    fn fqdn(&self, labels: &[&str]) -> Option<Name> {
        let mut parts = labels.to_vec();
        parts.push(&self.domain);
        Name::from_ascii(format!("{}.", parts.join("."))).ok()
    }

    fn soa(&self) -> Record {
        self.soa_at(&self.fqdn(&[]).unwrap_or_else(Name::root))
    }

    /// The SOA record, owned by `apex` (the domain as the asker spelt it).
    fn soa_at(&self, apex: &Name) -> Record {
        let mname = self.fqdn(&["ns", "dns"]).unwrap_or_else(Name::root);
        let rname = self.fqdn(&["hostmaster"]).unwrap_or_else(Name::root);
        let soa = SOA::new(mname, rname, self.serial, 7200, 1800, 86400, NEGATIVE_TTL);
        Record::from_rdata(apex.clone(), NEGATIVE_TTL, RData::SOA(soa))
    }

    fn lookup(&self, ns: &str, name: &str) -> Option<&ServiceName> {
        self.services.get(&(ns.to_string(), name.to_string()))
    }

    fn service(
        &self,
        owner: &Name,
        ns: &str,
        name: &str,
        qtype: RecordType,
    ) -> Result<Vec<Record>, Not> {
        let s = self.lookup(ns, name).ok_or_else(nx)?;
        if let NameKind::ExternalName(target) = &s.kind {
            // An alias whatever the type ([`Zone::answer`] follows it).
            let t = Name::from_ascii(format!("{}.", target.trim_end_matches('.')))
                .map_err(|_| Not::Code(ResponseCode::ServFail))?;
            return Err(Not::Alias(t));
        }
        if qtype == RecordType::SRV {
            return self.srv(owner, ns, name, None, qtype);
        }
        let ips: Vec<IpAddr> = match &s.kind {
            NameKind::ClusterIp(ips) => ips.clone(),
            _ => s.endpoints.iter().map(|e| e.ip).collect(),
        };
        Ok(address_records(owner, &ips, qtype))
    }

    fn endpoint(
        &self,
        owner: &Name,
        ns: &str,
        name: &str,
        host: &str,
        qtype: RecordType,
    ) -> Result<Vec<Record>, Not> {
        let s = self.lookup(ns, name).ok_or_else(nx)?;
        let Some(e) = s.endpoints.iter().find(|e| endpoint_label(e) == host) else {
            // The relay cuts a Service's endpoints at the cap: past it,
            // a name not held here may well exist.
            return Err(
                if s.kind == NameKind::Headless && s.endpoints.len() >= ServiceName::MAX_ENDPOINTS {
                    Not::Forward
                } else {
                    nx()
                },
            );
        };
        Ok(address_records(owner, &[e.ip], qtype))
    }

    /// SRV records of `ns/name` for one `_port._proto` (or every named
    /// port), followed by the targets' address records.
    fn srv(
        &self,
        owner: &Name,
        ns: &str,
        name: &str,
        which: Option<(&String, &String)>,
        qtype: RecordType,
    ) -> Result<Vec<Record>, Not> {
        let s = self.lookup(ns, name).ok_or_else(nx)?;
        let ports: Vec<usize> = (0..s.ports.len())
            .filter(|&i| {
                let p = &s.ports[i];
                !p.name.is_empty()
                    && which.is_none_or(|(port, proto)| {
                        port.strip_prefix('_') == Some(p.name.as_str())
                            && proto.strip_prefix('_') == Some(p.protocol.label())
                    })
            })
            .collect();
        if ports.is_empty() {
            // No such port: the name does not exist (as CoreDNS answers),
            // unless the relay cut the ports at the cap.
            return if which.is_some() && s.ports.len() >= ServiceName::MAX_PORTS {
                Err(Not::Forward)
            } else if which.is_some() {
                Err(nx())
            } else {
                Ok(vec![])
            };
        }
        if qtype != RecordType::SRV {
            return Ok(vec![]);
        }
        let (mut srvs, mut extra) = (Vec::new(), Vec::new());
        match &s.kind {
            NameKind::ClusterIp(ips) => {
                let target = self
                    .fqdn(&[name, ns, "svc"])
                    .ok_or(Not::Code(ResponseCode::ServFail))?;
                for &i in &ports {
                    let srv = SRV::new(0, 100, s.ports[i].port, target.clone());
                    srvs.push(Record::from_rdata(owner.clone(), TTL, RData::SRV(srv)));
                }
                extra.extend(address_records(&target, ips, RecordType::ANY));
            }
            NameKind::Headless => {
                let eps: Vec<_> = s.endpoints.iter().collect();
                let weight = (100 / eps.len().max(1)) as u16;
                for e in eps {
                    let label = endpoint_label(e);
                    let target = self
                        .fqdn(&[&label, name, ns, "svc"])
                        .ok_or(Not::Code(ResponseCode::ServFail))?;
                    let mut any = false;
                    for &i in &ports {
                        let port = e.ports.get(i).copied().unwrap_or(0);
                        if port != 0 {
                            let srv = SRV::new(0, weight, port, target.clone());
                            srvs.push(Record::from_rdata(owner.clone(), TTL, RData::SRV(srv)));
                            any = true;
                        }
                    }
                    if any {
                        extra.extend(address_records(&target, &[e.ip], RecordType::ANY));
                    }
                }
            }
            NameKind::ExternalName(_) => return Err(nx()),
        }
        srvs.extend(extra);
        Ok(srvs)
    }
}

/// The response skeleton for `query`: its id and question, authoritative,
/// the flags a resolver echoes.
fn response(query: &Message) -> Message {
    let mut resp = Message::response(query.metadata.id, OpCode::Query);
    resp.metadata.authoritative = true;
    resp.metadata.recursion_desired = query.metadata.recursion_desired;
    resp.metadata.recursion_available = true;
    resp.metadata.checking_disabled = query.metadata.checking_disabled;
    resp.add_queries(query.queries.first().cloned());
    resp
}

/// The address a reverse name spells: `d.c.b.a.in-addr.arpa.` (four
/// decimal octets, no leading zeros, as `inet_pton` and CoreDNS read
/// them) or 32 single hex nibbles then `ip6.arpa.`, any case. Anything
/// else (a partial address, an RFC 2317 delegation label, a stray
/// label) is `None`: not an address, so not answered here.
fn reverse_address(name: &Name) -> Option<IpAddr> {
    let labels: Vec<&[u8]> = name.iter().collect();
    let is = |l: &[u8], s: &str| l.eq_ignore_ascii_case(s.as_bytes());
    match labels.as_slice() {
        [d, c, b, a, zone, arpa] if is(zone, "in-addr") && is(arpa, "arpa") => Some(IpAddr::V4(
            Ipv4Addr::new(octet(a)?, octet(b)?, octet(c)?, octet(d)?),
        )),
        [nibbles @ .., zone, arpa]
            if nibbles.len() == 32 && is(zone, "ip6") && is(arpa, "arpa") =>
        {
            // The first label is the lowest nibble.
            let mut v: u128 = 0;
            for l in nibbles.iter().rev() {
                let &[h] = *l else {
                    return None;
                };
                v = (v << 4) | u128::from(char::from(h).to_digit(16)?);
            }
            Some(IpAddr::V6(Ipv6Addr::from(v)))
        }
        _ => None,
    }
}

/// One decimal octet label: `0` to `255`, no sign, no leading zero.
fn octet(l: &[u8]) -> Option<u8> {
    let digits = !l.is_empty() && l.len() <= 3 && l.iter().all(u8::is_ascii_digit);
    if !digits || (l.len() > 1 && l[0] == b'0') {
        return None;
    }
    std::str::from_utf8(l).ok()?.parse().ok()
}

/// An endpoint's own label: its hostname, else its address with dashes
/// (`10-244-7-5`, `fd00--5`), as CoreDNS names them.
fn endpoint_label(e: &relay_protocol::NameEndpoint) -> String {
    match &e.hostname {
        Some(h) => h.to_ascii_lowercase(),
        None => e.ip.to_string().replace(['.', ':'], "-"),
    }
}

/// The address of a pod name's first label, as CoreDNS's `pods insecure`
/// reads it: four numbers with three single dashes an IPv4 address
/// (`10-244-7-5`), otherwise dashes as colons an IPv6 one (`fd00--5`).
fn pod_address(label: &str) -> Option<IpAddr> {
    if label.matches('-').count() == 3 && !label.contains("--") {
        label
            .replace('-', ".")
            .parse::<std::net::Ipv4Addr>()
            .ok()
            .map(IpAddr::V4)
    } else {
        label
            .replace('-', ":")
            .parse::<std::net::Ipv6Addr>()
            .ok()
            .map(IpAddr::V6)
    }
}

/// A and AAAA records of `ips` for `qtype` (A, AAAA, or ANY for both).
fn address_records(owner: &Name, ips: &[IpAddr], qtype: RecordType) -> Vec<Record> {
    ips.iter()
        .filter_map(|ip| match ip {
            IpAddr::V4(v4) if matches!(qtype, RecordType::A | RecordType::ANY) => {
                Some(RData::A(A(*v4)))
            }
            IpAddr::V6(v6) if matches!(qtype, RecordType::AAAA | RecordType::ANY) => {
                Some(RData::AAAA(AAAA(*v6)))
            }
            _ => None,
        })
        .map(|d| Record::from_rdata(owner.clone(), TTL, d))
        .collect()
}
