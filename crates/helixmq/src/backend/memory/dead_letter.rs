//! Dead-letter headers as RabbitMQ writes them, so tools reading `x-death`
//! work the same on both backends.
//!
//! `x-death` is an array of tables, most recent first, one per (queue, reason)
//! with a `count`; `x-first-death-{queue,reason,exchange}` are set once.

use std::collections::BTreeMap;

use crate::message::{now_unix_secs, HeaderValue, Message};

/// `x-death`.
pub const X_DEATH: &str = "x-death";
/// `x-first-death-queue`.
pub const X_FIRST_DEATH_QUEUE: &str = "x-first-death-queue";
/// `x-first-death-reason`.
pub const X_FIRST_DEATH_REASON: &str = "x-first-death-reason";
/// `x-first-death-exchange`.
pub const X_FIRST_DEATH_EXCHANGE: &str = "x-first-death-exchange";

/// Record one death of `msg` in `queue` and clear its expiration (RabbitMQ
/// removes it so the message does not expire again where it lands; the
/// original stays in the entry as `original-expiration`).
pub(crate) fn annotate(
    msg: &mut Message,
    queue: &str,
    reason: &str,
    exchange: &str,
    routing_key: &str,
) {
    let original_expiration = msg.expiration.take();
    let h = &mut msg.headers;
    h.entry(X_FIRST_DEATH_QUEUE.into())
        .or_insert_with(|| queue.into());
    h.entry(X_FIRST_DEATH_REASON.into())
        .or_insert_with(|| reason.into());
    h.entry(X_FIRST_DEATH_EXCHANGE.into())
        .or_insert_with(|| exchange.into());

    let mut deaths = match h.remove(X_DEATH) {
        Some(HeaderValue::Array(a)) => a,
        _ => Vec::new(),
    };
    let same = |d: &HeaderValue| match d {
        HeaderValue::Table(t) => {
            t.get("queue").and_then(HeaderValue::as_str) == Some(queue)
                && t.get("reason").and_then(HeaderValue::as_str) == Some(reason)
        }
        _ => false,
    };
    // An existing (queue, reason) entry counts up and moves to the front.
    let entry = match deaths.iter().position(same) {
        Some(i) => {
            let mut e = deaths.remove(i);
            if let HeaderValue::Table(t) = &mut e {
                let n = t.get("count").and_then(HeaderValue::as_i64).unwrap_or(0);
                t.insert("count".into(), HeaderValue::Int(n + 1));
            }
            e
        }
        None => {
            let mut t = BTreeMap::new();
            t.insert("count".into(), HeaderValue::Int(1));
            t.insert("reason".into(), reason.into());
            t.insert("queue".into(), queue.into());
            t.insert("time".into(), HeaderValue::Timestamp(now_unix_secs()));
            t.insert("exchange".into(), exchange.into());
            t.insert(
                "routing-keys".into(),
                HeaderValue::Array(vec![routing_key.into()]),
            );
            if let Some(e) = original_expiration {
                t.insert(
                    "original-expiration".into(),
                    e.as_millis().to_string().into(),
                );
            }
            HeaderValue::Table(t)
        }
    };
    deaths.insert(0, entry);
    h.insert(X_DEATH.into(), HeaderValue::Array(deaths));
}

/// RabbitMQ's cycle rule: dead-lettering `msg` into `target` is a cycle (and the
/// copy is dropped) when `target` already appears in its `x-death` and no death
/// since then was a rejection — an automatic loop nobody would ever break.
pub(crate) fn is_cycle(msg: &Message, target: &str) -> bool {
    let Some(HeaderValue::Array(deaths)) = msg.headers.get(X_DEATH) else {
        return false;
    };
    let field = |d: &HeaderValue, k: &str| match d {
        HeaderValue::Table(t) => t.get(k).and_then(HeaderValue::as_str).map(str::to_owned),
        _ => None,
    };
    let Some(pos) = deaths
        .iter()
        .position(|d| field(d, "queue").as_deref() == Some(target))
    else {
        return false;
    };
    deaths[..=pos]
        .iter()
        .all(|d| field(d, "reason").as_deref() != Some("rejected"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn deaths(m: &Message) -> Vec<BTreeMap<String, HeaderValue>> {
        match m.headers.get(X_DEATH) {
            Some(HeaderValue::Array(a)) => a
                .iter()
                .map(|d| match d {
                    HeaderValue::Table(t) => t.clone(),
                    _ => panic!("not a table"),
                })
                .collect(),
            _ => Vec::new(),
        }
    }

    #[test]
    fn x_death_counts_per_queue_and_reason() {
        let mut m = Message::new("x").with_expiration(Duration::from_millis(250));
        annotate(&mut m, "q1", "expired", "ex", "rk");
        assert_eq!(m.expiration, None);
        annotate(&mut m, "q2", "rejected", "ex2", "rk2");
        annotate(&mut m, "q1", "expired", "ex", "rk");
        let d = deaths(&m);
        assert_eq!(d.len(), 2);
        assert_eq!(d[0]["queue"], HeaderValue::from("q1"));
        assert_eq!(d[0]["count"], HeaderValue::Int(2));
        assert_eq!(d[0]["original-expiration"], HeaderValue::from("250"));
        assert_eq!(d[0]["routing-keys"], HeaderValue::Array(vec!["rk".into()]));
        assert_eq!(d[1]["reason"], HeaderValue::from("rejected"));
        assert_eq!(m.header_str(X_FIRST_DEATH_QUEUE), Some("q1"));
        assert_eq!(m.header_str(X_FIRST_DEATH_REASON), Some("expired"));
        assert_eq!(m.header_str(X_FIRST_DEATH_EXCHANGE), Some("ex"));
    }

    #[test]
    fn cycles_without_rejection_are_detected() {
        let mut m = Message::new("x");
        assert!(!is_cycle(&m, "q"));
        annotate(&mut m, "q", "maxlen", "", "q");
        assert!(is_cycle(&m, "q"));
        assert!(!is_cycle(&m, "other"));
        annotate(&mut m, "r", "rejected", "x", "q");
        assert!(
            !is_cycle(&m, "q"),
            "a rejection in between breaks the automatic loop"
        );
    }
}
