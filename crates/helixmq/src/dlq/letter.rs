//! One dead letter as a reader sees it: the failure context helixmq's consumer
//! wrote into its headers, decoded once when the letter is read.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::message::{header, now_unix_millis, Message};

/// A dead-lettered message with its failure context.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    /// Message id (a fanned-out message that failed in several queues is in the
    /// DLQ once per queue: ids are not unique there).
    pub id: String,
    /// The queue it failed in (`x-helixmq-origin-queue`, or RabbitMQ's
    /// `x-first-death-queue` for broker-side dead letters: TTL, max length).
    pub origin_queue: Option<String>,
    /// The exchange it was first published to.
    pub origin_exchange: Option<String>,
    /// Its original routing key.
    pub origin_routing_key: Option<String>,
    /// How many times a handler ran it.
    pub attempts: u32,
    /// Why it was dead-lettered.
    pub reason: String,
    /// First failure, Unix milliseconds.
    pub first_failure_ms: Option<i64>,
    /// Last failure, Unix milliseconds.
    pub last_failure_ms: Option<i64>,
    /// Application type (`llm.request`).
    pub kind: Option<String>,
    /// Correlation id.
    pub correlation_id: Option<String>,
    /// W3C trace context.
    pub traceparent: Option<String>,
    /// Priority, when set.
    pub priority: Option<u8>,
    /// Read by a DLQ reader before (RabbitMQ marks every requeued message).
    pub redelivered: bool,
    /// Every header as text (failure headers included), ordered.
    pub headers: BTreeMap<String, String>,
    /// The message itself, for replay and the payload view.
    pub message: Arc<Message>,
    /// `reason` lower-cased, and the payload lower-cased when it is text: the
    /// filters compare against these, so a 100,000-letter page does not lower-case
    /// 100,000 strings per request.
    pub(crate) reason_lc: String,
    pub(crate) payload_lc: Option<String>,
    /// The reason with numbers replaced by `#`: what failures are grouped by.
    pub group: String,
}

impl DeadLetter {
    /// Decode the failure context of `message` as delivered from the DLQ.
    pub fn from_message(message: Arc<Message>, redelivered: bool) -> DeadLetter {
        let m = &*message;
        let ms = |k: &str| m.headers.get(k).and_then(|v| v.as_i64());
        let reason = m
            .header_str(header::DEAD_LETTER_REASON)
            .or_else(|| m.header_str(header::LAST_ERROR))
            .map(str::to_string)
            .or_else(|| {
                m.header_str("x-first-death-reason")
                    .map(|r| format!("broker: {r}"))
            })
            .unwrap_or_else(|| "(no reason recorded)".into());
        let mut headers: BTreeMap<String, String> = m
            .headers
            .iter()
            .map(|(k, v)| (k.clone(), v.to_string()))
            .collect();
        if let Some(tp) = &m.traceparent {
            headers.insert(header::TRACEPARENT.to_string(), tp.clone());
        }
        let payload_lc = std::str::from_utf8(&m.payload).ok().map(str::to_lowercase);
        DeadLetter {
            id: m.id.clone(),
            origin_queue: m
                .header_str(header::ORIGIN_QUEUE)
                .or_else(|| m.header_str("x-first-death-queue"))
                .map(str::to_string),
            origin_exchange: m
                .header_str(header::ORIGIN_EXCHANGE)
                .or_else(|| m.header_str("x-first-death-exchange"))
                .map(str::to_string),
            origin_routing_key: m.header_str(header::ORIGIN_ROUTING_KEY).map(str::to_string),
            attempts: m.attempt,
            first_failure_ms: ms(header::FIRST_FAILURE),
            last_failure_ms: ms(header::LAST_FAILURE),
            kind: m.kind.clone(),
            correlation_id: m.correlation_id.clone(),
            traceparent: m.traceparent.clone(),
            priority: m.priority.map(|p| p.value()),
            redelivered,
            headers,
            reason_lc: reason.to_lowercase(),
            group: group_key(&reason),
            reason,
            payload_lc,
            message,
        }
    }

    /// Milliseconds since the last failure (or since the message was created).
    pub fn age_ms(&self, now_ms: i64) -> i64 {
        let since = self
            .last_failure_ms
            .unwrap_or(self.message.timestamp as i64 * 1000);
        (now_ms - since).max(0)
    }

    /// Age in whole seconds at `now_ms`.
    pub fn age_secs_at(&self, now_ms: i64) -> u64 {
        (self.age_ms(now_ms) / 1000) as u64
    }

    /// Age in whole seconds, now.
    pub fn age_secs(&self) -> u64 {
        self.age_secs_at(now_unix_millis())
    }

    /// The payload as text (lossy), pretty-printed when it is JSON.
    pub fn payload_pretty(&self) -> String {
        match serde_json::from_slice::<serde_json::Value>(&self.message.payload) {
            Ok(v) => serde_json::to_string_pretty(&v).unwrap_or_default(),
            Err(_) => String::from_utf8_lossy(&self.message.payload).into_owned(),
        }
    }

    /// The copy that goes back to work: attempt 1, failure headers cleared (the
    /// origin headers stay: they name where the message really came from), and
    /// no per-message TTL — a message that expired once would expire again at once.
    pub fn replay_copy(&self) -> Message {
        let mut c = (*self.message).clone();
        c.attempt = 1;
        c.expiration = None;
        for h in [
            header::DEAD_LETTER_REASON,
            header::LAST_ERROR,
            header::FIRST_FAILURE,
            header::LAST_FAILURE,
            header::ATTEMPT,
        ] {
            c.headers.remove(h);
        }
        c.headers.retain(|k, _| {
            !k.starts_with("x-death")
                && !k.starts_with("x-first-death")
                && !k.starts_with("x-last-death")
        });
        c
    }
}

/// What failures are grouped by: the reason with every run of digits replaced
/// by `#`, so "timeout after 30s (id 4411)" and "timeout after 31s (id 97)"
/// are one group.
pub fn group_key(reason: &str) -> String {
    let mut out = String::with_capacity(reason.len());
    let mut in_digits = false;
    for c in reason.chars() {
        if c.is_ascii_digit() {
            if !in_digits {
                out.push('#');
            }
            in_digits = true;
        } else {
            in_digits = false;
            out.push(c);
        }
    }
    out
}

/// An age or a wait in seconds, short: `42s`, `3m10s`, `2h5m`, `4d2h`.
pub fn short_age(s: u64) -> String {
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{}s", s / 60, s % 60),
        3600..=86_399 => format!("{}h{}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d{}h", s / 86_400, (s % 86_400) / 3600),
    }
}

/// Unix milliseconds as RFC 3339 with milliseconds.
pub fn rfc3339_ms(ms: i64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_millis(t).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_ignore_numbers() {
        assert_eq!(
            group_key("timeout after 30s (id 4411)"),
            "timeout after #s (id #)"
        );
        assert_eq!(
            group_key("timeout after 31s (id 97)"),
            "timeout after #s (id #)"
        );
        assert_eq!(group_key("no digits"), "no digits");
        assert_eq!(short_age(190), "3m10s");
    }

    #[test]
    fn replay_copy_resets_the_failure() {
        let mut m = Message::new("x").with_header(header::DEAD_LETTER_REASON, "boom");
        m.attempt = 3;
        m.headers.insert("x-death".into(), "q".into());
        m.headers
            .insert(header::ORIGIN_QUEUE.into(), "p.tasks.llm".into());
        m.expiration = Some(std::time::Duration::from_secs(1));
        let l = DeadLetter::from_message(Arc::new(m), false);
        assert_eq!(l.reason, "boom");
        let c = l.replay_copy();
        assert_eq!(c.attempt, 1);
        assert!(c.expiration.is_none());
        assert!(!c.headers.contains_key("x-death"));
        assert!(!c.headers.contains_key(header::DEAD_LETTER_REASON));
        assert_eq!(c.header_str(header::ORIGIN_QUEUE), Some("p.tasks.llm"));
    }
}
