//! Child processes of a benchmark: where the relay and edge binaries are,
//! the guard that kills a child on drop (and reads its log), and the
//! scratch directory.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};

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

    pub(crate) fn relay_cmd(&self) -> Command {
        match self {
            Binaries::Release { relay, .. } => Command::new(relay),
            Binaries::SelfHosted(me) => {
                let mut c = Command::new(me);
                c.arg("relay-process");
                c
            }
        }
    }

    pub(crate) fn edge_cmd(&self) -> Command {
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
pub(crate) async fn wait_file(
    path: &Path,
    child: &mut ChildGuard,
    timeout: Duration,
) -> Result<String> {
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
