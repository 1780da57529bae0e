//! The one TCP proxy between a client and RabbitMQ: it forwards, cuts every
//! socket, black-holes them (stops forwarding without closing anything, like
//! a network partition), refuses (closes every socket and every new one, like
//! a broker that is down), slows them down (added latency, a bandwidth cap)
//! and resumes. Only the connections of the test that owns the proxy go
//! through it, so faults never touch other tests.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// What the proxy does with bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Pass them on.
    Forward,
    /// Hold them: sockets stay open, nothing moves (a silent network partition).
    BlackHole,
    /// Close every connection now and refuse new ones (a broker that is down).
    Refuse,
}

/// How forwarded bytes are slowed down (both directions, every connection).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Shape {
    /// Held this long before each chunk is passed on (per direction).
    pub latency: Duration,
    /// At most this many bytes per second per direction (a slow link); None = no cap.
    pub bytes_per_sec: Option<u64>,
}

/// A running proxy; dropping it stops it and closes every socket it holds.
#[derive(Debug)]
pub struct Proxy {
    addr: SocketAddr,
    mode: watch::Sender<Mode>,
    shape: watch::Sender<Shape>,
    /// Bumped by [`Proxy::cut`]: every connection open at that moment ends.
    cut_epoch: watch::Sender<u64>,
    live: Arc<AtomicUsize>,
    stop: CancellationToken,
}

impl Proxy {
    /// Listen on an ephemeral local port and forward to `upstream`.
    pub async fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy address");
        let (mode, _) = watch::channel(Mode::Forward);
        let (shape, _) = watch::channel(Shape::default());
        let (cut_epoch, _) = watch::channel(0u64);
        let live = Arc::new(AtomicUsize::new(0));
        let stop = CancellationToken::new();
        tokio::spawn(accept_loop(
            listener,
            upstream,
            mode.clone(),
            shape.clone(),
            cut_epoch.clone(),
            live.clone(),
            stop.clone(),
        ));
        Proxy {
            addr,
            mode,
            shape,
            cut_epoch,
            live,
            stop,
        }
    }

    /// The port clients should connect to.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Close every connection open now (both sides see the socket close).
    /// Returns how many were cut.
    pub fn cut(&self) -> usize {
        let n = self.live.load(Ordering::SeqCst);
        self.cut_epoch.send_modify(|e| *e += 1);
        n
    }

    /// Stop forwarding without closing anything; new connections are
    /// accepted but get no answer either.
    pub fn black_hole(&self) {
        self.set(Mode::BlackHole);
    }

    /// Close every connection now and refuse new ones until [`Proxy::resume`].
    pub fn refuse(&self) {
        self.set(Mode::Refuse);
    }

    /// Forward again.
    pub fn resume(&self) {
        self.set(Mode::Forward);
    }

    /// Switch to `mode` (what [`Proxy::black_hole`], [`Proxy::refuse`] and
    /// [`Proxy::resume`] do).
    pub fn set(&self, mode: Mode) {
        self.mode.send_replace(mode);
    }

    /// Slow every connection down as `shape` says (`Shape::default()`: full speed).
    pub fn shape(&self, shape: Shape) {
        self.shape.send_replace(shape);
    }

    /// Connections open through the proxy now.
    pub fn connections(&self) -> usize {
        self.live.load(Ordering::SeqCst)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Owns every connection task: when it ends (cancelled), the `JoinSet` drops
/// and aborts them all, closing their sockets.
async fn accept_loop(
    listener: TcpListener,
    upstream: SocketAddr,
    mode: watch::Sender<Mode>,
    shape: watch::Sender<Shape>,
    cut_epoch: watch::Sender<u64>,
    live: Arc<AtomicUsize>,
    stop: CancellationToken,
) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            accepted = listener.accept() => {
                let Ok((client, _)) = accepted else { continue };
                if *mode.borrow() == Mode::Refuse {
                    drop(client);
                    continue;
                }
                let mode = mode.subscribe();
                let shape = shape.subscribe();
                let cut = cut_epoch.subscribe();
                let live = live.clone();
                conns.spawn(async move {
                    live.fetch_add(1, Ordering::SeqCst);
                    serve(client, upstream, mode, shape, cut).await;
                    live.fetch_sub(1, Ordering::SeqCst);
                });
            }
        }
    }
}

/// One proxied connection: ends (closing both sockets) at EOF on either side,
/// on an I/O error, when the proxy cuts, or when it refuses.
async fn serve(
    client: TcpStream,
    upstream: SocketAddr,
    mode: watch::Receiver<Mode>,
    shape: watch::Receiver<Shape>,
    mut cut: watch::Receiver<u64>,
) {
    cut.borrow_and_update();
    let server = tokio::select! {
        s = TcpStream::connect(upstream) => match s { Ok(s) => s, Err(_) => return },
        _ = cut.changed() => return,
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    let mut refused = mode.clone();
    tokio::select! {
        _ = pump(cr, sw, mode.clone(), shape.clone()) => {}
        _ = pump(sr, cw, mode, shape) => {}
        _ = cut.changed() => {}
        _ = refused.wait_for(|m| *m == Mode::Refuse) => {}
    }
}

/// Copy one direction; while black-holed, bytes already read are held (not
/// written) and nothing more is read; refusing ends it. While shaped, each chunk waits out the
/// latency before it is written, and the time its size takes at the capped
/// rate after (the sleeps are the fault itself: a slow network).
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut mode: watch::Receiver<Mode>,
    shape: watch::Receiver<Shape>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if !forwarding(&mut mode).await {
            return;
        }
        let now = *shape.borrow();
        // Under a bandwidth cap, small chunks: the pause after each stays ~100 ms.
        let chunk = now
            .bytes_per_sec
            .map_or(buf.len(), |r| (r as usize / 10).clamp(512, buf.len()));
        let n = match from.read(&mut buf[..chunk]).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if !now.latency.is_zero() {
            tokio::time::sleep(now.latency).await;
        }
        if !forwarding(&mut mode).await {
            return;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
        if let Some(rate) = now.bytes_per_sec.filter(|r| *r > 0) {
            tokio::time::sleep(Duration::from_secs_f64(n as f64 / rate as f64)).await;
        }
    }
}

/// Wait while black-holed; true once forwarding, false when refusing (or the
/// proxy is gone): the connection must end.
async fn forwarding(mode: &mut watch::Receiver<Mode>) -> bool {
    match mode.wait_for(|m| *m != Mode::BlackHole).await {
        Ok(m) => *m == Mode::Forward,
        Err(_) => false,
    }
}
