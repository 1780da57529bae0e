//! The one place every exchange and queue name is made.
//!
//! All names start with `{prefix}.` so that a user holding the spec's
//! permissions (`{prefix}\..*`) may configure, write and read all of them.

use std::time::Duration;

/// The spec's prefix.
pub const DEFAULT_PREFIX: &str = "helixagent";

/// The names derived from one prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    prefix: String,
}

impl Default for Names {
    fn default() -> Self {
        Names::new(DEFAULT_PREFIX)
    }
}

impl Names {
    /// Names under `prefix` (e.g. `helixagent`).
    pub fn new(prefix: impl Into<String>) -> Self {
        Names {
            prefix: prefix.into(),
        }
    }
    /// The prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }
    fn name(&self, rest: &str) -> String {
        format!("{}.{}", self.prefix, rest)
    }
    /// `{prefix}.tasks`, the direct exchange routing tasks by type.
    pub fn tasks_exchange(&self) -> String {
        self.name("tasks")
    }
    /// `{prefix}.events`, the topic exchange.
    pub fn events_exchange(&self) -> String {
        self.name("events")
    }
    /// `{prefix}.notifications`, the fanout exchange.
    pub fn notifications_exchange(&self) -> String {
        self.name("notifications")
    }
    /// `{prefix}.tasks.{kind}`, a task queue.
    pub fn task_queue(&self, kind: &str) -> String {
        self.name(&format!("tasks.{kind}"))
    }
    /// `{prefix}.events.{kind}`, an event queue.
    pub fn event_queue(&self, kind: &str) -> String {
        self.name(&format!("events.{kind}"))
    }
    /// `{prefix}.notifications.{kind}`, a notification queue.
    pub fn notification_queue(&self, kind: &str) -> String {
        self.name(&format!("notifications.{kind}"))
    }
    /// `{prefix}.dlq`, the dead-letter queue.
    pub fn dlq(&self) -> String {
        self.name("dlq")
    }
    /// `{prefix}.dlx`, the fanout exchange feeding the DLQ. Work queues name it as
    /// their `x-dead-letter-exchange`: the default exchange is refused under least privilege.
    pub fn dead_letter_exchange(&self) -> String {
        self.name("dlx")
    }
    /// `{prefix}.requeue`, the direct exchange where retried messages come back
    /// after their delay; every work queue is bound to it with its own name as key.
    pub fn requeue_exchange(&self) -> String {
        self.name("requeue")
    }
    /// `{prefix}.delay.{level}`: the topic exchange and the queue of one delay
    /// level of scheduled delivery (see [`crate::topology::schedule`]).
    pub fn delay_level(&self, level: u32) -> String {
        self.name(&format!("delay.{level}"))
    }
    /// `{prefix}.delay.final`: the last hop of every scheduled message (a fanout
    /// exchange and a queue of one delay unit), whose dead letters go to
    /// [`Names::delay_due`].
    pub fn delay_final(&self) -> String {
        self.name("delay.final")
    }
    /// `{prefix}.delay.due`: the topic exchange where a scheduled message is due;
    /// it mirrors every binding of the topology, so the message reaches the
    /// queues its destination exchange and routing key would have.
    pub fn delay_due(&self) -> String {
        self.name("delay.due")
    }
    /// `{prefix}.ratelimit`, the direct exchange of every shared rate limit:
    /// permits, token chunks, leases and pauses, routed by `{key}.{what}`.
    pub fn rate_limit_exchange(&self) -> String {
        self.name("ratelimit")
    }
    /// `{prefix}.ratelimit.{key}`: the request permits of rate limit `key`.
    pub fn rate_limit_permits(&self, key: &str) -> String {
        self.name(&format!("ratelimit.{key}"))
    }
    /// `{prefix}.ratelimit.{key}.tokens`: the token chunks of rate limit `key`.
    pub fn rate_limit_tokens(&self, key: &str) -> String {
        self.name(&format!("ratelimit.{key}.tokens"))
    }
    /// `{prefix}.ratelimit.{key}.lease`: the refiller lease of rate limit `key`
    /// (a single-active-consumer queue).
    pub fn rate_limit_lease(&self, key: &str) -> String {
        self.name(&format!("ratelimit.{key}.lease"))
    }
    /// `{prefix}.ratelimit.{key}.pause.{member}`: where one limiter of `key`
    /// hears pauses (one queue per subscription, removed when it goes).
    pub fn rate_limit_listener(&self, key: &str, member: &str) -> String {
        self.name(&format!("ratelimit.{key}.pause.{member}"))
    }
    /// Whether `exchange` is one of the delay levels' exchanges (never mirrored).
    pub fn is_delay_exchange(&self, exchange: &str) -> bool {
        exchange
            .strip_prefix(&self.prefix)
            .is_some_and(|r| r.starts_with(".delay."))
    }
    /// `{prefix}.replies`: the direct exchange every reply of request-reply
    /// goes through, routed by the requester's reply queue name. A queue of
    /// ours, not the default exchange (refused under least privilege).
    pub fn replies_exchange(&self) -> String {
        self.name("replies")
    }
    /// `{prefix}.replies.{id}`: the reply queue of one requesting broker
    /// handle, bound to [`Names::replies_exchange`] under its own name.
    pub fn reply_queue(&self, id: &str) -> String {
        self.name(&format!("replies.{id}"))
    }
    /// Retry tier for `delay`: `{prefix}.retry` for the spec's 60 s, else
    /// `{prefix}.retry.{delay}` (e.g. `helixagent.retry.5s`). The same name is
    /// used for the tier's fanout exchange and its queue.
    pub fn retry_tier(&self, delay: Duration) -> String {
        if delay == DEFAULT_RETRY_DELAY {
            self.name("retry")
        } else {
            self.name(&format!("retry.{}", humantime::format_duration(delay)).replace(' ', ""))
        }
    }
}

/// The spec's retry queue TTL.
pub const DEFAULT_RETRY_DELAY: Duration = Duration::from_secs(60);
