//! The three related Debian OS images the store benchmark runs on, built once and cached.
//!
//! - A: `debootstrap --variant=minbase bookworm`;
//! - B: A plus openssh-server, curl and python3-minimal;
//! - C: B plus a few tools and the pending security updates.
//!
//! Each tree is kept (`tree-a`, `tree-b`, `tree-c`: the WIM anchor captures trees) and made into a 2 GiB
//! ext4 image (`a.img`, `b.img`, `c.img`) with `mkfs.ext4 -d`, so no mounting. Every output is built under
//! a `.tmp` name and renamed when complete: an interrupted run is never taken for a finished one. A stage
//! is rebuilt when its output is missing or when the stage it derives from was rebuilt in this run.
//!
//! The only network use is the Debian mirror the machine's apt sources name (deb.debian.org).

use crate::util::run;
use anyhow::{bail, Context, Result};
use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

pub const SUITE: &str = "bookworm";
pub const MIRROR: &str = "http://deb.debian.org/debian";
const SECURITY_SOURCE: &str = "deb http://deb.debian.org/debian-security bookworm-security main";
const IMAGE_SIZE: &str = "2G";
/// A PATH that has the chroot's `sbin` directories, whatever the caller's PATH is.
pub const CHROOT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// Makes `invoke-rc.d` refuse to start services inside the chroot.
pub const POLICY_RC_D: &str = "#!/bin/sh\nexit 101\n";

/// One built image: its name (`a`, `b`, `c`), its file tree and its ext4 image.
pub struct OsImage {
    pub name: &'static str,
    pub tree: PathBuf,
    pub image: PathBuf,
}

/// How one tree is made from the one before it.
struct Stage {
    name: &'static str,
    /// The tree this one starts as a copy of; `None`: debootstrap.
    base: Option<&'static str>,
    packages: &'static [&'static str],
    security_updates: bool,
}

const STAGES: [Stage; 3] = [
    Stage {
        name: "a",
        base: None,
        packages: &[],
        security_updates: false,
    },
    Stage {
        name: "b",
        base: Some("a"),
        packages: &["openssh-server", "curl", "python3-minimal"],
        security_updates: false,
    },
    Stage {
        name: "c",
        base: Some("b"),
        packages: &["less", "vim-tiny", "iproute2", "procps"],
        security_updates: true,
    },
];

/// Builds whatever of A, B and C is missing under `dir` and returns all three.
pub fn build(dir: &Path) -> Result<Vec<OsImage>> {
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut images = Vec::new();
    let mut base_rebuilt = false;
    for stage in &STAGES {
        let tree = dir.join(format!("tree-{}", stage.name));
        let image = dir.join(format!("{}.img", stage.name));
        let tree_rebuilt = base_rebuilt || !tree.is_dir();
        if tree_rebuilt {
            build_tree(dir, stage, &tree)?;
        }
        if tree_rebuilt || !image.is_file() {
            make_image(&tree, &image)?;
        }
        eprintln!("bench: image {} ready: {}", stage.name, image.display());
        images.push(OsImage {
            name: stage.name,
            tree,
            image,
        });
        base_rebuilt = tree_rebuilt;
    }
    Ok(images)
}

fn build_tree(dir: &Path, stage: &Stage, tree: &Path) -> Result<()> {
    let started = Instant::now();
    let tmp = dir.join(format!("tree-{}.tmp", stage.name));
    remove_stale_tree(&tmp)?;
    if tree.exists() {
        remove_stale_tree(tree)?;
    }
    match stage.base {
        None => {
            eprintln!("bench: debootstrap of image A (takes a few minutes)");
            run(Command::new("debootstrap")
                .args(["--variant=minbase", SUITE])
                .arg(&tmp)
                .arg(MIRROR))?;
        }
        Some(base) => {
            eprintln!(
                "bench: image {} = image {} + {:?}{}",
                stage.name.to_uppercase(),
                base.to_uppercase(),
                stage.packages,
                if stage.security_updates {
                    " + security updates"
                } else {
                    ""
                }
            );
            run(Command::new("cp")
                .arg("-a")
                .arg(dir.join(format!("tree-{base}")))
                .arg(&tmp))?;
        }
    }

    let policy = tmp.join("usr/sbin/policy-rc.d");
    fs::write(&policy, POLICY_RC_D)
        .with_context(|| format!("cannot write {}", policy.display()))?;
    fs::set_permissions(&policy, fs::Permissions::from_mode(0o755))
        .with_context(|| format!("cannot make {} executable", policy.display()))?;
    if stage.security_updates {
        let sources = tmp.join("etc/apt/sources.list");
        let mut file = fs::OpenOptions::new()
            .append(true)
            .open(&sources)
            .with_context(|| format!("cannot open {}", sources.display()))?;
        writeln!(file, "{SECURITY_SOURCE}")
            .with_context(|| format!("cannot write {}", sources.display()))?;
    }
    {
        let _proc = ProcMount::new(&tmp)?;
        if !stage.packages.is_empty() || stage.security_updates {
            // No translations: the package lists stay those debootstrap fetched, plus security.
            apt_get(&tmp, &["-o", "Acquire::Languages=none", "update"])?;
        }
        if !stage.packages.is_empty() {
            let mut install = vec!["install", "--no-install-recommends"];
            install.extend_from_slice(stage.packages);
            apt_get(&tmp, &install)?;
        }
        if stage.security_updates {
            apt_get(&tmp, &["upgrade"])?;
        }
        // The images should hold an OS, not the .deb files it was installed from.
        apt_get(&tmp, &["clean"])?;
    }
    fs::remove_file(&policy).with_context(|| format!("cannot remove {}", policy.display()))?;

    fs::rename(&tmp, tree)
        .with_context(|| format!("cannot rename {} to {}", tmp.display(), tree.display()))?;
    eprintln!(
        "bench: tree {} built in {:.0} s",
        stage.name,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// `mkfs.ext4 -d TREE IMAGE 2G`, through a temporary file.
fn make_image(tree: &Path, image: &Path) -> Result<()> {
    let started = Instant::now();
    let tmp = PathBuf::from(format!("{}.tmp", image.display()));
    if tmp.exists() {
        fs::remove_file(&tmp).with_context(|| format!("cannot remove {}", tmp.display()))?;
    }
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(tree)
        .arg(&tmp)
        .arg(IMAGE_SIZE))?;
    fs::File::open(&tmp)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("cannot sync {}", tmp.display()))?;
    fs::rename(&tmp, image)
        .with_context(|| format!("cannot rename {} to {}", tmp.display(), image.display()))?;
    eprintln!(
        "bench: {} made in {:.1} s",
        image.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// `apt-get ARGS` inside the chroot `tree`, never asking questions.
pub fn apt_get(tree: &Path, args: &[&str]) -> Result<()> {
    run(Command::new("chroot")
        .arg(tree)
        .args(["apt-get", "-q", "-y", "-o", "Dpkg::Use-Pty=0"])
        .args(args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .env("LC_ALL", "C")
        .env("PATH", CHROOT_PATH))
}

/// Removes a tree left incomplete by an interrupted run (or out of date), after unmounting what a run left
/// mounted in it.
/// Refuses if something stays mounted: deleting through a mount point would delete the host's files.
pub fn remove_stale_tree(tree: &Path) -> Result<()> {
    if !tree.exists() {
        return Ok(());
    }
    for mount_point in mounts_under(tree)?.iter().rev() {
        eprintln!("bench: unmounting {mount_point}, left by an interrupted run");
        let _ = run(Command::new("umount").arg(mount_point));
    }
    let left = mounts_under(tree)?;
    if !left.is_empty() {
        bail!(
            "{} still has mounts ({}); unmount them and run again",
            tree.display(),
            left.join(", ")
        );
    }
    eprintln!(
        "bench: removing {} (incomplete or out of date)",
        tree.display()
    );
    fs::remove_dir_all(tree).with_context(|| format!("cannot remove {}", tree.display()))
}

/// The mount points at or below `dir`, in the order they were mounted.
fn mounts_under(dir: &Path) -> Result<Vec<String>> {
    let dir = fs::canonicalize(dir).with_context(|| format!("cannot resolve {}", dir.display()))?;
    let mounts =
        fs::read_to_string("/proc/self/mounts").context("cannot read /proc/self/mounts")?;
    Ok(mounts
        .lines()
        .filter_map(|line| line.split(' ').nth(1))
        // /proc/self/mounts escapes spaces, tabs, newlines and backslashes as octal.
        .map(|field| {
            field
                .replace("\\040", " ")
                .replace("\\011", "\t")
                .replace("\\012", "\n")
                .replace("\\134", "\\")
        })
        .filter(|point| Path::new(point).starts_with(&dir))
        .collect())
}

/// `/proc` mounted in a chroot for as long as this value lives.
pub struct ProcMount {
    point: PathBuf,
}

impl ProcMount {
    pub fn new(tree: &Path) -> Result<Self> {
        let point = tree.join("proc");
        run(Command::new("mount")
            .args(["-t", "proc", "proc"])
            .arg(&point))?;
        Ok(Self { point })
    }
}

impl Drop for ProcMount {
    fn drop(&mut self) {
        if let Err(err) = run(Command::new("umount").arg(&self.point)) {
            eprintln!(
                "bench: warning: {err:#}; unmount {} by hand",
                self.point.display()
            );
        }
    }
}
