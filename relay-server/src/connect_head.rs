//! The CONNECT request head: reading it (bounded), parsing it, and the
//! authority it names (an address, or a node or Service name).

use std::net::SocketAddr;

use tokio::io::{AsyncRead, AsyncReadExt};

#[derive(Debug)]
pub(crate) enum HeadError {
    TooLarge,
    Closed,
    Io(std::io::Error),
}

/// Reads until the blank line ending the header, never more than `max`
/// bytes. Returns the buffer, which holds the whole head (checked by
/// [`parse_request_head`]) and possibly bytes after it (a client that did
/// not wait for the 200), kept for the tunnel.
pub(crate) async fn read_head<S: AsyncRead + Unpin>(
    s: &mut S,
    max: usize,
) -> Result<Vec<u8>, HeadError> {
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    loop {
        if buf.len() >= max {
            return Err(HeadError::TooLarge);
        }
        let want = chunk.len().min(max - buf.len());
        let n = s.read(&mut chunk[..want]).await.map_err(HeadError::Io)?;
        if n == 0 {
            return Err(HeadError::Closed);
        }
        // Only the new bytes (and the 3 before them) are searched, so a
        // client sending one byte at a time costs O(max), not O(max²).
        let from = buf.len().saturating_sub(3);
        buf.extend_from_slice(&chunk[..n]);
        if buf[from..].windows(4).any(|w| w == b"\r\n\r\n") {
            return Ok(buf);
        }
    }
}

/// A CONNECT request head, parsed by [`parse_request_head`].
#[derive(Debug, PartialEq, Eq)]
pub struct RequestHead {
    /// Bytes of head up to and including the blank line; what follows in
    /// the buffer belongs to the tunnel.
    pub len: usize,
    /// The request target as sent (`host:port`).
    pub authority: String,
    /// The request target, parsed by [`parse_authority`].
    pub target: Authority,
}

/// Why a request head was refused; each maps to one HTTP answer.
#[derive(Debug, PartialEq, Eq)]
pub enum HeadProblem {
    /// No blank line within the first `max` bytes (431).
    TooLarge,
    /// A well-formed request with another method than CONNECT (405).
    Method(String),
    /// Not an HTTP/1.1 CONNECT request, or its target is not a valid
    /// `host:port` (400); the text says which.
    Malformed(String),
}

/// Parses the head of a CONNECT request from the bytes received so far:
/// the request line and headers up to the first blank line, which must end
/// within the first `max` bytes (bytes after it are not looked at). Pure,
/// so it can be fuzzed (`fuzz/fuzz_targets/connect_head.rs`); the ingress
/// calls it on what `read_head` returned.
pub fn parse_request_head(buf: &[u8], max: usize) -> Result<RequestHead, HeadProblem> {
    let window = &buf[..buf.len().min(max)];
    let len = window
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| i + 4)
        .ok_or(HeadProblem::TooLarge)?;
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    let authority = match req.parse(&buf[..len]) {
        Ok(httparse::Status::Complete(_)) => match (req.method, req.path) {
            (Some("CONNECT"), Some(path)) if !path.is_empty() => path.to_string(),
            (Some(m), _) if m != "CONNECT" => {
                return Err(HeadProblem::Method(format!(
                    "method {m} not supported; use CONNECT host:port"
                )))
            }
            _ => String::new(),
        },
        Ok(httparse::Status::Partial) | Err(_) => String::new(),
    };
    if authority.is_empty() {
        return Err(HeadProblem::Malformed(
            "not an HTTP/1.1 CONNECT request".into(),
        ));
    }
    let target = parse_authority(&authority).map_err(HeadProblem::Malformed)?;
    Ok(RequestHead {
        len,
        authority,
        target,
    })
}

/// Where a CONNECT authority points.
#[derive(Debug, PartialEq, Eq)]
pub enum Authority {
    /// An IP literal.
    Ip(SocketAddr),
    /// A name (node name, later service names), lower-cased.
    Name(String, u16),
}

/// Parses `host:port`, `[v6]:port` or `name:port`.
pub fn parse_authority(a: &str) -> Result<Authority, String> {
    if let Ok(sa) = a.parse::<SocketAddr>() {
        if sa.port() == 0 {
            return Err(format!("port 0 in {a:?}"));
        }
        return Ok(Authority::Ip(sa));
    }
    let (host, port) = a
        .rsplit_once(':')
        .ok_or_else(|| format!("{a:?} is not host:port"))?;
    // Digits only: `u16::from_str` also takes a leading `+`, which would
    // turn `10.0.0.1:+80` (not a socket address) into a node name.
    let port: u16 = Some(port)
        .filter(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|p| p.parse().ok())
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("bad port in {a:?}"))?;
    let valid = !host.is_empty()
        && host.len() <= 253
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_');
    if !valid {
        return Err(format!("bad host in {a:?}"));
    }
    Ok(Authority::Name(host.to_ascii_lowercase(), port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authorities() {
        assert_eq!(
            parse_authority("10.0.0.1:80"),
            Ok(Authority::Ip("10.0.0.1:80".parse().unwrap()))
        );
        assert_eq!(
            parse_authority("[fd00::1]:10250"),
            Ok(Authority::Ip("[fd00::1]:10250".parse().unwrap()))
        );
        assert_eq!(
            parse_authority("Edge-1:10250"),
            Ok(Authority::Name("edge-1".into(), 10250))
        );
        assert!(parse_authority("edge-1").is_err());
        assert!(parse_authority("edge-1:0").is_err());
        assert!(parse_authority("edge-1:99999").is_err());
        assert!(parse_authority(":80").is_err());
        assert!(parse_authority("a b:80").is_err());
        assert!(parse_authority("10.0.0.1:0").is_err());
    }

    /// Found by `fuzz/fuzz_targets/connect_head.rs`: a signed port made an
    /// IP literal a node name (`Name("2.18.1.10", 22)`).
    #[test]
    fn signed_ports_are_refused() {
        assert!(parse_authority("2.18.1.10:+22").is_err());
        assert!(parse_authority("edge-1:+22").is_err());
        assert!(parse_authority("edge-1:-22").is_err());
        assert_eq!(
            parse_authority("edge-1:022"),
            Ok(Authority::Name("edge-1".into(), 22))
        );
        assert_eq!(
            parse_request_head(b"CONNECT 2.18.1.10:+22 HTTP/1.1\r\n\r\n", 7937),
            Err(HeadProblem::Malformed(
                "bad port in \"2.18.1.10:+22\"".into()
            ))
        );
    }

    #[tokio::test]
    async fn head_reader_bounds_and_keeps_pipelined_bytes() {
        let mut r: &[u8] = b"CONNECT a:1 HTTP/1.1\r\n\r\nEXTRA";
        let buf = read_head(&mut r, 1024).await.unwrap();
        let head = parse_request_head(&buf, 1024).unwrap();
        assert_eq!(&buf[head.len..], b"EXTRA");
        assert_eq!(head.target, Authority::Name("a".into(), 1));
        let long = vec![b'a'; 5000];
        let mut r: &[u8] = &long;
        assert!(matches!(
            read_head(&mut r, 4096).await,
            Err(HeadError::TooLarge)
        ));
        let mut r: &[u8] = b"CONNECT a:1 HTTP/1.1\r\n";
        assert!(matches!(
            read_head(&mut r, 4096).await,
            Err(HeadError::Closed)
        ));
        // One byte at a time still finds the end of the head.
        let mut r = tokio_test_reader(b"CONNECT a:1 HTTP/1.1\r\nHost: a:1\r\n\r\n");
        let buf = read_head(&mut r, 4096).await.unwrap();
        assert!(parse_request_head(&buf, 4096).is_ok());
    }

    /// A reader handing out one byte per read.
    fn tokio_test_reader(b: &'static [u8]) -> impl AsyncRead + Unpin {
        struct OneByte(&'static [u8]);
        impl AsyncRead for OneByte {
            fn poll_read(
                mut self: std::pin::Pin<&mut Self>,
                _: &mut std::task::Context<'_>,
                buf: &mut tokio::io::ReadBuf<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                if let Some((first, rest)) = self.0.split_first() {
                    buf.put_slice(&[*first]);
                    self.0 = rest;
                }
                std::task::Poll::Ready(Ok(()))
            }
        }
        OneByte(b)
    }

    #[test]
    fn request_heads() {
        let ok = parse_request_head(
            b"CONNECT [fd00::1]:10250 HTTP/1.1\r\nHost: x\r\n\r\nrest",
            8192,
        )
        .unwrap();
        assert_eq!(ok.authority, "[fd00::1]:10250");
        assert_eq!(ok.len, 45);
        assert_eq!(
            parse_request_head(b"GET / HTTP/1.1\r\n\r\n", 8192),
            Err(HeadProblem::Method(
                "method GET not supported; use CONNECT host:port".into()
            ))
        );
        assert!(matches!(
            parse_request_head(b"CONNECT edge-1 HTTP/1.1\r\n\r\n", 8192),
            Err(HeadProblem::Malformed(_))
        ));
        assert!(matches!(
            parse_request_head(b"\x00garbage\r\n\r\n", 8192),
            Err(HeadProblem::Malformed(_))
        ));
        // The blank line must end within `max` bytes.
        let head = b"CONNECT a:1 HTTP/1.1\r\n\r\n";
        assert!(parse_request_head(head, head.len()).is_ok());
        assert_eq!(
            parse_request_head(head, head.len() - 1),
            Err(HeadProblem::TooLarge)
        );
    }
}
