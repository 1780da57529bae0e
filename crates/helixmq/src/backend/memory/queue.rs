//! One queue of the embedded broker: ready messages by priority, the consumers
//! attached with their prefetch windows, and the deliveries not yet settled.
//!
//! Everything here runs under the broker's one lock and never blocks. Side
//! effects that reach other queues (dead letters) and the expiry timer are
//! collected in [`Effects`] and applied by the caller once this queue is done.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::Notify;

use crate::message::Message;
use crate::topology::{Overflow, Queue};

/// A message held by a queue, with what the broker knows about its trip.
#[derive(Debug, Clone)]
pub(super) struct Stored {
    /// The message as published, never encoded; shared by every queue a
    /// publish reached (a dead-lettered copy is made only when it changes).
    pub msg: Arc<Message>,
    /// Exchange it was published (or dead-lettered) to.
    pub exchange: Arc<str>,
    /// Routing key it was published (or dead-lettered) with.
    pub routing_key: Arc<str>,
    /// When it expires, from the queue TTL or the message expiration.
    pub expires_at: Option<Instant>,
    /// Delivered before and returned unsettled.
    pub redelivered: bool,
}

/// Why a message leaves a queue for its dead-letter exchange (RabbitMQ's words).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Reason {
    /// TTL ran out.
    Expired,
    /// Nacked or rejected without requeue.
    Rejected,
    /// Dropped from the head of a full queue.
    MaxLen,
}

impl Reason {
    pub(super) fn as_str(self) -> &'static str {
        match self {
            Reason::Expired => "expired",
            Reason::Rejected => "rejected",
            Reason::MaxLen => "maxlen",
        }
    }
}

/// A message on its way from a queue to that queue's dead-letter exchange.
#[derive(Debug)]
pub(super) struct DeadLetter {
    pub stored: Stored,
    pub queue: Arc<str>,
    pub reason: Reason,
    pub exchange: Arc<str>,
    pub routing_key: Option<Arc<str>>,
}

/// What one operation caused beyond the queue it touched.
#[derive(Debug, Default)]
pub(super) struct Effects {
    now: Option<Instant>,
    /// Dead letters to route once the queue borrow ends.
    pub dead: Vec<DeadLetter>,
    /// Earliest expiry of a message that became the head of a priority level.
    pub wake_at: Option<Instant>,
}

impl Effects {
    /// The operation's clock, read at most once (most operations never need it).
    pub(super) fn now(&mut self) -> Instant {
        *self.now.get_or_insert_with(Instant::now)
    }
    fn head(&mut self, s: Option<&Stored>) {
        if let Some(at) = s.and_then(|s| s.expires_at) {
            self.wake(at);
        }
    }
    fn wake(&mut self, at: Instant) {
        self.wake_at = Some(self.wake_at.map_or(at, |w| w.min(at)));
    }
}

/// Who holds an unsettled delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Holder {
    /// A consumer, by id.
    Consumer(u64),
    /// A `basic.get`.
    Get,
}

/// How a delivery is settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Settle {
    Ack,
    Requeue,
    Reject,
}

/// A consumer attached to the queue.
#[derive(Debug)]
struct ConsumerSlot {
    id: u64,
    /// Unsettled deliveries allowed (0 = no limit, as in AMQP).
    prefetch: usize,
    /// Pushed to the consumer, not yet taken by its stream (bounded by prefetch).
    buffer: VecDeque<Stored>,
    /// Taken, awaiting ack/nack, by delivery tag (ordered: requeue keeps order).
    unacked: BTreeMap<u64, Stored>,
    /// Wakes the stream when its buffer stops being empty.
    notify: Arc<Notify>,
    /// `basic.cancel`led: gets nothing new, may still settle.
    cancelled: bool,
}

impl ConsumerSlot {
    fn has_room(&self) -> bool {
        !self.cancelled
            && (self.prefetch == 0 || self.buffer.len() + self.unacked.len() < self.prefetch)
    }
    fn push(&mut self, s: Stored) {
        self.buffer.push_back(s);
        if self.buffer.len() == 1 {
            self.notify.notify_one();
        }
    }
}

/// What a consumer's stream finds when it looks. (Transient: boxing the
/// message would cost an allocation per delivery.)
#[derive(Debug)]
#[allow(clippy::large_enum_variant)]
pub(super) enum Take {
    /// A delivery: the message copy, its route, the redelivered flag, its tag.
    Delivery {
        msg: Arc<Message>,
        exchange: Arc<str>,
        routing_key: Arc<str>,
        redelivered: bool,
        tag: u64,
    },
    /// Nothing yet.
    Empty,
    /// The consumer was cancelled by its owner.
    Cancelled,
}

/// A declared queue.
#[derive(Debug)]
pub(super) struct QueueState {
    /// Distinguishes this queue from a later one of the same name.
    pub uid: u64,
    pub name: Arc<str>,
    /// As declared; compared on re-declare.
    pub def: Queue,
    /// Ready messages, one FIFO per priority level (index = priority).
    levels: Vec<VecDeque<Stored>>,
    ready: usize,
    consumers: Vec<ConsumerSlot>,
    /// Round-robin cursor over `consumers`.
    rr: usize,
    next_tag: u64,
    /// `basic.get` deliveries awaiting settlement.
    got: BTreeMap<u64, Stored>,
    dlx: Option<(Arc<str>, Option<Arc<str>>)>,
    /// With `x-expires`: since when the queue has been unused (no consumer,
    /// no `basic.get`, no redeclare); `None` while a consumer is attached.
    unused_since: Option<Instant>,
}

impl QueueState {
    pub(super) fn new(uid: u64, def: &Queue) -> Self {
        let levels = def.max_priority.map_or(1, |m| m as usize + 1);
        QueueState {
            uid,
            name: Arc::from(def.name.as_str()),
            def: def.clone(),
            levels: (0..levels).map(|_| VecDeque::new()).collect(),
            ready: 0,
            consumers: Vec::new(),
            rr: 0,
            next_tag: 0,
            got: BTreeMap::new(),
            unused_since: def.expires.map(|_| Instant::now()),
            dlx: def.dead_letter_exchange.as_ref().map(|x| {
                (
                    Arc::from(x.as_str()),
                    def.dead_letter_routing_key.as_deref().map(Arc::from),
                )
            }),
        }
    }

    /// Ready messages.
    pub(super) fn ready(&self) -> usize {
        self.ready
    }

    /// `x-expires`: the queue was used now (a `basic.get`, a redeclare).
    pub(super) fn touch(&mut self, fx: &mut Effects) {
        if self.unused_since.is_some() {
            self.unused(fx);
        }
    }

    /// `x-expires`: unused from now on; the timer must wake when it expires.
    fn unused(&mut self, fx: &mut Effects) {
        if let Some(after) = self.def.expires {
            let now = fx.now();
            self.unused_since = Some(now);
            fx.wake(now + after);
        }
    }

    /// `x-expires`: when this queue is to be deleted, if it stays unused.
    pub(super) fn expires_at(&self) -> Option<Instant> {
        Some(self.unused_since? + self.def.expires?)
    }

    /// Consumers receiving messages.
    pub(super) fn active_consumers(&self) -> usize {
        self.consumers.iter().filter(|c| !c.cancelled).count()
    }

    /// Accept a freshly published (or dead-lettered) message. `false` when the
    /// queue is full with `reject-publish`: the publisher gets a nack.
    pub(super) fn enqueue(&mut self, mut s: Stored, fx: &mut Effects) -> bool {
        let ttl = match (self.def.message_ttl, s.msg.expiration) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        s.expires_at = ttl.map(|t| fx.now() + t);
        s.redelivered = false;
        // An idle consumer gets it at once: the message never becomes ready, so
        // max-length does not apply (it counts ready messages), and nothing
        // expires once delivered; the expiry still holds if it is requeued.
        if self.ready == 0 {
            if let Some(i) = self.pick_consumer() {
                self.consumers[i].push(s);
                return true;
            }
        }
        let max = self.def.max_length.map(|m| m as usize);
        let overflow = self.def.overflow.unwrap_or(Overflow::DropHead);
        if let Some(max) = max {
            if overflow == Overflow::RejectPublish && self.ready >= max {
                return false;
            }
        }
        let level = self.level(&s.msg);
        let q = &mut self.levels[level];
        q.push_back(s);
        if q.len() == 1 {
            fx.head(q.front());
        }
        self.ready += 1;
        if let Some(max) = max.filter(|m| self.ready > *m) {
            // Expired heads go first (as expired), so they are not counted as
            // overflow and a live message is not dropped in their place.
            self.expire(fx);
            while self.ready > max {
                match self.pop_head(fx) {
                    Some(head) => self.dead(head, Reason::MaxLen, fx),
                    None => break,
                }
            }
        }
        self.dispatch(fx);
        true
    }

    fn level(&self, m: &Message) -> usize {
        // RabbitMQ caps a priority above the queue's maximum to the maximum.
        m.priority
            .map_or(0, |p| p.value() as usize)
            .min(self.levels.len() - 1)
    }

    /// Put a settled-back message at the head of its level, redelivered.
    fn requeue(&mut self, mut s: Stored, redelivered: bool, fx: &mut Effects) {
        s.redelivered |= redelivered;
        let level = self.level(&s.msg);
        self.levels[level].push_front(s);
        fx.head(self.levels[level].front());
        self.ready += 1;
    }

    /// The next message to deliver: highest priority, oldest first. Expired
    /// heads met on the way are dead-lettered (lazy expiry at the head).
    fn pop_head(&mut self, fx: &mut Effects) -> Option<Stored> {
        for level in (0..self.levels.len()).rev() {
            while let Some(s) = self.levels[level].pop_front() {
                self.ready -= 1;
                fx.head(self.levels[level].front());
                if s.expires_at.is_some_and(|at| at <= fx.now()) {
                    self.dead(s, Reason::Expired, fx);
                } else {
                    return Some(s);
                }
            }
        }
        None
    }

    /// Dead-letter every expired head; the earliest expiry still pending.
    pub(super) fn expire(&mut self, fx: &mut Effects) -> Option<Instant> {
        let mut next: Option<Instant> = None;
        for level in 0..self.levels.len() {
            while let Some(at) = self.levels[level].front().and_then(|s| s.expires_at) {
                if at > fx.now() {
                    next = Some(next.map_or(at, |n| n.min(at)));
                    break;
                }
                let Some(s) = self.levels[level].pop_front() else {
                    break;
                };
                self.ready -= 1;
                self.dead(s, Reason::Expired, fx);
            }
        }
        next
    }

    fn dead(&self, mut s: Stored, reason: Reason, fx: &mut Effects) {
        // Without a dead-letter exchange the message is dropped, as in AMQP.
        if let Some((exchange, routing_key)) = &self.dlx {
            s.expires_at = None;
            fx.dead.push(DeadLetter {
                stored: s,
                queue: self.name.clone(),
                reason,
                exchange: exchange.clone(),
                routing_key: routing_key.clone(),
            });
        }
    }

    fn pick_consumer(&mut self) -> Option<usize> {
        if self.def.single_active_consumer {
            // Only the oldest consumer still attached receives; the others wait
            // until it goes (RabbitMQ's single active consumer).
            let i = self.consumers.iter().position(|c| !c.cancelled)?;
            return self.consumers[i].has_room().then_some(i);
        }
        let n = self.consumers.len();
        for k in 0..n {
            let i = (self.rr + k) % n;
            if self.consumers[i].has_room() {
                self.rr = i + 1;
                return Some(i);
            }
        }
        None
    }

    /// Hand ready messages to consumers with room, round-robin.
    fn dispatch(&mut self, fx: &mut Effects) {
        while self.ready > 0 {
            let Some(i) = self.pick_consumer() else { break };
            let Some(s) = self.pop_head(fx) else { break };
            self.consumers[i].push(s);
        }
    }

    /// Attach a consumer and fill its window.
    pub(super) fn add_consumer(
        &mut self,
        id: u64,
        prefetch: u16,
        notify: Arc<Notify>,
        fx: &mut Effects,
    ) {
        self.consumers.push(ConsumerSlot {
            id,
            prefetch: prefetch as usize,
            buffer: VecDeque::new(),
            unacked: BTreeMap::new(),
            notify,
            cancelled: false,
        });
        self.unused_since = None;
        self.dispatch(fx);
    }

    /// Stop delivering to a consumer; what it has not taken yet goes back.
    pub(super) fn cancel_consumer(&mut self, id: u64, fx: &mut Effects) {
        let Some(c) = self.consumers.iter_mut().find(|c| c.id == id) else {
            return;
        };
        c.cancelled = true;
        let pending = std::mem::take(&mut c.buffer);
        for s in pending.into_iter().rev() {
            self.requeue(s, false, fx);
        }
        if self.active_consumers() == 0 {
            self.unused(fx);
        }
        self.dispatch(fx);
    }

    /// Detach a consumer (its stream was dropped): every delivery it had not
    /// settled returns to the queue, redelivered, in its original order.
    pub(super) fn remove_consumer(&mut self, id: u64, fx: &mut Effects) {
        let Some(i) = self.consumers.iter().position(|c| c.id == id) else {
            return;
        };
        let c = self.consumers.remove(i);
        if self.rr > i {
            self.rr -= 1;
        }
        for s in c.buffer.into_iter().rev() {
            self.requeue(s, false, fx);
        }
        for (_, s) in c.unacked.into_iter().rev() {
            self.requeue(s, true, fx);
        }
        if self.active_consumers() == 0 {
            self.unused(fx);
        }
        self.dispatch(fx);
    }

    /// The consumer's next delivery, if one was pushed to it.
    pub(super) fn take(&mut self, id: u64) -> Option<Take> {
        let c = self.consumers.iter_mut().find(|c| c.id == id)?;
        if c.cancelled {
            return Some(Take::Cancelled);
        }
        let Some(s) = c.buffer.pop_front() else {
            return Some(Take::Empty);
        };
        self.next_tag += 1;
        let tag = self.next_tag;
        let take = Take::Delivery {
            msg: s.msg.clone(),
            exchange: s.exchange.clone(),
            routing_key: s.routing_key.clone(),
            redelivered: s.redelivered,
            tag,
        };
        c.unacked.insert(tag, s);
        Some(take)
    }

    /// `basic.get`: the next ready message, held unsettled under a tag.
    pub(super) fn get(&mut self, fx: &mut Effects) -> Option<(Stored, u64)> {
        self.touch(fx);
        let s = self.pop_head(fx)?;
        self.next_tag += 1;
        self.got.insert(self.next_tag, s.clone());
        Some((s, self.next_tag))
    }

    /// Settle one delivery. `false` if the tag is unknown (already settled,
    /// or its consumer is gone and it was requeued).
    pub(super) fn settle(
        &mut self,
        holder: Holder,
        tag: u64,
        how: Settle,
        fx: &mut Effects,
    ) -> bool {
        let s = match holder {
            Holder::Get => self.got.remove(&tag),
            Holder::Consumer(id) => self
                .consumers
                .iter_mut()
                .find(|c| c.id == id)
                .and_then(|c| c.unacked.remove(&tag)),
        };
        let Some(s) = s else { return false };
        match how {
            Settle::Ack => {}
            Settle::Requeue => self.requeue(s, true, fx),
            Settle::Reject => self.dead(s, Reason::Rejected, fx),
        }
        self.dispatch(fx);
        true
    }

    /// Drop every ready message; how many.
    pub(super) fn purge(&mut self) -> usize {
        let n = self.ready;
        self.levels.iter_mut().for_each(VecDeque::clear);
        self.ready = 0;
        n
    }

    /// The queue is deleted: wake its consumers so they see it gone.
    pub(super) fn wake_all(&self) {
        for c in &self.consumers {
            c.notify.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::Priority;
    use std::time::Duration;

    fn stored(id: &str, prio: Option<u8>) -> Stored {
        let mut msg = Message::new("x");
        msg.id = id.into();
        msg.priority = prio.map(|p| Priority::new(p).unwrap());
        Stored {
            msg: Arc::new(msg),
            exchange: "x".into(),
            routing_key: "k".into(),
            expires_at: None,
            redelivered: false,
        }
    }

    fn take_id(q: &mut QueueState, c: u64) -> Option<(String, u64, bool)> {
        match q.take(c)? {
            Take::Delivery {
                msg,
                tag,
                redelivered,
                ..
            } => Some((msg.id.clone(), tag, redelivered)),
            _ => None,
        }
    }

    #[test]
    fn priority_then_fifo() {
        let mut q = QueueState::new(1, &Queue::durable("q").max_priority(10));
        let mut fx = Effects::default();
        for (id, p) in [("a", 1), ("b", 5), ("c", 10), ("d", 5), ("e", 99)] {
            let mut s = stored(id, None);
            Arc::make_mut(&mut s.msg).priority = Some(Priority::new(p.min(10)).unwrap());
            assert!(q.enqueue(s, &mut fx));
        }
        let order: Vec<String> =
            std::iter::from_fn(|| q.get(&mut fx).map(|(s, _)| s.msg.id.clone())).collect();
        assert_eq!(order, ["c", "e", "b", "d", "a"]);
    }

    #[test]
    fn prefetch_round_robin_and_requeue_on_removal() {
        let mut q = QueueState::new(1, &Queue::durable("q"));
        let mut fx = Effects::default();
        q.add_consumer(1, 2, Arc::new(Notify::new()), &mut fx);
        q.add_consumer(2, 2, Arc::new(Notify::new()), &mut fx);
        for i in 0..6 {
            q.enqueue(stored(&i.to_string(), None), &mut fx);
        }
        assert_eq!(q.ready(), 2, "two consumers x prefetch 2 hold four");
        let (a, ta, _) = take_id(&mut q, 1).unwrap();
        let (b, _, _) = take_id(&mut q, 2).unwrap();
        assert_eq!((a.as_str(), b.as_str()), ("0", "1"), "round-robin");
        assert!(q.settle(Holder::Consumer(1), ta, Settle::Ack, &mut fx));
        assert!(
            !q.settle(Holder::Consumer(1), ta, Settle::Ack, &mut fx),
            "double ack refused"
        );
        assert_eq!(q.ready(), 1, "the ack made room for one more");
        // The ack made room: consumer 1 now holds "2" and "4"; "5" is ready.
        assert_eq!(q.ready(), 1);
        q.remove_consumer(2, &mut fx);
        // Consumer 2 had taken "1" and been pushed "3": both back at the head, in
        // order, only "1" marked redelivered (it was handed out).
        let mut seen = Vec::new();
        while let Some((id, tag, redelivered)) = take_id(&mut q, 1) {
            seen.push((id, redelivered));
            assert!(q.settle(Holder::Consumer(1), tag, Settle::Ack, &mut fx));
        }
        let want: Vec<(String, bool)> = [
            ("2", false),
            ("4", false),
            ("1", true),
            ("3", false),
            ("5", false),
        ]
        .iter()
        .map(|(i, r)| (i.to_string(), *r))
        .collect();
        assert_eq!(seen, want);
        assert_eq!(q.ready(), 0);
    }

    #[test]
    fn single_active_consumer_delivers_to_the_oldest_until_it_goes() {
        let mut q = QueueState::new(1, &Queue::durable("q").single_active_consumer());
        let mut fx = Effects::default();
        q.add_consumer(1, 1, Arc::new(Notify::new()), &mut fx);
        q.add_consumer(2, 1, Arc::new(Notify::new()), &mut fx);
        q.enqueue(stored("a", None), &mut fx);
        q.enqueue(stored("b", None), &mut fx);
        let (a, _, _) = take_id(&mut q, 1).unwrap();
        assert_eq!(a, "a");
        assert!(
            take_id(&mut q, 2).is_none(),
            "the second consumer is not active"
        );
        assert_eq!(q.ready(), 1, "b waits for the active consumer's room");
        q.remove_consumer(1, &mut fx);
        let got: Vec<(String, bool)> = std::iter::from_fn(|| {
            let (id, tag, r) = take_id(&mut q, 2)?;
            q.settle(Holder::Consumer(2), tag, Settle::Ack, &mut fx);
            Some((id, r))
        })
        .collect();
        assert_eq!(
            got,
            [("a".to_string(), true), ("b".to_string(), false)],
            "the next consumer takes over, the held message first"
        );
    }

    #[test]
    fn max_length_drop_head_dead_letters_and_reject_publish_refuses() {
        let mut q = QueueState::new(
            1,
            &Queue::durable("q")
                .max_length(2, Overflow::DropHead)
                .dead_letter_to("dlx"),
        );
        let mut fx = Effects::default();
        for i in 0..3 {
            assert!(q.enqueue(stored(&i.to_string(), None), &mut fx));
        }
        assert_eq!(q.ready(), 2);
        assert_eq!(fx.dead.len(), 1);
        assert_eq!(fx.dead[0].stored.msg.id, "0");
        assert_eq!(fx.dead[0].reason, Reason::MaxLen);

        let mut r = QueueState::new(
            2,
            &Queue::durable("r").max_length(1, Overflow::RejectPublish),
        );
        assert!(r.enqueue(stored("a", None), &mut fx));
        assert!(!r.enqueue(stored("b", None), &mut fx));
        assert_eq!(r.ready(), 1);
    }

    #[test]
    fn overflow_expires_before_dropping_live_messages() {
        let mut q = QueueState::new(
            1,
            &Queue::durable("q")
                .max_length(2, Overflow::DropHead)
                .dead_letter_to("dlx"),
        );
        let mut fx = Effects::default();
        let mut gone = stored("gone", None);
        Arc::make_mut(&mut gone.msg).expiration = Some(Duration::ZERO);
        for s in [gone, stored("b", None), stored("c", None)] {
            q.enqueue(s, &mut fx);
        }
        let reasons: Vec<_> = fx
            .dead
            .iter()
            .map(|d| (d.stored.msg.id.as_str(), d.reason))
            .collect();
        assert_eq!(reasons, [("gone", Reason::Expired)]);
        assert_eq!(q.ready(), 2);
    }

    #[test]
    fn ttl_expires_at_head() {
        let mut q = QueueState::new(1, &Queue::durable("q").dead_letter_to("dlx"));
        let mut fx = Effects::default();
        let mut s = stored("short", None);
        Arc::make_mut(&mut s.msg).expiration = Some(Duration::ZERO);
        q.enqueue(s, &mut fx);
        q.enqueue(stored("keep", None), &mut fx);
        assert!(
            fx.wake_at.is_some(),
            "the timer is told about the expiring head"
        );
        let mut fx = Effects::default();
        assert_eq!(q.expire(&mut fx), None);
        assert_eq!(fx.dead.len(), 1);
        assert_eq!(fx.dead[0].reason, Reason::Expired);
        assert_eq!(q.get(&mut fx).unwrap().0.msg.id, "keep");
    }

    #[test]
    fn nack_requeue_sets_redelivered_and_reject_dead_letters() {
        let mut q = QueueState::new(1, &Queue::durable("q").dead_letter_to("dlx"));
        let mut fx = Effects::default();
        q.enqueue(stored("a", None), &mut fx);
        let (_, tag) = q.get(&mut fx).unwrap();
        assert!(q.settle(Holder::Get, tag, Settle::Requeue, &mut fx));
        let (s, tag) = q.get(&mut fx).unwrap();
        assert!(s.redelivered);
        assert!(q.settle(Holder::Get, tag, Settle::Reject, &mut fx));
        assert_eq!(fx.dead.len(), 1);
        assert_eq!(fx.dead[0].reason, Reason::Rejected);
    }
}
