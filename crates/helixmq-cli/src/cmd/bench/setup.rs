//! The bench's connections and topology, and their clean-up.
//!
//! helixmq declares every queue (raw lapin's too), so both sides write to
//! queues of exactly the same shape: durable, classic, dead-lettering to the
//! prefix's DLX, fed by one direct exchange.

use anyhow::Context as _;
use helixmq::config::{load_from_str, EnvSource};
use helixmq::topology::{Exchange, ExchangeKind, Queue};
use helixmq::{Broker, Config, Names, Topology};
use lapin::ConnectionProperties;

/// Connections and names shared by every phase.
pub(crate) struct Bench {
    /// helixmq's side.
    pub broker: Broker,
    /// Raw lapin's side: its own connection, so neither shares the other's socket.
    pub raw: lapin::Connection,
    /// The effective configuration (for the redacted URL).
    pub config: Config,
    /// `helixagent.bench-<hex>`: every name below starts with it.
    pub prefix: String,
    /// The direct exchange every run publishes to.
    pub exchange: String,
    /// Raw lapin's publish runs (purged after), then raw lapin's consume runs
    /// (each on a fresh fill by helixmq's publisher, like `q_helix`'s).
    pub q_raw: String,
    /// helixmq's publish runs (purged after), then helixmq's consume runs.
    pub q_helix: String,
    /// Batch and one-at-a-time publishes; purged after each use.
    pub q_scratch: String,
    /// The latency runs.
    pub q_latency: String,
    /// The memory soak.
    pub q_soak: String,
    /// `worker --pipe` and `--exec` runs.
    pub q_pipe: String,
}

impl Bench {
    /// Connect both clients to `url` and declare the bench topology.
    pub async fn connect(url: &str) -> anyhow::Result<Bench> {
        let prefix = format!("helixagent.bench-{:08x}", rand::random::<u32>());
        let env = EnvSource::map([("RABBITMQ_URL", url), ("HELIXMQ_PREFIX", prefix.as_str())]);
        let config = load_from_str("", &env).context("invalid --url")?;
        let broker = Broker::connect(config.clone()).await.with_context(|| {
            format!(
                "helixmq cannot connect to {}",
                config.rabbitmq.redacted_url()
            )
        })?;
        let raw = lapin::Connection::connect(url, ConnectionProperties::default())
            .await
            .with_context(|| {
                format!(
                    "raw lapin cannot connect to {}",
                    config.rabbitmq.redacted_url()
                )
            })?;
        let names = Names::new(prefix.clone());
        let exchange = format!("{prefix}.bench");
        let q = |s: &str| format!("{prefix}.{s}");
        let (q_raw, q_helix, q_scratch, q_latency, q_soak, q_pipe) = (
            q("raw"),
            q("helix"),
            q("scratch"),
            q("latency"),
            q("soak"),
            q("pipe"),
        );
        let mut t = Topology::system(&names);
        t.exchanges.push(Exchange {
            name: exchange.clone(),
            kind: ExchangeKind::Direct,
            durable: true,
            alternate_exchange: None,
        });
        for name in [&q_raw, &q_helix, &q_scratch, &q_latency, &q_soak, &q_pipe] {
            // Routing key = queue name, like the requeue exchange does.
            t.add_work_queue(Queue::durable(name.clone()), &exchange, name);
        }
        let bench = Bench {
            broker,
            raw,
            config,
            prefix,
            exchange,
            q_raw,
            q_helix,
            q_scratch,
            q_latency,
            q_soak,
            q_pipe,
        };
        if let Err(e) = bench.broker.declare(&t).await {
            let _ = bench.cleanup().await;
            return Err(anyhow::Error::new(e).context("cannot declare the bench queues"));
        }
        Ok(bench)
    }

    /// Remove every ready message of `queue`.
    pub async fn purge(&self, queue: &str) -> anyhow::Result<()> {
        self.broker
            .backend()
            .purge(queue)
            .await
            .with_context(|| format!("cannot purge {queue}"))?;
        Ok(())
    }

    /// Delete every queue and exchange under our prefix (also those helixmq
    /// declared for subscriptions: DLQ, retry tier, requeue exchange), then close.
    pub async fn cleanup(&self) -> anyhow::Result<()> {
        let t = self.broker.topology();
        let ours = |n: &str| n.starts_with(&format!("{}.", self.prefix));
        let mut failed = Vec::new();
        for q in t.queues.iter().filter(|q| ours(&q.name)) {
            if let Err(e) = self.broker.backend().delete_queue(&q.name).await {
                failed.push(format!("queue {}: {e}", q.name));
            }
        }
        for x in t.exchanges.iter().filter(|x| ours(&x.name)) {
            if let Err(e) = self.broker.backend().delete_exchange(&x.name).await {
                failed.push(format!("exchange {}: {e}", x.name));
            }
        }
        let _ = self.raw.close(200, "bench done".into()).await;
        let _ = self.broker.close().await;
        if failed.is_empty() {
            Ok(())
        } else {
            anyhow::bail!("delete them by hand: {}", failed.join("; "))
        }
    }
}
