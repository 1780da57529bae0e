//! A worker with retries and a dead-letter queue: a transient failure comes
//! back after the retry delay (to the very queue it failed in, attempt 2); a
//! poison message goes straight to the DLQ with its reason.
//!
//! ```sh
//! cargo run -p helixmq --example worker_retry_dlq                   # embedded broker
//! RABBITMQ_URL=amqp://guest:guest@127.0.0.1:5672/ cargo run -p helixmq --example worker_retry_dlq
//! ```

use std::time::Duration;

use helixmq::message::header;
use helixmq::{Broker, Message, Outcome, RetryPolicy, SubscribeOptions, Topology};
use tokio::sync::mpsc;

#[tokio::main]
async fn main() -> helixmq::Result<()> {
    let config = helixmq::config::load(None, &Default::default())?;
    let broker = match std::env::var_os("RABBITMQ_URL") {
        Some(_) => Broker::connect(config).await?,
        None => Broker::embedded(config),
    };
    let names = broker.names().clone();
    broker.declare(&Topology::spec(&names)).await?;

    let (done, mut finished) = mpsc::channel::<String>(16);
    let handler = move |m: Message, _ctx| {
        let done = done.clone();
        async move {
            let text = String::from_utf8_lossy(&m.payload).into_owned();
            println!("handling '{text}', attempt {}", m.attempt);
            Ok(match text.as_str() {
                "flaky" if m.attempt == 1 => Outcome::retry("upstream answered 503"),
                "poison" => Outcome::dead_letter("payload is not valid JSON"),
                _ => {
                    let _ = done.send(text).await;
                    Outcome::Ack
                }
            })
        }
    };
    let opts = SubscribeOptions {
        retry: Some(RetryPolicy {
            max_attempts: 3,
            delays: vec![Duration::from_millis(500)], // its own retry queue, declared on subscribe
        }),
        ..SubscribeOptions::default()
    };
    let sub = broker
        .subscribe(&names.task_queue("debate"), handler, opts)
        .await?;

    for text in ["fine", "flaky", "poison"] {
        broker
            .publish(&names.tasks_exchange(), "debate", Message::new(text))
            .await?;
    }
    for _ in 0..2 {
        let text = tokio::time::timeout(Duration::from_secs(10), finished.recv()).await;
        println!("done: {:?}", text.ok().flatten());
    }

    // The poison message waits in the DLQ with its failure headers.
    while let Some(d) = broker.backend().get(&names.dlq()).await? {
        let reason = d
            .message
            .header_str(header::DEAD_LETTER_REASON)
            .unwrap_or("?");
        println!(
            "in the DLQ: '{}' ({reason})",
            String::from_utf8_lossy(&d.message.payload)
        );
        d.acker.ack().await?;
    }
    sub.shutdown(Duration::from_secs(5)).await;
    broker.close().await
}
