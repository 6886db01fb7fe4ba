//! `--kube` for the fleet benchmarks (`sessions`, `storm`): the relay in
//! in-cluster mode against the apiserver stand-in (`relay-kube-standin`,
//! an HTTPS server speaking the part of the Kubernetes API the relay uses;
//! no kube-apiserver runs on the build machines), holding a Node for every
//! simulated edge. The relay then does what it does in a cluster: lists and
//! watches Nodes (what each edge may claim), Services and EndpointSlices,
//! and writes each Node's `EdgeTunnelReady` condition and Events. The
//! benchmarks report how long until every Node says its tunnel is up and
//! the API requests per session.
//!
//! The stand-in answers from memory; a kube-apiserver answers after a round
//! trip and, for writes, after etcd commits. `--api-latency` adds that
//! (default 2 ms per read, 10 ms per write: a healthy control plane with
//! its etcd on SSD), so what a client that waits on each call in turn costs
//! shows.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use relay_kube_standin::{kubelet_node, StandIn};
use relay_lab::{edge_ip, edge_name};
use serde_json::json;

use super::Bench;

/// One run's Kubernetes figures: seconds until every Node said its tunnel
/// was up, and the API requests by `verb resource[/sub]` until then.
pub(crate) type KubeRun = (f64, BTreeMap<String, usize>);

/// `--kube`: the relay in in-cluster mode against the apiserver stand-in
/// (see [`BenchCluster`]).
#[derive(clap::Args, Debug, Clone, Copy)]
pub(crate) struct KubeArgs {
    /// Run the relay with `[kubernetes]` against the apiserver stand-in,
    /// one Node per edge, and report when every Node's condition said the
    /// tunnel is up and the API requests per session.
    #[arg(long)]
    kube: bool,
    /// With `--kube`: time the stand-in takes per read and per write.
    #[arg(long, value_parser = parse_latency, default_value = "2ms,10ms")]
    api_latency: (Duration, Duration),
}

impl KubeArgs {
    /// Whether `--kube` was given.
    pub(crate) fn on(&self) -> bool {
        self.kube
    }

    /// The JSON report's `kube` object (`null` without `--kube`): the
    /// latency set, per run the seconds until every Node said the tunnel
    /// is up and the API requests by verb and resource.
    pub(crate) fn json<'a>(
        &self,
        ready: &[f64],
        requests: impl Iterator<Item = Option<&'a BTreeMap<String, usize>>>,
    ) -> serde_json::Value {
        if !self.kube {
            return serde_json::Value::Null;
        }
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        json!({"api_latency_ms": [ms(self.api_latency.0), ms(self.api_latency.1)],
               "all_ready_s": ready, "requests": requests.collect::<Vec<_>>()})
    }

    /// The stand-in for `nodes` edges, when `--kube`; the bench's relay
    /// config then carries its `[kubernetes]` section.
    pub(crate) fn start(&self, bench: &mut Bench) -> Result<Option<BenchCluster>> {
        if !self.kube {
            return Ok(None);
        }
        let c = BenchCluster::start(bench.nodes, self.api_latency)?;
        bench.kube_section = Some(c.relay_section());
        Ok(Some(c))
    }
}

/// ` | relay with [kubernetes] against the stand-in (…)` when `--kube`.
pub(crate) fn kube_banner(k: &KubeArgs) -> String {
    if !k.kube {
        return String::new();
    }
    format!(
        " | relay with [kubernetes] against the apiserver stand-in, {:?} per read, {:?} per write",
        k.api_latency.0, k.api_latency.1
    )
}

/// `--api-latency READ,WRITE` (e.g. `2ms,10ms`).
pub(crate) fn parse_latency(s: &str) -> Result<(Duration, Duration), String> {
    let (r, w) = s
        .split_once(',')
        .ok_or_else(|| format!("{s:?}: expected READ,WRITE, e.g. 2ms,10ms"))?;
    let read = super::parse_duration(r.trim())?;
    let write = super::parse_duration(w.trim())?;
    if read > Duration::from_secs(1) || write > Duration::from_secs(1) {
        return Err(format!("{s:?}: at most 1s each"));
    }
    Ok((read, write))
}

/// The stand-in on its own runtime (its answers must not wait behind the
/// simulated edges in the benchmark's runtime), with a Node per edge.
pub(crate) struct BenchCluster {
    standin: StandIn,
    /// Shut down in the background on drop (a runtime cannot be dropped on
    /// a runtime thread); the stand-in, dropped after, stops its server.
    rt: Option<tokio::runtime::Runtime>,
    nodes: usize,
}

impl BenchCluster {
    /// Starts the stand-in with Nodes `edge-0` … for `nodes` edges, each
    /// claiming the edge's loopback address as its pod CIDR (`/32`) and
    /// InternalIP, as the relay's `[nodes]` table does without Kubernetes.
    pub(crate) fn start(nodes: usize, latency: (Duration, Duration)) -> Result<BenchCluster> {
        // A runtime can be neither started nor dropped on a runtime thread.
        let (rt, standin) = std::thread::spawn(move || -> Result<_> {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .thread_name("standin")
                .enable_all()
                .build()?;
            let standin = rt
                .block_on(StandIn::spawn())
                .context("apiserver stand-in")?;
            Ok((rt, standin))
        })
        .join()
        .map_err(|_| anyhow::anyhow!("stand-in thread panicked"))??;
        for i in 0..nodes {
            let ip = edge_ip(i).to_string();
            standin.upsert_node(kubelet_node(
                &edge_name(i),
                &[&format!("{ip}/32")],
                &[("InternalIP", &ip)],
            ));
        }
        standin.set_latency(latency.0, latency.1);
        Ok(BenchCluster {
            standin,
            rt: Some(rt),
            nodes,
        })
    }

    /// The relay's `[kubernetes]` section for this cluster (replaces its
    /// `[nodes]` table: Nodes decide the claims).
    pub(crate) fn relay_section(&self) -> String {
        format!(
            // The Nodes' addresses are loopback addresses, taken only when
            // a loopback range is listed (no real cluster lists one).
            "[kubernetes]\nenabled = true\nkubeconfig = {:?}\nedge_address_ranges = [\"127.0.0.0/8\"]\n",
            self.standin.kubeconfig_path().display().to_string()
        )
    }

    /// Requests served so far (an index into the log, for
    /// [`BenchCluster::requests_since`]).
    pub(crate) fn log_len(&self) -> usize {
        self.standin.request_count()
    }

    /// Requests since log index `from`, counted by `verb resource[/sub]`.
    pub(crate) fn requests_since(&self, from: usize) -> BTreeMap<String, usize> {
        let mut out = BTreeMap::new();
        for r in self.standin.requests_from(from) {
            *out.entry(r.verb_resource()).or_insert(0) += 1;
        }
        out
    }

    /// Nodes whose `EdgeTunnelReady` condition is `True`.
    fn ready(&self) -> usize {
        (0..self.nodes)
            .filter(|&i| {
                relay_lab::cluster::condition_of(&self.standin, &edge_name(i))
                    .is_some_and(|(status, _, _)| status == "True")
            })
            .count()
    }

    /// Nodes whose condition a relay read or wrote since log index `from`.
    fn touched_since(&self, from: usize) -> usize {
        let mut nodes = std::collections::HashSet::new();
        for r in self.standin.requests_from(from) {
            if let Some(a) = &r.attrs {
                if a.resource == "nodes" && a.subresource.as_deref() == Some("status") {
                    nodes.extend(a.name.clone());
                }
            }
        }
        nodes.len()
    }

    /// Waits until every Node's condition is `True` and a relay has read or
    /// written each since log index `from` (so a condition left `True` by a
    /// relay that was since replaced does not count); returns the time from
    /// `t0`. Polled every 50 ms.
    pub(crate) async fn wait_ready(
        &self,
        from: usize,
        t0: Instant,
        limit: Duration,
    ) -> Result<Duration> {
        let deadline = t0 + limit;
        loop {
            // The log's tail first: the conditions are read (every Node
            // copied) only once the relay has checked them all.
            let touched = self.touched_since(from);
            if touched == self.nodes && self.ready() == self.nodes {
                return Ok(t0.elapsed());
            }
            if Instant::now() >= deadline {
                anyhow::bail!(
                    "after {limit:?}: {} of {} Nodes say EdgeTunnelReady=True, {touched} checked by the relay",
                    self.ready(),
                    self.nodes
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for BenchCluster {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// `counts` as one line, `verb resource: n (x per session)`.
pub(crate) fn describe_requests(counts: &BTreeMap<String, usize>, sessions: usize) -> String {
    counts
        .iter()
        .map(|(k, n)| {
            format!(
                "{k}: {n} ({:.2}/session)",
                *n as f64 / sessions.max(1) as f64
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}
