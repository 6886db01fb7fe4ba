//! QUIC handshakes that stall, from one address, against a real relay on
//! loopback: the per-address shares and the stateless Retry that keep such
//! a flood from holding every handshake permit.
//!
//! The flood is real QUIC (quinn clients), each attempt stalled where an
//! attacker would stall it: after the relay's first flight, never sending
//! its own Finished, so the relay holds the handshake until its timeout
//! (10 s). Each attacker runs on a runtime of its own, blocked inside its
//! certificate check; the Retry round trip comes before that check, so
//! the attempts the relay asks to prove their address do prove it.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use edge_client::EdgeClient;
use relay_lab::{admin_get, edge_config, Lab};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

/// Handshake permits of the relay under test (`limits.max_concurrent_handshakes`).
const PERMITS: usize = 32;
/// An address's share of them: a quarter (unproven; twice that proven).
const SHARE: usize = PERMITS / 4;
/// Attempts of the flood, all from one address.
const ATTEMPTS: usize = 60;

/// A certificate check that never returns until told to stop: the
/// attacker's side of a stalled handshake.
#[derive(Debug)]
struct Stall {
    stop: Arc<AtomicBool>,
    /// Attempts that got as far as the relay's certificate: the ones the
    /// relay let take a handshake permit.
    reached: Arc<AtomicUsize>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for Stall {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.reached.fetch_add(1, SeqCst);
        // Bounded: the test stops it long before.
        let until = Instant::now() + Duration::from_secs(60);
        while !self.stop.load(SeqCst) && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(rustls::Error::General("stalled on purpose".into()))
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("not used".into()))
    }

    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("not used".into()))
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// One stalling attempt from `from`, on a thread and runtime of its own
/// (its certificate check blocks that runtime). Counts the attempts that
/// ended before the test let the stalled ones go (refused) in `ended`.
fn stalling_attempt(
    relay: std::net::SocketAddr,
    from: std::net::SocketAddr,
    verifier: Arc<Stall>,
    ended: Arc<AtomicUsize>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let mut tls = rustls::ClientConfig::builder_with_provider(verifier.provider.clone())
                .with_protocol_versions(&[&rustls::version::TLS13])
                .expect("TLS 1.3")
                .dangerous()
                .with_custom_certificate_verifier(verifier.clone())
                .with_no_client_auth();
            tls.alpn_protocols = vec![relay_protocol::ALPN.to_vec()];
            let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).expect("QUIC TLS");
            let mut cfg = quinn::ClientConfig::new(Arc::new(crypto));
            let mut transport = quinn::TransportConfig::default();
            transport.max_idle_timeout(Some(Duration::from_secs(30).try_into().unwrap()));
            cfg.transport_config(Arc::new(transport));
            let Ok(endpoint) = quinn::Endpoint::client(from) else {
                ended.fetch_add(1, SeqCst);
                return;
            };
            let attempt = match endpoint.connect_with(cfg, relay, "localhost") {
                Ok(c) => c,
                Err(_) => {
                    ended.fetch_add(1, SeqCst);
                    return;
                }
            };
            // A refusal ends it here; a stalled one ends when the check
            // is told to stop.
            let _ = tokio::time::timeout(Duration::from_secs(60), attempt).await;
            if !verifier.stop.load(SeqCst) {
                ended.fetch_add(1, SeqCst);
            }
        });
    })
}

/// Before: an address that opens many QUIC handshakes and stalls each took
/// every permit (32 here) while the relay was not yet busy, its later
/// attempts proved their address with a Retry and queued, and an edge
/// from another address waited in the queue until the stalled handshakes
/// timed out (10 s). Now each address may have a quarter of the permits
/// pending unproven and half of them proven, its further attempts waiting
/// for its own places: the flood holds at most three quarters of the
/// permits and the edge connects at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_quic_handshakes_from_one_address_leave_permits_for_edges() -> Result<()> {
    let mut lab = Lab::start(1, |cfg| {
        cfg.limits.max_concurrent_handshakes = PERMITS;
    })
    .await?;
    lab.edges.pop().unwrap().shutdown().await;
    let relay = lab.relay.quic_addr();
    let stop = Arc::new(AtomicBool::new(false));
    let reached = Arc::new(AtomicUsize::new(0));
    let ended = Arc::new(AtomicUsize::new(0));
    let verifier = Arc::new(Stall {
        stop: stop.clone(),
        reached: reached.clone(),
        provider: Arc::new(rustls::crypto::ring::default_provider()),
    });
    let threads: Vec<_> = (0..ATTEMPTS)
        .map(|_| {
            stalling_attempt(
                relay,
                "127.0.0.9:0".parse().unwrap(),
                verifier.clone(),
                ended.clone(),
            )
        })
        .collect();
    // Every attempt stalled, refused, or (before) queued for a permit:
    // the count stops moving.
    let settle = Instant::now() + Duration::from_secs(8);
    let mut last = (usize::MAX, usize::MAX);
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = (reached.load(SeqCst), ended.load(SeqCst));
        if now == last || Instant::now() > settle {
            break;
        }
        last = now;
    }
    let flood_held = reached.load(SeqCst);

    let cfg = edge_config(&lab.pki, 0, relay)?;
    let t = Instant::now();
    let edge = EdgeClient::spawn(cfg);
    // Unhindered, it connects in milliseconds; 5 s leaves room for a
    // loaded machine, and none for a queue held until the stalled
    // handshakes time out (10 s after they began).
    let connected = edge.wait_connected(Duration::from_secs(5)).await.is_some();
    let took = t.elapsed();
    let m = admin_get(lab.admin_addr(), "/metrics", None).await?.1;
    let count = |reason: &str| {
        let prefix = format!("relay_handshake_failures_total{{reason=\"{reason}\"}} ");
        m.lines()
            .find_map(|l| l.strip_prefix(prefix.as_str()))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    let retry = count("retry");
    stop.store(true, SeqCst);
    for t in threads {
        let _ = tokio::task::spawn_blocking(move || t.join()).await;
    }
    edge.shutdown().await;
    eprintln!(
        "QUIC flood: {ATTEMPTS} stalled attempts from one address, {flood_held} reached the relay's certificate \
         (took a permit), retry {retry}; the edge connected after {took:?}"
    );
    anyhow::ensure!(
        flood_held <= 3 * SHARE,
        "{flood_held} stalled handshakes from one address held permits (at most {} expected)",
        3 * SHARE
    );
    anyhow::ensure!(
        retry > 0,
        "no attempt past the share was asked to prove its address"
    );
    anyhow::ensure!(
        connected,
        "the edge did not connect within 5 s during the flood ({flood_held} permits held by it)"
    );
    Ok(())
}

/// The same from clients that complete QUIC and TLS (a valid edge
/// certificate here; with `[bootstrap]` anyone may) and then send nothing:
/// each holds its permit until the hello's bound. Before, the address's
/// place was let go once TLS was done, so the address went on taking
/// permits until it had them all; now the place is held with the permit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_after_tls_from_one_address_leave_permits_for_edges() -> Result<()> {
    let mut lab = Lab::start(2, |cfg| {
        cfg.limits.max_concurrent_handshakes = PERMITS;
    })
    .await?;
    let late = lab.edges.pop().unwrap();
    late.shutdown().await;
    lab.edges.pop().unwrap().shutdown().await;
    let relay = lab.relay.quic_addr();
    let ep = relay_transport::quic::client_endpoint(
        "127.0.0.9:0".parse()?,
        &lab.pki.node_material("edge-0")?,
        &relay_transport::QuicTuning::default(),
        0,
    )?;
    // All at once, as a flood arrives, and all over well within the
    // hello's bound (10 s), so those that completed still hold their
    // permits when the edge comes: each completes (and then says
    // nothing) or is refused or left waiting.
    let attempts = (0..ATTEMPTS)
        .map(|_| ep.connect(relay, "localhost"))
        .collect::<Result<Vec<_>, _>>()?;
    let outcomes = futures::future::join_all(
        attempts
            .into_iter()
            .map(|a| tokio::time::timeout(Duration::from_secs(4), a)),
    )
    .await;
    let mut silent = Vec::new();
    let mut refused = 0;
    for o in outcomes {
        match o {
            Ok(Ok(c)) => silent.push(c),
            _ => refused += 1,
        }
    }
    let cfg = edge_config(&lab.pki, 1, relay)?;
    let t = Instant::now();
    let edge = EdgeClient::spawn(cfg);
    let connected = edge.wait_connected(Duration::from_secs(5)).await.is_some();
    let took = t.elapsed();
    edge.shutdown().await;
    drop(silent);
    eprintln!(
        "QUIC silent flood: {ATTEMPTS} attempts from one address, {} completed TLS and stayed silent, {refused} refused; the edge connected after {took:?}",
        ATTEMPTS - refused
    );
    anyhow::ensure!(
        ATTEMPTS - refused <= 3 * SHARE,
        "{} silent connections from one address held permits (at most {} expected)",
        ATTEMPTS - refused,
        3 * SHARE
    );
    anyhow::ensure!(
        connected,
        "the edge did not connect within 5 s while one address held silent connections"
    );
    Ok(())
}
