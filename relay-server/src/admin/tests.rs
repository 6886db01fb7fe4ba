//! The admin API over real sockets, with stand-in edges: pages of
//! `/v1/sessions`, a second drain of a draining session, the route
//! table's ETag, the scrape's own request slots, and the read-only token.

use super::same;

#[test]
fn token_comparison() {
    assert!(same(b"0123456789abcdef", b"0123456789abcdef"));
    assert!(!same(b"0123456789abcdef", b"0123456789abcdeF"));
    // Prefixes and different lengths are rejected like any other
    // wrong token (no early length check to time).
    assert!(!same(b"0123456789abcdef", b"0123456789abcdef0"));
    assert!(!same(b"0123456789abcdef", b""));
    assert!(!same(b"", b"x"));
}

#[test]
fn routes_not_captured_yet_are_not_offered_to_route_agents() {
    use crate::registry::RouteRow;
    let row = |c: &str, n: &str| RouteRow {
        cidr: c.parse().unwrap(),
        node: n.into(),
        session_id: 1,
        offline: false,
    };
    let rows = vec![
        row("10.244.7.0/24", "edge-1"),
        row("10.244.8.0/24", "edge-2"),
    ];
    // Capture off: every registered route, nothing left out.
    assert_eq!(super::routable(rows.clone(), None), (rows.clone(), 0));
    // Capture on, edge-2's prefix registered but not installed yet.
    let captured = ["10.244.7.0/24".parse().unwrap()].into();
    let (some, left_out) = super::routable(rows.clone(), Some(&captured));
    assert_eq!(some, vec![rows[0].clone()]);
    assert_ne!(left_out, 0, "what is left out moves the ETag");
    // Nothing installed yet (a replica just started).
    let (none, none_out) = super::routable(rows.clone(), Some(&Default::default()));
    assert!(none.is_empty());
    assert!(none_out != 0 && none_out != left_out);
    // Everything installed: as with capture off.
    let all = rows.iter().map(|r| r.cidr).collect();
    assert_eq!(super::routable(rows.clone(), Some(&all)), (rows, 0));
}

#[test]
fn if_none_match_is_compared_weakly_and_in_lists() {
    use axum::http::HeaderValue;
    let etag = super::routes_etag(0xabc, 7, true, 0);
    assert_eq!(etag, "\"0000000000000abc.7.1.0\"");
    let m = |v: &str| super::etag_matches(&HeaderValue::from_str(v).unwrap(), &etag);
    assert!(m(&etag));
    assert!(m(&format!("W/{etag}")));
    assert!(m(&format!("\"x\", {etag}")));
    assert!(m("*"));
    assert!(!m("\"0000000000000abc.7.0.0\""));
    assert!(!m(""));
    // Each part moves it.
    assert_ne!(etag, super::routes_etag(0xabd, 7, true, 0));
    assert_ne!(etag, super::routes_etag(0xabc, 8, true, 0));
    assert_ne!(etag, super::routes_etag(0xabc, 7, false, 0));
    assert_ne!(etag, super::routes_etag(0xabc, 7, true, 5));
}

/// A relay on loopback whose `[nodes]` are `edge-0` … `edge-{n-1}`, each
/// allowed its `10.99.0.<i+1>/32`, and the PKI its stand-in edges use.
pub(crate) async fn relay_with_nodes(
    n: usize,
) -> (crate::Relay, relay_transport::devcerts::DevPki) {
    relay_configured(n, |_| {}).await
}

/// [`relay_with_nodes`] with `f` changing its configuration first.
pub(crate) async fn relay_configured(
    n: usize,
    f: impl FnOnce(&mut crate::RelayConfig),
) -> (crate::Relay, relay_transport::devcerts::DevPki) {
    relay_transport::tls::install_default_provider();
    let names: Vec<String> = (0..n).map(|i| format!("edge-{i}")).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let pki = relay_transport::devcerts::DevPki::generate(&["localhost"], &refs).expect("pki");
    let mut cfg = crate::RelayConfig::loopback(pki.relay_material().expect("material"));
    for (i, name) in names.iter().enumerate() {
        cfg.nodes
            .insert(name.clone(), vec![edge_prefix(i).parse().expect("cidr")]);
    }
    f(&mut cfg);
    (crate::Relay::spawn(cfg).await.expect("relay"), pki)
}

pub(crate) fn edge_prefix(i: usize) -> String {
    format!("10.99.0.{}/32", i + 1)
}

/// A hand-driven edge session of `edge-<i>` over QUIC: registers its
/// prefix, holds its control stream, and accepts every stream the relay
/// opens to it (answering ok and holding it open) until dropped.
pub(crate) struct StandIn {
    conn: relay_transport::TunnelConn,
    _control: relay_transport::BiStream,
    accept: tokio::task::JoinHandle<()>,
}

impl StandIn {
    pub(crate) async fn connect(
        relay: &crate::Relay,
        pki: &relay_transport::devcerts::DevPki,
        i: usize,
    ) -> Self {
        let routes = vec![edge_prefix(i).parse().expect("cidr")];
        StandIn::connect_serving(relay, pki, i, routes).await
    }

    /// [`StandIn::connect`] advertising `routes` instead of its prefix.
    pub(crate) async fn connect_serving(
        relay: &crate::Relay,
        pki: &relay_transport::devcerts::DevPki,
        i: usize,
        routes: Vec<relay_protocol::Cidr>,
    ) -> Self {
        use relay_protocol::codec::{encode_frame, read_frame, write_frame};
        use relay_protocol::{ClientHello, HelloReply, StreamOpen, StreamReply};
        use tokio::io::AsyncWriteExt;
        let node = format!("edge-{i}");
        let tls = pki.node_material(&node).expect("node material");
        let ep = relay_transport::quic::client_endpoint(
            "127.0.0.1:0".parse().expect("addr"),
            &tls,
            &relay_transport::QuicTuning::default(),
            0,
        )
        .expect("endpoint");
        let conn = relay_transport::TunnelConn::Quic(
            ep.connect(relay.quic_addr(), "localhost")
                .expect("connect")
                .await
                .expect("QUIC handshake"),
        );
        let mut control = conn.open_bi().await.expect("control stream");
        let hello = ClientHello {
            version: relay_protocol::PROTOCOL_VERSION,
            node,
            routes,
            primary_addr: None,
            capabilities: relay_protocol::capability::EXTENSIBLE,
            agent: "admin tests".into(),
            fallbacks: 0,
        };
        control
            .send
            .write_all(&encode_frame(&hello).expect("encode"))
            .await
            .expect("send hello");
        match read_frame::<_, HelloReply>(&mut control.recv)
            .await
            .expect("hello reply")
        {
            HelloReply::Accepted(_) => {}
            HelloReply::Rejected(r) => panic!("stand-in edge {i} refused: {}", r.message),
        }
        let streams = conn.clone();
        let accept = tokio::spawn(async move {
            let _ep = ep;
            let mut held = Vec::new();
            while let Ok(mut bi) = streams.accept_bi().await {
                if read_frame::<_, StreamOpen>(&mut bi.recv).await.is_ok()
                    && write_frame(&mut bi.send, &StreamReply::ok()).await.is_ok()
                {
                    held.push(bi);
                }
            }
        });
        StandIn {
            conn,
            _control: control,
            accept,
        }
    }
}

impl Drop for StandIn {
    fn drop(&mut self) {
        self.conn.close(0, "done");
        self.accept.abort();
    }
}

/// `method path` over plain HTTP/1.1; `(status, body)`.
async fn request(addr: std::net::SocketAddr, method: &str, path: &str) -> (u16, String) {
    let (status, _, body) = request_with(addr, method, path, &[]).await;
    (status, body)
}

/// [`request`] with `headers` (`Name: value` lines); `(status, head,
/// body)`.
pub(crate) async fn request_with(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    headers: &[&str],
) -> (u16, String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let extra: String = headers.iter().map(|h| format!("{h}\r\n")).collect();
    s.write_all(
        format!("{method} {path} HTTP/1.1\r\nHost: admin\r\n{extra}Connection: close\r\n\r\n")
            .as_bytes(),
    )
    .await
    .expect("write");
    let mut out = String::new();
    tokio::time::timeout(
        std::time::Duration::from_secs(10),
        s.read_to_string(&mut out),
    )
    .await
    .expect("answer in time")
    .expect("read");
    let status = out
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    (status, head.to_string(), body.to_string())
}

/// The value of header `name` in `head` (case-insensitive name).
fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().find_map(|l| {
        let (n, v) = l.split_once(':')?;
        n.eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// Until the registry holds `n` sessions (registration follows the
/// hello reply closely, but not in lockstep).
pub(crate) async fn until_sessions(relay: &crate::Relay, n: usize) {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    while relay.shared().registry.len() != n {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} sessions, want {n}",
            relay.shared().registry.len()
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

fn nodes(rows: &[super::SessionRow]) -> Vec<&str> {
    rows.iter().map(|r| r.node.as_str()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_are_paged_by_node_name_and_the_unpaged_list_keeps_its_shape() {
    let (relay, pki) = relay_with_nodes(5).await;
    let admin = relay.admin_addr().expect("admin");
    let mut edges = Vec::new();
    // Registered out of name order: pages follow names, not arrival.
    for i in [3, 0, 4, 1, 2] {
        edges.push(StandIn::connect(&relay, &pki, i).await);
    }
    until_sessions(&relay, 5).await;
    // No pagination asked for: the whole list, a JSON array as before.
    let (code, body) = request(admin, "GET", "/v1/sessions").await;
    assert_eq!(code, 200, "{body}");
    let all: Vec<super::SessionRow> = serde_json::from_str(&body).expect("array");
    assert_eq!(
        nodes(&all),
        ["edge-0", "edge-1", "edge-2", "edge-3", "edge-4"]
    );
    // Page by page, each `next` the last node of its page.
    let page = |body: &str| -> super::SessionsPage { serde_json::from_str(body).expect("page") };
    let (code, body) = request(admin, "GET", "/v1/sessions?limit=2").await;
    assert_eq!(code, 200, "{body}");
    let p = page(&body);
    assert_eq!(
        (nodes(&p.sessions), p.next.as_deref()),
        (vec!["edge-0", "edge-1"], Some("edge-1"))
    );
    let (_, body) = request(admin, "GET", "/v1/sessions?limit=2&after=edge-1").await;
    let p = page(&body);
    assert_eq!(
        (nodes(&p.sessions), p.next.as_deref()),
        (vec!["edge-2", "edge-3"], Some("edge-3"))
    );
    let (_, body) = request(admin, "GET", "/v1/sessions?after=edge-3&limit=2").await;
    let p = page(&body);
    assert_eq!(
        (nodes(&p.sessions), p.next.as_deref()),
        (vec!["edge-4"], None)
    );
    assert!(body.contains("\"next\":null"), "{body}");
    // `after` alone: up to the ceiling.
    let (_, body) = request(admin, "GET", "/v1/sessions?after=edge-2").await;
    assert_eq!(nodes(&page(&body).sessions), ["edge-3", "edge-4"]);
    let ceiling = format!("/v1/sessions?limit={}", super::MAX_SESSIONS_PAGE);
    assert_eq!(request(admin, "GET", &ceiling).await.0, 200);
    // Bad limits: 400, saying what is accepted.
    let over = format!("/v1/sessions?limit={}", super::MAX_SESSIONS_PAGE + 1);
    for path in [
        "/v1/sessions?limit=0",
        "/v1/sessions?limit=ten",
        "/v1/sessions?limit=-2",
        &over,
    ] {
        let (code, body) = request(admin, "GET", path).await;
        assert_eq!(code, 400, "{path}: {body}");
        assert!(
            body.contains("limit must be a whole number from 1 to 1000"),
            "{path}: {body}"
        );
    }
    drop(edges);
    relay.shutdown(std::time::Duration::ZERO).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_drain_of_a_draining_session_is_refused_naming_the_first() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (relay, pki) = relay_with_nodes(1).await;
    let admin = relay.admin_addr().expect("admin");
    let edge = StandIn::connect(&relay, &pki, 0).await;
    until_sessions(&relay, 1).await;
    // A stream held open through CONNECT: without one, a drain closes the
    // session at once and there is nothing left to drain twice.
    let mut client = tokio::net::TcpStream::connect(relay.connect_addr().expect("connect"))
        .await
        .expect("connect");
    client
        .write_all(b"CONNECT 10.99.0.1:80 HTTP/1.1\r\nHost: 10.99.0.1:80\r\n\r\n")
        .await
        .expect("write");
    let mut head = [0u8; 12];
    client.read_exact(&mut head).await.expect("CONNECT answer");
    assert_eq!(&head, b"HTTP/1.1 200", "{}", String::from_utf8_lossy(&head));
    let (code, body) = request(admin, "DELETE", "/v1/sessions/edge-0?drain=true&grace=60s").await;
    assert_eq!(code, 202, "{body}");
    assert_eq!(body, "draining node edge-0 (grace 60s)\n");
    // Asked again with a shorter grace: the first drain's deadline holds,
    // and the answer says so instead of claiming the new grace.
    let (code, body) = request(admin, "DELETE", "/v1/sessions/edge-0?drain=true&grace=1s").await;
    assert_eq!(code, 409, "{body}");
    assert!(
        body.starts_with("session of node edge-0 is already draining since "),
        "{body}"
    );
    assert!(
        body.contains("with grace 60s; grace 1s not applied"),
        "{body}"
    );
    let (code, body) = request(admin, "GET", "/v1/sessions/edge-0").await;
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("\"draining\":true"), "{body}");
    // Closing it outright still works.
    let (code, body) = request(admin, "DELETE", "/v1/sessions/edge-0").await;
    assert_eq!(code, 200, "{body}");
    drop((client, edge));
    relay.shutdown(std::time::Duration::ZERO).await;
}

/// `GET /v1/routes` answers `If-None-Match` with 304 while the table is
/// the same, and 200 with a new ETag once a session registers, once it
/// ends (its routes held offline), and from a restarted relay, whose
/// change counter starts again where an earlier process's did.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_answer_304_until_they_change_and_never_across_a_restart() {
    const ROUTES: &str = "/v1/routes?offline=1";
    let hold = |c: &mut crate::RelayConfig| c.hold_offline_routes = true;
    let (relay, pki) = relay_configured(1, hold).await;
    let admin = relay.admin_addr().expect("admin");
    let (code, head, body) = request_with(admin, "GET", ROUTES, &[]).await;
    assert_eq!((code, body.as_str()), (200, "[]"), "{head}");
    let first = header(&head, "etag").expect("an ETag").to_string();
    let if_none = |e: &str| format!("If-None-Match: {e}");
    // Unchanged: 304, no body, the same ETag.
    let (code, head, body) = request_with(admin, "GET", ROUTES, &[&if_none(&first)]).await;
    assert_eq!((code, body.as_str()), (304, ""), "{head}");
    assert_eq!(header(&head, "etag"), Some(first.as_str()));
    // The live-only list is another answer, with another ETag.
    let (code, head, _) = request_with(admin, "GET", "/v1/routes", &[&if_none(&first)]).await;
    assert_eq!(code, 200, "{head}");
    // A session registers: the table changed.
    let edge = StandIn::connect(&relay, &pki, 0).await;
    until_sessions(&relay, 1).await;
    let (code, head, body) = request_with(admin, "GET", ROUTES, &[&if_none(&first)]).await;
    assert_eq!(code, 200, "{head}");
    assert!(
        body.contains("10.99.0.1/32") && !body.contains("offline"),
        "{body}"
    );
    let live = header(&head, "etag").expect("an ETag").to_string();
    assert_ne!(live, first);
    let (code, _, _) = request_with(admin, "GET", ROUTES, &[&if_none(&live)]).await;
    assert_eq!(code, 304);
    // Each 304 counted (two so far), the 200s not.
    let not_modified = |relay: &crate::Relay| {
        relay
            .shared()
            .metrics
            .routes_not_modified
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    assert_eq!(not_modified(&relay), 2);
    // It ends: its routes are held offline, another table.
    drop(edge);
    until_sessions(&relay, 0).await;
    let (code, head, body) = request_with(admin, "GET", ROUTES, &[&if_none(&live)]).await;
    assert_eq!(code, 200, "{head}");
    assert!(body.contains("\"offline\":true"), "{body}");
    relay.shutdown(std::time::Duration::ZERO).await;
    // A restarted relay (the same configuration, no session yet, as the
    // first one was when it gave `first`): not a match.
    let (relay, _pki) = relay_configured(1, hold).await;
    let admin = relay.admin_addr().expect("admin");
    let (code, head, body) = request_with(admin, "GET", ROUTES, &[&if_none(&first)]).await;
    assert_eq!((code, body.as_str()), (200, "[]"), "{head}");
    assert_ne!(header(&head, "etag"), Some(first.as_str()));
    relay.shutdown(std::time::Duration::ZERO).await;
}

/// `/metrics` (and the probes) have request slots of their own: with
/// every slot of `/v1/*` taken, `/v1/routes` is shed with 503 and a
/// scrape still answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_answer_while_the_api_slots_are_full() {
    let (relay, _pki) = relay_with_nodes(1).await;
    let budgets = super::Budgets::default();
    let held = budgets
        .api
        .clone()
        .acquire_many_owned(super::API_SLOTS as u32)
        .await
        .expect("every API slot");
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let admin = l.local_addr().expect("addr");
    let stop = tokio_util::sync::CancellationToken::new();
    let served = tokio::spawn(relay_transport::http::serve(
        l,
        super::router_with(relay.shared().clone(), budgets),
        std::time::Duration::from_secs(5),
        stop.clone(),
    ));
    let (code, head, body) = request_with(admin, "GET", "/v1/routes?offline=1", &[]).await;
    assert_eq!((code, body.as_str()), (503, super::OVERLOADED), "{head}");
    assert_eq!(header(&head, "retry-after"), Some("1"));
    let (code, body) = request(admin, "GET", "/metrics").await;
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("relay_sessions"), "{body}");
    // The shed request is counted against its budget, none timed out.
    assert!(
        body.contains("relay_admin_requests_shed_total{budget=\"api\"} 1\n")
            && body.contains("relay_admin_requests_shed_total{budget=\"scrape\"} 0\n")
            && body.contains("relay_admin_requests_timed_out_total{budget=\"api\"} 0\n"),
        "{body}"
    );
    for probe in ["/healthz", "/readyz"] {
        assert_ne!(request(admin, "GET", probe).await.0, 503, "{probe}");
    }
    drop(held);
    assert_eq!(request(admin, "GET", "/v1/routes").await.0, 200);
    stop.cancel();
    served.await.expect("served");
    relay.shutdown(std::time::Duration::ZERO).await;
}

/// With `admin.read_token_file`, the read-only token reads (`GET`,
/// `/metrics`) and is refused with 403 for closing or draining a session;
/// the full token does both, and the close is logged naming its caller.
#[tokio::test]
async fn the_read_only_token_reads_and_cannot_close_sessions() {
    const FULL: &str = "full-token-0123456789";
    const READ: &str = "read-token-0123456789";
    let (out, _guard) = relay_transport::test_log::Captured::start();
    let (relay, pki) = relay_configured(1, |c| {
        c.admin_token = Some(crate::config::Secret::new(FULL));
        c.admin_read_token = Some(crate::config::Secret::new(READ));
    })
    .await;
    let admin = relay.admin_addr().expect("admin");
    let edge = StandIn::connect(&relay, &pki, 0).await;
    until_sessions(&relay, 1).await;
    let bearer = |t: &str| format!("Authorization: Bearer {t}");
    let (read, full) = (bearer(READ), bearer(FULL));
    for path in [
        "/v1/sessions",
        "/v1/sessions/edge-0",
        "/v1/routes?offline=1",
        "/v1/replicas",
        "/metrics",
    ] {
        let (code, head, _) = request_with(admin, "GET", path, &[&read]).await;
        assert_eq!(code, 200, "{path} with the read-only token: {head}");
        let (code, _, _) =
            request_with(admin, "GET", path, &[&bearer("wrong-token-0123456789")]).await;
        assert_eq!(code, 401, "{path} with a wrong token");
    }
    for path in ["/v1/sessions/edge-0", "/v1/sessions/edge-0?drain=true"] {
        let (code, _, body) = request_with(admin, "DELETE", path, &[&read]).await;
        assert_eq!(code, 403, "{path}: {body}");
        assert!(body.contains("needs the full token"), "{body}");
    }
    assert_eq!(relay.shared().registry.len(), 1, "the session is still up");
    assert!(
        !relay
            .shared()
            .registry
            .get("edge-0")
            .expect("session")
            .is_draining(),
        "and not draining"
    );
    let (code, _, body) = request_with(admin, "DELETE", "/v1/sessions/edge-0", &[&full]).await;
    assert_eq!(code, 200, "{body}");
    until_sessions(&relay, 0).await;
    let log = out.text();
    let closed = log
        .lines()
        .find(|l| l.contains("admin: closing a session"))
        .unwrap_or_else(|| panic!("no close logged:\n{log}"));
    assert!(
        closed.contains("node=edge-0")
            && closed.contains("127.0.0.1:")
            && closed.contains("(full token)"),
        "{closed}"
    );
    let refused = log
        .lines()
        .find(|l| l.contains("refused the read-only token"))
        .unwrap_or_else(|| panic!("no refusal logged:\n{log}"));
    assert!(refused.contains("method=DELETE"), "{refused}");
    drop(edge);
    relay.shutdown(std::time::Duration::ZERO).await;
}
