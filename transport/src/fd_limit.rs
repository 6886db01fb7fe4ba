//! The open-file limit, raised at start.
//!
//! Every tunnelled TCP connection holds a socket on each side, every
//! captured connection another, every UDP flow's target one more: the
//! configured bounds (thousands of streams and captured connections) need
//! far more than 1,024 descriptors. systemd units set `LimitNOFILE`, but a
//! container gets its runtime's limit, and containerd 2.0 gives containers
//! a soft limit of 1,024 (with a hard limit of 524,288), as systemd does
//! for its own services by default: past it, every accept and dial fails
//! with `EMFILE` ("Too many open files"). The soft limit may be raised to
//! the hard one without privilege, which is what [`raise`] does.

/// Below this many descriptors after [`raise`], the binaries warn: the
/// default bounds cannot all be reached.
pub const WANTED: u64 = 65_536;

/// Raises this process's soft `RLIMIT_NOFILE` to its hard limit (capped
/// at the kernel's `fs.nr_open`, which an unlimited hard limit cannot
/// exceed). Returns the soft limit before and after.
pub fn raise() -> std::io::Result<(u64, u64)> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource, RLIM_INFINITY};
    let (before, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    let want = match hard {
        RLIM_INFINITY => std::fs::read_to_string("/proc/sys/fs/nr_open")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(1 << 20),
        h => h,
    };
    if want <= before {
        return Ok((before, before));
    }
    setrlimit(Resource::RLIMIT_NOFILE, want, hard)?;
    Ok((before, want))
}

/// [`raise`], logged: at debug when nothing needed raising, at info when
/// it was raised, a warning when the result is below [`WANTED`] or the
/// call failed. `who` names the binary in the lines.
pub fn raise_and_log(who: &str) {
    match raise() {
        Ok((before, after)) if after < WANTED => tracing::warn!(
            before,
            after,
            "{who}: the open-file limit is {after} (hard limit): connections and streams \
             beyond it fail with EMFILE; raise LimitNOFILE or the container runtime's limit"
        ),
        Ok((before, after)) if before != after => {
            tracing::info!(
                before,
                after,
                "{who}: open-file soft limit raised to the hard limit"
            )
        }
        Ok((_, after)) => tracing::debug!(after, "{who}: open-file limit"),
        Err(e) => {
            tracing::warn!(error = %e, "{who}: reading or raising the open-file limit failed")
        }
    }
}

#[cfg(test)]
mod tests {
    /// In a child process (the limit is process-wide): a soft limit below
    /// the hard one is raised to it.
    #[test]
    fn a_low_soft_limit_is_raised_to_the_hard_one() {
        if std::env::var_os("FD_LIMIT_CHILD").is_some() {
            let (before, after) = super::raise().expect("raise");
            assert_eq!(before, 512);
            assert_eq!(after, 4096);
            return;
        }
        let exe = std::env::current_exe().expect("test binary");
        let out = std::process::Command::new("prlimit")
            .args(["--nofile=512:4096", "--"])
            .arg(exe)
            .args([
                "--exact",
                "fd_limit::tests::a_low_soft_limit_is_raised_to_the_hard_one",
                "--nocapture",
            ])
            .env("FD_LIMIT_CHILD", "1")
            .output()
            .expect("prlimit (util-linux)");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "{text}");
        assert!(text.contains("1 passed"), "{text}");
    }
}
