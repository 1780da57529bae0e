//! Confirmed publishing on RabbitMQ: many concurrent publishers, batches, the
//! property/header mapping through a real broker, and refused priorities.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use helixmq::topology::Queue;
use helixmq::{Error, HeaderValue, Message, Names, Priority, PublishOptions, Topology};
use helixmq_testkit::broker::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_concurrent_publishes_are_all_confirmed_and_consumed() {
    const TASKS: usize = 8;
    const PER_TASK: usize = 1_250;
    const IN_FLIGHT_PER_TASK: usize = 32;
    let p = prefix();
    let b = broker(config(GUEST, &p)).await.unwrap();
    let names = Names::new(&p);
    b.declare(&Topology::spec(&names)).await.unwrap();
    let exchange = names.tasks_exchange();
    let queue = names.task_queue("background");

    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..TASKS {
        let b = b.clone();
        let exchange = exchange.clone();
        tasks.push(tokio::spawn(async move {
            let msgs: Vec<Message> = (0..PER_TASK)
                .map(|i| Message::new(format!("payload {i}")))
                .collect();
            let ids: Vec<String> = msgs.iter().map(|m| m.id.clone()).collect();
            let results: Vec<helixmq::Result<()>> = futures::stream::iter(msgs)
                .map(|m| {
                    let b = b.clone();
                    let exchange = exchange.clone();
                    async move { b.publish(&exchange, "background", m).await }
                })
                .buffer_unordered(IN_FLIGHT_PER_TASK)
                .collect()
                .await;
            (ids, results)
        }));
    }
    let mut published = HashSet::new();
    for t in tasks {
        let (ids, results) = t.await.unwrap();
        for r in results {
            r.expect("every publish confirmed");
        }
        published.extend(ids);
    }
    let elapsed = started.elapsed();
    assert_eq!(published.len(), TASKS * PER_TASK);
    println!(
        "published and confirmed {} messages from {TASKS} tasks in {:.2?}: {:.0} msg/s",
        published.len(),
        elapsed,
        published.len() as f64 / elapsed.as_secs_f64()
    );

    let mut stream = b
        .backend()
        .consume(&queue, 500, "hxtest-count")
        .await
        .unwrap();
    let mut seen = HashSet::new();
    let mut duplicates = 0;
    let consume_started = Instant::now();
    while seen.len() < published.len() {
        let d = tokio::time::timeout(Duration::from_secs(30), stream.next())
            .await
            .expect("deliveries keep coming")
            .expect("stream open")
            .expect("delivery");
        if !seen.insert(d.message.id.clone()) {
            duplicates += 1;
        }
        d.acker.ack().await.unwrap();
    }
    let lost = published.difference(&seen).count();
    println!(
        "consumed {} in {:.2?}; lost = {lost}, duplicates = {duplicates}",
        seen.len(),
        consume_started.elapsed()
    );
    assert_eq!(lost, 0);
    stream.cancel().await.unwrap();
    drop(stream);
    assert_eq!(b.backend().queue_stats(&queue).await.unwrap().messages, 0);
    cleanup(&b, None).await;
    b.close().await.unwrap();
}

#[tokio::test]
async fn batch_publish_pipelines_and_keeps_order() {
    let p = prefix();
    let b = broker(config(GUEST, &p)).await.unwrap();
    let names = Names::new(&p);
    b.declare(&Topology::spec(&names)).await.unwrap();
    let queue = names.task_queue("debate");
    let msgs: Vec<Message> = (0..500).map(|i| Message::new(format!("{i}"))).collect();
    let started = Instant::now();
    let results = b
        .publish_batch(
            &names.tasks_exchange(),
            "debate",
            &msgs,
            &PublishOptions::default(),
        )
        .await;
    println!(
        "batch of {} confirmed in {:.2?}",
        msgs.len(),
        started.elapsed()
    );
    assert_eq!(results.len(), 500);
    assert!(
        results.iter().all(|r| r.is_ok()),
        "{:?}",
        results.iter().find(|r| r.is_err())
    );
    assert_eq!(b.backend().queue_stats(&queue).await.unwrap().messages, 500);

    // A batch with one unroutable message: that one fails, the rest succeed.
    let mixed = vec![Message::new("a"), Message::new("b")];
    let r = b
        .publish_batch(
            &names.tasks_exchange(),
            "no-such-kind",
            &mixed,
            &PublishOptions::default(),
        )
        .await;
    assert!(
        r.iter().all(|r| matches!(r, Err(Error::Unroutable { .. }))),
        "{r:?}"
    );

    let mut got = Vec::new();
    while let Some(d) = b.backend().get(&queue).await.unwrap() {
        got.push(d.message.id.clone());
        d.acker.ack().await.unwrap();
    }
    let want: Vec<String> = msgs.iter().map(|m| m.id.clone()).collect();
    assert_eq!(got, want, "FIFO order of a batch");
    cleanup(&b, None).await;
    b.close().await.unwrap();
}

#[tokio::test]
async fn every_property_and_header_type_survives_the_broker() {
    let p = prefix();
    let b = broker(config(GUEST, &p)).await.unwrap();
    let names = Names::new(&p);
    b.declare(&Topology::spec(&names)).await.unwrap();
    let mut nested = BTreeMap::new();
    nested.insert("n".to_string(), HeaderValue::Int(-1));
    nested.insert(
        "list".to_string(),
        HeaderValue::Array(vec![HeaderValue::Void, HeaderValue::Bool(true)]),
    );
    let mut m = Message::new(&b"\x00binary\xffpayload"[..])
        .with_kind("llm.request")
        .with_priority(Priority::HIGH)
        .with_correlation_id("corr-42")
        .with_expiration(Duration::from_secs(3600))
        .with_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
        .with_header("void", HeaderValue::Void)
        .with_header("bool", false)
        .with_header("int", i64::MAX)
        .with_header("negative", -5i64)
        .with_header("float", 2.5f64)
        .with_header("text", "héllo wörld")
        .with_header("bytes", HeaderValue::Bytes(vec![0, 255, 128, 7]))
        .with_header("ts", HeaderValue::Timestamp(1_700_000_000))
        .with_header(
            "array",
            HeaderValue::Array(vec![
                HeaderValue::Int(1),
                HeaderValue::String("x".into()),
                HeaderValue::Table(nested.clone()),
            ]),
        )
        .with_header("table", HeaderValue::Table(nested));
    m.content_type = Some("application/octet-stream".into());
    m.content_encoding = Some("identity".into());
    m.reply_to = Some(format!("{p}.replies"));
    m.attempt = 2;
    b.publish(&names.tasks_exchange(), "llm", m.clone())
        .await
        .unwrap();
    let d = b
        .backend()
        .get(&names.task_queue("llm"))
        .await
        .unwrap()
        .expect("message is there");
    assert_eq!(*d.message, m);
    assert_eq!(d.exchange, names.tasks_exchange());
    assert_eq!(d.routing_key, "llm");
    assert!(!d.redelivered);
    // nack with requeue: it comes back redelivered.
    d.acker.nack(true).await.unwrap();
    let d = b
        .backend()
        .get(&names.task_queue("llm"))
        .await
        .unwrap()
        .expect("requeued");
    assert!(d.redelivered);
    d.acker.ack().await.unwrap();
    // Settling twice fails harmlessly (no 406 closing the channel).
    assert!(d.acker.ack().await.is_err());
    assert!(b
        .backend()
        .get(&names.task_queue("llm"))
        .await
        .unwrap()
        .is_none());

    // Transient messages keep their delivery mode.
    let mut t = Message::new("t");
    t.delivery_mode = helixmq::message::DeliveryMode::Transient;
    b.publish(&names.tasks_exchange(), "llm", t.clone())
        .await
        .unwrap();
    let d = b
        .backend()
        .get(&names.task_queue("llm"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        d.message.delivery_mode,
        helixmq::message::DeliveryMode::Transient
    );
    d.acker.ack().await.unwrap();
    cleanup(&b, None).await;
    b.close().await.unwrap();
}

#[tokio::test]
async fn a_priority_above_the_queue_maximum_is_refused_before_sending() {
    let p = prefix();
    let b = broker(config(GUEST, &p)).await.unwrap();
    let names = Names::new(&p);
    let mut t = Topology::spec(&names);
    let low = format!("{p}.tasks.lowprio");
    t.add_work_queue(
        Queue::durable(&low).max_priority(3),
        &names.tasks_exchange(),
        "lowprio",
    );
    b.declare(&t).await.unwrap();
    let opts = PublishOptions {
        priority: Some(Priority::HIGH),
        ..Default::default()
    };
    let err = b
        .publish_with(&names.tasks_exchange(), "lowprio", Message::new("x"), &opts)
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::InvalidPriority { priority: 8, .. }),
        "{err:?}"
    );
    assert!(
        err.to_string().contains(&low) && err.to_string().contains("0 to 3"),
        "{err}"
    );
    assert_eq!(
        b.backend().queue_stats(&low).await.unwrap().messages,
        0,
        "nothing was sent"
    );
    // Within range it goes through.
    let opts = PublishOptions {
        priority: Some(Priority::new(3).unwrap()),
        ..Default::default()
    };
    b.publish_with(&names.tasks_exchange(), "lowprio", Message::new("x"), &opts)
        .await
        .unwrap();
    assert_eq!(b.backend().queue_stats(&low).await.unwrap().messages, 1);
    cleanup(&b, None).await;
    b.close().await.unwrap();
}

#[tokio::test]
async fn publishes_share_no_single_channel_bottleneck() {
    // Many concurrent publishers each get their own confirm (no one takes another's ack).
    let p = prefix();
    let b = Arc::new(broker(config(GUEST, &p)).await.unwrap());
    let names = Names::new(&p);
    b.declare(&Topology::spec(&names)).await.unwrap();
    let mut handles = Vec::new();
    for i in 0..64 {
        let b = b.clone();
        let x = names.tasks_exchange();
        // Every 8th publish is unroutable: exactly those must fail.
        let key = if i % 8 == 0 { "nope" } else { "verification" };
        handles.push(tokio::spawn(async move {
            (key, b.publish(&x, key, Message::new("m")).await)
        }));
    }
    for h in handles {
        let (key, r) = h.await.unwrap();
        match key {
            "nope" => assert!(matches!(r, Err(Error::Unroutable { .. })), "{r:?}"),
            _ => r.unwrap(),
        }
    }
    assert_eq!(
        b.backend()
            .queue_stats(&names.task_queue("verification"))
            .await
            .unwrap()
            .messages,
        56
    );
    cleanup(&b, None).await;
    b.close().await.unwrap();
}

#[tokio::test]
async fn a_full_reject_publish_queue_nacks_and_nothing_is_silently_lost() {
    let p = prefix();
    let b = broker(config(GUEST, &p)).await.unwrap();
    let names = Names::new(&p);
    let mut t = Topology::spec(&names);
    let small = format!("{p}.tasks.small");
    t.add_work_queue(
        Queue::durable(&small).max_length(2, helixmq::topology::Overflow::RejectPublish),
        &names.tasks_exchange(),
        "small",
    );
    b.declare(&t).await.unwrap();
    let x = names.tasks_exchange();
    b.publish(&x, "small", Message::new("1")).await.unwrap();
    b.publish(&x, "small", Message::new("2")).await.unwrap();
    let m = Message::new("3");
    let id = m.id.clone();
    let err = b.publish(&x, "small", m).await.unwrap_err();
    match &err {
        Error::PublishNacked {
            message_id,
            exchange,
            routing_key,
        } => {
            assert_eq!(
                (message_id, exchange, routing_key.as_str()),
                (&id, &x, "small")
            );
        }
        other => panic!("expected PublishNacked, got {other:?}"),
    }
    assert!(
        err.to_string().contains("nacked") && err.to_string().contains("reject-publish"),
        "{err}"
    );
    assert_eq!(b.backend().queue_stats(&small).await.unwrap().messages, 2);
    // In a batch, exactly the overflow is nacked.
    b.backend().purge(&small).await.unwrap();
    let msgs: Vec<Message> = (0..4).map(|i| Message::new(format!("{i}"))).collect();
    let r = b
        .publish_batch(&x, "small", &msgs, &PublishOptions::default())
        .await;
    assert_eq!(r.iter().filter(|r| r.is_ok()).count(), 2, "{r:?}");
    assert!(
        r[2..]
            .iter()
            .all(|r| matches!(r, Err(Error::PublishNacked { .. }))),
        "{r:?}"
    );
    cleanup(&b, None).await;
    b.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_unroutable_under_load_each_publish_gets_its_own_answer() {
    // lapin hands a basic.return to whichever confirm resolves next; with 4,096
    // in flight and every second publish returned, multiple-acks resolve many
    // confirms at once and most returns land in a sibling's confirmation.
    const TOTAL: usize = 50_000;
    const IN_FLIGHT: usize = 4_096;
    let p = prefix();
    let b = broker(config(GUEST, &p)).await.unwrap();
    let names = Names::new(&p);
    b.declare(&Topology::spec(&names)).await.unwrap();
    let exchange = names.tasks_exchange();
    let queue = names.task_queue("background");

    let started = Instant::now();
    let results: Vec<(bool, String, helixmq::Result<()>)> = futures::stream::iter(0..TOTAL)
        .map(|i| {
            let b = b.clone();
            let exchange = exchange.clone();
            async move {
                let unroutable = i % 2 == 1;
                let key = if unroutable { "nowhere" } else { "background" };
                let m = Message::new(format!("{i}"));
                let id = m.id.clone();
                (unroutable, id, b.publish(&exchange, key, m).await)
            }
        })
        .buffer_unordered(IN_FLIGHT)
        .collect()
        .await;
    let elapsed = started.elapsed();

    let mut confirmed = HashSet::new();
    let (mut returned, mut wrong) = (0, Vec::new());
    for (unroutable, id, r) in &results {
        match (unroutable, r) {
            (true, Err(Error::Unroutable { message_id, .. })) if message_id == id => returned += 1,
            (false, Ok(())) => {
                confirmed.insert(id.clone());
            }
            _ => wrong.push(format!("unroutable={unroutable} {id}: {r:?}")),
        }
    }
    println!(
        "{TOTAL} publishes ({IN_FLIGHT} in flight) in {elapsed:.2?} ({:.0} msg/s): {} confirmed, {returned} unroutable, {} wrong",
        TOTAL as f64 / elapsed.as_secs_f64(),
        confirmed.len(),
        wrong.len()
    );
    assert!(
        wrong.is_empty(),
        "{} answers wrong, e.g. {:?}",
        wrong.len(),
        &wrong[..wrong.len().min(5)]
    );
    assert_eq!((confirmed.len(), returned), (TOTAL / 2, TOTAL / 2));

    // Exactly the confirmed ones are in the queue.
    assert_eq!(
        b.backend().queue_stats(&queue).await.unwrap().messages,
        (TOTAL / 2) as u64
    );
    let mut stream = b
        .backend()
        .consume(&queue, 1_000, "hxtest-returns")
        .await
        .unwrap();
    let mut seen = HashSet::new();
    while seen.len() < confirmed.len() {
        let d = tokio::time::timeout(Duration::from_secs(30), stream.next())
            .await
            .expect("deliveries keep coming")
            .expect("stream open")
            .expect("delivery");
        assert!(
            confirmed.contains(&d.message.id),
            "{} is in the queue but was not confirmed",
            d.message.id
        );
        assert!(seen.insert(d.message.id.clone()), "{} twice", d.message.id);
        d.acker.ack().await.unwrap();
    }
    stream.cancel().await.unwrap();
    drop(stream);
    cleanup(&b, None).await;
    b.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_returned_id_never_makes_a_later_publish_of_it_unroutable() {
    const IDS: usize = 2_000;
    const IN_FLIGHT: usize = 512;
    let p = prefix();
    let b = broker(config(GUEST, &p)).await.unwrap();
    let names = Names::new(&p);
    let mut t = Topology::spec(&names);
    // Bound only later, for the same-key case below.
    let late = format!("{p}.tasks.late");
    t.queues.push(Queue::durable(&late));
    b.declare(&t).await.unwrap();
    let exchange = names.tasks_exchange();

    // Many ids at once, each published unroutable and then, the same message
    // id, routable: the return of the first must not be taken for the second.
    let results: Vec<(helixmq::Result<()>, helixmq::Result<()>)> = futures::stream::iter(0..IDS)
        .map(|i| {
            let b = b.clone();
            let exchange = exchange.clone();
            async move {
                let m = Message::new(format!("{i}"));
                let first = b.publish(&exchange, "nowhere", m.clone()).await;
                let second = b.publish(&exchange, "verification", m).await;
                (first, second)
            }
        })
        .buffer_unordered(IN_FLIGHT)
        .collect()
        .await;
    let bad: Vec<_> = results
        .iter()
        .filter(|(a, b)| !matches!(a, Err(Error::Unroutable { .. })) || b.is_err())
        .collect();
    assert!(
        bad.is_empty(),
        "{} of {IDS} wrong, e.g. {:?}",
        bad.len(),
        bad.first()
    );
    assert_eq!(
        b.backend()
            .queue_stats(&names.task_queue("verification"))
            .await
            .unwrap()
            .messages,
        IDS as u64
    );

    // The same id, exchange and routing key: returned, then routable once a
    // queue is bound to that key.
    let m = Message::new("same key");
    let r = b.publish(&exchange, "late", m.clone()).await;
    assert!(matches!(r, Err(Error::Unroutable { .. })), "{r:?}");
    let bind = Topology {
        names: names.clone(),
        exchanges: vec![],
        queues: vec![],
        bindings: vec![helixmq::topology::Binding {
            exchange: exchange.clone(),
            queue: late.clone(),
            routing_key: "late".into(),
        }],
    };
    b.declare(&bind).await.unwrap();
    b.publish(&exchange, "late", m).await.unwrap();
    assert_eq!(b.backend().queue_stats(&late).await.unwrap().messages, 1);
    cleanup(&b, Some(&t)).await;
    b.close().await.unwrap();
}

/// A batch on a closed broker fails each message with the error a single
/// publish gives (`Closed`, not an `Amqp` text), so callers match and decide
/// retries the same way whichever they used.
#[tokio::test]
async fn a_batch_on_a_closed_broker_keeps_the_error_variant() {
    let p = prefix();
    let b = broker(config(GUEST, &p)).await.unwrap();
    let names = Names::new(&p);
    b.declare(&Topology::spec(&names)).await.unwrap();
    cleanup(&b, None).await;
    b.close().await.unwrap();
    let exchange = names.tasks_exchange();
    let single = b
        .publish(&exchange, "background", Message::new("one"))
        .await;
    assert!(matches!(single, Err(Error::Closed)), "{single:?}");
    let batch = [Message::new("a"), Message::new("b")];
    let results = b
        .publish_batch(&exchange, "background", &batch, &PublishOptions::default())
        .await;
    assert_eq!(results.len(), 2);
    for r in results {
        match r {
            Err(e @ Error::Closed) => assert!(!e.is_retryable()),
            other => panic!("expected Error::Closed, got {other:?}"),
        }
    }
}
