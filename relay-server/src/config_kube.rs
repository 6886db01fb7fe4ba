//! The Kubernetes sections of relay.toml: `[kubernetes]` (how the relay
//! reaches the API and what it watches and writes) and `[bootstrap]`
//! (node certificates for edges holding only a token), in file and
//! runtime form, validated naming the field. Re-exported from
//! [`crate::config`].

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use relay_protocol::Cidr;
use serde::Deserialize;

use crate::config::{err, ConfigError, MAX_DURATION};

/// `[kubernetes]` as the relay runs it: how to reach the API and what to
/// write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubeSettings {
    /// A kubeconfig file; the pod's service account when `None`.
    pub kubeconfig: Option<PathBuf>,
    /// A context in the kubeconfig; its current context when `None`.
    pub context: Option<String>,
    /// Write the `EdgeTunnelReady` condition on Nodes.
    pub node_status: bool,
    /// Publish session Events on Nodes.
    pub events: bool,
    /// Bound on every API call (the watch has its own, longer bound).
    pub api_timeout: Duration,
    /// Watch Services and EndpointSlices: capture ClusterIP ports with
    /// edge endpoints on the relay node, resolve ClusterIPs and Service
    /// names, and tell edges which ClusterIP ports to capture.
    pub services: bool,
    /// The cluster's DNS domain, for `CONNECT name.ns.svc.<domain>:port`.
    pub cluster_domain: String,
    /// Where the Node claims are kept (`kubernetes.cache_file`): a relay
    /// that starts while the apiserver is unreachable (its container
    /// restarted during a control-plane outage) admits edges from them
    /// until the first list arrives, instead of refusing every edge.
    pub cache_file: Option<PathBuf>,
    /// Where the Services and EndpointSlices are kept
    /// (`kubernetes.services_cache_file`): a relay that starts while the
    /// apiserver is unreachable captures and resolves Services from them
    /// until the first lists arrive, instead of from nothing.
    pub services_cache_file: Option<PathBuf>,
    /// The ranges an edge Node's addresses (and pod ranges) must fall in
    /// to be taken as the edge's (`kubernetes.edge_address_ranges`): its
    /// kubelet writes them, so they are vetted (see
    /// `k8s/node_addresses.rs`). Each family by the ranges listed of it;
    /// with none listed, IPv4 is not restricted and IPv6 is held to
    /// `fc00::/7` (unique local addresses).
    pub edge_address_ranges: Vec<Cidr>,
    /// The Node the relay runs on (`kubernetes.node_name`, or
    /// `--node-name` / `RELAY_NODE_NAME` from the downward API): whose zone
    /// the relay's own Service picks follow where endpoints carry topology
    /// hints (see [`crate::topology`]). `None`: hints apply to edges' picks
    /// only.
    pub node_name: Option<String>,
    /// How long after its first Node list the relay takes a Node whose
    /// `EdgeTunnelReady` says `True` with no session here for an edge on
    /// its way back, before it writes it `False`
    /// ([`crate::k8s::STALE_CONDITION_GRACE`] by default). Set by code
    /// only (tests shorten it); relay.toml has no key for it.
    pub stale_condition_grace: Duration,
}

impl Default for KubeSettings {
    fn default() -> Self {
        KubeSettings {
            kubeconfig: None,
            context: None,
            node_status: true,
            events: true,
            api_timeout: Duration::from_secs(10),
            services: true,
            cluster_domain: "cluster.local".into(),
            cache_file: None,
            services_cache_file: None,
            node_name: None,
            edge_address_ranges: default_edge_address_ranges(),
            // `crate::k8s::STALE_CONDITION_GRACE`, which exists only with
            // the `kubernetes` feature.
            stale_condition_grace: Duration::from_secs(26),
        }
    }
}

/// RFC 1918's private ranges and RFC 6598's shared range, where edge
/// sites' LANs live: the default `kubernetes.edge_address_ranges`. IPv6
/// has its default apart (`fc00::/7` while no IPv6 range is listed, see
/// [`KubeSettings::edge_address_ranges`]), so that a list replacing this
/// one with IPv4 ranges only keeps it.
pub fn default_edge_address_ranges() -> Vec<Cidr> {
    [
        "10.0.0.0/8",
        "172.16.0.0/12",
        "192.168.0.0/16",
        "100.64.0.0/10",
    ]
    .iter()
    .filter_map(|r| r.parse().ok())
    .collect()
}

/// `[bootstrap]` as the relay runs it.
#[derive(Debug, Clone)]
pub struct BootstrapSettings {
    /// Signs node certificates (the issuing CA's certificate and key).
    pub issuer: std::sync::Arc<relay_transport::issue::NodeIssuer>,
    /// The issuing CA's certificate (DER), which must be in `tls.client_ca`.
    pub issuer_cert: rustls::pki_types::CertificateDer<'static>,
    /// Namespace of the edge-client pods and service account.
    pub namespace: String,
    /// The edge-client service account tokens must belong to.
    pub service_account: String,
    /// The DaemonSets the token's pod may belong to (one of them): sites
    /// behind an HTTP proxy run their own DaemonSet with their own config.
    pub daemonsets: Vec<String>,
}

/// `[bootstrap]` in relay.toml.
#[derive(Debug, Deserialize)]
pub struct BootstrapFile {
    /// The issuing CA's certificate (PEM); must also be in `tls.client_ca`.
    pub ca_cert: PathBuf,
    /// The issuing CA's private key (PEM).
    pub ca_key: PathBuf,
    /// Lifetime of issued certificates (default 12h, at most 24h).
    #[serde(default, with = "humantime_serde")]
    pub cert_lifetime: Option<Duration>,
    /// `namespace/name` of the edge-client service account (default
    /// `edge-relay/edge-client`).
    pub service_account: Option<String>,
    /// Name of the edge-client DaemonSet in that namespace, or a list of
    /// names (default `edge-client`).
    pub daemonset: Option<OneOrMany>,
}

/// A name, or a list of names (`daemonset = "a"` or `["a", "b"]`).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    /// `"a"`.
    One(String),
    /// `["a", "b"]`.
    Many(Vec<String>),
}

/// Default lifetime of bootstrap certificates.
pub const DEFAULT_CERT_LIFETIME: Duration = Duration::from_secs(12 * 3600);

impl BootstrapFile {
    pub(crate) fn load(
        &self,
        client_ca: &[rustls::pki_types::CertificateDer<'static>],
    ) -> Result<BootstrapSettings, ConfigError> {
        let read = |field: &str, p: &Path| {
            std::fs::read_to_string(p).map_err(|e| err(field, format!("{}: {e}", p.display())))
        };
        let ca = read("bootstrap.ca_cert", &self.ca_cert)?;
        let key = read("bootstrap.ca_key", &self.ca_key)?;
        let lifetime = self.cert_lifetime.unwrap_or(DEFAULT_CERT_LIFETIME);
        if lifetime < Duration::from_secs(600) || lifetime > relay_transport::issue::MAX_LIFETIME {
            return Err(err(
                "bootstrap.cert_lifetime",
                "must be between 10m and 24h",
            ));
        }
        let issuer = relay_transport::issue::NodeIssuer::from_pem(&ca, &key, lifetime)
            .map_err(|e| err("bootstrap", e))?;
        let der = relay_transport::tls::certs_from_pem(ca.as_bytes(), "bootstrap.ca_cert")
            .map_err(|e| err("bootstrap.ca_cert", e))?;
        let issuer_cert = der[0].clone();
        if !crate::tls_reload::trusts(client_ca, &issuer_cert) {
            return Err(err(
                "bootstrap.ca_cert",
                "the issuing CA must also be in tls.client_ca, or the certificates it issues are refused (keep old and new CAs there while rotating)",
            ));
        }
        let sa = self
            .service_account
            .as_deref()
            .unwrap_or("edge-relay/edge-client");
        let Some((namespace, service_account)) = sa
            .split_once('/')
            .filter(|(n, s)| !n.is_empty() && !s.is_empty())
        else {
            return Err(err(
                "bootstrap.service_account",
                "write it as namespace/name",
            ));
        };
        let daemonsets = match &self.daemonset {
            None => vec!["edge-client".to_string()],
            Some(OneOrMany::One(n)) => vec![n.clone()],
            Some(OneOrMany::Many(list)) => list.clone(),
        };
        if daemonsets.is_empty() || daemonsets.iter().any(String::is_empty) {
            return Err(err(
                "bootstrap.daemonset",
                "name at least one DaemonSet, and no empty name",
            ));
        }
        Ok(BootstrapSettings {
            issuer: std::sync::Arc::new(issuer),
            issuer_cert,
            namespace: namespace.to_string(),
            service_account: service_account.to_string(),
            daemonsets,
        })
    }
}

/// `[kubernetes]` in relay.toml.
#[derive(Debug, Deserialize, Default)]
pub struct KubernetesFile {
    /// Turn in-cluster mode on.
    #[serde(default)]
    pub enabled: bool,
    /// See [`KubeSettings::kubeconfig`].
    pub kubeconfig: Option<PathBuf>,
    /// See [`KubeSettings::context`].
    pub context: Option<String>,
    /// See [`KubeSettings::node_status`] (default true).
    pub node_status: Option<bool>,
    /// See [`KubeSettings::events`] (default true).
    pub events: Option<bool>,
    /// See [`KubeSettings::api_timeout`] (default 10 s).
    #[serde(default, with = "humantime_serde")]
    pub api_timeout: Option<Duration>,
    /// See [`KubeSettings::services`] (default true).
    pub services: Option<bool>,
    /// See [`KubeSettings::cluster_domain`] (default `cluster.local`).
    pub cluster_domain: Option<String>,
    /// See [`KubeSettings::cache_file`] (default none).
    pub cache_file: Option<PathBuf>,
    /// See [`KubeSettings::services_cache_file`] (default none).
    pub services_cache_file: Option<PathBuf>,
    /// See [`KubeSettings::edge_address_ranges`] (default the private
    /// and shared IPv4 ranges; IPv6 held to `fc00::/7` while no IPv6 range
    /// is listed).
    pub edge_address_ranges: Option<Vec<Cidr>>,
    /// See [`KubeSettings::node_name`].
    pub node_name: Option<String>,
}

impl KubernetesFile {
    pub(crate) fn resolve(&self) -> Option<KubeSettings> {
        let d = KubeSettings::default();
        self.enabled.then(|| KubeSettings {
            kubeconfig: self.kubeconfig.clone(),
            context: self.context.clone(),
            node_status: self.node_status.unwrap_or(d.node_status),
            events: self.events.unwrap_or(d.events),
            api_timeout: self.api_timeout.unwrap_or(d.api_timeout),
            services: self.services.unwrap_or(d.services),
            cluster_domain: self
                .cluster_domain
                .as_deref()
                .map(|c| c.trim_matches('.').to_ascii_lowercase())
                .unwrap_or(d.cluster_domain),
            cache_file: self.cache_file.clone(),
            services_cache_file: self.services_cache_file.clone(),
            edge_address_ranges: self
                .edge_address_ranges
                .clone()
                .unwrap_or(d.edge_address_ranges),
            node_name: self.node_name.clone().filter(|n| !n.is_empty()),
            stale_condition_grace: d.stale_condition_grace,
        })
    }
}

pub(crate) fn check_kubernetes(
    k: Option<&KubeSettings>,
    nodes: &HashMap<String, Vec<Cidr>>,
) -> Result<(), ConfigError> {
    let Some(k) = k else { return Ok(()) };
    if !cfg!(feature = "kubernetes") {
        return Err(err(
            "kubernetes.enabled",
            "this relay-server was built without the `kubernetes` feature",
        ));
    }
    if !nodes.is_empty() {
        return Err(err(
            "nodes",
            "with [kubernetes] enabled, Node objects decide what each node may claim: remove the [nodes] table",
        ));
    }
    if k.api_timeout.is_zero() || k.api_timeout > MAX_DURATION {
        return Err(err("kubernetes.api_timeout", "must be between 1ms and 24h"));
    }
    let domain_ok = !k.cluster_domain.is_empty()
        && k.cluster_domain.len() <= 253
        && k.cluster_domain.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        });
    if !domain_ok {
        return Err(err(
            "kubernetes.cluster_domain",
            "must be a DNS domain such as cluster.local",
        ));
    }
    if let Some(f) = &k.services_cache_file {
        if !k.services {
            return Err(err(
                "kubernetes.services_cache_file",
                "Services are not watched (kubernetes.services = false): remove it",
            ));
        }
        if k.cache_file.as_ref() == Some(f) {
            return Err(err(
                "kubernetes.services_cache_file",
                "must not be kubernetes.cache_file: each cache needs its own file",
            ));
        }
    }
    Ok(())
}

#[cfg(all(test, feature = "kubernetes"))]
mod tests {
    use super::*;

    /// The Services cache needs the Service watch and a file of its own.
    #[test]
    fn a_services_cache_needs_services_and_its_own_file() {
        let nodes = HashMap::new();
        let with = |services: bool, nodes_file: &str| KubeSettings {
            services,
            cache_file: Some(nodes_file.into()),
            services_cache_file: Some("/var/lib/edge-relay/services.json".into()),
            ..KubeSettings::default()
        };
        assert!(
            check_kubernetes(Some(&with(true, "/var/lib/edge-relay/nodes.json")), &nodes).is_ok()
        );
        for bad in [
            with(false, "/var/lib/edge-relay/nodes.json"),
            with(true, "/var/lib/edge-relay/services.json"),
        ] {
            let e = check_kubernetes(Some(&bad), &nodes).unwrap_err();
            assert_eq!(e.field, "kubernetes.services_cache_file", "{e}");
        }
    }
}

#[cfg(test)]
mod bootstrap_tests {
    use super::*;

    /// `daemonset` takes one name or a list; an empty list or name is
    /// refused naming the field.
    #[test]
    fn bootstrap_daemonset_is_one_name_or_a_list() {
        relay_transport::tls::install_default_provider();
        let pki = relay_transport::devcerts::DevPki::generate(&["relay.test"], &[]).unwrap();
        let dir = std::env::temp_dir().join(format!("bootstrap-ds-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let (ca, key) = pki.ca_pem_pair();
        std::fs::write(dir.join("ca.pem"), &ca).unwrap();
        std::fs::write(dir.join("ca-key.pem"), &key).unwrap();
        let client_ca = relay_transport::tls::certs_from_pem(ca.as_bytes(), "ca").unwrap();
        let load = |daemonset: &str| {
            let text = format!(
                "ca_cert = {:?}\nca_key = {:?}\n{daemonset}",
                dir.join("ca.pem"),
                dir.join("ca-key.pem")
            );
            let file: BootstrapFile = toml::from_str(&text).unwrap();
            file.load(&client_ca)
        };
        assert_eq!(load("").unwrap().daemonsets, ["edge-client"]);
        assert_eq!(load("daemonset = \"ds-a\"").unwrap().daemonsets, ["ds-a"]);
        assert_eq!(
            load("daemonset = [\"ds-a\", \"ds-b\"]").unwrap().daemonsets,
            ["ds-a", "ds-b"]
        );
        for bad in ["daemonset = []", "daemonset = [\"\"]", "daemonset = \"\""] {
            let e = load(bad).unwrap_err().to_string();
            assert!(e.contains("bootstrap.daemonset"), "{bad}: {e}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
