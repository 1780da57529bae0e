//! Shared helpers of the fault-injection suite (`tests/fault_*.rs`).
//!
//! # Layout
//! - [`proxy`]: a TCP proxy that cuts, black-holes and resumes this test's sockets.
//! - [`ledger`]: what each publish answered and how often each id was consumed.
//! - [`node`]: the dedicated broker node and `rabbitmqctl` faults with undo guards.
//! - [`history`]: the total-queue checker's per-id history and per-fault table.
//!
//! Every scenario publishes a known set of ids while a fault happens, consumes
//! them with the library's reliable consumer, and ends with [`summary`]: one
//! line `scenario=… messages=… faults=… lost=… duplicates=… recovery_ms=…`.
//!
//! `RUST_LOG=helixmq=info` shows the client's view of each fault;
//! `HELIXMQ_FAULT_DEBUG=1` prints every duplicate delivery with its
//! redelivered flag (false: a resent publish; true: a lost ack).

#![allow(dead_code, unreachable_pub)] // helpers of test binaries: `pub` for their test files, never exported

pub mod history;
pub mod ledger;
pub mod node;
pub mod proxy;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use helixmq::backend::rabbitmq::RabbitBackend;
use helixmq::topology::Queue;
use helixmq::{
    Broker, Config, Message, Metrics, Names, Outcome, PublishOptions, Secret, SubscribeOptions,
    Subscription, Topology,
};
use ledger::{Ledger, Report};
use tokio_util::sync::CancellationToken;

/// Log to the test's output as `RUST_LOG` says (e.g. `RUST_LOG=helixmq=debug`);
/// silent without it.
pub fn init_logging() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// A fresh prefix `helixagent.f<random>` (inside the spec's permission pattern).
pub fn prefix() -> String {
    format!("helixagent.f{:08x}", rand::random::<u32>())
}

/// Configuration for 127.0.0.1:`port` as guest, reconnecting forever from 200 ms.
pub fn config(port: u16, prefix: &str) -> Config {
    let mut c = Config::default();
    c.rabbitmq.host = "127.0.0.1".into();
    c.rabbitmq.port = port;
    c.rabbitmq.username = "guest".into();
    c.rabbitmq.password = Secret::new("guest");
    c.rabbitmq.vhost = "/".into();
    c.rabbitmq.connect_timeout = Duration::from_secs(5);
    c.rabbitmq.reconnect_delay = Duration::from_millis(200);
    c.rabbitmq.max_reconnect_attempts = 0;
    c.rabbitmq.publish_timeout = Duration::from_secs(60);
    c.helixmq.prefix = prefix.into();
    c
}

/// The client-provided connection name of this test's broker handles.
pub fn connection_name(prefix: &str) -> String {
    format!("hxfault-{prefix}")
}

/// A broker over a RabbitMQ connection named [`connection_name`].
pub async fn connect(config: Config) -> Broker {
    let name = connection_name(&config.helixmq.prefix);
    let metrics = Metrics::default();
    let backend = RabbitBackend::connect_named(&config.rabbitmq, metrics.clone(), &name)
        .await
        .unwrap_or_else(|e| panic!("connect to port {}: {e}", config.rabbitmq.port));
    Broker::builder(config)
        .metrics(metrics)
        .custom_backend(Arc::new(backend))
}

/// The system queues plus the tasks exchange and one work queue `{p}.tasks.work`
/// (durable, fed with routing key `work`), optionally shaped by `shape`.
pub fn topology(names: &Names, shape: impl FnOnce(Queue) -> Queue) -> (Topology, String) {
    let mut t = Topology::system(names);
    t.exchanges.push(helixmq::topology::Exchange {
        name: names.tasks_exchange(),
        kind: helixmq::topology::ExchangeKind::Direct,
        durable: true,
    });
    let queue = names.task_queue("work");
    t.add_work_queue(
        shape(Queue::durable(queue.clone())),
        &names.tasks_exchange(),
        "work",
    );
    (t, queue)
}

/// Routing key of the work queue.
pub const WORK: &str = "work";

/// Publish `count` messages to the work queue, `window` at a time, recording
/// every answer in the ledger. Returns when all were answered.
pub async fn publish_all(
    broker: Broker,
    ledger: Arc<Ledger>,
    count: usize,
    window: usize,
    opts: PublishOptions,
) {
    publish_until(
        broker,
        ledger,
        count,
        window,
        opts,
        CancellationToken::new(),
    )
    .await
}

/// Like [`publish_all`], but stop starting new publishes once `stop` is
/// cancelled (those in flight still get their answer): a steady load for as
/// long as the faults take, whatever the machine's speed.
pub async fn publish_until(
    broker: Broker,
    ledger: Arc<Ledger>,
    max: usize,
    window: usize,
    opts: PublishOptions,
    stop: CancellationToken,
) {
    let exchange = broker.names().tasks_exchange();
    futures::stream::iter(0..max)
        .take_until(stop.cancelled_owned())
        .map(|i| {
            let b = broker.clone();
            let l = ledger.clone();
            let x = exchange.clone();
            let o = opts.clone();
            async move {
                let m = Message::new(format!("fault message {i}"));
                let id = m.id.clone();
                let r = b.publish_with(&x, WORK, m, &o).await;
                l.published(&id, &r);
            }
        })
        .buffer_unordered(window)
        .collect::<()>()
        .await;
}

/// Subscribe to `queue` with a handler that records each delivery and acks.
pub async fn consume_into(
    broker: &Broker,
    queue: &str,
    ledger: Arc<Ledger>,
    opts: SubscribeOptions,
) -> Subscription {
    broker
        .subscribe(
            queue,
            move |m: Message, ctx: helixmq::Context| {
                if std::env::var("HELIXMQ_FAULT_DEBUG").is_ok() && ledger.times_consumed(&m.id) > 0
                {
                    eprintln!("DUP {} redelivered={}", m.id, ctx.redelivered);
                }
                ledger.consumed(&m.id);
                async { Ok(Outcome::Ack) }
            },
            opts,
        )
        .await
        .expect("subscribe")
}

/// Prefetch 100, 32 handlers: enough messages unacked at a fault to make redeliveries.
pub fn consumer_options() -> SubscribeOptions {
    SubscribeOptions {
        prefetch: Some(100),
        concurrency: Some(32),
        ..Default::default()
    }
}

/// Counts of faults injected, for the summary.
#[derive(Default)]
pub struct Faults(AtomicUsize);

impl Faults {
    /// One more.
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
    /// How many.
    pub fn get(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
}

/// Print the scenario's one summary line (`--no-capture` shows it) and return it.
pub fn summary(scenario: &str, r: &Report, faults: usize, recovery: Duration) -> String {
    let line = format!(
        "scenario={scenario} messages={} faults={faults} lost={} duplicates={} recovery_ms={}",
        r.messages,
        r.lost,
        r.duplicates,
        recovery.as_millis()
    );
    println!("{line}");
    line
}

/// Delete what the broker declared under its prefix (errors ignored: best effort).
pub async fn cleanup(broker: &Broker) {
    let t = broker.topology();
    let prefix = format!("{}.", broker.names().prefix());
    for q in t.queues.iter().filter(|q| q.name.starts_with(&prefix)) {
        let _ = broker.backend().delete_queue(&q.name).await;
    }
    for e in t.exchanges.iter().filter(|e| e.name.starts_with(&prefix)) {
        let _ = broker.backend().delete_exchange(&e.name).await;
    }
}

/// After a fault injected while `rx` (taken before the fault) watched the
/// state: wait until the client is connected again by itself, having been
/// disconnected (seen in the state, or in the recoveries counter moving past
/// `recoveries_before`). Returns the time it took from the call.
pub async fn await_reconnect(
    broker: &Broker,
    mut rx: tokio::sync::watch::Receiver<helixmq::ConnectionState>,
    recoveries_before: u64,
    limit: Duration,
) -> Result<Duration, String> {
    use helixmq::ConnectionState::*;
    let started = std::time::Instant::now();
    let mut seen_down = false;
    let wait = async {
        loop {
            let now = *rx.borrow_and_update();
            match now {
                Disconnected => seen_down = true,
                Connected | Blocked
                    if seen_down
                        || broker.metrics().connection_recoveries.get() > recoveries_before =>
                {
                    return Ok(started.elapsed())
                }
                Closed => return Err("the client closed for good instead of reconnecting".into()),
                _ => {}
            }
            if rx.changed().await.is_err() {
                return Err("state channel closed".to_string());
            }
        }
    };
    tokio::time::timeout(limit, wait)
        .await
        .map_err(|_| format!("client not reconnected within {limit:?}"))?
}
