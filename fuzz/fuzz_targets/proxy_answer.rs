//! The HTTP proxy's answer to the edge's CONNECT, as the edge reads it
//! when it dials the relay through a proxy: `proxy::HttpProxy::open_tunnel`
//! (`transport/src/proxy.rs`; it reads response heads byte by byte, each
//! up to its blank line, lines ended by CRLF or a bare LF, skips interim
//! ones (1xx but 101) up to `MAX_INTERIM` = 8 of them, all heads together
//! within `MAX_HEAD` = 8 KiB, then takes the status code from the final
//! head's first line). It takes a `tokio::net::TcpStream`, so the
//! target runs a proxy on loopback: per input, one connection whose far
//! end sends the input and then closes its sending side (both ends close
//! with a zero linger: a reset, no TIME_WAIT, so millions of connections
//! leave no ports behind).
//!
//! Input: the proxy's bytes, all of them (heads and whatever follows).
//!
//! Properties: no panic and no hang (the call ends within 10 s of real
//! time: it has no bound of its own, the dialer bounds it, see
//! `tcp/dial.rs`); the input is cut into heads, each ended by the first
//! blank line within its own bytes (`\r\n\r\n`, `\n\n`, or the two
//! mixed: RFC 9112 lets a recipient take a bare LF as a line's end; a
//! line end of the head before does not count); a head whose first line,
//! split on whitespace, starts `HTTP/1.<digit>` then exactly three ASCII
//! digits from 100 to 199 other than 101 is interim and skipped, and the
//! first other head is the final one; `Ok` exactly when the final head
//! ends within 8 KiB of the input's start (all heads counted), after at
//! most 8 interim ones, and its code is from 200 to 299; the error says
//! which case it was (no blank line before the end, heads over 8 KiB
//! with how many interim ones were read whole, a ninth interim head
//! naming its status line, credentials refused for a 407, a refusal
//! naming the final status line, 101 included, or no HTTP/1.x status
//! line); **nothing after the final head (or the ninth interim one) is
//! consumed** (what the edge reads next is the relay's TLS) and never
//! more than 8 KiB; the credentials given never appear in an error
//! unless the proxy itself sent them; an error shows at most 200 bytes
//! of the status line, every byte outside printable ASCII (and `\`) as
//! `\xNN`, so it holds no control character and is at most 4 × 200
//! bytes plus a line of text; no single allocation while it reads
//! exceeds 2 × `MAX_HEAD` (the head, in amortised growth).
//! `FUZZ_DEBUG=1` prints the result of each input.
#![no_main]

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::OnceLock;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use relay_transport::proxy::HttpProxy;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[path = "watch_alloc.rs"]
mod watch_alloc;
use watch_alloc::{ARMED, LARGEST};

/// `proxy::MAX_HEAD` (private): the most response head bytes read, all
/// heads together.
const MAX_HEAD: usize = 8 << 10;
/// `proxy::MAX_INTERIM` (private): the most interim heads skipped; one
/// more is an error.
const MAX_INTERIM: usize = 8;
/// `proxy::STATUS_SHOWN` (private): the most of the status line an error
/// shows.
const STATUS_SHOWN: usize = 200;

const TARGET: &str = "relay.example:8443";
const PASSWORD: &str = "s3cr3t-pw";
/// base64("fuzzuser:s3cr3t-pw"), the `Proxy-Authorization` credentials.
const BASIC: &str = "ZnV6enVzZXI6czNjcjN0LXB3";

/// One listener for the process (a std listener; each input's runtime
/// registers a copy of it).
fn listener() -> &'static (std::net::TcpListener, SocketAddr) {
    static L: OnceLock<(std::net::TcpListener, SocketAddr)> = OnceLock::new();
    L.get_or_init(|| {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind loopback");
        l.set_nonblocking(true).expect("nonblocking");
        let a = l.local_addr().expect("address");
        (l, a)
    })
}

fn proxy() -> &'static HttpProxy {
    static P: OnceLock<HttpProxy> = OnceLock::new();
    P.get_or_init(|| {
        let (_, addr) = listener();
        HttpProxy::parse(&format!("http://fuzzuser:{PASSWORD}@{addr}")).expect("proxy URL")
    })
}

fn debug() -> bool {
    static D: OnceLock<bool> = OnceLock::new();
    *D.get_or_init(|| std::env::var_os("FUZZ_DEBUG").is_some())
}

/// The status code of a status line: `HTTP/1.<digit>`, then three ASCII
/// digits, words split on SP, HTAB, VT, FF and CR.
fn code_of(status: &[u8]) -> Option<u16> {
    let mut words = status
        .split(|b| b" \t\x0b\x0c\r".contains(b))
        .filter(|w| !w.is_empty());
    let (version, code) = (words.next()?, words.next()?);
    let ok = version.len() == 8
        && version.starts_with(b"HTTP/1.")
        && version[7].is_ascii_digit()
        && code.len() == 3
        && code.iter().all(u8::is_ascii_digit);
    ok.then(|| std::str::from_utf8(code).ok()?.parse().ok())
        .flatten()
}

/// The status line as an error shows it.
fn shown(status: &[u8]) -> String {
    let mut out: String = status
        .iter()
        .take(STATUS_SHOWN)
        .map(|&b| match b {
            b'\\' => "\\x5c".to_string(),
            0x20..=0x7e => char::from(b).to_string(),
            _ => format!("\\x{b:02x}"),
        })
        .collect();
    if status.len() > STATUS_SHOWN {
        out += &format!("... ({} bytes)", status.len());
    }
    out
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// The first line of a head, without its line end.
fn status_line(head: &[u8]) -> &[u8] {
    let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// What the edge should make of `answer`, and how many bytes it takes.
#[derive(Debug)]
enum Want {
    /// The final head is `answer[start..end]` (blank line included),
    /// after the interim heads `answer[..start]`; `end` bytes taken.
    Final { start: usize, end: usize },
    /// `answer[start..end]` is an interim head past `MAX_INTERIM` (the
    /// ninth); `end` bytes taken.
    TooManyInterim { start: usize, end: usize },
    /// The proxy closed before a head's blank line (all bytes read).
    Closed,
    /// No final head within `MAX_HEAD` bytes (that many read), after
    /// `interim` interim heads read whole.
    TooLarge { interim: usize },
}

fn want(answer: &[u8]) -> Want {
    let (mut start, mut interim) = (0, 0);
    loop {
        // This head's blank line: a line's end (LF, or CRLF), then an
        // empty line ended the same way, all within the head (the last
        // line end of the head before does not start one).
        let end = (start + 1..=answer.len()).find(|&n| {
            let h = &answer[start..n];
            h.ends_with(b"\n\n") || h.ends_with(b"\n\r\n")
        });
        let end = match end {
            Some(n) if n <= MAX_HEAD => n,
            // No blank line within `MAX_HEAD` bytes of the input's start,
            // all heads counted: the bound is checked before each byte is
            // read, so a head ending exactly at it is whole, and a blank
            // line one byte further is never reached.
            _ if answer.len() >= MAX_HEAD => return Want::TooLarge { interim },
            _ => return Want::Closed,
        };
        match code_of(status_line(&answer[start..end])) {
            Some(c) if (100..=199).contains(&c) && c != 101 => {
                interim += 1;
                if interim > MAX_INTERIM {
                    return Want::TooManyInterim { start, end };
                }
                start = end;
            }
            _ => return Want::Final { start, end },
        }
    }
}

fuzz_target!(|answer: &[u8]| {
    let (std_listener, addr) = listener();
    let p = proxy();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let l = TcpListener::from_std(std_listener.try_clone().expect("listener fd"))
            .expect("listener");
        let (edge, accepted) = tokio::join!(TcpStream::connect(addr), l.accept());
        let (mut edge, (proxy_side, _)) = (edge.expect("connect"), accepted.expect("accept"));
        edge.set_zero_linger().expect("linger");
        proxy_side.set_zero_linger().expect("linger");
        // The proxy answers at once (it may: the edge writes its request
        // first and reads only after), closes its sending side and keeps
        // the socket until the edge is done, so nothing is lost to a reset.
        let bytes = answer.to_vec();
        let proxy_task = tokio::spawn(async move {
            let mut s = proxy_side;
            s.write_all(&bytes).await.expect("proxy write");
            s.shutdown().await.expect("proxy shutdown");
            s
        });

        LARGEST.store(0, Ordering::Relaxed);
        ARMED.store(true, Ordering::Relaxed);
        let result =
            tokio::time::timeout(Duration::from_secs(10), p.open_tunnel(&mut edge, TARGET)).await;
        ARMED.store(false, Ordering::Relaxed);
        let largest = LARGEST.load(Ordering::Relaxed);
        let result = result.expect("open_tunnel did not end within 10 s of the proxy closing");
        if debug() {
            eprintln!("{result:?} (largest allocation {largest} bytes)");
        }

        // What the edge reads after the call: exactly what follows what
        // open_tunnel was entitled to take.
        let mut rest = Vec::new();
        edge.read_to_end(&mut rest).await.expect("read the rest");
        let taken = answer.len() - rest.len();
        assert_eq!(
            &answer[taken..],
            &rest[..],
            "the rest is not the answer's tail"
        );

        let want = want(answer);
        if debug() {
            eprintln!("want {want:?}, taken {taken}");
        }
        let err = match (want, &result) {
            (Want::Final { start, end }, r) => {
                assert_eq!(taken, end, "bytes taken for a final head ending at {end}");
                let line = status_line(&answer[start..end]);
                let status = shown(line);
                match (code_of(line), r) {
                    (Some(200..=299), Ok(())) => None,
                    (Some(200..=299), Err(e)) => panic!("2xx refused: {e}"),
                    (_, Ok(())) => panic!("accepted without a 2xx: {status:?}"),
                    (Some(407), Err(e)) => {
                        assert!(
                            e.ends_with(&format!(
                                "wants credentials other than those given ({status})"
                            )),
                            "{e}"
                        );
                        Some(e)
                    }
                    (Some(_), Err(e)) => {
                        assert!(
                            e.ends_with(&format!("refused CONNECT {TARGET}: {status}")),
                            "{e}"
                        );
                        Some(e)
                    }
                    (None, Err(e)) => {
                        assert!(
                            e.ends_with(&format!(
                                "answered CONNECT {TARGET} without an HTTP/1.x status line: {status}"
                            )),
                            "{e}"
                        );
                        Some(e)
                    }
                }
            }
            (Want::TooManyInterim { start, end }, r) => {
                assert_eq!(taken, end, "bytes taken for a ninth interim head ending at {end}");
                let e = r.as_ref().expect_err("a ninth interim head, yet Ok");
                let status = shown(status_line(&answer[start..end]));
                assert!(
                    e.ends_with(&format!(
                        "sent more than {MAX_INTERIM} interim (1xx) responses to CONNECT {TARGET} without a final one: {status}"
                    )),
                    "{e}"
                );
                Some(e)
            }
            (Want::Closed, r) => {
                assert_eq!(taken, answer.len());
                let e = r.as_ref().expect_err("no head, yet Ok");
                assert!(e.ends_with(": closed before answering CONNECT"), "{e}");
                Some(e)
            }
            (Want::TooLarge { interim }, r) => {
                assert_eq!(taken, MAX_HEAD, "bytes taken for heads over the bound");
                let e = r.as_ref().expect_err("heads over the bound, yet Ok");
                let tail = match interim {
                    0 => "response head over 8192 bytes".to_string(),
                    n => format!("response head over 8192 bytes ({n} interim 1xx heads included)"),
                };
                assert!(e.ends_with(&format!(": {tail}")), "{e}");
                Some(e)
            }
        };
        if let Some(e) = err {
            for secret in [PASSWORD, BASIC] {
                assert!(
                    !e.contains(secret) || contains(answer, secret.as_bytes()),
                    "credentials in an error: {e}"
                );
            }
            // At most 200 bytes of the status line (4 per byte when
            // escaped), and a line of text; no control character.
            assert!(
                e.len() <= 4 * STATUS_SHOWN + 256,
                "error of {} bytes",
                e.len()
            );
            assert!(!e.chars().any(char::is_control), "control character in {e:?}");
        }
        assert!(
            largest <= 2 * MAX_HEAD,
            "an allocation of {largest} bytes while reading the head"
        );

        let proxy_side = proxy_task.await.expect("proxy task");
        drop(proxy_side);
        drop(edge);
    });
});
