//! The DHCP sockets and the answer to each request.
//!
//! Sockets are bound to `0.0.0.0:67` (and `:4011` in proxy mode) **and** to the configured
//! interface (SO_BINDTODEVICE), so nothing arriving on another interface is ever seen or answered.
//! Answers go to the relay (giaddr:67) when there is one, to a renewing client's address, to the
//! source of a port-4011 request, and otherwise by broadcast on the interface.

use super::leases::{Lease, LeasePool};
use super::packet::{self, arch_name, reply_to, ClientRequest};
use crate::config::{Config, DhcpMode};
use crate::fleet::{dhcp_boot, DhcpBoot, Firmware};
use crate::http::AppState;
use dhcproto::v4::{DhcpOption, MessageType};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use std::collections::HashMap;
use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};
use tokio::net::UdpSocket;

/// The server's bound sockets: port 67 and, in proxy mode, port 4011.
pub struct DhcpSockets {
    pub main: std::net::UdpSocket,
    pub pxe: Option<std::net::UdpSocket>,
}

impl DhcpSockets {
    /// Binds the DHCP ports on `interface` only.
    pub fn bind(
        interface: &str,
        mode: DhcpMode,
        port: u16,
        pxe_port: u16,
    ) -> io::Result<DhcpSockets> {
        Ok(DhcpSockets {
            main: udp_on(interface, port)?,
            pxe: if mode == DhcpMode::Proxy {
                Some(udp_on(interface, pxe_port)?)
            } else {
                None
            },
        })
    }
}

fn udp_on(interface: &str, port: u16) -> io::Result<std::net::UdpSocket> {
    let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    s.set_reuse_address(true)?;
    s.set_broadcast(true)?;
    s.bind_device(Some(interface.as_bytes()))?;
    s.set_nonblocking(true)?;
    s.bind(&SockAddr::from(SocketAddr::from((
        Ipv4Addr::UNSPECIFIED,
        port,
    ))))?;
    Ok(s.into())
}

/// The DHCP service.
pub struct DhcpServer {
    state: Arc<AppState>,
    /// The appliance's address on the interface (server identifier, siaddr).
    server_ip: Ipv4Addr,
    netmask: Ipv4Addr,
    pool: Option<LeasePool>,
    /// The configuration the pool was built from; a reload rebuilds it (leases are kept).
    pool_config: Arc<Config>,
    /// Port clients listen on.
    client_port: u16,
}

/// An answer and where it goes.
#[derive(Debug)]
pub struct Reply {
    pub bytes: Vec<u8>,
    pub to: SocketAddr,
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

impl DhcpServer {
    /// A server answering as `server_ip` on a subnet with `netmask`.
    pub fn new(state: Arc<AppState>, server_ip: Ipv4Addr, netmask: Ipv4Addr) -> DhcpServer {
        let config = state.config();
        let pool = pool_for(&config, &state);
        DhcpServer {
            state,
            server_ip,
            netmask,
            pool,
            pool_config: config,
            client_port: 68,
        }
    }

    /// Serves until a socket fails.
    pub async fn run(mut self, sockets: DhcpSockets) -> io::Result<()> {
        let main = UdpSocket::from_std(sockets.main)?;
        let pxe = sockets.pxe.map(UdpSocket::from_std).transpose()?;
        let mut buf = vec![0u8; 2048];
        let mut pxe_buf = vec![0u8; 2048];
        loop {
            let (n, src, on_pxe) = tokio::select! {
                r = main.recv_from(&mut buf) => { let (n, src) = r?; (n, src, false) }
                r = async {
                    match &pxe { Some(s) => s.recv_from(&mut pxe_buf).await, None => std::future::pending().await }
                } => { let (n, src) = r?; (n, src, true) }
            };
            let data = if on_pxe { &pxe_buf[..n] } else { &buf[..n] };
            let Some(reply) = self.handle(data, src, on_pxe) else {
                continue;
            };
            let socket = if on_pxe {
                pxe.as_ref().unwrap_or(&main)
            } else {
                &main
            };
            if let Err(e) = socket.send_to(&reply.bytes, reply.to).await {
                tracing::warn!(to = %reply.to, "cannot send a DHCP answer: {e}");
            } else {
                self.state.metrics.dhcp_answered.inc();
            }
        }
    }

    /// The answer to one datagram, if any.
    pub fn handle(&mut self, data: &[u8], src: SocketAddr, on_pxe: bool) -> Option<Reply> {
        let metrics = self.state.metrics.clone();
        metrics.dhcp_received.inc();
        let req = match packet::parse(data) {
            Ok(r) => r,
            Err(e) => {
                metrics.dhcp_dropped.inc();
                tracing::debug!(%src, "dropped a DHCP packet: {e}");
                return None;
            }
        };
        let config = self.state.config();
        if !Arc::ptr_eq(&config, &self.pool_config) {
            self.pool = pool_for(&config, &self.state);
            self.pool_config = config.clone();
        }
        let known = config.hosts.contains_key(&req.mac);
        let boot = dhcp_boot(
            req.firmware,
            &req.mac.to_string(),
            known,
            &config.unknown_hosts,
            &config.boot_files,
            &self.state.base_url,
        );
        if boot == DhcpBoot::Ignore {
            metrics.dhcp_ignored.inc();
            tracing::debug!(mac = %req.mac, "not answering an unknown host");
            return None;
        }
        if matches!(req.kind, MessageType::Discover | MessageType::Request) {
            let ip = (req.ciaddr != Ipv4Addr::UNSPECIFIED).then_some(req.ciaddr);
            if let Err(e) = self
                .state
                .fleet()
                .seen(req.mac, ip, Some(arch_name(req.firmware)))
            {
                tracing::warn!("cannot record a host: {e}");
            }
        }
        let reply = match config.dhcp.mode {
            DhcpMode::Off => None,
            DhcpMode::Proxy => self.proxy(&req, &boot, src, on_pxe),
            DhcpMode::Full => self.full(&config, &req, &boot),
        };
        if reply.is_none() {
            metrics.dhcp_ignored.inc();
        }
        reply
    }

    fn destination(&self, req: &ClientRequest) -> SocketAddr {
        if req.giaddr != Ipv4Addr::UNSPECIFIED {
            SocketAddr::V4(SocketAddrV4::new(req.giaddr, 67))
        } else if req.ciaddr != Ipv4Addr::UNSPECIFIED {
            SocketAddr::V4(SocketAddrV4::new(req.ciaddr, self.client_port))
        } else {
            SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::BROADCAST, self.client_port))
        }
    }

    /// ProxyDHCP: boot information only, to PXE clients; never an address.
    fn proxy(
        &self,
        req: &ClientRequest,
        boot: &DhcpBoot,
        src: SocketAddr,
        on_pxe: bool,
    ) -> Option<Reply> {
        if matches!(boot, DhcpBoot::AddressOnly) {
            return None;
        }
        let kind = match (on_pxe, req.kind) {
            (false, MessageType::Discover) => MessageType::Offer,
            (false, MessageType::Request) if req.server_id == Some(self.server_ip) => {
                MessageType::Ack
            }
            (true, MessageType::Request) | (true, MessageType::Discover) => MessageType::Ack,
            _ => return None,
        };
        let mut rep = reply_to(req, kind, self.server_ip);
        rep.set_siaddr(self.server_ip);
        self.add_boot(&mut rep, req, boot, true);
        let to = if on_pxe { src } else { self.destination(req) };
        Some(Reply {
            bytes: packet::encode(&rep).ok()?,
            to,
        })
    }

    /// Full mode: addresses from the pool (reservations first), boot information to PXE clients.
    fn full(&mut self, config: &Config, req: &ClientRequest, boot: &DhcpBoot) -> Option<Reply> {
        let t = now();
        let lease_s = config.dhcp.lease_time;
        let host = config.hosts.get(&req.mac);
        let pool = self.pool.as_mut()?;
        let (kind, ip) = match req.kind {
            MessageType::Discover => {
                let Some(ip) = pool.offer(req.mac, req.requested_ip, t) else {
                    tracing::warn!(mac = %req.mac, "the address pool is exhausted");
                    return None;
                };
                (MessageType::Offer, Some(ip))
            }
            MessageType::Request => {
                if req.server_id.is_some_and(|s| s != self.server_ip) {
                    pool.forget_offer(req.mac);
                    return None;
                }
                let wanted = req
                    .requested_ip
                    .or((req.ciaddr != Ipv4Addr::UNSPECIFIED).then_some(req.ciaddr))?;
                match pool.commit(req.mac, wanted, lease_s, t) {
                    Some(Lease { ip, expires }) => {
                        if let Err(e) = self.state.fleet().save_lease(req.mac, ip, expires) {
                            tracing::warn!("cannot persist a lease: {e}");
                        }
                        (MessageType::Ack, Some(ip))
                    }
                    None => (MessageType::Nak, None),
                }
            }
            MessageType::Release => {
                pool.release(req.mac);
                let _ = self.state.fleet().drop_lease(req.mac);
                return None;
            }
            MessageType::Decline => {
                if let Some(ip) = req.requested_ip {
                    pool.decline(req.mac, ip, lease_s, t);
                    let _ = self.state.fleet().drop_lease(req.mac);
                }
                return None;
            }
            MessageType::Inform => (MessageType::Ack, None),
            _ => return None,
        };
        let mut rep = reply_to(req, kind, self.server_ip);
        if kind == MessageType::Nak {
            return Some(Reply {
                bytes: packet::encode(&rep).ok()?,
                to: if req.giaddr != Ipv4Addr::UNSPECIFIED {
                    self.destination(req)
                } else {
                    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::BROADCAST, self.client_port))
                },
            });
        }
        if let Some(ip) = ip {
            rep.set_yiaddr(ip);
            rep.opts_mut().insert(DhcpOption::AddressLeaseTime(lease_s));
        }
        let mask = config.dhcp.subnet_mask.unwrap_or(self.netmask);
        let opts = rep.opts_mut();
        opts.insert(DhcpOption::SubnetMask(mask));
        if let Some(r) = config.dhcp.router {
            opts.insert(DhcpOption::Router(vec![r]));
        }
        if !config.dhcp.dns.is_empty() {
            opts.insert(DhcpOption::DomainNameServer(config.dhcp.dns.clone()));
        }
        if let Some(name) = host.and_then(|h| h.hostname.clone()) {
            opts.insert(DhcpOption::Hostname(name));
        }
        self.add_boot(&mut rep, req, boot, false);
        Some(Reply {
            bytes: packet::encode(&rep).ok()?,
            to: self.destination(req),
        })
    }

    /// Boot file, next server and the vendor options each kind of firmware needs (PXE-LAB.md).
    fn add_boot(
        &self,
        rep: &mut dhcproto::v4::Message,
        req: &ClientRequest,
        boot: &DhcpBoot,
        proxy: bool,
    ) {
        let file = match boot {
            DhcpBoot::Tftp(f) | DhcpBoot::Http(f) => f.clone(),
            DhcpBoot::Ignore | DhcpBoot::AddressOnly => return,
        };
        if file.len() > 127 {
            tracing::warn!(%file, "boot file name longer than the BOOTP field");
            return;
        }
        rep.set_siaddr(self.server_ip);
        rep.set_fname_str(&file);
        let opts = rep.opts_mut();
        opts.insert(DhcpOption::BootfileName(file.into_bytes()));
        if matches!(boot, DhcpBoot::Tftp(_)) {
            opts.insert(DhcpOption::TFTPServerName(
                self.server_ip.to_string().into_bytes(),
            ));
        }
        match req.firmware {
            // UEFI HTTP boot only takes an answer that says HTTPClient.
            Firmware::UefiHttp => {
                opts.insert(DhcpOption::ClassIdentifier(b"HTTPClient".to_vec()));
            }
            // iPXE waits ~3 s for ProxyDHCP offers unless told this is the PXE server.
            Firmware::Ipxe => {
                opts.insert(DhcpOption::ClassIdentifier(b"PXEClient".to_vec()));
            }
            // PXE firmware: a proxy answer says PXEClient and "use the boot file" (43: 6,1,8), so
            // the client does not ask port 4011 again. A full answer carries neither: OVMF rejects
            // full offers with option 60 and no 43.
            _ if proxy => {
                opts.insert(DhcpOption::ClassIdentifier(b"PXEClient".to_vec()));
                opts.insert(DhcpOption::VendorExtensions(vec![6, 1, 8, 255]));
            }
            _ => {}
        }
        if proxy {
            if let Some(id) = &req.machine_id {
                opts.insert(DhcpOption::ClientMachineIdentifier(id.clone()));
            }
        }
    }
}

/// The pool of full mode, with reservations from the configuration and leases from the state.
fn pool_for(config: &Config, state: &AppState) -> Option<LeasePool> {
    let [first, last] = config.dhcp.range?;
    let reservations: HashMap<_, _> = config
        .hosts
        .values()
        .filter_map(|h| h.ip.map(|ip| (h.mac, ip)))
        .collect();
    let mut pool = LeasePool::new(first, last, reservations);
    match state.fleet().leases() {
        Ok(leases) => {
            for (mac, ip, expires) in leases {
                pool.restore(mac, Lease { ip, expires });
            }
        }
        Err(e) => tracing::warn!("cannot read leases back: {e}"),
    }
    Some(pool)
}
