//! Putting capture back when something else on the node took it away.
//!
//! Capture's table, rules and address belong to it alone, but other
//! software on a node removes what it did not make: Debian's
//! `nftables.service` flushes the whole ruleset when it restarts, and
//! systemd-networkd deletes routing-policy rules it does not know
//! (`ManageForeignRoutingPolicyRules`, on by default) when a link changes
//! or `networkctl reload` runs (and, with `ManageForeignRoutes`, routes
//! it did not make). Without the table, an edge's pods reach the cloud
//! ranges by the default route instead of the tunnel; without the rules
//! or the routing table's routes, the node's own processes do. So the
//! owners of a
//! [`Capture`] ask [`Capture::repair`] now and then (every 10 s, as
//! kube-proxy checks its canary chains), which installs everything again
//! when a piece is missing, and their next `apply*` calls refill it.

use tracing::{info, warn};

use super::{output, Capture, CaptureError};

impl Capture {
    /// What of the installed capture is missing now (empty: all there):
    /// the table with its prerouting chain, the own-socket bypass rule,
    /// the capture rule, the routing table's `local default` (what removes
    /// routes it did not make takes the table's all), the capture address
    /// on `lo`, and with the IPv6 refusal on the node its two chains
    /// (see `capture/refuse6.rs`). Each is one short listing, whatever
    /// the number of prefixes.
    pub async fn missing(&self) -> Vec<&'static str> {
        let cfg = &self.cfg;
        let mut gone = Vec::new();
        let chain = ["list", "chain", "inet", cfg.nft_table.as_str(), "pre_nat"];
        if output("nft", &chain).await.is_err() {
            gone.push("nft table");
        }
        let bypass = (cfg.rule_pref - 1).to_string();
        let rules = output("ip", &["-4", "rule", "show", "pref", &bypass]).await;
        if !rules.is_ok_and(|r| r.contains("lookup main")) {
            gone.push("bypass rule");
        }
        let (pref, table) = (cfg.rule_pref.to_string(), cfg.route_table.to_string());
        let rule = output("ip", &["-4", "rule", "show", "pref", &pref]).await;
        if !rule.is_ok_and(|r| r.contains(&format!("iif lo lookup {table}"))) {
            gone.push("capture rule");
        }
        // The table's `local default`, there from install on: not one of
        // the prefix routes, since one whose line failed in an apply would
        // have the whole capture installed again every 10 s.
        let listed = ["-4", "route", "show", "table", &table, "exact", "0.0.0.0/0"];
        if !output("ip", &listed)
            .await
            .is_ok_and(|r| r.contains("local"))
        {
            gone.push("capture routes");
        }
        let addr = output("ip", &["-4", "addr", "show", "dev", "lo"]).await;
        let here = format!("inet {}/32", cfg.redirect_address);
        if !addr.is_ok_and(|a| a.contains(&here)) {
            gone.push("capture address");
        }
        // The IPv6 refusal's chains, when they were on the node (the
        // table's deletion takes them too, but they can go alone).
        if self.refuse6.installed {
            for chain in ["v6_fwd", "v6_out"] {
                let listed = ["list", "chain", "inet", cfg.nft_table.as_str(), chain];
                if output("nft", &listed).await.is_err() {
                    gone.push("IPv6 refusal");
                    break;
                }
            }
        }
        gone
    }

    /// Installs everything again when [`Capture::missing`] finds a piece
    /// gone, forgetting what was applied, so that the caller's next
    /// `apply*` calls put every prefix, source and Service back. Returns
    /// whether it did.
    /// A capture that never got on the node ([`Capture::uninstalled`]) is
    /// tried again here, and so is an IPv6 refusal asked for
    /// ([`Capture::refuse_ipv6`]) whose install failed, when nothing else
    /// is missing (not counted as a repair: `false`; the next `apply*`
    /// calls fill its sets).
    ///
    /// An install that fails leaves nothing on the node, and the capture
    /// then says so ([`Capture::is_installed`] false, as
    /// [`Capture::uninstalled`]) rather than still counting the prefixes
    /// it had.
    pub async fn repair(&mut self) -> Result<bool, CaptureError> {
        let first = !self.is_installed();
        if !first {
            let gone = self.missing().await;
            if gone.is_empty() {
                // All there, but an IPv6 refusal whose install failed is
                // tried again (once per repair; capture goes on without).
                self.retry_refusal6().await;
                return Ok(false);
            }
            warn!(
                ?gone,
                "capture was removed by something else on this node (an nftables or networkd restart?); installing it again"
            );
        }
        match Capture::install(self.cfg.clone()).await {
            Ok(c) => {
                *self = c;
                if first {
                    info!("capture installed (its first install had failed)");
                }
                Ok(true)
            }
            Err(e) => {
                *self = Capture::uninstalled(self.cfg.clone());
                Err(e)
            }
        }
    }
}
