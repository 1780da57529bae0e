//! Quorum queues and the server version, against the shared RabbitMQ (one node
//! is enough for quorum queues; the failover itself is `cluster_failover`):
//! - the version read at connect is the server's (`rabbitmqctl version`);
//! - what validation refuses, RabbitMQ really refuses (raw declare → 406), and
//!   helixmq refuses it first with a message naming the queue and the fix;
//! - the spec topology made quorum declares, retries back to the origin queue
//!   through a quorum retry tier (at-least-once dead-lettering), and ends in the
//!   quorum DLQ after max attempts;
//! - `x-delivery-limit` dead-letters a message requeued too often.

use std::sync::Arc;
use std::time::Duration;

use helixmq::backend::rabbitmq::RabbitBackend;
use helixmq::topology::{Queue, QueueType, ServerVersion};
use helixmq::{Broker, Error, Message, Names, Outcome, RetryPolicy, SubscribeOptions, Topology};
use helixmq_testkit::broker::{self, cleanup, prefix, wait_depth, GUEST};
use lapin::options::QueueDeclareOptions;
use lapin::types::{AMQPValue, FieldTable, LongString};

async fn connect(prefix: &str) -> (Arc<RabbitBackend>, Broker) {
    broker::rabbit(broker::config(GUEST, prefix)).await.unwrap()
}

#[tokio::test]
async fn the_server_version_is_read_at_connect() {
    let p = prefix();
    let (backend, b) = connect(&p).await;
    let out = tokio::task::spawn_blocking(|| {
        std::process::Command::new("rabbitmqctl")
            .args(["-q", "version"])
            .output()
            .expect("rabbitmqctl runs")
    })
    .await
    .unwrap();
    let expected = ServerVersion::parse(&String::from_utf8_lossy(&out.stdout))
        .expect("rabbitmqctl version prints a version");
    assert_eq!(backend.server_version(), Some(expected));
    assert_eq!(
        backend.current_endpoint().as_deref(),
        Some("127.0.0.1:5672")
    );
    b.close().await.unwrap();
}

#[tokio::test]
async fn what_validation_refuses_rabbitmq_refuses_and_helixmq_says_so_first() {
    let p = prefix();
    let (backend, b) = connect(&p).await;
    let version = backend.server_version().expect("version known");
    let names = Names::new(&p);
    let prio = names.task_queue("llm");
    let transient = format!("{p}.transient");

    if !version.quorum_priorities() {
        // The rule is real: RabbitMQ before 4.0 refuses x-max-priority on a quorum queue.
        let conn = lapin::Connection::connect(
            "amqp://guest:guest@127.0.0.1:5672/%2f",
            lapin::ConnectionProperties::default(),
        )
        .await
        .unwrap();
        let mut args = FieldTable::default();
        args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString(LongString::from("quorum")),
        );
        args.insert("x-max-priority".into(), AMQPValue::LongLongInt(10));
        let ch = conn.create_channel().await.unwrap();
        let raw = ch
            .queue_declare(
                prio.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                args,
            )
            .await;
        assert!(
            raw.is_err(),
            "RabbitMQ {version} accepted a quorum queue with priorities"
        );
        // And a non-durable quorum queue.
        let mut args = FieldTable::default();
        args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString(LongString::from("quorum")),
        );
        let ch = conn.create_channel().await.unwrap();
        let raw = ch
            .queue_declare(
                transient.as_str().into(),
                QueueDeclareOptions::default(),
                args,
            )
            .await;
        assert!(
            raw.is_err(),
            "RabbitMQ {version} accepted a non-durable quorum queue"
        );
        let _ = conn.close(200, "done".into()).await;

        // helixmq refuses it before sending anything, naming the queue and the fix.
        let mut t = Topology::system(&names);
        t.queues
            .push(Queue::durable(&prio).max_priority(10).quorum());
        let err = b.declare(&t).await.unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, Error::InvalidConfig { .. }), "{err:?}");
        assert!(text.contains(&format!("queue '{prio}'")), "{text}");
        assert!(
            text.contains(&format!("refused by RabbitMQ {version}")),
            "{text}"
        );
        assert!(text.contains("keep this queue classic"), "{text}");
        let missing = b.backend().queue_stats(&prio).await.unwrap_err();
        assert!(
            matches!(missing, Error::NotFound { .. }),
            "nothing declared: {missing:?}"
        );
    }
    let mut t = Topology::system(&names);
    let mut q = Queue::durable(&transient).quorum();
    q.durable = false;
    t.queues.push(q);
    let text = b.declare(&t).await.unwrap_err().to_string();
    assert!(
        text.contains(&format!(
            "queue '{transient}': a quorum queue is always durable"
        )),
        "{text}"
    );
    // The spec topology made quorum is accepted as is.
    let spec = Topology::spec(&names).with_quorum_queues();
    b.declare(&spec).await.unwrap();
    cleanup(&b, None).await; // and the prefix sweeps the strays
    b.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quorum_spec_topology_retries_to_the_origin_then_dead_letters() {
    let p = prefix();
    let (_backend, b) = connect(&p).await;
    let names = Names::new(&p);
    let delay = Duration::from_millis(300);
    let mut t = Topology::spec(&names);
    t.add_retry_tier(delay);
    let t = t.with_quorum_queues();
    assert_eq!(
        t.queue(&names.retry_tier(delay)).unwrap().queue_type,
        QueueType::Quorum
    );
    b.declare(&t).await.unwrap();
    let queue = names.task_queue("background");
    let attempts: Arc<std::sync::Mutex<Vec<u32>>> = Arc::default();
    let a2 = attempts.clone();
    let sub = b
        .subscribe(
            &queue,
            move |m: Message, _| {
                a2.lock().unwrap().push(m.attempt);
                async { Ok(Outcome::retry("always fails")) }
            },
            SubscribeOptions {
                retry: Some(RetryPolicy {
                    max_attempts: 3,
                    delays: vec![delay],
                }),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let m = Message::new("retry me");
    let id = m.id.clone();
    b.publish(&names.tasks_exchange(), "background", m)
        .await
        .unwrap();
    wait_depth(&b, &names.dlq(), 1, Duration::from_secs(30)).await;
    assert_eq!(
        *attempts.lock().unwrap(),
        vec![1, 2, 3],
        "came back to its queue twice, attempt count carried"
    );
    sub.shutdown(Duration::from_secs(5)).await;
    // Inspecting the DLQ (get + requeue, as `helixmq dlq list` does) many times
    // must never make the quorum DLQ drop the message: it has no delivery limit.
    for _ in 0..25 {
        let d = b
            .backend()
            .get(&names.dlq())
            .await
            .unwrap()
            .expect("still in the DLQ");
        assert_eq!(d.message.id, id);
        d.acker.nack(true).await.unwrap();
    }
    let d = b
        .backend()
        .get(&names.dlq())
        .await
        .unwrap()
        .expect("still in the DLQ");
    assert_eq!(d.message.id, id);
    d.acker.ack().await.unwrap();
    cleanup(&b, None).await;
    b.close().await.unwrap();
}

#[tokio::test]
async fn the_delivery_limit_dead_letters_a_message_requeued_too_often() {
    let p = prefix();
    let (_backend, b) = connect(&p).await;
    let names = Names::new(&p);
    let poison = format!("{p}.poison");
    let mut t = Topology::system(&names).with_quorum_queues();
    t.queues.push(
        Queue::durable(&poison)
            .quorum()
            .dead_letter_to(names.dead_letter_exchange())
            .at_least_once_dead_lettering()
            .delivery_limit(2),
    );
    b.declare(&t).await.unwrap();
    b.publish("", &poison, Message::new("crashes every worker"))
        .await
        .unwrap();
    // Each nack with requeue stands for a worker that died holding it.
    let mut deliveries = 0;
    while let Some(d) = b.backend().get(&poison).await.unwrap() {
        deliveries += 1;
        assert!(deliveries <= 10, "the delivery limit did not stop it");
        d.acker.nack(true).await.unwrap();
    }
    wait_depth(&b, &names.dlq(), 1, Duration::from_secs(20)).await;
    assert_eq!(
        deliveries, 3,
        "delivered 1 + limit 2 times, then dead-lettered"
    );
    cleanup(&b, None).await; // and the prefix sweeps the strays
    b.close().await.unwrap();
}
