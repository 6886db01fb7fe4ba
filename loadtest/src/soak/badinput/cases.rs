//! The rows the `badinput` phase drives: what each repetition sends,
//! and which answers count as the row's typed outcome.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result};
use relay_lab::{edge_ip, edge_name};
use relay_transport::tls::TlsMaterial;

use super::quic::{self, FakeEdge, First};
use super::{http, ADMIN_TOKEN, STAND_IN, STRANGER};

/// What one repetition does.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Kind {
    /// A first frame on the control stream, with edge 0's certificate.
    Hello(First),
    /// A first frame with the certificate of an unknown node.
    Stranger(First),
    /// Edge 0's node name with a certificate from another CA.
    UnknownCa,
    /// Random bytes to the TLS-over-TCP fallback listener.
    TlsGarbage,
    /// The stand-in edge opens a stream to one of these targets.
    EdgeStream(EdgeTargets),
    /// A CONNECT to one of these targets.
    Connect(ConnectTargets),
    /// A CONNECT head trickled a byte at a time.
    Slowloris,
    /// A CONNECT head without end.
    Endless,
    /// These bytes to the CONNECT port.
    ConnectRaw(&'static str),
    /// Admin requests with a wrong or no token.
    WrongToken,
    /// A drain of edge 1 with a grace of days.
    HugeGrace,
    /// An admin request head trickled a byte at a time.
    AdminSlowloris,
    /// An admin request head without end.
    AdminEndless,
}

/// Targets of the stand-in edge's streams.
#[derive(Debug, Clone, Copy)]
pub(crate) enum EdgeTargets {
    /// Loopback, unspecified, multicast, link-local, broadcast, mapped.
    Forbidden,
    /// The relay's own listeners (all on loopback here).
    RelayItself,
    /// Edge 0's echo service (no community shared).
    OtherEdge,
    /// The stand-in's own address.
    OwnRoute,
    /// Outside `tunnel_routes` (none are configured).
    Outside,
}

/// Targets of CONNECT rows.
#[derive(Debug, Clone, Copy)]
pub(crate) enum ConnectTargets {
    /// A port edge 0 does not allow (`allowed_ports`).
    PortNotAllowed,
    /// Addresses and a name nobody serves.
    NoRoute,
    /// The relay's own listeners and loopback.
    RelayItself,
}

/// One row (or group of rows) of the table.
pub(crate) struct Case {
    pub(crate) rows: &'static str,
    pub(crate) what: &'static str,
    pub(crate) kind: Kind,
    /// Answers that count as the row's outcome (prefixes).
    pub(crate) expect: &'static [&'static str],
    /// Repetitions in flight at once.
    pub(crate) parallel: usize,
}

const fn case(
    rows: &'static str,
    what: &'static str,
    kind: Kind,
    expect: &'static [&'static str],
    parallel: usize,
) -> Case {
    Case {
        rows,
        what,
        kind,
        expect,
        parallel,
    }
}

/// Many at once for the rows that wait on a timeout; few for handshakes
/// (the relay admits 256 at once, and the point is not to overload it).
const SLOW: usize = 250;
const FAST: usize = 8;

pub(crate) const CASES: &[Case] = &[
    case(
        "2",
        "hello frame announcing 4 GiB",
        Kind::Hello(First::Oversized),
        &["rejected malformed"],
        FAST,
    ),
    case(
        "3",
        "hello of a newer version, same layout",
        Kind::Hello(First::NewerVersion),
        &["rejected unsupported_version"],
        FAST,
    ),
    case(
        "4",
        "hello of a newer version, undecodable",
        Kind::Hello(First::Undecodable),
        &["rejected unsupported_version"],
        FAST,
    ),
    case(
        "5",
        "hello claiming routes not allowed",
        Kind::Hello(First::RoutesNotAllowed),
        &["rejected route_not_allowed"],
        FAST,
    ),
    case(
        "6",
        "truncated / closed-early hello frame",
        Kind::Hello(First::Truncated),
        &["closed: closed by peer: protocol"],
        FAST,
    ),
    case(
        "7",
        "random bytes as the first frame",
        Kind::Hello(First::Random),
        &[
            "rejected malformed",
            "rejected unsupported_version",
            "closed: closed by peer: protocol",
        ],
        FAST,
    ),
    case(
        "7",
        "random bytes on a fresh TLS-over-TCP connection",
        Kind::TlsGarbage,
        &["TLS alert, closed", "closed", "reset"],
        FAST,
    ),
    case(
        "12",
        "client certificate from an unknown CA",
        Kind::UnknownCa,
        &["TLS refused"],
        FAST,
    ),
    case(
        "13",
        "node A's certificate claiming node B",
        Kind::Hello(First::OtherNode),
        &["rejected identity_mismatch"],
        FAST,
    ),
    case(
        "14",
        "certificate of a node not in [nodes]",
        Kind::Stranger(First::Node(STRANGER)),
        &["rejected unknown_node"],
        FAST,
    ),
    case(
        "23",
        "edge stream to loopback, unspecified, multicast, link-local, broadcast, mapped",
        Kind::EdgeStream(EdgeTargets::Forbidden),
        &["denied forbidden_address"],
        FAST,
    ),
    case(
        "24",
        "edge stream to the relay's own listeners (loopback here)",
        Kind::EdgeStream(EdgeTargets::RelayItself),
        &["denied forbidden_address", "denied relay_itself"],
        FAST,
    ),
    case(
        "25",
        "edge stream to another edge, no shared community",
        Kind::EdgeStream(EdgeTargets::OtherEdge),
        &["denied no_community"],
        FAST,
    ),
    case(
        "26",
        "edge stream to its own route",
        Kind::EdgeStream(EdgeTargets::OwnRoute),
        &["denied own_route"],
        FAST,
    ),
    case(
        "27",
        "edge stream outside tunnel_routes",
        Kind::EdgeStream(EdgeTargets::Outside),
        &["denied outside_cloud_ranges"],
        FAST,
    ),
    case(
        "29",
        "CONNECT to a port the edge does not allow",
        Kind::Connect(ConnectTargets::PortNotAllowed),
        &["403 denied"],
        FAST,
    ),
    case(
        "30",
        "CONNECT to an address or name nobody serves",
        Kind::Connect(ConnectTargets::NoRoute),
        &["502 no_route"],
        FAST,
    ),
    case(
        "30",
        "CONNECT to the relay's own listeners and loopback",
        Kind::Connect(ConnectTargets::RelayItself),
        &["502 no_route"],
        FAST,
    ),
    case(
        "32",
        "CONNECT header trickled (slowloris)",
        Kind::Slowloris,
        &["408"],
        SLOW,
    ),
    case(
        "33",
        "endless CONNECT header",
        Kind::Endless,
        &["431"],
        FAST,
    ),
    case(
        "34",
        "GET instead of CONNECT",
        Kind::ConnectRaw("GET / HTTP/1.1\r\nHost: x\r\n\r\n"),
        &["405"],
        FAST,
    ),
    case(
        "35",
        "CONNECT host:+22 (signed port)",
        Kind::ConnectRaw("CONNECT 127.0.0.2:+22 HTTP/1.1\r\nHost: x\r\n\r\n"),
        &["400"],
        FAST,
    ),
    case(
        "37",
        "admin request with a wrong or no token",
        Kind::WrongToken,
        &["401"],
        FAST,
    ),
    case(
        "38",
        "drain with a grace of days",
        Kind::HugeGrace,
        &["400"],
        FAST,
    ),
    case(
        "86",
        "admin request head trickled (slowloris)",
        Kind::AdminSlowloris,
        &["closed", "408"],
        SLOW,
    ),
    case(
        "87",
        "endless admin request head",
        Kind::AdminEndless,
        &["431"],
        FAST,
    ),
];

/// What every repetition needs.
pub(crate) struct Ctx {
    pub(crate) relay_quic: SocketAddr,
    pub(crate) connect: SocketAddr,
    pub(crate) admin: SocketAddr,
    /// Edge 0's echo service.
    pub(crate) echo0: SocketAddr,
    /// Client endpoints: edge 0's certificate, the stranger's, a rogue
    /// CA's for edge 0.
    pub(crate) edge0: quinn::Endpoint,
    pub(crate) stranger: quinn::Endpoint,
    pub(crate) rogue: quinn::Endpoint,
    /// The stand-in edge's certificate.
    pub(crate) stand_in: TlsMaterial,
    /// How long a trickling client keeps going.
    pub(crate) hold: Duration,
}

/// One repetition (`i` picks among a row's variants); names the answer.
pub(crate) async fn one(ctx: &Ctx, kind: Kind, fake: Option<&FakeEdge>, i: u64) -> Result<String> {
    let c = ctx;
    let pick = |v: &[SocketAddr]| v[i as usize % v.len()];
    Ok(match kind {
        Kind::Hello(f) => quic::first_frame(&c.edge0, c.relay_quic, f, i).await?,
        Kind::Stranger(f) => quic::first_frame(&c.stranger, c.relay_quic, f, i).await?,
        Kind::UnknownCa => {
            quic::first_frame(&c.rogue, c.relay_quic, First::Node("edge-0"), i).await?
        }
        Kind::TlsGarbage => http::tls_garbage(c.relay_quic).await?,
        Kind::EdgeStream(t) => {
            let fake = fake.context("no stand-in edge")?;
            let targets: Vec<SocketAddr> = match t {
                EdgeTargets::Forbidden => [
                    "127.0.0.1:80",
                    "0.0.0.0:80",
                    "224.0.0.1:80",
                    "169.254.1.1:80",
                    "255.255.255.255:80",
                    "[::ffff:127.0.0.1]:80",
                    "[::1]:80",
                ]
                .iter()
                .map(|a| a.parse())
                .collect::<Result<_, _>>()?,
                EdgeTargets::RelayItself => vec![c.relay_quic, c.connect, c.admin],
                EdgeTargets::OtherEdge => vec![c.echo0],
                EdgeTargets::OwnRoute => vec![SocketAddr::new(edge_ip(STAND_IN), 80)],
                EdgeTargets::Outside => vec!["10.1.2.3:80".parse()?, "192.0.2.1:443".parse()?],
            };
            fake.open(pick(&targets)).await
        }
        Kind::Connect(t) => {
            let targets: Vec<String> = match t {
                ConnectTargets::PortNotAllowed => vec![format!("{}:1", edge_ip(0))],
                ConnectTargets::NoRoute => vec![
                    "127.0.0.200:80".into(),
                    "no-such-node:10250".into(),
                    "[::1]:80".into(),
                ],
                ConnectTargets::RelayItself => vec![
                    c.connect.to_string(),
                    c.admin.to_string(),
                    c.relay_quic.to_string(),
                    "127.0.0.1:22".into(),
                    "localhost:80".into(),
                ],
            };
            http::connect(c.connect, &targets[i as usize % targets.len()]).await?
        }
        Kind::Slowloris => {
            let head = format!("CONNECT {} HTTP/1.1\r\nX-Slow: ", c.echo0);
            http::trickle(c.connect, head.as_bytes(), c.hold).await?
        }
        Kind::Endless => {
            let head = format!("CONNECT {} HTTP/1.1\r\n", c.echo0);
            http::endless(c.connect, head.as_bytes(), 64 << 10).await?
        }
        Kind::ConnectRaw(req) => http::request(c.connect, req.as_bytes()).await?,
        Kind::WrongToken => {
            let (path, bearer) = [
                ("/v1/sessions", Some("wrong-token-0123456789")),
                ("/metrics", None),
                ("/v1/routes", Some("")),
            ][i as usize % 3];
            relay_lab::admin_get(c.admin, path, bearer)
                .await?
                .0
                .to_string()
        }
        Kind::HugeGrace => {
            let grace = ["25h", "18446744073709551615s", "400d"][i as usize % 3];
            let req = format!(
                "DELETE /v1/sessions/{}?drain=true&grace={grace} HTTP/1.1\r\nHost: admin\r\nAuthorization: Bearer {ADMIN_TOKEN}\r\nConnection: close\r\n\r\n",
                edge_name(1)
            );
            http::request(c.admin, req.as_bytes()).await?
        }
        Kind::AdminSlowloris => {
            http::trickle(c.admin, b"GET /healthz HTTP/1.1\r\nX-Slow: ", c.hold).await?
        }
        Kind::AdminEndless => http::endless(c.admin, b"GET /healthz HTTP/1.1\r\n", 1 << 20).await?,
    })
}
