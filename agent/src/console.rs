//! The install's console log: every line the agent prints (and, as process 1, the kernel's
//! messages from `/dev/kmsg`) kept in memory — bounded — and sent to the appliance as it grows
//! (`POST /api/agent/MAC/log?offset=N`, every couple of seconds and before each report), so an
//! operator reads every install, a failed one above all, with `fleetboot host log MAC`. What the
//! agent prints still reaches the console: stdout and stderr go through a pipe whose reader
//! writes each line on to where they went before.
//!
//! Sending is best effort: a lost chunk is resent from the offset the appliance says it holds,
//! and a refused token (the install ended) stops the sending; nothing here can fail an install.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::FromRawFd;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

/// The most the agent keeps (the appliance keeps as much per install).
const LOG_MAX: usize = 16 << 20;
/// How often new lines are sent while the install runs.
const SEND_EVERY: Duration = Duration::from_secs(2);

struct Log {
    text: Vec<u8>,
    /// Bytes the appliance has.
    sent: usize,
    full: bool,
    /// Where to send: the log URL and the install token.
    to: Option<(String, String)>,
    /// Each captured fd, a copy of what it pointed at before, and its echo thread.
    restore: Vec<(i32, i32, std::thread::JoinHandle<()>)>,
}

static LOG: OnceLock<Mutex<Log>> = OnceLock::new();

fn log() -> &'static Mutex<Log> {
    LOG.get_or_init(|| {
        Mutex::new(Log {
            text: Vec::new(),
            sent: 0,
            full: false,
            to: None,
            restore: Vec::new(),
        })
    })
}

fn lock() -> std::sync::MutexGuard<'static, Log> {
    log().lock().unwrap_or_else(|p| p.into_inner())
}

fn push(bytes: &[u8]) {
    let mut l = lock();
    if l.full {
        return;
    }
    if l.text.len() + bytes.len() > LOG_MAX {
        l.text.extend_from_slice(
            b"[fleetboot-agent: the console log is full; the rest is not kept]\n",
        );
        l.full = true;
        return;
    }
    l.text.extend_from_slice(bytes);
}

/// Routes stdout and stderr through the log (each line still reaches where it went), and as
/// process 1 (`kernel`) adds the kernel's messages. Call once, early; `finish` undoes it.
pub fn capture(kernel: bool) {
    let mut restore = Vec::new();
    for fd in [1, 2] {
        match redirect(fd) {
            Some((saved, echo)) => restore.push((fd, saved, echo)),
            None => break,
        }
    }
    lock().restore = restore;
    if kernel {
        std::thread::spawn(read_kernel_messages);
    }
    std::thread::spawn(|| loop {
        std::thread::sleep(SEND_EVERY);
        send();
    });
}

/// Points `fd` at a pipe whose reader thread writes each line on to where `fd` pointed and
/// into the log; returns a copy of the old target (to put back) and the thread.
fn redirect(fd: i32) -> Option<(i32, std::thread::JoinHandle<()>)> {
    // SAFETY: plain fd syscalls on fds this process owns; every return value is checked.
    let (read_fd, echo_fd, saved) = unsafe {
        let mut p = [0i32; 2];
        if libc::pipe2(p.as_mut_ptr(), libc::O_CLOEXEC) != 0 {
            return None;
        }
        let echo = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3);
        let saved = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3);
        if echo < 0 || saved < 0 || libc::dup2(p[1], fd) < 0 {
            for f in [p[0], p[1], echo, saved] {
                if f >= 0 {
                    libc::close(f);
                }
            }
            return None;
        }
        libc::close(p[1]);
        (p[0], echo, saved)
    };
    let echo = std::thread::spawn(move || {
        // SAFETY: both fds were made above for this thread alone.
        let mut out = unsafe { std::fs::File::from_raw_fd(echo_fd) };
        let pipe = unsafe { std::fs::File::from_raw_fd(read_fd) };
        let mut reader = BufReader::new(pipe);
        let mut line = Vec::new();
        while reader.read_until(b'\n', &mut line).is_ok_and(|n| n > 0) {
            let _ = out.write_all(&line);
            push(&line);
            line.clear();
        }
    });
    Some((saved, echo))
}

/// Prints `fleetboot-agent: MSG` on stderr's console and puts it in the log at once, not
/// through the pipe: for the lines that must be in the log before the next `send` (the last
/// ones before an install's report).
pub fn say(msg: &str) {
    let line = format!("fleetboot-agent: {msg}\n");
    let target = lock()
        .restore
        .iter()
        .find(|(fd, _, _)| *fd == 2)
        .map(|(_, saved, _)| *saved);
    match target {
        Some(fd) => {
            // SAFETY: `fd` is the saved copy of stderr, open until `finish` closes it, which
            // takes the lock this would have to wait for first.
            let mut f = std::mem::ManuallyDrop::new(unsafe { std::fs::File::from_raw_fd(fd) });
            let _ = f.write_all(line.as_bytes());
            push(line.as_bytes());
        }
        // Not captured: stderr is the console itself, and there is no log to send.
        None => eprint!("{line}"),
    }
}

/// `/dev/kmsg` records (`level,seq,usec,flags;text`) as `[seconds] text` lines; the kernel
/// prints them on the console itself, so they are only kept.
fn read_kernel_messages() {
    let Ok(mut kmsg) = std::fs::File::open("/dev/kmsg") else {
        return;
    };
    let mut buf = vec![0u8; 8192];
    // One record per read; EPIPE when records were overwritten before being read: go on.
    loop {
        match kmsg.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                if let Some(line) = kernel_line(&buf[..n]) {
                    push(line.as_bytes());
                }
            }
            Err(e) if e.raw_os_error() == Some(libc::EPIPE) => continue,
            Err(_) => return,
        }
    }
}

fn kernel_line(record: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(record);
    let (head, message) = text.split_once(';')?;
    let usec: u64 = head.split(',').nth(2)?.parse().ok()?;
    // Continuation lines (` KEY=value`) carry device properties: left out.
    let message = redact(message.lines().next().unwrap_or(""));
    Some(format!(
        "[{:5}.{:06}] {message}\n",
        usec / 1_000_000,
        usec % 1_000_000
    ))
}

/// The kernel prints its command line, which holds the install token: not in the log.
fn redact(line: &str) -> String {
    let key = fleetboot_image::api::cmdline::TOKEN;
    line.split(' ')
        .map(
            |w| match w.strip_prefix(key).and_then(|r| r.strip_prefix('=')) {
                Some(_) => format!("{key}=***"),
                None => w.to_string(),
            },
        )
        .collect::<Vec<_>>()
        .join(" ")
}

/// From now on, sends the log to the appliance at `server` for `mac` with the install `token`.
pub fn send_to(server: &str, mac: &str, token: &str) {
    lock().to = Some((
        format!("{server}/api/agent/{mac}/log"),
        format!("Bearer {token}"),
    ));
}

/// Sends what the appliance does not have yet, a MiB at a time, until it has it all or a request
/// fails (a failure waits for the next call).
pub fn send() {
    loop {
        let before = lock().sent;
        send_chunk();
        let l = lock();
        if l.sent <= before || l.sent >= l.text.len() || l.to.is_none() {
            return;
        }
    }
}

fn send_chunk() {
    let (url, auth, offset, chunk) = {
        let l = lock();
        let Some((url, auth)) = l.to.clone() else {
            return;
        };
        if l.sent >= l.text.len() {
            return;
        }
        // At most 1 MiB a request: the appliance bounds request bodies.
        let end = l.text.len().min(l.sent + (1 << 20));
        (url, auth, l.sent, l.text[l.sent..end].to_vec())
    };
    let http: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(10)))
        .http_status_as_error(false)
        .build()
        .into();
    let Ok(mut resp) = http
        .post(format!("{url}?offset={offset}"))
        .header("authorization", &auth)
        .send(&chunk[..])
    else {
        return;
    };
    let status = resp.status().as_u16();
    let length = resp
        .body_mut()
        .read_json::<serde_json::Value>()
        .ok()
        .and_then(|v| v["length"].as_u64());
    let mut l = lock();
    match (status, length) {
        // Taken, or a gap: either way the appliance says what it holds.
        (200 | 409, Some(n)) => l.sent = (n as usize).min(l.text.len()),
        // The token is void (the install ended) or the appliance refuses logs: stop.
        (400..=499, _) => l.to = None,
        _ => {}
    }
}

/// Sends what is left and stops the capture: stdout and stderr point where they did before, and
/// every line printed so far has reached them.
pub fn finish() {
    let _ = std::io::stdout().flush();
    let restore = std::mem::take(&mut lock().restore);
    for (fd, saved, echo) in restore {
        // SAFETY: `saved` is the copy `redirect` made; putting it back closes the pipe's last
        // write end, so the echo thread reads to the end and stops.
        unsafe {
            libc::dup2(saved, fd);
            libc::close(saved);
        }
        let _ = echo.join();
    }
    send();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_records_become_lines() {
        assert_eq!(
            kernel_line(b"6,339,5140900,-;virtio_net virtio0 eth0: renamed\n SUBSYSTEM=net\n")
                .as_deref(),
            Some("[    5.140900] virtio_net virtio0 eth0: renamed\n")
        );
        assert_eq!(kernel_line(b"garbage"), None);
        assert_eq!(
            kernel_line(b"5,0,0,-;Kernel command line: console=ttyS0 fleetboot.token=s3cret x=1")
                .as_deref(),
            Some("[    0.000000] Kernel command line: console=ttyS0 fleetboot.token=*** x=1\n")
        );
    }
}
