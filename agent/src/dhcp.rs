//! A minimal DHCP client, for when the kernel command line carries no address (a boot path other
//! than fleetboot's iPXE script): DISCOVER, take the first OFFER, REQUEST it, wait for the ACK.
//! Sent by broadcast from a socket bound to the NIC, before it has an address.

use anyhow::{bail, Context, Result};
use std::net::{Ipv4Addr, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

/// What the server gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub ip: Ipv4Addr,
    pub netmask: Ipv4Addr,
    pub gateway: Option<Ipv4Addr>,
}

const MAGIC: [u8; 4] = [99, 130, 83, 99];

fn packet(mac: [u8; 6], xid: u32, kind: u8, extra: &[u8]) -> Vec<u8> {
    let mut p = vec![0u8; 240];
    p[0] = 1; // BOOTREQUEST
    p[1] = 1; // Ethernet
    p[2] = 6;
    p[4..8].copy_from_slice(&xid.to_be_bytes());
    p[10] = 0x80; // answer by broadcast: we have no address yet
    p[28..34].copy_from_slice(&mac);
    p[236..240].copy_from_slice(&MAGIC);
    p.extend_from_slice(&[53, 1, kind]);
    p.extend_from_slice(&[55, 3, 1, 3, 54]); // ask for mask, router, server id
    p.extend_from_slice(extra);
    p.push(255);
    p
}

/// The value of option `code` in a reply.
fn option(p: &[u8], code: u8) -> Option<&[u8]> {
    let mut i = 240;
    while i + 1 < p.len() {
        match p[i] {
            0 => i += 1,
            255 => return None,
            c => {
                let len = p[i + 1] as usize;
                let data = p.get(i + 2..i + 2 + len)?;
                if c == code {
                    return Some(data);
                }
                i += 2 + len;
            }
        }
    }
    None
}

fn addr(data: Option<&[u8]>) -> Option<Ipv4Addr> {
    let d = data?;
    (d.len() >= 4).then(|| Ipv4Addr::new(d[0], d[1], d[2], d[3]))
}

/// Waits for a reply of `kind` to `xid`.
fn wait(sock: &UdpSocket, xid: u32, kind: u8, until: Instant) -> Result<Vec<u8>> {
    let mut buf = [0u8; 1500];
    while Instant::now() < until {
        sock.set_read_timeout(Some(
            (until - Instant::now()).max(Duration::from_millis(10)),
        ))?;
        let Ok(n) = sock.recv(&mut buf) else { continue };
        let p = &buf[..n];
        if n >= 240
            && p[0] == 2
            && p[4..8] == xid.to_be_bytes()
            && p[236..240] == MAGIC
            && option(p, 53) == Some(&[kind][..])
        {
            return Ok(p.to_vec());
        }
    }
    bail!("no DHCP answer")
}

/// Gets a lease for `ifname` (which must be up) with MAC `mac`.
pub fn lease(ifname: &str, mac: [u8; 6], timeout: Duration) -> Result<Lease> {
    let sock = UdpSocket::bind("0.0.0.0:68").context("cannot bind the DHCP client port")?;
    sock.set_broadcast(true)?;
    let name = std::ffi::CString::new(ifname)?;
    // SAFETY: SO_BINDTODEVICE with a NUL-terminated interface name we own.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_BINDTODEVICE,
            name.as_ptr().cast(),
            name.as_bytes_with_nul().len() as libc::socklen_t,
        )
    };
    if rc != 0 {
        bail!(
            "cannot bind to {ifname}: {}",
            std::io::Error::last_os_error()
        );
    }
    let xid = u32::from_be_bytes([mac[2], mac[3], mac[4], mac[5]]) ^ std::process::id();
    let until = Instant::now() + timeout;
    let mut attempt = Duration::from_secs(1);
    while Instant::now() < until {
        sock.send_to(&packet(mac, xid, 1, &[]), "255.255.255.255:67")?;
        let Ok(offer) = wait(&sock, xid, 2, (Instant::now() + attempt).min(until)) else {
            attempt = (attempt * 2).min(Duration::from_secs(8));
            continue;
        };
        let ip = Ipv4Addr::new(offer[16], offer[17], offer[18], offer[19]);
        let server = addr(option(&offer, 54)).context("an offer without a server identifier")?;
        let mut req = vec![50, 4];
        req.extend_from_slice(&ip.octets());
        req.extend_from_slice(&[54, 4]);
        req.extend_from_slice(&server.octets());
        sock.send_to(&packet(mac, xid, 3, &req), "255.255.255.255:67")?;
        if let Ok(ack) = wait(&sock, xid, 5, (Instant::now() + attempt).min(until)) {
            return Ok(Lease {
                ip: Ipv4Addr::new(ack[16], ack[17], ack[18], ack[19]),
                netmask: addr(option(&ack, 1)).unwrap_or(Ipv4Addr::new(255, 255, 255, 0)),
                gateway: addr(option(&ack, 3)),
            });
        }
    }
    bail!("no DHCP lease on {ifname} within {timeout:?}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_requests_and_reads_options() {
        let p = packet([0x52, 0x54, 0, 1, 2, 3], 7, 3, &[50, 4, 10, 0, 0, 5]);
        assert_eq!(&p[28..34], &[0x52, 0x54, 0, 1, 2, 3]);
        assert_eq!(option(&p, 53), Some(&[3u8][..]));
        assert_eq!(addr(option(&p, 50)), Some(Ipv4Addr::new(10, 0, 0, 5)));
        assert_eq!(option(&p, 54), None);
    }
}
