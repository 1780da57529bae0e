//! The library's DLQ reader ([`helixmq::dlq`]) on the real RabbitMQ as the
//! spec's least-privilege user: a second reader waits for the first, then
//! sees everything; a replay cut by a connection loss leaves every letter in
//! the DLQ or in its target (counted by id: lost 0, duplicates reported).

use std::time::Duration;

use helixmq::dlq::{DeadLetters, Filter, Order, Progress, ReadOptions, Target};
use helixmq::message::header;
use helixmq::{Broker, Message, Names, PublishOptions, Topology};
use helixmq_testkit::broker::*;
use helixmq_testkit::ledger::Ledger;
use helixmq_testkit::proxy::{Proxy, Shape};

/// `n` dead letters as helixmq's consumer writes them, failed in `origin`.
async fn seed(b: &Broker, origin: &str, reason: &str, n: usize, ledger: &Ledger) {
    let dlx = b.names().dead_letter_exchange();
    let msgs: Vec<Message> = (0..n)
        .map(|i| {
            Message::new(format!(r#"{{"n":{i}}}"#))
                .with_header(header::ORIGIN_QUEUE, origin)
                .with_header(header::DEAD_LETTER_REASON, format!("{reason} #{i}"))
        })
        .collect();
    for chunk in msgs.chunks(1000) {
        let res = b
            .publish_batch(&dlx, "x", chunk, &PublishOptions::default())
            .await;
        for (m, r) in chunk.iter().zip(&res) {
            ledger.published(&m.id, r);
            r.as_ref().unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_reader_waits_for_the_first_then_sees_every_letter() {
    let p = prefix();
    let b = broker(config(HELIXAGENT, &p)).await.unwrap();
    let names = Names::new(&p);
    b.declare(&Topology::spec(&names)).await.unwrap();
    let ledger = Ledger::default();
    seed(&b, &names.task_queue("llm"), "timeout", 2_000, &ledger).await;

    let a = DeadLetters::new(&b);
    let page = a
        .list(&Filter::all(), Order::OldestFirst, 0, 10)
        .await
        .unwrap();
    assert_eq!(
        (page.matching, page.held, page.letters.len()),
        (2_000, 2_000, 10)
    );
    let groups = a.groups(&Filter::all()).await.unwrap();
    assert_eq!(groups.len(), 1, "numbers are ignored: one group");
    assert_eq!(groups[0].count, 2_000);

    // Another reader while A holds it: it waits, then says who holds it.
    let other = DeadLetters::with_options(
        &b,
        ReadOptions {
            wait_for_other: Duration::from_millis(600),
            ..ReadOptions::default()
        },
    );
    let err = other
        .list(&Filter::all(), Order::OldestFirst, 0, 10)
        .await
        .unwrap_err();
    assert!(matches!(err, helixmq::Error::InUse { .. }), "{err}");
    assert!(
        err.to_string().contains("other reader") && err.to_string().contains(&names.dlq()),
        "{err}"
    );

    // A lets go: everything is back, and the other reader sees all of it.
    a.release().await;
    let page = other
        .list(&Filter::all(), Order::NewestFirst, 0, 5)
        .await
        .unwrap();
    assert_eq!(page.matching, 2_000);
    other.release().await;
    let ids = drain_ids(&b, &names.dlq()).await;
    for id in &ids {
        ledger.consumed(id);
    }
    assert_eq!(ledger.missing(5), Vec::<String>::new(), "lost");
    assert_eq!(ids.len(), 2_000, "duplicates in the DLQ");
    cleanup(&b, None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_cut_by_a_connection_loss_leaves_every_letter_somewhere() {
    const N: usize = 10_000;
    // Through a proxy that cuts at once, on a link slow enough that the cut
    // lands while the replay is publishing.
    let proxy = Proxy::start("127.0.0.1:5672".parse().unwrap()).await;
    let p = prefix();
    let mut cfg = config(HELIXAGENT, &p);
    cfg.rabbitmq.port = proxy.port();
    cfg.rabbitmq.publish_timeout = Duration::from_secs(60);
    let b = broker(cfg).await.unwrap();
    let names = Names::new(&p);
    b.declare(&Topology::spec(&names)).await.unwrap();
    let target = names.task_queue("background");
    let ledger = Ledger::default();
    seed(&b, &target, "boom", N, &ledger).await;

    let dlq = DeadLetters::new(&b);
    dlq.list(&Filter::all(), Order::OldestFirst, 0, 1)
        .await
        .unwrap();
    proxy.shape(Shape {
        latency: Duration::from_millis(5),
        bytes_per_sec: Some(400_000),
    });
    let progress = Progress::new();
    let replay = {
        let dlq = dlq.clone();
        let progress = progress.clone();
        tokio::spawn(async move {
            dlq.replay(&Filter::all(), Target::Origin, None, &progress)
                .await
        })
    };
    while progress.done() < 2_000 {
        assert!(!replay.is_finished(), "the replay ended before the cut");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(proxy.cut() >= 1, "a connection was cut");
    proxy.shape(Shape::default());
    let report = replay.await.unwrap().unwrap();
    eprintln!(
        "replay cut after {} of {N}: {} replayed, {} failed, {} in both; errors {:?}",
        progress.done(),
        report.replayed,
        report.failed,
        report.duplicated,
        report.errors
    );
    dlq.release().await;

    // Count by id: every letter is in the DLQ or in its target.
    let in_target = drain_ids(&b, &target).await;
    let in_dlq = drain_ids(&b, &names.dlq()).await;
    for id in in_target.iter().chain(&in_dlq) {
        ledger.consumed(id);
    }
    let lost = ledger.missing(10);
    let both = in_target.len() + in_dlq.len() - ledger.distinct_consumed();
    eprintln!(
        "after the cut: {} in {target}, {} in the DLQ, lost {}, in both {both}",
        in_target.len(),
        in_dlq.len(),
        lost.len()
    );
    assert_eq!(lost, Vec::<String>::new(), "lost");
    assert!(report.replayed <= in_target.len());
    assert!(
        report.interrupted > 0 && report.replayed < N,
        "the cut landed mid-replay: {report:?}"
    );
    // At most the chunk in flight at the cut is in both places.
    assert!(both <= 1_000, "{both} in both");
    cleanup(&b, None).await;
}
