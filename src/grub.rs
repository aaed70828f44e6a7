//! The signed chain's GRUB configuration, served over TFTP.
//!
//! A UEFI x86-64 host with `secure_boot: true`, and every UEFI ARM64 machine (Debian has no ARM64
//! iPXE), is sent Debian's Microsoft-signed shim, which fetches Debian's signed network GRUB
//! (`grubx64.efi`, `grubaa64.efi`) from beside it. That GRUB reads
//! `/grub/grub.cfg` from its TFTP server and can load no module (lockdown) — not even HTTP — so
//! the appliance makes both files over TFTP: a bootstrap, the same for every machine, that reads
//! `/grub/<mac>.cfg`, and that per-MAC file, which does what the iPXE script does: boot the
//! agent (Debian's signed kernel, the agent's initramfs, a command line with the install token),
//! or chainload the local disk's `\EFI\BOOT\BOOTX64.EFI` (its own shim, so the disk boots
//! through the signed chain too). One file serves both architectures: GRUB's `${grub_cpu}`
//! picks the kernel (`fleetboot-vmlinuz-arm64` beside `fleetboot-vmlinuz`) and the disk's
//! loader (`BOOTAA64.EFI`). The decision and its bookkeeping are the iPXE script's
//! ([`AppState::boot_plan`]); a token is handed only to the address DHCP gave the machine.
//!
//! GRUB has no `${netmask}` or `${gateway}` to give the agent: it asks DHCP itself.

use crate::appliance::{AppState, BootError};
use crate::http::script::{
    agent_params, AGENT_INITRD, AGENT_INITRD_ARM64, AGENT_KERNEL, AGENT_KERNEL_ARM64,
};
use crate::mac::Mac;
use crate::tftp::Refusal;
use fleetboot_image::api::AgentMode;
use std::net::IpAddr;

/// The name the signed network GRUB reads first (its prefix is `/grub`).
pub const BOOTSTRAP: &str = "grub/grub.cfg";

/// The file a TFTP request names, if it is one of GRUB's (see [`crate::tftp::Generated`]):
/// `grub/grub.cfg` and `grub/<mac>.cfg` are made here (a file of that name in `boot_dir` is not
/// served); every other name is left to `boot_dir`.
pub fn tftp_file(
    state: &AppState,
    name: &str,
    peer: IpAddr,
) -> Option<Result<Vec<u8>, (Refusal, String)>> {
    if name == BOOTSTRAP {
        return Some(Ok(BOOTSTRAP_CONFIG.as_bytes().to_vec()));
    }
    let mac: Mac = name
        .strip_prefix("grub/")?
        .strip_suffix(".cfg")?
        .parse()
        .ok()?;
    Some(
        state
            .boot_plan(mac, peer)
            .map(|plan| match plan.agent_mode() {
                Some((token, mode)) => agent_config(&state.base_url, mac, token, mode),
                None => LOCAL_DISK_CONFIG.to_string(),
            })
            .map(String::into_bytes)
            .map_err(|e| {
                // Anyone can ask over UDP: only a request from the wrong address is worth a
                // warning. The codes match the HTTP script's statuses (404, 403, 503).
                let refusal = match e {
                    BootError::UnknownHost(_) => Refusal::NotFound,
                    BootError::WrongAddress { .. } => Refusal::Forbidden,
                    BootError::Image { .. } | BootError::State(_) | BootError::Random(_) => {
                        Refusal::Unavailable
                    }
                };
                match refusal {
                    Refusal::Forbidden => tracing::warn!(%peer, "{e}"),
                    _ => tracing::debug!(%mac, %peer, "no GRUB configuration: {e}"),
                }
                (refusal, e.to_string())
            }),
    )
}

/// [`BOOTSTRAP`]: reads the machine's own configuration; if it cannot, says so and hands the
/// machine back to its firmware's next boot entry.
pub const BOOTSTRAP_CONFIG: &str = "# fleetboot: what this machine boots is in the next file.\n\
     set timeout=0\n\
     configfile /grub/${net_default_mac}.cfg\n\
     echo \"fleetboot: no boot configuration for ${net_default_mac}\"\n\
     sleep 5\n\
     exit 1\n";

/// Boots the agent for `mode` (see [`crate::http::script::agent_script`]) from the TFTP server
/// GRUB came from: shim checks the kernel's Debian signature. An ARM64 machine gets the ARM64
/// kernel and initramfs, and its serial console is the PL011 (`ttyAMA0`), named last so that it
/// is `/dev/console`, where the agent reports.
pub fn agent_config(base: &str, mac: Mac, token: &str, mode: AgentMode) -> String {
    let (what, params) = agent_params(base, mac, token, mode);
    format!(
        "echo \"fleetboot: {what} {mac}\"\n\
         if [ \"${{grub_cpu}}\" = arm64 ]; then\n\
         linux /{AGENT_KERNEL_ARM64} {params} console=ttyAMA0\n\
         initrd /{AGENT_INITRD_ARM64}\n\
         else\n\
         linux /{AGENT_KERNEL} {params}\n\
         initrd /{AGENT_INITRD}\n\
         fi\n\
         boot\n"
    )
}

/// Chainloads the disk's removable-media loader for this architecture (its shim, on an image
/// built for Secure Boot).
pub const LOCAL_DISK_CONFIG: &str = "echo \"fleetboot: booting the local disk\"\n\
     set loader=/EFI/BOOT/BOOTX64.EFI\n\
     if [ \"${grub_cpu}\" = arm64 ]; then set loader=/EFI/BOOT/BOOTAA64.EFI; fi\n\
     search --no-floppy --file $loader --set=root\n\
     chainloader $loader\n\
     boot\n";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_agents_config_carries_its_token_and_mode_and_loads_from_the_tftp_root() {
        let mac: Mac = "52:54:00:12:34:56".parse().unwrap();
        let cfg = agent_config(
            "http://10.0.0.1:8080",
            mac,
            "00ff",
            AgentMode::Wipe { secure: false },
        );
        assert!(
            cfg.contains("linux /fleetboot-vmlinuz console=tty0"),
            "{cfg}"
        );
        for part in [
            "fleetboot.url=http://10.0.0.1:8080",
            "fleetboot.mac=52:54:00:12:34:56",
            "fleetboot.token=00ff",
            "fleetboot.mode=wipe",
        ] {
            assert!(cfg.contains(part), "{part} in {cfg}");
        }
        assert!(
            cfg.contains("initrd /fleetboot-initrd.img\nfi\nboot\n"),
            "{cfg}"
        );
        // ARM64: its own kernel and initramfs, its serial console last.
        assert!(cfg.contains(
            "if [ \"${grub_cpu}\" = arm64 ]; then\nlinux /fleetboot-vmlinuz-arm64 console=tty0"
        ));
        assert!(
            cfg.contains(
                "fleetboot.mode=wipe console=ttyAMA0\ninitrd /fleetboot-initrd-arm64.img\nelse\n"
            ),
            "{cfg}"
        );
        // GRUB has no lease variables to hand on: the agent asks DHCP.
        assert!(!cfg.contains("fleetboot.ip"));
    }

    #[test]
    fn the_bootstrap_reads_the_machines_own_file() {
        assert!(BOOTSTRAP_CONFIG.contains("configfile /grub/${net_default_mac}.cfg"));
        assert!(LOCAL_DISK_CONFIG.contains("set loader=/EFI/BOOT/BOOTX64.EFI\n"));
        assert!(LOCAL_DISK_CONFIG.contains("then set loader=/EFI/BOOT/BOOTAA64.EFI; fi"));
        assert!(LOCAL_DISK_CONFIG.contains("chainloader $loader\n"));
    }
}
