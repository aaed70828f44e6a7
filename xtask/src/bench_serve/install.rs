//! Installing the servers and clients (Debian packages, an unpacked atftpd) without starting any of them as a service.

use super::*;

/// Installs the benchmark's packages with a `policy-rc.d` that forbids starting services (so
/// kea, nginx and tftpd-hpa are never started on the machine's interfaces by their packages), and
/// disables their units afterwards where systemd runs.
pub(super) fn install_packages() -> Result<()> {
    let missing: Vec<&str> = crate::setup::SERVE_BENCH_PACKAGES
        .iter()
        .filter(|(_, cmd)| !crate::util::have(cmd))
        .map(|(pkg, _)| *pkg)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    {
        let _no_services = PolicyRcD::install()?;
        crate::setup::apt_install(crate::setup::SERVE_BENCH_PACKAGES)?;
    }
    if Path::new("/run/systemd/system").is_dir() {
        // Packages enable their units for the next boot even when policy-rc.d kept them from
        // starting now: disable those of the packages just installed (and only those).
        let units = [
            ("kea-dhcp4-server", "kea-dhcp4-server"),
            ("nginx-light", "nginx"),
            ("tftpd-hpa", "tftpd-hpa"),
        ];
        for (pkg, unit) in units {
            if missing.contains(&pkg) {
                let _ = Command::new("systemctl")
                    .args(["disable", "--now", "--quiet", unit])
                    .stderr(Stdio::null())
                    .status();
            }
        }
    }
    Ok(())
}

/// A `/usr/sbin/policy-rc.d` that answers 101 (action forbidden) while it lives, unless the
/// machine already has one (containers do); removed on drop if this created it.
pub(super) struct PolicyRcD {
    pub(super) created: Option<PathBuf>,
}

impl PolicyRcD {
    pub(super) fn install() -> Result<PolicyRcD> {
        let path = PathBuf::from("/usr/sbin/policy-rc.d");
        if path.exists() {
            return Ok(PolicyRcD { created: None });
        }
        fs::write(
            &path,
            "#!/bin/sh\n# cargo xtask bench serve: no service starts\nexit 101\n",
        )
        .with_context(|| format!("cannot write {}", path.display()))?;
        fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .with_context(|| format!("cannot make {} executable", path.display()))?;
        Ok(PolicyRcD {
            created: Some(path),
        })
    }
}

impl Drop for PolicyRcD {
    fn drop(&mut self) {
        if let Some(path) = &self.created {
            let _ = fs::remove_file(path);
        }
    }
}

/// atftpd: Debian's `atftpd` conflicts with `tftpd-hpa`, so unless it is installed its package
/// is downloaded (`apt-get download`) and unpacked beside the benchmark; returns the binary.
pub(super) fn atftpd_binary(dir: &Path) -> Result<PathBuf> {
    if crate::util::have("atftpd") {
        return Ok(PathBuf::from("atftpd"));
    }
    let unpacked = dir.join("atftpd/root");
    let bin = unpacked.join("usr/sbin/atftpd");
    if bin.is_file() {
        return Ok(bin);
    }
    let download = dir.join("atftpd/deb");
    fresh_dir(&download)?;
    crate::util::run(
        Command::new("apt-get")
            .args(["download", "-q", "atftpd"])
            .current_dir(&download),
    )?;
    let deb = fs::read_dir(&download)
        .with_context(|| format!("cannot list {}", download.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .with_context(|| {
            format!(
                "apt-get download atftpd left no .deb in {}",
                download.display()
            )
        })?;
    crate::util::run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&unpacked))?;
    if !bin.is_file() {
        bail!("{} holds no usr/sbin/atftpd", deb.display());
    }
    Ok(bin)
}

/// `cargo build --release -p fleetboot`; returns the binary.
pub(super) fn build_fleetboot() -> Result<PathBuf> {
    crate::util::build_release(&["fleetboot"])
}
