//! The store in a real distributed S3 store: three Garage nodes in network namespaces,
//! replication factor 3. Two "appliances" (two staging folders, as two machines would have)
//! share the bucket: every store command works on it as on a folder, concurrent imports never
//! take the same version, gc's retired packs stay readable, and a storage node killed mid-way
//! loses nothing.
//!
//! Needs root and the Garage binary: run by `cargo xtask s3`, which installs Garage and sets
//! `FLEETBOOT_GARAGE`; ignored by the plain test run (building Garage takes longer than CI has).

mod common;

use common::{next_version, synthetic_image};
use fleetboot_lab::garage::{garage_bin, Garage};
use fleetboot_lab::{Host, Lab};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

const STORE: &str = "s3://fleetboot/site-a";

/// A machine running fleetboot commands against the bucket, with its own staging folder.
struct Appliance<'a> {
    host: &'a Host,
    env: Vec<(&'static str, String)>,
    staging: PathBuf,
}

impl Appliance<'_> {
    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = self.host.cmd(env!("CARGO_BIN_EXE_fleetboot"));
        c.envs(self.env.iter().map(|(k, v)| (k, v)));
        c.env("FLEETBOOT_STORE", STORE)
            .env("FLEETBOOT_S3_STAGING", &self.staging)
            .args(args)
            .stdin(Stdio::null());
        c
    }
    fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).output().expect("run fleetboot")
    }
    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "fleetboot {args:?} failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
    fn export(&self, image: &str, out: &Path) -> Vec<u8> {
        let _ = std::fs::remove_file(out);
        self.ok(&[
            "image",
            "export",
            image,
            &out.to_string_lossy(),
            "--check-digest",
        ]);
        std::fs::read(out).expect("read export")
    }
}

#[test]
#[ignore = "needs Garage (FLEETBOOT_GARAGE) and root: cargo xtask s3"]
fn the_store_works_the_same_in_a_three_node_garage() {
    let bin = garage_bin().expect("FLEETBOOT_GARAGE names the garage binary");
    assert!(
        fleetboot_lab::is_root(),
        "the S3 test makes namespaces: run as root"
    );
    let dir = tempfile::tempdir().expect("temp dir");
    let mut lab = Lab::new("s3").expect("lab");
    let mut garage = Garage::start(&mut lab, &bin, 79, dir.path()).expect("garage cluster");
    let client = lab
        .host("cl", "02:00:00:79:00:10", Some("10.79.0.10/24"))
        .expect("client host");

    let a = synthetic_image(101, 3000, 100);
    let b = next_version(&a, 102, 200);
    let c = next_version(&b, 103, 200);
    let file = |name: &str, data: &[u8]| {
        let p = dir.path().join(name);
        std::fs::write(&p, data).expect("write image");
        p
    };
    let (pa, pb, pc) = (file("a.img", &a), file("b.img", &b), file("c.img", &c));
    let one = Appliance {
        host: &client,
        env: garage.env(0),
        staging: dir.path().join("staging-1"),
    };
    let two = Appliance {
        host: &client,
        env: garage.env(0),
        staging: dir.path().join("staging-2"),
    };

    // A store that is not there yet: a clear error naming it.
    let out = two.run(&["image", "list"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("s3://fleetboot/site-a"), "{err}");

    assert_eq!(
        one.ok(&["image", "import", "os", &pa.to_string_lossy()])
            .trim(),
        "os@1"
    );
    // Two importers on two machines at once: both land, under different numbers.
    let mut first = one.cmd(&["image", "import", "os", &pb.to_string_lossy()]);
    let mut second = two.cmd(&["image", "import", "os", &pc.to_string_lossy()]);
    let (first, second) = (
        first.stdout(Stdio::piped()).spawn().expect("import 1"),
        second.stdout(Stdio::piped()).spawn().expect("import 2"),
    );
    let (first, second) = (
        first.wait_with_output().expect("import 1"),
        second.wait_with_output().expect("import 2"),
    );
    assert!(first.status.success() && second.status.success());
    let (vb, vc) = (
        String::from_utf8_lossy(&first.stdout).trim().to_string(),
        String::from_utf8_lossy(&second.stdout).trim().to_string(),
    );
    let mut got = [vb.clone(), vc.clone()];
    got.sort();
    assert_eq!(
        got,
        ["os@2", "os@3"],
        "two importers took distinct versions"
    );

    // Read from the other appliance: list, show, diff, export, verify.
    let list = two.ok(&["image", "list"]);
    for v in ["@1", "@2", "@3"] {
        assert!(list.contains(v), "{list}");
    }
    assert!(two.ok(&["image", "show", "os@1"]).contains("os"));
    let diff = two.ok(&["image", "diff", "os@1", &vb]);
    assert!(!diff.trim().is_empty());
    let out = dir.path().join("out.img");
    assert!(two.export("os@1", &out) == a, "os@1 exports as imported");
    assert!(two.export(&vb, &out) == b);
    assert!(one.export(&vc, &out) == c);
    let verify = two.ok(&["store", "verify"]);
    assert!(!verify.contains("damaged"), "{verify}");

    // rm and gc: nothing os@2/os@3 use goes, and what went is kept for the grace period.
    one.ok(&["image", "rm", "os@1"]);
    let gc = one.ok(&["store", "gc"]);
    assert!(two.export(&vb, &out) == b, "after gc: {gc}");
    assert!(
        two.run(&["image", "export", "os@1", "/dev/null"])
            .status
            .code()
            != Some(0)
    );
    let verify = two.ok(&["store", "verify"]);
    assert!(!verify.contains("damaged"), "{verify}");

    // One storage node dies: reads and writes go on (replication 3, quorum 2).
    garage.kill(2);
    assert!(two.export(&vc, &out) == c, "an export with a node down");
    let d = next_version(&c, 104, 50);
    let pd = file("d.img", &d);
    assert_eq!(
        two.ok(&["image", "import", "os", &pd.to_string_lossy()])
            .trim(),
        "os@4"
    );
    assert!(one.export("os@4", &out) == d);
}
