//! `relay-server`: the cloud side of the edge relay.
//!
//! `relay-server --config relay.toml` runs the relay until SIGTERM/SIGINT,
//! then drains. `relay-server dev-certs` writes a development PKI.
//! `relay-server check-config` validates a config file and exits.

use std::path::PathBuf;

use anyhow::Context;
use clap::parser::ValueSource;
use clap::{ArgMatches, Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use relay_server::{FileConfig, Relay};
use relay_transport::devcerts::DevPki;
use tokio::signal::unix::{signal, SignalKind};

/// Reverse-tunnel relay for Kubernetes edge nodes behind NAT (cloud side).
#[derive(Parser, Debug)]
#[command(version, about, long_about = None)]
struct Cli {
    #[command(flatten)]
    relay: RelayArgs,
    /// Once listening, write the bound addresses here as JSON
    /// (`{"quic": .., "tcp_fallback": .., "connect": .., "admin": ..,
    /// "health": ..}`), for supervisors and
    /// tests that start the relay on port 0.
    #[arg(long)]
    ready_file: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

/// The configuration file and its per-replica overrides: options of the
/// relay itself and of `check-config` (before or after the subcommand's
/// name), not of `dev-certs` or `route-agent`, which read no relay.toml.
#[derive(Args, Debug, Clone)]
struct RelayArgs {
    /// TOML configuration file (see README "Configuration reference").
    #[arg(short, long, env = "RELAY_CONFIG")]
    config: Option<PathBuf>,
    /// This replica's id, overriding `relay_id` in the file: one ConfigMap
    /// for every replica, the id from the pod (e.g. the node name).
    #[arg(long, env = "RELAY_ID")]
    relay_id: Option<String>,
    /// This replica's dial address (`host:port`), overriding
    /// `replicas.advertise` (e.g. `$(HOST_IP):8443` from the downward API).
    #[arg(long, env = "RELAY_ADVERTISE")]
    advertise: Option<String>,
    /// Lease membership in this namespace, overriding
    /// `replicas.lease_namespace` (e.g. the pod's own namespace from the
    /// downward API): turns scale-out on from the pod spec, without a
    /// second relay.toml (deploy/kubernetes/components/replicas).
    #[arg(long, env = "RELAY_LEASE_NAMESPACE")]
    lease_namespace: Option<String>,
    /// The Node this relay runs on, overriding `kubernetes.node_name`
    /// (`spec.nodeName` from the downward API): its zone decides which
    /// hinted Service endpoints the relay's own picks use.
    #[arg(long, env = "RELAY_NODE_NAME")]
    node_name: Option<String>,
}

impl RelayArgs {
    /// `check-config`'s options: each one given after the subcommand's
    /// name (`sub`, whose matches are `m`) where it was, else as given
    /// before it or by its environment variable (`self`, which reads the
    /// same variables).
    fn under(self, sub: RelayArgs, m: Option<&ArgMatches>) -> RelayArgs {
        fn pick<T>(m: Option<&ArgMatches>, id: &str, sub: Option<T>, top: Option<T>) -> Option<T> {
            match m.and_then(|m| m.value_source(id)) {
                Some(ValueSource::CommandLine) => sub,
                _ => top,
            }
        }
        RelayArgs {
            config: pick(m, "config", sub.config, self.config),
            relay_id: pick(m, "relay_id", sub.relay_id, self.relay_id),
            advertise: pick(m, "advertise", sub.advertise, self.advertise),
            lease_namespace: pick(
                m,
                "lease_namespace",
                sub.lease_namespace,
                self.lease_namespace,
            ),
            node_name: pick(m, "node_name", sub.node_name, self.node_name),
        }
    }
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Write a development CA, a relay certificate and node certificates
    /// (PEM) into a directory. Refuses to overwrite existing files.
    DevCerts {
        /// Output directory.
        #[arg(long, default_value = "dev-certs")]
        out: PathBuf,
        /// Node names to issue client certificates for (repeatable; none
        /// when edges get theirs from the certificate bootstrap).
        #[arg(long = "node")]
        nodes: Vec<String>,
        /// DNS names or IPs the relay certificate is valid for (repeatable).
        #[arg(long = "relay-name", default_values_t = ["localhost".to_string(), "127.0.0.1".to_string()])]
        relay_names: Vec<String>,
        /// Also write the CA's private key as `ca-key.pem`: the issuing CA
        /// of `[bootstrap]` (`ca_cert = ca.pem`, `ca_key = ca-key.pem`).
        /// Off by default, so the key that can sign any node's certificate
        /// is only on disk when asked for.
        #[arg(long)]
        ca_key: bool,
    },
    /// Validate the configuration file (and load its certificates), then exit.
    CheckConfig(RelayArgs),
    /// Route agent for the other cloud nodes: keeps routes from each edge
    /// prefix to the relay node in step with the relay's live routes (read
    /// from its admin API), and removes them on exit (unless
    /// --keep-routes-on-exit).
    RouteAgent {
        /// The relay's admin API address: an IP address and port
        /// (`10.0.0.5:9090`, `[fd00::5]:9090`), not a host name.
        #[arg(
            long,
            required_unless_present_any = ["replica", "cleanup"],
            conflicts_with = "replica"
        )]
        admin: Option<std::net::SocketAddr>,
        /// The relay node's address on this node's network: routes
        /// `<edge prefix> via <this>`. For networks that deliver any
        /// destination to the relay node's MAC (host-gw, BGP without
        /// encapsulation); cloud fabrics drop such packets (see
        /// --via-pod-network).
        #[arg(long, requires = "admin")]
        via: Option<std::net::IpAddr>,
        /// The relay node's pod CIDR, or an address in it: routes each edge
        /// prefix the way this node reaches that address (the CNI's
        /// overlay: same gateway, device and onlink flag, looked up every
        /// poll). For overlay CNIs (Flannel VXLAN, Calico IPIP/VXLAN), as
        /// in AWS, GCP and Azure. Not with --replica.
        #[arg(long, conflicts_with = "via")]
        via_pod_network: Option<relay_protocol::Cidr>,
        /// Several relay replicas, `ADMIN=VIA` each (e.g.
        /// `10.0.0.1:9090=10.0.0.1`): every edge prefix is routed through a
        /// resilient nexthop group of the replicas serving it.
        #[arg(long)]
        replica: Vec<String>,
        /// File holding the admin API bearer token; read again when it
        /// changes and after a 401 (a rotated Secret needs no restart).
        #[arg(long)]
        token_file: Option<PathBuf>,
        /// Talk HTTPS to the admin API, trusting only the CA certificate(s)
        /// in this PEM file (the CA that signed the admin certificate: by
        /// default the relay's own certificate).
        #[arg(long)]
        ca_file: Option<PathBuf>,
        /// Name (or IP) the admin API's certificate must carry; default:
        /// the IP of --admin.
        #[arg(long, requires = "ca_file")]
        server_name: Option<String>,
        /// Send the token over plain HTTP to a non-loopback admin address
        /// (without --ca-file). Refused otherwise: anyone on the path could
        /// read the token and then close every session.
        #[arg(long)]
        allow_insecure_http: bool,
        /// Poll interval.
        #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
        interval: std::time::Duration,
        /// Route protocol number marking the agent's routes.
        #[arg(long, default_value_t = 250)]
        proto: u8,
        /// Routing table the agent's routes go in (not `main`, which CNIs
        /// such as Calico's Felix manage and prune). Not 0, 253, 254, 255.
        #[arg(long, default_value_t = relay_server::agent::DEFAULT_TABLE)]
        table: u32,
        /// Preference of the one policy rule `lookup <table>` the agent
        /// keeps ahead of `main` (1 to 32765; main's is 32766).
        #[arg(long, default_value_t = relay_server::agent::DEFAULT_RULE_PREF)]
        rule_pref: u32,
        /// Serve /healthz, /readyz (the last polls synced the routes) and
        /// /metrics (Prometheus text) on this address (plain HTTP, no
        /// token; e.g. 127.0.0.1:9471). With --admin or --replica.
        #[arg(long)]
        status_listen: Option<std::net::SocketAddr>,
        /// Allow --status-listen off loopback (anyone reaching the address
        /// may read the figures and take its few connection slots).
        #[arg(long, requires = "status_listen")]
        allow_insecure_status: bool,
        /// On SIGTERM, leave the routes, nexthops and rule in place for the
        /// next agent, which takes them over at its start: a DaemonSet
        /// update then leaves no gap while the new pod starts. Before an
        /// uninstall, roll out with this off (`false`), or run --cleanup
        /// on each node after.
        #[arg(long, env = "ROUTE_AGENT_KEEP_ROUTES_ON_EXIT")]
        keep_routes_on_exit: bool,
        /// Remove what an agent with these --table, --rule-pref and
        /// --proto left (routes, nexthops, rule), then exit; the relay is
        /// not asked.
        #[arg(long, conflicts_with_all = ["admin", "replica"])]
        cleanup: bool,
    },
}

/// Reads and validates the file with the per-replica overrides applied
/// before validation (so a bad `--advertise` is named like a bad field).
/// relay.toml with the per-pod overrides of the command line.
fn load(path: &std::path::Path, args: &RelayArgs) -> anyhow::Result<relay_server::RelayConfig> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut f = FileConfig::parse(&text)?;
    if let Some(id) = &args.relay_id {
        f.relay_id = Some(id.clone());
    }
    if let Some(a) = &args.advertise {
        f.replicas.advertise = Some(a.clone());
    }
    if let Some(ns) = &args.lease_namespace {
        f.replicas.lease_namespace = Some(ns.clone());
    }
    if let Some(n) = &args.node_name {
        f.kubernetes.node_name = Some(n.clone());
    }
    Ok(f.into_runtime()?)
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt().with_env_filter(filter).init();
}

fn main() -> anyhow::Result<()> {
    // As #[tokio::main], plus the park hook: after a trim each worker
    // shrinks its own malloc heap (memory::on_park).
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .on_thread_park(relay_transport::memory::on_park)
        .build()?
        .block_on(relay_main())
}

async fn relay_main() -> anyhow::Result<()> {
    // Parsed by hand (as `Cli::parse` does) to keep the matches, which
    // tell where `check-config`'s options were given.
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches)
        .map_err(|e| e.format(&mut Cli::command()))
        .unwrap_or_else(|e| e.exit());
    init_tracing();
    relay_transport::tls::install_default_provider();
    match cli.cmd {
        Some(Cmd::DevCerts {
            out,
            nodes,
            relay_names,
            ca_key,
        }) => {
            let names: Vec<&str> = relay_names.iter().map(String::as_str).collect();
            let nodes: Vec<&str> = nodes.iter().map(String::as_str).collect();
            let pki = DevPki::generate(&names, &nodes).context("generating certificates")?;
            let ca_key_path = out.join("ca-key.pem");
            // Checked before anything is written, as write_to does for its
            // own files, so a refusal leaves no half-written PKI.
            anyhow::ensure!(
                !(ca_key && ca_key_path.exists()),
                "{} exists; refusing to overwrite",
                ca_key_path.display()
            );
            for f in pki
                .write_to(&out)
                .with_context(|| format!("writing {}", out.display()))?
            {
                println!("{}", f.display());
            }
            if ca_key {
                use std::io::Write;
                use std::os::unix::fs::OpenOptionsExt;
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&ca_key_path)
                    .with_context(|| format!("writing {}", ca_key_path.display()))?;
                f.write_all(pki.ca_pem_pair().1.as_bytes())
                    .with_context(|| format!("writing {}", ca_key_path.display()))?;
                println!("{}", ca_key_path.display());
            }
            Ok(())
        }
        Some(Cmd::RouteAgent {
            admin,
            via,
            via_pod_network,
            replica,
            token_file,
            ca_file,
            server_name,
            allow_insecure_http,
            interval,
            proto,
            table,
            rule_pref,
            status_listen,
            allow_insecure_status,
            keep_routes_on_exit,
            cleanup,
        }) => {
            anyhow::ensure!(!interval.is_zero(), "--interval must be greater than zero");
            let table = relay_server::agent::RouteTable {
                table,
                pref: rule_pref,
            };
            table.validate().context("--table/--rule-pref")?;
            if cleanup {
                relay_server::multipath::remove_installed(table, proto)
                    .await
                    .context("removing the route agent's routes, nexthops and rule")?;
                println!(
                    "removed routes of protocol {proto} in table {}, nexthops {:#x}.. and rule pref {}",
                    table.table,
                    relay_server::multipath::NEXTHOP_BASE,
                    table.pref
                );
                return Ok(());
            }
            let on_exit = match keep_routes_on_exit {
                true => relay_server::agent::OnExit::Keep,
                false => relay_server::agent::OnExit::Remove,
            };
            anyhow::ensure!(
                status_listen.is_none_or(|a| a.ip().is_loopback()) || allow_insecure_status,
                "--status-listen off loopback serves the agent's status to anyone who reaches \
                 it: use a loopback address (kubelet probes it through the host network), \
                 or pass --allow-insecure-status"
            );
            // The multipath agent's nexthop objects go via each replica's
            // own address; copying one CNI route per replica is not built.
            anyhow::ensure!(
                via_pod_network.is_none() || replica.is_empty(),
                "--via-pod-network works with --admin (one relay), not with --replica: \
                 the multipath agent routes through each replica's VIA address only"
            );
            anyhow::ensure!(
                admin.is_none() || via.is_some() || via_pod_network.is_some(),
                "--admin needs --via (the relay node's address) or --via-pod-network \
                 (the relay node's pod CIDR, for overlay CNIs)"
            );
            anyhow::ensure!(
                via_pod_network.is_none_or(|c| c.addr().is_ipv4()),
                "--via-pod-network: an IPv4 prefix or address (the agent routes IPv4 edge prefixes)"
            );
            let mut targets = Vec::new();
            for r in &replica {
                let (a, v) = r
                    .split_once('=')
                    .with_context(|| format!("--replica {r:?}: expected ADMIN=VIA"))?;
                targets.push((
                    a.parse::<std::net::SocketAddr>()
                        .with_context(|| format!("--replica {r:?}: admin address"))?,
                    v.parse::<std::net::IpAddr>()
                        .with_context(|| format!("--replica {r:?}: next hop"))?,
                ));
            }
            anyhow::ensure!(targets.len() <= 64, "at most 64 --replica");
            use relay_server::agent::{pod_network_probe, Toward};
            let single = match (admin, via, via_pod_network) {
                (Some(a), Some(v), None) => Some((a, Toward::Via(v))),
                (Some(a), None, Some(c)) => Some((a, Toward::PodNetwork(pod_network_probe(c)))),
                _ => None,
            };
            if let Some((a, Toward::Via(v) | Toward::PodNetwork(v))) = single {
                targets.push((a, v));
            }
            let mut tls_of = Vec::new();
            for (admin, _) in &targets {
                anyhow::ensure!(
                    ca_file.is_some()
                        || token_file.is_none()
                        || admin.ip().is_loopback()
                        || allow_insecure_http,
                    "--token-file without --ca-file would send the admin token in clear to {admin}: \
                     pass --ca-file (HTTPS), or --allow-insecure-http"
                );
                tls_of.push(match &ca_file {
                    Some(ca) => Some(
                        relay_server::agent::AgentTls::new(
                            ca,
                            &server_name
                                .clone()
                                .unwrap_or_else(|| admin.ip().to_string()),
                        )
                        .with_context(|| format!("--ca-file {}", ca.display()))?,
                    ),
                    None => None,
                });
            }
            // Read again when the file changes and after a 401: a rotated
            // Secret is taken without restarting the agent.
            let token = match token_file {
                Some(p) => Some(
                    relay_server::Secret::from_file(&p)
                        .with_context(|| format!("reading {}", p.display()))?,
                ),
                None => None,
            };
            let stop = tokio_util::sync::CancellationToken::new();
            // Bound before the agent starts, so a taken port is an error
            // at start rather than probes failing later.
            let status_listener = match status_listen {
                Some(a) => Some(
                    relay_transport::listen::tcp(a, relay_transport::listen::BACKLOG)
                        .with_context(|| format!("--status-listen {a}"))?,
                ),
                None => None,
            };
            let status = std::sync::Arc::<relay_server::agent::status::AgentStatus>::default();
            if let Some(l) = status_listener {
                tracing::info!(addr = ?l.local_addr(), "route agent status endpoint listening");
                tokio::spawn(relay_server::agent::status::serve(
                    l,
                    status.clone(),
                    stop.clone(),
                ));
            }
            let task = if let Some((_, toward)) = single {
                let ((admin, _), tls) =
                    targets.into_iter().zip(tls_of).next().context("--admin")?;
                let cfg = relay_server::agent::AgentConfig {
                    admin,
                    token,
                    tls,
                    interval,
                    proto,
                };
                tokio::spawn(relay_server::agent::run_in_table(
                    cfg,
                    toward,
                    table,
                    stop.clone(),
                    status,
                    on_exit,
                ))
            } else {
                let cfg = relay_server::multipath::MultipathConfig {
                    replicas: targets
                        .into_iter()
                        .zip(tls_of)
                        .map(
                            |((admin, via), tls)| relay_server::multipath::ReplicaTarget {
                                admin,
                                via,
                                tls,
                            },
                        )
                        .collect(),
                    token,
                    interval,
                    proto,
                    table,
                    on_exit,
                };
                tokio::spawn(relay_server::multipath::run_with_status(
                    cfg,
                    stop.clone(),
                    status,
                ))
            };
            let mut term = signal(SignalKind::terminate())?;
            let mut int = signal(SignalKind::interrupt())?;
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            stop.cancel();
            let _ = tokio::time::timeout(std::time::Duration::from_secs(15), task).await;
            Ok(())
        }
        Some(Cmd::CheckConfig(sub)) => {
            let args = cli
                .relay
                .under(sub, matches.subcommand_matches("check-config"));
            let path = args.config.clone().context("--config is required")?;
            let cfg = load(&path, &args)?;
            println!(
                "{}: ok (relay_id {}, {} nodes)",
                path.display(),
                cfg.relay_id,
                cfg.nodes.len()
            );
            Ok(())
        }
        None => {
            let path = cli
                .relay
                .config
                .clone()
                .context("--config is required (or use a subcommand; see --help)")?;
            let cfg = load(&path, &cli.relay)?;
            let grace = cfg.limits.drain_grace;
            relay_transport::fd_limit::raise_and_log("relay-server");
            let mut relay = Relay::spawn(cfg).await?;
            // Memory of a load peak (a CONNECT flood) goes back to the
            // system once the peak has passed.
            relay_transport::memory::spawn_trim_after_peaks();
            // Bulk streams free and reallocate 64 KiB chunks all the time; a
            // heap that shrank after each costs page faults (memory::keep_heap_top).
            relay_transport::memory::keep_heap_top();
            // Handlers first: whoever reads the ready file may signal at once
            // (SIGHUP's default action would end the process).
            let mut term = signal(SignalKind::terminate())?;
            let mut int = signal(SignalKind::interrupt())?;
            // SIGHUP: reload certificates, keys and CRLs for new handshakes,
            // and the admin tokens.
            let mut hup = signal(SignalKind::hangup())?;
            if let Some(path) = &cli.ready_file {
                let ready = serde_json::json!({
                    "quic": relay.quic_addr().to_string(),
                    "tcp_fallback": relay.tcp_fallback_addr().map(|a| a.to_string()),
                    "connect": relay.connect_addr().map(|a| a.to_string()),
                    "admin": relay.admin_addr().map(|a| a.to_string()),
                    "health": relay.health_addr().map(|a| a.to_string()),
                    "pid": std::process::id(),
                });
                // Write then rename, so a reader never sees half a file.
                let tmp = path.with_extension("tmp");
                std::fs::write(&tmp, ready.to_string())
                    .with_context(|| format!("writing {}", tmp.display()))?;
                std::fs::rename(&tmp, path)
                    .with_context(|| format!("writing {}", path.display()))?;
            }
            loop {
                tokio::select! {
                    _ = term.recv() => { tracing::info!("SIGTERM"); break }
                    _ = int.recv() => { tracing::info!("SIGINT"); break }
                    _ = hup.recv() => {
                        if let Err(e) = relay.reload_tls() {
                            tracing::warn!(error = %e, "SIGHUP: tls reload failed; keeping the previous certificates");
                        }
                        // Logs what it took and what it refused itself.
                        if let Some(tokens) = &relay.shared().cfg.admin_token_files {
                            tokens.reload();
                        }
                    }
                    why = relay.wait() => anyhow::bail!("relay failed: {why}"),
                }
            }
            relay.shutdown(grace).await;
            Ok(())
        }
    }
}
