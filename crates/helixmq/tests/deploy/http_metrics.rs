//! `/metrics` and `/health` served by `helixmq::http` over a broker whose
//! backend state the test controls: the scrape parses as Prometheus text and
//! its counters equal what a known run must produce; `/health` answers 503
//! with the reason when disconnected or a subscription died, 200 otherwise.

use helixmq_testkit::prom;

use std::sync::Arc;
use std::time::Duration;

use helixmq::http::{self, HealthSource};
use helixmq::{
    Broker, Config, ConnectionState, Message, Metrics, Outcome, PublishOptions, RetryPolicy,
    SubscribeOptions,
};
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

use helixmq_testkit::fake::FakeBackend;

const WORK: &str = "hx.work";
const IDLE: &str = "hx.idle";
const EXCHANGE: &str = "hx.tasks";

struct Setup {
    broker: Broker,
    backend: Arc<FakeBackend>,
    registry: Registry,
}

fn setup() -> Setup {
    let config = Config::default();
    let names = helixmq::Names::new(config.helixmq.prefix.clone());
    let backend = FakeBackend::new(names.dead_letter_exchange());
    backend.add_queue(WORK);
    backend.add_queue(IDLE);
    let mut registry = Registry::default();
    let metrics = Metrics::new(&mut registry);
    let broker = Broker::builder(config)
        .metrics(metrics)
        .custom_backend(backend.clone());
    Setup {
        broker,
        backend,
        registry,
    }
}

async fn get(url: &str) -> (u16, String, Option<String>) {
    let r = reqwest::Client::builder()
        .no_proxy()
        .build()
        .unwrap()
        .get(url)
        .send()
        .await
        .expect("HTTP request");
    let code = r.status().as_u16();
    let ct = r
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_string());
    (code, r.text().await.unwrap(), ct)
}

/// 100 published (10 consumed, 90 to a queue nobody consumes); 3 of the 10 are
/// poison and fail every time, at max 3 attempts.
#[tokio::test]
async fn counters_after_a_known_run() {
    let Setup {
        broker,
        backend,
        registry,
    } = setup();

    let mut work: Vec<Message> = (0..7).map(|i| Message::new(format!("ok-{i}"))).collect();
    work.extend((0..3).map(|i| Message::new(format!("poison-{i}"))));
    for m in work {
        broker.publish(EXCHANGE, WORK, m).await.unwrap();
    }
    let idle: Vec<Message> = (0..90).map(|i| Message::new(format!("idle-{i}"))).collect();
    for r in broker
        .publish_batch(EXCHANGE, IDLE, &idle, &PublishOptions::default())
        .await
    {
        r.unwrap();
    }
    // One publish that fails: unroutable.
    assert!(broker
        .publish(EXCHANGE, "nowhere", Message::new("x"))
        .await
        .is_err());

    let opts = SubscribeOptions {
        prefetch: Some(4),
        retry: Some(RetryPolicy {
            max_attempts: 3,
            delays: vec![Duration::from_millis(10)],
        }),
        ..Default::default()
    };
    let sub = broker
        .subscribe(
            WORK,
            |m: Message, _ctx| async move {
                if m.payload.starts_with(b"poison") {
                    Ok(Outcome::retry("poison"))
                } else {
                    Ok(Outcome::Ack)
                }
            },
            opts,
        )
        .await
        .unwrap();
    // 7 good deliveries + 3 poison × 3 attempts, each settled by an ack.
    backend.settled(16).await;
    let report = sub.shutdown(Duration::from_secs(5)).await;
    assert_eq!(report.abandoned, 0);
    assert_eq!(backend.acks(), 16);
    assert_eq!(backend.dead.lock().unwrap().len(), 3);

    let health = HealthSource::new(&broker);
    let shutdown = CancellationToken::new();
    let server = http::serve(
        "127.0.0.1:0".parse().unwrap(),
        http::router(health, Arc::new(registry)),
        shutdown.clone(),
    )
    .await
    .unwrap();
    let (code, body, ct) = get(&format!("http://{}/metrics", server.local_addr())).await;
    assert_eq!(code, 200);
    assert_eq!(ct.as_deref(), Some(http::METRICS_CONTENT_TYPE));
    let scrape =
        prom::parse(&body).unwrap_or_else(|e| panic!("scrape does not parse: {e}\n{body}"));

    let ex = [("exchange", EXCHANGE)];
    let q = [("queue", WORK)];
    // Retry and DLQ copies are publishes too: 3 poison × 2 retries, 3 dead letters.
    let tier = broker.names().retry_tier(Duration::from_millis(10));
    let dlx = broker.names().dead_letter_exchange();
    let tier_ex = [("exchange", tier.as_str())];
    let dlx_ex = [("exchange", dlx.as_str())];
    let expect = [
        ("rabbitmq_messages_published_total", &ex[..], 100.0),
        ("rabbitmq_publish_failures_total", &ex[..], 1.0),
        ("rabbitmq_messages_consumed_total", &q[..], 16.0),
        ("rabbitmq_messages_acked_total", &q[..], 16.0),
        ("rabbitmq_messages_retried_total", &q[..], 6.0),
        ("rabbitmq_messages_dead_lettered_total", &q[..], 3.0),
        ("rabbitmq_messages_published_total", &tier_ex[..], 6.0),
        ("rabbitmq_messages_published_total", &dlx_ex[..], 3.0),
        ("rabbitmq_publish_latency_seconds_count", &[][..], 109.0),
        ("rabbitmq_handler_duration_seconds_count", &[][..], 16.0),
        ("rabbitmq_handlers_in_flight", &[][..], 0.0),
        ("rabbitmq_confirms_pending", &[][..], 0.0),
        ("rabbitmq_connection_state", &[][..], 1.0),
    ];
    for (name, labels, want) in expect {
        assert_eq!(
            scrape.value(name, labels),
            Some(want),
            "{name}{labels:?} in\n{body}"
        );
    }
    // Nothing was nacked: the series exists from the subscription's start (so
    // rate() works from zero) and reads 0.
    assert_eq!(
        scrape.value("rabbitmq_messages_nacked_total", &q),
        Some(0.0)
    );
    assert_eq!(
        scrape
            .types
            .get("rabbitmq_publish_latency_seconds")
            .map(String::as_str),
        Some("histogram")
    );
    assert_eq!(
        scrape
            .types
            .get("rabbitmq_messages_published")
            .map(String::as_str),
        Some("counter")
    );

    shutdown.cancel();
    server.join().await.unwrap();
}

#[tokio::test]
async fn health_follows_connection_and_subscriptions() {
    let Setup {
        broker,
        backend,
        registry,
    } = setup();
    let sub = broker
        .subscribe(
            WORK,
            |_m: Message, _ctx| async { Ok(Outcome::Ack) },
            SubscribeOptions::default(),
        )
        .await
        .unwrap();
    let health = HealthSource::new(&broker).watch(&sub);
    let shutdown = CancellationToken::new();
    let server = http::serve(
        "127.0.0.1:0".parse().unwrap(),
        http::router(health, Arc::new(registry)),
        shutdown.clone(),
    )
    .await
    .unwrap();
    let url = format!("http://{}/health", server.local_addr());
    let metrics_url = format!("http://{}/metrics", server.local_addr());
    let state_gauge = |body: &str| {
        prom::parse(body)
            .unwrap()
            .value("rabbitmq_connection_state", &[])
    };

    let (code, body, _) = get(&url).await;
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["status"], "ok");
    assert_eq!(v["backend"], "memory");
    assert_eq!(v["connection"], "connected");
    assert_eq!(v["subscriptions"][0]["queue"], WORK);
    assert_eq!(v["subscriptions"][0]["status"], "active");
    assert!(v.get("reasons").is_none());

    // Connection cut: 503 naming the reason, and the gauge reads 0.
    backend.set_state(ConnectionState::Disconnected);
    let (code, body, _) = get(&url).await;
    assert_eq!(code, 503, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["status"], "unavailable");
    assert_eq!(v["connection"], "disconnected");
    assert!(
        v["reasons"][0]
            .as_str()
            .unwrap()
            .contains("connection lost"),
        "{body}"
    );
    // The gauge follows through a task, so poll briefly for it.
    let mut gauge = None;
    for _ in 0..50 {
        gauge = state_gauge(&get(&metrics_url).await.1);
        if gauge == Some(0.0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(gauge, Some(0.0));

    // Blocked by an alarm: still 503, saying so.
    backend.set_state(ConnectionState::Blocked);
    let (code, body, _) = get(&url).await;
    assert_eq!(code, 503);
    assert!(body.contains("blocked"), "{body}");

    // Recovered: 200 again.
    backend.set_state(ConnectionState::Connected);
    let (code, body, _) = get(&url).await;
    assert_eq!(code, 200, "{body}");

    // The broker cancels the consumer: the subscription fails, /health says which.
    backend.cancel_consumer(WORK).await;
    let mut status = sub.watch_status();
    tokio::time::timeout(
        Duration::from_secs(5),
        status.wait_for(|s| *s != helixmq::SubscriptionStatus::Active),
    )
    .await
    .unwrap()
    .unwrap();
    let (code, body, _) = get(&url).await;
    assert_eq!(code, 503, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["connection"], "connected");
    assert_eq!(v["subscriptions"][0]["status"], "failed");
    assert!(
        v["subscriptions"][0]["error"]
            .as_str()
            .unwrap()
            .contains("cancelled"),
        "{body}"
    );
    assert!(v["reasons"][0].as_str().unwrap().contains(WORK), "{body}");

    sub.shutdown(Duration::from_secs(1)).await;
    shutdown.cancel();
    server.join().await.unwrap();
}

#[tokio::test]
async fn stopped_subscription_is_unhealthy() {
    let Setup {
        broker, registry, ..
    } = setup();
    let sub = broker
        .subscribe(
            WORK,
            |_m: Message, _ctx| async { Ok(Outcome::Ack) },
            SubscribeOptions::default(),
        )
        .await
        .unwrap();
    let health = HealthSource::new(&broker).watch(&sub);
    assert!(health.check().is_ok());
    sub.shutdown(Duration::from_secs(1)).await;
    let h = health.check();
    assert_eq!(h.status, "unavailable");
    assert_eq!(h.subscriptions[0].status, "stopped");
    assert!(h.reasons[0].contains("stopped"), "{:?}", h.reasons);
    drop(registry);
}

#[tokio::test]
async fn serve_reports_a_busy_port_and_shuts_down_gracefully() {
    let Setup {
        broker, registry, ..
    } = setup();
    let router = http::router(HealthSource::new(&broker), Arc::new(registry));
    let shutdown = CancellationToken::new();
    let server = http::serve(
        "127.0.0.1:0".parse().unwrap(),
        router.clone(),
        shutdown.clone(),
    )
    .await
    .unwrap();
    let addr = server.local_addr();

    let err = http::serve(addr, router, CancellationToken::new())
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains(&addr.to_string()) && msg.contains("in use"),
        "{msg}"
    );

    let (code, _, _) = get(&format!("http://{addr}/health")).await;
    assert_eq!(code, 200);
    let (code, _, _) = get(&format!("http://{addr}/nope")).await;
    assert_eq!(code, 404);

    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(5), server.join())
        .await
        .expect("server stops")
        .unwrap();
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "listener closed after shutdown"
    );
}

/// The same kind of known run on the embedded broker, with its real retry
/// tiers and DLQ: 100 published to the tasks exchange (90 to a queue nobody
/// consumes, 10 to one that is consumed), 3 of the 10 poison at max 3 attempts.
#[tokio::test]
async fn counters_after_a_known_run_on_the_embedded_broker() {
    let mut config = Config::default();
    config.helixmq.prefix = format!("helixagent.hxt{}", uuid::Uuid::new_v4().simple());
    let names = helixmq::Names::new(config.helixmq.prefix.clone());
    let mut registry = Registry::default();
    let metrics = Metrics::new(&mut registry);
    let backend = Arc::new(helixmq::backend::memory::MemoryBroker::new());
    let broker = Broker::builder(config)
        .metrics(metrics.clone())
        .custom_backend(backend);
    broker
        .declare(&helixmq::Topology::spec(&names))
        .await
        .unwrap();
    let tasks = names.tasks_exchange();
    let consumed_q = names.task_queue("verification");
    let idle_q = names.task_queue("background");

    let idle: Vec<Message> = (0..90).map(|i| Message::new(format!("idle-{i}"))).collect();
    for r in broker
        .publish_batch(&tasks, "background", &idle, &PublishOptions::default())
        .await
    {
        r.unwrap();
    }
    for i in 0..10 {
        let body = if i < 3 {
            format!("poison-{i}")
        } else {
            format!("ok-{i}")
        };
        broker
            .publish(&tasks, "verification", Message::new(body))
            .await
            .unwrap();
    }
    let opts = SubscribeOptions {
        prefetch: Some(5),
        retry: Some(RetryPolicy {
            max_attempts: 3,
            delays: vec![Duration::from_millis(20)],
        }),
        ..Default::default()
    };
    let sub = broker
        .subscribe(
            &consumed_q,
            |m: Message, _ctx| async move {
                if m.payload.starts_with(b"poison") {
                    Ok(Outcome::retry("poison"))
                } else {
                    Ok(Outcome::Ack)
                }
            },
            opts,
        )
        .await
        .unwrap();

    // The counters are not awaitable: poll them until the run is over (bounded).
    let qlabel = helixmq::metrics::QueueLabel {
        queue: consumed_q.clone(),
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while metrics.dead_lettered.get_or_create(&qlabel).get() < 3
        || metrics.acked.get_or_create(&qlabel).get() < 16
    {
        assert!(tokio::time::Instant::now() < deadline, "run did not finish");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    sub.shutdown(Duration::from_secs(5)).await;

    let shutdown = CancellationToken::new();
    let router = http::router(HealthSource::new(&broker), Arc::new(registry));
    let server = http::serve("127.0.0.1:0".parse().unwrap(), router, shutdown.clone())
        .await
        .unwrap();
    let (code, body, _) = get(&format!("http://{}/metrics", server.local_addr())).await;
    assert_eq!(code, 200);
    let scrape =
        prom::parse(&body).unwrap_or_else(|e| panic!("scrape does not parse: {e}\n{body}"));
    let ex = [("exchange", tasks.as_str())];
    let q = [("queue", consumed_q.as_str())];
    let tier = names.retry_tier(Duration::from_millis(20));
    let dlx = names.dead_letter_exchange();
    let tier_ex = [("exchange", tier.as_str())];
    let dlx_ex = [("exchange", dlx.as_str())];
    for (name, labels, want) in [
        ("rabbitmq_messages_published_total", &ex[..], 100.0),
        ("rabbitmq_messages_published_total", &tier_ex[..], 6.0),
        ("rabbitmq_messages_published_total", &dlx_ex[..], 3.0),
        ("rabbitmq_messages_consumed_total", &q[..], 16.0),
        ("rabbitmq_messages_acked_total", &q[..], 16.0),
        ("rabbitmq_messages_retried_total", &q[..], 6.0),
        ("rabbitmq_messages_dead_lettered_total", &q[..], 3.0),
        ("rabbitmq_publish_latency_seconds_count", &[][..], 109.0),
        ("rabbitmq_handler_duration_seconds_count", &[][..], 16.0),
        ("rabbitmq_handlers_in_flight", &[][..], 0.0),
        ("rabbitmq_connection_state", &[][..], 1.0),
    ] {
        assert_eq!(
            scrape.value(name, labels),
            Some(want),
            "{name}{labels:?} in\n{body}"
        );
    }
    // Declared exchanges read 0 from the start, not "no data".
    assert_eq!(
        scrape.value("rabbitmq_publish_failures_total", &ex),
        Some(0.0)
    );
    // The broker agrees: 3 in the DLQ, 90 still waiting, none left in the consumed queue.
    let b = broker.backend();
    assert_eq!(b.queue_stats(&names.dlq()).await.unwrap().messages, 3);
    assert_eq!(b.queue_stats(&idle_q).await.unwrap().messages, 90);
    assert_eq!(b.queue_stats(&consumed_q).await.unwrap().messages, 0);

    let (code, body, _) = get(&format!("http://{}/health", server.local_addr())).await;
    assert_eq!(code, 200, "{body}");
    broker.close().await.unwrap();
    let (code, body, _) = get(&format!("http://{}/health", server.local_addr())).await;
    assert_eq!(code, 503, "closed broker must be unhealthy: {body}");
    assert!(body.contains("closed"), "{body}");
    shutdown.cancel();
    server.join().await.unwrap();
}
