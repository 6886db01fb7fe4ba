//! Certificate bootstrap, the relay's side: an edge with a projected
//! service-account token but no certificate asks for one on a connection
//! of its own (ALPN `edge-relay-bootstrap/1`, no client certificate).
//!
//! The relay takes the node name only from the token's binding (the
//! apiserver's TokenReview answer), checks the pod the token is bound to
//! (it exists, runs on that node, uses the edge service account, belongs
//! to the edge-client DaemonSet), and issues a short-lived certificate
//! whose only name is that node, from the issuing CA it holds. A token of
//! node A can never yield a certificate for node B: the request's node must
//! equal the token's.
//!
//! Why the relay signs, rather than the Kubernetes CSR API: the edge's
//! token (audience `edge-relay`) cannot call the apiserver, so with the CSR
//! API the relay would create, approve and sign every request itself —
//! three writes per edge per renewal and RBAC to approve for a signer —
//! for the same trust decision. Holding the CA key in a Secret only the
//! relay reads keeps the API quiet and the RBAC small.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use relay_protocol::bootstrap::{CertReply, CertRequest, IssuedCert};
use relay_protocol::codec::{read_frame, write_frame};
use relay_protocol::{close_code, RejectReason, Rejection, PROTOCOL_VERSION};
use relay_transport::log_sample::{self, LogSampler};
use relay_transport::TunnelConn;
use tracing::{debug, info};

use crate::directory::Lookup;
use crate::metrics::REJECT_REASONS;
use crate::server::Shared;

/// Who a token says the edge is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenIdentity {
    /// The node the token (and its pod) is bound to.
    pub node: String,
    /// The pod, for logs.
    pub pod: String,
}

/// A refusal: the reason the edge sees and a message.
pub type Refusal = (RejectReason, String);

/// Verifies bootstrap tokens (TokenReview and the pod checks, in
/// [`crate::k8s`]).
pub trait TokenAuthority: Send + Sync + 'static {
    /// The identity `token` proves, or why not.
    fn authenticate<'a>(
        &'a self,
        token: &'a str,
    ) -> Pin<Box<dyn Future<Output = Result<TokenIdentity, Refusal>> + Send + 'a>>;
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Bounds the token reviews (a TokenReview and a pod read each, at the
/// apiserver) that bootstrap requests cause. Bootstrap takes no client
/// certificate, so anyone who reaches the relay's port can ask: without a
/// bound, a flood of junk tokens becomes a flood of API calls in the
/// relay's own name, which the apiserver's priority and fairness then
/// throttles together with the relay's watches and status writes.
/// At most [`ReviewGate::IN_FLIGHT`] at once (the rest wait, within the
/// request's bound), and [`ReviewGate::PER_SECOND`] on average with bursts
/// of [`ReviewGate::BURST`] (the rest refused `overloaded`, which edges
/// retry after their backoff).
pub struct ReviewGate {
    inner: Arc<dyn TokenAuthority>,
    in_flight: tokio::sync::Semaphore,
    /// Reviews that may start now.
    bucket: std::sync::Mutex<crate::bucket::TokenBucket>,
    /// Requests refused for want of budget (for the log).
    refused: std::sync::atomic::AtomicU64,
}

impl ReviewGate {
    /// Reviews running at once.
    pub const IN_FLIGHT: usize = 16;
    /// Reviews per second on average: 1,000 edges installed at once have
    /// their certificates within a minute; renewals of 10,000 edges with
    /// 12-hour certificates need one every 4 seconds.
    pub const PER_SECOND: f64 = 20.0;
    /// Reviews in a burst.
    pub const BURST: f64 = 200.0;

    /// Gates `inner`.
    pub fn new(inner: Arc<dyn TokenAuthority>) -> Self {
        ReviewGate {
            inner,
            in_flight: tokio::sync::Semaphore::new(Self::IN_FLIGHT),
            bucket: std::sync::Mutex::new(crate::bucket::TokenBucket::full(
                Self::BURST,
                std::time::Instant::now(),
            )),
            refused: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Takes one review's worth of budget, or says how long until one is
    /// due.
    fn take(&self, now: std::time::Instant) -> Result<(), Duration> {
        self.bucket.lock().unwrap_or_else(|e| e.into_inner()).take(
            now,
            Duration::from_secs_f64(1.0 / Self::PER_SECOND),
            Self::BURST,
        )
    }
}

impl TokenAuthority for ReviewGate {
    fn authenticate<'a>(
        &'a self,
        token: &'a str,
    ) -> Pin<Box<dyn Future<Output = Result<TokenIdentity, Refusal>> + Send + 'a>> {
        Box::pin(async move {
            if let Err(wait) = self.take(std::time::Instant::now()) {
                // Sampled in time, not at powers of two of a count that
                // lives as long as the process: months in, a new episode
                // would wait for the next power of two to be logged.
                let n = self.refused.fetch_add(1, Relaxed) + 1;
                relay_transport::sampled!(
                    warn,
                    "more certificate requests than the token review budget; refusing the excess (overloaded)",
                    refused = n
                );
                return Err((
                    RejectReason::Overloaded,
                    format!(
                        "too many certificate requests; retry in {} ms",
                        wait.as_millis().max(1)
                    ),
                ));
            }
            let _one = self.in_flight.acquire().await.map_err(|_| {
                (
                    RejectReason::ShuttingDown,
                    "token reviews closed".to_string(),
                )
            })?;
            self.inner.authenticate(token).await
        })
    }
}

/// Decides a request: the token's node must be the requested node.
pub async fn decide(
    authority: &dyn TokenAuthority,
    issuer: &relay_transport::issue::NodeIssuer,
    req: &CertRequest,
    now: SystemTime,
) -> Result<(IssuedCert, TokenIdentity), Refusal> {
    if req.version != PROTOCOL_VERSION {
        return Err((
            RejectReason::UnsupportedVersion,
            format!(
                "protocol version {} not supported; this relay speaks {PROTOCOL_VERSION}",
                req.version
            ),
        ));
    }
    let who = authority.authenticate(&req.token).await?;
    if who.node != req.node {
        return Err((
            RejectReason::IdentityMismatch,
            format!(
                "the token is bound to node {:?}, not {:?}",
                who.node, req.node
            ),
        ));
    }
    let issued = issuer
        .issue(&who.node, &req.public_key, now)
        .map_err(|e| (RejectReason::Malformed, e.to_string()))?;
    Ok((
        IssuedCert {
            cert_pem: issued.cert_pem,
            not_after_unix: unix(issued.not_after),
            relay_time_unix: unix(now),
        },
        who,
    ))
}

/// Of the handshake timeout, what the token check leaves for the reply:
/// the check (a TokenReview and a pod read, each bounded by
/// `kubernetes.api_timeout`, 10 s by default, as is the handshake) must
/// end this much before the connection's own bound, so that a slow
/// apiserver is answered `overloaded` (counted, logged, retried by the
/// edge after its backoff) instead of the connection timing out silently.
const REPLY_ROOM: Duration = Duration::from_secs(2);

/// How long into a bootstrap connection the token check may run, given
/// the handshake timeout `limit`: up to [`REPLY_ROOM`] before the
/// connection's bound, or half of it if the bound is shorter than twice
/// that room.
fn check_bound(limit: Duration) -> Duration {
    limit.saturating_sub(REPLY_ROOM).max(limit / 2)
}

/// The token check of a connection that started at `started`, bounded by
/// [`check_bound`]`(limit)` from then: past it, a typed `overloaded`
/// refusal (the apiserver did not answer in time; nothing is known
/// against the token, and the edge retries).
async fn decide_by(
    (started, limit): (tokio::time::Instant, Duration),
    authority: &dyn TokenAuthority,
    issuer: &relay_transport::issue::NodeIssuer,
    req: &CertRequest,
) -> Result<(IssuedCert, TokenIdentity), Refusal> {
    let bound = check_bound(limit);
    let check = decide(authority, issuer, req, SystemTime::now());
    match tokio::time::timeout_at(started + bound, check).await {
        Ok(r) => r,
        // Stable (the bound, not the time left): it is also the Event's note.
        Err(_) => Err((
            RejectReason::Overloaded,
            format!(
                "cannot verify the token now: the Kubernetes API did not answer within {} ms of the request",
                bound.as_millis()
            ),
        )),
    }
}

/// Serves one bootstrap connection: one request, one reply, bounded by the
/// handshake timeout, then the connection closes.
/// One log sampler per refusal reason (in `metrics::REJECT_REASONS`
/// order, then one for reasons of a newer protocol): edges refused a
/// certificate retry (every edge of a cluster whose token reviews fail),
/// and a storm of one reason must not hide another.
static REFUSED_LOG: [LogSampler; REJECT_REASONS.len() + 1] =
    [const { LogSampler::new(log_sample::WINDOW) }; REJECT_REASONS.len() + 1];

/// Logs a refused certificate request, sampled per reason (this line is
/// written once per request; `relay_bootstrap_total{outcome="refused"}`
/// counts every one).
fn log_refused(remote: std::net::SocketAddr, node: &str, reason: RejectReason, message: &str) {
    let i = REJECT_REASONS
        .iter()
        .position(|r| *r == reason)
        .unwrap_or(REJECT_REASONS.len());
    let Some(s) = REFUSED_LOG[i].admit(log_sample::now()) else {
        return;
    };
    let reason = reason.as_str();
    if s.suppressed == 0 {
        info!(%remote, node, reason, message, "certificate request refused");
    } else {
        info!(
            %remote, node, reason, message, suppressed = s.suppressed,
            "certificate request refused (and {} more for {reason} in the last {} s)",
            s.suppressed,
            s.since.as_secs()
        );
    }
}

pub(crate) async fn serve_bootstrap(conn: TunnelConn, shared: Arc<Shared>) {
    let remote = conn.remote_addr();
    let limit = shared.cfg.limits.handshake_timeout;
    let started = tokio::time::Instant::now();
    // Set once the request is decided (and counted issued or refused): a
    // connection whose reply is then not taken in time is not also
    // counted `timed_out`.
    let mut decided = false;
    let served = tokio::time::timeout(limit, async {
        let mut bi = conn.accept_bi().await.map_err(|e| e.to_string())?;
        let req: CertRequest = read_frame(&mut bi.recv).await.map_err(|e| e.to_string())?;
        // A node without a Node object cannot have an edge-client pod:
        // refused here, with no API call and no Event (a client inventing
        // names would otherwise have one written for each).
        let node = shared.directory.lookup(&req.node);
        let outcome = match (&shared.cfg.bootstrap, &shared.tokens) {
            (Some(_), Some(_)) if node == Lookup::Unknown => Err((
                RejectReason::IdentityMismatch,
                format!("no Node object named {:?}", req.node),
            )),
            (Some(b), Some(authority)) => decide_by((started, limit), authority.as_ref(), &b.issuer, &req).await,
            _ => Err((
                RejectReason::Malformed,
                "this relay does not issue certificates ([bootstrap] is not configured)".to_string(),
            )),
        };
        decided = true;
        let reply = match outcome {
            Ok((cert, who)) => {
                shared.metrics.bootstrap_issued.fetch_add(1, Relaxed);
                info!(%remote, node = %who.node, pod = %who.pod, "node certificate issued");
                CertReply::Issued(cert)
            }
            Err((reason, message)) => {
                shared.metrics.bootstrap_refused.fetch_add(1, Relaxed);
                if reason == RejectReason::Overloaded {
                    // A slow or unreachable apiserver refuses every edge
                    // asking at once: one line per window, not one each.
                    relay_transport::sampled!(warn, "certificate request refused: overloaded", %remote, node = %req.node, %message);
                } else {
                    log_refused(remote, &req.node, reason, &message);
                }
                if node != Lookup::Unknown {
                    shared.status.rejected(&req.node, reason.as_str(), &message);
                }
                CertReply::Refused(Rejection {
                    reason,
                    message,
                    relay_version: PROTOCOL_VERSION,
                    retry_after_ms: reason.is_transient().then_some(1000),
                })
            }
        };
        write_frame(&mut bi.send, &reply).await.map_err(|e| e.to_string())?;
        let _ = tokio::io::AsyncWriteExt::shutdown(&mut bi.send).await;
        // Let the edge read the reply before the close discards it.
        let _ = tokio::time::timeout(Duration::from_secs(2), conn.closed()).await;
        Ok::<(), String>(())
    })
    .await;
    match served {
        Ok(Ok(())) => {}
        Ok(Err(e)) => debug!(%remote, error = %e, "bootstrap connection failed"),
        // Decided and counted: the edge did not take the reply in time.
        Err(_) if decided => {
            debug!(%remote, "bootstrap reply not taken in time");
        }
        Err(_) => {
            // The edge sent no request in time (the token check itself
            // ends earlier: `check_bound`).
            shared.metrics.bootstrap_timed_out.fetch_add(1, Relaxed);
            relay_transport::sampled!(info, "bootstrap connection timed out", %remote);
        }
    }
    conn.close(close_code::NORMAL, "bootstrap done");
}

#[cfg(test)]
mod tests {
    use super::*;
    use relay_transport::devcerts::DevPki;
    use relay_transport::issue::{node_key, NodeIssuer};
    use relay_transport::tls::{cert_names_node, certs_from_pem};

    /// Tokens `token-<node>` prove `<node>`; anything else is refused.
    struct Fixed;

    impl TokenAuthority for Fixed {
        fn authenticate<'a>(
            &'a self,
            token: &'a str,
        ) -> Pin<Box<dyn Future<Output = Result<TokenIdentity, Refusal>> + Send + 'a>> {
            Box::pin(async move {
                match token.strip_prefix("token-") {
                    Some(node) => Ok(TokenIdentity {
                        node: node.to_string(),
                        pod: format!("edge-client-{node}"),
                    }),
                    None => Err((RejectReason::IdentityMismatch, "unknown token".into())),
                }
            })
        }
    }

    fn issuer() -> NodeIssuer {
        let pki = DevPki::generate(&["localhost"], &[]).unwrap();
        let (c, k) = pki.ca_pem_pair();
        NodeIssuer::from_pem(&c, &k, Duration::from_secs(3600)).unwrap()
    }

    fn req(node: &str, token: &str) -> CertRequest {
        CertRequest {
            version: PROTOCOL_VERSION,
            node: node.into(),
            token: token.into(),
            public_key: node_key().unwrap().1,
        }
    }

    /// Answers as [`Fixed`] after sleeping its duration (a slow apiserver).
    struct Sleepy(Duration);

    impl TokenAuthority for Sleepy {
        fn authenticate<'a>(
            &'a self,
            token: &'a str,
        ) -> Pin<Box<dyn Future<Output = Result<TokenIdentity, Refusal>> + Send + 'a>> {
            Box::pin(async move {
                tokio::time::sleep(self.0).await;
                Fixed.authenticate(token).await
            })
        }
    }

    /// A token check slower than the handshake's bound (a TokenReview and
    /// a pod read of 10 s each may take 20 s) ends at its deadline, room
    /// for the reply left, with a typed `overloaded` the edge retries; a
    /// check within it is answered as before.
    #[tokio::test(start_paused = true)]
    async fn a_token_check_past_its_deadline_is_refused_overloaded() {
        let limit = Duration::from_secs(10);
        assert_eq!(check_bound(limit), limit - REPLY_ROOM);
        let short = Duration::from_secs(1);
        assert_eq!(check_bound(short), short / 2);
        let iss = issuer();
        let start = tokio::time::Instant::now();
        let slow = Sleepy(Duration::from_secs(20));
        let (reason, msg) = decide_by((start, limit), &slow, &iss, &req("edge-a", "token-edge-a"))
            .await
            .unwrap_err();
        assert_eq!(reason, RejectReason::Overloaded, "{msg}");
        assert!(reason.is_transient());
        assert!(msg.contains("within 8000 ms"), "{msg}");
        assert_eq!(start.elapsed(), limit - REPLY_ROOM);
        let start = tokio::time::Instant::now();
        let quick = Sleepy(Duration::from_secs(5));
        let (_, who) = decide_by((start, limit), &quick, &iss, &req("edge-a", "token-edge-a"))
            .await
            .unwrap();
        assert_eq!(who.node, "edge-a");
    }

    /// Counts reviews and the most running at once; each takes 20 ms.
    #[derive(Default)]
    struct Slow {
        running: std::sync::atomic::AtomicUsize,
        most: std::sync::atomic::AtomicUsize,
        calls: std::sync::atomic::AtomicUsize,
    }

    impl TokenAuthority for Slow {
        fn authenticate<'a>(
            &'a self,
            token: &'a str,
        ) -> Pin<Box<dyn Future<Output = Result<TokenIdentity, Refusal>> + Send + 'a>> {
            Box::pin(async move {
                self.calls.fetch_add(1, Relaxed);
                let now = self.running.fetch_add(1, Relaxed) + 1;
                self.most.fetch_max(now, Relaxed);
                tokio::time::sleep(Duration::from_millis(20)).await;
                self.running.fetch_sub(1, Relaxed);
                Fixed.authenticate(token).await
            })
        }
    }

    /// A flood of requests (bootstrap needs no client certificate) costs
    /// the apiserver at most the burst (and what the rate adds while it
    /// lasts); at most 16 reviews run at once; the excess is refused
    /// `overloaded` (edges retry).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn token_reviews_are_bounded_in_rate_and_concurrency() {
        let slow = Arc::new(Slow::default());
        let gate = Arc::new(ReviewGate::new(slow.clone()));
        let started = std::time::Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..300 {
            let g = gate.clone();
            tasks.spawn(async move { g.authenticate(&format!("token-edge-{i}")).await });
        }
        let mut overloaded = 0;
        while let Some(r) = tasks.join_next().await {
            match r.unwrap() {
                Ok(_) => {}
                Err((RejectReason::Overloaded, m)) => {
                    assert!(m.contains("retry in"), "{m}");
                    overloaded += 1;
                }
                Err(e) => panic!("{e:?}"),
            }
        }
        let calls = slow.calls.load(Relaxed);
        let refill = (started.elapsed().as_secs_f64() * ReviewGate::PER_SECOND).ceil() as usize;
        let burst = ReviewGate::BURST as usize;
        assert!(
            (burst..=burst + refill).contains(&calls),
            "{calls} reviews for 300 requests"
        );
        assert_eq!(overloaded, 300 - calls);
        assert_eq!(slow.most.load(Relaxed), ReviewGate::IN_FLIGHT);
    }

    /// The budget: the burst at once, then the rate.
    #[test]
    fn the_review_budget_refills_at_the_rate() {
        let gate = ReviewGate::new(Arc::new(Fixed));
        let t = std::time::Instant::now();
        for _ in 0..ReviewGate::BURST as usize {
            assert!(gate.take(t).is_ok());
        }
        let wait = gate.take(t).unwrap_err();
        assert_eq!(wait, Duration::from_millis(50));
        let later = t + Duration::from_secs(1);
        let granted = (0..40).filter(|_| gate.take(later).is_ok()).count();
        assert_eq!(granted, ReviewGate::PER_SECOND as usize);
    }

    #[tokio::test]
    async fn a_token_of_node_a_never_yields_a_certificate_for_node_b() {
        let iss = issuer();
        let now = SystemTime::now();
        let (cert, who) = decide(&Fixed, &iss, &req("edge-a", "token-edge-a"), now)
            .await
            .unwrap();
        assert_eq!(who.node, "edge-a");
        let der = certs_from_pem(cert.cert_pem.as_bytes(), "issued").unwrap();
        assert!(cert_names_node(&der[0], "edge-a"));
        assert!(cert.not_after_unix > cert.relay_time_unix);
        let (reason, msg) = decide(&Fixed, &iss, &req("edge-b", "token-edge-a"), now)
            .await
            .unwrap_err();
        assert_eq!(reason, RejectReason::IdentityMismatch);
        assert!(msg.contains("edge-a") && msg.contains("edge-b"), "{msg}");
        assert!(decide(&Fixed, &iss, &req("edge-a", "garbage"), now)
            .await
            .is_err());
        let mut bad = req("edge-a", "token-edge-a");
        bad.public_key = vec![1, 2, 3];
        assert_eq!(
            decide(&Fixed, &iss, &bad, now).await.unwrap_err().0,
            RejectReason::Malformed
        );
    }

    /// Refused certificate requests are logged sampled, per reason: 1,000
    /// edges refused `identity_mismatch` within 20 s (a cluster whose
    /// token reviews all fail) write one line per 10 s window, and one
    /// `malformed` among them is still logged.
    #[tokio::test(start_paused = true)]
    async fn refused_requests_are_logged_sampled_per_reason() {
        let (out, _guard) = relay_transport::test_log::Captured::start();
        let remote: std::net::SocketAddr = "192.0.2.7:40000".parse().unwrap();
        for i in 0..1_000 {
            let node = format!("edge-{i}");
            log_refused(
                remote,
                &node,
                RejectReason::IdentityMismatch,
                "unknown token",
            );
            if i == 500 {
                log_refused(remote, "edge-x", RejectReason::Malformed, "bad key");
            }
            tokio::time::advance(Duration::from_millis(20)).await;
        }
        let text = out.text();
        let lines: Vec<&str> = text.lines().collect();
        let mismatch = lines
            .iter()
            .filter(|l| l.contains("reason=\"identity_mismatch\""))
            .count();
        assert_eq!(mismatch, 2, "{text}");
        assert!(
            lines.iter().any(|l| l.contains(
                "certificate request refused (and 499 more for identity_mismatch in the last 10 s)"
            )),
            "{text}"
        );
        assert!(
            lines
                .iter()
                .any(|l| l.contains("reason=\"malformed\"") && l.contains("edge-x")),
            "{text}"
        );
        assert_eq!(lines.len(), 3, "{text}");
    }
}
