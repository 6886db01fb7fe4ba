//! Keeps the conntrack entries of captured UDP flows while the flows live.
//!
//! A captured flow's replies leave from the capture address and are
//! un-NATed back to the original destination (a ClusterIP:port) only by
//! the flow's conntrack entry. Others delete such entries: kube-proxy's
//! stale-entry cleanup (`CleanStaleEntries`, run whenever any UDP
//! Service's endpoints change anywhere in the cluster) deletes every UDP
//! entry whose original destination is a UDP Service port and whose reply
//! source is not one of its serving endpoints, and the capture address
//! never is. Without the entry our next reply would leave un-NATed and
//! make an entry of its own, with which the client's next datagram
//! collides: the kernel remaps its source port, the endpoint sees a new
//! 5-tuple and the old flow is black-holed. (The capture table's
//! `unnated` chain drops such a reply on its way out, so until the entry
//! is back replies are lost rather than sent from the capture address.)
//!
//! So a socket subscribed to conntrack's destroy events watches for the
//! end of entries whose reply source port is the capture port; when one
//! belongs to a flow still open ([`LiveFlows`]), the entry is created
//! again at once, as the capture's DNAT made it (same original tuple, NAT
//! to the same address, the status bits and the time left it would have
//! had). If a reply of ours already made the bogus un-NATed entry, that
//! is deleted first; if the client's next datagram already re-created the
//! right entry, nothing is needed (see `Keeper::ensure` for what else can
//! be in the way). Entries of flows that have ended (natural expiry:
//! captured flows end before their entries) and the entries of flows
//! older than the capture's own deletion of a service port's entries (its
//! capture changed, and those flows must take their new way:
//! [`crate::conntrack::capture_deleted`]) are left alone. When events were
//! lost (the socket overflowed), every open flow's entry is checked
//! instead. The kernel reports the deletions made from this socket back
//! to it too (the event carries the requester's port): those are dropped,
//! so the repairs never feed themselves. An entry of the flow's original
//! tuple that is translated elsewhere (kube-proxy's DNAT to an endpoint:
//! the capture of that Service ended) is never touched: the flow has
//! moved on.

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddrV4;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::warn;

use crate::conntrack::{
    capture_deleted, create_request, delete_request, get_orig_request, is_destroy_event, messages,
    parse_answer, parse_entry, Conntrack, Entry, Tuple, IPS_ASSURED, IPS_DYING, IPS_SEEN_REPLY,
    LOOKUP_TIMEOUT,
};
use crate::udp::UdpStats;

/// Destroy events read while waiting for an answer, kept to be handled
/// next; more than this counts as events lost.
const MAX_PENDING: usize = 4096;

/// Attempts to create one entry (each after clearing what collided, or
/// after [`DYING_WAIT`] for the deleted entry to leave the table).
const MAX_ATTEMPTS: usize = 8;

/// How long to wait for an entry being deleted to leave the table: the
/// kernel reports the destroy event before it unlinks the entry, so a
/// create on the event's heels can find the dying entry in the way.
const DYING_WAIT: Duration = Duration::from_millis(2);

/// The least time between two checks of every open flow (after lost
/// events).
const RESYNC_EVERY: Duration = Duration::from_secs(1);

/// One open captured flow, as the keeper needs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct LiveFlow {
    /// The client's address.
    pub(crate) client: SocketAddrV4,
    /// The capture address its packets arrive on (the DNAT target).
    pub(crate) here: SocketAddrV4,
    /// Its original destination, once conntrack told it.
    pub(crate) dst: Option<SocketAddrV4>,
    /// How long since its last packet, either way.
    pub(crate) quiet: Duration,
    /// How long since its first packet.
    pub(crate) age: Duration,
    /// Whether replies went out (conntrack's `IPS_SEEN_REPLY`).
    pub(crate) replied: bool,
    /// Whether the flow is a stream (conntrack's `IPS_ASSURED`).
    pub(crate) stream: bool,
}

/// The capture's open flows.
pub(crate) trait LiveFlows: Send + Sync + 'static {
    /// The flow of `client` on `here`, if open and not past its idle bound.
    fn get(&self, client: SocketAddrV4, here: SocketAddrV4) -> Option<LiveFlow>;
    /// Every such flow.
    fn all(&self) -> Vec<LiveFlow>;
}

/// What one repair did.
#[derive(Debug, PartialEq, Eq)]
enum Repair {
    /// The entry was created again.
    Created,
    /// The right entry was there already.
    Present,
    /// The flow's original tuple is translated elsewhere now (not to the
    /// capture address): left alone, the flow has moved on.
    Moved,
}

/// The keeper's socket: requests and destroy events on one socket, so
/// the deletions it makes are not reported to it.
struct Keeper {
    ct: Conntrack,
    /// The capture port: only entries whose reply source has it matter.
    port: u16,
    pending: VecDeque<Entry>,
    /// Events were lost since the last full check.
    lost: bool,
    buf: Vec<u8>,
}

/// What the event socket gave.
enum Event {
    Destroyed(Entry),
    Lost,
}

impl Keeper {
    /// Takes the destroy events of a datagram into `pending` and returns
    /// the answer to request `seq`, if the datagram holds it.
    fn take(&mut self, n: usize, seq: Option<u32>) -> Option<io::Result<Option<Entry>>> {
        let mut answer = None;
        for (h, msg) in messages(&self.buf[..n]) {
            // Our own deletions come back as events with our port.
            if is_destroy_event(h.kind) && h.port != self.ct.port() {
                let Some(e) = parse_entry(msg) else { continue };
                if e.reply.src.port() != self.port {
                    continue;
                }
                if self.pending.len() >= MAX_PENDING {
                    self.lost = true;
                } else {
                    self.pending.push_back(e);
                }
            } else if seq == Some(h.seq) && h.port == self.ct.port() && answer.is_none() {
                answer = Some(parse_answer(h.kind, msg));
            }
        }
        answer
    }

    /// The next destroy event of interest.
    async fn next(&mut self) -> io::Result<Event> {
        loop {
            if self.lost {
                self.lost = false;
                return Ok(Event::Lost);
            }
            if let Some(e) = self.pending.pop_front() {
                return Ok(Event::Destroyed(e));
            }
            let mut buf = std::mem::take(&mut self.buf);
            let r = self.ct.recv_datagram(&mut buf).await;
            self.buf = buf;
            match r {
                Ok((n, 0)) => {
                    self.take(n, None);
                }
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(nix::libc::ENOBUFS) => self.lost = true,
                Err(e) => return Err(e),
            }
        }
    }

    /// Sends `req` (built with sequence number `seq`) and waits for its
    /// answer, keeping the events read meanwhile; bounded by
    /// [`LOOKUP_TIMEOUT`].
    async fn call(&mut self, req: &[u8], seq: u32) -> io::Result<Option<Entry>> {
        self.ct.send(req).await?;
        let deadline = tokio::time::Instant::now() + LOOKUP_TIMEOUT;
        loop {
            let mut buf = std::mem::take(&mut self.buf);
            let r = tokio::time::timeout_at(deadline, self.ct.recv_datagram(&mut buf)).await;
            self.buf = buf;
            match r {
                Err(_) => {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "conntrack request timed out",
                    ))
                }
                // Only the kernel speaks from port 0.
                Ok(Ok((n, 0))) => {
                    if let Some(a) = self.take(n, Some(seq)) {
                        return a;
                    }
                }
                Ok(Ok(_)) => {}
                // Events (or our answer) were lost: the caller's
                // timeout bounds the wait, a full check follows.
                Ok(Err(e)) if e.raw_os_error() == Some(nix::libc::ENOBUFS) => self.lost = true,
                Ok(Err(e)) => return Err(e),
            }
        }
    }

    /// Makes sure the entry `orig` (client → original destination),
    /// NATed to `here`, exists: creates it (for `timeout_secs`, with
    /// `status`'s reply bits), clearing what is in the way, and checks
    /// what was made.
    ///
    /// In the way can be: the deleted entry itself, not yet unlinked (the
    /// kernel reports the destroy event first): waited for. A bogus
    /// un-NATed entry, its original tuple the capture address → the
    /// client, made by a reply of ours that left while no entry un-NATed
    /// it: deleted before the create, since the kernel does not refuse a
    /// create whose reply tuple it holds but gives the new entry another
    /// source port (so the entry is read back, and one with another reply
    /// tuple is deleted and made again); and deleted after it too, since a
    /// reply in flight during the create is confirmed beside the new
    /// entry as a clash entry that packets may find first. An entry the
    /// client's next datagram made (DNATed again): kept.
    async fn ensure(
        &mut self,
        orig: Tuple,
        here: SocketAddrV4,
        timeout_secs: u32,
        status: u32,
    ) -> io::Result<Repair> {
        let want_reply = Tuple {
            src: here,
            dst: orig.src,
        };
        let mut created = false;
        for _ in 0..MAX_ATTEMPTS {
            self.clear_bogus(want_reply).await?;
            let seq = self.ct.next_seq();
            let req = create_request(orig, here, timeout_secs, status, seq);
            match self.call(&req, seq).await {
                Ok(_) => created = true,
                // Something holds the original tuple: read below.
                Err(e) if e.raw_os_error() == Some(nix::libc::EEXIST) => {}
                Err(e) => return Err(e),
            }
            let seq = self.ct.next_seq();
            let found = match self.call(&get_orig_request(orig, seq), seq).await {
                Ok(Some(e)) => Some(holder(&e, want_reply)),
                Ok(None) => None,
                Err(e) if e.raw_os_error() == Some(nix::libc::ENOENT) => None,
                Err(e) => return Err(e),
            };
            match found {
                Some(Holder::Dying) => tokio::time::sleep(DYING_WAIT).await,
                Some(Holder::Ours) => {
                    if !created {
                        // There already (the client's datagram made it):
                        // no insert of ours for a reply to clash with. No
                        // wait either, which a check of every open flow
                        // (after lost events) would pay per flow.
                        return Ok(Repair::Present);
                    }
                    // A reply that was on its way while the entry was made.
                    tokio::time::sleep(DYING_WAIT).await;
                    self.clear_bogus(want_reply).await?;
                    return Ok(Repair::Created);
                }
                Some(Holder::Elsewhere) => return Ok(Repair::Moved),
                Some(Holder::Remapped) => self.delete(orig).await?,
                None => {}
            }
            created = false;
        }
        Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            "conntrack entry kept colliding",
        ))
    }

    /// Deletes the entries whose original tuple is `bogus` (the capture
    /// address → a client: only our un-NATed replies make them), leaving
    /// the flow's own entry, whose reply tuple it is: a lookup by the tuple
    /// finds either, so each is read before it is deleted.
    async fn clear_bogus(&mut self, bogus: Tuple) -> io::Result<()> {
        for _ in 0..MAX_ATTEMPTS {
            let seq = self.ct.next_seq();
            match self.call(&get_orig_request(bogus, seq), seq).await {
                Ok(Some(e)) if e.orig == bogus => self.delete(bogus).await?,
                Ok(_) => return Ok(()),
                Err(e) if e.raw_os_error() == Some(nix::libc::ENOENT) => return Ok(()),
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Deletes the entry whose original tuple is `orig`; none is fine.
    async fn delete(&mut self, orig: Tuple) -> io::Result<()> {
        let seq = self.ct.next_seq();
        match self.call(&delete_request(orig, seq), seq).await {
            Err(e) if e.raw_os_error() == Some(nix::libc::ENOENT) => Ok(()),
            r => r.map(|_| ()),
        }
    }
}

/// What holds a flow's original tuple, as [`holder`] reads it.
#[derive(Debug, PartialEq, Eq)]
enum Holder {
    /// The entry whose destroy event is being answered, not yet unlinked:
    /// it goes by itself, ours is made next time.
    Dying,
    /// The flow's own entry, translated to the capture address for the
    /// client's own port.
    Ours,
    /// Translated to the capture address for another client port (the
    /// kernel remapped it around a bogus entry): it goes, so the next
    /// attempt (or the client's next datagram) makes one that leads back
    /// to the client's own port.
    Remapped,
    /// Translated elsewhere (kube-proxy's DNAT to an endpoint: the
    /// Service is no longer captured here): not ours to delete or replace.
    Elsewhere,
}

/// Which [`Holder`] `e`, the entry holding a flow's original tuple, is,
/// for a flow whose entry's reply tuple must be `want`.
fn holder(e: &Entry, want: Tuple) -> Holder {
    if e.status & IPS_DYING != 0 {
        Holder::Dying
    } else if e.reply == want {
        Holder::Ours
    } else if e.reply.src == want.src {
        Holder::Remapped
    } else {
        Holder::Elsewhere
    }
}

/// The entry timeout to create a flow's entry with: what the kernel would
/// have left it, `timeout` (by its status) after the flow's last packet;
/// at least a second.
fn time_left(timeouts: (Duration, Duration), status: u32, quiet: Duration) -> u32 {
    let full = if status & IPS_ASSURED != 0 {
        timeouts.1
    } else {
        timeouts.0
    };
    full.saturating_sub(quiet).as_secs_f64().ceil().max(1.0) as u32
}

/// The status bits of an entry for `f` without an event to copy them from.
fn status_of(f: &LiveFlow) -> u32 {
    let mut s = 0;
    if f.replied {
        s |= IPS_SEEN_REPLY;
    }
    if f.stream {
        s |= IPS_ASSURED;
    }
    s
}

/// What to re-create for a destroyed entry `e`: the open flow it belongs
/// to, if any and if its entry is to be kept; `None` for entries of ended
/// flows, entries not translated to the capture address, and entries the
/// capture deleted on purpose.
fn to_restore(e: &Entry, flows: &dyn LiveFlows) -> Option<LiveFlow> {
    // The capture's DNAT: replies come from the capture address, not from
    // the original destination.
    if e.orig.dst == e.reply.src || e.orig.src != e.reply.dst {
        return None;
    }
    let f = flows.get(e.reply.dst, e.reply.src)?;
    if f.dst.is_some_and(|d| d != e.orig.dst) || capture_deleted(e.orig.dst, f.age) {
        return None;
    }
    Some(f)
}

/// Keeps the conntrack entries of the open captured flows on capture port
/// `port` (see the module docs) until `stop`; `timeouts` are conntrack's
/// UDP timeouts (before a stream, a stream). Entries created again are
/// counted in `stats.conntrack_restored`, failures in
/// `stats.conntrack_restore_failed`.
pub(crate) async fn keep_entries(
    flows: Arc<dyn LiveFlows>,
    port: u16,
    timeouts: (Duration, Duration),
    stats: Arc<UdpStats>,
    stop: tokio_util::sync::CancellationToken,
) {
    let ct = match Conntrack::subscribe_destroy() {
        Ok(ct) => ct,
        Err(e) => {
            warn!(error = %e, "cannot watch conntrack: captured UDP flows will not survive a deletion of their entries (kube-proxy's cleanup)");
            return;
        }
    };
    // 0: the kernel makes no conntrack events in this network namespace
    // (1, or 2 as by default: made while someone listens, as we do now).
    if std::fs::read_to_string("/proc/sys/net/netfilter/nf_conntrack_events")
        .is_ok_and(|v| v.trim() == "0")
    {
        warn!("net.netfilter.nf_conntrack_events is 0: no conntrack destroy events, so captured UDP flows will not survive a deletion of their entries (kube-proxy's cleanup); set it to 2 (the kernel's default) or 1");
    }
    let mut k = Keeper {
        ct,
        port,
        pending: VecDeque::new(),
        lost: false,
        buf: vec![0u8; 64 * 1024],
    };
    let mut last_resync: Option<Instant> = None;
    loop {
        let ev = tokio::select! {
            _ = stop.cancelled() => return,
            ev = k.next() => ev,
        };
        // Whether this is a check of every open flow (after lost events).
        let mut full = false;
        let work: Vec<(Tuple, LiveFlow, u32)> = match ev {
            Ok(Event::Destroyed(e)) => match to_restore(&e, &*flows) {
                Some(f) => vec![(e.orig, f, e.status)],
                None => continue,
            },
            Ok(Event::Lost) => {
                full = true;
                // Bounded: RESYNC_EVERY between the end of one full check
                // and the start of the next.
                if let Some(t) = last_resync {
                    let wait = RESYNC_EVERY.saturating_sub(t.elapsed());
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(wait) => {}
                    }
                }
                crate::sampled!(
                    debug,
                    "conntrack events lost; checking every captured UDP flow's entry"
                );
                flows
                    .all()
                    .into_iter()
                    .filter_map(|f| {
                        let dst = f.dst?;
                        (!capture_deleted(dst, f.age)).then_some((
                            Tuple { src: f.client, dst },
                            f,
                            status_of(&f),
                        ))
                    })
                    .collect()
            }
            Err(e) => {
                crate::sampled!(warn, "reading conntrack events failed", error = %e);
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(RESYNC_EVERY) => {}
                }
                continue;
            }
        };
        for (orig, f, status) in work {
            if stop.is_cancelled() {
                return;
            }
            let timeout = time_left(timeouts, status, f.quiet);
            match k.ensure(orig, f.here, timeout, status).await {
                Ok(Repair::Created) => {
                    stats.conntrack_restored.fetch_add(1, Relaxed);
                    crate::sampled!(debug, "re-created a captured UDP flow's deleted conntrack entry", client = %orig.src, dst = %orig.dst, timeout);
                }
                Ok(Repair::Present | Repair::Moved) => {}
                Err(e) => {
                    stats.conntrack_restore_failed.fetch_add(1, Relaxed);
                    crate::sampled!(debug, "could not re-create a captured UDP flow's conntrack entry", client = %orig.src, dst = %orig.dst, error = %e);
                }
            }
        }
        if full {
            last_resync = Some(Instant::now());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::sync::Mutex;

    struct Fake(Mutex<HashMap<(SocketAddrV4, SocketAddrV4), LiveFlow>>);

    impl LiveFlows for Fake {
        fn get(&self, client: SocketAddrV4, here: SocketAddrV4) -> Option<LiveFlow> {
            self.0.lock().unwrap().get(&(client, here)).copied()
        }
        fn all(&self) -> Vec<LiveFlow> {
            self.0.lock().unwrap().values().copied().collect()
        }
    }

    fn sa(s: &str) -> SocketAddrV4 {
        s.parse().unwrap()
    }

    fn flow(dst: Option<&str>) -> LiveFlow {
        LiveFlow {
            client: sa("10.244.7.5:40000"),
            here: sa("169.254.70.1:15001"),
            dst: dst.map(sa),
            quiet: Duration::from_millis(50),
            age: Duration::from_secs(5),
            replied: true,
            stream: true,
        }
    }

    fn entry(orig_dst: &str, reply_src: &str) -> Entry {
        Entry {
            orig: Tuple {
                src: sa("10.244.7.5:40000"),
                dst: sa(orig_dst),
            },
            reply: Tuple {
                src: sa(reply_src),
                dst: sa("10.244.7.5:40000"),
            },
            status: IPS_SEEN_REPLY | IPS_ASSURED,
        }
    }

    /// What holds a flow's original tuple decides what the keeper does:
    /// never delete or replace an entry translated elsewhere (the Service
    /// left the capture and kube-proxy's DNAT took the flow).
    #[test]
    fn only_entries_translated_to_the_capture_address_are_touched() {
        let want = Tuple {
            src: sa("169.254.70.1:15001"),
            dst: sa("10.244.7.5:40000"),
        };
        let ours = entry("10.96.0.10:53", "169.254.70.1:15001");
        assert_eq!(holder(&ours, want), Holder::Ours);
        let dying = Entry {
            status: ours.status | IPS_DYING,
            ..ours
        };
        assert_eq!(holder(&dying, want), Holder::Dying);
        let remapped = Entry {
            reply: Tuple {
                src: sa("169.254.70.1:15001"),
                dst: sa("10.244.7.5:1481"),
            },
            ..ours
        };
        assert_eq!(holder(&remapped, want), Holder::Remapped);
        let kube_proxys = entry("10.96.0.10:53", "10.244.8.5:53");
        assert_eq!(holder(&kube_proxys, want), Holder::Elsewhere);
    }

    #[test]
    fn only_open_flows_translated_entries_are_restored() {
        let f = flow(Some("10.96.77.10:53"));
        let flows = Fake(Mutex::new(HashMap::from([((f.client, f.here), f)])));
        // kube-proxy deleted the entry of an open flow: restored.
        let e = entry("10.96.77.10:53", "169.254.70.1:15001");
        assert_eq!(to_restore(&e, &flows), Some(f));
        // An entry with another original destination (the client port
        // reused elsewhere) is not this flow's.
        assert_eq!(
            to_restore(&entry("10.96.77.11:53", "169.254.70.1:15001"), &flows),
            None
        );
        // An untranslated entry (reply from the destination itself) or
        // our own bogus one (original source the capture address) is not.
        assert_eq!(
            to_restore(&entry("10.96.77.10:53", "10.96.77.10:53"), &flows),
            None
        );
        let bogus = Entry {
            orig: e.reply,
            reply: e.orig,
            status: 0,
        };
        assert_eq!(to_restore(&bogus, &flows), None);
        // A flow that ended (expiry of its entry): nothing.
        flows.0.lock().unwrap().clear();
        assert_eq!(to_restore(&e, &flows), None);
        // A flow whose destination is not known yet: the event tells it.
        let g = flow(None);
        flows.0.lock().unwrap().insert((g.client, g.here), g);
        assert_eq!(to_restore(&e, &flows), Some(g));
        // A port whose entries the capture itself deleted: left deleted.
        crate::conntrack::note_capture_deletes("10.96.77.10:53".parse().unwrap());
        assert_eq!(to_restore(&e, &flows), None);
    }

    #[test]
    fn a_restored_entry_keeps_the_time_it_had_left() {
        let t = (Duration::from_secs(30), Duration::from_secs(120));
        assert_eq!(time_left(t, IPS_ASSURED, Duration::from_millis(500)), 120);
        assert_eq!(time_left(t, IPS_SEEN_REPLY, Duration::from_secs(10)), 20);
        assert_eq!(time_left(t, 0, Duration::from_secs(40)), 1);
        let f = flow(None);
        assert_eq!(status_of(&f), IPS_SEEN_REPLY | IPS_ASSURED);
    }
}
