//! Deliveries counted per message id, for the scenario tests that publish a
//! long run, inject faults, and must then find every confirmed id consumed at
//! least once (lost = 0) while counting duplicates.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Consumed ids and a progress counter (publishes answered + deliveries).
#[derive(Default)]
pub struct Tally {
    consumed: Mutex<HashMap<String, u32>>,
    progress: AtomicUsize,
}

impl Tally {
    /// A handler saw `id`.
    pub fn delivered(&self, id: String) {
        *self.consumed.lock().unwrap().entry(id).or_insert(0) += 1;
        self.progress.fetch_add(1, Ordering::Relaxed);
    }

    /// A publish was answered.
    pub fn answered(&self) {
        self.progress.fetch_add(1, Ordering::Relaxed);
    }

    /// Publishes answered plus deliveries so far.
    pub fn progress(&self) -> usize {
        self.progress.load(Ordering::Relaxed)
    }

    /// Wait until every id of `confirmed` was consumed; panics after `within`
    /// (the run must finish by itself), saying how many are missing and where
    /// `queue` stands on the broker (ready / unacked / consumers).
    pub async fn wait_all_consumed(
        &self,
        confirmed: &HashSet<String>,
        within: Duration,
        queue: &str,
    ) {
        let deadline = Instant::now() + within;
        loop {
            let missing: Vec<String> = {
                let c = self.consumed.lock().unwrap();
                confirmed
                    .iter()
                    .filter(|id| !c.contains_key(*id))
                    .cloned()
                    .collect()
            };
            if missing.is_empty() {
                return;
            }
            if Instant::now() >= deadline {
                let q = queue.to_string();
                let stats = tokio::task::spawn_blocking(move || queue_line(&q))
                    .await
                    .unwrap_or_default();
                // The ids let a frame capture tell where each one went.
                panic!(
                    "{} of {} confirmed messages not consumed within {within:?} (e.g. {:?}); queue (name ready unacked consumers): {stats}",
                    missing.len(),
                    confirmed.len(),
                    &missing[..missing.len().min(5)]
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// (confirmed ids never consumed, deliveries beyond the first per id).
    pub fn lost_and_duplicates(&self, confirmed: &HashSet<String>) -> (usize, u32) {
        let c = self.consumed.lock().unwrap();
        let lost = confirmed.iter().filter(|id| !c.contains_key(*id)).count();
        (lost, c.values().map(|n| n - 1).sum())
    }
}

/// What one publisher task returns: each message id with its publish answer.
pub type Answers = Vec<(String, helixmq::Result<()>)>;

/// Join the publisher tasks; their answers by id → (the confirmed ids, the
/// error texts).
pub async fn confirmed_and_failed(
    tasks: Vec<tokio::task::JoinHandle<Answers>>,
) -> (HashSet<String>, Vec<String>) {
    let mut confirmed = HashSet::new();
    let mut failed = Vec::new();
    for t in tasks {
        for (id, r) in t.await.expect("publisher task") {
            match r {
                Ok(()) => {
                    confirmed.insert(id);
                }
                Err(e) => failed.push(e.to_string()),
            }
        }
    }
    (confirmed, failed)
}

/// `name ready unacked consumers` of `queue` on the shared broker.
fn queue_line(queue: &str) -> String {
    let out = std::process::Command::new("rabbitmqctl")
        .args([
            "-q",
            "list_queues",
            "name",
            "messages_ready",
            "messages_unacknowledged",
            "consumers",
        ])
        .output();
    match out {
        Ok(o) => String::from_utf8_lossy(&o.stdout)
            .lines()
            .find(|l| l.split_whitespace().next() == Some(queue))
            .unwrap_or("(not listed)")
            .to_string(),
        Err(e) => format!("(rabbitmqctl: {e})"),
    }
}
