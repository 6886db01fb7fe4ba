//! `relay_server::FileConfig::parse` on arbitrary UTF-8, then, for what
//! parses, `into_runtime()` with every file path it reads (`[tls]`,
//! `[connect_tls]`, `admin.token_file`, `admin.read_token_file`,
//! `admin.cert`/`key`, `bootstrap.ca_cert`/`ca_key`) pointed at a dev PKI
//! generated once (see `pki.rs`), so the whole validation runs and no path
//! named by the input is read. A `read_token_file` whose path contains
//! `missing` points at an absent file (the relay then starts without it).
//!
//! Properties: no panic; what `into_runtime` accepts, `validate` accepts.
#![no_main]

use libfuzzer_sys::fuzz_target;
use relay_server::config::{RelayTlsFiles, TlsFiles};
use relay_server::FileConfig;

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
    if let Some(p) = &cfg.admin.read_token_file {
        let absent = p.to_string_lossy().contains("missing");
        cfg.admin.read_token_file = Some(if absent {
            f.missing.clone()
        } else {
            f.read_token.clone()
        });
    }
    if cfg.admin.cert.is_some() {
        cfg.admin.cert = Some(f.relay_cert.clone());
    }
    if cfg.admin.key.is_some() {
        cfg.admin.key = Some(f.relay_key.clone());
    }
    if let Some(b) = &mut cfg.bootstrap {
        b.ca_cert = f.ca.clone();
        b.ca_key = f.ca_key.clone();
    }
    let rt = cfg.into_runtime();
    if debug() {
        // FUZZ_CONFIG_DEBUG=1: why a seed is refused (to check that a
        // seed reaches the section it is for).
        eprintln!("{:?}", rt.as_ref().map(|_| "accepted"));
    }
    if let Ok(rt) = rt {
        rt.validate()
            .expect("into_runtime accepted what validate refuses");
    }
});
