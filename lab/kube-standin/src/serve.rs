//! The HTTP side of the stand-in: TLS accept loop, request routing,
//! lists and watches (shared resourceVersion history, bookmarks, expiry,
//! injected 410).

#[allow(clippy::wildcard_imports)]
use super::*;

pub(crate) async fn accept_loop(listener: TcpListener, acceptor: TlsAcceptor, shared: Arc<Shared>) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            r = listener.accept() => {
                let Ok((tcp, _)) = r else { continue };
                let acceptor = acceptor.clone();
                let shared = shared.clone();
                conns.spawn(async move {
                    let Ok(Ok(tls)) = tokio::time::timeout(IO_TIMEOUT, acceptor.accept(tcp)).await else {
                        return;
                    };
                    let svc = hyper::service::service_fn(move |req| {
                        let shared = shared.clone();
                        async move { Ok::<_, Infallible>(handle(shared, req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                        .await;
                });
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

pub(crate) async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Response<Body> {
    let started = std::time::Instant::now();
    let method = req.method().as_str().to_string();
    let path = req.uri().path().to_string();
    let query = req.uri().query().map(str::to_string);
    let content_type = req
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let authorized = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v == format!("Bearer {}", shared.bearer));
    let attrs = classify(&method, &path, query.as_deref());
    let body = match tokio::time::timeout(
        IO_TIMEOUT,
        http_body_util::Limited::new(req.into_body(), MAX_BODY).collect(),
    )
    .await
    {
        Ok(Ok(b)) => b.to_bytes(),
        _ => Bytes::new(),
    };
    let (unavailable, permitted, latency) = {
        let st = shared.lock();
        let permitted = st
            .rbac
            .as_ref()
            .is_none_or(|rules| rbac::allowed(rules, attrs.as_ref()));
        let latency = match attrs.as_ref().map(|a| a.verb.as_str()) {
            Some("get" | "list") => st.latency.0,
            Some("create" | "update" | "patch" | "delete" | "deletecollection") => st.latency.1,
            _ => std::time::Duration::ZERO,
        };
        (st.unavailable, permitted, latency)
    };
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    let resp = if unavailable {
        failure(
            StatusCode::SERVICE_UNAVAILABLE,
            "ServiceUnavailable",
            "the server is currently unable to handle the request",
        )
    } else if !authorized {
        failure(StatusCode::UNAUTHORIZED, "Unauthorized", "Unauthorized")
    } else if !permitted {
        let message = match &attrs {
            Some(a) => rbac::forbidden_message(RBAC_USER, a),
            None => format!("forbidden: User {RBAC_USER:?} cannot {method} path {path:?}"),
        };
        failure(StatusCode::FORBIDDEN, "Forbidden", &message)
    } else {
        route(
            &shared,
            attrs.as_ref(),
            query.as_deref(),
            content_type.as_deref(),
            &body,
        )
    };
    shared.lock().log.push(RequestRecord {
        method,
        path,
        query,
        content_type,
        attrs,
        status: resp.status().as_u16(),
        started,
        answered: std::time::Instant::now(),
    });
    resp
}

pub(crate) fn route(
    shared: &Arc<Shared>,
    attrs: Option<&RequestAttributes>,
    query: Option<&str>,
    content_type: Option<&str>,
    body: &Bytes,
) -> Response<Body> {
    let Some(a) = attrs else {
        return failure(
            StatusCode::NOT_FOUND,
            "NotFound",
            "the server could not find the requested resource",
        );
    };
    let q = request::parse_query(query);
    match (
        a.group.as_str(),
        a.resource.as_str(),
        a.subresource.as_deref(),
        a.verb.as_str(),
    ) {
        ("", "nodes", None, "list") => list_nodes(shared),
        ("", "nodes", None, "watch") => watch(shared, &q, Res::Nodes),
        ("", "services", None, "list") if a.name.is_none() => list_of(shared, Res::Services),
        ("", "services", None, "watch") if a.name.is_none() => watch(shared, &q, Res::Services),
        ("discovery.k8s.io", "endpointslices", None, "list") if a.name.is_none() => {
            list_of(shared, Res::EndpointSlices)
        }
        ("discovery.k8s.io", "endpointslices", None, "watch") if a.name.is_none() => {
            watch(shared, &q, Res::EndpointSlices)
        }
        (group, resource, None, "list" | "watch")
            if a.name.is_none()
                && crds::Crd::served_at(group, &a.version, resource)
                    .is_some_and(|c| shared.lock().take_stray_404(c.res())) =>
        {
            failure(
                StatusCode::NOT_FOUND,
                "NotFound",
                "the server could not find the requested resource",
            )
        }
        (group, resource, None, verb @ ("list" | "watch"))
            if a.name.is_none()
                && crds::Crd::served_at(group, &a.version, resource)
                    .is_some_and(|c| shared.lock().custom(c.res()).is_some()) =>
        {
            let res = crds::Crd::served_at(group, &a.version, resource)
                .map_or(Res::Nodes, crds::Crd::res);
            match verb {
                "list" => list_of(shared, res),
                _ => watch(shared, &q, res),
            }
        }
        (group, resource, None, "get")
            if crds::Crd::served_at(group, &a.version, resource)
                .is_some_and(|c| shared.lock().custom(c.res()).is_some()) =>
        {
            let res = crds::Crd::served_at(group, &a.version, resource)
                .map_or(Res::Nodes, crds::Crd::res);
            let name = a.name.clone().unwrap_or_default();
            let obj = shared
                .lock()
                .custom(res)
                .and_then(|m| m.get(&name))
                .cloned();
            match obj {
                Some(o) => json_response(StatusCode::OK, &o),
                None => failure(
                    StatusCode::NOT_FOUND,
                    "NotFound",
                    &format!("{resource}.{group} \"{name}\" not found"),
                ),
            }
        }
        ("", "nodes", None | Some("status"), "get") => {
            let name = a.name.clone().unwrap_or_default();
            match shared.lock().nodes.get(&name) {
                Some(n) => json_response(
                    StatusCode::OK,
                    &serde_json::to_value(n).unwrap_or(Value::Null),
                ),
                None => failure(
                    StatusCode::NOT_FOUND,
                    "NotFound",
                    &format!("nodes \"{name}\" not found"),
                ),
            }
        }
        ("", "nodes", Some("status"), "patch") => {
            if content_type != Some("application/apply-patch+yaml") {
                return failure(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "UnsupportedMediaType",
                    "the stand-in only implements server-side apply on nodes/status",
                );
            }
            apply_node_status(shared, a.name.as_deref().unwrap_or_default(), &q, body)
        }
        ("coordination.k8s.io", "leases", None, _) => leases::handle(shared, a, &q, body),
        ("events.k8s.io", "events", None, verb) => events(shared, a, verb, content_type, body),
        ("authentication.k8s.io", "tokenreviews", None, "create") => token_review(shared, body),
        ("", "pods", None, "get") => {
            let key = (
                a.namespace.clone().unwrap_or_default(),
                a.name.clone().unwrap_or_default(),
            );
            match shared.lock().pods.get(&key) {
                Some(p) => json_response(
                    StatusCode::OK,
                    &serde_json::to_value(p).unwrap_or(Value::Null),
                ),
                None => failure(
                    StatusCode::NOT_FOUND,
                    "NotFound",
                    &format!("pods \"{}\" not found", key.1),
                ),
            }
        }
        _ => failure(
            StatusCode::NOT_FOUND,
            "NotFound",
            "the server could not find the requested resource",
        ),
    }
}

pub(crate) fn list_nodes(shared: &Shared) -> Response<Body> {
    let st = shared.lock();
    let items: Vec<Value> = st.nodes.values().map(list_item).collect();
    json_response(
        StatusCode::OK,
        &json!({"kind": "NodeList", "apiVersion": "v1",
                "metadata": {"resourceVersion": st.rv.to_string()}, "items": items}),
    )
}

/// A Service or EndpointSlice list (all namespaces, or the request's).
pub(crate) fn list_of(shared: &Shared, res: Res) -> Response<Body> {
    let st = shared.lock();
    let items: Vec<Value> = match res {
        Res::Nodes => st.nodes.values().map(list_item).collect(),
        Res::Services => st.services.values().map(list_item).collect(),
        Res::EndpointSlices => st.slices.values().map(list_item).collect(),
        Res::Leases => st.leases.values().map(list_item).collect(),
        Res::BlockAffinities | Res::CiliumNodes | Res::IpamConfigs => st
            .custom(res)
            .into_iter()
            .flatten()
            .map(|(_, o)| list_item(o))
            .collect(),
    };
    let (kind, api_version) = res.kind();
    json_response(
        StatusCode::OK,
        &json!({"kind": format!("{kind}List"), "apiVersion": api_version,
                "metadata": {"resourceVersion": st.rv.to_string()}, "items": items}),
    )
}

/// Synthetic ADDED lines for every stored object of `res`.
pub(crate) fn initial_events(st: &State, res: Res) -> Vec<Bytes> {
    fn line(o: &impl serde::Serialize) -> Bytes {
        Bytes::from(format!("{}\n", json!({"type": "ADDED", "object": o})))
    }
    match res {
        Res::Nodes => st.nodes.values().map(line).collect(),
        Res::Services => st.services.values().map(line).collect(),
        Res::EndpointSlices => st.slices.values().map(line).collect(),
        Res::Leases => st.leases.values().map(line).collect(),
        Res::BlockAffinities | Res::CiliumNodes | Res::IpamConfigs => st
            .custom(res)
            .into_iter()
            .flatten()
            .map(|(_, o)| line(o))
            .collect(),
    }
}

pub(crate) fn gone_line(rv: u64, oldest: u64) -> Bytes {
    let status = status_body(
        410,
        "Expired",
        &format!("too old resource version: {rv} ({oldest})"),
    );
    Bytes::from(format!("{}\n", json!({"type": "ERROR", "object": status})))
}

pub(crate) fn watch(
    shared: &Arc<Shared>,
    q: &BTreeMap<String, String>,
    res: Res,
) -> Response<Body> {
    let timeout = q
        .get("timeoutSeconds")
        .and_then(|s| s.parse::<u64>().ok())
        .unwrap_or(1800);
    let bookmarks = q.get("allowWatchBookmarks").is_some_and(|v| v == "true");
    let from = q
        .get("resourceVersion")
        .and_then(|s| s.parse::<u64>().ok())
        .unwrap_or(0);
    let (tx, mut rx) = mpsc::channel::<Bytes>(64);
    let mut backlog: Vec<Bytes> = Vec::new();
    let mut sub;
    let expired;
    {
        let st = shared.lock();
        // Subscribe under the lock: no event falls between backlog and live.
        sub = shared.watch_tx.subscribe();
        expired = from != 0 && from < st.oldest_rv;
        if from == 0 {
            // "Any" resourceVersion: a synthetic ADDED per object first.
            backlog = initial_events(&st, res);
        } else if expired {
            backlog.push(gone_line(from, st.oldest_rv));
        } else {
            let newer = st
                .history
                .iter()
                .filter(|(rv, r, _)| *rv > from && *r == res);
            backlog.extend(newer.map(|(_, _, l)| l.clone()));
        }
    }
    let shared2 = shared.clone();
    tokio::spawn(async move {
        shared2.open_watches.fetch_add(1, Ordering::SeqCst);
        let _ = stream_watch(
            &tx, backlog, expired, &mut sub, timeout, bookmarks, &shared2, res,
        )
        .await;
        shared2.open_watches.fetch_sub(1, Ordering::SeqCst);
    });
    let stream =
        futures::stream::poll_fn(move |cx| rx.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b)))));
    let mut r = Response::new(StreamBody::new(stream).boxed());
    r.headers_mut().insert(
        "content-type",
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

/// Feeds one watch: backlog, then live events, bookmarks, until the
/// timeout, a Gone/Close signal, or the client going away (`Err`).
#[allow(clippy::too_many_arguments)]
pub(crate) async fn stream_watch(
    tx: &mpsc::Sender<Bytes>,
    backlog: Vec<Bytes>,
    expired: bool,
    sub: &mut broadcast::Receiver<Arc<Signal>>,
    timeout: u64,
    bookmarks: bool,
    shared: &Shared,
    res: Res,
) -> Result<(), mpsc::error::SendError<Bytes>> {
    for line in backlog {
        tx.send(line).await?;
    }
    if expired {
        return Ok(());
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(timeout);
    let mut tick = tokio::time::interval(shared.bookmark_interval);
    tick.tick().await;
    let mut hold = shared.hold.subscribe();
    loop {
        // A held watch is a stalled connection: nothing at all goes out.
        let _ = hold.wait_for(|held| !*held).await;
        tokio::select! {
            _ = tokio::time::sleep_until(deadline) => return Ok(()),
            _ = tick.tick() => {
                if bookmarks {
                    let rv = shared.lock().rv;
                    let (kind, api_version) = res.kind();
                    let line = json!({"type": "BOOKMARK", "object": {"kind": kind, "apiVersion": api_version,
                        "metadata": {"resourceVersion": rv.to_string()}}});
                    tx.send(Bytes::from(format!("{line}\n"))).await?;
                } else if tx.is_closed() {
                    return Ok(());
                }
            }
            sig = sub.recv() => match sig {
                Ok(s) => match &*s {
                    Signal::Event(r, line) if *r == res => tx.send(line.clone()).await?,
                    Signal::Event(..) => {}
                    Signal::Gone => {
                        let (rv, oldest) = { let st = shared.lock(); (st.rv, st.oldest_rv) };
                        tx.send(gone_line(rv.saturating_sub(1), oldest)).await?;
                        return Ok(());
                    }
                    Signal::Close => return Ok(()),
                },
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    // Too slow a watcher: the apiserver also ends it with 410.
                    let rv = shared.lock().rv;
                    tx.send(gone_line(rv, rv)).await?;
                    return Ok(());
                }
                Err(broadcast::error::RecvError::Closed) => return Ok(()),
            }
        }
    }
}
