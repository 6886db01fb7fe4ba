//! Shared machinery of the benchmarks: argument parsing helpers, the dev
//! PKI and config files, the relay / edge child processes (killed on drop),
//! resident memory from `/proc`, the services under test, the CONNECT
//! client, progress lines and the result tables.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use relay_lab::{edge_ip, edge_name};
use relay_transport::devcerts::DevPki;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// Parses `2GiB`, `256MiB`, `64KiB`, `1000` (bytes); also `k`/`M`/`G` as
/// binary multiples, since nobody means 10^9 when sizing a buffer.
pub(crate) fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size (examples: 1024, 64KiB, 256MiB, 2GiB)"))?;
    let mul: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" | "kb" => 1 << 10,
        "m" | "mib" | "mb" => 1 << 20,
        "g" | "gib" | "gb" => 1 << 30,
        other => {
            return Err(format!(
                "unknown size unit {other:?} in {s:?} (use KiB, MiB, GiB)"
            ))
        }
    };
    n.checked_mul(mul)
        .ok_or_else(|| format!("{s:?} is too large"))
}

/// Parses a humantime duration (`10s`, `500ms`).
pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{s:?}: {e} (examples: 500ms, 10s, 1m)"))
}

/// Human bytes: `2.00 GiB`.
pub(crate) fn fmt_bytes(b: f64) -> String {
    const U: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut v = b;
    let mut i = 0;
    while v.abs() >= 1024.0 && i < U.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    format!("{v:.2} {}", U[i])
}

/// Median of a non-empty slice (mean of the middle two for even lengths).
pub(crate) fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

/// Resident set size of a process, in bytes (`VmRSS` of `/proc/<pid>/status`).
pub(crate) fn rss_bytes(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .context("no VmRSS line")?;
    let kb: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .context("bad VmRSS line")?;
    Ok(kb * 1024)
}

/// CPU time (user + system) a process has used so far, in seconds, from
/// `/proc/<pid>/stat` (clock ticks of 1/100 s, the Linux default).
pub(crate) fn cpu_secs(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // The command name may contain spaces; fields resume after ')'.
    let rest = stat.rsplit_once(')').context("bad stat")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| -> Result<f64> {
        f.get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .context("bad stat field")
    };
    // utime and stime are fields 14 and 15 overall, 12 and 13 after ')'.
    Ok((ticks(11)? + ticks(12)?) / 100.0)
}

/// One line describing the machine, for reports.
pub(crate) fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    format!("{cores} cores, {cpu}, Linux {kernel}")
}

/// A temporary directory removed on drop.
pub(crate) struct TempDir(PathBuf);

impl TempDir {
    /// Creates `$TMPDIR/loadtest-<pid>-<nanos>`.
    pub(crate) fn new() -> Result<TempDir> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let p = std::env::temp_dir().join(format!("loadtest-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&p).with_context(|| format!("creating {}", p.display()))?;
        Ok(TempDir(p))
    }

    /// The path.
    pub(crate) fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// How the relay and edge child processes are started.
#[derive(Debug, Clone)]
pub(crate) enum Binaries {
    /// `relay-server` and `edge-client` found next to our executable.
    Release {
        /// Path of `relay-server`.
        relay: PathBuf,
        /// Path of `edge-client`.
        edge: PathBuf,
    },
    /// Not built: run this executable's hidden `relay-process` /
    /// `edge-process` subcommands, which call the same library entry points.
    SelfHosted(PathBuf),
}

impl Binaries {
    /// Looks next to the current executable.
    pub(crate) fn locate() -> Result<Binaries> {
        let me = std::env::current_exe().context("current_exe")?;
        let dir = me.parent().context("executable has no directory")?;
        let relay = dir.join("relay-server");
        let edge = dir.join("edge-client");
        let forced = std::env::var_os("LOADTEST_SELF_HOSTED").is_some();
        if forced {
            Ok(Binaries::SelfHosted(me))
        } else if relay.is_file() && edge.is_file() {
            Ok(Binaries::Release { relay, edge })
        } else {
            eprintln!(
                "note: relay-server/edge-client not found in {}; running them as `loadtest relay-process` / `edge-process` (same library code). Build them with `cargo build --release -p relay-server -p edge-client`.",
                dir.display()
            );
            Ok(Binaries::SelfHosted(me))
        }
    }

    /// Describes the choice for reports.
    pub(crate) fn describe(&self) -> String {
        match self {
            Binaries::Release { relay, .. } => format!("{}", relay.display()),
            Binaries::SelfHosted(me) => format!("{} relay-process", me.display()),
        }
    }

    fn relay_cmd(&self) -> Command {
        match self {
            Binaries::Release { relay, .. } => Command::new(relay),
            Binaries::SelfHosted(me) => {
                let mut c = Command::new(me);
                c.arg("relay-process");
                c
            }
        }
    }

    fn edge_cmd(&self) -> Command {
        match self {
            Binaries::Release { edge, .. } => Command::new(edge),
            Binaries::SelfHosted(me) => {
                let mut c = Command::new(me);
                c.arg("edge-process");
                c
            }
        }
    }

    /// Our own executable (for the helper service process).
    pub(crate) fn self_cmd() -> Result<Command> {
        Ok(Command::new(std::env::current_exe()?))
    }
}

/// A child process killed (and reaped) on drop, so a failed or panicking
/// benchmark leaves nothing behind.
pub(crate) struct ChildGuard {
    name: String,
    child: Option<Child>,
}

impl ChildGuard {
    /// Spawns `cmd` with output to `log`.
    pub(crate) fn spawn(name: &str, mut cmd: Command, log: &Path) -> Result<ChildGuard> {
        let out =
            std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone()?;
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err));
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "warn");
        }
        let child = cmd.spawn().with_context(|| format!("starting {name}"))?;
        Ok(ChildGuard {
            name: name.into(),
            child: Some(child),
        })
    }

    /// Process id.
    pub(crate) fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// Fails if the process has exited.
    pub(crate) fn check_alive(&mut self) -> Result<()> {
        if let Some(c) = self.child.as_mut() {
            if let Some(st) = c.try_wait()? {
                bail!("{} exited early: {st}", self.name);
            }
        }
        Ok(())
    }

    /// Waits (bounded) for the process to exit by itself; fails if it did
    /// not or exited unsuccessfully.
    pub(crate) async fn wait_exit(&mut self, limit: Duration) -> Result<()> {
        let deadline = Instant::now() + limit;
        let Some(c) = self.child.as_mut() else {
            return Ok(());
        };
        loop {
            if let Some(st) = c.try_wait()? {
                self.child = None;
                ensure!(st.success(), "{} failed: {st}", self.name);
                return Ok(());
            }
            ensure!(
                Instant::now() < deadline,
                "{} still running after {limit:?}",
                self.name
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Sends SIGKILL and reaps the process at once (a crash, for tests
    /// of what the peers do then).
    pub(crate) fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Sends SIGTERM and waits (bounded) for exit; SIGKILL after `grace`.
    pub(crate) async fn terminate(&mut self, grace: Duration) -> Result<()> {
        let Some(mut c) = self.child.take() else {
            return Ok(());
        };
        let st = Command::new("kill")
            .arg("-TERM")
            .arg(c.id().to_string())
            .status()
            .context("running kill")?;
        ensure!(st.success(), "kill -TERM {} failed", c.id());
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if c.try_wait()?.is_some() {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let _ = c.kill();
        let _ = c.wait();
        bail!("{} did not exit within {grace:?} of SIGTERM", self.name)
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Polls for a file written by a child (bounded), returning its text.
async fn wait_file(path: &Path, child: &mut ChildGuard, timeout: Duration) -> Result<String> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(t) = std::fs::read_to_string(path) {
            return Ok(t);
        }
        child.check_alive()?;
        ensure!(
            Instant::now() < deadline,
            "{} not written within {timeout:?}",
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Installs the rustls provider and a tracing subscriber on stderr at
/// `error` (or `RUST_LOG`), so the in-process edges' reconnect warnings
/// never mix with the result tables on stdout.
fn init_quiet() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error"));
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .try_init();
        relay_transport::tls::install_default_provider();
    });
}

/// The PKI, config files and the binaries for one benchmark run.
pub(crate) struct Bench {
    /// Scratch directory (certificates, configs, logs).
    pub(crate) dir: TempDir,
    /// How children are started.
    pub(crate) bins: Binaries,
    /// Number of nodes in the PKI and the relay config.
    pub(crate) nodes: usize,
    /// Lines added to the relay config's `[limits]` (`key = value\n`).
    pub(crate) relay_limits: String,
    /// Top-level lines added to every edge config (`key = value\n`).
    pub(crate) edge_top: String,
    /// A bearer token the relay's admin API then requires
    /// (`admin.token_file`); each [`RelayProc`] started carries it.
    pub(crate) admin_token: Option<String>,
    pki: DevPki,
}

/// A relay's admin API: where it listens and the bearer it requires.
#[derive(Clone, Debug)]
pub(crate) struct AdminApi {
    /// Its address.
    pub(crate) addr: SocketAddr,
    /// The bearer token to send (`None`: the relay has none).
    pub(crate) bearer: Option<Arc<str>>,
}

impl AdminApi {
    /// `GET path`: status and body.
    pub(crate) async fn get(&self, path: &str) -> Result<(u16, String)> {
        relay_lab::admin_get(self.addr, path, self.bearer.as_deref()).await
    }

    /// The `/metrics` body.
    pub(crate) async fn metrics(&self) -> Result<String> {
        let (code, body) = self.get("/metrics").await?;
        ensure!(code == 200, "GET /metrics: {code}");
        Ok(body)
    }

    /// The sessions the relay lists.
    pub(crate) async fn sessions(&self) -> Result<Vec<relay_server::admin::SessionRow>> {
        relay_lab::sessions_as(self.addr, self.bearer.as_deref()).await
    }
}

impl Bench {
    /// Generates a PKI for `nodes` edges and writes it to a temp dir.
    pub(crate) fn new(nodes: usize) -> Result<Bench> {
        init_quiet();
        let dir = TempDir::new()?;
        let names: Vec<String> = (0..nodes).map(edge_name).collect();
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let pki = DevPki::generate(&["localhost", "127.0.0.1"], &refs)?;
        pki.write_to(&dir.path().join("pki"))?;
        Ok(Bench {
            dir,
            bins: Binaries::locate()?,
            nodes,
            relay_limits: String::new(),
            edge_top: String::new(),
            admin_token: None,
            pki,
        })
    }

    /// The in-memory PKI (for in-process edges).
    pub(crate) fn pki(&self) -> &DevPki {
        &self.pki
    }

    /// The PKI, to issue certificates for nodes the relay does not list.
    pub(crate) fn pki_mut(&mut self) -> &mut DevPki {
        &mut self.pki
    }

    fn pki_file(&self, name: &str) -> String {
        self.dir.path().join("pki").join(name).display().to_string()
    }

    /// Writes a relay config with the given listen addresses.
    ///
    /// `LOADTEST_MAX_UDP_PAYLOAD` (1200..=65527), when set, makes both
    /// sides start at and cap QUIC packets to that size (`[quic]
    /// max_udp_payload` and `initial_mtu`): for loopback, which carries
    /// 64 KiB packets, to show what packet size costs.
    fn write_relay_config(
        &self,
        name: &str,
        quic: SocketAddr,
        connect: SocketAddr,
        extra: &str,
    ) -> Result<PathBuf> {
        let mut t = String::new();
        let id = if name == "relay" { "bench-relay" } else { name };
        t.push_str(&format!("relay_id = \"{id}\"\n[listen]\n"));
        t.push_str(&format!(
            "quic = \"{quic}\"\nconnect = \"{connect}\"\nadmin = \"127.0.0.1:0\"\n"
        ));
        t.push_str(&format!(
            "[tls]\ncert = \"{}\"\nkey = \"{}\"\nclient_ca = \"{}\"\n",
            self.pki_file("relay.pem"),
            self.pki_file("relay-key.pem"),
            self.pki_file("ca.pem")
        ));
        if let Some(token) = &self.admin_token {
            let f = self.dir.path().join("admin-token");
            std::fs::write(&f, token)?;
            t.push_str(&format!("[admin]\ntoken_file = \"{}\"\n", f.display()));
        }
        if let Some(p) = max_udp_payload()? {
            t.push_str(&format!(
                "[quic]\nmax_udp_payload = {p}\ninitial_mtu = {p}\n"
            ));
        }
        // A short drain, so a restart (storm) does not wait 30 s for the
        // benchmark's own open streams.
        t.push_str("[limits]\ndrain_grace = \"1s\"\n");
        t.push_str(&self.relay_limits);
        t.push_str("[nodes]\n");
        for i in 0..self.nodes {
            t.push_str(&format!("\"{}\" = [\"{}/32\"]\n", edge_name(i), edge_ip(i)));
        }
        t.push_str(extra);
        let p = self.dir.path().join(format!("{name}.toml"));
        std::fs::write(&p, t)?;
        Ok(p)
    }

    /// Starts the relay process on ephemeral ports and waits until ready.
    pub(crate) async fn start_relay(&self) -> Result<RelayProc> {
        let any = SocketAddr::from(([127, 0, 0, 1], 0));
        self.start_relay_at(any, any).await
    }

    /// Starts the relay process on the given QUIC / CONNECT addresses.
    pub(crate) async fn start_relay_at(
        &self,
        quic: SocketAddr,
        connect: SocketAddr,
    ) -> Result<RelayProc> {
        self.start_named_relay("relay", quic, connect, "").await
    }

    /// Starts relay process `name` (its relay_id, config, ready file and
    /// log named after it) with `extra` appended to its config.
    pub(crate) async fn start_named_relay(
        &self,
        name: &str,
        quic: SocketAddr,
        connect: SocketAddr,
        extra: &str,
    ) -> Result<RelayProc> {
        let cfg = self.write_relay_config(name, quic, connect, extra)?;
        let ready = self.dir.path().join(format!("{name}-ready.json"));
        let _ = std::fs::remove_file(&ready);
        let mut cmd = self.bins.relay_cmd();
        cmd.arg("--config")
            .arg(&cfg)
            .arg("--ready-file")
            .arg(&ready);
        let log = format!("{name}.log");
        let mut child = ChildGuard::spawn(name, cmd, &self.dir.path().join(&log))?;
        let text = wait_file(&ready, &mut child, Duration::from_secs(20))
            .await
            .with_context(|| format!("relay log: {}", self.log_tail(&log)))?;
        let v: serde_json::Value = serde_json::from_str(&text).context("ready file")?;
        let addr = |k: &str| -> Result<SocketAddr> {
            v[k].as_str()
                .with_context(|| format!("ready file has no {k}"))?
                .parse()
                .with_context(|| format!("ready file {k}"))
        };
        Ok(RelayProc {
            quic: addr("quic")?,
            connect: addr("connect")?,
            admin: AdminApi {
                addr: addr("admin")?,
                bearer: self.admin_token.as_deref().map(Arc::from),
            },
            child,
        })
    }

    /// Starts the bare-QUIC sink process (`quic-sink-process`) with the
    /// relay's certificate; returns it and its UDP address.
    pub(crate) async fn start_bare_sink(&self) -> Result<(ChildGuard, SocketAddr)> {
        let ready = self.dir.path().join("quic-sink-ready");
        let _ = std::fs::remove_file(&ready);
        let mut cmd = Binaries::self_cmd()?;
        cmd.arg("quic-sink-process")
            .arg("--pki")
            .arg(self.dir.path().join("pki"))
            .arg("--ready-file")
            .arg(&ready);
        let log = self.dir.path().join("quic-sink.log");
        let mut child = ChildGuard::spawn("quic-sink", cmd, &log)?;
        let text = wait_file(&ready, &mut child, Duration::from_secs(20))
            .await
            .with_context(|| format!("quic-sink log: {}", self.log_tail("quic-sink.log")))?;
        let addr = text.trim().parse().context("quic-sink ready file")?;
        Ok((child, addr))
    }

    /// Where the PKI files are.
    pub(crate) fn pki_dir(&self) -> PathBuf {
        self.dir.path().join("pki")
    }

    fn log_tail(&self, name: &str) -> String {
        let t = std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default();
        relay_lab::last_lines(&t, 10)
    }

    /// Starts edge `i` as an `edge-client` process and waits until the
    /// relay lists its session.
    /// `max_streams` overrides the edge's `[quic] max_streams` (how many
    /// streams the relay may have open to it).
    pub(crate) async fn start_edge(
        &self,
        i: usize,
        relay: &RelayProc,
        max_streams: Option<u32>,
    ) -> Result<ChildGuard> {
        let name = edge_name(i);
        let ip = edge_ip(i);
        let mut t = format!(
            "node = \"{name}\"\nrelay = \"{}\"\nserver_name = \"localhost\"\nroutes = [\"{ip}/32\"]\nprimary_addr = \"{ip}\"\n{}[tls]\ncert = \"{}\"\nkey = \"{}\"\nrelay_ca = \"{}\"\n",
            relay.quic,
            self.edge_top,
            self.pki_file(&format!("{name}.pem")),
            self.pki_file(&format!("{name}-key.pem")),
            self.pki_file("ca.pem"),
        );
        let payload = max_udp_payload()?;
        if max_streams.is_some() || payload.is_some() {
            t.push_str("[quic]\n");
        }
        if let Some(m) = max_streams {
            t.push_str(&format!("max_streams = {m}\n"));
        }
        if let Some(p) = payload {
            t.push_str(&format!("max_udp_payload = {p}\ninitial_mtu = {p}\n"));
        }
        let p = self.dir.path().join(format!("{name}.toml"));
        std::fs::write(&p, t)?;
        let mut cmd = self.bins.edge_cmd();
        cmd.arg("--config").arg(&p);
        let log = format!("{name}.log");
        let mut child = ChildGuard::spawn(&name, cmd, &self.dir.path().join(&log))?;
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            child.check_alive()?;
            if relay.admin.sessions().await?.iter().any(|s| s.node == name) {
                return Ok(child);
            }
            ensure!(
                Instant::now() < deadline,
                "{name} did not register within 15s: {}",
                self.log_tail(&log)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// A running relay process.
pub(crate) struct RelayProc {
    /// QUIC (UDP) address edges dial.
    pub(crate) quic: SocketAddr,
    /// HTTP CONNECT address.
    pub(crate) connect: SocketAddr,
    /// Its admin API.
    pub(crate) admin: AdminApi,
    /// The process.
    pub(crate) child: ChildGuard,
}

impl RelayProc {
    /// Relay resident memory now.
    pub(crate) fn rss(&self) -> Result<u64> {
        rss_bytes(self.child.pid())
    }

    /// `relay_sessions` from `/metrics` (cheap to poll).
    pub(crate) async fn session_count(&self) -> Result<u64> {
        let body = self.admin.metrics().await?;
        body.lines()
            .find_map(|l| l.strip_prefix("relay_sessions "))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .map(|v| v as u64)
            .context("no relay_sessions in /metrics")
    }
}

impl RelayProc {
    /// Non-zero `relay_handshake_failures_total` series, as `reason=count`
    /// (shows handshakes refused by `limits.max_concurrent_handshakes`).
    pub(crate) async fn handshake_failures(&self) -> Result<String> {
        let body = self.admin.metrics().await?;
        let v: Vec<String> = body
            .lines()
            .filter_map(|l| l.strip_prefix("relay_handshake_failures_total{reason=\""))
            .filter_map(|l| {
                let (reason, rest) = l.split_once("\"}")?;
                let n: f64 = rest.trim().parse().ok()?;
                (n > 0.0).then(|| format!("{reason}={n}"))
            })
            .collect();
        Ok(if v.is_empty() {
            "none".into()
        } else {
            v.join(" ")
        })
    }
}

/// Opens a tunnel through the relay's CONNECT ingress, reading the answer
/// with one buffer (not byte by byte: the services here never speak
/// first, so nothing past the header can arrive before we write).
pub(crate) async fn connect_tunnel(proxy: SocketAddr, target: SocketAddr) -> Result<TcpStream> {
    let mut s = TcpStream::connect(proxy).await?;
    s.set_nodelay(true)?;
    s.write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes())
        .await?;
    let mut head = [0u8; 1024];
    let mut n = 0;
    while !head[..n].windows(4).any(|w| w == b"\r\n\r\n") {
        ensure!(n < head.len(), "CONNECT response header too large");
        let k = s.read(&mut head[n..]).await?;
        ensure!(
            k > 0,
            "relay closed the connection inside the CONNECT answer"
        );
        n += k;
    }
    let end = head[..n]
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|p| p + 4)
        .unwrap_or(n);
    ensure!(
        head.starts_with(b"HTTP/1.1 200") || head.starts_with(b"HTTP/1.0 200"),
        "CONNECT refused: {}",
        String::from_utf8_lossy(&head[..n])
            .lines()
            .take_while(|l| !l.is_empty())
            .collect::<Vec<_>>()
            .join(" / ")
    );
    ensure!(
        end == n,
        "unexpected bytes after the CONNECT answer ({} bytes)",
        n - end
    );
    Ok(s)
}

/// Where a client reaches the service: through the relay, or straight.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Via {
    /// Through the relay's CONNECT ingress and the edge.
    Tunnel {
        /// The relay's CONNECT address.
        proxy: SocketAddr,
        /// The service address (at the edge's 127.0.0.x).
        target: SocketAddr,
    },
    /// Straight to the service: the baseline.
    Direct(SocketAddr),
    /// Through a peer tunnel (rathole) that exposes the service here.
    Peer {
        /// Where the peer's server listens for clients.
        addr: SocketAddr,
        /// The peer's name (the path label).
        name: &'static str,
    },
}

impl Via {
    /// Opens one connection.
    pub(crate) async fn open(&self) -> Result<TcpStream> {
        match *self {
            Via::Tunnel { proxy, target } => connect_tunnel(proxy, target).await,
            Via::Direct(a) | Via::Peer { addr: a, .. } => {
                let s = TcpStream::connect(a).await?;
                s.set_nodelay(true)?;
                Ok(s)
            }
        }
    }

    /// `tunnel` or `direct`.
    pub(crate) fn label(&self) -> &'static str {
        match self {
            Via::Tunnel { .. } => "tunnel",
            Via::Direct(_) => "direct",
            Via::Peer { name, .. } => name,
        }
    }
}

/// A sink: reads until EOF, then answers the byte count (8 bytes, big
/// endian) and closes. Lets the client check that every byte arrived.
pub(crate) async fn spawn_sink(ip: IpAddr) -> Result<(SocketAddr, JoinHandle<()>)> {
    let l = TcpListener::bind(SocketAddr::new(ip, 0)).await?;
    let addr = l.local_addr()?;
    let task = tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 256 * 1024];
                let mut total = 0u64;
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) => break,
                        Ok(n) => total += n as u64,
                        Err(_) => return,
                    }
                }
                let _ = s.write_all(&total.to_be_bytes()).await;
                let _ = s.shutdown().await;
            });
        }
    });
    Ok((addr, task))
}

/// Prints a progress line to stderr every two seconds until dropped.
pub(crate) struct Progress(JoinHandle<()>);

impl Progress {
    /// Starts reporting `what` with `f()` as the detail.
    pub(crate) fn start(
        what: impl Into<String>,
        f: impl Fn() -> String + Send + 'static,
    ) -> Progress {
        let what = what.into();
        let t0 = Instant::now();
        Progress(tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(2));
            tick.tick().await;
            loop {
                tick.tick().await;
                eprintln!("  .. {what}: {} ({:.0?})", f(), t0.elapsed());
            }
        }))
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A shared counter for progress lines.
pub(crate) type Counter = Arc<AtomicU64>;

/// Reads a counter.
pub(crate) fn get(c: &Counter) -> u64 {
    c.load(Relaxed)
}

/// A result table: printed aligned, one header row.
pub(crate) struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with these columns.
    pub(crate) fn new(header: &[&str]) -> Table {
        Table {
            header: header.iter().map(|s| s.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    /// Adds a row.
    pub(crate) fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    /// Adds a `figure | median | runs` row: the label, the median of
    /// `runs`, and every run, all formatted with `fmt`.
    pub(crate) fn stat(
        &mut self,
        label: impl Into<String>,
        runs: &[f64],
        fmt: impl Fn(f64) -> String,
    ) {
        let all = runs.iter().map(|x| fmt(*x)).collect::<Vec<_>>().join(", ");
        self.rows.push(vec![label.into(), fmt(median(runs)), all]);
    }

    /// Prints the table to stdout.
    pub(crate) fn print(&self) {
        let cols = self.header.len();
        let mut w = vec![0; cols];
        for r in std::iter::once(&self.header).chain(&self.rows) {
            for (i, c) in r.iter().enumerate().take(cols) {
                w[i] = w[i].max(c.chars().count());
            }
        }
        let line = |r: &Vec<String>| {
            let cells: Vec<String> = r
                .iter()
                .enumerate()
                .map(|(i, c)| format!("{c:<width$}", width = w[i.min(cols - 1)]))
                .collect();
            println!("| {} |", cells.join(" | "));
        };
        line(&self.header);
        println!(
            "|{}|",
            w.iter()
                .map(|n| "-".repeat(n + 2))
                .collect::<Vec<_>>()
                .join("|")
        );
        for r in &self.rows {
            line(r);
        }
    }
}

/// Writes the JSON result if asked to.
pub(crate) fn write_json(path: Option<&Path>, v: &serde_json::Value) -> Result<()> {
    if let Some(p) = path {
        std::fs::write(p, serde_json::to_string_pretty(v)? + "\n")
            .with_context(|| format!("writing {}", p.display()))?;
        eprintln!("wrote {}", p.display());
    }
    Ok(())
}

/// `LOADTEST_MAX_UDP_PAYLOAD`, validated (see `Bench::write_relay_config`).
fn max_udp_payload() -> Result<Option<u16>> {
    match std::env::var("LOADTEST_MAX_UDP_PAYLOAD") {
        Err(_) => Ok(None),
        Ok(v) => {
            let p: u16 = v
                .parse()
                .ok()
                .filter(|p| (1200..=65527).contains(p))
                .with_context(|| format!("LOADTEST_MAX_UDP_PAYLOAD={v:?}: want 1200 to 65527"))?;
            Ok(Some(p))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_and_nonsense_is_refused() {
        assert_eq!(parse_bytes("2GiB"), Ok(2 << 30));
        assert_eq!(parse_bytes("1024"), Ok(1024));
        assert_eq!(parse_bytes("64k"), Ok(64 << 10));
        assert!(parse_bytes("-1").is_err());
        assert!(parse_bytes("3 parsecs").is_err());
        assert!(parse_bytes("99999999999999999999G").is_err());
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
    }
}
