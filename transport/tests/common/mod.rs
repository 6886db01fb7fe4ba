//! What this crate's integration tests share: a real QUIC connection on
//! loopback between an "edge" and a "relay" (mutual TLS with the dev PKI).

use relay_transport::conn::TunnelConn;
use relay_transport::devcerts::DevPki;
use relay_transport::quic::{client_endpoint, server_endpoint, QuicTuning};

/// A QUIC connection on loopback: (edge side, relay side, the endpoints,
/// kept alive by the caller). The relay side uses `relay`, the edge side
/// `edge`.
pub(crate) async fn quic_pair(
    relay: &QuicTuning,
    edge: &QuicTuning,
) -> (TunnelConn, TunnelConn, (quinn::Endpoint, quinn::Endpoint)) {
    let pki = DevPki::generate(&["relay.test"], &["edge-a"]).unwrap();
    let server = server_endpoint(
        "127.0.0.1:0".parse().unwrap(),
        &pki.relay_material().unwrap(),
        relay,
        false,
    )
    .unwrap();
    let client = client_endpoint(
        "127.0.0.1:0".parse().unwrap(),
        &pki.node_material("edge-a").unwrap(),
        edge,
        0,
    )
    .unwrap();
    let server_addr = server.local_addr().unwrap();
    let (edge, relay) = tokio::join!(
        async {
            client
                .connect(server_addr, "relay.test")
                .unwrap()
                .await
                .unwrap()
        },
        async { server.accept().await.unwrap().await.unwrap() },
    );
    (
        TunnelConn::Quic(edge),
        TunnelConn::Quic(relay),
        (server, client),
    )
}
