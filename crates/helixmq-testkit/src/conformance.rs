//! The conformance suite, written once and run against every backend.
//!
//! A backend's test module calls
//! `helixmq_testkit::helixmq_conformance!(make_broker);` where `make_broker` is
//! `async fn(prefix: &str) -> helixmq::Broker` returning a broker whose config
//! has `helixmq.prefix = prefix`. That expands to one `#[tokio::test]` per case.
//!
//! Every case runs under its own prefix (`helixagent.t<random>`, inside the
//! spec's least-privilege permissions), declares the spec topology, deletes
//! everything it declared at the end — also when an assertion fails — and is
//! bounded by a timeout so a broken backend fails instead of hanging. Messages
//! are counted by id everywhere; every case that moves messages asserts that
//! none was lost. Only the public API and the `Backend` trait are used, so the
//! suite says nothing about how a backend works inside.

use std::collections::{BTreeSet, HashSet};
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::FutureExt;
use helixmq::backend::Delivery;
use helixmq::message::header;
use helixmq::metrics::{RequestLabel, RequestOutcome};
use helixmq::{
    Broker, Context, Error, HeaderValue, Message, Names, Outcome, Priority, PublishOptions,
    RetryPolicy, SubscribeOptions, Subscription, SubscriptionStatus, Topology,
};
use tokio::sync::{watch, Semaphore};

/// Longest a whole case may run.
pub const CASE_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest a single wait (for deliveries, handler calls) may take.
pub const WAIT: Duration = Duration::from_secs(15);
/// The short retry delay the cases use (its own retry tier).
pub const RETRY_DELAY: Duration = Duration::from_millis(300);

/// Expands to one `#[tokio::test]` per conformance case for a backend.
#[macro_export]
macro_rules! helixmq_conformance {
    ($make:path) => {
        $crate::helixmq_conformance!(@cases $make;
            routing_tasks_direct_by_routing_key,
            routing_events_topic_patterns,
            routing_notifications_fanout_to_all,
            unroutable_mandatory_publish_is_an_error,
            publish_to_missing_exchange_is_not_found,
            redeclare_with_other_arguments_is_precondition_failed,
            priority_above_queue_max_is_refused,
            priority_order_highest_first_fifo_within,
            ttl_expiry_ends_in_dlq_with_x_death,
            retry_returns_to_origin_queue_on_each_exchange,
            retry_whose_origin_queue_is_gone_ends_in_the_dlq,
            max_attempts_end_in_dlq_with_failure_headers,
            dead_letter_outcome_goes_straight_to_dlq,
            panicking_handler_counts_as_retry,
            handler_past_timeout_counts_as_retry,
            redelivery_when_consumer_goes_away_without_ack,
            nack_requeue_and_reject,
            prefetch_is_respected,
            consumers_share_a_queue,
            graceful_shutdown_loses_nothing,
            shutdown_deadline_returns_unfinished_messages,
            publish_batch_confirms_each,
            reject_publish_overflow_nacks_the_publisher,
            full_retry_queue_holds_deliveries_until_room,
            full_dlq_holds_dead_letters_until_room,
            shutdown_gives_held_deliveries_back_to_their_queue,
            drop_head_overflow_dead_letters_the_oldest,
            stats_and_purge,
            deleted_queue_fails_the_subscription,
            scheduled_publish_arrives_on_time,
            scheduled_publish_routes_like_its_exchange,
            scheduled_short_delay_is_not_held_behind_a_long_one,
            scheduled_publish_refuses_what_it_cannot_keep,
            scheduled_publish_reaches_a_queue_declared_later,
            requeue_delayed_brings_a_message_back_to_its_work_queue,
            single_active_consumer_hands_over_when_the_active_one_goes,
            rate_limit_is_shared_by_subscriptions_and_paused_by_retry_after,
            request_gets_its_reply,
            request_nobody_answers_times_out_and_expires_in_its_queue,
            request_past_its_deadline_is_not_handled,
            reply_to_a_gone_caller_is_counted_not_dead_lettered,
        );
    };
    (@cases $make:path; $($case:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let prefix = $crate::conformance::unique_prefix();
                let broker = $make(&prefix).await;
                $crate::conformance::run(broker, $crate::conformance::$case).await;
            }
        )*
    };
}

/// A fresh prefix under `helixagent.` (the spec's permission pattern).
pub fn unique_prefix() -> String {
    format!(
        "helixagent.t{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    )
}

/// Declare the spec topology, run `case`, then delete everything declared
/// through the broker, whatever happened; re-raise the case's panic.
pub async fn run<F, Fut>(broker: Broker, case: F)
where
    F: FnOnce(Fx) -> Fut,
    Fut: Future<Output = ()>,
{
    let names = broker.names().clone();
    broker
        .declare(&Topology::spec(&names))
        .await
        .expect("declare the spec topology");
    let fx = Fx {
        broker: broker.clone(),
        names,
    };
    let res = AssertUnwindSafe(tokio::time::timeout(CASE_TIMEOUT, case(fx)))
        .catch_unwind()
        .await;
    cleanup(&broker).await;
    match res {
        Err(panic) => std::panic::resume_unwind(panic),
        Ok(Err(_)) => panic!("case did not finish within {CASE_TIMEOUT:?}"),
        Ok(Ok(())) => {}
    }
}

async fn cleanup(broker: &Broker) {
    let t = broker.topology();
    for q in &t.queues {
        let _ = broker.backend().delete_queue(&q.name).await;
    }
    for x in &t.exchanges {
        let _ = broker.backend().delete_exchange(&x.name).await;
    }
    let _ = broker.close().await;
}

/// What a case gets: the broker and its names.
#[derive(Debug, Clone)]
pub struct Fx {
    /// The broker under test.
    pub broker: Broker,
    /// Its names (the case's prefix).
    pub names: Names,
}

/// One handler call, as seen by the handler.
#[derive(Debug, Clone)]
pub struct Call {
    /// The message the handler got.
    pub message: Message,
    /// Its delivery context.
    pub ctx: Context,
    /// When the handler ran.
    pub at: Instant,
}

/// Records handler calls; tests wait for a number of them (no polling).
#[derive(Debug, Clone)]
pub struct Recorder(Arc<watch::Sender<Vec<Call>>>);

impl Default for Recorder {
    fn default() -> Self {
        Recorder(Arc::new(watch::channel(Vec::new()).0))
    }
}

impl Recorder {
    /// Record one call (from a handler).
    pub fn record(&self, message: &Message, ctx: &Context) {
        let call = Call {
            message: message.clone(),
            ctx: ctx.clone(),
            at: Instant::now(),
        };
        self.0.send_modify(|v| v.push(call));
    }
    /// Every call recorded so far.
    pub fn calls(&self) -> Vec<Call> {
        self.0.borrow().clone()
    }
    /// Wait until at least `n` calls were recorded.
    pub async fn wait_for(&self, n: usize, what: &str) -> Vec<Call> {
        let mut rx = self.0.subscribe();
        let got = match tokio::time::timeout(WAIT, rx.wait_for(|v| v.len() >= n)).await {
            Ok(Ok(v)) => Some(v.clone()),
            _ => None,
        };
        got.unwrap_or_else(|| {
            panic!(
                "{what}: waited {WAIT:?} for {n} handler calls, saw {}",
                self.0.borrow().len()
            )
        })
    }
}

impl Fx {
    /// Subscribe options with the suite's short retry tier.
    pub fn opts(&self, prefetch: u16) -> SubscribeOptions {
        SubscribeOptions {
            prefetch: Some(prefetch),
            retry: Some(RetryPolicy {
                max_attempts: 3,
                delays: vec![RETRY_DELAY],
            }),
            ..SubscribeOptions::default()
        }
    }

    /// Publish `n` fresh messages (confirmed); their ids in order.
    pub async fn publish_n(&self, exchange: &str, key: &str, n: usize) -> Vec<String> {
        let mut ids = Vec::with_capacity(n);
        for i in 0..n {
            let m = Message::new(format!("message {i}"));
            ids.push(m.id.clone());
            self.broker
                .publish(exchange, key, m)
                .await
                .expect("publish");
        }
        ids
    }

    /// Consume exactly `n` deliveries from `queue`, ack them, and check the
    /// queue is then empty. Fails (never hangs) if fewer arrive.
    pub async fn drain(&self, queue: &str, n: usize) -> Vec<Delivery> {
        let mut got = Vec::new();
        if n > 0 {
            let mut stream = self
                .broker
                .backend()
                .consume(
                    queue,
                    n.min(u16::MAX as usize) as u16,
                    &format!("drain-{}", uuid::Uuid::new_v4().simple()),
                )
                .await
                .expect("consume");
            while got.len() < n {
                match tokio::time::timeout(WAIT, stream.next()).await {
                    Ok(Some(Ok(d))) => {
                        d.acker.ack().await.expect("ack");
                        got.push(d);
                    }
                    other => panic!(
                        "queue {queue}: expected {n} messages, got {} then {:?}",
                        got.len(),
                        other.map(|o| o.map(|r| r.map(|d| d.message.id.clone())))
                    ),
                }
            }
            stream.cancel().await.expect("cancel");
        }
        let left = self
            .broker
            .backend()
            .queue_stats(queue)
            .await
            .expect("queue stats")
            .messages;
        assert_eq!(
            left, 0,
            "queue {queue}: {left} messages more than the {n} expected"
        );
        got
    }

    /// The ids in `queue`, which must be exactly `want` (as a set).
    pub async fn expect_ids(&self, queue: &str, want: &[&String]) {
        let got: BTreeSet<String> = self
            .drain(queue, want.len())
            .await
            .into_iter()
            .map(|d| d.message.id.clone())
            .collect();
        let want: BTreeSet<String> = want.iter().map(|s| s.to_string()).collect();
        assert_eq!(got, want, "queue {queue}");
    }

    /// Messages in `queue` now (as the backend counts them).
    pub async fn ready(&self, queue: &str) -> u64 {
        self.broker
            .backend()
            .queue_stats(queue)
            .await
            .expect("queue stats")
            .messages
    }
}

fn header_i64(m: &Message, k: &str) -> i64 {
    m.headers
        .get(k)
        .and_then(HeaderValue::as_i64)
        .unwrap_or_else(|| panic!("header {k} missing in {:?}", m.headers))
}

fn header_str<'a>(m: &'a Message, k: &str) -> &'a str {
    m.header_str(k)
        .unwrap_or_else(|| panic!("header {k} missing in {:?}", m.headers))
}

/// Lost = published ids found neither acked nor in the queue; duplicates = ids seen twice.
fn assert_none_lost(published: &[String], acked: &[String], remaining: &[String]) {
    let mut seen = HashSet::new();
    let dups: Vec<&String> = acked
        .iter()
        .chain(remaining)
        .filter(|id| !seen.insert(*id))
        .collect();
    let lost: Vec<&String> = published.iter().filter(|id| !seen.contains(id)).collect();
    assert!(lost.is_empty(), "lost {} messages: {lost:?}", lost.len());
    assert!(
        dups.is_empty(),
        "{} messages both acked and still queued (or acked twice): {dups:?}",
        dups.len()
    );
    assert_eq!(
        seen.len(),
        published.len(),
        "messages nobody published appeared"
    );
}

// ---------------------------------------------------------------- routing

/// Case: routing tasks direct by routing key.
pub async fn routing_tasks_direct_by_routing_key(fx: Fx) {
    let x = fx.names.tasks_exchange();
    let mut sent = Vec::new();
    for kind in [
        "background",
        "llm",
        "debate",
        "verification",
        "notifications",
    ] {
        sent.push((kind, fx.publish_n(&x, kind, 2).await));
    }
    for (kind, ids) in &sent {
        fx.expect_ids(&fx.names.task_queue(kind), &ids.iter().collect::<Vec<_>>())
            .await;
    }
}

/// Case: routing events topic patterns.
pub async fn routing_events_topic_patterns(fx: Fx) {
    let x = fx.names.events_exchange();
    let debate = fx.publish_n(&x, "debate.round.1", 1).await;
    let debate_bare = fx.publish_n(&x, "debate", 1).await;
    let verify = fx.publish_n(&x, "verification.provider.ok", 1).await;
    let other = fx.publish_n(&x, "billing.invoice", 1).await;
    let not_debate = fx.publish_n(&x, "predebate.x", 1).await;
    fx.expect_ids(
        &fx.names.event_queue("debate"),
        &[&debate[0], &debate_bare[0]],
    )
    .await;
    fx.expect_ids(&fx.names.event_queue("verify"), &[&verify[0]])
        .await;
    let all: Vec<&String> = [&debate, &debate_bare, &verify, &other, &not_debate]
        .into_iter()
        .flatten()
        .collect();
    fx.expect_ids(&fx.names.event_queue("audit"), &all).await;
}

/// Case: routing notifications fanout to all.
pub async fn routing_notifications_fanout_to_all(fx: Fx) {
    let ids = fx
        .publish_n(&fx.names.notifications_exchange(), "whatever", 3)
        .await;
    let want: Vec<&String> = ids.iter().collect();
    for q in ["websocket", "sse", "webhooks"] {
        fx.expect_ids(&fx.names.notification_queue(q), &want).await;
    }
}

/// Case: unroutable mandatory publish is an error.
pub async fn unroutable_mandatory_publish_is_an_error(fx: Fx) {
    let m = Message::new("nowhere");
    let id = m.id.clone();
    let e = fx
        .broker
        .publish(&fx.names.tasks_exchange(), "no-such-kind", m)
        .await
        .unwrap_err();
    match &e {
        Error::Unroutable {
            message_id,
            routing_key,
            ..
        } => {
            assert_eq!(message_id, &id);
            assert_eq!(routing_key, "no-such-kind");
        }
        other => panic!("expected Unroutable, got {other:?}"),
    }
    assert!(e.to_string().contains("no-such-kind"), "{e}");
    // Not mandatory: accepted and dropped.
    let opts = PublishOptions {
        mandatory: false,
        ..PublishOptions::default()
    };
    fx.broker
        .publish_with(
            &fx.names.tasks_exchange(),
            "no-such-kind",
            Message::new("x"),
            &opts,
        )
        .await
        .unwrap();
}

/// Case: publish to missing exchange is not found.
pub async fn publish_to_missing_exchange_is_not_found(fx: Fx) {
    let missing = format!("{}.no-such-exchange", fx.names.prefix());
    let e = fx
        .broker
        .publish(&missing, "k", Message::new("x"))
        .await
        .unwrap_err();
    assert!(
        matches!(&e, Error::NotFound { kind: "exchange", name } if *name == missing),
        "{e:?}"
    );
    // The backend is still usable afterwards.
    let ids = fx
        .publish_n(&fx.names.tasks_exchange(), "background", 1)
        .await;
    fx.expect_ids(&fx.names.task_queue("background"), &[&ids[0]])
        .await;
}

/// Case: redeclare with other arguments is precondition failed.
pub async fn redeclare_with_other_arguments_is_precondition_failed(fx: Fx) {
    let mut t = Topology::spec(&fx.names);
    let llm = fx.names.task_queue("llm");
    t.queues
        .iter_mut()
        .find(|q| q.name == llm)
        .unwrap()
        .max_priority = Some(5);
    let e = fx.broker.backend().declare(&t).await.unwrap_err();
    match &e {
        Error::PreconditionFailed { kind, name, detail } => {
            assert_eq!(*kind, "queue");
            assert_eq!(name, &llm);
            assert!(detail.contains("x-max-priority"), "{detail}");
        }
        other => panic!("expected PreconditionFailed, got {other:?}"),
    }
    // Declaring the same topology again is fine, and the queue still works.
    fx.broker.declare(&Topology::spec(&fx.names)).await.unwrap();
    let ids = fx.publish_n(&fx.names.tasks_exchange(), "llm", 1).await;
    fx.expect_ids(&llm, &[&ids[0]]).await;
}

// ---------------------------------------------------------------- priorities

/// Case: priority above queue max is refused.
pub async fn priority_above_queue_max_is_refused(fx: Fx) {
    assert!(matches!(
        "11".parse::<Priority>(),
        Err(Error::InvalidPriority { priority: 11, .. })
    ));
    let mut t = Topology::system(&fx.names);
    let q = format!("{}.tasks.lowprio", fx.names.prefix());
    t.add_work_queue(
        helixmq::topology::Queue::durable(q.clone()).max_priority(5),
        &fx.names.tasks_exchange(),
        "lowprio",
    );
    fx.broker.declare(&t).await.unwrap();
    let m = Message::new("too high").with_priority(Priority::HIGH);
    let e = fx
        .broker
        .publish(&fx.names.tasks_exchange(), "lowprio", m)
        .await
        .unwrap_err();
    match &e {
        Error::InvalidPriority { priority, reason } => {
            assert_eq!(*priority, 8);
            assert!(reason.contains(&q), "{reason}");
        }
        other => panic!("expected InvalidPriority, got {other:?}"),
    }
    assert_eq!(fx.ready(&q).await, 0, "a refused message is not sent");
    let ok = Message::new("fits").with_priority(Priority::new(5).unwrap());
    let id = ok.id.clone();
    fx.broker
        .publish(&fx.names.tasks_exchange(), "lowprio", ok)
        .await
        .unwrap();
    fx.expect_ids(&q, &[&id]).await;
}

/// Case: priority order highest first fifo within.
pub async fn priority_order_highest_first_fifo_within(fx: Fx) {
    let x = fx.names.tasks_exchange();
    let plan = [
        ("low-1", Priority::LOW),
        ("normal-1", Priority::NORMAL),
        ("high-1", Priority::HIGH),
        ("critical-1", Priority::CRITICAL),
        ("normal-2", Priority::NORMAL),
        ("low-2", Priority::LOW),
        ("critical-2", Priority::CRITICAL),
        ("high-2", Priority::HIGH),
        ("normal-3", Priority::NORMAL),
    ];
    for (label, p) in plan {
        let m = Message::new(label)
            .with_priority(p)
            .with_header("label", label);
        fx.broker.publish(&x, "llm", m).await.unwrap();
    }
    assert_eq!(
        fx.ready(&fx.names.task_queue("llm")).await,
        plan.len() as u64
    );
    let rec = Recorder::default();
    let r = rec.clone();
    let opts = SubscribeOptions {
        concurrency: Some(1),
        ..fx.opts(1)
    };
    let sub = fx
        .broker
        .subscribe(
            &fx.names.task_queue("llm"),
            move |m: Message, ctx: Context| {
                let r = r.clone();
                async move {
                    r.record(&m, &ctx);
                    Ok(Outcome::Ack)
                }
            },
            opts,
        )
        .await
        .unwrap();
    let calls = rec.wait_for(plan.len(), "priority order").await;
    sub.shutdown(WAIT).await;
    let order: Vec<String> = calls
        .iter()
        .map(|c| header_str(&c.message, "label").to_string())
        .collect();
    let want = [
        "critical-1",
        "critical-2",
        "high-1",
        "high-2",
        "normal-1",
        "normal-2",
        "normal-3",
        "low-1",
        "low-2",
    ];
    assert_eq!(order, want);
    fx.drain(&fx.names.task_queue("llm"), 0).await;
}

// ---------------------------------------------------------------- TTL, retries, DLQ

/// Case: ttl expiry ends in dlq with x death.
pub async fn ttl_expiry_ends_in_dlq_with_x_death(fx: Fx) {
    let m = Message::new("too late").with_expiration(Duration::from_millis(200));
    let id = m.id.clone();
    fx.broker
        .publish(&fx.names.tasks_exchange(), "background", m)
        .await
        .unwrap();
    let dead = fx.drain(&fx.names.dlq(), 1).await;
    let d = &dead[0];
    assert_eq!(d.message.id, id);
    assert_eq!(
        d.routing_key, "background",
        "dead-lettering keeps the routing key"
    );
    let Some(HeaderValue::Array(deaths)) = d.message.headers.get("x-death") else {
        panic!("no x-death array in {:?}", d.message.headers)
    };
    let Some(HeaderValue::Table(first)) = deaths.first() else {
        panic!("x-death entry is not a table: {deaths:?}")
    };
    assert_eq!(
        first.get("reason").and_then(HeaderValue::as_str),
        Some("expired"),
        "{first:?}"
    );
    assert_eq!(
        first.get("queue").and_then(HeaderValue::as_str),
        Some(fx.names.task_queue("background").as_str())
    );
    assert_eq!(first.get("count").and_then(HeaderValue::as_i64), Some(1));
    assert_eq!(
        d.message.header_str("x-first-death-reason"),
        Some("expired")
    );
    fx.drain(&fx.names.task_queue("background"), 0).await;
}

/// Subscribe `queue` with a handler answering `outcome(attempt, call)`; records every call.
async fn subscribe_with<F>(
    fx: &Fx,
    queue: &str,
    opts: SubscribeOptions,
    outcome: F,
) -> (Subscription, Recorder)
where
    F: Fn(&Message) -> Result<Outcome, helixmq::BoxError> + Send + Sync + 'static,
{
    let rec = Recorder::default();
    let r = rec.clone();
    let outcome = Arc::new(outcome);
    let sub = fx
        .broker
        .subscribe(
            queue,
            move |m: Message, ctx: Context| {
                let (r, outcome) = (r.clone(), outcome.clone());
                async move {
                    r.record(&m, &ctx);
                    outcome(&m)
                }
            },
            opts,
        )
        .await
        .unwrap();
    (sub, rec)
}

/// Case: retry returns to origin queue on each exchange.
pub async fn retry_returns_to_origin_queue_on_each_exchange(fx: Fx) {
    let routes = [
        (
            fx.names.tasks_exchange(),
            "verification",
            fx.names.task_queue("verification"),
        ),
        (
            fx.names.events_exchange(),
            "verification.provider.ok",
            fx.names.event_queue("verify"),
        ),
        (
            fx.names.notifications_exchange(),
            "",
            fx.names.notification_queue("websocket"),
        ),
    ];
    for (exchange, key, queue) in &routes {
        let (sub, rec) = subscribe_with(&fx, queue, fx.opts(5), |m| {
            if m.attempt == 1 {
                Ok(Outcome::retry("transient"))
            } else {
                Ok(Outcome::Ack)
            }
        })
        .await;
        let ids = fx.publish_n(exchange, key, 1).await;
        let calls = rec.wait_for(2, "retry back to origin").await;
        sub.shutdown(WAIT).await;
        assert_eq!(calls.len(), 2, "{queue}: exactly one retry");
        let (first, second) = (&calls[0], &calls[1]);
        assert_eq!(
            (first.message.id.as_str(), first.message.attempt),
            (ids[0].as_str(), 1)
        );
        assert_eq!(
            (second.message.id.as_str(), second.message.attempt),
            (ids[0].as_str(), 2)
        );
        assert_eq!(
            &second.ctx.queue, queue,
            "came back to the queue it failed in"
        );
        assert_eq!(header_str(&second.message, header::ORIGIN_QUEUE), queue);
        assert_eq!(
            header_str(&second.message, header::ORIGIN_EXCHANGE),
            exchange
        );
        assert_eq!(header_str(&second.message, header::LAST_ERROR), "transient");
        let waited = second.at - first.at;
        assert!(
            waited >= RETRY_DELAY - Duration::from_millis(50),
            "{queue}: retried after {waited:?}"
        );
        fx.drain(queue, 0).await;
    }
    fx.drain(&fx.names.dlq(), 0).await;
}

/// Case: max attempts end in dlq with failure headers.
pub async fn max_attempts_end_in_dlq_with_failure_headers(fx: Fx) {
    let queue = fx.names.task_queue("debate");
    let (sub, rec) = subscribe_with(
        &fx,
        &queue,
        fx.opts(5),
        |_| Err("boom: upstream 503".into()),
    )
    .await;
    let ids = fx.publish_n(&fx.names.tasks_exchange(), "debate", 2).await;
    let calls = rec.wait_for(6, "three attempts each").await;
    let dead = fx.drain(&fx.names.dlq(), 2).await;
    sub.shutdown(WAIT).await;
    for id in &ids {
        let attempts: Vec<u32> = calls
            .iter()
            .filter(|c| &c.message.id == id)
            .map(|c| c.message.attempt)
            .collect();
        assert_eq!(attempts, [1, 2, 3], "message {id}");
    }
    assert_eq!(rec.calls().len(), 6, "no fourth attempt");
    let got: BTreeSet<&str> = dead.iter().map(|d| d.message.id.as_str()).collect();
    assert_eq!(got, ids.iter().map(String::as_str).collect());
    for d in &dead {
        let m = &d.message;
        assert_eq!(m.attempt, 3);
        assert_eq!(header_str(m, header::ORIGIN_QUEUE), queue);
        assert_eq!(
            header_str(m, header::ORIGIN_EXCHANGE),
            fx.names.tasks_exchange()
        );
        assert_eq!(header_str(m, header::ORIGIN_ROUTING_KEY), "debate");
        assert!(header_str(m, header::LAST_ERROR).contains("boom: upstream 503"));
        let reason = header_str(m, header::DEAD_LETTER_REASON);
        assert!(
            reason.contains("3 attempts") && reason.contains("boom"),
            "{reason}"
        );
        let (first, last) = (
            header_i64(m, header::FIRST_FAILURE),
            header_i64(m, header::LAST_FAILURE),
        );
        assert!(
            first > 1_600_000_000_000 && first <= last,
            "first {first} last {last}"
        );
        assert!(
            last - first >= 2 * RETRY_DELAY.as_millis() as i64 - 100,
            "two delays between first and last failure"
        );
    }
    fx.drain(&queue, 0).await;
}

/// Case: dead letter outcome goes straight to dlq.
pub async fn dead_letter_outcome_goes_straight_to_dlq(fx: Fx) {
    let queue = fx.names.event_queue("debate");
    let (sub, rec) = subscribe_with(&fx, &queue, fx.opts(5), |_| {
        Ok(Outcome::dead_letter("poison: bad schema"))
    })
    .await;
    let ids = fx
        .publish_n(&fx.names.events_exchange(), "debate.started", 1)
        .await;
    let dead = fx.drain(&fx.names.dlq(), 1).await;
    sub.shutdown(WAIT).await;
    assert_eq!(rec.calls().len(), 1, "no retry for a dead letter");
    let m = &dead[0].message;
    assert_eq!(m.id, ids[0]);
    assert_eq!(m.attempt, 1);
    assert_eq!(
        header_str(m, header::DEAD_LETTER_REASON),
        "poison: bad schema"
    );
    assert_eq!(header_str(m, header::ORIGIN_ROUTING_KEY), "debate.started");
    fx.drain(&queue, 0).await;
    // audit got its own copy through `#`; it was not consumed.
    fx.expect_ids(&fx.names.event_queue("audit"), &[&ids[0]])
        .await;
}

/// Case: panicking handler counts as retry.
pub async fn panicking_handler_counts_as_retry(fx: Fx) {
    let queue = fx.names.task_queue("background");
    let (sub, rec) = subscribe_with(&fx, &queue, fx.opts(5), |m| {
        if m.attempt == 1 {
            panic!("handler bug on first attempt");
        }
        Ok(Outcome::Ack)
    })
    .await;
    let ids = fx
        .publish_n(&fx.names.tasks_exchange(), "background", 1)
        .await;
    let calls = rec.wait_for(2, "retry after panic").await;
    sub.shutdown(WAIT).await;
    assert_eq!(calls[1].message.id, ids[0]);
    assert_eq!(calls[1].message.attempt, 2);
    assert!(
        header_str(&calls[1].message, header::LAST_ERROR).contains("handler bug"),
        "{:?}",
        calls[1].message.headers
    );
    fx.drain(&queue, 0).await;
    fx.drain(&fx.names.dlq(), 0).await;
}

/// Case: handler past timeout counts as retry.
pub async fn handler_past_timeout_counts_as_retry(fx: Fx) {
    let queue = fx.names.task_queue("background");
    let rec = Recorder::default();
    let r = rec.clone();
    let opts = SubscribeOptions {
        handler_timeout: Some(Duration::from_millis(200)),
        ..fx.opts(5)
    };
    let sub = fx
        .broker
        .subscribe(
            &queue,
            move |m: Message, ctx: Context| {
                let r = r.clone();
                async move {
                    r.record(&m, &ctx);
                    if m.attempt == 1 {
                        std::future::pending::<()>().await;
                    }
                    Ok(Outcome::Ack)
                }
            },
            opts,
        )
        .await
        .unwrap();
    let ids = fx
        .publish_n(&fx.names.tasks_exchange(), "background", 1)
        .await;
    let calls = rec.wait_for(2, "retry after timeout").await;
    sub.shutdown(WAIT).await;
    assert_eq!(
        (calls[1].message.id.as_str(), calls[1].message.attempt),
        (ids[0].as_str(), 2)
    );
    assert!(header_str(&calls[1].message, header::LAST_ERROR).contains("timed out"));
    fx.drain(&queue, 0).await;
}

// ---------------------------------------------------------------- consumers

/// Case: redelivery when consumer goes away without ack.
pub async fn redelivery_when_consumer_goes_away_without_ack(fx: Fx) {
    let queue = fx.names.task_queue("notifications");
    let ids = fx
        .publish_n(&fx.names.tasks_exchange(), "notifications", 3)
        .await;
    let mut stream = fx
        .broker
        .backend()
        .consume(&queue, 10, "goes-away")
        .await
        .unwrap();
    let mut first = Vec::new();
    for _ in 0..3 {
        let d = tokio::time::timeout(WAIT, stream.next())
            .await
            .expect("delivery")
            .unwrap()
            .unwrap();
        assert!(!d.redelivered);
        first.push(d.message.id.clone());
    }
    assert_eq!(first, ids, "FIFO");
    drop(stream);
    let again = fx.drain(&queue, 3).await;
    let again_ids: Vec<String> = again.iter().map(|d| d.message.id.clone()).collect();
    assert_eq!(again_ids, ids, "same messages, same order");
    assert!(again.iter().all(|d| d.redelivered), "redelivered flag set");
}

/// Case: nack requeue and reject.
pub async fn nack_requeue_and_reject(fx: Fx) {
    let queue = fx.names.task_queue("verification");
    let ids = fx
        .publish_n(&fx.names.tasks_exchange(), "verification", 1)
        .await;
    let mut stream = fx
        .broker
        .backend()
        .consume(&queue, 1, "nacker")
        .await
        .unwrap();
    let d = tokio::time::timeout(WAIT, stream.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(!d.redelivered);
    d.acker.nack(true).await.unwrap();
    let d = tokio::time::timeout(WAIT, stream.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(d.message.id, ids[0]);
    assert!(d.redelivered, "requeued → redelivered");
    d.acker.nack(false).await.unwrap();
    stream.cancel().await.unwrap();
    drop(stream);
    let dead = fx.drain(&fx.names.dlq(), 1).await;
    assert_eq!(dead[0].message.id, ids[0]);
    assert_eq!(
        dead[0].message.header_str("x-first-death-reason"),
        Some("rejected")
    );
    fx.drain(&queue, 0).await;
}

/// Case: prefetch is respected.
pub async fn prefetch_is_respected(fx: Fx) {
    let queue = fx.names.task_queue("background");
    let ids = fx
        .publish_n(&fx.names.tasks_exchange(), "background", 10)
        .await;
    let started = Recorder::default();
    let done = Recorder::default();
    let gate = Arc::new(Semaphore::new(0));
    let in_flight = Arc::new(AtomicUsize::new(0));
    let max_in_flight = Arc::new(AtomicUsize::new(0));
    let (s, d, g, n, mx) = (
        started.clone(),
        done.clone(),
        gate.clone(),
        in_flight.clone(),
        max_in_flight.clone(),
    );
    // Concurrency above the prefetch: only the prefetch may bound what is in flight.
    let opts = SubscribeOptions {
        concurrency: Some(10),
        ..fx.opts(3)
    };
    let sub = fx
        .broker
        .subscribe(
            &queue,
            move |m: Message, ctx: Context| {
                let (s, d, g, n, mx) = (s.clone(), d.clone(), g.clone(), n.clone(), mx.clone());
                async move {
                    let now = n.fetch_add(1, Ordering::SeqCst) + 1;
                    mx.fetch_max(now, Ordering::SeqCst);
                    s.record(&m, &ctx);
                    g.acquire().await.expect("gate open").forget();
                    n.fetch_sub(1, Ordering::SeqCst);
                    d.record(&m, &ctx);
                    Ok(Outcome::Ack)
                }
            },
            opts,
        )
        .await
        .unwrap();
    started.wait_for(3, "three in flight").await;
    // Real time for a broken backend to push a fourth.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        started.calls().len(),
        3,
        "prefetch 3: a fourth delivery arrived before any ack"
    );
    assert_eq!(fx.ready(&queue).await, 7);
    gate.add_permits(100);
    let calls = done.wait_for(10, "all processed").await;
    sub.shutdown(WAIT).await;
    assert!(
        max_in_flight.load(Ordering::SeqCst) <= 3,
        "max in flight {}",
        max_in_flight.load(Ordering::SeqCst)
    );
    let acked: Vec<String> = calls.iter().map(|c| c.message.id.clone()).collect();
    assert_none_lost(&ids, &acked, &[]);
    fx.drain(&queue, 0).await;
}

/// Case: consumers share a queue.
pub async fn consumers_share_a_queue(fx: Fx) {
    let queue = fx.names.task_queue("debate");
    let ids = fx.publish_n(&fx.names.tasks_exchange(), "debate", 4).await;
    let backend = fx.broker.backend();
    let mut a = backend.consume(&queue, 1, "a").await.unwrap();
    let mut b = backend.consume(&queue, 1, "b").await.unwrap();
    let da = tokio::time::timeout(WAIT, a.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let db = tokio::time::timeout(WAIT, b.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_ne!(
        da.message.id, db.message.id,
        "each consumer gets its own message"
    );
    assert_eq!(
        fx.ready(&queue).await,
        2,
        "prefetch 1 each: two still ready"
    );
    da.acker.ack().await.unwrap();
    db.acker.ack().await.unwrap();
    let mut acked = vec![da.message.id.clone(), db.message.id.clone()];
    for s in [&mut a, &mut b] {
        let d = tokio::time::timeout(WAIT, s.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        d.acker.ack().await.unwrap();
        acked.push(d.message.id.clone());
    }
    a.cancel().await.unwrap();
    b.cancel().await.unwrap();
    assert_none_lost(&ids, &acked, &[]);
    fx.drain(&queue, 0).await;
}

/// Case: graceful shutdown loses nothing.
pub async fn graceful_shutdown_loses_nothing(fx: Fx) {
    const N: usize = 40;
    let queue = fx.names.task_queue("background");
    let ids = fx
        .publish_n(&fx.names.tasks_exchange(), "background", N)
        .await;
    let done = Recorder::default();
    let d = done.clone();
    let opts = SubscribeOptions {
        concurrency: Some(4),
        ..fx.opts(4)
    };
    let sub = fx
        .broker
        .subscribe(
            &queue,
            move |m: Message, ctx: Context| {
                let d = d.clone();
                async move {
                    // A slow handler: real work takes time.
                    tokio::time::sleep(Duration::from_millis(40)).await;
                    d.record(&m, &ctx);
                    Ok(Outcome::Ack)
                }
            },
            opts,
        )
        .await
        .unwrap();
    done.wait_for(8, "some processed before shutdown").await;
    let report = sub.shutdown(Duration::from_secs(5)).await;
    assert_eq!(report.abandoned, 0, "{report:?}");
    let acked: Vec<String> = done.calls().iter().map(|c| c.message.id.clone()).collect();
    assert!(acked.len() < N, "shutdown came too late to test anything");
    let rest = fx.drain(&queue, N - acked.len()).await;
    let remaining: Vec<String> = rest.iter().map(|d| d.message.id.clone()).collect();
    assert_none_lost(&ids, &acked, &remaining);
}

/// Case: shutdown deadline returns unfinished messages.
pub async fn shutdown_deadline_returns_unfinished_messages(fx: Fx) {
    const N: usize = 10;
    let queue = fx.names.task_queue("background");
    let ids = fx
        .publish_n(&fx.names.tasks_exchange(), "background", N)
        .await;
    let started = Recorder::default();
    let s = started.clone();
    let sub = fx
        .broker
        .subscribe(
            &queue,
            move |m: Message, ctx: Context| {
                let s = s.clone();
                async move {
                    s.record(&m, &ctx);
                    std::future::pending::<()>().await;
                    Ok(Outcome::Ack)
                }
            },
            fx.opts(4),
        )
        .await
        .unwrap();
    started.wait_for(4, "handlers stuck").await;
    let report = sub.shutdown(Duration::from_millis(200)).await;
    assert_eq!(report.abandoned, 4, "{report:?}");
    let rest = fx.drain(&queue, N).await;
    let remaining: Vec<String> = rest.iter().map(|d| d.message.id.clone()).collect();
    assert_none_lost(&ids, &[], &remaining);
    let stuck: HashSet<String> = started.calls().into_iter().map(|c| c.message.id).collect();
    for d in &rest {
        assert_eq!(
            d.redelivered,
            stuck.contains(&d.message.id.clone()),
            "only the abandoned ones are redelivered"
        );
    }
}

// ---------------------------------------------------------------- max length

/// Declare `{p}.tasks.small` (max length 2 with `overflow`), fed by the tasks exchange with key `small`.
async fn small_queue(fx: &Fx, overflow: helixmq::topology::Overflow) -> String {
    let q = format!("{}.tasks.small", fx.names.prefix());
    let mut t = Topology::system(&fx.names);
    t.add_work_queue(
        helixmq::topology::Queue::durable(q.clone()).max_length(2, overflow),
        &fx.names.tasks_exchange(),
        "small",
    );
    fx.broker.declare(&t).await.unwrap();
    q
}

/// Case: reject publish overflow nacks the publisher.
pub async fn reject_publish_overflow_nacks_the_publisher(fx: Fx) {
    let q = small_queue(&fx, helixmq::topology::Overflow::RejectPublish).await;
    let ids = fx.publish_n(&fx.names.tasks_exchange(), "small", 2).await;
    let extra = Message::new("one too many");
    let extra_id = extra.id.clone();
    let e = fx
        .broker
        .publish(&fx.names.tasks_exchange(), "small", extra)
        .await
        .unwrap_err();
    assert!(
        matches!(&e, Error::PublishNacked { message_id, .. } if *message_id == extra_id),
        "{e:?}"
    );
    fx.expect_ids(&q, &ids.iter().collect::<Vec<_>>()).await;
    fx.drain(&fx.names.dlq(), 0).await;
}

/// Case: drop head overflow dead letters the oldest.
pub async fn drop_head_overflow_dead_letters_the_oldest(fx: Fx) {
    let q = small_queue(&fx, helixmq::topology::Overflow::DropHead).await;
    let ids = fx.publish_n(&fx.names.tasks_exchange(), "small", 3).await;
    let dead = fx.drain(&fx.names.dlq(), 1).await;
    assert_eq!(dead[0].message.id, ids[0], "the head is dropped");
    assert_eq!(
        dead[0].message.header_str("x-first-death-reason"),
        Some("maxlen")
    );
    let kept: Vec<String> = fx
        .drain(&q, 2)
        .await
        .into_iter()
        .map(|d| d.message.id.clone())
        .collect();
    assert_eq!(kept, ids[1..]);
}

// ---------------------------------------------------------------- misc API

/// Case: publish batch confirms each.
pub async fn publish_batch_confirms_each(fx: Fx) {
    let messages: Vec<Message> = (0..50).map(|i| Message::new(format!("b{i}"))).collect();
    let ids: Vec<String> = messages.iter().map(|m| m.id.clone()).collect();
    let res = fx
        .broker
        .publish_batch(
            &fx.names.tasks_exchange(),
            "llm",
            &messages,
            &PublishOptions::default(),
        )
        .await;
    assert_eq!(res.len(), 50);
    assert!(res.iter().all(Result::is_ok), "{res:?}");
    let got: Vec<String> = fx
        .drain(&fx.names.task_queue("llm"), 50)
        .await
        .into_iter()
        .map(|d| d.message.id.clone())
        .collect();
    assert_eq!(got, ids, "FIFO within one priority");

    let res = fx
        .broker
        .publish_batch(
            &fx.names.tasks_exchange(),
            "no-such-kind",
            &messages[..3],
            &PublishOptions::default(),
        )
        .await;
    assert!(
        res.iter()
            .all(|r| matches!(r, Err(Error::Unroutable { .. }))),
        "{res:?}"
    );
}

/// Case: stats and purge.
pub async fn stats_and_purge(fx: Fx) {
    let queue = fx.names.task_queue("background");
    fx.publish_n(&fx.names.tasks_exchange(), "background", 5)
        .await;
    let stats = fx.broker.backend().queue_stats(&queue).await.unwrap();
    assert_eq!((stats.messages, stats.consumers), (5, 0));
    assert_eq!(fx.broker.backend().purge(&queue).await.unwrap(), 5);
    assert_eq!(fx.ready(&queue).await, 0);
    let missing = format!("{}.no-such-queue", fx.names.prefix());
    let e = fx.broker.backend().queue_stats(&missing).await.unwrap_err();
    assert!(matches!(&e, Error::NotFound { kind: "queue", .. }), "{e:?}");
}

/// Case: deleted queue fails the subscription.
pub async fn deleted_queue_fails_the_subscription(fx: Fx) {
    let queue = fx.names.task_queue("verification");
    let (sub, _rec) = subscribe_with(&fx, &queue, fx.opts(5), |_| Ok(Outcome::Ack)).await;
    let mut status = sub.watch_status();
    fx.broker.backend().delete_queue(&queue).await.unwrap();
    let st = tokio::time::timeout(WAIT, status.wait_for(|s| *s != SubscriptionStatus::Active))
        .await
        .expect("the subscription notices")
        .unwrap()
        .clone();
    assert!(
        matches!(&st, SubscriptionStatus::Failed(why) if why.contains(&queue)),
        "{st:?}"
    );
    assert!(!sub.is_active());
}

// ------------------------------------------------- held re-routes (backpressure)

/// How long a case keeps a re-route queue full while it watches that nothing
/// runs again: several backoff rounds.
const HELD_FOR: Duration = Duration::from_millis(1500);

/// Declare `queue` in place of the system queue of the same name (dropping the
/// one `run` declared first), a classic queue holding at most one message for
/// an hour, and fill it with one filler through `exchange`.
///
/// Classic even where the system queue is a quorum queue (the retry tiers): a
/// quorum queue's `reject-publish` lets a few publishes past its limit before
/// it refuses (its publishers learn of the limit asynchronously, and it takes
/// publishes again only below 80 % of it), so "exactly one slot" needs a
/// classic queue. What is tested is the consumer's answer to a refused copy,
/// which is the same whichever queue refuses; a full quorum tier is
/// `rabbitmq/backpressure.rs`'s.
async fn one_slot_queue(fx: &Fx, queue: &str, exchange: &str) {
    fx.broker.backend().delete_queue(queue).await.unwrap();
    let mut t = Topology::system(&fx.names);
    t.add_retry_tier(RETRY_DELAY);
    for q in &mut t.queues {
        if q.name == queue {
            let mut one = helixmq::topology::Queue::durable(q.name.clone())
                .message_ttl(Duration::from_secs(3600))
                .max_length(1, helixmq::topology::Overflow::RejectPublish);
            one.dead_letter_exchange = q.dead_letter_exchange.clone();
            *q = one;
        }
    }
    fx.broker.declare(&t).await.unwrap();
    // A routing key no work queue is bound under: if the filler ever expired it
    // would go nowhere instead of into a work queue.
    fx.broker
        .publish(exchange, "filler", Message::new("filler"))
        .await
        .unwrap();
}

/// While `n` deliveries of `queue` are held: the handler ran once each and not
/// again, `/health` names the queue and why, the gauge counts them, and the
/// origin queue holds nothing ready (they are unacked, not requeued).
async fn assert_held(fx: &Fx, rec: &Recorder, queue: &str, n: usize, full: &str) {
    rec.wait_for(n, "first attempts").await;
    let health = helixmq::http::HealthSource::new(&fx.broker);
    let start = Instant::now();
    while health.check().held.first().map(|h| h.held) != Some(n) {
        assert!(
            start.elapsed() < WAIT,
            "{n} deliveries never reported held: {:?}",
            health.check()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(HELD_FOR).await;
    assert_eq!(
        rec.calls().len(),
        n,
        "a held delivery's handler must not run again"
    );
    let h = health.check();
    assert!(!h.is_ok(), "{h:?}");
    assert_eq!(h.held.len(), 1, "{h:?}");
    assert_eq!((h.held[0].queue.as_str(), h.held[0].held), (queue, n));
    assert!(
        h.held[0].reason.contains(full) && h.held[0].reason.contains("full"),
        "{h:?}"
    );
    assert!(h.reasons.iter().any(|r| r.contains(queue)), "{h:?}");
    let gauge = fx
        .broker
        .metrics()
        .reroutes_blocked
        .get_or_create(&helixmq::metrics::QueueLabel {
            queue: queue.to_string(),
        })
        .get();
    assert_eq!(gauge, n as i64, "rabbitmq_reroutes_blocked{{queue}}");
    assert_eq!(fx.ready(queue).await, 0, "held deliveries stay unacked");
}

/// After the held copies were placed: nothing held, nothing left in the origin.
async fn assert_released(fx: &Fx, rec: &Recorder, queue: &str, n: usize) {
    let health = helixmq::http::HealthSource::new(&fx.broker);
    let start = Instant::now();
    while !health.check().held.is_empty() {
        assert!(start.elapsed() < WAIT, "still held: {:?}", health.check());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(rec.calls().len(), n, "no handler ran twice");
    fx.drain(queue, 0).await;
}

/// Case: a retry whose origin queue is gone (deleted while its copy waited in
/// the tier) ends in the DLQ: the requeue exchange's alternate exchange is the
/// DLX. Without it a classic tier dropped such a letter and a quorum tier kept
/// it for ever, retrying, counting against the tier's limit.
pub async fn retry_whose_origin_queue_is_gone_ends_in_the_dlq(fx: Fx) {
    let mut t = Topology::system(&fx.names);
    let tier = t.add_retry_tier(RETRY_DELAY);
    fx.broker.declare(&t).await.unwrap();
    let gone = fx.names.task_queue("gone");
    let ids = fx.publish_n(&tier, &gone, 2).await;
    fx.expect_ids(&fx.names.dlq(), &ids.iter().collect::<Vec<_>>())
        .await;
    assert_eq!(fx.ready(&tier).await, 0, "nothing left in the tier");
}

/// Case: full retry queue holds deliveries until room.
pub async fn full_retry_queue_holds_deliveries_until_room(fx: Fx) {
    let queue = fx.names.task_queue("verification");
    let tier = fx.names.retry_tier(RETRY_DELAY);
    one_slot_queue(&fx, &tier, &tier).await;
    let (sub, rec) = subscribe_with(&fx, &queue, fx.opts(5), |_| {
        Ok(Outcome::retry("downstream down"))
    })
    .await;
    let ids = fx
        .publish_n(&fx.names.tasks_exchange(), "verification", 3)
        .await;
    assert_held(&fx, &rec, &queue, 3, &tier).await;
    // Room is made one message at a time: every held copy follows, as attempt 2.
    let got = fx.drain(&tier, 4).await;
    let copies: BTreeSet<(String, u32)> = got
        .iter()
        .filter(|d| d.message.payload.as_ref() != b"filler")
        .map(|d| (d.message.id.clone(), d.message.attempt))
        .collect();
    let want: BTreeSet<(String, u32)> = ids.iter().map(|id| (id.clone(), 2)).collect();
    assert_eq!(
        copies, want,
        "each held delivery reached the retry queue once"
    );
    assert_released(&fx, &rec, &queue, 3).await;
    sub.shutdown(WAIT).await;
}

/// Case: full dlq holds dead letters until room.
pub async fn full_dlq_holds_dead_letters_until_room(fx: Fx) {
    let queue = fx.names.task_queue("debate");
    let dlq = fx.names.dlq();
    one_slot_queue(&fx, &dlq, &fx.names.dead_letter_exchange()).await;
    let (sub, rec) = subscribe_with(&fx, &queue, fx.opts(5), |_| {
        Ok(Outcome::dead_letter("poison: bad schema"))
    })
    .await;
    let ids = fx.publish_n(&fx.names.tasks_exchange(), "debate", 3).await;
    assert_held(&fx, &rec, &queue, 3, &dlq).await;
    let got = fx.drain(&dlq, 4).await;
    let dead: BTreeSet<String> = got
        .iter()
        .filter(|d| d.message.payload.as_ref() != b"filler")
        .map(|d| {
            assert_eq!(
                header_str(&d.message, header::DEAD_LETTER_REASON),
                "poison: bad schema"
            );
            d.message.id.clone()
        })
        .collect();
    assert_eq!(
        dead,
        ids.iter().cloned().collect(),
        "each dead letter placed once"
    );
    assert_released(&fx, &rec, &queue, 3).await;
    sub.shutdown(WAIT).await;
}

/// Case: shutdown gives held deliveries back to their queue.
pub async fn shutdown_gives_held_deliveries_back_to_their_queue(fx: Fx) {
    let queue = fx.names.task_queue("background");
    let tier = fx.names.retry_tier(RETRY_DELAY);
    one_slot_queue(&fx, &tier, &tier).await;
    let (sub, rec) = subscribe_with(&fx, &queue, fx.opts(5), |_| Ok(Outcome::retry("down"))).await;
    let ids = fx
        .publish_n(&fx.names.tasks_exchange(), "background", 2)
        .await;
    assert_held(&fx, &rec, &queue, 2, &tier).await;
    // A held delivery does not wait for the drain deadline: it is given back at once.
    let started = Instant::now();
    let report = sub.shutdown(Duration::from_secs(30)).await;
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "shutdown waited {:?} on held deliveries",
        started.elapsed()
    );
    assert_eq!(report.abandoned, 0, "{report:?}");
    assert!(helixmq::http::HealthSource::new(&fx.broker)
        .check()
        .held
        .is_empty());
    // Both are back in their queue, nothing in the retry queue but the filler.
    fx.expect_ids(&queue, &ids.iter().collect::<Vec<_>>()).await;
    assert_eq!(fx.ready(&tier).await, 1);
}

// ---------------------------------------------------------------- scheduled

/// How late (positive) or early (negative) a delivery at `at` was for a
/// publish started at `sent` with `delay`, in milliseconds.
fn lateness_ms(at: Instant, sent: Instant, delay: Duration) -> i64 {
    let due = sent + delay;
    if at >= due {
        (at - due).as_millis() as i64
    } else {
        -((due - at).as_millis() as i64)
    }
}

/// Ready messages in every delay level and the final queue (none when the
/// delay topology was never declared).
async fn scheduled_waiting(fx: &Fx) -> u64 {
    if !fx.broker.topology().has_scheduling() {
        return 0;
    }
    let mut n = fx.ready(&fx.names.delay_final()).await;
    for k in 0..helixmq::topology::schedule::DELAY_LEVELS {
        n += fx.ready(&fx.names.delay_level(k)).await;
    }
    n
}

/// Case: 1 s and 3 s scheduled publishes reach the handler no earlier than
/// their time and at most 1 s after it, intact; counted by id: none lost.
pub async fn scheduled_publish_arrives_on_time(fx: Fx) {
    let queue = fx.names.task_queue("background");
    let x = fx.names.tasks_exchange();
    let ledger = crate::ledger::Ledger::default();
    let (sub, rec) = subscribe_with(&fx, &queue, fx.opts(10), |_| Ok(Outcome::Ack)).await;
    let mut sent = Vec::new();
    for secs in [3, 1] {
        let delay = Duration::from_secs(secs);
        let m = Message::new(format!("due in {secs}s")).with_header("tenant", "acme");
        let id = m.id.clone();
        let start = Instant::now();
        let r = fx.broker.publish_delayed(&x, "background", m, delay).await;
        ledger.published(&id, &r);
        r.expect("scheduled publish confirmed");
        sent.push((id, start, delay));
    }
    assert_eq!(
        scheduled_waiting(&fx).await + fx.ready(&queue).await,
        2,
        "both wait in the delay levels (none delivered early)"
    );
    let calls = rec.wait_for(2, "scheduled deliveries").await;
    sub.shutdown(WAIT).await;
    for c in &calls {
        ledger.consumed(&c.message.id);
        let (_, start, delay) = sent
            .iter()
            .find(|(id, _, _)| *id == c.message.id)
            .expect("a scheduled id");
        // Due: the header, set just before the publish (a first use declares
        // the delay topology first); arrival on the same clock.
        let due_ms = header_i64(&c.message, header::DUE_AT);
        let arrived = std::time::SystemTime::now() - c.at.elapsed();
        let arrived_ms = arrived
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64;
        let late = arrived_ms - due_ms;
        assert!(
            lateness_ms(c.at, *start, *delay) >= -20,
            "{delay:?}: delivered before its time"
        );
        println!("scheduled {delay:?}: arrived {late} ms after its time");
        assert!(
            (-20..=1000).contains(&late),
            "{delay:?}: arrived {late} ms after its time (allowed: 0 to 1000)"
        );
        assert_eq!(c.ctx.queue, queue);
        assert_eq!(c.message.header_str("tenant"), Some("acme"));
        assert_eq!(c.message.attempt, 1);
        assert!(c.message.headers.contains_key(header::DUE_AT));
    }
    assert_eq!(calls[0].message.id, sent[1].0, "the 1 s one first");
    let r = ledger.report();
    assert_eq!((r.confirmed, r.lost, r.duplicates), (2, 0, 0), "{r:?}");
    let counted = fx
        .broker
        .metrics()
        .scheduled
        .get_or_create(&helixmq::metrics::ExchangeLabel { exchange: x })
        .get();
    assert_eq!(counted, 2, "rabbitmq_scheduled_messages");
    fx.drain(&queue, 0).await;
    assert_eq!(scheduled_waiting(&fx).await, 0);
}

/// Case: a scheduled publish reaches, at its time, the queues its exchange
/// routes its key to: topic patterns, fanout, and the requeue exchange (what a
/// delayed DLQ replay uses).
pub async fn scheduled_publish_routes_like_its_exchange(fx: Fx) {
    let n = &fx.names;
    let second = Duration::from_secs(1);
    let send = |x: String, key: &'static str| {
        let broker = fx.broker.clone();
        async move {
            let m = Message::new("scheduled");
            let id = m.id.clone();
            broker
                .publish_delayed(&x, key, m, second)
                .await
                .expect("scheduled publish confirmed");
            id
        }
    };
    let debate = send(n.events_exchange(), "debate.round.1").await;
    let note = send(n.notifications_exchange(), "").await;
    let llm_queue = n.task_queue("llm");
    let replay = {
        let m = Message::new("replayed");
        let id = m.id.clone();
        fx.broker
            .publish_delayed(&n.requeue_exchange(), &llm_queue, m, second)
            .await
            .expect("scheduled publish to the requeue exchange");
        id
    };
    fx.expect_ids(&n.event_queue("debate"), &[&debate]).await;
    fx.expect_ids(&n.event_queue("audit"), &[&debate]).await;
    fx.expect_ids(&n.event_queue("verify"), &[]).await;
    for q in ["websocket", "sse", "webhooks"] {
        fx.expect_ids(&n.notification_queue(q), &[&note]).await;
    }
    fx.expect_ids(&llm_queue, &[&replay]).await;
    assert_eq!(scheduled_waiting(&fx).await, 0);
}

/// Case: a 5 s task published after a 10 min one arrives on time: levels
/// have queue-wide TTLs, so nothing waits behind a longer delay.
pub async fn scheduled_short_delay_is_not_held_behind_a_long_one(fx: Fx) {
    let queue = fx.names.task_queue("debate");
    let x = fx.names.tasks_exchange();
    let (sub, rec) = subscribe_with(&fx, &queue, fx.opts(10), |_| Ok(Outcome::Ack)).await;
    let long = Message::new("in ten minutes");
    let long_id = long.id.clone();
    fx.broker
        .publish_delayed(&x, "debate", long, Duration::from_secs(600))
        .await
        .expect("10 min publish confirmed");
    let short = Message::new("in five seconds");
    let short_id = short.id.clone();
    let delay = Duration::from_secs(5);
    let start = Instant::now();
    fx.broker
        .publish_delayed(&x, "debate", short, delay)
        .await
        .expect("5 s publish confirmed");
    let calls = rec.wait_for(1, "the 5 s task").await;
    assert_eq!(calls[0].message.id, short_id);
    let late = lateness_ms(calls[0].at, start, delay);
    println!("5 s behind 10 min: arrived {late} ms after its time");
    assert!((-20..=1000).contains(&late), "arrived {late} ms late");
    sub.shutdown(WAIT).await;
    assert_eq!(
        rec.calls().len(),
        1,
        "the 10 min task is not delivered early"
    );
    assert_eq!(scheduled_waiting(&fx).await, 1, "{long_id} still waits");
}

/// Case: delays outside 1 s..=30 days, a time in the past, a message with an
/// expiration and a destination known to route nowhere are refused, with
/// errors that say so; nothing is scheduled for them.
pub async fn scheduled_publish_refuses_what_it_cannot_keep(fx: Fx) {
    let x = fx.names.tasks_exchange();
    let b = &fx.broker;
    for d in [
        Duration::ZERO,
        Duration::from_millis(999),
        Duration::from_secs(30 * 24 * 3600 + 1),
    ] {
        match b
            .publish_delayed(&x, "background", Message::new("x"), d)
            .await
        {
            Err(e @ Error::InvalidDelay { .. }) => {
                let text = e.to_string();
                assert!(text.contains("from 1s to 30days"), "{text}");
            }
            other => panic!("{d:?}: expected InvalidDelay, got {other:?}"),
        }
    }
    let past = std::time::SystemTime::now() - Duration::from_secs(5);
    match b
        .publish_at(&x, "background", Message::new("x"), past)
        .await
    {
        Err(e @ Error::InvalidDelay { .. }) => {
            assert!(e.to_string().contains("in the past"), "{e}")
        }
        other => panic!("expected InvalidDelay for a past time, got {other:?}"),
    }
    let expiring = Message::new("x").with_expiration(Duration::from_secs(5));
    match b
        .publish_delayed(&x, "background", expiring, Duration::from_secs(2))
        .await
    {
        Err(Error::InvalidMessage(m)) => assert!(m.contains("expiration"), "{m}"),
        other => panic!("expected InvalidMessage for an expiration, got {other:?}"),
    }
    match b
        .publish_delayed(
            &x,
            "no-such-kind",
            Message::new("x"),
            Duration::from_secs(2),
        )
        .await
    {
        Err(Error::Unroutable { routing_key, .. }) => assert_eq!(routing_key, "no-such-kind"),
        other => panic!("expected Unroutable, got {other:?}"),
    }
    match b
        .publish_delayed(
            "helixagent.undeclared",
            "k",
            Message::new("x"),
            Duration::from_secs(2),
        )
        .await
    {
        Err(Error::NotFound { kind, name }) => {
            assert_eq!((kind, name.as_str()), ("exchange", "helixagent.undeclared"))
        }
        other => panic!("expected NotFound for an undeclared exchange, got {other:?}"),
    }
    assert_eq!(scheduled_waiting(&fx).await, 0, "nothing was scheduled");
}

/// Case: once a broker has scheduled delivery, a queue it declares later is
/// mirrored on the due exchange too, so scheduled messages reach it.
pub async fn scheduled_publish_reaches_a_queue_declared_later(fx: Fx) {
    let second = Duration::from_secs(1);
    let first = Message::new("first scheduled publish: declares the delay levels");
    let first_id = first.id.clone();
    fx.broker
        .publish_delayed(&fx.names.tasks_exchange(), "background", first, second)
        .await
        .expect("scheduled publish confirmed");
    // A fanout exchange declared before, bound now: the mirror keeps its kind
    // (any routing key reaches the new queue).
    let notes = fx.names.notifications_exchange();
    let jobs = format!("{}.jobs", fx.names.prefix());
    let mut t = Topology::system(&fx.names);
    t.add_work_queue(helixmq::topology::Queue::durable(jobs.clone()), &notes, "");
    fx.broker
        .declare(&t)
        .await
        .expect("declare a new work queue");
    let m = Message::new("to the new queue");
    let id = m.id.clone();
    fx.broker
        .publish_delayed(&notes, "any.key", m, second)
        .await
        .expect("scheduled publish to the new queue confirmed");
    fx.expect_ids(&jobs, &[&id]).await;
    for q in ["websocket", "sse", "webhooks"] {
        fx.expect_ids(&fx.names.notification_queue(q), &[&id]).await;
    }
    fx.expect_ids(&fx.names.task_queue("background"), &[&first_id])
        .await;
    assert_eq!(scheduled_waiting(&fx).await, 0);
}

/// Case: `requeue_delayed` (a delayed DLQ replay) brings a message back into
/// a work queue after its delay; a queue this broker did not declare as a work
/// queue is refused before anything is scheduled, as is a bad delay.
pub async fn requeue_delayed_brings_a_message_back_to_its_work_queue(fx: Fx) {
    let opts = PublishOptions::default();
    let second = Duration::from_secs(1);
    let llm = fx.names.task_queue("llm");
    let m = Message::new("replayed later");
    let id = m.id.clone();
    let start = Instant::now();
    fx.broker
        .requeue_delayed(&llm, m, second, &opts)
        .await
        .expect("delayed requeue confirmed");
    assert_eq!(fx.ready(&llm).await, 0, "not before its time");
    fx.expect_ids(&llm, &[&id]).await;
    assert!(start.elapsed() >= second - Duration::from_millis(20));
    let other = format!("{}.elsewhere", fx.names.prefix());
    match fx
        .broker
        .requeue_delayed(&other, Message::new("x"), second, &opts)
        .await
    {
        Err(Error::Unroutable { routing_key, .. }) => assert_eq!(routing_key, other),
        other => panic!("expected Unroutable for an undeclared queue, got {other:?}"),
    }
    match fx
        .broker
        .requeue_delayed(&llm, Message::new("x"), Duration::from_millis(10), &opts)
        .await
    {
        Err(Error::InvalidDelay { .. }) => {}
        other => panic!("expected InvalidDelay, got {other:?}"),
    }
    assert_eq!(scheduled_waiting(&fx).await, 0);
}

/// `x-single-active-consumer`: only the oldest consumer receives; when it
/// goes, what it held and what waits go to the next one.
pub async fn single_active_consumer_hands_over_when_the_active_one_goes(fx: Fx) {
    let q = format!("{}.sac", fx.names.prefix());
    let x = fx.names.tasks_exchange();
    let t = Topology {
        names: fx.names.clone(),
        exchanges: vec![],
        queues: vec![helixmq::topology::Queue::durable(&q).single_active_consumer()],
        bindings: vec![helixmq::topology::Binding {
            exchange: x.clone(),
            queue: q.clone(),
            routing_key: "sac".into(),
        }],
    };
    fx.broker
        .declare(&t)
        .await
        .expect("declare a single-active-consumer queue");
    let backend = fx.broker.backend();
    let mut first = backend.consume(&q, 1, "first").await.expect("consume");
    let mut second = backend.consume(&q, 1, "second").await.expect("consume");
    let ids = fx.publish_n(&x, "sac", 2).await;
    let d = tokio::time::timeout(WAIT, first.next())
        .await
        .expect("the active consumer gets the first")
        .expect("open")
        .expect("delivery");
    assert_eq!(d.message.id, ids[0]);
    let idle = tokio::time::timeout(Duration::from_millis(500), second.next()).await;
    assert!(
        idle.is_err(),
        "the second consumer got a message while the first was active"
    );
    drop(d);
    drop(first);
    let mut got = Vec::new();
    while got.len() < 2 {
        let d = tokio::time::timeout(WAIT, second.next())
            .await
            .expect("the next consumer takes over")
            .expect("open")
            .expect("delivery");
        got.push((d.message.id.clone(), d.redelivered));
        d.acker.ack().await.expect("ack");
    }
    assert_eq!(got, [(ids[0].clone(), true), (ids[1].clone(), false)]);
    drop(second);
}

/// Two subscriptions sharing a key at 600/min together start 10 handlers a
/// second; a `RetryAfter` pauses both until its time.
pub async fn rate_limit_is_shared_by_subscriptions_and_paused_by_retry_after(fx: Fx) {
    use helixmq::ratelimit::RateLimit;
    let l = RateLimit {
        burst: Some(1),
        ..RateLimit::new("conformance", 600)
    };
    // Declared through the broker so the case's cleanup removes it.
    fx.broker
        .declare(&l.topology(&fx.names, "cleanup"))
        .await
        .expect("declare the rate limit");
    let q = fx.names.task_queue("background");
    let starts: Arc<std::sync::Mutex<Vec<(Instant, bool)>>> = Default::default();
    let mut subs = Vec::new();
    for _ in 0..2 {
        let starts = starts.clone();
        let opts = SubscribeOptions {
            rate_limit: Some(l.clone()),
            ..fx.opts(4)
        };
        let s = fx
            .broker
            .subscribe(
                &q,
                move |m: Message, _ctx: Context| {
                    let starts = starts.clone();
                    async move {
                        let limited = &m.payload[..] == b"429" && m.attempt == 1;
                        starts.lock().unwrap().push((Instant::now(), limited));
                        Ok(if limited {
                            Outcome::RetryAfter(Duration::from_secs(2))
                        } else {
                            Outcome::Ack
                        })
                    }
                },
                opts,
            )
            .await
            .expect("subscribe with a rate limit");
        subs.push(s);
    }
    fx.publish_n(&fx.names.tasks_exchange(), "background", 40)
        .await;
    let count = |from: Instant, to: Instant| {
        starts
            .lock()
            .unwrap()
            .iter()
            .filter(|(t, _)| *t >= from && *t < to)
            .count()
    };
    // The window opens once the limiter runs (the first start) and every
    // message is in the queue. Its bounds: never above the limit (30 + 4), and
    // at least two thirds of it, not the limit itself: with `burst: 1` a permit
    // nobody took within its 100 ms is replaced by the next (the permit queue
    // drops its head), so a loaded machine starts fewer than the limit by
    // design (at four test threads on two cores a window counted 23).
    let published = Instant::now();
    let first = loop {
        if let Some((t, _)) = starts.lock().unwrap().first() {
            break *t;
        }
        assert!(published.elapsed() < WAIT, "no handler ever started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let t0 = first.max(published) + Duration::from_millis(500);
    tokio::time::sleep_until((t0 + Duration::from_secs(3)).into()).await;
    let n = count(t0, t0 + Duration::from_secs(3));
    assert!(
        (20..=34).contains(&n),
        "{n} starts in 3 s at 600/min (want 20 to 34: at most the limit, 30 ± 4, and not stalled)"
    );
    fx.broker
        .publish(
            &fx.names.tasks_exchange(),
            "background",
            Message::new("429"),
        )
        .await
        .expect("publish");
    // More behind it, so there is work when the pause ends.
    fx.publish_n(&fx.names.tasks_exchange(), "background", 30)
        .await;
    let t429 = loop {
        let at = starts
            .lock()
            .unwrap()
            .iter()
            .find(|(_, l)| *l)
            .map(|(t, _)| *t);
        if let Some(t) = at {
            break t;
        }
        assert!(t0.elapsed() < WAIT, "the 429 never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    tokio::time::sleep_until((t429 + Duration::from_secs(3)).into()).await;
    let during = count(
        t429 + Duration::from_millis(200),
        t429 + Duration::from_secs(2),
    );
    let after = count(t429 + Duration::from_secs(2), t429 + Duration::from_secs(3));
    for s in subs {
        s.shutdown(WAIT).await;
    }
    assert_eq!(during, 0, "{during} starts during the 2 s pause");
    let timeline: Vec<i64> = starts
        .lock()
        .unwrap()
        .iter()
        .map(|(t, _)| {
            t.duration_since(t0).as_millis() as i64 - t429.duration_since(t0).as_millis() as i64
        })
        .collect();
    assert!(
        after >= 5,
        "{after} starts in the second after the pause; ms after the 429: {timeline:?}"
    );
}

// ---------------------------------------------------------------- request-reply

/// `rabbitmq_requests_total{outcome}` of the case's broker now.
pub fn requests(fx: &Fx, outcome: RequestOutcome) -> u64 {
    fx.broker
        .metrics()
        .requests
        .get_or_create(&RequestLabel { outcome })
        .get()
}

/// Wait until `rabbitmq_requests_total{outcome}` reaches `n` (it is counted
/// after the settlement the test cannot await). Fails after [`WAIT`].
pub async fn wait_requests(fx: &Fx, outcome: RequestOutcome, n: u64) {
    let limit = Instant::now() + WAIT;
    while requests(fx, outcome) < n {
        assert!(
            Instant::now() < limit,
            "requests{{outcome={}}} stayed at {} (want {n}) for {WAIT:?}",
            outcome.as_str(),
            requests(fx, outcome)
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Case: request gets its reply — 20 concurrent requests, each answered by
/// a handler with its own payload, matched by correlation id; nothing left
/// in the work queue, the reply queue or the DLQ.
pub async fn request_gets_its_reply(fx: Fx) {
    let llm = fx.names.task_queue("llm");
    let (sub, rec) = subscribe_with(&fx, &llm, fx.opts(8), |m| {
        assert!(m.reply_to.is_some(), "a request carries reply_to");
        assert!(
            m.expiration.is_some(),
            "a request carries its deadline as expiration"
        );
        assert!(m.deadline().is_some(), "and as the deadline header");
        let answer = format!("re: {}", String::from_utf8_lossy(&m.payload));
        Ok(Outcome::reply(Message::new(answer)))
    })
    .await;
    let tasks = fx.names.tasks_exchange();
    let calls = (0..20).map(|i| {
        let b = fx.broker.clone();
        let tasks = tasks.clone();
        async move {
            let m = Message::new(format!("q{i}"));
            let id = m.id.clone();
            let reply = b
                .request(&tasks, "llm", m, Duration::from_secs(10))
                .await
                .expect("reply within the timeout");
            (i, id, reply)
        }
    });
    for (i, id, reply) in futures::future::join_all(calls).await {
        assert_eq!(String::from_utf8_lossy(&reply.payload), format!("re: q{i}"));
        assert_eq!(
            reply.correlation_id.as_deref(),
            Some(id.as_str()),
            "the correlation id is the request's id"
        );
    }
    assert_eq!(rec.calls().len(), 20, "each request handled once");
    assert_eq!(requests(&fx, RequestOutcome::Replied), 20);
    assert_eq!(requests(&fx, RequestOutcome::LateReply), 0);
    sub.shutdown(WAIT).await;
    fx.drain(&llm, 0).await;
    fx.drain(&fx.names.dlq(), 0).await;
    let reply_queue = fx
        .broker
        .topology()
        .queues
        .iter()
        .map(|q| q.name.clone())
        .find(|n| n.starts_with(&format!("{}.", fx.names.replies_exchange())))
        .expect("the reply queue was declared through the broker");
    fx.drain(&reply_queue, 0).await;
}

/// Case: request nobody answers times out (`RequestTimeout` at its timeout,
/// counted), and then expires in its queue (dead-lettered as `expired`, like
/// any expired message), so no worker will spend time on it later.
pub async fn request_nobody_answers_times_out_and_expires_in_its_queue(fx: Fx) {
    let timeout = Duration::from_millis(400);
    let m = Message::new("anyone?");
    let id = m.id.clone();
    let start = Instant::now();
    match fx
        .broker
        .request(&fx.names.tasks_exchange(), "background", m, timeout)
        .await
    {
        Err(Error::RequestTimeout {
            message_id,
            timeout: t,
            ..
        }) => {
            assert_eq!(message_id, id);
            assert_eq!(t, timeout);
        }
        other => panic!("expected RequestTimeout, got {other:?}"),
    }
    let took = start.elapsed();
    assert!(
        took >= timeout && took < timeout + Duration::from_secs(2),
        "timed out after {took:?}"
    );
    assert_eq!(requests(&fx, RequestOutcome::Timeout), 1);
    match fx
        .broker
        .request(
            &fx.names.tasks_exchange(),
            "background",
            Message::new("x"),
            Duration::MAX,
        )
        .await
    {
        Err(Error::InvalidMessage(e)) => assert!(e.contains("longer than"), "{e}"),
        other => panic!("a timeout RabbitMQ cannot carry is refused, got {other:?}"),
    }
    let dead = fx.drain(&fx.names.dlq(), 1).await;
    assert_eq!(dead[0].message.id, id);
    assert_eq!(
        dead[0].message.header_str("x-first-death-reason"),
        Some("expired")
    );
    fx.drain(&fx.names.task_queue("background"), 0).await;
}

/// Case: request past its deadline is not handled. A request prefetched by a
/// busy worker (so the broker cannot expire it: it is delivered) waits until
/// its caller timed out; the worker then skips it (acked, counted
/// `expired`) without running the handler, and goes on with the next message.
pub async fn request_past_its_deadline_is_not_handled(fx: Fx) {
    let q = fx.names.task_queue("debate");
    let gate = Arc::new(Semaphore::new(0));
    let g = gate.clone();
    let rec = Recorder::default();
    let r = rec.clone();
    let mut opts = fx.opts(2);
    opts.concurrency = Some(1);
    let sub = fx
        .broker
        .subscribe(
            &q,
            move |m: Message, ctx: Context| {
                let (g, r) = (g.clone(), r.clone());
                async move {
                    r.record(&m, &ctx);
                    if &m.payload[..] == b"blocker" {
                        let _ = g.acquire().await;
                    }
                    Ok(Outcome::reply(Message::new("answer")))
                }
            },
            opts,
        )
        .await
        .unwrap();
    let x = fx.names.tasks_exchange();
    fx.broker
        .publish(&x, "debate", Message::new("blocker"))
        .await
        .unwrap();
    rec.wait_for(1, "the blocker is being handled").await;
    match fx
        .broker
        .request(
            &x,
            "debate",
            Message::new("late"),
            Duration::from_millis(300),
        )
        .await
    {
        Err(Error::RequestTimeout { .. }) => {}
        other => panic!("expected RequestTimeout behind the blocker, got {other:?}"),
    }
    let after = Message::new("after");
    let after_id = after.id.clone();
    fx.broker.publish(&x, "debate", after).await.unwrap();
    gate.add_permits(1);
    let calls = rec
        .wait_for(2, "the message after the expired request")
        .await;
    assert_eq!(
        calls[1].message.id, after_id,
        "the expired request was not handled"
    );
    wait_requests(&fx, RequestOutcome::Expired, 1).await;
    sub.shutdown(WAIT).await;
    assert_eq!(rec.calls().len(), 2);
    // The blocker and "after" asked for no reply: dropped, counted.
    assert_eq!(requests(&fx, RequestOutcome::ReplyDropped), 2);
    assert_eq!(requests(&fx, RequestOutcome::Expired), 1);
    fx.drain(&q, 0).await;
    fx.drain(&fx.names.dlq(), 0).await;
}

/// Case: reply to a gone caller is counted, not dead-lettered: a request
/// whose reply queue does not exist — before any requester declared the
/// replies exchange, and after — is answered, the answer dropped and
/// counted `reply_dropped`, the request acked; nothing reaches the DLQ.
pub async fn reply_to_a_gone_caller_is_counted_not_dead_lettered(fx: Fx) {
    let q = fx.names.task_queue("verification");
    let (sub, rec) = subscribe_with(&fx, &q, fx.opts(4), |m| {
        Ok(Outcome::reply(Message::new(m.payload.clone())))
    })
    .await;
    let x = fx.names.tasks_exchange();
    let deadline = helixmq::message::now_unix_millis() + 30_000;
    let orphan = |what: &str| {
        let mut m = Message::new(what.to_string())
            .with_correlation_id(format!("gone-{what}"))
            .with_header(header::DEADLINE, deadline);
        m.reply_to = Some(fx.names.reply_queue("gone"));
        m
    };
    // No replies exchange yet: nobody ever made a request here.
    fx.broker
        .publish(&x, "verification", orphan("first"))
        .await
        .unwrap();
    wait_requests(&fx, RequestOutcome::ReplyDropped, 1).await;
    // A live caller declares the replies exchange and gets its answer...
    let reply = fx
        .broker
        .request(&x, "verification", Message::new("alive"), WAIT)
        .await
        .expect("reply");
    assert_eq!(&reply.payload[..], b"alive");
    // ...and a gone one's answer is unroutable there.
    fx.broker
        .publish(&x, "verification", orphan("second"))
        .await
        .unwrap();
    wait_requests(&fx, RequestOutcome::ReplyDropped, 2).await;
    sub.shutdown(WAIT).await;
    assert_eq!(rec.calls().len(), 3);
    assert_eq!(requests(&fx, RequestOutcome::Replied), 1);
    assert_eq!(requests(&fx, RequestOutcome::LateReply), 0);
    fx.drain(&q, 0).await;
    fx.drain(&fx.names.dlq(), 0).await;
}
