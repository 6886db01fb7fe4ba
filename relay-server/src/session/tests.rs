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

/// A bench's session running: its actor's task, its handle, the edge's
/// end of its control stream, and what must be held for its life.
pub(crate) struct Running {
    pub(crate) actor: tokio::task::JoinHandle<()>,
    pub(crate) handle: Arc<SessionHandle>,
    pub(crate) edge_control: BiStream,
    pub(crate) _edge: (TunnelConn, [quinn::Endpoint; 2]),
}

impl Bench {
    /// Starts the session's actor on `shared` with route feed `feed` (a
    /// fresh one, or one the test brought to a given point).
    pub(crate) fn start(self, shared: &Arc<Shared>, feed: RouteFeed) -> Running {
        let actor = tokio::spawn(super::run_session(
            self.handle.clone(),
            (self.control, self.control_rx, feed),
            shared.clone(),
        ));
        Running {
            actor,
            handle: self.handle,
            edge_control: self.edge_control,
            _edge: self.edge,
        }
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
    let Running {
        actor,
        handle,
        edge_control,
        _edge,
    } = me.start(&shared, feed);
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

/// An edge reports its capture not installed (`Control::CaptureStatus`):
/// its session keeps the report, its admin row names the error,
/// `relay_edges_capture_failing` counts it (and not a peer that never
/// reported), its Node condition would say `CaptureFailing`; installed
/// again, all of that clears.
#[tokio::test]
async fn an_edge_reporting_its_capture_failing_shows_in_its_row_gauge_and_condition() {
    let (relay, pki) = crate::admin::tests::relay_configured(2, |_| {}).await;
    let shared = relay.shared().clone();
    let caps = capability::ALL;
    let me = bench(&shared, &pki, "edge-0", caps, vec![cidr("10.99.0.1/32")]).await;
    register(&shared, &me.handle);
    let peer = bench(&shared, &pki, "edge-1", caps, vec![cidr("10.99.0.2/32")]).await;
    register(&shared, &peer.handle);
    let gauge = || {
        let text = crate::metrics::render_edges(&shared);
        assert!(
            text.contains("# TYPE relay_edges_capture_failing gauge\n"),
            "{text}"
        );
        text.lines()
            .find_map(|l| l.strip_prefix("relay_edges_capture_failing "))
            .and_then(|v| v.parse::<u64>().ok())
            .expect("relay_edges_capture_failing")
    };
    assert_eq!(gauge(), 0);
    let Running {
        actor,
        handle,
        mut edge_control,
        _edge,
    } = me.start(&shared, RouteFeed::new("edge-0", caps));
    let send = &mut edge_control.send;
    let row = |h: &SessionHandle| {
        let row = crate::admin::SessionRow::of(h, &shared);
        (row.capture_installed, row.capture_error)
    };
    let error = "nft -f -: Error: Could not process rule: Operation not supported";
    report_capture(send, &handle, false, error).await;
    assert_eq!(gauge(), 1);
    assert_eq!(row(&handle), (Some(false), error.to_string()));
    let json = serde_json::to_value(crate::admin::SessionRow::of(&handle, &shared)).expect("json");
    assert_eq!(json["capture_installed"], false);
    assert_eq!(json["capture_error"], error);
    assert_eq!(row(&peer.handle), (None, String::new()));
    let info = handle.status_info(&shared);
    assert_eq!(info.reason(), "CaptureFailing");
    assert!(info.message().ends_with(error), "{}", info.message());
    // Installed (a working nft): cleared.
    report_capture(send, &handle, true, "").await;
    assert_eq!(gauge(), 0);
    assert_eq!(row(&handle), (Some(true), String::new()));
    assert_eq!(handle.status_info(&shared).reason(), "SessionUp");
    // A session that ends leaves the registry, and the gauge with it.
    report_capture(send, &handle, false, error).await;
    assert_eq!(gauge(), 1);
    assert!(shared.registry.remove("edge-0", handle.generation));
    assert_eq!(gauge(), 0);
    handle.kick(relay_protocol::close_code::KICKED, "test over");
    let _ = actor.await;
}

/// Sends the edge's capture report on `send` (its control stream) and
/// waits until the relay's session `handle` holds it.
async fn report_capture(
    send: &mut relay_transport::SendHalf,
    handle: &SessionHandle,
    installed: bool,
    error: &str,
) {
    write_frame(send, &Control::capture_status(installed, error))
        .await
        .expect("sent");
    tokio::time::timeout(Duration::from_secs(3), async {
        while handle.capture().map(|c| c.installed) != Some(installed) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the report taken");
}

/// What a session tells its Node about the edge's capture: one report
/// per change of it, none for a repeat (the edge reports a failing
/// install once, not each retry; a repeat from any edge still writes
/// nothing).
#[tokio::test]
async fn a_capture_report_is_one_status_report_per_change() {
    use crate::status::{EdgeCapture, SessionInfo, StatusSink};
    #[derive(Default)]
    struct Recorded(std::sync::Mutex<Vec<String>>);
    impl StatusSink for Recorded {
        fn up(&self, _: &str, info: &SessionInfo) {
            self.0.lock().unwrap().push(format!("up {}", info.reason()));
        }
        fn changed(&self, _: &str, info: &SessionInfo) {
            let seen = format!("changed {}", info.reason());
            self.0.lock().unwrap().push(seen);
        }
        fn down(&self, _: &str, _: &str) {}
        fn rejected(&self, _: &str, _: &str, _: &str) {}
    }
    let (relay, pki) = crate::admin::tests::relay_configured(1, |_| {}).await;
    let shared = relay.shared().clone();
    let me = bench(
        &shared,
        &pki,
        "edge-0",
        capability::ALL,
        vec![cidr("10.99.0.1/32")],
    )
    .await;
    register(&shared, &me.handle);
    let h = &me.handle;
    let sink = Recorded::default();
    let report = || h.report_to(&shared.registry, &sink, || h.status_info(&shared), false);
    report();
    let failing = EdgeCapture::reported(false, "nft: Operation not supported");
    for _ in 0..5 {
        // The first changes what the relay knows; the retries do not.
        if h.note_capture(failing.clone()).is_some() {
            report();
        }
        report();
    }
    assert!(h.note_capture(EdgeCapture::reported(true, "")).is_some());
    report();
    report();
    assert_eq!(
        *sink.0.lock().unwrap(),
        [
            "up SessionUp",
            "changed CaptureFailing",
            "changed SessionUp"
        ]
    );
}

/// A newer edge's control message of a kind this relay does not know,
/// and a known one carrying fields this relay does not know (trailing
/// bytes), on a live session: both ignored, the unknown kind counted in
/// `relay_control_unknown_total`, and the session goes on (a ping after
/// them is answered). What a rolling upgrade relies on: an old relay
/// must not drop a new edge's session for a message it cannot read.
#[tokio::test]
async fn a_newer_edges_unknown_message_is_ignored_and_counted_on_a_live_session() {
    use tokio::io::AsyncWriteExt;
    let (relay, pki) = crate::admin::tests::relay_configured(2, |_| {}).await;
    let shared = relay.shared().clone();
    let caps = capability::ALL;
    let me = bench(&shared, &pki, "edge-0", caps, vec![cidr("10.99.0.1/32")]).await;
    register(&shared, &me.handle);
    let Running {
        actor,
        handle,
        mut edge_control,
        _edge,
    } = me.start(&shared, RouteFeed::new("edge-0", caps));
    let unknown =
        |m: &crate::metrics::Metrics| m.control_unknown.load(std::sync::atomic::Ordering::Relaxed);
    let before = unknown(&shared.metrics);
    // A kind past the last one this build knows, with a body of its own.
    let body = [Control::VARIANTS as u8, 0, 3, 0xaa, 0xbb, 0xcc];
    let mut frame = (body.len() as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(&body);
    // And a ping with a field appended by a newer edge.
    let mut ping = codec::encode(&Control::Ping { nonce: 77 }).expect("ping");
    ping.extend_from_slice(&[0x01, 0x02]);
    frame.extend_from_slice(&(ping.len() as u32).to_be_bytes());
    frame.extend_from_slice(&ping);
    edge_control.send.write_all(&frame).await.expect("sent");
    // Then a plain ping: answered only if the session survived both.
    write_frame(&mut edge_control.send, &Control::Ping { nonce: 78 })
        .await
        .expect("sent");
    let mut frames = codec::control_reader(edge_control.recv);
    let mut pongs = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), async {
        while pongs.len() < 2 {
            let frame = frames.next().await.expect("stream open").expect("frame");
            if let Ok(Incoming::Known {
                msg: Control::Pong { nonce },
                ..
            }) = decode_control(&frame)
            {
                pongs.push(nonce);
            }
        }
    })
    .await
    .expect("both pings answered");
    assert_eq!(pongs, [77, 78]);
    assert_eq!(
        unknown(&shared.metrics),
        before + 1,
        "the unknown kind counted"
    );
    assert!(
        shared.registry.get("edge-0").is_some(),
        "the session is still registered"
    );
    handle.kick(relay_protocol::close_code::KICKED, "test over");
    let _ = actor.await;
}
