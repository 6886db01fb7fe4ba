//! Unit tests of `metrics`: the rendered text and the capture gauge.

use super::*;

/// A failed capture update sets the gauge to 0 and counts; the next
/// one that applies sets it back to 1.
#[test]
fn capture_updates_set_the_gauge_and_count_failures() {
    let m = Metrics::default();
    let now = |m: &Metrics| {
        (
            m.capture_installed.load(Relaxed),
            m.capture_failures.load(Relaxed),
        )
    };
    m.capture_applied(true);
    assert_eq!(now(&m), (1, 0));
    m.capture_applied(false);
    m.capture_applied(false);
    assert_eq!(now(&m), (0, 2));
    m.capture_applied(true);
    assert_eq!(now(&m), (1, 2));
}

#[test]
fn renders_labelled_counters() {
    let m = Metrics::default();
    m.reject(RejectReason::IdentityMismatch);
    m.stream_outcome(StreamStatus::Denied);
    m.stream_outcome(StreamStatus::Denied);
    m.connect_answer(502);
    m.handshake_failed("tls");
    m.denied(Origin::Edge("e"), DenyReason::NoCommunity);
    m.accepted_on("tcp");
    let t = m.render(3, 10);
    assert!(
        t.contains("relay_policy_denials_total{origin=\"edge\",reason=\"no_community\"} 1"),
        "{t}"
    );
    assert!(
        t.contains("relay_handshake_failures_total{reason=\"identity_mismatch\"} 1"),
        "{t}"
    );
    assert!(
        t.contains("relay_handshake_failures_total{reason=\"tls\"} 1"),
        "{t}"
    );
    assert!(
        t.contains("relay_streams_total{outcome=\"denied\"} 2"),
        "{t}"
    );
    assert!(
        t.contains("relay_connect_responses_total{code=\"502\"} 1"),
        "{t}"
    );
    assert!(
        t.contains("# TYPE relay_sessions gauge\nrelay_sessions 3\n"),
        "{t}"
    );
    assert!(t.contains("relay_sessions_limit 10\n"), "{t}");
    assert!(
        t.contains("# TYPE relay_sessions_draining gauge\nrelay_sessions_draining 0\n"),
        "{t}"
    );
    assert!(
        t.contains("relay_sessions_accepted_by_transport_total{transport=\"tcp\"} 1\n"),
        "{t}"
    );
    assert!(
        t.contains("relay_sessions_accepted_by_transport_total{transport=\"quic\"} 0\n"),
        "{t}"
    );
}

/// Every cause the verifier tells (`RefusalCause`) is a label of its own
/// (`handshake_failed` drops a label it does not know), and none is
/// counted as `tls`.
#[test]
fn every_client_certificate_cause_is_a_handshake_failure_label() {
    use relay_transport::reload::RefusalCause;
    let m = Metrics::default();
    for c in RefusalCause::ALL {
        assert!(HANDSHAKE_LOCAL_REASONS.contains(&c.as_str()), "{c:?}");
        m.handshake_failed(c.as_str());
    }
    let t = m.render(0, 1);
    for c in RefusalCause::ALL {
        let row = format!(
            "relay_handshake_failures_total{{reason=\"{}\"}} 1\n",
            c.as_str()
        );
        assert!(t.contains(&row), "{t}");
    }
    assert!(
        t.contains("relay_handshake_failures_total{reason=\"tls\"} 0\n"),
        "{t}"
    );
}
