//! Shared rate limits on RabbitMQ as the least-privilege user: subscriptions on
//! separate broker handles (separate connections, as separate processes
//! would be) together stay within one key's limit; a `RetryAfter` pauses all
//! of them; when the refiller goes, another takes the lease.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use helixmq::message::header;
use helixmq::metrics::RateLimitLabel;
use helixmq::ratelimit::{report_tokens, RateLimit};
use helixmq::HeaderValue;
use helixmq::{
    Broker, Message, Names, Outcome, RetryPolicy, SubscribeOptions, Subscription, Topology,
};
use helixmq_testkit::broker::*;

/// Each handler start, and whether it answered 429.
type Starts = Arc<Mutex<Vec<(Instant, bool)>>>;

fn limit(key: &str, per_minute: u32) -> RateLimit {
    RateLimit {
        burst: Some(1),
        ..RateLimit::new(key, per_minute)
    }
}

async fn brokers(p: &str, n: usize) -> Vec<Broker> {
    let mut v = Vec::new();
    for _ in 0..n {
        let b = broker(config(HELIXAGENT, p)).await.unwrap();
        b.declare(&Topology::spec(&Names::new(p))).await.unwrap();
        v.push(b);
    }
    v
}

/// `n` messages on the background queue: more than the test can use.
async fn fill(b: &Broker, n: usize) {
    let names = b.names().clone();
    let msgs: Vec<Message> = (0..n).map(|i| Message::new(format!("{i}"))).collect();
    for r in b
        .publish_batch(
            &names.tasks_exchange(),
            "background",
            &msgs,
            &Default::default(),
        )
        .await
    {
        r.unwrap();
    }
}

/// A subscription recording each handler start; a message whose payload is
/// `429` answers `RetryAfter(pause)` (once: its retry acks).
async fn subscribe(b: &Broker, l: &RateLimit, starts: &Starts, pause: Duration) -> Subscription {
    let starts = starts.clone();
    let queue = b.names().task_queue("background");
    let opts = SubscribeOptions {
        prefetch: Some(4),
        rate_limit: Some(l.clone()),
        retry: Some(RetryPolicy {
            max_attempts: 3,
            delays: vec![Duration::from_secs(1)],
        }),
        ..Default::default()
    };
    b.subscribe(
        &queue,
        move |m: Message, _ctx| {
            let starts = starts.clone();
            async move {
                let limited = &m.payload[..] == b"429" && m.attempt == 1;
                starts.lock().unwrap().push((Instant::now(), limited));
                Ok(if limited {
                    Outcome::RetryAfter(pause)
                } else {
                    Outcome::Ack
                })
            }
        },
        opts,
    )
    .await
    .unwrap()
}

fn between(starts: &Starts, from: Instant, to: Instant) -> usize {
    starts
        .lock()
        .unwrap()
        .iter()
        .filter(|(t, _)| *t >= from && *t < to)
        .count()
}

async fn clean(bs: &[Broker], l: &RateLimit) {
    let extra = l.topology(bs[0].names(), "none");
    cleanup(&bs[0], Some(&extra)).await;
    for b in bs {
        let _ = b.close().await;
    }
}

fn minted(b: &Broker, key: &str) -> u64 {
    b.metrics()
        .rate_limit_permits_minted
        .get_or_create(&RateLimitLabel { key: key.into() })
        .get()
}

#[tokio::test]
async fn subscriptions_on_separate_connections_share_one_limit() {
    let p = prefix();
    let bs = brokers(&p, 3).await;
    fill(&bs[0], 2000).await;
    let l = limit("shared", 600);
    let starts: Starts = Default::default();
    let mut subs = Vec::new();
    for b in &bs {
        subs.push(subscribe(b, &l, &starts, Duration::ZERO).await);
    }
    // Warm up one second, then count five: 10/s for all three together.
    let t0 = Instant::now() + Duration::from_secs(1);
    tokio::time::sleep_until((t0 + Duration::from_secs(5)).into()).await;
    let n = between(&starts, t0, t0 + Duration::from_secs(5));
    let refillers = bs.iter().filter(|b| minted(b, "shared") > 0).count();
    for s in subs {
        s.shutdown(Duration::from_secs(5)).await;
    }
    clean(&bs, &l).await;
    eprintln!("shared limit: {n} starts in 5 s at 600/min, {refillers} refiller(s)");
    assert!(
        (46..=54).contains(&n),
        "{n} starts in 5 s at 600/min (want 50 ± 4)"
    );
    assert_eq!(refillers, 1, "exactly one handle minted permits");
}

#[tokio::test]
async fn retry_after_pauses_every_sharer() {
    let p = prefix();
    let bs = brokers(&p, 2).await;
    let names = Names::new(&p);
    let l = limit("pause", 600);
    let starts: Starts = Default::default();
    let pause = Duration::from_secs(3);
    let mut subs = Vec::new();
    for b in &bs {
        subs.push(subscribe(b, &l, &starts, pause).await);
    }
    fill(&bs[0], 20).await;
    bs[0]
        .publish(&names.tasks_exchange(), "background", Message::new("429"))
        .await
        .unwrap();
    fill(&bs[0], 200).await;
    // The 429 is about the 21st start at 10/s: about 2 s in.
    let deadline = Instant::now() + Duration::from_secs(20);
    let t429 = loop {
        let got = starts
            .lock()
            .unwrap()
            .iter()
            .find(|(_, l)| *l)
            .map(|(t, _)| *t);
        if let Some(t) = got {
            break t;
        }
        assert!(Instant::now() < deadline, "the 429 message never started");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    tokio::time::sleep_until((t429 + pause + Duration::from_secs(2)).into()).await;
    // The others hear the pause within milliseconds; allow 200 ms for it.
    let during = between(&starts, t429 + Duration::from_millis(200), t429 + pause);
    let after = between(&starts, t429 + pause, t429 + pause + Duration::from_secs(2));
    for s in subs {
        s.shutdown(Duration::from_secs(5)).await;
    }
    clean(&bs, &l).await;
    eprintln!("pause: {during} starts during it, {after} in the 2 s after");
    assert_eq!(during, 0, "{during} handler starts during the 3 s pause");
    assert!(
        (15..=25).contains(&after),
        "{after} starts in the 2 s after the pause (want about 20)"
    );
}

#[tokio::test]
async fn another_handle_takes_the_lease_when_the_refiller_goes() {
    let p = prefix();
    let mut bs = brokers(&p, 2).await;
    fill(&bs[0], 1000).await;
    let l = limit("lease", 600);
    let starts_a: Starts = Default::default();
    let starts_b: Starts = Default::default();
    // The first consumer of the lease queue is the active one: `a` refills.
    let sub_a = subscribe(&bs[0], &l, &starts_a, Duration::ZERO).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while minted(&bs[0], "lease") == 0 {
        assert!(Instant::now() < deadline, "a never minted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let sub_b = subscribe(&bs[1], &l, &starts_b, Duration::ZERO).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        minted(&bs[1], "lease"),
        0,
        "b minted while a held the lease"
    );
    // `a` goes abruptly: its subscription dropped, its connection closed.
    drop(sub_a);
    let a = bs.remove(0);
    a.close().await.unwrap();
    let closed = Instant::now();
    // The rate is measured from the handover on, not from a fixed offset after
    // the close: how soon the broker makes `b` the active consumer depends on
    // the machine's load (under four test threads it took more than a second,
    // and a fixed window counted 30 starts of a correct rate). The handover
    // itself must still happen, within 15 s.
    while minted(&bs[0], "lease") == 0 {
        assert!(
            closed.elapsed() < Duration::from_secs(15),
            "b never took the lease"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let handover = closed.elapsed();
    let t0 = Instant::now() + Duration::from_secs(1);
    tokio::time::sleep_until((t0 + Duration::from_secs(4)).into()).await;
    let n = between(&starts_b, t0, t0 + Duration::from_secs(4));
    let b_minted = minted(&bs[0], "lease");
    sub_b.shutdown(Duration::from_secs(5)).await;
    clean(&bs, &l).await;
    eprintln!(
        "handover after {handover:?}: {n} starts in the 4 s from 1 s later, b minted {b_minted}"
    );
    assert!(
        (36..=44).contains(&n),
        "{n} starts in 4 s after the handover (want 40 ± 4)"
    );
}

/// Two handles share 60,000 tokens/min (1,000/s; requests not binding). Each
/// message estimates `estimate` tokens and the handler reports `used`: the
/// starts follow what was used, not what was estimated.
async fn token_rate(key: &str, estimate: i64, used: u64) -> usize {
    let p = prefix();
    let bs = brokers(&p, 2).await;
    let names = Names::new(&p);
    let l = RateLimit::new(key, 6000).tokens_per_minute(60_000);
    let msgs: Vec<Message> = (0..400)
        .map(|i| {
            let mut m = Message::new(format!("{i}"));
            m.headers
                .insert(header::TOKEN_ESTIMATE.into(), HeaderValue::Int(estimate));
            m
        })
        .collect();
    for r in bs[0]
        .publish_batch(
            &names.tasks_exchange(),
            "background",
            &msgs,
            &Default::default(),
        )
        .await
    {
        r.unwrap();
    }
    let starts: Starts = Default::default();
    let mut subs = Vec::new();
    for b in &bs {
        let starts = starts.clone();
        let opts = SubscribeOptions {
            prefetch: Some(4),
            rate_limit: Some(l.clone()),
            ..Default::default()
        };
        let s = b
            .subscribe(
                &names.task_queue("background"),
                move |_m: Message, _ctx| {
                    let starts = starts.clone();
                    async move {
                        starts.lock().unwrap().push((Instant::now(), false));
                        report_tokens(used);
                        Ok(Outcome::Ack)
                    }
                },
                opts,
            )
            .await
            .unwrap();
        subs.push(s);
    }
    let t0 = Instant::now() + Duration::from_secs(2);
    tokio::time::sleep_until((t0 + Duration::from_secs(4)).into()).await;
    let n = between(&starts, t0, t0 + Duration::from_secs(4));
    for s in subs {
        s.shutdown(Duration::from_secs(5)).await;
    }
    clean(&bs, &l).await;
    eprintln!("tokens: estimate {estimate}, used {used}: {n} starts in 4 s");
    n
}

#[tokio::test]
async fn tokens_used_beyond_the_estimate_are_taken_before_the_next_start() {
    // 1,000 tokens/s at 200 used each: 5/s (the estimate alone would allow 10/s).
    let n = token_rate("overrun", 100, 200).await;
    assert!((16..=24).contains(&n), "{n} starts in 4 s (want 20 ± 4)");
}

#[tokio::test]
async fn tokens_estimated_but_not_used_go_back_to_the_pool() {
    // 1,000 tokens/s at 50 used each: 20/s (the estimate alone would allow 5/s).
    let n = token_rate("giveback", 200, 50).await;
    assert!((68..=92).contains(&n), "{n} starts in 4 s (want 80 ± 12)");
}
