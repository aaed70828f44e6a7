//! The boot decision: what a machine is told to boot, as pure functions (table-tested below).
//!
//! Two questions, asked at two moments of the boot chain:
//! 1. [`dhcp_boot`]: a DHCP request arrives — which boot loader (or script URL) does the answer
//!    name, or do we stay silent?
//! 2. [`script_plan`]: iPXE fetches its per-MAC script — does it boot the agent (to install an
//!    image) or the local disk?

use crate::config::{BootFiles, UnknownHosts};
use fleetboot_image::api::ImageId;

/// The firmware (or boot loader) behind a DHCP request, from options 60, 77, 93 and 175.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Firmware {
    /// A PXE ROM in BIOS mode (option 93 = 0).
    BiosPxe,
    /// UEFI x86-64 PXE (option 93 = 7 or 9).
    UefiX64,
    /// UEFI ARM64 PXE (option 93 = 11).
    UefiArm64,
    /// UEFI HTTP boot (vendor class `HTTPClient`), x86-64 (or an architecture not said).
    UefiHttp,
    /// UEFI HTTP boot on ARM64 (architecture 19).
    UefiHttpArm64,
    /// iPXE itself (user class `iPXE` or option 175): it fetches its script over HTTP.
    Ipxe,
    /// A PXE client of an architecture we have no boot loader for.
    OtherPxe(u16),
    /// Not a network-boot client at all (an installed OS renewing its address).
    Plain,
}

/// What a DHCP answer names for booting.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DhcpBoot {
    /// No answer at all.
    Ignore,
    /// An address (full mode) but nothing to boot.
    AddressOnly,
    /// A file in `boot_dir`, fetched over TFTP.
    Tftp(String),
    /// An HTTP URL: the iPXE binary for UEFI HTTP boot, or the per-MAC script for iPXE.
    Http(String),
}

/// What the per-MAC iPXE script does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ScriptPlan {
    /// Boot the agent to install this image.
    Agent { image: ImageId },
    /// Boot the local disk.
    LocalDisk,
}

/// Decides the boot part of a DHCP answer. `known` says whether the MAC is in `hosts`;
/// `secure_boot` whether the host is to boot the signed chain under UEFI x86-64; `http_base` is
/// the appliance's URL (`http://10.0.0.1:80`).
pub fn dhcp_boot(
    firmware: Firmware,
    mac: &str,
    known: bool,
    secure_boot: bool,
    unknown_hosts: &UnknownHosts,
    files: &BootFiles,
    http_base: &str,
) -> DhcpBoot {
    if !known && *unknown_hosts == UnknownHosts::Ignore {
        return DhcpBoot::Ignore;
    }
    match firmware {
        Firmware::BiosPxe => DhcpBoot::Tftp(files.bios.clone()),
        // Firmware with Secure Boot on refuses the unsigned iPXE: the shim is signed by Microsoft.
        Firmware::UefiX64 if secure_boot => DhcpBoot::Tftp(files.secure_boot.clone()),
        Firmware::UefiX64 => DhcpBoot::Tftp(files.uefi.clone()),
        Firmware::UefiArm64 => DhcpBoot::Tftp(files.arm64.clone()),
        Firmware::UefiHttp => DhcpBoot::Http(format!("{http_base}/boot/{}", files.uefi)),
        // Debian's signed GRUB, which the default ARM64 shim loads, has no HTTP: over UEFI HTTP
        // boot it could not go on, so only a loader of the operator's own is offered there.
        Firmware::UefiHttpArm64 if files.arm64 == BootFiles::default().arm64 => {
            DhcpBoot::AddressOnly
        }
        Firmware::UefiHttpArm64 => DhcpBoot::Http(format!("{http_base}/boot/{}", files.arm64)),
        Firmware::Ipxe => DhcpBoot::Http(format!("{http_base}/boot/{mac}.ipxe")),
        Firmware::OtherPxe(_) | Firmware::Plain => DhcpBoot::AddressOnly,
    }
}

/// Decides what iPXE boots. `assigned` is the host's image as resolved now (`None`: the
/// configuration gives it none, or the host is unknown and not to be installed); `installed` is
/// what the fleet state says a verified install put on its disk — `None` while an install is
/// under way or after one that did not finish. Matched by digest: the same name and version
/// with other content (or a disk whose install never finished) is not "installed".
pub fn script_plan(
    assigned: Option<&ImageId>,
    installed: Option<&ImageId>,
    reimage_requested: bool,
) -> ScriptPlan {
    match assigned {
        Some(image) if reimage_requested || installed.map(|i| &i.digest) != Some(&image.digest) => {
            ScriptPlan::Agent {
                image: image.clone(),
            }
        }
        _ => ScriptPlan::LocalDisk,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dhcp_boot_by_firmware_and_policy() {
        let files = BootFiles::default();
        let base = "http://10.0.0.1:8080";
        let mac = "52:54:00:12:34:56";
        let install = UnknownHosts::Install("debian".parse().unwrap());
        let t = |s: &str| DhcpBoot::Tftp(s.to_string());
        let h = |s: &str| DhcpBoot::Http(s.to_string());
        let cases: Vec<(Firmware, bool, &UnknownHosts, DhcpBoot)> = vec![
            (
                Firmware::BiosPxe,
                true,
                &UnknownHosts::Ignore,
                t("undionly.kpxe"),
            ),
            (
                Firmware::UefiX64,
                true,
                &UnknownHosts::Ignore,
                t("ipxe.efi"),
            ),
            (
                Firmware::UefiArm64,
                true,
                &UnknownHosts::Ignore,
                t("shimaa64.efi"),
            ),
            (
                Firmware::UefiHttp,
                true,
                &UnknownHosts::Ignore,
                h("http://10.0.0.1:8080/boot/ipxe.efi"),
            ),
            (
                Firmware::UefiHttpArm64,
                true,
                &UnknownHosts::Ignore,
                DhcpBoot::AddressOnly,
            ),
            (
                Firmware::Ipxe,
                true,
                &UnknownHosts::Ignore,
                h("http://10.0.0.1:8080/boot/52:54:00:12:34:56.ipxe"),
            ),
            (
                Firmware::OtherPxe(6),
                true,
                &UnknownHosts::Ignore,
                DhcpBoot::AddressOnly,
            ),
            (
                Firmware::Plain,
                true,
                &UnknownHosts::Ignore,
                DhcpBoot::AddressOnly,
            ),
            (
                Firmware::BiosPxe,
                false,
                &UnknownHosts::Ignore,
                DhcpBoot::Ignore,
            ),
            (
                Firmware::Plain,
                false,
                &UnknownHosts::Ignore,
                DhcpBoot::Ignore,
            ),
            (
                Firmware::Ipxe,
                false,
                &UnknownHosts::Discover,
                h("http://10.0.0.1:8080/boot/52:54:00:12:34:56.ipxe"),
            ),
            (Firmware::BiosPxe, false, &install, t("undionly.kpxe")),
        ];
        for (fw, known, policy, want) in cases {
            assert_eq!(
                dhcp_boot(fw, mac, known, false, policy, &files, base),
                want,
                "{fw:?} known={known} {policy:?}"
            );
        }
        let snp = BootFiles {
            uefi: "snponly.efi".into(),
            ..BootFiles::default()
        };
        assert_eq!(
            dhcp_boot(
                Firmware::UefiX64,
                mac,
                true,
                false,
                &UnknownHosts::Ignore,
                &snp,
                base
            ),
            t("snponly.efi")
        );
        // An ARM64 loader of the operator's own is offered over UEFI HTTP boot too.
        let own_arm64 = BootFiles {
            arm64: "ipxe-arm64.efi".into(),
            ..BootFiles::default()
        };
        assert_eq!(
            dhcp_boot(
                Firmware::UefiHttpArm64,
                mac,
                true,
                false,
                &UnknownHosts::Ignore,
                &own_arm64,
                base
            ),
            h("http://10.0.0.1:8080/boot/ipxe-arm64.efi")
        );
        // Secure Boot: the shim to UEFI x86-64 PXE; BIOS and iPXE itself as before.
        for (fw, want) in [
            (Firmware::UefiX64, t("shimx64.efi")),
            (Firmware::BiosPxe, t("undionly.kpxe")),
            (
                Firmware::Ipxe,
                h("http://10.0.0.1:8080/boot/52:54:00:12:34:56.ipxe"),
            ),
        ] {
            let got = dhcp_boot(fw, mac, true, true, &UnknownHosts::Ignore, &files, base);
            assert_eq!(got, want, "{fw:?} with secure_boot");
        }
    }

    #[test]
    fn script_plan_installs_only_what_differs_or_was_requested() {
        let id = |name: &str, version: u32, digest: &str| ImageId {
            name: name.into(),
            version,
            digest: digest.into(),
        };
        let web1 = id("web", 1, "d1");
        let web2 = id("web", 2, "d2");
        // web@2 removed and its number issued again to other content would be web@2 with d3.
        let web2_other = id("web", 2, "d3");
        let same_bytes_new_name = id("web-copy", 1, "d2");
        let agent = |i: &ImageId| ScriptPlan::Agent { image: i.clone() };
        let cases = [
            (Some(&web2), None, false, agent(&web2)),
            (Some(&web2), Some(&web1), false, agent(&web2)),
            (Some(&web2), Some(&web2), false, ScriptPlan::LocalDisk),
            (Some(&web2), Some(&web2), true, agent(&web2)),
            (Some(&web2), Some(&web2_other), false, agent(&web2)),
            (
                Some(&same_bytes_new_name),
                Some(&web2),
                false,
                ScriptPlan::LocalDisk,
            ),
            (Some(&web1), None, false, agent(&web1)),
            (None, Some(&web2), true, ScriptPlan::LocalDisk),
            (None, None, false, ScriptPlan::LocalDisk),
        ];
        for (assigned, installed, reimage, want) in cases {
            assert_eq!(
                script_plan(assigned, installed, reimage),
                want,
                "{assigned:?} {installed:?} {reimage}"
            );
        }
    }
}
