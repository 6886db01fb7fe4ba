//! A real Prometheus server (Debian's `prometheus` package) with the
//! project's alert rules scrapes a real `relay-server` process, and
//! `EdgeTunnelDown` fires when an edge's session goes away and resolves
//! when it comes back.
//!
//! What runs, all on loopback:
//! - the `relay-server` debug binary with a dev PKI, in Kubernetes mode
//!   against `relay-kube-standin` (a kube-apiserver stand-in, NOT a real
//!   apiserver), so it writes the `EdgeTunnelReady` condition on the Node
//!   as in a cluster; its admin API serves HTTPS with the admin token, as
//!   in the base manifests, and Prometheus scrapes `/metrics` the way
//!   `podmonitor.yaml` says (Bearer token, TLS verified against the CA);
//! - one edge-client (in-process) for Node `edge-0`, labelled
//!   `node-role.kubernetes.io/edge`;
//! - a kube-state-metrics stand-in (a few lines below, NOT the real
//!   exporter): it renders the stand-in's Nodes as the two series the
//!   rules read, `kube_node_status_condition` (one row per condition and
//!   status, 1 for the current one, as kube-state-metrics does) and
//!   `kube_node_role` (from `node-role.kubernetes.io/<role>` labels).
//!   `EdgeTunnelDown` is judged from the Node's condition, so this is the
//!   path the alert really takes in a cluster: relay → Node condition →
//!   kube-state-metrics → Prometheus;
//! - `prometheus` with `rule_files` = the rule groups of
//!   `deploy/kubernetes/monitoring/prometheusrule.yaml`, extracted at test
//!   time (the `spec` of the PrometheusRule is a plain rules file),
//!   scraping and evaluating every second.
//!
//! Test-time override, stated: `EdgeTunnelDown` has `for: 5m` in the
//! manifest; the extracted copy uses `for: 3s` so the test ends in seconds.
//! Everything else (expressions, labels, the other rules) is as shipped,
//! and the test fails if the rule or its `for:` is no longer found.
//!
//! Skips with a loud message when `prometheus` is not installed, unless
//! `REQUIRE_LAB=1` or `CI=true` (then it fails, like the other lab tests).
//! Needs no root.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use edge_client::{EdgeClient, EdgeConfig};
use relay_kube_standin::{kubelet_node, StandIn};
use relay_transport::devcerts::DevPki;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const RULES: &str = include_str!("../../deploy/kubernetes/monitoring/prometheusrule.yaml");
const ALERT: &str = "EdgeTunnelDown";
/// The manifest's `for:` of [`ALERT`], and the test's replacement.
const FOR_SHIPPED: &str = "for: 5m";
const FOR_TEST: &str = "for: 3s";
const TOKEN: &str = "prometheus-lab-token-0123456789";
/// Bound on each wait; the whole test takes about 20 s.
const BOUND: Duration = Duration::from_secs(25);

/// `None` (after a loud message) when the test must be skipped.
fn prometheus_available() -> Option<()> {
    let found = Command::new("prometheus")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if found {
        return Some(());
    }
    let strict = std::env::var("REQUIRE_LAB").is_ok_and(|v| v == "1")
        || std::env::var("CI").is_ok_and(|v| v == "true");
    if strict {
        panic!("prometheus not found on PATH (REQUIRE_LAB=1 or CI=true: not skipping; apt-get install prometheus)");
    }
    eprintln!(
        "\n!!!!!!!! SKIPPING prometheus lab test: no `prometheus` on PATH\n!!!!!!!! (apt-get install prometheus; set REQUIRE_LAB=1 to make this a failure)\n"
    );
    None
}

/// `prometheus, version X` as the binary reports it.
fn prometheus_version() -> String {
    Command::new("prometheus")
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| {
            let text = String::from_utf8_lossy(&o.stdout).to_string()
                + &String::from_utf8_lossy(&o.stderr);
            text.lines().next().map(str::to_string)
        })
        .unwrap_or_else(|| "prometheus, version unknown".into())
}

/// The PrometheusRule's `spec` as a plain rules file (`groups: ...`), with
/// [`ALERT`]'s `for:` shortened.
fn rules_file() -> Result<String> {
    let (_, spec) = RULES
        .split_once("\nspec:\n")
        .context("prometheusrule.yaml: no `spec:`")?;
    // The spec is block YAML indented by two: dedent it.
    let mut out = String::new();
    for line in spec.lines() {
        if !line.trim().is_empty() {
            out.push_str(
                line.strip_prefix("  ")
                    .with_context(|| format!("prometheusrule.yaml: not under spec: {line:?}"))?,
            );
        }
        out.push('\n');
    }
    ensure!(
        out.starts_with("groups:\n"),
        "spec does not start with groups"
    );
    let start = out
        .find(&format!("- alert: {ALERT}\n"))
        .with_context(|| format!("no alert {ALERT} in prometheusrule.yaml"))?;
    let end = out[start + 1..]
        .find("- alert: ")
        .map_or(out.len(), |i| start + 1 + i);
    let rule = &out[start..end];
    ensure!(
        rule.matches(FOR_SHIPPED).count() == 1,
        "{ALERT} no longer has `{FOR_SHIPPED}`: update the override in this test:\n{rule}"
    );
    let rule = rule.replace(FOR_SHIPPED, FOR_TEST);
    Ok(format!("{}{rule}{}", &out[..start], &out[end..]))
}

/// Serves the stand-in's Nodes in kube-state-metrics' format (see the
/// module doc) until dropped.
async fn spawn_kube_state_metrics(
    standin: Arc<StandIn>,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let task = tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let standin = standin.clone();
            tokio::spawn(async move {
                let mut req = Vec::new();
                let mut buf = [0u8; 1024];
                while !req.windows(4).any(|w| w == b"\r\n\r\n") && req.len() < 16384 {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => req.extend_from_slice(&buf[..n]),
                    }
                }
                let body = kube_state_metrics(&standin);
                let head = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = s.write_all(head.as_bytes()).await;
                let _ = s.write_all(body.as_bytes()).await;
            });
        }
    });
    Ok((addr, task))
}

fn kube_state_metrics(standin: &StandIn) -> String {
    let mut cond = String::from("# TYPE kube_node_status_condition gauge\n");
    let mut role = String::from("# TYPE kube_node_role gauge\n");
    // Only edge-0 exists in this test.
    if let Some(n) = standin.node("edge-0") {
        let name = n.metadata.name.clone().unwrap_or_default();
        for (k, _) in n.metadata.labels.clone().unwrap_or_default() {
            if let Some(r) = k.strip_prefix("node-role.kubernetes.io/") {
                role.push_str(&format!(
                    "kube_node_role{{node=\"{name}\",role=\"{r}\"}} 1\n"
                ));
            }
        }
        for c in n.status.and_then(|s| s.conditions).unwrap_or_default() {
            for st in ["true", "false", "unknown"] {
                let v = u8::from(c.status.eq_ignore_ascii_case(st));
                cond.push_str(&format!(
                    "kube_node_status_condition{{node=\"{name}\",condition=\"{}\",status=\"{st}\"}} {v}\n",
                    c.type_
                ));
            }
        }
    }
    cond + &role
}

/// Processes and files of one run, removed on drop even when it fails.
struct Run {
    dir: PathBuf,
    children: Vec<(&'static str, Child)>,
}

impl Run {
    fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.join(format!("{name}.log"))).unwrap_or_default()
    }

    fn spawn(&mut self, name: &'static str, cmd: &mut Command) -> Result<()> {
        let log = std::fs::File::create(self.dir.join(format!("{name}.log")))?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        self.children.push((name, child));
        Ok(())
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        for (_, c) in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn free_port() -> Result<u16> {
    // Bound and released: Prometheus takes no `:0`. A race with another
    // process taking it in between only makes Prometheus fail to start.
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Percent-encodes a PromQL query for a URL.
fn encode(q: &str) -> String {
    q.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'_' | b'.' | b'-' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// `GET path` on Prometheus's HTTP API (HTTP/1.0: no chunked answer), the
/// JSON `data` of a `success` answer.
async fn prom(addr: SocketAddr, path: &str) -> Result<Value> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: prometheus\r\n\r\n").as_bytes())
        .await?;
    let mut all = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut all))
        .await
        .context("prometheus answer timed out")??;
    let text = String::from_utf8_lossy(&all);
    let (_, body) = text.split_once("\r\n\r\n").context("no header end")?;
    let v: Value = serde_json::from_str(body).with_context(|| format!("not JSON: {body}"))?;
    ensure!(v["status"] == "success", "{path}: {v}");
    Ok(v["data"].clone())
}

/// The value of an instant query that returns one series, if it does.
async fn query_one(addr: SocketAddr, q: &str) -> Result<Option<f64>> {
    let data = prom(addr, &format!("/api/v1/query?query={}", encode(q))).await?;
    let r = data["result"].as_array().cloned().unwrap_or_default();
    Ok(match r.as_slice() {
        [one] => one["value"][1].as_str().and_then(|v| v.parse().ok()),
        _ => None,
    })
}

/// `state` of [`ALERT`] for node edge-0 (`pending`, `firing`), `None` if
/// Prometheus has no such alert.
async fn alert_state(addr: SocketAddr) -> Result<Option<String>> {
    let data = prom(addr, "/api/v1/alerts").await?;
    Ok(data["alerts"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|a| a["labels"]["alertname"] == ALERT && a["labels"]["node"] == "edge-0")
        .and_then(|a| a["state"].as_str().map(str::to_string)))
}

/// Polls `f` every 250 ms until it yields `Some`, at most [`BOUND`].
async fn until<T>(what: &str, mut f: impl AsyncFnMut() -> Result<Option<T>>) -> Result<T> {
    let start = Instant::now();
    let mut last_error = None;
    loop {
        // Prometheus may answer errors while starting: keep polling, and
        // report the last one if the bound passes.
        match f().await {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last_error = Some(format!("{e:#}")),
        }
        ensure!(
            start.elapsed() < BOUND,
            "{what}: not within {BOUND:?} (last error: {})",
            last_error.as_deref().unwrap_or("none")
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn relay_toml(certs: &Path, token: &Path, kubeconfig: &Path) -> String {
    let q = |p: &Path| format!("{:?}", p.display().to_string());
    format!(
        "relay_id = \"relay-prom\"\n\
         [listen]\nquic = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\ntcp_fallback = false\n\
         [tls]\ncert = {}\nkey = {}\nclient_ca = {}\n\
         # HTTPS and a token, as in the base manifests (where the admin API\n\
         # listens off loopback and TLS is the default).\n\
         [admin]\ntls = true\ntoken_file = {}\n\
         [quic]\nkeepalive = \"500ms\"\nidle_timeout = \"5s\"\n\
         [kubernetes]\nenabled = true\nkubeconfig = {}\napi_timeout = \"3s\"\n",
        q(&certs.join("relay.pem")),
        q(&certs.join("relay-key.pem")),
        q(&certs.join("ca.pem")),
        q(token),
        q(kubeconfig),
    )
}

fn prometheus_yml(dir: &Path, relay_admin: SocketAddr, ksm: SocketAddr) -> String {
    format!(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
         rule_files: [{rules:?}]\n\
         scrape_configs:\n\
         # As podmonitor.yaml: HTTPS verified against the relay's CA, the\n\
         # admin token as Bearer, and the PodMonitor's job name.\n\
         - job_name: edge-relay/relay-server\n  scheme: https\n  metrics_path: /metrics\n\
         \x20 tls_config:\n    ca_file: {ca:?}\n    server_name: localhost\n\
         \x20 authorization:\n    type: Bearer\n    credentials_file: {token:?}\n\
         \x20 static_configs:\n  - targets: [\"{relay_admin}\"]\n\
         - job_name: kube-state-metrics\n  static_configs:\n  - targets: [\"{ksm}\"]\n",
        rules = dir.join("rules.yaml").display().to_string(),
        ca = dir.join("certs/ca.pem").display().to_string(),
        token = dir.join("admin-token").display().to_string(),
    )
}

/// Real Prometheus, real relay-server binary; the apiserver and
/// kube-state-metrics are stand-ins (see the module doc).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edge_tunnel_down_fires_when_the_session_goes_and_resolves_when_it_returns() -> Result<()> {
    relay_lab::init();
    if prometheus_available().is_none() {
        return Ok(());
    }
    let started = Instant::now();
    let relay_bin = relay_lab::scenario::relay_server_binary()?;
    let mut run = Run {
        dir: std::env::temp_dir().join(format!(
            "prom-lab-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        )),
        children: Vec::new(),
    };
    std::fs::create_dir_all(&run.dir)?;
    let dir = run.dir.clone();

    // The apiserver stand-in with edge-0's Node, labelled as an edge.
    let standin = Arc::new(StandIn::spawn().await?);
    let mut node = kubelet_node("edge-0", &["127.1.0.0/24"], &[("InternalIP", "127.0.0.2")]);
    node.metadata
        .labels
        .get_or_insert_with(Default::default)
        .insert("node-role.kubernetes.io/edge".into(), String::new());
    standin.upsert_node(node);
    let (ksm, _ksm_task) = spawn_kube_state_metrics(standin.clone()).await?;

    // The relay binary.
    let pki = DevPki::generate(&["localhost", "127.0.0.1"], &["edge-0"])?;
    pki.write_to(&dir.join("certs"))?;
    std::fs::write(dir.join("admin-token"), format!("{TOKEN}\n"))?;
    std::fs::write(
        dir.join("relay.toml"),
        relay_toml(
            &dir.join("certs"),
            &dir.join("admin-token"),
            standin.kubeconfig_path(),
        ),
    )?;
    let ready = dir.join("ready.json");
    run.spawn(
        "relay",
        Command::new(&relay_bin)
            .arg("--config")
            .arg(dir.join("relay.toml"))
            .arg("--ready-file")
            .arg(&ready)
            .env("RUST_LOG", "info"),
    )?;
    let ready: Value = until("relay ready file", async || {
        Ok(std::fs::read_to_string(&ready)
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok()))
    })
    .await
    .with_context(|| run.log("relay"))?;
    let quic: SocketAddr = ready["quic"].as_str().context("quic")?.parse()?;
    let admin: SocketAddr = ready["admin"].as_str().context("admin")?.parse()?;

    // Prometheus with the project's rules.
    std::fs::write(dir.join("rules.yaml"), rules_file()?)?;
    std::fs::write(dir.join("prometheus.yml"), prometheus_yml(&dir, admin, ksm))?;
    let prom_addr: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
    run.spawn(
        "prometheus",
        Command::new("prometheus")
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("tsdb").display()
            ))
            .arg(format!("--web.listen-address={prom_addr}")),
    )?;

    // The edge.
    let edge = || {
        EdgeClient::spawn(EdgeConfig::new(
            "edge-0",
            quic.to_string(),
            "localhost",
            pki.node_material("edge-0").expect("edge-0 is in the PKI"),
        ))
    };
    let e = edge();
    e.wait_connected(BOUND)
        .await
        .context("edge not connected")?;

    let diag = |run: &Run| {
        format!(
            "\n--- relay log:\n{}\n--- prometheus log:\n{}",
            run.log("relay"),
            run.log("prometheus")
        )
    };
    let check = async {
        // Both targets scraped (the relay over HTTPS with the token).
        for job in ["edge-relay/relay-server", "kube-state-metrics"] {
            until(&format!("up{{job={job:?}}} == 1"), async || {
                Ok(
                    (query_one(prom_addr, &format!("up{{job={job:?}}}")).await? == Some(1.0))
                        .then_some(()),
                )
            })
            .await?;
        }
        // The relay's own figure and the condition it wrote, as Prometheus
        // sees them; no alert while the session is up.
        until("relay_sessions == 1", async || {
            Ok((query_one(prom_addr, "relay_sessions").await? == Some(1.0)).then_some(()))
        })
        .await?;
        let ready_true = r#"kube_node_status_condition{node="edge-0",condition="EdgeTunnelReady",status="true"}"#;
        until("EdgeTunnelReady True scraped", async || {
            Ok((query_one(prom_addr, ready_true).await? == Some(1.0)).then_some(()))
        })
        .await?;
        // Two evaluations with the condition True: the alert must be absent.
        tokio::time::sleep(Duration::from_secs(2)).await;
        ensure!(
            alert_state(prom_addr).await?.is_none(),
            "{ALERT} active while the session is up"
        );

        // The edge goes away: the relay writes False, the alert goes
        // pending, then fires after `for`.
        e.shutdown().await;
        let down_at = Instant::now();
        until("relay_sessions == 0", async || {
            Ok((query_one(prom_addr, "relay_sessions").await? == Some(0.0)).then_some(()))
        })
        .await?;
        let mut states = Vec::new();
        until(&format!("{ALERT} firing"), async || {
            let s = alert_state(prom_addr).await?;
            if states.last() != Some(&s) {
                states.push(s.clone());
            }
            Ok((s.as_deref() == Some("firing")).then_some(()))
        })
        .await?;
        let fired_after = down_at.elapsed();
        ensure!(
            states.iter().any(|s| s.as_deref() == Some("pending")),
            "{ALERT} fired without going through pending ({states:?}): `for` not applied"
        );
        ensure!(
            fired_after >= Duration::from_secs(3),
            "{ALERT} fired {fired_after:?} after the session went, before `for: 3s`"
        );

        // The edge returns: True again, the alert resolves.
        let e = edge();
        e.wait_connected(BOUND)
            .await
            .context("edge not reconnected")?;
        let back_at = Instant::now();
        until(&format!("{ALERT} resolved"), async || {
            Ok(alert_state(prom_addr).await?.is_none().then_some(()))
        })
        .await?;
        let resolved_after = back_at.elapsed();
        until("relay_sessions == 1 again", async || {
            Ok((query_one(prom_addr, "relay_sessions").await? == Some(1.0)).then_some(()))
        })
        .await?;
        e.shutdown().await;
        // Printed, and kept in target/ for CI's lab step (as the matrix
        // and fault tests do).
        let summary = format!(
            "prometheus lab ({}; real relay-server; apiserver and kube-state-metrics are stand-ins): \
             {ALERT} states {states:?}, fired {:.1} s after the session went ({FOR_TEST}, manifest {FOR_SHIPPED}), \
             resolved {:.1} s after it returned; whole test {:.1} s\n",
            prometheus_version(),
            fired_after.as_secs_f64(),
            resolved_after.as_secs_f64(),
            started.elapsed().as_secs_f64()
        );
        println!("{summary}");
        let _ = std::fs::write(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/lab-prometheus.txt"),
            summary,
        );
        Ok::<(), anyhow::Error>(())
    };
    if let Err(err) = check.await {
        bail!("{err:#}{}", diag(&run));
    }
    Ok(())
}
