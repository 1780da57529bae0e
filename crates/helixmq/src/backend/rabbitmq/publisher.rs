//! Confirmed publishing over a small pool of confirm-mode channels.
//!
//! Each publish takes the next channel of the pool (round robin) and hands the
//! message to that channel's confirm driver ([`super::confirms`]), which sends
//! it and answers with the broker's verdict for *this* publish: ack → Ok, nack
//! → [`Error::PublishNacked`], returned → [`Error::Unroutable`]. How a
//! `basic.return` is matched to its own publish whatever lapin attaches it to,
//! and why that does not depend on task scheduling, is the driver's module
//! documentation. Several channels keep concurrent publishers from queueing
//! behind one channel's flow; each channel has confirm mode enabled once, when
//! it is opened.
//!
//! Loss handling: if the channel or connection dies before the confirm
//! arrives, the publish is sent again (same message id) on a fresh channel of
//! the next connection. It returns Ok only after an ack, so a confirmed
//! message may exist twice on the broker, never zero times.
//!
//! Time: `timeout` bounds the whole publish — waiting for a connection and a
//! channel, queueing for the driver, the send itself (which lapin does not
//! finish while the broker blocks the connection during a resource alarm),
//! the confirm, and every resend with its pause. A publish that gave up before
//! the driver sent it is never sent; one already sent may still reach a queue.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use lapin::options::ConfirmSelectOptions;
use tokio::time::{timeout_at, Instant};

use super::confirms::{Confirms, Settled, Wire};
use super::connection::{LinkState, Shared};
use super::errors::{self, code};
use crate::backend::Outgoing;
use crate::error::{Error, Result};
use crate::message::amqp::{encoded_properties_len, short, to_properties};

/// Publisher channels per connection: each is a broker process, so a few
/// spread publishes over the broker's cores without wasting processes (the
/// choice and its figures: docs/BENCHMARKS.md).
pub(crate) const POOL_SIZE: usize = 4;

/// RabbitMQ's default `frame_max`, assumed while no connection says otherwise.
const DEFAULT_FRAME_MAX: usize = 131_072;

/// One confirm-mode channel, the connection generation it belongs to, and
/// its confirm driver.
#[derive(Clone)]
struct PubChannel {
    /// For its status: a dead channel is replaced on next use.
    chan: lapin::Channel,
    generation: u64,
    /// Sends on this channel and answers each publish.
    confirms: Confirms,
}

/// The pool.
pub(crate) struct Publisher {
    shared: Arc<Shared>,
    /// Slot i holds channel i; a dead or stale one is replaced on next use.
    slots: Vec<tokio::sync::Mutex<Option<PubChannel>>>,
    next: AtomicUsize,
}

/// A publish ready to send: everything encoded once, reused on every resend.
struct Prepared<'a> {
    out: &'a Outgoing<'a>,
    wire: Arc<Wire>,
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
            // Dropping the old handle lets its driver end once it has answered
            // what it still holds (a dead channel fails all of it at once).
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
                        confirms: Confirms::start(chan.clone()),
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
            wire: Arc::new(Wire {
                exchange: short("exchange name", out.exchange)?,
                routing_key: short("routing key", out.routing_key)?,
                mandatory: out.mandatory,
                payload: out.message.payload.clone(),
                properties,
            }),
        })
    }

    /// Publish one message and await its confirm, resending across channel and
    /// connection losses; all of it within `timeout`.
    pub(crate) async fn publish(&self, out: &Outgoing<'_>, timeout: Duration) -> Result<()> {
        let p = self.prepare(out)?;
        let deadline = Instant::now() + timeout;
        self.publish_prepared(&p, deadline, timeout).await
    }

    /// [`Publisher::publish`] of a prepared message, until `deadline`.
    async fn publish_prepared(
        &self,
        p: &Prepared<'_>,
        deadline: Instant,
        timeout: Duration,
    ) -> Result<()> {
        let attempts = async {
            loop {
                let i = self.next.fetch_add(1, Ordering::Relaxed) % self.slots.len();
                let pc = self.channel(i).await?;
                let attempt = match pc.confirms.submit(p.wire.clone()).await {
                    Some(answer) => self.settle(&pc, p, answer.await.ok()),
                    None => self.settle(&pc, p, None),
                };
                match attempt {
                    Attempt::Done(r) => return r,
                    Attempt::Resend => pause().await,
                }
            }
        };
        match timeout_at(deadline, attempts).await {
            Ok(r) => r,
            Err(_) => Err(timed_out(p, timeout)),
        }
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

    /// The driver's answer (`None`: it ended without one) as an attempt.
    fn settle(&self, pc: &PubChannel, p: &Prepared<'_>, answer: Option<Settled>) -> Attempt {
        let out = p.out;
        match answer {
            Some(Settled::Confirmed) => Attempt::Done(Ok(())),
            Some(Settled::Returned) => Attempt::Done(Err(Error::Unroutable {
                message_id: out.message.id.clone(),
                exchange: out.exchange.to_string(),
                routing_key: out.routing_key.to_string(),
            })),
            Some(Settled::Nacked) => Attempt::Done(Err(Error::PublishNacked {
                message_id: out.message.id.clone(),
                exchange: out.exchange.to_string(),
                routing_key: out.routing_key.to_string(),
            })),
            Some(Settled::Failed(e)) => self.failed(pc, p, e),
            Some(Settled::Unconfirmed) | None => {
                tracing::debug!(message_id = %out.message.id, generation = pc.generation, "publish unconfirmed by its channel; sending again");
                self.shared.report_failure();
                Attempt::Resend
            }
        }
    }

    /// Publish many: all handed to one channel first (sent in order), then
    /// every confirm awaited. Failures that mean "send again" fall back to
    /// [`Publisher::publish_prepared`] one by one within the same deadline.
    pub(crate) async fn publish_batch(
        &self,
        outs: &[Outgoing<'_>],
        timeout: Duration,
    ) -> Vec<Result<()>> {
        let deadline = Instant::now() + timeout;
        let prepared: Vec<Result<Prepared<'_>>> = outs.iter().map(|o| self.prepare(o)).collect();
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.slots.len();
        let pc = match timeout_at(deadline, self.channel(i)).await {
            Ok(Ok(pc)) => pc,
            // The same error for each message, variant kept (a closed broker
            // is `Closed` here as it is for one publish, not an `Amqp` text).
            Ok(Err(e)) => return outs.iter().map(|_| Err(e.replicate())).collect(),
            Err(_) => {
                return outs
                    .iter()
                    .map(|o| {
                        Err(Error::PublishTimeout {
                            message_id: o.message.id.clone(),
                            timeout,
                        })
                    })
                    .collect()
            }
        };
        // Phase 1: hand everything to the channel's driver, in order. `None`:
        // not handed over in time (a timeout, unless the driver ended).
        let mut answers = Vec::with_capacity(prepared.len());
        for p in &prepared {
            answers.push(match p {
                Err(_) => None,
                Ok(p) => timeout_at(deadline, pc.confirms.submit(p.wire.clone()))
                    .await
                    .ok(),
            });
        }
        // Phase 2: await the answers in order (they arrive about in order anyway).
        let mut results = Vec::with_capacity(prepared.len());
        for (p, answer) in prepared.into_iter().zip(answers) {
            let p = match p {
                Err(e) => {
                    results.push(Err(e));
                    continue;
                }
                Ok(p) => p,
            };
            let attempt = match answer {
                None => Attempt::Done(Err(timed_out(&p, timeout))),
                Some(None) => self.settle(&pc, &p, None),
                Some(Some(rx)) => match timeout_at(deadline, rx).await {
                    Err(_) => Attempt::Done(Err(timed_out(&p, timeout))),
                    Ok(answer) => self.settle(&pc, &p, answer.ok()),
                },
            };
            results.push(match attempt {
                Attempt::Done(r) => r,
                Attempt::Resend => self.publish_prepared(&p, deadline, timeout).await,
            });
        }
        results
    }

    /// Wait (up to `timeout`) until every channel has answered every publish
    /// it was handed.
    pub(crate) async fn drain(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        for slot in &self.slots {
            let c = slot.lock().await.clone();
            if let Some(c) = c {
                if c.chan.status().connected() {
                    let _ = timeout_at(deadline, c.confirms.idle()).await;
                }
            }
        }
    }
}

fn timed_out(p: &Prepared<'_>, timeout: Duration) -> Error {
    Error::PublishTimeout {
        message_id: p.out.message.id.clone(),
        timeout,
    }
}

/// A short, jittered pause between attempts that failed for a transient reason
/// before the manager noticed: keeps a dying connection from becoming a hot loop.
pub(crate) async fn pause() {
    let ms = rand::Rng::random_range(&mut rand::rng(), 20..60);
    tokio::time::sleep(Duration::from_millis(ms)).await;
}
