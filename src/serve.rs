//! `fleetboot serve`: wires the configuration, the store, the fleet state and the services
//! (HTTP now; DHCP and TFTP beside it) into one process, and reloads the configuration on SIGHUP
//! or when the file changes — keeping the old one in force when the new one does not load.

use crate::config::{BootFiles, Config, DhcpMode};
use crate::dhcp::{DhcpServer, DhcpSockets};
use crate::http::{self, AppState};
use crate::net::interface_ipv4;
use anyhow::{bail, Context, Result};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::signal::unix::{signal, SignalKind};

/// What `main` hands to `serve`: everything read from flags and the environment.
pub struct ServeOptions {
    pub config: PathBuf,
    /// `FLEETBOOT_ADMIN_TOKEN`, used when the configuration sets no `admin_token`.
    pub admin_token_env: Option<String>,
}

/// Loads a configuration and checks its images against its store.
pub fn load_checked(path: &Path) -> Result<Config> {
    let config = Config::load(path)?;
    config.check_images(&crate::s3::open_store(&config.store)?)?;
    Ok(config)
}

/// What `boot_dir` lacks that the configuration sends machines to fetch, one line each: a
/// machine sent for a missing file stops in its firmware or iPXE with no clue on the
/// appliance's side.
pub fn missing_boot_files(config: &Config) -> Vec<String> {
    let mut problems = Vec::new();
    let files = &config.boot_files;
    let secure_boot = config.defaults.secure_boot == Some(true)
        || config.groups.values().any(|g| g.secure_boot == Some(true))
        || config.hosts.values().any(|h| h.secure_boot);
    // UEFI HTTP boot fetches `uefi` too; the rest only over TFTP.
    let mut wanted = vec![files.uefi.as_str()];
    if config.tftp.enabled {
        wanted.push(files.bios.as_str());
        if secure_boot {
            // The shim fetches the signed GRUB under this name.
            wanted.extend([files.secure_boot.as_str(), "grubx64.efi"]);
        }
        // ARM64 machines only where the ARM64 agent is there to boot.
        let arm64_agent = config
            .boot_dir
            .join(crate::http::script::AGENT_KERNEL_ARM64);
        if arm64_agent.exists() {
            wanted.extend([
                files.arm64.as_str(),
                crate::http::script::AGENT_INITRD_ARM64,
            ]);
            if files.arm64 == BootFiles::default().arm64 {
                wanted.push("grubaa64.efi");
            }
        }
    } else if secure_boot {
        problems.push(
            "secure_boot hosts cannot boot with tftp.enabled: false (the signed GRUB reads over \
             TFTP only)"
                .to_string(),
        );
    }
    for name in wanted {
        if let Err(e) = crate::bootfiles::resolve_beneath(&config.boot_dir, name) {
            problems.push(format!(
                "boot loader {name}: {e} (`cargo xtask boot-assets` puts them there)"
            ));
        }
    }
    // Every install, inspection and wipe boots the agent; UEFI machines boot their disk through
    // the local-boot GRUB.
    use crate::http::script::{AGENT_INITRD, AGENT_KERNEL, UEFI_LOCAL_BOOT};
    for (name, built_by) in [
        (AGENT_KERNEL, "cargo xtask initramfs"),
        (AGENT_INITRD, "cargo xtask initramfs"),
        (UEFI_LOCAL_BOOT, "cargo xtask boot-assets"),
    ] {
        if let Err(e) = crate::bootfiles::resolve_beneath(&config.boot_dir, name) {
            problems.push(format!(
                "agent file {name}: {e} (`{built_by}` puts it there)"
            ));
        }
    }
    problems
}

/// Runs the appliance until SIGINT or SIGTERM.
pub async fn run(options: ServeOptions) -> Result<()> {
    let config = load_checked(&options.config)?;
    for problem in missing_boot_files(&config) {
        tracing::warn!(boot_dir = %config.boot_dir.display(), "{problem}");
    }
    match http::limits::raise_open_files_limit() {
        Ok(n) => tracing::debug!(open_files_max = n, "open files limit"),
        Err(e) => tracing::warn!("cannot raise the open files limit: {e}"),
    }
    let iface = interface_ipv4(&config.interface)
        .with_context(|| format!("cannot read the addresses of {}", config.interface))?;
    let address = match (config.address, iface) {
        (Some(a), _) => a,
        (None, Some(i)) => i.addr,
        (None, None) => bail!(
            "interface {} has no IPv4 address (give `address:` or configure the interface)",
            config.interface
        ),
    };
    let netmask = iface.map_or(Ipv4Addr::new(255, 255, 255, 0), |i| i.netmask);
    let dhcp_mode = config.dhcp.mode;
    let interface = config.interface.clone();
    let http_port = config.http_port;
    let base_url = if http_port == 80 {
        format!("http://{address}")
    } else {
        format!("http://{address}:{http_port}")
    };
    let admin_token = config
        .admin_token
        .clone()
        .or(options.admin_token_env.clone());
    let state = AppState::new(config, base_url.clone(), admin_token)?;

    let listener = tokio::net::TcpListener::bind(SocketAddr::from((address, http_port)))
        .await
        .with_context(|| format!("cannot listen on {address}:{http_port}"))?;
    tracing::info!(%base_url, "serving HTTP");
    let http = tokio::spawn(http::serve(listener, state.clone(), shutdown_signal()));
    if dhcp_mode != DhcpMode::Off {
        let sockets = DhcpSockets::bind(&interface, dhcp_mode, 67, 4011)
            .with_context(|| format!("cannot bind the DHCP ports on {interface}"))?;
        DhcpServer::new(state.clone(), address, netmask)?
            .spawn(sockets)
            .context("cannot start the DHCP threads")?;
        tracing::info!(mode = ?dhcp_mode, %interface, "serving DHCP");
    }
    if state.config().tftp.enabled {
        let config = state.config();
        let port = config.tftp.port;
        let socket = crate::net::udp_on(&interface, address, port)
            .with_context(|| format!("cannot bind TFTP on {address}:{port} ({interface})"))?;
        let (boot_dir, limits, metrics) = (
            config.boot_dir.clone(),
            config.tftp.clone(),
            state.metrics.clone(),
        );
        let generated: crate::tftp::Generated = {
            let state = state.clone();
            Arc::new(move |name, peer| crate::grub::tftp_file(&state, name, peer))
        };
        crate::tftp::spawn(socket, &interface, boot_dir, generated, limits, metrics)
            .context("cannot start TFTP")?;
        tracing::info!(%address, "serving TFTP");
    } else {
        tracing::info!("TFTP off (tftp.enabled: false): UEFI HTTP boot and iPXE only");
    }
    if state.config().router_advertisements {
        crate::ra::spawn(interface.clone())
            .with_context(|| format!("cannot send router advertisements on {interface}"))?;
        tracing::info!(%interface, "sending IPv6 router advertisements");
    }
    tokio::spawn(reload_loop(state.clone(), options.config.clone()));
    tokio::spawn(close_deleted_packs(state.clone()));
    tokio::spawn(poll_power(state.clone()));
    match http.await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e).context("HTTP server failed"),
        Err(e) => bail!("HTTP server task failed: {e}"),
    }
}

async fn shutdown_signal() {
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down");
}

/// How often the appliance asks every BMC for its host's power (for the dashboard and `host
/// list`); commands record what they do at once.
const POWER_POLL: Duration = Duration::from_secs(60);
/// BMCs asked at once by the poll.
const POWER_POLL_PARALLEL: usize = 4;

/// Asks each configured BMC for its host's power state, now and every `POWER_POLL`.
async fn poll_power(state: Arc<AppState>) {
    let mut tick = tokio::time::interval(POWER_POLL);
    // A poll slower than the interval (BMCs timing out) is not followed by a burst of others.
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let config = state.config();
        let hosts: crate::fleet::HostBmcs = config
            .hosts
            .values()
            .filter_map(|h| h.bmc.clone().map(|b| (h.mac, Some(b))))
            .collect();
        if hosts.is_empty() {
            continue;
        }
        let st = state.clone();
        let _ = tokio::task::spawn_blocking(move || {
            let results = crate::bmc::for_each(&hosts, POWER_POLL_PARALLEL, |b| b.power_state());
            if let Err(e) = st.fleet().set_power(&crate::fleet::power_records(&results)) {
                tracing::warn!("cannot record power states: {e}");
            }
        })
        .await;
    }
}

/// How often kept-open pack files are checked for deletion by gc.
const DELETED_PACKS_CHECK: Duration = Duration::from_secs(30);

/// Lets go of pack files gc deleted, so their space is freed (see `PackFiles::drop_deleted`).
async fn close_deleted_packs(state: Arc<AppState>) {
    let mut tick = tokio::time::interval(DELETED_PACKS_CHECK);
    loop {
        tick.tick().await;
        let closed = state.packs.drop_deleted();
        if closed > 0 {
            tracing::info!(closed, "closed pack files that gc deleted");
        }
    }
}

/// Reloads on SIGHUP, and when the modification time of the file, or of a file it reads
/// (`user_data_file`), changes (checked every second).
async fn reload_loop(state: Arc<AppState>, path: PathBuf) {
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        return;
    };
    let mtime = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let fingerprint = |state: &AppState| -> Vec<Option<SystemTime>> {
        std::iter::once(mtime(&path))
            .chain(state.config().watched_files.iter().map(|f| mtime(f)))
            .collect()
    };
    let mut seen = fingerprint(&state);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        let forced = tokio::select! {
            _ = hup.recv() => true,
            _ = tick.tick() => false,
        };
        let now = fingerprint(&state);
        if !forced && now == seen {
            continue;
        }
        seen = now;
        // Checking the images may ask an object store: not on a runtime thread.
        let reloaded = {
            let path = path.clone();
            tokio::task::spawn_blocking(move || load_checked(&path))
                .await
                .unwrap_or_else(|e| Err(anyhow::anyhow!("configuration reload: {e}")))
        };
        match reloaded {
            Ok(mut new) => {
                let old = state.config();
                if new.interface != old.interface || new.http_port != old.http_port {
                    tracing::warn!("interface and http_port changes take effect at the next start");
                }
                // DHCP names TFTP boot files only while the TFTP server started with them runs.
                if new.tftp.enabled != old.tftp.enabled {
                    tracing::warn!("a tftp.enabled change takes effect at the next start");
                    new.tftp.enabled = old.tftp.enabled;
                }
                *state.config.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(new);
                // The new configuration may read other files.
                seen = fingerprint(&state);
                tracing::info!(path = %path.display(), "configuration reloaded");
                let _ = state.fleet().event(None, "config-reloaded", None);
            }
            Err(e) => {
                tracing::error!(
                    "configuration not reloaded, the previous one stays in force: {e:#}"
                );
                let _ = state
                    .fleet()
                    .event(None, "config-rejected", Some(&format!("{e:#}")));
            }
        }
    }
}
