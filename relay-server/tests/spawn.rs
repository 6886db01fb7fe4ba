//! A config built by code is held to the file config's rules: `Relay::spawn`
//! refuses values that would otherwise panic later (a zero keep-alive in a
//! timer) or wait forever, naming the field.

use std::time::Duration;

use relay_server::{Relay, RelayConfig, StartError};
use relay_transport::devcerts::DevPki;

#[tokio::test]
async fn spawn_refuses_what_the_file_config_would_refuse() {
    let pki = DevPki::generate(&["localhost"], &[]).expect("pki");
    let base = RelayConfig::loopback(pki.relay_material().expect("material"));
    let mut zero_keepalive = base.clone();
    zero_keepalive.quic.keepalive = Duration::ZERO;
    let mut huge_grace = base.clone();
    huge_grace.limits.drain_grace = Duration::from_secs(400 * 24 * 3600);
    let mut no_sessions = base;
    no_sessions.limits.max_sessions = 0;
    for (cfg, field) in [
        (zero_keepalive, "quic.keepalive"),
        (huge_grace, "limits.drain_grace"),
        (no_sessions, "limits.max_sessions"),
    ] {
        match Relay::spawn(cfg).await {
            Err(StartError::Config(e)) => assert_eq!(e.field, field, "{e}"),
            Err(e) => panic!("{field}: wrong error {e}"),
            Ok(_) => panic!("{field}: a relay started"),
        }
    }
}
