//! Scheduled publishes with quorum queues, as the least-privilege user
//! `helixagent`: a broker configured `queue_type: quorum` declares the delay
//! levels as quorum queues (at-least-once dead-lettering between levels), and
//! a 2 s task reaches a quorum work queue within 1 s of its time. (The
//! classic-queue cases are the conformance suite's `scheduled_*`.)

use std::time::Duration;

use helixmq::topology::schedule::DELAY_LEVELS;
use helixmq::topology::{DeadLetterStrategy, QueueType};
use helixmq::{Message, Topology};
use helixmq_testkit::broker::{self, cleanup, HELIXAGENT};
use helixmq_testkit::scheduled::Arrivals;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduled_publish_on_quorum_queues_arrives_on_time() {
    let p = broker::prefix();
    let mut cfg = broker::config(HELIXAGENT, &p);
    cfg.helixmq.queue_type = QueueType::Quorum;
    let b = broker::broker(cfg).await.expect("connect as helixagent");
    let names = b.names().clone();
    let spec = Topology::spec(&names).with_quorum_queues();
    b.declare(&spec)
        .await
        .expect("declare the quorum spec topology");
    let queue = names.task_queue("background");
    let (sub, arrivals) = Arrivals::subscribe(&b, &queue).await;
    let m = Message::new("quorum, in 2 s");
    let id = m.id.clone();
    let r = b
        .publish_delayed(
            &names.tasks_exchange(),
            "background",
            m,
            Duration::from_secs(2),
        )
        .await;
    arrivals.ledger.published(&id, &r);
    r.expect("scheduled publish confirmed");
    let t = b.topology();
    for name in (0..DELAY_LEVELS)
        .map(|k| names.delay_level(k))
        .chain([names.delay_final()])
    {
        let q = t.queue(&name).expect("delay level declared on first use");
        assert_eq!(q.queue_type, QueueType::Quorum, "{name}");
        assert_eq!(
            q.dead_letter_strategy,
            Some(DeadLetterStrategy::AtLeastOnce),
            "{name}"
        );
    }
    arrivals.wait_for(1, Duration::from_secs(15)).await;
    sub.shutdown(Duration::from_secs(5)).await;
    let late = arrivals.get(&id).unwrap().late_ms();
    println!("quorum 2s: arrived {late} ms after its time");
    assert!(
        (0..=1000).contains(&late),
        "arrived {late} ms after its time"
    );
    let r = arrivals.ledger.report();
    assert_eq!((r.confirmed, r.lost, r.duplicates), (1, 0, 0), "{r:?}");
    cleanup(&b, None).await;
    let _ = b.close().await;
}
