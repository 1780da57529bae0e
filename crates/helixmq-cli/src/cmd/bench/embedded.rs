//! The embedded broker (`Broker::embedded`) through the same API: publish and
//! consume at once, then each alone, so a miss can be placed on one side.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;
use helixmq::topology::{Exchange, ExchangeKind, Queue};
use helixmq::{Broker, Config, Message, Outcome, SubscribeOptions, Topology};
use indicatif::ProgressBar;
use serde::Serialize;

use super::consume::{Counter, STALL};
use super::publish::publish_with_tasks;
use super::Plan;

/// The embedded broker's figures.
#[derive(Debug, Clone, Serialize, Default)]
pub(crate) struct EmbeddedReport {
    /// Messages per run.
    pub messages: u64,
    /// Published and consumed at the same time: messages / time until the last
    /// was handled; the median of `rounds` runs, like the RabbitMQ figures.
    pub publish_and_consume_per_sec: f64,
    /// Every publish-and-consume run, in order (the first one also pays for
    /// the memory the process had not touched yet).
    pub publish_and_consume_runs: Vec<f64>,
    /// Publishing alone into an empty queue (`window` publisher tasks).
    pub publish_only_per_sec: f64,
    /// Draining a full queue alone.
    pub consume_only_per_sec: f64,
}

/// Run the three embedded measurements.
pub(crate) async fn run(
    plan: &Plan,
    payload: &Bytes,
    bar: &ProgressBar,
) -> anyhow::Result<EmbeddedReport> {
    let mut config = Config::default();
    config.helixmq.prefix = "helixagent.bench".into();
    let broker = Broker::embedded(config);
    let exchange = "helixagent.bench.x";
    let queue = "helixagent.bench.embedded";
    let mut t = Topology::system(broker.names());
    t.exchanges.push(Exchange {
        name: exchange.into(),
        kind: ExchangeKind::Direct,
        durable: true,
        alternate_exchange: None,
    });
    t.add_work_queue(Queue::durable(queue), exchange, queue);
    broker.declare(&t).await.context("embedded declare")?;
    let n = plan.embedded_messages;
    let hidden = ProgressBar::hidden();
    let p = payload.clone();
    let make = move |_| p.clone();
    let publish_all = || {
        publish_with_tasks(
            &broker,
            exchange,
            queue,
            (n, plan.window),
            &hidden,
            None,
            make.clone(),
        )
    };

    // Both at once, `rounds` times.
    let mut runs = Vec::new();
    for round in 0..plan.rounds {
        let counter = Counter::new(n, if round == 0 { bar } else { &hidden });
        let started = Instant::now();
        let sub = subscribe(&broker, queue, plan, counter.clone()).await?;
        publish_all().await?;
        counter.wait(STALL).await.context("embedded consume")?;
        runs.push(n as f64 / started.elapsed().as_secs_f64());
        sub.shutdown(Duration::from_secs(5)).await;
    }
    let mut sorted = runs.clone();
    sorted.sort_by(f64::total_cmp);
    let both = sorted[sorted.len() / 2];

    // Publish alone.
    let started = Instant::now();
    publish_all().await?;
    let publish_only = n as f64 / started.elapsed().as_secs_f64();

    // Consume alone.
    let counter = Counter::new(n, &hidden);
    let started = Instant::now();
    let sub = subscribe(&broker, queue, plan, counter.clone()).await?;
    counter.wait(STALL).await.context("embedded consume")?;
    let consume_only = n as f64 / started.elapsed().as_secs_f64();
    sub.shutdown(Duration::from_secs(5)).await;
    let _ = broker.close().await;
    bar.finish_and_clear();
    Ok(EmbeddedReport {
        messages: n,
        publish_and_consume_per_sec: both,
        publish_and_consume_runs: runs,
        publish_only_per_sec: publish_only,
        consume_only_per_sec: consume_only,
    })
}

async fn subscribe(
    broker: &Broker,
    queue: &str,
    plan: &Plan,
    counter: Counter,
) -> anyhow::Result<helixmq::Subscription> {
    let handler = move |_m: Message, _ctx: helixmq::Context| {
        counter.hit();
        async { Ok::<_, helixmq::BoxError>(Outcome::Ack) }
    };
    broker
        .subscribe(
            queue,
            handler,
            SubscribeOptions {
                prefetch: Some(plan.prefetch),
                ..Default::default()
            },
        )
        .await
        .context("embedded subscribe")
}
