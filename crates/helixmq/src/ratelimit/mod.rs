//! Rate limits shared by every process that uses the same key, on RabbitMQ alone.
//!
//! ```text
//! refiller (one per key: whoever holds the lease)
//!   ─► {p}.ratelimit (direct) key "{key}.permit" ─► {p}.ratelimit.{key}         (x-max-length = burst, drop-head)
//!                             key "{key}.tokens" ─► {p}.ratelimit.{key}.tokens  (token chunks, same)
//! every limiter ◄─ one permit (+ token chunks) before each handler start, acked as it starts
//! lease: {p}.ratelimit.{key}.lease (single active consumer, one token message held unacked
//!        by the refiller; it dies → the broker hands the token to the next consumer)
//! 429 ─► {p}.ratelimit key "{key}.pause" ─► {p}.ratelimit.{key}.pause.{member} (one per limiter)
//!        every limiter waits; the refiller purges the permits and mints none until then
//! ```
//!
//! A [`RateLimit`] on [`SubscribeOptions`](crate::SubscribeOptions) makes every
//! handler start wait for a permit. Permits are minted at the limit's rate by
//! one refiller per key, elected by RabbitMQ's single active consumer, so the
//! processes together stay within the limit however many there are. The
//! design, its bounds and why not Redis: `docs/RATE_LIMITS.md`.
//!
//! Tokens: a message may carry its estimated cost
//! ([`header::TOKEN_ESTIMATE`](crate::message::header::TOKEN_ESTIMATE)); the
//! handler reports what it really used with [`report_tokens`]; the
//! difference is returned to the pool (or taken before the next start).

mod limiter;

pub(crate) use limiter::Limiter;

use std::cell::Cell;
use std::str::FromStr;
use std::time::Duration;

use crate::error::{Error, Result};
use crate::topology::{Binding, Exchange, ExchangeKind, Names, Overflow, Queue, Topology};

/// The form a rate limit is written in, shown with every parse error.
pub const RATE_LIMIT_FORM: &str =
    "KEY=N/min[,Ntokens/min][,burst=N] (also /s, /h), e.g. openai-key-1=500/min,90000tokens/min";

/// A limit shared by every subscription, in any process on any host, that
/// names the same `key` on the same broker and prefix.
///
/// ```
/// use helixmq::ratelimit::RateLimit;
/// let l: RateLimit = "openai-key-1=500/min,90000tokens/min".parse().unwrap();
/// assert_eq!(l.key, "openai-key-1");
/// assert_eq!(l.requests_per_minute, 500);
/// assert_eq!(l.tokens_per_minute, Some(90_000));
/// assert!("openai-key-1=500".parse::<RateLimit>().is_err());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateLimit {
    /// The name every sharer uses (e.g. the API key's label; never the secret
    /// itself: it is part of queue names). Letters, digits, `-`, `_`, `.`, `:`.
    pub key: String,
    /// Handler starts per minute, all sharers together.
    pub requests_per_minute: u32,
    /// Tokens per minute, all sharers together; `None`: not limited.
    pub tokens_per_minute: Option<u64>,
    /// Unused permits kept for a burst (the permit queue's `x-max-length`).
    /// Default: one second of permits (at least 1).
    pub burst: Option<u32>,
}

impl RateLimit {
    /// A limit of `requests_per_minute` on `key`.
    pub fn new(key: impl Into<String>, requests_per_minute: u32) -> Self {
        RateLimit {
            key: key.into(),
            requests_per_minute,
            tokens_per_minute: None,
            burst: None,
        }
    }

    /// Also limit tokens per minute.
    pub fn tokens_per_minute(mut self, tokens: u64) -> Self {
        self.tokens_per_minute = Some(tokens);
        self
    }

    /// Check the key and the figures; [`Error::InvalidRateLimit`] says what is wrong.
    pub fn validate(&self) -> Result<()> {
        let bad = |reason: String| Error::InvalidRateLimit {
            spec: self.to_string(),
            reason,
        };
        if self.key.is_empty() || self.key.len() > 100 {
            return Err(bad("the key must be 1 to 100 characters".into()));
        }
        if let Some(c) = self
            .key
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':')))
        {
            return Err(bad(format!(
                "the key may hold letters, digits, '-', '_', '.' and ':' only, not {c:?}"
            )));
        }
        if self.requests_per_minute == 0 {
            return Err(bad("the request rate must be at least 1/min".into()));
        }
        if self.requests_per_minute > 600_000 {
            return Err(bad("the request rate must be at most 10000/s".into()));
        }
        if self.tokens_per_minute == Some(0) {
            return Err(bad("the token rate must be at least 1tokens/min".into()));
        }
        if self.burst == Some(0) {
            return Err(bad("burst must be at least 1".into()));
        }
        Ok(())
    }

    /// Unused request permits kept at most.
    pub fn burst_permits(&self) -> u32 {
        self.burst
            .unwrap_or_else(|| self.requests_per_minute.div_ceil(60))
            .max(1)
    }

    /// Tokens one token chunk (one message) carries: the token rate over the
    /// request rate, so chunks flow at the request rate.
    pub fn token_chunk(&self) -> Option<u64> {
        self.tokens_per_minute
            .map(|t| t.div_ceil(self.requests_per_minute as u64).max(1))
    }

    /// Chunks minted per minute.
    fn chunks_per_minute(&self) -> Option<f64> {
        let (t, c) = (self.tokens_per_minute?, self.token_chunk()?);
        Some(t as f64 / c as f64)
    }

    /// The shared part of the topology (exchange, permit, token and lease
    /// queues) and one limiter's pause listener `member` (for `cleanup`, or to
    /// declare ahead).
    pub fn topology(&self, names: &Names, member: &str) -> Topology {
        let key = &self.key;
        let x = names.rate_limit_exchange();
        let burst = self.burst_permits() as u64;
        let mut queues = vec![
            Queue::durable(names.rate_limit_permits(key)).max_length(burst, Overflow::DropHead),
            Queue::durable(names.rate_limit_lease(key))
                .single_active_consumer()
                .max_length(1, Overflow::DropHead),
            Queue {
                durable: false,
                ..Queue::durable(names.rate_limit_listener(key, member))
                    .max_length(64, Overflow::DropHead)
                    .expires(LISTENER_EXPIRES)
            },
        ];
        let mut routes = vec![
            (names.rate_limit_permits(key), format!("{key}.permit")),
            (names.rate_limit_lease(key), format!("{key}.lease")),
            (
                names.rate_limit_listener(key, member),
                format!("{key}.pause"),
            ),
        ];
        if self.tokens_per_minute.is_some() {
            queues.push(
                Queue::durable(names.rate_limit_tokens(key)).max_length(burst, Overflow::DropHead),
            );
            routes.push((names.rate_limit_tokens(key), format!("{key}.tokens")));
        }
        Topology {
            names: names.clone(),
            exchanges: vec![Exchange {
                name: x.clone(),
                kind: ExchangeKind::Direct,
                durable: true,
                alternate_exchange: None,
            }],
            queues,
            bindings: routes
                .into_iter()
                .map(|(queue, routing_key)| Binding {
                    exchange: x.clone(),
                    queue,
                    routing_key,
                })
                .collect(),
        }
    }
}

/// How long a pause listener left by a process that died stays (`x-expires`).
const LISTENER_EXPIRES: Duration = Duration::from_secs(60);

impl std::fmt::Display for RateLimit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}={}/min", self.key, self.requests_per_minute)?;
        if let Some(t) = self.tokens_per_minute {
            write!(f, ",{t}tokens/min")?;
        }
        if let Some(b) = self.burst {
            write!(f, ",burst={b}")?;
        }
        Ok(())
    }
}

impl FromStr for RateLimit {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let bad = |reason: String| Error::InvalidRateLimit {
            spec: s.to_string(),
            reason,
        };
        let (key, rest) = s
            .split_once('=')
            .ok_or_else(|| bad("no '=' between the key and the rate".into()))?;
        let mut limit = RateLimit::new(key.trim(), 0);
        let mut requests = None;
        for part in rest.split(',').map(str::trim) {
            if let Some(b) = part.strip_prefix("burst=") {
                let n = b
                    .parse::<u32>()
                    .map_err(|_| bad(format!("burst '{b}' is not a whole number")))?;
                limit.burst = Some(n);
                continue;
            }
            let (amount, per) = part.split_once('/').ok_or_else(|| {
                bad(format!(
                    "'{part}' has no '/min' (or '/s', '/h'): a rate is N/min or Ntokens/min"
                ))
            })?;
            let per_minute = match per {
                "s" | "sec" | "second" => 60.0,
                "min" | "m" | "minute" => 1.0,
                "h" | "hour" => 1.0 / 60.0,
                other => {
                    return Err(bad(format!(
                        "unknown period '/{other}' in '{part}': use /s, /min or /h"
                    )))
                }
            };
            let (number, tokens) = match amount.strip_suffix("tokens") {
                Some(n) => (n, true),
                None => (amount.strip_suffix("requests").unwrap_or(amount), false),
            };
            let n = number.trim().parse::<u64>().map_err(|_| {
                bad(format!(
                    "'{number}' in '{part}' is not a whole number of {}",
                    if tokens { "tokens" } else { "requests" }
                ))
            })?;
            let rate = (n as f64 * per_minute).floor() as u64;
            if rate == 0 && n > 0 {
                return Err(bad(format!("'{part}' is less than one per minute")));
            }
            let slot = if tokens { "tokens" } else { "requests" };
            let dup = if tokens {
                limit.tokens_per_minute.replace(rate).is_some()
            } else {
                requests.replace(rate).is_some()
            };
            if dup {
                return Err(bad(format!("the {slot} rate is given twice")));
            }
        }
        let requests = requests.ok_or_else(|| bad("no request rate (N/min) is given".into()))?;
        limit.requests_per_minute = u32::try_from(requests)
            .map_err(|_| bad(format!("{requests}/min is too many requests")))?;
        limit.validate().map_err(|e| match e {
            Error::InvalidRateLimit { reason, .. } => bad(reason),
            other => other,
        })?;
        Ok(limit)
    }
}

tokio::task_local! {
    /// The tokens the running handler reported (`report_tokens`).
    static REPORTED: Cell<Option<u64>>;
}

/// Inside a handler of a token-limited subscription: the tokens this message
/// really used (e.g. the provider's `usage.total_tokens`). The limiter took
/// the message's estimate before the handler started; the difference is
/// given back to the shared pool, or taken before this subscription's next
/// start. Outside such a handler it does nothing; a later call replaces an
/// earlier one.
pub fn report_tokens(tokens: u64) {
    let _ = REPORTED.try_with(|r| r.set(Some(tokens)));
}

/// Run a handler future where [`report_tokens`] is heard; what it reported.
pub(crate) async fn hearing_tokens<F: std::future::Future>(f: F) -> (F::Output, Option<u64>) {
    let cell = Cell::new(None);
    REPORTED
        .scope(cell, async {
            let out = f.await;
            (out, REPORTED.with(Cell::get))
        })
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> std::result::Result<RateLimit, String> {
        s.parse::<RateLimit>().map_err(|e| e.to_string())
    }

    #[test]
    fn parses_the_forms() {
        let l = parse("openai-key-1=500/min,90000tokens/min").unwrap();
        assert_eq!(
            l,
            RateLimit::new("openai-key-1", 500).tokens_per_minute(90_000)
        );
        assert_eq!(parse("k=10/s").unwrap().requests_per_minute, 600);
        assert_eq!(parse("k=120/h").unwrap().requests_per_minute, 2);
        assert_eq!(parse("k=600/min,burst=3").unwrap().burst_permits(), 3);
        assert_eq!(parse("k=600/min").unwrap().burst_permits(), 10);
        assert_eq!(parse("k=5/min").unwrap().burst_permits(), 1);
        let l = parse("k=500/min,90000tokens/min").unwrap();
        assert_eq!(l.token_chunk(), Some(180));
        assert_eq!(l.to_string(), "k=500/min,90000tokens/min");
    }

    #[test]
    fn refuses_malformed_specs_saying_what_is_wrong() {
        for (spec, says) in [
            ("openai", "no '='"),
            ("k=500", "no '/min'"),
            ("k=500/day", "unknown period '/day'"),
            ("k=lots/min", "not a whole number of requests"),
            ("k=90000tokens/min", "no request rate"),
            ("k=1/min,2/min", "given twice"),
            ("k=0/min", "at least 1/min"),
            ("k=1/h", "less than one per minute"),
            ("bad key=1/min", "not ' '"),
            ("=1/min", "1 to 100 characters"),
        ] {
            let e = parse(spec).unwrap_err();
            assert!(e.contains(says), "{spec}: {e}");
            assert!(e.contains("openai-key-1=500/min,90000tokens/min"), "{e}");
        }
    }

    #[tokio::test]
    async fn reported_tokens_are_heard_inside_the_scope_only() {
        report_tokens(5);
        let ((), got) = hearing_tokens(async { report_tokens(42) }).await;
        assert_eq!(got, Some(42));
        let ((), got) = hearing_tokens(async {}).await;
        assert_eq!(got, None);
    }
}
