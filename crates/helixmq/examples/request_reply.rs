//! Request-reply: `Broker::request` waits for the answer a handler gives with
//! `Outcome::Reply`. The caller's timeout travels with the request: a worker
//! skips a request nobody waits for any more. Works as the spec's
//! least-privilege user (no default exchange, no direct reply-to).
//!
//! ```sh
//! cargo run -p helixmq --example request_reply                  # embedded broker
//! RABBITMQ_URL=amqp://guest:guest@127.0.0.1:5672/ cargo run -p helixmq --example request_reply
//! ```

use std::time::Duration;

use helixmq::{Broker, Error, Message, Outcome, SubscribeOptions, Topology};

#[tokio::main]
async fn main() -> helixmq::Result<()> {
    let config = helixmq::config::load(None, &Default::default())?;
    let broker = match std::env::var_os("RABBITMQ_URL") {
        Some(_) => Broker::connect(config).await?,
        None => Broker::embedded(config),
    };
    let names = broker.names().clone();
    broker.declare(&Topology::spec(&names)).await?;

    // The worker: answers each question on the llm queue.
    let worker = broker
        .subscribe(
            &names.task_queue("llm"),
            |m: Message, _ctx| async move {
                let question = String::from_utf8_lossy(&m.payload).into_owned();
                let answer = format!("{} characters", question.chars().count());
                Ok(Outcome::reply(Message::new(answer)))
            },
            SubscribeOptions::default(),
        )
        .await?;

    // The caller: a few requests at once, each with its own deadline.
    let tasks = names.tasks_exchange();
    let questions = ["how long is this?", "and this one?", "?"];
    let calls = questions
        .iter()
        .map(|q| broker.request(&tasks, "llm", Message::new(*q), Duration::from_secs(10)));
    for (q, reply) in questions.iter().zip(futures::future::join_all(calls).await) {
        let reply = reply?;
        println!("{q:<20} → {}", String::from_utf8_lossy(&reply.payload));
    }

    // Nobody consumes the background queue: the request times out, and then
    // expires in its queue instead of waiting for a worker.
    match broker
        .request(
            &tasks,
            "background",
            Message::new("anyone?"),
            Duration::from_millis(500),
        )
        .await
    {
        Err(e @ Error::RequestTimeout { .. }) => println!("as expected: {e}"),
        other => {
            return Err(Error::InvalidMessage(format!(
                "expected a timeout, got {other:?}"
            )))
        }
    }

    worker.shutdown(Duration::from_secs(5)).await;
    broker.close().await
}
