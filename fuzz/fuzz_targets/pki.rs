//! A development PKI written once per fuzzing process, so the config
//! targets can run `into_runtime()` to the end (it loads certificate and
//! token files) without reading whatever paths the input names.

#![allow(dead_code)] // each target uses the half it needs

use std::path::PathBuf;
use std::sync::OnceLock;

use relay_transport::devcerts::DevPki;

/// Paths of the generated files.
pub struct Files {
    pub ca: PathBuf,
    pub relay_cert: PathBuf,
    pub relay_key: PathBuf,
    pub node_cert: PathBuf,
    pub node_key: PathBuf,
    pub token: PathBuf,
}

/// Generates the PKI on first use, in a fresh directory under the system
/// temporary directory (left there: a few KB per fuzzing process).
pub fn files() -> &'static Files {
    static FILES: OnceLock<Files> = OnceLock::new();
    FILES.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("edge-relay-fuzz-pki-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let pki = DevPki::generate(&["relay.example.com", "127.0.0.1"], &["edge-1"])
            .expect("dev PKI generates");
        pki.write_to(&dir).expect("dev PKI written");
        let token = dir.join("admin-token");
        std::fs::write(&token, "0123456789abcdef-fuzz\n").expect("token written");
        Files {
            ca: dir.join("ca.pem"),
            relay_cert: dir.join("relay.pem"),
            relay_key: dir.join("relay-key.pem"),
            node_cert: dir.join("edge-1.pem"),
            node_key: dir.join("edge-1-key.pem"),
            token,
        }
    })
}
