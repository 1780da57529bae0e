//! Backend-level tests of the embedded broker (the behaviour shared with
//! RabbitMQ is covered by the conformance suite in `tests/`).

use std::time::Duration;

use super::*;
use crate::message::{HeaderValue, Message};
use crate::topology::{Names, Overflow, Queue};

const T: Duration = Duration::from_secs(5);

fn out<'a>(exchange: &'a str, routing_key: &'a str, message: &'a Message) -> Outgoing<'a> {
    Outgoing {
        exchange,
        routing_key,
        mandatory: true,
        message,
    }
}

async fn spec() -> (MemoryBroker, Names) {
    let b = MemoryBroker::new();
    let n = Names::new("hx");
    b.declare(&Topology::spec(&n)).await.unwrap();
    (b, n)
}

#[tokio::test]
async fn publish_consume_ack() {
    let (b, n) = spec().await;
    let m = Message::new("hello");
    b.publish(out(&n.tasks_exchange(), "background", &m), T)
        .await
        .unwrap();
    let mut s = b
        .consume(&n.task_queue("background"), 10, "t")
        .await
        .unwrap();
    let d = tokio::time::timeout(T, s.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(d.message, m, "the message travels as-is");
    assert_eq!(d.exchange, n.tasks_exchange());
    assert_eq!(d.routing_key, "background");
    assert!(!d.redelivered);
    d.acker.ack().await.unwrap();
    assert!(d.acker.ack().await.is_err(), "a second ack is refused");
    assert_eq!(
        b.queue_stats(&n.task_queue("background")).await.unwrap(),
        QueueStats {
            messages: 0,
            consumers: 1
        }
    );
}

#[tokio::test]
async fn ttl_expiry_dead_letters_by_timer_with_x_death() {
    let (b, n) = spec().await;
    let m = Message::new("late").with_expiration(Duration::from_millis(30));
    b.publish(out(&n.tasks_exchange(), "llm", &m), T)
        .await
        .unwrap();
    let mut dlq = b.consume(&n.dlq(), 1, "dlq").await.unwrap();
    let d = tokio::time::timeout(T, dlq.next())
        .await
        .expect("expired by the timer")
        .unwrap()
        .unwrap();
    assert_eq!(d.message.id, m.id);
    assert_eq!(d.exchange, n.dead_letter_exchange());
    assert_eq!(d.routing_key, "llm", "routing key preserved");
    assert_eq!(d.message.expiration, None);
    let Some(HeaderValue::Array(deaths)) = d.message.headers.get(dead_letter::X_DEATH) else {
        panic!("no x-death")
    };
    let HeaderValue::Table(t) = &deaths[0] else {
        panic!("not a table")
    };
    assert_eq!(t["reason"], HeaderValue::from("expired"));
    assert_eq!(t["queue"], HeaderValue::from(n.task_queue("llm")));
    assert_eq!(t["exchange"], HeaderValue::from(n.tasks_exchange()));
    assert_eq!(
        d.message.header_str(dead_letter::X_FIRST_DEATH_REASON),
        Some("expired")
    );
}

#[tokio::test]
async fn retry_tier_returns_to_origin_after_queue_ttl() {
    let (b, n) = spec().await;
    let mut t = Topology::system(&n);
    let tier = t.add_retry_tier(Duration::from_millis(40));
    b.declare(&t).await.unwrap();
    let origin = n.event_queue("audit");
    let m = Message::new("again");
    b.publish(out(&tier, &origin, &m), T).await.unwrap();
    assert_eq!(b.queue_stats(&tier).await.unwrap().messages, 1);
    let mut s = b.consume(&origin, 1, "o").await.unwrap();
    let d = tokio::time::timeout(T, s.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(d.message.id, m.id);
    assert_eq!(d.exchange, n.requeue_exchange());
    assert_eq!(d.routing_key, origin);
}

#[tokio::test]
async fn dropping_a_stream_requeues_redelivered_and_get_acker_drop_requeues() {
    let (b, n) = spec().await;
    let q = n.task_queue("debate");
    let mut ids = Vec::new();
    for _ in 0..3 {
        let m = Message::new("x");
        b.publish(out("", &q, &m), T).await.unwrap();
        ids.push(m.id);
    }
    let mut s = b.consume(&q, 2, "a").await.unwrap();
    let first = s.next().await.unwrap().unwrap();
    assert_eq!(first.message.id, ids[0]);
    assert_eq!(
        b.queue_stats(&q).await.unwrap().messages,
        1,
        "prefetch 2 holds two"
    );
    drop(s);
    assert!(
        first.acker.ack().await.is_err(),
        "its consumer is gone: the message went back"
    );
    let g = b.get(&q).await.unwrap().unwrap();
    assert_eq!(g.message.id, ids[0]);
    assert!(g.redelivered);
    drop(g);
    let g = b.get(&q).await.unwrap().unwrap();
    assert_eq!(
        g.message.id, ids[0],
        "an unsettled get goes back to the head"
    );
    g.acker.ack().await.unwrap();
    assert_eq!(b.queue_stats(&q).await.unwrap().messages, 2);
}

#[tokio::test]
async fn deleted_queue_cancels_consumer_and_close_ends_streams() {
    let (b, n) = spec().await;
    let mut s = b.consume(&n.task_queue("llm"), 1, "a").await.unwrap();
    let mut s2 = b.consume(&n.task_queue("debate"), 1, "b").await.unwrap();
    let waiting = tokio::spawn(async move { s.next().await.map(|r| r.map(|_| ())) });
    tokio::task::yield_now().await;
    b.delete_queue(&n.task_queue("llm")).await.unwrap();
    let got = tokio::time::timeout(T, waiting).await.unwrap().unwrap();
    assert!(
        matches!(got, Some(Err(Error::ConsumerCancelled { .. }))),
        "{got:?}"
    );
    b.close().await.unwrap();
    assert!(tokio::time::timeout(T, s2.next()).await.unwrap().is_none());
    assert!(matches!(b.queue_stats(&n.dlq()).await, Err(Error::Closed)));
    assert_eq!(*b.state().borrow(), ConnectionState::Closed);
}

#[tokio::test]
async fn reject_publish_nacks_and_nack_without_requeue_dead_letters() {
    let b = MemoryBroker::new();
    let n = Names::new("hx");
    let mut t = Topology::system(&n);
    t.add_work_queue(
        Queue::durable("hx.small").max_length(1, Overflow::RejectPublish),
        &n.dead_letter_exchange(),
        "x",
    );
    // (bound to the requeue exchange under its name by add_work_queue)
    b.declare(&t).await.unwrap();
    let (a, c) = (Message::new("a"), Message::new("b"));
    b.publish(out("", "hx.small", &a), T).await.unwrap();
    let e = b.publish(out("", "hx.small", &c), T).await.unwrap_err();
    assert!(matches!(e, Error::PublishNacked { .. }), "{e:?}");
    let d = b.get("hx.small").await.unwrap().unwrap();
    d.acker.nack(false).await.unwrap();
    // hx.small dead-letters to hx.dlx → hx.dlq (and hx.small itself is bound to hx.dlx:
    // the cycle rule does not apply to rejections, so it comes back there too).
    let dl = b.get(&n.dlq()).await.unwrap().unwrap();
    assert_eq!(dl.message.id, a.id);
    assert_eq!(
        dl.message.header_str(dead_letter::X_FIRST_DEATH_REASON),
        Some("rejected")
    );
}

#[tokio::test]
async fn publish_batch_reports_each() {
    let (b, n) = spec().await;
    let ms = [Message::new("1"), Message::new("2")];
    let x = n.tasks_exchange();
    let outs = [out(&x, "llm", &ms[0]), out(&x, "nope", &ms[1])];
    let r = b.publish_batch(&outs, T).await;
    assert!(r[0].is_ok());
    assert!(matches!(r[1], Err(Error::Unroutable { .. })));
}
