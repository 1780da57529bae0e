//! Settling deliveries: one by one for `basic.get`, coalesced for consumers.
//!
//! A consumer channel settles through an [`AckBatcher`]: whoever settles while
//! no flush is running becomes the flusher and sends, in delivery order, one
//! `basic.ack(multiple)` for the longest run of finished deliveries at the head
//! of the channel's window, then individual frames for the finished ones behind
//! a delivery still in its handler. Settlements that arrive while that round is
//! on the wire wait; when the round is written, the flusher hands the flush to
//! one of them, which sends everything decided meanwhile as the next round
//! (group commit: no timer, batches form only under load). A flusher sends one
//! round and returns: under steady load the flush moves from handler to
//! handler instead of keeping one of them busy sending the others' frames.
//!
//! Why: every `basic.ack` is a frame the broker must process and a hop into
//! lapin's I/O thread and back; where the broker shares the client's cores, fewer
//! frames is throughput (measured in docs/BENCHMARKS.md). Nothing waits for a slow handler: a
//! delivery behind it is acked on its own in the next round, so prefetch never
//! fills with finished work.
//!
//! What `Ok` means: the frame carrying this decision (its own, or a multiple-ack
//! covering it) was written to the socket. Every settlement awaits the write of
//! its frame, whoever queued it, so a failed write reaches every delivery it
//! covered as an error (RabbitMQ then redelivers them when the channel closes).
//! Settling a tag this channel never delivered, or settling twice, is an error
//! and sends nothing (RabbitMQ would close the channel with 406).
//!
//! Safety of `multiple`: a multiple-ack covers every unsettled tag up to its
//! own. It is only sent for a run in which every delivery is finished with an
//! ack, and frames are queued to lapin in tag order by one flusher at a time
//! (a round is queued whole, under the window's lock, before the next flusher
//! exists), so a nack or single ack of an earlier tag always precedes a
//! multiple-ack over it. Tags are those of this channel's single consumer,
//! increasing by one; a gap (tags the broker used that never reached the
//! stream) is recorded as an entry that is never settled, so no multiple-ack
//! reaches over it.

use std::collections::VecDeque;
use std::sync::Mutex;

use async_trait::async_trait;
use futures::future::{BoxFuture, FutureExt, Shared};
use lapin::options::{BasicAckOptions, BasicNackOptions};
use tokio::sync::oneshot;

use super::errors;
use crate::backend::Acker;
use crate::error::{Error, Result};

/// What the owner of a delivery decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Settle {
    /// Still in its handler.
    Open,
    /// Stands for delivery tags the broker used but that never reached us (a
    /// gap in the channel's tags). Never settled: it keeps a multiple-ack from
    /// reaching over them, which would ack messages no handler saw.
    Unseen,
    Ack,
    Nack {
        requeue: bool,
    },
}

/// One frame to send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Frame {
    Ack { tag: u64, multiple: bool },
    Nack { tag: u64, requeue: bool },
}

/// The write of one frame, shared by every settlement it carries: each of
/// them awaits it, so its outcome does not depend on the flusher living on
/// (a flusher's caller may drop it mid-round, e.g. on a timeout).
type Written = Shared<BoxFuture<'static, std::result::Result<(), lapin::Error>>>;

/// Where a consumer channel's frames go: its lapin channel (a recorder in the
/// unit tests).
pub(crate) trait FrameSink: Send + Sync + 'static {
    /// The write of `frame`. Queued when the future is first polled, resolved
    /// once written to the socket (or failed), as lapin's `basic_ack` does.
    fn send(&self, frame: Frame) -> BoxFuture<'static, std::result::Result<(), lapin::Error>>;
}

impl FrameSink for lapin::Channel {
    fn send(&self, frame: Frame) -> BoxFuture<'static, std::result::Result<(), lapin::Error>> {
        let chan = self.clone();
        async move {
            match frame {
                Frame::Ack { tag, multiple } => {
                    chan.basic_ack(tag, BasicAckOptions { multiple }).await
                }
                Frame::Nack { tag, requeue } => {
                    chan.basic_nack(
                        tag,
                        BasicNackOptions {
                            multiple: false,
                            requeue,
                        },
                    )
                    .await
                }
            }
        }
        .boxed()
    }
}

/// What a waiting settlement is told.
enum Turn {
    /// Your decision is in this frame: await its write.
    Written(Written),
    /// The flush is yours: send what is decided, as the next round.
    Flush,
}

/// One delivery of the channel's window.
struct Entry {
    tag: u64,
    settle: Settle,
    /// The settlement waiting for its frame while another flush runs.
    waiter: Option<oneshot::Sender<Turn>>,
}

impl Entry {
    fn new(tag: u64, settle: Settle) -> Self {
        Entry {
            tag,
            settle,
            waiter: None,
        }
    }
}

/// Why a settlement failed.
#[derive(Debug)]
enum SettleError {
    /// The tag is not in this channel's window: never delivered on it, or its
    /// frame was already taken by a flush (settled before).
    NotInWindow,
    /// Settled before; the first decision stands.
    AlreadySettled,
    /// The frame carrying the decision could not be written (channel closed,
    /// connection lost).
    Write(lapin::Error),
    /// The settlement lost track of its frame. Never expected: every decision
    /// is either taken by a flush (which hands out its write) or handed the
    /// flush itself.
    Abandoned,
}

#[derive(Default)]
struct Window {
    /// Delivered, not yet handed to a flush, tags increasing.
    pending: VecDeque<Entry>,
    flushing: bool,
    /// The highest tag recorded (RabbitMQ numbers a channel's deliveries 1, 2, 3, …).
    last_tag: u64,
}

impl Window {
    fn delivered(&mut self, tag: u64) {
        if tag > self.last_tag + 1 {
            tracing::warn!(
                first = self.last_tag + 1,
                last = tag - 1,
                "delivery tags skipped on a consumer channel: those messages stay unacked until the channel closes, and acks on it go one by one"
            );
            self.pending.push_back(Entry::new(tag - 1, Settle::Unseen));
        }
        self.last_tag = self.last_tag.max(tag);
        self.pending.push_back(Entry::new(tag, Settle::Open));
    }

    /// Record the decision for `tag`, still open in the window.
    fn decide(&mut self, tag: u64, how: Settle) -> std::result::Result<&mut Entry, SettleError> {
        let i = self
            .pending
            .binary_search_by_key(&tag, |e| e.tag)
            .map_err(|_| SettleError::NotInWindow)?;
        let e = &mut self.pending[i];
        match e.settle {
            Settle::Open => {
                e.settle = how;
                Ok(e)
            }
            Settle::Unseen => Err(SettleError::NotInWindow),
            Settle::Ack | Settle::Nack { .. } => Err(SettleError::AlreadySettled),
        }
    }

    /// Take every decided delivery as frames, in tag order, each with the
    /// entries it settles. From the head up to the first delivery still open,
    /// each run of acks becomes one multiple-ack (a nack between runs goes on
    /// its own, before the run after it); behind the first open delivery every
    /// decision is a frame of its own, since a multiple-ack there would also
    /// settle the open one.
    fn take_frames(&mut self) -> Vec<(Frame, Vec<Entry>)> {
        let mut frames = Vec::new();
        let mut run: Vec<Entry> = Vec::new();
        let flush_run = |run: &mut Vec<Entry>, frames: &mut Vec<(Frame, Vec<Entry>)>| {
            if let Some(last) = run.last() {
                let frame = Frame::Ack {
                    tag: last.tag,
                    multiple: run.len() > 1,
                };
                frames.push((frame, std::mem::take(run)));
            }
        };
        while let Some(e) = self.pending.front() {
            match e.settle {
                Settle::Open | Settle::Unseen => break,
                Settle::Ack => run.push(self.pending.pop_front().expect("front")),
                Settle::Nack { requeue } => {
                    flush_run(&mut run, &mut frames);
                    let e = self.pending.pop_front().expect("front");
                    frames.push((
                        Frame::Nack {
                            tag: e.tag,
                            requeue,
                        },
                        vec![e],
                    ));
                }
            }
        }
        flush_run(&mut run, &mut frames);
        let mut kept = VecDeque::with_capacity(self.pending.len());
        for e in self.pending.drain(..) {
            match e.settle {
                Settle::Open | Settle::Unseen => kept.push_back(e),
                Settle::Ack => frames.push((
                    Frame::Ack {
                        tag: e.tag,
                        multiple: false,
                    },
                    vec![e],
                )),
                Settle::Nack { requeue } => frames.push((
                    Frame::Nack {
                        tag: e.tag,
                        requeue,
                    },
                    vec![e],
                )),
            }
        }
        self.pending = kept;
        frames
    }

    /// The running flush ends: give it to a settlement that is waiting with a
    /// decision not sent yet (the lowest tag first), or clear `flushing` if
    /// there is none. A waiter that went away (its future dropped) is skipped;
    /// its decision stays for the next flush.
    fn hand_off(&mut self) {
        for e in self.pending.iter_mut() {
            if matches!(e.settle, Settle::Open | Settle::Unseen) {
                continue;
            }
            if let Some(tx) = e.waiter.take() {
                if tx.send(Turn::Flush).is_ok() {
                    return;
                }
            }
        }
        self.flushing = false;
    }
}

/// The settlement window of one consumer channel.
pub(crate) struct AckBatcher<S: FrameSink = lapin::Channel> {
    sink: S,
    window: Mutex<Window>,
}

impl<S: FrameSink> AckBatcher<S> {
    pub(crate) fn new(sink: S) -> Self {
        AckBatcher {
            sink,
            window: Mutex::new(Window::default()),
        }
    }

    /// Record a delivery as it is yielded (tags arrive in increasing order).
    pub(crate) fn delivered(&self, tag: u64) {
        self.window.lock().unwrap().delivered(tag);
    }

    /// Decide `tag`, then flush one round unless a flush is already running;
    /// in that case wait to be handed either the write of the frame carrying
    /// the decision or the flush itself. Resolves when that frame is written.
    async fn settle(&self, tag: u64, how: Settle) -> std::result::Result<(), SettleError> {
        let waiting = {
            let mut w = self.window.lock().unwrap();
            let flushing = w.flushing;
            let e = w.decide(tag, how)?;
            if flushing {
                let (tx, rx) = oneshot::channel();
                e.waiter = Some(tx);
                Some(rx)
            } else {
                w.flushing = true;
                None
            }
        };
        if let Some(rx) = waiting {
            match rx.await {
                Ok(Turn::Written(written)) => return written.await.map_err(SettleError::Write),
                Ok(Turn::Flush) => {}
                Err(_) => return Err(SettleError::Abandoned),
            }
        }
        self.flush(tag).await
    }

    /// One round, by the holder of the flush: take every decision, queue its
    /// frames in tag order, hand each waiting settlement the write of its
    /// frame, wait until the round is written, then hand the flush on.
    async fn flush(&self, own: u64) -> std::result::Result<(), SettleError> {
        // Hands the flush on also if this future is dropped mid-round: the
        // frames are queued by then and their waiters hold their writes.
        let guard = FlushGuard {
            window: &self.window,
        };
        let (mine, round) = {
            let mut w = self.window.lock().unwrap();
            let mut mine = None;
            let mut round = Vec::new();
            for (frame, entries) in w.take_frames() {
                let written = self.sink.send(frame).shared();
                // lapin queues a frame when its future is first polled: do it
                // now, in tag order, before anyone else can take a frame.
                let _ = written.clone().now_or_never();
                for e in entries {
                    if e.tag == own {
                        mine = Some(written.clone());
                    } else if let Some(tx) = e.waiter {
                        // A waiter that went away has nothing left to learn.
                        let _ = tx.send(Turn::Written(written.clone()));
                    }
                }
                round.push(written);
            }
            (mine, round)
        };
        // Settlements coming in meanwhile wait for the next round: that is
        // what makes their acks one frame.
        futures::future::join_all(round).await;
        drop(guard);
        match mine {
            Some(written) => written.await.map_err(SettleError::Write),
            None => Err(SettleError::Abandoned),
        }
    }
}

/// Ends a flush: hands it to a waiting settlement or clears
/// [`Window::flushing`], on every way out of [`AckBatcher::flush`].
struct FlushGuard<'a> {
    window: &'a Mutex<Window>,
}

impl Drop for FlushGuard<'_> {
    fn drop(&mut self) {
        let mut w = self.window.lock().unwrap_or_else(|e| e.into_inner());
        w.hand_off();
    }
}

/// Settles a consumer delivery through its channel's [`AckBatcher`]. `Ok`
/// means the frame carrying the decision was written to the socket; an error
/// means it was not (RabbitMQ redelivers the message when the channel closes)
/// or that this delivery cannot be settled here (already settled).
pub(crate) struct BatchedAcker {
    pub(crate) batcher: std::sync::Arc<AckBatcher>,
    pub(crate) tag: u64,
    pub(crate) id: String,
    pub(crate) queue: String,
}

impl BatchedAcker {
    fn outcome(&self, what: &str, r: std::result::Result<(), SettleError>) -> Result<()> {
        let (id, queue, tag) = (&self.id, &self.queue, self.tag);
        r.map_err(|e| match e {
            SettleError::Write(e) => Error::Amqp {
                context: format!(
                    "{what} message {id} from queue '{queue}': the frame was not written (its channel is closed, connection lost?); RabbitMQ will redeliver it"
                ),
                source: errors::boxed(e),
            },
            SettleError::NotInWindow => Error::InvalidMessage(format!(
                "cannot {what} message {id} from queue '{queue}': delivery tag {tag} is not open on its channel (already settled?); nothing was sent"
            )),
            SettleError::AlreadySettled => Error::InvalidMessage(format!(
                "cannot {what} message {id} from queue '{queue}': it was already settled; the first decision stands"
            )),
            SettleError::Abandoned => Error::Amqp {
                context: format!("{what} message {id} from queue '{queue}'"),
                source: "the settlement lost track of its frame; RabbitMQ redelivers the message if it was not written".into(),
            },
        })
    }
}

#[async_trait]
impl Acker for BatchedAcker {
    async fn ack(&self) -> Result<()> {
        let r = self.batcher.settle(self.tag, Settle::Ack).await;
        self.outcome("ack", r)
    }
    async fn nack(&self, requeue: bool) -> Result<()> {
        let r = self
            .batcher
            .settle(self.tag, Settle::Nack { requeue })
            .await;
        self.outcome("nack", r)
    }
}

/// Settles a `basic.get` delivery on the channel it came from. If that channel
/// is gone the settlement fails harmlessly (lapin never sends a tag of a dead
/// channel, so no 406) and RabbitMQ redelivers the message.
pub(crate) struct SingleAcker {
    pub(crate) acker: lapin::Acker,
    pub(crate) id: String,
    pub(crate) queue: String,
}

impl SingleAcker {
    fn outcome(&self, what: &str, r: lapin::Result<bool>) -> Result<()> {
        match r {
            Ok(true) => Ok(()),
            Ok(false) => Err(Error::Amqp {
                context: format!(
                    "cannot {what} message {} from queue '{}': its channel is closed (connection lost?) or it was already settled; RabbitMQ will redeliver it",
                    self.id, self.queue
                ),
                source: "channel closed".into(),
            }),
            Err(e) => Err(Error::Amqp {
                context: format!("{what} message {} from queue '{}'", self.id, self.queue),
                source: errors::boxed(e),
            }),
        }
    }
}

#[async_trait]
impl Acker for SingleAcker {
    async fn ack(&self) -> Result<()> {
        let r = self.acker.ack(BasicAckOptions::default()).await;
        self.outcome("ack", r)
    }
    async fn nack(&self, requeue: bool) -> Result<()> {
        let r = self
            .acker
            .nack(BasicNackOptions {
                multiple: false,
                requeue,
            })
            .await;
        self.outcome("nack", r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::task::Poll;

    fn window(states: &[(u64, Settle)]) -> Window {
        Window {
            pending: states.iter().map(|&(t, s)| Entry::new(t, s)).collect(),
            flushing: false,
            last_tag: states.last().map_or(0, |&(t, _)| t),
        }
    }

    fn frames(w: &mut Window) -> Vec<Frame> {
        w.take_frames().into_iter().map(|(f, _)| f).collect()
    }

    fn left(w: &Window) -> Vec<(u64, Settle)> {
        w.pending.iter().map(|e| (e.tag, e.settle)).collect()
    }

    fn ack(tag: u64, multiple: bool) -> Frame {
        Frame::Ack { tag, multiple }
    }

    #[test]
    fn a_multiple_ack_never_reaches_over_tags_that_were_never_delivered() {
        let mut w = Window::default();
        for t in [1, 2, 5, 6] {
            w.delivered(t);
        }
        for t in [1, 2, 5, 6] {
            w.decide(t, Settle::Ack).unwrap();
        }
        // 3 and 4 reached no handler: 5 and 6 are acked one by one.
        assert_eq!(
            frames(&mut w),
            vec![ack(2, true), ack(5, false), ack(6, false)]
        );
        assert_eq!(left(&w), vec![(4, Settle::Unseen)]);
    }

    #[test]
    fn a_finished_head_run_is_one_multiple_ack() {
        let mut w = window(&[(1, Settle::Ack), (2, Settle::Ack), (3, Settle::Ack)]);
        let taken = w.take_frames();
        assert_eq!(taken.len(), 1);
        assert_eq!(taken[0].0, ack(3, true));
        // The one frame settles all three deliveries.
        let tags: Vec<u64> = taken[0].1.iter().map(|e| e.tag).collect();
        assert_eq!(tags, vec![1, 2, 3]);
        assert!(w.pending.is_empty());
    }

    #[test]
    fn a_single_finished_head_is_a_plain_ack() {
        let mut w = window(&[(7, Settle::Ack), (8, Settle::Open)]);
        assert_eq!(frames(&mut w), vec![ack(7, false)]);
        assert_eq!(left(&w), vec![(8, Settle::Open)]);
    }

    #[test]
    fn work_behind_an_open_delivery_is_settled_one_by_one_and_never_covered() {
        let mut w = window(&[
            (1, Settle::Ack),
            (2, Settle::Ack),
            (3, Settle::Open),
            (4, Settle::Ack),
            (5, Settle::Nack { requeue: true }),
            (6, Settle::Ack),
        ]);
        assert_eq!(
            frames(&mut w),
            vec![
                ack(2, true),
                ack(4, false),
                Frame::Nack {
                    tag: 5,
                    requeue: true
                },
                ack(6, false),
            ]
        );
        assert_eq!(left(&w), vec![(3, Settle::Open)]);
        // Once 3 finishes it heads a run again, with what came since.
        w.delivered(7);
        w.decide(3, Settle::Ack).unwrap();
        w.decide(7, Settle::Ack).unwrap();
        assert_eq!(frames(&mut w), vec![ack(7, true)]);
    }

    #[test]
    fn a_nack_splits_runs_and_goes_first() {
        let mut w = window(&[
            (1, Settle::Nack { requeue: false }),
            (2, Settle::Ack),
            (3, Settle::Ack),
        ]);
        assert_eq!(
            frames(&mut w),
            vec![
                Frame::Nack {
                    tag: 1,
                    requeue: false
                },
                ack(3, true),
            ]
        );
    }

    #[test]
    fn deciding_a_tag_twice_or_one_never_delivered_is_refused() {
        let mut w = Window::default();
        w.delivered(1);
        w.delivered(3);
        assert!(matches!(
            w.decide(9, Settle::Ack),
            Err(SettleError::NotInWindow)
        ));
        // 2 is the gap entry: never delivered, never settled.
        assert!(matches!(
            w.decide(2, Settle::Ack),
            Err(SettleError::NotInWindow)
        ));
        w.decide(1, Settle::Ack).unwrap();
        assert!(matches!(
            w.decide(1, Settle::Nack { requeue: true }),
            Err(SettleError::AlreadySettled)
        ));
        assert_eq!(frames(&mut w), vec![ack(1, false)]);
        // Taken by a flush: no longer in the window.
        assert!(matches!(
            w.decide(1, Settle::Ack),
            Err(SettleError::NotInWindow)
        ));
    }

    /// A sink that records frames as they are queued and completes their
    /// writes only when the test says so.
    #[derive(Clone, Default)]
    struct Wire(Arc<Mutex<WireState>>);

    #[derive(Default)]
    struct WireState {
        queued: Vec<Frame>,
        writes: VecDeque<oneshot::Sender<std::result::Result<(), lapin::Error>>>,
    }

    impl FrameSink for Wire {
        fn send(&self, frame: Frame) -> BoxFuture<'static, std::result::Result<(), lapin::Error>> {
            let wire = self.clone();
            async move {
                let rx = {
                    let mut w = wire.0.lock().unwrap();
                    w.queued.push(frame);
                    let (tx, rx) = oneshot::channel();
                    w.writes.push_back(tx);
                    rx
                };
                rx.await.expect("the test completes every write")
            }
            .boxed()
        }
    }

    impl Wire {
        fn queued(&self) -> Vec<Frame> {
            self.0.lock().unwrap().queued.clone()
        }
        /// Complete the writes queued so far, in order, with `ok` or a closed channel.
        fn write_all(&self, ok: bool) {
            let writes: Vec<_> = self.0.lock().unwrap().writes.drain(..).collect();
            for tx in writes {
                let r = if ok { Ok(()) } else { Err(closed()) };
                let _ = tx.send(r);
            }
        }
    }

    fn closed() -> lapin::Error {
        lapin::ErrorKind::InvalidChannelState(lapin::ChannelState::Closed, "test").into()
    }

    fn batcher(tags: u64) -> (Arc<AckBatcher<Wire>>, Wire) {
        let wire = Wire::default();
        let b = Arc::new(AckBatcher::new(wire.clone()));
        for t in 1..=tags {
            b.delivered(t);
        }
        (b, wire)
    }

    fn pending<F: std::future::Future + Unpin>(f: &mut F) -> bool {
        matches!(f.poll_unpin(&mut noop_cx()), Poll::Pending)
    }

    fn noop_cx() -> std::task::Context<'static> {
        std::task::Context::from_waker(futures::task::noop_waker_ref())
    }

    fn ready<F: std::future::Future + Unpin>(f: &mut F) -> F::Output {
        match f.poll_unpin(&mut noop_cx()) {
            Poll::Ready(v) => v,
            Poll::Pending => panic!("still pending"),
        }
    }

    #[test]
    fn ok_only_once_the_frame_is_written() {
        let (b, wire) = batcher(1);
        let mut a = Box::pin(b.settle(1, Settle::Ack));
        assert!(pending(&mut a), "queued, not written yet");
        assert_eq!(wire.queued(), vec![ack(1, false)]);
        assert!(pending(&mut a));
        wire.write_all(true);
        assert!(ready(&mut a).is_ok());
    }

    #[test]
    fn settling_outside_the_window_is_an_error_and_sends_nothing() {
        let (b, wire) = batcher(2);
        let mut a = Box::pin(b.settle(7, Settle::Ack));
        assert!(matches!(ready(&mut a), Err(SettleError::NotInWindow)));
        let mut a = Box::pin(b.settle(1, Settle::Ack));
        assert!(pending(&mut a));
        wire.write_all(true);
        assert!(ready(&mut a).is_ok());
        let mut again = Box::pin(b.settle(1, Settle::Nack { requeue: true }));
        assert!(matches!(ready(&mut again), Err(SettleError::NotInWindow)));
        assert_eq!(wire.queued(), vec![ack(1, false)]);
    }

    #[test]
    fn a_failed_write_reaches_every_settlement_it_carried() {
        let (b, wire) = batcher(3);
        let mut a = Box::pin(b.settle(1, Settle::Ack));
        assert!(pending(&mut a));
        // 2 and 3 finish while ack(1) is on the wire: they wait for the next round.
        let mut c2 = Box::pin(b.settle(2, Settle::Ack));
        let mut c3 = Box::pin(b.settle(3, Settle::Ack));
        assert!(pending(&mut c2) && pending(&mut c3));
        wire.write_all(true);
        assert!(ready(&mut a).is_ok());
        // 2 was handed the flush: one multiple-ack for both.
        assert!(pending(&mut c2));
        assert_eq!(wire.queued(), vec![ack(1, false), ack(3, true)]);
        wire.write_all(false);
        assert!(matches!(ready(&mut c2), Err(SettleError::Write(_))));
        assert!(matches!(ready(&mut c3), Err(SettleError::Write(_))));
    }

    #[test]
    fn a_flusher_sends_one_round_then_hands_the_flush_on() {
        // Steady load: a new settlement arrives during every round. Each
        // settler must be done after the round carrying its own frame, never
        // kept sending the frames of those who came after it.
        const N: u64 = 50;
        let (b, wire) = batcher(N);
        let mut current = Box::pin(b.settle(1, Settle::Ack));
        assert!(pending(&mut current));
        for t in 2..=N {
            let mut next = Box::pin(b.settle(t, Settle::Ack));
            assert!(pending(&mut next), "{t} waits for the round on the wire");
            wire.write_all(true);
            assert!(
                ready(&mut current).is_ok(),
                "the flusher before {t} finished after one round"
            );
            // The next one holds the flush and sends its own frame.
            assert!(pending(&mut next));
            assert_eq!(wire.queued().last(), Some(&ack(t, false)));
            current = next;
        }
        wire.write_all(true);
        assert!(ready(&mut current).is_ok());
        assert_eq!(wire.queued().len() as u64, N);
        assert!(!b.window.lock().unwrap().flushing);
    }

    #[test]
    fn a_flusher_dropped_mid_round_leaves_nothing_taken_and_unsent() {
        let (b, wire) = batcher(3);
        // A requeue-nack: if its frame were taken and not sent, a later
        // multiple-ack would ack the message instead of requeueing it.
        let mut a = Box::pin(b.settle(1, Settle::Nack { requeue: true }));
        assert!(pending(&mut a));
        let mut c2 = Box::pin(b.settle(2, Settle::Ack));
        assert!(pending(&mut c2));
        drop(a); // e.g. the caller's timeout
        assert_eq!(
            wire.queued(),
            vec![Frame::Nack {
                tag: 1,
                requeue: true
            }],
            "the nack was queued when it was taken"
        );
        // 2 was handed the flush by the dropped flusher.
        assert!(pending(&mut c2));
        let mut c3 = Box::pin(b.settle(3, Settle::Ack));
        assert!(pending(&mut c3));
        wire.write_all(true);
        assert!(ready(&mut c2).is_ok());
        assert!(pending(&mut c3));
        wire.write_all(true);
        assert!(ready(&mut c3).is_ok());
        assert_eq!(
            wire.queued(),
            vec![
                Frame::Nack {
                    tag: 1,
                    requeue: true
                },
                ack(2, false),
                ack(3, false),
            ]
        );
    }

    #[test]
    fn a_waiter_learns_its_write_even_if_the_flusher_that_sent_it_is_dropped() {
        let (b, wire) = batcher(3);
        let mut a = Box::pin(b.settle(1, Settle::Ack));
        assert!(pending(&mut a));
        let mut c2 = Box::pin(b.settle(2, Settle::Ack));
        let mut c3 = Box::pin(b.settle(3, Settle::Ack));
        assert!(pending(&mut c2) && pending(&mut c3));
        wire.write_all(true);
        assert!(ready(&mut a).is_ok());
        assert!(pending(&mut c2)); // flushes ack(3, multiple), carrying 3 too
        drop(c2);
        assert!(pending(&mut c3));
        wire.write_all(true);
        assert!(ready(&mut c3).is_ok());
        assert!(!b.window.lock().unwrap().flushing);
    }
}
