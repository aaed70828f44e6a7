//! The appliance's HTTP side through `Router::oneshot` (no socket): iPXE scripts, the agent's
//! whole conversation, reimage, unknown hosts, boot files, the store by range, metrics.

use axum::body::Body;
use axum::extract::connect_info::MockConnectInfo;
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
    rig_yaml("groups:\n  web: { image: demo@1 }\n", extra_yaml)
}

fn rig_yaml(groups: &str, extra_yaml: &str) -> Rig {
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
         admin_token: s3cret\n{groups}hosts:\n  \"{MAC}\": {{ group: web, hostname: web-01 }}\n{extra_yaml}"
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

/// The address the host under test fetches from (DHCP gave it this one).
const HOST_IP: &str = "10.9.0.50";
/// Another machine on the same network.
const NEIGHBOUR_IP: &str = "10.9.0.66";

async fn call(rig: &Rig, req: Request<Body>) -> (StatusCode, Vec<u8>) {
    call_from(rig, HOST_IP, req).await
}

async fn call_from(rig: &Rig, ip: &str, req: Request<Body>) -> (StatusCode, Vec<u8>) {
    let peer: std::net::SocketAddr = format!("{ip}:40000").parse().unwrap();
    let resp = app(rig.state.clone())
        .layer(MockConnectInfo(peer))
        .oneshot(req)
        .await
        .unwrap();
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
    assert_eq!(a["image"]["name"], "demo");
    assert_eq!(a["image"]["version"], 1);
    assert_eq!(a["size"], rig.image.len() as u64);
    let digest = blake3::hash(&rig.image).to_hex().to_string();
    assert_eq!(a["image"]["digest"], digest.as_str());
    let image = a["image"].clone();
    let manifest_url = a["manifest_url"].as_str().unwrap();
    assert_eq!(
        manifest_url,
        format!("{BASE}/store/manifests/demo/1.manifest")
    );

    // The manifest and a pack, by range, exactly as the agent will fetch them.
    let path = manifest_url.strip_prefix(BASE).unwrap();
    let with_token = |uri: &str| {
        Request::get(uri)
            .header("authorization", format!("Bearer {token}"))
            .body(Body::empty())
            .unwrap()
    };
    let (s, m) = call(
        &rig,
        Request::get(path)
            .header("range", "bytes=0-7")
            .header("authorization", format!("Bearer {token}"))
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(
        (s, m.as_slice()),
        (StatusCode::PARTIAL_CONTENT, &b"FBMANIFS"[..])
    );
    assert_eq!(
        get(&rig, path).await.0,
        StatusCode::UNAUTHORIZED,
        "the store is not served without a token"
    );
    let (_, full) = call(&rig, with_token(path)).await;
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
            .header("authorization", format!("Bearer {token}"))
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(s, StatusCode::PARTIAL_CONTENT);
    assert_eq!(get(&rig, &pack_uri).await.0, StatusCode::UNAUTHORIZED);
    assert_eq!(frame.len(), e.frame_stored as usize);
    assert_eq!(
        call(&rig, with_token("/store/packs/../fleet.sqlite"))
            .await
            .0,
        StatusCode::NOT_FOUND
    );

    // The install's console log: appended by offset with the token, read with the admin token.
    let log = |offset: u64, text: &'static str, token: &str| {
        Request::post(format!("/api/agent/{MAC}/log?offset={offset}"))
            .header("authorization", format!("Bearer {token}"))
            .body(Body::from(text))
            .unwrap()
    };
    let (s, body) = call(&rig, log(0, "line one\n", &token)).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(String::from_utf8_lossy(&body), r#"{"length":9}"#);
    let (s, body) = call(&rig, log(30, "lost\n", &token)).await;
    assert_eq!(s, StatusCode::CONFLICT, "a gap: resend from what is held");
    assert_eq!(String::from_utf8_lossy(&body), r#"{"length":9}"#);
    assert_eq!(
        call(&rig, log(9, "x\n", "nope")).await.0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        call(&rig, log(9, "line two\n", &token)).await.0,
        StatusCode::OK
    );
    let read = |auth: &str| {
        Request::get(format!("/api/hosts/{MAC}/log"))
            .header("authorization", format!("Bearer {auth}"))
            .body(Body::empty())
            .unwrap()
    };
    assert_eq!(call(&rig, read(&token)).await.0, StatusCode::UNAUTHORIZED);
    let (s, body) = call(&rig, read("s3cret")).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(String::from_utf8_lossy(&body), "line one\nline two\n");
    // A browser (the dashboard links here) is asked for the token, and may give it by Basic auth.
    let resp = app(rig.state.clone())
        .oneshot(
            Request::get(format!("/api/hosts/{MAC}/log"))
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    assert!(resp.headers()["www-authenticate"]
        .to_str()
        .unwrap()
        .starts_with("Basic"));
    let basic = Request::get(format!("/api/hosts/{MAC}/log"))
        .header("authorization", "Basic YWRtaW46czNjcmV0") // admin:s3cret
        .body(Body::empty())
        .unwrap();
    let (s, body) = call(&rig, basic).await;
    assert_eq!((s, body.len()), (StatusCode::OK, 18));
    let (_, page) = get(&rig, "/").await;
    assert!(
        page.contains(&format!("href=\"/api/hosts/{MAC}/log\"")),
        "{page}"
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
    let report = |digest: &str| {
        serde_json::json!({"image": image, "target": "/dev/vda", "digest": digest,
            "bytes_fetched": 10, "bytes_reused": 5, "seconds": 1.0})
    };
    let (s, _) = post(
        &rig,
        &format!("/api/agent/{MAC}/done"),
        &token,
        report("00"),
    )
    .await;
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
    let (s, _) = post(
        &rig,
        &format!("/api/agent/{MAC}/done"),
        &token2,
        report(&digest),
    )
    .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let h = rig.state.fleet().host(mac).unwrap().unwrap();
    assert_eq!(
        (h.status, h.installed.map(|i| i.to_string())),
        (HostStatus::Installed, Some("demo@1".into()))
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

    // Power through the admin API: the token is required, a host must be named, and a host
    // without a BMC gets its own answer (tests/bmc.rs drives real BMCs).
    let power = serde_json::json!({"macs": [MAC], "action": "status"});
    let (s, _) = post(&rig, "/api/power", "nope", power.clone()).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let (s, body) = post(&rig, "/api/power", "s3cret", power).await;
    assert_eq!(s, StatusCode::OK, "{body}");
    let answers: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(answers[0]["mac"], MAC);
    assert_eq!(answers[0]["ok"], false);
    assert!(
        answers[0]["error"].as_str().unwrap().contains("no bmc"),
        "{body}"
    );
    let (s, body) = post(
        &rig,
        "/api/power",
        "s3cret",
        serde_json::json!({"action": "off"}),
    )
    .await;
    assert_eq!(
        s,
        StatusCode::BAD_REQUEST,
        "no host named: nothing done ({body})"
    );

    let req = Request::get("/api/hosts")
        .header("authorization", "Bearer s3cret")
        .body(Body::empty())
        .unwrap();
    let (s, body) = call(&rig, req).await;
    assert_eq!(s, StatusCode::OK);
    let hosts: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(hosts[0]["hostname"], "web-01");
    assert_eq!(
        hosts[0]["installed"],
        serde_json::Value::Null,
        "the reimage's agent holds a token: the disk is unknown until it reports done"
    );
    assert_eq!(hosts[0]["status"], "booting");
    assert_eq!(hosts[0]["pending"], true);
    assert_eq!(hosts[0]["target"]["digest"], digest.as_str());
    assert_eq!(hosts[0]["report"]["bytes_fetched"], 10);
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

    // Discover: a made-up MAC asking over HTTP (no DHCP lease) gets no token; a machine DHCP
    // gave an address is inspected first (a token, inspect mode), then boots its disk.
    let discover = rig_with_policy("discover");
    let (_, script) = get(&discover, "/boot/52:54:00:99:99:99.ipxe").await;
    assert!(
        local_boot(&script),
        "no lease, no inspection token\n{script}"
    );
    discover.state.note_address(
        "52:54:00:99:99:99".parse().unwrap(),
        HOST_IP.parse().unwrap(),
    );
    let (s, script) = get(&discover, "/boot/52:54:00:99:99:99.ipxe").await;
    assert_eq!(s, StatusCode::OK);
    assert!(script.contains("fleetboot.mode=inspect"), "{script}");
    let status = || {
        discover
            .state
            .fleet()
            .host("52:54:00:99:99:99".parse().unwrap())
            .unwrap()
            .unwrap()
            .status
    };
    assert_eq!(status(), HostStatus::Inspecting);
    let token = token_of(&script);
    let inventory = serde_json::json!({
        "system": {"vendor": "QEMU", "product": "Standard PC"},
        "cpus": 2, "memory_bytes": 1073741824, "disks": [], "nics": []
    });
    let uri = "/api/agent/52:54:00:99:99:99/inventory";
    let (s, _) = post(&discover, uri, "nope", inventory.clone()).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    // An inspection's token reads no store and fetches no install's assignment.
    let with = |uri: &str| {
        Request::get(uri)
            .header("authorization", format!("Bearer {token}"))
            .body(Body::empty())
            .unwrap()
    };
    let manifests = discover.state.store.root().join("manifests/demo");
    let manifest = std::fs::read_dir(&manifests)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .file_name();
    let uri_m = format!("/store/manifests/demo/{}", manifest.to_string_lossy());
    assert_eq!(
        call(&discover, with(&uri_m)).await.0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        call(&discover, with("/api/agent/52:54:00:99:99:99/assignment"))
            .await
            .0,
        StatusCode::UNAUTHORIZED
    );
    let (s, body) = post(&discover, uri, &token, inventory.clone()).await;
    assert_eq!(s, StatusCode::NO_CONTENT, "{body}");
    assert_eq!(status(), HostStatus::Discovered);
    let (_, script) = get(&discover, "/boot/52:54:00:99:99:99.ipxe").await;
    assert!(local_boot(&script), "inspected: its own disk now\n{script}");
    let (_, page) = get(&discover, "/").await;
    assert!(
        page.contains("QEMU Standard PC, 2 CPUs, 1 GiB, 0 disks"),
        "the dashboard shows what the discovered machine is"
    );
    // The admin API serves the inventory, and the line that enrols the machine.
    let detail = |auth: &str| {
        Request::get("/api/hosts/52:54:00:99:99:99")
            .header("authorization", format!("Bearer {auth}"))
            .body(Body::empty())
            .unwrap()
    };
    assert_eq!(
        call(&discover, detail("nope")).await.0,
        StatusCode::UNAUTHORIZED
    );
    let (s, body) = call(&discover, detail("s3cret")).await;
    assert_eq!(s, StatusCode::OK);
    let d: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(d["inventory"]["system"]["product"], "Standard PC");
    assert!(d["enrol"].as_str().unwrap().contains("52:54:00:99:99:99"));
    let (s, _) = post(&discover, uri, &token, inventory).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "the inspection token is spent");

    // Rules: an inspected machine that matches one is installed with its image at its next
    // boot; one that matches none boots its disk.
    // The rule's group asks for Secure Boot: DHCP names the shim once the machine is
    // inspected (before, it has no group: the defaults, iPXE).
    let ruled = rig_with_group(
        "{ image: demo@1, secure_boot: true }",
        "unknown_hosts: discover\nrules:\n  - { match: { product: \"Rack Server 9000\", \
         memory: \">=1G\", cpus: \">=2\" }, group: web }\n",
    );
    let mut dhcp = fleetboot::dhcp::DhcpServer::new(
        ruled.state.clone(),
        "10.9.0.1".parse().unwrap(),
        "255.255.255.0".parse().unwrap(),
    )
    .unwrap();
    let mut uefi_boot_file = |mac: &str| -> String {
        use dhcproto::{Decodable, Decoder, Encodable, Encoder};
        let mac: fleetboot::mac::Mac = mac.parse().unwrap();
        let mut m = dhcproto::v4::Message::default();
        m.set_chaddr(&mac.0);
        m.opts_mut().insert(dhcproto::v4::DhcpOption::MessageType(
            dhcproto::v4::MessageType::Discover,
        ));
        m.opts_mut()
            .insert(dhcproto::v4::DhcpOption::ClassIdentifier(
                b"PXEClient:Arch:00007:UNDI:003016".to_vec(),
            ));
        let mut bytes = Vec::new();
        m.encode(&mut Encoder::new(&mut bytes)).unwrap();
        // 93: UEFI x86-64.
        let end = bytes.len() - 1;
        bytes.splice(end..end, [93u8, 2, 0, 7]);
        let reply = dhcp
            .handle(&bytes, "0.0.0.0:68".parse().unwrap(), false)
            .expect("a proxy offer");
        let offer = dhcproto::v4::Message::decode(&mut Decoder::new(&reply.bytes)).unwrap();
        String::from_utf8_lossy(offer.fname().unwrap_or_default())
            .trim_end_matches('\0')
            .to_string()
    };
    for (mac, product, installs) in [
        ("52:54:00:99:99:01", "Rack Server 9000", true),
        ("52:54:00:99:99:02", "Desktop 1", false),
    ] {
        ruled
            .state
            .note_address(mac.parse().unwrap(), HOST_IP.parse().unwrap());
        let uri = format!("/boot/{mac}.ipxe");
        assert_eq!(uefi_boot_file(mac), "ipxe.efi", "not inspected yet");
        let (_, script) = get(&ruled, &uri).await;
        assert!(script.contains("fleetboot.mode=inspect"), "{script}");
        let inventory = serde_json::json!({
            "system": {"vendor": "Fleetboot Lab", "product": product},
            "cpus": 2, "memory_bytes": 2u64 << 30, "disks": [], "nics": []
        });
        let (s, body) = post(
            &ruled,
            &format!("/api/agent/{mac}/inventory"),
            &token_of(&script),
            inventory,
        )
        .await;
        assert_eq!(s, StatusCode::NO_CONTENT, "{body}");
        let (_, script) = get(&ruled, &uri).await;
        let shim = if installs { "shimx64.efi" } else { "ipxe.efi" };
        assert_eq!(uefi_boot_file(mac), shim, "{product}");
        if installs {
            assert!(
                script.contains("fleetboot.token=") && !script.contains("mode=inspect"),
                "{script}"
            );
            let req = Request::get(format!("/api/agent/{mac}/assignment"))
                .header("authorization", format!("Bearer {}", token_of(&script)))
                .body(Body::empty())
                .unwrap();
            let (s, body) = call(&ruled, req).await;
            assert_eq!(s, StatusCode::OK);
            let a: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(a["image"]["name"], "demo", "the rule's group's image");
        } else {
            assert!(local_boot(&script), "no rule matches: its disk\n{script}");
        }
    }

    let install = rig_with_policy("install:demo");
    let (_, script) = get(&install, "/boot/52:54:00:99:99:99.ipxe").await;
    assert!(script.contains("fleetboot.token="), "{script}");
}

fn rig_with_policy(policy: &str) -> Rig {
    rig(&format!("unknown_hosts: {policy}\n"))
}

/// [`rig`] whose group `web` is `group` (YAML flow mapping) instead of `{ image: demo@1 }`.
fn rig_with_group(group: &str, extra_yaml: &str) -> Rig {
    rig_yaml(&format!("groups:\n  web: {group}\n"), extra_yaml)
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
    // `store_access: open` (an HTTP cache in front): no token needed.
    let rig = rig("store_access: open\n");
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

/// Issue 8, item 5: fetching the script again while the agent installs (a firmware retry, a
/// power cut, anyone) hands out the same token and leaves the install running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_script_fetch_during_an_install_does_not_disturb_it() {
    let rig = rig("");
    let mac = MAC.parse().unwrap();
    let (_, script) = get(&rig, &format!("/boot/{MAC}.ipxe")).await;
    let token = token_of(&script);
    let (s, _) = post(
        &rig,
        &format!("/api/agent/{MAC}/progress"),
        &token,
        serde_json::json!({"done": 100, "total": 200}),
    )
    .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (_, again) = get(&rig, &format!("/boot/{MAC}.ipxe")).await;
    assert_eq!(token_of(&again), token, "the same install, the same token");
    let h = rig.state.fleet().host(mac).unwrap().unwrap();
    assert_eq!(
        (h.status, h.progress_pct),
        (HostStatus::Imaging, 50),
        "progress is not reset"
    );
    let (s, _) = post(
        &rig,
        &format!("/api/agent/{MAC}/progress"),
        &token,
        serde_json::json!({"done": 150, "total": 200}),
    )
    .await;
    assert_eq!(
        s,
        StatusCode::NO_CONTENT,
        "the running agent's token still works"
    );

    // No DHCP has told the appliance this host's address (dhcp off, or a restart): another
    // machine asking for the script is refused by the running install's address, so it can
    // neither void that token nor report the install done.
    let (s, body) = call_from(
        &rig,
        NEIGHBOUR_IP,
        Request::get(format!("/boot/{MAC}.ipxe"))
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    let body = String::from_utf8_lossy(&body);
    assert_eq!(s, StatusCode::FORBIDDEN, "{body}");
    assert!(!body.contains("token="), "{body}");
    let (s, _) = post(
        &rig,
        &format!("/api/agent/{MAC}/progress"),
        &token,
        serde_json::json!({"done": 160, "total": 200}),
    )
    .await;
    assert_eq!(s, StatusCode::NO_CONTENT, "the install's token is intact");

    // A reimage asked for since the install began: the next fetch starts afresh (a new token),
    // and the request is fulfilled by that start, not kept for yet another install.
    rig.state.fleet().request_reimage(&[mac]).unwrap();
    let (_, fresh) = get(&rig, &format!("/boot/{MAC}.ipxe")).await;
    assert_ne!(token_of(&fresh), token, "a new install, a new token");
    assert!(!rig.state.fleet().host(mac).unwrap().unwrap().reimage);
}

/// Issue 8, items 6 and 7: a machine other than the one DHCP gave the address to gets no token,
/// cannot use one, and cannot read the store; the admin token can.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_neighbour_gets_no_token_and_cannot_use_one() {
    let rig = rig("");
    let mac = MAC.parse().unwrap();
    rig.state.note_address(mac, HOST_IP.parse().unwrap());
    let script_req = || {
        Request::get(format!("/boot/{MAC}.ipxe"))
            .body(Body::empty())
            .unwrap()
    };
    let (s, body) = call_from(&rig, NEIGHBOUR_IP, script_req()).await;
    let body = String::from_utf8_lossy(&body);
    assert_eq!(s, StatusCode::FORBIDDEN, "{body}");
    assert!(!body.contains("token="), "{body}");
    assert!(
        rig.state
            .fleet()
            .host(mac)
            .unwrap()
            .is_none_or(|h| h.token.is_none()),
        "no install was started"
    );

    let (s, body) = call(&rig, script_req()).await;
    assert_eq!(s, StatusCode::OK);
    let token = token_of(&String::from_utf8_lossy(&body));
    let digest = blake3::hash(&rig.image).to_hex().to_string();
    let done = serde_json::json!({
        "image": {"name": "demo", "version": 1, "digest": digest},
        "target": "/dev/vda", "digest": digest,
        "bytes_fetched": 0, "bytes_reused": 0, "seconds": 0.1});
    let post_from = |ip: &'static str, uri: String, token: String, json: serde_json::Value| {
        let rig = &rig;
        async move {
            let req = Request::post(uri)
                .header("authorization", format!("Bearer {token}"))
                .header("content-type", "application/json")
                .body(Body::from(json.to_string()))
                .unwrap();
            call_from(rig, ip, req).await.0
        }
    };
    // The stolen token, used from the neighbour: refused, and the host is not marked installed.
    let s = post_from(
        NEIGHBOUR_IP,
        format!("/api/agent/{MAC}/done"),
        token.clone(),
        done.clone(),
    )
    .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert_eq!(
        rig.state.fleet().host(mac).unwrap().unwrap().installed,
        None
    );
    let manifest = "/store/manifests/demo/1.manifest";
    let read = |ip: &'static str, token: &str| {
        let req = Request::get(manifest)
            .header("authorization", format!("Bearer {token}"))
            .body(Body::empty())
            .unwrap();
        let rig = &rig;
        async move { call_from(rig, ip, req).await.0 }
    };
    assert_eq!(read(NEIGHBOUR_IP, &token).await, StatusCode::UNAUTHORIZED);
    assert_eq!(
        read(NEIGHBOUR_IP, "s3cret").await,
        StatusCode::OK,
        "admin token"
    );
    assert_eq!(read(HOST_IP, &token).await, StatusCode::OK);

    // From its own address the agent's calls work.
    let s = post_from(
        HOST_IP,
        format!("/api/agent/{MAC}/done"),
        token.clone(),
        done,
    )
    .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    assert_eq!(
        read(HOST_IP, &token).await,
        StatusCode::UNAUTHORIZED,
        "an install that ended voids its token"
    );
}

/// Issue 8, item 2 at the boot decision: an image removed and its name imported again with
/// other content gets a new version, and a host that installed the old one reinstalls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_is_current_only_if_its_disk_holds_the_assigned_content() {
    let rig = rig("");
    let mac = MAC.parse().unwrap();
    let (_, script) = get(&rig, &format!("/boot/{MAC}.ipxe")).await;
    let token = token_of(&script);
    let digest = blake3::hash(&rig.image).to_hex().to_string();
    let done = serde_json::json!({
        "image": {"name": "demo", "version": 1, "digest": digest},
        "target": "/dev/vda", "digest": digest,
        "bytes_fetched": 0, "bytes_reused": 0, "seconds": 0.1});
    let (s, _) = post(&rig, &format!("/api/agent/{MAC}/done"), &token, done).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    assert!(local_boot(&get(&rig, &format!("/boot/{MAC}.ipxe")).await.1));

    // rm demo@1, import other content under the same name: it is demo@2, never demo@1 again.
    let store = &rig.state.store;
    store.remove(&"demo@1".parse().unwrap()).unwrap();
    let other = rig._dir.path().join("other.img");
    std::fs::write(&other, vec![7u8; 64 * 4096]).unwrap();
    let r = import(store, "demo", &other, &ImportOptions::default(), &|_, _| {}).unwrap();
    assert_eq!(r.image.to_string(), "demo@2");
    // The group names demo@1, which is gone; assign plain `demo` (the latest).
    let path = rig.state.config().path.clone();
    let yaml = std::fs::read_to_string(&path)
        .unwrap()
        .replace("demo@1", "demo");
    std::fs::write(&path, yaml).unwrap();
    *rig.state.config.write().unwrap() = Arc::new(Config::load(&path).unwrap());
    let (_, script) = get(&rig, &format!("/boot/{MAC}.ipxe")).await;
    assert!(
        script.contains("fleetboot.token="),
        "new content: the agent installs it"
    );
    let h = rig.state.fleet().host(mac).unwrap().unwrap();
    assert_eq!(h.assigned.map(|a| a.to_string()), Some("demo@2".into()));
}

/// Issue 8, item 9: connections are limited, and one that stalls (half a header) is closed after
/// the idle timeout, freeing its slot for a real client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_connections_are_bounded_and_closed() {
    use fleetboot::http::limits::HttpLimits;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::time::{timeout, Duration};
    let rig = rig("");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let limits = HttpLimits {
        connections_max: 2,
        idle_timeout: Duration::from_millis(700),
        buffered_bytes_max: 1 << 20,
    };
    let router = app(rig.state.clone());
    tokio::spawn(async move {
        fleetboot::http::serve_router(listener, router, &limits, std::future::pending()).await
    });
    let mut stalled = Vec::new();
    for _ in 0..2 {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        stalled.push(s);
    }
    let mut real = tokio::net::TcpStream::connect(addr).await.unwrap();
    real.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 1 << 16];
    assert!(
        timeout(Duration::from_millis(300), real.read(&mut buf))
            .await
            .is_err(),
        "both slots are taken: the third connection waits"
    );
    for s in &mut stalled {
        let n = timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .expect("a stalled connection is closed")
            .unwrap_or(0);
        let answer = String::from_utf8_lossy(&buf[..n]);
        assert!(!answer.contains("200 OK"), "{answer}");
    }
    let mut answer = Vec::new();
    timeout(Duration::from_secs(5), real.read_to_end(&mut answer))
        .await
        .expect("then the real client is served")
        .unwrap();
    assert!(String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 200"));
}

/// Issue 9: each host's NoCloud-net data (meta-data, user-data, network-config) carries its own
/// identity, goes only to its address (user data may hold secrets) or the admin token, and its
/// instance-id changes with every install so cloud-init runs again after a reimage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_host_gets_its_own_cloud_init_data_at_its_address_only() {
    const DB: &str = "52:54:00:12:34:57";
    const DB_IP: &str = "10.9.0.57";
    let rig = rig(&format!(
        "  \"{DB}\": {{ image: demo@1, hostname: db-01, ssh_authorized_keys: [\"ssh-ed25519 AAAAC3 ops@example\"], \
         user_data: \"#cloud-config\\nruncmd: [[touch, /db]]\\n\", \
         network: {{ address: 10.9.0.57/24, gateway: 10.9.0.1, dns: [10.9.0.1] }} }}\n"
    ));
    rig.state
        .note_address(DB.parse().unwrap(), DB_IP.parse().unwrap());
    rig.state
        .note_address(MAC.parse().unwrap(), HOST_IP.parse().unwrap());
    let fetch = |ip: &'static str, doc: &str, admin: bool| {
        let mut req = Request::get(format!("/meta/{DB}/{doc}"));
        if admin {
            req = req.header("authorization", "Bearer s3cret");
        }
        let req = req.body(Body::empty()).unwrap();
        let rig = &rig;
        async move {
            let (s, b) = call_from(rig, ip, req).await;
            (s, String::from_utf8_lossy(&b).into_owned())
        }
    };
    let yaml = |text: &str| -> serde_json::Value { serde_saphyr::from_str(text).unwrap() };

    let (s, meta) = fetch(DB_IP, "meta-data", false).await;
    assert_eq!(s, StatusCode::OK, "{meta}");
    let meta = yaml(&meta);
    assert_eq!(meta["local-hostname"], "db-01");
    assert_eq!(meta["public-keys"][0], "ssh-ed25519 AAAAC3 ops@example");
    assert_eq!(
        meta["instance-id"], "fleetboot-525400123457",
        "never installed yet"
    );
    let (_, user) = fetch(DB_IP, "user-data", false).await;
    assert_eq!(user, "#cloud-config\nruncmd: [[touch, /db]]\n");
    let (_, net) = fetch(DB_IP, "network-config", false).await;
    let net = yaml(&net);
    assert_eq!(net["ethernets"]["nic0"]["addresses"][0], "10.9.0.57/24");
    assert_eq!(net["ethernets"]["nic0"]["match"]["macaddress"], DB);

    // Another host, the neighbour, anyone else: refused, and no secret in the answer.
    for ip in [HOST_IP, NEIGHBOUR_IP] {
        let (s, body) = fetch(ip, "user-data", false).await;
        assert_eq!(s, StatusCode::FORBIDDEN, "{ip}: {body}");
        assert!(!body.contains("runcmd"), "{body}");
    }
    let (s, _) = fetch(NEIGHBOUR_IP, "user-data", true).await;
    assert_eq!(s, StatusCode::OK, "the admin token reads any host's data");
    // The address moves to another machine (DB's lease expired, a neighbour got it): DB's data
    // does not follow it.
    rig.state
        .note_address("52:54:00:77:77:77".parse().unwrap(), DB_IP.parse().unwrap());
    let (s, body) = fetch(DB_IP, "user-data", false).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{body}");
    rig.state
        .note_address(DB.parse().unwrap(), DB_IP.parse().unwrap());
    let (s, _) = call_from(
        &rig,
        HOST_IP,
        Request::get("/meta/52:54:00:99:99:99/meta-data")
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    // The first host: no identity keys, so DHCP and its configured hostname.
    let (s, b) = call_from(
        &rig,
        HOST_IP,
        Request::get(format!("/meta/{MAC}/network-config"))
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(
        yaml(&String::from_utf8_lossy(&b))["ethernets"]["nic0"]["dhcp4"],
        true
    );

    // Every install gets a new instance-id.
    let install = || async {
        let req = Request::get(format!("/boot/{DB}.ipxe"))
            .body(Body::empty())
            .unwrap();
        let (s, body) = call_from(&rig, DB_IP, req).await;
        assert_eq!(s, StatusCode::OK);
        token_of(&String::from_utf8_lossy(&body))
    };
    let token = install().await;
    let first = yaml(&fetch(DB_IP, "meta-data", false).await.1)["instance-id"].clone();
    assert_ne!(first, "fleetboot-525400123457");
    let failed = Request::post(format!("/api/agent/{DB}/failed"))
        .header("authorization", format!("Bearer {token}"))
        .header("content-type", "application/json")
        .body(Body::from(r#"{"reason":"test"}"#))
        .unwrap();
    assert!(call_from(&rig, DB_IP, failed).await.0.is_success());
    install().await;
    let second = yaml(&fetch(DB_IP, "meta-data", false).await.1)["instance-id"].clone();
    assert_ne!(first, second, "a new install, a new instance");
}

/// `host retire` through the admin API: the next boot wipes (the agent in wipe mode, a token);
/// once the agent reports the disks wiped the host is retired and boots nothing, even with an
/// image assigned, until a reimage is requested.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retired_host_is_wiped_then_boots_nothing_until_reimaged() {
    let rig = rig("");
    let script_uri = format!("/boot/{MAC}.ipxe");
    let (s, _) = post(
        &rig,
        "/api/retire",
        "nope",
        serde_json::json!({"macs": [MAC]}),
    )
    .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let (s, body) = post(
        &rig,
        "/api/retire",
        "s3cret",
        serde_json::json!({"macs": [MAC]}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    let (_, script) = get(&rig, &script_uri).await;
    assert!(
        script.contains("fleetboot.mode=wipe") && !script.contains("fleetboot.wipe=secure"),
        "{script}"
    );
    let status = || {
        rig.state
            .fleet()
            .host(MAC.parse().unwrap())
            .unwrap()
            .unwrap()
    };
    assert_eq!(status().status, HostStatus::Wiping);
    let report = serde_json::json!({"disks": [{"name": "vda", "bytes": 1048576, "how": "zeroed"}]});
    let uri = format!("/api/agent/{MAC}/wiped");
    let assignment = Request::get(format!("/api/agent/{MAC}/assignment"))
        .header("authorization", format!("Bearer {}", token_of(&script)))
        .body(Body::empty())
        .unwrap();
    assert_eq!(
        call(&rig, assignment).await.0,
        StatusCode::UNAUTHORIZED,
        "a wipe's token fetches no install"
    );
    let (s, _) = post(&rig, &uri, "nope", report.clone()).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let (s, body) = post(&rig, &uri, &token_of(&script), report).await;
    assert_eq!(s, StatusCode::NO_CONTENT, "{body}");
    let h = status();
    assert_eq!(h.status, HostStatus::Retired);
    assert!(h
        .detail
        .unwrap_or_default()
        .contains("vda 1048576 bytes zeroed"));
    let (_, script) = get(&rig, &script_uri).await;
    assert!(
        local_boot(&script),
        "retired: nothing is installed\n{script}"
    );

    let (s, _) = post(
        &rig,
        "/api/reimage",
        "s3cret",
        serde_json::json!({"macs": [MAC]}),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let (_, script) = get(&rig, &script_uri).await;
    assert!(
        script.contains("fleetboot.token=") && !script.contains("fleetboot.mode"),
        "a reimage installs it again\n{script}"
    );
}

/// A raw HTTP/1.1 client for the socket tests: writes `request`, reads answers one by one.
struct RawClient {
    stream: tokio::net::TcpStream,
    buf: Vec<u8>,
}

/// One answer: status, head (lower-cased), body.
struct Answer {
    status: u16,
    head: String,
    body: Vec<u8>,
}

impl RawClient {
    async fn connect(addr: std::net::SocketAddr) -> RawClient {
        RawClient {
            stream: tokio::net::TcpStream::connect(addr).await.unwrap(),
            buf: Vec::new(),
        }
    }

    async fn send(&mut self, request: &str) {
        use tokio::io::AsyncWriteExt;
        self.stream.write_all(request.as_bytes()).await.unwrap();
    }

    /// The next answer (`head_only`: to a HEAD request, no body follows); `None` when the
    /// connection closed before a whole answer.
    async fn answer(&mut self, head_only: bool) -> Option<Answer> {
        use tokio::io::AsyncReadExt;
        let end = loop {
            if let Some(p) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break p + 4;
            }
            let mut chunk = vec![0u8; 1 << 16];
            let n = self.stream.read(&mut chunk).await.unwrap_or(0);
            if n == 0 {
                return None;
            }
            self.buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&self.buf[..end]).to_lowercase();
        let status: u16 = head.split_whitespace().nth(1)?.parse().ok()?;
        let len: usize = if head_only {
            0
        } else {
            head.lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map_or(0, |v| v.trim().parse().unwrap())
        };
        while self.buf.len() < end + len {
            let mut chunk = vec![0u8; 1 << 20];
            let n = self.stream.read(&mut chunk).await.unwrap_or(0);
            if n == 0 {
                return None;
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
        let body = self.buf[end..end + len].to_vec();
        self.buf.drain(..end + len);
        Some(Answer { status, head, body })
    }
}

/// The appliance's own connection loop (pack ranges by sendfile) on a loopback socket.
async fn serve_on_loopback(
    rig: &Rig,
    limits: fleetboot::http::limits::HttpLimits,
) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let state = rig.state.clone();
    tokio::spawn(async move {
        fleetboot::http::serve_limited(listener, state, &limits, std::future::pending()).await
    });
    addr
}

fn write_pack(rig: &Rig, id: &str, mib: u32) -> Vec<u8> {
    let data: Vec<u8> = (0..mib << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(
        rig.state.store.root().join(format!("packs/{id}.pack")),
        &data,
    )
    .unwrap();
    data
}

/// Issue 14: on a real connection, pack ranges (sent by sendfile) come back exact, pipelined
/// and kept alive, with the same answers as the router's; a request for anything else on the
/// same connection is handed to hyper.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pack_ranges_are_sent_from_the_file_on_a_kept_alive_connection() {
    let rig = rig("store_access: open\n");
    let id = "00112233445566778899aabbccddeeff";
    let data = write_pack(&rig, id, 20);
    let addr = serve_on_loopback(&rig, Default::default()).await;
    let path = format!("/store/packs/{id}.pack");
    let mut c = RawClient::connect(addr).await;
    // Three requests in one write (pipelined): answered in order.
    c.send(&format!(
        "GET {path} HTTP/1.1\r\nHost: x\r\nRange: bytes=5-9\r\n\r\n\
         GET {path} HTTP/1.1\r\nHost: x\r\nRange: bytes=-3\r\n\r\n\
         GET {path} HTTP/1.1\r\nHost: x\r\n\r\n"
    ))
    .await;
    let a = c.answer(false).await.expect("an answer");
    assert_eq!((a.status, a.body.as_slice()), (206, &data[5..10]));
    assert!(a
        .head
        .contains(&format!("content-range: bytes 5-9/{}", data.len())));
    let a = c.answer(false).await.expect("an answer");
    assert_eq!(
        (a.status, a.body.as_slice()),
        (206, &data[data.len() - 3..])
    );
    let a = c.answer(false).await.expect("an answer");
    assert_eq!(a.status, 200);
    assert!(a.body == data, "the whole pack");
    // A 1 MiB range, as agents fetch them.
    c.send(&format!(
        "GET {path} HTTP/1.1\r\nHost: x\r\nRange: bytes=1048576-2097151\r\n\r\n"
    ))
    .await;
    let a = c.answer(false).await.expect("an answer");
    assert!(a.status == 206 && a.body == data[1 << 20..2 << 20]);
    // HEAD, an unsatisfiable range, an unknown pack: answered, the connection kept.
    c.send(&format!("HEAD {path} HTTP/1.1\r\nHost: x\r\n\r\n"))
        .await;
    let a = c.answer(true).await.expect("an answer");
    assert!(a.status == 200 && a.head.contains(&format!("content-length: {}", data.len())));
    c.send(&format!(
        "GET {path} HTTP/1.1\r\nHost: x\r\nRange: bytes=99999999-\r\n\r\n"
    ))
    .await;
    let a = c.answer(false).await.expect("an answer");
    assert!(
        a.status == 416
            && a.head
                .contains(&format!("content-range: bytes */{}", data.len()))
    );
    c.send("GET /store/packs/ffffffffffffffffffffffffffffffff.pack HTTP/1.1\r\nHost: x\r\n\r\n")
        .await;
    assert_eq!(c.answer(false).await.expect("an answer").status, 404);
    // Then something else: hyper and the router take the connection over.
    c.send("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let a = c.answer(false).await.expect("an answer");
    assert_eq!(a.status, 200);
    assert!(String::from_utf8_lossy(&a.body).contains("fleetboot_"));
    // And a pack range after that, through the router's handler: the same bytes.
    c.send(&format!(
        "GET {path} HTTP/1.1\r\nHost: x\r\nRange: bytes=5-9\r\nConnection: close\r\n\r\n"
    ))
    .await;
    let a = c.answer(false).await.expect("an answer");
    assert_eq!((a.status, a.body.as_slice()), (206, &data[5..10]));
    assert!(c.answer(false).await.is_none(), "closed as asked");
}

/// Issue 14: the sendfile path keeps the store's access rule: without a token, no pack.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sendfile_path_asks_for_a_token() {
    let rig = rig("");
    let id = "00112233445566778899aabbccddeef0";
    let data = write_pack(&rig, id, 1);
    let addr = serve_on_loopback(&rig, Default::default()).await;
    let mut c = RawClient::connect(addr).await;
    let path = format!("/store/packs/{id}.pack");
    c.send(&format!(
        "GET {path} HTTP/1.1\r\nHost: x\r\nRange: bytes=0-99\r\n\r\n"
    ))
    .await;
    let a = c.answer(false).await.expect("an answer");
    assert_eq!(a.status, 401);
    assert!(!a.body.windows(16).any(|w| w == &data[..16]));
    c.send(&format!(
        "GET {path} HTTP/1.1\r\nHost: x\r\nRange: bytes=0-99\r\nAuthorization: Bearer wrong\r\n\r\n"
    ))
    .await;
    assert_eq!(c.answer(false).await.expect("an answer").status, 401);
    c.send(&format!(
        "GET {path} HTTP/1.1\r\nHost: x\r\nRange: bytes=0-99\r\nAuthorization: Bearer s3cret\r\n\r\n"
    ))
    .await;
    let a = c.answer(false).await.expect("an answer");
    assert_eq!((a.status, a.body.as_slice()), (206, &data[..100]));
}

/// Issue 14: a pack removed by gc while open is still served whole; one truncated under the
/// server ends its answer short and closes that connection only; a client that stops reading
/// is dropped after the idle timeout, holding no buffer meanwhile, while others are served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removed_truncated_and_stalled_cases_break_nothing() {
    use tokio::time::{timeout, Duration};
    let rig = rig("store_access: open\n");
    let addr = serve_on_loopback(
        &rig,
        fleetboot::http::limits::HttpLimits {
            connections_max: 16,
            idle_timeout: Duration::from_millis(700),
            buffered_bytes_max: 1 << 20,
        },
    )
    .await;
    let get = |id: &str, range: &str| {
        format!("GET /store/packs/{id}.pack HTTP/1.1\r\nHost: x\r\nRange: bytes={range}\r\n\r\n")
    };
    let packs = rig.state.store.root().join("packs");

    // Removed after it was opened: served from the open file.
    let removed = "00112233445566778899aabbccddeef1";
    let data = write_pack(&rig, removed, 2);
    let mut c = RawClient::connect(addr).await;
    c.send(&get(removed, "0-0")).await;
    assert_eq!(c.answer(false).await.expect("an answer").status, 206);
    std::fs::remove_file(packs.join(format!("{removed}.pack"))).unwrap();
    c.send(&get(removed, "1048576-2097151")).await;
    let a = c.answer(false).await.expect("an answer");
    assert!(a.status == 206 && a.body == data[1 << 20..], "still served");

    // Truncated under the server: the answer ends short, the connection closes.
    let truncated = "00112233445566778899aabbccddeef2";
    write_pack(&rig, truncated, 4);
    c.send(&get(truncated, "0-0")).await;
    assert_eq!(c.answer(false).await.expect("an answer").status, 206);
    std::fs::OpenOptions::new()
        .write(true)
        .open(packs.join(format!("{truncated}.pack")))
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    c.send(&get(truncated, "2097152-3145727")).await;
    assert!(
        timeout(Duration::from_secs(5), c.answer(false))
            .await
            .expect("no hang")
            .is_none(),
        "a short body and a closed connection, never made-up bytes"
    );

    // A reader that stops: dropped after the idle timeout; another client is served meanwhile.
    let big = "00112233445566778899aabbccddeef3";
    let data = write_pack(&rig, big, 64);
    let mut stalled = RawClient::connect(addr).await;
    stalled.send(&get(big, "0-")).await;
    let mut other = RawClient::connect(addr).await;
    other.send(&get(big, "5-9")).await;
    let a = timeout(Duration::from_secs(5), other.answer(false))
        .await
        .expect("served while another client stalls")
        .expect("an answer");
    assert_eq!((a.status, a.body.as_slice()), (206, &data[5..10]));
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(
        timeout(Duration::from_secs(10), stalled.answer(false))
            .await
            .expect("no hang")
            .is_none(),
        "the stalled reader was dropped before the whole 64 MiB went out"
    );
}

/// Issue 14: boot files go the sendfile way too (whole and by range, never from outside
/// `boot_dir`), while a host's script on the same connection is still rendered by the router.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boot_files_are_sent_from_the_file_and_scripts_still_rendered() {
    let rig = rig("");
    let addr = serve_on_loopback(&rig, Default::default()).await;
    let mut c = RawClient::connect(addr).await;
    c.send("GET /boot/fleetboot-vmlinuz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await;
    let a = c.answer(false).await.expect("an answer");
    assert_eq!((a.status, a.body.as_slice()), (200, &b"0123456789"[..]));
    c.send("GET /boot/fleetboot-vmlinuz HTTP/1.1\r\nHost: x\r\nRange: bytes=2-4\r\n\r\n")
        .await;
    let a = c.answer(false).await.expect("an answer");
    assert_eq!((a.status, a.body.as_slice()), (206, &b"234"[..]));
    assert!(a.head.contains("content-range: bytes 2-4/10"), "{}", a.head);
    for outside in ["/boot/escape", "/boot/../secret.txt", "/boot/nothing-here"] {
        c.send(&format!("GET {outside} HTTP/1.1\r\nHost: x\r\n\r\n"))
            .await;
        let a = c.answer(false).await.expect("an answer");
        assert_eq!(a.status, 404, "{outside}");
        assert!(!String::from_utf8_lossy(&a.body).contains("top secret"));
    }
    // The host's script: rendered by the router (the connection is handed over).
    c.send(&format!("GET /boot/{MAC}.ipxe HTTP/1.1\r\nHost: x\r\n\r\n"))
        .await;
    let a = c.answer(false).await.expect("an answer");
    assert_eq!(a.status, 200);
    assert!(String::from_utf8_lossy(&a.body).starts_with("#!ipxe"));
}

/// Issue 13: a compacted store's manifests are stored in format 2 (ids in the packs' id tables);
/// agents get them expanded to format 1 — from this appliance even when packs come from a mirror
/// (`store_url`), which could not expand them — hashing to the `manifest_hash` they are given.
#[tokio::test]
async fn a_compacted_manifest_reaches_the_agent_as_format_1_from_the_appliance() {
    let rig = rig("store_url: http://10.9.0.2/store\n");
    let store = &rig.state.store;
    let report = store
        .compact(&fleetboot::store::CompactOptions::default())
        .unwrap();
    assert_eq!(report.manifests_rewritten, 1, "{report:?}");
    let stored = std::fs::read(store.manifest_path("demo", 1)).unwrap();
    assert_eq!(fleetboot_image::Manifest::format_of(&stored), Some(2));

    let (_, script) = get(&rig, &format!("/boot/{MAC}.ipxe")).await;
    let token = token_of(&script);
    let with_token = |uri: &str| {
        Request::get(uri)
            .header("authorization", format!("Bearer {token}"))
            .body(Body::empty())
            .unwrap()
    };
    let (s, body) = call(&rig, with_token(&format!("/api/agent/{MAC}/assignment"))).await;
    assert_eq!(s, StatusCode::OK);
    let a: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        a["manifest_url"],
        format!("{BASE}/store/manifests/demo/1.manifest"),
        "not the mirror's"
    );
    assert_eq!(a["packs_url"], "http://10.9.0.2/store/packs");
    assert_eq!(a["presigned"], false);
    let (s, served) = call(&rig, with_token("/store/manifests/demo/1.manifest")).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(fleetboot_image::Manifest::format_of(&served), Some(1));
    assert_eq!(
        a["manifest_hash"],
        blake3::hash(&served).to_hex().as_str(),
        "the agent trusts what it is served"
    );
    let m = fleetboot_image::Manifest::decode(&served).unwrap();
    assert_eq!(m, store.manifest(&"demo@1".parse().unwrap()).unwrap().1);
    // Served again: the same bytes (the expansion is deterministic).
    let (_, again) = call(&rig, with_token("/store/manifests/demo/1.manifest")).await;
    assert_eq!(again, served);
    // Without the token: no.
    assert_eq!(
        get(&rig, "/store/manifests/demo/1.manifest").await.0,
        StatusCode::UNAUTHORIZED
    );
}
