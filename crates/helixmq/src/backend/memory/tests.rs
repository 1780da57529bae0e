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
        message: std::borrow::Cow::Borrowed(message),
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
    assert_eq!(*d.message, m, "the message travels as-is");
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

/// Producers and consumers at once, consumers nacking some messages back and
/// one going away mid-stream: every id is acked exactly once, none is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_producers_and_consumers_lose_nothing() {
    use std::collections::HashMap;
    const PRODUCERS: usize = 4;
    const EACH: usize = 2_000;
    let (b, n) = spec().await;
    let b = Arc::new(b);
    let q = n.task_queue("llm");
    let acked = Arc::new(std::sync::Mutex::new(HashMap::<String, usize>::new()));
    let (total_tx, mut total_rx) = tokio::sync::watch::channel(0usize);
    let total_tx = Arc::new(total_tx);
    let mut consumers = Vec::new();
    for c in 0..3u64 {
        let (b, q, acked, total) = (b.clone(), q.clone(), acked.clone(), total_tx.clone());
        consumers.push(tokio::spawn(async move {
            let mut s = b.consume(&q, 7, "c").await.unwrap();
            let mut seen = 0u64;
            while let Some(d) = s.next().await {
                let d = d.unwrap();
                seen += 1;
                if c == 0 && seen == 500 {
                    // Goes away holding this one (and up to 6 prefetched) unacked.
                    drop(s);
                    s = b.consume(&q, 7, "c0-again").await.unwrap();
                    continue;
                }
                if seen.is_multiple_of(10) && !d.redelivered {
                    d.acker.nack(true).await.unwrap();
                    continue;
                }
                d.acker.ack().await.unwrap();
                *acked
                    .lock()
                    .unwrap()
                    .entry(d.message.id.clone())
                    .or_default() += 1;
                total.send_modify(|t| *t += 1);
            }
        }));
    }
    let mut producers = Vec::new();
    let mut ids = Vec::new();
    for p in 0..PRODUCERS {
        let msgs: Vec<Message> = (0..EACH)
            .map(|i| {
                Message::new("x")
                    .with_priority(crate::message::Priority::new(((p + i) % 11) as u8).unwrap())
            })
            .collect();
        ids.extend(msgs.iter().map(|m| m.id.clone()));
        let (b, x) = (b.clone(), n.tasks_exchange());
        producers.push(tokio::spawn(async move {
            for m in &msgs {
                b.publish(out(&x, "llm", m), T).await.unwrap();
            }
        }));
    }
    for p in producers {
        p.await.unwrap();
    }
    tokio::time::timeout(
        Duration::from_secs(30),
        total_rx.wait_for(|t| *t >= PRODUCERS * EACH),
    )
    .await
    .expect("every message acked")
    .unwrap();
    b.close().await.unwrap();
    for c in consumers {
        c.await.unwrap();
    }
    let acked = acked.lock().unwrap();
    let lost = ids.iter().filter(|id| !acked.contains_key(*id)).count();
    let dups = acked.values().filter(|n| **n > 1).count();
    assert_eq!((lost, dups, acked.len()), (0, 0, ids.len()));
}

/// CPU time of this process so far (user + system), from `/proc/self/stat`:
/// on a shared machine, messages per CPU-second is the honest figure.
fn cpu_time() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(Duration::from_millis(ticks * 10))
}

/// One task publishes `n` messages (confirmed, one at a time), another
/// consumes them with prefetch 1000 and acks each. Prints wall and CPU rates.
async fn bench(label: &str, n: usize) {
    let b = Arc::new(MemoryBroker::new());
    let names = Names::new("hx");
    b.declare(&Topology::spec(&names)).await.unwrap();
    let q = names.task_queue("background");
    let mut stream = b.consume(&q, 1000, "bench").await.unwrap();
    let (started, cpu0) = (std::time::Instant::now(), cpu_time());
    let consumer = tokio::spawn(async move {
        for _ in 0..n {
            let d = stream.next().await.unwrap().unwrap();
            d.acker.ack().await.unwrap();
        }
    });
    let x = names.tasks_exchange();
    let m = Message::new(vec![0u8; 256]);
    for _ in 0..n {
        b.publish(out(&x, "background", &m), T).await.unwrap();
    }
    consumer.await.unwrap();
    let wall = started.elapsed();
    let cpu = cpu_time().zip(cpu0).map(|(b, a)| b - a).unwrap_or_default();
    println!(
        "embedded broker, {label}: {n} messages of 256 B published+consumed+acked in {wall:?} \
         ({:.0} msg/s wall), CPU {cpu:?} ({:.0} msg per CPU-second)",
        n as f64 / wall.as_secs_f64(),
        n as f64 / cpu.as_secs_f64().max(1e-3),
    );
    assert_eq!(b.queue_stats(&q).await.unwrap().messages, 0);
}

/// Throughput of the embedded broker. Run with
/// `cargo test --release -p helixmq --lib throughput -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark; run in release mode"]
async fn throughput_two_threads() {
    bench("2 worker threads", 1_000_000).await;
}

/// The same on one thread: no lock contention, no cross-thread frees.
#[tokio::test(flavor = "current_thread")]
#[ignore = "benchmark; run in release mode"]
async fn throughput_one_thread() {
    bench("1 thread", 1_000_000).await;
}

/// Through the whole stack: `Broker::publish` and a subscription (consumer
/// runtime: a task per message, metrics, ack after the handler).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark; run in release mode"]
async fn throughput_through_broker_api() {
    use crate::{Broker, Config, Outcome, SubscribeOptions};
    const N: usize = 200_000;
    let broker = Broker::embedded(Config::default());
    broker.declare(&Topology::default()).await.unwrap();
    let (done_tx, done_rx) = tokio::sync::watch::channel(0usize);
    let done = Arc::new(done_tx);
    let d = done.clone();
    let opts = SubscribeOptions {
        prefetch: Some(1000),
        ..Default::default()
    };
    let (started, cpu0) = (std::time::Instant::now(), cpu_time());
    let sub = broker
        .subscribe(
            "helixagent.tasks.background",
            move |_m: Message, _ctx| {
                let d = d.clone();
                async move {
                    d.send_modify(|n| *n += 1);
                    Ok(Outcome::Ack)
                }
            },
            opts,
        )
        .await
        .unwrap();
    let m = Message::new(vec![0u8; 256]);
    for _ in 0..N {
        broker
            .publish("helixagent.tasks", "background", m.clone())
            .await
            .unwrap();
    }
    let mut rx = done_rx;
    rx.wait_for(|n| *n >= N).await.unwrap();
    let wall = started.elapsed();
    let cpu = cpu_time().zip(cpu0).map(|(b, a)| b - a).unwrap_or_default();
    sub.shutdown(T).await;
    println!(
        "Broker API on the embedded broker: {N} messages in {wall:?} ({:.0} msg/s wall), \
         CPU {cpu:?} ({:.0} msg per CPU-second)",
        N as f64 / wall.as_secs_f64(),
        N as f64 / cpu.as_secs_f64().max(1e-3),
    );
}

#[tokio::test]
async fn the_timer_does_not_outlive_the_broker() {
    let rt = tokio::runtime::Handle::current();
    let before = rt.metrics().num_alive_tasks();
    let b = MemoryBroker::new();
    assert_eq!(rt.metrics().num_alive_tasks(), before + 1, "one timer task");
    let weak = Arc::downgrade(&b.shared);
    drop(b);
    assert!(weak.upgrade().is_none(), "the timer holds the state weakly");
    for _ in 0..100 {
        if rt.metrics().num_alive_tasks() == before {
            return;
        }
        tokio::task::yield_now().await;
    }
    panic!("the timer task is still alive after the broker was dropped");
}

#[tokio::test]
async fn x_expires_deletes_a_queue_unused_that_long_and_not_one_in_use() {
    let b = MemoryBroker::new();
    let after = Duration::from_millis(150);
    let t = |name: &str| Topology {
        names: Names::new("hx"),
        exchanges: Vec::new(),
        queues: vec![Queue::durable(name).expires(after)],
        bindings: Vec::new(),
    };
    b.declare(&t("hx.idle")).await.unwrap();
    b.declare(&t("hx.used")).await.unwrap();
    let stream = b.consume("hx.used", 1, "t").await.unwrap();
    let started = std::time::Instant::now();
    // The timer deletes the idle one (nothing to await: the broker does it by itself).
    while b.queue_stats("hx.idle").await.is_ok() {
        assert!(started.elapsed() < T, "hx.idle still there after {T:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(started.elapsed() >= after - Duration::from_millis(20));
    tokio::time::sleep(after * 2).await;
    assert!(
        b.queue_stats("hx.used").await.is_ok(),
        "a consumed queue stays"
    );
    // Unused from the consumer's end: gone `after` later.
    drop(stream);
    let dropped = std::time::Instant::now();
    while b.queue_stats("hx.used").await.is_ok() {
        assert!(dropped.elapsed() < T, "hx.used still there after {T:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(dropped.elapsed() >= after - Duration::from_millis(20));
}
