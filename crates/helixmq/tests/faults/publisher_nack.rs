//! Fault: publisher nacks. The work queue holds at most 50 ready messages with
//! `x-overflow: reject-publish`, and a slow consumer drains it while the
//! publisher pushes far faster: the broker refuses what does not fit with a
//! basic.nack. Each such publish must fail with `Error::PublishNacked` (never
//! Ok, never a silent drop); every publish is either Ok and consumed, or
//! nacked and never delivered; publishing succeeds again by itself as soon as
//! the consumer makes room.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use helixmq::topology::Overflow;
use helixmq::{Error, Message, Outcome, SubscribeOptions};
use helixmq_testkit::broker::prefix;
use helixmq_testkit::logs::init_logging;
use helixmq_testkit::node::SHARED_PORT;
use helixmq_testkit::scenario::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_queue_nacks_surface_as_publish_nacked() {
    init_logging();
    const MESSAGES: usize = 3_000;
    const MAX_LENGTH: u64 = 50;
    let p = prefix();
    let mut s = Scenario::start("publisher_nack", config(SHARED_PORT, &p), |q| {
        q.max_length(MAX_LENGTH, Overflow::RejectPublish)
    })
    .await;
    let (b, ledger, queue, names) = (
        s.broker.clone(),
        s.ledger.clone(),
        s.queue.clone(),
        s.names.clone(),
    );
    let l2 = ledger.clone();
    let sub = b
        .subscribe(
            &queue,
            move |m: Message, _ctx| {
                l2.consumed(&m.id);
                async {
                    // A slow handler: real work taking time, so the queue fills up.
                    tokio::time::sleep(Duration::from_millis(4)).await;
                    Ok(Outcome::Ack)
                }
            },
            SubscribeOptions {
                prefetch: Some(10),
                concurrency: Some(4),
                ..Default::default()
            },
        )
        .await
        .expect("subscribe");
    s.adopt(sub);

    // First nack, and the first Ok after it: the publisher recovering by itself.
    let first_nack: Arc<Mutex<Option<Instant>>> = Arc::default();
    let ok_after_nack: Arc<Mutex<Option<Instant>>> = Arc::default();
    let other_errors: Arc<Mutex<Vec<String>>> = Arc::default();
    let exchange = names.tasks_exchange();
    futures::stream::iter(0..MESSAGES)
        .map(|i| {
            let (b, l, x) = (b.clone(), ledger.clone(), exchange.clone());
            let (fnk, okn, oth) = (
                first_nack.clone(),
                ok_after_nack.clone(),
                other_errors.clone(),
            );
            async move {
                let m = Message::new(format!("nack scenario {i}"));
                let id = m.id.clone();
                let r = b.publish(&x, WORK, m).await;
                match &r {
                    Ok(()) => {
                        if fnk.lock().unwrap().is_some() {
                            okn.lock().unwrap().get_or_insert_with(Instant::now);
                        }
                    }
                    Err(Error::PublishNacked { message_id, .. }) => {
                        assert_eq!(message_id, &id, "the nack names the message");
                        fnk.lock().unwrap().get_or_insert_with(Instant::now);
                    }
                    Err(e) => oth.lock().unwrap().push(e.to_string()),
                }
                l.published(&id, &r);
            }
        })
        .buffer_unordered(64)
        .collect::<()>()
        .await;

    s.drain().await;
    // Drained: nothing of ours may be left ready in the queue.
    let stats = b.backend().queue_stats(&queue).await.expect("queue stats");
    let recovery = match (*first_nack.lock().unwrap(), *ok_after_nack.lock().unwrap()) {
        (Some(n), Some(o)) => o.saturating_duration_since(n),
        _ => Duration::ZERO,
    };
    s.recovered(ledger.report().nacked, recovery);

    let end = s.finish(0).await;
    let r = &end.report;
    eprintln!("publisher_nack: queue left {stats:?}");
    let other = other_errors.lock().unwrap().clone();
    assert!(
        other.is_empty(),
        "publishes failed otherwise than nacked: {:?}",
        &other[..other.len().min(5)]
    );
    assert_eq!(r.messages, MESSAGES);
    assert!(
        r.nacked > 0,
        "the full queue never nacked: the scenario did not happen"
    );
    assert!(
        r.confirmed > MAX_LENGTH as usize,
        "publishing never resumed after the queue filled"
    );
    assert!(
        ok_after_nack.lock().unwrap().is_some(),
        "no publish succeeded after the first nack"
    );
    assert_eq!(r.confirmed + r.nacked, MESSAGES);
    assert_eq!(r.consumed_nacked, 0, "a nacked message was delivered");
    assert_eq!(r.consumed_unconfirmed, 0);
    assert_eq!(stats.messages, 0);
}
