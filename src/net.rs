//! Facts about the machine's network interfaces (getifaddrs), and UDP sockets bound to one.

use std::ffi::CStr;
use std::io;
use std::net::Ipv4Addr;

/// An interface's first IPv4 address and its netmask.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InterfaceAddr {
    pub addr: Ipv4Addr,
    pub netmask: Ipv4Addr,
}

/// The first IPv4 address of interface `name`, if it has one.
pub fn interface_ipv4(name: &str) -> io::Result<Option<InterfaceAddr>> {
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `list` with a linked list we free below with freeifaddrs.
    if unsafe { libc::getifaddrs(&mut list) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut found = None;
    let mut cur = list;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned, valid until freeifaddrs.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        if ifa.ifa_addr.is_null() || ifa.ifa_name.is_null() {
            continue;
        }
        // SAFETY: ifa_name is a NUL-terminated string owned by the list.
        let ifname = unsafe { CStr::from_ptr(ifa.ifa_name) };
        // SAFETY: ifa_addr is non-null and points to a sockaddr of at least sa_family.
        let family = unsafe { (*ifa.ifa_addr).sa_family };
        if ifname.to_bytes() != name.as_bytes() || i32::from(family) != libc::AF_INET {
            continue;
        }
        // SAFETY: for AF_INET, ifa_addr and ifa_netmask point to sockaddr_in.
        let (addr, mask) = unsafe {
            let a = &*(ifa.ifa_addr as *const libc::sockaddr_in);
            let m = if ifa.ifa_netmask.is_null() {
                0
            } else {
                (*(ifa.ifa_netmask as *const libc::sockaddr_in))
                    .sin_addr
                    .s_addr
            };
            (a.sin_addr.s_addr, m)
        };
        found = Some(InterfaceAddr {
            addr: Ipv4Addr::from(u32::from_be(addr)),
            netmask: Ipv4Addr::from(u32::from_be(mask)),
        });
        break;
    }
    // SAFETY: `list` came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(list) };
    Ok(found)
}

/// A blocking UDP socket on `ip:port` that sees and sends only on `interface` (SO_BINDTODEVICE),
/// with SO_REUSEADDR and SO_BROADCAST: what DHCP and TFTP both listen on.
pub fn udp_on(interface: &str, ip: Ipv4Addr, port: u16) -> io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, SockAddr, Socket, Type};
    let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    s.set_reuse_address(true)?;
    s.set_broadcast(true)?;
    s.bind_device(Some(interface.as_bytes()))?;
    s.bind(&SockAddr::from(std::net::SocketAddr::from((ip, port))))?;
    Ok(s.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_has_127_0_0_1() {
        let lo = interface_ipv4("lo")
            .unwrap()
            .expect("lo has an IPv4 address");
        assert_eq!(lo.addr, Ipv4Addr::LOCALHOST);
        assert_eq!(lo.netmask, Ipv4Addr::new(255, 0, 0, 0));
        assert_eq!(interface_ipv4("no-such-if0").unwrap(), None);
    }
}
