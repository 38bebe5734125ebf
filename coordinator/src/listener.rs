//! The coordinator's listener. Each connection holds a file descriptor, and so does every file
//! the run directory writes: about 1,100 idle TCP connections once took the process to its fd
//! limit, after which the next commit failed and the process exited. So connections are accepted
//! up to a cap (the rest wait in the kernel's backlog, holding no descriptor of ours), a
//! connection that sends nothing for an idle timeout is closed (the server's HTTP/2 keep-alive
//! pings keep honest ones talking), and running out of descriptors makes the accept loop back
//! off instead of spinning or stopping.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::time::{Instant, Sleep};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::{Connected, TcpConnectInfo};

/// Bounds on what connections may hold.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Connections open at once.
    pub max_connections: usize,
    /// A connection that sends nothing for this long is closed.
    pub idle: Duration,
    /// A new connection must send its first byte within this (an honest client sends its
    /// HTTP/2 preface or TLS hello at once): sockets opened only to fill the connection slots
    /// lose them within seconds.
    pub first_byte: Duration,
}

/// Accepts connections on `listener` within `limits`, as the stream tonic serves from. The
/// accept loop ends when the stream is dropped.
pub fn incoming(listener: TcpListener, limits: Limits) -> ReceiverStream<io::Result<Connection>> {
    let (tx, rx) = mpsc::channel(16);
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    tokio::spawn(async move {
        let mut failures = 0u64;
        loop {
            let Ok(slot) = slots.clone().acquire_owned().await else {
                return;
            };
            let accepted = tokio::select! {
                a = listener.accept() => a,
                _ = tx.closed() => return,
            };
            match accepted {
                Ok((stream, _)) => {
                    let _ = stream.set_nodelay(true);
                    if tx
                        .send(Ok(Connection::new(stream, slot, limits)))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
                Err(e) => {
                    failures += 1;
                    // Out of descriptors (EMFILE/ENFILE) or a connection reset before accept:
                    // wait a little and keep serving; log the first few and then rarely.
                    if failures <= 5 || failures.is_power_of_two() {
                        tracing::warn!("accept failed ({failures} so far): {e}; backing off");
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    });
    ReceiverStream::new(rx)
}

/// An accepted connection: its slot under the cap, and an idle timer. Reads only note the time
/// of the last byte; the timer is moved on when it fires (resetting a tokio timer on every read,
/// a few per 16 KiB frame, took the timer driver's lock each time).
pub struct Connection {
    stream: TcpStream,
    _slot: OwnedSemaphorePermit,
    idle: Duration,
    /// When the last byte arrived (`None` before the first).
    last_read: Option<Instant>,
    timer: Pin<Box<Sleep>>,
}

impl Connection {
    fn new(stream: TcpStream, slot: OwnedSemaphorePermit, limits: Limits) -> Self {
        Self {
            stream,
            _slot: slot,
            idle: limits.idle,
            last_read: None,
            // Until the first byte; after that `idle` from the last one.
            timer: Box::pin(tokio::time::sleep(limits.first_byte.min(limits.idle))),
        }
    }
}

impl AsyncRead for Connection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.stream).poll_read(cx, buf) {
            Poll::Ready(r) => {
                if buf.filled().len() > before {
                    self.last_read = Some(Instant::now());
                }
                Poll::Ready(r)
            }
            Poll::Pending => loop {
                if self.timer.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                // The timer fired: the connection is idle unless a byte came since it was set.
                match self.last_read.map(|t| t + self.idle) {
                    Some(due) if due > Instant::now() => self.timer.as_mut().reset(due),
                    _ => {
                        return Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            "connection idle: closed",
                        )));
                    }
                }
            },
        }
    }
}

impl AsyncWrite for Connection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

impl Connected for Connection {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.stream.connect_info()
    }
}
