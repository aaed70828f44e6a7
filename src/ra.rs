//! IPv6 router advertisements on the provisioning interface (`router_advertisements: true`).
//!
//! Debian's iPXE waits ~12 s on "Configuring" when no IPv6 router answers (docs/firmware.md). A
//! minimal advertisement — router lifetime 0 (not a default router), no prefix, no managed or
//! other-config flags — tells it at once that IPv6 has nothing to offer here. Sent to all nodes
//! every few seconds and in answer to every router solicitation, only on the configured interface.

use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use std::io;
use std::net::{Ipv6Addr, SocketAddrV6};
use std::time::Duration;

/// ICMPv6 types (RFC 4861).
const ROUTER_SOLICITATION: u8 = 133;
const ROUTER_ADVERTISEMENT: u8 = 134;
/// How often an unsolicited advertisement goes out.
const INTERVAL: Duration = Duration::from_secs(3);

/// The advertisement: type, code, checksum (filled by the kernel), hop limit 64, no flags,
/// lifetime 0, reachable time 0, retransmit timer 0, and our link-layer address.
pub fn advertisement(mac: [u8; 6]) -> Vec<u8> {
    let mut p = vec![
        ROUTER_ADVERTISEMENT,
        0,
        0,
        0,
        64,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
    ];
    p.extend_from_slice(&[1, 1]);
    p.extend_from_slice(&mac);
    p
}

/// A raw ICMPv6 socket on `interface`, hop limit 255 as RFC 4861 requires.
pub fn socket(interface: &str) -> io::Result<(Socket, u32)> {
    let index = nix_if_index(interface)?;
    let s = Socket::new(Domain::IPV6, Type::RAW, Some(Protocol::ICMPV6))?;
    s.bind_device(Some(interface.as_bytes()))?;
    s.set_multicast_hops_v6(255)?;
    s.set_unicast_hops_v6(255)?;
    s.set_multicast_if_v6(index)?;
    s.join_multicast_v6(&"ff02::2".parse().expect("all-routers"), index)?;
    Ok((s, index))
}

fn nix_if_index(interface: &str) -> io::Result<u32> {
    let name = std::ffi::CString::new(interface).map_err(io::Error::other)?;
    // SAFETY: if_nametoindex reads a NUL-terminated string we own.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if index == 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(index)
}

/// The interface's MAC address, from sysfs.
fn interface_mac(interface: &str) -> io::Result<[u8; 6]> {
    let text = std::fs::read_to_string(format!("/sys/class/net/{interface}/address"))?;
    let mac: crate::mac::Mac = text.trim().parse().map_err(io::Error::other)?;
    Ok(mac.0)
}

/// Advertises for as long as the process runs (on a thread of its own: blocking receive with a
/// timeout is all it needs).
pub fn spawn(interface: String) -> io::Result<()> {
    let (socket, index) = socket(&interface)?;
    socket.set_nonblocking(false)?;
    socket.set_read_timeout(Some(INTERVAL))?;
    let packet = advertisement(interface_mac(&interface)?);
    let all_nodes = SockAddr::from(SocketAddrV6::new(
        Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1),
        0,
        0,
        index,
    ));
    std::thread::Builder::new()
        .name("router-adverts".into())
        .spawn(move || {
            let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 1500];
            loop {
                if let Err(e) = socket.send_to(&packet, &all_nodes) {
                    tracing::debug!("cannot send a router advertisement: {e}");
                }
                // Until a solicitation arrives or the period ends.
                let deadline = std::time::Instant::now() + INTERVAL;
                while std::time::Instant::now() < deadline {
                    match socket.recv(&mut buf) {
                        // SAFETY: recv initialised the first n bytes.
                        Ok(n)
                            if n > 0 && unsafe { buf[0].assume_init() } == ROUTER_SOLICITATION =>
                        {
                            break
                        }
                        Ok(_) => {}
                        Err(_) => break,
                    }
                }
            }
        })?;
    Ok(())
}
