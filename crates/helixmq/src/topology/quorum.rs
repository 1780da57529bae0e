//! Quorum queues: turning a topology quorum where RabbitMQ allows it, and
//! refusing, before anything is declared, the queue combinations RabbitMQ
//! rejects (or silently downgrades) on the server version it runs.
//!
//! Rules (RabbitMQ 3.10–3.13 and 4.x):
//! - a quorum queue is always durable (a non-durable one is a 406);
//! - `x-max-priority` on a quorum queue is refused before 4.0 (4.0 gives quorum
//!   queues two priority levels, normal and high);
//! - `x-dead-letter-strategy: at-least-once` needs `x-overflow: reject-publish`
//!   (with `drop-head` RabbitMQ falls back to at-most-once without a word) and
//!   exists only on quorum queues;
//! - `x-delivery-limit` only works on quorum queues (a classic queue ignores it,
//!   which would leave a poison message looping).

use super::{DeadLetterStrategy, Overflow, Queue, QueueType, Topology, DEFAULT_DELIVERY_LIMIT};
use crate::error::{Error, Result};

/// A RabbitMQ server version, from the `version` server property of the AMQP
/// handshake (e.g. `3.10.8`, `4.0.0-rc.1`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct ServerVersion {
    /// Major version.
    pub major: u32,
    /// Minor version.
    pub minor: u32,
    /// Patch version.
    pub patch: u32,
}

impl ServerVersion {
    /// Parse `MAJOR.MINOR[.PATCH][-pre|+build]`; `None` when it is not a version.
    pub fn parse(s: &str) -> Option<Self> {
        let core = s.trim().split(['-', '+', ' ']).next()?;
        let mut parts = core.split('.');
        let major = parts.next()?.parse().ok()?;
        let minor = parts.next()?.parse().ok()?;
        let patch = match parts.next() {
            Some(p) => p.parse().ok()?,
            None => 0,
        };
        Some(ServerVersion {
            major,
            minor,
            patch,
        })
    }

    /// Whether quorum queues accept `x-max-priority` (RabbitMQ 4.0 and later).
    pub fn quorum_priorities(&self) -> bool {
        self.major >= 4
    }
}

impl std::fmt::Display for ServerVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

impl Queue {
    /// Every problem RabbitMQ `version` would have with this queue, one line each,
    /// naming the queue and the fix. `None`: the version is unknown, so the rules
    /// of the oldest supported server (3.10) apply.
    pub fn problems(&self, version: Option<&ServerVersion>) -> Vec<String> {
        let mut out = Vec::new();
        let q = &self.name;
        let on = match version {
            Some(v) => format!("RabbitMQ {v}"),
            None => "RabbitMQ before 4.0 (server version unknown)".to_string(),
        };
        if self.queue_type == QueueType::Quorum {
            if !self.durable {
                out.push(format!(
                    "queue '{q}': a quorum queue is always durable; declare it durable or make it a classic queue"
                ));
            }
            if self.max_priority.is_some() && !version.is_some_and(|v| v.quorum_priorities()) {
                out.push(format!(
                    "queue '{q}': x-max-priority on a quorum queue is refused by {on} (quorum queues have priorities from 4.0); keep this queue classic or drop its priority"
                ));
            }
            if self.dead_letter_strategy == Some(DeadLetterStrategy::AtLeastOnce)
                && self.overflow != Some(Overflow::RejectPublish)
            {
                out.push(format!(
                    "queue '{q}': x-dead-letter-strategy at-least-once needs x-overflow reject-publish (RabbitMQ silently falls back to at-most-once otherwise); set overflow reject-publish or use at-most-once"
                ));
            }
        } else {
            if self.dead_letter_strategy.is_some() {
                out.push(format!(
                    "queue '{q}': x-dead-letter-strategy applies only to quorum queues (a classic queue dead-letters at most once); make it a quorum queue or drop the strategy"
                ));
            }
            if self.delivery_limit.is_some() {
                out.push(format!(
                    "queue '{q}': x-delivery-limit works only on quorum queues (a classic queue ignores it); make it a quorum queue or drop the limit"
                ));
            }
        }
        out
    }
}

impl Topology {
    /// Check every queue against what RabbitMQ `version` accepts (see
    /// [`Queue::problems`]); all problems at once, as [`Error::InvalidConfig`].
    /// The RabbitMQ backend runs this before declaring, with the version read
    /// at connect.
    pub fn validate(&self, version: Option<&ServerVersion>) -> Result<()> {
        let problems: Vec<String> = self
            .queues
            .iter()
            .flat_map(|q| q.problems(version))
            .collect();
        if problems.is_empty() {
            Ok(())
        } else {
            Err(Error::InvalidConfig { problems })
        }
    }

    /// This topology with quorum queues wherever that is safe on every RabbitMQ
    /// version: every queue without a priority (work queues, DLQ, retry tiers)
    /// becomes a durable quorum queue; one that dead-letters (all but the DLQ)
    /// also gets the [`DEFAULT_DELIVERY_LIMIT`] poison guard and at-least-once
    /// dead-lettering (which sets
    /// `x-overflow: reject-publish`: a full queue refuses publishes, the
    /// publisher gets a nack, nothing is dropped). Priority queues (the spec's
    /// llm queue) stay classic: quorum queues take priorities only from 4.0. A
    /// queue already set to drop-head keeps that behaviour and at-most-once
    /// dead-lettering. Idempotent: call it again after adding retry tiers.
    ///
    /// ```
    /// use helixmq::topology::{Names, QueueType, Topology};
    /// let t = Topology::spec(&Names::default()).with_quorum_queues();
    /// assert_eq!(t.queue("helixagent.tasks.llm").unwrap().queue_type, QueueType::Classic);
    /// assert_eq!(t.queue("helixagent.tasks.background").unwrap().queue_type, QueueType::Quorum);
    /// assert!(t.validate(None).is_ok());
    /// ```
    pub fn with_quorum_queues(mut self) -> Self {
        for q in &mut self.queues {
            if q.max_priority.is_some() {
                continue;
            }
            q.queue_type = QueueType::Quorum;
            q.durable = true;
            // Only where the limit dead-letters: past it, a queue without a
            // dead-letter exchange (the DLQ) would DROP the message — and
            // `helixmq dlq list` returns every message it inspects.
            if q.delivery_limit.is_none() && q.dead_letter_exchange.is_some() {
                q.delivery_limit = Some(DEFAULT_DELIVERY_LIMIT);
            }
            let drop_head = q.overflow == Some(Overflow::DropHead);
            if q.dead_letter_exchange.is_some() && !drop_head && q.dead_letter_strategy.is_none() {
                q.dead_letter_strategy = Some(DeadLetterStrategy::AtLeastOnce);
                q.overflow = Some(Overflow::RejectPublish);
            }
        }
        self
    }

    /// [`Topology::with_quorum_queues`] when `queue_type` is quorum, else unchanged
    /// (the `helixmq.queue_type` setting).
    pub fn with_queue_type(self, queue_type: QueueType) -> Self {
        match queue_type {
            QueueType::Classic => self,
            QueueType::Quorum => self.with_quorum_queues(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topology::{ArgValue, Names};

    fn v(s: &str) -> ServerVersion {
        ServerVersion::parse(s).unwrap()
    }

    #[test]
    fn versions_parse_and_order() {
        assert_eq!(v("3.10.8").to_string(), "3.10.8");
        assert_eq!(v("4.0.0-rc.1"), v("4.0.0"));
        assert_eq!(v("3.13"), v("3.13.0"));
        assert!(v("3.10.8") < v("3.13.7") && v("3.13.7") < v("4.0.2"));
        assert!(ServerVersion::parse("dev").is_none());
        assert!(ServerVersion::parse("").is_none());
        assert!(!v("3.13.7").quorum_priorities());
        assert!(v("4.1.0").quorum_priorities());
    }

    #[test]
    fn quorum_spec_topology() {
        let t = Topology::spec(&Names::new("hx")).with_quorum_queues();
        let llm = t.queue("hx.tasks.llm").unwrap();
        assert_eq!(
            llm.queue_type,
            QueueType::Classic,
            "priority queue stays classic"
        );
        assert!(llm.arguments().iter().all(|(k, _)| *k != "x-queue-type"));
        for q in t.queues.iter().filter(|q| q.name != "hx.tasks.llm") {
            assert_eq!(q.queue_type, QueueType::Quorum, "{}", q.name);
            let args = q.arguments();
            let get = |k: &str| args.iter().find(|(n, _)| *n == k).map(|(_, v)| v.clone());
            assert_eq!(get("x-queue-type"), Some(ArgValue::Str("quorum".into())));
            if q.name == "hx.dlq" {
                // Past a limit the DLQ would drop, having nowhere to dead-letter.
                assert_eq!(get("x-delivery-limit"), None);
                assert_eq!(get("x-dead-letter-strategy"), None);
            } else {
                assert_eq!(
                    get("x-delivery-limit"),
                    Some(ArgValue::Int(20)),
                    "{}",
                    q.name
                );
            }
            if q.dead_letter_exchange.is_some() {
                assert_eq!(
                    get("x-dead-letter-strategy"),
                    Some(ArgValue::Str("at-least-once".into())),
                    "{}",
                    q.name
                );
                assert_eq!(
                    get("x-overflow"),
                    Some(ArgValue::Str("reject-publish".into()))
                );
            }
        }
        assert!(t.validate(None).is_ok());
        assert_eq!(t.clone().with_quorum_queues(), t, "idempotent");
        // The default stays classic, with no quorum-only argument, but for the
        // retry tier: quorum, at-least-once, no delivery limit.
        let c = Topology::spec(&Names::new("hx"));
        for q in &c.queues {
            let args = q.arguments();
            if q.name == "hx.retry" {
                assert_eq!(q.queue_type, QueueType::Quorum);
                assert!(args.contains(&(
                    "x-dead-letter-strategy",
                    ArgValue::Str("at-least-once".into())
                )));
                assert!(args.iter().all(|(k, _)| *k != "x-delivery-limit"));
                assert!(q.problems(None).is_empty());
            } else {
                assert_eq!(q.queue_type, QueueType::Classic, "{}", q.name);
                assert!(
                    args.iter()
                        .all(|(k, _)| !k.starts_with("x-d") || *k == "x-dead-letter-exchange"),
                    "{}",
                    q.name
                );
            }
        }
    }

    #[test]
    fn refused_combinations_name_the_queue_and_the_fix() {
        let prio = Queue::durable("hx.tasks.llm").max_priority(10).quorum();
        let e = Topology {
            queues: vec![prio.clone()],
            ..Topology::system(&Names::new("hx"))
        }
        .validate(Some(&v("3.10.8")))
        .unwrap_err()
        .to_string();
        assert!(e.contains("queue 'hx.tasks.llm'"), "{e}");
        assert!(e.contains("refused by RabbitMQ 3.10.8"), "{e}");
        assert!(e.contains("keep this queue classic"), "{e}");
        assert!(prio.problems(None)[0].contains("version unknown"));
        assert!(
            prio.problems(Some(&v("4.0.1"))).is_empty(),
            "allowed from 4.0"
        );

        let mut transient = Queue::durable("hx.q").quorum();
        transient.durable = false;
        assert!(transient.problems(None)[0].contains("always durable"));

        let mut alo = Queue::durable("hx.q").quorum().dead_letter_to("hx.dlx");
        alo.dead_letter_strategy = Some(DeadLetterStrategy::AtLeastOnce);
        assert!(alo.problems(None)[0].contains("needs x-overflow reject-publish"));
        alo.overflow = Some(Overflow::DropHead);
        assert_eq!(alo.problems(None).len(), 1);
        let ok = Queue::durable("hx.q")
            .quorum()
            .dead_letter_to("hx.dlx")
            .at_least_once_dead_lettering();
        assert!(ok.problems(None).is_empty());

        let classic = Queue::durable("hx.c")
            .delivery_limit(5)
            .at_least_once_dead_lettering();
        let p = classic.problems(None);
        assert_eq!(p.len(), 2, "{p:?}");
        assert!(p.iter().all(|l| l.starts_with("queue 'hx.c'")));

        // Every problem of a topology is reported at once.
        let t = Topology {
            queues: vec![transient, classic],
            ..Topology::system(&Names::new("hx"))
        };
        match t.validate(None) {
            Err(Error::InvalidConfig { problems }) => assert_eq!(problems.len(), 3),
            other => panic!("{other:?}"),
        }
    }
}
