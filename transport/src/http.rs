//! Serving a small HTTP API (the relay's admin API, the edge's status
//! endpoint) with every request head bounded.
//!
//! `axum::serve` sets no timer, so hyper's header read timeout never fires
//! there: a client that trickles its request head (or sends none) would
//! hold its fd and task for as long as it likes, as many times as it
//! likes. [`serve`] drives each connection with hyper's HTTP/1.1 builder
//! and a timer instead. Each request carries its connection's peer address
//! (`axum::extract::ConnectInfo<L::Addr>`), as `axum::serve` gives it, for
//! handlers that log who asked.

use std::time::Duration;

use axum::Router;
use tokio_util::sync::CancellationToken;

/// Serves HTTP/1.1 connections from `l` with `app` until `stop`, each
/// request head bounded by `head_timeout`; then closes idle connections
/// and waits for requests in flight (which the caller's router bounds).
pub async fn serve<L>(mut l: L, app: Router, head_timeout: Duration, stop: CancellationToken)
where
    L: axum::serve::Listener,
    L::Addr: Clone + Send + Sync + 'static,
{
    let mut conns = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            (io, peer) = l.accept() => {
                let inner = hyper_util::service::TowerToHyperService::new(app.clone());
                let svc = hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
                    req.extensions_mut().insert(axum::extract::ConnectInfo(peer.clone()));
                    hyper::service::Service::call(&inner, req)
                });
                let stop = stop.clone();
                conns.spawn(async move {
                    let conn = hyper::server::conn::http1::Builder::new()
                        .timer(hyper_util::rt::TokioTimer::new())
                        .header_read_timeout(head_timeout)
                        .serve_connection(hyper_util::rt::TokioIo::new(io), svc);
                    tokio::pin!(conn);
                    tokio::select! {
                        r = conn.as_mut() => {
                            if let Err(e) = r {
                                tracing::debug!(error = %e, "HTTP connection ended");
                            }
                        }
                        _ = stop.cancelled() => {
                            conn.as_mut().graceful_shutdown();
                            let _ = conn.await;
                        }
                    }
                });
            }
        }
    }
    while conns.join_next().await.is_some() {}
}
