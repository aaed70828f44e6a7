//! Black-box tests of the store through the `fleetboot` binary: round trips, bad input, damage,
//! concurrent writers, kill -9 at random moments, and a disk that fills up.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};
use tempfile::TempDir;

mod common;
use common::{next_version, synthetic_image, Rng, BLOCK};

struct Env {
    dir: TempDir,
}

impl Env {
    fn new() -> Env {
        Env {
            dir: tempfile::tempdir().expect("temp dir"),
        }
    }
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
    fn store(&self) -> PathBuf {
        self.path("store")
    }
    fn write(&self, name: &str, data: &[u8]) -> PathBuf {
        let p = self.path(name);
        fs::write(&p, data).expect("write test file");
        p
    }
    fn cmd(&self) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_fleetboot"));
        c.env("FLEETBOOT_STORE", self.store());
        c.stdin(Stdio::null());
        c
    }
    /// Runs fleetboot with `args`, returning its output.
    fn run(&self, args: &[&str]) -> Output {
        self.cmd().args(args).output().expect("run fleetboot")
    }
    /// Runs fleetboot and fails the test unless it succeeds; returns stdout.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "fleetboot {args:?} failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("utf-8 stdout")
    }
    /// Runs fleetboot and fails the test unless it fails; returns stderr.
    fn fails(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            !out.status.success(),
            "fleetboot {args:?} succeeded but should fail"
        );
        String::from_utf8(out.stderr).expect("utf-8 stderr")
    }
    fn import(&self, name: &str, file: &Path) -> String {
        self.ok(&["image", "import", name, file.to_str().unwrap()])
            .trim()
            .to_string()
    }
    /// Exports `image` and returns its bytes.
    fn export(&self, image: &str) -> Vec<u8> {
        let out = self.path(&format!("export-{}", image.replace('@', "-")));
        let _ = fs::remove_file(&out);
        self.ok(&["image", "export", image, out.to_str().unwrap()]);
        let data = fs::read(&out).expect("read export");
        fs::remove_file(&out).expect("remove export");
        data
    }
    fn json(&self, args: &[&str]) -> serde_json::Value {
        serde_json::from_str(&self.ok(args)).expect("valid JSON")
    }
}

#[test]
fn import_export_round_trip_with_dedup() {
    let env = Env::new();
    let a = synthetic_image(1, 600, 123);
    let b = next_version(&a, 2, 20);
    let pa = env.write("a.img", &a);
    let pb = env.write("b.img", &b);
    assert_eq!(env.import("os", &pa), "os@1");
    assert_eq!(env.import("os", &pb), "os@2");
    assert_eq!(env.import("other", &pb), "other@1");
    assert_eq!(env.export("os@1"), a);
    assert_eq!(env.export("os@2"), b);
    assert_eq!(env.export("os"), b, "no version means the latest");
    assert_eq!(env.export("other@1"), b);

    let stats = env.json(&["store", "stats", "--json"]);
    let data = stats["data_bytes"].as_u64().unwrap();
    let unique = stats["unique_bytes"].as_u64().unwrap();
    assert!(
        unique * 2 < data,
        "three images, two identical: unique {unique} vs data {data}"
    );
    assert!(
        stats["pack_bytes"].as_u64().unwrap() < unique,
        "compression pays on text blocks"
    );
    assert_eq!(stats["versions"], 3);

    let list = env.json(&["image", "list", "--json"]);
    let os = list
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "os")
        .unwrap();
    assert_eq!(os["versions"], serde_json::json!([1, 2]));
    assert_eq!(os["size"].as_u64().unwrap(), b.len() as u64);
    assert!(os["shared_bytes"].as_u64().unwrap() > 0);

    let show = env.json(&["image", "show", "os@2", "--json"]);
    assert_eq!(show["metadata"]["name"], "os");
    assert_eq!(show["metadata"]["version"], 2);
    assert_eq!(show["metadata"]["size"].as_u64().unwrap(), b.len() as u64);
    assert_eq!(
        show["metadata"]["digest"],
        blake3::hash(&b).to_hex().as_str()
    );
    let covered: u64 = show["extents"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["len"].as_u64().unwrap())
        .sum();
    assert_eq!(covered, b.len() as u64);

    let diff = env.json(&["image", "diff", "os@1", "os@2", "--json"]);
    let changed = diff["changed_bytes"].as_u64().unwrap();
    assert!(
        changed > 0 && changed <= 20 * BLOCK as u64,
        "changed {changed}"
    );
    assert!(diff["reused_bytes"].as_u64().unwrap() > 10 * changed);

    env.ok(&["store", "verify"]);
}

#[test]
fn every_chunker_round_trips() {
    let env = Env::new();
    let a = synthetic_image(7, 300, 1000);
    let pa = env.write("a.img", &a);
    for (i, args) in [
        vec!["--chunker", "fastcdc"],
        vec!["--chunker", "fastcdc", "--chunk-size", "4096"],
        vec!["--chunker", "blocks", "--chunk-size", "16384"],
        vec!["--frame-size", "4096", "--level", "1"],
    ]
    .iter()
    .enumerate()
    {
        let name = format!("img{i}");
        let mut cmd = vec!["image", "import", name.as_str(), pa.to_str().unwrap()];
        cmd.extend(args);
        env.ok(&cmd);
        assert_eq!(env.export(&name), a, "{args:?}");
    }
    env.ok(&["store", "verify"]);
}

#[test]
fn a_real_ext4_image_round_trips_sparse() {
    if Command::new("mkfs.ext4").arg("-V").output().is_err() {
        panic!("mkfs.ext4 is missing: run `cargo xtask setup`");
    }
    let env = Env::new();
    let tree = env.path("tree");
    fs::create_dir_all(tree.join("etc")).unwrap();
    fs::write(tree.join("etc/hostname"), "web-01\n").unwrap();
    fs::write(tree.join("data.bin"), synthetic_image(3, 100, 0)).unwrap();
    let img = env.path("fs.img");
    let st = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(&tree)
        .arg(&img)
        .arg("32M")
        .status()
        .unwrap();
    assert!(st.success());
    env.import("fs", &img);
    let out = env.path("out.img");
    env.ok(&[
        "image",
        "export",
        "fs",
        out.to_str().unwrap(),
        "--check-digest",
    ]);
    assert_eq!(fs::read(&out).unwrap(), fs::read(&img).unwrap());
    // Zero runs are holes in the exported file, not written zeros.
    use std::os::unix::fs::MetadataExt;
    let allocated = fs::metadata(&out).unwrap().blocks() * 512;
    assert!(
        allocated < 8 << 20,
        "export of a 32 MiB mostly-empty fs allocated {allocated} bytes"
    );
}

#[test]
fn bad_input_gets_a_clear_error_and_changes_nothing() {
    let env = Env::new();
    let a = synthetic_image(5, 50, 0);
    let pa = env.write("a.img", &a);
    env.import("good", &pa);
    let before = env.ok(&["image", "list", "--json"]);

    let missing = env.path("missing.img");
    assert!(env
        .fails(&["image", "import", "x", missing.to_str().unwrap()])
        .contains("No such file"));
    let dir = env.path("a-dir");
    fs::create_dir(&dir).unwrap();
    assert!(env
        .fails(&["image", "import", "x", dir.to_str().unwrap()])
        .contains("is a directory"));
    let empty = env.write("empty.img", b"");
    assert!(env
        .fails(&["image", "import", "x", empty.to_str().unwrap()])
        .contains("is empty"));
    for bad in ["a/b", "a@b", "a b", "../up", ""] {
        let err = env.fails(&["image", "import", bad, pa.to_str().unwrap()]);
        assert!(err.contains("image name"), "{bad:?}: {err}");
    }
    let unreadable = env.write("unreadable.img", b"data");
    let err = env.fails(&["image", "import", "x", "/proc/self/mem"]);
    assert!(err.contains("/proc/self/mem"), "{err}");
    drop(unreadable);

    let out = env.path("out.img");
    assert!(env
        .fails(&["image", "export", "good@9", out.to_str().unwrap()])
        .contains("has no version 9"));
    assert!(env
        .fails(&["image", "export", "nope", out.to_str().unwrap()])
        .contains("no image named"));
    assert!(env
        .fails(&["image", "show", "good@0"])
        .contains("not a version number"));
    assert!(env
        .fails(&["image", "rm", "nope@1"])
        .contains("no image named"));
    assert!(!out.exists());
    // An existing file is not overwritten without --force.
    fs::write(&out, b"keep me").unwrap();
    assert!(env
        .fails(&["image", "export", "good", out.to_str().unwrap()])
        .contains("--force"));
    assert_eq!(fs::read(&out).unwrap(), b"keep me");
    env.ok(&["image", "export", "good", out.to_str().unwrap(), "--force"]);
    assert_eq!(fs::read(&out).unwrap(), a);

    // A folder that is not a store is never written into.
    let not_store = env.path("not-a-store");
    fs::create_dir(&not_store).unwrap();
    fs::write(not_store.join("precious.txt"), b"x").unwrap();
    let err = env.fails(&[
        "--store",
        not_store.to_str().unwrap(),
        "image",
        "import",
        "x",
        pa.to_str().unwrap(),
    ]);
    assert!(err.contains("not a fleetboot store"), "{err}");
    assert_eq!(fs::read_dir(&not_store).unwrap().count(), 1);

    assert_eq!(env.ok(&["image", "list", "--json"]), before);
    env.ok(&["store", "verify"]);
}

/// Pack file, frame offset and frame length of the first chunk of `image`.
fn first_frame(env: &Env, image: &str) -> (PathBuf, u64, u64) {
    let show = env.json(&["image", "show", image, "--json"]);
    let e = &show["entries"][0];
    let pack = env
        .store()
        .join("packs")
        .join(format!("{}.pack", e["pack"].as_str().unwrap()));
    (
        pack,
        e["frame_offset"].as_u64().unwrap(),
        e["frame_stored"].as_u64().unwrap(),
    )
}

#[test]
fn a_flipped_byte_in_a_pack_is_named_and_never_exported() {
    let env = Env::new();
    let a = synthetic_image(11, 200, 0);
    // Random blocks only: the bystander shares no chunk with the victim.
    let mut other = vec![0u8; 200 * BLOCK];
    Rng(12).fill(&mut other);
    env.import("victim", &env.write("a.img", &a));
    env.import("bystander", &env.write("o.img", &other));
    let (pack, offset, len) = first_frame(&env, "victim");
    let mut bytes = fs::read(&pack).unwrap();
    bytes[(offset + len / 2) as usize] ^= 0x40;
    fs::write(&pack, &bytes).unwrap();

    let out = env.run(&["store", "verify"]);
    assert!(!out.status.success(), "verify must fail on damage");
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(report.contains("DAMAGED image victim@1"), "{report}");
    assert!(!report.contains("DAMAGED image bystander"), "{report}");
    assert!(report.contains("DAMAGED chunk "), "{report}");

    let dest = env.path("victim.out");
    let err = env.fails(&["image", "export", "victim", dest.to_str().unwrap()]);
    assert!(err.contains("damaged"), "{err}");
    assert!(!dest.exists(), "a failed export leaves no file");
    let leftovers: Vec<_> = fs::read_dir(env.dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains("partial"))
        .collect();
    assert!(leftovers.is_empty(), "temp files left: {leftovers:?}");
    assert_eq!(env.export("bystander"), other);
}

#[test]
fn truncated_or_foreign_manifests_and_packs_are_reported() {
    let env = Env::new();
    let a = synthetic_image(21, 100, 0);
    let b = synthetic_image(22, 100, 0);
    env.import("a", &env.write("a.img", &a));
    env.import("b", &env.write("b.img", &b));
    let manifest = env.store().join("manifests/a/1.manifest");
    let full = fs::read(&manifest).unwrap();
    fs::write(&manifest, &full[..full.len() / 2]).unwrap();
    assert!(env.fails(&["image", "show", "a"]).contains("truncated"));
    let out = env.run(&["store", "verify"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("DAMAGED image a@1"));
    assert!(
        env.fails(&["store", "gc"]).contains("manifest"),
        "gc must refuse while a manifest is unreadable"
    );

    fs::write(&manifest, b"{\"name\": \"not a manifest\"}").unwrap();
    assert!(env
        .fails(&["image", "show", "a"])
        .contains("not a fleetboot manifest"));
    assert_eq!(env.export("b"), b, "other images are unaffected");

    fs::write(&manifest, &full).unwrap();
    env.ok(&["store", "verify"]);
    let (pack, offset, _) = first_frame(&env, "a");
    let f = fs::OpenOptions::new().write(true).open(&pack).unwrap();
    f.set_len(offset + 1).unwrap();
    let out = env.run(&["store", "verify"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("truncated"));
}

#[test]
fn two_imports_at_once_both_land() {
    let env = Env::new();
    let a = synthetic_image(31, 1500, 0);
    let b = next_version(&a, 32, 100);
    let pa = env.write("a.img", &a);
    let pb = env.write("b.img", &b);
    let mut first = env.cmd();
    first
        .args(["image", "import", "os", pa.to_str().unwrap()])
        .stdout(Stdio::piped());
    let mut second = env.cmd();
    second
        .args(["image", "import", "os", pb.to_str().unwrap()])
        .stdout(Stdio::piped());
    let c1 = first.spawn().unwrap();
    let c2 = second.spawn().unwrap();
    let o1 = c1.wait_with_output().unwrap();
    let o2 = c2.wait_with_output().unwrap();
    assert!(o1.status.success() && o2.status.success());
    let mut got = vec![
        String::from_utf8(o1.stdout).unwrap().trim().to_string(),
        String::from_utf8(o2.stdout).unwrap().trim().to_string(),
    ];
    got.sort();
    assert_eq!(got, ["os@1", "os@2"]);
    let (v1, v2) = (env.export("os@1"), env.export("os@2"));
    assert!((v1 == a && v2 == b) || (v1 == b && v2 == a));
    env.ok(&["store", "verify"]);
}

/// Issue 8, item 2: a version number is never issued twice, even after `rm`, so a host that
/// installed the old NAME@N is never taken to hold new content under the same name.
#[test]
fn version_numbers_are_never_reused() {
    let env = Env::new();
    let a = synthetic_image(61, 50, 0);
    let b = next_version(&a, 62, 5);
    let pa = env.write("a.img", &a);
    assert_eq!(env.import("x", &pa), "x@1");
    assert_eq!(env.import("x", &env.write("b.img", &b)), "x@2");
    env.ok(&["image", "rm", "x@2"]);
    assert_eq!(env.import("x", &pa), "x@3", "x@2 is not issued again");
    env.ok(&["image", "rm", "x"]);
    assert_eq!(
        env.import("x", &pa),
        "x@4",
        "not even after every version is gone"
    );
    env.ok(&["store", "verify"]);
}

#[test]
fn gc_frees_what_no_image_uses_and_keeps_the_rest() {
    let env = Env::new();
    let mut a = vec![0u8; 400 * BLOCK];
    Rng(41).fill(&mut a); // shares nothing with b and c: its pack goes whole
    let b = synthetic_image(42, 400, 0);
    let c = next_version(&b, 43, 10);
    env.import("a", &env.write("a.img", &a));
    env.import("b", &env.write("b.img", &b));
    env.import("c", &env.write("c.img", &c));
    let before = env.json(&["store", "stats", "--json"])["pack_bytes"]
        .as_u64()
        .unwrap();
    env.ok(&["image", "rm", "a"]);
    env.ok(&["image", "rm", "b@1"]);
    let report = env.ok(&["store", "gc"]);
    assert!(report.contains("retired 1 unused pack"), "{report}");
    let stats = env.json(&["store", "stats", "--json"]);
    let after = stats["pack_bytes"].as_u64().unwrap();
    assert!(
        after < before,
        "gc took nothing out of use: {before} -> {after}"
    );
    // Retired, not yet deleted: an install that loaded a's manifest before gc can finish.
    let retired = stats["retired_bytes"].as_u64().unwrap();
    assert!(retired > 0 && retired_dir_bytes(&env) == retired, "{stats}");
    assert!(report.contains("stay readable"), "{report}");
    // A second gc within the grace period keeps them; past it (here: none) they go.
    env.ok(&["store", "gc"]);
    assert_eq!(retired_dir_bytes(&env), retired);
    let report = env.ok(&["store", "gc", "--grace", "0s"]);
    assert!(report.contains("past their grace period"), "{report}");
    assert_eq!(retired_dir_bytes(&env), 0, "{report}");
    assert_eq!(env.export("c"), c, "c shares b's data, which must survive");
    env.ok(&["store", "verify"]);
    assert!(env
        .fails(&["image", "export", "a", env.path("x").to_str().unwrap()])
        .contains("no image"));
}

/// Bytes of the packs gc retired.
fn retired_dir_bytes(env: &Env) -> u64 {
    std::fs::read_dir(env.path("store/retired"))
        .map(|d| d.map(|e| e.unwrap().metadata().unwrap().len()).sum())
        .unwrap_or(0)
}

/// Issue 8, item 12: verify takes no lock, so it runs beside gc. A pack that gc retires or
/// deletes while verify reads the store must not be reported as damage.
#[test]
fn verify_beside_gc_reports_no_false_damage() {
    let env = Env::new();
    let store = fleetboot::store::Store::new(env.path("store"));
    let keep = synthetic_image(61, 300, 0);
    env.import("keep", &env.write("keep.img", &keep));
    let churn: Vec<_> = (0..2)
        .map(|i| env.write(&format!("churn{i}.img"), &synthetic_image(62 + i, 600, 0)))
        .collect();
    let stop = std::sync::atomic::AtomicBool::new(false);
    let mut verifies = 0;
    std::thread::scope(|s| {
        let writer = s.spawn(|| {
            for round in 0..12 {
                env.import("churn", &churn[round % 2]);
                store.remove(&"churn".parse().unwrap()).unwrap();
                // Alternately keep retired packs and delete them at once.
                let grace = if round % 2 == 0 {
                    Duration::ZERO
                } else {
                    Duration::from_secs(3600)
                };
                store.gc_with_grace(grace).unwrap();
            }
            stop.store(true, std::sync::atomic::Ordering::SeqCst);
        });
        while !stop.load(std::sync::atomic::Ordering::SeqCst) {
            let r = store.verify().unwrap();
            assert!(r.ok(), "false damage while gc ran: {:?}", r.damaged_images);
            verifies += 1;
        }
        writer.join().unwrap();
    });
    eprintln!("{verifies} verify passes beside 12 import/rm/gc rounds");
    assert_eq!(env.export("keep"), keep);
}

/// Kills that must land while an import runs, and the most rounds tried to get them.
const KILLS_WANTED: usize = 20;
const ROUNDS_MAX: usize = 80;

#[test]
fn kill_9_during_import_never_damages_the_store() {
    let env = Env::new();
    let a = synthetic_image(51, 300, 0);
    env.import("stable", &env.write("a.img", &a));
    let big = synthetic_image(52, 12_000, 0);
    let pbig = env.write("big.img", &big);

    // How long an undisturbed import takes, to spread the kills over it.
    let t = Instant::now();
    env.import("probe", &pbig);
    let full = t.elapsed();
    env.ok(&["image", "rm", "probe"]);
    env.ok(&["store", "gc", "--grace", "0s"]);

    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    eprintln!("kill test: seed {seed}, an import takes {full:?}");
    let mut rng = Rng(seed | 1);
    // Kills land in the first half of an undisturbed import's time. A loaded machine only makes
    // imports slower, so more kills land mid-import; the loop runs until 20 have (bounded), so
    // no timing decides whether the test passes.
    let window = full.as_micros() as u64 / 2 + 1;
    let mut killed_mid_import = 0;
    for round in 0..ROUNDS_MAX {
        if killed_mid_import >= KILLS_WANTED {
            break;
        }
        let delay = Duration::from_micros(rng.below(window));
        let mut child = env
            .cmd()
            .args(["image", "import", "victim", pbig.to_str().unwrap()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(delay);
        if child.try_wait().unwrap().is_none() {
            killed_mid_import += 1;
        }
        child.kill().ok(); // SIGKILL
        child.wait().unwrap();
        let out = env.run(&["store", "verify"]);
        assert!(
            out.status.success(),
            "round {round} (seed {seed}, kill after {delay:?}): verify failed:\n{}",
            String::from_utf8_lossy(&out.stdout)
        );
        assert_eq!(env.export("stable"), a, "round {round} (seed {seed})");
        // Whatever version of victim became visible is whole.
        let list = env.json(&["image", "list", "--json"]);
        if list
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["name"] == "victim")
        {
            assert_eq!(env.export("victim"), big, "round {round} (seed {seed})");
        }
    }
    assert!(
        killed_mid_import >= KILLS_WANTED,
        "only {killed_mid_import} of {ROUNDS_MAX} kills landed during an import (seed {seed})"
    );
    env.ok(&["store", "gc"]);
    env.ok(&["store", "verify"]);
}

/// A small tmpfs, unmounted on drop.
struct Tmpfs(PathBuf);

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn a_full_disk_fails_the_import_cleanly() {
    if !nix_is_root() {
        eprintln!("SKIP a_full_disk_fails_the_import_cleanly: needs root to mount a tmpfs (CI runs as root)");
        return;
    }
    let env = Env::new();
    let mnt = env.path("small");
    fs::create_dir(&mnt).unwrap();
    let st = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=3m", "tmpfs"])
        .arg(&mnt)
        .status()
        .unwrap();
    assert!(st.success(), "mount tmpfs");
    let _guard = Tmpfs(mnt.clone());
    let store = mnt.join("store");
    let run = |args: &[&str]| {
        env.cmd()
            .env("FLEETBOOT_STORE", &store)
            .args(args)
            .output()
            .unwrap()
    };
    let small = synthetic_image(61, 100, 0);
    let psmall = env.write("small.img", &small);
    assert!(run(&["image", "import", "small", psmall.to_str().unwrap()])
        .status
        .success());
    // Random data does not compress: 8 MiB cannot fit in what is left of 3 MiB.
    let mut big = vec![0u8; 8 << 20];
    Rng(62).fill(&mut big);
    let pbig = env.write("big.img", &big);
    let out = run(&["image", "import", "big", pbig.to_str().unwrap()]);
    assert!(!out.status.success(), "import onto a full disk must fail");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("No space left"), "{err}");

    let list = String::from_utf8(run(&["image", "list", "--json"]).stdout).unwrap();
    assert!(
        list.contains("\"small\"") && !list.contains("\"big\""),
        "{list}"
    );
    assert!(run(&["store", "verify"]).status.success());
    assert_eq!(
        fs::read_dir(store.join("tmp")).unwrap().count(),
        0,
        "temp files removed"
    );
    let dest = env.path("small.out");
    assert!(run(&["image", "export", "small", dest.to_str().unwrap()])
        .status
        .success());
    assert_eq!(fs::read(&dest).unwrap(), small);
    // And once there is room again, the same import works.
    let st = Command::new("mount")
        .args(["-o", "remount,size=32m"])
        .arg(&mnt)
        .status()
        .unwrap();
    assert!(st.success());
    assert!(run(&["image", "import", "big", pbig.to_str().unwrap()])
        .status
        .success());
}

fn nix_is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

#[test]
fn progress_is_quiet_when_not_on_a_terminal() {
    let env = Env::new();
    let a = synthetic_image(71, 100, 0);
    let out = env
        .cmd()
        .args([
            "image",
            "import",
            "q",
            env.write("a.img", &a).to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout), "q@1\n");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !err.contains('\r') && !err.contains('\u{1b}'),
        "progress drawn off a terminal: {err:?}"
    );
}

/// A restore's destination in memory.
struct InMemory(Vec<u8>);

impl fleetboot_image::Target for InMemory {
    fn write_at(&mut self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        let end = offset as usize + data.len();
        if self.0.len() < end {
            self.0.resize(end, 0);
        }
        self.0[offset as usize..end].copy_from_slice(data);
        Ok(())
    }
    fn zero(&mut self, offset: u64, len: u64) -> std::io::Result<()> {
        let end = (offset + len) as usize;
        if self.0.len() < end {
            self.0.resize(end, 0);
        }
        self.0[offset as usize..end].fill(0);
        Ok(())
    }
}

/// What `image diff FROM TO` says a machine holding FROM fetches to become TO.
fn fetch_bytes(env: &Env, from: &str, to: &str) -> u64 {
    env.json(&["image", "diff", from, to, "--json"])["fetch_bytes"]
        .as_u64()
        .expect("fetch_bytes")
}

/// Issue 13: compaction rewrites the packs smaller, every image stays whole (the same digest),
/// a machine's delta fetch moves no more than 1.1 × what it moved before, and an install that
/// loaded its manifest before the pass still finishes from the old (retired) packs.
#[test]
fn compact_shrinks_the_store_and_keeps_every_image_and_delta() {
    let env = Env::new();
    let a = synthetic_image(71, 3000, 0);
    let b = next_version(&a, 72, 200);
    let c = next_version(&b, 73, 200);
    // Imported with small frames at a low level: what compaction improves on.
    for data in [&a, &b, &c] {
        let img = env.write("x.img", data);
        env.ok(&[
            "image",
            "import",
            "os",
            img.to_str().unwrap(),
            "--level",
            "1",
            "--frame-size",
            "65536",
        ]);
    }
    let stats = env.json(&["store", "stats", "--json"]);
    let before = stats["pack_bytes"].as_u64().unwrap();
    let deltas = [("os@1", "os@2"), ("os@1", "os@3"), ("os@2", "os@3")];
    let fetched: Vec<u64> = deltas
        .iter()
        .map(|(f, t)| fetch_bytes(&env, f, t))
        .collect();
    // An install in flight: its manifest loaded before the pass.
    let store = fleetboot::store::Store::new(env.path("store"));
    let (_, in_flight) = store.manifest(&"os@3".parse().unwrap()).unwrap();

    let packs = stats["pack_files"].as_u64().unwrap();
    let manifests_before = stats["manifest_bytes"].as_u64().unwrap();
    let report = env.json(&["store", "compact", "--all", "--json"]);
    assert_eq!(report["packs_compacted"], packs, "{report}");
    assert_eq!(report["manifests_rewritten"], 3, "{report}");
    let stats = env.json(&["store", "stats", "--json"]);
    let after = stats["pack_bytes"].as_u64().unwrap();
    assert!(
        after < before,
        "compaction did not shrink: {before} -> {after}"
    );
    // The manifests are format 2: each id once per store, in the new packs' id tables.
    for n in 1..=3 {
        let file = fs::read(env.store().join(format!("manifests/os/{n}.manifest"))).unwrap();
        assert_eq!(
            fleetboot_image::Manifest::format_of(&file),
            Some(2),
            "os@{n}"
        );
    }
    assert_eq!(stats["id_table_files"], report["packs_written"], "{stats}");
    let (manifests, tables) = (
        stats["manifest_bytes"].as_u64().unwrap(),
        stats["id_table_bytes"].as_u64().unwrap(),
    );
    assert!(
        (manifests + tables) * 2 < manifests_before,
        "manifests {manifests_before} -> {manifests} + id tables {tables}"
    );
    assert_eq!(
        stats["stored_bytes"].as_u64().unwrap(),
        after + manifests + tables,
        "{stats}"
    );
    assert_eq!(stats["retired_bytes"].as_u64().unwrap(), before, "{stats}");
    for (image, data) in [("os@1", &a), ("os@2", &b), ("os@3", &c)] {
        assert_eq!(&env.export(image), data, "{image} after compaction");
    }
    env.ok(&["store", "verify"]);
    for ((from, to), was) in deltas.iter().zip(&fetched) {
        let now = fetch_bytes(&env, from, to);
        assert!(
            now * 10 <= was * 11,
            "{from} -> {to} fetches {now} bytes after compaction, {was} before"
        );
    }
    let mut out = InMemory(Vec::new());
    fleetboot_image::restore(
        &in_flight,
        store.frames().as_ref(),
        &mut out,
        fleetboot_image::RestoreOptions::default(),
        &|_| {},
    )
    .expect("an install that began before compaction finishes");
    out.0.resize(c.len(), 0);
    assert_eq!(out.0, c);
    // A damaged id table: its images are unreadable, loudly; gc refuses to run; put back, whole.
    let table = fs::read_dir(env.store().join("packs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|x| x == "ids"))
        .expect("an id table");
    let good = fs::read(&table).unwrap();
    let mut bad = good.clone();
    let last = bad.len() - 1;
    bad[last] ^= 1;
    fs::write(&table, &bad).unwrap();
    let out = env.run(&["store", "verify"]);
    assert!(!out.status.success());
    let said =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("id table"), "{said}");
    assert!(env
        .fails(&["store", "gc", "--grace", "0s"])
        .contains("id table"));
    fs::remove_file(&table).unwrap();
    assert!(env
        .fails(&["image", "export", "os@2", env.path("y").to_str().unwrap()])
        .contains("missing"));
    fs::write(&table, &good).unwrap();
    // gc past the grace period frees the old packs; the images stay.
    env.ok(&["store", "gc", "--grace", "0s"]);
    assert_eq!(retired_dir_bytes(&env), 0);
    assert_eq!(env.export("os@2"), b);
    // Nothing older than a day: nothing to do.
    let report = env.json(&["store", "compact", "--older-than", "1d", "--json"]);
    assert_eq!(report["packs_compacted"], 0, "{report}");
    assert_eq!(report["packs_kept"], 1, "{report}");
}

/// gc rewriting a mostly unused compacted pack gives the new pack an id table too (its images
/// stay format 2), and retires and deletes the old pack's table with it.
#[test]
fn gc_keeps_id_tables_with_their_packs() {
    let env = Env::new();
    let big = synthetic_image(61, 3000, 0);
    let small = synthetic_image(62, 600, 0);
    env.import("big", &env.write("big.img", &big));
    env.import("small", &env.write("small.img", &small));
    env.ok(&["store", "compact", "--all"]);
    let tables = |dir: &str| -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(env.store().join(dir))
            .map(|d| {
                d.map(|e| e.unwrap().file_name().to_string_lossy().to_string())
                    .filter(|n| n.ends_with(".ids"))
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    };
    let compacted = tables("packs");
    assert_eq!(compacted.len(), 1, "one compacted pack, one table");
    // Most of the pack is `big`'s: without it, gc rewrites the pack.
    env.ok(&["image", "rm", "big"]);
    let report = env.ok(&["store", "gc"]);
    assert!(report.contains("rewrote 1 pack(s)"), "{report}");
    let now = tables("packs");
    assert_eq!(now.len(), 1, "{now:?}");
    assert_ne!(now, compacted, "the new pack has its own table");
    assert_eq!(
        tables("retired"),
        compacted,
        "the old table is retired with its pack"
    );
    let file = fs::read(env.store().join("manifests/small/1.manifest")).unwrap();
    assert_eq!(fleetboot_image::Manifest::format_of(&file), Some(2));
    assert_eq!(env.export("small"), small);
    env.ok(&["store", "verify"]);
    // Past the grace period the old pack and its table go; a table left alone by a crash too.
    let orphan = env.store().join(format!("packs/{}.ids", "ab".repeat(16)));
    fs::write(&orphan, b"left by a crash").unwrap();
    env.ok(&["store", "gc", "--grace", "0s"]);
    assert!(tables("retired").is_empty());
    assert!(!orphan.exists());
    assert_eq!(tables("packs"), now);
    assert_eq!(env.export("small"), small);
}

/// `store compact --all --level 19 --json`, started in the background.
fn spawn_compaction(env: &Env) -> std::process::Child {
    env.cmd()
        .args(["store", "compact", "--all", "--level", "19", "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits for a compaction started by `spawn_compaction` and checks it succeeded and compacted.
fn compaction_compacted(compactor: std::process::Child) {
    let out = compactor.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(report["packs_compacted"].as_u64().unwrap() >= 1, "{report}");
}

/// Compaction holds the writers' lock only to publish: imports and `rm` run beside it, and
/// what they did survives it — an image imported while the new packs were written, reusing
/// compacted data, is repointed too, and no manifest is left naming a pack it retired.
#[test]
fn imports_and_rm_beside_compaction_lose_nothing() {
    // The import must land after the pass has planned (its new pack then is not compacted); if
    // it lands before, the attempt proves nothing and is made again.
    for attempt in 0..5 {
        let env = Env::new();
        let base = synthetic_image(81, 4000, 0);
        let fast = |name: &str, file: &Path| {
            env.ok(&[
                "image",
                "import",
                name,
                file.to_str().unwrap(),
                "--level",
                "1",
                "--frame-size",
                "65536",
            ]);
        };
        fast("os", &env.write("a.img", &base));
        fast("old", &env.write("old.img", &synthetic_image(82, 500, 0)));
        let next = next_version(&base, 83, 100);
        let pnext = env.write("b.img", &next);
        let compactor = spawn_compaction(&env);
        std::thread::sleep(Duration::from_millis(50 * attempt));
        env.import("os", &pnext);
        env.ok(&["image", "rm", "old"]);
        compaction_compacted(compactor);
        assert_eq!(env.export("os@1"), base);
        assert_eq!(env.export("os@2"), next);
        assert!(env
            .fails(&["image", "export", "old", env.path("x").to_str().unwrap()])
            .contains("no image"));
        env.ok(&["store", "verify"]);
        // No manifest names a pack compaction retired: gc would have to put it back.
        let gc = env.ok(&["store", "gc", "--grace", "0s"]);
        assert!(!gc.contains("put back"), "{gc}");
        assert_eq!(env.export("os@2"), next);
        // Landed after the planning: its own new pack was not compacted, so two packs remain
        // (before: everything is compacted into one).
        let stats = env.json(&["store", "stats", "--json"]);
        if stats["pack_files"].as_u64().unwrap() >= 2 {
            return;
        }
        eprintln!("attempt {attempt}: the import landed before the pass planned; again");
    }
    panic!("no import landed while the compaction wrote its packs");
}

/// Imports an image and its next version as `os@1` and `os@2` at level 1 in 64 KiB frames (fast,
/// much for a compaction to do); returns both images.
fn two_versions_imported_fast(env: &Env, seed: u64) -> (Vec<u8>, Vec<u8>) {
    let a = synthetic_image(seed, 3000, 0);
    let b = next_version(&a, seed + 1, 300);
    for data in [&a, &b] {
        let img = env.write("x.img", data);
        env.ok(&[
            "image",
            "import",
            "os",
            img.to_str().unwrap(),
            "--level",
            "1",
            "--frame-size",
            "65536",
        ]);
    }
    (a, b)
}

/// gc runs beside a compaction, over and over: the new packs it may find before any manifest
/// names them (and retire) are put back when the pass publishes, and every image stays whole.
#[test]
fn gc_beside_compaction_loses_nothing() {
    let env = Env::new();
    let (a, b) = two_versions_imported_fast(&env, 101);
    let mut compactor = spawn_compaction(&env);
    let mut gcs = 0;
    while compactor.try_wait().unwrap().is_none() {
        env.ok(&["store", "gc"]);
        gcs += 1;
    }
    compaction_compacted(compactor);
    assert!(gcs >= 1);
    env.ok(&["store", "verify"]);
    assert_eq!(env.export("os@1"), a);
    assert_eq!(env.export("os@2"), b);
    // Nothing the images use is left in retired/: freeing everything keeps them whole.
    let gc = env.ok(&["store", "gc", "--grace", "0s"]);
    assert!(!gc.contains("put back"), "{gc}");
    assert_eq!(env.export("os@2"), b);
}

#[test]
fn kill_9_during_compaction_never_damages_the_store() {
    let env = Env::new();
    let (a, b) = two_versions_imported_fast(&env, 91);
    // Every round starts from this store, so every pass has the same work to do.
    let template = env.path("template");
    let copy = |from: &Path, to: &Path| {
        let _ = fs::remove_dir_all(to);
        assert!(Command::new("cp")
            .arg("-a")
            .arg(from)
            .arg(to)
            .status()
            .unwrap()
            .success());
    };
    copy(&env.store(), &template);
    let compact = |env: &Env| {
        env.cmd()
            .args(["store", "compact", "--all", "--level", "19"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    };
    let t = Instant::now();
    assert!(compact(&env).wait().unwrap().success());
    let full = t.elapsed();
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    eprintln!("kill test: seed {seed}, a compaction takes {full:?}");
    let mut rng = Rng(seed | 1);
    let window = full.as_micros() as u64 + 1;
    let mut killed = 0;
    for round in 0..40 {
        if killed >= 10 {
            break;
        }
        copy(&template, &env.store());
        let delay = Duration::from_micros(rng.below(window));
        let mut child = compact(&env);
        std::thread::sleep(delay);
        if child.try_wait().unwrap().is_none() {
            killed += 1;
        }
        child.kill().ok(); // SIGKILL
        child.wait().unwrap();
        let out = env.run(&["store", "verify"]);
        assert!(
            out.status.success(),
            "round {round} (seed {seed}, kill after {delay:?}): verify failed:\n{}",
            String::from_utf8_lossy(&out.stdout)
        );
        assert_eq!(env.export("os@1"), a, "round {round} (seed {seed})");
        assert_eq!(env.export("os@2"), b, "round {round} (seed {seed})");
        // No manifest names a retired pack (gc would have to put it back).
        let gc = env.ok(&["store", "gc", "--grace", "0s"]);
        assert!(
            !gc.contains("put back"),
            "round {round} (seed {seed}): {gc}"
        );
        // What a killed pass left (staged or unnamed packs) is cleared by the next pass and gc.
        assert!(compact(&env).wait().unwrap().success(), "round {round}");
        env.ok(&["store", "gc", "--grace", "0s"]);
        env.ok(&["store", "verify"]);
        assert_eq!(env.export("os@2"), b, "round {round} (seed {seed})");
    }
    assert!(
        killed >= 10,
        "only {killed} kills landed during a compaction (seed {seed})"
    );
}

/// On an appliance the configuration names the store: the store's commands use it when no
/// `--store` is given, an appliance command refuses another one, and `image rm` refuses what
/// the configuration's hosts boot (named, or the latest of a name they follow).
#[test]
fn the_configuration_names_the_store_and_guards_its_images() {
    let env = Env::new();
    let config = env.write(
        "fleetboot.yaml",
        b"interface: eth0\nstore: store\nstate_dir: state\ngroups:\n  web: { image: x@1 }\n\
          hosts:\n  \"52:54:00:00:00:01\": { image: x }\n  \"52:54:00:00:00:02\": { group: web }\n",
    );
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_fleetboot"))
            .env("FLEETBOOT_CONFIG", &config)
            .env_remove("FLEETBOOT_STORE")
            .stdin(Stdio::null())
            .args(args)
            .output()
            .expect("run fleetboot")
    };
    let ok = |args: &[&str]| {
        let out = run(args);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let fails = |args: &[&str]| {
        let out = run(args);
        assert!(!out.status.success(), "{args:?} succeeded");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let a = synthetic_image(71, 40, 0);
    let pa = env.write("a.img", &a);
    let pb = env.write("b.img", &next_version(&a, 72, 4));
    // No --store: the import lands in the store the configuration names (beside it).
    assert_eq!(
        ok(&["image", "import", "x", pa.to_str().unwrap()]).trim(),
        "x@1"
    );
    assert_eq!(
        ok(&["image", "import", "x", pb.to_str().unwrap()]).trim(),
        "x@2"
    );
    assert_eq!(env.export("x@1"), a, "in the configuration's store");
    // `check` loads it as serve would: every image is there; boot_dir lacks the boot files.
    let checked = ok(&["check"]);
    assert!(checked.contains("2 hosts, 1 groups"), "{checked}");
    assert!(
        checked.contains("warning: agent file fleetboot-vmlinuz"),
        "{checked}"
    );
    let typo = env.path("typo.yaml");
    fs::write(
        &typo,
        fs::read_to_string(&config)
            .unwrap()
            .replace("image: x }", "image: y }"),
    )
    .unwrap();
    let e = fails(&["check", "--config", typo.to_str().unwrap()]);
    assert!(
        e.contains("typo.yaml:7:") && e.contains("no image named \"y\""),
        "{e}"
    );

    // An appliance command given another store stops and says which is which; the same store
    // written another way is the same store.
    let other = env.path("other-store");
    let e = fails(&["--store", other.to_str().unwrap(), "host", "list"]);
    assert!(e.contains("but --store or FLEETBOOT_STORE names"), "{e}");
    assert!(e.contains("other-store"), "{e}");
    ok(&["--store", env.store().to_str().unwrap(), "host", "list"]);

    // x@2 is the latest of x, which host …01 follows (line 7); x@1 is its group's (line 5).
    let e = fails(&["image", "rm", "x@2"]);
    assert!(e.contains("x@2 is in use"), "{e}");
    assert!(e.contains("fleetboot.yaml:7:"), "{e}");
    let e = fails(&["image", "rm", "x"]);
    assert!(
        e.contains("fleetboot.yaml:5:") && e.contains("fleetboot.yaml:7:"),
        "{e}"
    );
    assert_eq!(env.export("x@2").len(), a.len(), "nothing was removed");
    // Once x@3 is the latest, x@2 is no host's and goes; x@1 only with --force. The import
    // says that x@3 is x@1 again.
    let again = run(&["image", "import", "x", pa.to_str().unwrap()]);
    assert_eq!(String::from_utf8_lossy(&again.stdout).trim(), "x@3");
    let said = String::from_utf8_lossy(&again.stderr);
    assert!(said.contains("x@3 holds the same content as x@1"), "{said}");
    ok(&["image", "rm", "x@2"]);
    fails(&["image", "rm", "x@1"]);
    ok(&["image", "rm", "x@1", "--force"]);
    let listed = ok(&["image", "show", "x@3"]);
    assert!(listed.contains("x@3"), "{listed}");
    fails(&["image", "show", "x@1"]);
}
