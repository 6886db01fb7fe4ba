//! Sessions driven by hand: a [`SessionHandle`] on a relay's shared state
//! over a QUIC connection of the test's own (not through the relay's
//! listener, so no handshake or actor of the relay's touches it), and
//! what its actor does from a given start.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use relay_protocol::codec::{self, decode_control, write_frame, Incoming};
use relay_protocol::{capability, Cidr, ClientHello, Control};
use relay_transport::devcerts::DevPki;
use relay_transport::{BiStream, TunnelConn};

use super::{ControlRx, SessionHandle};
use crate::handshake::Claim;
use crate::routefeed::RouteFeed;
use crate::server::Shared;

/// One hand-made session: its handle (registered nowhere yet), what its
/// actor would run on, and the edge's end of the connection.
pub(crate) struct Bench {
    /// The session, of the next generation of the relay's.
    pub(crate) handle: Arc<SessionHandle>,
    /// The relay's end of its control stream.
    pub(crate) control: BiStream,
    /// Its queue of relay-side control messages.
    pub(crate) control_rx: ControlRx,
    /// The edge's end of its control stream.
    pub(crate) edge_control: BiStream,
    /// The edge's end of the connection, and both endpoints, held for
    /// the bench's life.
    pub(crate) edge: (TunnelConn, [quinn::Endpoint; 2]),
}

/// A session of `node` with `capabilities` on `shared` (a relay made by
/// `crate::admin::tests::relay_configured`, whose PKI is `pki`), serving
/// `routes`.
pub(crate) async fn bench(
    shared: &Shared,
    pki: &DevPki,
    node: &str,
    capabilities: u32,
    routes: Vec<Cidr>,
) -> Bench {
    let any: std::net::SocketAddr = "127.0.0.1:0".parse().expect("addr");
    let server = relay_transport::quic::server_endpoint(
        any,
        &pki.relay_material().expect("relay material"),
        &relay_transport::QuicTuning::relay_default(),
        false,
    )
    .expect("server endpoint");
    let client = relay_transport::quic::client_endpoint(
        any,
        &pki.node_material(node).expect("node material"),
        &relay_transport::QuicTuning::default(),
        0,
    )
    .expect("client endpoint");
    let to = server.local_addr().expect("server address");
    let (edge, relay) = tokio::join!(
        async { client.connect(to, "localhost").expect("connect").await },
        async { server.accept().await.expect("incoming").await },
    );
    let edge = TunnelConn::Quic(edge.expect("edge's QUIC handshake"));
    let relay = TunnelConn::Quic(relay.expect("relay's QUIC handshake"));
    // A stream is the peer's to accept once something is sent on it.
    let mut edge_control = edge.open_bi().await.expect("control stream");
    write_frame(&mut edge_control.send, &Control::Ping { nonce: 0 })
        .await
        .expect("first frame");
    let mut control = relay.accept_bi().await.expect("accept control");
    codec::read_frame::<_, Control>(&mut control.recv)
        .await
        .expect("first frame");
    let hello = ClientHello {
        version: relay_protocol::PROTOCOL_VERSION,
        node: node.into(),
        routes: routes.clone(),
        primary_addr: None,
        capabilities,
        agent: "session tests".into(),
        fallbacks: 0,
    };
    let claim = Claim {
        served: routes,
        primary: None,
    };
    let generation = shared.next_generation();
    let (handle, control_rx) = SessionHandle::new(&hello, &claim, &relay, shared, generation);
    Bench {
        handle,
        control,
        control_rx,
        edge_control,
        edge: (edge, [server, client]),
    }
}

/// Registers `handle` in `shared`'s registry with the routes it
/// advertised.
pub(crate) fn register(shared: &Shared, handle: &Arc<SessionHandle>) {
    let routes = handle.advertised.clone();
    shared
        .registry
        .register(handle.clone(), routes, 100)
        .expect("registered");
}

fn cidr(s: &str) -> Cidr {
    s.parse().expect("cidr")
}

/// An edge without route deltas gets its whole route list in its hello;
/// a peer that registers after that list was taken and before the
/// session's actor starts reaches it without any later change. (The
/// actor's receiver of registry changes counts those made before it as
/// seen: such an edge's first update used to wait for the next,
/// unrelated change.)
#[tokio::test]
async fn an_older_edge_learns_of_a_peer_that_registered_before_its_actor() {
    let (relay, pki) = crate::admin::tests::relay_configured(2, |c| {
        c.communities.insert("all".into(), vec!["*".into()]);
    })
    .await;
    let shared = relay.shared().clone();
    let older = capability::EXTENSIBLE;
    let me = bench(&shared, &pki, "edge-0", older, vec![cidr("10.99.0.1/32")]).await;
    register(&shared, &me.handle);
    // What the handshake does for the hello (`handshake.rs`).
    let mut feed = RouteFeed::new("edge-0", older);
    assert!(feed.is_legacy());
    feed.at_epoch(shared.policy.epoch());
    let visible = super::visible(&shared, "edge-0");
    let hello = feed.hello_routes(&shared.registry, shared.policy.cloud_ranges(), visible);
    assert!(!hello.contains(&cidr("10.99.0.2/32")), "{hello:?}");
    // The peer registers in the window.
    let peer = bench(&shared, &pki, "edge-1", older, vec![cidr("10.99.0.2/32")]).await;
    register(&shared, &peer.handle);
    let Bench {
        handle,
        control,
        control_rx,
        edge_control,
        edge: _edge,
    } = me;
    let actor = tokio::spawn(super::run_session(
        handle.clone(),
        (control, control_rx, feed),
        shared.clone(),
    ));
    let mut frames = codec::control_reader(edge_control.recv);
    let got = tokio::time::timeout(Duration::from_secs(3), async {
        loop {
            let bytes = frames.next().await.expect("a frame").expect("readable");
            match decode_control(&bytes) {
                Ok(Incoming::Known {
                    msg: Control::RouteUpdate { tunnel_routes },
                    ..
                }) => break tunnel_routes,
                // Anything else (a ping) is not what this is about.
                _ => continue,
            }
        }
    })
    .await
    .expect("a route update with no further change");
    assert!(got.contains(&cidr("10.99.0.2/32")), "{got:?}");
    handle.kick(relay_protocol::close_code::KICKED, "test over");
    let _ = actor.await;
    drop(edge_control.send);
}
