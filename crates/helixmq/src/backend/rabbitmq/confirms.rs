//! The confirm driver of one publisher channel: it sends the channel's
//! publishes and tells each one what the broker answered — confirmed, nacked,
//! or returned as unroutable — in a way that does not depend on task
//! scheduling.
//!
//! # The problem
//! lapin does not say which publish a `basic.return` belongs to. It queues a
//! channel's returned messages in a FIFO and, each time it resolves a pending
//! confirm (one per tag of a `basic.ack`/`basic.nack`; a multiple-ack resolves
//! every pending tag up to its own, in `HashMap` order), pops the front of that
//! FIFO into the confirm's `Confirmation`. A return therefore often sits in a
//! sibling's confirmation, possibly one with a later tag. Waiting "a little"
//! for the sibling to hand it over made `Unroutable` a matter of luck.
//!
//! # Where a return can be
//! RabbitMQ routes a channel's publishes in order. An unroutable mandatory
//! publish is returned while it is routed and its confirm is recorded at the
//! same moment; the `basic.return` is written before the `basic.ack`, and the
//! acks of one flush go out in ascending tag order, so unroutable publishes
//! are acked in publish order. lapin handles frames one after the other on its
//! I/O thread. Take a returned publish T, acked in frame F(T). Every return
//! ahead of T's return in the FIFO belongs to an unroutable publish S before
//! T, acked in F(T) or earlier, and each confirm is resolved after its own
//! return was queued. Counting resolutions — each pops one return while the
//! FIFO is not empty — the FIFO has been popped past T's return by the end of
//! F(T): **T's return is carried by a confirm resolved in F(T) or in an
//! earlier frame** (its own or anyone's).
//!
//! # Seeing every such confirm before answering
//! All of this channel's confirms are polled by one `FuturesUnordered` here.
//! 1. lapin resolves all the confirms of one ack frame under one lock (its
//!    acknowledgements mutex), and `Channel::wait_for_confirms` takes that lock
//!    first thing. So after the driver has seen a batch B of resolved
//!    confirms, one poll of `wait_for_confirms` is a *barrier*: every frame that
//!    resolved a confirm of B is complete.
//! 2. A resolved confirm wakes its future, which enqueues it on the
//!    `FuturesUnordered`'s ready queue, a FIFO. A ready sentinel pushed after
//!    the barrier is queued behind every confirm resolved before it, so when
//!    the sentinel comes out, every confirm resolved in those frames has come
//!    out too (a future polled before its confirm resolved is queued again by
//!    the resolution, also ahead of the sentinel).
//! 3. Every return that comes out, whoever carries it, goes into the channel's
//!    *bag*, counted by (message id, exchange, routing key) — what a return
//!    names. B is answered only when its sentinel has come out: an ack of a
//!    mandatory publish whose key is in the bag takes one out and is
//!    unroutable; a nack is a nack; any other ack is confirmed.
//!
//! Hence a returned mandatory publish is never confirmed, and a return leaves
//! the bag with a publish of its own key, never lingering to make a later
//! publish with the same id look unroutable. (Two publishes with the same key
//! in flight at once are told apart by count only; they route alike unless the
//! bindings change between them.) The barrier and the sentinel are local: they
//! add no round trip, only one lock and one poll per batch.
//!
//! What this rests on in lapin (read in 4.12.3: `acknowledgement.rs`,
//! `returned_messages.rs`, `channel.rs`): one pop of the return FIFO per
//! resolved confirm, a frame's confirms resolved under the acknowledgements
//! mutex, `wait_for_confirms` locking it on its first poll. Check them again
//! when lapin is upgraded.
//!
//! The driver owns every in-flight send and confirm: a publisher that gives up
//! (its timeout) only drops its answer; the confirm stays here, so its return,
//! if any, still leaves the bag. The driver, its bag and its input live as long
//! as the channel's handle ([`Confirms`]): once every handle is dropped and
//! nothing is in flight it ends; a dead channel fails every send and confirm
//! at once.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use lapin::options::BasicPublishOptions;
use lapin::types::ShortString;
use lapin::{BasicProperties, Confirmation};
use tokio::sync::{mpsc, oneshot, watch};

/// Publishes queued for one channel's driver before publishers wait (within
/// their timeout). The driver takes everything queued at every wake, so this
/// only has to cover the publishes that arrive between two of its polls.
const INPUT: usize = 256;

/// Rounds (barrier, sentinel, answers) in one poll of the driver before it
/// lets other tasks run; under a steady stream of confirms it would otherwise
/// never return.
const ROUNDS_PER_POLL: usize = 8;

/// One publish as it goes on the wire, encoded once and shared by every
/// resend of it.
pub(crate) struct Wire {
    /// Exchange.
    pub exchange: ShortString,
    /// Routing key.
    pub routing_key: ShortString,
    /// Return it if no queue matches; only mandatory publishes can be returned.
    pub mandatory: bool,
    /// Body (shared, not copied).
    pub payload: Bytes,
    /// Properties and headers, including the message id a return is known by.
    pub properties: BasicProperties,
}

/// What a `basic.return` names; publishes are matched to returns by it.
#[derive(PartialEq, Eq, Hash)]
struct ReturnKey {
    message_id: Option<ShortString>,
    exchange: ShortString,
    routing_key: ShortString,
}

impl ReturnKey {
    fn of(w: &Wire) -> ReturnKey {
        ReturnKey {
            message_id: w.properties.message_id().clone(),
            exchange: w.exchange.clone(),
            routing_key: w.routing_key.clone(),
        }
    }
}

/// The broker's answer to one publish.
pub(crate) enum Settled {
    /// Acked and not returned.
    Confirmed,
    /// Acked after a `basic.return`: no queue matched.
    Returned,
    /// Nacked.
    Nacked,
    /// The channel was not in confirm mode; the publish's fate is unknown.
    Unconfirmed,
    /// The send or the confirm failed: the channel or connection went away, or
    /// the broker closed the channel because of some publish.
    Failed(lapin::Error),
}

/// A publish handed to the driver, with where its answer goes.
struct Request {
    wire: Arc<Wire>,
    reply: oneshot::Sender<Settled>,
}

/// A publish whose send and confirm completed, waiting to be answered.
struct Done {
    wire: Arc<Wire>,
    reply: oneshot::Sender<Settled>,
    result: lapin::Result<Confirmation>,
}

/// What the driver's futures yield. Nearly every value is a `Done` (one
/// sentinel per batch), moved once out of its future: boxing it would only
/// add an allocation per publish.
#[allow(clippy::large_enum_variant)]
enum Out {
    Done(Done),
    /// The barrier's marker: everything queued before it has come out.
    Sentinel,
}

type InFlight = Pin<Box<dyn Future<Output = Out> + Send>>;

/// A handle on one channel's driver. Cloned by every user of the channel;
/// dropping the last one lets the driver end.
#[derive(Clone)]
pub(crate) struct Confirms {
    input: mpsc::Sender<Request>,
    /// Publishes received and not answered yet (for [`Confirms::idle`]).
    open: watch::Receiver<usize>,
}

impl Confirms {
    /// Start the driver of `chan`, a channel in confirm mode.
    pub(crate) fn start(chan: lapin::Channel) -> Confirms {
        let (input, rx) = mpsc::channel(INPUT);
        let (open_tx, open) = watch::channel(0);
        let mut driver = Driver {
            chan: Arc::new(chan),
            input: rx,
            input_closed: false,
            in_flight: FuturesUnordered::new(),
            harvested: Vec::new(),
            behind_barrier: Vec::new(),
            barrier_raised: false,
            bag: HashMap::new(),
            open: 0,
            open_tx,
        };
        tokio::spawn(std::future::poll_fn(move |cx| driver.poll(cx)));
        Confirms { input, open }
    }

    /// Hand `wire` to the driver: it is sent after everything handed over
    /// before it, and its answer comes on the returned receiver. `None` when
    /// the driver has ended (cannot happen while this handle lives, but a
    /// panic in it would end it).
    pub(crate) async fn submit(&self, wire: Arc<Wire>) -> Option<oneshot::Receiver<Settled>> {
        let (reply, rx) = oneshot::channel();
        self.input.send(Request { wire, reply }).await.ok()?;
        Some(rx)
    }

    /// Wait until every publish handed over so far has been answered.
    pub(crate) async fn idle(&self) {
        let mut open = self.open.clone();
        let _ = open.wait_for(|n| *n == 0).await;
    }
}

/// The task behind [`Confirms`]; see the module documentation.
struct Driver {
    /// Shared by the in-flight futures (one reference count each, not a
    /// full channel clone).
    chan: Arc<lapin::Channel>,
    input: mpsc::Receiver<Request>,
    /// Every [`Confirms`] is gone: end once nothing is in flight.
    input_closed: bool,
    /// Every send with its confirm, plus the sentinel of a raised barrier.
    in_flight: FuturesUnordered<InFlight>,
    /// Came out since the last barrier was raised; need a barrier of their own.
    harvested: Vec<Done>,
    /// Came out before the raised barrier; answered when its sentinel comes out.
    behind_barrier: Vec<Done>,
    /// A sentinel is in `in_flight`.
    barrier_raised: bool,
    /// Returns that came out and were not claimed yet, by key, with a count.
    bag: HashMap<ReturnKey, u32>,
    /// Received and not answered.
    open: usize,
    open_tx: watch::Sender<usize>,
}

impl Driver {
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        for _ in 0..ROUNDS_PER_POLL {
            // New publishes first: lapin numbers a publish (its delivery tag)
            // when its send is first polled, which the ready queue does in
            // the order they are pushed here, so a batch keeps its order.
            while !self.input_closed {
                match self.input.poll_recv(cx) {
                    Poll::Ready(Some(req)) => self.send(req),
                    Poll::Ready(None) => self.input_closed = true,
                    Poll::Pending => break,
                }
            }
            while let Poll::Ready(Some(out)) = self.in_flight.poll_next_unpin(cx) {
                match out {
                    Out::Done(mut d) => {
                        self.file_return(&mut d);
                        self.harvested.push(d);
                    }
                    Out::Sentinel => {
                        self.barrier_raised = false;
                        for d in std::mem::take(&mut self.behind_barrier) {
                            self.answer(d);
                        }
                    }
                }
            }
            if self.barrier_raised || self.harvested.is_empty() {
                // Waiting for the sentinel (the ready queue yielded early, and
                // woke us), or for sends and confirms.
                self.report_open();
                if self.input_closed && self.open == 0 && !self.barrier_raised {
                    return Poll::Ready(());
                }
                return Poll::Pending;
            }
            self.raise_barrier();
        }
        self.report_open();
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    /// Tell [`Confirms::idle`] how many are open (notifying only on a change).
    fn report_open(&self) {
        let open = self.open;
        self.open_tx
            .send_if_modified(|n| std::mem::replace(n, open) != open);
    }

    fn send(&mut self, req: Request) {
        if req.reply.is_closed() {
            // Its publisher gave up (timeout) before it reached the channel:
            // never sending it keeps that timeout's meaning simple.
            return;
        }
        self.open += 1;
        let chan = self.chan.clone();
        let Request { wire, reply } = req;
        self.in_flight.push(Box::pin(async move {
            let opts = BasicPublishOptions {
                mandatory: wire.mandatory,
                immediate: false,
            };
            let sent = chan
                .basic_publish(
                    wire.exchange.clone(),
                    wire.routing_key.clone(),
                    opts,
                    &wire.payload,
                    wire.properties.clone(),
                )
                .await;
            let result = match sent {
                Ok(confirm) => confirm.await,
                Err(e) => Err(e),
            };
            Out::Done(Done {
                wire,
                reply,
                result,
            })
        }));
    }

    /// Move the return `d` carries (its own or another publish's) to the bag.
    fn file_return(&mut self, d: &mut Done) {
        let returned = match &mut d.result {
            Ok(Confirmation::Ack(m) | Confirmation::Nack(m)) => m.take(),
            _ => None,
        };
        if let Some(r) = returned {
            let key = ReturnKey {
                message_id: r.delivery.properties.message_id().clone(),
                exchange: r.delivery.exchange,
                routing_key: r.delivery.routing_key,
            };
            *self.bag.entry(key).or_insert(0) += 1;
        }
    }

    /// Make every confirm resolved so far come out before a sentinel; the
    /// batch harvested so far is answered when it does (module doc, 1–2).
    fn raise_barrier(&mut self) {
        // Polled once for the lock it takes first; what it would wait for or
        // return is not wanted (nothing here drops an unresolved confirm, so
        // it has no returns to hand back).
        let _ = self.chan.wait_for_confirms().now_or_never();
        self.behind_barrier = std::mem::take(&mut self.harvested);
        self.in_flight
            .push(Box::pin(std::future::ready(Out::Sentinel)));
        self.barrier_raised = true;
    }

    /// Whether a return of `w`'s key is in the bag; takes it out if so.
    fn claim_return(&mut self, w: &Wire) -> bool {
        if !w.mandatory || self.bag.is_empty() {
            return false;
        }
        let key = ReturnKey::of(w);
        match self.bag.get_mut(&key) {
            Some(n) if *n > 1 => {
                *n -= 1;
                true
            }
            Some(_) => {
                self.bag.remove(&key);
                true
            }
            None => false,
        }
    }

    fn answer(&mut self, d: Done) {
        self.open -= 1;
        let settled = match d.result {
            Err(e) => Settled::Failed(e),
            // Claimed on a nack too, so that a return can never outlive its publish.
            Ok(c) => match (c, self.claim_return(&d.wire)) {
                (Confirmation::Nack(_), _) => Settled::Nacked,
                (Confirmation::Ack(_), true) => Settled::Returned,
                (Confirmation::Ack(_), false) => Settled::Confirmed,
                (Confirmation::NotRequested, _) => Settled::Unconfirmed,
            },
        };
        // The publisher may have given up (timeout): nobody to tell.
        let _ = d.reply.send(settled);
    }
}
