//! The CONNECT responses: the status line with its reason phrase, the
//! refusals (`busy`, a refused stream, a too large header) and the
//! mapping of stream failures to HTTP statuses ([`status_code`]). Kept
//! apart from the serving path so every answer is written one way.

use relay_protocol::{StreamReply, StreamStatus};
use relay_transport::splice::LocalStream;
use tokio::io::AsyncWriteExt;

use super::Audit;
use crate::server::Shared;

pub(super) async fn busy<S: LocalStream>(mut s: S, shared: &Shared, audit: &mut Audit) {
    audit.answer(503, "busy");
    let _ = tokio::time::timeout(
        std::time::Duration::from_secs(1),
        respond(&mut s, 503, "busy", "too many CONNECT connections", shared),
    )
    .await;
}

fn phrase(code: u16) -> &'static str {
    match code {
        200 => "Connection established",
        400 => "Bad Request",
        403 => "Forbidden",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        431 => "Request Header Fields Too Large",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Error",
    }
}

/// Writes a complete response. For failures the reason phrase carries
/// `<label>: <detail>` and the body repeats it; `Connection: close` follows.
pub(super) async fn respond<S: LocalStream>(
    s: &mut S,
    code: u16,
    label: &str,
    detail: &str,
    shared: &Shared,
) -> std::io::Result<()> {
    shared.metrics.connect_answer(code);
    let text = if code == 200 {
        format!("HTTP/1.1 200 {}\r\n\r\n", phrase(200))
    } else {
        // CR/LF in a detail would let a peer-controlled string split the
        // response; keep it on one line.
        let detail: String = detail
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect();
        let body = format!("{label}: {detail}\n");
        format!(
            "HTTP/1.1 {code} {}: {label}: {detail}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            phrase(code),
            body.len()
        )
    };
    s.write_all(text.as_bytes()).await?;
    if code != 200 {
        s.shutdown().await?;
    }
    Ok(())
}

/// The HTTP status for a stream failure.
pub fn status_code(s: StreamStatus) -> u16 {
    match s {
        StreamStatus::Ok => 200,
        StreamStatus::Denied => 403,
        StreamStatus::Timeout => 504,
        _ => 502,
    }
}

/// Answers a refused CONNECT with the status for `reply` (its label and
/// message in the reason phrase) and notes it in the audit line.
pub(super) async fn refuse<S: LocalStream>(
    s: &mut S,
    audit: &mut Audit,
    reply: &StreamReply,
    shared: &Shared,
) {
    let code = status_code(reply.status);
    audit.answer(code, reply.status.as_str());
    let _ = respond(s, code, reply.status.as_str(), &reply.message, shared).await;
}

pub(super) fn too_large(max: usize) -> String {
    format!("request header exceeds {max} bytes")
}
