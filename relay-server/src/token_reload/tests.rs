//! Token rotation with real files and real HTTP over real sockets: the
//! relay's admin API takes a token file replaced as kubelet replaces a
//! Secret (a rename, a `..data` symlink swap) and keeps the last good
//! token when the replacement is broken; a route agent's polls heal after
//! a rotation whichever side sees it first.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::*;
use crate::admin::tests::{relay_configured, request_with};
use crate::agent::poll::tests::config;
use crate::agent::{AgentConfig, RoutesPoll};

const FULL_A: &str = "full-token-A-0123456789";
const FULL_B: &str = "full-token-B-0123456789";
const FULL_C: &str = "full-token-C-0123456789";
const READ_1: &str = "read-token-1-0123456789";
const READ_2: &str = "read-token-2-0123456789";
const READ_3: &str = "read-token-3-0123456789";

/// Bound on every wait for a reload or a healed poll.
const DEADLINE: Duration = Duration::from_secs(10);

/// Held by each test here: they hit the same log callsites, and tracing
/// can miss an event for a thread's own subscriber (the log assertions'
/// `Captured`) while another thread registers that callsite.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "token-reload-{name}-{}-{}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

/// Replaces `path` with a file holding `text` the way a Secret update is
/// seen through a path: written apart, then renamed over it.
fn replace(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).expect("write");
    std::fs::rename(&tmp, path).expect("rename");
}

/// The status of `GET /v1/sessions` with `token`.
async fn status_with(admin: std::net::SocketAddr, token: &str) -> u16 {
    let auth = format!("Authorization: Bearer {token}");
    request_with(admin, "GET", "/v1/sessions", &[&auth]).await.0
}

/// Until `f` holds (checked every 20 ms), at most [`DEADLINE`].
async fn until(what: &str, mut f: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while !f().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "not within {DEADLINE:?}: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A relay whose admin tokens come from `full` and `read` (holding
/// `FULL_A` and `READ_1`), looked at every `interval`.
async fn relay_with_token_files(
    full: &Path,
    read: &Path,
    interval: Duration,
) -> (crate::Relay, AdminTokens) {
    std::fs::write(full, format!("{FULL_A}\n")).expect("write");
    std::fs::write(read, READ_1).expect("write");
    relay_on_token_files(full, read, interval).await
}

/// A relay whose admin tokens come from the files `full` and `read` as
/// they are, looked at every `interval`.
async fn relay_on_token_files(
    full: &Path,
    read: &Path,
    interval: Duration,
) -> (crate::Relay, AdminTokens) {
    let start = Tokens {
        full: Some(read_admin_token(full).expect("full token")),
        read: Some(read_admin_token(read).expect("read token")),
    };
    let tokens = AdminTokens::new(full.into(), Some(read.into()), interval, start.clone());
    let files = tokens.clone();
    let (relay, _) = relay_configured(0, move |c| {
        c.admin_token = start.full;
        c.admin_read_token = start.read;
        c.admin_token_files = Some(files);
    })
    .await;
    (relay, tokens)
}

/// Token A passes; the file replaced with B (rename, as a Secret update)
/// is taken by the poll: B passes, A gets 401, the read-only token is
/// untouched, and the reload is logged naming the token, never its value.
/// Replacements that fail the start's rules (empty, too short, missing, a
/// read token equal to the full one) keep B, are warned about once per
/// change and counted in `/metrics`; a good one after them is taken.
#[tokio::test]
async fn a_rotated_token_file_is_taken_and_a_broken_one_keeps_the_last() {
    let _serial = SERIAL.lock().await;
    let (out, _guard) = relay_transport::test_log::Captured::start();
    let dir = temp_dir("rotate");
    let (full, read) = (dir.join("token"), dir.join("read-token"));
    let interval = Duration::from_millis(50);
    let (relay, tokens) = relay_with_token_files(&full, &read, interval).await;
    let admin = relay.admin_addr().expect("admin");
    assert_eq!(status_with(admin, FULL_A).await, 200);
    assert_eq!(status_with(admin, READ_1).await, 200);
    assert_eq!(status_with(admin, FULL_B).await, 401);

    replace(&full, &format!("{FULL_B}\n"));
    until("B accepted", async || {
        status_with(admin, FULL_B).await == 200
    })
    .await;
    assert_eq!(status_with(admin, FULL_A).await, 401, "A revoked");
    assert_eq!(status_with(admin, READ_1).await, 200, "the read token kept");
    assert_eq!(tokens.reloads(TokenKind::Full), 1);
    assert_eq!(tokens.reloads(TokenKind::Read), 0);
    let log = out.text();
    let line = log
        .lines()
        .find(|l| l.contains("admin token reloaded"))
        .unwrap_or_else(|| panic!("no reload logged:\n{log}"));
    assert!(
        line.contains("INFO") && line.contains("token=\"full\""),
        "{line}"
    );
    assert!(
        !log.contains(FULL_A) && !log.contains(FULL_B),
        "a token in the log:\n{log}"
    );

    // Broken replacements, one after the other: B stays, each counted once.
    let broken: [(&Path, &str); 3] = [(&full, ""), (&full, "\n"), (&full, "too-short\n")];
    for (n, (path, text)) in broken.into_iter().enumerate() {
        replace(path, text);
        until("the failure counted", async || {
            tokens.failures(TokenKind::Full) == n as u64 + 1
        })
        .await;
        assert_eq!(
            status_with(admin, FULL_B).await,
            200,
            "B kept after {text:?}"
        );
    }
    // Unreadable (gone): also kept.
    std::fs::remove_file(&full).expect("remove");
    until("the failure counted", async || {
        tokens.failures(TokenKind::Full) == 4
    })
    .await;
    // The read token made equal to the full one: refused, both kept.
    replace(&full, FULL_B);
    replace(&read, FULL_B);
    until("the clash counted", async || {
        tokens.failures(TokenKind::Read) == 1
    })
    .await;
    // Ten more polls: nothing counted or warned again (once per change).
    tokio::time::sleep(interval * 10).await;
    assert_eq!(tokens.failures(TokenKind::Full), 4);
    assert_eq!(tokens.failures(TokenKind::Read), 1);
    assert_eq!(status_with(admin, FULL_B).await, 200);
    assert_eq!(status_with(admin, READ_1).await, 200, "the read token kept");
    let log = out.text();
    let warned = log
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("admin token file changed"))
        .count();
    assert_eq!(warned, 4, "one warning per broken change:\n{log}");
    assert_eq!(
        log.matches("read-only token would be the full").count(),
        1,
        "{log}"
    );
    let (code, _, metrics) = request_with(
        admin,
        "GET",
        "/metrics",
        &[&format!("Authorization: Bearer {FULL_B}")],
    )
    .await;
    assert_eq!(code, 200);
    for line in [
        "relay_admin_token_reload_failures_total{token=\"full\"} 4\n",
        "relay_admin_token_reload_failures_total{token=\"read\"} 1\n",
        "relay_admin_token_reloads_total{token=\"full\"} 1\n",
    ] {
        assert!(metrics.contains(line), "{line} not in\n{metrics}");
    }

    // Mended: the read file holds a token of its own again, the full one
    // rotates once more.
    replace(&read, READ_2);
    replace(&full, FULL_C);
    until("C accepted", async || {
        status_with(admin, FULL_C).await == 200
    })
    .await;
    until("the new read token accepted", async || {
        status_with(admin, READ_2).await == 200
    })
    .await;
    assert_eq!(status_with(admin, FULL_B).await, 401);
    assert_eq!(status_with(admin, READ_1).await, 401);
    relay.shutdown(Duration::ZERO).await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// A Secret volume as kubelet lays it out (`token -> ..data/token`,
/// `..data -> ..<timestamp>`) and updates it (a new timestamped directory,
/// then `..data` replaced by a rename): the path's target changes, and a
/// reload (SIGHUP's, called directly; the poll is an hour away) takes it.
#[tokio::test]
async fn a_secret_volume_swap_through_its_data_symlink_is_taken() {
    let _serial = SERIAL.lock().await;
    use std::os::unix::fs::symlink;
    let dir = temp_dir("symlink");
    let volume = |name: &str, full: &str, read: &str| {
        let d = dir.join(name);
        std::fs::create_dir_all(&d).expect("dir");
        std::fs::write(d.join("token"), full).expect("write");
        std::fs::write(d.join("read-token"), read).expect("write");
        symlink(name, dir.join("..data_tmp")).expect("symlink");
        std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).expect("swap");
    };
    volume("..2026_01_01", FULL_A, READ_1);
    symlink("..data/token", dir.join("token")).expect("symlink");
    symlink("..data/read-token", dir.join("read-token")).expect("symlink");
    let (relay, tokens) = relay_on_token_files(
        &dir.join("token"),
        &dir.join("read-token"),
        Duration::from_secs(3600),
    )
    .await;
    let admin = relay.admin_addr().expect("admin");
    assert_eq!(status_with(admin, FULL_A).await, 200);

    volume("..2026_01_02", FULL_B, READ_2);
    let got = tokens.reload();
    assert_eq!(got.changed, vec![TokenKind::Full, TokenKind::Read]);
    assert!(got.failed.is_empty(), "{got:?}");
    assert_eq!(status_with(admin, FULL_B).await, 200);
    assert_eq!(status_with(admin, READ_2).await, 200);
    assert_eq!(status_with(admin, FULL_A).await, 401);
    assert_eq!(status_with(admin, READ_1).await, 401);
    // Seen: the poll finds nothing more to do.
    assert_eq!(tokens.check(), Reloaded::default());
    relay.shutdown(Duration::ZERO).await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// A relay whose token files are looked at every `interval`, and a route
/// agent's config whose token file (`agent_file`) holds `READ_1`, as the
/// relay's read token does.
struct AgentAndRelay {
    dir: PathBuf,
    read: PathBuf,
    relay: crate::Relay,
    tokens: AdminTokens,
    agent_file: PathBuf,
    cfg: AgentConfig,
}

impl AgentAndRelay {
    async fn start(name: &str, interval: Duration) -> Self {
        let dir = temp_dir(name);
        let (full, read) = (dir.join("token"), dir.join("read-token"));
        let (relay, tokens) = relay_with_token_files(&full, &read, interval).await;
        let agent_file = dir.join("agent-token");
        std::fs::write(&agent_file, format!("{READ_1}\n")).expect("write");
        let cfg = AgentConfig {
            token: Some(Secret::from_file(&agent_file).expect("agent token")),
            ..config(relay.admin_addr().expect("admin"))
        };
        AgentAndRelay {
            dir,
            read,
            relay,
            tokens,
            agent_file,
            cfg,
        }
    }
}

/// The relay and a route agent both on the read token `READ_1`, each with
/// its own copy of the Secret, rotated to `READ_2` relay first, then to
/// `READ_3` agent first. In between the agent's polls get 401 (and it
/// keeps its routes, as for any failed poll); once both sides hold the
/// new token its polls succeed again, on the same `RoutesPoll`, without a
/// restart of either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_polls_heal_after_a_rotation_in_either_order() {
    let _serial = SERIAL.lock().await;
    let a = AgentAndRelay::start("agent", Duration::from_millis(50)).await;
    let (dir, read, relay, tokens, agent_file, cfg) =
        (a.dir, a.read, a.relay, a.tokens, a.agent_file, a.cfg);
    let mut poll = RoutesPoll::default();
    poll.poll(&cfg).await.expect("both on READ_1");

    // Relay first: the agent is refused until its copy changes too.
    replace(&read, READ_2);
    until("the relay took READ_2", async || {
        tokens.reloads(TokenKind::Read) == 1
    })
    .await;
    let e = poll
        .poll(&cfg)
        .await
        .expect_err("the agent still sends READ_1");
    assert!(format!("{e:#}").contains("401"), "{e:#}");
    replace(&agent_file, &format!("{READ_2}\n"));
    poll.poll(&cfg)
        .await
        .expect("the agent's next poll reads READ_2");

    // Agent first: refused until the relay's poll takes it.
    replace(&agent_file, READ_3);
    let e = poll
        .poll(&cfg)
        .await
        .expect_err("the relay still holds READ_2");
    assert!(format!("{e:#}").contains("401"), "{e:#}");
    replace(&read, READ_3);
    let mut refused = 0;
    until("the agent's polls succeed again", async || {
        match poll.poll(&cfg).await {
            Ok(_) => true,
            Err(_) => {
                refused += 1;
                false
            }
        }
    })
    .await;
    assert_eq!(tokens.reloads(TokenKind::Read), 2);
    assert!(refused < 100, "{refused} polls refused");
    relay.shutdown(Duration::ZERO).await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// The relay took a rotated token and the agent's file holds it too, but
/// the agent's look at the metadata missed the change (as a rewrite
/// within one timestamp tick could): the 401 has it read the file again
/// and ask once more, so the very poll that was refused succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_401_reads_the_agent_token_file_again_and_retries_once() {
    let _serial = SERIAL.lock().await;
    let a = AgentAndRelay::start("agent-401", Duration::from_secs(3600)).await;
    let (dir, read, relay, tokens, agent_file, cfg) =
        (a.dir, a.read, a.relay, a.tokens, a.agent_file, a.cfg);
    let token = cfg.token.clone().expect("a token file");
    let mut poll = RoutesPoll::default();
    poll.poll(&cfg).await.expect("both on READ_1");
    replace(&read, READ_2);
    assert_eq!(tokens.reload().changed, vec![TokenKind::Read]);
    std::fs::write(&agent_file, READ_2).expect("write");
    // The change goes unseen by the metadata.
    token.file_for_tests().expect("from a file").mark_read_now();
    assert_eq!(token.current().expose(), READ_1, "the change unseen");
    poll.poll(&cfg)
        .await
        .expect("401, the file read again, and the retry with READ_2");
    assert_eq!(token.current().expose(), READ_2);
    relay.shutdown(Duration::ZERO).await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// The agent's token file: a broken replacement (empty, then gone) keeps
/// the token last read; a good one is read at the next look.
#[test]
fn an_agent_token_file_that_cannot_be_used_keeps_the_last_token() {
    let _serial = SERIAL.blocking_lock();
    let dir = temp_dir("agent-file");
    let path = dir.join("token");
    std::fs::write(&path, "first-0123456789\n").expect("write");
    let s = Secret::from_file(&path).expect("read");
    assert_eq!(s.expose(), "first-0123456789");
    replace(&path, "");
    assert_eq!(s.current().expose(), "first-0123456789");
    std::fs::remove_file(&path).expect("remove");
    assert_eq!(s.current().expose(), "first-0123456789");
    assert_eq!(s.reread(), None, "the same token: nothing to retry with");
    replace(&path, "second-0123456789\n");
    assert_eq!(s.current().expose(), "second-0123456789");
    assert_eq!(Secret::new("x").reread(), None, "not from a file");
    let _ = std::fs::remove_dir_all(&dir);
}
