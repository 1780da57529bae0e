//! RabbitMQ's management HTTP API (`rabbitmq_management`, port 15672): what AMQP
//! cannot tell — queue listings, unacked counts, rates, connection and channel
//! totals. `helixmq stats`, `topology diff` and the console read the broker's
//! view from here (feature `management`). Every failure names the URL and the fix.

mod overview;

pub use overview::{Overview, QueueRow, Thresholds};

use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};
use reqwest::StatusCode;
use serde_json::Value;
use std::time::Duration;

use crate::{Config, Secret};

/// A management API call that failed; the message says why and what to do.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ManagementError(String);

/// Shorthand for results of this module.
pub type Result<T> = std::result::Result<T, ManagementError>;

/// A management API endpoint with credentials (never shown by `Debug`).
pub struct Management {
    base: String,
    user: String,
    password: Secret,
    client: reqwest::Client,
}

impl std::fmt::Debug for Management {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Management")
            .field("base", &self.base)
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

impl Management {
    /// From the configuration: `override_url`, else `http://<host>:15672`.
    pub fn from_config(cfg: &Config, override_url: Option<&str>) -> Result<Self> {
        let base = match override_url {
            Some(u) => u.trim_end_matches('/').to_string(),
            None => format!("http://{}:15672", cfg.rabbitmq.host),
        };
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .connect_timeout(Duration::from_secs(3))
            .build()
            .map_err(|e| ManagementError(format!("cannot build an HTTP client: {e}")))?;
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
    pub async fn get(&self, path: &str) -> Result<Value> {
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
            s if s.is_success() => resp
                .json()
                .await
                .map_err(|e| ManagementError(format!("bad JSON from {url}: {e}"))),
            StatusCode::UNAUTHORIZED => Err(ManagementError(format!(
                "the management API at {} refused user '{}' (401 Unauthorized): check RABBITMQ_USER / \
                 RABBITMQ_PASSWORD; the user needs the `management` or `monitoring` tag \
                 (`rabbitmqctl set_user_tags {} management`)",
                self.base, self.user, self.user
            ))),
            StatusCode::NOT_FOUND => Err(ManagementError(format!(
                "{url} answered 404 Not Found (does the vhost exist?)"
            ))),
            s => {
                let body = resp.text().await.unwrap_or_default();
                let body: String = body.chars().rev().take(300).collect::<Vec<_>>().into_iter().rev().collect();
                Err(ManagementError(format!("{url} answered {s}: {}", body.trim())))
            }
        }
    }

    fn unreachable(&self, e: reqwest::Error) -> ManagementError {
        ManagementError(format!(
            "the RabbitMQ management API is not reachable at {} ({}): enable the plugin with \
             `rabbitmq-plugins enable rabbitmq_management`, or point --management-url / \
             HELIXMQ_MANAGEMENT_URL at it",
            self.base,
            root_cause(&e)
        ))
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
