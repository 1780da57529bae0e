//! `helixmq bench --dlq`: the DLQ reader and the console on a full DLQ.
//!
//! Fills the bench's DLQ (`{prefix}.dlq`, max length 100,000) with
//! `--dlq-letters` dead letters of 20 failure groups and ~500-byte JSON
//! payloads, then times, each `--rounds` times (the median is reported):
//! the first read (the reader takes hold of every letter), a first page, the
//! last page, a reason filter, a payload search, the grouping, one message by
//! id — through the library — and the console's workbench page over HTTP
//! (an in-process `helixmq::console` router on 127.0.0.1, reqwest as the
//! browser). Pages are answered from the reader's memory, so they should stay
//! far under the 1 s target whatever the DLQ's depth.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use helixmq::dlq::{DeadLetters, Filter, Order};
use helixmq::message::header;
use helixmq::{Message, PublishOptions, Topology};
use serde::Serialize;

use super::setup::Bench;

/// Options of the DLQ benchmark.
#[derive(Debug, Clone, clap::Args)]
pub struct DlqBenchArgs {
    /// Run the DLQ benchmark instead of the others: read, page, filter, group a
    /// full DLQ, through the library and the console.
    #[arg(long)]
    pub dlq: bool,
    /// Dead letters to fill the DLQ with (its max length is 100,000).
    #[arg(long, default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub dlq_letters: u64,
}

/// One timed operation: the median and the worst of its rounds.
#[derive(Debug, Serialize)]
struct Timed {
    what: &'static str,
    median_ms: f64,
    max_ms: f64,
    /// What it returned (matching letters, groups, …), to show it did the work.
    result: usize,
}

#[derive(Debug, Serialize)]
struct DlqReport {
    letters: u64,
    fill_per_sec: f64,
    rounds: u64,
    timings: Vec<Timed>,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Run the DLQ benchmark.
pub(crate) async fn run(
    bench: &Bench,
    args: &DlqBenchArgs,
    rounds: u64,
    json: bool,
) -> anyhow::Result<()> {
    let b = &bench.broker;
    b.declare(&Topology::system(b.names())).await?;
    let n = args.dlq_letters as usize;
    let filled = Instant::now();
    fill(bench, n).await?;
    let fill_per_sec = n as f64 / filled.elapsed().as_secs_f64();
    eprintln!(
        "dlq bench: {n} dead letters in {} ({fill_per_sec:.0}/s)",
        b.names().dlq()
    );

    // The console lets go of the DLQ 1 s after its last page, so the next
    // round's library reader does not wait out the default 30 s.
    let app = helixmq::console::router(
        b,
        helixmq::console::ConsoleOptions {
            read: helixmq::dlq::ReadOptions {
                idle_release: Duration::from_secs(1),
                ..Default::default()
            },
            ..Default::default()
        },
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    let http = reqwest::Client::new();

    let mut samples: Vec<(&'static str, Vec<Duration>, usize)> = Vec::new();
    let mut record = |what: &'static str, d: Duration, result: usize| match samples
        .iter_mut()
        .find(|s| s.0 == what)
    {
        Some(s) => {
            s.1.push(d);
            s.2 = result;
        }
        None => samples.push((what, vec![d], result)),
    };
    let reason = Filter {
        reason: Some("rate limited".into()),
        ..Filter::all()
    };
    let search = Filter {
        search: Some("\"tenant\":\"acme-7\"".into()),
        ..Filter::all()
    };
    for _ in 0..rounds {
        // Each round: let the console's hold go (idle 1 s) before the library reads.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let dlq = DeadLetters::new(b);
        let t = Instant::now();
        let page = dlq.list(&Filter::all(), Order::NewestFirst, 0, 50).await?;
        record(
            "first read (hold every letter) + page 1",
            t.elapsed(),
            page.held,
        );
        anyhow::ensure!(page.held == n, "read {} of {n} letters", page.held);
        let t = Instant::now();
        let p = dlq.list(&Filter::all(), Order::NewestFirst, 0, 50).await?;
        record("page 1 of 50", t.elapsed(), p.letters.len());
        let t = Instant::now();
        let p = dlq
            .list(&Filter::all(), Order::NewestFirst, n.saturating_sub(50), 50)
            .await?;
        record("last page", t.elapsed(), p.letters.len());
        let t = Instant::now();
        let p = dlq.list(&reason, Order::NewestFirst, 0, 50).await?;
        record("filter by reason text", t.elapsed(), p.matching);
        let t = Instant::now();
        let p = dlq.list(&search, Order::NewestFirst, 0, 50).await?;
        record("search the payloads", t.elapsed(), p.matching);
        let t = Instant::now();
        let g = dlq.groups(&Filter::all()).await?;
        record("group by reason", t.elapsed(), g.len());
        let id = p.letters.first().map(|l| l.id.clone()).unwrap_or_default();
        let t = Instant::now();
        let s = dlq.show(&id).await?;
        record("one message by id", t.elapsed(), s.len());
        dlq.release().await;

        // The console's page: its own reader (first request reads), then pages.
        let get = |q: &'static str| {
            let http = http.clone();
            async move {
                let r = http.get(format!("http://{addr}/dlq{q}")).send().await?;
                anyhow::ensure!(r.status().is_success(), "console answered {}", r.status());
                Ok::<usize, anyhow::Error>(r.text().await?.len())
            }
        };
        let t = Instant::now();
        let bytes = get("").await?;
        record(
            "console: first workbench page (reads the DLQ)",
            t.elapsed(),
            bytes,
        );
        let t = Instant::now();
        let bytes = get("?page=1000").await?;
        record("console: workbench page 1000", t.elapsed(), bytes);
        let t = Instant::now();
        let bytes = get("?reason=rate+limited&search=acme-7").await?;
        record(
            "console: reason filter + payload search",
            t.elapsed(),
            bytes,
        );
        let t = Instant::now();
        let bytes = get("?group=provider+rate+limited+%28key+%23%29%2C+retry+after+%23s").await?;
        record("console: one group", t.elapsed(), bytes);
    }
    server.abort();

    let timings: Vec<Timed> = samples
        .into_iter()
        .map(|(what, mut ds, result)| {
            ds.sort();
            Timed {
                what,
                median_ms: ms(ds[ds.len() / 2]),
                max_ms: ms(*ds.last().expect("a round")),
                result,
            }
        })
        .collect();
    let report = DlqReport {
        letters: args.dlq_letters,
        fill_per_sec,
        rounds,
        timings,
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    }
    let out = |s: String| {
        if json {
            eprintln!("{s}")
        } else {
            println!("{s}")
        }
    };
    out(format!(
        "DLQ of {} letters, {} round(s): median (max) ms",
        report.letters, rounds
    ));
    for t in &report.timings {
        out(format!(
            "  {:<48} {:>9.1} ({:>9.1})   -> {}",
            t.what, t.median_ms, t.max_ms, t.result
        ));
    }
    let _ = b.backend().purge(&b.names().dlq()).await;
    Ok(())
}

/// `n` dead letters of 20 failure groups, published confirmed in batches.
async fn fill(bench: &Bench, n: usize) -> anyhow::Result<()> {
    const REASONS: [&str; 20] = [
        "provider rate limited (key 3), retry after 20s",
        "provider timeout after 30s",
        "invalid input: missing field `user` at line 1 column 40",
        "context length exceeded: 131072 tokens",
        "upstream 502 from verifier-7",
        "handler panicked: index out of bounds: the len is 3 but the index is 5",
        "webhook https://hooks.example.com/h/12 answered 410 Gone",
        "debate round 4 has no participants",
        "tenant 42 suspended",
        "schema version 3 not supported (max 2)",
        "connection reset by peer (os error 104)",
        "token budget exhausted for key 9",
        "model gpt-4o-2024-08-06 not available in region 2",
        "payload too large: 2048 KiB > 1024 KiB",
        "duplicate submission 881",
        "verification failed: 3 of 5 checks",
        "deadline exceeded after 120s",
        "notification channel 77 closed",
        "unknown task type v2.summarise",
        "permission denied for project 1201",
    ];
    let b = &bench.broker;
    let dlx = b.names().dead_letter_exchange();
    let origin = b.names().task_queue("llm");
    let pad = "x".repeat(380);
    let mut batch = Vec::with_capacity(1000);
    for i in 0..n {
        let payload = format!(
            r#"{{"tenant":"acme-{}","model":"gpt-4o","prompt":"request {i}","pad":"{pad}"}}"#,
            i % 50
        );
        batch.push(
            Message::new(payload)
                .with_kind("llm.request")
                .with_header(header::ORIGIN_QUEUE, origin.as_str())
                .with_header(header::DEAD_LETTER_REASON, REASONS[i % REASONS.len()])
                .with_header(header::LAST_FAILURE, helixmq::message::now_unix_millis()),
        );
        if batch.len() == 1000 || i + 1 == n {
            for r in b
                .publish_batch(&dlx, "x", &batch, &PublishOptions::default())
                .await
            {
                r.context("filling the DLQ")?;
            }
            batch.clear();
        }
    }
    Ok(())
}
