//! `worker --pipe` beside `worker --exec`, with a no-op Python handler: the
//! worker's own handlers ([`PipeHandler`], [`ExecHandler`]) behind a
//! subscription that drains a full queue, on the embedded broker and on
//! RabbitMQ, in one run. The figure is tasks/s: messages handed to the handler,
//! answered `ack` and acked, divided by the time to drain the queue.
//!
//! The pipe pool is started before the clock (a warm-up fill of a few messages
//! per process), as a worker's pool is after its first messages; `--exec` pays
//! a fresh `sh` + Python per message, which is its whole cost.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use helixmq::topology::{Exchange, ExchangeKind, Queue};
use helixmq::{Broker, Config, Message, Outcome, SubscribeOptions, Topology};
use indicatif::ProgressBar;
use serde::Serialize;

use super::consume::{Counter, STALL};
use super::publish::publish_with_tasks;
use super::report::{Run, Start};
use super::setup::Bench;
use super::{progress, Plan, SETTLE};
use crate::cmd::worker::exec::ExecHandler;
use crate::cmd::worker::pipe::PipeHandler;

/// The no-op handler for `--pipe`: the shape of `examples/pipe/handler.py`
/// (decode the request line, answer one JSON line, flush) without the work.
pub(crate) const NOOP_PIPE: &str = r#"python3 -c '
import json, sys
for line in sys.stdin:
    json.loads(line)
    print(json.dumps({"outcome": "ack"}), flush=True)
'"#;

/// The no-op handler for `--exec`: read the payload, exit 0.
pub(crate) const NOOP_EXEC: &str = "python3 -c 'import sys; sys.stdin.buffer.read()'";

/// An answer must come within this (a stuck handler fails the run, not the machine).
const HANDLER_TIMEOUT: Duration = Duration::from_secs(30);

/// Warm-up messages per pipe process, handled before the clock starts.
const WARM_UP_PER_PROCESS: u64 = 4;

/// The pipe-versus-exec figures.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct PipeReport {
    /// Handler processes (`--pipe`) or commands (`--exec`) running at once.
    pub concurrency: usize,
    /// `sh -c` command of the pipe runs.
    pub pipe_command: String,
    /// `sh -c` command of the exec runs.
    pub exec_command: String,
    pub embedded: PipeSide,
    pub rabbitmq: PipeSide,
}

/// Pipe and exec on one broker.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct PipeSide {
    /// `worker --pipe`: `per_sec` is tasks/s. `cpu_us_per_msg` is the worker's
    /// own CPU (the handler processes are not counted).
    pub pipe: Run,
    /// `worker --exec`, a process per message.
    pub exec: Run,
    /// pipe tasks/s / exec tasks/s.
    pub ratio: f64,
}

/// Where a side publishes and consumes.
struct Target<'a> {
    broker: &'a Broker,
    exchange: &'a str,
    queue: &'a str,
    /// RabbitMQ writes what it was given before a drain starts; the embedded broker needs no pause.
    settle: bool,
}

/// Both sides: the embedded broker first, then RabbitMQ.
pub(crate) async fn run(bench: &Bench, plan: &Plan, payload: &Bytes) -> anyhow::Result<PipeReport> {
    let mut config = Config::default();
    config.helixmq.prefix = "helixagent.bench".into();
    let embedded = Broker::embedded(config);
    let exchange = "helixagent.bench.x";
    let queue = "helixagent.bench.pipe";
    let mut t = Topology::system(embedded.names());
    t.exchanges.push(Exchange {
        name: exchange.into(),
        kind: ExchangeKind::Direct,
        durable: true,
        alternate_exchange: None,
    });
    t.add_work_queue(Queue::durable(queue), exchange, queue);
    embedded
        .declare(&t)
        .await
        .context("embedded declare (pipe)")?;
    let on_embedded = side(
        "embedded",
        &Target {
            broker: &embedded,
            exchange,
            queue,
            settle: false,
        },
        plan,
        payload,
    )
    .await;
    let _ = embedded.close().await;
    let on_embedded = on_embedded?;
    let on_rabbitmq = side(
        "RabbitMQ",
        &Target {
            broker: &bench.broker,
            exchange: &bench.exchange,
            queue: &bench.q_pipe,
            settle: true,
        },
        plan,
        payload,
    )
    .await?;
    Ok(PipeReport {
        concurrency: plan.pipe_concurrency,
        pipe_command: plan.pipe_command.clone(),
        exec_command: plan.exec_command.clone(),
        embedded: on_embedded,
        rabbitmq: on_rabbitmq,
    })
}

async fn side(
    name: &str,
    at: &Target<'_>,
    plan: &Plan,
    payload: &Bytes,
) -> anyhow::Result<PipeSide> {
    let n = plan.pipe_concurrency;
    let pipe = Arc::new(Handler::Pipe(PipeHandler::new(
        plan.pipe_command.clone(),
        HANDLER_TIMEOUT,
        n,
    )));
    let warm = n as u64 * WARM_UP_PER_PROCESS;
    fill(at, plan, payload, warm).await?;
    drain(at, plan, &pipe, warm, &ProgressBar::hidden()).await?;

    fill(at, plan, payload, plan.pipe_messages).await?;
    let bar = progress(plan.pipe_messages, &format!("worker --pipe ({name})"));
    let pipe_run = drain(at, plan, &pipe, plan.pipe_messages, &bar).await?;
    // The pool's processes end with it.
    drop(pipe);

    let exec = Arc::new(Handler::Exec(ExecHandler::new(
        plan.exec_command.clone(),
        HANDLER_TIMEOUT,
    )));
    fill(at, plan, payload, plan.exec_messages).await?;
    let bar = progress(plan.exec_messages, &format!("worker --exec ({name})"));
    let exec_run = drain(at, plan, &exec, plan.exec_messages, &bar).await?;
    Ok(PipeSide {
        ratio: if exec_run.per_sec > 0.0 {
            pipe_run.per_sec / exec_run.per_sec
        } else {
            0.0
        },
        pipe: pipe_run,
        exec: exec_run,
    })
}

/// The worker's handler under test.
enum Handler {
    Pipe(PipeHandler),
    Exec(ExecHandler),
}

/// `messages` more in the queue, confirmed.
async fn fill(at: &Target<'_>, plan: &Plan, payload: &Bytes, messages: u64) -> anyhow::Result<()> {
    let p = payload.clone();
    publish_with_tasks(
        at.broker,
        at.exchange,
        at.queue,
        (messages, plan.window),
        &ProgressBar::hidden(),
        None,
        move |_| p.clone(),
    )
    .await?;
    if at.settle {
        tokio::time::sleep(SETTLE).await;
    }
    Ok(())
}

/// Subscribe the handler with the worker's options (concurrency N, prefetch at
/// least N) and time until `messages` were answered; fails on any answer but ack.
async fn drain(
    at: &Target<'_>,
    plan: &Plan,
    handler: &Arc<Handler>,
    messages: u64,
    bar: &ProgressBar,
) -> anyhow::Result<Run> {
    let counter = Counter::new(messages, bar);
    let failed = Arc::new(AtomicU64::new(0));
    let first_failure = Arc::new(Mutex::new(None::<String>));
    let (h, c, f, ff) = (
        handler.clone(),
        counter.clone(),
        failed.clone(),
        first_failure.clone(),
    );
    let handle = move |m: Message, ctx: helixmq::Context| {
        let (h, c, f, ff) = (h.clone(), c.clone(), f.clone(), ff.clone());
        async move {
            let outcome = match &*h {
                Handler::Pipe(p) => p.handle(m, ctx).await,
                Handler::Exec(e) => e.handle(m, ctx).await,
            };
            if !matches!(outcome, Outcome::Ack) {
                // Acked anyway: a failing run is reported, not retried into the next one.
                f.fetch_add(1, Ordering::Relaxed);
                ff.lock()
                    .unwrap()
                    .get_or_insert_with(|| format!("{outcome:?}"));
            }
            c.hit();
            Ok::<_, helixmq::BoxError>(Outcome::Ack)
        }
    };
    let n = plan.pipe_concurrency;
    let started = Start::now();
    let sub = at
        .broker
        .subscribe(
            at.queue,
            handle,
            SubscribeOptions {
                prefetch: Some(plan.prefetch.max(n.min(u16::MAX as usize) as u16)),
                concurrency: Some(n),
                ..SubscribeOptions::default()
            },
        )
        .await
        .context("pipe bench subscribe")?;
    let waited = counter.wait(STALL).await;
    let run = Run::finished(messages, started, bar);
    sub.shutdown(Duration::from_secs(5)).await;
    waited.context("pipe bench drain")?;
    let failed = failed.load(Ordering::Relaxed);
    if failed > 0 {
        anyhow::bail!(
            "{failed} of {messages} messages were not answered ack, e.g. {}",
            first_failure.lock().unwrap().clone().unwrap_or_default()
        );
    }
    Ok(run)
}
