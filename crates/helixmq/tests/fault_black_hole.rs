//! Fault: a network black hole. The TCP proxy between this test's client and
//! the shared broker stops forwarding without closing anything (as a silent
//! partition does): no FIN, no RST, nothing. Only heartbeats can tell. With a
//! 3 s heartbeat the client must declare the connection dead within about
//! twice the interval (lapin closes once nothing was read for 2 × heartbeat;
//! it checks every heartbeat / 2), then reconnect by itself once the network
//! heals, with nothing lost.

mod fault_support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use fault_support::ledger::Ledger;
use fault_support::node::SHARED_PORT;
use fault_support::proxy::Proxy;
use fault_support::*;
use helixmq::{ConnectionState, Names, PublishOptions};
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn black_hole_detected_by_heartbeats_then_recovered() {
    init_logging();
    /// Consumed before the fault, and after it.
    const AFTER: usize = 1_500;
    /// A cap, should the fault take very long.
    const MAX_MESSAGES: usize = 60_000;
    const HEARTBEAT: Duration = Duration::from_secs(3);
    let p = prefix();
    let proxy = Proxy::start(([127, 0, 0, 1], SHARED_PORT).into()).await;
    let mut cfg = config(proxy.port(), &p);
    cfg.rabbitmq.heartbeat = HEARTBEAT;
    // A reconnect attempt made while the hole lasts must give up soon.
    cfg.rabbitmq.connect_timeout = Duration::from_secs(3);
    let b = connect(cfg).await;
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

    ledger
        .wait_until(Duration::from_secs(40), "consumption progress", |_, c| {
            c >= AFTER
        })
        .await
        .unwrap();
    let mut rx = b.state();
    let before = b.metrics().connection_recoveries.get();
    proxy.black_hole();
    let holed_at = Instant::now();
    let limit = HEARTBEAT * 2 + HEARTBEAT / 2 + Duration::from_secs(1);
    tokio::time::timeout(
        limit * 2,
        rx.wait_for(|s| *s == ConnectionState::Disconnected),
    )
    .await
    .expect("the black hole is detected")
    .expect("state channel");
    let detection = holed_at.elapsed();
    let consumed_in_hole = ledger.distinct_consumed();
    proxy.resume();
    let recovery = await_reconnect(&b, b.state(), before, Duration::from_secs(45))
        .await
        .expect("client reconnects by itself once the network heals");

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
    summary("black_hole", &r, 1, recovery);
    eprintln!(
        "black_hole: heartbeat {HEARTBEAT:?}, detected after {detection:.2?} (limit {limit:?}), consumed when detected {consumed_in_hole}, run {elapsed:.1?}, report {r:?}"
    );
    assert!(
        detection <= limit,
        "black hole detected after {detection:?}, more than 2 x heartbeat {HEARTBEAT:?} (+ one check period + 1 s)"
    );
    assert!(
        detection >= HEARTBEAT,
        "detected after {detection:?}: too soon to be the heartbeat, something else closed the connection"
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
    cleanup(&b).await;
    b.close().await.expect("close");
}
