//! Not API: the resolver's decision on one query, without sockets, for
//! the `dns` fuzz target (`fuzz/fuzz_targets/dns.rs`).
//!
//! The target drives the very function the UDP and TCP loops call
//! (`server::handle`, with its FORMERR, BADVERS, NOTIMP, truncation and
//! encoding steps) and, for a forward, what a failed one answers, rather
//! than a copy of them that drifts as the server changes. Nothing here
//! runs in the resolver itself.

use std::sync::Arc;
use std::time::Duration;

use hickory_proto::op::Message;
use tokio::sync::{watch, Semaphore};

use super::server::{self, DnsStats, Handled, Shared};
use super::zone::Zone;

/// What the resolver does with one query.
#[derive(Debug)]
pub enum Decision {
    /// Sends these bytes back.
    Reply(Vec<u8>),
    /// Forwards the query bytes as they came; `failed` is what the client
    /// gets if the upstream cannot be asked (the fallback answer, else
    /// SERVFAIL; `None`: nothing).
    Forward {
        /// The parsed query.
        query: Box<Message>,
        /// The answer when the forward fails.
        failed: Option<Vec<u8>>,
    },
    /// Sends nothing.
    Drop,
}

/// The query handling of a resolver answering from `zone` (none: every
/// query forwarded, as before the first table).
pub struct Handler {
    shared: Shared,
}

impl Handler {
    /// A handler with `zone` as its table; the forwarding settings are
    /// never used (nothing is sent).
    pub fn new(zone: Option<Zone>) -> Handler {
        Handler {
            shared: Shared {
                zone: watch::Sender::new(zone.map(Arc::new)),
                upstream: ([127, 0, 0, 1], 53).into(),
                forward_timeout: Duration::from_secs(2),
                forwards: Arc::new(Semaphore::new(1)),
                stats: Arc::new(DnsStats::default()),
                clients: std::sync::RwLock::new(None),
            },
        }
    }

    /// The decision on `bytes` as a datagram (`udp`: cut to the client's
    /// size) or a TCP message.
    pub fn handle(&self, bytes: &[u8], udp: bool) -> Decision {
        match server::handle(&self.shared, bytes, udp) {
            Handled::Reply(b) => Decision::Reply(b),
            Handled::Drop => Decision::Drop,
            Handled::Forward(query, fallback) => {
                let failed = server::failed_answer(&query, fallback);
                Decision::Forward { query, failed }
            }
        }
    }

    /// The counters the decisions moved.
    pub fn stats(&self) -> &DnsStats {
        &self.shared.stats
    }
}
