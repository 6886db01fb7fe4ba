//! Tests' view of what is logged: a tracing subscriber, set for the
//! current thread, that keeps its lines (info and above) for assertions,
//! such as that a flood is logged sampled (`relay-server`) or a warning
//! given once (`relay-kube`'s IPAM tests). One copy for the crates whose
//! tests read their logs, kept here because both can depend on this
//! crate. Built only with feature `test-log`, which their
//! dev-dependencies turn on; not an API.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

/// A `MakeWriter` that keeps what the test subscriber prints.
#[derive(Clone, Default)]
pub struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.bytes().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    /// Captures this thread's info lines until the guard is dropped (in a
    /// Tokio test, the tasks its one-thread runtime polls log there too).
    pub fn start() -> (Captured, tracing::subscriber::DefaultGuard) {
        let out = Captured::default();
        let writer = out.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .without_time()
            .with_max_level(tracing::Level::INFO)
            .finish();
        (out, tracing::subscriber::set_default(subscriber))
    }

    /// Everything logged so far.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.bytes()).into_owned()
    }

    /// The bytes kept. A lock poisoned by a thread that panicked holding
    /// it still gives them: a byte buffer has no invariant to break, and a
    /// failing test should still see what was logged.
    fn bytes(&self) -> MutexGuard<'_, Vec<u8>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}
