//! A token bucket: what paces Events per node ([`crate::status::EventBudget`])
//! and token reviews for the whole relay ([`crate::bootstrap::ReviewGate`]).

use std::time::{Duration, Instant};

/// Tokens up to a burst, one more every `refill`.
#[derive(Debug, Clone, Copy)]
pub struct TokenBucket {
    tokens: f64,
    at: Instant,
}

impl TokenBucket {
    /// A bucket holding `burst` tokens at `now`.
    pub fn full(burst: f64, now: Instant) -> Self {
        TokenBucket {
            tokens: burst,
            at: now,
        }
    }

    /// When it was last counted.
    pub fn last(&self) -> Instant {
        self.at
    }

    /// Takes one token at `now`, the bucket refilled by one every `refill`
    /// up to `burst`; or how long until one is due. A `now` earlier than
    /// the last count (read before a lock another caller held) counts as
    /// that moment: the count never moves back.
    pub fn take(&mut self, now: Instant, refill: Duration, burst: f64) -> Result<(), Duration> {
        let now = now.max(self.at);
        let refilled = now.duration_since(self.at).as_secs_f64() / refill.as_secs_f64();
        self.tokens = (self.tokens + refilled).min(burst);
        self.at = now;
        if self.tokens < 1.0 {
            return Err(refill.mul_f64(1.0 - self.tokens));
        }
        self.tokens -= 1.0;
        Ok(())
    }
}
