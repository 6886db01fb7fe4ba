//! Tests of the CONNECT ingress: accepted sockets' options, the accept
//! queue, the status mapping.

use super::*;

#[tokio::test]
async fn accepted_connect_sockets_have_keepalive() {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    tune_listener(&l);
    let c = tokio::net::TcpStream::connect(l.local_addr().unwrap())
        .await
        .unwrap();
    let (s, _) = l.accept().await.unwrap();
    let r = socket2::SockRef::from(&s);
    assert!(
        r.keepalive().unwrap(),
        "no TCP keep-alive on a CONNECT socket"
    );
    // No user timeout: Linux would also abort a client that keeps its
    // window closed that long (a paused `kubectl exec ... | less`).
    assert_eq!(r.tcp_user_timeout().unwrap(), None);
    assert_eq!(
        r.tcp_keepalive_time().unwrap(),
        std::time::Duration::from_secs(10)
    );
    assert!(r.tcp_nodelay().unwrap());
    drop(c);
}

/// Clients the relay has not accepted yet complete their handshake as
/// long as the accept queue has room: 1,000 here (or somaxconn - 1),
/// where `TcpListener::bind`'s 128 let the rest hang in SYN retries.
#[tokio::test]
async fn a_burst_of_clients_fits_the_accept_queue() {
    let somaxconn: usize = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(4096);
    let n = 1000.min(somaxconn - 1);
    let l = bind_tcp("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = l.local_addr().unwrap();
    let mut clients = Vec::new();
    for _ in 0..n {
        let c = tokio::time::timeout(
            std::time::Duration::from_secs(2),
            tokio::net::TcpStream::connect(addr),
        )
        .await;
        clients.push(
            c.expect("handshake not completed: accept queue full")
                .unwrap(),
        );
    }
    assert_eq!(clients.len(), n);
}

#[test]
fn status_mapping() {
    assert_eq!(status_code(StreamStatus::Denied), 403);
    assert_eq!(status_code(StreamStatus::Timeout), 504);
    assert_eq!(status_code(StreamStatus::Refused), 502);
    assert_eq!(status_code(StreamStatus::NoRoute), 502);
    assert_eq!(status_code(StreamStatus::Unreachable), 502);
}
