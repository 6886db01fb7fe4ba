//! `bare-quic`: the ceiling. The same bulk transfer over quinn alone (the
//! workspace's quinn, the same endpoint and TLS setup as relay and edge:
//! `relay_transport::quic`, mutual TLS with the dev PKI), no relay, no TCP
//! sockets. The receiver is its own process (`loadtest quic-sink-process`),
//! like the edge; the sender runs in the loadtest process, like the relay
//! sends into QUIC. `bulk` runs it in the same invocation as the tunnel.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{ensure, Context, Result};
use relay_transport::{QuicTuning, TlsMaterial};

use crate::common::Counter;

/// `quic-sink-process --pki DIR --ready-file R`.
#[derive(clap::Args, Debug)]
pub(crate) struct SinkArgs {
    /// Directory holding `relay.pem`, `relay-key.pem` and `ca.pem`.
    #[arg(long)]
    pki: PathBuf,
    #[arg(long)]
    ready_file: PathBuf,
}

fn material(pki: &Path, cert: &str, key: &str) -> Result<TlsMaterial> {
    Ok(TlsMaterial::from_files(
        &pki.join(cert),
        &pki.join(key),
        &pki.join("ca.pem"),
    )?)
}

/// The receiving side: a QUIC server that counts each stream's bytes
/// (read as chunks, no copy) and answers the count (8 bytes, big endian).
pub(crate) async fn sink(a: SinkArgs) -> Result<()> {
    relay_transport::tls::install_default_provider();
    let tls = material(&a.pki, "relay.pem", "relay-key.pem")?;
    let ep = relay_transport::quic::server_endpoint(
        ([127, 0, 0, 1], 0).into(),
        &tls,
        &QuicTuning::default(),
        false,
    )?;
    let addr = ep.local_addr()?;
    let tmp = a.ready_file.with_extension("tmp");
    std::fs::write(&tmp, addr.to_string())?;
    std::fs::rename(&tmp, &a.ready_file)?;
    while let Some(inc) = ep.accept().await {
        tokio::spawn(async move {
            let Ok(conn) = inc.await else { return };
            while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                tokio::spawn(async move {
                    let mut total = 0u64;
                    while let Ok(Some(c)) = recv.read_chunk(usize::MAX, true).await {
                        total += c.bytes.len() as u64;
                    }
                    let _ = send.write_all(&total.to_be_bytes()).await;
                    let _ = send.finish();
                    let _ = send.stopped().await;
                });
            }
        });
    }
    Ok(())
}

/// The sending side's connection to the sink.
pub(crate) struct BareClient {
    _ep: quinn::Endpoint,
    conn: quinn::Connection,
}

impl BareClient {
    /// Connects to the sink at `addr` with node 0's certificate.
    pub(crate) async fn connect(pki: &Path, node: &str, addr: SocketAddr) -> Result<BareClient> {
        let tls = material(pki, &format!("{node}.pem"), &format!("{node}-key.pem"))?;
        let ep = relay_transport::quic::client_endpoint(
            ([127, 0, 0, 1], 0).into(),
            &tls,
            &QuicTuning::default(),
            0,
        )?;
        let conn = ep
            .connect(addr, "localhost")?
            .await
            .context("QUIC handshake with the bare sink")?;
        Ok(BareClient { _ep: ep, conn })
    }

    /// Moves `per_stream` bytes on each of `n` streams (chunks of `chunk`
    /// bytes handed over without copy); returns seconds.
    pub(crate) async fn run_once(
        &self,
        n: usize,
        per_stream: u64,
        chunk: usize,
        sent: Counter,
    ) -> Result<f64> {
        use std::sync::atomic::Ordering::Relaxed;
        let data = bytes::Bytes::from(vec![0x5au8; chunk]);
        let t0 = std::time::Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..n {
            let (mut send, mut recv) = self.conn.open_bi().await?;
            let data = data.clone();
            let sent = sent.clone();
            tasks.spawn(async move {
                let mut left = per_stream;
                while left > 0 {
                    let k = left.min(data.len() as u64) as usize;
                    send.write_chunk(data.slice(..k)).await?;
                    left -= k as u64;
                    sent.fetch_add(k as u64, Relaxed);
                }
                send.finish()?;
                let mut got = [0u8; 8];
                recv.read_exact(&mut got)
                    .await
                    .context("reading the sink's count")?;
                let got = u64::from_be_bytes(got);
                ensure!(
                    got == per_stream,
                    "bare sink counted {got} bytes, {per_stream} were sent"
                );
                anyhow::Ok(())
            });
        }
        while let Some(r) = tasks.join_next().await {
            r??;
        }
        Ok(t0.elapsed().as_secs_f64())
    }
}
