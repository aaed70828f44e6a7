//! The BMC's LAN address, asked of the BMC itself through the kernel's IPMI driver
//! (`/dev/ipmi0`): "Get LAN Configuration Parameters" (IP address, MAC address) on the first
//! channel that answers as a LAN channel — what `ipmitool lan print` does in-band. Inspection
//! reports it, so an operator sees which BMC belongs to a machine nobody listed.
//!
//! The driver modules (`ipmi_si` finds the BMC's system interface from ACPI or SMBIOS;
//! `ipmi_devintf` makes the device node) are loaded by name: `ipmi_devintf` has no modalias.

use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::{Duration, Instant};

/// `IPMI_SYSTEM_INTERFACE_ADDR_TYPE` and `IPMI_BMC_CHANNEL` of <linux/ipmi.h>: a message to
/// the BMC itself.
const SYSTEM_INTERFACE_ADDR_TYPE: i32 = 0x0c;
const BMC_CHANNEL: i16 = 0x0f;
/// Transport network function, "Get LAN Configuration Parameters".
const NETFN_TRANSPORT: u8 = 0x0c;
const CMD_GET_LAN_CONFIG: u8 = 0x02;
/// LAN configuration parameters: IP address, MAC address.
const PARAM_IP_ADDRESS: u8 = 3;
const PARAM_MAC_ADDRESS: u8 = 5;
/// How long one answer may take, in ms (a BMC's KCS interface is slow, not this slow).
const ANSWER_WAIT_MS: u16 = 5000;
/// `IPMI_RESPONSE_RECV_TYPE`: the answer to a request of ours (not an event).
const RESPONSE_RECV_TYPE: i32 = 1;

#[repr(C)]
struct SystemInterfaceAddr {
    addr_type: i32,
    channel: i16,
    lun: u8,
}

#[repr(C)]
struct IpmiMsg {
    netfn: u8,
    cmd: u8,
    data_len: u16,
    data: *mut u8,
}

#[repr(C)]
struct IpmiReq {
    addr: *mut u8,
    addr_len: u32,
    msgid: libc::c_long,
    msg: IpmiMsg,
}

#[repr(C)]
struct IpmiRecv {
    recv_type: i32,
    addr: *mut u8,
    addr_len: u32,
    msgid: libc::c_long,
    msg: IpmiMsg,
}

nix::ioctl_read!(ipmi_send_command, b'i', 13, IpmiReq);
nix::ioctl_readwrite!(ipmi_receive_msg_trunc, b'i', 11, IpmiRecv);

/// What the BMC says of its LAN side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BmcLan {
    pub channel: u8,
    pub address: String,
    pub mac: String,
}

/// Adds the BMC's LAN address (and MAC) to `inv` where [`find`] finds one.
pub fn fill(inv: &mut fleetboot_image::api::Inventory, modules_dir: Option<&Path>) {
    if let Some(bmc) = find(modules_dir) {
        crate::console::say(&format!(
            "BMC on LAN channel {}: {} ({})",
            bmc.channel, bmc.address, bmc.mac
        ));
        inv.bmc_address = Some(bmc.address);
        inv.bmc_mac = (!bmc.mac.is_empty()).then_some(bmc.mac);
    }
}

/// Loads the IPMI driver modules from `modules_dir` (the initramfs's; `None` on a host, whose
/// own system loads them) and asks the BMC; `None` when the machine has no BMC the kernel can
/// reach, or its BMC has no LAN address set.
pub fn find(modules_dir: Option<&Path>) -> Option<BmcLan> {
    for module in ["ipmi_si", "ipmi_devintf"] {
        let Some(dir) = modules_dir else { break };
        if let Err(e) = crate::modules::load_named(dir, module) {
            println!("fleetboot-agent: {e:#}");
        }
    }
    // The device node appears once ipmi_si has found and registered the interface.
    let started = Instant::now();
    let device = loop {
        match std::fs::File::options()
            .read(true)
            .write(true)
            .open("/dev/ipmi0")
        {
            Ok(f) => break f,
            Err(_) if started.elapsed() < Duration::from_secs(3) => {
                std::thread::sleep(Duration::from_millis(200))
            }
            Err(_) => return None,
        }
    };
    // LAN channels are numbered 1 to 11 by convention; the first that answers is the BMC's NIC.
    for channel in 1..=11u8 {
        let Ok(ip) = lan_parameter(&device, channel, PARAM_IP_ADDRESS) else {
            continue;
        };
        let Some(address) = ipv4(&ip) else { continue };
        let mac = lan_parameter(&device, channel, PARAM_MAC_ADDRESS)
            .ok()
            .and_then(|m| mac(&m))
            .unwrap_or_default();
        return Some(BmcLan {
            channel,
            address,
            mac,
        });
    }
    None
}

/// One LAN configuration parameter's data (after the completion code and revision byte).
fn lan_parameter(device: &std::fs::File, channel: u8, param: u8) -> Result<Vec<u8>, String> {
    let answer = request(
        device,
        NETFN_TRANSPORT,
        CMD_GET_LAN_CONFIG,
        &[channel, param, 0, 0],
    )?;
    match answer.first() {
        Some(0) if answer.len() >= 2 => Ok(answer[2..].to_vec()),
        Some(code) => Err(format!("completion code {code:#04x}")),
        None => Err("an empty answer".to_string()),
    }
}

/// A dotted IPv4 address from parameter 3's four bytes; `None` for 0.0.0.0 (no address set).
fn ipv4(data: &[u8]) -> Option<String> {
    let b: [u8; 4] = data.get(..4)?.try_into().ok()?;
    (b != [0; 4]).then(|| std::net::Ipv4Addr::from(b).to_string())
}

fn mac(data: &[u8]) -> Option<String> {
    let b = data.get(..6)?;
    Some(
        b.iter()
            .map(|x| format!("{x:02x}"))
            .collect::<Vec<_>>()
            .join(":"),
    )
}

/// Sends one request to the BMC and returns its answer (completion code first).
fn request(device: &std::fs::File, netfn: u8, cmd: u8, data: &[u8]) -> Result<Vec<u8>, String> {
    let mut addr = SystemInterfaceAddr {
        addr_type: SYSTEM_INTERFACE_ADDR_TYPE,
        channel: BMC_CHANNEL,
        lun: 0,
    };
    let mut out = data.to_vec();
    let mut req = IpmiReq {
        addr: (&mut addr as *mut SystemInterfaceAddr).cast(),
        addr_len: std::mem::size_of::<SystemInterfaceAddr>() as u32,
        msgid: 1,
        msg: IpmiMsg {
            netfn,
            cmd,
            data_len: out.len() as u16,
            data: out.as_mut_ptr(),
        },
    };
    // SAFETY: every pointer in `req` points at a live local of the size given beside it.
    unsafe { ipmi_send_command(device.as_raw_fd(), &mut req) }
        .map_err(|e| format!("cannot send to the BMC: {e}"))?;

    let mut pollfd = [nix::poll::PollFd::new(
        std::os::fd::AsFd::as_fd(device),
        nix::poll::PollFlags::POLLIN,
    )];
    let ready = nix::poll::poll(&mut pollfd, nix::poll::PollTimeout::from(ANSWER_WAIT_MS))
        .map_err(|e| format!("cannot wait for the BMC: {e}"))?;
    if ready == 0 {
        return Err("the BMC did not answer".to_string());
    }
    let mut from = SystemInterfaceAddr {
        addr_type: 0,
        channel: 0,
        lun: 0,
    };
    let mut answer = vec![0u8; 64];
    let mut recv = IpmiRecv {
        recv_type: 0,
        addr: (&mut from as *mut SystemInterfaceAddr).cast(),
        addr_len: std::mem::size_of::<SystemInterfaceAddr>() as u32,
        msgid: 0,
        msg: IpmiMsg {
            netfn: 0,
            cmd: 0,
            data_len: answer.len() as u16,
            data: answer.as_mut_ptr(),
        },
    };
    // SAFETY: as above; the kernel writes at most `data_len` bytes (the _TRUNC variant).
    unsafe { ipmi_receive_msg_trunc(device.as_raw_fd(), &mut recv) }
        .map_err(|e| format!("cannot read the BMC's answer: {e}"))?;
    if recv.recv_type != RESPONSE_RECV_TYPE {
        return Err(format!("an unexpected message (type {})", recv.recv_type));
    }
    answer.truncate(usize::from(recv.msg.data_len).min(answer.len()));
    Ok(answer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn structures_match_the_kernel_abi() {
        // <linux/ipmi.h> on 64-bit: the ioctl numbers encode these sizes.
        if std::mem::size_of::<usize>() == 8 {
            assert_eq!(std::mem::size_of::<IpmiReq>(), 40);
            assert_eq!(std::mem::size_of::<IpmiRecv>(), 48);
            assert_eq!(std::mem::size_of::<SystemInterfaceAddr>(), 8);
        }
    }

    #[test]
    fn reads_the_lan_parameters() {
        assert_eq!(ipv4(&[10, 81, 0, 7]).as_deref(), Some("10.81.0.7"));
        assert_eq!(ipv4(&[0, 0, 0, 0]), None, "no address set");
        assert_eq!(ipv4(&[10, 81]), None, "short");
        assert_eq!(
            mac(&[0x52, 0x54, 0, 0xab, 0xcd, 0xef]).as_deref(),
            Some("52:54:00:ab:cd:ef")
        );
    }
}
