//! Fault: a network black hole. The TCP proxy between this test's client and
//! the shared broker stops forwarding without closing anything (as a silent
//! partition does): no FIN, no RST, nothing. Only heartbeats can tell. With a
//! 3 s heartbeat the client must declare the connection dead within about
//! twice the interval (lapin closes once nothing was read for 2 × heartbeat;
//! it checks every heartbeat / 2), then reconnect by itself once the network
//! heals, with nothing lost.

use std::time::{Duration, Instant};

use helixmq::{ConnectionState, PublishOptions};
use helixmq_testkit::broker::prefix;
use helixmq_testkit::logs::init_logging;
use helixmq_testkit::node::SHARED_PORT;
use helixmq_testkit::proxy::Proxy;
use helixmq_testkit::scenario::*;

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
    let mut s = Scenario::start("black_hole", cfg, |q| q).await;
    let (b, ledger) = (s.broker.clone(), s.ledger.clone());
    s.consume(&b, consumer_options()).await;
    // A steady load until the faults are over.
    s.load(MAX_MESSAGES, 64, PublishOptions::default());

    s.progress(AFTER, "consumption progress").await;
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
    s.recovered(1, recovery);

    let end = s.finish(AFTER).await;
    eprintln!(
        "black_hole: heartbeat {HEARTBEAT:?}, detected after {detection:.2?} (limit {limit:?}), consumed when detected {consumed_in_hole}"
    );
    assert!(
        detection <= limit,
        "black hole detected after {detection:?}, more than 2 x heartbeat {HEARTBEAT:?} (+ one check period + 1 s)"
    );
    assert!(
        detection >= HEARTBEAT,
        "detected after {detection:?}: too soon to be the heartbeat, something else closed the connection"
    );
    end.assert_all_confirmed();
    assert!(b.metrics().connection_recoveries.get() > before);
}
