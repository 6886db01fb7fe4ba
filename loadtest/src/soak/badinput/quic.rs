//! Bad input over QUIC with the relay's own CA: raw first frames on the
//! control stream (the way `lab/tests/handshake.rs` `raw_hello` sends them),
//! certificates that must not pass, and a hand-driven edge session that
//! opens streams to targets an edge may not reach.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use relay_lab::{edge_ip, edge_name};
use relay_protocol::codec::{encode, encode_frame, read_frame};
use relay_protocol::{ClientHello, HelloReply, StreamOpen, Target, L4, PROTOCOL_VERSION};
use relay_transport::tls::TlsMaterial;
use relay_transport::{quic, QuicTuning, TunnelConn};
use tokio::io::AsyncWriteExt;

/// How long a client waits for the relay's answer to its first frame.
const ANSWER: Duration = Duration::from_secs(10);

/// A QUIC client endpoint presenting one certificate.
pub(crate) fn endpoint(tls: &TlsMaterial) -> Result<quinn::Endpoint> {
    Ok(quic::client_endpoint(
        "127.0.0.1:0".parse()?,
        tls,
        &QuicTuning::default(),
        0,
    )?)
}

/// A current-version hello of `node` claiming `routes`.
pub(crate) fn hello(node: &str, routes: Vec<relay_protocol::Cidr>) -> ClientHello {
    ClientHello {
        version: PROTOCOL_VERSION,
        node: node.into(),
        routes,
        primary_addr: None,
        // As today's edges: an unknown node is then told `unknown_node`
        // (older edges get `route_not_allowed`).
        capabilities: relay_protocol::capability::EXTENSIBLE,
        agent: "loadtest badinput".into(),
        fallbacks: 0,
    }
}

/// The first frames a misbehaving client sends, by row.
#[derive(Debug, Clone, Copy)]
pub(crate) enum First {
    /// A length prefix announcing 4 GiB (row 2).
    Oversized,
    /// A hello of version 99 with today's layout (row 3).
    NewerVersion,
    /// Version 7 followed by bytes no layout decodes (row 4).
    Undecodable,
    /// A current hello claiming 10.0.0.0/8 (row 5).
    RoutesNotAllowed,
    /// Half a frame, then the stream finished (row 6; odd repetitions end
    /// inside the length prefix).
    Truncated,
    /// 64 random bytes, framed on even repetitions, raw on odd (row 7).
    Random,
    /// A valid hello naming another node than the certificate (row 13).
    OtherNode,
    /// A valid hello of the certificate's node, which `[nodes]` lacks (row 14).
    Node(&'static str),
}

impl First {
    /// The bytes of repetition `i`.
    fn bytes(self, i: u64) -> Result<Vec<u8>> {
        Ok(match self {
            First::Oversized => vec![0xff, 0xff, 0xff, 0xf0],
            First::NewerVersion => {
                let mut h = hello(&edge_name(0), vec![]);
                h.version = 99;
                encode_frame(&h)?.to_vec()
            }
            First::Undecodable => {
                let mut body = encode(&7u16)?;
                body.extend_from_slice(&[0xff; 40]);
                framed(body)
            }
            First::RoutesNotAllowed => {
                encode_frame(&hello(&edge_name(0), vec!["10.0.0.0/8".parse()?]))?.to_vec()
            }
            First::Truncated if i.is_multiple_of(2) => {
                let mut f = 100u32.to_be_bytes().to_vec();
                f.extend_from_slice(&[0u8; 10]);
                f
            }
            First::Truncated => vec![0, 0],
            First::Random => {
                let body = random_bytes(64);
                if i.is_multiple_of(2) {
                    framed(body)
                } else {
                    body
                }
            }
            First::OtherNode => encode_frame(&hello(&edge_name(1), vec![]))?.to_vec(),
            First::Node(n) => encode_frame(&hello(n, vec![]))?.to_vec(),
        })
    }
}

fn framed(body: Vec<u8>) -> Vec<u8> {
    let mut f = (body.len() as u32).to_be_bytes().to_vec();
    f.extend_from_slice(&body);
    f
}

/// Random bytes (from the kernel: no RNG crate for one use).
pub(crate) fn random_bytes(n: usize) -> Vec<u8> {
    use std::io::Read;
    let mut v = vec![0u8; n];
    let _ = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut v));
    v
}

/// Connects with `ep`'s certificate, sends `first`'s bytes of repetition
/// `i` on the control stream, finishes it, and names the relay's answer:
/// `rejected <reason>`, `accepted` (a failure of the relay), `closed
/// without a reply`, or `TLS refused` when the handshake itself failed.
pub(crate) async fn first_frame(
    ep: &quinn::Endpoint,
    relay: SocketAddr,
    first: First,
    i: u64,
) -> Result<String> {
    let bytes = first.bytes(i)?;
    let conn = match ep.connect(relay, "localhost")?.await {
        Ok(c) => TunnelConn::Quic(c),
        Err(e) => return Ok(tls_or(&e.to_string())),
    };
    let out = async {
        let mut c = conn.open_bi().await.map_err(|e| anyhow::anyhow!(e.0))?;
        c.send.write_all(&bytes).await?;
        c.send.shutdown().await?;
        anyhow::Ok(
            match tokio::time::timeout(ANSWER, read_frame::<_, HelloReply>(&mut c.recv)).await {
                Err(_) => Some(format!("no answer within {ANSWER:?}")),
                Ok(Ok(HelloReply::Rejected(r))) => Some(format!("rejected {}", r.reason.as_str())),
                Ok(Ok(HelloReply::Accepted(_))) => Some("accepted".into()),
                Ok(Err(_)) => None,
            },
        )
    }
    .await;
    let named = match out {
        Ok(Some(o)) => o,
        // No answer on the stream: the connection's close says why.
        _ => match tokio::time::timeout(Duration::from_secs(2), conn.closed()).await {
            Ok(why) => tls_or(&why),
            Err(_) => "neither an answer nor a close".into(),
        },
    };
    conn.close(0, "");
    Ok(named)
}

/// Names a connection's close: `TLS refused` for a failed certificate
/// check (the client learns it only once its first stream fails), else
/// `closed: <why>`.
fn tls_or(why: &str) -> String {
    if why.contains("certificate") || why.contains("crypto") || why.contains("TLS") {
        "TLS refused".into()
    } else {
        format!("closed: {why}")
    }
}

/// A hand-driven edge session of node `edge-<n>` (listed in `[nodes]`
/// with no process of its own), to open streams a real edge would never
/// send. Closed on [`FakeEdge::close`].
pub(crate) struct FakeEdge {
    conn: TunnelConn,
    // Held: finishing the control stream would end the session.
    _control: relay_transport::conn::BiStream,
    ep: quinn::Endpoint,
}

impl FakeEdge {
    /// Registers node `edge-<n>` serving its `/32` with `tls`.
    pub(crate) async fn connect(relay: SocketAddr, tls: &TlsMaterial, n: usize) -> Result<Self> {
        let ep = endpoint(tls)?;
        let conn = TunnelConn::Quic(ep.connect(relay, "localhost")?.await?);
        let mut control = conn.open_bi().await.map_err(|e| anyhow::anyhow!(e.0))?;
        let mut h = hello(&edge_name(n), vec![relay_protocol::Cidr::host(edge_ip(n))]);
        h.primary_addr = Some(edge_ip(n));
        control.send.write_all(&encode_frame(&h)?).await?;
        let reply = tokio::time::timeout(ANSWER, read_frame::<_, HelloReply>(&mut control.recv))
            .await
            .context("no hello reply")??;
        if let HelloReply::Rejected(r) = reply {
            bail!(
                "the stand-in edge was refused: {} {}",
                r.reason.as_str(),
                r.message
            );
        }
        Ok(FakeEdge {
            conn,
            _control: control,
            ep,
        })
    }

    /// Opens a TCP stream to `target`; names the relay's answer
    /// (`denied forbidden_address`, ...; `ok` is a failure of the relay).
    pub(crate) async fn open(&self, target: SocketAddr) -> String {
        let open = StreamOpen {
            target: Target::Addr(target),
            source: None,
            l4: L4::Tcp,
        };
        match relay_transport::conn::open_stream(&self.conn, &open, ANSWER).await {
            Ok(mut bi) => {
                bi.send.reset(0);
                "ok".into()
            }
            Err(r) => {
                let why = r.message.split(':').next().unwrap_or_default();
                format!("{} {why}", r.status.as_str())
            }
        }
    }

    /// Closes the session and waits (bounded) for the close to be sent.
    pub(crate) async fn close(self) -> Result<()> {
        self.conn.close(0, "done");
        ensure!(
            tokio::time::timeout(Duration::from_secs(5), self.ep.wait_idle())
                .await
                .is_ok(),
            "the stand-in edge's endpoint did not go idle"
        );
        Ok(())
    }
}
