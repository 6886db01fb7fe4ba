//! `edge_client::FileConfig::parse` on arbitrary UTF-8, then, for what
//! parses, `into_runtime()` with the `[tls]` paths pointed at a dev PKI
//! generated once (see `pki.rs`), so the whole validation runs and no path
//! named by the input is read. With `[bootstrap]` only `tls.relay_ca` is
//! set (certificate and key come from the relay then), so that branch
//! runs too; `into_runtime` reads no other file (the bootstrap token, the
//! state files and the DNS table are read when the edge runs).
//!
//! Properties: no panic; an accepted config has a node name of 1 to 253
//! characters, a non-empty server name, no port 0, and a primary address
//! inside its routes.
#![no_main]

use edge_client::config::TlsFile;
use edge_client::FileConfig;
use libfuzzer_sys::fuzz_target;

#[path = "pki.rs"]
mod pki;

fn debug() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("FUZZ_CONFIG_DEBUG").is_some())
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut cfg = match FileConfig::parse(text) {
        Ok(c) => c,
        Err(e) => {
            if debug() {
                eprintln!("parse: {e:?}");
            }
            return;
        }
    };
    let f = pki::files();
    let bootstrap = cfg.bootstrap.is_some();
    cfg.tls = TlsFile {
        cert: (!bootstrap || cfg.tls.cert.is_some()).then(|| f.node_cert.clone()),
        key: (!bootstrap || cfg.tls.key.is_some()).then(|| f.node_key.clone()),
        relay_ca: f.ca.clone(),
    };
    let rt = cfg.into_runtime();
    if debug() {
        // FUZZ_CONFIG_DEBUG=1: why a seed is refused (to check that a
        // seed reaches the section it is for).
        eprintln!("{:?}", rt.as_ref().map(|_| "accepted"));
    }
    if let Ok(rt) = rt {
        assert!(!rt.node.is_empty() && rt.node.len() <= 253);
        assert!(!rt.server_name.is_empty());
        assert!(!rt.allowed_ports.contains(&0));
        if let Some(p) = rt.primary_addr {
            assert!(rt.routes.iter().any(|r| r.contains(&p)));
        }
    }
});
