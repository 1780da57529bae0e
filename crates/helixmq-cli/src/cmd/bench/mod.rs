//! `helixmq bench`: helixmq measured beside its ceiling, raw lapin, in one run.
//!
//! Every RabbitMQ figure uses persistent messages to durable classic queues of
//! the same shape (declared through helixmq under a random prefix
//! `helixagent.bench-<hex>`, deleted at the end, also on error or Ctrl-C).
//! The machine is small and shared, so helixmq and raw lapin runs alternate
//! within each round (raw first in even rounds, helixmq first in odd ones) and
//! the median over rounds is compared: noise hits both alike.
//!
//! # Layout
//! - [`setup`]: connection settings, the bench topology, clean-up.
//! - [`publish`]: confirmed publishing — helixmq (concurrent `publish`,
//!   `publish_batch`), raw lapin with a confirm window, one confirm at a time.
//! - [`consume`]: consume-and-ack — a helixmq subscription vs raw `basic_consume`.
//! - [`latency`]: end-to-end latency at a fixed offered rate and at saturation.
//! - [`embedded`]: the in-process broker's publish-and-consume throughput.
//! - [`memory`]: resident memory (`/proc/self/status`) and the soak run.
//! - [`pipe`]: `worker --pipe` beside `worker --exec` with a no-op Python
//!   handler, embedded and on RabbitMQ (`--scenario pipe` runs only this).
//! - [`report`]: the JSON document, the printed summary, the targets.
//! - [`plot`]: the latency histogram SVG.
//! - [`outbox`]: `--outbox`, the PostgreSQL outbox relay's throughput and latency.
//! - [`dlq`]: `--dlq`, the DLQ reader and the console on 100,000 dead letters.
//! - [`request`]: `--request`, request-reply throughput (64 in flight) and
//!   latency at a fixed rate.

mod consume;
mod dlq;
mod embedded;
mod latency;
mod memory;
mod outbox;
mod pipe;
mod plot;
mod publish;
mod report;
mod request;
mod setup;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use indicatif::{ProgressBar, ProgressStyle};

use report::{Measured, Report, Rounds};
use setup::Bench;

/// Empty-to-full for a consume run: `queue` filled with N messages by helixmq's
/// publisher, then left [`SETTLE`] so every consume run starts alike.
async fn fill_settled(
    bench: &Bench,
    plan: &Plan,
    payload: &Bytes,
    queue: &str,
    tag: &str,
    name: &str,
) -> anyhow::Result<()> {
    let bar = progress(plan.messages, &format!("{tag} fill {name} queue"));
    publish::helix_concurrent(bench, plan, payload, queue, &bar).await?;
    tokio::time::sleep(SETTLE).await;
    Ok(())
}

/// Pause between filling a queue and draining it, so the broker has written
/// what it holds and each consume run starts from the same state.
const SETTLE: Duration = Duration::from_millis(500);

/// What `helixmq bench` measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    /// Every phase (the standard run).
    All,
    /// Only `worker --pipe` beside `worker --exec` (embedded and RabbitMQ).
    Pipe,
}

/// Options of `helixmq bench`.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// Print the results as JSON on stdout (the human summary then goes to stderr).
    #[arg(long)]
    pub json: bool,
    /// Messages per throughput run (publish, consume).
    #[arg(long, default_value_t = 20_000, value_parser = clap::value_parser!(u64).range(10..))]
    pub messages: u64,
    /// Payload size in bytes (at least 16: the latency runs stamp a send time in it).
    #[arg(long, default_value_t = 230, value_parser = clap::value_parser!(u64).range(16..=16_777_216))]
    pub size: u64,
    /// Publisher confirms kept in flight (helixmq and raw lapin alike).
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..=65_535))]
    pub window: u64,
    /// Consumer prefetch (`basic.qos`), helixmq and raw lapin alike.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u16).range(1..))]
    pub prefetch: u16,
    /// Write a latency histogram (SVG) to FILE.
    #[arg(long, value_name = "FILE")]
    pub plot: Option<PathBuf>,
    /// Rounds of alternating raw/helixmq runs; the median is reported.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=50))]
    pub rounds: u64,
    /// Offered rate (messages/s) of the fixed-rate latency run.
    #[arg(long, default_value_t = 1_000, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub rate: u64,
    /// Messages of each latency run. Default: min(messages, 5000).
    #[arg(long)]
    pub latency_messages: Option<u64>,
    /// Messages of the embedded broker run. Default: 10 × messages.
    #[arg(long)]
    pub embedded_messages: Option<u64>,
    /// Messages of the memory soak run (publish and consume at once through
    /// helixmq, VmRSS sampled ten times). Default: messages. Use 1000000 to
    /// show that resident memory stays flat.
    #[arg(long)]
    pub soak_messages: Option<u64>,
    /// Which phases to run.
    #[arg(long, value_enum, default_value_t = Scenario::All)]
    pub scenario: Scenario,
    /// Messages of each `worker --pipe` run. Default: messages.
    #[arg(long)]
    pub pipe_messages: Option<u64>,
    /// Messages of each `worker --exec` run (a process each). Default: messages / 40.
    #[arg(long)]
    pub exec_messages: Option<u64>,
    /// Handler processes at once for `--pipe` and `--exec` (the worker's --concurrency).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=1024))]
    pub pipe_concurrency: u64,
    /// The `--pipe` handler (`sh -c CMD`). Default: a no-op Python handler.
    #[arg(long, value_name = "CMD", default_value = pipe::NOOP_PIPE, hide_default_value = true)]
    pub pipe_cmd: String,
    /// The `--exec` handler (`sh -c CMD`). Default: a no-op Python program.
    #[arg(long, value_name = "CMD", default_value = pipe::NOOP_EXEC, hide_default_value = true)]
    pub exec_cmd: String,
    /// RabbitMQ to measure against. Needs configure/write/read on `helixagent\..*`.
    #[arg(
        long,
        env = "HELIXMQ_BENCH_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f",
        hide_env_values = true
    )]
    pub url: String,
    /// The outbox benchmark (`--outbox`).
    #[command(flatten)]
    pub outbox: outbox::OutboxBenchArgs,
    /// The DLQ benchmark (`--dlq`).
    #[command(flatten)]
    pub dlq: dlq::DlqBenchArgs,
    /// The request-reply benchmark (`--request`).
    #[command(flatten)]
    pub request: request::RequestBenchArgs,
}

/// The settings every phase shares, resolved from [`BenchArgs`].
#[derive(Debug, Clone)]
pub(crate) struct Plan {
    messages: u64,
    size: usize,
    window: usize,
    prefetch: u16,
    rounds: u64,
    rate: u64,
    one_at_a_time_messages: u64,
    latency_messages: u64,
    embedded_messages: u64,
    soak_messages: u64,
    pipe_messages: u64,
    exec_messages: u64,
    pipe_concurrency: usize,
    pipe_command: String,
    exec_command: String,
}

impl Plan {
    fn from_args(a: &BenchArgs) -> Plan {
        Plan {
            messages: a.messages,
            size: a.size as usize,
            window: a.window as usize,
            prefetch: a.prefetch,
            rounds: a.rounds,
            rate: a.rate,
            // The spec's pattern runs at about a tenth of the pipelined rate or less.
            one_at_a_time_messages: (a.messages / 10).max(10),
            latency_messages: a.latency_messages.unwrap_or(a.messages.min(5_000)).max(1),
            embedded_messages: a.embedded_messages.unwrap_or(a.messages * 10).max(1),
            soak_messages: a.soak_messages.unwrap_or(a.messages).max(10),
            pipe_messages: a.pipe_messages.unwrap_or(a.messages).max(1),
            exec_messages: a.exec_messages.unwrap_or(a.messages / 40).max(10),
            pipe_concurrency: a.pipe_concurrency as usize,
            pipe_command: a.pipe_cmd.clone(),
            exec_command: a.exec_cmd.clone(),
        }
    }

    /// The payload every run sends (the latency runs overwrite the first 8 bytes).
    fn payload(&self) -> Bytes {
        Bytes::from(vec![b'x'; self.size])
    }
}

/// Run the benchmark and print (or write as JSON) the results.
pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    let plan = Plan::from_args(&args);
    if args.plot.is_some() && args.scenario != Scenario::All {
        anyhow::bail!("--plot draws the latency runs, which only --scenario all measures");
    }
    if let Some(path) = &args.plot {
        // Fail before minutes of measuring, not after.
        let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
        if let Some(dir) = dir.filter(|d| !d.is_dir()) {
            anyhow::bail!(
                "--plot {}: directory {} does not exist; create it or choose another path",
                path.display(),
                dir.display()
            );
        }
    }
    let bench = Bench::connect(&args.url)
        .await
        .context("cannot start the benchmark")?;
    eprintln!(
        "helixmq bench: {} against {} (queues under '{}')",
        describe(&plan),
        bench.config.rabbitmq.redacted_url(),
        bench.prefix
    );
    if args.outbox.outbox {
        let res = outbox::run(&bench, &args.outbox, args.rate, args.json).await;
        let cleaned = bench.cleanup().await;
        res?;
        return cleaned;
    }
    if args.dlq.dlq {
        let res = dlq::run(&bench, &args.dlq, args.rounds, args.json).await;
        let cleaned = bench.cleanup().await;
        res?;
        return cleaned;
    }
    if args.request.request {
        let res = request::run(&bench, &args.request, plan.size, args.rounds, args.json).await;
        let cleaned = bench.cleanup().await;
        res?;
        return cleaned;
    }
    let load_before = report::load_average();
    let body = async {
        match args.scenario {
            Scenario::All => measure(&bench, &plan).await.map(Done::All),
            Scenario::Pipe => pipe::run(&bench, &plan, &plan.payload())
                .await
                .map(Done::Pipe),
        }
    };
    let outcome = tokio::select! {
        r = body => r,
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
    };
    let load = [load_before, report::load_average()];
    // Always remove what we declared, whatever happened above.
    let cleaned = bench.cleanup().await;
    let done = outcome?;
    cleaned.context("the benchmark finished but its queues could not all be deleted")?;

    // Results first, so that a plot that cannot be written loses nothing.
    let (text, json, full) = match done {
        Done::All(pipe_run) => {
            let r = Report::build(&plan, &bench, *pipe_run, load).await;
            (r.summary(), serde_json::to_string_pretty(&r)?, Some(r))
        }
        Done::Pipe(p) => {
            let r = report::PipeOnly::build(&plan, &bench, p, load).await;
            (r.summary(), serde_json::to_string_pretty(&r)?, None)
        }
    };
    if args.json {
        eprint!("{text}");
        println!("{json}");
    } else {
        print!("{text}");
    }
    let Some(report) = full else {
        return Ok(());
    };
    if let Some(path) = &args.plot {
        plot::latency_svg(path, &report)
            .with_context(|| format!("cannot write the plot to {}", path.display()))?;
        eprintln!("latency histogram written to {}", path.display());
    }
    Ok(())
}

/// What a scenario measured, before the report is built.
enum Done {
    All(Box<Measured>),
    Pipe(pipe::PipeReport),
}

fn describe(p: &Plan) -> String {
    format!(
        "{} messages of {} bytes, window {}, prefetch {}, {} round(s)",
        p.messages, p.size, p.window, p.prefetch, p.rounds
    )
}

/// Every phase in turn; raw and helixmq alternate inside each round.
async fn measure(bench: &Bench, plan: &Plan) -> anyhow::Result<Box<Measured>> {
    let mut rss = memory::MemoryReport::default();
    let payload = plan.payload();
    let mut publish = Rounds::default();
    let mut batch = Vec::new();
    let mut stream = Vec::new();
    let mut raw_4ch = Vec::new();
    let mut raw_props = Vec::new();
    let mut consume = Rounds::default();

    for round in 0..plan.rounds {
        let tag = format!("round {}/{}", round + 1, plan.rounds);
        let raw_first = round % 2 == 0;
        // Publish: q_raw and q_helix each end up holding `messages` messages.
        for raw in order(raw_first) {
            if raw {
                let bar = progress(plan.messages, &format!("{tag} publish raw lapin"));
                let r = publish::raw_lapin(bench, plan, &payload, &bench.q_raw, &bar).await?;
                publish.raw.push(r);
            } else {
                let bar = progress(plan.messages, &format!("{tag} publish helixmq"));
                let r =
                    publish::helix_concurrent(bench, plan, &payload, &bench.q_helix, &bar).await?;
                publish.helix.push(r);
            }
            memory::note(
                &mut rss,
                &format!("{tag} publish {}", if raw { "raw" } else { "helixmq" }),
            );
        }
        let bar = progress(plan.messages, &format!("{tag} publish_batch helixmq"));
        batch.push(publish::helix_batch(bench, plan, &payload, &bench.q_scratch, &bar).await?);
        bench.purge(&bench.q_scratch).await?;
        // Diagnostics: raw lapin with one helixmq trait at a time.
        for (shape, into) in [
            (
                publish::RawShape {
                    channels: 4,
                    helix_properties: false,
                },
                &mut raw_4ch,
            ),
            (
                publish::RawShape {
                    channels: 1,
                    helix_properties: true,
                },
                &mut raw_props,
            ),
        ] {
            let bar = progress(plan.messages, &format!("{tag} publish raw {shape:?}"));
            into.push(
                publish::raw_lapin_with(bench, plan, &payload, &bench.q_scratch, &bar, shape)
                    .await?,
            );
            bench.purge(&bench.q_scratch).await?;
        }
        // Consume: before each run its queue is emptied, filled afresh by the
        // same helixmq publisher with the same messages, and left to settle, so
        // both sides drain queues in the same state. (Draining whatever each
        // side's publish run had left made the figure depend on how the broker
        // held those messages: single runs varied 2× either way.)
        bench.purge(&bench.q_raw).await?;
        bench.purge(&bench.q_helix).await?;
        let fill = |queue, name| fill_settled(bench, plan, &payload, queue, &tag, name);
        // Diagnostic: the backend stream alone.
        fill(&bench.q_scratch, "scratch").await?;
        let bar = progress(
            plan.messages,
            &format!("{tag} consume helixmq backend stream"),
        );
        stream.push(consume::helix_backend_stream(bench, plan, &bench.q_scratch, &bar).await?);
        for raw in order(!raw_first) {
            if raw {
                fill(&bench.q_raw, "raw").await?;
                let bar = progress(plan.messages, &format!("{tag} consume raw lapin"));
                consume
                    .raw
                    .push(consume::raw_lapin(bench, plan, &bench.q_raw, &bar).await?);
            } else {
                fill(&bench.q_helix, "helixmq").await?;
                let bar = progress(plan.messages, &format!("{tag} consume helixmq"));
                consume
                    .helix
                    .push(consume::helix(bench, plan, &bench.q_helix, &bar).await?);
            }
            memory::note(
                &mut rss,
                &format!("{tag} consume {}", if raw { "raw" } else { "helixmq" }),
            );
        }
    }

    let bar = progress(
        plan.one_at_a_time_messages,
        "publish one confirm at a time (helixmq)",
    );
    let one = publish::helix_one_at_a_time(bench, plan, &payload, &bench.q_scratch, &bar).await?;
    bench.purge(&bench.q_scratch).await?;

    let bar = progress(plan.latency_messages, "latency at a fixed rate");
    let fixed = latency::fixed_rate(bench, plan, &bar).await?;
    let bar = progress(plan.latency_messages, "latency at saturation");
    let saturated = latency::saturation(bench, plan, &bar).await?;
    memory::note(&mut rss, "latency");

    let bar = progress(plan.embedded_messages, "embedded broker");
    let embedded = embedded::run(plan, &payload, &bar).await?;
    memory::note(&mut rss, "embedded");

    let bar = progress(
        plan.soak_messages,
        "memory soak (helixmq publish + consume)",
    );
    let soak = memory::soak(bench, plan, &payload, &bar).await?;

    let pipe = pipe::run(bench, plan, &payload).await?;

    rss.soak = Some(soak);
    let measured = Measured {
        publish,
        batch,
        one_at_a_time: one,
        consume,
        stream,
        raw_4ch,
        raw_props,
        latency: report::LatencyReport {
            fixed_rate: fixed,
            saturation: saturated,
        },
        embedded,
        memory: rss,
        pipe,
    };
    Ok(Box::new(measured))
}

/// `[raw, helixmq]` or `[helixmq, raw]`.
fn order(raw_first: bool) -> [bool; 2] {
    if raw_first {
        [true, false]
    } else {
        [false, true]
    }
}

/// A progress bar on stderr (hidden when stderr is not a terminal).
fn progress(len: u64, what: &str) -> ProgressBar {
    let b = ProgressBar::new(len);
    b.set_style(
        ProgressStyle::with_template("{msg:40} [{bar:30}] {pos}/{len} {per_sec}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    b.set_message(what.to_string());
    b.enable_steady_tick(Duration::from_millis(200));
    b
}
