//! A TCP proxy between a client and the broker that can cut the network:
//! `Refuse` closes every connection and refuses new ones, `BlackHole` stops
//! forwarding while keeping the sockets open (only heartbeats can notice),
//! `Forward` is normal. Faults stay inside the test: other tests' connections
//! to the shared broker are untouched.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

/// What the proxy does with traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Forward both ways.
    Forward,
    /// Close every connection now and refuse new ones.
    Refuse,
    /// Keep connections open but forward nothing.
    BlackHole,
}

/// A running proxy; dropping it stops it and closes every connection.
pub struct Proxy {
    /// The port clients connect to.
    pub port: u16,
    mode: watch::Sender<Mode>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// Listen on 127.0.0.1:0 and forward to `upstream`.
    pub async fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (mode, rx) = watch::channel(Mode::Forward);
        let task = tokio::spawn(async move {
            // Owns every connection task: aborted with this one.
            let mut conns = JoinSet::new();
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                while conns.try_join_next().is_some() {}
                if *rx.borrow() == Mode::Refuse {
                    drop(client);
                    continue;
                }
                conns.spawn(pipe(client, upstream, rx.clone()));
            }
        });
        Proxy { port, mode, task }
    }

    /// Change the mode.
    pub fn set(&self, mode: Mode) {
        self.mode.send_replace(mode);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn pipe(mut client: TcpStream, upstream: SocketAddr, mut mode: watch::Receiver<Mode>) {
    let Ok(mut server) = TcpStream::connect(upstream).await else {
        return;
    };
    let (mut cr, mut cw) = client.split();
    let (mut sr, mut sw) = server.split();
    let mut a = vec![0u8; 64 * 1024];
    let mut b = vec![0u8; 64 * 1024];
    loop {
        let now = *mode.borrow_and_update();
        match now {
            Mode::Refuse => return,
            Mode::BlackHole => {
                if mode.changed().await.is_err() {
                    return;
                }
                continue;
            }
            Mode::Forward => {}
        }
        tokio::select! {
            _ = mode.changed() => {}
            r = cr.read(&mut a) => match r {
                Ok(0) | Err(_) => return,
                Ok(n) => if sw.write_all(&a[..n]).await.is_err() { return },
            },
            r = sr.read(&mut b) => match r {
                Ok(0) | Err(_) => return,
                Ok(n) => if cw.write_all(&b[..n]).await.is_err() { return },
            },
        }
    }
}
