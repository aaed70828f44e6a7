//! The TFTP service: `boot_dir`, read-only (RFC 1350), with blksize, timeout, tsize and
//! windowsize (RFC 2347–2349, 7440) within the configured limits.
//!
//! Each transfer runs on a thread of its own with blocking sockets: TFTP without a window is
//! lock-step (one block, one ACK), so what it costs is the latency of each turn, and a thread
//! blocked in `recv` is woken by the kernel directly. (async-tftp, measured here, took 1.2–1.5 s
//! for 32 MiB at blksize 1468 where tftpd-hpa took 0.4–1.4 s; this takes less than tftpd-hpa.)
//!
//! Names are resolved with [`resolve_beneath`] (no `..`, no symlink out of `boot_dir`). Every
//! socket is bound to the interface's address and device. At most `transfers_max` transfers run
//! at once; a request beyond that gets an error, not a queue.
//!
//! A few names are made on request instead of read from `boot_dir` ([`Generated`]): the signed
//! GRUB of the Secure Boot chain reads its configuration over TFTP only.

use crate::bootfiles::{resolve_beneath, BootFileError};
use crate::config::Tftp;
use crate::metrics::Metrics;
use crate::net::udp_on;
use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const RRQ: u16 = 1;
const WRQ: u16 = 2;
const DATA: u16 = 3;
const ACK: u16 = 4;
const ERROR: u16 = 5;
const OACK: u16 = 6;

/// RFC 1350 error codes.
const ERR_UNDEFINED: u16 = 0;
const ERR_NOT_FOUND: u16 = 1;
const ERR_ACCESS: u16 = 2;
const ERR_ILLEGAL: u16 = 4;

/// Default and bounds of the negotiated values.
const BLKSIZE_DEFAULT: usize = 512;
const TIMEOUT_DEFAULT_S: u64 = 2;
/// Retransmissions of one block or window before the transfer is abandoned.
const RETRIES_MAX: u32 = 6;
/// The longest the server waits for an ACK before retransmitting, whatever `timeout` the client
/// asked for (RFC 2349 allows 255 s: 64 such requests would hold every slot for half an hour).
const WAIT_MAX: Duration = Duration::from_secs(3);

/// Makes the file a request names, for the names it owns: `None` for every other name (read
/// from `boot_dir`), else its bytes or why the client may not have it. Called with the name
/// (without a leading `/`) and the client's address.
pub type Generated =
    Arc<dyn Fn(&str, IpAddr) -> Option<Result<Vec<u8>, (Refusal, String)>> + Send + Sync>;

/// Why a [`Generated`] file is not given, told to the client by the RFC 1350 error code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// There is no such file for anyone (an unknown host): "file not found".
    NotFound,
    /// This client may not have it (asked from another address): "access violation".
    Forbidden,
    /// It cannot be made now (the store or the state failed): "not defined", worth a retry.
    Unavailable,
}

impl Refusal {
    fn code(self) -> u16 {
        match self {
            Refusal::NotFound => ERR_NOT_FOUND,
            Refusal::Forbidden => ERR_ACCESS,
            Refusal::Unavailable => ERR_UNDEFINED,
        }
    }
}

/// What the service needs, cloned into each transfer.
#[derive(Clone)]
struct Ctx {
    root: PathBuf,
    generated: Generated,
    interface: String,
    address: Ipv4Addr,
    limits: Tftp,
    active: Arc<AtomicUsize>,
    /// Transfers running per client address.
    per_client: Arc<Mutex<HashMap<IpAddr, usize>>>,
    metrics: Arc<Metrics>,
}

/// Serves requests arriving on `socket` for as long as the process runs.
pub fn spawn(
    socket: UdpSocket,
    interface: &str,
    boot_dir: PathBuf,
    generated: Generated,
    limits: Tftp,
    metrics: Arc<Metrics>,
) -> io::Result<()> {
    let address = match socket.local_addr()? {
        SocketAddr::V4(a) => *a.ip(),
        SocketAddr::V6(_) => return Err(io::Error::other("TFTP serves IPv4 only")),
    };
    let ctx = Ctx {
        root: boot_dir,
        generated,
        interface: interface.to_string(),
        address,
        limits,
        active: Arc::new(AtomicUsize::new(0)),
        per_client: Arc::new(Mutex::new(HashMap::new())),
        metrics,
    };
    std::thread::Builder::new()
        .name("tftp".into())
        .spawn(move || listen(&socket, &ctx))?;
    Ok(())
}

fn listen(socket: &UdpSocket, ctx: &Ctx) {
    let mut buf = [0u8; 2048];
    loop {
        let (n, client) = match socket.recv_from(&mut buf) {
            Ok(r) => r,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::error!("TFTP socket failed: {e}");
                return;
            }
        };
        let request = match parse_request(&buf[..n]) {
            Ok(r) => r,
            Err((code, why)) => {
                ctx.metrics.tftp_refused.inc();
                tracing::debug!(%client, "TFTP request dropped: {why}");
                let _ = socket.send_to(&error_packet(code, why), client);
                continue;
            }
        };
        if !ctx.admit(client.ip()) {
            ctx.metrics.tftp_refused.inc();
            let _ = socket.send_to(
                &error_packet(ERR_UNDEFINED, "server busy, try again"),
                client,
            );
            continue;
        }
        let ctx = ctx.clone();
        let spawned = std::thread::Builder::new()
            .name("tftp-transfer".into())
            .spawn(move || {
                if let Err(e) = transfer(&ctx, client, &request) {
                    tracing::info!(%client, file = %request.file, "TFTP transfer ended: {e}");
                }
                ctx.release(client.ip());
            });
        if spawned.is_err() {
            tracing::warn!("cannot start a TFTP transfer thread");
        }
    }
}

impl Ctx {
    /// Takes a transfer slot for `client`, unless all are taken or it holds its share.
    fn admit(&self, client: IpAddr) -> bool {
        let mut per_client = self.per_client.lock().unwrap_or_else(|p| p.into_inner());
        let mine = per_client.get(&client).copied().unwrap_or(0);
        if mine >= self.limits.transfers_per_client_max {
            return false;
        }
        if self.active.fetch_add(1, Ordering::AcqRel) >= self.limits.transfers_max {
            self.active.fetch_sub(1, Ordering::AcqRel);
            return false;
        }
        per_client.insert(client, mine + 1);
        true
    }

    fn release(&self, client: IpAddr) {
        let mut per_client = self.per_client.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = per_client.get_mut(&client) {
            *n -= 1;
            if *n == 0 {
                per_client.remove(&client);
            }
        }
        self.active.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A read request and its options.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Request {
    file: String,
    blksize: Option<usize>,
    timeout_s: Option<u64>,
    tsize: bool,
    windowsize: Option<usize>,
}

/// Parses an RRQ; anything else is answered with an error code and reason.
fn parse_request(p: &[u8]) -> Result<Request, (u16, &'static str)> {
    if p.len() < 4 {
        return Err((ERR_ILLEGAL, "packet too short"));
    }
    match u16::from_be_bytes([p[0], p[1]]) {
        RRQ => {}
        WRQ => return Err((ERR_ACCESS, "the server is read-only")),
        _ => return Err((ERR_ILLEGAL, "not a read request")),
    }
    let fields: Vec<&[u8]> = p[2..].split(|&b| b == 0).collect();
    // A well-formed request ends with a NUL, so the last field is empty.
    if fields.len() < 3 || !fields.last().is_some_and(|f| f.is_empty()) {
        return Err((ERR_ILLEGAL, "malformed request"));
    }
    let text = |f: &[u8]| {
        std::str::from_utf8(f)
            .map(str::to_string)
            .map_err(|_| (ERR_ILLEGAL, "not text"))
    };
    let file = text(fields[0])?;
    let mode = text(fields[1])?.to_ascii_lowercase();
    if mode != "octet" && mode != "netascii" {
        return Err((ERR_ILLEGAL, "unsupported mode"));
    }
    let mut r = Request {
        file,
        blksize: None,
        timeout_s: None,
        tsize: false,
        windowsize: None,
    };
    let opts = &fields[2..fields.len() - 1];
    for pair in opts.chunks(2) {
        let [name, value] = pair else { break };
        let name = text(name)?.to_ascii_lowercase();
        let value = text(value)?;
        match name.as_str() {
            "blksize" => {
                r.blksize = value
                    .parse::<usize>()
                    .ok()
                    .filter(|v| (8..=65464).contains(v))
            }
            "timeout" => r.timeout_s = value.parse::<u64>().ok().filter(|v| (1..=255).contains(v)),
            "tsize" => r.tsize = true,
            "windowsize" => {
                r.windowsize = value
                    .parse::<usize>()
                    .ok()
                    .filter(|v| (1..=65535).contains(v))
            }
            _ => {} // unknown options are ignored (RFC 2347)
        }
    }
    Ok(r)
}

/// The fuzz target's view (`crate::fuzz`): a datagram parsed as the server does (whether it is
/// a read request) and, if it is, its file resolved beneath `root`: the path the server would send.
pub fn fuzz_request(p: &[u8], root: &std::path::Path) -> (bool, Option<PathBuf>) {
    match parse_request(p) {
        Ok(request) => (true, resolve_beneath(root, &request.file).ok()),
        Err(_) => (false, None),
    }
}

fn error_packet(code: u16, msg: &str) -> Vec<u8> {
    let mut p = Vec::with_capacity(5 + msg.len());
    p.extend_from_slice(&ERROR.to_be_bytes());
    p.extend_from_slice(&code.to_be_bytes());
    p.extend_from_slice(msg.as_bytes());
    p.push(0);
    p
}

/// Sends one file to `client` from a socket of its own.
fn transfer(ctx: &Ctx, client: SocketAddr, req: &Request) -> io::Result<()> {
    let socket = udp_on(&ctx.interface, ctx.address, 0)?;
    socket.connect(client)?;
    let refuse = |code: u16, why: String| -> io::Error {
        ctx.metrics.tftp_refused.inc();
        let _ = socket.send(&error_packet(code, &why));
        io::Error::other(why)
    };
    let source = match (ctx.generated)(req.file.trim_start_matches('/'), client.ip()) {
        Some(Ok(bytes)) => Source::Bytes(bytes),
        Some(Err((refusal, why))) => return Err(refuse(refusal.code(), why)),
        None => {
            let path = match resolve_beneath(&ctx.root, &req.file) {
                Ok(p) => p,
                Err(e @ (BootFileError::NotFound(_) | BootFileError::NotAFile(_))) => {
                    return Err(refuse(ERR_NOT_FOUND, e.to_string()))
                }
                Err(e) => return Err(refuse(ERR_ACCESS, e.to_string())),
            };
            Source::File(File::open(&path).map_err(|e| refuse(ERR_NOT_FOUND, e.to_string()))?)
        }
    };
    let size = match &source {
        Source::File(f) => f.metadata()?.len(),
        Source::Bytes(b) => b.len() as u64,
    };
    ctx.metrics.tftp_transfers.inc();

    let blksize = req.blksize.map_or(BLKSIZE_DEFAULT, |b| {
        b.min(usize::from(ctx.limits.blksize_max))
    });
    let window = req
        .windowsize
        .map_or(1, |w| w.min(usize::from(ctx.limits.windowsize_max)));
    // The client's timeout is acknowledged (it governs its own retransmissions); the server's
    // wait is bounded.
    let wait = Duration::from_secs(req.timeout_s.unwrap_or(TIMEOUT_DEFAULT_S)).min(WAIT_MAX);
    let blocks = size / blksize as u64 + 1; // the last block is short, possibly empty

    // Option acknowledgement, answered by ACK 0.
    let mut oack = Vec::new();
    let mut push = |k: &str, v: String| {
        oack.extend_from_slice(k.as_bytes());
        oack.push(0);
        oack.extend_from_slice(v.as_bytes());
        oack.push(0);
    };
    if req.blksize.is_some() {
        push("blksize", blksize.to_string());
    }
    if let Some(t) = req.timeout_s {
        push("timeout", t.to_string());
    }
    if req.tsize {
        push("tsize", size.to_string());
    }
    if req.windowsize.is_some() {
        push("windowsize", window.to_string());
    }
    let mut ack_buf = [0u8; 516];
    if !oack.is_empty() {
        let mut packet = OACK.to_be_bytes().to_vec();
        packet.extend_from_slice(&oack);
        let mut tries = 0;
        'oack: loop {
            socket.send(&packet)?;
            let deadline = Instant::now() + wait;
            // Packets other than ACK 0 do not extend the wait.
            loop {
                match recv_ack(&socket, &mut ack_buf, false, deadline) {
                    Ok(Some(0)) => break 'oack,
                    Ok(_) => {}
                    Err(e) if is_timeout(&e) && tries < RETRIES_MAX => {
                        tries += 1;
                        break;
                    }
                    Err(e) => return Err(e),
                }
            }
        }
    }

    // Windows of blocks; block i (1-based) goes on the wire as i mod 65536.
    let mut packet = vec![0u8; 4 + blksize];
    let mut acked: u64 = 0;
    let mut tries = 0;
    while acked < blocks {
        let last = (acked + window as u64).min(blocks);
        for i in acked + 1..=last {
            let offset = (i - 1) * blksize as u64;
            let n = if offset >= size {
                0
            } else {
                read_full(
                    &source,
                    &mut packet[4..4 + blksize.min((size - offset) as usize)],
                    offset,
                )?
            };
            packet[..2].copy_from_slice(&DATA.to_be_bytes());
            packet[2..4].copy_from_slice(&(i as u16).to_be_bytes());
            socket.send(&packet[..4 + n])?;
        }
        // Wait for the ACK of some block of this window; other packets (old or duplicate ACKs,
        // junk) do not extend the wait.
        let deadline = Instant::now() + wait;
        loop {
            match recv_ack(&socket, &mut ack_buf, window == 1, deadline) {
                Ok(Some(a)) => {
                    let delta = u64::from(a.wrapping_sub(acked as u16));
                    if delta >= 1 && delta <= last - acked {
                        acked += delta;
                        tries = 0;
                        break;
                    }
                    // An old or duplicate ACK: keep waiting for this window's.
                }
                Ok(None) => {}
                Err(e) if is_timeout(&e) => {
                    tries += 1;
                    if tries > RETRIES_MAX {
                        return Err(io::Error::other("client stopped acknowledging"));
                    }
                    break; // resend from the first block not acknowledged
                }
                Err(e) => return Err(e),
            }
        }
    }
    Ok(())
}

/// How long to poll for an ACK before sleeping in `recv`: a lock-step transfer waits for one ACK
/// per block, and a CPU that went idle (a halted vCPU above all) takes tens of microseconds to
/// wake — more than the round trip itself.
const SPIN: Duration = Duration::from_micros(200);

/// The block number of an ACK; `None` for other packets; an ERROR from the client ends it.
/// With `spin`, polls for [`SPIN`] before sleeping (lock-step transfers only: with a window, the
/// client has a window's worth of work to do and a spinning server would only take its CPU).
fn recv_ack(
    socket: &UdpSocket,
    buf: &mut [u8],
    spin: bool,
    deadline: Instant,
) -> io::Result<Option<u16>> {
    use std::os::fd::AsRawFd;
    let started = Instant::now();
    let spin = if spin { SPIN } else { Duration::ZERO };
    let n = loop {
        // SAFETY: recv into a buffer we own, of its length; MSG_DONTWAIT never blocks.
        let r = unsafe {
            libc::recv(
                socket.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        };
        if r >= 0 {
            break r as usize;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::WouldBlock {
            return Err(e);
        }
        if started.elapsed() >= spin {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::Error::from(io::ErrorKind::TimedOut));
            }
            socket.set_read_timeout(Some(left))?;
            break socket.recv(buf)?;
        }
        std::thread::yield_now();
    };
    if n >= 4 {
        match u16::from_be_bytes([buf[0], buf[1]]) {
            ACK => return Ok(Some(u16::from_be_bytes([buf[2], buf[3]]))),
            ERROR => return Err(io::Error::other("the client sent an error")),
            _ => {}
        }
    }
    Ok(None)
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// What a transfer sends: a file of `boot_dir`, or bytes made for the request.
enum Source {
    File(File),
    Bytes(Vec<u8>),
}

/// Fills `buf` from `offset` (short only at the end of the file).
fn read_full(source: &Source, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let file = match source {
        Source::File(f) => f,
        Source::Bytes(b) => {
            let from = usize::try_from(offset).unwrap_or(usize::MAX).min(b.len());
            let n = buf.len().min(b.len() - from);
            buf[..n].copy_from_slice(&b[from..from + n]);
            return Ok(n);
        }
    };
    let mut done = 0;
    while done < buf.len() {
        let n = file.read_at(&mut buf[done..], offset + done as u64)?;
        if n == 0 {
            break;
        }
        done += n;
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 8, item 8: a client holds at most its share of the transfer slots, and its junk
    /// or its 255-second `timeout` cannot stretch the server's wait.
    #[test]
    fn transfers_are_bounded_per_client_and_in_time() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ipxe.efi"), vec![7u8; 100_000]).unwrap();
        let socket = udp_on("lo", Ipv4Addr::LOCALHOST, 0).unwrap();
        let server = socket.local_addr().unwrap();
        let limits = Tftp {
            transfers_per_client_max: 2,
            ..Tftp::default()
        };
        spawn(
            socket,
            "lo",
            dir.path().to_path_buf(),
            Arc::new(|_: &str, _: IpAddr| None),
            limits,
            Arc::new(Metrics::default()),
        )
        .unwrap();
        let rrq = b"\x00\x01ipxe.efi\x00octet\x00timeout\x00255\x00";
        let ask = |from: &str| {
            let c = UdpSocket::bind(format!("{from}:0")).unwrap();
            c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            c.send_to(rrq, server).unwrap();
            let mut buf = [0u8; 1600];
            let (n, peer) = c.recv_from(&mut buf).unwrap();
            (c, buf[..n].to_vec(), peer)
        };
        let (hog1, first, peer) = ask("127.0.0.1");
        assert_eq!(&first[..2], &OACK.to_be_bytes());
        assert!(
            String::from_utf8_lossy(&first).contains("255"),
            "timeout acknowledged"
        );
        let (_hog2, second, _) = ask("127.0.0.1");
        assert_eq!(&second[..2], &OACK.to_be_bytes());
        let (_, third, _) = ask("127.0.0.1");
        assert_eq!(
            &third[..2],
            &ERROR.to_be_bytes(),
            "a third transfer for the same client"
        );
        let (_, other, _) = ask("127.0.0.2");
        assert_eq!(&other[..2], &OACK.to_be_bytes(), "another client is served");

        // Junk every 300 ms: the server still retransmits its OACK after its own bounded wait
        // (not after the 255 s the client asked for).
        let started = Instant::now();
        hog1.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let mut buf = [0u8; 1600];
        loop {
            hog1.send_to(b"\x00\x09junk", peer).unwrap();
            if let Ok((n, _)) = hog1.recv_from(&mut buf) {
                assert_eq!(&buf[..2], &OACK.to_be_bytes(), "{:?}", &buf[..n]);
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "no retransmission: junk extended the wait"
            );
        }
        assert!(started.elapsed() >= WAIT_MAX / 2);
    }

    #[test]
    fn parses_requests_and_options() {
        let r = parse_request(b"\x00\x01undionly.kpxe\x00octet\x00blksize\x001468\x00tsize\x000\x00windowsize\x0016\x00").unwrap();
        assert_eq!(r.file, "undionly.kpxe");
        assert_eq!(
            (r.blksize, r.tsize, r.windowsize, r.timeout_s),
            (Some(1468), true, Some(16), None)
        );
        let r = parse_request(
            b"\x00\x01a\x00NETASCII\x00BLKSIZE\x007\x00timeout\x009\x00x-unknown\x001\x00",
        )
        .unwrap();
        assert_eq!(
            (r.blksize, r.timeout_s),
            (None, Some(9)),
            "blksize below 8 is ignored"
        );
        assert_eq!(
            parse_request(b"\x00\x02f\x00octet\x00").unwrap_err().0,
            ERR_ACCESS
        );
        for bad in [
            &b"\x00\x01"[..],
            b"\x00\x01file",
            b"\x00\x01f\x00mail\x00",
            b"\x00\x03\x00\x01xx",
            b"\x00\x01\xff\xfe\x00octet\x00",
        ] {
            assert!(parse_request(bad).is_err(), "{bad:?}");
        }
    }
}
