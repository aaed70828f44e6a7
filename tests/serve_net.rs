//! `fleetboot serve` on a real (namespaced) network with real clients: busybox udhcpc as BIOS,
//! UEFI and iPXE clients, an unknown MAC ignored, reservations, ProxyDHCP beside dnsmasq as the
//! site's server, garbage survived, and curl over HTTP.

mod lab;

use lab::{can_run, in_netns, Lab};
use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::path::Path;
use std::time::Duration;

const KNOWN: &str = "52:54:00:aa:00:01";
const RESERVED: &str = "52:54:00:aa:00:02";
const UNKNOWN: &str = "52:54:00:aa:00:99";

/// A store with one image, a boot folder and a configuration for the server at 10.77.0.1.
fn appliance_files(dir: &Path, mode: &str) -> std::path::PathBuf {
    let store = fleetboot::store::Store::new(dir.join("store"));
    let img = dir.join("demo.img");
    std::fs::write(&img, vec![7u8; 64 * 1024]).unwrap();
    fleetboot::store::import::import(&store, "demo", &img, &Default::default(), &|_, _| {})
        .unwrap();
    std::fs::create_dir_all(dir.join("boot")).unwrap();
    std::fs::write(dir.join("boot/undionly.kpxe"), b"bios loader").unwrap();
    std::fs::write(dir.join("boot/ipxe.efi"), b"uefi loader").unwrap();
    let dhcp = match mode {
        "full" => "dhcp: { mode: full, range: [10.77.0.100, 10.77.0.150], router: 10.77.0.1, dns: [10.77.0.1] }",
        _ => "dhcp: { mode: proxy }",
    };
    let yaml = format!(
        "interface: eth0\nhttp_port: 8080\nboot_dir: boot\nstore: store\nstate_dir: state\n{dhcp}\n\
         hosts:\n  \"{KNOWN}\": {{ image: demo, hostname: web-01 }}\n  \"{RESERVED}\": {{ image: demo, ip: 10.77.0.7 }}\n"
    );
    let path = dir.join("fleetboot.yaml");
    std::fs::write(&path, yaml).unwrap();
    path
}

/// Runs busybox udhcpc in `host` and returns the lease it got (the script's environment).
fn udhcpc(host: &lab::Host, dir: &Path, extra: &[&str]) -> Option<HashMap<String, String>> {
    let script = dir.join("udhcpc.sh");
    let out = dir.join(format!("lease-{}.env", host.ns));
    let _ = std::fs::remove_file(&out);
    std::fs::write(
        &script,
        "#!/bin/sh\n[ \"$1\" = bound ] && env > \"$OUT\"\nexit 0\n",
    )
    .unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let status = host
        .cmd("env")
        .arg(format!("OUT={}", out.display()))
        .args([
            "busybox",
            "udhcpc",
            "-i",
            &host.ifname,
            "-f",
            "-q",
            "-n",
            "-t",
            "3",
            "-T",
            "1",
            "-A",
            "1",
            "-s",
        ])
        .arg(&script)
        .args(extra)
        .output()
        .unwrap();
    if !status.status.success() {
        return None;
    }
    let text = std::fs::read_to_string(&out).ok()?;
    Some(
        text.lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    )
}

const BIOS: &[&str] = &["-V", "PXEClient:Arch:00000:UNDI:002001", "-x", "0x5d:0000"];
const UEFI: &[&str] = &["-V", "PXEClient:Arch:00007:UNDI:003016", "-x", "0x5d:0007"];
const IPXE: &[&str] = &[
    "-V",
    "PXEClient:Arch:00000:UNDI:002001",
    "-x",
    "0x5d:0000",
    "-x",
    "0x4d:69505845",
];

#[test]
fn full_dhcp_tells_bios_uefi_and_ipxe_apart_and_ignores_strangers() {
    if !can_run() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let config = appliance_files(dir.path(), "full");
    let mut lab = Lab::new();
    let server = lab.host("srv", "52:54:00:00:00:01", Some("10.77.0.1/24"));
    let known = lab.host("cli", KNOWN, None);
    let reserved = lab.host("res", RESERVED, None);
    let stranger = lab.host("unk", UNKNOWN, None);
    let mut daemon = server.spawn(
        env!("CARGO_BIN_EXE_fleetboot"),
        &["serve", "--config", config.to_str().unwrap()],
        &dir.path().join("serve.log"),
    );
    daemon.wait_for("serving DHCP", 10);

    let lease = udhcpc(&known, dir.path(), BIOS).expect("a BIOS PXE client gets a lease");
    let ip: Ipv4Addr = lease["ip"].parse().unwrap();
    assert!(
        (100..=150).contains(&ip.octets()[3]) && ip.octets()[..3] == [10, 77, 0],
        "{lease:?}"
    );
    assert_eq!(lease["siaddr"], "10.77.0.1");
    assert_eq!(lease["boot_file"], "undionly.kpxe");
    assert_eq!(lease["subnet"], "255.255.255.0");
    assert_eq!(lease["router"], "10.77.0.1");
    assert_eq!(lease["serverid"], "10.77.0.1");

    let again = udhcpc(&known, dir.path(), UEFI).expect("UEFI lease");
    assert_eq!(again["boot_file"], "ipxe.efi");
    assert_eq!(
        again["ip"], lease["ip"],
        "the same machine keeps its address"
    );

    let ipxe = udhcpc(&known, dir.path(), IPXE).expect("iPXE lease");
    assert_eq!(
        ipxe["boot_file"],
        format!("http://10.77.0.1:8080/boot/{KNOWN}.ipxe")
    );

    let plain = udhcpc(&known, dir.path(), &[]).expect("an installed OS gets its address");
    assert!(!plain.contains_key("boot_file"), "{plain:?}");

    let res = udhcpc(&reserved, dir.path(), BIOS).expect("reserved host");
    assert_eq!(res["ip"], "10.77.0.7");

    assert!(
        udhcpc(&stranger, dir.path(), BIOS).is_none(),
        "unknown MACs get no answer at all"
    );

    // Garbage to port 67 is dropped and counted; the server keeps answering.
    in_netns(&known.ns, || {
        let s = socket_on("eth0", 68);
        let to: SocketAddr = "255.255.255.255:67".parse().unwrap();
        let mut junk = vec![0u8; 300];
        for (i, b) in junk.iter_mut().enumerate() {
            *b = (i * 7 + 3) as u8;
        }
        s.send_to(&junk, to).unwrap();
        s.send_to(b"", to).unwrap();
        s.send_to(&[1u8; 1500], to).unwrap();
        let mut opt94 = lab_discover(KNOWN);
        opt94.splice(240..240, [94u8, 2, 1, 2]);
        s.send_to(&opt94, to).unwrap();
    });
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        daemon.alive(),
        "the server died on garbage:\n{}",
        daemon.log_text()
    );
    assert!(
        udhcpc(&known, dir.path(), BIOS).is_some(),
        "still answering after garbage"
    );

    // HTTP from the client (with the address it leased): the script and the metrics.
    let st = known
        .cmd("ip")
        .args(["addr", "add", &format!("{}/24", lease["ip"]), "dev", "eth0"])
        .status()
        .unwrap();
    assert!(st.success());
    let script = known
        .cmd("curl")
        .args(["-sf", &format!("http://10.77.0.1:8080/boot/{KNOWN}.ipxe")])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&script.stdout).contains("fleetboot.token="));
    let metrics = known
        .cmd("curl")
        .args(["-sf", "http://10.77.0.1:8080/metrics"])
        .output()
        .unwrap();
    let metrics = String::from_utf8_lossy(&metrics.stdout).into_owned();
    let dropped: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("fleetboot_dhcp_dropped_total "))
        .and_then(|n| n.parse().ok())
        .unwrap();
    assert!(dropped >= 4, "{metrics}");
    // The host list shows what DHCP saw.
    let list = std::process::Command::new(env!("CARGO_BIN_EXE_fleetboot"))
        .args([
            "host",
            "list",
            "--json",
            "--config",
            config.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let hosts: serde_json::Value = serde_json::from_slice(&list.stdout).unwrap();
    let h = hosts
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["mac"] == KNOWN)
        .unwrap();
    assert_eq!(h["hostname"], "web-01");
    assert!(
        !hosts
            .as_array()
            .unwrap()
            .iter()
            .any(|h| h["mac"] == UNKNOWN),
        "strangers are not recorded"
    );
}

/// A minimal DISCOVER (for garbage variations).
fn lab_discover(mac: &str) -> Vec<u8> {
    let mac: fleetboot::mac::Mac = mac.parse().unwrap();
    let mut b = vec![0u8; 240];
    b[0] = 1;
    b[1] = 1;
    b[2] = 6;
    b[28..34].copy_from_slice(&mac.0);
    b[236..240].copy_from_slice(&[99, 130, 83, 99]);
    b.extend_from_slice(&[53, 1, 1, 255]);
    b
}

#[test]
fn proxy_dhcp_beside_dnsmasq_gives_boot_information_only() {
    if !can_run() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let config = appliance_files(dir.path(), "proxy");
    let mut lab = Lab::new();
    let server = lab.host("srv", "52:54:00:00:00:01", Some("10.77.0.1/24"));
    let site = lab.host("site", "52:54:00:00:00:02", Some("10.77.0.2/24"));
    let client = lab.host("cli", KNOWN, None);
    let mut site_dhcp = site.spawn(
        "dnsmasq",
        &[
            "--no-daemon",
            "--port=0",
            "--no-ping",
            "--leasefile-ro",
            "--interface=eth0",
            "--bind-interfaces",
            "--dhcp-range=10.77.0.50,10.77.0.60,255.255.255.0,1h",
            "--log-dhcp",
        ],
        &dir.path().join("dnsmasq.log"),
    );
    let mut daemon = server.spawn(
        env!("CARGO_BIN_EXE_fleetboot"),
        &["serve", "--config", config.to_str().unwrap()],
        &dir.path().join("serve.log"),
    );
    daemon.wait_for("serving DHCP", 10);
    site_dhcp.wait_for("DHCP, IP range", 10);

    // The client: a PXE DISCOVER, then every offer that comes back within two seconds.
    let offers: Vec<(Ipv4Addr, Ipv4Addr, String, Vec<u8>)> = in_netns(&client.ns, || {
        let s = socket_on("eth0", 68);
        let mut d = lab_discover(KNOWN);
        d.truncate(d.len() - 1);
        d.extend_from_slice(b"\x3c\x20PXEClient:Arch:00007:UNDI:003016\x5d\x02\x00\x07\xff");
        d[10] = 0x80;
        s.send_to(&d, "255.255.255.255:67").unwrap();
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut out = Vec::new();
        let mut buf = [0u8; 1500];
        while let Ok((n, _)) = s.recv_from(&mut buf) {
            let m = &buf[..n];
            let yiaddr = Ipv4Addr::new(m[16], m[17], m[18], m[19]);
            let siaddr = Ipv4Addr::new(m[20], m[21], m[22], m[23]);
            let file = String::from_utf8_lossy(&m[108..236])
                .trim_end_matches('\0')
                .to_string();
            out.push((yiaddr, siaddr, file, m.to_vec()));
        }
        out
    });
    let site_offer = offers
        .iter()
        .find(|o| o.0 != Ipv4Addr::UNSPECIFIED)
        .expect("the site server offers an address");
    assert!(site_offer.0.octets()[3] >= 50 && site_offer.0.octets()[3] <= 60);
    let proxy = offers
        .iter()
        .find(|o| o.0 == Ipv4Addr::UNSPECIFIED)
        .unwrap_or_else(|| panic!("no proxy offer: {offers:?}\n{}", daemon.log_text()));
    assert_eq!(
        proxy.1,
        Ipv4Addr::new(10, 77, 0, 1),
        "siaddr names the appliance"
    );
    assert_eq!(proxy.2, "ipxe.efi");
    let raw = &proxy.3;
    assert_eq!(option(raw, 53), Some(&[2u8][..]), "DHCPOFFER");
    assert_eq!(
        option(raw, 60),
        Some(&b"PXEClient"[..]),
        "option 60 PXEClient in a proxy offer"
    );
    assert_eq!(
        option(raw, 43),
        Some(&[6u8, 1, 8, 255][..]),
        "option 43: use the boot file"
    );
    assert_eq!(option(raw, 54), Some(&[10u8, 77, 0, 1][..]));
    assert_eq!(
        offers
            .iter()
            .filter(|o| o.0 == Ipv4Addr::UNSPECIFIED)
            .count(),
        1
    );

    // Port 4011: a REQUEST gets an ACK with the boot file, sent back to the asking port.
    let ack = in_netns(&client.ns, || {
        let s = socket_on("eth0", 4011);
        let mut r = lab_discover(KNOWN);
        r[242] = 3; // REQUEST
        r.truncate(r.len() - 1);
        r.extend_from_slice(b"\x3c\x20PXEClient:Arch:00007:UNDI:003016\x5d\x02\x00\x07\xff");
        // The client has its address from the site server by now.
        let _ = std::process::Command::new("ip")
            .args(["addr", "add", "10.77.0.55/24", "dev", "eth0"])
            .status();
        s.send_to(&r, "10.77.0.1:4011").unwrap();
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut buf = [0u8; 1500];
        s.recv_from(&mut buf).map(|(n, _)| buf[..n].to_vec()).ok()
    })
    .expect("an answer on port 4011");
    assert_eq!(option(&ack, 53), Some(&[5u8][..]), "DHCPACK");
    assert_eq!(option(&ack, 60), Some(&b"PXEClient"[..]));
    assert_eq!(&ack[16..20], &[0, 0, 0, 0], "never an address");
    assert!(String::from_utf8_lossy(&ack[108..236]).starts_with("ipxe.efi"));
}

/// The value of DHCP option `code` in a packet.
fn option(packet: &[u8], code: u8) -> Option<&[u8]> {
    let mut i = 240;
    while i + 1 < packet.len() {
        match packet[i] {
            0 => i += 1,
            255 => return None,
            c => {
                let len = packet[i + 1] as usize;
                let data = packet.get(i + 2..i + 2 + len)?;
                if c == code {
                    return Some(data);
                }
                i += 2 + len;
            }
        }
    }
    None
}

fn socket_on(ifname: &str, port: u16) -> UdpSocket {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None).unwrap();
    s.set_reuse_address(true).unwrap();
    s.set_broadcast(true).unwrap();
    s.bind_device(Some(ifname.as_bytes())).unwrap();
    s.bind(&SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)).into())
        .unwrap();
    s.into()
}
