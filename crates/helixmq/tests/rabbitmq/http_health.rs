//! `/health` and `rabbitmq_connection_state` on the RabbitMQ backend while the
//! network is cut and restored: a TCP proxy inside the test stands between the
//! client and the local broker; taking it down drops every connection and
//! refuses new ones. The gauge reads 1, then 0 while cut, then 1 after the
//! client recovered by itself; `/health` answers 200, 503, 200 accordingly,
//! and the subscription consumes again after recovery.

use helixmq_testkit::broker;
use helixmq_testkit::prom;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use helixmq::backend::rabbitmq::RabbitBackend;
use helixmq::http::{self, HealthSource};
use helixmq::topology::Queue;
use helixmq::{Broker, Message, Metrics, Outcome, SubscribeOptions, Topology};
use prometheus_client::registry::Registry;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// A TCP proxy to `upstream` that can be taken down (every open connection
/// dropped, new ones closed at once) and brought back.
struct Proxy {
    addr: SocketAddr,
    up: watch::Sender<bool>,
    /// Owns the accept loop; aborted when the proxy is dropped.
    _tasks: JoinSet<()>,
}

impl Proxy {
    async fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (up, up_rx) = watch::channel(true);
        let mut tasks = JoinSet::new();
        tasks.spawn(async move {
            // Connection tasks belong to the accept loop: aborted with it.
            let mut conns = JoinSet::new();
            loop {
                let Ok((mut client, _)) = listener.accept().await else {
                    return;
                };
                while conns.try_join_next().is_some() {}
                if !*up_rx.borrow() {
                    drop(client);
                    continue;
                }
                let mut down = up_rx.clone();
                conns.spawn(async move {
                    let Ok(mut server) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = down.wait_for(|up| !*up) => {}
                    }
                });
            }
        });
        Proxy {
            addr,
            up,
            _tasks: tasks,
        }
    }

    fn set_up(&self, up: bool) {
        self.up.send_replace(up);
    }
}

async fn get(url: &str) -> (u16, String) {
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let r = client.get(url).send().await.expect("HTTP request");
    (r.status().as_u16(), r.text().await.unwrap())
}

/// Poll `/health` and `/metrics` until both say `code` and `gauge` (bounded).
async fn wait_for(base: &str, code: u16, gauge: f64, within: Duration) -> String {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let (c, body) = get(&format!("{base}/health")).await;
        let g = prom::parse(&get(&format!("{base}/metrics")).await.1)
            .unwrap()
            .value("rabbitmq_connection_state", &[]);
        if c == code && g == Some(gauge) {
            return body;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "waited {within:?} for /health {code} and connection_state {gauge}; last: {c} {g:?} {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn health_and_connection_state_follow_a_network_cut() {
    let proxy = Proxy::start("127.0.0.1:5672".parse().unwrap()).await;
    let prefix = broker::prefix();
    let mut config = broker::config(broker::GUEST, &prefix);
    config.rabbitmq.host = "127.0.0.1".into();
    config.rabbitmq.port = proxy.addr.port();
    config.rabbitmq.connect_timeout = Duration::from_secs(2);

    let mut registry = Registry::default();
    let metrics = Metrics::new(&mut registry);
    let backend = RabbitBackend::connect_named(
        &config.rabbitmq,
        metrics.clone(),
        &format!("hxtest-{prefix}"),
    )
    .await
    .unwrap();
    let broker = Broker::builder(config)
        .metrics(metrics)
        .custom_backend(Arc::new(backend));
    let queue = format!("{prefix}.health");
    let mut t = Topology::system(broker.names());
    t.queues.push(Queue::durable(queue.clone()));
    broker.declare(&t).await.unwrap();

    let (seen_tx, mut seen) = mpsc::channel::<String>(16);
    let sub = broker
        .subscribe(
            &queue,
            move |m: Message, _ctx| {
                let seen = seen_tx.clone();
                async move {
                    seen.send(m.id).await.ok();
                    Ok(Outcome::Ack)
                }
            },
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
    let base = format!("http://{}", server.local_addr());

    let body = wait_for(&base, 200, 1.0, Duration::from_secs(5)).await;
    assert!(
        body.contains("\"backend\":\"rabbitmq\"") && body.contains("\"status\":\"active\""),
        "{body}"
    );

    proxy.set_up(false);
    let body = wait_for(&base, 503, 0.0, Duration::from_secs(10)).await;
    assert!(body.contains("\"connection\":\"disconnected\""), "{body}");
    assert!(body.contains("connection lost"), "{body}");

    proxy.set_up(true);
    let body = wait_for(&base, 200, 1.0, Duration::from_secs(20)).await;
    assert!(body.contains("\"status\":\"ok\""), "{body}");

    // Recovered for real: a message published now reaches the restored consumer.
    let m = Message::new("after the cut");
    let id = m.id.clone();
    broker
        .publish_with("", &queue, m, &Default::default())
        .await
        .unwrap();
    let got = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match seen.recv().await {
                Some(x) if x == id => return x,
                Some(_) => continue,
                None => panic!("handler gone"),
            }
        }
    })
    .await
    .expect("consumer restored after recovery");
    assert_eq!(got, id);

    sub.shutdown(Duration::from_secs(5)).await;
    broker::cleanup(&broker, Some(&t)).await;
    broker.close().await.unwrap();
    shutdown.cancel();
    server.join().await.unwrap();
}
