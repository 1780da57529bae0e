//! Publish and subscribe options, with documented defaults.

use std::time::Duration;

use crate::config::Config;
use crate::message::Priority;

/// Options of one publish.
#[derive(Debug, Clone)]
pub struct PublishOptions {
    /// Fail with [`Error::Unroutable`](crate::Error::Unroutable) if no queue
    /// matches. Default **true**: a message that reaches no queue is an error, never a silent drop.
    pub mandatory: bool,
    /// How long to wait for the confirm (and for a connection). Default: the config's `publish_timeout`.
    pub timeout: Option<Duration>,
    /// Override the message's priority.
    pub priority: Option<Priority>,
}

impl Default for PublishOptions {
    fn default() -> Self {
        PublishOptions {
            mandatory: true,
            timeout: None,
            priority: None,
        }
    }
}

/// When and how often a failed message is tried again.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    /// Total handler attempts before the DLQ (≥ 1). Default 3.
    pub max_attempts: u32,
    /// Delay tiers: attempt n waits `delays[min(n-1, len-1)]`. Each distinct delay
    /// is its own retry queue with a queue-wide TTL (per-message TTLs would block
    /// short delays behind long ones). Default: the config's `retry_delay` (60 s).
    pub delays: Vec<Duration>,
}

impl RetryPolicy {
    /// The delay before attempt `attempt + 1`, after `attempt` failed. A handler's
    /// requested delay picks the smallest tier at least as long (or the longest).
    pub fn delay_after(&self, attempt: u32, requested: Option<Duration>) -> Duration {
        if let Some(r) = requested {
            let mut tiers = self.delays.clone();
            tiers.sort();
            return tiers
                .iter()
                .copied()
                .find(|d| *d >= r)
                .or(tiers.last().copied())
                .unwrap_or(r);
        }
        let i = (attempt.max(1) as usize - 1).min(self.delays.len().saturating_sub(1));
        self.delays
            .get(i)
            .copied()
            .unwrap_or(crate::topology::DEFAULT_RETRY_DELAY)
    }
}

/// Duplicate guard: remembers settled `(message id, attempt)` pairs so a
/// redelivery of a message already handled is acked without running the handler.
#[derive(Debug, Clone, PartialEq)]
pub struct DedupOptions {
    /// How many ids to remember (oldest forgotten first). Default 100,000.
    pub capacity: usize,
    /// How long to remember an id. Default 10 minutes.
    pub ttl: Duration,
}

impl Default for DedupOptions {
    fn default() -> Self {
        DedupOptions {
            capacity: 100_000,
            ttl: Duration::from_secs(600),
        }
    }
}

/// Options of one subscription.
#[derive(Debug, Clone, Default)]
pub struct SubscribeOptions {
    /// Unacked deliveries the broker may push (`basic.qos`). Default: config `prefetch_count` (10).
    pub prefetch: Option<u16>,
    /// Handlers run at once. Default: the prefetch.
    pub concurrency: Option<usize>,
    /// Consumer tag. Default: `helixmq-<queue>-<uuid>`.
    pub consumer_tag: Option<String>,
    /// A handler running longer counts as failed (Retry). Default 5 minutes.
    pub handler_timeout: Option<Duration>,
    /// Retry policy. Default: config `max_attempts` (3) and `retry_delay` (60 s).
    pub retry: Option<RetryPolicy>,
    /// Optional duplicate guard. Default off.
    pub dedup: Option<DedupOptions>,
    /// Optional inbox: effects exactly once across workers and restarts
    /// ([`crate::inbox`]). Default off.
    #[cfg(feature = "postgres")]
    pub inbox: Option<crate::inbox::Inbox>,
    /// Optional rate limit shared with every subscription, in any process,
    /// that names the same key ([`crate::ratelimit`]): each handler start
    /// waits for a permit. Default off.
    pub rate_limit: Option<crate::ratelimit::RateLimit>,
}

#[cfg(feature = "postgres")]
impl SubscribeOptions {
    /// Handle each delivery in a transaction of `pool` that records its id
    /// (see [`crate::inbox`]); [`SubscribeOptions::inbox_with`] to configure it.
    pub fn inbox(self, pool: sqlx::PgPool) -> Self {
        self.inbox_with(crate::inbox::Inbox::new(pool))
    }
    /// [`SubscribeOptions::inbox`] with a configured [`Inbox`](crate::inbox::Inbox).
    pub fn inbox_with(mut self, inbox: crate::inbox::Inbox) -> Self {
        self.inbox = Some(inbox);
        self
    }
}

/// Options with every default filled in.
#[derive(Debug, Clone)]
pub(crate) struct Resolved {
    pub prefetch: u16,
    pub concurrency: usize,
    pub consumer_tag: Option<String>,
    pub handler_timeout: Duration,
    pub retry: RetryPolicy,
    pub dedup: Option<DedupOptions>,
    #[cfg(feature = "postgres")]
    pub inbox: Option<crate::inbox::Inbox>,
    pub rate_limit: Option<crate::ratelimit::RateLimit>,
}

impl SubscribeOptions {
    pub(crate) fn resolved(self, config: &Config) -> Resolved {
        let prefetch = self
            .prefetch
            .unwrap_or(config.rabbitmq.prefetch_count)
            .max(1);
        let retry = self.retry.unwrap_or_else(|| RetryPolicy {
            max_attempts: config.helixmq.max_attempts,
            delays: vec![config.helixmq.retry_delay],
        });
        Resolved {
            prefetch,
            concurrency: self.concurrency.unwrap_or(prefetch as usize).max(1),
            consumer_tag: self.consumer_tag,
            handler_timeout: self.handler_timeout.unwrap_or(Duration::from_secs(300)),
            retry: RetryPolicy {
                max_attempts: retry.max_attempts.max(1),
                delays: if retry.delays.is_empty() {
                    vec![config.helixmq.retry_delay]
                } else {
                    retry.delays
                },
            },
            dedup: self.dedup,
            #[cfg(feature = "postgres")]
            inbox: self.inbox,
            rate_limit: self.rate_limit,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delay_tiers() {
        let p = RetryPolicy {
            max_attempts: 5,
            delays: vec![Duration::from_secs(1), Duration::from_secs(10)],
        };
        assert_eq!(p.delay_after(1, None), Duration::from_secs(1));
        assert_eq!(p.delay_after(2, None), Duration::from_secs(10));
        assert_eq!(p.delay_after(4, None), Duration::from_secs(10));
        assert_eq!(
            p.delay_after(1, Some(Duration::from_secs(3))),
            Duration::from_secs(10)
        );
        assert_eq!(
            p.delay_after(1, Some(Duration::from_secs(30))),
            Duration::from_secs(10)
        );
    }
}
