//! Fault: the broker application is stopped and started mid-run
//! (`rabbitmqctl stop_app` / `start_app`) on the dedicated node `hqfault`
//! (port 5690, started here idempotently with `scripts/node start`), never the
//! shared one. While it is down, publishes wait for the connection (up to
//! publish_timeout) and the consumer waits; afterwards the client reconnects
//! by itself, redeclares, re-subscribes and resends unconfirmed publishes.
//! The queue is durable and the messages persistent, so what was enqueued
//! survives the restart.

use std::time::{Duration, Instant};

use helixmq::PublishOptions;
use helixmq_testkit::broker::prefix;
use helixmq_testkit::logs::init_logging;
use helixmq_testkit::node::{ensure_dedicated_node, node_name, node_port, AppStopped};
use helixmq_testkit::scenario::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_app_stopped_and_started_mid_run() {
    init_logging();
    /// Consumed before the fault, and after it.
    const AFTER: usize = 2_000;
    /// A cap, should the fault take very long.
    const MAX_MESSAGES: usize = 60_000;
    ensure_dedicated_node().await;
    let p = prefix();
    let mut s = Scenario::start("broker_restart", config(node_port(), &p), |q| q).await;
    s.node = Some(node_name());
    let (b, ledger) = (s.broker.clone(), s.ledger.clone());
    s.consume(&b, consumer_options()).await;
    // A steady load until the faults are over.
    s.load(MAX_MESSAGES, 64, PublishOptions::default());

    // Stop the broker once some messages went through.
    s.progress(AFTER, "consumption progress").await;
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
    s.recovered(1, recovery);

    let end = s.finish(AFTER).await;
    eprintln!(
        "broker_restart: outage {outage:.1?} (stop_app .. start_app done), publishes answered while down {answered_while_down}"
    );
    end.assert_all_confirmed();
    assert!(b.metrics().connection_recoveries.get() > before);
    assert_eq!(
        answered_while_down, 0,
        "publishes must wait for the broker, not fail, while it is down"
    );
}

/// A transient queue vanishes with the broker application; only the client's
/// redeclare after reconnecting brings it back (the durable queue above
/// survives by itself, so it cannot show that), with its binding, and the
/// subscription on it is restored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_redeclares_a_transient_queue_and_restores_its_consumer() {
    init_logging();
    ensure_dedicated_node().await;
    let p = prefix();
    let b = connect(config(node_port(), &p)).await;
    let names = helixmq::Names::new(&p);
    let transient = format!("{p}.tasks.transient");
    let mut t = helixmq::Topology::spec(&names);
    let mut q = helixmq::topology::Queue::durable(&transient);
    q.durable = false;
    t.add_work_queue(q, &names.tasks_exchange(), "transient");
    b.declare(&t).await.unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::channel(8);
    let sub = b
        .subscribe(
            &transient,
            move |m: helixmq::Message, _| {
                let tx = tx.clone();
                async move {
                    tx.send(m.id).await.unwrap();
                    Ok(helixmq::Outcome::Ack)
                }
            },
            helixmq::SubscribeOptions::default(),
        )
        .await
        .unwrap();
    let rx_state = b.state();
    let before = b.metrics().connection_recoveries.get();
    let stopped = tokio::task::spawn_blocking(|| {
        let mut s = AppStopped::stop();
        s.start();
        s
    })
    .await
    .unwrap();
    drop(stopped);
    await_reconnect(&b, rx_state, before, Duration::from_secs(45))
        .await
        .expect("client reconnects by itself after start_app");

    let m = helixmq::Message::new("after restart");
    let id = m.id.clone();
    b.publish(&names.tasks_exchange(), "transient", m)
        .await
        .expect("the redeclared queue and binding take the message");
    let got = tokio::time::timeout(Duration::from_secs(20), rx.recv())
        .await
        .expect("the restored subscription consumes")
        .unwrap();
    assert_eq!(got, id);
    assert!(sub.is_active());
    sub.shutdown(Duration::from_secs(5)).await;
    helixmq_testkit::broker::cleanup(&b, None).await;
    b.close().await.unwrap();
}
