//! The session hook end to end: an edge with `[dns]` announces
//! `SERVICE_NAMES`, takes the `ServiceNames` frames a relay sends on the
//! control stream, and its resolver answers from them; an edge without it
//! does not announce the bit. The relay here is a stand-in built from the
//! production protocol and transport crates (the real relay does not send
//! names yet), over real QUIC with mutual TLS on loopback.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use edge_client::dns::DnsConfig;
use edge_client::{EdgeClient, EdgeConfig};
use hickory_proto::op::{Message, Query, ResponseCode};
use hickory_proto::rr::{Name, RecordType};
use relay_protocol::codec::{read_frame, write_frame};
use relay_protocol::{
    capability, ClientHello, Control, HelloReply, NameKind, NamePort, NameProtocol, ServerHello,
    ServiceName, ServiceNameKey,
};
use relay_transport::devcerts::DevPki;
use relay_transport::{quic, BiStream, QuicTuning, TunnelConn};
use tokio::net::UdpSocket;

fn state_file() -> PathBuf {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    std::env::temp_dir().join(format!(
        "edge-dns-session-{}-{nanos}/names.json",
        std::process::id()
    ))
}

/// Starts an edge against a stand-in relay; returns the edge, the
/// accepted connection, its control stream and the edge's hello.
async fn connect(
    dns: Option<DnsConfig>,
) -> Result<(EdgeClient, TunnelConn, BiStream, ClientHello)> {
    relay_transport::tls::install_default_provider();
    let pki = DevPki::generate(&["localhost"], &["edge-0"])?;
    let ep = quic::server_endpoint(
        "127.0.0.1:0".parse()?,
        &pki.relay_material()?,
        &QuicTuning::default(),
        false,
    )?;
    let mut cfg = EdgeConfig::new(
        "edge-0",
        ep.local_addr()?.to_string(),
        "localhost",
        pki.node_material("edge-0")?,
    );
    cfg.dns = dns;
    let edge = EdgeClient::start(cfg).await?;
    let incoming = tokio::time::timeout(Duration::from_secs(10), ep.accept())
        .await?
        .expect("the edge dials");
    let conn = TunnelConn::Quic(incoming.await?);
    let mut control = conn.accept_bi().await?;
    let hello: ClientHello = read_frame(&mut control.recv).await?;
    let accepted = HelloReply::Accepted(ServerHello {
        session_id: 1,
        generation: 1,
        relay_id: "stand-in".into(),
        keepalive_ms: 5000,
        idle_timeout_ms: 20000,
        tunnel_routes: vec![],
        capabilities: capability::ALL,
    });
    write_frame(&mut control.send, &accepted).await?;
    edge.wait_connected(Duration::from_secs(5))
        .await
        .expect("connected to the stand-in relay");
    Ok((edge, conn, control, hello))
}

async fn ask(at: SocketAddr, name: &str) -> Result<Message> {
    let sock = UdpSocket::bind("127.0.0.1:0").await?;
    let mut q = Message::query();
    q.add_query(Query::query(Name::from_ascii(name)?, RecordType::A));
    sock.send_to(&q.to_vec()?, at).await?;
    let mut buf = vec![0u8; 2048];
    let (n, _) = tokio::time::timeout(Duration::from_secs(2), sock.recv_from(&mut buf)).await??;
    Ok(Message::from_vec(&buf[..n])?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_sent_on_the_control_stream_reach_the_resolver() -> Result<()> {
    let file = state_file();
    // No upstream listens here: a forwarded query would fail, so every
    // answer below comes from the table.
    let mut dns = DnsConfig::new("127.0.0.1:9".parse()?, file.clone());
    dns.listen = "127.0.0.1:0".parse()?;
    dns.forward_timeout = Duration::from_millis(300);
    let (edge, conn, mut control, hello) = connect(Some(dns)).await?;
    assert_ne!(hello.capabilities & capability::SERVICE_NAMES, 0);
    let at = edge.dns().expect("resolver running").local_addr();

    let web = ServiceName {
        key: ServiceNameKey {
            namespace: "shop".into(),
            name: "web".into(),
        },
        kind: NameKind::ClusterIp(vec!["10.96.0.20".parse()?]),
        ports: vec![NamePort {
            name: "http".into(),
            port: 80,
            protocol: NameProtocol::Tcp,
        }],
        endpoints: vec![],
    };
    for f in Control::service_names(true, "cluster.local", vec![web], vec![]) {
        write_frame(&mut control.send, &f).await?;
    }
    let mut answered = None;
    for _ in 0..50 {
        let m = ask(at, "web.shop.svc.cluster.local.").await?;
        if m.metadata.response_code == ResponseCode::NoError && !m.answers.is_empty() {
            answered = Some(m);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let m = answered.expect("the resolver answers from the names the relay sent");
    assert_eq!(
        m.answers[0].data.ip_addr(),
        Some("10.96.0.20".parse::<IpAddr>()?)
    );
    // A removal in a later batch.
    let gone = ServiceNameKey {
        namespace: "shop".into(),
        name: "web".into(),
    };
    for f in Control::service_names(false, "cluster.local", vec![], vec![gone]) {
        write_frame(&mut control.send, &f).await?;
    }
    let mut nx = false;
    for _ in 0..50 {
        if ask(at, "web.shop.svc.cluster.local.")
            .await?
            .metadata
            .response_code
            == ResponseCode::NXDomain
        {
            nx = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(nx, "a removed Service is NXDOMAIN");
    edge.shutdown().await;
    conn.close(0, "done");
    let _ = std::fs::remove_dir_all(file.parent().unwrap());
    Ok(())
}

#[tokio::test]
async fn an_edge_without_dns_does_not_ask_for_names() -> Result<()> {
    let (edge, conn, _control, hello) = connect(None).await?;
    assert_eq!(hello.capabilities & capability::SERVICE_NAMES, 0);
    assert!(edge.dns().is_none());
    edge.shutdown().await;
    conn.close(0, "done");
    Ok(())
}
