//! Bulk throughput through the namespace lab, side by side in one
//! invocation (`lab-bulk`, and a short smoke in `tests/bulk.rs`): iperf3,
//! one cloud pod sending to epod1 behind nat1's masquerading NAT, over
//!
//! - **tunnel**: this project. The iperf3 client in the cloud pod dials
//!   epod1's pod IP; the relay node captures it (`[capture]`, nftables) and
//!   `relay-server` carries it over QUIC to `edge-client` on edge1, which
//!   dials epod1. Both run as the real release binaries, each its own
//!   process in its namespace.
//! - **rathole** (0.5, noise transport): its server on the relay node
//!   listens on the WAN address for its client and exposes a service port
//!   on the relay node's LAN address; its client on edge1 dials out through
//!   nat1 and forwards to epod1's iperf3. The iperf3 client in the same
//!   cloud pod dials that service port.
//! - **direct**: no tunnel, the same hops forwarded by the kernel. The edge
//!   cannot be dialled (nothing enters through its NAT), so the iperf3
//!   client runs in epod1 with `-R` (reverse: the server sends) and dials
//!   the relay node's WAN address, where a DNAT rule (as a NodePort would)
//!   forwards the port to the iperf3 server in the cloud pod. Data then
//!   flows cloud pod → cloud LAN → relay node → WAN → nat1 → edge1 → epod1,
//!   as in the other two, with no encryption and no user-space hop.
//!
//! With `cpod2` (the default) traffic enters the relay node from the cloud
//! LAN, as it does from every node but the relay's own. For each path the
//! receiver's Gbit/s (iperf3's `end.sum_received`) and the CPU seconds per
//! GiB received of the relay-side and the edge-side process
//! (`/proc/<pid>/stat` utime + stime before and after the test) are kept;
//! the runs interleave the paths (tunnel, rathole, direct, then the next
//! stream count, then the next run) so a change in the machine's load hits
//! all of them alike.
//!
//! Everything lives in namespaces of a lab built for the run; dropping the
//! [`Bench`] kills every process and deletes the namespaces, also on error
//! and after [`request_stop`] (the binary's SIGINT/SIGTERM handler).

use crate::TempDir;
use std::net::Ipv4Addr;
use std::path::{Path as FsPath, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};

use crate::netns::{self, NetnsLab, Role};
use crate::scenario::{
    captured_prefixes, edge_toml, lab_pki, relay_config_in, session, RelayProcess,
};

pub mod iperf;
pub mod procs;
pub mod report;
use procs::NsChild;
pub use report::{Path, Ratio, Report, Sample};

/// What "direct" measures, as the table and the JSON file say it.
pub const DIRECT_MEANS: &str = "no tunnel: iperf3 -R, client in epod1 dialling the relay node's WAN address, DNAT there (like a NodePort) to the iperf3 server in the cloud pod; data flows cloud pod -> relay node -> WAN -> nat1 (masquerade) -> edge1 -> epod1, forwarded by the kernel only";

/// epod1's iperf3 server (tunnel and rathole end here).
const EDGE_IPERF: u16 = 5201;
/// The cloud pod's iperf3 server (direct), and the relay node's WAN port
/// forwarded to it.
const CLOUD_IPERF: u16 = 5202;
/// rathole's service port on the relay node's LAN address.
const RATHOLE_SERVICE: u16 = 5203;
/// rathole's control port on the relay node's WAN address.
const RATHOLE_CONTROL: u16 = 2333;
/// Bound on every start-up wait (a session, a capture, a first transfer).
const START_LIMIT: Duration = Duration::from_secs(20);

static STOP: AtomicBool = AtomicBool::new(false);

/// Asks a running benchmark to stop: every wait gives up at once, with an
/// error, and the [`Bench`] is dropped (processes killed, namespaces
/// deleted). Safe to call from a signal-watching thread.
pub fn request_stop() {
    STOP.store(true, Ordering::SeqCst);
}

/// Whether [`request_stop`] was called.
pub fn stop_requested() -> bool {
    STOP.load(Ordering::SeqCst)
}

/// What to run.
#[derive(Clone, Debug)]
pub struct Options {
    /// Seconds per iperf3 test (`-t`).
    pub seconds: u32,
    /// Runs; the table shows medians.
    pub runs: usize,
    /// Stream counts (`-P`), each measured in every run.
    pub streams: Vec<u32>,
    /// The cloud pod ([`Role::Cpod2`]: another node than the relay's).
    pub cloud_pod: Role,
    /// `relay-server`.
    pub relay_bin: PathBuf,
    /// `edge-client`.
    pub edge_bin: PathBuf,
    /// `iperf3`.
    pub iperf3: PathBuf,
    /// rathole, or why it is skipped.
    pub rathole: std::result::Result<PathBuf, String>,
}

/// `iperf3` on `PATH`.
pub fn find_iperf3() -> Result<PathBuf> {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|d| d.join("iperf3"))
        .find(|p| p.is_file())
        .context("iperf3 not found on PATH (apt-get install iperf3)")
}

/// rathole where `loadtest/peers/install-rathole.sh` installs it
/// (`target/peers/bin/rathole`), or why it is not there.
pub fn default_rathole() -> std::result::Result<PathBuf, String> {
    let p = FsPath::new(env!("CARGO_MANIFEST_DIR")).join("../target/peers/bin/rathole");
    if p.is_file() {
        Ok(p)
    } else {
        Err(format!(
            "not installed at {} (install it with loadtest/peers/install-rathole.sh, or pass --rathole PATH)",
            p.display()
        ))
    }
}

/// The lab and everything running in it for one benchmark. Fields drop in
/// order: processes first, then the files, then the namespaces.
pub struct Bench {
    relay: RelayProcess,
    edge: NsChild,
    rathole: Option<(NsChild, NsChild)>,
    _edge_iperf: NsChild,
    _cloud_iperf: NsChild,
    opts: Options,
    dir: TempDir,
    lab: NetnsLab,
}

fn check_stop() -> Result<()> {
    ensure!(!stop_requested(), "stop requested");
    Ok(())
}

/// Polls `cond` every 100 ms for at most [`START_LIMIT`], giving up on a
/// stop request.
fn wait_for(what: &str, mut cond: impl FnMut() -> Result<bool>) -> Result<()> {
    let t = Instant::now();
    loop {
        check_stop()?;
        if cond()? {
            return Ok(());
        }
        ensure!(
            t.elapsed() < START_LIMIT,
            "{what}: not within {START_LIMIT:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

impl Bench {
    /// Builds the lab and starts the relay, edge1, the iperf3 servers, the
    /// direct path's port forward and (when available) rathole; returns
    /// once a first small transfer went through every path.
    pub fn start(opts: Options) -> Result<Bench> {
        ensure!(
            matches!(opts.cloud_pod, Role::Cpod1 | Role::Cpod2),
            "the cloud pod must be cpod1 or cpod2"
        );
        let lab = NetnsLab::with_prefix("rb")?;
        let dir = TempDir(std::env::temp_dir().join(format!("{}-bulk", lab.tag())));
        std::fs::create_dir_all(&dir.0)?;
        let pki = lab_pki()?;
        let relay = RelayProcess::start(&lab, &opts.relay_bin, &pki, &relay_config_in(&lab, &pki)?)
            .context("starting relay-server on the relay node")?;
        let certs = dir.0.join("certs");
        pki.write_to(&certs)?;
        let mut edge = NsChild::edge(
            &lab,
            1,
            &opts.edge_bin,
            &edge_toml(&lab, 1, &certs, ""),
            &dir.0,
        )?;
        let prefix = netns::edge_pod_cidr(1).to_string();
        wait_for(
            "edge1's session and the relay's capture of its pod CIDR",
            || {
                edge.check_alive()?;
                Ok(captured_prefixes(&lab)?.contains(&prefix))
            },
        )?;
        let row = session(&lab, "edge1")?.context("edge1 has no session")?;
        ensure!(
            row.transport == "quic",
            "edge1 is on {}, not QUIC",
            row.transport
        );

        let iperf_server = |ns: Role, port: u16, name: &str| {
            NsChild::spawn(
                &lab,
                ns,
                name,
                &opts.iperf3,
                &["-s".into(), "-p".into(), port.to_string()],
                &dir.0.join(format!("{name}.log")),
            )
        };
        let edge_iperf = iperf_server(Role::Epod1, EDGE_IPERF, "iperf3-epod1")?;
        let cloud_iperf = iperf_server(opts.cloud_pod, CLOUD_IPERF, "iperf3-cloud")?;
        // The direct path's way in: a NodePort-like DNAT on the relay
        // node's WAN side to the cloud pod's iperf3 server (the gateway
        // forwards nothing to private ranges, and nothing reaches the edge
        // from outside).
        let pod = cloud_pod_ip(opts.cloud_pod);
        lab.nft(
            Role::Relay,
            &format!(
                "table ip lab_bulk {{\n chain prerouting {{\n  type nat hook prerouting priority dstnat; policy accept;\n  iifname \"wan0\" tcp dport {CLOUD_IPERF} dnat to {pod}:{CLOUD_IPERF}\n }}\n}}\n"
            ),
        )?;
        let rathole = match &opts.rathole {
            Ok(bin) => Some(start_rathole(&lab, bin, &dir.0)?),
            Err(_) => None,
        };
        let mut bench = Bench {
            relay,
            edge,
            rathole,
            _edge_iperf: edge_iperf,
            _cloud_iperf: cloud_iperf,
            opts,
            dir,
            lab,
        };
        let mut paths = vec![Path::Tunnel, Path::Direct];
        if bench.rathole.is_some() {
            paths.insert(1, Path::Rathole);
        }
        for path in paths {
            bench.probe(path)?;
        }
        Ok(bench)
    }

    /// The process ids of the relay and edge processes (for a profiler).
    pub fn pids(&self) -> Vec<(&'static str, u32)> {
        let mut v = vec![
            ("relay-server", self.relay.pid().unwrap_or(0)),
            ("edge-client", self.edge.pid()),
        ];
        if let Some((s, c)) = &self.rathole {
            v.extend([("rathole server", s.pid()), ("rathole client", c.pid())]);
        }
        v
    }

    /// Whether rathole runs.
    pub fn has_rathole(&self) -> bool {
        self.rathole.is_some()
    }

    /// The namespace iperf3's client runs in and its arguments for `path`.
    fn client_args(&self, path: Path, streams: u32, seconds: String) -> (Role, Vec<String>) {
        let (ns, host, port, reverse) = match path {
            Path::Tunnel => (
                self.opts.cloud_pod,
                netns::edge_pod_ip(1),
                EDGE_IPERF,
                false,
            ),
            Path::Rathole => (
                self.opts.cloud_pod,
                netns::RELAY_LAN_IP,
                RATHOLE_SERVICE,
                false,
            ),
            Path::Direct => (Role::Epod1, netns::RELAY_WAN_IP, CLOUD_IPERF, true),
        };
        let mut a: Vec<String> = ["-c", &host.to_string(), "-p", &port.to_string()]
            .iter()
            .map(|s| s.to_string())
            .collect();
        a.extend([
            "-P".into(),
            streams.to_string(),
            "--connect-timeout".into(),
            "3000".into(),
        ]);
        a.extend(seconds.split(' ').map(String::from));
        if reverse {
            a.push("-R".into());
        }
        (ns, a)
    }

    /// A small transfer over `path`, retried until it goes through (at
    /// most [`START_LIMIT`]): rathole binds its service port only once its
    /// client is connected.
    fn probe(&mut self, path: Path) -> Result<()> {
        let (ns, args) = self.client_args(path, 1, "-n 256K".into());
        let mut last = None;
        let r = wait_for(&format!("a first transfer over {}", path.as_str()), || {
            self.alive(path)?;
            match iperf::client(
                &self.lab,
                &self.opts.iperf3,
                ns,
                &args,
                Duration::from_secs(10),
            ) {
                Ok(_) => Ok(true),
                Err(e) => {
                    last = Some(e);
                    Ok(false)
                }
            }
        });
        r.map_err(|e| match last {
            Some(l) => e.context(format!("last attempt: {l:#}")),
            None => e,
        })
    }

    fn alive(&mut self, path: Path) -> Result<()> {
        match path {
            Path::Tunnel => self.edge.check_alive(),
            Path::Rathole => match &mut self.rathole {
                Some((s, c)) => s.check_alive().and_then(|()| c.check_alive()),
                None => bail!("rathole is not running"),
            },
            Path::Direct => Ok(()),
        }
    }

    /// (relay-side, edge-side) process ids of `path`.
    fn sides(&self, path: Path) -> Option<(u32, u32)> {
        match path {
            Path::Tunnel => Some((self.relay.pid().unwrap_or(0), self.edge.pid())),
            Path::Rathole => self.rathole.as_ref().map(|(s, c)| (s.pid(), c.pid())),
            Path::Direct => None,
        }
    }

    /// One iperf3 test of `opts.seconds` over `path` with `streams`.
    pub fn measure(&mut self, path: Path, streams: u32, run: usize) -> Result<Sample> {
        check_stop()?;
        self.alive(path)?;
        let (ns, args) = self.client_args(path, streams, format!("-t {}", self.opts.seconds));
        let sides = self.sides(path);
        let cpu = |pids: Option<(u32, u32)>| -> Result<Option<(f64, f64)>> {
            pids.map(|(r, e)| Ok((procs::cpu_seconds(r)?, procs::cpu_seconds(e)?)))
                .transpose()
        };
        let before = cpu(sides)?;
        let limit = Duration::from_secs(u64::from(self.opts.seconds) + 30);
        let t = iperf::client(&self.lab, &self.opts.iperf3, ns, &args, limit)
            .with_context(|| format!("{} with {streams} stream(s)", path.as_str()))?;
        let after = cpu(sides)?;
        let delta = before.zip(after).map(|(b, a)| (a.0 - b.0, a.1 - b.1));
        Ok(Sample {
            path,
            streams,
            run,
            gbps: t.bits_per_second / 1e9,
            bytes: t.bytes,
            retransmits: t.retransmits,
            relay_cpu: delta.map(|d| d.0),
            edge_cpu: delta.map(|d| d.1),
        })
    }

    /// The directory holding the logs and configurations (removed on drop).
    pub fn dir(&self) -> &FsPath {
        &self.dir.0
    }
}

fn cloud_pod_ip(pod: Role) -> Ipv4Addr {
    if pod == Role::Cpod1 {
        netns::CPOD1_IP
    } else {
        netns::CPOD2_IP
    }
}

/// rathole's server on the relay node and its client on edge1, configured
/// as `loadtest bulk --rathole` runs them ([`crate::rathole`]), with the
/// lab's addresses.
fn start_rathole(lab: &NetnsLab, bin: &FsPath, dir: &FsPath) -> Result<(NsChild, NsChild)> {
    let cfg = crate::rathole::write_configs(
        bin,
        dir,
        crate::rathole::Service {
            name: "iperf",
            token: "lab-bulk",
            control: (netns::RELAY_WAN_IP, RATHOLE_CONTROL).into(),
            bind: (netns::RELAY_LAN_IP, RATHOLE_SERVICE).into(),
            target: (netns::edge_pod_ip(1), EDGE_IPERF).into(),
        },
    )?;
    let (server_cfg, client_cfg) = (cfg.server, cfg.client);
    let arg = |flag: &str, f: &FsPath| vec![flag.to_string(), f.display().to_string()];
    let server = NsChild::spawn(
        lab,
        Role::Relay,
        "rathole server",
        bin,
        &arg("--server", &server_cfg),
        &dir.join("rathole-server.log"),
    )?;
    let client = NsChild::spawn(
        lab,
        Role::Edge1,
        "rathole client",
        bin,
        &arg("--client", &client_cfg),
        &dir.join("rathole-client.log"),
    )?;
    Ok((server, client))
}

/// Runs the whole benchmark: [`Bench::start`], then `opts.runs` rounds of
/// every stream count over every path, each result passed to `progress`
/// as it comes.
pub fn run(opts: Options, mut progress: impl FnMut(&Sample)) -> Result<Report> {
    let load_at_start = std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default();
    let mut report = Report {
        load_at_start,
        seconds: opts.seconds,
        runs: opts.runs,
        streams: opts.streams.clone(),
        cloud_pod: opts.cloud_pod.as_str().into(),
        rathole_skipped: opts.rathole.as_ref().err().cloned(),
        binaries: [
            Ok(&opts.relay_bin),
            Ok(&opts.edge_bin),
            opts.rathole.as_ref(),
        ]
        .into_iter()
        .flatten()
        .map(|p| p.display().to_string())
        .collect(),
        samples: Vec::new(),
    };
    let mut bench = Bench::start(opts.clone())?;
    let pids: Vec<String> = bench
        .pids()
        .iter()
        .map(|(n, p)| format!("{n} {p}"))
        .collect();
    eprintln!("lab {} up; pids: {}", bench.lab.tag(), pids.join(", "));
    let mut paths = vec![Path::Tunnel, Path::Direct];
    if bench.has_rathole() {
        paths.insert(1, Path::Rathole);
    }
    for run in 0..opts.runs {
        for &streams in &opts.streams {
            for &path in &paths {
                let s = bench.measure(path, streams, run)?;
                progress(&s);
                report.samples.push(s);
            }
        }
    }
    Ok(report)
}
