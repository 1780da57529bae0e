//! One consumer = one channel with `basic.qos(prefetch)` and `basic.consume`,
//! recovered inside [`DeliveryStream::next`]: when the channel or connection
//! dies, `next` waits for the manager's new connection, reopens the channel
//! with the same prefetch and consumer tag, and goes on yielding. Deliveries
//! unacked at the loss are redelivered by RabbitMQ (`redelivered = true`).
//!
//! A server-side `basic.cancel` (queue deleted) ends the stream with
//! [`Error::ConsumerCancelled`], never silently. Dropping the stream closes its
//! channel, so RabbitMQ requeues whatever was not acked.

use std::sync::Arc;

use async_trait::async_trait;
use futures::StreamExt;
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::{FieldTable, ShortString};

use super::acks::{AckBatcher, BatchedAcker};
use super::connection::{Link, Shared};
use super::errors::{self, Target};
use super::publisher::pause;
use crate::backend::{Delivery, DeliveryStream};
use crate::error::{Error, Result};
use crate::message::amqp::from_properties;

/// The open consumer of one connection generation.
struct Current {
    link: Arc<Link>,
    chan: lapin::Channel,
    consumer: lapin::Consumer,
    /// Settles this channel's deliveries (coalesced acks).
    acks: Arc<AckBatcher>,
}

/// A recovering delivery stream over one queue.
pub(crate) struct RabbitStream {
    shared: Arc<Shared>,
    queue: String,
    tag: String,
    prefetch: u16,
    global: bool,
    current: Option<Current>,
    /// Cancelled by us, or cancelled by the broker and reported: yield nothing more.
    done: bool,
}

/// Why opening failed.
enum OpenError {
    /// Retry after the connection comes back.
    Transient,
    /// Report to the subscriber.
    Final(Error),
}

impl RabbitStream {
    /// Open the consumer now, so that a missing queue or a refused permission
    /// surfaces from `consume` itself.
    pub(crate) async fn start(
        shared: Arc<Shared>,
        queue: &str,
        prefetch: u16,
        tag: &str,
    ) -> Result<Self> {
        if ShortString::try_new(queue).is_err() || ShortString::try_new(tag).is_err() {
            return Err(Error::InvalidMessage(format!(
                "queue name or consumer tag longer than 255 bytes: '{queue}', '{tag}'"
            )));
        }
        let global = shared.cfg.prefetch_global;
        let mut s = RabbitStream {
            shared,
            queue: queue.into(),
            tag: tag.into(),
            prefetch,
            global,
            current: None,
            done: false,
        };
        // While disconnected, wait for the connection as long as a publish would.
        let deadline = tokio::time::Instant::now() + s.shared.cfg.publish_timeout;
        loop {
            match tokio::time::timeout_at(deadline, s.open()).await {
                Err(_) => return Err(Error::NotConnected),
                Ok(Ok(c)) => {
                    s.current = Some(c);
                    return Ok(s);
                }
                Ok(Err(OpenError::Final(e))) => return Err(e),
                Ok(Err(OpenError::Transient)) => pause().await,
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(Error::NotConnected);
            }
        }
    }

    async fn open(&self) -> std::result::Result<Current, OpenError> {
        let link = self.shared.live().await.map_err(OpenError::Final)?;
        let user = &self.shared.cfg.username;
        let attempt = async {
            let chan = link.conn.create_channel().await?;
            chan.basic_qos(
                self.prefetch,
                BasicQosOptions {
                    global: self.global,
                },
            )
            .await?;
            let consumer = chan
                .basic_consume(
                    ShortString::from(self.queue.as_str()),
                    ShortString::from(self.tag.as_str()),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await?;
            Ok::<_, lapin::Error>((chan, consumer))
        };
        match attempt.await {
            Ok((chan, consumer)) => Ok(Current {
                link,
                acks: Arc::new(AckBatcher::new(chan.clone())),
                chan,
                consumer,
            }),
            Err(e) if errors::is_transient(&e) => {
                tracing::debug!(queue = %self.queue, error = %e, "could not open consumer yet");
                self.shared.report_failure();
                Err(OpenError::Transient)
            }
            Err(e) => Err(OpenError::Final(errors::op_error(
                e,
                "consume from",
                Target::queue(&self.queue),
                user,
            ))),
        }
    }

    fn decode(&self, acks: &Arc<AckBatcher>, d: lapin::message::Delivery) -> Delivery {
        let message = from_properties(&d.properties, d.data);
        acks.delivered(d.delivery_tag);
        Delivery {
            acker: Box::new(BatchedAcker {
                batcher: acks.clone(),
                tag: d.delivery_tag,
                id: message.id.clone(),
                queue: self.queue.clone(),
            }),
            message: Arc::new(message),
            exchange: d.exchange.to_string(),
            routing_key: d.routing_key.to_string(),
            queue: self.queue.clone(),
            redelivered: d.redelivered,
        }
    }
}

#[async_trait]
impl DeliveryStream for RabbitStream {
    async fn next(&mut self) -> Option<Result<Delivery>> {
        loop {
            if self.done {
                return None;
            }
            if self.current.is_none() {
                match self.open().await {
                    Ok(c) => {
                        tracing::info!(queue = %self.queue, generation = c.link.generation, "consumer restored");
                        self.current = Some(c)
                    }
                    Err(OpenError::Final(e)) => {
                        self.done = true;
                        return Some(Err(e));
                    }
                    Err(OpenError::Transient) => {
                        pause().await;
                        continue;
                    }
                }
            }
            let cur = self.current.as_mut().expect("opened above");
            match cur.consumer.next().await {
                Some(Ok(d)) => {
                    let acks = cur.acks.clone();
                    return Some(Ok(self.decode(&acks, d)));
                }
                Some(Err(e)) => {
                    tracing::warn!(queue = %self.queue, error = %e, "consumer channel lost; reopening");
                    self.current = None;
                    self.shared.report_failure();
                }
                None => {
                    let cur = self.current.take().expect("present");
                    if cur.chan.status().connected() && cur.link.conn.status().connected() {
                        // The channel is fine, so this is the broker's basic.cancel.
                        self.done = true;
                        return Some(Err(Error::ConsumerCancelled {
                            queue: self.queue.clone(),
                        }));
                    }
                    self.shared.report_failure();
                }
            }
        }
    }

    async fn cancel(&mut self) -> Result<()> {
        self.done = true;
        if let Some(cur) = &self.current {
            if cur.chan.status().connected() {
                cur.chan
                    .basic_cancel(
                        ShortString::from(self.tag.as_str()),
                        BasicCancelOptions::default(),
                    )
                    .await
                    .map_err(|e| Error::Amqp {
                        context: format!(
                            "cancel consumer '{}' on queue '{}'",
                            self.tag, self.queue
                        ),
                        source: errors::boxed(e),
                    })?;
            }
        }
        Ok(())
    }
}

impl Drop for RabbitStream {
    /// Close the channel where the connection's close waits for it. Left to
    /// lapin, the close is sent when the last clone goes and a connection
    /// close right behind it fails it. A delivery still unsettled keeps the
    /// channel open (lapin closes it after that delivery).
    fn drop(&mut self) {
        let Some(cur) = self.current.take() else {
            return;
        };
        if Arc::strong_count(&cur.acks) > 1 || !cur.chan.status().connected() {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let queue = std::mem::take(&mut self.queue);
        let mut closing = self.shared.closing.lock().unwrap();
        while closing.try_join_next().is_some() {}
        closing.spawn_on(
            async move {
                if let Err(e) = cur
                    .chan
                    .close(200, ShortString::from("consumer done"))
                    .await
                {
                    tracing::debug!(%queue, error = %e, "consumer channel close");
                }
            },
            &rt,
        );
    }
}
