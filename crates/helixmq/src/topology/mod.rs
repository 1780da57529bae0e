//! Topology as data: exchanges, queues, bindings — the spec's by default.
//!
//! ```text
//! producer ─► {p}.tasks (direct) ─► {p}.tasks.{background,llm,debate,verification,notifications}
//!          ─► {p}.events (topic) ─► {p}.events.{debate,verify,audit}
//!          ─► {p}.notifications (fanout) ─► {p}.notifications.{websocket,sse,webhooks}
//! handler fails ─► {p}.retry[.delay] (fanout exchange + TTL queue)
//!               ─(TTL expires, dead-lettered)─► {p}.requeue (direct, key = origin queue) ─► origin queue
//! attempts exhausted / poison ─► {p}.dlx (fanout) ─► {p}.dlq
//! scheduled publish ─► {p}.delay.23 … {p}.delay.0 (TTL levels, by the delay's digits)
//!                   ─► {p}.delay.final ─► {p}.delay.due (mirrors every binding) ─► queues
//! ```
//! Scheduled delivery ([`schedule`]) is added by [`Topology::add_scheduling`]
//! (`helixmq topology apply` does), or declared by a broker's first scheduled
//! publish.
//! Every name comes from [`Names`].

mod definitions;
mod names;
mod quorum;
pub mod schedule;

pub use definitions::definitions_json;
pub use names::{Names, DEFAULT_PREFIX, DEFAULT_RETRY_DELAY};
pub use quorum::ServerVersion;

use serde::Serialize;
use std::time::Duration;

/// AMQP exchange kinds helixmq uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ExchangeKind {
    /// Exact routing-key match.
    Direct,
    /// Pattern match with `*` (one word) and `#` (zero or more words).
    Topic,
    /// Every bound queue, routing key ignored.
    Fanout,
}

impl ExchangeKind {
    /// The AMQP name.
    pub fn as_str(self) -> &'static str {
        match self {
            ExchangeKind::Direct => "direct",
            ExchangeKind::Topic => "topic",
            ExchangeKind::Fanout => "fanout",
        }
    }
}

/// An exchange.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exchange {
    /// Full name.
    pub name: String,
    /// Kind.
    pub kind: ExchangeKind,
    /// Survives broker restarts.
    pub durable: bool,
    /// `alternate-exchange`: where a message this exchange routes to no queue
    /// goes instead of being dropped (the requeue exchange's is the DLX).
    pub alternate_exchange: Option<String>,
}

impl Exchange {
    /// The AMQP arguments (`alternate-exchange`), in a stable order.
    pub fn arguments(&self) -> Vec<(&'static str, ArgValue)> {
        self.alternate_exchange
            .iter()
            .map(|a| ("alternate-exchange", ArgValue::Str(a.clone())))
            .collect()
    }
}

/// Classic or quorum queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QueueType {
    /// Classic queue (supports priorities).
    #[default]
    Classic,
    /// Replicated Raft queue (cluster), at-least-once dead-lettering.
    Quorum,
}

impl QueueType {
    /// The `x-queue-type` value.
    pub fn as_str(self) -> &'static str {
        match self {
            QueueType::Classic => "classic",
            QueueType::Quorum => "quorum",
        }
    }
}

/// How a quorum queue dead-letters (`x-dead-letter-strategy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum DeadLetterStrategy {
    /// RabbitMQ's default: dead letters are published without confirms and can be
    /// lost if the target is unavailable (the only mode of classic queues).
    AtMostOnce,
    /// The quorum queue keeps a dead letter until the target queue confirmed it.
    /// RabbitMQ requires `x-overflow: reject-publish` for it (with `drop-head` it
    /// silently falls back to at-most-once).
    AtLeastOnce,
}

impl DeadLetterStrategy {
    /// The `x-dead-letter-strategy` value.
    pub fn as_str(self) -> &'static str {
        match self {
            DeadLetterStrategy::AtMostOnce => "at-most-once",
            DeadLetterStrategy::AtLeastOnce => "at-least-once",
        }
    }
}

/// A quorum queue's default `x-delivery-limit` set by
/// [`Topology::with_quorum_queues`]: the poison-message guard, and the default
/// RabbitMQ 4.0 applies to every quorum queue. A message whose delivery was
/// returned this many times (consumer crashed, channel closed, nack with
/// requeue) is dead-lettered with reason `delivery_limit` instead of looping.
pub const DEFAULT_DELIVERY_LIMIT: u32 = 20;

/// What a full queue does with a new message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Overflow {
    /// Drop (dead-letter) the oldest message.
    #[serde(rename = "drop-head")]
    DropHead,
    /// Refuse the publish: the publisher gets a nack. Nothing is lost silently.
    #[serde(rename = "reject-publish")]
    RejectPublish,
}

impl Overflow {
    /// The AMQP argument value.
    pub fn as_str(self) -> &'static str {
        match self {
            Overflow::DropHead => "drop-head",
            Overflow::RejectPublish => "reject-publish",
        }
    }
}

/// A queue and its arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Queue {
    /// Full name.
    pub name: String,
    /// Survives broker restarts.
    pub durable: bool,
    /// `x-max-priority` (1–255; the spec uses 10).
    pub max_priority: Option<u8>,
    /// `x-message-ttl`.
    pub message_ttl: Option<Duration>,
    /// `x-max-length`.
    pub max_length: Option<u64>,
    /// `x-overflow`.
    pub overflow: Option<Overflow>,
    /// `x-dead-letter-exchange`.
    pub dead_letter_exchange: Option<String>,
    /// `x-dead-letter-routing-key`.
    pub dead_letter_routing_key: Option<String>,
    /// `x-queue-type`.
    pub queue_type: QueueType,
    /// `x-delivery-limit` (quorum only).
    pub delivery_limit: Option<u32>,
    /// `x-dead-letter-strategy` (quorum only); `None` is RabbitMQ's default, at-most-once.
    pub dead_letter_strategy: Option<DeadLetterStrategy>,
    /// `x-single-active-consumer`: only the oldest consumer receives messages;
    /// when it goes, the next one takes over (the rate limiter's refiller lease).
    pub single_active_consumer: bool,
    /// `x-expires`: the broker deletes the queue once it went this long without
    /// a consumer (or a redeclare): a reply queue or a rate limiter's pause
    /// queue left by a process that is gone.
    pub expires: Option<Duration>,
}

impl Queue {
    /// A durable classic queue with no arguments.
    pub fn durable(name: impl Into<String>) -> Self {
        Queue {
            name: name.into(),
            durable: true,
            max_priority: None,
            message_ttl: None,
            max_length: None,
            overflow: None,
            dead_letter_exchange: None,
            dead_letter_routing_key: None,
            queue_type: QueueType::Classic,
            delivery_limit: None,
            dead_letter_strategy: None,
            single_active_consumer: false,
            expires: None,
        }
    }
    /// Set `x-single-active-consumer`.
    pub fn single_active_consumer(mut self) -> Self {
        self.single_active_consumer = true;
        self
    }
    /// Set `x-expires`.
    pub fn expires(mut self, after: Duration) -> Self {
        self.expires = Some(after);
        self
    }
    /// Set `x-max-priority`.
    pub fn max_priority(mut self, p: u8) -> Self {
        self.max_priority = Some(p);
        self
    }
    /// Set `x-message-ttl`.
    pub fn message_ttl(mut self, ttl: Duration) -> Self {
        self.message_ttl = Some(ttl);
        self
    }
    /// Set `x-max-length` and `x-overflow`.
    pub fn max_length(mut self, len: u64, overflow: Overflow) -> Self {
        self.max_length = Some(len);
        self.overflow = Some(overflow);
        self
    }
    /// Set `x-dead-letter-exchange`.
    pub fn dead_letter_to(mut self, exchange: impl Into<String>) -> Self {
        self.dead_letter_exchange = Some(exchange.into());
        self
    }
    /// Make it a quorum queue (replicated; always durable). Dead-lettering
    /// stays at-most-once unless [`Queue::at_least_once_dead_lettering`] is set.
    pub fn quorum(mut self) -> Self {
        self.queue_type = QueueType::Quorum;
        self.durable = true;
        self
    }
    /// Set `x-delivery-limit` (quorum only): after that many returned deliveries
    /// the message is dead-lettered instead of redelivered.
    pub fn delivery_limit(mut self, limit: u32) -> Self {
        self.delivery_limit = Some(limit);
        self
    }
    /// Quorum only: dead letters are kept until the dead-letter target confirmed
    /// them (`x-dead-letter-strategy: at-least-once`). Sets `x-overflow:
    /// reject-publish`, which RabbitMQ requires for it.
    pub fn at_least_once_dead_lettering(mut self) -> Self {
        self.dead_letter_strategy = Some(DeadLetterStrategy::AtLeastOnce);
        self.overflow = Some(Overflow::RejectPublish);
        self
    }

    /// The AMQP `x-` arguments, in a stable order (name, value).
    pub fn arguments(&self) -> Vec<(&'static str, ArgValue)> {
        let mut a = Vec::new();
        if let Some(p) = self.max_priority {
            a.push(("x-max-priority", ArgValue::Int(p as i64)));
        }
        if let Some(t) = self.message_ttl {
            a.push(("x-message-ttl", ArgValue::Int(t.as_millis() as i64)));
        }
        if let Some(l) = self.max_length {
            a.push(("x-max-length", ArgValue::Int(l as i64)));
        }
        if let Some(o) = self.overflow {
            a.push(("x-overflow", ArgValue::Str(o.as_str().into())));
        }
        if let Some(x) = &self.dead_letter_exchange {
            a.push(("x-dead-letter-exchange", ArgValue::Str(x.clone())));
        }
        if let Some(k) = &self.dead_letter_routing_key {
            a.push(("x-dead-letter-routing-key", ArgValue::Str(k.clone())));
        }
        // Written as declared, never inferred: validation (`Topology::validate`)
        // refuses the combinations RabbitMQ rejects or silently downgrades.
        if self.queue_type == QueueType::Quorum {
            a.push(("x-queue-type", ArgValue::Str("quorum".into())));
        }
        if let Some(d) = self.delivery_limit {
            a.push(("x-delivery-limit", ArgValue::Int(d as i64)));
        }
        if let Some(s) = self.dead_letter_strategy {
            a.push(("x-dead-letter-strategy", ArgValue::Str(s.as_str().into())));
        }
        if self.single_active_consumer {
            a.push(("x-single-active-consumer", ArgValue::Bool(true)));
        }
        if let Some(e) = self.expires {
            a.push(("x-expires", ArgValue::Int(e.as_millis() as i64)));
        }
        a
    }
}

/// A queue argument value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum ArgValue {
    /// Integer argument.
    Int(i64),
    /// String argument.
    Str(String),
    /// Boolean argument.
    Bool(bool),
}

/// A binding from an exchange to a queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Binding {
    /// Source exchange.
    pub exchange: String,
    /// Destination queue.
    pub queue: String,
    /// Routing key or topic pattern (ignored by fanout).
    pub routing_key: String,
}

/// A whole topology.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    /// The names it was built from.
    pub names: Names,
    /// Exchanges, declared first.
    pub exchanges: Vec<Exchange>,
    /// Queues.
    pub queues: Vec<Queue>,
    /// Bindings, declared last.
    pub bindings: Vec<Binding>,
}

/// The spec's task kinds: (routing key, max priority).
pub const TASK_KINDS: [(&str, Option<u8>); 5] = [
    ("background", None),
    ("llm", Some(10)),
    ("debate", None),
    ("verification", None),
    ("notifications", None),
];
/// Event queues and their topic patterns.
pub const EVENT_QUEUES: [(&str, &str); 3] = [
    ("debate", "debate.#"),
    ("verify", "verification.#"),
    ("audit", "#"),
];
/// Notification queues on the fanout.
pub const NOTIFICATION_QUEUES: [&str; 3] = ["websocket", "sse", "webhooks"];

impl Default for Topology {
    fn default() -> Self {
        Topology::spec(&Names::default())
    }
}

impl Topology {
    /// An empty topology under `names`, with only the system exchanges and queues
    /// (DLQ, default retry tier, requeue exchange).
    pub fn system(names: &Names) -> Self {
        let mut t = Topology {
            names: names.clone(),
            exchanges: vec![
                Exchange {
                    name: names.dead_letter_exchange(),
                    kind: ExchangeKind::Fanout,
                    durable: true,
                    alternate_exchange: None,
                },
                // A retry whose origin queue is gone routes nowhere: to the
                // DLQ rather than dropped (a classic tier) or kept for ever in
                // its tier, counting against the tier's limit (a quorum tier's
                // at-least-once dead-lettering retries unroutable letters).
                Exchange {
                    name: names.requeue_exchange(),
                    kind: ExchangeKind::Direct,
                    durable: true,
                    alternate_exchange: Some(names.dead_letter_exchange()),
                },
            ],
            queues: vec![Queue::durable(names.dlq())
                .message_ttl(Duration::from_secs(7 * 24 * 3600))
                .max_length(100_000, Overflow::RejectPublish)],
            bindings: vec![Binding {
                exchange: names.dead_letter_exchange(),
                queue: names.dlq(),
                routing_key: String::new(),
            }],
        };
        t.add_retry_tier(DEFAULT_RETRY_DELAY);
        t
    }

    /// The spec's topology under `names`.
    pub fn spec(names: &Names) -> Self {
        let mut t = Topology::system(names);
        let tasks = names.tasks_exchange();
        let events = names.events_exchange();
        let notes = names.notifications_exchange();
        t.exchanges.push(Exchange {
            name: tasks.clone(),
            kind: ExchangeKind::Direct,
            durable: true,
            alternate_exchange: None,
        });
        t.exchanges.push(Exchange {
            name: events.clone(),
            kind: ExchangeKind::Topic,
            durable: true,
            alternate_exchange: None,
        });
        t.exchanges.push(Exchange {
            name: notes.clone(),
            kind: ExchangeKind::Fanout,
            durable: true,
            alternate_exchange: None,
        });
        for (kind, prio) in TASK_KINDS {
            let mut q = Queue::durable(names.task_queue(kind));
            q.max_priority = prio;
            t.add_work_queue(q, &tasks, kind);
        }
        for (kind, pattern) in EVENT_QUEUES {
            t.add_work_queue(Queue::durable(names.event_queue(kind)), &events, pattern);
        }
        for kind in NOTIFICATION_QUEUES {
            t.add_work_queue(Queue::durable(names.notification_queue(kind)), &notes, "");
        }
        t
    }

    /// Add a work queue fed by `exchange` with `routing_key`: it dead-letters to the
    /// DLX and is bound to the requeue exchange under its own name, so retries
    /// come back to it whichever exchange fed it.
    pub fn add_work_queue(&mut self, mut queue: Queue, exchange: &str, routing_key: &str) {
        if queue.dead_letter_exchange.is_none() {
            queue.dead_letter_exchange = Some(self.names.dead_letter_exchange());
        }
        self.bindings.push(Binding {
            exchange: exchange.to_string(),
            queue: queue.name.clone(),
            routing_key: routing_key.to_string(),
        });
        self.bindings.push(Binding {
            exchange: self.names.requeue_exchange(),
            queue: queue.name.clone(),
            routing_key: queue.name.clone(),
        });
        if self.has_scheduling() {
            let added = &self.bindings[self.bindings.len() - 2..];
            let mirrors: Vec<Binding> = added.iter().filter_map(|b| self.due_mirror(b)).collect();
            self.bindings.extend(mirrors);
        }
        self.queues.push(queue);
    }

    /// Add (once) the retry tier for `delay`: a fanout exchange and a queue of the
    /// same name whose TTL is the delay and whose dead letters go to the requeue
    /// exchange with the routing key they were published with (the origin queue).
    ///
    /// The tier is a quorum queue with at-least-once dead-lettering whatever the
    /// rest of the topology is: a classic queue dead-letters at most once, and
    /// RabbitMQ 3.10 drops the classic dead letters that expire while a node
    /// stops its vhost (`stop_app`, a restart) — confirmed copies of acked
    /// deliveries, lost (RELIABILITY.md §8). A quorum tier keeps each letter
    /// until the requeue exchange's queue confirmed it.
    pub fn add_retry_tier(&mut self, delay: Duration) -> String {
        let name = self.names.retry_tier(delay);
        if !self.queues.iter().any(|q| q.name == name) {
            self.exchanges.push(Exchange {
                name: name.clone(),
                kind: ExchangeKind::Fanout,
                durable: true,
                alternate_exchange: None,
            });
            self.queues.push(
                Queue::durable(name.clone())
                    .message_ttl(delay)
                    .max_length(10_000, Overflow::RejectPublish)
                    .dead_letter_to(self.names.requeue_exchange())
                    .quorum()
                    .at_least_once_dead_lettering(),
            );
            self.bindings.push(Binding {
                exchange: name.clone(),
                queue: name.clone(),
                routing_key: String::new(),
            });
        }
        name
    }

    /// The queue named `name`.
    pub fn queue(&self, name: &str) -> Option<&Queue> {
        self.queues.iter().find(|q| q.name == name)
    }

    /// The exchange named `name`.
    pub fn exchange(&self, name: &str) -> Option<&Exchange> {
        self.exchanges.iter().find(|e| e.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_name_is_under_the_prefix() {
        let t = Topology::spec(&Names::new("hx"));
        for n in t
            .exchanges
            .iter()
            .map(|e| &e.name)
            .chain(t.queues.iter().map(|q| &q.name))
        {
            assert!(n.starts_with("hx."), "{n}");
        }
        // No queue dead-letters to the default exchange (refused under least privilege).
        assert!(t
            .queues
            .iter()
            .all(|q| q.dead_letter_exchange.as_deref() != Some("")));
    }

    #[test]
    fn spec_queues_and_arguments() {
        let t = Topology::default();
        assert_eq!(
            t.queue("helixagent.tasks.llm").unwrap().max_priority,
            Some(10)
        );
        let dlq = t.queue("helixagent.dlq").unwrap();
        assert_eq!(dlq.max_length, Some(100_000));
        assert_eq!(dlq.message_ttl, Some(Duration::from_secs(604_800)));
        let retry = t.queue("helixagent.retry").unwrap();
        assert_eq!(retry.message_ttl, Some(Duration::from_secs(60)));
        assert_eq!(retry.max_length, Some(10_000));
        assert_eq!(
            t.exchange("helixagent.events").unwrap().kind,
            ExchangeKind::Topic
        );
        assert_eq!(
            Names::default().retry_tier(Duration::from_millis(1500)),
            "helixagent.retry.1s500ms"
        );
    }
}

/// AMQP topic matching: words split on `.`, `*` matches exactly one word,
/// `#` zero or more.
pub fn topic_matches(pattern: &str, key: &str) -> bool {
    fn go(p: &[&str], k: &[&str]) -> bool {
        match p.split_first() {
            None => k.is_empty(),
            Some((&"#", rest)) => (0..=k.len()).any(|i| go(rest, &k[i..])),
            Some((&w, rest)) => match k.split_first() {
                Some((&kw, krest)) => (w == "*" || w == kw) && go(rest, krest),
                None => false,
            },
        }
    }
    let p: Vec<&str> = pattern.split('.').collect();
    let k: Vec<&str> = if key.is_empty() {
        Vec::new()
    } else {
        key.split('.').collect()
    };
    go(&p, &k)
}

impl Topology {
    /// The queues a publish to `exchange` with `routing_key` reaches, by this
    /// topology's bindings (`""` is the default exchange: the queue so named).
    pub fn route(&self, exchange: &str, routing_key: &str) -> Vec<&Queue> {
        if exchange.is_empty() {
            return self.queue(routing_key).into_iter().collect();
        }
        let Some(x) = self.exchange(exchange) else {
            return Vec::new();
        };
        let mut out: Vec<&Queue> = Vec::new();
        for b in self.bindings.iter().filter(|b| b.exchange == exchange) {
            let hit = match x.kind {
                ExchangeKind::Direct => b.routing_key == routing_key,
                ExchangeKind::Topic => topic_matches(&b.routing_key, routing_key),
                ExchangeKind::Fanout => true,
            };
            if hit {
                if let Some(q) = self.queue(&b.queue) {
                    if !out.iter().any(|o| o.name == q.name) {
                        out.push(q);
                    }
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod topic_tests {
    use super::topic_matches;

    #[test]
    fn topic_patterns() {
        assert!(topic_matches("#", ""));
        assert!(topic_matches("#", "a.b"));
        assert!(topic_matches("debate.#", "debate"));
        assert!(topic_matches("debate.#", "debate.round.1"));
        assert!(topic_matches("debate.*", "debate.round"));
        assert!(!topic_matches("debate.*", "debate.round.1"));
        assert!(!topic_matches("debate.*", "debate"));
        assert!(topic_matches("*.b.#", "a.b"));
        assert!(!topic_matches("a", "b"));
    }
}
