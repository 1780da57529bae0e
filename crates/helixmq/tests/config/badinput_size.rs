//! A message larger than the broker's `max_message_size` gives a clear error,
//! at once (not a publish timeout), and the client keeps working afterwards.
//!
//! The shared broker's limit is 128 MiB; sending that much would cost memory
//! on a broker other tests use. So this runs against a dedicated node,
//! `hqbadin@localhost` on port 5695, started here with `scripts/node` and a
//! 1 MiB `max_message_size`, and stopped at the end.

use std::time::{Duration, Instant};

use helixmq::{Error, Message, Topology};
use helixmq_testkit::broker;
use helixmq_testkit::node::Node;

const NODE: &str = "hqbadin";
const PORT: u16 = 5695;
const MAX: usize = 1024 * 1024;

#[tokio::test]
async fn message_over_max_message_size_is_refused_clearly_and_the_client_goes_on() {
    // Stopped when dropped, also when an assertion fails.
    let _node = Node::start(NODE, PORT, Some(&format!("max_message_size = {MAX}\n")));

    let p = broker::prefix();
    let mut cfg = broker::config(broker::GUEST, &p);
    cfg.rabbitmq.host = "127.0.0.1".into();
    cfg.rabbitmq.port = PORT;
    cfg.rabbitmq.publish_timeout = Duration::from_secs(20);
    let b = broker::broker(cfg).await.expect("connect to hqbadin");
    let names = b.names().clone();
    b.declare(&Topology::spec(&names)).await.unwrap();
    let x = names.tasks_exchange();
    let q = names.task_queue("background");

    // Just under the limit: accepted.
    let fits = Message::new(vec![b'a'; MAX - 1024]);
    b.publish(&x, "background", fits)
        .await
        .expect("a message under the limit");

    // Over it: refused by the broker (406), reported as an invalid message.
    let big = Message::new(vec![b'b'; 2 * MAX]);
    let id = big.id.clone();
    let started = Instant::now();
    let err = b.publish(&x, "background", big).await.unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "refusal must come at once, not after the publish timeout: {:?}",
        started.elapsed()
    );
    match &err {
        Error::InvalidMessage(text) => {
            assert!(
                text.contains(&id)
                    && text.contains(&(2 * MAX).to_string())
                    && text.contains("larger than")
                    && text.contains(&MAX.to_string()),
                "the error must name the message, its size and the limit: {text}"
            );
        }
        other => panic!("expected Error::InvalidMessage, got {other:?}"),
    }
    eprintln!("over max_message_size: {err}");

    // The client keeps working: publish and read back a small message.
    let after = Message::new("still working");
    let after_id = after.id.clone();
    b.publish(&x, "background", after)
        .await
        .expect("publish after the refusal");
    let got = broker::take(&b, &q, 2, Duration::from_secs(10)).await;
    assert_eq!(got[0].payload.len(), MAX - 1024);
    assert_eq!(got[1].id, after_id);
    assert!(b.is_connected());

    // Batches: the big one fails alone, its neighbours are confirmed.
    let batch = vec![
        Message::new("one"),
        Message::new(vec![b'c'; 2 * MAX]),
        Message::new("three"),
    ];
    let res = b
        .publish_batch(&x, "background", &batch, &Default::default())
        .await;
    assert!(res[0].is_ok(), "{:?}", res[0]);
    assert!(
        matches!(res[1], Err(Error::InvalidMessage(_))),
        "{:?}",
        res[1]
    );
    assert!(res[2].is_ok(), "{:?}", res[2]);
    // At least once: a neighbour whose confirm was lost with the channel the big
    // one closed is sent again, so it may be there twice; never missing.
    let mut got = broker::take(&b, &q, 2, Duration::from_secs(10)).await;
    while let Some(d) = b.backend().get(&q).await.unwrap() {
        d.acker.ack().await.unwrap();
        got.push(std::sync::Arc::unwrap_or_clone(d.message));
    }
    let mut ids: Vec<_> = got.iter().map(|m| m.id.clone()).collect();
    ids.sort();
    ids.dedup();
    let mut want = vec![batch[0].id.clone(), batch[2].id.clone()];
    want.sort();
    assert_eq!(ids, want);

    broker::cleanup(&b, Some(&Topology::spec(&names))).await;
    b.close().await.unwrap();
}
