//! Fault: a memory alarm raised and cleared on the dedicated node `hqfault`
//! (`set_vm_memory_high_watermark 0.0000001`, restored to 0.4 — by a guard,
//! even if the test fails). RabbitMQ then blocks publishing connections
//! (connection.blocked): publishes wait for their confirm; one whose wait
//! outlasts its publish timeout fails with `Error::PublishTimeout`; the
//! connection state reads `Blocked`; a consumer on its own connection keeps
//! consuming; once the alarm clears every waiting publish is confirmed and
//! nothing is lost.
//!
//! And the bound: while the blocked connection has stopped being read, a
//! publish stuck in its send (lapin cannot write it) still returns within its
//! `publish_timeout`.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use helixmq::{ConnectionState, Error, Message, PublishOptions};
use helixmq_testkit::broker::prefix;
use helixmq_testkit::logs::init_logging;
use helixmq_testkit::node::{ensure_dedicated_node, node_name, node_port, MemoryAlarm};
use helixmq_testkit::scenario::*;
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_alarm_blocks_publishes_until_cleared() {
    init_logging();
    const BEFORE: usize = 1_000;
    const DURING: usize = 500;
    ensure_dedicated_node().await;
    let p = prefix();
    let mut s = Scenario::start("memory_alarm", config(node_port(), &p), |q| q).await;
    s.node = Some(node_name());
    let (publisher, ledger, names) = (s.broker.clone(), s.ledger.clone(), s.names.clone());
    // Its own connection: RabbitMQ blocks a connection as a whole once it publishes.
    let consumer = connect(config(node_port(), &p)).await;
    s.also_close(consumer.clone());

    // Enqueued before the alarm, consumed during it.
    publish_all(
        publisher.clone(),
        ledger.clone(),
        BEFORE,
        64,
        PublishOptions::default(),
    )
    .await;
    assert_eq!(
        ledger.report().confirmed,
        BEFORE,
        "{:?}",
        ledger.report().errors
    );

    let mut alarm = tokio::task::spawn_blocking(MemoryAlarm::raise)
        .await
        .unwrap();
    MemoryAlarm::wait_active().await;

    // Consumers keep consuming during the alarm.
    s.consume(&consumer, consumer_options()).await;
    ledger
        .wait_until(
            Duration::from_secs(30),
            "the consumer draining during the alarm",
            |_, c| c >= BEFORE,
        )
        .await
        .expect("a consumer keeps consuming during a memory alarm");

    // Publishes wait while blocked.
    let waiting = tokio::spawn(publish_all(
        publisher.clone(),
        ledger.clone(),
        DURING,
        64,
        PublishOptions {
            timeout: Some(Duration::from_secs(60)),
            ..Default::default()
        },
    ));
    // One publish whose timeout the alarm outlasts.
    let short = Message::new("published into the alarm with a 2 s timeout");
    let short_id = short.id.clone();
    let t0 = Instant::now();
    let res = publisher
        .publish_with(
            &names.tasks_exchange(),
            WORK,
            short,
            &PublishOptions {
                timeout: Some(Duration::from_secs(2)),
                ..Default::default()
            },
        )
        .await;
    let waited = t0.elapsed();
    ledger.published(&short_id, &res);
    assert!(
        matches!(res, Err(Error::PublishTimeout { .. })),
        "expected PublishTimeout during the alarm, got {res:?}"
    );
    assert!(
        waited >= Duration::from_secs(2),
        "timed out too early: {waited:?}"
    );

    // The connection state shows Blocked.
    let mut state = publisher.state();
    tokio::time::timeout(
        Duration::from_secs(10),
        state.wait_for(|s| *s == ConnectionState::Blocked),
    )
    .await
    .expect("connection state becomes Blocked during the alarm")
    .unwrap();
    assert_eq!(
        publisher.metrics().connection_state.get(),
        2,
        "rabbitmq_connection_state gauge reads 2 (blocked)"
    );
    // Still nothing of the waiting batch answered: they wait, they do not fail.
    assert_eq!(
        ledger.answered(),
        BEFORE + 1,
        "publishes answered during the alarm: {:?}",
        ledger.report()
    );
    assert!(!waiting.is_finished());

    // Clear it: every waiting publish is confirmed, the state goes back to Connected.
    tokio::task::spawn_blocking(move || {
        alarm.clear();
        alarm
    })
    .await
    .unwrap();
    let cleared = Instant::now();
    waiting.await.expect("waiting publishes");
    let recovery = cleared.elapsed();
    tokio::time::timeout(
        Duration::from_secs(10),
        state.wait_for(|s| *s == ConnectionState::Connected),
    )
    .await
    .expect("connection state back to Connected after the alarm")
    .unwrap();
    s.recovered(1, recovery);

    let end = s.finish(0).await;
    let r = &end.report;
    eprintln!(
        "memory_alarm: short publish failed after {waited:.2?}, short message consumed {} time(s) after the alarm",
        ledger.times_consumed(&short_id)
    );
    assert_eq!(r.messages, BEFORE + DURING + 1);
    assert_eq!(r.confirmed, BEFORE + DURING, "{:?}", r.errors);
    assert_eq!(r.timed_out, 1);
    assert_eq!(r.failed + r.nacked, 0, "{:?}", r.errors);
}

/// `Recv-Q`/`Send-Q` of the sockets to the dedicated node (diagnostic only).
fn socket_queues() -> String {
    std::process::Command::new("ss")
        .args([
            "-tnH",
            "state",
            "established",
            &format!("dport = :{}", node_port()),
        ])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|e| format!("(ss: {e})"))
}

/// One publish of the load: when it started (since the load began), how long
/// it took, and its answer.
struct Sample {
    started: Duration,
    took: Duration,
    result: helixmq::Result<()>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_timeout_bounds_a_send_stuck_behind_a_blocked_connection() {
    init_logging();
    const TIMEOUT: Duration = Duration::from_secs(2);
    const SIZE: usize = 64 * 1024;
    const WINDOW: usize = 64;
    const AFTER: usize = 200;
    ensure_dedicated_node().await;
    let p = prefix();
    let mut cfg = config(node_port(), &p);
    cfg.rabbitmq.publish_timeout = TIMEOUT;
    let mut s = Scenario::start("blocked_publishing", cfg.clone(), |q| q).await;
    s.node = Some(node_name());
    let (publisher, ledger, names) = (s.broker.clone(), s.ledger.clone(), s.names.clone());

    // 64 KiB messages, WINDOW at a time, from before the alarm until well
    // after the broker stopped reading this connection.
    let stop = CancellationToken::new();
    let samples = Arc::new(Mutex::new(Vec::<Sample>::new()));
    let began = Instant::now();
    let load = tokio::spawn({
        let (b, l, s, stop) = (
            publisher.clone(),
            ledger.clone(),
            samples.clone(),
            stop.clone(),
        );
        let x = names.tasks_exchange();
        futures::stream::iter(0..)
            .take_until(stop.cancelled_owned())
            .map(move |_| {
                let (b, l, s, x) = (b.clone(), l.clone(), s.clone(), x.clone());
                async move {
                    let m = Message::new(vec![b'x'; SIZE]);
                    let id = m.id.clone();
                    let t0 = Instant::now();
                    let result = b.publish(&x, WORK, m).await;
                    let took = t0.elapsed();
                    l.published(&id, &result);
                    s.lock().unwrap().push(Sample {
                        started: t0 - began,
                        took,
                        result,
                    });
                }
            })
            .buffer_unordered(WINDOW)
            .collect::<()>()
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut alarm = tokio::task::spawn_blocking(MemoryAlarm::raise)
        .await
        .unwrap();
    MemoryAlarm::wait_active().await;
    let active = began.elapsed();
    // Three publish timeouts' worth of publishing into the blocked connection.
    tokio::time::sleep(3 * TIMEOUT).await;
    let queues = tokio::task::spawn_blocking(socket_queues).await.unwrap();
    stop.cancel();
    load.await.expect("load task");
    let blocked_state = *publisher.state().borrow();

    let samples = std::mem::take(&mut *samples.lock().unwrap());
    let slowest = samples.iter().map(|s| s.took).max().unwrap_or_default();
    let late: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.started > active + Duration::from_secs(1))
        .collect();
    let late_timed_out = late
        .iter()
        .filter(|s| matches!(s.result, Err(Error::PublishTimeout { .. })))
        .count();
    let mut late_took: Vec<Duration> = late.iter().map(|s| s.took).collect();
    late_took.sort();
    eprintln!(
        "blocked publishing: {} publishes of {SIZE} B, {} confirmed, slowest {slowest:.2?}; {} started 1 s after the alarm, {late_timed_out} timed out, took min {:.2?} median {:.2?} max {:.2?}; state {blocked_state:?}; sockets (state recv-q send-q local peer):\n{queues}",
        samples.len(),
        samples.iter().filter(|s| s.result.is_ok()).count(),
        late.len(),
        late_took.first().copied().unwrap_or_default(),
        late_took.get(late_took.len() / 2).copied().unwrap_or_default(),
        late_took.last().copied().unwrap_or_default(),
    );
    for s in &samples {
        assert!(
            s.took <= TIMEOUT + Duration::from_secs(1),
            "a publish started at {:.2?} took {:.2?} (publish_timeout {TIMEOUT:?}): {:?}",
            s.started,
            s.took,
            s.result
        );
        assert!(
            matches!(s.result, Ok(()) | Err(Error::PublishTimeout { .. })),
            "{:?}",
            s.result
        );
    }
    assert!(late.len() >= WINDOW, "too few publishes during the alarm");
    assert_eq!(
        late_timed_out,
        late.len(),
        "every publish into the blocked connection times out"
    );

    // Cleared: the broker takes publishes again and everything confirmed arrives.
    tokio::task::spawn_blocking(move || {
        alarm.clear();
        alarm
    })
    .await
    .unwrap();
    let cleared = Instant::now();
    let consumer = connect(cfg).await;
    s.also_close(consumer.clone());
    s.consume(&consumer, consumer_options()).await;
    publish_all(
        publisher.clone(),
        ledger.clone(),
        AFTER,
        16,
        PublishOptions {
            timeout: Some(Duration::from_secs(60)),
            ..Default::default()
        },
    )
    .await;
    s.recovered(1, cleared.elapsed());
    let end = s.finish(0).await;
    let r = &end.report;
    assert_eq!(r.failed + r.nacked, 0, "{:?}", r.errors);
    assert_eq!(
        r.confirmed,
        samples.iter().filter(|s| s.result.is_ok()).count() + AFTER
    );
}
