//! The embedded broker: the same API and semantics as RabbitMQ, in process —
//! for demos, tests and single-process tools. Here with Prometheus metrics.
//!
//! ```sh
//! cargo run -p helixmq --example embedded
//! ```

use std::time::Duration;

use helixmq::{Broker, Config, Message, Metrics, Outcome, SubscribeOptions, Topology};
use prometheus_client::registry::Registry;
use tokio::sync::mpsc;

#[tokio::main]
async fn main() -> helixmq::Result<()> {
    let mut registry = Registry::default();
    let metrics = Metrics::new(&mut registry);
    let broker = Broker::builder(Config::default())
        .metrics(metrics)
        .embedded();
    let names = broker.names().clone();
    broker.declare(&Topology::spec(&names)).await?;

    // Fan-out: every notification queue gets its own copy.
    let (seen, mut rx) = mpsc::channel::<String>(8);
    let mut subs = Vec::new();
    for q in ["websocket", "sse", "webhooks"] {
        let seen = seen.clone();
        let handler = move |m: Message, ctx: helixmq::Context| {
            let seen = seen.clone();
            async move {
                let _ = seen.send(format!("{} got {}", ctx.queue, m.id)).await;
                Ok(Outcome::Ack)
            }
        };
        let queue = names.notification_queue(q);
        subs.push(
            broker
                .subscribe(&queue, handler, SubscribeOptions::default())
                .await?,
        );
    }
    broker
        .publish(
            &names.notifications_exchange(),
            "",
            Message::new("deploy finished"),
        )
        .await?;
    for _ in 0..3 {
        if let Ok(Some(line)) = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await {
            println!("{line}");
        }
    }
    for s in subs {
        s.shutdown(Duration::from_secs(5)).await;
    }

    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
    for line in text
        .lines()
        .filter(|l| l.starts_with("rabbitmq_messages_acked_total"))
    {
        println!("{line}");
    }
    broker.close().await
}
