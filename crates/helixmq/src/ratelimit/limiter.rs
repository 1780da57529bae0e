//! One subscription's limiter: takes a permit (and token chunks) before each
//! handler start, hears pauses, and — while it holds the key's lease — mints
//! the permits for every sharer.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::Histogram;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::RateLimit;
use crate::backend::{Backend, ConnectionState, Delivery, DeliveryStream, Outgoing};
use crate::error::Result;
use crate::message::{DeliveryMode, Message};
use crate::metrics::{Metrics, RateLimitLabel};
use crate::topology::Names;

/// The refiller publishes at most this often (several permits at once above
/// that rate) and at least this often (a pause's end is seen within it).
const MIN_TICK: Duration = Duration::from_millis(5);
const MAX_TICK: Duration = Duration::from_millis(250);

/// A delivery stream shared by the worker tasks of one subscription; the
/// tokio mutex is fair, so waiting workers take permits in turn.
type Shared = tokio::sync::Mutex<Box<dyn DeliveryStream>>;

/// One subscription's share of a rate limit.
pub(crate) struct Limiter {
    spec: RateLimit,
    backend: Arc<dyn Backend>,
    names: Names,
    /// This limiter's pause listener queue, deleted when it closes.
    listener: String,
    publish_timeout: Duration,
    /// Request permits (prefetch 1).
    permits: Shared,
    /// Token chunks (prefetch 1), when tokens are limited.
    tokens: Option<Shared>,
    /// Tokens taken from the pool and not yet spent (negative: owed to it).
    credit: Mutex<i64>,
    /// Paused until then (a handler's retry-after, heard by every sharer).
    paused: watch::Sender<Option<Instant>>,
    /// Set when a permit stream failed for good; the subscription fails with it.
    failure: Mutex<Option<String>>,
    wait: Histogram,
    stop: CancellationToken,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl std::fmt::Debug for Limiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Limiter").field("spec", &self.spec).finish()
    }
}

/// What a start took from the pool, given back to [`Limiter::reconcile`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct Taken {
    /// The tokens reserved for this start.
    estimate: u64,
}

impl Limiter {
    /// Declare the key's queues and this limiter's listener, start consuming
    /// permits, pauses and the lease.
    pub(crate) async fn start(
        spec: RateLimit,
        backend: Arc<dyn Backend>,
        names: Names,
        metrics: &Metrics,
        publish_timeout: Duration,
    ) -> Result<Arc<Self>> {
        spec.validate()?;
        let member = uuid::Uuid::now_v7().simple().to_string();
        backend.declare(&spec.topology(&names, &member)).await?;
        let key = spec.key.clone();
        let listener_q = names.rate_limit_listener(&key, &member);
        let tag = |what: &str| format!("helixmq-ratelimit-{key}-{what}-{member}");
        let permits = backend
            .consume(&names.rate_limit_permits(&key), 1, &tag("permits"))
            .await?;
        let tokens = match spec.tokens_per_minute {
            Some(_) => Some(tokio::sync::Mutex::new(
                backend
                    .consume(&names.rate_limit_tokens(&key), 1, &tag("tokens"))
                    .await?,
            )),
            None => None,
        };
        let listener = backend.consume(&listener_q, 16, &tag("pause")).await?;
        let lease = backend
            .consume(&names.rate_limit_lease(&key), 1, &tag("lease"))
            .await?;
        let label = RateLimitLabel { key: key.clone() };
        let limiter = Arc::new(Limiter {
            spec,
            backend,
            names,
            listener: listener_q,
            publish_timeout,
            permits: tokio::sync::Mutex::new(permits),
            tokens,
            credit: Mutex::new(0),
            paused: watch::channel(None).0,
            failure: Mutex::new(None),
            wait: metrics.rate_limit_wait.get_or_create(&label).clone(),
            stop: CancellationToken::new(),
            task: Mutex::new(None),
        });
        let counters = Counters {
            minted: metrics
                .rate_limit_permits_minted
                .get_or_create(&label)
                .clone(),
            pauses: metrics.rate_limit_pauses.get_or_create(&label).clone(),
        };
        let task = tokio::spawn(background(limiter.clone(), listener, lease, counters));
        *limiter.task.lock().unwrap() = Some(task);
        Ok(limiter)
    }

    /// The key.
    pub(crate) fn key(&self) -> &str {
        &self.spec.key
    }

    /// Why the limiter stopped taking permits, if it did.
    pub(crate) fn failure(&self) -> Option<String> {
        self.failure.lock().unwrap().clone()
    }

    /// Wait for a permit (and `estimate` tokens), not during a pause; `None`
    /// when `halt` fired first or the permits cannot be taken any more
    /// ([`Limiter::failure`] says why). The permit is acked here, as the
    /// handler starts: a process that dies before gives it back.
    pub(crate) async fn acquire(&self, estimate: u64, halt: &CancellationToken) -> Option<Taken> {
        let started = Instant::now();
        self.wait_pause(halt).await?;
        let mut permits = tokio::select! {
            _ = halt.cancelled() => return None,
            p = self.permits.lock() => p,
        };
        let permit = self.next(&mut permits, halt).await?;
        if let (Some(tokens), Some(chunk)) = (&self.tokens, self.spec.token_chunk()) {
            let mut tokens = tokio::select! {
                _ = halt.cancelled() => return None,
                t = tokens.lock() => t,
            };
            // Chunks are acked as they come (the consumer's prefetch is 1) and
            // kept as credit: a start cut short by `halt` leaves them for the next.
            while *self.credit.lock().unwrap() < estimate as i64 {
                let d = self.next(&mut tokens, halt).await?;
                ack(&d, &self.spec.key).await;
                *self.credit.lock().unwrap() += chunk as i64;
            }
            *self.credit.lock().unwrap() -= estimate as i64;
        }
        // A pause heard while waiting holds this start back too.
        self.wait_pause(halt).await?;
        drop(permits);
        ack(&permit, &self.spec.key).await;
        self.wait.observe(started.elapsed().as_secs_f64());
        Some(Taken { estimate })
    }

    async fn next(
        &self,
        stream: &mut Box<dyn DeliveryStream>,
        halt: &CancellationToken,
    ) -> Option<Delivery> {
        let got = tokio::select! {
            _ = halt.cancelled() => return None,
            d = stream.next() => d,
        };
        match got {
            Some(Ok(d)) => Some(d),
            Some(Err(e)) => {
                self.fail(format!("rate limit {}: {e}", self.spec.key));
                None
            }
            None => {
                self.fail(format!(
                    "rate limit {}: permit consumer ended",
                    self.spec.key
                ));
                None
            }
        }
    }

    fn fail(&self, why: String) {
        tracing::error!(key = %self.spec.key, error = %why, "rate limit permits lost");
        self.failure.lock().unwrap().get_or_insert(why);
    }

    async fn wait_pause(&self, halt: &CancellationToken) -> Option<()> {
        let mut rx = self.paused.subscribe();
        loop {
            let until = *rx.borrow_and_update();
            match until {
                Some(t) if t > Instant::now() => tokio::select! {
                    _ = halt.cancelled() => return None,
                    _ = tokio::time::sleep_until(t.into()) => {}
                    _ = rx.changed() => {}
                },
                _ => return Some(()),
            }
        }
    }

    /// After the handler: the tokens it really used (`None`: as estimated).
    /// Whole chunks of what was over-reserved go back to the pool; an overrun
    /// is owed, taken before this subscription's next start.
    pub(crate) async fn reconcile(&self, taken: Taken, used: Option<u64>) {
        let Some(chunk) = self.spec.token_chunk() else {
            return;
        };
        let used = used.unwrap_or(taken.estimate);
        let give_back = {
            let mut credit = self.credit.lock().unwrap();
            *credit += taken.estimate as i64 - used as i64;
            let n = (*credit / chunk as i64).max(0) as u64;
            *credit -= (n * chunk) as i64;
            n
        };
        if give_back > 0 {
            let key = format!("{}.tokens", self.spec.key);
            if let Err(e) = self.mint(&key, give_back).await {
                tracing::debug!(key = %self.spec.key, error = %e, "token chunks not given back");
            }
        }
    }

    /// A handler said "retry after `delay`": pause this key for every sharer.
    /// This limiter waits at once; the others when they hear it (the refiller
    /// purges the permits and mints none until then).
    pub(crate) async fn pause_all(&self, delay: Duration) {
        self.pause_local(delay);
        let body = delay.as_millis().to_string();
        let m = Message::new(body.into_bytes()).with_kind("ratelimit.pause");
        let out = Outgoing {
            exchange: &self.names.rate_limit_exchange(),
            routing_key: &format!("{}.pause", self.spec.key),
            mandatory: true,
            message: std::borrow::Cow::Owned(transient(m)),
        };
        if let Err(e) = self.backend.publish(out, self.publish_timeout).await {
            tracing::warn!(key = %self.spec.key, error = %e, "pause not sent to the other workers");
        }
    }

    fn pause_local(&self, delay: Duration) {
        let until = Instant::now() + delay;
        self.paused.send_if_modified(|p| match p {
            Some(t) if *t >= until => false,
            _ => {
                *p = Some(until);
                true
            }
        });
    }

    fn paused_until(&self) -> Option<Instant> {
        (*self.paused.borrow()).filter(|t| *t > Instant::now())
    }

    /// Publish `n` permit (or chunk) messages under `routing_key`.
    async fn mint(&self, routing_key: &str, n: u64) -> Result<()> {
        let x = self.names.rate_limit_exchange();
        let m = transient(Message::new(Vec::new()).with_kind("ratelimit.permit"));
        let outs: Vec<Outgoing<'_>> = (0..n)
            .map(|_| Outgoing {
                exchange: &x,
                routing_key,
                mandatory: true,
                message: std::borrow::Cow::Borrowed(&m),
            })
            .collect();
        for r in self
            .backend
            .publish_batch(&outs, self.publish_timeout)
            .await
        {
            r?;
        }
        Ok(())
    }

    /// Stop: give the lease back, stop hearing pauses, remove the listener.
    pub(crate) async fn close(&self) {
        self.stop.cancel();
        let task = self.task.lock().unwrap().take();
        if let Some(t) = task {
            let _ = t.await;
        }
        if let Err(e) = self.backend.delete_queue(&self.listener).await {
            tracing::debug!(queue = %self.listener, error = %e, "pause listener not deleted (it expires)");
        }
    }
}

impl Drop for Limiter {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Take a permit or chunk for good. If the ack is lost with the channel, the
/// broker requeues it: that one start is not counted against the limit (at
/// most one per channel loss).
async fn ack(d: &Delivery, key: &str) {
    if let Err(e) = d.acker.ack().await {
        tracing::debug!(key = %key, error = %e, "permit ack failed");
    }
}

fn transient(mut m: Message) -> Message {
    m.delivery_mode = DeliveryMode::Transient;
    m
}

struct Counters {
    minted: Counter,
    pauses: Counter,
}

/// The refiller's bookkeeping while it holds the lease.
struct Refill {
    /// The lease token, held unacked: the broker hands it on if we go.
    lease: Delivery,
    /// Minting counts from here (the lease's start, or a pause's end).
    since: Instant,
    permits: u64,
    chunks: u64,
}

impl Refill {
    fn restart(&mut self, at: Instant) {
        self.since = at;
        self.permits = 0;
        self.chunks = 0;
    }
}

/// Hears pauses; takes the lease when the broker hands it over and mints
/// while it holds it; gives it back when the connection goes or on close.
async fn background(
    l: Arc<Limiter>,
    mut listener: Box<dyn DeliveryStream>,
    mut lease: Box<dyn DeliveryStream>,
    c: Counters,
) {
    let key = l.spec.key.clone();
    let mut state = l.backend.state();
    state.borrow_and_update();
    offer_lease(&l).await;
    let per_minute = l.spec.requests_per_minute as f64;
    let tick = Duration::from_secs_f64(60.0 / per_minute).clamp(MIN_TICK, MAX_TICK);
    let mut interval = tokio::time::interval(tick);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut refill: Option<Refill> = None;
    loop {
        tokio::select! {
            biased;
            _ = l.stop.cancelled() => break,
            changed = state.changed() => {
                if changed.is_err() {
                    break;
                }
                let s = *state.borrow_and_update();
                match s {
                    ConnectionState::Connected => offer_lease(&l).await,
                    ConnectionState::Blocked => {}
                    ConnectionState::Disconnected | ConnectionState::Closed => {
                        // The broker requeues the lease with the connection; a
                        // refiller that went on after reconnecting would mint twice.
                        if refill.take().is_some() {
                            tracing::info!(key = %key, "rate limit refiller lease lost with the connection");
                        }
                    }
                }
            }
            d = listener.next() => match d {
                Some(Ok(d)) => {
                    let ms = std::str::from_utf8(&d.message.payload).ok().and_then(|s| s.parse::<u64>().ok());
                    let _ = d.acker.ack().await;
                    let Some(ms) = ms else { continue };
                    c.pauses.inc();
                    l.pause_local(Duration::from_millis(ms));
                    if let (Some(r), Some(until)) = (&mut refill, l.paused_until()) {
                        r.restart(until);
                        purge(&l).await;
                    }
                }
                Some(Err(e)) => {
                    tracing::warn!(key = %key, error = %e, "rate limit pause listener ended");
                    break;
                }
                None => break,
            },
            d = lease.next(), if refill.is_none() => match d {
                Some(Ok(d)) => {
                    tracing::info!(key = %key, "rate limit refiller lease taken");
                    let since = l.paused_until().unwrap_or_else(Instant::now);
                    refill = Some(Refill { lease: d, since, permits: 0, chunks: 0 });
                }
                Some(Err(e)) => {
                    tracing::warn!(key = %key, error = %e, "rate limit lease consumer ended");
                    break;
                }
                None => break,
            },
            _ = interval.tick(), if refill.is_some() => {
                if let Some(r) = &mut refill {
                    mint_due(&l, r, &c, tick).await;
                }
            }
        }
    }
    if let Some(r) = refill.take() {
        // Hand the lease on at once rather than when the channel closes.
        let _ = r.lease.acker.nack(true).await;
    }
    let _ = lease.cancel().await;
    let _ = listener.cancel().await;
}

/// Mint what is due since `r.since` at the limit's rates. A late tick (a
/// loaded machine, a slow confirm) mints everything due; only a refiller that
/// fell further behind than two ticks forfeits the rest, so it does not catch
/// up with a flood.
async fn mint_due(l: &Limiter, r: &mut Refill, c: &Counters, tick: Duration) {
    let now = Instant::now();
    if l.paused_until().is_some() || now < r.since {
        return;
    }
    let elapsed = now.duration_since(r.since);
    let (burst, grace) = (l.spec.burst_permits() as u64, 2 * tick);
    let rate = l.spec.requests_per_minute as f64;
    let permits = due(elapsed, rate, burst, grace, &mut r.permits);
    let chunks = l
        .spec
        .chunks_per_minute()
        .map_or(0, |rate| due(elapsed, rate, burst, grace, &mut r.chunks));
    let key = &l.spec.key;
    if permits > 0 {
        match l.mint(&format!("{key}.permit"), permits).await {
            Ok(()) => {
                c.minted.inc_by(permits);
            }
            // Not minted is not lent: the limit errs on the slow side.
            Err(e) => tracing::warn!(key = %key, error = %e, "permits not minted"),
        }
    }
    if chunks > 0 {
        if let Err(e) = l.mint(&format!("{key}.tokens"), chunks).await {
            tracing::warn!(key = %key, error = %e, "token chunks not minted");
        }
    }
}

/// How many of a rate's permits to mint now, `elapsed` after the start with
/// `done` minted: all that fell due, but at most `burst` plus what fell due
/// within `grace` (the rest is forfeited for good).
fn due(elapsed: Duration, per_minute: f64, burst: u64, grace: Duration, done: &mut u64) -> u64 {
    let total = (elapsed.as_secs_f64() / 60.0 * per_minute).floor() as u64;
    let most = burst + (grace.as_secs_f64() / 60.0 * per_minute).ceil() as u64;
    let mut n = total.saturating_sub(*done);
    if n > most {
        *done += n - most;
        n = most;
    }
    *done += n;
    n
}

/// Put a lease token in the lease queue (`x-max-length` 1 keeps one ready
/// however many sharers offer one), so a refiller is elected even after the
/// broker lost the queue's messages.
async fn offer_lease(l: &Limiter) {
    let m = Message::new(Vec::new()).with_kind("ratelimit.lease");
    let out = Outgoing {
        exchange: &l.names.rate_limit_exchange(),
        routing_key: &format!("{}.lease", l.spec.key),
        mandatory: true,
        message: std::borrow::Cow::Owned(m),
    };
    if let Err(e) = l.backend.publish(out, l.publish_timeout).await {
        tracing::warn!(key = %l.spec.key, error = %e, "lease token not offered");
    }
}

/// A pause began: drop the permits and chunks waiting, so none is used
/// before its end.
async fn purge(l: &Limiter) {
    let key = &l.spec.key;
    let mut queues = vec![l.names.rate_limit_permits(key)];
    if l.tokens.is_some() {
        queues.push(l.names.rate_limit_tokens(key));
    }
    for q in queues {
        if let Err(e) = l.backend.purge(&q).await {
            tracing::warn!(queue = %q, error = %e, "permits not purged for the pause");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TICK: Duration = Duration::from_millis(100);

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn late_ticks_lose_no_permit() {
        // 600/min with burst 1 and 100 ms ticks, each tick up to 90 ms late
        // (a loaded machine; the phase against `since` is arbitrary).
        let mut done = 0;
        let mut minted = 0;
        for k in 1..=100u64 {
            let late = (k * 37) % 91;
            minted += due(ms(k * 100 + 95 + late), 600.0, 1, 2 * TICK, &mut done);
        }
        minted += due(ms(10_195), 600.0, 1, 2 * TICK, &mut done);
        assert_eq!(minted, 101, "every permit due by 10.195 s");
    }

    #[test]
    fn a_stall_mints_at_most_the_burst_and_two_ticks() {
        let mut done = 0;
        assert_eq!(due(ms(1_000), 600.0, 1, 2 * TICK, &mut done), 3);
        assert_eq!(done, 10, "what fell due before the stall is forfeited");
        assert_eq!(due(ms(1_100), 600.0, 1, 2 * TICK, &mut done), 1);
        // Slow rates: 5/min fall due every 12 s; a 250 ms tick's grace adds one.
        let mut done = 0;
        assert_eq!(due(ms(600_000), 5.0, 1, ms(500), &mut done), 2);
    }
}
