//! The results: one JSON document (`--json`), a printed summary, and the
//! issue's targets checked against the figures.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use indicatif::ProgressBar;
use serde::Serialize;

use super::embedded::EmbeddedReport;
use super::latency::LatencyRun;
use super::memory::{status_kib, MemoryReport};
use super::pipe::PipeReport;
use super::setup::Bench;
use super::Plan;

/// One throughput run.
#[derive(Debug, Clone, Copy, Serialize)]
pub(crate) struct Run {
    pub messages: u64,
    pub seconds: f64,
    pub per_sec: f64,
    /// CPU time (user + system, all threads of this process) per message,
    /// microseconds. The broker shares the two cores, so every client
    /// microsecond is taken from RabbitMQ: this is the noise-resistant figure.
    pub cpu_us_per_msg: f64,
}

/// When a run started, on the wall clock and in process CPU time.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Start {
    at: Instant,
    cpu: f64,
}

impl Start {
    pub(crate) fn now() -> Start {
        Start {
            at: Instant::now(),
            cpu: cpu_seconds(),
        }
    }
}

/// User + system CPU seconds of this process (`/proc/self/stat`, Linux; 0 elsewhere).
fn cpu_seconds() -> f64 {
    let Ok(s) = std::fs::read_to_string("/proc/self/stat") else {
        return 0.0;
    };
    // Fields after the command name (which may hold spaces) start at ") ".
    let Some(rest) = s.rsplit_once(") ").map(|(_, r)| r) else {
        return 0.0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    let ticks: f64 = f.get(11..13).map_or(0.0, |t| {
        t.iter().filter_map(|x| x.parse::<f64>().ok()).sum()
    });
    // CLK_TCK is 100 on every Linux this runs on.
    ticks / 100.0
}

impl Run {
    /// `messages` done since `started`; clears the progress bar.
    pub(crate) fn finished(messages: u64, started: Start, bar: &ProgressBar) -> Run {
        let seconds = started.at.elapsed().as_secs_f64().max(1e-9);
        let cpu = (cpu_seconds() - started.cpu).max(0.0);
        bar.finish_and_clear();
        Run {
            messages,
            seconds,
            per_sec: messages as f64 / seconds,
            cpu_us_per_msg: cpu * 1e6 / messages.max(1) as f64,
        }
    }
}

/// The runs of one side over all rounds.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Stat {
    /// Median messages/s over the rounds (what the ratios use).
    pub median_per_sec: f64,
    /// Best messages/s.
    pub best_per_sec: f64,
    /// Median CPU microseconds per message of this process.
    pub median_cpu_us_per_msg: f64,
    pub runs: Vec<Run>,
}

impl Stat {
    fn of(runs: Vec<Run>) -> Stat {
        let mut r: Vec<f64> = runs.iter().map(|r| r.per_sec).collect();
        r.sort_by(f64::total_cmp);
        let median = match r.len() {
            0 => 0.0,
            n if n % 2 == 1 => r[n / 2],
            n => (r[n / 2 - 1] + r[n / 2]) / 2.0,
        };
        let mut c: Vec<f64> = runs.iter().map(|r| r.cpu_us_per_msg).collect();
        c.sort_by(f64::total_cmp);
        Stat {
            median_cpu_us_per_msg: c.get(c.len() / 2).copied().unwrap_or(0.0),
            median_per_sec: median,
            best_per_sec: r.last().copied().unwrap_or(0.0),
            runs,
        }
    }
}

/// helixmq and raw runs collected round by round.
#[derive(Debug, Default)]
pub(crate) struct Rounds {
    pub helix: Vec<Run>,
    pub raw: Vec<Run>,
}

/// Confirmed publishing.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct PublishReport {
    /// `Broker::publish` from `window` concurrent tasks.
    pub helixmq: Stat,
    /// `Broker::publish_batch`, two tasks with batches of `window / 2`.
    pub helixmq_batch: Stat,
    /// Raw lapin, one channel, `window` confirms in flight.
    pub raw_lapin: Stat,
    /// helixmq median / raw lapin median.
    pub ratio: f64,
    /// helixmq publish_batch median / raw lapin median.
    pub batch_ratio: f64,
    /// The spec's pattern: one confirm awaited before the next publish (helixmq).
    pub one_at_a_time: Run,
    /// helixmq median / one-at-a-time.
    pub speedup_over_one_at_a_time: f64,
    /// Diagnostic: raw lapin over 4 confirm channels used round robin, like
    /// helixmq's publisher pool.
    pub raw_lapin_4_channels: Stat,
    /// Diagnostic: raw lapin, one channel, with helixmq's properties (message
    /// id, timestamp, attempt header).
    pub raw_lapin_helixmq_properties: Stat,
}

/// Consume-and-ack.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct ConsumeReport {
    /// A helixmq subscription whose handler answers Ack.
    pub helixmq: Stat,
    /// Raw lapin `basic_consume`, one ack per delivery.
    pub raw_lapin: Stat,
    /// helixmq median / raw lapin median.
    pub ratio: f64,
    /// Diagnostic: helixmq's backend delivery stream + ack in one loop, no
    /// subscription layer (messages published by raw lapin).
    pub helixmq_backend_stream: Stat,
    /// Backend stream median / raw lapin median.
    pub backend_stream_ratio: f64,
}

/// The two latency runs.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct LatencyReport {
    pub fixed_rate: LatencyRun,
    pub saturation: LatencyRun,
}

/// What was measured with what.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Settings {
    pub messages: u64,
    pub size: usize,
    pub window: usize,
    pub prefetch: u16,
    pub rounds: u64,
    pub rate: u64,
    pub one_at_a_time_messages: u64,
    pub latency_messages: u64,
    pub embedded_messages: u64,
    pub soak_messages: u64,
    pub pipe_messages: u64,
    pub exec_messages: u64,
    pub pipe_concurrency: usize,
}

impl Settings {
    fn of(plan: &Plan) -> Settings {
        Settings {
            messages: plan.messages,
            size: plan.size,
            window: plan.window,
            prefetch: plan.prefetch,
            rounds: plan.rounds,
            rate: plan.rate,
            one_at_a_time_messages: plan.one_at_a_time_messages,
            latency_messages: plan.latency_messages,
            embedded_messages: plan.embedded_messages,
            soak_messages: plan.soak_messages,
            pipe_messages: plan.pipe_messages,
            exec_messages: plan.exec_messages,
            pipe_concurrency: plan.pipe_concurrency,
        }
    }
}

/// Where it ran.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Machine {
    pub nproc: usize,
    /// From the management API when it is enabled, else `null`.
    pub rabbitmq_version: Option<String>,
    /// The broker URL, password redacted.
    pub broker: String,
    pub helixmq_version: &'static str,
    /// `/proc/loadavg` (1, 5, 15 minutes) when the run started and when it
    /// ended: the machine is shared, figures taken under load are lower.
    pub load_average: [[f64; 3]; 2],
}

impl Machine {
    async fn of(bench: &Bench, load_average: [[f64; 3]; 2]) -> Machine {
        Machine {
            nproc: std::thread::available_parallelism().map_or(0, |n| n.get()),
            rabbitmq_version: rabbitmq_version(bench).await,
            broker: bench.config.rabbitmq.redacted_url(),
            helixmq_version: env!("CARGO_PKG_VERSION"),
            load_average,
        }
    }
}

/// The 1, 5 and 15-minute load averages (`/proc/loadavg`, Linux; zeros elsewhere).
pub(crate) fn load_average() -> [f64; 3] {
    let text = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let mut v = text.split_whitespace().map(|x| x.parse().unwrap_or(0.0));
    [(); 3].map(|_| v.next().unwrap_or(0.0))
}

/// One of the targets.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Target {
    pub name: &'static str,
    pub target: String,
    pub value: String,
    pub met: bool,
}

/// Everything `helixmq bench` measured.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Report {
    pub settings: Settings,
    pub machine: Machine,
    pub publish: PublishReport,
    pub consume: ConsumeReport,
    pub latency: LatencyReport,
    pub embedded: EmbeddedReport,
    pub memory: MemoryReport,
    pub pipe: PipeReport,
    pub targets: Vec<Target>,
}

/// The measurements, as `measure` collected them.
pub(crate) struct Measured {
    pub publish: Rounds,
    pub batch: Vec<Run>,
    pub one_at_a_time: Run,
    pub consume: Rounds,
    pub stream: Vec<Run>,
    pub raw_4ch: Vec<Run>,
    pub raw_props: Vec<Run>,
    pub latency: LatencyReport,
    pub embedded: EmbeddedReport,
    pub memory: MemoryReport,
    pub pipe: PipeReport,
}

fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 {
        a / b
    } else {
        0.0
    }
}

impl Report {
    pub(crate) async fn build(
        plan: &Plan,
        bench: &Bench,
        m: Measured,
        load_average: [[f64; 3]; 2],
    ) -> Report {
        let helixmq = Stat::of(m.publish.helix);
        let raw = Stat::of(m.publish.raw);
        let batch = Stat::of(m.batch);
        let publish = PublishReport {
            ratio: ratio(helixmq.median_per_sec, raw.median_per_sec),
            batch_ratio: ratio(batch.median_per_sec, raw.median_per_sec),
            speedup_over_one_at_a_time: ratio(helixmq.median_per_sec, m.one_at_a_time.per_sec),
            one_at_a_time: m.one_at_a_time,
            raw_lapin_4_channels: Stat::of(m.raw_4ch),
            raw_lapin_helixmq_properties: Stat::of(m.raw_props),
            helixmq,
            helixmq_batch: batch,
            raw_lapin: raw,
        };
        let (ch, cr) = (Stat::of(m.consume.helix), Stat::of(m.consume.raw));
        let hs = Stat::of(m.stream);
        let consume = ConsumeReport {
            ratio: ratio(ch.median_per_sec, cr.median_per_sec),
            backend_stream_ratio: ratio(hs.median_per_sec, cr.median_per_sec),
            helixmq_backend_stream: hs,
            helixmq: ch,
            raw_lapin: cr,
        };
        let mut memory = m.memory;
        memory.peak_rss_kib = status_kib("VmHWM");
        let mut r = Report {
            settings: Settings::of(plan),
            machine: Machine::of(bench, load_average).await,
            publish,
            consume,
            latency: m.latency,
            embedded: m.embedded,
            memory,
            pipe: m.pipe,
            targets: Vec::new(),
        };
        r.targets = r.check_targets();
        r
    }

    fn check_targets(&self) -> Vec<Target> {
        let p = &self.publish;
        let l = &self.latency.fixed_rate;
        let soak = self.memory.soak.as_ref();
        vec![
            Target {
                name: "publish_vs_raw",
                target: "≥ 0.90 × raw lapin".into(),
                value: format!("{:.2}", p.ratio),
                met: p.ratio >= 0.9,
            },
            Target {
                name: "consume_vs_raw",
                target: "≥ 0.90 × raw lapin".into(),
                value: format!("{:.2}", self.consume.ratio),
                met: self.consume.ratio >= 0.9,
            },
            Target {
                name: "publish_vs_one_at_a_time",
                target: "≥ 10 × one confirm at a time".into(),
                value: format!("{:.1}", p.speedup_over_one_at_a_time),
                met: p.speedup_over_one_at_a_time >= 10.0,
            },
            Target {
                name: "p99_at_fixed_rate",
                target: format!(
                    "p99 ≤ 10 ms at {} msg/s",
                    l.offered_per_sec.unwrap_or_default()
                ),
                value: format!("{:.2} ms", l.p99_ms),
                met: l.p99_ms <= 10.0,
            },
            Target {
                name: "rss_flat",
                target: "VmRSS flat over the soak (growth ≤ max(8 MiB, 10 %))".into(),
                value: soak.map_or("not run".into(), |s| {
                    format!("{:+} KiB over {} messages", s.growth_kib, s.messages)
                }),
                met: soak.is_some_and(|s| s.flat),
            },
            Target {
                name: "embedded_throughput",
                target: "≥ 500,000 msg/s published and consumed".into(),
                value: format!("{:.0} msg/s", self.embedded.publish_and_consume_per_sec),
                met: self.embedded.publish_and_consume_per_sec >= 500_000.0,
            },
            pipe_target(&self.pipe),
        ]
    }

    /// The human summary.
    pub(crate) fn summary(&self) -> String {
        let mut s = String::new();
        let p = &self.publish;
        let c = &self.consume;
        let st = |x: &Stat| {
            format!(
                "{:>9.0} msg/s (median of {}, best {:.0}; client CPU {:.1} µs/msg)",
                x.median_per_sec,
                x.runs.len(),
                x.best_per_sec,
                x.median_cpu_us_per_msg
            )
        };
        let _ = writeln!(
            s,
            "\nhelixmq bench — {} messages × {} B, window {}, prefetch {}, {}",
            self.settings.messages,
            self.settings.size,
            self.settings.window,
            self.settings.prefetch,
            machine_line(&self.machine)
        );
        let _ = writeln!(s, "confirmed publish");
        let _ = writeln!(s, "  raw lapin             {}", st(&p.raw_lapin));
        let _ = writeln!(
            s,
            "  helixmq publish       {}  ratio {:.2}",
            st(&p.helixmq),
            p.ratio
        );
        let _ = writeln!(
            s,
            "  helixmq publish_batch {}  ratio {:.2}",
            st(&p.helixmq_batch),
            p.batch_ratio
        );
        let _ = writeln!(
            s,
            "  one confirm at a time {:>9.0} msg/s  (helixmq publish is {:.1}×)",
            p.one_at_a_time.per_sec, p.speedup_over_one_at_a_time
        );
        let _ = writeln!(
            s,
            "  (diagnostic) raw, 4 channels      {}",
            st(&p.raw_lapin_4_channels)
        );
        let _ = writeln!(
            s,
            "  (diagnostic) raw, helixmq props   {}",
            st(&p.raw_lapin_helixmq_properties)
        );
        let _ = writeln!(s, "consume and ack");
        let _ = writeln!(s, "  raw lapin             {}", st(&c.raw_lapin));
        let _ = writeln!(
            s,
            "  helixmq subscription  {}  ratio {:.2}",
            st(&c.helixmq),
            c.ratio
        );
        let _ = writeln!(
            s,
            "  (diagnostic) backend stream {}  ratio {:.2}",
            st(&c.helixmq_backend_stream),
            c.backend_stream_ratio
        );
        let _ = writeln!(s, "end-to-end latency (publish due → handler)");
        for (name, l) in [
            ("fixed rate", &self.latency.fixed_rate),
            ("saturation", &self.latency.saturation),
        ] {
            let offered = l
                .offered_per_sec
                .map_or("max".to_string(), |o| format!("{o:.0}/s"));
            let _ = writeln!(
                s,
                "  {name:<11} offered {offered:>7}, achieved {:>7.0}/s: p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, max {:.2} ms (confirm p50 {:.2}, p99 {:.2} ms)",
                l.achieved_per_sec, l.p50_ms, l.p99_ms, l.p999_ms, l.max_ms, l.confirm_p50_ms, l.confirm_p99_ms
            );
        }
        let e = &self.embedded;
        let _ = writeln!(
            s,
            "embedded broker ({} messages): publish+consume {:.0} msg/s (median of {}: {}), publish only {:.0}, consume only {:.0}",
            e.messages,
            e.publish_and_consume_per_sec,
            e.publish_and_consume_runs.len(),
            e.publish_and_consume_runs
                .iter()
                .map(|r| format!("{r:.0}"))
                .collect::<Vec<_>>()
                .join(", "),
            e.publish_only_per_sec,
            e.consume_only_per_sec
        );
        let _ = write!(s, "memory: peak RSS {} KiB", self.memory.peak_rss_kib);
        if let Some(k) = &self.memory.soak {
            let samples: Vec<String> = k
                .samples
                .iter()
                .map(|x| format!("{}", x.rss_kib / 1024))
                .collect();
            let _ = write!(
                s,
                "; soak {} messages at {:.0} msg/s, VmRSS MiB [{}], growth {:+} KiB",
                k.messages,
                k.per_sec,
                samples.join(" "),
                k.growth_kib
            );
        }
        let _ = writeln!(s);
        pipe_summary(&mut s, &self.pipe);
        let _ = writeln!(s, "targets");
        for t in &self.targets {
            let _ = writeln!(
                s,
                "  [{}] {:<25} {:<45} {}",
                if t.met { "met " } else { "MISS" },
                t.name,
                t.target,
                t.value
            );
        }
        s
    }
}

/// `--scenario pipe`: the pipe-versus-exec figures alone.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct PipeOnly {
    pub settings: Settings,
    pub machine: Machine,
    pub pipe: PipeReport,
    pub targets: Vec<Target>,
}

impl PipeOnly {
    pub(crate) async fn build(
        plan: &Plan,
        bench: &Bench,
        pipe: PipeReport,
        load_average: [[f64; 3]; 2],
    ) -> PipeOnly {
        PipeOnly {
            settings: Settings::of(plan),
            machine: Machine::of(bench, load_average).await,
            targets: vec![pipe_target(&pipe)],
            pipe,
        }
    }

    /// The human summary.
    pub(crate) fn summary(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "\nhelixmq bench --scenario pipe — {} B payloads, {}",
            self.settings.size,
            machine_line(&self.machine)
        );
        pipe_summary(&mut s, &self.pipe);
        for t in &self.targets {
            let _ = writeln!(
                s,
                "  [{}] {:<25} {:<45} {}",
                if t.met { "met " } else { "MISS" },
                t.name,
                t.target,
                t.value
            );
        }
        s
    }
}

fn machine_line(m: &Machine) -> String {
    let [start, end] = m.load_average;
    format!(
        "{} CPUs, RabbitMQ {}, load average {:.2} {:.2} {:.2} at the start, {:.2} {:.2} {:.2} at the end",
        m.nproc,
        m.rabbitmq_version.as_deref().unwrap_or("?"),
        start[0],
        start[1],
        start[2],
        end[0],
        end[1],
        end[2]
    )
}

/// Issue 13: a pipe worker with a no-op Python handler, on RabbitMQ.
fn pipe_target(p: &PipeReport) -> Target {
    let per_sec = p.rabbitmq.pipe.per_sec;
    Target {
        name: "pipe_python_noop",
        target: "≥ 5,000 tasks/s, worker --pipe on RabbitMQ".into(),
        value: format!("{per_sec:.0} tasks/s"),
        met: per_sec >= 5_000.0,
    }
}

fn pipe_summary(s: &mut String, p: &PipeReport) {
    let _ = writeln!(
        s,
        "worker --pipe vs --exec, no-op handler, {} at once (tasks/s; worker CPU µs/task)",
        p.concurrency
    );
    for (name, side) in [("embedded", &p.embedded), ("RabbitMQ", &p.rabbitmq)] {
        let _ = writeln!(
            s,
            "  {name:<9} pipe {:>7.0}/s ({} tasks, {:.1} µs)  exec {:>5.0}/s ({} tasks, {:.1} µs)  pipe/exec {:.1}×",
            side.pipe.per_sec,
            side.pipe.messages,
            side.pipe.cpu_us_per_msg,
            side.exec.per_sec,
            side.exec.messages,
            side.exec.cpu_us_per_msg,
            side.ratio
        );
    }
}

/// RabbitMQ's version from the management API on the broker's host, if the
/// plugin is enabled; the benchmark does not depend on it.
async fn rabbitmq_version(bench: &Bench) -> Option<String> {
    let cfg = &bench.config.rabbitmq;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .ok()?;
    let host = if cfg.host.contains(':') {
        format!("[{}]", cfg.host)
    } else {
        cfg.host.clone()
    };
    let v: serde_json::Value = client
        .get(format!("http://{host}:15672/api/overview"))
        .basic_auth(&cfg.username, Some(cfg.password.expose()))
        .send()
        .await
        .ok()?
        .error_for_status()
        .ok()?
        .json()
        .await
        .ok()?;
    v.get("rabbitmq_version")?.as_str().map(str::to_string)
}
