//! Running things inside the lab's namespaces: commands (`ip`, `nft`,
//! anything under `ip netns exec`, bounded by a timeout) and async tasks on
//! a thread that has entered a namespace ([`NetnsLab::spawn_in`],
//! [`NetnsLab::run_in`]).
//!
//! This is the process handling every other part of the lab goes through;
//! it knows nothing about the topology.

use std::fs::File;
use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use nix::sched::CloneFlags;

use super::{NetnsLab, NsRef};

/// Runs `cmd`, returning stdout; on failure the error names `what` and
/// carries stderr.
pub(super) fn run(cmd: &mut Command, what: &str) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot start `{what}`"))?;
    if !out.status.success() {
        bail!(
            "`{what}` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Default bound for [`NetnsLab::exec`].
pub const EXEC_TIMEOUT: Duration = Duration::from_secs(30);

impl NetnsLab {
    /// Loads an nftables script (`nft -f -`) inside `ns`.
    pub fn nft(&self, ns: impl NsRef, script: &str) -> Result<()> {
        let ns = ns.ns_name(self);
        let what = format!("ip netns exec {ns} nft -f - <<'{}'", script.trim());
        let mut child = Command::new("ip")
            .args(["netns", "exec", ns, "nft", "-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start `{what}`"))?;
        child
            .stdin
            .take()
            .context("nft stdin")?
            .write_all(script.as_bytes())
            .with_context(|| format!("writing script to `{what}`"))?;
        let out = child
            .wait_with_output()
            .with_context(|| format!("waiting for `{what}`"))?;
        if !out.status.success() {
            bail!(
                "`{what}` failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }

    /// Runs `args` inside `ns` (`ip netns exec`), bounded by
    /// [`EXEC_TIMEOUT`]; returns stdout, or an error with stderr.
    pub fn exec(&self, ns: impl NsRef, args: &[&str]) -> Result<String> {
        self.exec_timeout(ns, args, EXEC_TIMEOUT)
    }

    /// Like [`NetnsLab::exec`], killing the command after `limit`.
    pub fn exec_timeout(&self, ns: impl NsRef, args: &[&str], limit: Duration) -> Result<String> {
        let ns = ns.ns_name(self);
        let what = format!("ip netns exec {ns} {}", args.join(" "));
        let mut child = Command::new("ip")
            .args(["netns", "exec", ns])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start `{what}`"))?;
        // Readers on their own threads so a chatty command cannot block on
        // a full pipe while we wait for it.
        let out_rx = drain(child.stdout.take());
        let err_rx = drain(child.stderr.take());
        let deadline = Instant::now() + limit;
        let status = loop {
            if let Some(status) = child
                .try_wait()
                .with_context(|| format!("waiting for `{what}`"))?
            {
                break status;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("`{what}` timed out after {limit:?}");
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        // A background grandchild may keep a pipe open; do not wait for it
        // beyond the deadline (plus a little slack for the final read).
        let grace = deadline.saturating_duration_since(Instant::now()) + Duration::from_secs(1);
        let stdout = out_rx.recv_timeout(grace).unwrap_or_default();
        let stderr = err_rx.recv_timeout(grace).unwrap_or_default();
        if !status.success() {
            bail!("`{what}` failed ({status}): {}", stderr.trim());
        }
        Ok(stdout)
    }

    /// Starts a thread that enters `ns`'s network namespace, builds a
    /// current-thread tokio runtime there and runs `f()` to completion.
    /// Sockets the future opens live in that namespace (so do threads the
    /// runtime spawns, e.g. for `spawn_blocking`, since new threads inherit
    /// their creator's namespace). The thread keeps the namespace alive
    /// until it exits, even if the lab is dropped first.
    pub fn spawn_in<F, Fut, T>(&self, ns: impl NsRef, f: F) -> JoinHandle<Result<T>>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: std::future::Future<Output = Result<T>>,
        T: Send + 'static,
    {
        self.spawn_inner(ns.ns_name(self), None, f)
    }

    /// Runs `f()` inside `ns` (as [`NetnsLab::spawn_in`]) and waits for it,
    /// failing if it takes longer than `limit` or panics.
    pub fn run_in<F, Fut, T>(&self, ns: impl NsRef, limit: Duration, f: F) -> Result<T>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: std::future::Future<Output = Result<T>>,
        T: Send + 'static,
    {
        let name = ns.ns_name(self).to_string();
        self.spawn_inner(&name, Some(limit), f)
            .join()
            .map_err(|p| anyhow!("task in {name} panicked: {}", panic_text(&p)))?
    }

    fn spawn_inner<F, Fut, T>(
        &self,
        name: &str,
        limit: Option<Duration>,
        f: F,
    ) -> JoinHandle<Result<T>>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: std::future::Future<Output = Result<T>>,
        T: Send + 'static,
    {
        // Open the handle now: the caller learns about a missing namespace
        // through the result, and a lab dropped right after this call does
        // not race the thread's start.
        let path = format!("/var/run/netns/{name}");
        let handle = File::open(&path).with_context(|| format!("open {path}"));
        let name = name.to_string();
        std::thread::spawn(move || {
            let fd = handle?;
            nix::sched::setns(&fd, CloneFlags::CLONE_NEWNET)
                .with_context(|| format!("setns({path}, CLONE_NEWNET)"))?;
            drop(fd);
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .with_context(|| format!("tokio runtime in {name}"))?;
            rt.block_on(async move {
                match limit {
                    None => f().await,
                    Some(limit) => tokio::time::timeout(limit, f())
                        .await
                        .map_err(|_| anyhow!("task in {name} timed out after {limit:?}"))?,
                }
            })
        })
    }
}

fn drain(pipe: Option<impl Read + Send + 'static>) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    if let Some(mut p) = pipe {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = p.read_to_end(&mut buf);
            let _ = tx.send(String::from_utf8_lossy(&buf).into_owned());
        });
    }
    rx
}

fn panic_text(p: &Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic".to_string())
}
