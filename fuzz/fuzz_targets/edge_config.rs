//! `edge_client::FileConfig::parse` on arbitrary UTF-8, then, for what
//! parses, `into_runtime()` with the `[tls]` paths pointed at a dev PKI
//! generated once (see `pki.rs`), so the whole validation runs and no path
//! named by the input is read.
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

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(mut cfg) = FileConfig::parse(text) else {
        return;
    };
    let f = pki::files();
    cfg.tls = TlsFile {
        cert: Some(f.node_cert.clone()),
        key: Some(f.node_key.clone()),
        relay_ca: f.ca.clone(),
    };
    if let Ok(rt) = cfg.into_runtime() {
        assert!(!rt.node.is_empty() && rt.node.len() <= 253);
        assert!(!rt.server_name.is_empty());
        assert!(!rt.allowed_ports.contains(&0));
        if let Some(p) = rt.primary_addr {
            assert!(rt.routes.iter().any(|r| r.contains(&p)));
        }
    }
});
