//! DHCP packets in and out: raw-byte validation before decoding, the facts a request carries
//! ([`ClientRequest`]), and building replies.
//!
//! dhcproto 0.15 panics (in debug builds) on an option 94 whose length is not 3, on option 80/81
//! and 152–155 of odd lengths, on `chaddr()` when hlen > 16, and keeps only the first entry of an
//! option 93 list; [`prevalidate`] rejects such packets first and reads the 93 list itself.

use crate::appliance::Firmware;
use crate::mac::Mac;
use dhcproto::v4::{self, DhcpOption, MessageType, Opcode, OptionCode};
use dhcproto::{Decodable, Decoder, Encodable};
use std::net::Ipv4Addr;

/// The smallest BOOTP packet: fixed header (236 bytes) and the magic cookie.
const HEADER_BYTES: usize = 240;

/// Why a packet was dropped.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PacketError {
    #[error("{0}")]
    Malformed(&'static str),
    #[error("undecodable: {0}")]
    Decode(String),
}

/// What a request says about its sender.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientRequest {
    pub mac: Mac,
    pub xid: u32,
    pub kind: MessageType,
    pub firmware: Firmware,
    /// Client system architecture (option 93), all entries.
    pub arch: Vec<u16>,
    pub giaddr: Ipv4Addr,
    pub ciaddr: Ipv4Addr,
    pub broadcast: bool,
    /// Option 50.
    pub requested_ip: Option<Ipv4Addr>,
    /// Option 54.
    pub server_id: Option<Ipv4Addr>,
    /// Option 97 (client machine identifier), echoed in PXE answers.
    pub machine_id: Option<Vec<u8>>,
    pub message: v4::Message,
}

/// Checks raw bytes for what would make the decoder panic or silently lose options.
pub fn prevalidate(buf: &[u8]) -> Result<Vec<u16>, PacketError> {
    let m = PacketError::Malformed;
    if buf.len() < HEADER_BYTES {
        return Err(m("shorter than a BOOTP header"));
    }
    if buf[0] != 1 {
        return Err(m("not a BOOTREQUEST"));
    }
    if buf[1] != 1 || buf[2] != 6 {
        return Err(m("not Ethernet (htype 1, hlen 6)"));
    }
    if buf[236..240] != v4::MAGIC {
        return Err(m("no DHCP magic cookie"));
    }
    let mut arch = Vec::new();
    let mut i = HEADER_BYTES;
    // (code, total length, data) of the current run of same-code fragments (RFC 3396).
    let mut run: Option<(u8, Vec<u8>)> = None;
    let check = |code: u8, data: &[u8], arch: &mut Vec<u16>| -> Result<(), PacketError> {
        let len = data.len();
        match code {
            53 if len != 1 => Err(m("option 53 is not one byte")),
            50 | 54 if len != 4 => Err(m("option 50/54 is not an address")),
            80 if len != 0 => Err(m("option 80 has data")),
            81 if len < 3 => Err(m("option 81 is too short")),
            93 if len < 2 || !len.is_multiple_of(2) => {
                Err(m("option 93 is not a list of 16-bit values"))
            }
            94 if len != 3 => Err(m("option 94 is not 3 bytes")),
            152..=155 if len != 4 => Err(m("bulk lease query option is not 4 bytes")),
            12 | 15 | 17 | 40 | 56 | 100 | 101 | 114 if std::str::from_utf8(data).is_err() => {
                Err(m("text option is not UTF-8"))
            }
            1 | 16 | 28 | 32 | 118 if len != 4 => Err(m("address option is not 4 bytes")),
            3 | 4 | 5 | 6 | 7 | 8 | 9 | 10 | 11 | 41 | 42 | 44 | 45 | 48 | 49 | 65 | 69 | 70
            | 71 | 72 | 73 | 74 | 75 | 76
                if len == 0 || !len.is_multiple_of(4) =>
            {
                Err(m("address list option is not a multiple of 4 bytes"))
            }
            93 => {
                arch.extend(
                    data.chunks_exact(2)
                        .map(|c| u16::from_be_bytes([c[0], c[1]])),
                );
                Ok(())
            }
            _ => Ok(()),
        }
    };
    while i < buf.len() {
        let code = buf[i];
        if code == 0 || code == 255 {
            if let Some((c, d)) = run.take() {
                check(c, &d, &mut arch)?;
            }
            if code == 255 {
                return Ok(arch);
            }
            i += 1;
            continue;
        }
        let len = *buf.get(i + 1).ok_or(m("option header cut short"))? as usize;
        let data = buf
            .get(i + 2..i + 2 + len)
            .ok_or(m("option runs past the packet"))?;
        run = match run.take() {
            Some((c, mut d)) if c == code => {
                d.extend_from_slice(data);
                Some((c, d))
            }
            Some((c, d)) => {
                check(c, &d, &mut arch)?;
                Some((code, data.to_vec()))
            }
            None => Some((code, data.to_vec())),
        };
        i += 2 + len;
    }
    Err(m("no end option"))
}

/// Validates and decodes a request.
pub fn parse(buf: &[u8]) -> Result<ClientRequest, PacketError> {
    let arch = prevalidate(buf)?;
    let msg = v4::Message::decode(&mut Decoder::new(buf))
        .map_err(|e| PacketError::Decode(e.to_string()))?;
    if msg.opcode() != Opcode::BootRequest {
        return Err(PacketError::Malformed("not a BOOTREQUEST"));
    }
    let chaddr = msg.chaddr();
    let mut mac = [0u8; 6];
    mac.copy_from_slice(&chaddr[..6]);
    let opts = msg.opts();
    let kind = opts
        .msg_type()
        .ok_or(PacketError::Malformed("no message type (option 53)"))?;
    let vendor = match opts.get(OptionCode::ClassIdentifier) {
        Some(DhcpOption::ClassIdentifier(v)) => v.clone(),
        _ => Vec::new(),
    };
    let user_class = match opts.get(OptionCode::UserClass) {
        Some(DhcpOption::UserClass(v)) => v.clone(),
        _ => Vec::new(),
    };
    let ipxe = opts.get(OptionCode::Unknown(175)).is_some() || contains(&user_class, b"iPXE");
    let firmware = classify(&vendor, ipxe, client_arch(&arch, &vendor));
    let requested_ip = match opts.get(OptionCode::RequestedIpAddress) {
        Some(DhcpOption::RequestedIpAddress(ip)) => Some(*ip),
        _ => None,
    };
    let server_id = match opts.get(OptionCode::ServerIdentifier) {
        Some(DhcpOption::ServerIdentifier(ip)) => Some(*ip),
        _ => None,
    };
    let machine_id = match opts.get(OptionCode::ClientMachineIdentifier) {
        Some(DhcpOption::ClientMachineIdentifier(v)) => Some(v.clone()),
        _ => None,
    };
    Ok(ClientRequest {
        mac: Mac(mac),
        xid: msg.xid(),
        kind,
        firmware,
        arch,
        giaddr: msg.giaddr(),
        ciaddr: msg.ciaddr(),
        broadcast: msg.flags().broadcast(),
        requested_ip,
        server_id,
        machine_id,
        message: msg,
    })
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// Architectures (RFC 4578 / IANA processor architecture types) [`classify`] has a loader for,
/// by the kind of client the vendor class says: PXE (BIOS, x86-64 UEFI, ARM64 UEFI) and UEFI
/// HTTP boot (x86-64, ARM64).
fn arch_served(vendor_class: &[u8]) -> &'static [u16] {
    if vendor_class.starts_with(b"HTTPClient") {
        &[16, 19]
    } else {
        &[0, 7, 9, 11]
    }
}

/// The client's architecture: option 93's first entry, unless it is missing, or names one no
/// loader is served for while the vendor class (60, `PXEClient:Arch:00011:UNDI:003000`) names
/// one that is. A Raspberry Pi 4 with EDK2 sends no option 93 at all.
pub fn client_arch(option93: &[u16], vendor_class: &[u8]) -> Option<u16> {
    let from_60 = arch_in_vendor_class(vendor_class);
    let served = arch_served(vendor_class);
    match (option93.first().copied(), from_60) {
        (None, a) => a,
        (Some(a), Some(b)) if !served.contains(&a) && served.contains(&b) => Some(b),
        (a, _) => a,
    }
}

/// The architecture a vendor class names (`PXEClient:Arch:NNNNN:…`, `HTTPClient:Arch:NNNNN:…`:
/// five decimal digits), if it names one.
fn arch_in_vendor_class(vendor_class: &[u8]) -> Option<u16> {
    let text = std::str::from_utf8(vendor_class).ok()?;
    let mut parts = text.split(':');
    let _client = parts.next()?;
    if parts.next()? != "Arch" {
        return None;
    }
    let digits = parts.next()?;
    if digits.len() != 5 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Tells the firmware apart by vendor class (60), iPXE's marks (77, 175) and architecture (93,
/// or 60's when 93 is missing or odd: [`client_arch`]).
pub fn classify(vendor_class: &[u8], ipxe: bool, arch: Option<u16>) -> Firmware {
    if ipxe {
        return Firmware::Ipxe;
    }
    if vendor_class.starts_with(b"HTTPClient") {
        // 19: ARM64 UEFI HTTP boot (16 is x86-64's).
        return match arch {
            Some(19) => Firmware::UefiHttpArm64,
            _ => Firmware::UefiHttp,
        };
    }
    if !vendor_class.starts_with(b"PXEClient") {
        return Firmware::Plain;
    }
    match arch {
        None | Some(0) => Firmware::BiosPxe,
        Some(7) | Some(9) => Firmware::UefiX64,
        Some(11) => Firmware::UefiArm64,
        Some(other) => Firmware::OtherPxe(other),
    }
}

/// A short name of the architecture, as the fleet state records it.
pub fn arch_name(firmware: Firmware) -> &'static str {
    match firmware {
        Firmware::BiosPxe => "bios",
        Firmware::UefiX64 => "uefi-x64",
        Firmware::UefiArm64 => "uefi-arm64",
        Firmware::UefiHttp => "uefi-http",
        Firmware::UefiHttpArm64 => "uefi-http-arm64",
        Firmware::Ipxe => "ipxe",
        Firmware::OtherPxe(_) => "pxe-other",
        Firmware::Plain => "plain",
    }
}

/// The reply skeleton: BOOTREPLY with the request's xid, flags, giaddr and chaddr.
pub fn reply_to(req: &ClientRequest, kind: MessageType, server: Ipv4Addr) -> v4::Message {
    let mut rep = v4::Message::default();
    rep.set_opcode(Opcode::BootReply)
        .set_htype(req.message.htype())
        .set_xid(req.xid)
        .set_flags(req.message.flags())
        .set_giaddr(req.giaddr)
        .set_chaddr(&req.mac.0);
    rep.opts_mut().insert(DhcpOption::MessageType(kind));
    rep.opts_mut().insert(DhcpOption::ServerIdentifier(server));
    rep
}

/// Encodes a reply, padded to the 300 bytes old BOOTP clients expect.
pub fn encode(msg: &v4::Message) -> Result<Vec<u8>, PacketError> {
    let mut out = msg
        .to_vec()
        .map_err(|e| PacketError::Decode(e.to_string()))?;
    if out.len() < v4::MIN_PACKET_SIZE {
        out.resize(v4::MIN_PACKET_SIZE, 0);
    }
    Ok(out)
}

/// A DISCOVER as a PXE ROM sends it, with extra raw options appended (for tests and the fuzz
/// targets' seeds).
pub fn sample_discover(mac: [u8; 6], extra: &[&[u8]]) -> Vec<u8> {
    let mut b = vec![0u8; 240];
    b[0] = 1;
    b[1] = 1;
    b[2] = 6;
    b[4..8].copy_from_slice(&0x1234_5678u32.to_be_bytes());
    b[10] = 0x80; // broadcast
    b[28..34].copy_from_slice(&mac);
    b[236..240].copy_from_slice(&v4::MAGIC);
    b.extend_from_slice(&[53, 1, 1]);
    for o in extra {
        b.extend_from_slice(o);
    }
    b.push(255);
    b
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A DISCOVER as a PXE ROM sends it, with extra raw options appended.
    pub fn discover(mac: [u8; 6], extra: &[&[u8]]) -> Vec<u8> {
        super::sample_discover(mac, extra)
    }

    #[test]
    fn tells_firmware_apart() {
        let mac = [0x52, 0x54, 0, 1, 2, 3];
        let pxe = b"\x3c\x20PXEClient:Arch:00000:UNDI:002001";
        type Case<'a> = (Vec<&'a [u8]>, Firmware, Vec<u16>);
        let cases: Vec<Case> = vec![
            (vec![pxe, b"\x5d\x02\x00\x00"], Firmware::BiosPxe, vec![0]),
            (vec![pxe, b"\x5d\x02\x00\x07"], Firmware::UefiX64, vec![7]),
            (vec![pxe, b"\x5d\x02\x00\x09"], Firmware::UefiX64, vec![9]),
            (
                vec![pxe, b"\x5d\x02\x00\x0b"],
                Firmware::UefiArm64,
                vec![11],
            ),
            (
                vec![
                    b"\x3c\x20PXEClient:Arch:00006:UNDI:003016",
                    b"\x5d\x04\x00\x06\x00\x07",
                ],
                Firmware::OtherPxe(6),
                vec![6, 7],
            ),
            // No option 93 (EDK2 on a Raspberry Pi 4): the architecture in the vendor class.
            (
                vec![b"\x3c\x20PXEClient:Arch:00011:UNDI:003000"],
                Firmware::UefiArm64,
                vec![],
            ),
            (
                vec![b"\x3c\x20PXEClient:Arch:00007:UNDI:003016"],
                Firmware::UefiX64,
                vec![],
            ),
            // Option 93 odd (no loader for it), the vendor class plain: the vendor class.
            (
                vec![
                    b"\x3c\x20PXEClient:Arch:00011:UNDI:003000",
                    b"\x5d\x02\xff\x7f",
                ],
                Firmware::UefiArm64,
                vec![0xff7f],
            ),
            // A PXE client's option 93 naming an HTTP-boot architecture: no PXE loader for it,
            // so the vendor class's.
            (
                vec![
                    b"\x3c\x20PXEClient:Arch:00007:UNDI:003016",
                    b"\x5d\x02\x00\x10",
                ],
                Firmware::UefiX64,
                vec![16],
            ),
            // Both known and different: option 93, which RFC 4578 defines, wins.
            (
                vec![
                    b"\x3c\x20PXEClient:Arch:00011:UNDI:003000",
                    b"\x5d\x02\x00\x07",
                ],
                Firmware::UefiX64,
                vec![7],
            ),
            // A vendor class without an architecture, or a malformed one, says nothing.
            (vec![b"\x3c\x09PXEClient"], Firmware::BiosPxe, vec![]),
            (
                vec![b"\x3c\x20PXEClient:Arch:0011x:UNDI:003000"],
                Firmware::BiosPxe,
                vec![],
            ),
            (
                vec![pxe, b"\x5d\x02\x00\x00", b"\x4d\x04iPXE"],
                Firmware::Ipxe,
                vec![0],
            ),
            (vec![pxe, b"\xaf\x03\x13\x01\x01"], Firmware::Ipxe, vec![]),
            (
                vec![b"\x3c\x0aHTTPClient", b"\x5d\x02\x00\x10"],
                Firmware::UefiHttp,
                vec![16],
            ),
            (
                vec![
                    b"\x3c\x21HTTPClient:Arch:00019:UNDI:003000",
                    b"\x5d\x02\x00\x13",
                ],
                Firmware::UefiHttpArm64,
                vec![19],
            ),
            (
                vec![b"\x3c\x21HTTPClient:Arch:00019:UNDI:003000"],
                Firmware::UefiHttpArm64,
                vec![],
            ),
            (vec![b"\x3c\x04udhc"], Firmware::Plain, vec![]),
            (vec![], Firmware::Plain, vec![]),
        ];
        for (opts, firmware, arch) in cases {
            let req = parse(&discover(mac, &opts)).unwrap();
            assert_eq!((req.firmware, &req.arch), (firmware, &arch), "{opts:?}");
            assert_eq!(req.mac.to_string(), "52:54:00:01:02:03");
            assert_eq!(req.kind, MessageType::Discover);
            assert!(req.broadcast);
        }
    }

    #[test]
    fn drops_what_would_panic_or_lie() {
        let mac = [0x52, 0x54, 0, 1, 2, 3];
        let bad: Vec<Vec<u8>> = vec![
            discover(mac, &[b"\x5e\x02\x01\x02"]), // option 94 of length 2
            discover(mac, &[b"\x5e\x04\x01\x02\x03\x04"]), // option 94 of length 4
            discover(mac, &[b"\x5d\x03\x00\x00\x07"]), // odd option 93
            discover(mac, &[b"\x50\x01\x00"]),     // option 80 with data
            discover(mac, &[b"\x0c\x02\xff\xfe"]), // hostname not UTF-8
            discover(mac, &[b"\x36\x03\x01\x02\x03"]), // short server id
            discover(mac, &[b"\x3c\x20PXE"]),      // option longer than the packet
            vec![0u8; 100],
        ];
        for b in bad {
            assert!(parse(&b).is_err(), "{b:?}");
        }
        let mut hlen = discover(mac, &[]);
        hlen[2] = 17;
        assert!(parse(&hlen).is_err());
        let mut no_end = discover(mac, &[]);
        no_end.pop();
        assert!(parse(&no_end).is_err());
        let mut reply = discover(mac, &[]);
        reply[0] = 2;
        assert!(parse(&reply).is_err());
    }
}
