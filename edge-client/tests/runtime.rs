//! The `edge-client` binary runs on `worker_threads` runtime workers, one
//! unless its file says otherwise: the real binary, started with a real
//! config and dev certificates, its threads counted in
//! `/proc/<pid>/task/*/comm`. tokio names its workers `tokio-rt-worker`;
//! so does its blocking pool, which stays empty here because the relay is
//! an address literal (no name lookup) and nothing else blocks.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use relay_transport::devcerts::DevPki;

/// Threads of `pid` named as tokio names its workers.
fn workers(pid: u32) -> usize {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|comm| comm.trim_end() == "tokio-rt-worker")
        .count()
}

/// Kills the child when the test ends, however it ends.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the binary with `extra` lines in its config and returns its
/// worker count once the runtime is up (workers start with the runtime).
fn workers_with(dir: &Path, name: &str, extra: &str) -> usize {
    let config = dir.join(format!("{name}.toml"));
    let d = dir.display();
    std::fs::write(
        &config,
        format!(
            "{extra}node = \"edge-1\"\n\
             # Nothing listens there: the client keeps retrying.\n\
             relay = \"127.0.0.1:9\"\n\
             server_name = \"localhost\"\n\
             routes = [\"10.244.7.0/24\"]\n\
             [tls]\n\
             cert = \"{d}/edge-1.pem\"\n\
             key = \"{d}/edge-1-key.pem\"\n\
             relay_ca = \"{d}/ca.pem\"\n"
        ),
    )
    .unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_edge-client"))
        .arg("--config")
        .arg(&config)
        .env_remove("TOKIO_WORKER_THREADS")
        .env("RUST_LOG", "error")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let running = Running(child);
    let pid = running.0.id();
    let t = Instant::now();
    while workers(pid) == 0 {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "no runtime after 10 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // A moment more: a worker counted late would show here.
    std::thread::sleep(Duration::from_millis(300));
    workers(pid)
}

#[test]
fn one_worker_unless_the_file_asks_for_more() {
    let dir = std::env::temp_dir().join(format!("edge-runtime-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    DevPki::generate(&["localhost"], &["edge-1"])
        .unwrap()
        .write_to(&dir)
        .unwrap();
    let default = workers_with(&dir, "default", "");
    let two = workers_with(&dir, "two", "worker_threads = 2\n");
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(default, 1, "workers by default");
    assert_eq!(two, 2, "workers with worker_threads = 2");
}
