//! The demo's flows, each using the library the way its example shows (same
//! public calls, nothing below `Broker` but what the examples use too):
//! - **publish** (`examples/publish_confirmed.rs`): every message planned with
//!   its fate, then `publish_batch` per exchange and routing key, a few batches
//!   in flight, one confirm result per message;
//! - **work with retries and the DLQ** (`examples/worker_retry_dlq.rs`): a
//!   subscription per work queue with a [`RetryPolicy`]; the handler answers
//!   `Outcome::retry` or `Outcome::dead_letter` as the message's fate says, and
//!   the DLQ is read with its failure headers (`header::DEAD_LETTER_REASON`);
//! - **fan-out** (`examples/embedded.rs`): the notifications exchange copies each
//!   notification to the websocket, SSE and webhook queues, each subscribed alike;
//! - **graceful shutdown** (`examples/graceful_shutdown.rs`): every subscription
//!   drained within a deadline, what it abandoned reported.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use futures::future::join_all;
use futures::StreamExt;
use helixmq::message::header;
use helixmq::{
    Broker, Message, Names, Outcome, Priority, PublishOptions, RetryPolicy, SubscribeOptions,
    Subscription, Topology,
};
use indicatif::{ProgressBar, ProgressStyle};
use rand::seq::SliceRandom;

use super::tally::{now_us, Fate, Payload, Tally};
use super::{report::report, DemoArgs, MAX_ATTEMPTS, RETRY_DELAY};

/// Confirms awaited per `publish_batch` call.
const BATCH: usize = 250;
/// Batches in flight at once: many confirms pending, and a bar that moves.
const BATCHES_IN_FLIGHT: usize = 8;
/// How long each subscription may take to finish its handlers at the end.
const SHUTDOWN_DEADLINE: Duration = Duration::from_secs(2);

/// One message to publish.
struct Out {
    exchange: String,
    key: String,
    kind: String,
    priority: Option<Priority>,
    payload: Payload,
}

/// Declare, publish everything, consume until every delivery is settled (or
/// the deadline), shut down, report.
pub(super) async fn run_flows(
    broker: &Broker,
    names: &Names,
    topology: &Topology,
    args: &DemoArgs,
) -> anyhow::Result<ExitCode> {
    broker
        .declare(topology)
        .await
        .context("cannot declare the demo topology")?;
    let plan = plan(names, args.jobs);
    let tally = Arc::new(Tally::new(
        topology
            .queues
            .iter()
            .filter(|q| is_work_queue(names, &q.name))
            .map(|q| q.name.clone()),
    ));
    let total = expect(&tally, topology, &plan);
    let style = bar_style();
    // Everything is published before any consumer starts, so the LLM queue
    // holds every priority when its single consumer begins.
    publish(broker, plan, total, &style).await?;
    let subs = subscribe(broker, names, &tally).await?;
    let took = wait_settled(&tally, total, args.deadline, &style).await;
    shut_down(subs).await;
    report(&tally, names, total, took)
}

/// Every message of the run and what should become of it.
fn plan(names: &Names, jobs: u32) -> Vec<Out> {
    let mut plan: Vec<Out> = Vec::new();
    let mut add = |exchange: &str, key: String, kind: &str, text: String, prio| {
        let n = plan.len() as u32 + 1;
        plan.push(Out {
            exchange: exchange.to_string(),
            key,
            kind: kind.to_string(),
            priority: prio,
            payload: Payload {
                n,
                fate: Fate::of(n),
                sent_us: 0,
                text,
            },
        });
    };
    let tasks = names.tasks_exchange();
    let events = names.events_exchange();
    let notes = names.notifications_exchange();
    // LLM requests: equal numbers per level, published in random order.
    let levels = [
        Priority::LOW,
        Priority::NORMAL,
        Priority::HIGH,
        Priority::CRITICAL,
    ];
    let mut llm: Vec<Priority> = (0..jobs / 2).map(|i| levels[i as usize % 4]).collect();
    llm.shuffle(&mut rand::rng());
    for p in llm {
        let text = format!("prompt at priority {}", p.value());
        add(&tasks, "llm".into(), "llm.request", text, Some(p));
    }
    for i in 0..jobs {
        let text = format!("job {i}");
        add(&tasks, "background".into(), "job.background", text, None);
    }
    for kind in ["debate", "verification", "notifications"] {
        for i in 0..jobs / 4 {
            let text = format!("{kind} task {i}");
            add(&tasks, kind.into(), &format!("task.{kind}"), text, None);
        }
    }
    for i in 0..jobs * 3 / 8 {
        let key = format!("debate.round.{}", i % 5 + 1);
        add(&events, key, "event.debate", format!("round {i}"), None);
    }
    for (i, provider) in
        (0..jobs / 4).zip(["openai", "anthropic", "mistral", "local"].iter().cycle())
    {
        let key = format!("verification.{provider}");
        add(&events, key, "event.verify", format!("check {i}"), None);
    }
    for i in 0..jobs / 8 {
        let text = format!("audit {i}");
        add(&events, "system.audit".into(), "event.audit", text, None);
    }
    // Fan-out: one publish, a copy in each notification queue.
    for i in 0..jobs / 4 {
        let text = format!("notification {i}");
        add(&notes, String::new(), "notification", text, None);
    }
    plan
}

/// Count what each work queue should receive (a message reaches every queue
/// its route leads to); the total of deliveries.
fn expect(tally: &Tally, topology: &Topology, plan: &[Out]) -> u64 {
    let mut total = 0;
    for o in plan {
        for q in topology.route(&o.exchange, &o.key) {
            tally
                .q(&q.name)
                .expect("routes reach work queues")
                .expect(o.payload.fate);
            total += 1;
        }
    }
    total
}

/// Confirmed publishing: `publish_batch` per exchange and key, a few batches
/// in flight; fails if any message was not confirmed. `deliveries`: the
/// copies the queues receive, for the line printed.
async fn publish(
    broker: &Broker,
    plan: Vec<Out>,
    deliveries: u64,
    style: &ProgressStyle,
) -> anyhow::Result<()> {
    let bar = ProgressBar::new(plan.len() as u64)
        .with_style(style.clone())
        .with_message("publishing");
    bar.enable_steady_tick(Duration::from_millis(100));
    let started = Instant::now();
    let mut groups: std::collections::BTreeMap<(String, String), Vec<Message>> = Default::default();
    for mut o in plan {
        o.payload.sent_us = now_us();
        let m = Message::json(&o.payload)?.with_kind(o.kind);
        let m = match o.priority {
            Some(p) => m.with_priority(p),
            None => m,
        };
        groups.entry((o.exchange, o.key)).or_default().push(m);
    }
    let opts = PublishOptions::default();
    let (bar_ref, opts_ref) = (&bar, &opts);
    let batches = groups.iter().flat_map(|((x, k), msgs)| {
        msgs.chunks(BATCH).map(move |chunk| async move {
            let r = broker.publish_batch(x, k, chunk, opts_ref).await;
            bar_ref.inc(chunk.len() as u64);
            r
        })
    });
    let results: Vec<Vec<helixmq::Result<()>>> = futures::stream::iter(batches)
        .buffer_unordered(BATCHES_IN_FLIGHT)
        .collect()
        .await;
    let took = started.elapsed();
    bar.finish_and_clear();
    let errors: Vec<String> = results
        .into_iter()
        .flatten()
        .filter_map(|r| r.err().map(|e| e.to_string()))
        .collect();
    if let Some(first) = errors.first() {
        anyhow::bail!("{} publish(es) failed, e.g.: {first}", errors.len());
    }
    let messages = groups.values().map(Vec::len).sum::<usize>();
    outln!(
        "published {messages} messages ({deliveries} queue deliveries) with confirms in {:.2}s ({:.0} msg/s)",
        took.as_secs_f64(),
        messages as f64 / took.as_secs_f64().max(1e-6)
    );
    Ok(())
}

/// A subscription per work queue, with retries and the DLQ, and one on the
/// DLQ to see what ended there.
async fn subscribe(
    broker: &Broker,
    names: &Names,
    tally: &Arc<Tally>,
) -> anyhow::Result<Vec<Subscription>> {
    let mut subs = Vec::new();
    let llm_queue = names.task_queue("llm");
    for name in tally.queues.keys() {
        let is_llm = *name == llm_queue;
        let opts = SubscribeOptions {
            // One at a time on the LLM queue, so the order served is the queue's order.
            prefetch: Some(if is_llm { 1 } else { 20 }),
            concurrency: Some(if is_llm { 1 } else { 8 }),
            retry: Some(RetryPolicy {
                max_attempts: MAX_ATTEMPTS,
                delays: vec![RETRY_DELAY],
            }),
            ..SubscribeOptions::default()
        };
        let (t, q) = (tally.clone(), name.clone());
        let handler = move |m: Message, _ctx: helixmq::Context| {
            let (t, q) = (t.clone(), q.clone());
            async move { Ok::<_, helixmq::BoxError>(work(&t, &q, is_llm, m).await) }
        };
        subs.push(
            broker
                .subscribe(name, handler, opts)
                .await
                .with_context(|| format!("cannot consume {name}"))?,
        );
    }
    let t = tally.clone();
    let dlq_handler = move |m: Message, _ctx: helixmq::Context| {
        let t = t.clone();
        async move {
            let origin = m.header_str(header::ORIGIN_QUEUE).unwrap_or_default();
            let reason = m.header_str(header::DEAD_LETTER_REASON).unwrap_or("?");
            t.dead_lettered(origin, &m.id, reason);
            Ok::<_, helixmq::BoxError>(Outcome::Ack)
        }
    };
    subs.push(
        broker
            .subscribe(&names.dlq(), dlq_handler, SubscribeOptions::default())
            .await?,
    );
    Ok(subs)
}

/// The demo handler: simulated work, then the outcome the message's fate asks for.
async fn work(t: &Tally, queue: &str, is_llm: bool, m: Message) -> Outcome {
    let p: Payload = match m.parse_json() {
        Ok(p) => p,
        Err(e) => return Outcome::dead_letter(e.to_string()),
    };
    if is_llm && m.attempt == 1 {
        t.llm_served(m.priority.map(|p| p.value()).unwrap_or(0));
    }
    // Simulated work: a few hundred microseconds, like a fast handler.
    tokio::time::sleep(Duration::from_micros(200 + (p.n as u64 * 37) % 600)).await;
    let Some(q) = t.q(queue) else {
        return Outcome::Ack;
    };
    match p.fate {
        Fate::Ok => {
            t.processed(q, &m.id, p.sent_us);
            Outcome::Ack
        }
        Fate::Flaky if m.attempt == 1 => {
            q.retried();
            Outcome::retry("upstream timed out (simulated); the next attempt succeeds")
        }
        Fate::Flaky => {
            t.processed(q, &m.id, p.sent_us);
            Outcome::Ack
        }
        Fate::Poison => Outcome::dead_letter("malformed request (simulated poison message)"),
        Fate::Doomed => {
            if m.attempt < MAX_ATTEMPTS {
                q.retried();
            }
            Outcome::retry("provider unavailable (simulated, every attempt)")
        }
    }
}

/// Until every delivery is settled, or `deadline`; how long that took.
async fn wait_settled(
    tally: &Tally,
    total: u64,
    deadline: Duration,
    style: &ProgressStyle,
) -> Duration {
    let bar = ProgressBar::new(total)
        .with_style(style.clone())
        .with_message("processing");
    bar.enable_steady_tick(Duration::from_millis(100));
    let started = Instant::now();
    let deadline = tokio::time::Instant::now() + deadline;
    loop {
        let done = tally.settled();
        bar.set_position(done);
        if done >= total {
            break;
        }
        tokio::select! {
            _ = tally.changed.notified() => {}
            _ = tokio::time::sleep_until(deadline) => break,
        }
    }
    let took = started.elapsed();
    bar.finish_and_clear();
    took
}

/// Graceful shutdown of every subscription at once, within [`SHUTDOWN_DEADLINE`].
async fn shut_down(subs: Vec<Subscription>) {
    let reports = join_all(subs.into_iter().map(|s| async move {
        let queue = s.queue().to_string();
        (queue, s.shutdown(SHUTDOWN_DEADLINE).await)
    }))
    .await;
    for (queue, r) in reports.iter().filter(|(_, r)| r.abandoned > 0) {
        tracing::warn!(%queue, abandoned = r.abandoned, "handlers still running at the demo's end were stopped; their messages go back to the queue");
    }
}

/// Work queues: every queue the demo consumes (not the DLQ nor retry tiers).
fn is_work_queue(names: &Names, q: &str) -> bool {
    let retry = names.retry_tier(RETRY_DELAY);
    q != names.dlq() && q != retry && q != names.retry_tier(helixmq::topology::DEFAULT_RETRY_DELAY)
}

/// The progress bars' look.
fn bar_style() -> ProgressStyle {
    ProgressStyle::with_template(
        "{spinner:.green} {msg:<11} [{bar:40.cyan/blue}] {pos}/{len} {rate}",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar())
    .with_key(
        "rate",
        |s: &indicatif::ProgressState, w: &mut dyn std::fmt::Write| {
            let _ = write!(w, "{:.0}/s", s.per_sec());
        },
    )
    .progress_chars("=> ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_fate_is_planned_and_every_route_reaches_a_work_queue() {
        let names = Names::new("helixagent.demo-test");
        let mut topology = Topology::spec(&names);
        topology.add_retry_tier(RETRY_DELAY);
        let plan = plan(&names, 400);
        for fate in [Fate::Ok, Fate::Flaky, Fate::Poison, Fate::Doomed] {
            assert!(plan.iter().any(|o| o.payload.fate == fate), "{fate:?}");
        }
        let tally = Tally::new(
            topology
                .queues
                .iter()
                .filter(|q| is_work_queue(&names, &q.name))
                .map(|q| q.name.clone()),
        );
        // Fan-out: a notification is three deliveries.
        assert!(expect(&tally, &topology, &plan) > plan.len() as u64);
    }
}
