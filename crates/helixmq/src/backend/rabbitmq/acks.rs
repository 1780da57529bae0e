//! Settling deliveries: one by one for `basic.get`, coalesced for consumers.
//!
//! A consumer channel settles through an [`AckBatcher`]: whoever settles while
//! no flush is running becomes the flusher and sends, in delivery order, one
//! `basic.ack(multiple)` for the longest run of finished deliveries at the head
//! of the channel's window, then individual frames for the finished ones behind
//! a delivery still in its handler. Settlements that arrive while a flush is on
//! the wire wait for the next round of the same flusher (group commit: no
//! timer, batches form only under load).
//!
//! Why: every `basic.ack` is a frame the broker must process and a hop into
//! lapin's I/O thread and back. The broker shares this machine's two cores, so
//! halving the frames is throughput. Nothing waits for a slow handler: a
//! delivery behind it is acked on its own in the next round, so prefetch never
//! fills with finished work.
//!
//! Safety of `multiple`: a multiple-ack covers every unsettled tag up to its
//! own. It is only sent for a run in which every delivery is finished with an
//! ack, and every frame of a channel is sent by the one flusher, in order, so
//! a nack or single ack of an earlier tag always precedes a multiple-ack over
//! it. Tags are those of this channel's single consumer, increasing by one; a
//! gap (tags the broker used that never reached the stream) is recorded as an
//! entry that is never settled, so no multiple-ack reaches over it.

use std::collections::VecDeque;
use std::sync::Mutex;

use async_trait::async_trait;
use lapin::options::{BasicAckOptions, BasicNackOptions};

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
#[derive(Debug, PartialEq, Eq)]
enum Frame {
    Ack { tag: u64, multiple: bool },
    Nack { tag: u64, requeue: bool },
}

#[derive(Default)]
struct Window {
    /// Delivered, not yet handed to a flush: (tag, decision), tags increasing.
    pending: VecDeque<(u64, Settle)>,
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
            self.pending.push_back((tag - 1, Settle::Unseen));
        }
        self.last_tag = self.last_tag.max(tag);
        self.pending.push_back((tag, Settle::Open));
    }

    /// Take every decided delivery as frames, in tag order. From the head up
    /// to the first delivery still open, each run of acks becomes one
    /// multiple-ack (a nack between runs goes on its own, before the run after
    /// it); behind the first open delivery every decision is a frame of its own,
    /// since a multiple-ack there would also settle the open one.
    fn take_frames(&mut self) -> Vec<Frame> {
        let mut frames = Vec::new();
        let mut run: Option<(u64, usize)> = None;
        let flush_run = |run: &mut Option<(u64, usize)>, frames: &mut Vec<Frame>| {
            if let Some((tag, n)) = run.take() {
                frames.push(Frame::Ack {
                    tag,
                    multiple: n > 1,
                });
            }
        };
        let mut head = 0;
        while let Some(&(tag, s)) = self.pending.get(head) {
            match s {
                Settle::Open | Settle::Unseen => break,
                Settle::Ack => run = Some((tag, run.map_or(1, |(_, n)| n + 1))),
                Settle::Nack { requeue } => {
                    flush_run(&mut run, &mut frames);
                    frames.push(Frame::Nack { tag, requeue });
                }
            }
            head += 1;
        }
        flush_run(&mut run, &mut frames);
        self.pending.drain(..head);
        self.pending.retain(|&(tag, s)| match s {
            Settle::Open | Settle::Unseen => true,
            Settle::Ack => {
                frames.push(Frame::Ack {
                    tag,
                    multiple: false,
                });
                false
            }
            Settle::Nack { requeue } => {
                frames.push(Frame::Nack { tag, requeue });
                false
            }
        });
        frames
    }
}

/// The settlement window of one consumer channel.
pub(crate) struct AckBatcher {
    chan: lapin::Channel,
    window: Mutex<Window>,
}

impl AckBatcher {
    pub(crate) fn new(chan: lapin::Channel) -> Self {
        AckBatcher {
            chan,
            window: Mutex::new(Window::default()),
        }
    }

    /// Record a delivery as it is yielded (tags arrive in increasing order).
    pub(crate) fn delivered(&self, tag: u64) {
        self.window.lock().unwrap().delivered(tag);
    }

    /// Decide `tag`, then flush unless a flush is already running (it will
    /// take this decision in its next round).
    async fn settle(&self, tag: u64, how: Settle) -> std::result::Result<(), lapin::Error> {
        {
            let mut w = self.window.lock().unwrap();
            if let Ok(i) = w.pending.binary_search_by_key(&tag, |&(t, _)| t) {
                w.pending[i].1 = how;
            }
            if w.flushing {
                return Ok(());
            }
            w.flushing = true;
        }
        // Hands the flush back on every way out, also if this future is dropped
        // mid-flush (a caller's timeout): the next settlement flushes again, and
        // frames taken but never sent only leave their deliveries unacked until
        // the channel closes and RabbitMQ redelivers them.
        let mut guard = FlushGuard {
            window: &self.window,
            armed: true,
        };
        loop {
            let frames = {
                let mut w = self.window.lock().unwrap();
                let frames = w.take_frames();
                if frames.is_empty() {
                    // Under the same lock as the look: a settlement that saw
                    // `flushing` a moment ago is in the frames we just sent.
                    w.flushing = false;
                    guard.armed = false;
                    return Ok(());
                }
                frames
            };
            // Sent in order: lapin queues each frame when its future is first
            // polled, and join_all polls them first in this order.
            let sent = futures::future::join_all(frames.iter().map(|f| async move {
                match *f {
                    Frame::Ack { tag, multiple } => {
                        self.chan.basic_ack(tag, BasicAckOptions { multiple }).await
                    }
                    Frame::Nack { tag, requeue } => {
                        self.chan
                            .basic_nack(
                                tag,
                                BasicNackOptions {
                                    multiple: false,
                                    requeue,
                                },
                            )
                            .await
                    }
                }
            }))
            .await;
            if let Some(e) = sent.into_iter().find_map(|r| r.err()) {
                // The channel is gone: RabbitMQ requeues everything unsettled on
                // it. Leave the window to be dropped with the channel.
                return Err(e);
            }
        }
    }
}

/// Clears [`Window::flushing`] when a flush ends other than by finding nothing
/// left to send (an error, or its future dropped).
struct FlushGuard<'a> {
    window: &'a Mutex<Window>,
    armed: bool,
}

impl Drop for FlushGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            if let Ok(mut w) = self.window.lock() {
                w.flushing = false;
            }
        }
    }
}

/// Settles a consumer delivery through its channel's [`AckBatcher`]. `Ok`
/// means the decision is taken and its frame sent or about to be sent by the
/// running flush; if the channel dies first, RabbitMQ redelivers the message
/// (as it would for an ack lost in flight).
pub(crate) struct BatchedAcker {
    pub(crate) batcher: std::sync::Arc<AckBatcher>,
    pub(crate) tag: u64,
    pub(crate) id: String,
    pub(crate) queue: String,
}

impl BatchedAcker {
    fn outcome(&self, what: &str, r: std::result::Result<(), lapin::Error>) -> Result<()> {
        r.map_err(|e| Error::Amqp {
            context: format!(
                "{what} message {} from queue '{}' (its channel is closed, connection lost?; RabbitMQ will redeliver it)",
                self.id, self.queue
            ),
            source: errors::boxed(e),
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

    fn window(states: &[(u64, Settle)]) -> Window {
        Window {
            pending: states.iter().copied().collect(),
            flushing: false,
            last_tag: states.last().map_or(0, |&(t, _)| t),
        }
    }

    #[test]
    fn a_multiple_ack_never_reaches_over_tags_that_were_never_delivered() {
        let mut w = Window::default();
        for t in [1, 2, 5, 6] {
            w.delivered(t);
        }
        for e in w.pending.iter_mut() {
            if e.1 == Settle::Open {
                e.1 = Settle::Ack;
            }
        }
        // 3 and 4 reached no handler: 5 and 6 are acked one by one.
        assert_eq!(
            w.take_frames(),
            vec![
                Frame::Ack {
                    tag: 2,
                    multiple: true
                },
                Frame::Ack {
                    tag: 5,
                    multiple: false
                },
                Frame::Ack {
                    tag: 6,
                    multiple: false
                },
            ]
        );
        assert_eq!(w.pending, VecDeque::from([(4, Settle::Unseen)]));
    }

    #[test]
    fn a_finished_head_run_is_one_multiple_ack() {
        let mut w = window(&[(1, Settle::Ack), (2, Settle::Ack), (3, Settle::Ack)]);
        assert_eq!(
            w.take_frames(),
            vec![Frame::Ack {
                tag: 3,
                multiple: true
            }]
        );
        assert!(w.pending.is_empty());
    }

    #[test]
    fn a_single_finished_head_is_a_plain_ack() {
        let mut w = window(&[(7, Settle::Ack), (8, Settle::Open)]);
        assert_eq!(
            w.take_frames(),
            vec![Frame::Ack {
                tag: 7,
                multiple: false
            }]
        );
        assert_eq!(w.pending, VecDeque::from([(8, Settle::Open)]));
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
            w.take_frames(),
            vec![
                Frame::Ack {
                    tag: 2,
                    multiple: true
                },
                Frame::Ack {
                    tag: 4,
                    multiple: false
                },
                Frame::Nack {
                    tag: 5,
                    requeue: true
                },
                Frame::Ack {
                    tag: 6,
                    multiple: false
                },
            ]
        );
        assert_eq!(w.pending, VecDeque::from([(3, Settle::Open)]));
        // Once 3 finishes it heads a run again, with what came since.
        w.pending[0].1 = Settle::Ack;
        w.pending.push_back((7, Settle::Ack));
        assert_eq!(
            w.take_frames(),
            vec![Frame::Ack {
                tag: 7,
                multiple: true
            }]
        );
    }

    #[test]
    fn a_nack_splits_runs_and_goes_first() {
        let mut w = window(&[
            (1, Settle::Nack { requeue: false }),
            (2, Settle::Ack),
            (3, Settle::Ack),
        ]);
        assert_eq!(
            w.take_frames(),
            vec![
                Frame::Nack {
                    tag: 1,
                    requeue: false
                },
                Frame::Ack {
                    tag: 3,
                    multiple: true
                },
            ]
        );
    }
}
