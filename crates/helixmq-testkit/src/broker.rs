//! The shared broker (RabbitMQ on 5672): configuration for it, unique
//! prefixes under `helixagent.` (so the least-privilege user may use them),
//! named connections (so a test can close only its own), and cleanup.

use std::sync::Arc;
use std::time::Duration;

use helixmq::backend::rabbitmq::RabbitBackend;
use helixmq::{Broker, Config, Message, Metrics, Secret, Topology};

/// Guest: administrator, loopback only.
pub const GUEST: (&str, &str) = ("guest", "guest");
/// The spec's least-privilege user (configure/write/read `^helixagent\..*`).
pub const HELIXAGENT: (&str, &str) = ("helixagent", "helixagent123");
/// A user with no permissions at all.
pub const NOPERM: (&str, &str) = ("hx_noperm", "hx_noperm");

/// A test's own name prefix on the shared broker, `helixagent.t<random>`
/// (under the least-privilege user's pattern). Dropping it deletes every queue
/// and exchange under it ([`sweep`]), whether the test passed or panicked, so
/// no test leaves its topology behind on the broker the others share.
///
/// It reads as a `&str` (`&p`, `format!("{p}")`); it is not `Clone`, because
/// the first copy dropped would sweep the prefix from under the test: take
/// `p.to_string()` for a task that needs its own.
#[derive(Debug)]
pub struct Prefix(String);

impl Prefix {
    /// The prefix itself.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::ops::Deref for Prefix {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl AsRef<str> for Prefix {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl From<&Prefix> for String {
    fn from(p: &Prefix) -> String {
        p.0.clone()
    }
}

impl std::fmt::Display for Prefix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl Drop for Prefix {
    fn drop(&mut self) {
        sweep(&self.0);
    }
}

/// A fresh [`Prefix`] `helixagent.t<random>`, swept when dropped.
pub fn prefix() -> Prefix {
    Prefix(format!("helixagent.t{:08x}", rand::random::<u32>()))
}

/// Delete every queue and exchange named `<prefix>.…` on the shared broker,
/// through its management API as guest (errors ignored: a sweep is best
/// effort, and a test's own cleanup has usually done it already). Runs on a
/// thread of its own, so it may be called from a Tokio runtime (a test's
/// `Drop`), where a blocking HTTP client must not run.
pub fn sweep(prefix: &str) {
    let dotted = format!("{prefix}.");
    let swept = std::thread::spawn(move || {
        let client = reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .expect("an HTTP client");
        let api = "http://127.0.0.1:15672/api";
        for kind in ["queues", "exchanges"] {
            let Ok(list) = client
                .get(format!("{api}/{kind}/%2F?columns=name"))
                .basic_auth(GUEST.0, Some(GUEST.1))
                .send()
                .and_then(|r| r.json::<serde_json::Value>())
            else {
                continue;
            };
            for name in list
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|o| o["name"].as_str())
                .filter(|n| n.starts_with(&dotted))
            {
                let _ = client
                    .delete(format!("{api}/{kind}/%2F/{}", encode_segment(name)))
                    .basic_auth(GUEST.0, Some(GUEST.1))
                    .send();
            }
        }
    });
    let _ = swept.join();
}

/// A name as one path segment of the management API.
pub fn encode_segment(s: &str) -> String {
    s.replace('%', "%25").replace('/', "%2F")
}

/// Configuration for the local broker as `user`, with short retry timings.
pub fn config(user: (&str, &str), prefix: &str) -> Config {
    let mut c = Config::default();
    c.rabbitmq.host = std::env::var("RABBITMQ_HOST").unwrap_or_else(|_| "127.0.0.1".into());
    c.rabbitmq.port = 5672;
    c.rabbitmq.username = user.0.into();
    c.rabbitmq.password = Secret::new(user.1);
    c.rabbitmq.vhost = "/".into();
    c.rabbitmq.connect_timeout = Duration::from_secs(10);
    c.rabbitmq.reconnect_delay = Duration::from_millis(200);
    c.rabbitmq.max_reconnect_attempts = 0;
    c.rabbitmq.publish_timeout = Duration::from_secs(30);
    c.helixmq.prefix = prefix.into();
    c
}

/// The client-provided connection name of a test's broker handles under
/// `prefix`: `hxtest-<prefix>` (so a fault can close only this test's).
pub fn connection_name(prefix: &str) -> String {
    format!("hxtest-{prefix}")
}

/// A broker over a RabbitMQ connection named [`connection_name`].
pub async fn broker(config: Config) -> helixmq::Result<Broker> {
    Ok(rabbit(config).await?.1)
}

/// [`broker`], with its RabbitMQ backend for what only it knows (the server
/// version, the endpoint it is connected to).
pub async fn rabbit(config: Config) -> helixmq::Result<(Arc<RabbitBackend>, Broker)> {
    let name = connection_name(&config.helixmq.prefix);
    let metrics = Metrics::default();
    let backend =
        Arc::new(RabbitBackend::connect_named(&config.rabbitmq, metrics.clone(), &name).await?);
    let broker = Broker::builder(config)
        .metrics(metrics)
        .custom_backend(backend.clone());
    Ok((backend, broker))
}

/// Wait until `queue` holds exactly `n` ready messages (real time: TTLs and
/// the broker's own dead-lettering move them; nothing to await). Panics with
/// the count it last saw.
pub async fn wait_depth(broker: &Broker, queue: &str, n: u64, within: Duration) {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let s = broker
            .backend()
            .queue_stats(queue)
            .await
            .expect("queue stats");
        if s.messages == n {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{queue} holds {} messages, expected {n}, after {within:?}",
            s.messages
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Delete every queue and exchange of `t` and of what `broker` declared (ignoring errors).
pub async fn cleanup(broker: &Broker, extra: Option<&Topology>) {
    let mut t = broker.topology();
    if let Some(x) = extra {
        t.queues.extend(x.queues.iter().cloned());
        t.exchanges.extend(x.exchanges.iter().cloned());
    }
    let prefix = format!("{}.", broker.names().prefix());
    for q in &t.queues {
        if q.name.starts_with(&prefix) {
            let _ = broker.backend().delete_queue(&q.name).await;
        }
    }
    for e in &t.exchanges {
        if e.name.starts_with(&prefix) {
            let _ = broker.backend().delete_exchange(&e.name).await;
        }
    }
}

/// The Erlang pids of this test's connections (found by connection name:
/// other tests share the broker). Slow (~1 s: `rabbitmqctl` boots a VM).
pub fn my_connection_pids(prefix: &str) -> Vec<String> {
    let name = format!("\"{}\"", connection_name(prefix));
    let out = std::process::Command::new("rabbitmqctl")
        .args(["-q", "list_connections", "pid", "client_properties"])
        .output()
        .expect("rabbitmqctl runs");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains(&name))
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect()
}

/// Force-close the connections with these pids; returns how many were closed.
pub fn close_connections(pids: &[String]) -> usize {
    pids.iter()
        .filter(|pid| {
            std::process::Command::new("rabbitmqctl")
                .args(["-q", "close_connection", pid, "helixmq test: forced close"])
                .status()
                .expect("rabbitmqctl runs")
                .success()
        })
        .count()
}

/// Take exactly `n` messages from `queue` with `basic.get` (acking each),
/// waiting up to `within` for them to arrive. Panics naming what is missing.
pub async fn take(broker: &Broker, queue: &str, n: usize, within: Duration) -> Vec<Message> {
    let deadline = tokio::time::Instant::now() + within;
    let mut got = Vec::new();
    while got.len() < n {
        match broker.backend().get(queue).await.expect("basic.get") {
            Some(d) => {
                d.acker.ack().await.expect("ack");
                got.push(std::sync::Arc::unwrap_or_clone(d.message));
            }
            None => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "only {} of {n} messages reached '{queue}' within {within:?}",
                    got.len()
                );
                // Messages arrive through the broker's own routing: nothing to await.
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    got
}

/// Every message of `queue`, taken with `basic.get` and acked, as ids; ends
/// after 1 s without one (messages a closed channel hands back may still be
/// on their way).
pub async fn drain_ids(broker: &Broker, queue: &str) -> Vec<String> {
    let mut ids = Vec::new();
    let mut quiet = 0;
    while quiet < 10 {
        match broker.backend().get(queue).await.expect("basic.get") {
            Some(d) => {
                d.acker.ack().await.expect("ack");
                ids.push(d.message.id.clone());
                quiet = 0;
            }
            None => {
                quiet += 1;
                // Nothing to await: the broker is returning them by itself.
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    ids
}
