//! `helixmq dlq list | groups | show | replay | delete | purge`: the dead-letter
//! queue, through the library's [`helixmq::dlq`] (which says how it is read
//! without losing anything). Replaying: a copy goes to the origin queue through
//! the requeue exchange with its attempt reset to 1; only after the broker
//! confirmed that copy is the DLQ message acked.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _};
use clap::{Args, Subcommand};
use helixmq::dlq::{rfc3339_ms, short_age, DeadLetter, DeadLetters, Order, Progress, Target};
use serde::Serialize;

use crate::common::{
    connect, full_queue_name, head, load_config, parse_duration, progress_bar, spec_topology,
};
use crate::Global;

/// `helixmq dlq ...`
#[derive(Debug, Subcommand)]
pub enum DlqCmd {
    /// List dead-lettered messages, oldest first; nothing is removed.
    List {
        #[command(flatten)]
        filter: Filter,
        /// Show at most this many.
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// Skip this many matching messages first (paging).
        #[arg(long, default_value_t = 0)]
        offset: usize,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Failures grouped by reason (numbers ignored), largest group first.
    Groups {
        #[command(flatten)]
        filter: Filter,
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
    /// Needs a selector: --id, --all or a filter.
    #[command(group(
        clap::ArgGroup::new("selector")
            .required(true)
            .multiple(true)
            .args(["ids", "all", "queue", "reason", "group", "kind", "header", "search", "min_age", "max_age", "min_attempts", "max_attempts"])
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
        /// Deliver the copies this much later (1s to 30days; `90s`, `2h`), through
        /// the delay queues (see `helixmq publish --delay`).
        #[arg(long, value_parser = parse_duration)]
        delay: Option<Duration>,
    },
    /// Delete the selected messages for good. Refuses without --yes.
    #[command(group(
        clap::ArgGroup::new("selector")
            .required(true)
            .multiple(true)
            .args(["ids", "queue", "reason", "group", "kind", "header", "search", "min_age", "max_age", "min_attempts", "max_attempts"])
    ))]
    Delete {
        /// Delete this message; repeatable.
        #[arg(long = "id", value_name = "ID")]
        ids: Vec<String>,
        #[command(flatten)]
        filter: Filter,
        /// Really delete them.
        #[arg(long)]
        yes: bool,
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
    /// Only messages of this failure group (as `dlq groups` prints it).
    #[arg(long, value_name = "GROUP")]
    pub group: Option<String>,
    /// Only messages of this type (`llm.request`).
    #[arg(long = "type", value_name = "TYPE")]
    pub kind: Option<String>,
    /// Only messages with this header value.
    #[arg(long, value_name = "KEY=VALUE", value_parser = parse_header)]
    pub header: Option<(String, String)>,
    /// Only messages whose payload contains this text (case-insensitive).
    #[arg(long, value_name = "TEXT")]
    pub search: Option<String>,
    /// Only messages whose last failure is at least this old (`1h`).
    #[arg(long, value_parser = parse_duration)]
    pub min_age: Option<Duration>,
    /// Only messages whose last failure is at most this old (`10m`).
    #[arg(long, value_parser = parse_duration)]
    pub max_age: Option<Duration>,
    /// Only messages run at least this many times.
    #[arg(long)]
    pub min_attempts: Option<u32>,
    /// Only messages run at most this many times.
    #[arg(long)]
    pub max_attempts: Option<u32>,
}

fn parse_header(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("'{s}' is not KEY=VALUE (e.g. --header tenant=acme)"))
}

impl Filter {
    fn into_lib(self, ids: Vec<String>, full: impl Fn(&str) -> String) -> helixmq::dlq::Filter {
        helixmq::dlq::Filter {
            ids,
            origin_queue: self.queue.map(|q| full(&q)),
            reason: self.reason,
            group: self.group,
            kind: self.kind,
            header: self.header,
            min_age: self.min_age,
            max_age: self.max_age,
            min_attempts: self.min_attempts,
            max_attempts: self.max_attempts,
            search: self.search,
        }
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

fn entry(l: &DeadLetter, full: bool) -> Entry {
    Entry {
        id: l.id.clone(),
        origin_queue: l.origin_queue.clone(),
        origin_exchange: l.origin_exchange.clone(),
        origin_routing_key: l.origin_routing_key.clone(),
        attempts: l.attempts,
        reason: l.reason.clone(),
        first_failure: l.first_failure_ms.map(rfc3339_ms),
        last_failure: l.last_failure_ms.map(rfc3339_ms),
        age_secs: l.age_secs(),
        kind: l.kind.clone(),
        correlation_id: l.correlation_id.clone(),
        priority: l.priority,
        redelivered: l.redelivered,
        headers: full.then(|| l.headers.clone()),
        payload: full.then(|| String::from_utf8_lossy(&l.message.payload).into_owned()),
    }
}

/// Run a `dlq` subcommand.
pub async fn run(global: &Global, cmd: DlqCmd) -> anyhow::Result<ExitCode> {
    let cfg = load_config(global)?;
    let topology = spec_topology(&cfg);
    let full = |q: &str| full_queue_name(&topology, q);
    let broker = connect(&cfg).await?;
    let dlq = DeadLetters::new(&broker);
    let res = match cmd {
        DlqCmd::List {
            filter,
            limit,
            offset,
            json,
        } => list(&dlq, &filter.into_lib(vec![], full), offset, limit, json).await,
        DlqCmd::Groups { filter, json } => groups(&dlq, &filter.into_lib(vec![], full), json).await,
        DlqCmd::Show { id, json } => show(&dlq, &id, json).await,
        DlqCmd::Replay {
            ids,
            all,
            filter,
            to,
            limit,
            dry_run,
            delay,
        } => {
            // clap requires a selector (usage error, 64); --all alone selects everything.
            let _ = all;
            let to = to.map(|q| full(&q));
            let filter = filter.into_lib(ids, full);
            if let Some(d) = delay {
                helixmq::topology::schedule::check_delay(d)?;
                // The delay topology copies the work queues' requeue bindings:
                // this handle must know them.
                broker.declare(&topology).await?;
            }
            replay(&dlq, &filter, to.as_deref(), limit, delay, dry_run).await
        }
        DlqCmd::Delete { ids, filter, yes } => delete(&dlq, &filter.into_lib(ids, full), yes).await,
        DlqCmd::Purge { yes } => purge(&broker, &dlq, yes).await,
    };
    // Let go of the DLQ before closing: every letter not acted on goes back.
    dlq.release().await;
    // Bounded: the command's work is done (every publish was confirmed).
    let _ = tokio::time::timeout(Duration::from_secs(10), broker.close()).await;
    res
}

fn read_error(dlq: &DeadLetters) -> String {
    format!("cannot read the DLQ '{}'", dlq.queue())
}

async fn list(
    dlq: &DeadLetters,
    filter: &helixmq::dlq::Filter,
    offset: usize,
    limit: usize,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let page = dlq
        .list(filter, Order::OldestFirst, offset, limit)
        .await
        .with_context(|| read_error(dlq))?;
    let shown: Vec<Entry> = page.letters.iter().map(|l| entry(l, false)).collect();
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
        "{} of {} matching ({} in {}) shown; nothing was removed",
        shown.len(),
        page.matching,
        page.held,
        dlq.queue()
    );
    Ok(ExitCode::SUCCESS)
}

async fn groups(
    dlq: &DeadLetters,
    filter: &helixmq::dlq::Filter,
    json: bool,
) -> anyhow::Result<ExitCode> {
    #[derive(Serialize)]
    struct G<'a> {
        group: &'a str,
        count: usize,
        example: &'a str,
        origins: &'a std::collections::BTreeMap<String, usize>,
    }
    let groups = dlq.groups(filter).await.with_context(|| read_error(dlq))?;
    if json {
        let v: Vec<G<'_>> = groups
            .iter()
            .map(|g| G {
                group: &g.key,
                count: g.count,
                example: &g.example,
                origins: &g.origins,
            })
            .collect();
        outln!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(ExitCode::SUCCESS);
    }
    for g in &groups {
        let origins: Vec<String> = g.origins.iter().map(|(q, n)| format!("{q} {n}")).collect();
        outln!(
            "{:>7}  {}  [{}]",
            g.count,
            head(&g.key.replace('\n', " "), 100),
            origins.join(", ")
        );
    }
    eprintln!(
        "{} group(s); `dlq list --group TEXT` shows one",
        groups.len()
    );
    Ok(ExitCode::SUCCESS)
}

async fn show(dlq: &DeadLetters, id: &str, json: bool) -> anyhow::Result<ExitCode> {
    let found = dlq.show(id).await.with_context(|| read_error(dlq))?;
    if found.is_empty() {
        bail!(
            "no message with id '{id}' in {} (see `helixmq dlq list`)",
            dlq.queue()
        );
    }
    let found: Vec<Entry> = found.iter().map(|l| entry(l, true)).collect();
    if json {
        outln!("{}", serde_json::to_string_pretty(&found)?);
        return Ok(ExitCode::SUCCESS);
    }
    let n = found.len();
    if n > 1 {
        outln!(
            "{n} copies of {id} in {} (one per queue that dead-lettered it: {})",
            dlq.queue(),
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

/// Show `progress` on a bar (on a terminal) while `work` runs.
async fn with_bar<T>(
    what: &str,
    progress: &Arc<Progress>,
    work: impl std::future::Future<Output = T>,
) -> T {
    let bar = progress_bar(0, what);
    let tick = async {
        loop {
            bar.set_length(progress.total() as u64);
            bar.set_position(progress.done() as u64);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let out = tokio::select! {
        out = work => out,
        _ = tick => unreachable!("the ticker never ends"),
    };
    bar.finish_and_clear();
    out
}

async fn replay(
    dlq: &DeadLetters,
    filter: &helixmq::dlq::Filter,
    to: Option<&str>,
    limit: Option<usize>,
    delay: Option<Duration>,
    dry_run: bool,
) -> anyhow::Result<ExitCode> {
    if dry_run {
        let page = dlq
            .list(filter, Order::OldestFirst, 0, limit.unwrap_or(usize::MAX))
            .await
            .with_context(|| read_error(dlq))?;
        for l in &page.letters {
            match to.map(str::to_string).or(l.origin_queue.clone()) {
                Some(t) => outln!("would replay {} -> {t}", l.id),
                None => outln!(
                    "would skip {}: no origin queue recorded (use --to QUEUE)",
                    l.id
                ),
            }
        }
        eprintln!(
            "dry run: {} message(s) would be replayed; nothing changed",
            page.letters.len()
        );
        return missing_ids(dlq, filter, &page.letters);
    }
    let target = to.map_or(Target::Origin, Target::Queue);
    let progress = Progress::new();
    let report = with_bar(
        "replaying",
        &progress,
        dlq.replay_after(filter, target, limit, delay, &progress),
    )
    .await
    .with_context(|| read_error(dlq))?;
    for (id, to) in &report.moved {
        outln!("replayed {id} -> {to}");
    }
    eprintln!(
        "{} replayed, {} failed, {} skipped{}",
        report.replayed,
        report.failed,
        report.skipped,
        if report.duplicated > 0 {
            format!(
                ", {} replayed but still in the DLQ (the connection went before the ack)",
                report.duplicated
            )
        } else {
            String::new()
        }
    );
    for e in &report.errors {
        eprintln!("  {e}");
    }
    let not = report.failed + report.duplicated + report.interrupted;
    if not > 0 {
        bail!(
            "{not} message(s) were not replayed: {}",
            report
                .errors
                .first()
                .map(String::as_str)
                .unwrap_or("see above")
        );
    }
    if report.replayed == 0 && !filter.ids.is_empty() {
        return missing_ids(dlq, filter, &[]);
    }
    Ok(ExitCode::SUCCESS)
}

/// An error naming the `--id`s that are not in the DLQ, if any.
fn missing_ids(
    dlq: &DeadLetters,
    filter: &helixmq::dlq::Filter,
    found: &[Arc<DeadLetter>],
) -> anyhow::Result<ExitCode> {
    let missing: Vec<String> = filter
        .ids
        .iter()
        .filter(|id| !found.iter().any(|l| &l.id == *id))
        .map(|id| format!("'{id}'"))
        .collect();
    if !missing.is_empty() {
        bail!(
            "no message with id {} in {} (see `helixmq dlq list`)",
            missing.join(", "),
            dlq.queue()
        );
    }
    Ok(ExitCode::SUCCESS)
}

async fn delete(
    dlq: &DeadLetters,
    filter: &helixmq::dlq::Filter,
    yes: bool,
) -> anyhow::Result<ExitCode> {
    if !yes {
        let page = dlq
            .list(filter, Order::OldestFirst, 0, 0)
            .await
            .with_context(|| read_error(dlq))?;
        bail!(
            "refusing to delete {} message(s) from {} without --yes (they would be lost for good)",
            page.matching,
            dlq.queue()
        );
    }
    let progress = Progress::new();
    let n = with_bar("deleting", &progress, dlq.delete(filter, None, &progress))
        .await
        .with_context(|| read_error(dlq))?;
    outln!("deleted {n} message(s) from {}", dlq.queue());
    Ok(ExitCode::SUCCESS)
}

async fn purge(broker: &helixmq::Broker, dlq: &DeadLetters, yes: bool) -> anyhow::Result<ExitCode> {
    if !yes {
        let ready = broker
            .backend()
            .queue_stats(dlq.queue())
            .await
            .with_context(|| read_error(dlq))?
            .messages;
        bail!(
            "refusing to purge {ready} message(s) from {} without --yes (they would be lost for good)",
            dlq.queue()
        );
    }
    let progress = Progress::new();
    let n = with_bar("purging", &progress, dlq.purge(&progress))
        .await
        .with_context(|| format!("cannot purge {}", dlq.queue()))?;
    outln!("purged {n} message(s) from {}", dlq.queue());
    Ok(ExitCode::SUCCESS)
}
