//! The dead-letter queue, read and worked on without losing anything: list,
//! filter, group, show, replay, delete, purge — for the CLI (`helixmq dlq`), the
//! console (`helixmq console`) and services alike.
//!
//! # How the DLQ is read
//!
//! RabbitMQ cannot browse a queue in place, so a [`DeadLetters`] reader
//! **holds** it: it consumes every dead letter with no prefetch limit and keeps
//! them unacked, indexed in memory; new dead letters join the index as they
//! arrive. Pages, filters and groups are then answered from memory (a 100,000
//! letter DLQ pages in milliseconds, see `docs/BENCHMARKS.md`). An action acks
//! a letter only after what it does is done: a replayed letter only after its
//! copy was confirmed in the target queue. Letting go (after
//! [`ReadOptions::idle_release`] without a request, or [`DeadLetters::release`])
//! closes the channel, and RabbitMQ puts every letter still held back in its place.
//!
//! Trade-offs, and why this and not the others:
//! - **Nothing is lost, whatever happens.** A crash, a kill or a lost
//!   connection of the reader returns every held letter to the DLQ; a replay
//!   interrupted after a copy was confirmed but before the letter was acked
//!   leaves it in both places (a duplicate, never a loss).
//! - **Order** is kept: requeued messages go back to their position.
//! - **Redelivered flag**: every letter a reader has held comes back marked
//!   `redelivered` — in a DLQ that only says somebody looked at it.
//! - **One reader at a time.** While a reader holds the DLQ, another process
//!   would receive nothing; so [`DeadLetters`] waits (up to
//!   [`ReadOptions::wait_for_other`]) until no other consumer is on the queue,
//!   then fails with [`Error::InUse`] naming the holder. Within one process a
//!   `DeadLetters` is shared (it is `Clone`): every browser tab of a console
//!   reads the same hold. A console lets go after 30 s without a DLQ request,
//!   so a `helixmq dlq` command started meanwhile waits at most that long.
//! - **RabbitMQ's consumer timeout** (30 min) closes a channel holding an
//!   unacked delivery that long: a hold is renewed (let go and read again)
//!   after [`ReadOptions::max_hold`] (10 min) when no action is running.
//! - **Memory**: the reader keeps every letter (100,000 letters of 1 KiB: ~150 MB).
//!
//! Rejected: get-and-requeue (`basic.get` + `nack`) returns the same head
//! message again and again; re-publishing each letter to the DLQ's tail to
//! "rotate" it changes order and doubles the writes; an index kept in a side
//! store (a database) can drift from the queue. Holding is what RabbitMQ
//! offers that is both complete and safe.

mod filter;
mod hold;
mod letter;
mod tiers;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

pub use filter::Filter;
pub use letter::{group_key, rfc3339_ms, short_age, DeadLetter};
pub use tiers::{retry_tiers, TierStatus};

use hold::{Held, Hold, Index};

use crate::error::{Error, Result};
use crate::{Broker, Message, PublishOptions};

/// How a [`DeadLetters`] reader holds the DLQ.
#[derive(Debug, Clone)]
pub struct ReadOptions {
    /// Let go of the DLQ after this long without a request. Default 30 s.
    pub idle_release: Duration,
    /// Read it again after holding it this long, when no action runs (below
    /// RabbitMQ's 30 min consumer timeout). Default 10 min.
    pub max_hold: Duration,
    /// How long to wait for another reader to let go. Default 40 s.
    pub wait_for_other: Duration,
    /// The first read ends when the broker sent nothing for this long (or when
    /// every letter that was ready arrived). Default 1 s.
    pub read_quiet: Duration,
}

impl Default for ReadOptions {
    fn default() -> Self {
        ReadOptions {
            idle_release: Duration::from_secs(30),
            max_hold: Duration::from_secs(600),
            wait_for_other: Duration::from_secs(40),
            read_quiet: Duration::from_secs(1),
        }
    }
}

/// Which end of the DLQ a page starts from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Order {
    /// Most recently dead-lettered first (the default of the console).
    #[default]
    NewestFirst,
    /// Queue order.
    OldestFirst,
}

/// One page of dead letters.
#[derive(Debug, Clone)]
pub struct Page {
    /// The letters on this page.
    pub letters: Vec<Arc<DeadLetter>>,
    /// Index of the first one among those matching.
    pub offset: usize,
    /// How many match the filter.
    pub matching: usize,
    /// How many the reader holds (the DLQ's depth, less what an action is working on).
    pub held: usize,
}

/// Letters that failed the same way.
#[derive(Debug, Clone)]
pub struct Group {
    /// The group key (the reason with numbers as `#`): filter with [`Filter::group`].
    pub key: String,
    /// The reason of one of them, as it was.
    pub example: String,
    /// How many.
    pub count: usize,
    /// Per origin queue, how many.
    pub origins: std::collections::BTreeMap<String, usize>,
    /// The newest failure in the group, Unix ms.
    pub newest_ms: i64,
}

/// How far a long action got; shared with whoever shows it.
#[derive(Debug, Default)]
pub struct Progress {
    total: AtomicUsize,
    done: AtomicUsize,
    failed: AtomicUsize,
    finished: AtomicBool,
}

impl Progress {
    /// A new tracker.
    pub fn new() -> Arc<Progress> {
        Arc::new(Progress::default())
    }
    /// How many the action will handle (known once it selected them).
    pub fn total(&self) -> usize {
        self.total.load(Ordering::Relaxed)
    }
    /// How many it handled so far (succeeded or failed).
    pub fn done(&self) -> usize {
        self.done.load(Ordering::Relaxed)
    }
    /// How many failed (they stay in the DLQ).
    pub fn failed(&self) -> usize {
        self.failed.load(Ordering::Relaxed)
    }
    /// Whether the action ended.
    pub fn finished(&self) -> bool {
        self.finished.load(Ordering::Relaxed)
    }
}

/// What a replay did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReplayReport {
    /// Confirmed in their target and removed from the DLQ.
    pub replayed: usize,
    /// Each of those: message id and the queue it went to, in order.
    pub moved: Vec<(String, String)>,
    /// Not confirmed in their target: still in the DLQ.
    pub failed: usize,
    /// No target (no origin queue recorded and none given): still in the DLQ.
    pub skipped: usize,
    /// Confirmed in their target, but the DLQ did not take the ack (the
    /// connection went): the broker returns them to the DLQ, so they are in both.
    pub duplicated: usize,
    /// Not tried: the reader lost its hold on the DLQ (the connection went)
    /// before their turn. They stay in the DLQ (the broker returns them); run
    /// the replay again.
    pub interrupted: usize,
    /// The first few distinct errors, each once.
    pub errors: Vec<String>,
}

/// Where replayed letters go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target<'a> {
    /// Each to the queue it failed in.
    Origin,
    /// All to this queue (a work queue bound to the requeue exchange).
    Queue(&'a str),
}

/// Replays and deletes publish and ack in chunks of this many.
const CHUNK: usize = 500;

/// A reader of the DLQ and the actions on it. Cheap to clone; clones share the hold.
#[derive(Clone)]
pub struct DeadLetters {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for DeadLetters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeadLetters")
            .field("queue", &self.inner.queue)
            .finish()
    }
}

struct Inner {
    broker: Broker,
    queue: String,
    opts: ReadOptions,
    hold: tokio::sync::Mutex<Option<Hold>>,
    last_used: Mutex<tokio::time::Instant>,
    /// Actions running: the hold is not renewed or let go under them.
    busy: AtomicUsize,
    reaper: AtomicBool,
}

/// Marks an action running while it lives.
struct Busy<'a>(&'a AtomicUsize);

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl DeadLetters {
    /// A reader of `broker`'s DLQ (`{prefix}.dlq`). Nothing is read until asked.
    pub fn new(broker: &Broker) -> DeadLetters {
        DeadLetters::with_options(broker, ReadOptions::default())
    }

    /// A reader with its own [`ReadOptions`].
    pub fn with_options(broker: &Broker, opts: ReadOptions) -> DeadLetters {
        DeadLetters {
            inner: Arc::new(Inner {
                queue: broker.names().dlq(),
                broker: broker.clone(),
                opts,
                hold: tokio::sync::Mutex::new(None),
                last_used: Mutex::new(tokio::time::Instant::now()),
                busy: AtomicUsize::new(0),
                reaper: AtomicBool::new(false),
            }),
        }
    }

    /// The DLQ's name.
    pub fn queue(&self) -> &str {
        &self.inner.queue
    }

    /// The index of a live hold, reading the DLQ first if there is none.
    async fn index(&self) -> Result<Arc<Mutex<Index>>> {
        let inner = &self.inner;
        *inner.last_used.lock().expect("dlq clock") = tokio::time::Instant::now();
        let mut hold = inner.hold.lock().await;
        if let Some(h) = hold.as_ref() {
            let dead = h.index.lock().expect("dlq index").dead.is_some();
            let stale = h.acquired.elapsed() > inner.opts.max_hold
                && inner.busy.load(Ordering::SeqCst) == 0;
            if !dead && !stale {
                return Ok(h.index.clone());
            }
            // Let go first: the new read waits until this consumer is gone.
            *hold = None;
        }
        let h = Hold::acquire(&inner.broker, &inner.queue, &inner.opts).await?;
        let index = h.index.clone();
        *hold = Some(h);
        // A long read is use too: the idle clock starts when it ended.
        *inner.last_used.lock().expect("dlq clock") = tokio::time::Instant::now();
        if !inner.reaper.swap(true, Ordering::SeqCst) {
            tokio::spawn(reap(Arc::downgrade(inner)));
        }
        Ok(index)
    }

    /// How long the last full read of the DLQ took (none held: `None`).
    pub async fn last_read_time(&self) -> Option<Duration> {
        self.inner.hold.lock().await.as_ref().map(|h| h.read_time)
    }

    /// Let go of the DLQ now: every letter held goes back in its place.
    /// Waits for running actions to end first.
    pub async fn release(&self) {
        while self.inner.busy.load(Ordering::SeqCst) > 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.inner.hold.lock().await.take();
    }

    /// One page of the letters `filter` selects.
    pub async fn list(
        &self,
        filter: &Filter,
        order: Order,
        offset: usize,
        limit: usize,
    ) -> Result<Page> {
        let index = self.index().await?;
        let ix = index.lock().expect("dlq index");
        let f = filter.prepared();
        let mut matching = 0usize;
        let mut letters = Vec::with_capacity(limit.min(1000));
        let mut visit = |l: &Arc<DeadLetter>| {
            if f.matches(l) {
                if matching >= offset && letters.len() < limit {
                    letters.push(l.clone());
                }
                matching += 1;
            }
        };
        match order {
            Order::NewestFirst => ix.letters().rev().for_each(&mut visit),
            Order::OldestFirst => ix.letters().for_each(&mut visit),
        }
        Ok(Page {
            letters,
            offset,
            matching,
            held: ix.live,
        })
    }

    /// The letters `filter` selects, grouped by failure (largest group first).
    pub async fn groups(&self, filter: &Filter) -> Result<Vec<Group>> {
        let index = self.index().await?;
        let ix = index.lock().expect("dlq index");
        let f = filter.prepared();
        let mut by: std::collections::HashMap<&str, Group> = Default::default();
        for l in ix.letters().filter(|l| f.matches(l)) {
            let g = by.entry(&l.group).or_insert_with(|| Group {
                key: l.group.clone(),
                example: l.reason.clone(),
                count: 0,
                origins: Default::default(),
                newest_ms: i64::MIN,
            });
            g.count += 1;
            let origin = l.origin_queue.clone().unwrap_or_else(|| "?".into());
            *g.origins.entry(origin).or_default() += 1;
            g.newest_ms = g.newest_ms.max(
                l.last_failure_ms
                    .unwrap_or(l.message.timestamp as i64 * 1000),
            );
        }
        let mut groups: Vec<Group> = by.into_values().collect();
        groups.sort_by(|a, b| b.count.cmp(&a.count).then(a.key.cmp(&b.key)));
        Ok(groups)
    }

    /// Every copy of message `id` in the DLQ (a fanned-out message that failed
    /// in several queues is there once per queue).
    pub async fn show(&self, id: &str) -> Result<Vec<Arc<DeadLetter>>> {
        let index = self.index().await?;
        let ix = index.lock().expect("dlq index");
        Ok(ix.letters().filter(|l| l.id == id).cloned().collect())
    }

    /// Re-publish the letters `filter` selects (at most `limit`) to `target`,
    /// each confirmed by the broker, and only then remove it from the DLQ. A
    /// letter whose copy was refused stays in the DLQ.
    pub async fn replay(
        &self,
        filter: &Filter,
        target: Target<'_>,
        limit: Option<usize>,
        progress: &Progress,
    ) -> Result<ReplayReport> {
        self.replay_after(filter, target, limit, None, progress)
            .await
    }

    /// [`replay`](Self::replay), each copy scheduled to arrive `delay` later
    /// (see [`Broker::publish_delayed`]); with `None`, at once. The delay is
    /// checked before any letter is taken. The target queues must have been
    /// declared through this broker handle (their bindings are copied onto the
    /// delay topology).
    pub async fn replay_after(
        &self,
        filter: &Filter,
        target: Target<'_>,
        limit: Option<usize>,
        delay: Option<Duration>,
        progress: &Progress,
    ) -> Result<ReplayReport> {
        if let Some(d) = delay {
            crate::topology::schedule::check_delay(d)?;
        }
        let _busy = self.busy();
        let index = self.index().await?;
        let taken = self.take(&index, filter, limit, progress);
        let broker = &self.inner.broker;
        let requeue = broker.names().requeue_exchange();
        let opts = PublishOptions {
            mandatory: true,
            ..PublishOptions::default()
        };
        let mut report = ReplayReport::default();
        // Per target queue: `None` once bound, else why it could not be.
        let mut bound_to: std::collections::HashMap<String, Option<Error>> = Default::default();
        let mut taken = taken.into_iter().peekable();
        while taken.peek().is_some() {
            // A lost hold means every letter still taken is on its way back to
            // the DLQ, and no ack can remove one: publishing more copies would
            // only make duplicates. Stop, and say so.
            let lost = index.lock().expect("dlq index").dead.clone();
            let why =
                lost.or_else(|| (report.duplicated > 0).then(|| "an ack was refused".to_string()));
            if let Some(why) = why {
                let rest = taken.by_ref().count();
                report.interrupted += rest;
                progress.failed.fetch_add(rest, Ordering::Relaxed);
                progress.done.fetch_add(rest, Ordering::Relaxed);
                note(
                    &mut report.errors,
                    format!("the reader lost its hold on the DLQ ({why}): {rest} letter(s) were not replayed and stay in the DLQ; run the replay again"),
                );
                break;
            }
            let chunk: Vec<(usize, Held)> = taken.by_ref().take(CHUNK).collect();
            // One batch per target queue (the routing key of the requeue exchange).
            let mut by_target: std::collections::BTreeMap<String, Vec<(usize, Held)>> =
                Default::default();
            for (slot, held) in chunk {
                let to = match target {
                    Target::Queue(q) => Some(q.to_string()),
                    Target::Origin => held.letter.origin_queue.clone(),
                };
                match to {
                    Some(q) => by_target.entry(q).or_default().push((slot, held)),
                    None => {
                        report.skipped += 1;
                        note(
                            &mut report.errors,
                            format!(
                                "{}: no origin queue recorded; replay it to a queue you name",
                                held.letter.id
                            ),
                        );
                        index.lock().expect("dlq index").put_back(slot, held);
                        progress.failed.fetch_add(1, Ordering::Relaxed);
                        progress.done.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            for (to, group) in by_target {
                let copies: Vec<Message> =
                    group.iter().map(|(_, h)| h.letter.replay_copy()).collect();
                // The requeue exchange sends what it routes nowhere to the DLQ
                // (its alternate exchange), so a mandatory publish cannot
                // tell that `to` is gone: bind it first (as every work queue
                // is bound, under its own name; idempotent), which fails when
                // there is no such queue.
                if !bound_to.contains_key(&to) {
                    let refused = bind_to_requeue(broker, &requeue, &to).await.err();
                    bound_to.insert(to.clone(), refused);
                }
                let results = match (&bound_to[&to], delay) {
                    (Some(e), _) => copies
                        .iter()
                        .map(|c| {
                            Err(match e {
                                Error::NotFound { .. } => Error::Unroutable {
                                    message_id: c.id.clone(),
                                    exchange: requeue.clone(),
                                    routing_key: to.clone(),
                                },
                                e => e.replicate(),
                            })
                        })
                        .collect(),
                    (None, None) => broker.publish_batch(&requeue, &to, &copies, &opts).await,
                    (None, Some(d)) => {
                        let each = copies
                            .into_iter()
                            .map(|c| broker.requeue_delayed(&to, c, d, &opts));
                        futures::future::join_all(each).await
                    }
                };
                for ((slot, held), res) in group.into_iter().zip(results) {
                    match res {
                        // Confirmed in its queue: now, and only now, it may leave the DLQ.
                        Ok(()) => match held.acker.ack().await {
                            Ok(()) => {
                                report.replayed += 1;
                                report.moved.push((held.letter.id.clone(), to.clone()));
                            }
                            Err(e) => {
                                report.duplicated += 1;
                                note(&mut report.errors, format!(
                                    "{} was replayed to {to} but could not be removed from the DLQ ({e}): it is in both",
                                    held.letter.id
                                ));
                            }
                        },
                        Err(e) => {
                            report.failed += 1;
                            progress.failed.fetch_add(1, Ordering::Relaxed);
                            let hint = if matches!(e, Error::Unroutable { .. }) {
                                format!("; '{to}' must be a work queue bound to {requeue} (declared with `helixmq topology apply`)")
                            } else {
                                String::new()
                            };
                            note(
                                &mut report.errors,
                                format!("replay to {to} failed: {e}{hint}"),
                            );
                            index.lock().expect("dlq index").put_back(slot, held);
                        }
                    }
                    progress.done.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        progress.finished.store(true, Ordering::Relaxed);
        Ok(report)
    }

    /// Remove the letters `filter` selects (at most `limit`) for good; how many.
    pub async fn delete(
        &self,
        filter: &Filter,
        limit: Option<usize>,
        progress: &Progress,
    ) -> Result<usize> {
        let _busy = self.busy();
        let index = self.index().await?;
        let taken = self.take(&index, filter, limit, progress);
        let mut deleted = 0;
        let mut first_error = None;
        let total = taken.len();
        for (slot, held) in taken {
            if first_error.is_some() {
                // The channel is gone: the rest go back to the DLQ by themselves.
                break;
            }
            match held.acker.ack().await {
                Ok(()) => deleted += 1,
                Err(e) => {
                    index.lock().expect("dlq index").put_back(slot, held);
                    first_error = Some(e);
                }
            }
            progress.done.fetch_add(1, Ordering::Relaxed);
        }
        let failed = total - deleted;
        progress.failed.fetch_add(failed, Ordering::Relaxed);
        progress.done.store(total, Ordering::Relaxed);
        progress.finished.store(true, Ordering::Relaxed);
        match first_error {
            Some(e) if deleted == 0 => Err(e),
            _ => Ok(deleted),
        }
    }

    /// Remove every letter: those held, and any that arrived unread.
    pub async fn purge(&self, progress: &Progress) -> Result<u64> {
        let deleted = self.delete(&Filter::all(), None, progress).await? as u64;
        let rest = self.inner.broker.backend().purge(&self.inner.queue).await?;
        Ok(deleted + rest)
    }

    fn busy(&self) -> Busy<'_> {
        self.inner.busy.fetch_add(1, Ordering::SeqCst);
        Busy(&self.inner.busy)
    }

    fn take(
        &self,
        index: &Mutex<Index>,
        filter: &Filter,
        limit: Option<usize>,
        progress: &Progress,
    ) -> Vec<(usize, Held)> {
        let f = filter.prepared();
        let taken = index
            .lock()
            .expect("dlq index")
            .take(limit.unwrap_or(usize::MAX), |l| f.matches(l));
        progress.total.store(taken.len(), Ordering::Relaxed);
        taken
    }
}

/// Remember an error for the report: the first few, each once.
fn note(errors: &mut Vec<String>, e: String) {
    if errors.len() < 5 && !errors.contains(&e) {
        errors.push(e);
    }
}

/// Let go of the hold after `idle_release` without a request, when no action runs.
async fn reap(inner: Weak<Inner>) {
    loop {
        let Some(inner) = inner.upgrade() else { return };
        let idle = inner.opts.idle_release;
        // Checked under the hold's lock: an action marks itself busy before it
        // takes that lock, so it either sees no hold and reads anew, or keeps it.
        if let Ok(mut hold) = inner.hold.try_lock() {
            let last = *inner.last_used.lock().expect("dlq clock");
            if last.elapsed() >= idle
                && inner.busy.load(Ordering::SeqCst) == 0
                && hold.take().is_some()
            {
                tracing::debug!(queue = %inner.queue, "DLQ let go after {idle:?} idle");
            }
        }
        drop(inner);
        tokio::time::sleep((idle / 4).max(Duration::from_millis(100))).await;
    }
}

/// Bind `queue` to the requeue exchange under its own name, as
/// [`Topology::add_work_queue`](crate::Topology::add_work_queue) binds every
/// work queue; [`Error::NotFound`] when there is no such queue. Straight on the
/// backend: a replay target is not part of the topology this handle redeclares
/// on every reconnect.
async fn bind_to_requeue(broker: &Broker, requeue: &str, queue: &str) -> Result<()> {
    let binding = crate::topology::Binding {
        exchange: requeue.to_string(),
        queue: queue.to_string(),
        routing_key: queue.to_string(),
    };
    let t = crate::Topology {
        names: broker.names().clone(),
        exchanges: Vec::new(),
        queues: Vec::new(),
        bindings: vec![binding],
    };
    broker.backend().declare(&t).await
}
