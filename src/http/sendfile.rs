//! The connection loop of the HTTP side, with pack ranges and boot files sent by `sendfile(2)`.
//!
//! Every install is pack ranges (and every boot a kernel and an initramfs), so they are the
//! appliance's throughput ceiling when a rack installs at once. Through hyper, each range was
//! read into a user-space buffer and written out: every byte copied twice. Here a connection's
//! HTTP/1.1 `GET`/`HEAD` requests for `/store/packs/{id}.pack` and `/boot/{file}` are answered on
//! the socket itself: the head, then the range handed from the file to the socket by the kernel
//! (large ones on a corked socket, as nginx's `tcp_nopush`), as nginx does. Anything else (another path, an iPXE script, a query, a
//! body, a conditional request, HTTP/1.0 or HTTP/2, a head that is not plain) hands the
//! connection, with the bytes read so far, to hyper and the router for the rest of its life; the
//! router's own handlers stay for those.
//!
//! Safety: a pack deleted by gc stays readable through the open descriptor; a file truncated
//! under us ends the body short, so the connection is closed (the client sees a short body
//! and tries again); a client that stops reading holds no memory and is dropped after the idle
//! timeout; connections count against the same limit as all others.

use super::limits::{Guarded, HttpLimits, LimitedListener};
use super::packs::parse_range;
use super::AppState;
use axum::extract::connect_info::ConnectInfo;
use axum::Router;
use bytes::{Buf, BytesMut};
use fleetboot_image::PackId;
use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

/// The request heads answered here are small; a longer one goes to hyper (which bounds it).
const HEAD_BYTES_MAX: usize = 8 << 10;
/// Bytes handed to one `sendfile` call: large enough for few calls, small enough that one
/// connection does not hold a worker for long.
const SENDFILE_CHUNK: usize = 4 << 20;
/// Bodies from this size on are sent on a corked connection (see `answer`).
const CORK_BYTES_MIN: u64 = 256 << 10;
/// What a request must start with to be answered here.
const PREFIXES: [&[u8]; 4] = [
    b"GET /store/packs/",
    b"HEAD /store/packs/",
    b"GET /boot/",
    b"HEAD /boot/",
];

/// Serves `router` on `listener` until `shutdown` completes; with `state`, pack ranges go the
/// `sendfile` way. Each request's peer address is known to the router (`ConnectInfo`).
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    state: Option<Arc<AppState>>,
    limits: &HttpLimits,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    use axum::serve::Listener;
    let mut listener = LimitedListener::new(listener, limits);
    let idle = limits.idle_timeout;
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut tasks = tokio::task::JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let (io, addr) = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut shutdown => break,
        };
        let conn = Connection {
            router: router.clone(),
            state: state.clone(),
            idle,
            stop: stop_rx.clone(),
            watcher: graceful.watcher(),
        };
        // Finished connections are reaped as new ones come, so the set stays small.
        while tasks.try_join_next().is_some() {}
        tasks.spawn(conn.run(io, addr));
    }
    // Connections in the pack loop stop at their next request; hyper's finish the one in
    // flight and close.
    let _ = stop_tx.send(true);
    graceful.shutdown().await;
    while tasks.join_next().await.is_some() {}
    Ok(())
}

struct Connection {
    router: Router,
    state: Option<Arc<AppState>>,
    idle: Duration,
    stop: tokio::sync::watch::Receiver<bool>,
    watcher: hyper_util::server::graceful::Watcher,
}

/// Where the first request of a connection's buffer stands.
enum Head {
    /// A request this loop may answer; the head is this many bytes.
    Ours(usize),
    /// Something for hyper.
    Other,
    /// The client closed the connection between requests.
    Closed,
}

impl Connection {
    async fn run(mut self, mut io: Guarded, addr: SocketAddr) {
        let mut buf = BytesMut::with_capacity(1024);
        if let Some(state) = self.state.clone() {
            let peer = crate::appliance::canonical(addr.ip());
            loop {
                let head = tokio::select! {
                    head = read_head(&mut io, &mut buf) => head,
                    _ = self.stop.wait_for(|stop| *stop) => return,
                };
                match head {
                    Ok(Head::Ours(len)) => {
                        // An unusual one (HTTP/1.0, a query, a body) is hyper's to answer.
                        let Some(request) = FileRequest::parse(&buf[..len]) else {
                            break;
                        };
                        // Packs in object storage come through the router's frame cache.
                        if matches!(request.target, Target::Pack(_)) && !state.store.is_local() {
                            break;
                        }
                        buf.advance(len);
                        match answer(&state, &mut io, peer, &request, self.idle).await {
                            Ok(()) if !request.close => continue,
                            _ => return,
                        }
                    }
                    Ok(Head::Other) => break,
                    Ok(Head::Closed) | Err(_) => return,
                }
            }
        }
        let io = hyper_util::rt::TokioIo::new(Rewind { prefix: buf, io });
        let service =
            hyper_util::service::TowerToHyperService::new(tower::ServiceExt::map_request(
                self.router,
                move |mut req: axum::http::Request<hyper::body::Incoming>| {
                    req.extensions_mut().insert(ConnectInfo(addr));
                    req
                },
            ));
        let builder =
            hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
        let conn = builder.serve_connection_with_upgrades(io, service);
        let _ = self.watcher.watch(conn.into_owned()).await;
    }
}

/// Reads until the buffer starts with a whole request head, or shows it is not one to answer
/// here.
async fn read_head(io: &mut Guarded, buf: &mut BytesMut) -> io::Result<Head> {
    loop {
        let ours = PREFIXES.iter().any(|p| {
            let n = p.len().min(buf.len());
            buf[..n] == p[..n]
        });
        if !ours {
            return Ok(Head::Other);
        }
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            return Ok(Head::Ours(end + 4));
        }
        if buf.len() >= HEAD_BYTES_MAX {
            return Ok(Head::Other);
        }
        if io.read_buf(buf).await? == 0 {
            return Ok(if buf.is_empty() {
                Head::Closed
            } else {
                Head::Other
            });
        }
    }
}

/// What a request answered here reads.
#[derive(Debug, PartialEq, Eq)]
enum Target {
    Pack(PackId),
    /// A file beneath `boot_dir`, by its name there.
    Boot(String),
}

/// A request as this loop answers it.
#[derive(Debug, PartialEq, Eq)]
struct FileRequest {
    head_only: bool,
    target: Target,
    range: Option<String>,
    authorization: Option<String>,
    /// `Connection: close`: the connection ends after the answer.
    close: bool,
}

impl FileRequest {
    /// The request in `head` (a whole head); `None` for anything else than a plain HTTP/1.1
    /// request for a pack or a boot file, without a body, and for a malformed head (hyper
    /// answers those).
    fn parse(head: &[u8]) -> Option<FileRequest> {
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut headers);
        if !matches!(req.parse(head), Ok(httparse::Status::Complete(_))) || req.version != Some(1) {
            return None;
        }
        let head_only = match req.method? {
            "GET" => false,
            "HEAD" => true,
            _ => return None,
        };
        let path = req.path?;
        let target = if let Some(pack) = path.strip_prefix("/store/packs/") {
            Target::Pack(pack.strip_suffix(".pack")?.parse::<PackId>().ok()?)
        } else {
            // Scripts are rendered by the router; names needing decoding go there too.
            let name = path.strip_prefix("/boot/")?;
            if name.ends_with(".ipxe") || name.contains(['%', '?', '#']) {
                return None;
            }
            Target::Boot(name.to_string())
        };
        let mut out = FileRequest {
            head_only,
            target,
            range: None,
            authorization: None,
            close: false,
        };
        for h in req.headers.iter() {
            let value = std::str::from_utf8(h.value).ok()?.trim();
            match h.name.to_ascii_lowercase().as_str() {
                "range" => out.range = Some(value.to_string()),
                "authorization" => out.authorization = Some(value.to_string()),
                "connection" => {
                    out.close = value
                        .split(',')
                        .any(|t| t.trim().eq_ignore_ascii_case("close"))
                }
                // A request with a body (or one announced) is not a plain pack request.
                "content-length" if value != "0" => return None,
                "transfer-encoding" | "expect" | "upgrade" => return None,
                // Conditional requests: the router's file service answers them.
                n if n.starts_with("if-") => return None,
                _ => {}
            }
        }
        Some(out)
    }
}

/// Answers one request; `Err` when the connection must close.
async fn answer(
    st: &AppState,
    io: &mut Guarded,
    peer: std::net::IpAddr,
    req: &FileRequest,
    idle: Duration,
) -> io::Result<()> {
    // A pack: kept open (packs are immutable; gc's removal leaves the open file readable), for
    // token holders. A boot file: opened for this request (they are replaced in place by a
    // rebuild), for anyone, as the router serves them.
    let pack;
    let boot;
    let (file, len) = match &req.target {
        Target::Pack(id) => {
            let bearer = req
                .authorization
                .as_deref()
                .and_then(|a| a.strip_prefix("Bearer "));
            if let Err(super::AppError(status, message)) =
                super::store_access_with(st, bearer, peer)
            {
                return small(io, status.as_u16(), &message, "").await;
            }
            let Some(p) = st.packs.get(&st.store, id) else {
                return small(io, 404, "Not Found", "").await;
            };
            pack = p;
            (&pack.0, pack.1)
        }
        Target::Boot(name) => {
            let Some(opened) = open_boot_file(&st.config().boot_dir, name) else {
                return small(io, 404, "Not Found", "").await;
            };
            boot = opened;
            (&boot.0, boot.1)
        }
    };
    let (start, end, status) = match req.range.as_deref() {
        None => match len.checked_sub(1) {
            Some(last) => (0, last, "200 OK"),
            None => return small(io, 200, "", "accept-ranges: bytes\r\n").await,
        },
        Some(r) => match parse_range(r, len) {
            Some((s, e)) => (s, e, "206 Partial Content"),
            None => {
                return small(
                    io,
                    416,
                    "Range Not Satisfiable",
                    &format!("content-range: bytes */{len}\r\n"),
                )
                .await
            }
        },
    };
    let count = end - start + 1;
    let range = if status.starts_with("206") {
        format!("content-range: bytes {start}-{end}/{len}\r\n")
    } else {
        String::new()
    };
    let head = format!(
        "HTTP/1.1 {status}\r\ndate: {}\r\ncontent-type: application/octet-stream\r\n\
         accept-ranges: bytes\r\n{range}content-length: {count}\r\n\r\n",
        httpdate::fmt_http_date(std::time::SystemTime::now())
    );
    // A large body goes corked, as nginx's tcp_nopush: the head and the body leave in full
    // segments, the last one when the answer is whole (1 MiB ranges: 1.01-1.04 x nginx corked,
    // 0.98-0.99 x without). A small one is sent in one call; the head only waits for it
    // (MSG_MORE), sparing the two setsockopt calls (64 KiB ranges: 1.4 x nginx, 1.15 x corked).
    let cork = !req.head_only && count >= CORK_BYTES_MIN;
    if cork {
        io.set_cork(true);
    }
    let sent = async {
        send_head(io, head.as_bytes(), !req.head_only && !cork, idle).await?;
        if req.head_only {
            return Ok(());
        }
        send_file(io, file, start, count, idle).await
    }
    .await;
    if cork {
        io.set_cork(false);
    }
    sent
}

/// A regular file beneath `boot_dir` (symlinks out of it refused, as the router does) and its
/// length.
fn open_boot_file(boot_dir: &std::path::Path, name: &str) -> Option<(std::fs::File, u64)> {
    let path = crate::bootfiles::resolve_beneath(boot_dir, name).ok()?;
    let file = std::fs::File::open(path).ok()?;
    let meta = file.metadata().ok()?;
    meta.is_file().then_some((file, meta.len()))
}

/// A short answer with a text body.
async fn small(io: &mut Guarded, status: u16, body: &str, extra: &str) -> io::Result<()> {
    use tokio::io::AsyncWriteExt;
    let reason = axum::http::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("");
    let body = if body.is_empty() {
        String::new()
    } else {
        format!("{body}\n")
    };
    let text = format!(
        "HTTP/1.1 {status} {reason}\r\ndate: {}\r\ncontent-type: text/plain; charset=utf-8\r\n\
         {extra}content-length: {}\r\n\r\n{body}",
        httpdate::fmt_http_date(std::time::SystemTime::now()),
        body.len()
    );
    io.write_all(text.as_bytes()).await
}

/// Writes a response head; with `more`, tells the kernel a body follows at once (`MSG_MORE`),
/// so the head and the body's first bytes leave in one segment.
async fn send_head(
    io: &mut Guarded,
    mut head: &[u8],
    more: bool,
    idle: Duration,
) -> io::Result<()> {
    let flags = if more { libc::MSG_MORE } else { 0 } | libc::MSG_NOSIGNAL;
    while !head.is_empty() {
        let sent = io
            .write_with(idle, |fd| {
                // SAFETY: `head` is a live slice of the given length.
                let n = unsafe { libc::send(fd, head.as_ptr().cast(), head.len(), flags) };
                if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(n as usize)
                }
            })
            .await?;
        head = &head[sent..];
    }
    Ok(())
}

/// Sends `count` bytes of `file` from `offset` with `sendfile`; a file that ends early is an
/// error (the head promised the length, so the connection must close).
async fn send_file(
    io: &mut Guarded,
    file: &std::fs::File,
    offset: u64,
    count: u64,
    idle: Duration,
) -> io::Result<()> {
    let mut off = offset as libc::off_t;
    let end = (offset + count) as libc::off_t;
    let source = file.as_raw_fd();
    while off < end {
        let chunk = ((end - off) as usize).min(SENDFILE_CHUNK);
        let sent = io
            .write_with(idle, |fd| {
                // SAFETY: both descriptors are open for the call; `off` is ours.
                let n = unsafe { libc::sendfile(fd, source, &mut off, chunk) };
                if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(n as usize)
                }
            })
            .await?;
        if sent == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the pack file is shorter than it was",
            ));
        }
    }
    Ok(())
}

/// The connection's first bytes, already read by the pack loop, then the connection.
struct Rewind {
    prefix: BytesMut,
    io: Guarded,
}

impl AsyncRead for Rewind {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Rewind {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "0123456789abcdef0123456789abcdef";

    #[test]
    fn plain_pack_requests_are_taken() {
        let head = format!(
            "GET /store/packs/{ID}.pack HTTP/1.1\r\nHost: x\r\nRange: bytes=0-9\r\n\
             Authorization: Bearer t\r\n\r\n"
        );
        let r = FileRequest::parse(head.as_bytes()).expect("a pack request");
        assert!(!r.head_only && !r.close);
        assert_eq!(r.range.as_deref(), Some("bytes=0-9"));
        assert_eq!(r.authorization.as_deref(), Some("Bearer t"));
        let head = format!("HEAD /store/packs/{ID}.pack HTTP/1.1\r\nConnection: close\r\n\r\n");
        let r = FileRequest::parse(head.as_bytes()).expect("a pack request");
        assert!(r.head_only && r.close);
        let r = FileRequest::parse(b"GET /boot/fleetboot-initrd.img HTTP/1.1\r\n\r\n")
            .expect("a boot file request");
        assert_eq!(r.target, Target::Boot("fleetboot-initrd.img".into()));
    }

    #[test]
    fn anything_else_is_not() {
        for head in [
            format!("GET /store/packs/{ID}.pack HTTP/1.0\r\n\r\n"),
            format!("GET /store/packs/{ID}.pack?x=1 HTTP/1.1\r\n\r\n"),
            format!("GET /store/packs/{ID}.pac HTTP/1.1\r\n\r\n"),
            "GET /store/packs/nothex.pack HTTP/1.1\r\n\r\n".to_string(),
            format!("GET /store/packs/{ID}.pack HTTP/1.1\r\nContent-Length: 5\r\n\r\n"),
            format!("GET /store/packs/{ID}.pack HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"),
            format!("GET /store/packs/{ID}.pack HTTP/1.1\r\nBad Header\r\n\r\n"),
            format!("GET /store/packs/{ID}.pack HTTP/1.1\r\nIf-Range: x\r\n\r\n"),
            "GET /boot/52:54:00:12:34:56.ipxe HTTP/1.1\r\n\r\n".to_string(),
            "GET /boot/a%20b HTTP/1.1\r\n\r\n".to_string(),
            "GET /metrics HTTP/1.1\r\n\r\n".to_string(),
        ] {
            assert_eq!(FileRequest::parse(head.as_bytes()), None, "{head}");
        }
    }
}
