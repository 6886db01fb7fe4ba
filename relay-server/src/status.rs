//! What operators see about sessions outside the relay's own API: in
//! Kubernetes, the `EdgeTunnelReady` condition on each Node and Events
//! (see [`crate::k8s`]); in static mode, nothing beyond logs and metrics.
//!
//! The session code reports through [`StatusSink`] and never waits for it:
//! an implementation queues (bounded) and writes in the background, so a
//! slow or unreachable API never delays a handshake.

use std::net::SocketAddr;
use std::time::SystemTime;

use relay_protocol::Cidr;

/// A session as the condition's message describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionInfo {
    /// `quic` or `tcp`.
    pub transport: &'static str,
    /// The relay replica holding the session.
    pub relay_id: String,
    /// When the session was registered.
    pub since: SystemTime,
    /// The edge's address as the relay sees it.
    pub remote: SocketAddr,
    /// Host addresses the node shares with another node (not routed).
    pub ambiguous: Vec<Cidr>,
    /// Served prefixes the relay node does not capture (IPv6: capture is
    /// IPv4 only); reachable through CONNECT.
    pub not_captured: Vec<Cidr>,
}

/// The served prefixes that capture leaves out: every IPv6 prefix when
/// capture is on (it is IPv4 only), none when capture is off.
pub fn not_captured(served: &[Cidr], capture_on: bool) -> Vec<Cidr> {
    if !capture_on {
        return Vec::new();
    }
    served
        .iter()
        .filter(|c| c.addr().is_ipv6())
        .copied()
        .collect()
}

impl SessionInfo {
    /// The one-line message operators read in `kubectl describe node`.
    pub fn message(&self) -> String {
        let mut m = format!(
            "tunnel up over {} via relay {} since {} (edge at {})",
            self.transport,
            self.relay_id,
            humantime::format_rfc3339_seconds(self.since),
            self.remote
        );
        if !self.ambiguous.is_empty() {
            let list: Vec<String> = self.ambiguous.iter().map(ToString::to_string).collect();
            m.push_str(&format!(
                "; host addresses shared with another node are not routed by address (reach this node by name): {}",
                list.join(", ")
            ));
        }
        if !self.not_captured.is_empty() {
            let list: Vec<String> = self.not_captured.iter().map(ToString::to_string).collect();
            m.push_str(&format!(
                "; IPv6 capture is not supported: these prefixes are reachable through CONNECT only: {}",
                list.join(", ")
            ));
        }
        m
    }
}

/// Where session comings and goings are reported.
pub trait StatusSink: Send + Sync + 'static {
    /// A session of `node` is up.
    fn up(&self, node: &str, info: &SessionInfo);
    /// The session of `node` ended and no newer one replaced it.
    fn down(&self, node: &str, why: &str);
    /// A handshake claiming to be `node` was refused.
    fn rejected(&self, node: &str, reason: &str, message: &str);
}

/// Static mode: nothing to write.
pub struct NoStatus;

impl StatusSink for NoStatus {
    fn up(&self, _: &str, _: &SessionInfo) {}
    fn down(&self, _: &str, _: &str) {}
    fn rejected(&self, _: &str, _: &str, _: &str) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_message_names_transport_replica_time_and_ambiguity() {
        let mut i = SessionInfo {
            transport: "quic",
            relay_id: "relay-a".into(),
            since: SystemTime::UNIX_EPOCH,
            remote: "203.0.113.7:4433".parse().unwrap(),
            ambiguous: vec![],
            not_captured: vec![],
        };
        assert_eq!(
            i.message(),
            "tunnel up over quic via relay relay-a since 1970-01-01T00:00:00Z (edge at 203.0.113.7:4433)"
        );
        i.ambiguous = vec!["192.168.1.10/32".parse().unwrap()];
        assert!(i
            .message()
            .ends_with("(reach this node by name): 192.168.1.10/32"));
    }
}
