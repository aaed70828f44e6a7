//! Bringing up the NIC iPXE booted from, with the address iPXE had (from the command line):
//! find it by MAC in /sys/class/net, set address and netmask, up, a default route; wait for carrier.

use anyhow::{bail, Context, Result};
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

/// Waits until an interface with `mac` exists (drivers bind asynchronously); returns its name.
pub fn wait_for_nic(mac: &str, timeout: Duration) -> Result<String> {
    let until = Instant::now() + timeout;
    loop {
        let mut seen = Vec::new();
        if let Ok(entries) = std::fs::read_dir("/sys/class/net") {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let addr = std::fs::read_to_string(e.path().join("address")).unwrap_or_default();
                if addr.trim().eq_ignore_ascii_case(mac) {
                    return Ok(name);
                }
                seen.push(format!("{name} {}", addr.trim()));
            }
        }
        if Instant::now() >= until {
            bail!("no NIC with MAC {mac} (found: {})", seen.join(", "));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn ifreq(name: &str) -> Result<libc::ifreq> {
    // SAFETY: ifreq is plain data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    if name.len() >= req.ifr_name.len() {
        bail!("interface name {name} is too long");
    }
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    Ok(req)
}

fn sockaddr(ip: Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(ip).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr have the same size on Linux; this is how the API is used.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

/// glibc's ioctl takes the request as an unsigned long, musl's as an int.
#[allow(clippy::unnecessary_cast)]
fn ioctl(fd: i32, request: u64, arg: *mut libc::c_void, what: &str) -> Result<()> {
    // SAFETY: `arg` points to the structure `request` expects, owned by the caller for the call.
    if unsafe { libc::ioctl(fd, request as libc::Ioctl, arg) } < 0 {
        bail!("{what}: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// Sets `lo` and `ifname` up (no address yet), then waits for carrier (e1000e takes ~2 s).
pub fn link_up(ifname: &str) -> Result<()> {
    let sock = std::net::UdpSocket::bind("0.0.0.0:0").context("no socket for interface set-up")?;
    let fd = sock.as_raw_fd();
    for name in ["lo", ifname] {
        let mut req = ifreq(name)?;
        ioctl(
            fd,
            libc::SIOCGIFFLAGS,
            (&mut req as *mut libc::ifreq).cast(),
            "get flags",
        )?;
        // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
        unsafe { req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short };
        ioctl(
            fd,
            libc::SIOCSIFFLAGS,
            (&mut req as *mut libc::ifreq).cast(),
            "set up",
        )?;
    }
    let carrier = format!("/sys/class/net/{ifname}/carrier");
    let until = Instant::now() + Duration::from_secs(10);
    while std::fs::read_to_string(&carrier)
        .map(|c| c.trim() != "1")
        .unwrap_or(true)
    {
        if Instant::now() >= until {
            bail!("{ifname} has no link (no carrier after 10 s)");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// Gives the (up) `ifname` the address `ip`/`netmask` and an optional default gateway.
pub fn configure(ifname: &str, ip: &str, netmask: &str, gateway: Option<&str>) -> Result<()> {
    let ip: Ipv4Addr = ip
        .parse()
        .with_context(|| format!("bad fleetboot.ip {ip:?}"))?;
    let mask: Ipv4Addr = netmask
        .parse()
        .with_context(|| format!("bad fleetboot.netmask {netmask:?}"))?;
    let sock = std::net::UdpSocket::bind("0.0.0.0:0").context("no socket for interface set-up")?;
    let fd = sock.as_raw_fd();
    let mut req = ifreq(ifname)?;
    req.ifr_ifru.ifru_addr = sockaddr(ip);
    ioctl(
        fd,
        libc::SIOCSIFADDR,
        (&mut req as *mut libc::ifreq).cast(),
        "set address",
    )?;
    let mut req = ifreq(ifname)?;
    req.ifr_ifru.ifru_netmask = sockaddr(mask);
    ioctl(
        fd,
        libc::SIOCSIFNETMASK,
        (&mut req as *mut libc::ifreq).cast(),
        "set netmask",
    )?;
    if let Some(gw) = gateway {
        let gw: Ipv4Addr = gw
            .parse()
            .with_context(|| format!("bad fleetboot.gateway {gw:?}"))?;
        // SAFETY: rtentry is plain data; all-zero is a valid value.
        let mut rt: libc::rtentry = unsafe { std::mem::zeroed() };
        rt.rt_dst = sockaddr(Ipv4Addr::UNSPECIFIED);
        rt.rt_genmask = sockaddr(Ipv4Addr::UNSPECIFIED);
        rt.rt_gateway = sockaddr(gw);
        rt.rt_flags = (libc::RTF_UP | libc::RTF_GATEWAY) as libc::c_ushort;
        ioctl(
            fd,
            libc::SIOCADDRT,
            (&mut rt as *mut libc::rtentry).cast(),
            "add the default route",
        )?;
    }
    Ok(())
}
