//! The appliance's HTTP side through `Router::oneshot` (no socket): iPXE scripts, the agent's
//! whole conversation, reimage, unknown hosts, boot files, the store by range, metrics.

use axum::body::Body;
use axum::http::{Request, StatusCode};
use fleetboot::config::Config;
use fleetboot::fleet::HostStatus;
use fleetboot::http::{app, AppState};
use fleetboot::store::{import::import, ImportOptions, Store};
use std::path::Path;
use std::sync::Arc;
use tempfile::TempDir;
use tower::ServiceExt;

const MAC: &str = "52:54:00:12:34:56";
const BASE: &str = "http://10.9.0.1:8080";

struct Rig {
    _dir: TempDir,
    state: Arc<AppState>,
    image: Vec<u8>,
}

fn rig(extra_yaml: &str) -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let image: Vec<u8> = (0..64 * 4096u32)
        .map(|i| (i / 4096 * 7 + i % 251) as u8)
        .collect();
    std::fs::write(root.join("demo.img"), &image).unwrap();
    let store = Store::new(root.join("store"));
    import(
        &store,
        "demo",
        &root.join("demo.img"),
        &ImportOptions::default(),
        &|_, _| {},
    )
    .unwrap();
    std::fs::create_dir_all(root.join("boot")).unwrap();
    std::fs::write(root.join("boot/fleetboot-vmlinuz"), b"0123456789").unwrap();
    std::fs::write(root.join("secret.txt"), b"top secret").unwrap();
    std::os::unix::fs::symlink(root.join("secret.txt"), root.join("boot/escape")).unwrap();
    let yaml = format!(
        "interface: lo\nhttp_port: 8080\nboot_dir: boot\nstore: store\nstate_dir: state\n\
         admin_token: s3cret\ngroups:\n  web: {{ image: demo@1 }}\nhosts:\n  \"{MAC}\": {{ group: web, hostname: web-01 }}\n{extra_yaml}"
    );
    let path = root.join("fleetboot.yaml");
    std::fs::write(&path, &yaml).unwrap();
    let config = Config::load(&path).unwrap();
    config.check_images(&store).unwrap();
    let state = AppState::new(config, BASE.into(), Some("s3cret".into())).unwrap();
    Rig {
        _dir: dir,
        state,
        image,
    }
}

async fn call(rig: &Rig, req: Request<Body>) -> (StatusCode, Vec<u8>) {
    let resp = app(rig.state.clone()).oneshot(req).await.unwrap();
    let status = resp.status();
    let body = axum::body::to_bytes(resp.into_body(), usize::MAX)
        .await
        .unwrap();
    (status, body.to_vec())
}

async fn get(rig: &Rig, uri: &str) -> (StatusCode, String) {
    let (s, b) = call(rig, Request::get(uri).body(Body::empty()).unwrap()).await;
    (s, String::from_utf8_lossy(&b).into_owned())
}

async fn post(rig: &Rig, uri: &str, token: &str, json: serde_json::Value) -> (StatusCode, String) {
    let req = Request::post(uri)
        .header("authorization", format!("Bearer {token}"))
        .header("content-type", "application/json")
        .body(Body::from(json.to_string()))
        .unwrap();
    let (s, b) = call(rig, req).await;
    (s, String::from_utf8_lossy(&b).into_owned())
}

fn token_of(script: &str) -> String {
    script
        .split_whitespace()
        .find_map(|w| w.strip_prefix("fleetboot.token="))
        .expect("the agent script carries a token")
        .to_string()
}

fn local_boot(script: &str) -> bool {
    script.contains("sanboot") && !script.contains("kernel")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_conversation_installs_then_boots_local_then_reimages() {
    let rig = rig("");
    let mac = MAC.parse().unwrap();

    let (status, script) = get(&rig, &format!("/boot/{MAC}.ipxe")).await;
    assert_eq!(status, StatusCode::OK);
    assert!(script.starts_with("#!ipxe"));
    assert!(
        script.contains(&format!("kernel {BASE}/boot/fleetboot-vmlinuz")),
        "{script}"
    );
    assert!(script.contains(&format!("fleetboot.mac={MAC}")));
    let token = token_of(&script);
    assert_eq!(
        rig.state.fleet().host(mac).unwrap().unwrap().status,
        HostStatus::Booting
    );

    // Without the token, or with another, the agent API says no.
    let (s, _) = get(&rig, &format!("/api/agent/{MAC}/assignment")).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let req = |t: &str| {
        Request::get(format!("/api/agent/{MAC}/assignment"))
            .header("authorization", format!("Bearer {t}"))
            .body(Body::empty())
            .unwrap()
    };
    assert_eq!(call(&rig, req("wrong")).await.0, StatusCode::UNAUTHORIZED);
    let (s, body) = call(&rig, req(&token)).await;
    assert_eq!(s, StatusCode::OK);
    let a: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(a["image"], "demo@1");
    assert_eq!(a["size"], rig.image.len() as u64);
    assert_eq!(a["digest"], blake3::hash(&rig.image).to_hex().as_str());
    let manifest_url = a["manifest_url"].as_str().unwrap();
    assert_eq!(
        manifest_url,
        format!("{BASE}/store/manifests/demo/1.manifest")
    );

    // The manifest and a pack, by range, exactly as the agent will fetch them.
    let path = manifest_url.strip_prefix(BASE).unwrap();
    let (s, m) = call(
        &rig,
        Request::get(path)
            .header("range", "bytes=0-7")
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(
        (s, m.as_slice()),
        (StatusCode::PARTIAL_CONTENT, &b"FBMANIFS"[..])
    );
    let (_, full) = call(&rig, Request::get(path).body(Body::empty()).unwrap()).await;
    let manifest = fleetboot_image::Manifest::decode(&full).unwrap();
    let e = manifest.entries[0];
    let pack_uri = format!("/store/packs/{}.pack", manifest.packs[e.pack as usize]);
    let range = format!(
        "bytes={}-{}",
        e.frame_offset,
        e.frame_offset + u64::from(e.frame_stored) - 1
    );
    let (s, frame) = call(
        &rig,
        Request::get(&pack_uri)
            .header("range", range)
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(s, StatusCode::PARTIAL_CONTENT);
    assert_eq!(frame.len(), e.frame_stored as usize);
    assert_eq!(
        get(&rig, "/store/packs/../fleet.sqlite").await.0,
        StatusCode::NOT_FOUND
    );

    let (s, _) = post(
        &rig,
        &format!("/api/agent/{MAC}/progress"),
        &token,
        serde_json::json!({"done": 50, "total": 200}),
    )
    .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let h = rig.state.fleet().host(mac).unwrap().unwrap();
    assert_eq!((h.status, h.progress_pct), (HostStatus::Imaging, 25));

    // A wrong digest is not taken for an install.
    let (s, _) = post(&rig, &format!("/api/agent/{MAC}/done"), &token,
        serde_json::json!({"image": "demo@1", "digest": "00", "bytes_fetched": 1, "bytes_reused": 0})).await;
    assert_eq!(s, StatusCode::CONFLICT);
    assert_eq!(
        rig.state.fleet().host(mac).unwrap().unwrap().status,
        HostStatus::Failed
    );

    // Next boot: the agent again, with a new token; this time it reports the right digest.
    let (_, script) = get(&rig, &format!("/boot/{MAC}.ipxe")).await;
    let token2 = token_of(&script);
    assert_ne!(token, token2);
    let (s, _) = post(
        &rig,
        &format!("/api/agent/{MAC}/progress"),
        &token,
        serde_json::json!({"done": 1, "total": 2}),
    )
    .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "an old token is dead");
    let digest = blake3::hash(&rig.image).to_hex().to_string();
    let (s, _) = post(&rig, &format!("/api/agent/{MAC}/done"), &token2,
        serde_json::json!({"image": "demo@1", "digest": digest, "bytes_fetched": 10, "bytes_reused": 5})).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let h = rig.state.fleet().host(mac).unwrap().unwrap();
    assert_eq!(
        (h.status, h.installed.as_deref()),
        (HostStatus::Installed, Some("demo@1"))
    );

    // Installed: the next boot goes to the local disk, and the token is gone.
    let (_, script) = get(&rig, &format!("/boot/{MAC}.ipxe")).await;
    assert!(local_boot(&script), "{script}");
    assert!(
        script.contains("iseq ${platform} efi"),
        "UEFI takes its own path: {script}"
    );
    let (s, _) = post(
        &rig,
        &format!("/api/agent/{MAC}/progress"),
        &token2,
        serde_json::json!({"done": 1, "total": 2}),
    )
    .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);

    // Reimage through the admin API: the token is required.
    let (s, _) = post(
        &rig,
        "/api/reimage",
        "nope",
        serde_json::json!({"group": "web"}),
    )
    .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let (s, body) = post(
        &rig,
        "/api/reimage",
        "s3cret",
        serde_json::json!({"group": "web"}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert!(body.contains(MAC));
    let (_, script) = get(&rig, &format!("/boot/{MAC}.ipxe")).await;
    assert!(
        script.contains("fleetboot.token="),
        "reimage requested: the agent boots again"
    );
    let (s, body) = post(
        &rig,
        "/api/reimage",
        "s3cret",
        serde_json::json!({"group": "db"}),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{body}");

    let req = Request::get("/api/hosts")
        .header("authorization", "Bearer s3cret")
        .body(Body::empty())
        .unwrap();
    let (s, body) = call(&rig, req).await;
    assert_eq!(s, StatusCode::OK);
    let hosts: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(hosts[0]["hostname"], "web-01");
    assert_eq!(hosts[0]["installed"], "demo@1");
    assert_eq!(get(&rig, "/api/hosts").await.0, StatusCode::UNAUTHORIZED);

    let (_, metrics) = get(&rig, "/metrics").await;
    assert!(
        metrics.contains("fleetboot_http_scripts_total 4"),
        "{metrics}"
    );
    assert!(
        metrics.contains("fleetboot_installs_done_total 1"),
        "{metrics}"
    );
    let (s, page) = get(&rig, "/").await;
    assert_eq!(s, StatusCode::OK);
    assert!(page.contains("web-01") && page.contains("demo@1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_hosts_follow_the_policy() {
    let rig = rig("");
    let (s, _) = get(&rig, "/boot/52:54:00:99:99:99.ipxe").await;
    assert_eq!(s, StatusCode::NOT_FOUND, "unknown_hosts defaults to ignore");

    let discover = rig_with_policy("discover");
    let (s, script) = get(&discover, "/boot/52:54:00:99:99:99.ipxe").await;
    assert_eq!(s, StatusCode::OK);
    assert!(local_boot(&script));
    let h = discover
        .state
        .fleet()
        .host("52:54:00:99:99:99".parse().unwrap())
        .unwrap()
        .unwrap();
    assert_eq!(h.status, HostStatus::Discovered);

    let install = rig_with_policy("install:demo");
    let (_, script) = get(&install, "/boot/52:54:00:99:99:99.ipxe").await;
    assert!(script.contains("fleetboot.token="), "{script}");
}

fn rig_with_policy(policy: &str) -> Rig {
    rig(&format!("unknown_hosts: {policy}\n"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boot_files_are_served_by_range_and_never_from_outside() {
    let rig = rig("");
    let (s, body) = get(&rig, "/boot/fleetboot-vmlinuz").await;
    assert_eq!((s, body.as_str()), (StatusCode::OK, "0123456789"));
    let (s, part) = call(
        &rig,
        Request::get("/boot/fleetboot-vmlinuz")
            .header("range", "bytes=2-4")
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(
        (s, part.as_slice()),
        (StatusCode::PARTIAL_CONTENT, &b"234"[..])
    );
    for bad in [
        "/boot/escape",
        "/boot/%2e%2e/secret.txt",
        "/boot/..%2fsecret.txt",
        "/boot/missing",
    ] {
        let (s, body) = get(&rig, bad).await;
        assert_eq!(s, StatusCode::NOT_FOUND, "{bad}: {body}");
        assert!(!body.contains("top secret"));
    }
}

#[test]
fn the_rig_store_is_real() {
    // Keeps the helper honest: the store the HTTP tests read was made by a real import.
    let rig = rig("");
    let out = rig._dir.path().join("out.img");
    rig.state
        .store
        .export(
            &"demo@1".parse().unwrap(),
            &out,
            Default::default(),
            &|_, _| {},
        )
        .unwrap();
    assert_eq!(std::fs::read(Path::new(&out)).unwrap(), rig.image);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn packs_are_served_whole_or_by_range_and_large_ones_streamed() {
    let rig = rig("");
    let id = "0123456789abcdef0123456789abcdef";
    let data: Vec<u8> = (0..20u32 << 20).map(|i| (i % 253) as u8).collect();
    std::fs::write(
        rig.state.store.root().join(format!("packs/{id}.pack")),
        &data,
    )
    .unwrap();
    let uri = format!("/store/packs/{id}.pack");
    let (s, body) = call(&rig, Request::get(&uri).body(Body::empty()).unwrap()).await;
    assert_eq!(s, StatusCode::OK);
    assert!(body == data, "the whole pack, streamed");
    for (range, want) in [
        ("bytes=5-9", &data[5..10]),
        ("bytes=-3", &data[data.len() - 3..]),
    ] {
        let (s, body) = call(
            &rig,
            Request::get(&uri)
                .header("range", range)
                .body(Body::empty())
                .unwrap(),
        )
        .await;
        assert_eq!(
            (s, body.as_slice()),
            (StatusCode::PARTIAL_CONTENT, want),
            "{range}"
        );
    }
    let (s, _) = call(
        &rig,
        Request::get(&uri)
            .header("range", "bytes=99999999-")
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(s, StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(
        get(&rig, "/store/packs/nothex.pack").await.0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        get(&rig, "/store/packs/ffffffffffffffffffffffffffffffff.pack")
            .await
            .0,
        StatusCode::NOT_FOUND
    );
}
