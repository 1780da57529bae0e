//! The hold: every dead letter consumed and kept unacked, indexed in memory.
//!
//! RabbitMQ cannot browse a queue in place. A reader that wants to see the
//! 90,000th letter, filter 100,000 by reason or delete the fifth of ten must
//! receive them all; it then keeps them **unacked** (nothing leaves the queue
//! until an action acks it), and when it lets go, closing its channel puts
//! every one back in its place. See the module docs of [`super`] for the
//! trade-offs.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::letter::DeadLetter;
use super::ReadOptions;
use crate::backend::{Acker, Delivery, DeliveryStream};
use crate::error::{Error, Result};
use crate::Broker;

/// After the ready count was read, the read ends when nothing arrived for this long.
const SETTLED: Duration = Duration::from_millis(250);

/// A letter held unacked, with what settles it.
pub(crate) struct Held {
    pub(crate) letter: Arc<DeadLetter>,
    pub(crate) acker: Box<dyn Acker>,
}

impl Held {
    fn new(d: Delivery) -> Held {
        Held {
            letter: Arc::new(DeadLetter::from_message(d.message, d.redelivered)),
            acker: d.acker,
        }
    }
}

/// Everything held, in the order the queue delivered it (oldest first).
#[derive(Default)]
pub(crate) struct Index {
    /// `None`: settled, or taken by an action that is running.
    pub(crate) slots: Vec<Option<Held>>,
    /// How many slots are `Some`.
    pub(crate) live: usize,
    /// Why the hold ended (its channel or connection went): read again.
    pub(crate) dead: Option<String>,
}

impl Index {
    fn push(&mut self, held: Held) {
        self.slots.push(Some(held));
        self.live += 1;
    }

    /// Take the letters `select` picks (at most `limit`) out of their slots.
    pub(crate) fn take(
        &mut self,
        limit: usize,
        mut select: impl FnMut(&DeadLetter) -> bool,
    ) -> Vec<(usize, Held)> {
        let mut out = Vec::new();
        for (i, slot) in self.slots.iter_mut().enumerate() {
            if out.len() >= limit {
                break;
            }
            if slot.as_ref().is_some_and(|h| select(&h.letter)) {
                out.push((i, slot.take().expect("checked")));
            }
        }
        self.live -= out.len();
        out
    }

    /// Put back what an action could not place.
    pub(crate) fn put_back(&mut self, slot: usize, held: Held) {
        debug_assert!(self.slots[slot].is_none());
        self.slots[slot] = Some(held);
        self.live += 1;
    }

    /// The letters held, oldest first.
    pub(crate) fn letters(&self) -> impl DoubleEndedIterator<Item = &Arc<DeadLetter>> {
        self.slots.iter().flatten().map(|h| &h.letter)
    }
}

/// One reader's hold on the DLQ: the consumer that keeps receiving (new dead
/// letters appear as they arrive) and the index it fills.
pub(crate) struct Hold {
    pub(crate) index: Arc<Mutex<Index>>,
    pub(crate) acquired: Instant,
    /// How long the first read took, and how many it read.
    pub(crate) read_time: Duration,
    receiver: JoinHandle<()>,
}

impl Drop for Hold {
    fn drop(&mut self) {
        // Dropping the receiver's stream closes its channel: RabbitMQ requeues
        // every letter still unacked, in its place.
        self.receiver.abort();
    }
}

impl Hold {
    /// Receive every ready letter of `queue`, then keep receiving in the background.
    pub(crate) async fn acquire(broker: &Broker, queue: &str, opts: &ReadOptions) -> Result<Hold> {
        let started = Instant::now();
        let backend = broker.backend().clone();
        let stats = wait_for_no_other_reader(broker, queue, opts).await?;
        // Watched from before the consume: a reconnect during the read (which
        // would redeliver what we hold) makes the hold dead at once.
        let mut state = broker.state();
        state.mark_unchanged();
        let tag = format!("helixmq-dlq-reader-{}", uuid::Uuid::now_v7().simple());
        // Prefetch 0: no limit, so the reader can hold the whole DLQ (at most its
        // max length, 100,000 in the spec's topology).
        let mut stream = backend.consume(queue, 0, &tag).await?;
        let index = Arc::new(Mutex::new(Index::default()));
        let mut got = 0u64;
        let mut batch = Vec::with_capacity(1024);
        loop {
            // Once the ready count is reached, a short quiet ends the read; before,
            // `read_quiet` (another consumer took some, or the count was stale).
            // Letters a reader that just let go is still handing back arrive
            // meanwhile, so they are read too.
            let quiet = if got >= stats.messages {
                SETTLED
            } else {
                opts.read_quiet
            };
            match tokio::time::timeout(quiet, stream.next()).await {
                Ok(Some(Ok(d))) => {
                    got += 1;
                    batch.push(Held::new(d));
                    if batch.len() == batch.capacity() {
                        let mut ix = index.lock().expect("dlq index");
                        batch.drain(..).for_each(|h| ix.push(h));
                    }
                }
                Ok(Some(Err(e))) => return Err(e),
                Ok(None) | Err(_) => break,
            }
        }
        {
            let mut ix = index.lock().expect("dlq index");
            batch.drain(..).for_each(|h| ix.push(h));
        }
        let read_time = started.elapsed();
        tracing::debug!(queue, letters = got, ?read_time, "DLQ read");
        let receiver = tokio::spawn(receive(stream, state, index.clone()));
        Ok(Hold {
            index,
            acquired: Instant::now(),
            read_time,
            receiver,
        })
    }
}

/// Wait until nothing else consumes the DLQ (another console or `dlq` command
/// holding it); the ready count when it is free.
async fn wait_for_no_other_reader(
    broker: &Broker,
    queue: &str,
    opts: &ReadOptions,
) -> Result<crate::backend::QueueStats> {
    let deadline = Instant::now() + opts.wait_for_other;
    loop {
        let s = broker.backend().queue_stats(queue).await?;
        if s.consumers == 0 {
            return Ok(s);
        }
        if Instant::now() >= deadline {
            return Err(Error::InUse {
                what: format!("the DLQ '{queue}'"),
                detail: format!(
                    "{} other reader(s) hold it (a `helixmq console` or `helixmq dlq` command); \
                     a console lets go {} s after its last DLQ page — wait for it, or stop the other reader",
                    s.consumers,
                    opts.idle_release.as_secs()
                ),
            });
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Keep adding new dead letters to the index; on any change of the connection
/// state, or the end of the stream, mark the hold dead (delivery tags of a lost
/// channel are void, and the broker redelivers those letters to whoever reads next).
async fn receive(
    mut stream: Box<dyn DeliveryStream>,
    mut state: tokio::sync::watch::Receiver<crate::ConnectionState>,
    index: Arc<Mutex<Index>>,
) {
    use crate::ConnectionState::{Blocked, Connected};
    let mut seen = *state.borrow();
    let why = loop {
        tokio::select! {
            d = stream.next() => match d {
                Some(Ok(d)) => index.lock().expect("dlq index").push(Held::new(d)),
                Some(Err(e)) => break format!("the DLQ consumer ended: {e}"),
                None => break "the DLQ consumer was cancelled".to_string(),
            },
            _ = state.changed() => {
                // A memory or disk alarm blocks publishing, not this channel;
                // anything else (a loss, even one already recovered from:
                // Connected seen again) voids the delivery tags held.
                let now = *state.borrow_and_update();
                match (seen, now) {
                    (Connected, Blocked) | (Blocked, Connected) => seen = now,
                    _ => break format!("the connection to the broker went {seen:?} -> {now:?}"),
                }
            }
        }
    };
    tracing::debug!(reason = %why, "DLQ hold ended");
    index.lock().expect("dlq index").dead = Some(why);
}
