//! A route agent's `GET /v1/routes?offline=1` of one relay: over one
//! connection kept between polls (HTTP/1.1 keep-alive, TCP or TLS), with
//! the last table's ETag in `If-None-Match`, so an unchanged table costs a
//! request head and a 304, not a TCP and TLS handshake and the whole
//! table (2 MB at 10,000 edges of 2 prefixes) every interval.
//!
//! A small HTTP/1.1 client of its own (the workspace's hyper is built
//! without its client): one `GET`; the answer is framed by
//! `Content-Length`, as chunks, or by the end of the connection (which is
//! then not kept). A kept connection the relay has closed meanwhile (its
//! idle bound, a restart) fails the first write or read: the request is
//! sent once more on a new connection (a `GET`, so harmless twice).
//!
//! The token ([`crate::Secret::current`]) is the token file as it is at
//! each request (read again when its metadata changed); after a 401 the
//! file is read once more and, if it holds another token, the request is
//! sent again with it, once: a rotated Secret is taken whichever of relay
//! and agent sees it first, without a restart (`crate::token_reload`).
//!
//! A 503 whose body is the relay's own [`crate::admin::OVERLOADED`] is
//! [`Busy`]: the relay answered, its admin API's budget was full. The
//! multipath agent keeps such a replica's last table a while instead of
//! taking it out of the routing groups (see `crate::multipath`).

use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};

use super::{AgentConfig, RouteView};
use crate::config::Secret;

/// Bound on one poll (connection, TLS, request and answer; a retry on a
/// new connection included).
pub const POLL_TIMEOUT: Duration = Duration::from_secs(5);

/// Bound on an answer's body: a route table of 100,000 rows is well under
/// 16 MiB.
const MAX_BODY: u64 = 16 << 20;

/// Bound on an answer's head (status line and headers).
const MAX_HEAD: usize = 64 << 10;

/// The admin API answered 503 with the relay's "overloaded" body: alive,
/// but every request slot of its budget was taken.
#[derive(Debug, thiserror::Error)]
#[error("admin API busy: answered {0:?}")]
pub struct Busy(pub String);

/// A connection to the admin API, TCP or TLS.
trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

type Conn = BufReader<Box<dyn Io>>;

/// One relay's route table as an agent polls it: the connection kept
/// between polls, and the last table read with its ETag.
#[derive(Default)]
pub struct RoutesPoll {
    conn: Option<Conn>,
    etag: Option<String>,
    view: Option<RouteView>,
    /// The IPv6 prefixes of the table, left out (logged once per set).
    ipv6: relay_transport::log_sample::OncePerSet<relay_protocol::Cidr>,
}

impl std::fmt::Debug for RoutesPoll {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RoutesPoll")
            .field("connected", &self.conn.is_some())
            .field("etag", &self.etag)
            .field("view", &self.view)
            .finish()
    }
}

/// What one poll read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Polled {
    /// The relay's table now.
    pub view: RouteView,
    /// `false`: the relay answered 304 (the table is the last one read).
    pub changed: bool,
}

/// One answer.
struct Answer {
    status: u16,
    status_line: String,
    etag: Option<String>,
    body: Vec<u8>,
    /// Whether the connection may carry the next request.
    keep: bool,
}

impl RoutesPoll {
    /// The last table read (`None` before the first).
    pub fn last(&self) -> Option<&RouteView> {
        self.view.as_ref()
    }

    /// Reads the relay's table: the last one again when the relay answers
    /// 304 to its ETag. [`Busy`] (downcast the error) for the relay's
    /// "overloaded" 503.
    pub async fn poll(&mut self, cfg: &AgentConfig) -> anyhow::Result<Polled> {
        // The connection is taken out for the poll and put back only after
        // a whole answer: one abandoned half-way (the timeout) is dropped.
        tokio::time::timeout(POLL_TIMEOUT, self.poll_once(cfg))
            .await
            .map_err(|_| anyhow::anyhow!("no answer within {POLL_TIMEOUT:?}"))?
    }

    async fn poll_once(&mut self, cfg: &AgentConfig) -> anyhow::Result<Polled> {
        // The token file as it is now (read again if it changed).
        let token = cfg.token.as_ref().map(Secret::current);
        let mut request = self.request(token.as_ref());
        let mut answer = self.send(cfg, &request).await?;
        if answer.status == 401 {
            // The relay may have taken a rotated token before this node's
            // copy of the Secret looked changed: the file read again, and
            // asked once more if it holds another token.
            if let Some(t) = token.as_ref().and_then(Secret::reread) {
                tracing::info!(admin = %cfg.admin, "admin API answered 401: the token file holds another token now; asking again with it");
                request = self.request(Some(&t));
                answer = self.send(cfg, &request).await?;
            }
        }
        match answer.status {
            200 => {
                let (view, ipv6) = parse_view(&answer.body)?;
                if let Some(prefixes) = self.ipv6.changed(&ipv6) {
                    tracing::warn!(
                        admin = %cfg.admin,
                        count = ipv6.len(),
                        %prefixes,
                        "the relay routes IPv6 prefixes; the route agent installs IPv4 routes only and leaves them out (reach them through CONNECT)"
                    );
                }
                self.etag = answer.etag;
                self.view = Some(view.clone());
                Ok(Polled {
                    view,
                    changed: true,
                })
            }
            304 => match (&self.view, request.contains("\r\nIf-None-Match: ")) {
                (Some(v), true) => Ok(Polled {
                    view: v.clone(),
                    changed: false,
                }),
                _ => anyhow::bail!("admin API answered 304 to a request without an ETag"),
            },
            503 if answer
                .body
                .starts_with(crate::admin::OVERLOADED.trim_end().as_bytes()) =>
            {
                Err(Busy(answer.status_line).into())
            }
            _ => anyhow::bail!("admin API answered {:?}", answer.status_line),
        }
    }

    /// Sends `request` on the kept connection, or on a new one when there
    /// is none or the kept one fails (closed by the relay since the last
    /// poll: idle, restart); keeps the connection when the answer allows.
    async fn send(&mut self, cfg: &AgentConfig, request: &str) -> anyhow::Result<Answer> {
        let (answer, conn) = match self.conn.take() {
            Some(mut c) => match exchange(&mut c, request).await {
                Ok(a) => (a, c),
                Err(_) => {
                    let mut c = connect(cfg).await?;
                    (exchange(&mut c, request).await?, c)
                }
            },
            None => {
                let mut c = connect(cfg).await?;
                (exchange(&mut c, request).await?, c)
            }
        };
        if answer.keep {
            self.conn = Some(conn);
        }
        Ok(answer)
    }

    /// The request head: the token, and the last table's ETag when there
    /// is one.
    fn request(&self, token: Option<&Secret>) -> String {
        let auth = token
            .map(|t| format!("Authorization: Bearer {}\r\n", t.expose()))
            .unwrap_or_default();
        let cached = match (&self.etag, &self.view) {
            (Some(e), Some(_)) => format!("If-None-Match: {e}\r\n"),
            _ => String::new(),
        };
        format!("GET /v1/routes?offline=1 HTTP/1.1\r\nHost: relay\r\n{auth}{cached}\r\n")
    }
}

/// A new connection to the admin API (TLS when configured).
async fn connect(cfg: &AgentConfig) -> anyhow::Result<Conn> {
    let tcp = tokio::net::TcpStream::connect(cfg.admin).await?;
    let _ = tcp.set_nodelay(true);
    let io: Box<dyn Io> = match &cfg.tls {
        None => Box::new(tcp),
        Some(t) => Box::new(
            tokio_rustls::TlsConnector::from(t.config())
                .connect(t.server_name.clone(), tcp)
                .await?,
        ),
    };
    Ok(BufReader::new(io))
}

/// Sends `request` on `c` and reads the whole answer.
async fn exchange(c: &mut Conn, request: &str) -> anyhow::Result<Answer> {
    c.get_mut().write_all(request.as_bytes()).await?;
    c.get_mut().flush().await?;
    let mut head_len = 0;
    // Interim answers (1xx: 100 Continue, a proxy's 103 Early Hints) come
    // before the final one to the same request: skipped, head and all,
    // or every later poll would read the answer to the one before it.
    let (status_line, version, status) = loop {
        let status_line = read_line(c, &mut head_len).await?;
        let mut words = status_line.splitn(3, ' ');
        let version = words.next().unwrap_or_default().to_string();
        let status: u16 = words
            .next()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| anyhow::anyhow!("not an HTTP answer: {status_line:?}"))?;
        anyhow::ensure!(
            version.starts_with("HTTP/1."),
            "not an HTTP/1 answer: {status_line:?}"
        );
        if !(100..200).contains(&status) {
            break (status_line, version, status);
        }
        while !read_line(c, &mut head_len).await?.is_empty() {}
    };
    let mut keep = version == "HTTP/1.1";
    let (mut length, mut chunked, mut etag) = (None, false, None);
    loop {
        let line = read_line(c, &mut head_len).await?;
        if line.is_empty() {
            break;
        }
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        match name.trim().to_ascii_lowercase().as_str() {
            "content-length" => length = Some(value.parse::<u64>()?),
            "transfer-encoding" => chunked = value.to_ascii_lowercase().ends_with("chunked"),
            "connection"
                if value
                    .split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("close")) =>
            {
                keep = false
            }
            "etag" => etag = Some(value.to_string()),
            _ => {}
        }
    }
    let mut body = Vec::new();
    if status == 304 || status == 204 {
        // No body, whatever the headers say.
    } else if chunked {
        read_chunked(c, &mut body).await?;
    } else if let Some(n) = length {
        anyhow::ensure!(n <= MAX_BODY, "answer of {n} bytes, more than {MAX_BODY}");
        body.resize(n as usize, 0);
        c.read_exact(&mut body).await?;
    } else {
        // Framed by the connection's end: complete when it ends.
        keep = false;
        match c.take(MAX_BODY).read_to_end(&mut body).await {
            Ok(_) => {}
            // A TLS peer closing without close_notify after the body: what
            // was read is complete, or fails to parse as JSON.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !body.is_empty() => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(Answer {
        status,
        status_line,
        etag,
        body,
        keep,
    })
}

/// One line of the head, without its line end; fails at the end of the
/// connection or past [`MAX_HEAD`] in all.
async fn read_line(c: &mut Conn, head_len: &mut usize) -> anyhow::Result<String> {
    let mut line = Vec::new();
    let budget = (MAX_HEAD - *head_len) as u64;
    let n = (&mut *c).take(budget).read_until(b'\n', &mut line).await?;
    anyhow::ensure!(n > 0, "connection closed before an answer");
    anyhow::ensure!(
        line.ends_with(b"\n"),
        "answer head cut short or longer than {MAX_HEAD} bytes"
    );
    *head_len += n;
    let text = String::from_utf8_lossy(&line);
    Ok(text.trim_end_matches(['\r', '\n']).to_string())
}

/// A chunked body into `body`, bounded by [`MAX_BODY`].
async fn read_chunked(c: &mut Conn, body: &mut Vec<u8>) -> anyhow::Result<()> {
    let mut head_len = 0;
    loop {
        let line = read_line(c, &mut head_len).await?;
        head_len = 0;
        let size = line.split(';').next().unwrap_or_default().trim();
        let size = u64::from_str_radix(size, 16)
            .map_err(|_| anyhow::anyhow!("bad chunk size {line:?}"))?;
        if size == 0 {
            // Trailers, then the empty line.
            while !read_line(c, &mut head_len).await?.is_empty() {}
            return Ok(());
        }
        // Compared without adding: a size near 2^64 from a broken or
        // hostile peer must not wrap past the bound.
        anyhow::ensure!(
            size <= MAX_BODY - body.len() as u64,
            "answer longer than {MAX_BODY} bytes"
        );
        let start = body.len();
        body.resize(start + size as usize, 0);
        c.read_exact(&mut body[start..]).await?;
        let mut end = [0u8; 2];
        c.read_exact(&mut end).await?;
        anyhow::ensure!(&end == b"\r\n", "chunk not followed by CRLF");
    }
}

/// The JSON rows of `/v1/routes` (IPv4 prefixes only), live and offline
/// apart; a prefix listed both ways (never from one relay) is live. And
/// the IPv6 prefixes left out.
fn parse_view(
    body: &[u8],
) -> anyhow::Result<(RouteView, std::collections::BTreeSet<relay_protocol::Cidr>)> {
    #[derive(serde::Deserialize)]
    struct Row {
        cidr: relay_protocol::Cidr,
        #[serde(default)]
        offline: bool,
    }
    let rows: Vec<Row> = serde_json::from_slice(body)?;
    let mut view = RouteView::default();
    let mut ipv6 = std::collections::BTreeSet::new();
    for r in rows {
        if !r.cidr.addr().is_ipv4() {
            ipv6.insert(r.cidr);
        } else if r.offline {
            view.offline.insert(r.cidr);
        } else {
            view.live.insert(r.cidr);
        }
    }
    view.offline = view.offline.difference(&view.live).copied().collect();
    Ok((view, ipv6))
}

#[cfg(test)]
pub(crate) mod tests {
    use std::net::SocketAddr;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use super::*;
    use crate::admin::tests::{relay_configured, until_sessions, StandIn};

    /// A TCP proxy in front of an admin API that counts the connections
    /// clients open through it and keeps what they send; `cut` closes
    /// every connection open (as a relay's idle bound would).
    pub(crate) struct Proxy {
        pub(crate) addr: SocketAddr,
        pub(crate) connections: Arc<std::sync::atomic::AtomicUsize>,
        sent: Arc<Mutex<Vec<u8>>>,
        open: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
        accept: tokio::task::JoinHandle<()>,
    }

    impl Proxy {
        pub(crate) async fn start(to: SocketAddr) -> Proxy {
            use std::sync::atomic::Ordering;
            let l = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            let addr = l.local_addr().expect("addr");
            let connections = Arc::new(std::sync::atomic::AtomicUsize::new(0));
            let sent = Arc::new(Mutex::new(Vec::new()));
            let open = Arc::new(Mutex::new(Vec::new()));
            let (n, log, tasks) = (connections.clone(), sent.clone(), open.clone());
            let accept = tokio::spawn(async move {
                while let Ok((mut client, _)) = l.accept().await {
                    n.fetch_add(1, Ordering::SeqCst);
                    let log = log.clone();
                    let task = tokio::spawn(async move {
                        let Ok(mut relay) = tokio::net::TcpStream::connect(to).await else {
                            return;
                        };
                        let (mut cr, mut cw) = client.split();
                        let (mut rr, mut rw) = relay.split();
                        let up = async {
                            let mut buf = [0u8; 4096];
                            loop {
                                match cr.read(&mut buf).await {
                                    Ok(0) | Err(_) => break,
                                    Ok(k) => {
                                        log.lock().unwrap().extend_from_slice(&buf[..k]);
                                        if rw.write_all(&buf[..k]).await.is_err() {
                                            break;
                                        }
                                    }
                                }
                            }
                            let _ = rw.shutdown().await;
                        };
                        let down = async {
                            let _ = tokio::io::copy(&mut rr, &mut cw).await;
                            let _ = cw.shutdown().await;
                        };
                        tokio::join!(up, down);
                    });
                    tasks.lock().unwrap().push(task);
                }
            });
            Proxy {
                addr,
                connections,
                sent,
                open,
                accept,
            }
        }

        /// Connections opened through it so far.
        pub(crate) fn opened(&self) -> usize {
            self.connections.load(std::sync::atomic::Ordering::SeqCst)
        }

        /// Everything clients sent so far.
        pub(crate) fn sent(&self) -> String {
            String::from_utf8_lossy(&self.sent.lock().unwrap()).into_owned()
        }

        /// Closes every connection open now.
        pub(crate) fn cut(&self) {
            for t in self.open.lock().unwrap().drain(..) {
                t.abort();
            }
        }
    }

    impl Drop for Proxy {
        fn drop(&mut self) {
            self.cut();
            self.accept.abort();
        }
    }

    /// An agent of `admin`: no token, no TLS, a 50 ms interval, proto 250
    /// (also the agent loop's namespace tests').
    pub(crate) fn config(admin: SocketAddr) -> AgentConfig {
        AgentConfig {
            admin,
            token: None,
            tls: None,
            interval: Duration::from_millis(50),
            proto: 250,
        }
    }

    fn cidrs(s: &[&str]) -> std::collections::BTreeSet<relay_protocol::Cidr> {
        s.iter().map(|c| c.parse().unwrap()).collect()
    }

    /// Against a real relay: the first poll reads the table, the next ones
    /// send its ETag back on the same connection and reuse the table on
    /// 304; a change is read whole; a connection the relay side closed is
    /// replaced within the poll.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn polls_keep_their_connection_and_reuse_the_table_on_304() {
        let (relay, pki) = relay_configured(1, |c| c.hold_offline_routes = true).await;
        let edge = StandIn::connect(&relay, &pki, 0).await;
        until_sessions(&relay, 1).await;
        let proxy = Proxy::start(relay.admin_addr().expect("admin")).await;
        let cfg = config(proxy.addr);
        let mut poll = RoutesPoll::default();
        let live = RouteView {
            live: cidrs(&["10.99.0.1/32"]),
            offline: Default::default(),
        };
        let first = poll.poll(&cfg).await.expect("first poll");
        assert_eq!(
            first,
            Polled {
                view: live.clone(),
                changed: true
            }
        );
        for _ in 0..3 {
            let again = poll.poll(&cfg).await.expect("poll");
            assert_eq!(
                again,
                Polled {
                    view: live.clone(),
                    changed: false
                },
                "a 304, and the last table"
            );
        }
        let sent = proxy.sent();
        assert_eq!(
            sent.matches("GET /v1/routes?offline=1 ").count(),
            4,
            "{sent}"
        );
        assert_eq!(sent.matches("\r\nIf-None-Match: \"").count(), 3, "{sent}");
        assert!(!sent.contains("Connection: close"), "{sent}");
        assert_eq!(proxy.opened(), 1, "one connection for every poll");
        // The edge goes: its prefix is held offline, a new table.
        drop(edge);
        until_sessions(&relay, 0).await;
        let changed = poll.poll(&cfg).await.expect("poll");
        assert_eq!(
            changed,
            Polled {
                view: RouteView {
                    live: Default::default(),
                    offline: cidrs(&["10.99.0.1/32"]),
                },
                changed: true
            }
        );
        // The connection closed under it: the poll opens another.
        proxy.cut();
        let after = poll.poll(&cfg).await.expect("poll on a new connection");
        assert!(!after.changed);
        assert_eq!(proxy.opened(), 2);
        relay.shutdown(Duration::ZERO).await;
    }

    /// Over HTTPS (the relay's certificate, the agent trusting only its
    /// CA) with the read-only token: 304s on one TLS connection; the full
    /// token works as before, a wrong one gets 401, and plain HTTP to the
    /// HTTPS listener gets no table.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn over_tls_with_the_read_only_token() {
        const FULL: &str = "full-token-0123456789";
        const READ: &str = "read-token-0123456789";
        let (relay, pki) = relay_configured(1, |c| {
            c.admin_tls = Some(c.tls.clone());
            c.admin_token = Some(crate::config::Secret::new(FULL));
            c.admin_read_token = Some(crate::config::Secret::new(READ));
        })
        .await;
        let edge = StandIn::connect(&relay, &pki, 0).await;
        until_sessions(&relay, 1).await;
        let dir = std::env::temp_dir().join(format!(
            "agent-poll-tls-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        pki.write_to(&dir).expect("write PKI");
        let proxy = Proxy::start(relay.admin_addr().expect("admin")).await;
        let agent = |token: &str, tls: bool| AgentConfig {
            token: Some(crate::config::Secret::new(token)),
            tls: tls.then(|| {
                super::super::AgentTls::new(&dir.join("ca.pem"), "localhost").expect("CA")
            }),
            ..config(proxy.addr)
        };
        let cfg = agent(READ, true);
        let mut poll = RoutesPoll::default();
        let first = poll.poll(&cfg).await.expect("first poll");
        assert!(first.changed);
        assert_eq!(first.view.live, cidrs(&["10.99.0.1/32"]));
        for _ in 0..3 {
            assert!(!poll.poll(&cfg).await.expect("poll").changed);
        }
        assert_eq!(proxy.opened(), 1, "one TLS connection for every poll");
        assert!(RoutesPoll::default().poll(&agent(FULL, true)).await.is_ok());
        let e = RoutesPoll::default()
            .poll(&agent("wrong-token-0123456789", true))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("401"), "{e:#}");
        assert!(RoutesPoll::default()
            .poll(&agent(READ, false))
            .await
            .is_err());
        // The CA file changes in place (a CA rotation updates its
        // ConfigMap): the next connection reads it again. First another
        // CA's certificate (refused), then the relay's CA (served); a file
        // that cannot be parsed keeps the CA last read.
        let rotated = dir.join("rotated-ca.pem");
        let other = relay_transport::devcerts::DevPki::generate(&["localhost"], &[]).expect("PKI");
        std::fs::write(&rotated, other.ca_pem_pair().0).expect("write");
        let cfg = AgentConfig {
            tls: Some(super::super::AgentTls::new(&rotated, "localhost").expect("CA")),
            ..agent(READ, true)
        };
        let mut poll = RoutesPoll::default();
        assert!(poll.poll(&cfg).await.is_err(), "another CA's certificate");
        std::fs::write(&rotated, pki.ca_pem_pair().0).expect("write");
        let got = poll.poll(&cfg).await.expect("the CA file read again");
        assert_eq!(got.view.live, cidrs(&["10.99.0.1/32"]));
        std::fs::write(&rotated, "not a PEM file").expect("write");
        assert!(
            RoutesPoll::default().poll(&cfg).await.is_ok(),
            "a broken file keeps the CA read before"
        );
        let _ = std::fs::remove_dir_all(&dir);
        drop(edge);
        relay.shutdown(Duration::ZERO).await;
    }

    /// The answers the client must frame besides `Content-Length`: chunks,
    /// and a body ended by the connection (then not kept); the relay's
    /// "overloaded" 503 is [`Busy`], another 503 is not; interim 1xx
    /// answers are skipped; a chunk size past the bound is refused.
    #[tokio::test]
    async fn chunked_and_unframed_answers_and_a_busy_relay() {
        async fn serve_once(answer: &'static str) -> SocketAddr {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            let addr = l.local_addr().expect("addr");
            tokio::spawn(async move {
                let (mut s, _) = l.accept().await.expect("accept");
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let _ = s.write_all(answer.as_bytes()).await;
            });
            addr
        }
        let chunked = serve_once(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n6\r\n[{\"cid\r\n12;x=1\r\nr\":\"10.1.0.0/16\"}]\r\n0\r\n\r\n",
        )
        .await;
        let mut p = RoutesPoll::default();
        let got = p.poll(&config(chunked)).await.expect("chunked");
        assert_eq!(got.view.live, cidrs(&["10.1.0.0/16"]));
        assert!(p.conn.is_some(), "a chunked answer keeps the connection");
        let unframed =
            serve_once("HTTP/1.1 200 OK\r\n\r\n[{\"cidr\":\"10.2.0.0/16\",\"offline\":true}]")
                .await;
        let mut p = RoutesPoll::default();
        let got = p.poll(&config(unframed)).await.expect("unframed");
        assert_eq!(got.view.offline, cidrs(&["10.2.0.0/16"]));
        assert!(p.conn.is_none(), "ended by the connection: not kept");
        let busy = serve_once(
            "HTTP/1.1 503 Service Unavailable\r\nContent-Length: 21\r\nRetry-After: 1\r\n\r\nadmin API overloaded\n",
        )
        .await;
        let e = RoutesPoll::default().poll(&config(busy)).await.unwrap_err();
        assert!(e.downcast_ref::<Busy>().is_some(), "{e:#}");
        let away =
            serve_once("HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n").await;
        let e = RoutesPoll::default().poll(&config(away)).await.unwrap_err();
        assert!(e.downcast_ref::<Busy>().is_none(), "{e:#}");
        assert!(format!("{e:#}").contains("503"), "{e:#}");
        // An interim answer (a proxy's 103 Early Hints) before the final
        // one: skipped, and the final one read.
        let hints = serve_once(
            "HTTP/1.1 103 Early Hints\r\nLink: </x>; rel=preload\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 24\r\n\r\n[{\"cidr\":\"10.3.0.0/16\"}]",
        )
        .await;
        let got = RoutesPoll::default()
            .poll(&config(hints))
            .await
            .expect("after a 103");
        assert_eq!(got.view.live, cidrs(&["10.3.0.0/16"]));
        // A chunk size near 2^64 after a first chunk: refused, not a
        // wrapped bound (a panic in the agent's loop).
        let huge = serve_once(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\n[\r\nffffffffffffffff\r\n",
        )
        .await;
        let e = RoutesPoll::default().poll(&config(huge)).await.unwrap_err();
        assert!(format!("{e:#}").contains("longer than"), "{e:#}");
    }

    /// The route agent installs IPv4 routes only: a table holding IPv6
    /// prefixes is read without them, and they are named in a warning
    /// once per distinct set, not on every poll or every change of the
    /// IPv4 part (they used to be dropped without a word).
    #[tokio::test]
    async fn ipv6_prefixes_are_left_out_and_named_once_per_set() {
        let (out, _guard) = relay_transport::test_log::Captured::start();
        let serves = |i: usize, v6: &[&str]| -> Vec<relay_protocol::Cidr> {
            let mut r = vec![crate::admin::tests::edge_prefix(i)];
            r.extend(v6.iter().map(|s| s.to_string()));
            r.iter().map(|c| c.parse().unwrap()).collect()
        };
        let routes = [
            serves(0, &["fd00:99::/64", "fd00:98::/64"]),
            serves(1, &[]),
            serves(2, &["fd00:97::/64"]),
        ];
        let table = routes.clone();
        let (relay, pki) = relay_configured(3, move |c| {
            for (i, r) in table.into_iter().enumerate() {
                c.nodes.insert(format!("edge-{i}"), r);
            }
        })
        .await;
        let cfg = config(relay.admin_addr().expect("admin"));
        let warnings = || {
            out.text()
                .lines()
                .filter(|l| l.contains("WARN") && l.contains("IPv4 routes only"))
                .map(str::to_string)
                .collect::<Vec<_>>()
        };
        let mut poll = RoutesPoll::default();
        let _e0 = StandIn::connect_serving(&relay, &pki, 0, routes[0].clone()).await;
        until_sessions(&relay, 1).await;
        let got = poll.poll(&cfg).await.expect("poll");
        assert_eq!(got.view.live, cidrs(&["10.99.0.1/32"]));
        let w = warnings();
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(
            w[0].contains("prefixes=fd00:98::/64, fd00:99::/64") && w[0].contains("count=2"),
            "{w:?}"
        );
        assert!(!poll.poll(&cfg).await.expect("poll").changed);
        // The IPv4 part changes, the IPv6 part does not: no new line.
        let _e1 = StandIn::connect_serving(&relay, &pki, 1, routes[1].clone()).await;
        until_sessions(&relay, 2).await;
        let got = poll.poll(&cfg).await.expect("poll");
        assert!(got.changed);
        assert_eq!(got.view.live, cidrs(&["10.99.0.1/32", "10.99.0.2/32"]));
        assert_eq!(warnings().len(), 1, "{:?}", warnings());
        // Another IPv6 set: named.
        let _e2 = StandIn::connect_serving(&relay, &pki, 2, routes[2].clone()).await;
        until_sessions(&relay, 3).await;
        poll.poll(&cfg).await.expect("poll");
        let w = warnings();
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(
            w[1].contains("fd00:97::/64") && w[1].contains("count=3"),
            "{w:?}"
        );
        relay.shutdown(Duration::ZERO).await;
    }
}
