//! `worker --http URL`: POST each message to an HTTP endpoint.
//!
//! Metadata travels as `X-HelixMQ-*` headers (`X-HelixMQ-Message-Id`,
//! `X-HelixMQ-Attempt`, `X-HelixMQ-Header-<name>`, ...). The answer decides:
//! 2xx ack; 408, 429, 5xx, a timeout or a connection error retry (after
//! `Retry-After` when given); any other 4xx is poison → DLQ with the status and
//! the body's tail. A 429 with `Retry-After` is `Outcome::RetryAfter`: it also
//! pauses a `--rate-limit` key for every worker sharing it.

use std::time::{Duration, SystemTime};

use helixmq::{Context, Message, Outcome};
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_TYPE, RETRY_AFTER};
use reqwest::StatusCode;

use crate::common::tail;

/// POSTs messages to one URL.
pub struct HttpHandler {
    url: reqwest::Url,
    client: reqwest::Client,
}

impl HttpHandler {
    /// A handler for `url`; a request taking longer than `timeout` is retried.
    pub fn new(url: &str, timeout: Duration) -> anyhow::Result<Self> {
        let url = reqwest::Url::parse(url).map_err(|e| {
            anyhow::anyhow!("--http '{url}' is not a URL ({e}); e.g. http://127.0.0.1:8080/jobs")
        })?;
        if !matches!(url.scheme(), "http" | "https") {
            anyhow::bail!("--http '{url}' must be an http:// or https:// URL");
        }
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(Duration::from_secs(10))
            .build()?;
        Ok(HttpHandler { url, client })
    }

    /// POST one message and map the answer to an outcome.
    pub async fn handle(&self, m: Message, ctx: Context) -> Outcome {
        let mut headers = HeaderMap::new();
        let ct = m
            .content_type
            .clone()
            .unwrap_or_else(|| "application/octet-stream".into());
        if let Ok(v) = HeaderValue::from_str(&ct) {
            headers.insert(CONTENT_TYPE, v);
        }
        for (k, v) in super::metadata(&m, &ctx) {
            let name = format!("x-helixmq-{}", k.to_ascii_lowercase().replace('_', "-"));
            // A header that HTTP cannot carry (control characters) is left out rather than failing the message.
            if let (Ok(n), Ok(v)) = (
                HeaderName::from_bytes(name.as_bytes()),
                HeaderValue::from_str(&v),
            ) {
                headers.insert(n, v);
            }
        }
        let resp = self
            .client
            .post(self.url.clone())
            .headers(headers)
            .body(m.payload.clone())
            .send()
            .await;
        let resp = match resp {
            Ok(r) => r,
            Err(e) => {
                let what = if e.is_timeout() {
                    "timed out"
                } else if e.is_connect() {
                    "could not connect"
                } else {
                    "failed"
                };
                return Outcome::retry(format!("POST {} {what}: {}", self.url, root_cause(&e)));
            }
        };
        let status = resp.status();
        if status.is_success() {
            return Outcome::Ack;
        }
        let delay = retry_after(resp.headers());
        let body = resp.text().await.unwrap_or_default();
        let reason = format!("POST {} answered {status}: {}", self.url, tail(&body, 512));
        classify(status, delay, reason)
    }
}

/// The outcome of a non-2xx answer.
fn classify(status: StatusCode, delay: Option<Duration>, reason: String) -> Outcome {
    let transient = status == StatusCode::REQUEST_TIMEOUT
        || status == StatusCode::TOO_MANY_REQUESTS
        || status.is_server_error()
        // 1xx/3xx as a final answer: not the endpoint's verdict on the message.
        || !status.is_client_error();
    if status == StatusCode::TOO_MANY_REQUESTS {
        // "Rate limited, retry after": pauses a --rate-limit key for every worker.
        if let Some(d) = delay {
            return Outcome::RetryAfter(d);
        }
    }
    if transient {
        Outcome::Retry { delay, reason }
    } else {
        Outcome::DeadLetter(reason)
    }
}

/// `Retry-After` as seconds or an HTTP date.
fn retry_after(h: &HeaderMap) -> Option<Duration> {
    let v = h.get(RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(v).ok()?;
    Some(
        at.duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses() {
        let r = |s: u16| classify(StatusCode::from_u16(s).unwrap(), None, "r".into());
        assert!(matches!(r(500), Outcome::Retry { .. }));
        assert!(matches!(r(503), Outcome::Retry { .. }));
        assert!(matches!(r(429), Outcome::Retry { .. }));
        assert!(matches!(r(408), Outcome::Retry { .. }));
        let after = Some(Duration::from_secs(7));
        assert_eq!(
            classify(StatusCode::TOO_MANY_REQUESTS, after, "r".into()),
            Outcome::RetryAfter(Duration::from_secs(7))
        );
        assert!(matches!(
            classify(StatusCode::SERVICE_UNAVAILABLE, after, "r".into()),
            Outcome::Retry { delay: Some(_), .. }
        ));
        assert!(matches!(r(400), Outcome::DeadLetter(_)));
        assert!(matches!(r(404), Outcome::DeadLetter(_)));
        assert!(matches!(r(422), Outcome::DeadLetter(_)));
    }

    #[tokio::test]
    async fn connection_errors_and_timeouts_are_retried() {
        let ctx = Context {
            queue: "q".into(),
            exchange: "e".into(),
            routing_key: "k".into(),
            redelivered: false,
        };
        // Nothing listens on a port we just released.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let h = HttpHandler::new(
            &format!("http://127.0.0.1:{port}/x"),
            Duration::from_secs(5),
        )
        .unwrap();
        match h.handle(Message::new("x"), ctx.clone()).await {
            Outcome::Retry { reason, .. } => {
                assert!(reason.contains("could not connect"), "{reason}")
            }
            o => panic!("{o:?}"),
        }
        // A server that accepts but never answers: the request times out.
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let hold = tokio::spawn(async move {
            let _conn = l.accept().await;
            std::future::pending::<()>().await
        });
        let h = HttpHandler::new(&format!("http://{addr}/x"), Duration::from_millis(300)).unwrap();
        match h.handle(Message::new("x"), ctx).await {
            Outcome::Retry { reason, .. } => assert!(reason.contains("timed out"), "{reason}"),
            o => panic!("{o:?}"),
        }
        hold.abort();
        assert!(HttpHandler::new("ftp://x", Duration::from_secs(1)).is_err());
        assert!(HttpHandler::new("not a url", Duration::from_secs(1)).is_err());
    }

    #[test]
    fn retry_after_forms() {
        let mut h = HeaderMap::new();
        h.insert(RETRY_AFTER, HeaderValue::from_static("7"));
        assert_eq!(retry_after(&h), Some(Duration::from_secs(7)));
        let later = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(120));
        h.insert(RETRY_AFTER, HeaderValue::from_str(&later).unwrap());
        let d = retry_after(&h).unwrap();
        assert!(
            d > Duration::from_secs(100) && d <= Duration::from_secs(120),
            "{d:?}"
        );
        h.insert(RETRY_AFTER, HeaderValue::from_static("soon"));
        assert_eq!(retry_after(&h), None);
    }
}
