//! The whole helixmq flow on one broker handle, asserted step by step:
//! topology, confirmed publish, consume, retry back to the origin queue, the
//! DLQ (by `DeadLetter` and by max attempts), and a DLQ replay done with the
//! library (get from the DLQ, republish to the origin through the requeue
//! exchange with a confirm, then ack). Used by the least-privilege tests.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use helixmq::message::header;
use helixmq::{
    BoxError, Broker, Context, Message, Outcome, PublishOptions, RetryPolicy, SubscribeOptions,
    Topology,
};
use tokio::sync::mpsc;

/// One handler call.
#[derive(Debug, Clone)]
pub struct Call {
    /// The payload, as text.
    pub payload: String,
    /// The message id.
    pub id: String,
    /// Its attempt number (1 for the first delivery).
    pub attempt: u32,
    /// The exchange it came through (the requeue exchange for a retry).
    pub exchange: String,
    /// The queue it was consumed from.
    pub queue: String,
}

async fn next_calls(rx: &mut mpsc::Receiver<Call>, n: usize, what: &str) -> Vec<Call> {
    let mut out = Vec::new();
    while out.len() < n {
        match tokio::time::timeout(Duration::from_secs(30), rx.recv()).await {
            Ok(Some(c)) => out.push(c),
            _ => panic!("{what}: only {} of {n} handler calls: {out:?}", out.len()),
        }
    }
    out
}

fn find<'a>(calls: &'a [Call], payload: &str, attempt: u32) -> &'a Call {
    calls
        .iter()
        .find(|c| c.payload == payload && c.attempt == attempt)
        .unwrap_or_else(|| panic!("no call for '{payload}' attempt {attempt} in {calls:?}"))
}

/// Run the flow on `b` (whose topology must be, or become, `Topology::spec`).
pub async fn whole_flow(b: &Broker) {
    let names = b.names().clone();
    b.declare(&Topology::spec(&names))
        .await
        .expect("declare the spec topology");
    let exchange = names.tasks_exchange();
    let queue = names.task_queue("background");
    let dlq = names.dlq();
    let requeue = names.requeue_exchange();

    let healed = Arc::new(AtomicBool::new(false));
    let (tx, mut rx) = mpsc::channel::<Call>(64);
    let h = healed.clone();
    let sub = b
        .subscribe(
            &queue,
            move |m: Message, ctx: Context| {
                let (tx, healed) = (tx.clone(), h.load(Ordering::SeqCst));
                async move {
                    let payload = String::from_utf8_lossy(&m.payload).into_owned();
                    let _ = tx
                        .send(Call {
                            payload: payload.clone(),
                            id: m.id.clone(),
                            attempt: m.attempt,
                            exchange: ctx.exchange,
                            queue: ctx.queue,
                        })
                        .await;
                    match payload.as_str() {
                        "flaky" if m.attempt == 1 => Ok(Outcome::retry("flaky the first time")),
                        "poison" if !healed => Ok(Outcome::dead_letter("poison: cannot handle")),
                        "fail" if !healed => Err::<Outcome, BoxError>("always fails".into()),
                        _ => Ok(Outcome::Ack),
                    }
                }
            },
            SubscribeOptions {
                prefetch: Some(8),
                retry: Some(RetryPolicy {
                    max_attempts: 2,
                    delays: vec![Duration::from_secs(1)],
                }),
                ..Default::default()
            },
        )
        .await
        .expect("subscribe");

    let mut ids = std::collections::HashMap::new();
    for p in ["ok", "flaky", "poison", "fail"] {
        let m = Message::new(p);
        ids.insert(p, m.id.clone());
        b.publish(&exchange, "background", m)
            .await
            .expect("confirmed publish");
    }

    // ok 1, flaky 1+2, poison 1, fail 1+2.
    let calls = next_calls(&mut rx, 6, "first pass").await;
    for c in &calls {
        assert_eq!(c.id, ids[c.payload.as_str()], "{c:?}");
        assert_eq!(c.queue, queue);
    }
    find(&calls, "ok", 1);
    assert_eq!(find(&calls, "flaky", 1).exchange, exchange);
    // The retry came back to the very queue it failed in, through the requeue exchange.
    assert_eq!(find(&calls, "flaky", 2).exchange, requeue);
    assert_eq!(find(&calls, "fail", 2).exchange, requeue);

    // Both failures reach the DLQ with their reasons.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while b.backend().queue_stats(&dlq).await.unwrap().messages < 2 {
        assert!(tokio::time::Instant::now() < deadline, "DLQ did not fill");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Replay with the library: each DLQ message is republished to its origin
    // (confirmed) before it is acked in the DLQ, so a crash between the two
    // duplicates it, never loses it.
    healed.store(true, Ordering::SeqCst);
    let mut replayed = Vec::new();
    while let Some(d) = b.backend().get(&dlq).await.expect("get from the DLQ") {
        let m = d.message.clone();
        let payload = String::from_utf8_lossy(&m.payload).into_owned();
        let reason = m
            .header_str(header::DEAD_LETTER_REASON)
            .unwrap_or_default()
            .to_string();
        match payload.as_str() {
            "poison" => assert_eq!(reason, "poison: cannot handle"),
            "fail" => assert!(
                reason.contains("gave up after 2 attempts") && reason.contains("always fails"),
                "{reason}"
            ),
            other => panic!("unexpected DLQ message '{other}'"),
        }
        let origin = m
            .header_str(header::ORIGIN_QUEUE)
            .expect("origin queue header")
            .to_string();
        assert_eq!(origin, queue);
        let mut again = std::sync::Arc::unwrap_or_clone(m);
        again.attempt = 1;
        b.publish_with(&requeue, &origin, again, &PublishOptions::default())
            .await
            .expect("replay publish confirmed");
        d.acker
            .ack()
            .await
            .expect("ack in the DLQ after the confirm");
        replayed.push(payload);
    }
    replayed.sort();
    assert_eq!(replayed, ["fail", "poison"]);

    let calls = next_calls(&mut rx, 2, "replay").await;
    for p in ["poison", "fail"] {
        let c = find(&calls, p, 1);
        assert_eq!(c.id, ids[p], "replay keeps the message id");
        assert_eq!(c.exchange, requeue);
    }

    let report = sub.shutdown(Duration::from_secs(5)).await;
    assert_eq!(report.abandoned, 0);
    assert_eq!(b.backend().queue_stats(&queue).await.unwrap().messages, 0);
    assert_eq!(b.backend().queue_stats(&dlq).await.unwrap().messages, 0);
    assert!(rx.try_recv().is_err(), "no extra handler call");
}
