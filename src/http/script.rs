//! The per-MAC iPXE script: boot the agent (kernel + initramfs from `boot_dir`, a command line
//! with the appliance URL, the MAC, a one-time token and iPXE's own lease), or boot the local disk.

use super::{random_token, AppError, AppState};
use crate::config::UnknownHosts;
use crate::fleet::{script_plan, ScriptPlan};
use crate::mac::Mac;
use crate::store::ImageRef;
use axum::http::StatusCode;

/// File names of the agent's kernel and initramfs in `boot_dir`.
pub const AGENT_KERNEL: &str = "fleetboot-vmlinuz";
pub const AGENT_INITRD: &str = "fleetboot-initrd.img";
/// Standalone GRUB that finds and chainloads the disk's `\EFI\BOOT\BOOTX64.EFI` (UEFI local boot).
pub const UEFI_LOCAL_BOOT: &str = "fleetboot-localboot.efi";

/// Decides and writes the script for `mac`, recording what was decided.
pub fn for_host(st: &AppState, mac: Mac) -> Result<String, AppError> {
    let config = st.config();
    let host = config.hosts.get(&mac);
    let wanted: Option<ImageRef> = match host {
        Some(h) => h.image.clone(),
        None => match &config.unknown_hosts {
            UnknownHosts::Ignore => {
                return Err(AppError(
                    StatusCode::NOT_FOUND,
                    format!("unknown host {mac}"),
                ))
            }
            UnknownHosts::Discover => None,
            UnknownHosts::Install(image) => Some(image.clone()),
        },
    };
    let assigned = match &wanted {
        Some(r) => {
            let v = st.store.resolve(r).map_err(|e| {
                AppError(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("host {mac}: image {r}: {e}"),
                )
            })?;
            Some(format!("{}@{}", v.name, v.version))
        }
        None => None,
    };
    let fleet = st.fleet();
    fleet.seen(mac, None, None)?;
    let record = fleet.host(mac)?;
    let plan = script_plan(
        assigned.as_deref(),
        record.as_ref().and_then(|r| r.installed.as_deref()),
        record.as_ref().is_some_and(|r| r.reimage),
    );
    Ok(match plan {
        ScriptPlan::Agent { image } => {
            let token = random_token()?;
            fleet.start_install(mac, &image, &token)?;
            tracing::info!(%mac, %image, "booting the agent");
            agent_script(&st.base_url, mac, &token)
        }
        ScriptPlan::LocalDisk => {
            fleet.event(Some(mac), "local-boot", assigned.as_deref())?;
            local_disk_script(&st.base_url)
        }
    })
}

/// Boots the agent. iPXE fills in `${ip}` and friends from its own lease, so the agent can
/// configure its NIC without a second DHCP exchange.
pub fn agent_script(base: &str, mac: Mac, token: &str) -> String {
    format!(
        "#!ipxe\n\
         echo fleetboot: installing on {mac}\n\
         kernel {base}/boot/{AGENT_KERNEL} initrd={AGENT_INITRD} console=tty0 console=ttyS0,115200 \
         fleetboot.url={base} fleetboot.mac={mac} fleetboot.token={token} \
         fleetboot.ip=${{ip}} fleetboot.netmask=${{netmask}} fleetboot.gateway=${{gateway}}\n\
         initrd {base}/boot/{AGENT_INITRD}\n\
         boot\n"
    )
}

/// Boots the first disk: `sanboot` under BIOS; under UEFI a small GRUB that chainloads the
/// disk's `\EFI\BOOT\BOOTX64.EFI` (a plain `exit` leaves OVMF in its setup menu).
pub fn local_disk_script(base: &str) -> String {
    format!(
        "#!ipxe\n\
         echo fleetboot: booting the local disk\n\
         iseq ${{platform}} efi && goto efi ||\n\
         sanboot --no-describe --drive 0x80 || exit 1\n\
         :efi\n\
         chain {base}/boot/{UEFI_LOCAL_BOOT} || exit 1\n"
    )
}
