//! Consumers of the embedded broker: the delivery stream and the ackers.
//!
//! The broker pushes deliveries into a consumer's window (at most `prefetch`
//! unsettled) under its lock; the stream takes them from there and sleeps on
//! a `Notify` when the window is empty. Dropping the stream is closing the
//! channel: every unsettled delivery goes back to the queue, redelivered.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use tokio::sync::Notify;

use super::queue::{Holder, Settle, Take};
use super::Shared;
use crate::backend::{Acker, Delivery, DeliveryStream};
use crate::error::{Error, Result};

/// A consumer's stream of deliveries.
pub(super) struct MemoryStream {
    pub shared: Arc<Shared>,
    pub queue: Arc<str>,
    /// The queue instance consumed: a re-declared queue of the same name is another one.
    pub uid: u64,
    pub id: u64,
    pub notify: Arc<Notify>,
    /// Ended (cancelled, queue deleted or broker closed): `next` answers `None`.
    pub done: bool,
}

// A transient return value: boxing the delivery would cost an allocation each.
#[allow(clippy::large_enum_variant)]
enum Step {
    Got(Delivery),
    Wait,
    End(Option<Error>),
}

#[async_trait]
impl DeliveryStream for MemoryStream {
    async fn next(&mut self) -> Option<Result<Delivery>> {
        loop {
            if self.done {
                return None;
            }
            let step = self.shared.with(|st, _| {
                if st.closed {
                    return Step::End(None);
                }
                let Some(q) = st.queue_uid(&self.queue, self.uid) else {
                    return Step::End(Some(Error::ConsumerCancelled {
                        queue: self.queue.to_string(),
                    }));
                };
                match q.take(self.id) {
                    Some(Take::Delivery {
                        msg,
                        exchange,
                        routing_key,
                        redelivered,
                        tag,
                    }) => Step::Got(Delivery {
                        message: msg,
                        exchange: exchange.to_string(),
                        routing_key: routing_key.to_string(),
                        queue: self.queue.to_string(),
                        redelivered,
                        acker: Box::new(MemoryAcker {
                            shared: self.shared.clone(),
                            queue: self.queue.clone(),
                            uid: self.uid,
                            holder: Holder::Consumer(self.id),
                            tag,
                            settled: AtomicBool::new(false),
                        }),
                    }),
                    Some(Take::Empty) => Step::Wait,
                    Some(Take::Cancelled) | None => Step::End(None),
                }
            });
            match step {
                Step::Got(d) => return Some(Ok(d)),
                // A wake-up between the look and this wait is kept as a permit.
                Step::Wait => self.notify.notified().await,
                Step::End(e) => {
                    self.done = true;
                    return e.map(Err);
                }
            }
        }
    }

    async fn cancel(&mut self) -> Result<()> {
        self.done = true;
        let (queue, uid, id) = (self.queue.clone(), self.uid, self.id);
        self.shared.with(|st, fx| {
            if let Some(q) = st.queue_uid(&queue, uid) {
                q.cancel_consumer(id, fx);
            }
        });
        Ok(())
    }
}

impl Drop for MemoryStream {
    fn drop(&mut self) {
        let (queue, uid, id) = (self.queue.clone(), self.uid, self.id);
        self.shared.with(|st, fx| {
            if let Some(q) = st.queue_uid(&queue, uid) {
                q.remove_consumer(id, fx);
            }
        });
    }
}

/// Settles one delivery. A `basic.get` delivery dropped unsettled goes back to
/// its queue (as its channel closing would do in AMQP).
pub(super) struct MemoryAcker {
    pub shared: Arc<Shared>,
    pub queue: Arc<str>,
    pub uid: u64,
    pub holder: Holder,
    pub tag: u64,
    pub settled: AtomicBool,
}

impl MemoryAcker {
    fn settle(&self, how: Settle) -> Result<()> {
        if self.settled.swap(true, Ordering::AcqRel) {
            return Err(Error::InvalidMessage(format!(
                "delivery {} from queue '{}' was already settled",
                self.tag, self.queue
            )));
        }
        let known = self.shared.with(|st, fx| {
            st.queue_uid(&self.queue, self.uid)
                .map(|q| q.settle(self.holder, self.tag, how, fx))
        });
        match known {
            Some(true) => Ok(()),
            // Its consumer went away first: the delivery is already back in the queue.
            Some(false) => Err(Error::Closed),
            None => Err(Error::NotFound {
                kind: "queue",
                name: self.queue.to_string(),
            }),
        }
    }
}

#[async_trait]
impl Acker for MemoryAcker {
    async fn ack(&self) -> Result<()> {
        self.settle(Settle::Ack)
    }
    async fn nack(&self, requeue: bool) -> Result<()> {
        self.settle(if requeue {
            Settle::Requeue
        } else {
            Settle::Reject
        })
    }
}

impl Drop for MemoryAcker {
    fn drop(&mut self) {
        if self.holder == Holder::Get && !self.settled.load(Ordering::Acquire) {
            let _ = self.settle(Settle::Requeue);
        }
    }
}
