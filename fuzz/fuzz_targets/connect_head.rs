//! The relay's HTTP CONNECT request head: `parse_request_head` (the pure
//! function the ingress calls on what it read: end-of-head search within
//! the limit, httparse, method check, `parse_authority`) and
//! `parse_authority` alone on the same bytes.
//!
//! Properties: no panic; an accepted head ends at the first blank line,
//! within the limit; its target is what `parse_authority` makes of its
//! authority; accepted authorities are canonical and parse back the same.
#![no_main]

use libfuzzer_sys::fuzz_target;
use relay_server::connect::{parse_authority, parse_request_head, Authority, HeadProblem};

fn check_authority(a: &Authority) {
    match a {
        Authority::Ip(sa) => {
            assert_ne!(sa.port(), 0);
            assert_eq!(parse_authority(&sa.to_string()).as_ref(), Ok(a));
        }
        Authority::Name(host, port) => {
            assert_ne!(*port, 0);
            assert!(!host.is_empty() && host.len() <= 253);
            assert!(host
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b)));
            assert_eq!(parse_authority(&format!("{host}:{port}")).as_ref(), Ok(a));
        }
    }
}

fuzz_target!(|data: &[u8]| {
    // First two bytes: the header limit, in the range the config allows
    // low end of (256 + 0..8191); the rest: the bytes received.
    let (max, buf) = match data {
        [a, b, rest @ ..] => (256 + usize::from(u16::from_le_bytes([*a, *b])) % 8192, rest),
        _ => return,
    };
    match parse_request_head(buf, max) {
        Ok(head) => {
            assert!(head.len <= max && head.len <= buf.len());
            assert!(buf[..head.len].ends_with(b"\r\n\r\n"));
            assert!(!buf[..head.len - 1].windows(4).any(|w| w == b"\r\n\r\n"));
            assert_eq!(parse_authority(&head.authority).as_ref(), Ok(&head.target));
            check_authority(&head.target);
        }
        Err(HeadProblem::TooLarge) => {
            let window = &buf[..buf.len().min(max)];
            assert!(!window.windows(4).any(|w| w == b"\r\n\r\n"));
        }
        Err(HeadProblem::Method(m)) => assert!(!m.is_empty()),
        Err(HeadProblem::Malformed(m)) => assert!(!m.is_empty()),
    }
    // The authority parser alone, on the whole input as text.
    if let Ok(s) = std::str::from_utf8(buf) {
        if let Ok(a) = parse_authority(s) {
            check_authority(&a);
        }
    }
});
