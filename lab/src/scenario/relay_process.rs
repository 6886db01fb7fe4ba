//! The real `relay-server` binary as a child process in a namespace
//! ([`RelayProcess`]): found next to the test executable and refused when
//! older than its sources ([`relay_server_binary`]), started with a
//! configuration from [`super::relay_toml`], stopped with SIGTERM (drain)
//! or SIGKILL.
//!
//! Apart from the in-process relay of [`super::start_relay`] because it is
//! process handling (files, signals, a ready file), not configuration.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use relay_server::RelayConfig;
use relay_transport::devcerts::DevPki;

use super::{relay_toml, ADMIN_TOKEN, READY_TIMEOUT};
use crate::netns::{NetnsLab, Role};

/// The `relay-server` binary built next to the running test executable
/// (`target/<profile>/deps/<test>` → `target/<profile>/relay-server`).
/// `cargo test --workspace` builds it (relay-server has integration tests).
pub fn relay_server_binary() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("current_exe")?;
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .with_context(|| format!("no target directory above {}", exe.display()))?;
    let bin = profile_dir.join("relay-server");
    let built = std::fs::metadata(&bin)
        .and_then(|m| m.modified())
        .with_context(|| {
            format!(
                "relay-server binary not found at {} (build it first: `cargo build -p relay-server`, \
                 or run `cargo test --workspace`, which builds it for relay-server's CLI tests)",
                bin.display()
            )
        })?;
    // `cargo test -p relay-lab` alone does not rebuild the binary: refuse
    // to test an old one.
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    for dir in ["relay-server/src", "transport/src", "protocol/src"] {
        if let Some((file, t)) = newest_source(&root.join(dir)) {
            if t > built {
                bail!(
                    "{} is older than {} (run `cargo build -p relay-server`)",
                    bin.display(),
                    file.display()
                );
            }
        }
    }
    Ok(bin)
}

/// The most recently modified `.rs` file below `dir`, if any (best effort;
/// bounded depth): what a binary built from `dir` must not be older than.
pub fn newest_source(dir: &Path) -> Option<(PathBuf, std::time::SystemTime)> {
    let mut newest: Option<(PathBuf, std::time::SystemTime)> = None;
    let mut todo = vec![(dir.to_path_buf(), 0)];
    while let Some((d, depth)) = todo.pop() {
        for e in std::fs::read_dir(&d).ok()?.flatten() {
            let p = e.path();
            if p.is_dir() && depth < 8 {
                todo.push((p, depth + 1));
            } else if p.extension().is_some_and(|x| x == "rs") {
                if let Ok(t) = e.metadata().and_then(|m| m.modified()) {
                    if newest.as_ref().is_none_or(|(_, n)| t > *n) {
                        newest = Some((p, t));
                    }
                }
            }
        }
    }
    newest
}

/// The real `relay-server` binary running in the relay node's namespace
/// (`ip netns exec <ns> relay-server --config .. --ready-file ..`), with its
/// configuration, certificates, token and log in a private directory.
/// Dropping it kills the process (SIGKILL) and removes the directory.
pub struct RelayProcess {
    bin: PathBuf,
    ns: String,
    dir: PathBuf,
    child: Option<Child>,
}

impl RelayProcess {
    /// Writes `cfg` (see [`relay_toml`]), the PKI's files and the admin
    /// token into a fresh directory, starts the binary and waits (bounded)
    /// for its ready file.
    pub fn start(lab: &NetnsLab, bin: &Path, pki: &DevPki, cfg: &RelayConfig) -> Result<Self> {
        Self::start_named(lab, "relay", bin, pki, cfg)
    }

    /// [`RelayProcess::start`] with its own directory `<lab tag>-<name>`,
    /// for several relays (replicas) in one lab.
    pub fn start_named(
        lab: &NetnsLab,
        name: &str,
        bin: &Path,
        pki: &DevPki,
        cfg: &RelayConfig,
    ) -> Result<Self> {
        Self::start_on(lab, Role::Relay, name, bin, pki, cfg)
    }

    /// [`RelayProcess::start_named`] on relay host `host` (see
    /// [`NetnsLab::relay_hosts`]).
    pub fn start_on(
        lab: &NetnsLab,
        host: Role,
        name: &str,
        bin: &Path,
        pki: &DevPki,
        cfg: &RelayConfig,
    ) -> Result<Self> {
        let dir = std::env::temp_dir().join(format!("{}-{name}", lab.tag()));
        if dir.exists() {
            std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
        }
        let certs = dir.join("certs");
        pki.write_to(&certs)
            .with_context(|| format!("writing certificates to {}", certs.display()))?;
        let token = dir.join("admin-token");
        std::fs::write(&token, format!("{ADMIN_TOKEN}\n"))?;
        std::fs::write(
            dir.join("relay.toml"),
            relay_toml(cfg, &certs, Some(&token)),
        )?;
        let mut p = RelayProcess {
            bin: bin.to_path_buf(),
            ns: lab.ns(host).to_string(),
            dir,
            child: None,
        };
        p.spawn()?;
        Ok(p)
    }

    /// The configuration file it runs with.
    pub fn config_path(&self) -> PathBuf {
        self.dir.join("relay.toml")
    }

    /// The process id of the running relay, if any.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The relay's log so far (stdout and stderr).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("relay.log")).unwrap_or_default()
    }

    /// Starts the binary (again) and waits up to 20 s for its ready file.
    /// The log is appended to, so a restart keeps the previous run's lines.
    pub fn spawn(&mut self) -> Result<Duration> {
        if self.child.is_some() {
            bail!("relay-server is already running");
        }
        let t = Instant::now();
        let ready = self.dir.join("ready.json");
        let _ = std::fs::remove_file(&ready);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("relay.log"))?;
        let child = Command::new("ip")
            .args(["netns", "exec", &self.ns])
            .arg(&self.bin)
            .arg("--config")
            .arg(self.config_path())
            .arg("--ready-file")
            .arg(&ready)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", self.bin.display()))?;
        // `ip netns exec` execs the program itself: the child is the relay.
        self.child = Some(child);
        while t.elapsed() < READY_TIMEOUT {
            if ready.exists() {
                return Ok(t.elapsed());
            }
            if let Some(c) = self.child.as_mut() {
                if let Some(status) = c.try_wait()? {
                    self.child = None;
                    bail!(
                        "relay-server exited ({status}) before it was ready:\n{}",
                        self.log()
                    );
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        bail!(
            "relay-server not ready within {READY_TIMEOUT:?}:\n{}",
            self.log()
        )
    }

    /// Stops the process with SIGTERM (the relay drains: GOAWAY, in-flight
    /// streams finish within its `drain_grace`) and waits up to `limit`
    /// for it to exit; SIGKILL after that. Returns how long it took.
    pub fn terminate(&mut self, limit: Duration) -> Result<Duration> {
        let mut c = self.child.take().context("relay-server is not running")?;
        let t = Instant::now();
        // kill(1) rather than a signal API: the workspace's nix is built
        // without its signal feature.
        let st = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status()
            .context("SIGTERM relay-server")?;
        anyhow::ensure!(st.success(), "kill -TERM {}: {st}", c.id());
        while t.elapsed() < limit {
            if c.try_wait()?.is_some() {
                return Ok(t.elapsed());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = c.kill();
        c.wait()?;
        bail!("relay-server did not exit within {limit:?} of SIGTERM (killed)")
    }

    /// Kills the process with SIGKILL (no cleanup of any kind runs) and
    /// reaps it.
    pub fn kill9(&mut self) -> Result<()> {
        let mut c = self.child.take().context("relay-server is not running")?;
        // `Child::kill` sends SIGKILL on Unix.
        c.kill().context("SIGKILL relay-server")?;
        c.wait().context("reaping relay-server")?;
        Ok(())
    }
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
