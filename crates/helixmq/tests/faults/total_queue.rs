//! The total-queue checker, in the spirit of RabbitMQ's Jepsen tests: N ids
//! (`HELIXMQ_CHECKER_MESSAGES`, default 20,000) published through helixmq to
//! the dedicated node (`HELIXMQ_FAULT_NODE`/`_PORT`, started here
//! idempotently) through the test proxy, while a seeded random schedule
//! (`HELIXMQ_CHECKER_SEED`, else random, printed first) injects faults one at
//! a time: `HELIXMQ_CHECKER_ROUNDS` rounds (default one per 20,000 ids), each
//! with every kind the suite knows once, in a shuffled order — forced close,
//! TCP cut, black hole, added latency, a slow link, broker app restart,
//! consumer kill (the worker process SIGKILLed, or the in-process
//! subscription dropped; alternately) and a memory alarm. The ids go out in
//! one chunk per fault, released in the calm gap (1-3 s) before it, at
//! `HELIXMQ_CHECKER_RATE` per second (default 500).
//!
//! Handlers fail on purpose for a fixed subset of ids (one retry through a
//! 1 s tier) and dead-letter another (poison), see `helixmq_testkit::history`.
//! Two consumers share the work queue, one in this process and one in a
//! child process (this binary running the ignored test
//! `total_queue::checker_worker`);
//! a third drains the DLQ.
//!
//! After each fault is undone, a fresh probe id is published and must be
//! handled: the time that takes is the fault's time to recover. At the end
//! every confirmed id must be acked by a handler, or be in the DLQ if it is
//! poison (lost = 0), and nothing may happen that cannot (unexpected = 0: an
//! id never published, a good id retried or dead-lettered, a poison id acked
//! or back from the DLQ). The table per fault kind counts the ids published
//! during each fault (from its injection to its recovery).

use std::os::unix::process::ExitStatusExt;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use helixmq::{Broker, Config, Message, Names, RetryPolicy, SubscribeOptions, Subscription};
use helixmq_testkit::broker::{cleanup, connection_name, prefix};
use helixmq_testkit::history::{decide, message_id, probe_id, FaultKind, History, Row, Verdict};
use helixmq_testkit::logs::init_logging;
use helixmq_testkit::node::{
    close_connections_named, ensure_dedicated_node, node_name, node_port, queue_depths, AppStopped,
    MemoryAlarm,
};
use helixmq_testkit::proxy::{Proxy, Shape};
use helixmq_testkit::scenario::*;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;

/// `<proxy port> <prefix> <queue>` for the worker process.
const WORKER_ENV: &str = "HELIXMQ_CHECKER_WORKER";
/// Marks the worker's protocol lines (libtest writes to the same stdout).
const MARK: &str = "@@chk ";
/// Short, so a black hole is noticed within the fault (lapin: after 2 × heartbeat).
const HEARTBEAT: Duration = Duration::from_secs(3);
const RETRY_DELAY: Duration = Duration::from_secs(1);
/// Publishes in flight at once.
const WINDOW: usize = 128;
/// A fault is recovered when the probe published after its undo was handled within this.
const RECOVERY_LIMIT: Duration = Duration::from_secs(120);
/// Every confirmed id settled within this once publishing and faults are over.
const DRAIN_LIMIT: Duration = Duration::from_secs(120);

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v} does not parse")),
        Err(_) => default,
    }
}

fn checker_config(port: u16, prefix: &str) -> Config {
    let mut c = config(port, prefix);
    c.rabbitmq.heartbeat = HEARTBEAT;
    c.rabbitmq.publish_timeout = Duration::from_secs(90);
    c
}

fn retry_policy() -> RetryPolicy {
    RetryPolicy {
        max_attempts: 3,
        delays: vec![RETRY_DELAY],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_id_accounted_for_under_a_random_fault_schedule() {
    init_logging();
    let seed: u64 = env_or("HELIXMQ_CHECKER_SEED", rand::random());
    let n: usize = env_or("HELIXMQ_CHECKER_MESSAGES", 20_000);
    let rate: f64 = env_or("HELIXMQ_CHECKER_RATE", 500.0);
    let rounds: usize = env_or("HELIXMQ_CHECKER_ROUNDS", n.div_ceil(20_000)).max(1);
    let banner = format!(
        "checker: seed={seed} messages={n} rounds={rounds} rate={rate}/s node={}:{} (replay: HELIXMQ_CHECKER_SEED={seed})",
        node_name(),
        node_port()
    );
    println!("{banner}");
    eprintln!("{banner}");
    let started = Instant::now();

    ensure_dedicated_node().await;
    let p = prefix();
    let proxy = Proxy::start(([127, 0, 0, 1], node_port()).into()).await;
    let publisher = connect(checker_config(proxy.port(), &p)).await;
    // Its own connection: a blocked publishing connection holds back acks too.
    let consumer = connect(checker_config(proxy.port(), &p)).await;
    let names = Names::new(&p);
    let (mut t, queue) = topology(&names, |q| q);
    t.add_retry_tier(RETRY_DELAY);
    publisher.declare(&t).await.expect("declare");
    consumer.declare(&t).await.expect("declare");

    let history = Arc::new(History::default());
    let dlq = subscribe_dlq(&consumer, &names.dlq(), history.clone()).await;
    let mut local = Some(subscribe_local(&consumer, &queue, history.clone()).await);
    let mut worker = Some(Worker::spawn(proxy.port(), &p, &queue, history.clone()).await);

    // The schedule: `rounds` rounds of every kind in a shuffled order, with
    // calm gaps; chunk k of the ids is released at the gap before fault k.
    let total = rounds * FaultKind::ALL.len();
    let (release, released) = watch::channel(0usize);
    let publishing = tokio::spawn(publish_gated(
        publisher.clone(),
        history.clone(),
        n,
        total,
        rate,
        released,
    ));
    let mut rng = StdRng::seed_from_u64(seed);
    let mut order: Vec<FaultKind> = Vec::new();
    let mut kills = 0usize;
    for injected in 1..=total {
        if order.is_empty() {
            order = FaultKind::ALL.to_vec();
            order.shuffle(&mut rng);
        }
        let kind = order.pop().expect("a kind");
        let gap = Duration::from_millis(rng.random_range(1_000..3_000));
        let hold = Duration::from_millis(rng.random_range(2_000..8_000));
        // Chunk k starts in the calm gap before fault k, so the fault meets
        // publishes, deliveries and handlers in flight.
        release.send_replace(injected);
        // The schedule's clock: calm between faults.
        tokio::time::sleep(gap).await;
        let w = history.begin(kind, String::new());
        let t0 = Instant::now();
        let undone = match kind {
            FaultKind::ForcedClose => {
                let (node, name) = (node_name(), connection_name(&p));
                let closed = tokio::task::spawn_blocking(move || {
                    close_connections_named(Some(&node), &name)
                })
                .await
                .unwrap();
                history.detail(w, &format!("{closed} connection(s) closed"));
                Instant::now()
            }
            FaultKind::TcpCut => {
                let cut = proxy.cut();
                history.detail(w, &format!("{cut} socket(s) cut"));
                Instant::now()
            }
            FaultKind::BlackHole => {
                proxy.black_hole();
                tokio::time::sleep(hold).await;
                proxy.resume();
                history.detail(w, &format!("{hold:.1?}"));
                Instant::now()
            }
            FaultKind::Latency => {
                let latency = Duration::from_millis(rng.random_range(50..400));
                proxy.shape(Shape {
                    latency,
                    bytes_per_sec: None,
                });
                tokio::time::sleep(hold).await;
                proxy.shape(Shape::default());
                history.detail(w, &format!("+{latency:?} per chunk for {hold:.1?}"));
                Instant::now()
            }
            FaultKind::SlowLink => {
                let kib = rng.random_range(16..128u64);
                proxy.shape(Shape {
                    latency: Duration::ZERO,
                    bytes_per_sec: Some(kib * 1024),
                });
                tokio::time::sleep(hold).await;
                proxy.shape(Shape::default());
                history.detail(w, &format!("{kib} KiB/s for {hold:.1?}"));
                Instant::now()
            }
            FaultKind::BrokerRestart => {
                let mut stopped = tokio::task::spawn_blocking(AppStopped::stop).await.unwrap();
                let stop_took = t0.elapsed();
                tokio::time::sleep(hold).await;
                tokio::task::spawn_blocking(move || stopped.start())
                    .await
                    .unwrap();
                history.detail(
                    w,
                    &format!("stop_app took {stop_took:.1?}, down {:.1?}", t0.elapsed()),
                );
                Instant::now()
            }
            FaultKind::ConsumerKill => {
                kills += 1;
                let pause = hold.min(Duration::from_secs(3));
                if kills % 2 == 1 {
                    let w_old = worker.take().expect("a worker");
                    let held = w_old.kill().await;
                    // The others carry on meanwhile.
                    tokio::time::sleep(pause).await;
                    worker = Some(Worker::spawn(proxy.port(), &p, &queue, history.clone()).await);
                    history.detail(
                        w,
                        &format!("worker process SIGKILLed after {held} handler runs, restarted after {pause:.1?}"),
                    );
                } else {
                    drop(local.take());
                    tokio::time::sleep(pause).await;
                    local = Some(subscribe_local(&consumer, &queue, history.clone()).await);
                    history.detail(
                        w,
                        &format!("in-process subscription dropped, resubscribed after {pause:.1?}"),
                    );
                }
                Instant::now()
            }
            FaultKind::MemoryAlarm => {
                let mut alarm = tokio::task::spawn_blocking(MemoryAlarm::raise)
                    .await
                    .unwrap();
                MemoryAlarm::wait_active().await;
                tokio::time::sleep(hold).await;
                tokio::task::spawn_blocking(move || alarm.clear())
                    .await
                    .unwrap();
                history.detail(w, &format!("alarm for {hold:.1?}"));
                Instant::now()
            }
        };
        match probe(&publisher, &history, injected).await {
            Ok(()) => {
                let took = undone.elapsed();
                history.recovered(w, took);
                eprintln!(
                    "checker: fault {w} {} ({}) injected for {:.1?}, recovered in {took:.2?}; {} handler runs so far",
                    kind.name(),
                    history.windows()[w].detail,
                    undone - t0,
                    history.runs()
                );
            }
            Err(e) => {
                history.end_unrecovered();
                let depths = depths(&p).await;
                print_table(&history);
                panic!(
                    "seed {seed}: fault {w} {} ({}) not recovered: {e}\nqueues (name ready unacked consumers):\n{depths}",
                    kind.name(),
                    history.windows()[w].detail
                );
            }
        }
    }
    publishing.await.expect("publisher task");
    let published_in = started.elapsed();

    if let Err(left) = history.wait_all_settled(DRAIN_LIMIT).await {
        let depths = depths(&p).await;
        print_table(&history);
        panic!(
            "seed {seed}: {left} confirmed ids not settled {DRAIN_LIMIT:?} after the last fault; queues (name ready unacked consumers):\n{depths}\nfirst missing: {:#?}",
            history.missing(20)
        );
    }
    let elapsed = started.elapsed();

    let table = print_table(&history);
    let (unexpected, events) = history.unexpected_events();
    let (nacked, timed_out, failed, errors) = history.publish_errors();
    let total = table.iter().fold(Row::default(), |mut acc, (_, r)| {
        acc.attempts += r.attempts;
        acc.lost += r.lost;
        acc.duplicated += r.duplicated;
        acc.recovery.extend(r.recovery.iter().copied());
        acc
    });
    let worst = total.recovery.iter().max().copied().unwrap_or_default();
    println!(
        "scenario=total_queue seed={seed} messages={n} faults={} lost={} duplicates={} unexpected={unexpected} recovery_ms={} run_s={:.0}",
        total.attempts,
        total.lost,
        total.duplicated,
        worst.as_millis(),
        elapsed.as_secs_f64()
    );
    eprintln!(
        "checker: seed {seed}: published for {published_in:.1?}, all settled after {elapsed:.1?}; publish errors: nacked {nacked}, timed out {timed_out}, failed {failed} {errors:?}\nchecker: {}",
        history.totals()
    );

    // Tear down before asserting, so a failure leaves nothing behind.
    if let Some(w) = worker.take() {
        w.kill().await;
    }
    if let Some(s) = local.take() {
        s.shutdown(Duration::from_secs(10)).await;
    }
    dlq.shutdown(Duration::from_secs(10)).await;
    cleanup(&publisher, None).await;
    let _ = consumer.close().await;
    let _ = publisher.close().await;

    assert_eq!(
        total.lost,
        0,
        "seed {seed}: lost ids: {:#?}",
        history.missing(20)
    );
    assert_eq!(unexpected, 0, "seed {seed}: unexpected: {events:#?}");
    for kind in FaultKind::ALL {
        assert!(
            table
                .iter()
                .any(|(k, r)| *k == Some(kind) && r.attempts > 0),
            "seed {seed}: {} never injected",
            kind.name()
        );
    }
}

/// Publish the probe `k` and wait until a handler acked it.
async fn probe(publisher: &Broker, history: &History, k: usize) -> Result<(), String> {
    let id = probe_id(k);
    let mut m = Message::new(format!("checker probe {k}"));
    m.id = id.clone();
    history.publish_started(&id);
    let x = publisher.names().tasks_exchange();
    let wait = async {
        let r = publisher.publish(&x, WORK, m).await;
        history.published(&id, &r);
        r.map_err(|e| format!("probe {id} publish failed: {e}"))?;
        history
            .wait_settled(&id, RECOVERY_LIMIT)
            .await
            .map_err(|_| format!("probe {id} confirmed but not handled"))
    };
    tokio::time::timeout(RECOVERY_LIMIT, wait)
        .await
        .map_err(|_| format!("probe {id} not confirmed and handled within {RECOVERY_LIMIT:?}"))?
}

/// Publish ids `m0..m<n>` in `chunks` equal chunks, chunk k once the schedule
/// released it (just before fault k: every fault meets publishes, however
/// long the faults take),
/// each at `rate` per second from its release, [`WINDOW`] in flight at most
/// (behind its pace after a stall, it catches up at full speed).
async fn publish_gated(
    b: Broker,
    history: Arc<History>,
    n: usize,
    chunks: usize,
    rate: f64,
    mut released: watch::Receiver<usize>,
) {
    let x = b.names().tasks_exchange();
    let window = Arc::new(Semaphore::new(WINDOW));
    let mut inflight = JoinSet::new();
    for k in 0..chunks {
        released
            .wait_for(|r| *r > k)
            .await
            .expect("the schedule releases every chunk");
        let start = tokio::time::Instant::now();
        for (j, i) in (k * n / chunks..(k + 1) * n / chunks).enumerate() {
            // The pace is a clock, not a wait for something.
            tokio::time::sleep_until(start + Duration::from_secs_f64(j as f64 / rate)).await;
            let permit = window.clone().acquire_owned().await.expect("semaphore");
            while inflight.try_join_next().is_some() {}
            let mut m = Message::new(format!("checker message {i}"));
            m.id = message_id(i);
            history.publish_started(&m.id);
            let (b, h, x) = (b.clone(), history.clone(), x.clone());
            inflight.spawn(async move {
                let id = m.id.clone();
                let r = b.publish(&x, WORK, m).await;
                h.published(&id, &r);
                drop(permit);
            });
        }
    }
    while inflight.join_next().await.is_some() {}
}

/// The handler every consumer of the work queue runs: [`decide`], recorded.
fn record_and_decide(history: &History, m: &Message) -> Verdict {
    let v = decide(&m.id, m.attempt);
    history.handled(&m.id, m.attempt, v);
    v
}

async fn subscribe_local(b: &Broker, queue: &str, history: Arc<History>) -> Subscription {
    b.subscribe(
        queue,
        move |m: Message, _ctx| {
            let v = record_and_decide(&history, &m);
            async move { v.outcome() }
        },
        SubscribeOptions {
            prefetch: Some(50),
            concurrency: Some(16),
            retry: Some(retry_policy()),
            ..Default::default()
        },
    )
    .await
    .expect("subscribe the work queue")
}

async fn subscribe_dlq(b: &Broker, dlq: &str, history: Arc<History>) -> Subscription {
    b.subscribe(
        dlq,
        move |m: Message, _ctx| {
            history.dead_lettered(&m.id, m.attempt);
            async { Ok(helixmq::Outcome::Ack) }
        },
        SubscribeOptions {
            prefetch: Some(50),
            concurrency: Some(4),
            ..Default::default()
        },
    )
    .await
    .expect("subscribe the DLQ")
}

async fn depths(prefix: &str) -> String {
    let p = prefix.to_string();
    tokio::task::spawn_blocking(move || queue_depths(Some(&node_name()), &p))
        .await
        .unwrap_or_default()
}

/// Print the per-fault table (the test's output) and return its rows.
fn print_table(history: &History) -> Vec<(Option<FaultKind>, Row)> {
    let table = history.table();
    let mut out = String::from(
        "fault            attempts published confirmed acknowledged  lost duplicated recovered unexpected  recover_ms(max)\n",
    );
    for (kind, r) in &table {
        let worst = r
            .recovery
            .iter()
            .max()
            .map_or("-".to_string(), |d| d.as_millis().to_string());
        out.push_str(&format!(
            "{:<16} {:>8} {:>9} {:>9} {:>12} {:>5} {:>10} {:>9} {:>10}  {:>15}\n",
            kind.map_or("(none: calm)", FaultKind::name),
            r.attempts,
            r.published,
            r.confirmed,
            r.acknowledged,
            r.lost,
            r.duplicated,
            r.recovered,
            r.unexpected,
            worst
        ));
    }
    println!("{out}");
    eprintln!("{out}");
    table
}

/// The worker process: this binary running the ignored test `checker_worker`.
struct Worker {
    child: Child,
    reader: tokio::task::JoinHandle<u64>,
}

impl Worker {
    /// Start it and wait until it consumes.
    async fn spawn(port: u16, prefix: &str, queue: &str, history: Arc<History>) -> Worker {
        let mut child = Command::new(std::env::current_exe().expect("test binary path"))
            .args([
                "total_queue::checker_worker",
                "--exact",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(WORKER_ENV, format!("{port} {prefix} {queue}"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn the worker process");
        let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
        let ready = async {
            while let Some(line) = lines.next_line().await.expect("read worker output") {
                if line.contains("@@chk ready") {
                    return;
                }
            }
            panic!("the worker process exited before consuming");
        };
        tokio::time::timeout(Duration::from_secs(60), ready)
            .await
            .expect("the worker process subscribed within 60 s");
        let reader = tokio::spawn(async move {
            let mut runs = 0;
            while let Ok(Some(line)) = lines.next_line().await {
                if record_worker_line(&history, &line) {
                    runs += 1;
                }
            }
            runs
        });
        Worker { child, reader }
    }

    /// SIGKILL it: no chance to ack, nack or close anything. Returns how many
    /// handler runs it reported (every line it printed before dying is read).
    async fn kill(mut self) -> u64 {
        self.child.start_kill().expect("SIGKILL the worker");
        let status = self.child.wait().await.expect("reap the worker");
        assert_eq!(
            status.signal(),
            Some(9),
            "worker ended by SIGKILL: {status:?}"
        );
        tokio::time::timeout(Duration::from_secs(10), self.reader)
            .await
            .expect("worker output read to its end")
            .expect("reader task")
    }
}

/// `@@chk <verdict> <attempt> <id>` → the history. libtest prints its own
/// `test total_queue::checker_worker ... ` without a newline, so the mark may not start the line.
fn record_worker_line(history: &History, line: &str) -> bool {
    let Some((_, rest)) = line.split_once(MARK) else {
        return false;
    };
    let mut f = rest.split_whitespace();
    let (Some(v), Some(a), Some(id)) = (f.next(), f.next(), f.next()) else {
        return false;
    };
    let (Some(v), Ok(a)) = (Verdict::parse(v), a.parse::<u32>()) else {
        return false;
    };
    history.handled(id, a, v);
    true
}

/// The worker process of the test above; on its own, without its
/// environment, it does nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "child process of every_id_accounted_for_under_a_random_fault_schedule"]
async fn checker_worker() {
    let Ok(spec) = std::env::var(WORKER_ENV) else {
        return;
    };
    let mut f = spec.split_whitespace();
    let (Some(port), Some(prefix), Some(queue)) = (f.next(), f.next(), f.next()) else {
        panic!("{WORKER_ENV}={spec}: expected `<port> <prefix> <queue>`");
    };
    let port: u16 = port.parse().expect("port");
    let b = connect(checker_config(port, prefix)).await;
    let sub = b
        .subscribe(
            queue,
            |m: Message, _ctx| {
                let v = decide(&m.id, m.attempt);
                // Before the handler returns: a kill after this line and
                // before the ack makes a redelivery, counted as a duplicate.
                println!("{MARK}{} {} {}", v.as_str(), m.attempt, m.id);
                async move { v.outcome() }
            },
            SubscribeOptions {
                prefetch: Some(20),
                concurrency: Some(8),
                retry: Some(retry_policy()),
                ..Default::default()
            },
        )
        .await
        .expect("worker subscribes");
    println!("{MARK}ready");
    // Run until killed, or until the parent goes away (our stdin closes).
    let mut sink = Vec::new();
    let _ = tokio::io::AsyncReadExt::read_to_end(&mut tokio::io::stdin(), &mut sink).await;
    sub.shutdown(Duration::from_secs(5)).await;
    let _ = b.close().await;
}
