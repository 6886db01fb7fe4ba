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
//! object. It tells a repeat by type, reason, action, reporter and object,
//! not by the note, so a rejection's reason goes into the action: another
//! rejection of the same node is a new Event with its own note, not a
//! repeat of the first. Notes are cut to [`NOTE_LIMIT`] bytes, as the
//! apiserver refuses longer ones.

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

/// Whether `node`'s [`CONDITION_TYPE`] condition says `True` (as stored:
/// whoever wrote it, however long ago).
pub fn says_ready(node: &Node) -> bool {
    node.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| {
            cs.iter()
                .any(|c| c.type_ == CONDITION_TYPE && c.status == "True")
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
/// `lastTransitionTime`. Needs `patch nodes/status`. The memory holds only
/// while this writer is the node's only one: when another may have
/// written it meanwhile (the relay replicas' set changed, and with it
/// which replica writes which node), [`StatusWriter::forget_all`].
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

    /// Forgets what was written for every node: each node's next
    /// [`StatusWriter::set`] reads its Node again. Needed whenever another
    /// writer may have written the nodes since (another replica writes a
    /// node while it is in the set): what this one last wrote may no longer
    /// be what the Node says, and a write equal to it would be skipped (a
    /// node left `True` while its tunnel is down).
    pub fn forget_all(&self) {
        let mut g = self.last.lock().unwrap_or_else(|p| p.into_inner());
        g.clear();
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

/// Longest Event note kube-apiserver accepts, in bytes (events.k8s.io/v1
/// validation, `NoteLengthLimit`): a longer one is refused with 422 and the
/// Event is lost, so notes are cut to it.
pub const NOTE_LIMIT: usize = 1024;

/// Longest Event action kube-apiserver accepts, in bytes.
pub const ACTION_LIMIT: usize = 128;

/// `text` cut to at most `max` bytes at a char boundary, ending in `…`
/// when cut (a note may carry a node's whole allowed prefix list).
fn clip(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    const MORE: &str = "…";
    let mut end = max.saturating_sub(MORE.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}{MORE}", &text[..end])
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
    /// A hello (or certificate request) from this node was refused.
    Rejected {
        /// The rejection reason's stable name (`RejectReason::as_str`,
        /// e.g. `route_not_allowed`): the Event's action, so rejections
        /// for different reasons are different Events (`Reject` if empty).
        reason: String,
        /// Stable detail, e.g. the rejection message.
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
            SessionEvent::Rejected { reason, note } => (
                EventType::Warning,
                "EdgeSessionRejected",
                if reason.is_empty() { "Reject" } else { reason },
                note,
            ),
        };
        Event {
            type_,
            reason: reason.to_string(),
            note: Some(clip(note, NOTE_LIMIT)),
            action: clip(action, ACTION_LIMIT),
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
    fn only_our_condition_saying_true_is_ready() {
        use k8s_openapi::api::core::v1::NodeStatus;
        let with = |type_: &str, status: &str| Node {
            status: Some(NodeStatus {
                conditions: Some(vec![NodeCondition {
                    type_: type_.into(),
                    status: status.into(),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert!(says_ready(&with(CONDITION_TYPE, "True")));
        assert!(!says_ready(&with(CONDITION_TYPE, "False")));
        assert!(!says_ready(&with("Ready", "True")));
        assert!(!says_ready(&Node::default()));
    }

    #[test]
    fn session_events_map_to_reasons() {
        let e = SessionEvent::Rejected {
            reason: "route_not_allowed".into(),
            note: "routes not owned".into(),
        }
        .to_event();
        assert_eq!(e.reason, "EdgeSessionRejected");
        assert_eq!(e.action, "route_not_allowed");
        assert_eq!(e.type_, EventType::Warning);
        let e = SessionEvent::Rejected {
            reason: String::new(),
            note: String::new(),
        }
        .to_event();
        assert_eq!(e.action, "Reject");
        let e = SessionEvent::Up { note: "up".into() }.to_event();
        assert_eq!(
            (e.action.as_str(), e.note.as_deref()),
            ("Connect", Some("up"))
        );
    }

    #[test]
    fn notes_are_cut_to_the_apiservers_limit_at_a_char_boundary() {
        let exact = "a".repeat(NOTE_LIMIT);
        assert_eq!(clip(&exact, NOTE_LIMIT), exact);
        let long = format!("route_not_allowed: {}", "10.1.2.0/24, ".repeat(200));
        let cut = clip(&long, NOTE_LIMIT);
        assert_eq!(cut.len(), NOTE_LIMIT);
        assert!(cut.ends_with('…') && long.starts_with(cut.trim_end_matches('…')));
        // Multi-byte characters across the cut, at every offset: never
        // split, never over.
        for lead in 0..4 {
            let text = format!("{}{}", "x".repeat(lead), "é€😀".repeat(200));
            let cut = clip(&text, NOTE_LIMIT);
            assert!(cut.len() <= NOTE_LIMIT && cut.len() > NOTE_LIMIT - 4 - 3);
            assert!(cut.ends_with('…'));
            assert!(text.starts_with(cut.trim_end_matches('…')));
        }
        let e = SessionEvent::Rejected {
            reason: "r".repeat(200),
            note: "😀".repeat(NOTE_LIMIT),
        }
        .to_event();
        assert!(e.note.is_some_and(|n| n.len() <= NOTE_LIMIT));
        assert!(e.action.len() <= ACTION_LIMIT);
    }
}
