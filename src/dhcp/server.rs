//! The DHCP sockets and the answer to each request.
//!
//! Sockets are bound to `0.0.0.0:67` (and `:4011` in proxy mode) **and** to the configured
//! interface (SO_BINDTODEVICE), so nothing arriving on another interface is ever seen or answered.
//! Answers go to the relay (giaddr:67) when there is one, to a renewing client's address, to the
//! source of a port-4011 request, and otherwise by broadcast on the interface.

use super::leases::{Lease, LeasePool};
use super::packet::{self, arch_name, reply_to, ClientRequest};
use crate::appliance::AppState;
use crate::appliance::{dhcp_boot, DhcpBoot, Firmware};
use crate::config::{Config, DhcpMode, UnknownHosts};
use crate::fleet::{FleetState, StateError, Write};
use crate::mac::Mac;
use crate::net::udp_on;
use dhcproto::v4::{DhcpOption, MessageType};
use std::collections::HashMap;
use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

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
            main: udp_on(interface, Ipv4Addr::UNSPECIFIED, port)?,
            pxe: if mode == DhcpMode::Proxy {
                Some(udp_on(interface, Ipv4Addr::UNSPECIFIED, pxe_port)?)
            } else {
                None
            },
        })
    }
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
    /// Hosts and leases go to SQLite through a write-behind thread, in batched transactions.
    writes: mpsc::Sender<Write>,
    /// When each MAC was last written as seen, and as what (so a busy client costs no writes).
    seen: HashMap<Mac, (Firmware, i64)>,
}

/// How often a host that keeps asking is written as seen again, in seconds.
const SEEN_REFRESH_S: i64 = 60;
/// Hosts remembered as recently seen; past it the stale ones are forgotten.
const SEEN_MAX: usize = 65_536;

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
    /// A server answering as `server_ip` on a subnet with `netmask`; starts its write-behind
    /// thread on its own connection to the state database.
    pub fn new(
        state: Arc<AppState>,
        server_ip: Ipv4Addr,
        netmask: Ipv4Addr,
    ) -> Result<DhcpServer, StateError> {
        let config = state.config();
        let db = FleetState::open(&config.state_dir)?;
        let (writes, rx) = mpsc::channel::<Write>();
        std::thread::Builder::new()
            .name("dhcp-state".into())
            .spawn(move || write_behind(db, rx))
            .map_err(|error| StateError::Dir {
                path: config.state_dir.clone(),
                error,
            })?;
        let mut server = DhcpServer {
            state,
            server_ip,
            netmask,
            pool: None,
            pool_config: config,
            client_port: 68,
            writes,
            seen: HashMap::new(),
        };
        server.pool = server.pool_for(&server.pool_config.clone(), None);
        Ok(server)
    }

    /// Serves each socket on a thread of its own (blocking sockets: the least work per packet)
    /// for as long as the process runs.
    pub fn spawn(self, sockets: DhcpSockets) -> io::Result<()> {
        let server = Arc::new(Mutex::new(self));
        let all = std::iter::once((sockets.main, false)).chain(sockets.pxe.map(|s| (s, true)));
        for (socket, on_pxe) in all {
            let server = server.clone();
            std::thread::Builder::new()
                .name(if on_pxe { "dhcp-4011" } else { "dhcp-67" }.into())
                .spawn(move || serve_socket(&server, &socket, on_pxe))?;
        }
        Ok(())
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
            let old = self.pool.take();
            self.pool = self.pool_for(&config, old.as_ref());
            self.pool_config = config.clone();
        }
        let known = config.hosts.contains_key(&req.mac);
        // Asked only where it decides something (an unknown machine's costs a database read).
        let secure_boot = req.firmware == Firmware::UefiX64
            && match config.hosts.get(&req.mac) {
                Some(h) => h.secure_boot,
                // Not served at all: no need to ask.
                None if config.unknown_hosts == UnknownHosts::Ignore => false,
                None if config.rules.is_empty() => config.defaults.secure_boot.unwrap_or(false),
                // A machine nobody listed: its rule's group once it is inspected, else the defaults.
                None => {
                    let inventory = self.state.inventory(req.mac);
                    config.host_for(req.mac, inventory.as_ref()).secure_boot
                }
            };
        let boot = dhcp_boot(
            req.firmware,
            &req.mac.to_string(),
            known,
            secure_boot,
            &config.unknown_hosts,
            &config.boot_files,
            &self.state.base_url,
        );
        // With TFTP off, a PXE client is not sent to fetch what nobody serves: its firmware
        // gives up on PXE (OVMF after its PXE timeout) and goes on to its next boot option.
        let boot = match boot {
            DhcpBoot::Tftp(_) if !config.tftp.enabled => DhcpBoot::AddressOnly,
            boot => boot,
        };
        if boot == DhcpBoot::Ignore {
            metrics.dhcp_ignored.inc();
            tracing::debug!(mac = %req.mac, "not answering an unknown host");
            return None;
        }
        if matches!(req.kind, MessageType::Discover | MessageType::Request) {
            self.note_seen(&req);
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

    /// The pool of full mode: the range minus the appliance's and the router's addresses, the
    /// reservations from the configuration, and the leases — taken over from the pool it
    /// replaces on a reload (it knows leases still queued for SQLite), else read from SQLite.
    fn pool_for(&self, config: &Config, previous: Option<&LeasePool>) -> Option<LeasePool> {
        let [first, last] = config.dhcp.range?;
        let reservations: HashMap<_, _> = config
            .hosts
            .values()
            .filter_map(|h| h.ip.map(|ip| (h.mac, ip)))
            .collect();
        let mut pool = LeasePool::new(first, last, reservations);
        pool.exclude(self.server_ip);
        if let Some(router) = config.dhcp.router {
            pool.exclude(router);
        }
        if let Some(old) = previous {
            pool.adopt(old, now());
            return Some(pool);
        }
        match self.state.fleet().leases() {
            Ok(leases) => {
                for (mac, ip, expires) in leases {
                    pool.restore(mac, Lease { ip, expires });
                }
            }
            Err(e) => tracing::warn!("cannot read leases back: {e}"),
        }
        Some(pool)
    }

    /// Records the host as seen, unless it was recorded as the same thing a moment ago.
    fn note_seen(&mut self, req: &ClientRequest) {
        let t = now();
        if self.seen.len() >= SEEN_MAX {
            // A flood of made-up MACs: forget what is stale (it is only a write-saving cache).
            self.seen.retain(|_, (_, at)| t - *at < SEEN_REFRESH_S);
            if self.seen.len() >= SEEN_MAX {
                self.seen.clear();
            }
        }
        let fresh = self
            .seen
            .get(&req.mac)
            .is_some_and(|&(fw, at)| fw == req.firmware && t - at < SEEN_REFRESH_S);
        if fresh {
            return;
        }
        self.seen.insert(req.mac, (req.firmware, t));
        let _ = self.writes.send(Write::Seen {
            mac: req.mac,
            ip: (req.ciaddr != Ipv4Addr::UNSPECIFIED).then_some(req.ciaddr),
            arch: Some(arch_name(req.firmware)),
        });
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
        // The address the client is taking (from the site's server): its install token is
        // handed only to it.
        if let Some(ip) = req
            .requested_ip
            .or((req.ciaddr != Ipv4Addr::UNSPECIFIED).then_some(req.ciaddr))
            .filter(|_| req.kind == MessageType::Request)
        {
            self.state.note_address(req.mac, ip);
        }
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
        let mask = u32::from(config.dhcp.subnet_mask.unwrap_or(self.netmask));
        if req.giaddr != Ipv4Addr::UNSPECIFIED
            && u32::from(req.giaddr) & mask != u32::from(self.server_ip) & mask
        {
            // The pool is the appliance's own subnet: an address from it would be wrong there.
            tracing::warn!(mac = %req.mac, relay = %req.giaddr,
                "not answering a request relayed from another subnet (the pool serves {}'s subnet only)",
                self.server_ip);
            return None;
        }
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
                        self.state.note_address(req.mac, ip);
                        let _ = self.writes.send(Write::SaveLease {
                            mac: req.mac,
                            ip,
                            expires,
                        });
                        (MessageType::Ack, Some(ip))
                    }
                    None => (MessageType::Nak, None),
                }
            }
            MessageType::Release => {
                pool.release(req.mac);
                let _ = self.writes.send(Write::DropLease { mac: req.mac });
                return None;
            }
            MessageType::Decline => {
                match req.requested_ip {
                    Some(ip) if pool.decline(req.mac, ip, lease_s, t) => {
                        tracing::warn!(mac = %req.mac, %ip, "address declined: in use by another machine");
                        let _ = self.writes.send(Write::DropLease { mac: req.mac });
                    }
                    _ => {
                        tracing::debug!(mac = %req.mac, "ignored a DECLINE for an address it does not hold")
                    }
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

    /// Boot file, next server and the vendor options each kind of firmware needs (docs/firmware.md).
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
            Firmware::UefiHttp | Firmware::UefiHttpArm64 => {
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

/// Receives, answers and sends, one datagram at a time, until the socket fails.
fn serve_socket(server: &Mutex<DhcpServer>, socket: &std::net::UdpSocket, on_pxe: bool) {
    let mut buf = vec![0u8; 2048];
    loop {
        let (n, src) = match socket.recv_from(&mut buf) {
            Ok(r) => r,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::error!("DHCP socket failed: {e}");
                return;
            }
        };
        let reply = server
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .handle(&buf[..n], src, on_pxe);
        let Some(reply) = reply else { continue };
        match socket.send_to(&reply.bytes, reply.to) {
            Ok(_) => server
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .state
                .metrics
                .dhcp_answered
                .inc(),
            Err(e) => tracing::warn!(to = %reply.to, "cannot send a DHCP answer: {e}"),
        }
    }
}

/// Applies the writes in batches: whatever has queued up while the last batch was committed.
fn write_behind(db: FleetState, rx: mpsc::Receiver<Write>) {
    const BATCH_MAX: usize = 4096;
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < BATCH_MAX {
            match rx.try_recv() {
                Ok(w) => batch.push(w),
                Err(_) => break,
            }
        }
        if let Err(e) = db.apply(&batch) {
            tracing::warn!("cannot record {} DHCP state changes: {e}", batch.len());
        }
    }
}
