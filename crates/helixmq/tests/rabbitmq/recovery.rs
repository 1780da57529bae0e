//! Recovery: a 20,000-message publish-and-consume run while this test's
//! connections are force-closed three times by `rabbitmqctl close_connection`
//! (only ours, found by connection name: other tests share the broker). The run
//! must finish by itself, every confirmed id must be consumed at least once,
//! and duplicates are counted.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use helixmq::{ConnectionState, Message, Names, Outcome, SubscribeOptions, Topology};
use helixmq_testkit::broker::*;
use helixmq_testkit::ledger::Ledger;
use helixmq_testkit::proxy::{Mode, Proxy};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_thousand_messages_survive_three_forced_closes() {
    const TOTAL: usize = 20_000;
    const TASKS: usize = 8;
    const FAULTS: usize = 3;
    let p = prefix();
    let mut cfg = config(GUEST, &p);
    cfg.rabbitmq.publish_timeout = Duration::from_secs(60);
    let b = broker(cfg).await.unwrap();
    let names = Names::new(&p);
    b.declare(&Topology::spec(&names)).await.unwrap();
    let queue = names.task_queue("background");

    // Consumer: the library's reliable consumer, counting every delivery per id.
    let tally = Arc::new(Ledger::default());
    let t2 = tally.clone();
    let sub = b
        .subscribe(
            &queue,
            move |m: Message, _| {
                t2.consumed(&m.id);
                async { Ok(Outcome::Ack) }
            },
            SubscribeOptions {
                prefetch: Some(200),
                concurrency: Some(64),
                ..Default::default()
            },
        )
        .await
        .unwrap();

    // The publishers send in FAULTS + 1 chunks and start chunk k only once
    // fault k has started, so every fault lands mid-run however fast the run
    // is (an earlier version waited for progress that a fast run had already
    // made, and hung).
    let (faults_started, gate) = tokio::sync::watch::channel(0usize);
    let chunk = TOTAL / TASKS / (FAULTS + 1);

    // Fault injector: fault i once the publishers alone have made 4,000 × (i+1)
    // progress (chunks 0..=i hold 5,000 × (i+1) publishes, so this comes).
    let injector = {
        let tally = tally.clone();
        let state = b.state();
        let b = b.clone();
        let p = p.to_string();
        tokio::spawn(async move {
            let mut recoveries = Vec::new();
            for i in 0..FAULTS {
                let limit = Instant::now() + Duration::from_secs(120);
                while tally.progress() < 4_000 * (i + 1) {
                    assert!(Instant::now() < limit, "fault {i}: no progress in 120 s");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                // Listing takes ~1 s (rabbitmqctl boots a VM): do it before
                // releasing the next chunk, so the close meets it in flight.
                let p2 = p.clone();
                let pids = tokio::task::spawn_blocking(move || my_connection_pids(&p2))
                    .await
                    .unwrap();
                assert!(!pids.is_empty(), "fault {i}: found no connection of ours");
                // The recovery can be over before rabbitmqctl has even exited, so
                // a watch on the state could miss the Disconnected phase
                // entirely: count recoveries instead.
                let before = b.metrics().connection_recoveries.get();
                faults_started.send_replace(i + 1);
                let cut = Instant::now();
                let closed = tokio::task::spawn_blocking(move || close_connections(&pids))
                    .await
                    .unwrap();
                assert!(closed >= 1, "fault {i}: closed none of our connections");
                let limit = Instant::now() + Duration::from_secs(60);
                while b.metrics().connection_recoveries.get() <= before
                    || *state.borrow() != ConnectionState::Connected
                {
                    assert!(
                        Instant::now() < limit,
                        "fault {i}: not reconnected within 60 s (state {:?})",
                        *state.borrow()
                    );
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                recoveries.push(cut.elapsed());
            }
            recoveries
        })
    };

    // Publishers: 8 tasks, 32 publishes in flight each.
    let started = Instant::now();
    let mut tasks = Vec::new();
    for t in 0..TASKS {
        let b = b.clone();
        let x = names.tasks_exchange();
        let tally = tally.clone();
        let mut gate = gate.clone();
        tasks.push(tokio::spawn(async move {
            for k in 0..=FAULTS {
                tokio::time::timeout(Duration::from_secs(180), gate.wait_for(|n| *n >= k))
                    .await
                    .expect("the fault injector starts the next fault")
                    .expect("injector alive");
                let msgs: Vec<Message> = (k * chunk..(k + 1) * chunk)
                    .map(|i| Message::new(format!("{t}-{i}")))
                    .collect();
                futures::stream::iter(msgs)
                    .map(|m| {
                        let b = b.clone();
                        let x = x.clone();
                        let tally = tally.clone();
                        async move {
                            let id = m.id.clone();
                            let r = b.publish(&x, "background", m).await;
                            tally.published(&id, &r);
                        }
                    })
                    .buffer_unordered(32)
                    .collect::<()>()
                    .await;
            }
        }));
    }
    for t in tasks {
        t.await.expect("publisher task");
    }
    let publish_time = started.elapsed();

    tally
        .expect_drained(Duration::from_secs(180), None, &p)
        .await;
    let total_time = started.elapsed();
    let recoveries = tokio::time::timeout(Duration::from_secs(60), injector)
        .await
        .expect("the fault injector finished within 60 s of the last message")
        .expect("three faults were injected and recovered from");
    sub.shutdown(Duration::from_secs(10)).await;

    let r = tally.report();
    let m = b.metrics();
    println!(
        "recovery run: messages {TOTAL}, confirmed {}, publish errors {}, faults injected {}, lost {}, duplicates {}, \
         recovery times {:?}, publish phase {:.2?}, total {:.2?}, reconnects {}",
        r.confirmed,
        r.messages - r.confirmed,
        recoveries.len(),
        r.lost,
        r.duplicates,
        recoveries,
        publish_time,
        total_time,
        m.connection_recoveries.get()
    );
    assert_eq!(
        r.failed + r.timed_out + r.nacked,
        0,
        "publishes failed: {:?}",
        r.errors
    );
    assert_eq!(r.confirmed, TOTAL);
    assert_eq!(r.lost, 0);
    assert_eq!(recoveries.len(), FAULTS);
    assert!(m.connection_recoveries.get() >= FAULTS as u64);
    cleanup(&b, None).await;
    b.close().await.unwrap();
}

/// A broker whose connection goes through a cuttable proxy.
async fn broker_via_proxy(
    tweak: impl FnOnce(&mut helixmq::Config),
) -> (helixmq::Broker, Proxy, Prefix) {
    let proxy = Proxy::start("127.0.0.1:5672".parse().unwrap()).await;
    let p = prefix();
    let mut cfg = config(GUEST, &p);
    cfg.rabbitmq.host = "127.0.0.1".into();
    cfg.rabbitmq.port = proxy.port();
    tweak(&mut cfg);
    let b = broker(cfg).await.unwrap();
    (b, proxy, p)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_during_an_outage_waits_and_subscriptions_are_restored() {
    let (b, proxy, p) = broker_via_proxy(|_| {}).await;
    let names = Names::new(&p);
    b.declare(&Topology::spec(&names)).await.unwrap();
    let queue = names.task_queue("background");
    let (tx, mut rx) = tokio::sync::mpsc::channel(16);
    let sub = b
        .subscribe(
            &queue,
            move |m: Message, _| {
                let tx = tx.clone();
                async move {
                    tx.send(m.id).await.unwrap();
                    Ok(Outcome::Ack)
                }
            },
            SubscribeOptions::default(),
        )
        .await
        .unwrap();
    let mut state = b.state();

    proxy.set(Mode::Refuse);
    state
        .wait_for(|s| *s == ConnectionState::Disconnected)
        .await
        .unwrap();
    let m = Message::new("sent while disconnected");
    let id = m.id.clone();
    let publisher = {
        let b = b.clone();
        let x = names.tasks_exchange();
        tokio::spawn(async move { b.publish(&x, "background", m).await })
    };
    // The outage lasts a while (real time passing): the publish must wait, not fail.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert!(
        !publisher.is_finished(),
        "publish returned during the outage"
    );
    proxy.set(Mode::Forward);
    tokio::time::timeout(Duration::from_secs(20), publisher)
        .await
        .expect("publish completes after the reconnect")
        .unwrap()
        .expect("confirmed");
    let got = tokio::time::timeout(Duration::from_secs(20), rx.recv())
        .await
        .expect("the restored subscription receives it")
        .unwrap();
    assert_eq!(got, id);
    assert!(sub.is_active());
    assert!(b.metrics().connection_recoveries.get() >= 1);
    sub.shutdown(Duration::from_secs(5)).await;
    cleanup(&b, None).await;
    b.close().await.unwrap();
}

#[tokio::test]
async fn reconnect_gives_up_after_max_attempts() {
    let (b, proxy, _p) = broker_via_proxy(|c| {
        c.rabbitmq.max_reconnect_attempts = 2;
        c.rabbitmq.reconnect_delay = Duration::from_millis(50);
        c.rabbitmq.publish_timeout = Duration::from_secs(10);
    })
    .await;
    let mut state = b.state();
    proxy.set(Mode::Refuse);
    tokio::time::timeout(
        Duration::from_secs(20),
        state.wait_for(|s| *s == ConnectionState::Closed),
    )
    .await
    .expect("gives up")
    .unwrap();
    let started = Instant::now();
    let err = b
        .publish("amq.direct", "x", Message::new("x"))
        .await
        .unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "fails at once, no wait"
    );
    assert!(
        matches!(err, helixmq::Error::ReconnectExhausted { attempts: 2, .. }),
        "{err:?}"
    );
    assert!(
        err.to_string()
            .contains("gave up reconnecting after 2 attempts"),
        "{err}"
    );
    assert!(b.metrics().connection_failures.get() >= 2);
    b.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_black_hole_is_detected_by_heartbeats_and_recovered() {
    let heartbeat = Duration::from_secs(2);
    let (b, proxy, p) = broker_via_proxy(|c| {
        c.rabbitmq.heartbeat = heartbeat;
        c.rabbitmq.connect_timeout = Duration::from_secs(2);
    })
    .await;
    let names = Names::new(&p);
    b.declare(&Topology::spec(&names)).await.unwrap();
    let mut state = b.state();
    proxy.set(Mode::BlackHole);
    let cut = Instant::now();
    tokio::time::timeout(
        heartbeat * 4,
        state.wait_for(|s| *s == ConnectionState::Disconnected),
    )
    .await
    .expect("missed heartbeats detected")
    .unwrap();
    let detected = cut.elapsed();
    proxy.set(Mode::Forward);
    tokio::time::timeout(
        Duration::from_secs(20),
        state.wait_for(|s| *s == ConnectionState::Connected),
    )
    .await
    .expect("recovered")
    .unwrap();
    println!("black hole: detected after {detected:.2?} (heartbeat {heartbeat:?}), recovered after {:.2?}", cut.elapsed());
    b.publish(&names.tasks_exchange(), "debate", Message::new("after"))
        .await
        .unwrap();
    cleanup(&b, None).await;
    b.close().await.unwrap();
}
