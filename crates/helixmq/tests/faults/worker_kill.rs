//! Fault: a worker process killed with SIGKILL while its handlers run.
//!
//! The worker is this very test binary run again as a child process (the
//! ignored test `worker_kill::worker_child`, selected with `--exact --ignored`): it
//! subscribes to the queue and prints `begin <id>` / `end <id>` around each
//! handler (300 ms of work). The parent kills it with SIGKILL once some
//! messages were processed and others are mid-handler, then starts another
//! consumer: every message the dead worker held unacked is redelivered
//! (`redelivered = true`) and processed; counted by id, nothing is lost.

use std::collections::{HashMap, HashSet};
use std::os::unix::process::ExitStatusExt;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use helixmq::{Message, Outcome, PublishOptions, SubscribeOptions};
use helixmq_testkit::broker::prefix;
use helixmq_testkit::ledger::Ledger;
use helixmq_testkit::logs::init_logging;
use helixmq_testkit::node::SHARED_PORT;
use helixmq_testkit::scenario::*;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

const QUEUE_ENV: &str = "HELIXMQ_FAULT_WORKER_QUEUE";
const PREFIX_ENV: &str = "HELIXMQ_FAULT_WORKER_PREFIX";
const HANDLER_WORK: Duration = Duration::from_millis(300);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_killed_mid_handler_messages_redelivered() {
    init_logging();
    const MESSAGES: usize = 1_500;
    let p = prefix();
    let mut s = Scenario::start("worker_kill", config(SHARED_PORT, &p), |q| q).await;
    let (b, ledger, queue) = (s.broker.clone(), s.ledger.clone(), s.queue.clone());
    publish_all(
        b.clone(),
        ledger.clone(),
        MESSAGES,
        64,
        PublishOptions::default(),
    )
    .await;
    assert_eq!(
        ledger.report().confirmed,
        MESSAGES,
        "{:?}",
        ledger.report().errors
    );

    // The worker process.
    let mut child = Command::new(std::env::current_exe().expect("test binary path"))
        .args([
            "worker_kill::worker_child",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(QUEUE_ENV, &queue)
        .env(PREFIX_ENV, p.as_str())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn the worker process");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let mut begun = HashSet::new();
    let mut ended = HashSet::new();
    let watch = async {
        while let Some(line) = lines.next_line().await.expect("read worker output") {
            record(&line, &mut begun, &mut ended, &ledger);
            if ended.len() >= 100 && begun.difference(&ended).count() >= 10 {
                return;
            }
        }
        panic!("the worker exited before the kill");
    };
    tokio::time::timeout(Duration::from_secs(40), watch)
        .await
        .expect("worker made progress");

    // SIGKILL: no chance to ack, nack or close anything.
    child.start_kill().expect("SIGKILL the worker");
    let killed_at = Instant::now();
    let status = child.wait().await.expect("reap the worker");
    assert_eq!(
        status.signal(),
        Some(9),
        "worker ended by SIGKILL: {status:?}"
    );
    // Lines it printed before dying are still in the pipe.
    while let Some(line) = lines.next_line().await.expect("read worker output") {
        record(&line, &mut begun, &mut ended, &ledger);
    }
    let in_flight: HashSet<String> = begun.difference(&ended).cloned().collect();
    assert!(!in_flight.is_empty(), "no handler was running at the kill");

    // Another consumer takes over.
    let seen: Arc<Mutex<HashMap<String, (Duration, bool)>>> = Arc::default();
    let (l2, s2) = (ledger.clone(), seen.clone());
    let sub = b
        .subscribe(
            &queue,
            move |m: Message, ctx: helixmq::Context| {
                l2.consumed(&m.id);
                s2.lock()
                    .unwrap()
                    .entry(m.id)
                    .or_insert((killed_at.elapsed(), ctx.redelivered));
                async { Ok(Outcome::Ack) }
            },
            SubscribeOptions {
                prefetch: Some(100),
                concurrency: Some(32),
                ..Default::default()
            },
        )
        .await
        .expect("subscribe the second consumer");
    s.adopt(sub);
    s.drain().await;

    let seen = seen.lock().unwrap().clone();
    let mut recovery = Duration::ZERO;
    for id in &in_flight {
        let (at, redelivered) = seen.get(id).unwrap_or_else(|| {
            panic!("message {id}, mid-handler at the kill, was not processed again")
        });
        assert!(
            redelivered,
            "message {id} came back without the redelivered flag"
        );
        recovery = recovery.max(*at);
    }
    s.recovered(1, recovery);
    let end = s.finish(0).await;
    eprintln!(
        "worker_kill: worker processed {} and had {} mid-handler at the kill; second consumer processed {}",
        ended.len(),
        in_flight.len(),
        seen.len()
    );
    assert_eq!(end.report.messages, MESSAGES);
    assert_eq!(end.report.confirmed, MESSAGES);
}

/// Account one line of the worker's output. libtest prints its own
/// `test worker_kill::worker_child ... ` without a newline, so a marker may not start the line.
fn record(line: &str, begun: &mut HashSet<String>, ended: &mut HashSet<String>, ledger: &Ledger) {
    if let Some((_, id)) = line.split_once("begin ") {
        begun.insert(id.trim().to_string());
    } else if let Some((_, id)) = line.split_once("end ") {
        let id = id.trim();
        ended.insert(id.to_string());
        ledger.consumed(id);
    }
}

/// The worker process of the test above (it runs this binary with
/// `--exact --ignored worker_kill::worker_child` and the queue in the environment); on its
/// own, without that environment, it does nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "child process of worker_killed_mid_handler_messages_redelivered"]
async fn worker_child() {
    let (Ok(queue), Ok(p)) = (std::env::var(QUEUE_ENV), std::env::var(PREFIX_ENV)) else {
        return;
    };
    let b = connect(config(SHARED_PORT, &p)).await;
    let sub = b
        .subscribe(
            &queue,
            |m: Message, _ctx| async move {
                println!("begin {}", m.id);
                // The handler's work: real time passing.
                tokio::time::sleep(HANDLER_WORK).await;
                println!("end {}", m.id);
                Ok(Outcome::Ack)
            },
            SubscribeOptions {
                prefetch: Some(20),
                concurrency: Some(20),
                ..Default::default()
            },
        )
        .await
        .expect("worker subscribes");
    // Run until killed, or until the parent goes away (our stdin closes).
    let mut sink = Vec::new();
    let _ = tokio::io::AsyncReadExt::read_to_end(&mut tokio::io::stdin(), &mut sink).await;
    sub.shutdown(Duration::from_secs(5)).await;
    b.close().await.expect("close");
}
