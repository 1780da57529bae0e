//! The message model: what a producer hands helixmq and a handler receives.
//!
//! A [`Message`] carries its own id (UUID v7: time-ordered, collision-free),
//! typed headers, a priority and the attempt count the retry machinery keeps.
//! The mapping to and from AMQP properties lives in [`amqp`], once.

pub mod amqp;
mod headers;

pub use headers::{HeaderValue, Headers};

use bytes::Bytes;
use serde::{de::DeserializeOwned, Serialize};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::error::{Error, Result};

/// Header names helixmq writes. One place, shared by every backend.
pub mod header {
    /// Which attempt this delivery is (1 = first).
    pub const ATTEMPT: &str = "x-helixmq-attempt";
    /// W3C trace context.
    pub const TRACEPARENT: &str = "traceparent";
    /// Queue the message failed in.
    pub const ORIGIN_QUEUE: &str = "x-helixmq-origin-queue";
    /// Exchange the message was first published to.
    pub const ORIGIN_EXCHANGE: &str = "x-helixmq-origin-exchange";
    /// Routing key the message was first published with.
    pub const ORIGIN_ROUTING_KEY: &str = "x-helixmq-origin-routing-key";
    /// The last handler error.
    pub const LAST_ERROR: &str = "x-helixmq-last-error";
    /// Why the message was dead-lettered.
    pub const DEAD_LETTER_REASON: &str = "x-helixmq-dead-letter-reason";
    /// Unix milliseconds of the first failure.
    pub const FIRST_FAILURE: &str = "x-helixmq-first-failure-ms";
    /// Unix milliseconds of the last failure.
    pub const LAST_FAILURE: &str = "x-helixmq-last-failure-ms";
    /// Unix milliseconds a scheduled message is due (set by
    /// [`Broker::publish_delayed`](crate::Broker::publish_delayed)).
    pub const DUE_AT: &str = "x-helixmq-due-at-ms";
    /// Tokens a message is expected to cost (an integer), taken from a
    /// token-limited subscription's pool before its handler starts
    /// ([`crate::ratelimit`]).
    pub const TOKEN_ESTIMATE: &str = "x-helixmq-token-estimate";
    /// Unix milliseconds after which a request's caller no longer waits (set
    /// by [`Broker::request`](crate::Broker::request)): a worker skips a request
    /// past it instead of running its handler.
    pub const DEADLINE: &str = "x-helixmq-deadline-ms";
}

/// Message priority 0–10 (the spec's llm queue has `x-max-priority` 10).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Priority(u8);

impl Priority {
    /// 1
    pub const LOW: Priority = Priority(1);
    /// 5
    pub const NORMAL: Priority = Priority(5);
    /// 8
    pub const HIGH: Priority = Priority(8);
    /// 10
    pub const CRITICAL: Priority = Priority(10);
    /// Highest accepted value.
    pub const MAX: u8 = 10;

    /// A priority from 0 to 10; anything above is refused.
    pub fn new(value: u8) -> Result<Self> {
        if value > Self::MAX {
            return Err(Error::InvalidPriority {
                priority: value,
                reason: format!(
                    "priorities go from 0 to {} (low 1, normal 5, high 8, critical 10)",
                    Self::MAX
                ),
            });
        }
        Ok(Priority(value))
    }
    /// The numeric value.
    pub fn value(self) -> u8 {
        self.0
    }
}

impl std::str::FromStr for Priority {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "low" => Ok(Self::LOW),
            "normal" => Ok(Self::NORMAL),
            "high" => Ok(Self::HIGH),
            "critical" => Ok(Self::CRITICAL),
            other => match other.parse::<u8>() {
                Ok(v) => Priority::new(v),
                Err(_) => Err(Error::InvalidPriority {
                    priority: 0,
                    reason: format!(
                        "'{s}' is not a priority: use 0-10 or low/normal/high/critical"
                    ),
                }),
            },
        }
    }
}

/// AMQP delivery mode: whether a durable queue writes the message to disk.
///
/// Not to be confused with [`backend::Delivery`](crate::backend::Delivery), a
/// message as delivered from a queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeliveryMode {
    /// Written to disk by durable queues (AMQP delivery mode 2). The default.
    #[default]
    Persistent,
    /// Kept in memory only (delivery mode 1).
    Transient,
}

/// A message.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    /// Unique id; UUID v7 unless set.
    pub id: String,
    /// Application type, e.g. `llm.request`.
    pub kind: Option<String>,
    /// Body. `Bytes` so that fan-out and retries never copy it.
    pub payload: Bytes,
    /// MIME type, e.g. `application/json`.
    pub content_type: Option<String>,
    /// Content encoding, e.g. `gzip`.
    pub content_encoding: Option<String>,
    /// Application headers (typed).
    pub headers: Headers,
    /// Creation time, Unix seconds (AMQP timestamps are seconds).
    pub timestamp: u64,
    /// Priority, honoured by priority queues.
    pub priority: Option<Priority>,
    /// Correlation id for request/response tracking.
    pub correlation_id: Option<String>,
    /// Reply queue.
    pub reply_to: Option<String>,
    /// Per-message TTL.
    pub expiration: Option<Duration>,
    /// Persistent or transient.
    pub delivery_mode: DeliveryMode,
    /// Which attempt this delivery is (1 = first). Kept in [`header::ATTEMPT`].
    pub attempt: u32,
    /// The W3C trace context. Travels in the [`header::TRACEPARENT`] header on
    /// the wire, but is a field here: nearly every message carries only this
    /// header, and a one-entry header map cost an allocation of ~650 bytes per
    /// message and copy (half of the embedded broker's time).
    pub traceparent: Option<String>,
}

impl Message {
    /// A persistent message with a fresh UUID v7 id and the current timestamp.
    pub fn new(payload: impl Into<Bytes>) -> Self {
        Message {
            id: uuid::Uuid::now_v7().to_string(),
            kind: None,
            payload: payload.into(),
            content_type: None,
            content_encoding: None,
            headers: Headers::new(),
            timestamp: now_unix_secs(),
            priority: None,
            correlation_id: None,
            reply_to: None,
            expiration: None,
            delivery_mode: DeliveryMode::Persistent,
            attempt: 1,
            traceparent: None,
        }
    }

    /// A JSON message (`content_type: application/json`).
    pub fn json<T: Serialize>(value: &T) -> Result<Self> {
        let body = serde_json::to_vec(value)
            .map_err(|e| Error::InvalidMessage(format!("cannot serialize payload as JSON: {e}")))?;
        let mut m = Message::new(body);
        m.content_type = Some("application/json".into());
        Ok(m)
    }

    /// Decode the payload as JSON; the error names the message and the parse failure.
    pub fn parse_json<T: DeserializeOwned>(&self) -> Result<T> {
        serde_json::from_slice(&self.payload).map_err(|e| {
            Error::InvalidMessage(format!(
                "payload of message {} is not the expected JSON: {e}",
                self.id
            ))
        })
    }

    /// Set the type.
    pub fn with_kind(mut self, kind: impl Into<String>) -> Self {
        self.kind = Some(kind.into());
        self
    }
    /// Set the priority.
    pub fn with_priority(mut self, p: Priority) -> Self {
        self.priority = Some(p);
        self
    }
    /// Set the correlation id.
    pub fn with_correlation_id(mut self, id: impl Into<String>) -> Self {
        self.correlation_id = Some(id.into());
        self
    }
    /// Set a header.
    pub fn with_header(mut self, key: impl Into<String>, value: impl Into<HeaderValue>) -> Self {
        self.headers.insert(key.into(), value.into());
        self
    }
    /// Set the per-message TTL.
    pub fn with_expiration(mut self, ttl: Duration) -> Self {
        self.expiration = Some(ttl);
        self
    }
    /// Set the W3C `traceparent`.
    pub fn with_traceparent(mut self, tp: impl Into<String>) -> Self {
        self.traceparent = Some(tp.into());
        self
    }
    /// Start a W3C trace for this message unless it already carries one, so the
    /// publisher's and every handler's logs share one trace id (retries and
    /// dead letters keep the header).
    pub fn ensure_traceparent(&mut self) {
        // One set as a plain header (e.g. copied from an HTTP request) counts.
        if self.traceparent.is_none() {
            if let Some(HeaderValue::String(tp)) = self.headers.remove(header::TRACEPARENT) {
                self.traceparent = Some(tp);
            }
        }
        if self.traceparent.is_none() {
            // Random, non-zero ids as W3C requires; thread-local RNG, no syscall.
            let trace = rand::random::<u128>().max(1);
            let span = rand::random::<u64>().max(1);
            self.traceparent = Some(traceparent(trace, span));
        }
    }

    /// The W3C `traceparent`, if any (the field, or else a header of that name).
    pub fn traceparent(&self) -> Option<&str> {
        self.traceparent.as_deref().or_else(|| {
            self.headers
                .get(header::TRACEPARENT)
                .and_then(HeaderValue::as_str)
        })
    }
    /// The deadline of a request ([`header::DEADLINE`]): after it, its caller
    /// no longer waits for the reply. `None` for a message that is no request.
    pub fn deadline(&self) -> Option<SystemTime> {
        let ms = self.headers.get(header::DEADLINE)?.as_i64()?;
        Some(UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0)))
    }
    /// A string header.
    pub fn header_str(&self, key: &str) -> Option<&str> {
        self.headers.get(key).and_then(HeaderValue::as_str)
    }
}

/// `00-{trace:032x}-{span:016x}-01`, written directly: this runs for every
/// publish, and `format!` took 5 % of the embedded broker's publish path.
fn traceparent(trace: u128, span: u64) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(55);
    out.push_str("00-");
    for i in (0..32).rev() {
        out.push(HEX[((trace >> (i * 4)) & 0xf) as usize] as char);
    }
    out.push('-');
    for i in (0..16).rev() {
        out.push(HEX[((span >> (i * 4)) & 0xf) as usize] as char);
    }
    out.push_str("-01");
    out
}

/// Now, in Unix seconds.
pub fn now_unix_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Now, in Unix milliseconds.
pub fn now_unix_millis() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_is_what_format_would_write() {
        for (t, s) in [
            (1u128, 1u64),
            (u128::MAX, u64::MAX),
            (0x0af7651916cd43dd8448eb211c80319c, 0xb7ad6b7169203331),
        ] {
            assert_eq!(traceparent(t, s), format!("00-{t:032x}-{s:016x}-01"));
        }
    }

    #[test]
    fn priorities() {
        assert_eq!("high".parse::<Priority>().unwrap(), Priority::HIGH);
        assert_eq!("3".parse::<Priority>().unwrap().value(), 3);
        let e = "11".parse::<Priority>().unwrap_err().to_string();
        assert!(e.contains("0 to 10"), "{e}");
        assert!("urgent"
            .parse::<Priority>()
            .unwrap_err()
            .to_string()
            .contains("'urgent'"));
    }

    #[test]
    fn ids_are_unique_and_time_ordered() {
        let a = Message::new("x");
        let b = Message::new("x");
        assert_ne!(a.id, b.id);
        assert!(a.id < b.id);
    }
}
