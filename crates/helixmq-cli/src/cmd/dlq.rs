//! `helixmq dlq list | show | replay | purge`: the dead-letter queue, without losing anything.
//!
//! Reading: the DLQ is consumed with a prefetch as large as what we read, the
//! messages are inspected, then every one we did not explicitly settle is
//! nacked with requeue after the consumer is cancelled — so `list` and `show`
//! leave the queue as they found it (RabbitMQ puts requeued messages back in
//! their place; they are marked redelivered).
//!
//! Replaying: a copy goes to the origin queue through the requeue exchange
//! (`{prefix}.requeue`, routing key = queue name) with its attempt reset to 1;
//! only after the broker confirmed that copy is the DLQ message acked. A failed
//! publish leaves it in the DLQ.

use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context as _};
use clap::{Args, Subcommand};
use helixmq::backend::{Delivery, DeliveryStream};
use helixmq::message::header;
use helixmq::{Broker, Message, PublishOptions};
use serde::Serialize;

use crate::cmd::worker::header_text;
use crate::common::{connect, full_queue_name, head, load_config, progress_bar, spec_topology};
use crate::Global;

/// At most this many messages are read from the DLQ at once (the AMQP prefetch is a u16).
const MAX_SCAN: usize = 65_535;
/// How long to wait for the deliveries the broker said were ready.
const READ_DEADLINE: Duration = Duration::from_secs(10);

/// `helixmq dlq ...`
#[derive(Debug, Subcommand)]
pub enum DlqCmd {
    /// List dead-lettered messages; nothing is removed.
    List {
        #[command(flatten)]
        filter: Filter,
        /// Show at most this many.
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Show one message: metadata, failure headers, payload; every copy when the
    /// id is in the DLQ more than once (a fanned-out message that failed in several
    /// queues). Nothing is removed.
    Show {
        /// Message id.
        id: String,
        /// JSON output: an array with one object per copy.
        #[arg(long)]
        json: bool,
    },
    /// Re-publish messages to their origin queue (confirmed), then remove them from the DLQ.
    /// Needs a selector: --id, --all, --queue or --reason.
    #[command(group(
        clap::ArgGroup::new("selector")
            .required(true)
            .multiple(true)
            .args(["ids", "all", "queue", "reason"])
    ))]
    Replay {
        /// Replay this message; repeatable.
        #[arg(long = "id", value_name = "ID")]
        ids: Vec<String>,
        /// Replay every message (subject to the filters).
        #[arg(long)]
        all: bool,
        #[command(flatten)]
        filter: Filter,
        /// Send to this queue instead of the origin (a work queue of the topology;
        /// `tasks.llm` is short for `<prefix>.tasks.llm`).
        #[arg(long, value_name = "QUEUE")]
        to: Option<String>,
        /// Replay at most this many.
        #[arg(long)]
        limit: Option<usize>,
        /// Say what would be replayed; change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Delete every message in the DLQ. Refuses without --yes.
    Purge {
        /// Really delete them.
        #[arg(long)]
        yes: bool,
    },
}

/// Which dead letters a command applies to.
#[derive(Debug, Clone, Default, Args)]
pub struct Filter {
    /// Only messages that failed in this queue (`tasks.llm` is short for `<prefix>.tasks.llm`).
    #[arg(long = "queue", value_name = "ORIGIN")]
    pub queue: Option<String>,
    /// Only messages whose reason contains this text (case-insensitive).
    #[arg(long, value_name = "TEXT")]
    pub reason: Option<String>,
}

impl Filter {
    fn matches(&self, e: &Entry) -> bool {
        self.queue
            .as_ref()
            .is_none_or(|q| e.origin_queue.as_deref() == Some(q.as_str()))
            && self
                .reason
                .as_ref()
                .is_none_or(|r| e.reason.to_lowercase().contains(&r.to_lowercase()))
    }
}

/// A dead letter as shown to the user.
#[derive(Debug, Serialize)]
struct Entry {
    id: String,
    origin_queue: Option<String>,
    origin_exchange: Option<String>,
    origin_routing_key: Option<String>,
    attempts: u32,
    reason: String,
    first_failure: Option<String>,
    last_failure: Option<String>,
    /// Seconds since the last failure (or since the message was created).
    age_secs: u64,
    #[serde(rename = "type")]
    kind: Option<String>,
    correlation_id: Option<String>,
    priority: Option<u8>,
    redelivered: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    headers: Option<std::collections::BTreeMap<String, String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    payload: Option<String>,
}

fn entry(d: &Delivery, full: bool) -> Entry {
    let m = &d.message;
    let ms = |k: &str| m.headers.get(k).and_then(|v| v.as_i64());
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    let last = ms(header::LAST_FAILURE);
    let since = last.unwrap_or(m.timestamp as i64 * 1000);
    // Broker-side dead letters (TTL, max length) carry RabbitMQ's x-first-death-* headers only.
    let origin_queue = m
        .header_str(header::ORIGIN_QUEUE)
        .or_else(|| m.header_str("x-first-death-queue"));
    let reason = m
        .header_str(header::DEAD_LETTER_REASON)
        .or_else(|| m.header_str(header::LAST_ERROR))
        .map(str::to_string)
        .or_else(|| {
            m.header_str("x-first-death-reason")
                .map(|r| format!("broker: {r}"))
        })
        .unwrap_or_else(|| "(no reason recorded)".into());
    Entry {
        id: m.id.clone(),
        origin_queue: origin_queue.map(str::to_string),
        origin_exchange: m
            .header_str(header::ORIGIN_EXCHANGE)
            .or_else(|| m.header_str("x-first-death-exchange"))
            .map(str::to_string),
        origin_routing_key: m.header_str(header::ORIGIN_ROUTING_KEY).map(str::to_string),
        attempts: m.attempt,
        reason,
        first_failure: ms(header::FIRST_FAILURE).map(rfc3339),
        last_failure: last.map(rfc3339),
        age_secs: ((now_ms - since).max(0) / 1000) as u64,
        kind: m.kind.clone(),
        correlation_id: m.correlation_id.clone(),
        priority: m.priority.map(|p| p.value()),
        redelivered: d.redelivered,
        headers: full.then(|| {
            m.headers
                .iter()
                .map(|(k, v)| (k.clone(), header_text(v)))
                .chain(
                    m.traceparent
                        .iter()
                        .map(|tp| (header::TRACEPARENT.to_string(), tp.clone())),
                )
                .collect()
        }),
        payload: full.then(|| String::from_utf8_lossy(&m.payload).into_owned()),
    }
}

fn rfc3339(ms: i64) -> String {
    let t = UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_millis(t).to_string()
}

/// How long cancelling the scan consumer or one nack may take.
const SETTLE_DEADLINE: std::time::Duration = std::time::Duration::from_secs(5);

/// Deliveries read from the DLQ and still owed a settlement.
struct Scan {
    stream: Option<Box<dyn DeliveryStream>>,
    deliveries: Vec<Option<Delivery>>,
}

impl Scan {
    /// Read up to `max` ready messages of `queue` without settling them.
    async fn read(broker: &Broker, queue: &str, max: usize) -> anyhow::Result<Scan> {
        let backend = broker.backend();
        let ready = backend
            .queue_stats(queue)
            .await
            .with_context(|| format!("cannot read the DLQ '{queue}'"))?
            .messages as usize;
        let want = ready.min(max).min(MAX_SCAN);
        if ready > MAX_SCAN {
            eprintln!(
                "note: {queue} holds {ready} messages; only the first {MAX_SCAN} are read at once (run the command again for the rest)"
            );
        }
        if want == 0 {
            return Ok(Scan {
                stream: None,
                deliveries: Vec::new(),
            });
        }
        let tag = format!("helixmq-dlq-{}", uuid::Uuid::now_v7().simple());
        let mut stream = backend.consume(queue, want as u16, &tag).await?;
        let mut deliveries = Vec::with_capacity(want);
        let deadline = tokio::time::Instant::now() + READ_DEADLINE;
        while deliveries.len() < want {
            // Another consumer may take some of what was ready: stop at the deadline with what we have.
            match tokio::time::timeout_at(deadline, stream.next()).await {
                Ok(Some(Ok(d))) => deliveries.push(Some(d)),
                Ok(Some(Err(e))) => {
                    let mut s = Scan {
                        stream: Some(stream),
                        deliveries,
                    };
                    s.release().await;
                    return Err(e.into());
                }
                Ok(None) | Err(_) => break,
            }
        }
        Ok(Scan {
            stream: Some(stream),
            deliveries,
        })
    }

    /// Stop the consumer and put back every delivery not settled yet.
    async fn release(&mut self) {
        // Bounded: if the channel is gone these may never answer, and dropping
        // the stream below closes it, which requeues every unacked delivery anyway.
        if let Some(s) = self.stream.as_mut() {
            let _ = tokio::time::timeout(SETTLE_DEADLINE, s.cancel()).await;
        }
        for d in self.deliveries.iter_mut().filter_map(Option::take) {
            match tokio::time::timeout(SETTLE_DEADLINE, d.acker.nack(true)).await {
                Ok(Ok(())) => {}
                // The channel is closing: the broker requeues unacked messages itself.
                Ok(Err(e)) => tracing::debug!(error = %e, "nack on release"),
                Err(_) => tracing::debug!("nack on release timed out"),
            }
        }
        self.stream = None;
    }
}

/// Run a `dlq` subcommand.
pub async fn run(global: &Global, cmd: DlqCmd) -> anyhow::Result<ExitCode> {
    let cfg = load_config(global)?;
    let topology = spec_topology(&cfg);
    let full = |f: Filter| Filter {
        queue: f.queue.map(|q| full_queue_name(&topology, &q)),
        ..f
    };
    let broker = connect(&cfg).await?;
    let dlq = broker.names().dlq();
    let res = match cmd {
        DlqCmd::List {
            filter,
            limit,
            json,
        } => list(&broker, &dlq, &full(filter), limit, json).await,
        DlqCmd::Show { id, json } => show(&broker, &dlq, &id, json).await,
        DlqCmd::Replay {
            ids,
            all,
            filter,
            to,
            limit,
            dry_run,
        } => {
            // clap requires a selector (usage error, 64); --all alone selects everything.
            let _ = all;
            let to = to.map(|q| full_queue_name(&topology, &q));
            replay(
                &broker,
                &dlq,
                &ids,
                &full(filter),
                to.as_deref(),
                limit,
                dry_run,
            )
            .await
        }
        DlqCmd::Purge { yes } => purge(&broker, &dlq, yes).await,
    };
    // Bounded: the command's work is done (every publish was confirmed).
    let _ = tokio::time::timeout(std::time::Duration::from_secs(10), broker.close()).await;
    res
}

async fn list(
    broker: &Broker,
    dlq: &str,
    filter: &Filter,
    limit: usize,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let mut scan = Scan::read(broker, dlq, MAX_SCAN).await?;
    let total = scan.deliveries.len();
    let shown: Vec<Entry> = scan
        .deliveries
        .iter()
        .flatten()
        .map(|d| entry(d, false))
        .filter(|e| filter.matches(e))
        .take(limit)
        .collect();
    scan.release().await;
    if json {
        outln!("{}", serde_json::to_string_pretty(&shown)?);
        return Ok(ExitCode::SUCCESS);
    }
    if !shown.is_empty() {
        outln!(
            "{:<36}  {:<32}  {:>3}  {:>8}  REASON",
            "ID",
            "ORIGIN QUEUE",
            "ATT",
            "AGE"
        );
    }
    for e in &shown {
        outln!(
            "{:<36}  {:<32}  {:>3}  {:>8}  {}",
            e.id,
            e.origin_queue.as_deref().unwrap_or("?"),
            e.attempts,
            short_age(e.age_secs),
            head(&e.reason.replace('\n', " "), 100)
        );
    }
    eprintln!(
        "{} of {total} message(s) in {dlq} shown; nothing was removed",
        shown.len()
    );
    Ok(ExitCode::SUCCESS)
}

fn short_age(s: u64) -> String {
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{}s", s / 60, s % 60),
        3600..=86_399 => format!("{}h{}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d{}h", s / 86_400, (s % 86_400) / 3600),
    }
}

async fn show(broker: &Broker, dlq: &str, id: &str, json: bool) -> anyhow::Result<ExitCode> {
    let mut scan = Scan::read(broker, dlq, MAX_SCAN).await?;
    // A fanned-out message that failed in several queues is in the DLQ once per queue.
    let found: Vec<Entry> = scan
        .deliveries
        .iter()
        .flatten()
        .filter(|d| d.message.id == id)
        .map(|d| entry(d, true))
        .collect();
    let total = scan.deliveries.len();
    scan.release().await;
    if found.is_empty() {
        bail!("no message with id '{id}' among the {total} message(s) in {dlq} (see `helixmq dlq list`)");
    }
    if json {
        outln!("{}", serde_json::to_string_pretty(&found)?);
        return Ok(ExitCode::SUCCESS);
    }
    let n = found.len();
    if n > 1 {
        outln!(
            "{n} copies of {id} in {dlq} (one per queue that dead-lettered it: {})",
            found
                .iter()
                .map(|e| e.origin_queue.as_deref().unwrap_or("?"))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    for (i, e) in found.into_iter().enumerate() {
        if n > 1 {
            outln!();
            outln!("--- copy {} of {n} ---", i + 1);
        }
        show_one(e);
    }
    Ok(ExitCode::SUCCESS)
}

fn show_one(e: Entry) {
    let opt = |o: &Option<String>| o.clone().unwrap_or_else(|| "-".into());
    outln!("id:                 {}", e.id);
    outln!("type:               {}", opt(&e.kind));
    outln!("origin queue:       {}", opt(&e.origin_queue));
    outln!("origin exchange:    {}", opt(&e.origin_exchange));
    outln!("origin routing key: {}", opt(&e.origin_routing_key));
    outln!("attempts:           {}", e.attempts);
    outln!("reason:             {}", e.reason);
    outln!("first failure:      {}", opt(&e.first_failure));
    outln!("last failure:       {}", opt(&e.last_failure));
    outln!("age:                {}", short_age(e.age_secs));
    outln!("correlation id:     {}", opt(&e.correlation_id));
    outln!(
        "priority:           {}",
        e.priority
            .map(|p| p.to_string())
            .unwrap_or_else(|| "-".into())
    );
    outln!("headers:");
    for (k, v) in e.headers.iter().flatten() {
        outln!("  {k}: {v}");
    }
    outln!("payload:");
    outln!("{}", e.payload.unwrap_or_default());
}

/// The copy that goes back to work: attempt 1, failure headers cleared (the
/// origin headers stay: they name where the message really came from), and no
/// per-message TTL — a message that expired once would expire again at once.
fn replay_copy(m: &Message) -> Message {
    let mut c = m.clone();
    c.attempt = 1;
    c.expiration = None;
    for h in [
        header::DEAD_LETTER_REASON,
        header::LAST_ERROR,
        header::FIRST_FAILURE,
        header::LAST_FAILURE,
        header::ATTEMPT,
    ] {
        c.headers.remove(h);
    }
    c.headers.retain(|k, _| {
        !k.starts_with("x-death")
            && !k.starts_with("x-first-death")
            && !k.starts_with("x-last-death")
    });
    c
}

#[allow(clippy::too_many_arguments)]
async fn replay(
    broker: &Broker,
    dlq: &str,
    ids: &[String],
    filter: &Filter,
    to: Option<&str>,
    limit: Option<usize>,
    dry_run: bool,
) -> anyhow::Result<ExitCode> {
    let mut scan = Scan::read(broker, dlq, MAX_SCAN).await?;
    let missing: Vec<String> = ids
        .iter()
        .filter(|id| {
            !scan
                .deliveries
                .iter()
                .flatten()
                .any(|d| &&d.message.id == id)
        })
        .map(|id| format!("'{id}'"))
        .collect();
    let requeue = broker.names().requeue_exchange();
    let limit = limit.unwrap_or(usize::MAX);
    let (mut replayed, mut failed, mut skipped) = (0usize, 0usize, 0usize);
    let mut first_error: Option<anyhow::Error> = None;
    let selected = |d: &Delivery| {
        let e = entry(d, false);
        (ids.is_empty() || ids.contains(&e.id)) && filter.matches(&e)
    };
    let todo = scan
        .deliveries
        .iter()
        .flatten()
        .filter(|d| selected(d))
        .count()
        .min(limit);
    let bar = progress_bar(todo as u64, if dry_run { "checking" } else { "replaying" });
    for slot in scan.deliveries.iter_mut() {
        if replayed + failed + skipped >= limit {
            break;
        }
        let Some(d) = slot.as_ref() else { continue };
        if !selected(d) {
            continue;
        }
        let e = entry(d, false);
        bar.inc(1);
        let Some(target) = to.map(str::to_string).or(e.origin_queue.clone()) else {
            bar.suspend(|| {
                eprintln!(
                    "skip {}: no origin queue recorded; replay it with --to QUEUE",
                    e.id
                )
            });
            skipped += 1;
            continue;
        };
        if dry_run {
            bar.suspend(|| outln!("would replay {} -> {target}", e.id));
            replayed += 1;
            continue;
        }
        let copy = replay_copy(&d.message);
        let opts = PublishOptions {
            mandatory: true,
            ..PublishOptions::default()
        };
        match broker.publish_with(&requeue, &target, copy, &opts).await {
            Ok(()) => {
                // Confirmed in its queue: now, and only now, it may leave the DLQ.
                let d = slot.take().expect("checked above");
                d.acker.ack().await.with_context(|| {
                    format!(
                        "message {} was replayed to {target} but could not be removed from the DLQ",
                        e.id
                    )
                })?;
                bar.suspend(|| outln!("replayed {} -> {target}", e.id));
                replayed += 1;
            }
            Err(err) => {
                bar.suspend(|| eprintln!("failed {}: {err} (it stays in the DLQ)", e.id));
                failed += 1;
                if first_error.is_none() {
                    let hint = if matches!(err, helixmq::Error::Unroutable { .. }) {
                        format!(
                            "; '{target}' must be a work queue bound to {requeue} (declared with `helixmq topology apply`)"
                        )
                    } else {
                        String::new()
                    };
                    first_error = Some(
                        anyhow::Error::new(err)
                            .context(format!("replay of {} to {target} failed{hint}", e.id)),
                    );
                }
            }
        }
    }
    bar.finish_and_clear();
    scan.release().await;
    if dry_run {
        eprintln!("dry run: {replayed} message(s) would be replayed; nothing changed");
    } else {
        eprintln!("{replayed} replayed, {failed} failed, {skipped} skipped");
    }
    if let Some(e) = first_error {
        return Err(e);
    }
    if !missing.is_empty() {
        bail!(
            "no message with id {} in {dlq} (see `helixmq dlq list`)",
            missing.join(", ")
        );
    }
    Ok(ExitCode::SUCCESS)
}

async fn purge(broker: &Broker, dlq: &str, yes: bool) -> anyhow::Result<ExitCode> {
    let backend = broker.backend();
    let ready = backend
        .queue_stats(dlq)
        .await
        .with_context(|| format!("cannot read the DLQ '{dlq}'"))?
        .messages;
    if !yes {
        bail!("refusing to purge {ready} message(s) from {dlq} without --yes (they would be lost for good)");
    }
    // One queue.purge: the broker empties the queue in one step, so the bar shows
    // how many are going, then that they went.
    let bar = progress_bar(ready, "purging");
    let n = backend
        .purge(dlq)
        .await
        .with_context(|| format!("cannot purge {dlq}"));
    bar.set_position(ready);
    bar.finish_and_clear();
    let n = n?;
    outln!("purged {n} message(s) from {dlq}");
    Ok(ExitCode::SUCCESS)
}
