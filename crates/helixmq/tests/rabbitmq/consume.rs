//! Reliable consuming on RabbitMQ: priority order, retries that return to their
//! origin queue on each exchange kind, DLQ headers, server-side cancel, and the
//! whole flow as the least-privilege user.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use helixmq::message::header;
use helixmq::{
    Broker, Error, Message, Names, Outcome, Priority, PublishOptions, RetryPolicy,
    SubscribeOptions, SubscriptionStatus, Topology,
};
use helixmq_testkit::broker::*;
use tokio::sync::mpsc;

const RETRY: Duration = Duration::from_secs(1);

fn retry_opts(max_attempts: u32) -> SubscribeOptions {
    SubscribeOptions {
        prefetch: Some(10),
        retry: Some(RetryPolicy {
            max_attempts,
            delays: vec![RETRY],
        }),
        ..Default::default()
    }
}

async fn recv<T>(rx: &mut mpsc::Receiver<T>, what: &str) -> T {
    tokio::time::timeout(Duration::from_secs(20), rx.recv())
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
        .unwrap()
}

#[tokio::test]
async fn llm_queue_serves_higher_priorities_first() {
    let p = prefix();
    let b = broker(config(GUEST, &p)).await.unwrap();
    let names = Names::new(&p);
    b.declare(&Topology::spec(&names)).await.unwrap();
    let prios = [1u8, 5, 10, 0, 8, 3, 10, 5, 1, 8, 2, 9, 0, 7, 6];
    for (i, pr) in prios.iter().enumerate() {
        let opts = PublishOptions {
            priority: Some(Priority::new(*pr).unwrap()),
            ..Default::default()
        };
        b.publish_with(
            &names.tasks_exchange(),
            "llm",
            Message::new(format!("{i}")),
            &opts,
        )
        .await
        .unwrap();
    }
    let (tx, mut rx) = mpsc::channel(64);
    let opts = SubscribeOptions {
        prefetch: Some(1),
        concurrency: Some(1),
        ..Default::default()
    };
    let sub = b
        .subscribe(
            &names.task_queue("llm"),
            move |m: Message, _| {
                let tx = tx.clone();
                async move {
                    tx.send(m.priority.map(|p| p.value()).unwrap_or(0))
                        .await
                        .unwrap();
                    Ok(Outcome::Ack)
                }
            },
            opts,
        )
        .await
        .unwrap();
    let mut got = Vec::new();
    for _ in 0..prios.len() {
        got.push(recv(&mut rx, "llm delivery").await);
    }
    let mut want = prios.to_vec();
    want.sort_by(|a, b| b.cmp(a));
    assert_eq!(got, want, "highest priority first");
    sub.shutdown(Duration::from_secs(5)).await;
    cleanup(&b, None).await;
    b.close().await.unwrap();
}

/// Publish one message through `exchange`/`key`, fail it once, and check it comes
/// back to `queue` (attempt 2) after the retry delay.
async fn retry_returns_to_origin(b: &Broker, exchange: &str, key: &str, queue: &str) {
    let (tx, mut rx) = mpsc::channel(16);
    let sub = b
        .subscribe(
            queue,
            move |m: Message, ctx: helixmq::Context| {
                let tx = tx.clone();
                async move {
                    tx.send((
                        m.id.clone(),
                        m.attempt,
                        ctx.queue.clone(),
                        m.header_str(header::ORIGIN_QUEUE).map(String::from),
                    ))
                    .await
                    .unwrap();
                    Ok(if m.attempt == 1 {
                        Outcome::retry("transient failure")
                    } else {
                        Outcome::Ack
                    })
                }
            },
            retry_opts(3),
        )
        .await
        .unwrap();
    let m = Message::new("retry me");
    let id = m.id.clone();
    b.publish(exchange, key, m).await.unwrap();
    let (id1, a1, q1, _) = recv(&mut rx, "first attempt").await;
    assert_eq!((id1.as_str(), a1, q1.as_str()), (id.as_str(), 1, queue));
    let started = std::time::Instant::now();
    let (id2, a2, q2, origin) = recv(&mut rx, "retried attempt").await;
    assert!(
        started.elapsed() >= RETRY.mul_f64(0.8),
        "came back after the delay: {:?}",
        started.elapsed()
    );
    assert_eq!(
        (id2.as_str(), a2, q2.as_str()),
        (id.as_str(), 2, queue),
        "same message, back in its own queue"
    );
    assert_eq!(origin.as_deref(), Some(queue));
    sub.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn retries_return_to_the_origin_queue_on_each_exchange_kind() {
    let p = prefix();
    let b = broker(config(GUEST, &p)).await.unwrap();
    let names = Names::new(&p);
    b.declare(&Topology::spec(&names)).await.unwrap();
    retry_returns_to_origin(
        &b,
        &names.tasks_exchange(),
        "background",
        &names.task_queue("background"),
    )
    .await;
    retry_returns_to_origin(
        &b,
        &names.events_exchange(),
        "debate.round.1",
        &names.event_queue("debate"),
    )
    .await;
    retry_returns_to_origin(
        &b,
        &names.notifications_exchange(),
        "",
        &names.notification_queue("websocket"),
    )
    .await;
    // The retry did not leak into sibling queues: the audit queue (topic `#`) got
    // the debate event once, the other notification queues the broadcast once.
    assert_eq!(
        b.backend()
            .queue_stats(&names.event_queue("audit"))
            .await
            .unwrap()
            .messages,
        1
    );
    assert_eq!(
        b.backend()
            .queue_stats(&names.notification_queue("sse"))
            .await
            .unwrap()
            .messages,
        1
    );
    cleanup(&b, None).await;
    b.close().await.unwrap();
}

async fn dlq_after_max_attempts(b: &Broker) {
    let names = b.names().clone();
    let queue = names.task_queue("verification");
    let attempts = Arc::new(Mutex::new(Vec::new()));
    let seen = attempts.clone();
    let sub = b
        .subscribe(
            &queue,
            move |m: Message, _| {
                seen.lock().unwrap().push(m.attempt);
                async move { Err::<Outcome, helixmq::BoxError>("provider unreachable".into()) }
            },
            retry_opts(3),
        )
        .await
        .unwrap();
    let m = Message::new("poison").with_kind("verify.provider");
    let id = m.id.clone();
    b.publish(&names.tasks_exchange(), "verification", m)
        .await
        .unwrap();
    let dlq = names.dlq();
    let d = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            if let Some(d) = b.backend().get(&dlq).await.unwrap() {
                return d;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await
    .expect("message reaches the DLQ");
    sub.shutdown(Duration::from_secs(5)).await;
    assert_eq!(*attempts.lock().unwrap(), vec![1, 2, 3]);
    let m = &d.message;
    assert_eq!(m.id, id);
    assert_eq!(m.kind.as_deref(), Some("verify.provider"));
    assert_eq!(m.attempt, 3);
    assert_eq!(m.header_str(header::ORIGIN_QUEUE), Some(queue.as_str()));
    assert_eq!(
        m.header_str(header::ORIGIN_EXCHANGE),
        Some(names.tasks_exchange().as_str())
    );
    assert_eq!(
        m.header_str(header::ORIGIN_ROUTING_KEY),
        Some("verification")
    );
    assert!(m
        .header_str(header::LAST_ERROR)
        .unwrap()
        .contains("provider unreachable"));
    assert!(m
        .header_str(header::DEAD_LETTER_REASON)
        .unwrap()
        .contains("3 attempts"));
    let first = m.headers[header::FIRST_FAILURE].as_i64().unwrap();
    let last = m.headers[header::LAST_FAILURE].as_i64().unwrap();
    assert!(
        last - first >= 1_500,
        "two retry delays apart: {first} .. {last}"
    );
    d.acker.ack().await.unwrap();
    assert_eq!(b.backend().queue_stats(&queue).await.unwrap().messages, 0);
}

#[tokio::test]
async fn dlq_gets_failure_headers_after_max_attempts() {
    let p = prefix();
    let b = broker(config(GUEST, &p)).await.unwrap();
    b.declare(&Topology::spec(&Names::new(&p))).await.unwrap();
    dlq_after_max_attempts(&b).await;
    cleanup(&b, None).await;
    b.close().await.unwrap();
}

#[tokio::test]
async fn deleting_the_queue_under_a_subscription_is_reported() {
    let p = prefix();
    let b = broker(config(GUEST, &p)).await.unwrap();
    let names = Names::new(&p);
    b.declare(&Topology::spec(&names)).await.unwrap();
    let queue = names.notification_queue("webhooks");
    let sub = b
        .subscribe(
            &queue,
            |_m: Message, _| async { Ok(Outcome::Ack) },
            SubscribeOptions::default(),
        )
        .await
        .unwrap();
    let mut status = sub.watch_status();
    b.backend().delete_queue(&queue).await.unwrap();
    tokio::time::timeout(
        Duration::from_secs(10),
        status.wait_for(|s| *s != SubscriptionStatus::Active),
    )
    .await
    .unwrap()
    .unwrap();
    match sub.status() {
        SubscriptionStatus::Failed(why) => {
            assert!(why.contains(&queue) && why.contains("cancelled"), "{why}")
        }
        other => panic!("expected Failed, got {other:?}"),
    }
    // Subscribing to a missing queue is a clear NotFound.
    let err = b
        .subscribe(
            &queue,
            |_m: Message, _| async { Ok(Outcome::Ack) },
            SubscribeOptions::default(),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::NotFound { kind: "queue", name } if name == &queue),
        "{err:?}"
    );
    cleanup(&b, None).await;
    b.close().await.unwrap();
}

#[tokio::test]
async fn the_whole_flow_works_as_the_least_privilege_user() {
    let p = prefix();
    let b = broker(config(HELIXAGENT, &p))
        .await
        .expect("helixagent user exists (run scripts/provision)");
    let names = Names::new(&p);
    b.declare(&Topology::spec(&names))
        .await
        .expect("topology under helixagent.* is allowed");
    // publish + consume + retry back to origin
    retry_returns_to_origin(&b, &names.tasks_exchange(), "llm", &names.task_queue("llm")).await;
    // DLQ with headers
    dlq_after_max_attempts(&b).await;
    // batch + stats + purge
    let msgs: Vec<Message> = (0..20).map(|i| Message::new(format!("{i}"))).collect();
    let r = b
        .publish_batch(
            &names.events_exchange(),
            "verification.done",
            &msgs,
            &PublishOptions::default(),
        )
        .await;
    assert!(r.iter().all(|r| r.is_ok()), "{r:?}");
    assert_eq!(
        b.backend()
            .queue_stats(&names.event_queue("verify"))
            .await
            .unwrap()
            .messages,
        20
    );
    assert_eq!(
        b.backend()
            .purge(&names.event_queue("verify"))
            .await
            .unwrap(),
        20
    );
    // Outside its permissions: a clear access-refused error.
    let err = b
        .publish("amq.topic", "x", Message::new("no"))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::AccessRefused { .. }), "{err:?}");
    cleanup(&b, None).await;
    b.close().await.unwrap();
}
