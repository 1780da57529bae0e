//! Scheduled delivery on plain AMQP: delay levels a message walks by the binary
//! digits of its delay (the design of Celery 5.5's native delayed delivery),
//! without the delayed-message plugin.
//!
//! ```text
//! publish_delayed(X, K, m, d)   u = ⌈d / 250 ms⌉ units; the digits of u − 1, top first:
//!   ─► {p}.delay.23 (topic) key "b23.….b0.{words of X}.X[.K]"
//!        routes to the queue of the highest set digit j (or, none left, the final queue)
//!   ─► queue {p}.delay.j (TTL 250 ms·2^j) ─dead-letter─► exchange {p}.delay.{j−1} ─► next set digit …
//!   ─► queue {p}.delay.final (TTL 250 ms) ─dead-letter─► {p}.delay.due (topic)
//!   ─► the queues X would route K to: every binding (X, P, q) is mirrored as
//!      (due, "*.…(24).{words of X}.X.P", q)
//! ```
//!
//! Each level has one queue-wide TTL, so no message waits behind a longer one
//! (per-message TTLs only expire at the head). A message visits a level at most
//! once, so RabbitMQ's dead-letter cycle rule never drops it. The routing key
//! never changes on the way: dead-lettering keeps it, and the exchange a level
//! dead-letters to tells where in the walk the message is.

use std::time::Duration;

use super::{Binding, Exchange, ExchangeKind, Queue, Topology};
use crate::error::{Error, Result};

/// The delay unit: delays are rounded up to a multiple of it.
pub const DELAY_UNIT: Duration = Duration::from_millis(250);
/// Delay levels `{p}.delay.0` … `{p}.delay.23`: level `k` waits 250 ms·2^k
/// (the longest about 24 days; all levels plus the final unit: 48.5 days).
pub const DELAY_LEVELS: u32 = 24;
/// The shortest delay accepted.
pub const MIN_DELAY: Duration = Duration::from_secs(1);
/// The longest delay accepted: 30 days.
pub const MAX_DELAY: Duration = Duration::from_secs(30 * 24 * 3600);
/// An AMQP routing key is a short string: at most 255 bytes.
const MAX_ROUTING_KEY: usize = 255;

/// The delay a scheduled publish of `delay` waits: rounded up to
/// [`DELAY_UNIT`], or [`Error::InvalidDelay`] (naming the range) outside
/// [`MIN_DELAY`]..=[`MAX_DELAY`]. For checking a user's input before doing
/// anything else (e.g. `helixmq dlq replay --delay`).
///
/// ```
/// use std::time::Duration;
/// use helixmq::topology::schedule::check_delay;
/// assert_eq!(check_delay(Duration::from_millis(1100)).unwrap(), Duration::from_millis(1250));
/// assert!(check_delay(Duration::from_millis(999)).is_err());
/// ```
pub fn check_delay(delay: Duration) -> Result<Duration> {
    Walk::new(delay).map(|w| w.total())
}

/// How a delay is walked: the digits (levels) a message passes through,
/// after rounding up to [`DELAY_UNIT`], and its total.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Walk {
    /// Bit `k` set: the message waits in level `k`. The final unit is extra.
    pub digits: u32,
}

impl Walk {
    /// The walk for `delay`, refused outside [`MIN_DELAY`]..=[`MAX_DELAY`].
    pub(crate) fn new(delay: Duration) -> Result<Walk> {
        if !(MIN_DELAY..=MAX_DELAY).contains(&delay) {
            return Err(Error::InvalidDelay {
                delay: humantime::format_duration(delay).to_string(),
                reason: format!(
                    "a scheduled delay must be from {} to {}",
                    humantime::format_duration(MIN_DELAY),
                    humantime::format_duration(MAX_DELAY)
                ),
            });
        }
        let unit = DELAY_UNIT.as_nanos();
        // ≥ 4 units (1 s) and ≤ 10,368,000 units (30 days): fits u32, and u − 1 < 2^24.
        let units = delay.as_nanos().div_ceil(unit) as u32;
        Ok(Walk { digits: units - 1 })
    }

    /// The delay this walk waits (the request rounded up to the unit).
    pub(crate) fn total(&self) -> Duration {
        DELAY_UNIT * (self.digits + 1)
    }

    /// The routing key that carries the walk and the destination.
    pub(crate) fn routing_key(&self, exchange: &str, routing_key: &str) -> Result<String> {
        let mut key = String::with_capacity(2 * DELAY_LEVELS as usize + exchange.len() + 8);
        for k in (0..DELAY_LEVELS).rev() {
            key.push(if self.digits >> k & 1 == 1 { '1' } else { '0' });
            key.push('.');
        }
        key.push_str(&destination(exchange));
        if !routing_key.is_empty() {
            key.push('.');
            key.push_str(routing_key);
        }
        if key.len() > MAX_ROUTING_KEY {
            return Err(Error::InvalidMessage(format!(
                "a scheduled publish carries its exchange and routing key in a routing key of \
                 at most {MAX_ROUTING_KEY} bytes: '{exchange}' with '{routing_key}' needs {}; \
                 use a shorter routing key",
                key.len()
            )));
        }
        Ok(key)
    }
}

/// `{words of X}.X`: the word count keeps exchange `a.b` with key `c` apart
/// from exchange `a` with key `b.c`.
fn destination(exchange: &str) -> String {
    format!("{}.{exchange}", exchange.split('.').count())
}

/// The pattern of exchange `{p}.delay.{at}` routing to level `to` (its digit
/// set, the ones between unset), or to the final queue (`None`: no digit left
/// at or below `at`). Digits above `at` were walked already: any value.
fn walk_pattern(at: u32, to: Option<u32>) -> String {
    let mut words = Vec::with_capacity(DELAY_LEVELS as usize + 1);
    for k in (0..DELAY_LEVELS).rev() {
        words.push(match to {
            _ if k > at => "*",
            Some(j) if k > j => "0",
            Some(j) if k == j => "1",
            Some(_) => "*",
            None => "0",
        });
    }
    words.push("#");
    words.join(".")
}

/// The due exchange's mirror of a binding of `exchange` (of `kind`) with `key`.
fn mirror_pattern(exchange: &str, kind: ExchangeKind, key: &str) -> String {
    let mut p = "*.".repeat(DELAY_LEVELS as usize);
    p.push_str(&destination(exchange));
    match kind {
        ExchangeKind::Fanout => p.push_str(".#"),
        ExchangeKind::Direct | ExchangeKind::Topic if key.is_empty() => {}
        ExchangeKind::Direct | ExchangeKind::Topic => {
            p.push('.');
            p.push_str(key);
        }
    }
    p
}

impl Topology {
    /// Add (once) scheduled delivery: the delay levels, the final queue, the due
    /// exchange, and the due exchange's mirror of every binding (bindings added
    /// later by [`Topology::add_work_queue`] are mirrored too). Queues follow the
    /// topology's type: call [`Topology::with_quorum_queues`] after it.
    pub fn add_scheduling(&mut self) {
        if self.has_scheduling() {
            return;
        }
        let n = self.names.clone();
        let topic = |name: String| Exchange {
            name,
            kind: ExchangeKind::Topic,
            durable: true,
            alternate_exchange: None,
        };
        self.exchanges.push(topic(n.delay_due()));
        self.exchanges.push(Exchange {
            name: n.delay_final(),
            kind: ExchangeKind::Fanout,
            durable: true,
            alternate_exchange: None,
        });
        self.queues.push(
            Queue::durable(n.delay_final())
                .message_ttl(DELAY_UNIT)
                .dead_letter_to(n.delay_due()),
        );
        self.bindings.push(Binding {
            exchange: n.delay_final(),
            queue: n.delay_final(),
            routing_key: String::new(),
        });
        for k in 0..DELAY_LEVELS {
            self.exchanges.push(topic(n.delay_level(k)));
            let below = match k {
                0 => n.delay_final(),
                _ => n.delay_level(k - 1),
            };
            self.queues.push(
                Queue::durable(n.delay_level(k))
                    .message_ttl(DELAY_UNIT * (1 << k))
                    .dead_letter_to(below),
            );
            for j in 0..=k {
                self.bindings.push(Binding {
                    exchange: n.delay_level(k),
                    queue: n.delay_level(j),
                    routing_key: walk_pattern(k, Some(j)),
                });
            }
            self.bindings.push(Binding {
                exchange: n.delay_level(k),
                queue: n.delay_final(),
                routing_key: walk_pattern(k, None),
            });
        }
        let existing = std::mem::take(&mut self.bindings);
        for b in &existing {
            if let Some(m) = self.due_mirror(b) {
                self.bindings.push(m);
            }
        }
        self.bindings.splice(0..0, existing);
    }

    /// Whether this topology has scheduled delivery (its due exchange).
    pub fn has_scheduling(&self) -> bool {
        self.exchange(&self.names.delay_due()).is_some()
    }

    /// The exchange scheduled publishes enter: the top delay level.
    pub fn schedule_entry(&self) -> String {
        self.names.delay_level(DELAY_LEVELS - 1)
    }

    /// The due exchange's copy of `b`, unless `b` is part of the delay walk.
    /// An exchange this topology does not know is taken as direct.
    pub(crate) fn due_mirror(&self, b: &Binding) -> Option<Binding> {
        // Replies go to one requester's queue, never by a schedule.
        if self.names.is_delay_exchange(&b.exchange) || b.exchange == self.names.replies_exchange()
        {
            return None;
        }
        let kind = self
            .exchange(&b.exchange)
            .map_or(ExchangeKind::Direct, |e| e.kind);
        Some(Binding {
            exchange: self.names.delay_due(),
            queue: b.queue.clone(),
            routing_key: mirror_pattern(&b.exchange, kind, &b.routing_key),
        })
    }

    /// Only the due exchange and its mirror of `bindings` (exchange kinds
    /// from this topology): what a broker that already has scheduled delivery
    /// declares with a topology of its own, so its queues are reachable by
    /// scheduled messages too.
    pub(crate) fn due_mirrors(&self, bindings: &[Binding]) -> Topology {
        Topology {
            names: self.names.clone(),
            exchanges: vec![Exchange {
                name: self.names.delay_due(),
                kind: ExchangeKind::Topic,
                durable: true,
                alternate_exchange: None,
            }],
            queues: Vec::new(),
            bindings: bindings.iter().filter_map(|b| self.due_mirror(b)).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topology::{topic_matches, Names};

    /// Walk a key through the topology as RabbitMQ would: from the entry
    /// exchange, through each queue's TTL and dead-letter exchange, to the
    /// queues of the due exchange. Returns (levels visited, total wait, queues).
    fn walk(t: &Topology, key: &str) -> (Vec<String>, Duration, Vec<String>) {
        let mut at = t.schedule_entry();
        let mut visited = Vec::new();
        let mut waited = Duration::ZERO;
        loop {
            let hits: Vec<_> = t.route(&at, key).into_iter().cloned().collect();
            if at == t.names.delay_due() {
                return (visited, waited, hits.into_iter().map(|q| q.name).collect());
            }
            assert_eq!(hits.len(), 1, "exchange {at} routes {key} to one queue");
            let q = &hits[0];
            assert!(!visited.contains(&q.name), "a level is visited once");
            visited.push(q.name.clone());
            waited += q.message_ttl.unwrap();
            at = q.dead_letter_exchange.clone().unwrap();
        }
    }

    #[test]
    fn every_delay_walks_its_digits_to_the_destination() {
        let names = Names::new("hx");
        let mut t = Topology::spec(&names);
        assert!(!t.has_scheduling(), "declared on demand, not with the spec");
        t.add_scheduling();
        for d in [
            1_000, 1_001, 1_250, 3_000, 5_000, 90_000, 600_000, 86_400_000,
        ] {
            let d = Duration::from_millis(d);
            let w = Walk::new(d).unwrap();
            let key = w.routing_key(&names.tasks_exchange(), "llm").unwrap();
            let (levels, waited, queues) = walk(&t, &key);
            assert_eq!(waited, w.total(), "{d:?}");
            assert!(waited >= d && waited - d < DELAY_UNIT, "{d:?}: {waited:?}");
            assert_eq!(levels.len() as u32, w.digits.count_ones() + 1);
            assert_eq!(queues, ["hx.tasks.llm"], "{d:?}");
        }
        let max = Walk::new(MAX_DELAY).unwrap();
        let key = max
            .routing_key(&names.events_exchange(), "debate.x")
            .unwrap();
        let (_, waited, mut queues) = walk(&t, &key);
        assert_eq!(waited, MAX_DELAY);
        queues.sort();
        assert_eq!(queues, ["hx.events.audit", "hx.events.debate"]);
        let key = Walk::new(MIN_DELAY)
            .unwrap()
            .routing_key(&names.notifications_exchange(), "")
            .unwrap();
        assert_eq!(walk(&t, &key).2.len(), 3, "fanout: every bound queue");
        // Retries' requeue exchange is mirrored (a delayed DLQ replay uses it).
        let key = Walk::new(MIN_DELAY)
            .unwrap()
            .routing_key(&names.requeue_exchange(), "hx.tasks.debate")
            .unwrap();
        assert_eq!(walk(&t, &key).2, ["hx.tasks.debate"]);
    }

    #[test]
    fn delays_outside_the_range_are_refused_with_the_range() {
        for d in [
            Duration::ZERO,
            Duration::from_millis(999),
            MAX_DELAY + DELAY_UNIT,
        ] {
            let e = Walk::new(d).unwrap_err().to_string();
            assert!(e.contains("from 1s to 30days"), "{e}");
        }
    }

    #[test]
    fn the_exchange_word_count_keeps_destinations_apart() {
        let a = mirror_pattern("a.b", ExchangeKind::Direct, "c");
        let key = Walk::new(MIN_DELAY)
            .unwrap()
            .routing_key("a", "b.c")
            .unwrap();
        assert!(!topic_matches(&a, &key));
        let key = Walk::new(MIN_DELAY)
            .unwrap()
            .routing_key("a.b", "c")
            .unwrap();
        assert!(topic_matches(&a, &key));
    }

    #[test]
    fn scheduling_is_added_once_and_mirrors_later_work_queues() {
        let names = Names::new("hx");
        let mut t = Topology::system(&names);
        t.add_scheduling();
        let n = t.bindings.len();
        t.add_scheduling();
        assert_eq!(t.bindings.len(), n);
        t.add_work_queue(Queue::durable("hx.jobs"), "hx.requeue", "x");
        let key = Walk::new(MIN_DELAY)
            .unwrap()
            .routing_key("hx.requeue", "hx.jobs")
            .unwrap();
        assert_eq!(walk(&t, &key).2, ["hx.jobs"]);
        assert!(t.clone().with_quorum_queues().validate(None).is_ok());
    }
}
