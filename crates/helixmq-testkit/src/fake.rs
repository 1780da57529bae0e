//! A tiny in-test backend whose connection state the test controls. It routes
//! just enough for the consumer's retry/DLQ flow: a publish whose routing key
//! names a registered queue lands there (retry tiers send the origin queue as
//! routing key, so a retried message comes straight back, with no TTL wait);
//! a publish to the dead-letter exchange is kept in `dead`.
#![allow(unreachable_pub)] // a helper of test binaries: `pub` for their test files, never exported

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use helixmq::backend::{Acker, Delivery, DeliveryStream, Outgoing, QueueStats};
use helixmq::{Backend, BackendKind, ConnectionState, Error, Message, Result, Topology};
use tokio::sync::{mpsc, watch};

/// The fake backend (see the module doc).
#[derive(Debug)]
pub struct FakeBackend {
    state: watch::Sender<ConnectionState>,
    dlx: String,
    queues: Mutex<HashMap<String, Queue>>,
    /// Messages that reached the dead-letter exchange.
    pub dead: Mutex<Vec<Message>>,
    /// Settled deliveries (acks + nacks), watched by tests to know a run is over.
    settled: watch::Sender<u64>,
    acks: Arc<AtomicU64>,
}

#[derive(Debug)]
struct Queue {
    tx: mpsc::Sender<Result<Delivery>>,
    rx: Option<mpsc::Receiver<Result<Delivery>>>,
}

impl FakeBackend {
    /// Connected, with no queues; publishes to `dead_letter_exchange` land in `dead`.
    pub fn new(dead_letter_exchange: String) -> Arc<Self> {
        Arc::new(FakeBackend {
            state: watch::channel(ConnectionState::Connected).0,
            dlx: dead_letter_exchange,
            queues: Mutex::new(HashMap::new()),
            dead: Mutex::new(Vec::new()),
            settled: watch::channel(0).0,
            acks: Arc::new(AtomicU64::new(0)),
        })
    }

    /// A queue that publishes with routing key `name` reach.
    pub fn add_queue(&self, name: &str) {
        let (tx, rx) = mpsc::channel(4096);
        self.queues
            .lock()
            .unwrap()
            .insert(name.to_string(), Queue { tx, rx: Some(rx) });
    }

    /// Set the connection state the broker handle and `/health` see.
    pub fn set_state(&self, s: ConnectionState) {
        self.state.send_replace(s);
    }

    /// End the consumer of `queue` the way a broker-side cancel does.
    pub async fn cancel_consumer(&self, queue: &str) {
        let tx = self.queues.lock().unwrap()[queue].tx.clone();
        tx.send(Err(Error::ConsumerCancelled {
            queue: queue.to_string(),
        }))
        .await
        .unwrap();
    }

    /// Wait until `n` deliveries were settled.
    pub async fn settled(&self, n: u64) {
        let mut rx = self.settled.subscribe();
        tokio::time::timeout(Duration::from_secs(20), rx.wait_for(|v| *v >= n))
            .await
            .expect("run did not settle in time")
            .unwrap();
    }

    /// Deliveries acked so far.
    pub fn acks(&self) -> u64 {
        self.acks.load(Ordering::SeqCst)
    }
}

struct FakeAcker {
    settled: watch::Sender<u64>,
    acks: Arc<AtomicU64>,
}

#[async_trait]
impl Acker for FakeAcker {
    async fn ack(&self) -> Result<()> {
        self.acks.fetch_add(1, Ordering::SeqCst);
        self.settled.send_modify(|v| *v += 1);
        Ok(())
    }
    async fn nack(&self, _requeue: bool) -> Result<()> {
        self.settled.send_modify(|v| *v += 1);
        Ok(())
    }
}

struct Stream(mpsc::Receiver<Result<Delivery>>);

#[async_trait]
impl DeliveryStream for Stream {
    async fn next(&mut self) -> Option<Result<Delivery>> {
        self.0.recv().await
    }
    async fn cancel(&mut self) -> Result<()> {
        self.0.close();
        Ok(())
    }
}

#[async_trait]
impl Backend for FakeBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Memory
    }
    async fn declare(&self, _t: &Topology) -> Result<()> {
        Ok(())
    }
    async fn publish(&self, out: Outgoing<'_>, _timeout: Duration) -> Result<()> {
        if *self.state.borrow() != ConnectionState::Connected {
            return Err(Error::NotConnected);
        }
        if out.exchange == self.dlx {
            self.dead.lock().unwrap().push(out.message.into_owned());
            return Ok(());
        }
        let tx = self
            .queues
            .lock()
            .unwrap()
            .get(out.routing_key)
            .map(|q| q.tx.clone());
        match tx {
            Some(tx) => {
                let d = Delivery {
                    message: std::sync::Arc::new(out.message.into_owned()),
                    exchange: out.exchange.to_string(),
                    routing_key: out.routing_key.to_string(),
                    queue: out.routing_key.to_string(),
                    redelivered: false,
                    acker: Box::new(FakeAcker {
                        settled: self.settled.clone(),
                        acks: self.acks.clone(),
                    }),
                };
                tx.send(Ok(d)).await.map_err(|_| Error::Closed)
            }
            None if out.mandatory => Err(Error::Unroutable {
                message_id: out.message.id.clone(),
                exchange: out.exchange.to_string(),
                routing_key: out.routing_key.to_string(),
            }),
            None => Ok(()),
        }
    }
    async fn consume(
        &self,
        queue: &str,
        _prefetch: u16,
        _tag: &str,
    ) -> Result<Box<dyn DeliveryStream>> {
        let rx = self
            .queues
            .lock()
            .unwrap()
            .get_mut(queue)
            .and_then(|q| q.rx.take());
        match rx {
            Some(rx) => Ok(Box::new(Stream(rx))),
            None => Err(Error::NotFound {
                kind: "queue",
                name: queue.to_string(),
            }),
        }
    }
    async fn get(&self, _q: &str) -> Result<Option<Delivery>> {
        Ok(None)
    }
    async fn queue_stats(&self, _q: &str) -> Result<QueueStats> {
        Ok(QueueStats::default())
    }
    async fn purge(&self, _q: &str) -> Result<u64> {
        Ok(0)
    }
    async fn delete_queue(&self, _q: &str) -> Result<()> {
        Ok(())
    }
    async fn delete_exchange(&self, _e: &str) -> Result<()> {
        Ok(())
    }
    fn state(&self) -> watch::Receiver<ConnectionState> {
        self.state.subscribe()
    }
    async fn close(&self) -> Result<()> {
        self.state.send_replace(ConnectionState::Closed);
        Ok(())
    }
}
