//! The whole embedded broker as one value behind one lock: exchanges, queues,
//! routing, declaration checks and dead-letter routing.
//!
//! One lock keeps every operation atomic — a dead letter leaves one queue and
//! enters another in the same step, so nothing is in flight between them — and
//! costs one uncontended mutex acquisition per publish.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use super::dead_letter;
use super::exchange::ExchangeState;
use super::queue::{DeadLetter, Effects, QueueState, Stored};
use crate::error::{Error, Result};
use crate::message::Message;
use crate::topology::{ArgValue, Queue, Topology};

/// Dead letters routed per operation before the rest are dropped: a guard
/// against loops the cycle rule does not see (it never triggers on sane topologies).
const MAX_DEAD_LETTER_HOPS: usize = 100_000;

/// Broker state.
#[derive(Debug, Default)]
pub(super) struct State {
    /// Set by `close`: every later operation fails with [`Error::Closed`].
    pub closed: bool,
    exchanges: HashMap<String, ExchangeState>,
    queues: HashMap<Arc<str>, QueueState>,
    next_uid: u64,
    /// When the expiry timer will next wake on its own (`None`: it sleeps until told).
    pub timer_deadline: Option<Instant>,
    /// Reused for the queues a publish reaches (no allocation per publish).
    scratch: Vec<Arc<str>>,
}

fn describe(v: Option<&ArgValue>) -> String {
    match v {
        None => "none".into(),
        Some(ArgValue::Int(i)) => i.to_string(),
        Some(ArgValue::Str(s)) => format!("'{s}'"),
        Some(ArgValue::Bool(b)) => b.to_string(),
    }
}

/// The first argument where `want` differs from `have`, worded like RabbitMQ.
fn queue_mismatch(have: &Queue, want: &Queue) -> Option<String> {
    if have.durable != want.durable {
        return Some(format!(
            "inequivalent arg 'durable': received {} but current is {}",
            want.durable, have.durable
        ));
    }
    let (h, w) = (have.arguments(), want.arguments());
    let mut names: Vec<&str> = h.iter().map(|(n, _)| *n).collect();
    names.extend(
        w.iter()
            .map(|(n, _)| *n)
            .filter(|n| !h.iter().any(|(m, _)| m == n)),
    );
    for name in names {
        let hv = h.iter().find(|(n, _)| *n == name).map(|(_, v)| v);
        let wv = w.iter().find(|(n, _)| *n == name).map(|(_, v)| v);
        if hv != wv {
            return Some(format!(
                "inequivalent arg '{name}': received {} but current is {}",
                describe(wv),
                describe(hv)
            ));
        }
    }
    None
}

impl State {
    /// Declare every exchange, queue and binding of `t`, or nothing at all if
    /// one conflicts with what exists.
    pub(super) fn declare(&mut self, t: &Topology, fx: &mut Effects) -> Result<()> {
        for x in &t.exchanges {
            if x.name.is_empty() {
                return Err(Error::AccessRefused {
                    user: None,
                    detail: "the default exchange '' cannot be declared".into(),
                });
            }
            if let Some(have) = self.exchanges.get(&x.name) {
                let detail = if have.kind != x.kind {
                    Some(format!(
                        "inequivalent arg 'type': received '{}' but current is '{}'",
                        x.kind.as_str(),
                        have.kind.as_str()
                    ))
                } else if have.durable != x.durable {
                    Some(format!(
                        "inequivalent arg 'durable': received {} but current is {}",
                        x.durable, have.durable
                    ))
                } else if have.alternate != x.alternate_exchange {
                    let show = |a: &Option<String>| match a {
                        Some(a) => format!("'{a}'"),
                        None => "none".to_string(),
                    };
                    Some(format!(
                        "inequivalent arg 'alternate-exchange': received {} but current is {}",
                        show(&x.alternate_exchange),
                        show(&have.alternate)
                    ))
                } else {
                    None
                };
                if let Some(detail) = detail {
                    return Err(Error::PreconditionFailed {
                        kind: "exchange",
                        name: x.name.clone(),
                        detail,
                    });
                }
            }
        }
        for q in &t.queues {
            if let Some(have) = self.queues.get(q.name.as_str()) {
                if let Some(detail) = queue_mismatch(&have.def, q) {
                    return Err(Error::PreconditionFailed {
                        kind: "queue",
                        name: q.name.clone(),
                        detail,
                    });
                }
            }
        }
        for b in &t.bindings {
            if !self.exchanges.contains_key(&b.exchange) && t.exchange(&b.exchange).is_none() {
                return Err(Error::NotFound {
                    kind: "exchange",
                    name: b.exchange.clone(),
                });
            }
            if !self.queues.contains_key(b.queue.as_str()) && t.queue(&b.queue).is_none() {
                return Err(Error::NotFound {
                    kind: "queue",
                    name: b.queue.clone(),
                });
            }
        }
        for x in &t.exchanges {
            self.exchanges
                .entry(x.name.clone())
                .or_insert_with(|| ExchangeState::new(x));
        }
        for q in &t.queues {
            match self.queues.get_mut(q.name.as_str()) {
                // A redeclare is a use: it restarts an `x-expires` clock.
                Some(have) => have.touch(fx),
                None => {
                    self.next_uid += 1;
                    let state = QueueState::new(self.next_uid, q);
                    if let Some(at) = state.expires_at() {
                        fx.wake_at = Some(fx.wake_at.map_or(at, |w| w.min(at)));
                    }
                    self.queues.insert(state.name.clone(), state);
                }
            }
        }
        for b in &t.bindings {
            let queue = self
                .queues
                .get(b.queue.as_str())
                .expect("checked above")
                .name
                .clone();
            self.exchanges
                .get_mut(&b.exchange)
                .expect("checked above")
                .bind(&b.routing_key, queue);
        }
        Ok(())
    }

    /// The queues a publish reaches; the default exchange `""` reaches the queue
    /// named by the routing key. What an exchange routes nowhere goes to its
    /// alternate exchange, and so on along the chain (each exchange once; a
    /// missing alternate routes nowhere, as in RabbitMQ).
    fn route(
        &self,
        exchange: &str,
        routing_key: &str,
        out: &mut Vec<Arc<str>>,
    ) -> Result<Arc<str>> {
        if exchange.is_empty() {
            if let Some(q) = self.queues.get(routing_key) {
                out.push(q.name.clone());
            }
            return Ok(Arc::from(""));
        }
        let x = self
            .exchanges
            .get(exchange)
            .ok_or_else(|| Error::NotFound {
                kind: "exchange",
                name: exchange.to_string(),
            })?;
        let start = out.len();
        x.route(routing_key, out);
        if out.len() == start && x.alternate.is_some() {
            self.route_alternates(x, routing_key, out);
        }
        Ok(x.name.clone())
    }

    /// `x` routed `routing_key` nowhere: follow its alternate exchanges until
    /// one routes it (each exchange once; a missing one ends the chain).
    fn route_alternates(&self, x: &ExchangeState, routing_key: &str, out: &mut Vec<Arc<str>>) {
        let start = out.len();
        let mut seen = vec![&*x.name];
        let mut via = x;
        while out.len() == start {
            let Some(next) = via.alternate.as_deref().and_then(|a| self.exchanges.get(a)) else {
                break;
            };
            if seen.contains(&&*next.name) {
                break;
            }
            next.route(routing_key, out);
            seen.push(&next.name);
            via = next;
        }
    }

    /// Publish one message (a copy per queue reached; the payload is shared).
    pub(super) fn publish(
        &mut self,
        exchange: &str,
        routing_key: &str,
        mandatory: bool,
        msg: &Message,
        fx: &mut Effects,
    ) -> Result<()> {
        self.publish_cow(exchange, routing_key, mandatory, Cow::Borrowed(msg), fx)
    }

    /// [`State::publish`], taking the message without a copy when it is owned.
    pub(super) fn publish_cow(
        &mut self,
        exchange: &str,
        routing_key: &str,
        mandatory: bool,
        msg: Cow<'_, Message>,
        fx: &mut Effects,
    ) -> Result<()> {
        let mut targets = std::mem::take(&mut self.scratch);
        targets.clear();
        let res = self.publish_to(exchange, routing_key, mandatory, msg, &mut targets, fx);
        self.scratch = targets;
        res
    }

    fn publish_to(
        &mut self,
        exchange: &str,
        routing_key: &str,
        mandatory: bool,
        msg: Cow<'_, Message>,
        targets: &mut Vec<Arc<str>>,
        fx: &mut Effects,
    ) -> Result<()> {
        let exchange_name = self.route(exchange, routing_key, targets)?;
        if targets.is_empty() {
            if mandatory {
                return Err(Error::Unroutable {
                    message_id: msg.id.clone(),
                    exchange: exchange.to_string(),
                    routing_key: routing_key.to_string(),
                });
            }
            return Ok(());
        }
        let routing_key: Arc<str> = Arc::from(routing_key);
        let shared = Arc::new(msg.into_owned());
        let mut refused = false;
        for name in targets.iter() {
            let q = self
                .queues
                .get_mut(name)
                .expect("bindings only name live queues");
            let s = Stored {
                msg: shared.clone(),
                exchange: exchange_name.clone(),
                routing_key: routing_key.clone(),
                expires_at: None,
                redelivered: false,
            };
            refused |= !q.enqueue(s, fx);
        }
        if refused {
            // Like RabbitMQ: queues that had room keep their copy; the publisher is told.
            return Err(Error::PublishNacked {
                message_id: shared.id.clone(),
                exchange: exchange.to_string(),
                routing_key: routing_key.to_string(),
            });
        }
        Ok(())
    }

    /// A live queue by name.
    pub(super) fn queue(&mut self, name: &str) -> Result<&mut QueueState> {
        self.queues.get_mut(name).ok_or_else(|| Error::NotFound {
            kind: "queue",
            name: name.to_string(),
        })
    }

    /// The queue `name` if it is still the one with `uid` (not deleted and re-declared).
    pub(super) fn queue_uid(&mut self, name: &str, uid: u64) -> Option<&mut QueueState> {
        self.queues.get_mut(name).filter(|q| q.uid == uid)
    }

    /// Delete a queue and its bindings; its consumers are woken to see it gone.
    pub(super) fn delete_queue(&mut self, name: &str) {
        if let Some(q) = self.queues.remove(name) {
            for x in self.exchanges.values_mut() {
                x.unbind_queue(name);
            }
            q.wake_all();
        }
    }

    /// Delete an exchange with its bindings.
    pub(super) fn delete_exchange(&mut self, name: &str) {
        self.exchanges.remove(name);
    }

    /// Close: wake every consumer so it sees the broker closed.
    pub(super) fn close(&mut self) {
        self.closed = true;
        for q in self.queues.values() {
            q.wake_all();
        }
    }

    /// Dead-letter every expired head; the next expiry, which the timer sleeps until.
    /// Queues unused past their `x-expires` are deleted.
    pub(super) fn expire(&mut self, fx: &mut Effects) -> Option<Instant> {
        let mut next: Option<Instant> = None;
        let mut gone = Vec::new();
        let now = fx.now();
        for q in self.queues.values_mut() {
            if let Some(at) = q.expires_at() {
                if at <= now {
                    gone.push(q.name.clone());
                    continue;
                }
                next = Some(next.map_or(at, |n| n.min(at)));
            }
            if q.ready() > 0 {
                if let Some(at) = q.expire(fx) {
                    next = Some(next.map_or(at, |n| n.min(at)));
                }
            }
        }
        for name in gone {
            self.delete_queue(&name);
        }
        self.timer_deadline = next;
        next
    }

    /// Apply an operation's effects: route its dead letters (which may cause
    /// more), then tell whether the timer must wake earlier than planned.
    pub(super) fn finish(&mut self, mut fx: Effects) -> bool {
        let mut hops = 0;
        while let Some(d) = fx.dead.pop() {
            hops += 1;
            if hops > MAX_DEAD_LETTER_HOPS {
                tracing::error!(queue = %d.queue, "dead-letter loop: message dropped");
                continue;
            }
            self.route_dead_letter(d, &mut fx);
        }
        match fx.wake_at {
            Some(at) if self.timer_deadline.is_none_or(|d| at < d) => {
                self.timer_deadline = Some(at);
                true
            }
            _ => false,
        }
    }

    fn route_dead_letter(&mut self, d: DeadLetter, fx: &mut Effects) {
        let DeadLetter {
            mut stored,
            queue,
            reason,
            exchange,
            routing_key,
        } = d;
        let key = routing_key.unwrap_or_else(|| stored.routing_key.clone());
        dead_letter::annotate(
            Arc::make_mut(&mut stored.msg),
            &queue,
            reason.as_str(),
            &stored.exchange,
            &stored.routing_key,
        );
        let mut targets = Vec::new();
        let Ok(exchange) = self.route(&exchange, &key, &mut targets) else {
            tracing::warn!(queue = %queue, exchange = %exchange, "dead-letter exchange missing: message dropped");
            return;
        };
        targets.retain(|t| !dead_letter::is_cycle(&stored.msg, t));
        let Some((last, rest)) = targets.split_last() else {
            return;
        };
        let to = |msg: Arc<Message>| Stored {
            msg,
            exchange: exchange.clone(),
            routing_key: key.clone(),
            expires_at: None,
            redelivered: false,
        };
        for name in rest {
            self.enqueue_dead_letter(&queue, name, to(stored.msg.clone()), fx);
        }
        // The last target takes the original: no copy for the usual single route.
        self.enqueue_dead_letter(&queue, last, to(stored.msg), fx);
    }

    fn enqueue_dead_letter(&mut self, from: &str, to: &str, s: Stored, fx: &mut Effects) {
        let q = self
            .queues
            .get_mut(to)
            .expect("bindings only name live queues");
        if !q.enqueue(s, fx) {
            // Broker-side dead-lettering is not confirmed, in RabbitMQ either.
            tracing::warn!(from, to, "dead-letter target full: message dropped");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topology::{Binding, Exchange, ExchangeKind, Names};

    #[test]
    fn redeclare_with_other_arguments_names_queue_and_argument() {
        let names = Names::new("hx");
        let mut st = State::default();
        st.declare(&Topology::spec(&names), &mut Effects::default())
            .unwrap();
        st.declare(&Topology::spec(&names), &mut Effects::default())
            .unwrap();
        let mut t = Topology::spec(&names);
        t.queues
            .iter_mut()
            .find(|q| q.name == "hx.tasks.llm")
            .unwrap()
            .max_priority = Some(5);
        let e = st.declare(&t, &mut Effects::default()).unwrap_err();
        let text = e.to_string();
        assert!(
            matches!(e, Error::PreconditionFailed { kind: "queue", .. }),
            "{e:?}"
        );
        assert!(
            text.contains("hx.tasks.llm") && text.contains("x-max-priority"),
            "{text}"
        );
        assert!(text.contains("received 5 but current is 10"), "{text}");

        let mut t = Topology::system(&names);
        t.exchanges.push(Exchange {
            name: "hx.tasks".into(),
            kind: ExchangeKind::Topic,
            durable: true,
            alternate_exchange: None,
        });
        let e = st
            .declare(&t, &mut Effects::default())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("exchange 'hx.tasks'") && e.contains("'type'"),
            "{e}"
        );
    }

    #[test]
    fn binding_to_missing_queue_is_not_found_and_declares_nothing() {
        let mut st = State::default();
        let mut t = Topology::system(&Names::new("hx"));
        t.bindings.push(Binding {
            exchange: "hx.dlx".into(),
            queue: "nope".into(),
            routing_key: String::new(),
        });
        assert!(matches!(
            st.declare(&t, &mut Effects::default()),
            Err(Error::NotFound { kind: "queue", .. })
        ));
        assert!(st.queue("hx.dlq").is_err());
    }

    #[test]
    fn publish_errors() {
        let mut st = State::default();
        st.declare(&Topology::spec(&Names::new("hx")), &mut Effects::default())
            .unwrap();
        let m = Message::new("x");
        let mut fx = Effects::default();
        assert!(matches!(
            st.publish("nope", "k", true, &m, &mut fx),
            Err(Error::NotFound {
                kind: "exchange",
                ..
            })
        ));
        assert!(matches!(
            st.publish("hx.tasks", "nope", true, &m, &mut fx),
            Err(Error::Unroutable { .. })
        ));
        assert!(st.publish("hx.tasks", "nope", false, &m, &mut fx).is_ok());
        st.publish("", "hx.tasks.llm", true, &m, &mut fx).unwrap();
        assert_eq!(st.queue("hx.tasks.llm").unwrap().ready(), 1);
    }

    fn expired_message() -> Message {
        Message::new("x").with_expiration(std::time::Duration::ZERO)
    }

    #[test]
    fn dead_letter_routing_key_override_and_cycle_drop() {
        let mut st = State::default();
        let mut t = Topology::system(&Names::new("hx"));
        let mut src = Queue::durable("hx.src").dead_letter_to("hx.requeue");
        src.dead_letter_routing_key = Some("hx.dst".into());
        t.queues.push(src);
        t.queues.push(Queue::durable("hx.dst"));
        t.bindings.push(Binding {
            exchange: "hx.requeue".into(),
            queue: "hx.dst".into(),
            routing_key: "hx.dst".into(),
        });
        // A queue that dead-letters expired messages back to itself.
        t.queues
            .push(Queue::durable("hx.loop").dead_letter_to("hx.requeue"));
        t.bindings.push(Binding {
            exchange: "hx.requeue".into(),
            queue: "hx.loop".into(),
            routing_key: "hx.loop".into(),
        });
        st.declare(&t, &mut Effects::default()).unwrap();

        let mut fx = Effects::default();
        st.publish("", "hx.src", true, &expired_message(), &mut fx)
            .unwrap();
        st.publish("", "hx.loop", true, &expired_message(), &mut fx)
            .unwrap();
        assert!(
            st.finish(fx),
            "the timer is woken for the new expiring heads"
        );
        let mut fx = Effects::default();
        st.expire(&mut fx);
        st.finish(fx);
        let mut fx = Effects::default();
        let (moved, _) = st
            .queue("hx.dst")
            .unwrap()
            .get(&mut fx)
            .expect("re-routed by x-dead-letter-routing-key");
        assert_eq!(&*moved.routing_key, "hx.dst");
        assert_eq!(
            st.queue("hx.loop").unwrap().ready(),
            0,
            "an automatic cycle is dropped, not looped"
        );
    }
}
