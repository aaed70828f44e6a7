//! `cargo xtask demo`: the main job, as far as it goes today — build two versions of a small
//! ext4 disk image, import both into a fresh store, show what the store holds and what a reimage
//! from one to the other moves, export the second back and check it byte for byte.
//!
//! (A later issue makes the demo PXE-boot a VM and image it.)

use crate::util::{self, root};
use anyhow::{bail, Context, Result};
use std::fs;
use std::path::Path;
use std::process::Command;

pub fn run() -> Result<()> {
    crate::setup::run()?;
    let root = root();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    util::run(Command::new(&cargo).current_dir(&root).args([
        "build",
        "--release",
        "-p",
        "fleetboot",
    ]))?;
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
        "try: target/release/fleetboot --store {} image list",
        store.display()
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
