//! The `edge-client` binary runs on `worker_threads` runtime workers, one
//! unless its file says otherwise: the real binary, started with a real
//! config and dev certificates, its workers read from its own runtime
//! (`edge_runtime_workers` on its status endpoint, tokio's count). Its
//! threads named `tokio-rt-worker` are not that count: tokio names its
//! blocking pool's threads so too (a name lookup, a state save); they
//! are checked to be at least the workers.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use relay_transport::devcerts::DevPki;

/// Threads of `pid` named as tokio names its workers (and its blocking
/// pool's threads).
fn threads(pid: u32) -> usize {
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

/// `GET /metrics` from the status endpoint at `addr`; `None` until it
/// answers.
fn metrics(addr: SocketAddr) -> Option<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: edge\r\n\r\n")
        .ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    body.starts_with("HTTP/1.").then_some(body)
}

/// A loopback address free now (bound, then let go).
fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// Starts the binary with `extra` lines in its config and returns its
/// runtime's workers (its `edge_runtime_workers`) and its threads named
/// `tokio-rt-worker`.
fn workers_with(dir: &Path, name: &str, extra: &str) -> (usize, usize) {
    let config = dir.join(format!("{name}.toml"));
    let d = dir.display();
    let status = free_addr();
    std::fs::write(
        &config,
        format!(
            "{extra}node = \"edge-1\"\n\
             # Nothing listens there: the client keeps retrying.\n\
             relay = \"127.0.0.1:9\"\n\
             server_name = \"localhost\"\n\
             routes = [\"10.244.7.0/24\"]\n\
             status_listen = \"{status}\"\n\
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
    let body = loop {
        if let Some(b) = metrics(status) {
            break b;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "no status endpoint after 10 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let workers = body
        .lines()
        .find_map(|l| l.strip_prefix("edge_runtime_workers "))
        .expect("edge_runtime_workers in /metrics")
        .trim()
        .parse()
        .unwrap();
    (workers, threads(pid))
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
    eprintln!(
        "(workers, tokio-rt-worker threads): default {default:?}, worker_threads = 2 {two:?}"
    );
    assert_eq!(default.0, 1, "workers by default");
    assert_eq!(two.0, 2, "workers with worker_threads = 2");
    assert!(default.1 >= 1 && two.1 >= 2, "the workers are threads");
}
