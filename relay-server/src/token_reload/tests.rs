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
/// `FULL_A` and `READ_1`), looked at every `interval`, a token replaced
/// accepted for `grace`.
async fn relay_with_token_files(
    full: &Path,
    read: &Path,
    interval: Duration,
    grace: Duration,
) -> (crate::Relay, AdminTokens) {
    std::fs::write(full, format!("{FULL_A}\n")).expect("write");
    std::fs::write(read, READ_1).expect("write");
    relay_on_token_files(full, read, interval, grace).await
}

/// A relay whose admin tokens come from the files `full` and `read` as
/// they are, looked at every `interval`, a token replaced accepted for
/// `grace`.
async fn relay_on_token_files(
    full: &Path,
    read: &Path,
    interval: Duration,
    grace: Duration,
) -> (crate::Relay, AdminTokens) {
    let start = Tokens {
        full: Some(read_admin_token(full).expect("full token")),
        read: Some(read_admin_token(read).expect("read token")),
    };
    let tokens = AdminTokens::new(
        full.into(),
        Some(read.into()),
        interval,
        grace,
        start.clone(),
    );
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
    let (relay, tokens) = relay_with_token_files(&full, &read, interval, Duration::ZERO).await;
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
        Duration::ZERO,
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
    async fn start(name: &str, interval: Duration, grace: Duration) -> Self {
        let dir = temp_dir(name);
        let (full, read) = (dir.join("token"), dir.join("read-token"));
        let (relay, tokens) = relay_with_token_files(&full, &read, interval, grace).await;
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
    let a = AgentAndRelay::start("agent", Duration::from_millis(50), Duration::ZERO).await;
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
    let a = AgentAndRelay::start("agent-401", Duration::from_secs(3600), Duration::ZERO).await;
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

/// The status of `method path` with `token`.
async fn status_of(admin: std::net::SocketAddr, method: &str, path: &str, token: &str) -> u16 {
    let auth = format!("Authorization: Bearer {token}");
    request_with(admin, method, path, &[&auth]).await.0
}

/// The relay's `/metrics` text, asked with `token`.
async fn metrics_with(admin: std::net::SocketAddr, token: &str) -> String {
    let (code, _, text) = request_with(
        admin,
        "GET",
        "/metrics",
        &[&format!("Authorization: Bearer {token}")],
    )
    .await;
    assert_eq!(code, 200, "{text}");
    text
}

/// A short `admin.token_grace` for the tests: long enough for a few
/// requests after a reload, short enough to wait out.
const GRACE: Duration = Duration::from_millis(500);

/// Both tokens rotated (A → B, R1 → R2) with a grace: the previous ones
/// are still accepted, each with the access it had (the previous read
/// token still cannot close a session), counted per kind in `/metrics`,
/// and refused once the grace has run (never before it), the end logged.
/// The watcher's poll is an hour away: the reload is SIGHUP's, and what
/// ends the grace is the grace's own timer.
#[tokio::test]
async fn a_previous_token_is_accepted_for_the_grace_then_refused() {
    let _serial = SERIAL.lock().await;
    let (out, _guard) = relay_transport::test_log::Captured::start();
    let dir = temp_dir("grace");
    let (full, read) = (dir.join("token"), dir.join("read-token"));
    let (relay, tokens) =
        relay_with_token_files(&full, &read, Duration::from_secs(3600), GRACE).await;
    let admin = relay.admin_addr().expect("admin");
    replace(&full, FULL_B);
    replace(&read, READ_2);
    let at = std::time::Instant::now();
    assert_eq!(
        tokens.reload().changed,
        vec![TokenKind::Full, TokenKind::Read]
    );
    assert_eq!(status_with(admin, FULL_B).await, 200);
    assert_eq!(status_with(admin, READ_2).await, 200);
    assert_eq!(status_with(admin, FULL_A).await, 200, "A in its grace");
    assert_eq!(status_with(admin, READ_1).await, 200, "R1 in its grace");
    // The access each had: A may close a session (there is none: 404),
    // R1 may not (403).
    assert_eq!(
        status_of(admin, "DELETE", "/v1/sessions/nope", FULL_A).await,
        404
    );
    assert_eq!(
        status_of(admin, "DELETE", "/v1/sessions/nope", READ_1).await,
        403
    );
    assert!(
        at.elapsed() < GRACE,
        "the machine is too slow for this test's grace: {:?}",
        at.elapsed()
    );
    assert_eq!(tokens.previous_used(TokenKind::Full), 2);
    assert_eq!(tokens.previous_used(TokenKind::Read), 2);
    let metrics = metrics_with(admin, FULL_B).await;
    for line in [
        "relay_admin_previous_token_requests_total{token=\"full\"} 2\n",
        "relay_admin_previous_token_requests_total{token=\"read\"} 2\n",
    ] {
        assert!(metrics.contains(line), "{line} not in\n{metrics}");
    }
    // Refused once the grace has run, not before.
    until("A refused", async || {
        status_with(admin, FULL_A).await == 401
    })
    .await;
    assert!(at.elapsed() >= GRACE, "refused after {:?}", at.elapsed());
    assert_eq!(status_with(admin, READ_1).await, 401);
    assert_eq!(status_with(admin, FULL_B).await, 200);
    assert_eq!(status_with(admin, READ_2).await, 200);
    let used = tokens.previous_used(TokenKind::Full);
    assert_eq!(status_with(admin, FULL_A).await, 401);
    assert_eq!(
        tokens.previous_used(TokenKind::Full),
        used,
        "a 401 not counted"
    );
    until("both grace ends logged", async || {
        out.text().matches("admin token grace ended").count() == 2
    })
    .await;
    let log = out.text();
    for kind in ["full", "read"] {
        assert!(
            log.lines().any(|l| l.contains("INFO")
                && l.contains("admin token grace ended")
                && l.contains(&format!("token=\"{kind}\""))),
            "{kind}: {log}"
        );
    }
    assert!(
        !log.contains(FULL_A) && !log.contains(READ_1),
        "a token in the log:\n{log}"
    );
    relay.shutdown(Duration::ZERO).await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// `admin.token_grace = "0s"`: the previous token is refused at once,
/// and a removed read token file drops the read token at once.
#[tokio::test]
async fn a_zero_grace_refuses_the_previous_token_at_once() {
    let _serial = SERIAL.lock().await;
    let dir = temp_dir("grace-zero");
    let (full, read) = (dir.join("token"), dir.join("read-token"));
    let (relay, tokens) =
        relay_with_token_files(&full, &read, Duration::from_secs(3600), Duration::ZERO).await;
    let admin = relay.admin_addr().expect("admin");
    replace(&full, FULL_B);
    assert_eq!(tokens.reload().changed, vec![TokenKind::Full]);
    assert_eq!(status_with(admin, FULL_A).await, 401);
    assert_eq!(status_with(admin, FULL_B).await, 200);
    std::fs::remove_file(&read).expect("remove");
    assert_eq!(tokens.check().changed, vec![TokenKind::Read]);
    assert_eq!(status_with(admin, READ_1).await, 401);
    assert_eq!(tokens.previous_used(TokenKind::Full), 0);
    assert_eq!(tokens.previous_used(TokenKind::Read), 0);
    relay.shutdown(Duration::ZERO).await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// The read token's file removed (its Secret deleted; the mount is
/// optional, so kubelet removes the file): a rotation to no read token.
/// The read token is still accepted for the grace, then refused; the full
/// token stays (the full token is never dropped: its file removed is a
/// failure, the token kept); logged at info; not stale. The file back
/// again is taken.
#[tokio::test]
async fn a_removed_read_token_file_drops_the_read_token_after_the_grace() {
    let _serial = SERIAL.lock().await;
    let (out, _guard) = relay_transport::test_log::Captured::start();
    let dir = temp_dir("read-removed");
    let (full, read) = (dir.join("token"), dir.join("read-token"));
    let (relay, tokens) =
        relay_with_token_files(&full, &read, Duration::from_millis(50), GRACE).await;
    let admin = relay.admin_addr().expect("admin");
    assert_eq!(status_with(admin, READ_1).await, 200);
    std::fs::remove_file(&read).expect("remove");
    until("the poll dropped the read token", async || {
        tokens.current().read.is_none()
    })
    .await;
    let at = std::time::Instant::now();
    assert_eq!(tokens.reloads(TokenKind::Read), 1);
    assert!(!tokens.stale(TokenKind::Read));
    assert_eq!(status_with(admin, READ_1).await, 200, "in its grace");
    until("the read token refused", async || {
        status_with(admin, READ_1).await == 401
    })
    .await;
    assert!(
        at.elapsed() + Duration::from_millis(100) >= GRACE,
        "refused after {:?}",
        at.elapsed()
    );
    assert_eq!(status_with(admin, FULL_A).await, 200, "the full token kept");
    let log = out.text();
    assert!(
        log.lines().any(|l| l.contains("INFO")
            && l.contains("admin read token file removed")
            && l.contains("token=\"read\"")),
        "{log}"
    );
    // The full token's file removed: a failure, never dropped.
    std::fs::remove_file(&full).expect("remove");
    until("the failure counted", async || {
        tokens.failures(TokenKind::Full) == 1
    })
    .await;
    assert!(tokens.stale(TokenKind::Full));
    assert_eq!(status_with(admin, FULL_A).await, 200, "the full token kept");
    assert_eq!(status_with(admin, "").await, 401, "never open");
    // Back: taken.
    replace(&full, FULL_A);
    replace(&read, READ_2);
    until("the new read token accepted", async || {
        status_with(admin, READ_2).await == 200
    })
    .await;
    until("not stale", async || !tokens.stale(TokenKind::Full)).await;
    relay.shutdown(Duration::ZERO).await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// The full token's path is a symlink (as in a Secret volume) to a file
/// holding the rotated token B, and each look's read fails after the
/// stamp (the symlink is pointed nowhere in between and back after: a
/// transient failure, as EMFILE or EIO at the swap, the file's stamp the
/// good file's each time). Every look reads it again, warned and counted
/// once; `relay_admin_token_file_stale` is 1 meanwhile; once the read
/// succeeds B is taken (not pinned to A until the file changes again),
/// and the gauge is 0.
#[tokio::test]
async fn a_read_failure_at_the_swap_is_retried_and_warned_once() {
    use std::os::unix::fs::symlink;
    let _serial = SERIAL.lock().await;
    let (out, _guard) = relay_transport::test_log::Captured::start();
    let dir = temp_dir("transient");
    let (full, read) = (dir.join("token"), dir.join("read-token"));
    std::fs::write(dir.join("a"), FULL_A).expect("write");
    std::fs::write(dir.join("b"), FULL_B).expect("write");
    std::fs::write(&read, READ_1).expect("write");
    symlink("a", &full).expect("symlink");
    let (relay, tokens) =
        relay_on_token_files(&full, &read, Duration::from_secs(3600), Duration::ZERO).await;
    let admin = relay.admin_addr().expect("admin");
    // The watcher's first look (at once) done: on this thread, it runs
    // only while the test awaits, and its next look is an hour away.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let point = {
        let (dir, full) = (dir.clone(), full.clone());
        move |to: &str| {
            let tmp = dir.join("token.link");
            symlink(to, &tmp).expect("symlink");
            std::fs::rename(&tmp, &full).expect("swap");
        }
    };
    point("b");
    // Between the stamp (b's) and the read, the path goes nowhere.
    let hook = point.clone();
    tokens.set_before_read(Some(Box::new(move |kind| {
        if kind == TokenKind::Full {
            hook("missing");
        }
    })));
    for _ in 0..3 {
        let got = tokens.check();
        assert!(got.changed.is_empty(), "{got:?}");
        assert!(tokens.stale(TokenKind::Full));
        // Back to b: the stamp the next look sees is the same.
        point("b");
        assert_eq!(status_with(admin, FULL_A).await, 200, "A kept");
    }
    let metrics = metrics_with(admin, FULL_A).await;
    for line in [
        "relay_admin_token_file_stale{token=\"full\"} 1\n",
        "relay_admin_token_file_stale{token=\"read\"} 0\n",
        "relay_admin_token_reload_failures_total{token=\"full\"} 1\n",
    ] {
        assert!(metrics.contains(line), "{line} not in\n{metrics}");
    }
    tokens.set_before_read(None);
    assert_eq!(tokens.check().changed, vec![TokenKind::Full], "B taken");
    assert_eq!(status_with(admin, FULL_B).await, 200);
    assert_eq!(status_with(admin, FULL_A).await, 401);
    assert!(!tokens.stale(TokenKind::Full));
    assert!(metrics_with(admin, FULL_B)
        .await
        .contains("relay_admin_token_file_stale{token=\"full\"} 0\n"));
    let log = out.text();
    assert_eq!(
        log.lines()
            .filter(|l| l.contains("WARN") && l.contains("admin token file changed"))
            .count(),
        1,
        "one warning:\n{log}"
    );
    assert_eq!(tokens.failures(TokenKind::Full), 1);
    relay.shutdown(Duration::ZERO).await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// `relay_admin_token_file_stale{token}` follows the file as it is now:
/// 1 while it cannot be taken (a directory where the file was, which
/// `read` refuses; empty; too short; a read token equal to the full one),
/// 0 once a good one is in place, through the poll.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stale_gauge_is_1_while_a_bad_file_is_in_place() {
    let _serial = SERIAL.lock().await;
    let dir = temp_dir("stale");
    let (full, read) = (dir.join("token"), dir.join("read-token"));
    let (relay, tokens) =
        relay_with_token_files(&full, &read, Duration::from_millis(50), Duration::ZERO).await;
    let admin = relay.admin_addr().expect("admin");
    let gauge = async |kind: &str| {
        let m = metrics_with(admin, FULL_A).await;
        let prefix = format!("relay_admin_token_file_stale{{token=\"{kind}\"}} ");
        m.lines()
            .find_map(|l| l.strip_prefix(&prefix).map(str::to_string))
            .unwrap_or_else(|| panic!("no {prefix} in\n{m}"))
    };
    assert_eq!(gauge("full").await, "0");
    std::fs::remove_file(&full).expect("remove");
    std::fs::create_dir(&full).expect("a directory where the file was");
    until("stale", async || gauge("full").await == "1").await;
    std::fs::remove_dir(&full).expect("rmdir");
    replace(&full, "");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(gauge("full").await, "1", "empty");
    replace(&full, "short\n");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(gauge("full").await, "1", "too short");
    replace(&full, FULL_A);
    until("fresh", async || gauge("full").await == "0").await;
    replace(&read, FULL_A);
    until("the read token's file stale", async || {
        gauge("read").await == "1"
    })
    .await;
    replace(&read, READ_2);
    until("fresh", async || gauge("read").await == "0").await;
    assert_eq!(status_with(admin, READ_2).await, 200);
    assert!(!tokens.stale(TokenKind::Full) && !tokens.stale(TokenKind::Read));
    relay.shutdown(Duration::ZERO).await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// The relay takes a rotated read token (READ_1 → READ_2) before the
/// agent's node sees the new Secret: within the grace the agent's polls
/// with READ_1 still succeed (no 401, which the multipath agent would take
/// for a dead replica), counted as the previous token's; once its copy
/// changes it polls with READ_2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_not_yet_rotated_is_not_refused_within_the_grace() {
    let _serial = SERIAL.lock().await;
    let a = AgentAndRelay::start("agent-grace", Duration::from_secs(3600), DEADLINE).await;
    let (dir, read, relay, tokens, agent_file, cfg) =
        (a.dir, a.read, a.relay, a.tokens, a.agent_file, a.cfg);
    let mut poll = RoutesPoll::default();
    poll.poll(&cfg).await.expect("both on READ_1");
    replace(&read, READ_2);
    assert_eq!(tokens.reload().changed, vec![TokenKind::Read]);
    poll.poll(&cfg)
        .await
        .expect("the agent still sends READ_1: accepted in the grace");
    assert_eq!(tokens.previous_used(TokenKind::Read), 1);
    replace(&agent_file, READ_2);
    poll.poll(&cfg).await.expect("the agent reads READ_2");
    assert_eq!(tokens.previous_used(TokenKind::Read), 1, "READ_2 sent");
    relay.shutdown(Duration::ZERO).await;
    let _ = std::fs::remove_dir_all(&dir);
}
