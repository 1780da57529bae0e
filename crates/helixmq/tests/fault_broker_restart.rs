//! Fault: the broker application is stopped and started mid-run
//! (`rabbitmqctl stop_app` / `start_app`) on the dedicated node `hqfault`
//! (port 5690, started here idempotently with `scripts/node start`), never the
//! shared one. While it is down, publishes wait for the connection (up to
//! publish_timeout) and the consumer waits; afterwards the client reconnects
//! by itself, redeclares, re-subscribes and resends unconfirmed publishes.
//! The queue is durable and the messages persistent, so what was enqueued
//! survives the restart.

mod fault_support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use fault_support::ledger::Ledger;
use fault_support::node::{ensure_dedicated_node, node_port, AppStopped};
use fault_support::*;
use helixmq::{Names, PublishOptions};
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_app_stopped_and_started_mid_run() {
    init_logging();
    /// Consumed before the fault, and after it.
    const AFTER: usize = 2_000;
    /// A cap, should the fault take very long.
    const MAX_MESSAGES: usize = 60_000;
    ensure_dedicated_node().await;
    let p = prefix();
    let b = connect(config(node_port(), &p)).await;
    let names = Names::new(&p);
    let (t, queue) = topology(&names, |q| q);
    b.declare(&t).await.expect("declare");

    let ledger = Arc::new(Ledger::default());
    let sub = consume_into(&b, &queue, ledger.clone(), consumer_options()).await;
    let started = Instant::now();
    // A steady load until the faults are over.
    let stop = CancellationToken::new();
    let publisher = tokio::spawn(publish_until(
        b.clone(),
        ledger.clone(),
        MAX_MESSAGES,
        64,
        PublishOptions::default(),
        stop.clone(),
    ));

    // Stop the broker once some messages went through.
    ledger
        .wait_until(Duration::from_secs(40), "consumption progress", |_, c| {
            c >= AFTER
        })
        .await
        .unwrap();
    let rx = b.state();
    let before = b.metrics().connection_recoveries.get();
    let down_at = Instant::now();
    let mut stopped = tokio::task::spawn_blocking(AppStopped::stop).await.unwrap();
    let answered_at_stop = ledger.answered();
    // The broker stays down for a while: real time passing, nothing to await.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let answered_while_down = ledger.answered() - answered_at_stop;
    stopped = tokio::task::spawn_blocking(move || {
        stopped.start();
        stopped
    })
    .await
    .unwrap();
    drop(stopped);
    let outage = down_at.elapsed();
    let recovery = await_reconnect(&b, rx, before, Duration::from_secs(45))
        .await
        .expect("client reconnects by itself after start_app");

    // Some more load after the last fault, then stop.
    let mark = ledger.distinct_consumed();
    ledger
        .wait_until(
            Duration::from_secs(40),
            "progress after the faults",
            |_, c| c >= mark + AFTER,
        )
        .await
        .unwrap();
    stop.cancel();
    publisher.await.expect("publisher task");
    ledger
        .wait_drained(Duration::from_secs(60))
        .await
        .expect("every confirmed message consumed");
    let elapsed = started.elapsed();
    assert!(sub.is_active(), "subscription died: {:?}", sub.status());
    sub.shutdown(Duration::from_secs(10)).await;

    let r = ledger.report();
    summary("broker_restart", &r, 1, recovery);
    eprintln!(
        "broker_restart: outage {outage:.1?} (stop_app .. start_app done), publishes answered while down {answered_while_down}, run {elapsed:.1?}, report {r:?}"
    );
    assert_eq!(
        r.failed + r.timed_out + r.nacked,
        0,
        "publishes failed: {:?}",
        r.errors
    );
    assert_eq!(r.confirmed, r.messages);
    assert_eq!(r.lost, 0);
    assert!(b.metrics().connection_recoveries.get() > before);
    assert_eq!(
        answered_while_down, 0,
        "publishes must wait for the broker, not fail, while it is down"
    );
    cleanup(&b).await;
    b.close().await.expect("close");
}
