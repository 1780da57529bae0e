//! Confirmed publishing over a small pool of confirm-mode channels.
//!
//! Each publish takes the next channel of the pool (round robin), sends, and
//! awaits *its own* lapin `PublisherConfirm`: ack → Ok, nack →
//! [`Error::PublishNacked`], returned → [`Error::Unroutable`]. Several channels
//! keep concurrent publishers from queueing behind one channel's flow, and each
//! channel has confirm mode enabled once, when it is opened.
//!
//! Loss handling: if the channel or connection dies before the confirm
//! arrives, the publish is sent again (same message id) on a fresh channel of
//! the next connection, until `timeout`. It returns Ok only after an ack, so a
//! confirmed message may exist twice on the broker, never zero times.

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::ShortString;
use lapin::{BasicProperties, Confirmation};
use tokio::time::{timeout_at, Instant};

use super::connection::{LinkState, Shared};
use super::errors::{self, code};
use crate::backend::Outgoing;
use crate::error::{Error, Result};
use crate::message::amqp::{encoded_properties_len, short, to_properties};

/// Publisher channels per connection. Two cores serve this machine; four
/// channels keep both busy without wasting broker processes.
pub(crate) const POOL_SIZE: usize = 4;

/// RabbitMQ's default `frame_max`, assumed while no connection says otherwise.
const DEFAULT_FRAME_MAX: usize = 131_072;

/// One confirm-mode channel and the connection generation it belongs to.
#[derive(Clone)]
struct PubChannel {
    chan: lapin::Channel,
    generation: u64,
}

/// The pool.
pub(crate) struct Publisher {
    shared: Arc<Shared>,
    /// Slot i holds channel i; a dead or stale one is replaced on next use.
    slots: Vec<tokio::sync::Mutex<Option<PubChannel>>>,
    next: AtomicUsize,
    /// Message ids lapin handed to the wrong publish: lapin attaches a
    /// basic.return to whichever confirm completes next, which under multiple
    /// acks may be another publish of the same channel. Bounded (cleared past
    /// 10,000 entries; only unroutable messages land here).
    misrouted_returns: Mutex<HashSet<String>>,
}

/// A publish ready to send: everything encoded once, reused on every resend.
struct Prepared<'a> {
    out: &'a Outgoing<'a>,
    exchange: ShortString,
    routing_key: ShortString,
    properties: BasicProperties,
}

/// What one attempt achieved.
enum Attempt {
    Done(Result<()>),
    /// The channel or connection went away: send again.
    Resend,
}

impl Publisher {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        Publisher {
            shared,
            slots: (0..POOL_SIZE)
                .map(|_| tokio::sync::Mutex::new(None))
                .collect(),
            next: AtomicUsize::new(0),
            misrouted_returns: Mutex::new(HashSet::new()),
        }
    }

    /// A live confirm-mode channel for slot `i`, opening one if needed. Waits
    /// for a connection while disconnected (the caller bounds the wait).
    async fn channel(&self, i: usize) -> Result<PubChannel> {
        loop {
            let link = self.shared.live().await?;
            let mut slot = self.slots[i].lock().await;
            if let Some(c) = slot.as_ref() {
                if c.generation == link.generation && c.chan.status().connected() {
                    return Ok(c.clone());
                }
            }
            *slot = None;
            let opened = async {
                let chan = link.conn.create_channel().await?;
                chan.confirm_select(ConfirmSelectOptions::default()).await?;
                Ok::<_, lapin::Error>(chan)
            }
            .await;
            match opened {
                Ok(chan) => {
                    let c = PubChannel {
                        chan,
                        generation: link.generation,
                    };
                    *slot = Some(c.clone());
                    return Ok(c);
                }
                Err(e) if errors::is_transient(&e) => {
                    drop(slot);
                    self.shared.report_failure();
                    pause().await;
                }
                Err(e) => {
                    return Err(Error::Amqp {
                        context: "open a publisher channel".into(),
                        source: errors::boxed(e),
                    })
                }
            }
        }
    }

    fn prepare<'a>(&self, out: &'a Outgoing<'a>) -> Result<Prepared<'a>> {
        let properties = to_properties(&out.message)?;
        // The content header frame: 8 bytes of framing, 12 of class, weight and
        // body size, then the properties. Too big, and RabbitMQ closes the whole
        // connection (frame_too_large) on every resend.
        let len = encoded_properties_len(&properties) + 20;
        let frame_max = match &*self.shared.link.borrow() {
            LinkState::Up(l) => l.conn.configuration().frame_max() as usize,
            _ => DEFAULT_FRAME_MAX,
        };
        if len > frame_max {
            return Err(Error::InvalidMessage(format!(
                "message {}: its properties and headers take {len} bytes, more than the {frame_max}-byte AMQP frame (frame_max) that must carry them whole; move large values into the payload",
                out.message.id
            )));
        }
        Ok(Prepared {
            out,
            exchange: short("exchange name", out.exchange)?,
            routing_key: short("routing key", out.routing_key)?,
            properties,
        })
    }

    /// Publish one message and await its confirm, resending across channel and
    /// connection losses until `timeout`.
    pub(crate) async fn publish(&self, out: &Outgoing<'_>, timeout: Duration) -> Result<()> {
        let p = self.prepare(out)?;
        let deadline = Instant::now() + timeout;
        self.publish_prepared(&p, deadline, timeout).await
    }

    async fn publish_prepared(
        &self,
        p: &Prepared<'_>,
        deadline: Instant,
        timeout: Duration,
    ) -> Result<()> {
        let timed_out = || Error::PublishTimeout {
            message_id: p.out.message.id.clone(),
            timeout,
        };
        loop {
            let i = self.next.fetch_add(1, Ordering::Relaxed) % self.slots.len();
            let pc = match timeout_at(deadline, self.channel(i)).await {
                Err(_) => return Err(timed_out()),
                Ok(r) => r?,
            };
            let confirm = match self.send(&pc, p).await {
                Ok(c) => c,
                Err(a) => match a {
                    Attempt::Done(r) => return r,
                    Attempt::Resend => {
                        pause().await;
                        continue;
                    }
                },
            };
            match timeout_at(deadline, confirm).await {
                Err(_) => return Err(timed_out()),
                Ok(res) => match self.settle(&pc, p, res).await {
                    Attempt::Done(r) => return r,
                    Attempt::Resend => {
                        if Instant::now() >= deadline {
                            return Err(timed_out());
                        }
                        pause().await;
                    }
                },
            }
        }
    }

    async fn send(
        &self,
        pc: &PubChannel,
        p: &Prepared<'_>,
    ) -> std::result::Result<lapin::PublisherConfirm, Attempt> {
        let opts = BasicPublishOptions {
            mandatory: p.out.mandatory,
            immediate: false,
        };
        pc.chan
            .basic_publish(
                p.exchange.clone(),
                p.routing_key.clone(),
                opts,
                &p.out.message.payload,
                p.properties.clone(),
            )
            .await
            .map_err(|e| self.failed(pc, p, e))
    }

    /// Classify a failed send/confirm: the broker refusing *this* message is
    /// final; anything else (channel or connection gone) means send again.
    fn failed(&self, pc: &PubChannel, p: &Prepared<'_>, e: lapin::Error) -> Attempt {
        if let Some((c, text)) = errors::amqp_reply(&e) {
            let about_us = |needle: &str| text.contains(&format!("'{needle}'"));
            // RabbitMQ names the default exchange "" 'amq.default' in its replies.
            let exchange = match p.out.exchange {
                "" => "amq.default",
                x => x,
            };
            let user = &self.shared.cfg.username;
            match c {
                code::NOT_FOUND if about_us(exchange) => {
                    return Attempt::Done(Err(Error::NotFound {
                        kind: "exchange",
                        name: p.out.exchange.to_string(),
                    }))
                }
                code::ACCESS_REFUSED if about_us(exchange) => {
                    return Attempt::Done(Err(Error::AccessRefused {
                        user: Some(user.clone()),
                        detail: format!("publish to exchange '{}': {text}", p.out.exchange),
                    }))
                }
                // "message size N is larger than configured max size M". Match the whole
                // phrase with our size: the same channel-close error also fails the
                // publishes sent after the big one on that channel, which must be resent.
                code::PRECONDITION_FAILED
                    if text.contains(&format!(
                        "message size {} is larger",
                        p.out.message.payload.len()
                    )) =>
                {
                    return Attempt::Done(Err(Error::InvalidMessage(format!(
                        "message {} refused by the broker: {}",
                        p.out.message.id,
                        errors::precondition_detail(&text)
                    ))))
                }
                _ => {}
            }
        } else if !errors::is_transient(&e) {
            return Attempt::Done(Err(Error::Amqp {
                context: format!("publish message {}", p.out.message.id),
                source: errors::boxed(e),
            }));
        }
        // Someone's publish killed the channel, or the connection went: resend.
        tracing::debug!(message_id = %p.out.message.id, generation = pc.generation, error = %e, "publish interrupted; sending again");
        self.shared.report_failure();
        Attempt::Resend
    }

    async fn settle(
        &self,
        pc: &PubChannel,
        p: &Prepared<'_>,
        res: lapin::Result<Confirmation>,
    ) -> Attempt {
        let id = &p.out.message.id;
        let unroutable = || {
            Attempt::Done(Err(Error::Unroutable {
                message_id: id.clone(),
                exchange: p.out.exchange.to_string(),
                routing_key: p.out.routing_key.to_string(),
            }))
        };
        let confirmation = match res {
            Ok(c) => c,
            Err(e) => return self.failed(pc, p, e),
        };
        let nacked = confirmation.is_nack();
        if let Some(returned) = confirmation.take_message() {
            let theirs = returned
                .delivery
                .properties
                .message_id()
                .as_ref()
                .map(|s| s.as_str().to_string());
            if theirs.as_deref() == Some(id.as_str()) {
                return unroutable();
            }
            // Someone else's return, handed to us: file it for its owner.
            if let Some(other) = theirs {
                let mut set = self.misrouted_returns.lock().unwrap();
                if set.len() > 10_000 {
                    set.clear();
                }
                set.insert(other);
            }
        }
        if nacked {
            return Attempt::Done(Err(Error::PublishNacked {
                message_id: id.clone(),
                exchange: p.out.exchange.to_string(),
                routing_key: p.out.routing_key.to_string(),
            }));
        }
        self.check_misrouted(p, unroutable).await
    }

    /// Our own return may have been attached to a sibling confirm resolved in
    /// the same multiple-ack (lapin resolves them in hash order); that sibling
    /// files it here when it runs. Only mandatory publishes can be returned;
    /// they let the siblings woken with them run first. Best effort: a sibling
    /// that runs later than two yields is not waited for.
    async fn check_misrouted(&self, p: &Prepared<'_>, unroutable: impl Fn() -> Attempt) -> Attempt {
        if p.out.mandatory {
            for _ in 0..2 {
                if self
                    .misrouted_returns
                    .lock()
                    .unwrap()
                    .remove(&p.out.message.id)
                {
                    return unroutable();
                }
                tokio::task::yield_now().await;
            }
            if self
                .misrouted_returns
                .lock()
                .unwrap()
                .remove(&p.out.message.id)
            {
                return unroutable();
            }
        }
        Attempt::Done(Ok(()))
    }

    /// Publish many: all sent on one channel first (in order), then every
    /// confirm awaited. Failures that mean "send again" fall back to
    /// [`Publisher::publish`] one by one within the same deadline.
    pub(crate) async fn publish_batch(
        &self,
        outs: &[Outgoing<'_>],
        timeout: Duration,
    ) -> Vec<Result<()>> {
        let deadline = Instant::now() + timeout;
        let timed_out = |o: &Outgoing<'_>| Error::PublishTimeout {
            message_id: o.message.id.clone(),
            timeout,
        };
        let prepared: Vec<Result<Prepared<'_>>> = outs.iter().map(|o| self.prepare(o)).collect();
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.slots.len();
        let pc = match timeout_at(deadline, self.channel(i)).await {
            Ok(Ok(pc)) => Some(pc),
            Ok(Err(e)) => {
                let msg = e.to_string();
                return outs
                    .iter()
                    .map(|_| {
                        Err(Error::Amqp {
                            context: "publish batch".into(),
                            source: msg.clone().into(),
                        })
                    })
                    .collect();
            }
            Err(_) => return outs.iter().map(|o| Err(timed_out(o))).collect(),
        };
        let pc = pc.expect("set");
        // Phase 1: send everything, keeping each confirm future.
        let mut pending = Vec::with_capacity(prepared.len());
        for p in &prepared {
            match p {
                Err(_) => pending.push(None),
                Ok(p) => pending.push(Some(self.send(&pc, p).await)),
            }
        }
        // Phase 2: await the confirms in order (they arrive about in order anyway).
        let mut results = Vec::with_capacity(prepared.len());
        for (p, sent) in prepared.into_iter().zip(pending) {
            let p = match p {
                Err(e) => {
                    results.push(Err(e));
                    continue;
                }
                Ok(p) => p,
            };
            let attempt = match sent.expect("sent when prepared") {
                Err(a) => a,
                Ok(confirm) => match timeout_at(deadline, confirm).await {
                    Err(_) => Attempt::Done(Err(timed_out(p.out))),
                    Ok(res) => self.settle(&pc, &p, res).await,
                },
            };
            results.push(match attempt {
                Attempt::Done(r) => r,
                Attempt::Resend => self.publish_prepared(&p, deadline, timeout).await,
            });
        }
        results
    }

    /// Wait (up to `timeout`) until every channel has no confirm outstanding.
    pub(crate) async fn drain(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        for slot in &self.slots {
            let c = slot.lock().await.clone();
            if let Some(c) = c {
                if c.chan.status().connected() {
                    let _ = timeout_at(deadline, c.chan.wait_for_confirms()).await;
                }
            }
        }
    }
}

/// A short, jittered pause between attempts that failed for a transient reason
/// before the manager noticed: keeps a dying connection from becoming a hot loop.
pub(crate) async fn pause() {
    let ms = rand::Rng::random_range(&mut rand::rng(), 20..60);
    tokio::time::sleep(Duration::from_millis(ms)).await;
}
