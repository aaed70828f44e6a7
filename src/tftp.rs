//! The TFTP service (async-tftp): `boot_dir`, read-only, with blksize, tsize, timeout and
//! windowsize (RFC 2347–2349, 7440) within the configured limits.
//!
//! async-tftp's own directory handler refuses `..` but follows symlinks out of its root, so this
//! handler resolves every name with [`resolve_beneath`]. The listening socket is bound to the
//! interface's address and device; async-tftp opens each transfer's socket on that same address.
//! At most `transfers_max` transfers run at once: a permit travels with each transfer's reader
//! and is given back when the transfer ends.

use crate::bootfiles::{resolve_beneath, BootFileError};
use crate::config::Tftp;
use crate::metrics::Metrics;
use async_tftp::packet;
use async_tftp::server::{Handler, TftpServerBuilder};
use blocking::Unblock;
use futures_lite::AsyncRead;
use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use std::fs::File;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

/// Serves `boot_dir` over TFTP.
pub struct BootDirHandler {
    root: PathBuf,
    active: Arc<AtomicUsize>,
    transfers_max: usize,
    metrics: Arc<Metrics>,
}

/// A file being sent; holds one of the `transfers_max` permits until dropped.
pub struct Transfer {
    file: Unblock<File>,
    active: Arc<AtomicUsize>,
}

impl AsyncRead for Transfer {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.file).poll_read(cx, buf)
    }
}

impl Drop for Transfer {
    fn drop(&mut self) {
        self.active.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Handler for BootDirHandler {
    type Reader = Transfer;
    type Writer = futures_lite::io::Sink;

    async fn read_req_open(
        &mut self,
        client: &SocketAddr,
        path: &Path,
    ) -> Result<(Self::Reader, Option<u64>), packet::Error> {
        let name = path.to_string_lossy();
        let refuse = |e: packet::Error, why: String| {
            self.metrics.tftp_refused.inc();
            tracing::info!(%client, file = %name, "TFTP request refused: {why}");
            e
        };
        let file = match resolve_beneath(&self.root, &name) {
            Ok(f) => f,
            Err(e @ (BootFileError::NotFound(_) | BootFileError::NotAFile(_))) => {
                return Err(refuse(packet::Error::FileNotFound, e.to_string()))
            }
            Err(e) => return Err(refuse(packet::Error::PermissionDenied, e.to_string())),
        };
        if self.active.fetch_add(1, Ordering::AcqRel) >= self.transfers_max {
            self.active.fetch_sub(1, Ordering::AcqRel);
            return Err(refuse(
                packet::Error::Msg("server busy, try again".into()),
                "too many transfers".into(),
            ));
        }
        let active = self.active.clone();
        let opened = File::open(&file).and_then(|f| {
            let len = f.metadata()?.len();
            Ok((f, len))
        });
        match opened {
            Ok((f, len)) => {
                self.metrics.tftp_transfers.inc();
                tracing::debug!(%client, file = %name, "TFTP transfer");
                Ok((
                    Transfer {
                        file: Unblock::new(f),
                        active,
                    },
                    Some(len),
                ))
            }
            Err(e) => {
                active.fetch_sub(1, Ordering::AcqRel);
                Err(refuse(packet::Error::from(e), "cannot open".into()))
            }
        }
    }

    async fn write_req_open(
        &mut self,
        client: &SocketAddr,
        path: &Path,
        _size: Option<u64>,
    ) -> Result<Self::Writer, packet::Error> {
        self.metrics.tftp_refused.inc();
        tracing::info!(%client, file = %path.display(), "TFTP write refused: the server is read-only");
        Err(packet::Error::IllegalOperation)
    }
}

/// The TFTP socket: `address:port` on `interface` only.
pub fn bind(interface: &str, address: Ipv4Addr, port: u16) -> io::Result<std::net::UdpSocket> {
    let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    s.set_reuse_address(true)?;
    s.bind_device(Some(interface.as_bytes()))?;
    s.bind(&SockAddr::from(SocketAddr::from((address, port))))?;
    Ok(s.into())
}

/// Serves until the future is dropped.
pub async fn serve(
    socket: std::net::UdpSocket,
    boot_dir: PathBuf,
    limits: &Tftp,
    metrics: Arc<Metrics>,
) -> anyhow::Result<()> {
    let handler = BootDirHandler {
        root: boot_dir,
        active: Arc::new(AtomicUsize::new(0)),
        transfers_max: limits.transfers_max,
        metrics,
    };
    let server = TftpServerBuilder::with_handler(handler)
        .std_socket(socket)?
        .block_size_limit(limits.blksize_max)
        .window_size_limit(limits.windowsize_max)
        .timeout(Duration::from_secs(2))
        .max_send_retries(10)
        .build()
        .await?;
    server.serve().await?;
    Ok(())
}
