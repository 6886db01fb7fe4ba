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
    /// Another token (for `admin.read_token_file`, which must differ).
    pub read_token: PathBuf,
    /// The CA's private key (for `[bootstrap] ca_key`).
    pub ca_key: PathBuf,
    /// A path in the PKI's directory where no file is.
    pub missing: PathBuf,
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
        let read_token = dir.join("admin-read-token");
        std::fs::write(&read_token, "fedcba9876543210-fuzz-read\n").expect("token written");
        let ca_key = dir.join("ca-key.pem");
        std::fs::write(&ca_key, pki.ca_pem_pair().1).expect("CA key written");
        Files {
            ca: dir.join("ca.pem"),
            relay_cert: dir.join("relay.pem"),
            relay_key: dir.join("relay-key.pem"),
            node_cert: dir.join("edge-1.pem"),
            node_key: dir.join("edge-1-key.pem"),
            token,
            read_token,
            ca_key,
            missing: dir.join("missing"),
        }
    })
}
