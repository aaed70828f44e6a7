//! Bounds on what HTTP clients can hold: connections at once, how long a connection may make no
//! progress (a stalled header, an idle keep-alive, a reader that stopped reading), and the bytes
//! of pack data buffered for responses at once.
//!
//! The connection limit is a semaphore taken before `accept`: past it, new connections wait in
//! the kernel's backlog instead of costing a file descriptor and a task each.

use axum::serve::Listener;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};

/// The HTTP side's limits.
#[derive(Clone, Copy, Debug)]
pub struct HttpLimits {
    /// Connections served at once.
    pub connections_max: usize,
    /// A connection that moves no byte either way for this long is closed.
    pub idle_timeout: Duration,
    /// Pack bytes read into memory for responses at once (larger ranges are streamed).
    pub buffered_bytes_max: usize,
}

impl HttpLimits {
    /// The limits the configuration's `http` section sets.
    pub fn from_config(c: &crate::config::Http) -> HttpLimits {
        HttpLimits {
            connections_max: c.connections_max,
            idle_timeout: Duration::from_secs(c.idle_timeout_secs),
            buffered_bytes_max: c.buffered_mib_max << 20,
        }
    }
}

impl Default for HttpLimits {
    fn default() -> Self {
        HttpLimits {
            connections_max: 1024,
            idle_timeout: Duration::from_secs(60),
            buffered_bytes_max: 256 << 20,
        }
    }
}

/// A TCP listener that holds a permit per open connection.
pub struct LimitedListener {
    inner: TcpListener,
    permits: Arc<Semaphore>,
    idle_timeout: Duration,
}

impl LimitedListener {
    pub fn new(inner: TcpListener, limits: &HttpLimits) -> LimitedListener {
        LimitedListener {
            inner,
            permits: Arc::new(Semaphore::new(limits.connections_max.max(1))),
            idle_timeout: limits.idle_timeout,
        }
    }
}

impl Listener for LimitedListener {
    type Io = Guarded;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Guarded, SocketAddr) {
        let permit = match self.permits.clone().acquire_owned().await {
            Ok(p) => p,
            // The semaphore is never closed; should it be, serve without a limit.
            Err(_) => Arc::new(Semaphore::new(1))
                .acquire_owned()
                .await
                .expect("a fresh semaphore has a permit"),
        };
        loop {
            match self.inner.accept().await {
                Ok((stream, addr)) => {
                    let _ = stream.set_nodelay(true);
                    return (Guarded::new(stream, permit, self.idle_timeout), addr);
                }
                Err(e) => {
                    // Out of descriptors, or a connection reset before accept: wait, go on.
                    tracing::warn!("HTTP accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}

/// A connection with its permit and a deadline pushed back by every byte that moves.
pub struct Guarded {
    stream: TcpStream,
    _permit: OwnedSemaphorePermit,
    idle_timeout: Duration,
    deadline: Pin<Box<Sleep>>,
}

impl Guarded {
    fn new(stream: TcpStream, permit: OwnedSemaphorePermit, idle_timeout: Duration) -> Guarded {
        Guarded {
            stream,
            _permit: permit,
            idle_timeout,
            deadline: Box::pin(tokio::time::sleep(idle_timeout)),
        }
    }

    fn progressed(&mut self) {
        let next = Instant::now() + self.idle_timeout;
        self.deadline.as_mut().reset(next);
    }

    /// Runs `f` (a non-blocking write of the caller's own, such as `sendfile`) with the socket's
    /// descriptor once it is writable; waiting `idle` for that is an error.
    pub async fn write_with<T>(
        &mut self,
        idle: Duration,
        mut f: impl FnMut(std::os::fd::RawFd) -> io::Result<T>,
    ) -> io::Result<T> {
        use std::os::fd::AsRawFd;
        let fd = self.stream.as_raw_fd();
        loop {
            tokio::time::timeout(idle, self.stream.writable())
                .await
                .map_err(|_| {
                    io::Error::new(io::ErrorKind::TimedOut, "HTTP client stopped reading")
                })??;
            match self.stream.try_io(tokio::io::Interest::WRITABLE, || f(fd)) {
                Ok(v) => {
                    self.progressed();
                    return Ok(v);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Corks or uncorks the connection (`TCP_CORK`): while corked, only full segments leave;
    /// uncorking sends what is queued.
    pub fn set_cork(&self, on: bool) {
        use std::os::fd::AsRawFd;
        let value: libc::c_int = on.into();
        // SAFETY: setsockopt on our own socket with a pointer to a local int of the given size.
        unsafe {
            libc::setsockopt(
                self.stream.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_CORK,
                (&value as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
    }

    /// After an I/O poll: progress pushes the deadline back; waiting past it is an error.
    fn watch<T>(&mut self, cx: &mut Context<'_>, poll: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        match poll {
            Poll::Ready(r) => {
                self.progressed();
                Poll::Ready(r)
            }
            Poll::Pending => match self.deadline.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "HTTP connection idle for too long",
                ))),
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

impl AsyncRead for Guarded {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let poll = Pin::new(&mut self.stream).poll_read(cx, buf);
        self.watch(cx, poll)
    }
}

impl AsyncWrite for Guarded {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.stream).poll_write(cx, buf);
        self.watch(cx, poll)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.stream).poll_write_vectored(cx, bufs);
        self.watch(cx, poll)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let poll = Pin::new(&mut self.stream).poll_flush(cx);
        self.watch(cx, poll)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// Raises the soft limit of open files to the hard one (systemd's default soft limit is 1024,
/// fewer than the connections the appliance is meant to hold); returns the limit now in force.
pub fn raise_open_files_limit() -> io::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a pointer to a struct we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return Err(io::Error::last_os_error());
        }
        if lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                return Err(io::Error::last_os_error());
            }
        }
    }
    Ok(lim.rlim_cur)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_configuration_sets_the_limits() {
        let l = HttpLimits::from_config(&crate::config::Http {
            connections_max: 7,
            idle_timeout_secs: 9,
            buffered_mib_max: 32,
        });
        assert_eq!(l.connections_max, 7);
        assert_eq!(l.idle_timeout, Duration::from_secs(9));
        assert_eq!(l.buffered_bytes_max, 32 << 20);
        let d = HttpLimits::from_config(&crate::config::Http::default());
        let default = HttpLimits::default();
        assert_eq!(
            (d.connections_max, d.idle_timeout, d.buffered_bytes_max),
            (
                default.connections_max,
                default.idle_timeout,
                default.buffered_bytes_max
            )
        );
    }
}
