//! A small client of RabbitMQ's management HTTP API (`rabbitmq_management`, port 15672).
//!
//! `stats` and `topology diff` read the broker's view from here: AMQP itself
//! cannot list queues or report rates. Every failure names the URL and the fix.

use anyhow::{anyhow, bail};
use helixmq::{Config, Secret};
use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};
use reqwest::StatusCode;
use serde_json::Value;
use std::time::Duration;

/// A management API endpoint with credentials.
pub struct Management {
    base: String,
    user: String,
    password: Secret,
    client: reqwest::Client,
}

impl Management {
    /// From the configuration: `override_url`, else `http://<host>:15672`.
    pub fn from_config(cfg: &Config, override_url: Option<&str>) -> anyhow::Result<Self> {
        let base = match override_url {
            Some(u) => u.trim_end_matches('/').to_string(),
            None => format!("http://{}:15672", cfg.rabbitmq.host),
        };
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .connect_timeout(Duration::from_secs(3))
            .build()?;
        Ok(Management {
            base,
            user: cfg.rabbitmq.username.clone(),
            password: cfg.rabbitmq.password.clone(),
            client,
        })
    }

    /// The base URL (no credentials in it).
    pub fn base(&self) -> &str {
        &self.base
    }

    /// A vhost as one URL path segment (`/` becomes `%2F`).
    pub fn vhost_segment(vhost: &str) -> String {
        utf8_percent_encode(vhost, NON_ALPHANUMERIC).to_string()
    }

    /// `GET {base}/api/{path}` as JSON.
    pub async fn get(&self, path: &str) -> anyhow::Result<Value> {
        let url = format!("{}/api/{}", self.base, path);
        let resp = self
            .client
            .get(&url)
            .basic_auth(&self.user, Some(self.password.expose()))
            .send()
            .await
            .map_err(|e| self.unreachable(e))?;
        let status = resp.status();
        match status {
            s if s.is_success() => Ok(resp.json().await.map_err(|e| anyhow!("bad JSON from {url}: {e}"))?),
            StatusCode::UNAUTHORIZED => bail!(
                "the management API at {} refused user '{}' (401 Unauthorized): check RABBITMQ_USER / \
                 RABBITMQ_PASSWORD; the user needs the `management` or `monitoring` tag \
                 (`rabbitmqctl set_user_tags {} management`)",
                self.base,
                self.user,
                self.user
            ),
            StatusCode::NOT_FOUND => bail!("{url} answered 404 Not Found (does the vhost exist?)"),
            s => {
                let body = resp.text().await.unwrap_or_default();
                bail!("{url} answered {s}: {}", crate::common::tail(&body, 300))
            }
        }
    }

    fn unreachable(&self, e: reqwest::Error) -> anyhow::Error {
        anyhow!(
            "the RabbitMQ management API is not reachable at {} ({}): enable the plugin with \
             `rabbitmq-plugins enable rabbitmq_management`, or point --management-url / \
             HELIXMQ_MANAGEMENT_URL at it",
            self.base,
            root_cause(&e)
        )
    }
}

/// The innermost cause of an error, which says what really happened (e.g. "Connection refused").
fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}
