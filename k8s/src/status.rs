//! Telling operators about tunnels where they already look: the Node
//! condition `EdgeTunnelReady` (`kubectl get node -o wide`, `describe`) and
//! Events on the Node.
//!
//! The condition is written with **server-side apply** on `nodes/status`
//! under field manager [`FIELD_MANAGER`]: Node conditions are a list map
//! keyed by `type`, so our apply owns exactly our condition and can never
//! clobber the kubelet's `Ready` (a read-modify-write PUT could, racing the
//! kubelet). Writes are skipped when nothing changed, and
//! `lastTransitionTime` only moves when the status does, as for every
//! built-in condition.
//!
//! Events go through kube-runtime's `Recorder` (events.k8s.io/v1), which
//! turns a repeat of the same event into a `series` patch instead of a new
//! object.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, NodeCondition, ObjectReference};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::Api;
use serde_json::json;

use crate::{bounded, KubeClient, KubeError};

/// Field manager for everything edge-relay writes.
pub const FIELD_MANAGER: &str = "edge-relay";
/// The Node condition type edge-relay owns.
pub const CONDITION_TYPE: &str = "EdgeTunnelReady";

/// What the condition should say.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TunnelCondition {
    /// True when the node has a live tunnel session.
    pub ready: bool,
    /// CamelCase reason, e.g. `SessionUp`, `NoSession`.
    pub reason: String,
    /// Human-readable detail. Keep it stable (no timestamps, counters):
    /// any difference is a write.
    pub message: String,
}

/// Whether [`StatusWriter::set`] wrote.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum WriteOutcome {
    /// The condition was applied.
    Written,
    /// The condition already said this; no request was made.
    Unchanged,
}

/// The condition to apply given the current one, or `None` if the current
/// one already says `desired`. `lastTransitionTime` is kept unless the
/// status changes.
pub fn next_condition(
    existing: Option<&NodeCondition>,
    desired: &TunnelCondition,
    now: Time,
) -> Option<NodeCondition> {
    let status = if desired.ready { "True" } else { "False" };
    if let Some(e) = existing {
        if e.status == status
            && e.reason.as_deref() == Some(desired.reason.as_str())
            && e.message.as_deref() == Some(desired.message.as_str())
        {
            return None;
        }
    }
    let transition = match existing {
        Some(e) if e.status == status => e.last_transition_time.clone().or(Some(now)),
        _ => Some(now),
    };
    Some(NodeCondition {
        type_: CONDITION_TYPE.to_string(),
        status: status.to_string(),
        reason: Some(desired.reason.clone()),
        message: Some(desired.message.clone()),
        last_transition_time: transition,
        last_heartbeat_time: None,
    })
}

fn now() -> Time {
    Time(k8s_openapi::jiff::Timestamp::now())
}

/// Writes the `EdgeTunnelReady` condition on Nodes.
///
/// Remembers what it last wrote per node, so repeated identical calls make
/// no request; on first use for a node it reads the Node's status once
/// (needs `get nodes/status`), so a restarted relay keeps the existing
/// `lastTransitionTime`. Needs `patch nodes/status`.
pub struct StatusWriter {
    api: Api<Node>,
    timeout: Duration,
    last: Mutex<HashMap<String, NodeCondition>>,
}

impl StatusWriter {
    /// A writer whose every API call is bounded by `timeout`.
    pub fn new(client: &KubeClient, timeout: Duration) -> StatusWriter {
        StatusWriter {
            api: Api::all(client.0.clone()),
            timeout,
            last: Mutex::new(HashMap::new()),
        }
    }

    fn cached(&self, node: &str) -> Option<NodeCondition> {
        let g = self.last.lock().unwrap_or_else(|p| p.into_inner());
        g.get(node).cloned()
    }

    /// Forgets what was written for `node` (the next [`StatusWriter::set`]
    /// reads the Node again), e.g. after the Node was recreated.
    pub fn forget(&self, node: &str) {
        let mut g = self.last.lock().unwrap_or_else(|p| p.into_inner());
        g.remove(node);
    }

    /// Makes the condition on `node` say `desired`, applying only if it
    /// differs from what the Node has.
    pub async fn set(
        &self,
        node: &str,
        desired: &TunnelCondition,
    ) -> Result<WriteOutcome, KubeError> {
        let existing = match self.cached(node) {
            Some(c) => Some(c),
            None => {
                let n = match bounded("get node status", self.timeout, self.api.get_status(node))
                    .await
                {
                    Ok(n) => n,
                    Err(KubeError::Api {
                        status: Some(404), ..
                    }) => {
                        return Err(KubeError::NotFound {
                            kind: "Node",
                            name: node.to_string(),
                        })
                    }
                    Err(e) => return Err(e),
                };
                n.status
                    .and_then(|s| s.conditions)
                    .and_then(|cs| cs.into_iter().find(|c| c.type_ == CONDITION_TYPE))
            }
        };
        let Some(next) = next_condition(existing.as_ref(), desired, now()) else {
            if let Some(c) = existing {
                let mut g = self.last.lock().unwrap_or_else(|p| p.into_inner());
                g.insert(node.to_string(), c);
            }
            return Ok(WriteOutcome::Unchanged);
        };
        let patch = json!({
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": node},
            "status": {"conditions": [next]},
        });
        // force: the condition is ours alone; without it a stale owner
        // record (e.g. an old manager name) would block us forever.
        let params = PatchParams::apply(FIELD_MANAGER).force();
        match bounded(
            "apply node status",
            self.timeout,
            self.api.patch_status(node, &params, &Patch::Apply(&patch)),
        )
        .await
        {
            Ok(_) => {}
            Err(KubeError::Api {
                status: Some(404), ..
            }) => {
                self.forget(node);
                return Err(KubeError::NotFound {
                    kind: "Node",
                    name: node.to_string(),
                });
            }
            Err(e) => {
                // We no longer know what the Node says: read it next time.
                self.forget(node);
                return Err(e);
            }
        }
        let mut g = self.last.lock().unwrap_or_else(|p| p.into_inner());
        g.insert(node.to_string(), next);
        Ok(WriteOutcome::Written)
    }
}

/// A tunnel session event on a Node.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum SessionEvent {
    /// A session came up.
    Up {
        /// Stable detail, e.g. `tunnel up over quic`.
        note: String,
    },
    /// The session ended.
    Down {
        /// Stable detail, e.g. `idle timeout`.
        note: String,
    },
    /// A hello from this node was refused.
    Rejected {
        /// Stable detail, e.g. the rejection reason.
        note: String,
    },
}

impl SessionEvent {
    fn to_event(&self) -> Event {
        let (type_, reason, action, note) = match self {
            SessionEvent::Up { note } => (EventType::Normal, "EdgeSessionUp", "Connect", note),
            SessionEvent::Down { note } => {
                (EventType::Warning, "EdgeSessionDown", "Disconnect", note)
            }
            SessionEvent::Rejected { note } => {
                (EventType::Warning, "EdgeSessionRejected", "Reject", note)
            }
        };
        Event {
            type_,
            reason: reason.to_string(),
            note: Some(note.clone()),
            action: action.to_string(),
            secondary: None,
        }
    }
}

/// Publishes [`SessionEvent`]s on Nodes (events.k8s.io/v1, namespace
/// `default` as for every cluster-scoped object). Needs `create` and
/// `patch` on `events.events.k8s.io`.
pub struct SessionEvents {
    recorder: Recorder,
    timeout: Duration,
}

impl SessionEvents {
    /// Events reported as controller [`FIELD_MANAGER`], instance `instance`
    /// (the relay's pod name).
    pub fn new(client: &KubeClient, instance: Option<String>, timeout: Duration) -> SessionEvents {
        let reporter = Reporter {
            controller: FIELD_MANAGER.to_string(),
            instance,
        };
        SessionEvents {
            recorder: Recorder::new(client.0.clone(), reporter),
            timeout,
        }
    }

    /// Publishes `event` on Node `node`. The reference's uid is the node
    /// name, as the kubelet does for its Node events, so `kubectl describe
    /// node` lists them.
    pub async fn publish(&self, node: &str, event: &SessionEvent) -> Result<(), KubeError> {
        let reference = ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Node".into()),
            name: Some(node.to_string()),
            uid: Some(node.to_string()),
            ..Default::default()
        };
        bounded(
            "publish event",
            self.timeout,
            self.recorder.publish(&event.to_event(), &reference),
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::jiff::Timestamp;

    fn t(s: i64) -> Time {
        Time(Timestamp::from_second(s).unwrap())
    }

    fn want(ready: bool, reason: &str) -> TunnelCondition {
        TunnelCondition {
            ready,
            reason: reason.into(),
            message: format!("{reason} message"),
        }
    }

    #[test]
    fn first_write_sets_transition_time() {
        let c = next_condition(None, &want(true, "SessionUp"), t(100)).unwrap();
        assert_eq!(c.type_, CONDITION_TYPE);
        assert_eq!(c.status, "True");
        assert_eq!(c.last_transition_time, Some(t(100)));
    }

    #[test]
    fn same_condition_is_no_write() {
        let c = next_condition(None, &want(true, "SessionUp"), t(100)).unwrap();
        assert_eq!(
            next_condition(Some(&c), &want(true, "SessionUp"), t(200)),
            None
        );
    }

    #[test]
    fn transition_time_moves_only_with_status() {
        let c = next_condition(None, &want(true, "SessionUp"), t(100)).unwrap();
        // Same status, different reason: written, transition time kept.
        let c2 = next_condition(Some(&c), &want(true, "SessionMoved"), t(200)).unwrap();
        assert_eq!(c2.last_transition_time, Some(t(100)));
        // Status flips: transition time moves.
        let c3 = next_condition(Some(&c2), &want(false, "NoSession"), t(300)).unwrap();
        assert_eq!(c3.status, "False");
        assert_eq!(c3.last_transition_time, Some(t(300)));
    }

    #[test]
    fn session_events_map_to_reasons() {
        let e = SessionEvent::Rejected {
            note: "routes not owned".into(),
        }
        .to_event();
        assert_eq!(e.reason, "EdgeSessionRejected");
        assert_eq!(e.type_, EventType::Warning);
    }
}
