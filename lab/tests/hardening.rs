//! Hardening on loopback: bounds on operator input, the CONNECT audit
//! log, insecure setups refused, the edge's QUIC probe owned by its
//! session.

use std::time::Duration;

use relay_lab::{admin_request, sessions, Lab};

/// A drain grace beyond a day used to reach `Instant + grace` in the drain
/// task and panic there (after a 202); now it is refused up front and the
/// session is untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_drain_grace_is_refused() -> anyhow::Result<()> {
    let lab = Lab::start(1, |_| {}).await?;
    let admin = lab.admin_addr();
    for grace in ["18446744073709551615s", "25h"] {
        let path = format!("/v1/sessions/edge-0?drain=true&grace={grace}");
        let (code, body) = admin_request(admin, "DELETE", &path).await?;
        assert_eq!(code, 400, "grace {grace}: {body}");
        assert!(body.contains("at most"), "{body}");
    }
    let s = sessions(admin).await?;
    assert_eq!(s.len(), 1);
    assert!(!s[0].draining, "a refused drain must not start draining");
    // A day is still accepted.
    let (code, body) =
        admin_request(admin, "DELETE", "/v1/sessions/edge-0?drain=true&grace=24h").await?;
    assert_eq!(code, 202, "{body}");
    tokio::time::timeout(Duration::from_secs(5), lab.stop()).await?;
    Ok(())
}
