//! Failover on a three-node cluster: quorum queues, 20,000 messages published
//! and consumed while the node this client is connected to is killed with
//! SIGKILL (its Erlang VM, `scripts/node kill`) and later restarted. The client
//! must move to a live node by itself; every confirmed message is consumed at
//! least once (lost = 0); duplicates are counted. One summary line:
//! `scenario=cluster_failover messages=N lost=0 duplicates=D failover_ms=T`.
//!
//! The cluster (hq1..hq3@localhost on 5681–5683) is started by `scripts/cluster
//! start` (idempotent) and stopped at the end; it never touches the shared
//! broker on 5672. Run serially (it kills a whole node).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use helixmq::backend::rabbitmq::RabbitBackend;
use helixmq::Backend as _;
use helixmq::{
    Broker, ConnectionState, Message, Metrics, Names, Outcome, SubscribeOptions, Topology,
};
use helixmq_testkit::cluster::{self, node_has_connection, node_of_port, queue_types, Cluster};
use helixmq_testkit::ledger::Ledger;

const TOTAL: usize = 20_000;
const TASKS: usize = 8;
/// Publish pace per task (messages per tick): 8 × 25 every 500 ms ≈ 400 msg/s,
/// so the run lasts long enough for the node to be killed and come back mid-run.
const CHUNK: usize = 25;
const TICK: Duration = Duration::from_millis(500);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quorum_queues_survive_the_connected_node_killed_and_restarted() {
    let t0 = Instant::now();
    // Stopped when dropped, also when the test fails.
    let _cluster = tokio::task::spawn_blocking(Cluster::start).await.unwrap();
    let boot = t0.elapsed();

    let p = format!("helixagent.c{:08x}", rand::random::<u32>());
    let cfg = cluster::config(&p);
    let name = format!("hxtest-{p}");
    let metrics = Metrics::default();
    let backend = Arc::new(
        RabbitBackend::connect_named(&cfg.rabbitmq, metrics.clone(), &name)
            .await
            .expect("connects to the cluster"),
    );
    let version = backend.server_version().expect("version read at connect");
    let b = Broker::builder(cfg.clone())
        .metrics(metrics.clone())
        .custom_backend(backend.clone());
    let names = Names::new(&p);
    let topology = Topology::spec(&names).with_queue_type(cfg.helixmq.queue_type);
    b.declare(&topology).await.unwrap();
    let queue = names.task_queue("background");

    // The broker really made them quorum (and kept the priority queue classic).
    let first = node_of_port(
        backend
            .current_endpoint()
            .unwrap()
            .rsplit(':')
            .next()
            .unwrap()
            .parse()
            .unwrap(),
    );
    let pfx = p.clone();
    let n2 = first.clone();
    let types = tokio::task::spawn_blocking(move || queue_types(&n2, &pfx))
        .await
        .unwrap();
    let ty = |q: &str| types.iter().find(|(n, _)| n == q).map(|(_, t)| t.as_str());
    assert_eq!(ty(&queue), Some("quorum"), "{types:?}");
    assert_eq!(ty(&names.dlq()), Some("quorum"), "{types:?}");
    assert_eq!(ty(&names.task_queue("llm")), Some("classic"), "{types:?}");

    // Consumer: the library's reliable consumer, counting deliveries per id.
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

    // Fault: once the run is well under way, SIGKILL the node we are connected
    // to, wait for the client to be back on another node, then restart it.
    let injector = {
        let backend = backend.clone();
        let metrics = metrics.clone();
        let tally = tally.clone();
        let name = name.clone();
        tokio::spawn(async move {
            while tally.progress() < 6_000 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let endpoint = backend
                .current_endpoint()
                .expect("connected before the fault");
            let port: u16 = endpoint.rsplit(':').next().unwrap().parse().unwrap();
            let node = node_of_port(port);
            let (n2, nm) = (node.clone(), name.clone());
            let seen = tokio::task::spawn_blocking(move || node_has_connection(&n2, &nm))
                .await
                .unwrap();
            assert!(seen, "rabbitmqctl does not list our connection on {node}");

            let mut state = backend.state();
            state.borrow_and_update();
            let recoveries = metrics.connection_recoveries.get();
            let killed_at = Instant::now();
            let n2 = node.clone();
            tokio::task::spawn_blocking(move || Cluster::kill(&n2))
                .await
                .unwrap();
            // Back when a recovery was counted and the state says connected
            // (intermediate states may be skipped by the watch).
            tokio::time::timeout(Duration::from_secs(60), async {
                loop {
                    state.changed().await.expect("backend alive");
                    if *state.borrow_and_update() == ConnectionState::Connected
                        && metrics.connection_recoveries.get() > recoveries
                    {
                        break;
                    }
                }
            })
            .await
            .expect("the client reconnected to another node within 60 s");
            let failover = killed_at.elapsed();
            // The manager publishes the new link right after the state.
            let mut now_on = None;
            for _ in 0..200 {
                now_on = backend.current_endpoint();
                if now_on.is_some() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            let now_on = now_on.expect("a current endpoint after the reconnect");
            assert_ne!(now_on, endpoint, "still on the killed node?");

            // Bring the killed node back (it rejoins with its data) while the run goes on.
            let restart_at = Instant::now();
            tokio::task::spawn_blocking(Cluster::bring_back)
                .await
                .unwrap();
            (node, endpoint, now_on, failover, restart_at.elapsed())
        })
    };

    // Publishers: 8 tasks, paced, each chunk's publishes in flight together.
    let started = Instant::now();
    let mut tasks = Vec::new();
    // While the quorum queue elects a new leader (a few seconds after the kill)
    // RabbitMQ nacks every publish it cannot hand to a leader: safe, the message
    // was never enqueued. A nack is retryable (`Error::is_retryable`), so the
    // publisher sends the same message (same id) again after a pause, for up to
    // 60 s, as an application should. (An earlier version re-sent 5 times with no
    // pause and burned its tries inside the election window.)
    let nacked = Arc::new(AtomicUsize::new(0));
    let nack_window: Arc<Mutex<Option<(Instant, Instant)>>> = Arc::default();
    for t in 0..TASKS {
        let b = b.clone();
        let x = names.tasks_exchange();
        let tally = tally.clone();
        let nacked = nacked.clone();
        let nack_window = nack_window.clone();
        tasks.push(tokio::spawn(async move {
            let msgs: Vec<Message> = (0..TOTAL / TASKS)
                .map(|i| Message::new(format!("{t}-{i}")))
                .collect();
            let mut tick = tokio::time::interval(TICK);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            for chunk in msgs.chunks(CHUNK) {
                tick.tick().await;
                futures::future::join_all(chunk.iter().map(|m| {
                    let b = b.clone();
                    let x = x.clone();
                    let tally = tally.clone();
                    let nacked = nacked.clone();
                    let nack_window = nack_window.clone();
                    async move {
                        let mut r = b.publish(&x, "background", m.clone()).await;
                        let give_up = Instant::now() + Duration::from_secs(60);
                        while matches!(r, Err(helixmq::Error::PublishNacked { .. }))
                            && Instant::now() < give_up
                        {
                            let now = Instant::now();
                            {
                                let mut w = nack_window.lock().unwrap();
                                let (first, _) = w.unwrap_or((now, now));
                                *w = Some((first, now));
                            }
                            nacked.fetch_add(1, Ordering::Relaxed);
                            tokio::time::sleep(Duration::from_millis(250)).await;
                            r = b.publish(&x, "background", m.clone()).await;
                        }
                        tally.published(&m.id, &r);
                    }
                }))
                .await;
            }
        }));
    }
    for t in tasks {
        t.await.expect("publisher task");
    }
    let publish_time = started.elapsed();

    // Every confirmed id must be consumed (the run finishes by itself).
    let on = node_of_port(first_port(&backend));
    tally
        .expect_drained(Duration::from_secs(120), Some(&on), &p)
        .await;
    let total_time = started.elapsed();
    let (node, from, to, failover, restart) = injector
        .await
        .expect("the fault was injected and recovered from");
    sub.shutdown(Duration::from_secs(10)).await;

    let r = tally.report();
    println!(
        "scenario=cluster_failover messages={} lost={} duplicates={} failover_ms={}",
        r.confirmed,
        r.lost,
        r.duplicates,
        failover.as_millis()
    );
    println!(
        "cluster_failover details: RabbitMQ {version}, killed {node} ({from}), client moved to {to}, \
         node restart {restart:.1?}, nacks re-sent {} over {:.1?}, publish errors {}, publish phase {publish_time:.1?}, total {total_time:.1?}, \
         reconnects {}, cluster boot {boot:.1?}",
        nacked.load(Ordering::Relaxed),
        nack_window
            .lock()
            .unwrap()
            .map(|(a, b)| b - a)
            .unwrap_or_default(),
        r.messages - r.confirmed,
        metrics.connection_recoveries.get()
    );
    assert_eq!(
        r.failed + r.timed_out + r.nacked,
        0,
        "publishes failed: {:?}",
        r.errors
    );
    assert_eq!(r.confirmed, TOTAL);
    assert_eq!(r.lost, 0);
    assert!(metrics.connection_recoveries.get() >= 1);
    tokio::task::spawn_blocking(Cluster::status).await.unwrap();

    b.close().await.unwrap();
}

/// The port of the node `backend` is connected to now.
fn first_port(backend: &RabbitBackend) -> u16 {
    backend
        .current_endpoint()
        .expect("connected")
        .rsplit(':')
        .next()
        .unwrap()
        .parse()
        .unwrap()
}
