//! Shared rate limits: two subscriptions (as two workers would) share 120
//! requests/min on one key; a handler answering `RetryAfter` pauses both.
//!
//! ```sh
//! cargo run -p helixmq --example rate_limit                  # embedded broker
//! RABBITMQ_URL=amqp://guest:guest@127.0.0.1:5672/ cargo run -p helixmq --example rate_limit
//! ```

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use helixmq::ratelimit::RateLimit;
use helixmq::{Broker, Message, Outcome, RetryPolicy, SubscribeOptions, Topology};

#[tokio::main]
async fn main() -> helixmq::Result<()> {
    let config = helixmq::config::load(None, &Default::default())?;
    let broker = match std::env::var_os("RABBITMQ_URL") {
        Some(_) => Broker::connect(config).await?,
        None => Broker::embedded(config),
    };
    let names = broker.names().clone();
    broker.declare(&Topology::spec(&names)).await?;
    let limit: RateLimit = "example-key=120/min,burst=1".parse()?;
    let start = Instant::now();
    let starts = Arc::new(Mutex::new(Vec::new()));
    let mut subs = Vec::new();
    for worker in ["a", "b"] {
        let starts = starts.clone();
        let handler = move |m: Message, _ctx: helixmq::Context| {
            let starts = starts.clone();
            async move {
                let at = start.elapsed().as_secs_f64();
                starts.lock().unwrap().push(at);
                let text = String::from_utf8_lossy(&m.payload).into_owned();
                println!("{at:5.2}s worker {worker}: {text}");
                // The provider said 429, Retry-After 3: every worker waits.
                if text == "message 5" && m.attempt == 1 {
                    println!("      worker {worker}: rate limited, pausing the key for 3 s");
                    return Ok(Outcome::RetryAfter(Duration::from_secs(3)));
                }
                Ok(Outcome::Ack)
            }
        };
        let opts = SubscribeOptions {
            rate_limit: Some(limit.clone()),
            retry: Some(RetryPolicy {
                max_attempts: 3,
                delays: vec![Duration::from_secs(1)],
            }),
            ..Default::default()
        };
        subs.push(
            broker
                .subscribe(&names.task_queue("background"), handler, opts)
                .await?,
        );
    }
    for i in 0..12 {
        let m = Message::new(format!("message {i}"));
        broker
            .publish(&names.tasks_exchange(), "background", m)
            .await?;
    }
    // 12 messages and a retry at 2/s, with a 3 s pause: about 10 s.
    tokio::time::sleep(Duration::from_secs(11)).await;
    for s in subs {
        s.shutdown(Duration::from_secs(5)).await;
    }
    println!(
        "{} handler starts at 2/s for both workers together",
        starts.lock().unwrap().len()
    );
    broker.close().await
}
