//! Loading the drivers the hardware asks for: every device's `modalias` in /sys matched against
//! `modules.alias`, each module loaded after its dependencies (`modules.dep`) with finit_module.
//!
//! Loading a bus driver makes new devices appear (virtio_pci → virtio devices → virtio_net), so
//! this runs in passes until a pass loads nothing new.

use anyhow::{Context, Result};
use std::collections::{HashMap, HashSet};
use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Passes over the devices before giving up on new ones appearing.
const PASSES_MAX: usize = 8;

/// `modules.alias` patterns and `modules.dep` of one kernel's module folder.
pub struct ModuleIndex {
    dir: PathBuf,
    aliases: Vec<(String, String)>,
    /// module name → (its file, relative to `dir`; its dependencies' files)
    deps: HashMap<String, (String, Vec<String>)>,
}

/// `kernel/drivers/net/virtio_net.ko` → `virtio_net` (module names use `_`, files may use `-`).
fn module_name(file: &str) -> String {
    let base = file.rsplit('/').next().unwrap_or(file);
    base.split(".ko").next().unwrap_or(base).replace('-', "_")
}

impl ModuleIndex {
    pub fn read(dir: &Path) -> Result<ModuleIndex> {
        let alias_text = std::fs::read_to_string(dir.join("modules.alias"))
            .with_context(|| format!("cannot read {}/modules.alias", dir.display()))?;
        let aliases = alias_text
            .lines()
            .filter_map(|l| l.strip_prefix("alias "))
            .filter_map(|l| l.rsplit_once(' '))
            .map(|(pattern, module)| (pattern.to_string(), module.replace('-', "_")))
            .collect();
        let dep_text = std::fs::read_to_string(dir.join("modules.dep"))
            .with_context(|| format!("cannot read {}/modules.dep", dir.display()))?;
        let deps = dep_text
            .lines()
            .filter_map(|l| l.split_once(':'))
            .map(|(file, deps)| {
                let deps = deps.split_whitespace().map(str::to_string).collect();
                (module_name(file), (file.to_string(), deps))
            })
            .collect();
        Ok(ModuleIndex {
            dir: dir.to_path_buf(),
            aliases,
            deps,
        })
    }

    /// Modules whose alias pattern matches `modalias`.
    pub fn matching(&self, modalias: &str) -> Vec<&str> {
        self.aliases
            .iter()
            .filter(|(p, _)| glob(p.as_bytes(), modalias.as_bytes()))
            .map(|(_, m)| m.as_str())
            .collect()
    }

    /// Files to load for `module`, dependencies first.
    pub fn load_order(&self, module: &str) -> Vec<String> {
        let Some((file, deps)) = self.deps.get(module) else {
            return Vec::new();
        };
        // modules.dep lists the full closure, the deepest dependency last.
        let mut order: Vec<String> = deps.iter().rev().cloned().collect();
        order.push(file.clone());
        order
    }
}

/// fnmatch-style matching of `*`, `?` and `[...]`, as modules.alias uses.
pub fn glob(p: &[u8], s: &[u8]) -> bool {
    match (p.first(), s.first()) {
        (None, None) => true,
        (Some(b'*'), _) => glob(&p[1..], s) || (!s.is_empty() && glob(p, &s[1..])),
        (Some(b'?'), Some(_)) => glob(&p[1..], &s[1..]),
        (Some(b'['), Some(&c)) => {
            let Some(end) = p.iter().position(|&b| b == b']') else {
                return false;
            };
            let set = &p[1..end];
            let (negate, set) = match set.first() {
                Some(b'!') | Some(b'^') => (true, &set[1..]),
                _ => (false, set),
            };
            let mut hit = false;
            let mut i = 0;
            while i < set.len() {
                if i + 2 < set.len() && set[i + 1] == b'-' {
                    hit |= (set[i]..=set[i + 2]).contains(&c);
                    i += 3;
                } else {
                    hit |= set[i] == c;
                    i += 1;
                }
            }
            hit != negate && glob(&p[end + 1..], &s[1..])
        }
        (Some(&a), Some(&b)) => a == b && glob(&p[1..], &s[1..]),
        _ => false,
    }
}

/// Every device's modalias under /sys/bus.
fn modaliases() -> Vec<String> {
    let mut out = Vec::new();
    let Ok(buses) = std::fs::read_dir("/sys/bus") else {
        return out;
    };
    for bus in buses.flatten() {
        let Ok(devices) = std::fs::read_dir(bus.path().join("devices")) else {
            continue;
        };
        for dev in devices.flatten() {
            if let Ok(a) = std::fs::read_to_string(dev.path().join("modalias")) {
                out.push(a.trim().to_string());
            }
        }
    }
    out
}

fn load_file(path: &Path) -> Result<()> {
    let file =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let params = CString::default();
    match nix::kmod::finit_module(&file, &params, nix::kmod::ModuleInitFlags::empty()) {
        Ok(()) | Err(nix::errno::Errno::EEXIST) => Ok(()),
        Err(e) => Err(anyhow::anyhow!("cannot load {}: {e}", path.display())),
    }
}

/// Loads `module` and its dependencies by name (for modules no device asks for, such as
/// `ipmi_devintf`); a module the initramfs lacks is an error.
pub fn load_named(dir: &Path, module: &str) -> Result<()> {
    let index = ModuleIndex::read(dir)?;
    let files = index.load_order(module);
    anyhow::ensure!(!files.is_empty(), "no module {module} in {}", dir.display());
    for file in files {
        load_file(&index.dir.join(&file))?;
    }
    Ok(())
}

/// Loads what the devices present ask for, in passes; returns the modules loaded.
pub fn load_for_hardware(dir: &Path) -> Result<Vec<String>> {
    let index = ModuleIndex::read(dir)?;
    let mut loaded_files: HashSet<String> = HashSet::new();
    let mut loaded = Vec::new();
    for _ in 0..PASSES_MAX {
        let mut wanted: Vec<String> = Vec::new();
        for alias in modaliases() {
            for m in index.matching(&alias) {
                if !wanted.iter().any(|w| w == m) {
                    wanted.push(m.to_string());
                }
            }
        }
        let mut new = 0;
        for module in wanted {
            for file in index.load_order(&module) {
                if loaded_files.insert(file.clone()) {
                    match load_file(&index.dir.join(&file)) {
                        Ok(()) => {
                            println!("fleetboot-agent: loaded {}", module_name(&file));
                            loaded.push(module_name(&file));
                            new += 1;
                        }
                        Err(e) => println!("fleetboot-agent: {e:#}"),
                    }
                }
            }
        }
        if new == 0 {
            break;
        }
        // Let the drivers just loaded register the devices they found.
        std::thread::sleep(Duration::from_millis(300));
    }
    Ok(loaded)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_modalias_patterns() {
        assert!(glob(
            b"pci:v00001AF4d00001000sv*sd*bc*sc*i*",
            b"pci:v00001AF4d00001000sv00001AF4sd00000001bc02sc00i00"
        ));
        assert!(glob(b"virtio:d00000001v*", b"virtio:d00000001v00001AF4"));
        assert!(!glob(b"virtio:d00000002v*", b"virtio:d00000001v00001AF4"));
        assert!(glob(b"scsi:t-0x0[07e]*", b"scsi:t-0x00"));
        assert!(!glob(b"scsi:t-0x0[07e]*", b"scsi:t-0x05"));
        assert!(glob(b"a?c", b"abc") && !glob(b"a?c", b"ac"));
        assert!(glob(b"x[!a-c]y", b"xdy") && !glob(b"x[!a-c]y", b"xby"));
        assert_eq!(module_name("kernel/drivers/scsi/sd_mod.ko"), "sd_mod");
        assert_eq!(module_name("kernel/crypto/crc-t10dif.ko"), "crc_t10dif");
    }

    #[test]
    fn dependencies_load_first() {
        let dir = std::env::temp_dir().join(format!("fb-mod-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("modules.alias"),
            "alias virtio:d00000001v* virtio_net\n",
        )
        .unwrap();
        std::fs::write(
            dir.join("modules.dep"),
            "kernel/drivers/net/virtio_net.ko: kernel/drivers/net/net_failover.ko kernel/net/core/failover.ko\n\
             kernel/net/core/failover.ko:\n",
        )
        .unwrap();
        let idx = ModuleIndex::read(&dir).unwrap();
        assert_eq!(idx.matching("virtio:d00000001v00001AF4"), ["virtio_net"]);
        assert_eq!(
            idx.load_order("virtio_net"),
            [
                "kernel/net/core/failover.ko",
                "kernel/drivers/net/net_failover.ko",
                "kernel/drivers/net/virtio_net.ko"
            ]
        );
        std::fs::remove_dir_all(dir).unwrap();
    }
}
