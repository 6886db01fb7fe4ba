//! A stand-in for a resolver in tests of the bounded lookups (the relay's
//! name, NAT64 discovery): it answers when told to, and counts how many
//! lookups were started, which is how the tests see a lookup joined or
//! its answer reused instead of asked for again.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Counts the lookups its [`SlowResolver::answer`]s start; clones share
/// the count.
#[derive(Debug, Clone, Default)]
pub(crate) struct SlowResolver {
    started: Arc<AtomicUsize>,
}

impl SlowResolver {
    /// A lookup, as the code under test takes it (started when called,
    /// and counted then), that answers `answer` after `delay`.
    pub(crate) fn answer<T: Send + 'static>(
        &self,
        delay: Duration,
        answer: T,
    ) -> impl FnOnce() -> Pin<Box<dyn Future<Output = std::io::Result<T>> + Send>> {
        let started = self.started.clone();
        move || {
            started.fetch_add(1, Ordering::SeqCst);
            Box::pin(async move {
                tokio::time::sleep(delay).await;
                Ok(answer)
            })
        }
    }

    /// How many lookups were started.
    pub(crate) fn started(&self) -> usize {
        self.started.load(Ordering::SeqCst)
    }
}
