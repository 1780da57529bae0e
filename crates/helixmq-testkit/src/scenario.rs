//! The fault-scenario runner. Every fault test publishes a known set of ids
//! while a fault happens, consumes them with the library's reliable consumer,
//! records both in a [`Ledger`], and ends the same way, with
//! [`Scenario::finish`]: progress after the last fault, stop publishing,
//! drain with a bounded wait (naming the missing ids and where the queues
//! stand if it times out), shut the subscriptions down, clean up, print one
//! line `scenario=… messages=… faults=… lost=… duplicates=… recovery_ms=…`,
//! and assert lost = 0.
//!
//! `RUST_LOG=helixmq=info` shows the client's view of each fault;
//! `HELIXMQ_FAULT_DEBUG=1` prints every duplicate delivery with its
//! redelivered flag (false: a resent publish; true: a lost ack).

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use helixmq::topology::Queue;
use helixmq::{
    Broker, Config, Message, Names, Outcome, PublishOptions, SubscribeOptions, Subscription,
    Topology,
};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::broker::{self, cleanup, GUEST};
use crate::ledger::{Ledger, Report};

/// Longest a wait for progress (a number of ids consumed) may take.
pub const PROGRESS_LIMIT: Duration = Duration::from_secs(40);
/// Longest the final drain may take once publishing stopped.
pub const DRAIN_LIMIT: Duration = Duration::from_secs(60);

/// Configuration for 127.0.0.1:`port` (a dedicated node, or a proxy in front
/// of a node) as guest: [`broker::config`] with a 5 s connect timeout and a
/// 60 s publish timeout, reconnecting forever from 200 ms.
pub fn config(port: u16, prefix: &str) -> Config {
    let mut c = broker::config(GUEST, prefix);
    c.rabbitmq.host = "127.0.0.1".into();
    c.rabbitmq.port = port;
    c.rabbitmq.connect_timeout = Duration::from_secs(5);
    c.rabbitmq.publish_timeout = Duration::from_secs(60);
    c
}

/// A broker over a RabbitMQ connection named [`broker::connection_name`];
/// panics naming the port if it cannot connect.
pub async fn connect(config: Config) -> Broker {
    let port = config.rabbitmq.port;
    broker::broker(config)
        .await
        .unwrap_or_else(|e| panic!("connect to port {port}: {e}"))
}

/// The system queues plus the tasks exchange and one work queue `{p}.tasks.work`
/// (durable, fed with routing key `work`), optionally shaped by `shape`.
pub fn topology(names: &Names, shape: impl FnOnce(Queue) -> Queue) -> (Topology, String) {
    let mut t = Topology::system(names);
    t.exchanges.push(helixmq::topology::Exchange {
        name: names.tasks_exchange(),
        kind: helixmq::topology::ExchangeKind::Direct,
        durable: true,
        alternate_exchange: None,
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

/// One fault scenario: the broker handle under test, its work queue, the
/// ledger, the subscriptions and the load it runs, and the faults it counted.
#[derive(Debug)]
pub struct Scenario {
    /// Its name in the summary line (`scenario=<name>`).
    pub name: &'static str,
    /// The broker handle under test.
    pub broker: Broker,
    /// Its names (under a fresh prefix).
    pub names: Names,
    /// The work queue (`<prefix>.tasks.work`, routing key [`WORK`]).
    pub queue: String,
    /// Every publish answer and every delivery.
    pub ledger: Arc<Ledger>,
    /// The node the queues live on, for the drain's timeout message (None:
    /// the shared node).
    pub node: Option<String>,
    /// Shut down (after asserting they are still active) at the end.
    subs: Vec<Subscription>,
    /// Other broker handles of the scenario, closed at the end.
    others: Vec<Broker>,
    /// The steady load: its stop signal and its task.
    load: Option<(CancellationToken, JoinHandle<()>)>,
    /// Faults counted so far, and the longest recovery among them.
    faults: (usize, Duration),
    started: Instant,
}

/// What [`Scenario::finish`] found.
#[derive(Debug)]
pub struct Ending {
    /// The ledger's verdict once drained (lost is 0: `finish` asserted it).
    pub report: Report,
    /// From the start of the scenario to the end of the drain.
    pub elapsed: Duration,
}

impl Ending {
    /// Every publish was confirmed: none failed, timed out or was nacked.
    pub fn assert_all_confirmed(&self) {
        let r = &self.report;
        assert_eq!(
            r.failed + r.timed_out + r.nacked,
            0,
            "publishes failed: {:?}",
            r.errors
        );
        assert_eq!(r.confirmed, r.messages);
    }
}

impl Scenario {
    /// Connect with `config` (whose prefix names everything), declare the
    /// [`topology`] with its work queue shaped by `shape`, start the clock.
    pub async fn start(
        name: &'static str,
        config: Config,
        shape: impl FnOnce(Queue) -> Queue,
    ) -> Scenario {
        let names = Names::new(&config.helixmq.prefix);
        let broker = connect(config).await;
        let (t, queue) = topology(&names, shape);
        broker.declare(&t).await.expect("declare");
        Scenario {
            name,
            broker,
            names,
            queue,
            ledger: Arc::new(Ledger::default()),
            node: None,
            subs: Vec::new(),
            others: Vec::new(),
            load: None,
            faults: (0, Duration::ZERO),
            started: Instant::now(),
        }
    }

    /// Subscribe `broker` (the scenario's own, or another of its handles) to
    /// the work queue with the recording handler of [`consume_into`]; the
    /// subscription is shut down at the end.
    pub async fn consume(&mut self, broker: &Broker, opts: SubscribeOptions) {
        let sub = consume_into(broker, &self.queue, self.ledger.clone(), opts).await;
        self.subs.push(sub);
    }

    /// Keep a subscription the test made itself: shut down at the end.
    pub fn adopt(&mut self, sub: Subscription) {
        self.subs.push(sub);
    }

    /// Another broker handle of the scenario: closed at the end.
    pub fn also_close(&mut self, broker: Broker) {
        self.others.push(broker);
    }

    /// Start a steady load ([`publish_until`], `window` at a time, at most
    /// `max`) that lasts until [`Scenario::finish`] stops it.
    pub fn load(&mut self, max: usize, window: usize, opts: PublishOptions) {
        let stop = CancellationToken::new();
        let task = tokio::spawn(publish_until(
            self.broker.clone(),
            self.ledger.clone(),
            max,
            window,
            opts,
            stop.clone(),
        ));
        self.load = Some((stop, task));
    }

    /// Wait until `n` more distinct ids were consumed than now (at most
    /// [`PROGRESS_LIMIT`]), and say where the run stands.
    pub async fn progress(&self, n: usize, what: &str) {
        let mark = self.ledger.distinct_consumed();
        self.ledger
            .wait_until(PROGRESS_LIMIT, what, |_, c| c >= mark + n)
            .await
            .unwrap_or_else(|e| panic!("{}: {e}", self.name));
        eprintln!(
            "{}: {what}: {} answered, {} consumed after {:.1?}",
            self.name,
            self.ledger.answered(),
            self.ledger.distinct_consumed(),
            self.started.elapsed()
        );
    }

    /// Count `n` faults, the slowest of which took `recovery` to recover
    /// from: the summary line's `faults` and `recovery_ms`.
    pub fn recovered(&mut self, n: usize, recovery: Duration) {
        self.faults.0 += n;
        self.faults.1 = self.faults.1.max(recovery);
    }

    /// Wait until every confirmed id was consumed (at most [`DRAIN_LIMIT`]);
    /// panics naming the missing ids and the queues' state.
    pub async fn drain(&self) {
        self.ledger
            .expect_drained(DRAIN_LIMIT, self.node.as_deref(), self.names.prefix())
            .await;
    }

    /// The ending every fault scenario shares: `after` more ids consumed
    /// (when a load runs and `after` > 0), stop the load, drain, assert each
    /// subscription survived and shut it down, delete the topology, close
    /// every handle, print the summary line and the report, and assert that
    /// no confirmed id was lost.
    pub async fn finish(mut self, after: usize) -> Ending {
        if let Some((stop, task)) = self.load.take() {
            if after > 0 {
                self.progress(after, "progress after the faults").await;
            }
            stop.cancel();
            task.await.expect("publisher task");
        }
        self.drain().await;
        let elapsed = self.started.elapsed();
        for sub in self.subs.drain(..) {
            assert!(sub.is_active(), "subscription died: {:?}", sub.status());
            sub.shutdown(Duration::from_secs(10)).await;
        }
        let report = self.ledger.report();
        cleanup(&self.broker, None).await;
        for b in self.others.drain(..) {
            b.close().await.expect("close");
        }
        self.broker.close().await.expect("close");
        summary(self.name, &report, self.faults.0, self.faults.1);
        eprintln!("{}: run {elapsed:.1?}, report {report:?}", self.name);
        assert_eq!(
            report.lost,
            0,
            "{}: confirmed ids never consumed: {:?}",
            self.name,
            self.ledger.missing(20)
        );
        Ending { report, elapsed }
    }
}

/// Print a scenario's one summary line (`--no-capture` shows it) and return it.
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
