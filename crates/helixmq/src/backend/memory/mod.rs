//! The embedded in-process broker: a real [`Backend`] with the AMQP semantics
//! helixmq relies on, for demos, doc examples, tests and single-process use.
//!
//! - Routing: direct, topic (`*`, `#`) and fanout exchanges; the default
//!   exchange `""` routes to the queue named by the routing key.
//! - Queues: priorities (`x-max-priority`, FIFO within a priority), queue and
//!   per-message TTL, `x-max-length` with `drop-head` or `reject-publish`,
//!   dead-lettering with RabbitMQ's `x-death` headers, `x-expires` (a queue
//!   unused that long — no consumer, `basic.get` or redeclare — is deleted).
//! - Consumers: manual ack, nack with or without requeue, prefetch windows,
//!   round-robin, unsettled deliveries requeued (redelivered) when a stream is dropped.
//!
//! Layout: `state` holds everything behind one mutex (exchanges in
//! `exchange`, queues in `queue`); `consumer` is the stream and ackers;
//! [`dead_letter`] writes the headers. Messages travel as [`Message`] values —
//! nothing is encoded, and the payload (`Bytes`) is never copied.
//!
//! Memory is bounded by the queues' max lengths and the consumers' prefetch;
//! there is no channel at all. One timer task, owned by the broker and stopped
//! on [`Backend::close`] or drop, wakes at the earliest expiry; expired heads
//! are also dropped lazily when met. A broker made outside a Tokio runtime
//! starts its timer with its first operation inside one.
//!
//! [`Message`]: crate::message::Message

mod consumer;
pub mod dead_letter;
mod exchange;
mod queue;
mod state;

use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;

use crate::backend::{
    Backend, BackendKind, ConnectionState, Delivery, DeliveryStream, Outgoing, QueueStats,
};
use crate::error::{Error, Result};
use crate::topology::Topology;
use consumer::{MemoryAcker, MemoryStream};
use queue::{Effects, Holder};
use state::State;

/// What the broker's handles (streams, ackers, the timer) share.
pub(crate) struct Shared {
    state: Mutex<State>,
    /// Wakes the expiry timer when a message expiring sooner than planned appears.
    timer: Arc<Notify>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic under the lock is a bug; the state is still consistent enough
        // to keep serving (every mutation is a few plain assignments).
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Run one operation under the lock, apply its effects (dead letters) and
    /// wake the timer if it must run earlier.
    fn with<R>(&self, f: impl FnOnce(&mut State, &mut Effects) -> R) -> R {
        let (r, wake) = {
            let mut st = self.lock();
            let mut fx = Effects::default();
            let r = f(&mut st, &mut fx);
            let wake = st.finish(fx);
            (r, wake)
        };
        if wake {
            self.timer.notify_one();
        }
        r
    }
}

/// The embedded broker.
pub struct MemoryBroker {
    shared: Arc<Shared>,
    state: watch::Sender<ConnectionState>,
    /// Stops the expiry timer.
    stop: CancellationToken,
    /// Whether the expiry timer was started (it needs a Tokio runtime).
    timer_started: std::sync::atomic::AtomicBool,
    next_consumer: std::sync::atomic::AtomicU64,
}

impl Default for MemoryBroker {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for MemoryBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryBroker")
            .field("closed", &self.shared.lock().closed)
            .finish()
    }
}

impl MemoryBroker {
    /// A new, empty broker. Inside a Tokio runtime it starts its expiry timer;
    /// outside one, the timer starts with the first operation made inside a
    /// runtime (until then TTLs are enforced lazily, when a queue is read).
    pub fn new() -> Self {
        let broker = MemoryBroker {
            shared: Arc::new(Shared {
                state: Mutex::new(State::default()),
                timer: Arc::new(Notify::new()),
            }),
            state: watch::channel(ConnectionState::Connected).0,
            stop: CancellationToken::new(),
            timer_started: std::sync::atomic::AtomicBool::new(false),
            next_consumer: std::sync::atomic::AtomicU64::new(1),
        };
        broker.start_timer();
        broker
    }

    /// Start the expiry timer once, if a Tokio runtime is at hand.
    fn start_timer(&self) {
        use std::sync::atomic::Ordering;
        if self.timer_started.load(Ordering::Relaxed) {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if self.timer_started.swap(true, Ordering::AcqRel) {
            return;
        }
        rt.spawn(expiry_timer(
            Arc::downgrade(&self.shared),
            self.shared.timer.clone(),
            self.stop.clone(),
        ));
    }

    fn open<R>(&self, f: impl FnOnce(&mut State, &mut Effects) -> Result<R>) -> Result<R> {
        self.start_timer();
        self.shared.with(|st, fx| {
            if st.closed {
                Err(Error::Closed)
            } else {
                f(st, fx)
            }
        })
    }
}

impl Drop for MemoryBroker {
    /// Dropping the broker is closing it: streams still held end (`None`)
    /// instead of waiting for messages nobody can publish any more.
    fn drop(&mut self) {
        self.shared.with(|st, _| st.close());
        self.stop.cancel();
    }
}

/// The expiry timer: dead-letters expired heads, then sleeps until the next
/// expiry or until told one is sooner. It holds the state weakly, so it ends
/// with the broker even if `close` was never called.
async fn expiry_timer(shared: Weak<Shared>, wake: Arc<Notify>, stop: CancellationToken) {
    loop {
        let next = match shared.upgrade() {
            Some(s) => s.with(|st, fx| st.expire(fx)),
            None => return,
        };
        let sleep = async {
            match next {
                Some(at) => tokio::time::sleep_until(at.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = wake.notified() => {}
            _ = sleep => {}
        }
    }
}

#[async_trait]
impl Backend for MemoryBroker {
    fn kind(&self) -> BackendKind {
        BackendKind::Memory
    }

    async fn declare(&self, t: &Topology) -> Result<()> {
        self.open(|st, fx| st.declare(t, fx))
    }

    async fn publish(&self, out: Outgoing<'_>, _timeout: Duration) -> Result<()> {
        // Accepted under the lock means confirmed: there is nothing to wait for.
        self.open(|st, fx| {
            st.publish_cow(
                out.exchange,
                out.routing_key,
                out.mandatory,
                out.message,
                fx,
            )
        })
    }

    async fn publish_batch(&self, outs: &[Outgoing<'_>], _timeout: Duration) -> Vec<Result<()>> {
        self.start_timer();
        self.shared.with(|st, fx| {
            outs.iter()
                .map(|o| {
                    if st.closed {
                        return Err(Error::Closed);
                    }
                    st.publish(o.exchange, o.routing_key, o.mandatory, &o.message, fx)
                })
                .collect()
        })
    }

    async fn consume(
        &self,
        queue: &str,
        prefetch: u16,
        _consumer_tag: &str,
    ) -> Result<Box<dyn DeliveryStream>> {
        let id = self
            .next_consumer
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let notify = Arc::new(Notify::new());
        let (name, uid) = self.open(|st, fx| {
            let q = st.queue(queue)?;
            q.add_consumer(id, prefetch, notify.clone(), fx);
            Ok((q.name.clone(), q.uid))
        })?;
        Ok(Box::new(MemoryStream {
            shared: self.shared.clone(),
            queue: name,
            uid,
            id,
            notify,
            done: false,
        }))
    }

    async fn get(&self, queue: &str) -> Result<Option<Delivery>> {
        let got = self.open(|st, fx| {
            let q = st.queue(queue)?;
            Ok(q.get(fx).map(|(s, tag)| (s, tag, q.name.clone(), q.uid)))
        })?;
        Ok(got.map(|(s, tag, name, uid)| Delivery {
            message: s.msg,
            exchange: s.exchange.to_string(),
            routing_key: s.routing_key.to_string(),
            queue: name.to_string(),
            redelivered: s.redelivered,
            acker: Box::new(MemoryAcker {
                shared: self.shared.clone(),
                queue: name,
                uid,
                holder: Holder::Get,
                tag,
                settled: Default::default(),
            }),
        }))
    }

    async fn queue_stats(&self, queue: &str) -> Result<QueueStats> {
        self.open(|st, _| {
            let q = st.queue(queue)?;
            Ok(QueueStats {
                messages: q.ready() as u64,
                consumers: q.active_consumers() as u32,
            })
        })
    }

    async fn purge(&self, queue: &str) -> Result<u64> {
        self.open(|st, _| Ok(st.queue(queue)?.purge() as u64))
    }

    async fn delete_queue(&self, queue: &str) -> Result<()> {
        self.open(|st, _| {
            st.delete_queue(queue);
            Ok(())
        })
    }

    async fn delete_exchange(&self, exchange: &str) -> Result<()> {
        self.open(|st, _| {
            st.delete_exchange(exchange);
            Ok(())
        })
    }

    fn state(&self) -> watch::Receiver<ConnectionState> {
        self.state.subscribe()
    }

    async fn close(&self) -> Result<()> {
        self.shared.with(|st, _| st.close());
        self.stop.cancel();
        self.state.send_replace(ConnectionState::Closed);
        Ok(())
    }
}

#[cfg(test)]
mod tests;
