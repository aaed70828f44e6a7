//! The agent against the real appliance (its HTTP side, in-process on loopback): a full install,
//! a reinstall that moves only what changed, a damaged pack, a disk too small.

use axum::response::IntoResponse;
use fleetboot::config::Config;
use fleetboot::fleet::HostStatus;
use fleetboot::http::{app, AppState};

use fleetboot::store::{import::import, Store};
use fleetboot_image::api::{InstallReport, REPORT_PREFIX};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;

const MAC: &str = "52:54:00:ab:cd:01";

/// A 4 MiB disk-like image: zero runs and 4 KiB blocks of varied content.
fn image(seed: u32, changed: &[usize]) -> Vec<u8> {
    let mut img = vec![0u8; 4 << 20];
    for (b, block) in img.chunks_mut(4096).enumerate() {
        if b % 3 == 2 {
            continue;
        }
        let salt = if changed.contains(&b) {
            seed + 1000
        } else {
            seed
        };
        for (i, x) in block.iter_mut().enumerate() {
            *x = ((b as u32 * 31 + i as u32 / 7 + salt) % 251) as u8;
        }
    }
    img
}

/// Runs on the store before the first pack request is answered.
type PackHook = Box<dyn FnOnce(&Store) + Send>;

/// 4 MiB that shares nothing with other seeds (xorshift).
fn random(mut x: u64) -> Vec<u8> {
    (0..4 << 20)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

struct Appliance {
    dir: tempfile::TempDir,
    url: String,
    state: Arc<AppState>,
    /// Pack requests the appliance has answered.
    pack_requests: Arc<std::sync::atomic::AtomicUsize>,
    _runtime: tokio::runtime::Runtime,
}

impl Appliance {
    /// An appliance assigning `image` to MAC, serving HTTP on 127.0.0.1.
    fn start(versions: &[Vec<u8>]) -> Appliance {
        Self::start_after(versions, std::time::Duration::ZERO)
    }

    /// The same, but listening only after `delay` (an appliance that is restarting).
    fn start_after(versions: &[Vec<u8>], delay: std::time::Duration) -> Appliance {
        Self::start_with(versions, delay, 0)
    }

    /// The same, and the first `failing` pack requests get 503 (an appliance restarting, or a
    /// proxy losing its upstream, in the middle of an install).
    fn start_with(versions: &[Vec<u8>], delay: std::time::Duration, failing: usize) -> Appliance {
        Self::start_full(versions, delay, failing, None, false)
    }

    /// The same, and `hook` runs on the store just before the first pack request is answered
    /// (an operator acting on the store while a machine installs from it); with `lose_done`
    /// the first `done` is taken but its answer lost (a 502 from a proxy in between).
    fn start_full(
        versions: &[Vec<u8>],
        delay: std::time::Duration,
        failing: usize,
        hook: Option<PackHook>,
        lose_done: bool,
    ) -> Appliance {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path().join("store"));
        for (i, v) in versions.iter().enumerate() {
            let p = dir.path().join(format!("v{i}.img"));
            std::fs::write(&p, v).unwrap();
            // Frames of 256 KiB, so a 4 MiB image has several (gc works frame by frame).
            let options = fleetboot::store::ImportOptions {
                frame_bytes: 256 << 10,
                ..Default::default()
            };
            import(&store, "os", &p, &options, &|_, _| {}).unwrap();
        }
        let runtime = tokio::runtime::Runtime::new().unwrap();
        // The port is chosen now and listened on after the delay.
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let url = format!("http://{addr}");
        let config = write_config(dir.path(), "os@1");
        let state = AppState::new(config, url.clone(), None).unwrap();
        let failures = Arc::new(std::sync::atomic::AtomicUsize::new(failing));
        let pack_requests = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = pack_requests.clone();
        let hook = Arc::new(std::sync::Mutex::new(hook));
        let hook_store = state.store.clone();
        let lose_done = Arc::new(std::sync::atomic::AtomicBool::new(lose_done));
        let router = app(state.clone()).layer(axum::middleware::from_fn(
            move |req: axum::extract::Request, next: axum::middleware::Next| {
                let lose_done = lose_done.clone();
                let failures = failures.clone();
                let hook = hook.clone();
                let hook_store = hook_store.clone();
                let counted = counted.clone();
                async move {
                    if req.uri().path().ends_with("/done")
                        && lose_done.swap(false, std::sync::atomic::Ordering::SeqCst)
                    {
                        next.run(req).await;
                        return axum::http::StatusCode::BAD_GATEWAY.into_response();
                    }
                    let pack = req.uri().path().starts_with("/store/packs/");
                    if pack {
                        counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    }
                    let run = if pack {
                        hook.lock().unwrap().take()
                    } else {
                        None
                    };
                    if let Some(run) = run {
                        run(&hook_store);
                    }
                    let fail = pack
                        && failures
                            .fetch_update(
                                std::sync::atomic::Ordering::SeqCst,
                                std::sync::atomic::Ordering::SeqCst,
                                |n| n.checked_sub(1),
                            )
                            .is_ok();
                    if fail {
                        axum::http::StatusCode::SERVICE_UNAVAILABLE.into_response()
                    } else {
                        next.run(req).await
                    }
                }
            },
        ));
        runtime.spawn(async move {
            tokio::time::sleep(delay).await;
            let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
            axum::serve(
                listener,
                router.into_make_service_with_connect_info::<std::net::SocketAddr>(),
            )
            .await
        });
        Appliance {
            dir,
            url,
            state,
            pack_requests,
            _runtime: runtime,
        }
    }

    fn assign(&self, image: &str) {
        self.assign_with(image, "");
    }

    /// Assigns `image` with more of the host's keys (`, key: value` in its flow mapping).
    fn assign_with(&self, image: &str, keys: &str) {
        *self.state.config.write().unwrap() =
            Arc::new(write_config_keys(self.dir.path(), image, keys));
    }

    fn deploy(&self, target: &Path) -> Output {
        Command::new(env!("CARGO_BIN_EXE_fleetboot-agent"))
            .args(["deploy", "--server", &self.url, "--mac", MAC, "--target"])
            .arg(target)
            .output()
            .unwrap()
    }

    fn status(&self) -> (HostStatus, Option<String>, Option<String>) {
        let h = self
            .state
            .fleet()
            .host(MAC.parse().unwrap())
            .unwrap()
            .unwrap();
        (h.status, h.installed.map(|i| i.to_string()), h.detail)
    }
}

fn write_config(dir: &Path, image: &str) -> Config {
    write_config_keys(dir, image, "")
}

fn write_config_keys(dir: &Path, image: &str, keys: &str) -> Config {
    let path = dir.join("fleetboot.yaml");
    std::fs::write(
        &path,
        format!("interface: lo\nstore: store\nstate_dir: state\nboot_dir: .\nhosts:\n  \"{MAC}\": {{ image: {image}{keys} }}\n"),
    )
    .unwrap();
    Config::load(&path).unwrap()
}

/// The agent's install report (its JSON line on stdout).
fn report(out: &Output) -> InstallReport {
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix(REPORT_PREFIX))
        .unwrap_or_else(|| panic!("no report in {text:?}"));
    serde_json::from_str(line).unwrap()
}

#[test]
fn installs_then_reinstalls_moving_only_what_changed() {
    let v1 = image(1, &[]);
    let v2 = image(1, &[10, 11, 500, 700]);
    let app = Appliance::start(&[v1.clone(), v2.clone()]);
    let target: PathBuf = app.dir.path().join("disk.img");

    let out = app.deploy(&target);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        std::fs::read(&target).unwrap(),
        v1,
        "the disk reads back identical to os@1"
    );
    assert_eq!(app.status().0, HostStatus::Installed);
    assert_eq!(app.status().1.as_deref(), Some("os@1"));
    assert_eq!(
        report(&out).seed.as_deref(),
        Some("none: the image has no partition table"),
        "a bare image gets no seed, and the report says so"
    );

    // Installed: nothing more to do until the assignment changes.
    assert!(!app.deploy(&target).status.success());

    app.assign("os@2");
    let out = app.deploy(&target);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        std::fs::read(&target).unwrap(),
        v2,
        "the disk reads back identical to os@2"
    );
    let r = report(&out);
    assert!(
        r.bytes_reused > 20 * r.bytes_fetched,
        "fetched {}, reused {}",
        r.bytes_fetched,
        r.bytes_reused
    );
    assert_eq!(r.image.to_string(), "os@2");
    assert_eq!(r.digest, r.image.digest);
    assert_eq!(app.status().1.as_deref(), Some("os@2"));

    // Each install's console log reached the appliance, one per install, newest first.
    let mac = MAC.parse().unwrap();
    let installs = app.state.logs.list(mac);
    assert_eq!(installs.len(), 2, "{installs:?}");
    let (_, text) = app.state.logs.read(mac, None).unwrap().unwrap();
    let text = String::from_utf8_lossy(&text);
    assert!(text.contains("installing os@2"), "{text}");
    assert!(text.contains("os@2 verified on"), "{text}");
    let (_, first) = app
        .state
        .logs
        .read(mac, Some(&installs[1].instance))
        .unwrap()
        .unwrap();
    assert!(String::from_utf8_lossy(&first).contains("installing os@1"));
}

/// Issue 8, item 1: host has os@1; os@2 is assigned; its install fails half-way (a damaged
/// pack); os@1 is assigned again. The disk is half-overwritten: the next boot must run the agent
/// (not boot the disk as if it held os@1), and that install must make it os@1 again.
/// `store_url`: the agent fetches manifests and packs from a copy of the store folder served
/// by another HTTP server (here tower-http's file service, as a mirror or cache would), and
/// none from the appliance; the install is verified all the same.
#[test]
fn packs_come_from_the_store_url_mirror() {
    let v1 = image(3, &[]);
    let app = Appliance::start(std::slice::from_ref(&v1));
    let mirror_requests = use_mirror(&app, &app.dir.path().join("store"));
    installs_with_packs_from_the_mirror(&app, &v1);
    assert!(
        mirror_requests.load(std::sync::atomic::Ordering::SeqCst) >= 2,
        "the manifest and packs came from the mirror"
    );
}

/// Installs `image` (assigned to the machine) and checks it: checked chunk by chunk (the
/// manifest hashed to what the appliance said), every pack from the mirror, none from the
/// appliance.
fn installs_with_packs_from_the_mirror(app: &Appliance, image: &[u8]) {
    let target = app.dir.path().join("disk.img");
    let out = app.deploy(&target);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        !stderr.contains("not the one the appliance read"),
        "the manifest is the one the appliance read: checked chunk by chunk\n{stderr}"
    );
    assert_eq!(std::fs::read(&target).unwrap(), image);
    assert_eq!(app.status().0, HostStatus::Installed);
    assert_eq!(
        app.pack_requests.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "no pack from the appliance"
    );
}

/// Issue 13: after `store compact` the manifests are format 2, which a mirror of the store's
/// files cannot expand: the agent gets its manifest, expanded, from the appliance (tied to it by
/// its hash, so checked chunk by chunk) and still every pack from the mirror.
#[test]
fn a_compacted_store_installs_through_a_mirror_of_its_files() {
    let v1 = text(41);
    let app = Appliance::start(std::slice::from_ref(&v1));
    let compacted = app
        .state
        .store
        .compact(&fleetboot::store::CompactOptions::default())
        .unwrap();
    assert_eq!(compacted.manifests_rewritten, 1, "{compacted:?}");
    let store_dir = app.dir.path().join("store");
    let stored = std::fs::read(store_dir.join("manifests/os/1.manifest")).unwrap();
    assert_eq!(fleetboot_image::Manifest::format_of(&stored), Some(2));
    let mirror_requests = use_mirror(&app, &store_dir);
    installs_with_packs_from_the_mirror(&app, &v1);
    assert!(
        mirror_requests.load(std::sync::atomic::Ordering::SeqCst) >= 1,
        "the packs came from the mirror"
    );
}

/// Serves `store_dir` over HTTP (tower-http's file service, as a mirror or cache would) and
/// points the appliance's `store_url` at it; counts the mirror's requests.
fn use_mirror(app: &Appliance, store_dir: &Path) -> Arc<std::sync::atomic::AtomicUsize> {
    let mirror_requests = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = mirror_requests.clone();
    let store_dir = store_dir.to_path_buf();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mirror = format!("http://{}/copy-of-store", listener.local_addr().unwrap());
    listener.set_nonblocking(true).unwrap();
    app._runtime.spawn(async move {
        let files = axum::Router::new()
            .nest_service(
                "/copy-of-store",
                tower_http::services::ServeDir::new(store_dir),
            )
            .layer(axum::middleware::from_fn(
                move |req: axum::extract::Request, next: axum::middleware::Next| {
                    counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    next.run(req)
                },
            ));
        let listener = tokio::net::TcpListener::from_std(listener).unwrap();
        axum::serve(listener, files).await
    });
    let path = app.dir.path().join("fleetboot.yaml");
    let yaml = std::fs::read_to_string(&path).unwrap() + &format!("store_url: {mirror}/\n");
    std::fs::write(&path, yaml).unwrap();
    *app.state.config.write().unwrap() = Arc::new(Config::load(&path).unwrap());
    mirror_requests
}

/// A mirror whose manifest of os@2 is os@1's map under os@2's name and digest (it decodes, and
/// its own checksum is right): the agent cannot tie it to the appliance, so it checks the whole
/// image's digest as read back, and the install fails instead of reporting os@1's bytes as os@2.
#[test]
fn a_manifest_the_appliance_did_not_read_is_checked_by_the_whole_images_digest() {
    let (v1, v2) = (image(21, &[]), image(21, &[3, 400]));
    let app = Appliance::start(&[v1.clone(), v2]);
    let store = app.dir.path().join("store");
    let copy = app.dir.path().join("mirror");
    let status = std::process::Command::new("cp")
        .arg("-a")
        .arg(&store)
        .arg(&copy)
        .status()
        .unwrap();
    assert!(status.success());
    let read = |v: u32| {
        let bytes = std::fs::read(store.join(format!("manifests/os/{v}.manifest"))).unwrap();
        fleetboot_image::Manifest::decode(&bytes).unwrap()
    };
    let (m1, m2) = (read(1), read(2));
    let mut forged = m1.clone();
    forged.meta = m2.meta.clone();
    std::fs::write(copy.join("manifests/os/2.manifest"), forged.encode()).unwrap();

    app.assign("os@2");
    use_mirror(&app, &copy);
    let target = app.dir.path().join("disk.img");
    let out = app.deploy(&target);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("not the one the appliance read")
            && stderr.contains("reads back with BLAKE3"),
        "{stderr}"
    );
    // It wrote what the forgery named, and then, the read-back failing, took the boot area away:
    // a disk that is not the image boots nothing.
    let disk = std::fs::read(&target).unwrap();
    assert!(
        disk[1 << 20..] == v1[1 << 20..],
        "it wrote what the forgery named"
    );
    assert!(v1[..1 << 20].iter().any(|&b| b != 0));
    assert!(disk[..1 << 20].iter().all(|&b| b == 0), "no boot area");
    assert_ne!(app.status().0, HostStatus::Installed);
}

#[test]
fn a_failed_install_leaves_the_disk_unknown_until_a_verified_install() {
    // Content that shares nothing, so os@2 has packs of its own to damage.
    let (v1, v2) = (random(11), random(12));
    let app = Appliance::start(&[v1.clone(), v2.clone()]);
    let target = app.dir.path().join("disk.img");
    assert!(app.deploy(&target).status.success());
    assert_eq!(app.status().1.as_deref(), Some("os@1"));

    // Damage the packs os@2 alone uses (the second import's), then install os@2.
    let m2 = app
        .state
        .store
        .manifest(&"os@2".parse().unwrap())
        .unwrap()
        .1;
    let m1 = app
        .state
        .store
        .manifest(&"os@1".parse().unwrap())
        .unwrap()
        .1;
    let own: Vec<_> = m2.packs.iter().filter(|p| !m1.packs.contains(p)).collect();
    assert!(!own.is_empty());
    for p in own {
        let path = app.state.store.pack_path(p);
        let mut bytes = std::fs::read(&path).unwrap();
        let at = bytes.len() * 3 / 4;
        bytes[at] ^= 0xff;
        std::fs::write(&path, bytes).unwrap();
    }
    app.assign("os@2");
    let out = app.deploy(&target);
    assert!(!out.status.success(), "the install of os@2 failed");
    let (status, installed, _) = app.status();
    assert_eq!((status, installed), (HostStatus::Failed, None));

    app.assign("os@1");
    let out = app.deploy(&target);
    assert!(
        out.status.success(),
        "the next boot ran the agent again: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::read(&target).unwrap(), v1);
    assert_eq!(app.status().1.as_deref(), Some("os@1"));
    assert!(
        report(&out).bytes_reused > 0,
        "what was still intact on the disk was reused"
    );
}

/// Issue 8, item 12: the operator removes the old version and runs gc while a machine installs
/// the new one. gc rewrites the pack both versions shared (the new image's manifest now names a
/// new pack), but the agent holds the manifest from before gc and asks for the old pack: it must
/// still be served, and the install finish. Once gc deletes it, serve must let go of its handle.
#[test]
fn gc_during_an_install_neither_breaks_it_nor_keeps_deleted_packs_open() {
    // os@2 keeps the first quarter of os@1: with os@1 gone, its pack is mostly unused.
    let v1 = random(21);
    let mut v2 = random(22);
    v2[..1 << 20].copy_from_slice(&v1[..1 << 20]);
    let gc_report = Arc::new(std::sync::Mutex::new(None));
    let gc_done = gc_report.clone();
    let hook: PackHook = Box::new(move |store: &Store| {
        store.remove(&"os@1".parse().unwrap()).unwrap();
        *gc_done.lock().unwrap() = Some(store.gc().unwrap());
    });
    let app = Appliance::start_full(
        &[v1.clone(), v2.clone()],
        std::time::Duration::ZERO,
        0,
        Some(hook),
        false,
    );
    app.assign("os@2");
    let packs_before = app.state.store.packs().unwrap();
    let target = app.dir.path().join("disk.img");
    let out = app.deploy(&target);
    let gc = gc_report
        .lock()
        .unwrap()
        .take()
        .expect("gc ran during the install");
    assert!(
        gc.packs_rewritten >= 1,
        "gc rewrote the pack the install was reading: {gc:?}"
    );
    assert!(
        out.status.success(),
        "the install that began before gc finished: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::read(&target).unwrap(), v2);
    assert_eq!(app.status().1.as_deref(), Some("os@2"));
    assert!(app
        .state
        .store
        .packs()
        .unwrap()
        .iter()
        .any(|p| !packs_before.contains(p)));

    // The agent read a retired pack: serve holds it open. Past its grace period gc deletes it,
    // and serve closes it, so the space is freed.
    let open_before = app.state.packs.open_count();
    let freed = app
        .state
        .store
        .gc_with_grace(std::time::Duration::ZERO)
        .unwrap();
    assert!(freed.retired_deleted >= 1, "{freed:?}");
    assert!(app.state.store.retired_packs().unwrap().is_empty());
    assert!(
        deleted_packs_held_open() >= 1,
        "the handle pinned the space"
    );
    assert!(app.state.packs.drop_deleted() >= 1);
    assert_eq!(deleted_packs_held_open(), 0);
    assert!(app.state.packs.open_count() < open_before);
    assert!(app.state.store.verify().unwrap().ok());
}

/// 4 MiB of text-like bytes (compressible, unlike [`random`]): configuration lines with numbers.
fn text(mut x: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 << 20);
    let mut line = 0u64;
    while out.len() < 4 << 20 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(format!("key{line}=value{}\n", x % 100_000).as_bytes());
        line += 1;
    }
    out.truncate(4 << 20);
    out
}

/// Issue 13: the operator compacts the store while a machine installs. The agent holds the
/// manifest from before and asks for the old packs, which compaction retired: they are still
/// served, and the install finishes; the image then names only the new packs.
#[test]
fn compaction_during_an_install_does_not_break_it() {
    let v1 = text(31);
    let mut v2 = text(32);
    v2[..1 << 20].copy_from_slice(&v1[..1 << 20]);
    let report = Arc::new(std::sync::Mutex::new(None));
    let done = report.clone();
    let hook: PackHook = Box::new(move |store: &Store| {
        let options = fleetboot::store::CompactOptions::default();
        *done.lock().unwrap() = Some(store.compact(&options).unwrap());
    });
    let app = Appliance::start_full(
        &[v1.clone(), v2.clone()],
        std::time::Duration::ZERO,
        0,
        Some(hook),
        false,
    );
    app.assign("os@2");
    let packs_before = app.state.store.packs().unwrap();
    let target = app.dir.path().join("disk.img");
    let out = app.deploy(&target);
    let compacted = report
        .lock()
        .unwrap()
        .take()
        .expect("compaction ran during the install");
    assert!(
        compacted.packs_compacted >= 1 && compacted.manifests_rewritten == 2,
        "{compacted:?}"
    );
    assert!(
        out.status.success(),
        "the install that began before compaction finished: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::read(&target).unwrap(), v2);
    assert_eq!(app.status().1.as_deref(), Some("os@2"));
    let packs_after = app.state.store.packs().unwrap();
    assert!(packs_after.iter().all(|p| !packs_before.contains(p)));
    assert!(app.state.store.verify().unwrap().ok());
}

/// Open file descriptors of this process on deleted pack files.
fn deleted_packs_held_open() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|t| {
            let t = t.to_string_lossy();
            t.contains(".pack") && t.ends_with("(deleted)")
        })
        .count()
}

#[test]
fn the_agent_waits_for_an_appliance_that_is_not_up_yet() {
    let v1 = image(3, &[]);
    let app = Appliance::start_after(
        std::slice::from_ref(&v1),
        std::time::Duration::from_millis(1500),
    );
    let target = app.dir.path().join("disk.img");
    let out = app.deploy(&target);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("retrying"),
        "the first attempts failed and were retried: {err}"
    );
    assert_eq!(std::fs::read(&target).unwrap(), v1);
    assert_eq!(app.status().0, HostStatus::Installed);
}

/// The answer to `done` is lost after the appliance took it: the retry, with the token `done`
/// voided, is answered as the first was, so the agent ends as installed instead of stopping.
#[test]
fn a_done_whose_answer_is_lost_is_not_taken_for_a_failure() {
    let v1 = image(6, &[]);
    let app = Appliance::start_full(
        std::slice::from_ref(&v1),
        std::time::Duration::ZERO,
        0,
        None,
        true,
    );
    let target = app.dir.path().join("disk.img");
    let out = app.deploy(&target);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("502"), "the first answer was lost: {err}");
    assert_eq!(std::fs::read(&target).unwrap(), v1);
    assert_eq!(app.status().0, HostStatus::Installed);
}

#[test]
fn pack_requests_failing_mid_install_are_retried() {
    let v1 = image(4, &[]);
    let app = Appliance::start_with(std::slice::from_ref(&v1), std::time::Duration::ZERO, 3);
    let target = app.dir.path().join("disk.img");
    let out = app.deploy(&target);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert_eq!(
        err.matches("503").count(),
        3,
        "three failed requests, each retried: {err}"
    );
    assert_eq!(std::fs::read(&target).unwrap(), v1);
    assert_eq!(app.status().0, HostStatus::Installed);
}

#[test]
fn a_damaged_pack_fails_the_install_and_says_why() {
    let v1 = image(5, &[]);
    let app = Appliance::start(std::slice::from_ref(&v1));
    let packs = app.dir.path().join("store/packs");
    let pack = std::fs::read_dir(&packs)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let mut bytes = std::fs::read(&pack).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&pack, bytes).unwrap();
    let target = app.dir.path().join("disk.img");
    let out = app.deploy(&target);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("damaged") || err.contains("decompress"),
        "{err}"
    );
    let (status, installed, detail) = app.status();
    assert_eq!((status, installed), (HostStatus::Failed, None));
    assert!(detail.unwrap_or_default().contains("writing the image"));
    // The failed install keeps its log, the reason in it.
    let (_, log) = app
        .state
        .logs
        .read(MAC.parse().unwrap(), None)
        .unwrap()
        .unwrap();
    let log = String::from_utf8_lossy(&log);
    assert!(log.contains("installing os@1"), "{log}");
    assert!(
        log.contains("FAILED:") && log.contains("writing the image"),
        "{log}"
    );
}

/// A loop device over `backing`, detached when dropped; `None` (with a SKIP line) without root.
struct Loop(String);

impl Loop {
    fn attach(backing: &Path, test: &str) -> Option<Loop> {
        let is_root = Command::new("id")
            .arg("-u")
            .output()
            .map(|o| o.stdout == b"0\n")
            .unwrap_or(false);
        if !is_root {
            eprintln!("SKIP {test}: needs root for a loop device (CI runs as root)");
            return None;
        }
        let out = Command::new("losetup")
            .args(["-f", "--show"])
            .arg(backing)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "losetup: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Some(Loop(
            String::from_utf8(out.stdout).unwrap().trim().to_string(),
        ))
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

#[test]
fn a_disk_too_small_is_refused() {
    let v1 = image(7, &[]);
    let app = Appliance::start(std::slice::from_ref(&v1));
    let backing = app.dir.path().join("small.bin");
    std::fs::write(&backing, vec![0u8; 1 << 20]).unwrap();
    let Some(dev) = Loop::attach(&backing, "a_disk_too_small_is_refused") else {
        return;
    };
    let result = app.deploy(Path::new(&dev.0));
    drop(dev);
    assert!(!result.status.success());
    let err = String::from_utf8_lossy(&result.stderr);
    assert!(err.contains("too small"), "{err}");
    assert_eq!(app.status().0, HostStatus::Failed);
    assert_eq!(
        std::fs::read(&backing).unwrap(),
        vec![0u8; 1 << 20],
        "nothing was written"
    );
}

/// A 4 MiB GPT disk image (sfdisk): one Linux partition from 1 MiB, its first 2 MiB filled with
/// `random(seed)`.
fn gpt_image(seed: u64) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gpt.img");
    std::fs::File::create(&path)
        .unwrap()
        .set_len(4 << 20)
        .unwrap();
    let mut sfdisk = Command::new("sfdisk")
        .args(["-q", "--no-reread", "--no-tell-kernel"])
        .arg(&path)
        .stdin(std::process::Stdio::piped())
        .spawn()
        .expect("sfdisk (cargo xtask setup installs fdisk)");
    std::io::Write::write_all(&mut sfdisk.stdin.take().unwrap(), b"label: gpt\n,,L\n").unwrap();
    assert!(sfdisk.wait().unwrap().success());
    let mut img = std::fs::read(&path).unwrap();
    img[1 << 20..3 << 20].copy_from_slice(&random(seed)[..2 << 20]);
    img
}

/// A file of the seed's FAT filesystem, read by mtools.
fn mtype(disk: &Path, offset: u64, name: &str) -> String {
    let out = Command::new("mtype")
        .arg("-i")
        .arg(format!("{}@@{offset}", disk.display()))
        .arg(format!("::{name}"))
        .output()
        .expect("mtools (cargo xtask setup installs it)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The seed's byte offset, from sfdisk's reading of the table (which must verify clean).
fn cidata_offset(disk: &Path) -> u64 {
    let verify = Command::new("sfdisk")
        .arg("--verify")
        .arg(disk)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&verify.stdout).to_string()
        + &String::from_utf8_lossy(&verify.stderr);
    assert!(
        verify.status.success()
            && text.contains("No errors detected")
            && !text.contains("mismatch"),
        "{text}"
    );
    let json = Command::new("sfdisk")
        .arg("--json")
        .arg(disk)
        .output()
        .unwrap();
    let table: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    let parts = table["partitiontable"]["partitions"].as_array().unwrap();
    assert_eq!(parts.len(), 2, "{table}");
    assert_eq!(parts[1]["name"], "cidata");
    parts[1]["start"].as_u64().unwrap() * 512
}

/// Issue 9: after the image is written and verified, the agent adds the host's NoCloud seed —
/// its hostname, keys and user data from the YAML, an instance-id new at each install — as a
/// `cidata` partition, the GPT's backup moved to the disk's end. A reimage writes a new one.
#[test]
fn the_installed_os_gets_its_identity_on_a_cidata_partition() {
    let v1 = gpt_image(31);
    let mut v2 = v1.clone();
    v2[(2 << 20) + 5] ^= 0x5a;
    let app = Appliance::start(&[v1.clone(), v2.clone()]);
    let keys = ", hostname: \"web-{mac}\", ssh_authorized_keys: [\"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAI ops@example\"], user_data: \"#cloud-config\\nruncmd: [[touch, /run/fleetboot-was-here]]\\n\"";
    app.assign_with("os@1", keys);
    let target = app.dir.path().join("disk.img");
    std::fs::File::create(&target)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();

    let mut instance_ids = Vec::new();
    let mut fetched = 0;
    for (version, image) in [("os@1", &v1), ("os@2", &v2)] {
        app.assign_with(version, keys);
        let out = app.deploy(&target);
        fetched = report(&out).bytes_fetched;
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let said = report(&out).seed.unwrap_or_default();
        assert!(
            said.contains("cidata partition") && said.contains("GPT backup moved"),
            "{said}"
        );
        let disk = std::fs::read(&target).unwrap();
        assert_eq!(
            &disk[1 << 20..3 << 20],
            &image[1 << 20..3 << 20],
            "the OS's partition is the image's"
        );
        let offset = cidata_offset(&target);
        assert!(offset >= 4 << 20, "the seed lies past the image");
        let meta: serde_json::Value =
            serde_json::from_str(&mtype(&target, offset, "meta-data")).unwrap();
        let record = app
            .state
            .fleet()
            .host(MAC.parse().unwrap())
            .unwrap()
            .unwrap();
        assert_eq!(
            Some(meta["instance-id"].as_str().unwrap()),
            record.instance_id.as_deref()
        );
        assert_eq!(meta["local-hostname"], "web-525400abcd01");
        assert_eq!(
            meta["public-keys"][0],
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAI ops@example"
        );
        assert_eq!(
            mtype(&target, offset, "user-data"),
            "#cloud-config\nruncmd: [[touch, /run/fleetboot-was-here]]\n"
        );
        assert!(mtype(&target, offset, "network-config").contains("52:54:00:ab:cd:01"));
        instance_ids.push(meta["instance-id"].as_str().unwrap().to_string());
    }
    assert_ne!(
        instance_ids[0], instance_ids[1],
        "cloud-init runs again after a reimage"
    );

    // `cloud_init: off`: nothing past the image, and the image's own table untouched.
    let off = app.dir.path().join("off.img");
    std::fs::File::create(&off)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    app.assign_with("os@1", ", cloud_init: off");
    let out = app.deploy(&off);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(report(&out).seed, None);
    let disk = std::fs::read(&off).unwrap();
    assert_eq!(&disk[..4 << 20], &v1[..]);
    assert!(disk[4 << 20..].iter().all(|&b| b == 0));

    // The seed never spoils reuse: the reimage to os@2 over the seeded disk fetched exactly what
    // it fetches over the bare image (the seed's record of the table it changed put it back).
    app.assign_with("os@2", ", cloud_init: off");
    let out = app.deploy(&off);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let unseeded = report(&out).bytes_fetched;
    assert_eq!(
        fetched, unseeded,
        "fetched over the seeded disk vs over the bare one"
    );
}

/// Issue 9: a partitioned image filling its disk leaves no room for the seed: the install fails
/// with the reason, the host is not installed, and the partition table is the image's, whole.
#[test]
fn a_disk_without_room_for_the_seed_fails_the_install() {
    let v1 = gpt_image(41);
    let app = Appliance::start(std::slice::from_ref(&v1));
    app.assign_with("os@1", ", hostname: full");
    let target = app.dir.path().join("disk.img");
    let out = app.deploy(&target);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no room for the cloud-init seed"), "{err}");
    let (status, installed, detail) = app.status();
    assert_eq!((status, installed), (HostStatus::Failed, None));
    assert!(detail.unwrap_or_default().contains("no room"));
    assert_eq!(
        std::fs::read(&target).unwrap(),
        v1,
        "the image's table, untouched"
    );
}

/// `unknown_hosts: discover`: an unknown machine is handed the agent in inspection mode, reports
/// what it is (here: this very machine, through the real agent binary), and boots its own disk
/// from then on; its token ends with the report.
#[test]
fn an_unknown_machine_is_inspected_then_boots_its_disk() {
    let app = Appliance::start(&[image(7, &[])]);
    let path = app.dir.path().join("fleetboot.yaml");
    std::fs::write(
        &path,
        format!(
            "interface: lo\nstore: store\nstate_dir: state\nboot_dir: .\nunknown_hosts: discover\n\
             hosts:\n  \"{MAC}\": {{ image: os@1 }}\n"
        ),
    )
    .unwrap();
    *app.state.config.write().unwrap() = Arc::new(Config::load(&path).unwrap());
    let unknown = "52:54:00:ab:cd:99";
    // DHCP gave it this address (a made-up MAC with no lease gets no inspection token).
    app.state
        .note_address(unknown.parse().unwrap(), "127.0.0.1".parse().unwrap());
    let script_url = format!("{}/boot/{unknown}.ipxe", app.url);
    let fetch = |url: &str| {
        let out = Command::new("curl").args(["-sf", url]).output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let script = fetch(&script_url);
    assert!(script.contains("fleetboot.mode=inspect"), "{script}");
    let token = script
        .split_whitespace()
        .find_map(|w| w.strip_prefix("fleetboot.token="))
        .expect("an inspection token")
        .to_string();

    let out = Command::new(env!("CARGO_BIN_EXE_fleetboot-agent"))
        .args([
            "inspect", "--server", &app.url, "--mac", unknown, "--token", &token,
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mac = unknown.parse().unwrap();
    let (json, _) = app.state.fleet().inventory(mac).unwrap().expect("kept");
    let inv: fleetboot_image::api::Inventory = serde_json::from_str(&json).unwrap();
    // What this machine has, read independently.
    let cpus = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap()
        .lines()
        .filter(|l| l.starts_with("processor"))
        .count() as u32;
    assert_eq!(inv.cpus, cpus);
    assert!(inv.memory_bytes > 0);
    let vda = std::path::Path::new("/sys/block/vda/size");
    if vda.exists() {
        let sectors: u64 = std::fs::read_to_string(vda)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let d = inv
            .disks
            .iter()
            .find(|d| d.name == "vda")
            .expect("vda listed");
        assert_eq!(d.size_bytes, sectors * 512);
    }
    assert!(inv.disks.iter().all(|d| !d.name.starts_with("loop")));
    let h = app.state.fleet().host(mac).unwrap().unwrap();
    assert_eq!(
        (h.status, h.detail.as_deref()),
        (HostStatus::Discovered, Some("inspected"))
    );

    // Inspected: its disk from now on, and the token is void.
    let script = fetch(&script_url);
    assert!(script.contains("sanboot"), "{script}");
    let again = Command::new(env!("CARGO_BIN_EXE_fleetboot-agent"))
        .args([
            "inspect", "--server", &app.url, "--mac", unknown, "--token", &token,
        ])
        .output()
        .unwrap();
    assert!(!again.status.success(), "a spent token is refused");
}

/// A retired machine's disk, as its agent wipes it: a real block device (a loop device, which
/// supports discard but not a secure one). The secure wipe is refused with the reason and
/// changes nothing; the quick one discards, zeroes the edges and checks them.
#[test]
fn a_disk_is_wiped_quick_or_refused_secure() {
    let dir = tempfile::tempdir().unwrap();
    let backing = dir.path().join("disk.bin");
    let pattern: Vec<u8> = (0..64u32 << 20).map(|i| (i % 253) as u8 | 1).collect();
    std::fs::write(&backing, &pattern).unwrap();
    let Some(dev) = Loop::attach(&backing, "a_disk_is_wiped_quick_or_refused_secure") else {
        return;
    };
    let wipe = |extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_fleetboot-agent"))
            .args(["wipe", "--target", &dev.0])
            .args(extra)
            .output()
            .unwrap()
    };
    let secure = wipe(&["--secure"]);
    let untouched = std::fs::read(&backing).unwrap() == pattern;
    let quick = wipe(&[]);
    drop(dev);
    assert!(!secure.status.success());
    let why = String::from_utf8_lossy(&secure.stderr);
    assert!(why.contains("no secure erase"), "{why}");
    assert!(untouched, "a refused secure wipe changes nothing");
    assert!(
        quick.status.success(),
        "{}",
        String::from_utf8_lossy(&quick.stderr)
    );
    let said = String::from_utf8_lossy(&quick.stdout);
    assert!(said.contains("discard + zeroed"), "{said}");
    let data = std::fs::read(&backing).unwrap();
    assert_eq!(data.len(), pattern.len());
    assert!(data[..16 << 20].iter().all(|&b| b == 0), "the first 16 MiB");
    assert!(
        data[data.len() - (16 << 20)..].iter().all(|&b| b == 0),
        "the last 16 MiB"
    );
}
