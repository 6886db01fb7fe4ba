//! `loadtest`: the local demo and the load generators for the edge relay.
//!
//! Every benchmark drives real traffic through a real `relay-server`
//! process and real edge clients on loopback, and measures the same
//! traffic sent straight to the target in the same run as the baseline.
//! See `docs/benchmarks.md` for the commands and the results.
//!
//! Modules:
//! - [`demo`]: `loadtest demo`, the README's local demo (all in-process);
//! - [`bulk`], [`rr`], [`connect`], [`sessions`], [`streams`], [`storm`],
//!   [`replicas`], [`idle`] (`rr-idle`): one benchmark each;
//! - [`soak`]: phases of load, each checked for a return to the baseline;
//! - [`bare`]: bulk over quinn alone (`bulk`'s `bare-quic` path, the
//!   ceiling), and its sink process;
//! - [`common`]: PKI and config files, child processes (killed on drop),
//!   RSS/CPU from `/proc`, services, CONNECT client, progress and tables;
//! - [`rathole`]: the peer users compare with, run on the same path by
//!   `bulk`, `rr` and `connect` when given `--rathole BIN`;
//! - [`svg`]: the hand-written latency plot;
//! - [`procs`]: hidden subcommands that run the relay / edge library code
//!   as a child process when the release binaries are not built, and the
//!   idle echo service of `streams`.

use clap::{Parser, Subcommand};

mod bare;
mod bulk;
mod common;
mod connect;
mod demo;
mod idle;
mod procs;
mod rathole;
mod replicas;
mod rr;
mod sessions;
mod soak;
mod storm;
mod streams;
mod svg;

/// Load generator and local demo for the edge relay.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run the complete local demo on loopback and exit.
    Demo {
        /// Number of simulated edges (1 to 200).
        #[arg(long, default_value_t = 2)]
        edges: usize,
    },
    /// Throughput: N concurrent streams each moving S bytes, tunnel vs direct.
    Bulk(bulk::Args),
    /// Request/response latency at a fixed rate and at max rate, tunnel vs direct.
    Rr(rr::Args),
    /// New tunneled connections per second (open, one round trip, close).
    Connect(connect::Args),
    /// N idle edges: relay memory per session and time to register all.
    Sessions(sessions::Args),
    /// M idle streams on one edge: relay and edge memory per stream.
    Streams(streams::Args),
    /// Relay restart with N edges: time until all are back, rr latency meanwhile.
    Storm(storm::Args),
    /// Fixed-rate rr through one edge, without and with N idle edges
    /// connected to the same relay (and direct), in one invocation.
    RrIdle(idle::Args),
    /// R relay replicas, N edges on each: memory per replica, time until
    /// every edge is on every replica, and back after one replica restarts.
    Replicas(replicas::Args),
    /// One relay and two edges soaked in phases (100,000 tunnelled
    /// connections, 100,000 half-open CONNECTs, an edge flapping 100 times
    /// a minute); fds, RSS, threads and tasks compared with the baseline.
    Soak(soak::Args),
    #[command(hide = true)]
    HalfopenProcess(soak::halfopen::ProcArgs),
    #[command(hide = true)]
    RelayProcess(procs::RelayArgs),
    #[command(hide = true)]
    EdgeProcess(procs::EdgeArgs),
    #[command(hide = true)]
    EchoProcess(procs::EchoArgs),
    #[command(hide = true)]
    IdleEdgesProcess(idle::EdgesArgs),
    #[command(hide = true)]
    QuicSinkProcess(bare::SinkArgs),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Demo { edges } => demo::demo(edges).await,
        Cmd::Bulk(a) => bulk::run(a).await,
        Cmd::Rr(a) => rr::run(a).await,
        Cmd::Connect(a) => connect::run(a).await,
        Cmd::Sessions(a) => sessions::run(a).await,
        Cmd::Streams(a) => streams::run(a).await,
        Cmd::Storm(a) => storm::run(a).await,
        Cmd::RrIdle(a) => idle::run(a).await,
        Cmd::Replicas(a) => replicas::run(a).await,
        Cmd::Soak(a) => soak::run(a).await,
        Cmd::HalfopenProcess(a) => soak::halfopen::process(a).await,
        Cmd::RelayProcess(a) => procs::relay(a).await,
        Cmd::EdgeProcess(a) => procs::edge(a).await,
        Cmd::EchoProcess(a) => procs::echo(a).await,
        Cmd::IdleEdgesProcess(a) => idle::edges_process(a).await,
        Cmd::QuicSinkProcess(a) => bare::sink(a).await,
    }
}
