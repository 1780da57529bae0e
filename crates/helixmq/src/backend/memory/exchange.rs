//! An exchange of the embedded broker: its kind and bindings, and routing.
//!
//! Bindings are a short list scanned linearly: topologies have a handful of
//! bindings per exchange, where a scan beats hashing and keeps topic patterns
//! and direct keys in one shape.

use std::sync::Arc;

use crate::topology::{topic_matches, Exchange, ExchangeKind};

/// A declared exchange.
#[derive(Debug)]
pub(super) struct ExchangeState {
    /// Shared with every message routed through it (no allocation per publish).
    pub name: Arc<str>,
    /// Routing rule.
    pub kind: ExchangeKind,
    /// As declared; compared on re-declare.
    pub durable: bool,
    /// `alternate-exchange`: where what this exchange routes nowhere goes.
    pub alternate: Option<String>,
    /// `(routing key or pattern, queue)`, each pair once.
    bindings: Vec<(String, Arc<str>)>,
}

impl ExchangeState {
    pub(super) fn new(x: &Exchange) -> Self {
        ExchangeState {
            name: Arc::from(x.name.as_str()),
            kind: x.kind,
            durable: x.durable,
            alternate: x.alternate_exchange.clone(),
            bindings: Vec::new(),
        }
    }

    /// Add a binding; binding twice is a no-op, as in AMQP.
    pub(super) fn bind(&mut self, key: &str, queue: Arc<str>) {
        if !self.bindings.iter().any(|(k, q)| k == key && *q == queue) {
            self.bindings.push((key.to_string(), queue));
        }
    }

    /// Forget every binding to `queue` (the queue was deleted).
    pub(super) fn unbind_queue(&mut self, queue: &str) {
        self.bindings.retain(|(_, q)| &**q != queue);
    }

    /// Append the queues `routing_key` reaches to `out`, each queue once.
    pub(super) fn route(&self, routing_key: &str, out: &mut Vec<Arc<str>>) {
        for (key, queue) in &self.bindings {
            let hit = match self.kind {
                ExchangeKind::Direct => key == routing_key,
                ExchangeKind::Topic => topic_matches(key, routing_key),
                ExchangeKind::Fanout => true,
            };
            if hit && !out.contains(queue) {
                out.push(queue.clone());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn x(name: &str, kind: ExchangeKind) -> Exchange {
        Exchange {
            name: name.into(),
            kind,
            durable: true,
            alternate_exchange: None,
        }
    }

    fn routed(x: &ExchangeState, key: &str) -> Vec<String> {
        let mut out = Vec::new();
        x.route(key, &mut out);
        out.iter().map(|q| q.to_string()).collect()
    }

    #[test]
    fn direct_topic_fanout() {
        let mut d = ExchangeState::new(&x("d", ExchangeKind::Direct));
        d.bind("a", "qa".into());
        d.bind("b", "qb".into());
        d.bind("a", "qa".into());
        assert_eq!(routed(&d, "a"), ["qa"]);
        assert!(routed(&d, "c").is_empty());

        let mut t = ExchangeState::new(&x("t", ExchangeKind::Topic));
        t.bind("debate.#", "debate".into());
        t.bind("#", "audit".into());
        t.bind("*.x", "audit".into());
        assert_eq!(routed(&t, "debate.round"), ["debate", "audit"]);
        assert_eq!(
            routed(&t, "y.x"),
            ["audit"],
            "a queue matched twice gets one copy"
        );

        let mut f = ExchangeState::new(&x("f", ExchangeKind::Fanout));
        f.bind("", "1".into());
        f.bind("ignored", "2".into());
        assert_eq!(routed(&f, "anything"), ["1", "2"]);
        f.unbind_queue("1");
        assert_eq!(routed(&f, ""), ["2"]);
    }
}
