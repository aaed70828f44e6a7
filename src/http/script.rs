//! The per-MAC iPXE script, rendered from the core's [`BootPlan`]: boot the agent (kernel +
//! initramfs from `boot_dir`, a command line with the appliance URL, the MAC, the install token
//! and iPXE's own lease), or boot the local disk.

use super::{blocking, AppError, AppState};
use crate::appliance::BootError;
use crate::mac::Mac;
use axum::http::StatusCode;
use fleetboot_image::api::{cmdline, AgentMode};
use std::net::IpAddr;
use std::sync::Arc;

/// File names of the agent's kernel and initramfs in `boot_dir`.
pub const AGENT_KERNEL: &str = "fleetboot-vmlinuz";
pub const AGENT_INITRD: &str = "fleetboot-initrd.img";
/// The same for ARM64 machines, beside them (`cargo xtask initramfs --arch arm64`).
pub const AGENT_KERNEL_ARM64: &str = "fleetboot-vmlinuz-arm64";
pub const AGENT_INITRD_ARM64: &str = "fleetboot-initrd-arm64.img";
/// Standalone GRUB that finds and chainloads the disk's `\EFI\BOOT\BOOTX64.EFI` (UEFI local boot).
pub const UEFI_LOCAL_BOOT: &str = "fleetboot-localboot.efi";

/// Asks the core what `mac` boots and writes the script.
pub async fn for_host(st: Arc<AppState>, mac: Mac, peer: IpAddr) -> Result<String, AppError> {
    let base = st.base_url.clone();
    let plan = blocking(move || {
        st.boot_plan(mac, peer).map_err(|e| {
            let status = match &e {
                BootError::UnknownHost(_) => StatusCode::NOT_FOUND,
                BootError::WrongAddress { .. } => {
                    tracing::warn!("{e}");
                    StatusCode::FORBIDDEN
                }
                BootError::Image { .. } | BootError::State(_) => StatusCode::SERVICE_UNAVAILABLE,
                BootError::Random(_) => StatusCode::INTERNAL_SERVER_ERROR,
            };
            AppError(status, e.to_string())
        })
    })
    .await?;
    Ok(match plan.agent_mode() {
        Some((token, mode)) => agent_script(&base, mac, token, mode),
        None => local_disk_script(&base),
    })
}

/// Boots the agent: to install, to report the machine and power off, or to wipe its disks and
/// power off. iPXE fills in
/// `${ip}` and friends from its own lease, so the agent can configure its NIC without a second
/// DHCP exchange.
pub fn agent_script(base: &str, mac: Mac, token: &str, mode: AgentMode) -> String {
    let (what, params) = agent_params(base, mac, token, mode);
    format!(
        "#!ipxe\n\
         echo fleetboot: {what} {mac}\n\
         kernel {base}/boot/{AGENT_KERNEL} initrd={AGENT_INITRD} {params} \
         {ip}=${{ip}} {netmask}=${{netmask}} {gateway}=${{gateway}}\n\
         initrd {base}/boot/{AGENT_INITRD}\n\
         boot\n",
        ip = cmdline::IP,
        netmask = cmdline::NETMASK,
        gateway = cmdline::GATEWAY,
    )
}

/// What the agent is booted for (in words), and its kernel parameters for `mode` (see
/// [`agent_script`]) whatever loads it: the consoles, the appliance, the MAC, the token.
pub fn agent_params(base: &str, mac: Mac, token: &str, mode: AgentMode) -> (&'static str, String) {
    let what = match mode {
        AgentMode::Install => "installing on",
        AgentMode::Inspect => "inspecting",
        AgentMode::Wipe { secure: true } => "wiping (secure erase)",
        AgentMode::Wipe { secure: false } => "wiping",
    };
    let params = format!(
        "console=tty0 console=ttyS0,115200 {url}={base} {mac_key}={mac} {token_key}={token}{mode}",
        url = cmdline::URL,
        mac_key = cmdline::MAC,
        token_key = cmdline::TOKEN,
        mode = mode.params(),
    );
    (what, params)
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
