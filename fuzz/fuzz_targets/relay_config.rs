//! `relay_server::FileConfig::parse` on arbitrary UTF-8, then, for what
//! parses, `into_runtime()` with every file path (TLS, CONNECT TLS, admin
//! token) pointed at a dev PKI generated once (see `pki.rs`), so the whole
//! validation runs and no path named by the input is read.
//!
//! Properties: no panic; what `into_runtime` accepts, `validate` accepts.
#![no_main]

use libfuzzer_sys::fuzz_target;
use relay_server::config::{RelayTlsFiles, TlsFiles};
use relay_server::FileConfig;

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
    let tls = || TlsFiles {
        cert: f.relay_cert.clone(),
        key: f.relay_key.clone(),
        client_ca: f.ca.clone(),
        crl: None,
    };
    cfg.tls = RelayTlsFiles {
        cert: f.relay_cert.clone(),
        key: f.relay_key.clone(),
        client_ca: f.ca.clone(),
        // Whatever the input said about CRLs and reloading, but never a
        // file outside the fuzzer's PKI.
        crl: None,
        reload_interval: cfg.tls.reload_interval,
    };
    if cfg.connect_tls.is_some() {
        cfg.connect_tls = Some(tls());
    }
    if cfg.admin.token_file.is_some() {
        cfg.admin.token_file = Some(f.token.clone());
    }
    if let Ok(rt) = cfg.into_runtime() {
        rt.validate()
            .expect("into_runtime accepted what validate refuses");
    }
});
