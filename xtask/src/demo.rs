//! `cargo xtask demo`: the main job, visibly. First the combined image store: two versions of a
//! small ext4 image imported, listed, compared, exported back byte for byte. Then the appliance:
//! `fleetboot serve` on a bridge in a network namespace, and a QEMU VM that PXE-boots from it, is
//! imaged with a real Debian 12 by the agent, boots it as itself (the demo logs in over SSH and
//! shows its hostname), is reimaged to the next version (only what changed moves) and comes up
//! again — `cargo xtask e2e --os debian --bios-only`.

use crate::util::{self, root};
use anyhow::{bail, Context, Result};
use std::fs;
use std::path::Path;
use std::process::Command;

pub fn run() -> Result<()> {
    crate::setup::run()?;
    let root = root();
    util::build_release(&["fleetboot"])?;
    let bin = root.join("target/release/fleetboot");
    let work = root.join("target/demo");
    if work.exists() {
        fs::remove_dir_all(&work).with_context(|| format!("cannot clean {}", work.display()))?;
    }
    let tree = work.join("tree");
    fs::create_dir_all(tree.join("etc"))?;
    // A small but real filesystem: the project's own sources and some system documentation.
    copy_tree(&root.join("src"), &tree.join("src"))?;
    copy_tree(
        Path::new("/usr/share/common-licenses"),
        &tree.join("licenses"),
    )?;
    fs::write(tree.join("etc/motd"), "fleetboot demo image, version 1\n")?;
    let img1 = work.join("demo-1.img");
    mkfs(&tree, &img1)?;
    fs::write(tree.join("etc/motd"), "fleetboot demo image, version 2\n")?;
    fs::write(
        tree.join("etc/new-in-v2"),
        "a file added in version 2\n".repeat(200),
    )?;
    let img2 = work.join("demo-2.img");
    mkfs(&tree, &img2)?;

    let store = work.join("store");
    let fb = |args: &[&str]| -> Result<()> {
        util::run(Command::new(&bin).arg("--store").arg(&store).args(args))
    };
    fb(&["image", "import", "demo", &img1.to_string_lossy()])?;
    fb(&["image", "import", "demo", &img2.to_string_lossy()])?;
    fb(&["image", "list"])?;
    fb(&["image", "show", "demo@2"])?;
    fb(&["image", "diff", "demo@1", "demo@2"])?;
    fb(&["store", "stats"])?;
    let out = work.join("demo-2.exported.img");
    fb(&[
        "image",
        "export",
        "demo@2",
        &out.to_string_lossy(),
        "--check-digest",
    ])?;
    fb(&["store", "verify"])?;
    if fs::read(&out)? != fs::read(&img2)? {
        bail!("the exported image differs from the imported one");
    }
    println!(
        "\ndemo: imported two versions of a 64 MiB ext4 image into {}, exported demo@2 back byte for byte.",
        store.display()
    );
    println!(
        "try: target/release/fleetboot --store {} image list\n",
        store.display()
    );

    println!(
        "demo: now a real Debian 12: built from Debian's packages (once, then cached), imported from \
         its qcow2, installed on a VM that PXE-boots from fleetboot serve, and logged into over SSH \
         with the key the YAML gives it (a few minutes under TCG)...\n"
    );
    crate::e2e::run(&["--os", "debian", "--bios-only"])?;
    println!(
        "\ndemo: what happened: the VM's firmware (SeaBIOS + iPXE) got an address and its script from \
         fleetboot serve, booted the agent, which wrote debian@1 to its 4 GiB disk (every chunk \
         verified, the disk read back chunk by chunk), added the cloud-init seed (its \
         hostname, SSH key and user data from the YAML) and rebooted into Debian, which grew its root \
         filesystem to the disk; debian@2 (one package more) was then assigned, the machine rebooted, \
         and the agent moved only what changed. Logs and disks: target/e2e-debian/.\n\n\
         On a real network: import your image (fleetboot image import NAME FILE: raw, qcow2, or raw \
         compressed with xz, zstd or gzip), write a configuration like config/fleetboot.yaml \
         (interface; dhcp mode proxy beside your DHCP server, or full; hosts by MAC with their \
         hostname, keys and user data), run `cargo xtask boot-assets` and `cargo xtask initramfs` to \
         fill boot/, then `fleetboot serve --config FILE` as root, and power the machines on."
    );
    Ok(())
}

fn mkfs(tree: &Path, img: &Path) -> Result<()> {
    util::run(
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-E", "root_owner=0:0", "-U", "clear", "-d"])
            .arg(tree)
            .arg(img)
            .arg("64M"),
    )
}

fn copy_tree(from: &Path, to: &Path) -> Result<()> {
    util::run(Command::new("cp").arg("-r").arg(from).arg(to))
}
