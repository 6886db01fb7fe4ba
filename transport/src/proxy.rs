//! HTTP CONNECT proxies for the TCP fallback: sites whose only way out is
//! a forward proxy (a corporate network, a locked-down shop) reach the
//! relay through it. QUIC cannot cross such a proxy, so the edge still
//! tries QUIC first in `auto` mode and uses the proxy for TLS over TCP.
//!
//! The proxy gets `CONNECT <relay host:port>` with the relay's name as
//! configured (proxies that allow by host name see it; the edge need not
//! resolve it), optionally with Basic credentials; after its `200`, the
//! TLS handshake with the relay runs end to end through it. A proxy that
//! inspects TLS fails that handshake: the relay's certificate is checked
//! against the relay's CA, never the proxy's.

use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use base64::Engine as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The largest proxy response head read (status line and headers), all
/// heads together when interim (1xx) ones come first.
const MAX_HEAD: usize = 8 << 10;

/// The most interim (1xx) response heads skipped before the answer to
/// CONNECT; one more is an error. RFC 9110 (15.2) has a client take any
/// number; a proxy has no reason to send more than one or two, and the
/// bound ends a proxy's stream of them well before [`MAX_HEAD`] would.
const MAX_INTERIM: usize = 8;

/// An HTTP proxy: `http://[user:password@]host[:port]` (port 3128, the
/// usual forward proxy port, when left out).
#[derive(Clone, PartialEq, Eq)]
pub struct HttpProxy {
    /// `host:port` to dial.
    pub authority: String,
    /// `Proxy-Authorization` value (`Basic …`), if credentials were given.
    auth: Option<String>,
}

impl fmt::Debug for HttpProxy {
    // Credentials never reach logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self}")
    }
}

impl fmt::Display for HttpProxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let creds = if self.auth.is_some() { "***@" } else { "" };
        write!(f, "http://{creds}{}", self.authority)
    }
}

impl HttpProxy {
    /// Parses `[http://][user:password@]host[:port][/]` (the scheme in any
    /// case, or none, as curl and Go take `https_proxy`); the error says
    /// what is wrong, never echoing what may be a password.
    pub fn parse(url: &str) -> Result<HttpProxy, String> {
        let rest = match url.split_once("://") {
            Some((scheme, rest)) if scheme.eq_ignore_ascii_case("http") => rest,
            Some(_) => return Err("only http:// proxies are supported (the connection to the proxy is plain HTTP; TLS to the relay runs inside it)".into()),
            None => url,
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if rest.contains('/') || rest.contains('?') || rest.contains('#') {
            return Err("must be http://[user:password@]host[:port] with no path".into());
        }
        let (creds, hostport) = match rest.rsplit_once('@') {
            Some((c, h)) => (Some(c), h),
            None => (None, rest),
        };
        if hostport.is_empty() || hostport.starts_with(':') {
            return Err("has no host".into());
        }
        let has_port = match hostport.rsplit_once(':') {
            // `[v6]` alone has a colon inside the brackets.
            Some((h, p)) if !p.contains(']') => {
                // Not echoed: `http://user:secret` (no `@`) puts a
                // password here.
                p.parse::<u16>()
                    .map_err(|_| "the port is not a number from 1 to 65535".to_string())
                    .and_then(|n| if n == 0 { Err("port 0".into()) } else { Ok(()) })?;
                if h.is_empty() {
                    return Err("has no host".into());
                }
                true
            }
            _ => false,
        };
        let authority = if has_port {
            hostport.to_string()
        } else {
            format!("{hostport}:3128")
        };
        let auth = match creds {
            None => None,
            Some(c) => {
                let (user, pass) = c.split_once(':').unwrap_or((c, ""));
                let plain = format!("{}:{}", percent_decode(user)?, percent_decode(pass)?);
                Some(format!(
                    "Basic {}",
                    base64::engine::general_purpose::STANDARD.encode(plain)
                ))
            }
        };
        Ok(HttpProxy { authority, auth })
    }

    /// The proxy the environment names for a connection to `host`, as
    /// curl and Go read it: `https_proxy` or `HTTPS_PROXY`, unless
    /// `no_proxy` or `NO_PROXY` covers `host` (entries of
    /// names, domains, addresses and CIDRs, or `*`). `None` when none
    /// applies.
    pub fn from_env(host: &str) -> Option<Result<HttpProxy, String>> {
        let var = |a: &str, b: &str| {
            std::env::var(a)
                .ok()
                .or_else(|| std::env::var(b).ok())
                .filter(|v| !v.trim().is_empty())
        };
        let url = var("https_proxy", "HTTPS_PROXY")?;
        if no_proxy_covers(var("no_proxy", "NO_PROXY").as_deref(), host) {
            return None;
        }
        Some(HttpProxy::parse(url.trim()))
    }

    /// Asks the proxy, on `s` (connected to it), for a tunnel to
    /// `target` (`host:port`); `Ok` once it answered 2xx. Interim (1xx)
    /// responses before the answer are skipped, as RFC 9110 (15.2) has a
    /// client do, up to 8 of them and within 8 KiB for all heads
    /// together; `101 Switching Protocols` is no interim response (it
    /// would end HTTP on the connection) and, as an answer to CONNECT, a
    /// refusal. Callers bound it in time.
    pub async fn open_tunnel(&self, s: &mut TcpStream, target: &str) -> Result<(), String> {
        let mut req = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n");
        if let Some(a) = &self.auth {
            req.push_str(&format!("Proxy-Authorization: {a}\r\n"));
        }
        req.push_str("\r\n");
        s.write_all(req.as_bytes())
            .await
            .map_err(|e| format!("proxy {self}: write: {e}"))?;
        let mut head = Vec::with_capacity(256);
        // Bytes of the interim heads read before `head`, and how many.
        let (mut before, mut interim) = (0, 0);
        loop {
            self.read_head(s, &mut head, before, interim).await?;
            let line = status_line(&head);
            match status_code(line) {
                Some(code @ 100..=199) if code != 101 => {
                    interim += 1;
                    if interim > MAX_INTERIM {
                        return Err(format!(
                            "proxy {self} sent more than {MAX_INTERIM} interim (1xx) responses to CONNECT {target} without a final one: {}",
                            shown(line)
                        ));
                    }
                    before += head.len();
                    head.clear();
                }
                _ => break,
            }
        }
        let line = status_line(&head);
        match status_code(line) {
            Some(200..=299) => Ok(()),
            Some(407) => Err(format!(
                "proxy {self} wants credentials{} ({})",
                if self.auth.is_some() {
                    " other than those given"
                } else {
                    ""
                },
                shown(line)
            )),
            Some(_) => Err(format!(
                "proxy {self} refused CONNECT {target}: {}",
                shown(line)
            )),
            None => Err(format!(
                "proxy {self} answered CONNECT {target} without an HTTP/1.x status line: {}",
                shown(line)
            )),
        }
    }

    /// Reads one response head from `s` into `head` (empty), up to and
    /// including its blank line, byte by byte: nothing of the tunnel's
    /// own bytes (the relay's TLS) may be consumed here. `before` bytes of
    /// `interim` interim heads were read already and count against
    /// [`MAX_HEAD`].
    async fn read_head(
        &self,
        s: &mut TcpStream,
        head: &mut Vec<u8>,
        before: usize,
        interim: usize,
    ) -> Result<(), String> {
        let mut b = [0u8; 1];
        while !head_ended(head) {
            if before + head.len() >= MAX_HEAD {
                return Err(match interim {
                    0 => format!("proxy {self}: response head over {MAX_HEAD} bytes"),
                    n => format!(
                        "proxy {self}: response head over {MAX_HEAD} bytes ({n} interim 1xx heads included)"
                    ),
                });
            }
            match s.read(&mut b).await {
                Ok(0) => return Err(format!("proxy {self}: closed before answering CONNECT")),
                Ok(_) => head.push(b[0]),
                Err(e) => return Err(format!("proxy {self}: read: {e}")),
            }
        }
        Ok(())
    }
}

/// The most of a proxy's status line an error (and so a log line or
/// `/readyz`) repeats; the rest is cut, so a proxy cannot fill them with
/// its 8 KiB head.
const STATUS_SHOWN: usize = 200;

/// Whether `head` (read so far) ends with a blank line: the end of the
/// response head. Lines end with CRLF or a bare LF, which RFC 9112 (2.2)
/// lets a recipient take as a line's end, so `\r\n\r\n`, `\n\n` and
/// their mixes all end it; a bare CR does not.
fn head_ended(head: &[u8]) -> bool {
    head.ends_with(b"\n\n") || head.ends_with(b"\n\r\n")
}

/// The first line of `head`, without its line end.
fn status_line(head: &[u8]) -> &[u8] {
    let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// The status code of a status line: its first word `HTTP/1.` and a
/// digit (a proxy answering a later 1.x is read as 1.1, RFC 9110 2.5),
/// its second exactly three ASCII digits (RFC 9112 4: no sign, no more
/// digits, nothing else). Words are split on any whitespace, which RFC
/// 9112 4 lets a recipient do. `None` for anything else.
fn status_code(line: &[u8]) -> Option<u16> {
    let mut words = line
        .split(|b| matches!(b, b' ' | b'\t' | 0x0b | 0x0c | b'\r'))
        .filter(|w| !w.is_empty());
    let version = words.next()?;
    let code = words.next()?;
    let minor = version.strip_prefix(b"HTTP/1.")?;
    if !(minor.len() == 1 && minor[0].is_ascii_digit()) {
        return None;
    }
    match code {
        [a, b, c] if code.iter().all(u8::is_ascii_digit) => Some(
            [a, b, c]
                .iter()
                .fold(0, |n, &&d| n * 10 + u16::from(d - b'0')),
        ),
        _ => None,
    }
}

/// `line` as an error shows it: at most [`STATUS_SHOWN`] bytes, printable
/// ASCII as it is and every other byte (control bytes, `\`, non-ASCII)
/// as `\xNN`, with how long it was when cut.
fn shown(line: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut out = String::with_capacity(line.len().min(STATUS_SHOWN) + 32);
    for &b in line.iter().take(STATUS_SHOWN) {
        if (0x20..0x7f).contains(&b) && b != b'\\' {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "\\x{b:02x}");
        }
    }
    if line.len() > STATUS_SHOWN {
        let _ = write!(out, "... ({} bytes)", line.len());
    }
    out
}

/// The first of `addrs` that takes a TCP connection (`dial`), tried in
/// order: one that refuses or is unreachable is passed over at once, a
/// silent one after its share of `budget` (what is left, split evenly over
/// the addresses not tried yet; the last gets all of it). A proxy's name
/// often has several addresses (IPv4 and IPv6, or a pool behind one name),
/// and one of them down must not stop the fallback. The error names every
/// address's failure.
pub(crate) async fn first_connected<F, Fut>(
    addrs: &[SocketAddr],
    budget: Duration,
    dial: F,
) -> Result<TcpStream, String>
where
    F: Fn(SocketAddr) -> Fut,
    Fut: Future<Output = Result<TcpStream, String>>,
{
    let start = Instant::now();
    let mut failed = Vec::with_capacity(addrs.len());
    for (i, &a) in addrs.iter().enumerate() {
        let untried = u32::try_from(addrs.len() - i).unwrap_or(u32::MAX);
        let share = budget.saturating_sub(start.elapsed()) / untried;
        match tokio::time::timeout(share, dial(a)).await {
            Ok(Ok(s)) => return Ok(s),
            Ok(Err(e)) => failed.push(e),
            Err(_) => failed.push(format!("tcp {a}: no answer within {share:?}")),
        }
    }
    Err(if failed.is_empty() {
        "no address".into()
    } else {
        failed.join("; ")
    })
}

/// Whether a `no_proxy` list covers `host` (a name, or an address in
/// brackets or not): `*`, the host itself, a domain it is in (with or
/// without a leading dot), or, for an address, an address or CIDR entry
/// containing it. A `:port` on an entry is ignored.
fn no_proxy_covers(list: Option<&str>, host: &str) -> bool {
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .trim_end_matches('.')
        .to_ascii_lowercase();
    let ip = host.parse::<std::net::IpAddr>().ok();
    list.into_iter()
        .flat_map(|l| l.split(','))
        .map(|e| {
            let e = e.trim();
            // `*.corp.example` (Go's form), `.corp.example`, `corp.example`.
            let e = e.strip_prefix("*.").unwrap_or(e);
            e.trim_start_matches('.').to_ascii_lowercase()
        })
        .filter(|e| !e.is_empty())
        .any(|e| {
            if e == "*" {
                return true;
            }
            // `[v6]:port`, `v4:port`, `name:port`: the host part.
            let bare = match e.strip_prefix('[') {
                Some(r) => r.split(']').next().unwrap_or_default().to_string(),
                None if e.matches(':').count() == 1 => {
                    e.split(':').next().unwrap_or_default().to_string()
                }
                None => e.clone(),
            };
            match (ip, bare.parse::<relay_protocol::Cidr>()) {
                (Some(ip), Ok(net)) => net.contains(&ip),
                (Some(ip), Err(_)) => bare.parse::<std::net::IpAddr>() == Ok(ip),
                (None, _) => host == bare || host.ends_with(&format!(".{bare}")),
            }
        })
}

/// `%XX` escapes in URL credentials.
fn percent_decode(s: &str) -> Result<String, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| "credentials have a bad % escape".to_string())?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "credentials are not UTF-8".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_urls_and_hides_credentials() {
        let p = HttpProxy::parse("http://proxy.corp:8080/").unwrap();
        assert_eq!(
            (p.authority.as_str(), p.auth.is_none()),
            ("proxy.corp:8080", true)
        );
        assert_eq!(
            HttpProxy::parse("http://10.0.0.1").unwrap().authority,
            "10.0.0.1:3128"
        );
        assert_eq!(
            HttpProxy::parse("http://[fd00::1]:3128").unwrap().authority,
            "[fd00::1]:3128"
        );
        assert_eq!(
            HttpProxy::parse("http://[fd00::1]").unwrap().authority,
            "[fd00::1]:3128"
        );
        let p = HttpProxy::parse("http://shop%40x:p%3Ass@proxy:3128").unwrap();
        // base64("shop@x:p:ss")
        assert_eq!(p.auth.as_deref(), Some("Basic c2hvcEB4OnA6c3M="));
        assert_eq!(format!("{p}"), "http://***@proxy:3128");
        assert_eq!(format!("{p:?}"), "http://***@proxy:3128");
        // As curl and Go take `https_proxy`: no scheme, or any case.
        assert_eq!(HttpProxy::parse("p:3128").unwrap().authority, "p:3128");
        assert_eq!(HttpProxy::parse("HTTP://p").unwrap().authority, "p:3128");
        for bad in [
            "https://p:3128",
            "socks5://p",
            "http://",
            "http://p:x",
            "http://p:0",
            "http://p/x",
            "http://:3128",
            "http://u:%zz@p",
            "http://user:secret",
        ] {
            let e = HttpProxy::parse(bad).unwrap_err();
            assert!(!e.contains("zz") && !e.contains("secret"), "{bad}: {e}");
        }
    }

    #[test]
    fn no_proxy_lists_match_hosts_and_domains() {
        assert!(no_proxy_covers(
            Some("*.corp.example"),
            "relay.corp.example"
        ));
        let l = Some("localhost, .corp.example,relay.other ");
        assert!(no_proxy_covers(l, "relay.corp.example"));
        assert!(no_proxy_covers(l, "corp.example"));
        assert!(no_proxy_covers(l, "RELAY.OTHER."));
        assert!(!no_proxy_covers(l, "relay.example"));
        assert!(!no_proxy_covers(l, "notcorp.example"));
        assert!(no_proxy_covers(Some("*"), "anything"));
        assert!(!no_proxy_covers(None, "anything"));
        // Addresses: exactly, in a CIDR entry, with a port on the entry.
        let l = Some("10.0.0.0/8, 192.0.2.7:8443, [fd00::1]");
        assert!(no_proxy_covers(l, "10.1.2.3"));
        assert!(no_proxy_covers(l, "192.0.2.7"));
        assert!(no_proxy_covers(l, "[fd00::1]"));
        assert!(!no_proxy_covers(l, "192.0.2.8"));
        assert!(!no_proxy_covers(l, "relay.example"));
    }

    /// A proxy that answers 200 leaves the stream at the tunnel's first
    /// byte; 407 and other answers are errors that say so.
    #[tokio::test]
    async fn open_tunnel_reads_the_head_and_nothing_more() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let mut answers = vec![
                &b"HTTP/1.1 200 Connection established\r\nVia: x\r\n\r\nTUNNEL"[..],
                b"HTTP/1.1 407 Proxy Authentication Required\r\n\r\n",
                b"HTTP/1.1 403 Forbidden\r\n\r\n",
            ]
            .into_iter();
            let mut heads = Vec::new();
            for answer in answers.by_ref() {
                let (mut s, _) = l.accept().await.unwrap();
                let mut buf = vec![0u8; 1024];
                let n = s.read(&mut buf).await.unwrap();
                heads.push(String::from_utf8_lossy(&buf[..n]).to_string());
                s.write_all(answer).await.unwrap();
            }
            heads
        });
        let p = HttpProxy::parse(&format!("http://u:pw@{addr}")).unwrap();
        let mut s = TcpStream::connect(addr).await.unwrap();
        p.open_tunnel(&mut s, "relay.example:8443").await.unwrap();
        let mut rest = [0u8; 6];
        s.read_exact(&mut rest).await.unwrap();
        assert_eq!(&rest, b"TUNNEL");
        for want in [
            "wants credentials other than those given",
            "refused CONNECT relay.example:8443: HTTP/1.1 403 Forbidden",
        ] {
            let mut s = TcpStream::connect(addr).await.unwrap();
            let e = p
                .open_tunnel(&mut s, "relay.example:8443")
                .await
                .unwrap_err();
            assert!(e.contains(want), "{e}");
        }
        let heads = server.await.unwrap();
        assert!(heads[0].starts_with("CONNECT relay.example:8443 HTTP/1.1\r\nHost: relay.example:8443\r\nProxy-Authorization: Basic dTpwdw==\r\n\r\n"), "{heads:?}");
    }

    /// Asks the proxy stand-in at `addr` for a tunnel to
    /// `relay.example:8443`, within 10 s; the answer and the connection.
    async fn ask(
        addr: std::net::SocketAddr,
    ) -> (
        Result<Result<(), String>, tokio::time::error::Elapsed>,
        TcpStream,
    ) {
        let p = HttpProxy::parse(&format!("http://{addr}")).unwrap();
        let mut s = TcpStream::connect(addr).await.unwrap();
        let r = tokio::time::timeout(
            Duration::from_secs(10),
            p.open_tunnel(&mut s, "relay.example:8443"),
        )
        .await;
        (r, s)
    }

    /// What `open_tunnel` makes of a proxy that sends `answer` and keeps
    /// the connection open (so a head never seen as ended waits, and the
    /// guard fails the test), and the bytes the edge reads after it.
    async fn answered(answer: &'static [u8]) -> (Result<(), String>, Vec<u8>) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut buf = vec![0u8; 1024];
            let _ = s.read(&mut buf).await.unwrap();
            s.write_all(answer).await.unwrap();
            let _ = done_rx.await;
        });
        let (r, mut s) = ask(addr).await;
        let r = r.unwrap_or_else(|_| panic!("no end of head seen in {answer:?}"));
        drop(done_tx);
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).await.unwrap();
        (r, rest)
    }

    /// `answer` is refused with an error containing `says`, and what the
    /// proxy sent after the head it judged is left unread: `rest`.
    async fn refused(answer: &'static [u8], says: &str, rest: &[u8]) {
        let (r, left) = answered(answer).await;
        assert!(
            r.as_ref().is_err_and(|e| e.contains(says)),
            "{answer:?}: {r:?}"
        );
        assert_eq!(left, rest, "{answer:?}");
    }

    /// The refusal of a `403` answer.
    const REFUSED_403: &str = "refused CONNECT relay.example:8443: HTTP/1.1 403 Forbidden";

    /// A head ended by a bare LF blank line (RFC 9112 lets a recipient take
    /// LF as a line's end), or by CRLF and LF mixed, is seen as ended, and
    /// nothing after it is read. Before, only `\r\n\r\n` ended it and the
    /// edge waited for its dial's timeout.
    #[tokio::test]
    async fn a_head_ended_by_bare_line_feeds_is_seen_as_ended() {
        for answer in [
            &b"HTTP/1.1 200 Connection established\n\nTUNNEL"[..],
            b"HTTP/1.1 200 Connection established\nVia: x\n\nTUNNEL",
            b"HTTP/1.1 200 OK\r\nVia: x\n\r\nTUNNEL",
            b"HTTP/1.0 200 OK\nVia: x\r\n\nTUNNEL",
            b"HTTP/1.1 200 OK\r\n\r\nTUNNEL",
        ] {
            let (r, rest) = answered(answer).await;
            assert_eq!(r, Ok(()), "{answer:?}");
            assert_eq!(rest, b"TUNNEL", "{answer:?}");
        }
        // A bare CR ends no line.
        assert!(!head_ended(b"HTTP/1.1 200 OK\r\r"));
        assert!(!head_ended(b"HTTP/1.1 200 OK\r\n\r"));
        refused(b"HTTP/1.1 403 Forbidden\n\nTUNNEL", REFUSED_403, b"TUNNEL").await;
    }

    /// The status line must be `HTTP/1.<digit>`, then exactly three ASCII
    /// digits. Before, the second word was taken by `u16::from_str`
    /// (`+200` passed) and the first was not looked at.
    #[tokio::test]
    async fn only_an_http_1_status_line_with_three_digits_is_a_status() {
        for (line, want) in [
            (&b"HTTP/1.1 200 Connection established"[..], Some(200)),
            (b"HTTP/1.0 200", Some(200)),
            (b"HTTP/1.1 204 ", Some(204)),
            (b"HTTP/1.1\t200\tOK", Some(200)),
            (b" HTTP/1.1  407 Proxy Authentication Required", Some(407)),
            (b"HTTP/1.9 200 OK", Some(200)),
            (b"HTTP/1.1 +200 OK", None),
            (b"HTTP/1.1 -200 OK", None),
            (b"HTTP/1.1 0200 OK", None),
            (b"HTTP/1.1 2000 OK", None),
            (b"HTTP/1.1 20 OK", None),
            (b"HTTP/1.1 20x OK", None),
            (b"HTTP/1.1 200OK", None),
            (b"HTTP/1.1", None),
            (b"http/1.1 200 OK", None),
            (b"HTTP/2 200", None),
            (b"HTTP/2.0 200 OK", None),
            (b"HTTP/1.10 200 OK", None),
            (b"HTTP/1. 200 OK", None),
            (b"ICY 200 OK", None),
            (b"200 OK", None),
            ("HTTP/1.1 \u{0662}00 OK".as_bytes(), None),
            (b"", None),
        ] {
            assert_eq!(
                status_code(line),
                want,
                "{:?}",
                String::from_utf8_lossy(line)
            );
        }
        for answer in [
            &b"HTTP/1.1 +200 OK\r\n\r\nTUNNEL"[..],
            b"XTTP/1.1 200 OK\r\n\r\nTUNNEL",
            b"HTTP/1.1 2000 OK\r\n\r\nTUNNEL",
        ] {
            refused(
                answer,
                "answered CONNECT relay.example:8443 without an HTTP/1.x status line: ",
                b"TUNNEL",
            )
            .await;
        }
    }

    /// Interim (1xx) responses before the proxy's `200` are skipped (RFC
    /// 9110 15.2), headers and all, up to eight of them, and the tunnel's
    /// bytes after the final head are left intact. Before, the first
    /// interim head was taken for the answer: "refused CONNECT ...: HTTP/1.1
    /// 100 Continue".
    #[tokio::test]
    async fn interim_responses_before_the_200_are_skipped() {
        let eight: &'static [u8] = [&b"HTTP/1.1 100 Continue\r\n\r\n"[..]; MAX_INTERIM]
            .concat()
            .into_iter()
            .chain(b"HTTP/1.1 200 OK\r\n\r\nTUNNEL".iter().copied())
            .collect::<Vec<u8>>()
            .leak();
        for answer in [
            &b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 Connection established\r\n\r\nTUNNEL"[..],
            b"HTTP/1.1 100 Continue\n\nHTTP/1.1 200 OK\nVia: x\n\nTUNNEL",
            b"HTTP/1.1 102 Processing\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>; rel=preload\r\n\r\nHTTP/1.1 199 Whatever\r\n\r\nHTTP/1.1 200 OK\r\n\r\nTUNNEL",
            eight,
        ] {
            let (r, rest) = answered(answer).await;
            assert_eq!(r, Ok(()), "{answer:?}");
            assert_eq!(rest, b"TUNNEL", "{answer:?}");
        }
        // The final answer is judged as ever.
        refused(
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 403 Forbidden\r\n\r\nTUNNEL",
            REFUSED_403,
            b"TUNNEL",
        )
        .await;
    }

    /// A proxy that sends interim responses without end is refused once a
    /// ninth arrives, with an error that says so, the bytes after that
    /// head unread; and the 8 KiB bound holds for all heads together, so
    /// a few large interim heads end it too. Before, the first `100` was
    /// taken for a refusal of its own.
    #[tokio::test]
    async fn endless_interim_responses_are_refused_within_the_bounds() {
        // A proxy writing `100 Continue` heads until the edge hangs up.
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let proxy = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut buf = vec![0u8; 1024];
            let _ = s.read(&mut buf).await.unwrap();
            let mut sent = 0usize;
            while s.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await.is_ok() {
                sent += 1;
            }
            sent
        });
        let (r, s) = ask(addr).await;
        let r = r.expect("endless interim responses are refused, not waited out");
        let e = r.unwrap_err();
        assert!(
            e.contains("sent more than 8 interim (1xx) responses to CONNECT relay.example:8443 without a final one: HTTP/1.1 100 Continue"),
            "{e}"
        );
        drop(s);
        let sent = tokio::time::timeout(Duration::from_secs(10), proxy)
            .await
            .unwrap()
            .unwrap();
        assert!(sent > MAX_INTERIM, "{sent}");
        // Exactly nine heads are read: what follows stays unread.
        let nine: &'static [u8] = [&b"HTTP/1.1 100 Continue\r\n\r\n"[..]; MAX_INTERIM + 1]
            .concat()
            .into_iter()
            .chain(b"HTTP/1.1 200 OK\r\n\r\nTUNNEL".iter().copied())
            .collect::<Vec<u8>>()
            .leak();
        let (r, rest) = answered(nine).await;
        assert!(r.is_err_and(|e| e.contains("more than 8 interim")));
        assert_eq!(rest, b"HTTP/1.1 200 OK\r\n\r\nTUNNEL");
        // Three interim heads of 3 KiB each: the bound on all head bytes
        // ends it in the third, exactly 8 KiB read.
        let mut big = Vec::new();
        for _ in 0..3 {
            big.extend_from_slice(b"HTTP/1.1 103 Early Hints\r\nLink: ");
            big.extend(std::iter::repeat_n(b'a', 3 << 10));
            big.extend_from_slice(b"\r\n\r\n");
        }
        big.extend_from_slice(b"HTTP/1.1 200 OK\r\n\r\nTUNNEL");
        let big: &'static [u8] = big.leak();
        let (r, rest) = answered(big).await;
        let e = r.unwrap_err();
        assert!(
            e.ends_with(": response head over 8192 bytes (2 interim 1xx heads included)"),
            "{e}"
        );
        assert_eq!(rest, &big[MAX_HEAD..]);
    }

    /// `101 Switching Protocols` is not an interim response to skip: for
    /// CONNECT it is no tunnel, and it is refused like any other answer
    /// that is not 2xx, nothing after its head read, also after a `100`.
    /// (A guard: refused before too; a skip of every 1xx would take it.)
    #[tokio::test]
    async fn a_101_answer_is_refused() {
        for answer in [
            &b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\n\r\nHTTP/1.1 200 OK\r\n\r\nTUNNEL"[..],
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 101 Switching Protocols\r\n\r\nHTTP/1.1 200 OK\r\n\r\nTUNNEL",
        ] {
            refused(
                answer,
                "refused CONNECT relay.example:8443: HTTP/1.1 101 Switching Protocols",
                b"HTTP/1.1 200 OK\r\n\r\nTUNNEL",
            )
            .await;
        }
    }

    /// A refusal's error (and so the log line and `/readyz`) shows at most
    /// 200 bytes of the proxy's status line, control bytes, `\` and
    /// non-ASCII escaped. Before, up to 8 KiB went in, control bytes and
    /// all.
    #[tokio::test]
    async fn a_refusals_status_line_is_clipped_and_escaped() {
        let mut line = b"HTTP/1.1 403 \x1b[31mred\x07\x00\\caf\xc3\xa9 ".to_vec();
        line.extend(std::iter::repeat_n(b'A', 7000));
        let mut answer = line.clone();
        answer.extend_from_slice(b"\r\n\r\n");
        let (r, _) = answered(answer.leak()).await;
        let e = r.unwrap_err();
        assert!(
            e.contains(r"HTTP/1.1 403 \x1b[31mred\x07\x00\x5ccaf\xc3\xa9 AAA"),
            "{e}"
        );
        assert!(e.ends_with(&format!("... ({} bytes)", line.len())), "{e}");
        assert!(!e.chars().any(char::is_control), "{e:?}");
        assert!(e.len() < STATUS_SHOWN * 4 + 256, "{} bytes", e.len());
        // Short lines are shown whole, printable ASCII unchanged.
        assert_eq!(shown(b"HTTP/1.1 403 Forbidden"), "HTTP/1.1 403 Forbidden");
        assert_eq!(shown(&[b'x'; STATUS_SHOWN]), "x".repeat(STATUS_SHOWN));
        assert_eq!(
            shown(&[b'x'; STATUS_SHOWN + 1]),
            format!(
                "{}... ({} bytes)",
                "x".repeat(STATUS_SHOWN),
                STATUS_SHOWN + 1
            )
        );
    }

    /// A listener that never accepts, its queue already full: SYNs to it
    /// are dropped, as by a proxy address that is down behind a firewall.
    fn silent_listener() -> (std::net::TcpListener, Vec<std::net::TcpStream>) {
        let sock =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        sock.bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
            .unwrap();
        sock.listen(0).unwrap();
        let l: std::net::TcpListener = sock.into();
        let addr = l.local_addr().unwrap();
        // The queue holds backlog + 1; a connection beyond it waits (in
        // the background, not here) for an accept that never comes.
        let fill = (0..2)
            .filter_map(|_| {
                std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).ok()
            })
            .collect();
        (l, fill)
    }

    /// A proxy name with several addresses: a refusing one and a silent
    /// one are passed over (the silent one after its share of the budget),
    /// and when none answers the error names each.
    #[tokio::test]
    async fn the_first_address_that_answers_is_used() {
        let up = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let up_addr = up.local_addr().unwrap();
        let refusing = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let (_silent, _held) = silent_listener();
        let silent = _silent.local_addr().unwrap();
        let dial = |a: SocketAddr| async move {
            TcpStream::connect(a)
                .await
                .map_err(|e| format!("tcp {a}: {e}"))
        };
        let budget = Duration::from_secs(2);
        let t = Instant::now();
        let s = first_connected(&[refusing, silent, up_addr], budget, dial)
            .await
            .unwrap();
        assert_eq!(s.peer_addr().unwrap(), up_addr);
        let took = t.elapsed();
        // The silent address had a third of what the refusing one left.
        assert!(
            took >= Duration::from_millis(500) && took < budget,
            "took {took:?}"
        );
        let e = first_connected(&[refusing, silent], Duration::from_millis(600), dial)
            .await
            .unwrap_err();
        assert!(
            e.contains(&format!("tcp {refusing}: "))
                && e.contains(&format!("tcp {silent}: no answer within")),
            "{e}"
        );
        assert_eq!(
            first_connected(&[], budget, dial).await.unwrap_err(),
            "no address"
        );
    }
}
