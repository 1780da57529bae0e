//! Fault: a memory alarm raised and cleared on the dedicated node `hqfault`
//! (`set_vm_memory_high_watermark 0.0000001`, restored to 0.4 — by a guard,
//! even if the test fails). RabbitMQ then blocks publishing connections
//! (connection.blocked): publishes wait for their confirm; one whose wait
//! outlasts its publish timeout fails with `Error::PublishTimeout`; the
//! connection state reads `Blocked`; a consumer on its own connection keeps
//! consuming; once the alarm clears every waiting publish is confirmed and
//! nothing is lost.

mod fault_support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use fault_support::ledger::Ledger;
use fault_support::node::{ensure_dedicated_node, node_port, MemoryAlarm};
use fault_support::*;
use helixmq::{ConnectionState, Error, Message, Names, PublishOptions};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_alarm_blocks_publishes_until_cleared() {
    init_logging();
    const BEFORE: usize = 1_000;
    const DURING: usize = 500;
    ensure_dedicated_node().await;
    let p = prefix();
    let publisher = connect(config(node_port(), &p)).await;
    // Its own connection: RabbitMQ blocks a connection as a whole once it publishes.
    let consumer = connect(config(node_port(), &p)).await;
    let names = Names::new(&p);
    let (t, queue) = topology(&names, |q| q);
    publisher.declare(&t).await.expect("declare");
    let ledger = Arc::new(Ledger::default());

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
    // The alarm is the broker's state, not something we can await: poll it.
    let raised = Instant::now();
    while !tokio::task::spawn_blocking(MemoryAlarm::active)
        .await
        .unwrap()
    {
        assert!(
            raised.elapsed() < Duration::from_secs(15),
            "memory alarm did not go off"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Consumers keep consuming during the alarm.
    let sub = consume_into(&consumer, &queue, ledger.clone(), consumer_options()).await;
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
    ledger
        .wait_drained(Duration::from_secs(60))
        .await
        .expect("every confirmed message consumed");
    assert!(sub.is_active(), "subscription died: {:?}", sub.status());
    sub.shutdown(Duration::from_secs(10)).await;

    let r = ledger.report();
    summary("memory_alarm", &r, 1, recovery);
    eprintln!(
        "memory_alarm: short publish failed after {waited:.2?}, short message consumed {} time(s) after the alarm, report {r:?}",
        ledger.times_consumed(&short_id)
    );
    assert_eq!(r.messages, BEFORE + DURING + 1);
    assert_eq!(r.confirmed, BEFORE + DURING, "{:?}", r.errors);
    assert_eq!(r.timed_out, 1);
    assert_eq!(r.failed + r.nacked, 0, "{:?}", r.errors);
    assert_eq!(r.lost, 0);
    cleanup(&publisher).await;
    consumer.close().await.expect("close consumer");
    publisher.close().await.expect("close publisher");
}
