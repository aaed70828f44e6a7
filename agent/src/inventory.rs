//! The machine as the kernel sees it, read from sysfs and procfs (no tools in the initramfs):
//! DMI (vendor, product, serial, UUID), CPUs, memory, every disk (size, model, vendor, serial,
//! WWN, rotational, removable, the `by-path` name udev would give it) and every physical NIC
//! (MAC, driver, link, speed). Inspection reports it; the install's disk choice reads the same
//! disk list. Everything is read under a root folder, so tests can point it at a made-up tree.

use fleetboot_image::api::{DiskInfo, Inventory, NicInfo, SystemInfo};
use std::path::Path;

/// Kernel block devices that are never install targets nor inventory.
const NOT_DISKS: [&str; 8] = ["loop", "ram", "zram", "sr", "fd", "md", "dm-", "nbd"];

/// A sysfs/procfs attribute, trimmed; `None` when missing or empty.
fn attr(path: &Path) -> Option<String> {
    let s = std::fs::read_to_string(path).ok()?;
    let s = s.trim();
    (!s.is_empty()).then(|| s.to_string())
}

/// Everything, under `root` (`/` on a machine).
pub fn collect(root: &Path) -> Inventory {
    let dmi = root.join("sys/class/dmi/id");
    let cpuinfo = std::fs::read_to_string(root.join("proc/cpuinfo")).unwrap_or_default();
    let meminfo = std::fs::read_to_string(root.join("proc/meminfo")).unwrap_or_default();
    Inventory {
        system: SystemInfo {
            vendor: attr(&dmi.join("sys_vendor")),
            product: attr(&dmi.join("product_name")),
            serial: attr(&dmi.join("product_serial")),
            uuid: attr(&dmi.join("product_uuid")),
        },
        cpus: cpuinfo
            .lines()
            .filter(|l| l.starts_with("processor"))
            .count() as u32,
        cpu_model: cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string()),
        // The memory installed (online memory blocks), as a rule's `memory: ">=256G"` means it;
        // MemTotal is a few percent less (what the kernel keeps for itself is left out).
        memory_bytes: physical_memory(root).unwrap_or_else(|| {
            meminfo
                .lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
                .map_or(0, |kib| kib * 1024)
        }),
        disks: disks(root),
        nics: nics(root),
        // Asked of the BMC by the caller (it needs the IPMI driver), not read from a tree.
        bmc_address: None,
        bmc_mac: None,
    }
}

/// Online memory blocks × the block size (`/sys/devices/system/memory`).
fn physical_memory(root: &Path) -> Option<u64> {
    let dir = root.join("sys/devices/system/memory");
    let block = u64::from_str_radix(&attr(&dir.join("block_size_bytes"))?, 16).ok()?;
    let online = std::fs::read_dir(&dir)
        .ok()?
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("memory"))
        .filter(|e| attr(&e.path().join("online")).as_deref() == Some("1"))
        .count() as u64;
    (online > 0).then(|| online * block)
}

/// The disks, sorted by name.
pub fn disks(root: &Path) -> Vec<DiskInfo> {
    let block = root.join("sys/block");
    let Ok(entries) = std::fs::read_dir(&block) else {
        return Vec::new();
    };
    let mut out: Vec<DiskInfo> = entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            if NOT_DISKS.iter().any(|p| name.starts_with(p)) {
                return None;
            }
            let dir = e.path();
            let first = |files: &[&str]| files.iter().find_map(|f| attr(&dir.join(f)));
            Some(DiskInfo {
                size_bytes: attr(&dir.join("size"))
                    .and_then(|s| s.parse::<u64>().ok())
                    .unwrap_or(0)
                    * 512,
                model: first(&["device/model"]),
                vendor: first(&["device/vendor"]),
                serial: first(&["device/serial", "serial"]),
                wwn: first(&["device/wwid", "wwid", "device/wwn"]),
                rotational: attr(&dir.join("queue/rotational")).as_deref() == Some("1"),
                removable: attr(&dir.join("removable")).as_deref() == Some("1"),
                by_path: std::fs::canonicalize(&dir)
                    .ok()
                    .and_then(|real| by_path(&real, &name)),
                name,
            })
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// udev's `by-path` name from the device's sysfs path: the PCI function it hangs off, and for
/// NVMe the namespace (`pci-0000:00:05.0-nvme-1`).
fn by_path(real: &Path, name: &str) -> Option<String> {
    let pci = real
        .components()
        .filter_map(|c| c.as_os_str().to_str())
        .rfind(|c| is_pci_address(c))?;
    let mut path = format!("pci-{pci}");
    if let Some(ns) = name
        .strip_prefix("nvme")
        .and_then(|rest| rest.split_once('n'))
        .map(|(_, ns)| ns)
    {
        path += &format!("-nvme-{ns}");
    }
    Some(path)
}

/// `0000:00:04.0`.
fn is_pci_address(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 12
        && b[4] == b':'
        && b[7] == b':'
        && b[10] == b'.'
        && s.chars()
            .enumerate()
            .all(|(i, c)| matches!(i, 4 | 7 | 10) || c.is_ascii_hexdigit())
}

/// The physical network interfaces (those with a device), sorted by name.
pub fn nics(root: &Path) -> Vec<NicInfo> {
    let net = root.join("sys/class/net");
    let Ok(entries) = std::fs::read_dir(&net) else {
        return Vec::new();
    };
    let mut out: Vec<NicInfo> = entries
        .flatten()
        .filter_map(|e| {
            let dir = e.path();
            // Virtual interfaces (lo, bridges, veth, tun) have no `device`.
            if !dir.join("device").exists() {
                return None;
            }
            Some(NicInfo {
                name: e.file_name().to_string_lossy().into_owned(),
                mac: attr(&dir.join("address"))?,
                driver: std::fs::read_link(dir.join("device/driver"))
                    .ok()
                    .and_then(|p| Some(p.file_name()?.to_string_lossy().into_owned())),
                link: attr(&dir.join("carrier")).as_deref() == Some("1"),
                // -1 (or an error) while the link is down.
                speed_mbps: attr(&dir.join("speed"))
                    .and_then(|s| s.parse::<i64>().ok())
                    .filter(|s| *s > 0)
                    .map(|s| s as u32),
            })
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(root: &Path, path: &str, text: &str) {
        let p = root.join(path);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }

    /// A made-up machine: DMI, two CPUs, an NVMe and a virtio disk behind PCI functions, a
    /// loop device (left out), a NIC with a driver and lo (left out).
    #[test]
    fn reads_a_machine_from_sysfs_and_procfs() {
        let dir = tempfile::tempdir().unwrap();
        let r = dir.path();
        write(r, "sys/class/dmi/id/sys_vendor", "Dell Inc.\n");
        write(r, "sys/class/dmi/id/product_name", "PowerEdge R650\n");
        write(r, "sys/class/dmi/id/product_serial", "ABC1234\n");
        write(
            r,
            "proc/cpuinfo",
            "processor\t: 0\nmodel name\t: Xeon Gold\n\nprocessor\t: 1\nmodel name\t: Xeon Gold\n",
        );
        write(
            r,
            "proc/meminfo",
            "MemTotal:       2048000 kB\nMemFree: 1 kB\n",
        );
        let devices = r.join("sys/devices/pci0000:00");
        for (dev, name, size, serial) in [
            (
                "0000:00:05.0/nvme/nvme0",
                "nvme0n1",
                "2097152",
                "NVME-SERIAL",
            ),
            (
                "0000:00:04.0/virtio1/block",
                "vda",
                "1048576",
                "VIRTIO-SERIAL",
            ),
        ] {
            let d = devices.join(dev).join(name);
            std::fs::create_dir_all(d.join("queue")).unwrap();
            std::fs::write(d.join("size"), size).unwrap();
            std::fs::write(d.join("queue/rotational"), "0\n").unwrap();
            std::fs::write(d.join("removable"), "0\n").unwrap();
            std::fs::write(d.join("serial"), serial).unwrap();
            std::fs::create_dir_all(r.join("sys/block")).unwrap();
            std::os::unix::fs::symlink(&d, r.join("sys/block").join(name)).unwrap();
        }
        write(r, "sys/block/loop0/size", "8");
        let nic = devices.join("0000:00:03.0/virtio0/net/eth0");
        std::fs::create_dir_all(&nic).unwrap();
        std::fs::write(nic.join("address"), "52:54:00:12:34:56\n").unwrap();
        std::fs::write(nic.join("carrier"), "1\n").unwrap();
        std::fs::write(nic.join("speed"), "-1\n").unwrap();
        let drv = r.join("sys/bus/virtio/drivers/virtio_net");
        std::fs::create_dir_all(&drv).unwrap();
        std::os::unix::fs::symlink(devices.join("0000:00:03.0/virtio0"), nic.join("device"))
            .unwrap();
        std::os::unix::fs::symlink(&drv, devices.join("0000:00:03.0/virtio0/driver")).unwrap();
        std::fs::create_dir_all(r.join("sys/class/net")).unwrap();
        std::os::unix::fs::symlink(&nic, r.join("sys/class/net/eth0")).unwrap();
        write(r, "sys/class/net/lo/address", "00:00:00:00:00:00");

        let inv = collect(r);
        assert_eq!(inv.system.vendor.as_deref(), Some("Dell Inc."));
        assert_eq!(inv.system.product.as_deref(), Some("PowerEdge R650"));
        assert_eq!(inv.system.serial.as_deref(), Some("ABC1234"));
        assert_eq!(inv.system.uuid, None);
        assert_eq!((inv.cpus, inv.cpu_model.as_deref()), (2, Some("Xeon Gold")));
        assert_eq!(inv.memory_bytes, 2048000 * 1024);
        let names: Vec<&str> = inv.disks.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(names, ["nvme0n1", "vda"]);
        assert_eq!(inv.disks[0].size_bytes, 2097152 * 512);
        assert_eq!(inv.disks[0].serial.as_deref(), Some("NVME-SERIAL"));
        assert_eq!(
            inv.disks[0].by_path.as_deref(),
            Some("pci-0000:00:05.0-nvme-1")
        );
        assert_eq!(inv.disks[1].by_path.as_deref(), Some("pci-0000:00:04.0"));
        assert!(!inv.disks[1].rotational && !inv.disks[1].removable);
        assert_eq!(inv.nics.len(), 1, "{:?}", inv.nics);
        let n = &inv.nics[0];
        assert_eq!(
            (
                n.name.as_str(),
                n.mac.as_str(),
                n.driver.as_deref(),
                n.link,
                n.speed_mbps
            ),
            ("eth0", "52:54:00:12:34:56", Some("virtio_net"), true, None)
        );
    }

    /// On this machine: whatever it has, the real files parse.
    #[test]
    fn reads_this_machine() {
        let inv = collect(Path::new("/"));
        assert!(inv.cpus >= 1);
        assert!(inv.memory_bytes > 0);
        assert!(inv.disks.iter().all(|d| !d.name.starts_with("loop")));
    }
}
