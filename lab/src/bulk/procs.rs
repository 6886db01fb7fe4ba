//! The processes of the bulk benchmark ([`super`]): a program started in
//! one of the lab's namespaces ([`NsChild`]: the edge client, rathole's
//! server and client, the iperf3 servers), read for its CPU time, killed
//! on drop; bounded runs of short commands ([`run_bounded`]) that give up
//! when a stop was requested; and where the binaries are
//! ([`binary_next_to_exe`]).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::stop_requested;
use crate::netns::{NetnsLab, Role};

/// A program running in a lab namespace (`ip netns exec NS PROGRAM ...`,
/// which execs the program itself, so the child's pid is the program's and
/// its `/proc/<pid>/stat` is what it spent). Killed and reaped on drop.
pub struct NsChild {
    name: String,
    log: PathBuf,
    child: Option<Child>,
}

impl NsChild {
    /// Starts `program args` in `ns` with stdout and stderr to `log`
    /// (and `RUST_LOG=warn` unless set: an info line per stream would be
    /// CPU the measurement counts).
    pub fn spawn(
        lab: &NetnsLab,
        ns: Role,
        name: &str,
        program: &Path,
        args: &[String],
        log: &Path,
    ) -> Result<NsChild> {
        let out =
            std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let child = Command::new("ip")
            .args(["netns", "exec", lab.ns(ns)])
            .arg(program)
            .args(args)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("starting {name} ({})", program.display()))?;
        Ok(NsChild {
            name: name.to_string(),
            log: log.to_path_buf(),
            child: Some(child),
        })
    }

    /// The `edge-client` binary `bin` on edge host `site`, configured by
    /// `toml` (written to `dir/edge<site>.toml`; its log to
    /// `dir/edge<site>.log`).
    pub fn edge(lab: &NetnsLab, site: u8, bin: &Path, toml: &str, dir: &Path) -> Result<NsChild> {
        let file = dir.join(format!("edge{site}.toml"));
        std::fs::write(&file, toml).with_context(|| format!("writing {}", file.display()))?;
        NsChild::spawn(
            lab,
            Role::edge(site)?,
            "edge-client",
            bin,
            &["--config".into(), file.display().to_string()],
            &dir.join(format!("edge{site}.log")),
        )
    }

    /// The process id (0 once stopped).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// What it wrote so far (its last 30 lines).
    pub fn log_tail(&self) -> String {
        crate::last_lines(&std::fs::read_to_string(&self.log).unwrap_or_default(), 30)
    }

    /// Fails, with its log, if the process has exited.
    pub fn check_alive(&mut self) -> Result<()> {
        let c = self.child.as_mut().context("not running")?;
        if let Some(st) = c.try_wait()? {
            self.child = None;
            bail!("{} exited ({st}):\n{}", self.name, self.log_tail());
        }
        Ok(())
    }

    /// User plus system CPU seconds the process (all its threads) has used.
    pub fn cpu_seconds(&self) -> Result<f64> {
        cpu_seconds(self.pid())
    }
}

impl Drop for NsChild {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub use crate::procfs::cpu_seconds;

/// What [`run_bounded`] saw.
pub struct Output {
    /// How the command ended.
    pub status: ExitStatus,
    /// Its standard output.
    pub stdout: String,
    /// Its standard error.
    pub stderr: String,
}

/// Runs `cmd` to its end, killing it after `limit` or as soon as a stop
/// was requested ([`super::request_stop`]), both errors.
pub fn run_bounded(cmd: &mut Command, what: &str, limit: Duration) -> Result<Output> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start `{what}`"))?;
    // Readers on their own threads: a chatty command must not block on a
    // full pipe while we wait for it (iperf3's JSON with -P 8 is ~100 KiB).
    let read = |p: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut p) = p {
                let _ = p.read_to_end(&mut buf);
            }
            String::from_utf8_lossy(&buf).into_owned()
        })
    };
    let out = read(child.stdout.take().map(|p| Box::new(p) as _));
    let err = read(child.stderr.take().map(|p| Box::new(p) as _));
    let t = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break st;
        }
        if stop_requested() || t.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            if stop_requested() {
                bail!("`{what}` interrupted (stop requested)");
            }
            bail!("`{what}` timed out after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Ok(Output {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    })
}

/// Binary `name` next to the running executable (`target/release/lab-bulk`
/// → `target/release/<name>`). When it is older than a source file of the
/// crates it is built from, `strict` refuses it (tests: `cargo test`
/// rebuilt it, so an old one means something is wrong); otherwise it is
/// used with a warning on stderr (a benchmark run while someone else edits
/// the tree should still run, and say which build it measured).
pub fn binary_next_to_exe(name: &str, crate_dir: &str, strict: bool) -> Result<PathBuf> {
    let exe = std::env::current_exe().context("current_exe")?;
    let mut dir = exe.parent().context("executable has no directory")?;
    // Test executables live in target/<profile>/deps.
    if dir.ends_with("deps") {
        dir = dir.parent().context("no directory above deps")?;
    }
    let bin = dir.join(name);
    let built = std::fs::metadata(&bin)
        .and_then(|m| m.modified())
        .with_context(|| format!("{name} not found at {} (build it first)", bin.display()))?;
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    for src in [crate_dir, "transport/src", "protocol/src"] {
        if let Some((file, t)) = crate::scenario::newest_source(&root.join(src)) {
            if t > built {
                let msg = format!(
                    "{} is older than {} (cargo build -p {name})",
                    bin.display(),
                    file.display()
                );
                if strict {
                    bail!(msg);
                }
                eprintln!("warning: {msg}");
                break;
            }
        }
    }
    Ok(bin)
}
