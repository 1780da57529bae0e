//! Request-reply on the shared broker as the spec's least-privilege user
//! `helixagent` (configure/write/read `^helixagent\..*`: no default exchange,
//! no direct reply-to): a request is answered through the prefix's replies
//! exchange and a reply queue that is not exclusive and expires when
//! abandoned; a request whose worker dies is redelivered and answered once
//! (a second reply is counted late, not delivered); a requester whose
//! connection is force-closed still gets the replies to its requests.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use helixmq::broker::request::REPLY_QUEUE_EXPIRES;
use helixmq::metrics::{ExchangeLabel, RequestLabel, RequestOutcome};
use helixmq::{Broker, ConnectionState, Message, Names, Outcome, SubscribeOptions, Topology};
use helixmq_testkit::broker::*;
use helixmq_testkit::scripts::rabbitmqctl;
use tokio::sync::{Notify, Semaphore};

fn count(b: &Broker, outcome: RequestOutcome) -> u64 {
    b.metrics()
        .requests
        .get_or_create(&RequestLabel { outcome })
        .get()
}

/// Wait (bounded) for a counter that is bumped after something the test cannot await.
async fn wait_count(b: &Broker, outcome: RequestOutcome, n: u64) {
    let limit = tokio::time::Instant::now() + Duration::from_secs(15);
    while count(b, outcome) < n {
        assert!(
            tokio::time::Instant::now() < limit,
            "requests{{outcome={}}} stayed at {}, want {n}",
            outcome.as_str(),
            count(b, outcome)
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A worker broker on a connection of its own, named so that closing the
/// requester's connections (`hxtest-<prefix>`) leaves it alone.
async fn worker_broker(p: &str) -> Broker {
    Broker::builder(config(HELIXAGENT, p))
        .connection_name(format!("hxworker-{p}"))
        .connect()
        .await
        .expect("connect as helixagent")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_reply_as_helixagent_through_a_reply_queue_of_our_own() {
    let p = prefix();
    let b = broker(config(HELIXAGENT, &p)).await.unwrap();
    let names = Names::new(&p);
    b.declare(&Topology::spec(&names)).await.unwrap();
    let sub = b
        .subscribe(
            &names.task_queue("llm"),
            |m: Message, _| async move {
                let mut out = b"answer to ".to_vec();
                out.extend_from_slice(&m.payload);
                Ok(Outcome::reply(Message::new(out)))
            },
            SubscribeOptions::default(),
        )
        .await
        .unwrap();
    let reply = b
        .request(
            &names.tasks_exchange(),
            "llm",
            Message::new("what is 6 x 7?"),
            Duration::from_secs(10),
        )
        .await
        .expect("a reply under least privilege");
    assert_eq!(&reply.payload[..], b"answer to what is 6 x 7?");
    assert_eq!(count(&b, RequestOutcome::Replied), 1);

    // The reply queue: ours, durable, not exclusive (it survives a lost
    // connection), with x-expires (an abandoned one goes away).
    let reply_queue = b
        .topology()
        .queues
        .into_iter()
        .find(|q| {
            q.name
                .starts_with(&format!("{}.", names.replies_exchange()))
        })
        .expect("reply queue declared")
        .name;
    let listing = rabbitmqctl(
        None,
        &["list_queues", "name", "durable", "exclusive", "arguments"],
    );
    let line = listing
        .lines()
        .find(|l| l.starts_with(&format!("{reply_queue}\t")))
        .unwrap_or_else(|| panic!("{reply_queue} not listed: {listing}"));
    let cols: Vec<&str> = line.split('\t').collect();
    assert_eq!(cols[1], "true", "durable: {line}");
    assert_eq!(cols[2], "false", "not exclusive: {line}");
    assert!(
        cols[3].contains(&format!(
            "{{\"x-expires\",{}}}",
            REPLY_QUEUE_EXPIRES.as_millis()
        )),
        "x-expires: {line}"
    );

    sub.shutdown(Duration::from_secs(5)).await;
    cleanup(&b, None).await;
    b.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_whose_worker_dies_before_replying_is_answered_once_by_the_next() {
    let p = prefix();
    let requester = broker(config(HELIXAGENT, &p)).await.unwrap();
    let names = Names::new(&p);
    requester.declare(&Topology::spec(&names)).await.unwrap();
    let queue = names.task_queue("llm");

    // Worker A takes the request and dies mid-handler (its subscription is
    // dropped: the handler is aborted, the delivery never acked).
    let dying = worker_broker(&p).await;
    let started = Arc::new(Notify::new());
    let s2 = started.clone();
    let sub_a = dying
        .subscribe(
            &queue,
            move |_m: Message, _| {
                s2.notify_one();
                async { std::future::pending::<Result<Outcome, helixmq::BoxError>>().await }
            },
            SubscribeOptions::default(),
        )
        .await
        .unwrap();
    let call = {
        let r = requester.clone();
        let x = names.tasks_exchange();
        tokio::spawn(async move {
            r.request(&x, "llm", Message::new("q"), Duration::from_secs(20))
                .await
        })
    };
    started.notified().await;
    drop(sub_a);
    dying.close().await.unwrap();

    // Worker B gets it again (redelivered) and answers.
    let worker = worker_broker(&p).await;
    let runs = Arc::new(AtomicUsize::new(0));
    let redelivered = Arc::new(AtomicUsize::new(0));
    let (r2, rd) = (runs.clone(), redelivered.clone());
    let sub_b = worker
        .subscribe(
            &queue,
            move |m: Message, ctx: helixmq::Context| {
                r2.fetch_add(1, Ordering::SeqCst);
                if ctx.redelivered {
                    rd.fetch_add(1, Ordering::SeqCst);
                }
                async move { Ok(Outcome::reply(Message::new(m.payload.clone()))) }
            },
            SubscribeOptions::default(),
        )
        .await
        .unwrap();
    let reply = call.await.unwrap().expect("answered by the second worker");
    assert_eq!(&reply.payload[..], b"q");
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    assert_eq!(
        redelivered.load(Ordering::SeqCst),
        1,
        "the dead worker's request comes back redelivered"
    );
    assert_eq!(count(&requester, RequestOutcome::Replied), 1);
    assert_eq!(count(&requester, RequestOutcome::LateReply), 0);
    sub_b.shutdown(Duration::from_secs(5)).await;
    assert_eq!(drain_ids(&requester, &queue).await.len(), 0);
    assert_eq!(drain_ids(&requester, &names.dlq()).await.len(), 0);
    cleanup(&requester, None).await;
    worker.close().await.unwrap();
    requester.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_answered_twice_after_a_lost_ack_reaches_the_caller_once() {
    let p = prefix();
    let requester = broker(config(HELIXAGENT, &p)).await.unwrap();
    let names = Names::new(&p);
    requester.declare(&Topology::spec(&names)).await.unwrap();
    let queue = names.task_queue("llm");

    // Worker A replies, then dies before its ack reaches the broker: played
    // on the raw backend (consume, publish the reply, drop the stream unacked).
    let dying = worker_broker(&p).await;
    let mut stream = dying
        .backend()
        .consume(&queue, 1, "dying-worker")
        .await
        .unwrap();
    let call = {
        let r = requester.clone();
        let x = names.tasks_exchange();
        tokio::spawn(async move {
            r.request(&x, "llm", Message::new("q"), Duration::from_secs(20))
                .await
        })
    };
    let d = tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .expect("the request reaches worker A")
        .unwrap()
        .unwrap();
    let first = Message::new("first answer").with_correlation_id(
        d.message
            .correlation_id
            .clone()
            .expect("a request has a correlation id"),
    );
    dying
        .publish(
            &names.replies_exchange(),
            d.message.reply_to.as_deref().expect("and a reply_to"),
            first,
        )
        .await
        .expect("worker A's reply confirmed");
    drop(stream);
    dying.close().await.unwrap();
    let reply = call.await.unwrap().expect("the first reply");
    assert_eq!(&reply.payload[..], b"first answer");

    // Worker B handles the redelivered request and answers again: that
    // second reply is counted late by the requester, never delivered.
    let worker = worker_broker(&p).await;
    let sub = worker
        .subscribe(
            &queue,
            |_m: Message, _| async { Ok(Outcome::reply(Message::new("second answer"))) },
            SubscribeOptions::default(),
        )
        .await
        .unwrap();
    wait_count(&requester, RequestOutcome::LateReply, 1).await;
    assert_eq!(count(&requester, RequestOutcome::Replied), 1);
    assert_eq!(count(&worker, RequestOutcome::ReplyDropped), 0);
    sub.shutdown(Duration::from_secs(5)).await;
    assert_eq!(drain_ids(&requester, &queue).await.len(), 0);
    cleanup(&requester, None).await;
    worker.close().await.unwrap();
    requester.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requester_whose_connection_is_force_closed_still_gets_its_replies() {
    const N: usize = 10;
    let p = prefix();
    let mut cfg = config(HELIXAGENT, &p);
    cfg.rabbitmq.reconnect_delay = Duration::from_secs(2);
    let requester = broker(cfg).await.unwrap();
    let names = Names::new(&p);
    requester.declare(&Topology::spec(&names)).await.unwrap();
    let worker = worker_broker(&p).await;
    // The worker holds every request until the requester's connection is gone.
    let gate = Arc::new(Semaphore::new(0));
    let arrived = Arc::new(Semaphore::new(0));
    let (g, a) = (gate.clone(), arrived.clone());
    let sub = worker
        .subscribe(
            &names.task_queue("llm"),
            move |m: Message, _| {
                let (g, a) = (g.clone(), a.clone());
                async move {
                    a.add_permits(1);
                    let _ = g.acquire().await.map(|p| p.forget());
                    Ok(Outcome::reply(Message::new(m.payload.clone())))
                }
            },
            SubscribeOptions {
                prefetch: Some(N as u16),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let calls: Vec<_> = (0..N)
        .map(|i| {
            let r = requester.clone();
            let x = names.tasks_exchange();
            tokio::spawn(async move {
                r.request(
                    &x,
                    "llm",
                    Message::new(format!("q{i}")),
                    Duration::from_secs(30),
                )
                .await
            })
        })
        .collect();
    let _ = arrived.acquire_many(N as u32).await.unwrap();

    // Closed while every request is in flight; the replies are placed while
    // the requester is still away (its reconnect waits 1-2 s): an exclusive
    // reply queue would have died with the connection, and they would be
    // dropped as unroutable.
    let before = requester.metrics().connection_recoveries.get();
    let mut state = requester.state();
    let p2 = p.to_string();
    let closing = tokio::task::spawn_blocking(move || close_connections(&my_connection_pids(&p2)));
    tokio::time::timeout(
        Duration::from_secs(15),
        state.wait_for(|s| *s == ConnectionState::Disconnected),
    )
    .await
    .expect("the requester notices its closed connection")
    .unwrap();
    gate.add_permits(N);
    let replies = ExchangeLabel {
        exchange: names.replies_exchange(),
    };
    let limit = tokio::time::Instant::now() + Duration::from_secs(10);
    while worker.metrics().published.get_or_create(&replies).get() < N as u64 {
        assert!(
            tokio::time::Instant::now() < limit,
            "the worker's replies are not confirmed"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(
        *requester.state().borrow(),
        ConnectionState::Disconnected,
        "every reply was placed while the requester was disconnected"
    );
    assert_eq!(closing.await.unwrap(), 1, "the requester's one connection");
    for (i, c) in calls.into_iter().enumerate() {
        let reply = c
            .await
            .unwrap()
            .expect("a reply despite the lost connection");
        assert_eq!(String::from_utf8_lossy(&reply.payload), format!("q{i}"));
    }
    assert!(
        requester.metrics().connection_recoveries.get() > before,
        "the requester reconnected"
    );
    assert_eq!(count(&requester, RequestOutcome::Replied), N as u64);
    assert_eq!(count(&worker, RequestOutcome::ReplyDropped), 0);
    sub.shutdown(Duration::from_secs(5)).await;
    cleanup(&requester, None).await;
    worker.close().await.unwrap();
    requester.close().await.unwrap();
}
