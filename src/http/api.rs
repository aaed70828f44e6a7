//! The agent API (token per boot) and the admin API (admin bearer token), as JSON.

use super::{bearer, blocking, AppError, AppState, Peer};
use crate::appliance::{boot_now, same_secret};
use crate::config::{DiskChoice, StoreAccess};
use crate::fleet::{HostRecord, HostStatus};
use crate::mac::Mac;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use fleetboot_image::api::{Assignment, Failed, ImageId, InstallReport, Progress, Seed};
use serde::{Deserialize, Serialize};
use std::net::IpAddr;
use std::sync::Arc;

fn parse_mac(s: &str) -> Result<Mac, AppError> {
    s.parse()
        .map_err(|e| AppError(StatusCode::BAD_REQUEST, format!("{e}")))
}

/// What an agent call is part of: the host's status its token was handed out for.
const INSTALL: &[HostStatus] = &[HostStatus::Booting, HostStatus::Imaging];
const INSPECT: &[HostStatus] = &[HostStatus::Inspecting];
const WIPE: &[HostStatus] = &[HostStatus::Wiping];
/// Any errand (the console log, a failure report).
const ANY: &[HostStatus] = &[];

/// Checks an agent call: the live token of `mac`, used from its address, for the errand the
/// call belongs to (an inspection's token cannot fetch an install's assignment, nor an install's
/// report a wipe). Returns the host's record (blocking: SQLite).
fn agent(
    st: &AppState,
    mac: &str,
    token: Option<&str>,
    peer: IpAddr,
    errand: &[HostStatus],
) -> Result<(Mac, HostRecord), AppError> {
    let mac = parse_mac(mac)?;
    st.tokens.check_host(mac, token, peer, boot_now())?;
    let record = st.fleet().host(mac)?.ok_or_else(|| {
        AppError(
            StatusCode::UNAUTHORIZED,
            format!("no record of {mac} (install token void)"),
        )
    })?;
    if !errand.is_empty() && !errand.contains(&record.status) {
        return Err(AppError(
            StatusCode::UNAUTHORIZED,
            format!(
                "{mac}'s token is for another errand (the host is {})",
                record.status.as_str()
            ),
        ));
    }
    Ok((mac, record))
}

/// Where agents fetch the store: `store_url` (a mirror or cache) or this appliance's `/store`.
fn store_base(st: &AppState) -> String {
    st.config()
        .store_url
        .clone()
        .unwrap_or_else(|| format!("{}/store", st.base_url))
}

/// Where agents fetch a manifest: beside the packs, unless it is stored in format 2 — only an
/// appliance expands that (a mirror of the store's files could not), so this one serves it.
fn manifest_url(st: &AppState, id: &ImageId, expanded: bool) -> String {
    let base = if expanded {
        format!("{}/store", st.base_url)
    } else {
        store_base(st)
    };
    format!("{base}/manifests/{}/{}.manifest", id.name, id.version)
}

pub async fn assignment(
    State(st): State<Arc<AppState>>,
    Path(mac): Path<String>,
    Peer(peer): Peer,
    headers: HeaderMap,
) -> Result<Json<Assignment>, AppError> {
    let token = bearer(&headers).map(str::to_string);
    blocking(move || {
        let (mac, record) = agent(&st, &mac, token.as_deref(), peer, INSTALL)?;
        let image = record
            .assigned
            .ok_or_else(|| AppError(StatusCode::CONFLICT, format!("{mac} has no assignment")))?;
        // Exactly the image the token was issued for: same name, version and content.
        let resolved = st.images.find(&st.store, &image).ok_or_else(|| {
            AppError(
                StatusCode::GONE,
                format!("image {image} ({}) is no longer in the store", image.digest),
            )
        })?;
        let config = st.config();
        // Its entry; an enrolled-by-rule machine its rule's group; else the defaults.
        let host = config.host_for(mac, st.inventory(mac).as_ref());
        let hint = record
            .hint
            .as_ref()
            .and_then(|h| Some((h, st.images.find(&st.store, h)?)));
        // Either manifest in format 2: both come from this appliance (the agent fetches them
        // alike, with its token), the packs still from where `store_access` says.
        let expanded =
            resolved.manifest_expanded || hint.as_ref().is_some_and(|h| h.1.manifest_expanded);
        let hint = hint.map(|h| h.0);
        let direct = match config.store_access {
            StoreAccess::Direct => Some(presigned(
                &st,
                (!expanded).then_some((&image, hint)),
                &resolved.packs,
                config.install_token_ttl,
            )?),
            _ => None,
        };
        let (manifest_url, installed_manifest_url, pack_urls, presigned_manifests) = match direct {
            Some(Presigned {
                manifests: Some((manifest, hint)),
                packs,
            }) => (manifest, hint, packs, true),
            direct => (
                manifest_url(&st, &image, expanded),
                hint.map(|h| manifest_url(&st, h, expanded)),
                direct.map(|d| d.packs).unwrap_or_default(),
                false,
            ),
        };
        Ok(Json(Assignment {
            mac: mac.to_string(),
            presigned: presigned_manifests,
            pack_urls,
            manifest_hash: Some(resolved.manifest_hash.to_string()),
            manifest_url,
            image,
            size: resolved.size,
            packs_url: format!("{}/packs", store_base(&st)),
            disk: match &host.disk {
                DiskChoice::Name(n) => n.clone(),
                DiskChoice::Hints(_) => "hints".into(),
            },
            disk_hints: match &host.disk {
                DiskChoice::Hints(h) => Some(h.clone()),
                DiskChoice::Name(_) => None,
            },
            hostname: host.hostname.clone(),
            installed_manifest_url,
            seed: seed(&host, record.instance_id.as_deref()),
        }))
    })
    .await
}

/// An install's objects as presigned URLs of the object store (`store_access: direct`): its
/// packs, and its manifest and the installed image's (if any) unless they are format 2.
struct Presigned {
    manifests: Option<(String, Option<String>)>,
    packs: std::collections::BTreeMap<String, String>,
}

fn presigned(
    st: &AppState,
    manifests: Option<(&ImageId, Option<&ImageId>)>,
    packs: &[fleetboot_image::PackId],
    ttl: std::time::Duration,
) -> Result<Presigned, AppError> {
    let failed = |e: String| {
        tracing::warn!(error = %e, "presigning the store's objects");
        AppError(StatusCode::BAD_GATEWAY, format!("the object store: {e}"))
    };
    let backend = st.store.backend();
    let sign = |key: String| match backend.presign(&key, ttl) {
        Some(Ok(url)) => Ok(url),
        Some(Err(e)) => Err(failed(format!("{key}: {e}"))),
        None => Err(failed(
            "the store has no presigned URLs (store_access: direct)".into(),
        )),
    };
    let mut urls = std::collections::BTreeMap::new();
    for id in packs {
        urls.insert(id.to_string(), sign(crate::store::Store::pack_key(id))?);
    }
    let manifests = match manifests {
        Some((image, hint)) => Some((
            sign(crate::store::Store::manifest_key(
                &image.name,
                image.version,
            ))?,
            match hint {
                Some(h) => Some(sign(crate::store::Store::manifest_key(&h.name, h.version))?),
                None => None,
            },
        )),
        None => None,
    };
    Ok(Presigned {
        manifests,
        packs: urls,
    })
}

/// The NoCloud documents the agent writes after the image, unless `cloud_init: off`.
fn seed(host: &crate::config::Host, instance_id: Option<&str>) -> Option<Seed> {
    if host.identity.cloud_init == crate::config::CloudInit::Off {
        return None;
    }
    let docs = crate::appliance::cloudinit::nocloud(host, instance_id);
    Some(Seed {
        meta_data: docs.meta_data,
        user_data: docs.user_data,
        network_config: docs.network_config,
    })
}

pub async fn progress(
    State(st): State<Arc<AppState>>,
    Path(mac): Path<String>,
    Peer(peer): Peer,
    headers: HeaderMap,
    Json(p): Json<Progress>,
) -> Result<StatusCode, AppError> {
    let token = bearer(&headers).map(str::to_string);
    blocking(move || {
        let mac = parse_mac(&mac)?;
        st.tokens
            .check_host(mac, token.as_deref(), peer, boot_now())?;
        st.fleet().progress(mac, p.done, p.total)?;
        Ok(StatusCode::NO_CONTENT)
    })
    .await
}

/// A retired machine's disks were wiped: it is retired, its token ends.
pub async fn wiped(
    State(st): State<Arc<AppState>>,
    Path(mac): Path<String>,
    Peer(peer): Peer,
    headers: HeaderMap,
    Json(report): Json<fleetboot_image::api::WipeReport>,
) -> Result<StatusCode, AppError> {
    let token = bearer(&headers).map(str::to_string);
    blocking(move || {
        let (mac, _) = agent(&st, &mac, token.as_deref(), peer, WIPE)?;
        let summary = report
            .disks
            .iter()
            .map(|d| format!("{} {} bytes {}", d.name, d.bytes, d.how))
            .collect::<Vec<_>>()
            .join("; ");
        st.fleet().wiped(mac, &format!("wiped: {summary}"))?;
        st.tokens.remove(mac);
        tracing::info!(%mac, %summary, "a retired host's disks were wiped");
        Ok(StatusCode::NO_CONTENT)
    })
    .await
}

/// Retires hosts: at its next boot each one's disks are wiped (its `wipe:`), then it is off.
pub async fn retire(
    State(st): State<Arc<AppState>>,
    headers: HeaderMap,
    Json(req): Json<ReimageRequest>,
) -> Result<Json<ReimageAnswer>, AppError> {
    admin(&st, &headers)?;
    let config = st.config();
    let macs = crate::fleet::reimage_targets(&config, &req.macs, req.group.as_deref())
        .map_err(|e| AppError(StatusCode::BAD_REQUEST, e))?;
    let how = crate::fleet::wipe_modes(&config, &macs);
    blocking(move || {
        st.fleet().request_retire(&macs, &how)?;
        Ok(Json(ReimageAnswer {
            marked: macs.iter().map(|m| m.to_string()).collect(),
            rebooted: Vec::new(),
        }))
    })
    .await
}

/// An inspected machine reports what it is; its token ends with it.
pub async fn inventory(
    State(st): State<Arc<AppState>>,
    Path(mac): Path<String>,
    Peer(peer): Peer,
    headers: HeaderMap,
    Json(inv): Json<fleetboot_image::api::Inventory>,
) -> Result<StatusCode, AppError> {
    let token = bearer(&headers).map(str::to_string);
    blocking(move || {
        let (mac, _) = agent(&st, &mac, token.as_deref(), peer, INSPECT)?;
        let json = serde_json::to_string(&inv)
            .map_err(|e| AppError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
        st.fleet().save_inventory(mac, &json)?;
        st.tokens.remove(mac);
        tracing::info!(%mac, product = ?inv.system.product, disks = inv.disks.len(),
            "inspected an unknown machine");
        Ok(StatusCode::NO_CONTENT)
    })
    .await
}

/// `?offset=N`: where the chunk starts in the install's log.
#[derive(Debug, Deserialize)]
pub struct LogOffset {
    pub offset: u64,
}

/// The log's length after an append (or, with 409, the length to resend from).
#[derive(Debug, Serialize, Deserialize)]
pub struct LogLength {
    pub length: u64,
}

/// The agent appends to its install's console log (the install is the one its token is for).
pub async fn log_append(
    State(st): State<Arc<AppState>>,
    Path(mac): Path<String>,
    axum::extract::Query(at): axum::extract::Query<LogOffset>,
    Peer(peer): Peer,
    headers: HeaderMap,
    body: bytes::Bytes,
) -> Result<(StatusCode, Json<LogLength>), AppError> {
    use crate::fleet::logs::LogError;
    let token = bearer(&headers).map(str::to_string);
    blocking(move || {
        let (mac, record) = agent(&st, &mac, token.as_deref(), peer, ANY)?;
        let instance = record.instance_id.ok_or_else(|| {
            AppError(
                StatusCode::CONFLICT,
                format!("{mac} has no install under way"),
            )
        })?;
        match st.logs.append(mac, &instance, at.offset, &body) {
            Ok(length) => Ok((StatusCode::OK, Json(LogLength { length }))),
            Err(LogError::Gap { length, .. }) => {
                Ok((StatusCode::CONFLICT, Json(LogLength { length })))
            }
            Err(e) => Err(AppError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())),
        }
    })
    .await
}

/// `?instance=ID`: one install's log rather than the newest.
#[derive(Debug, Deserialize)]
pub struct LogWhich {
    #[serde(default)]
    pub instance: Option<String>,
}

/// A host's newest install log (or `?instance=`), as text. A browser without the token is asked
/// for it (Basic auth, the token as the password): the dashboard links here.
pub async fn log_read(
    State(st): State<Arc<AppState>>,
    Path(mac): Path<String>,
    axum::extract::Query(which): axum::extract::Query<LogWhich>,
    headers: HeaderMap,
) -> Result<String, axum::response::Response> {
    use axum::response::IntoResponse;
    if let Err(e) = admin(&st, &headers) {
        let mut r = e.into_response();
        if r.status() == StatusCode::UNAUTHORIZED {
            r.headers_mut().insert(
                "www-authenticate",
                axum::http::HeaderValue::from_static("Basic realm=\"fleetboot admin\""),
            );
        }
        return Err(r);
    }
    let mac = parse_mac(&mac).map_err(IntoResponse::into_response)?;
    blocking(move || match st.logs.read(mac, which.instance.as_deref()) {
        Ok(Some((_, text))) => Ok(String::from_utf8_lossy(&text).into_owned()),
        Ok(None) => Err(AppError(
            StatusCode::NOT_FOUND,
            format!("no install log of {mac}"),
        )),
        Err(e) => Err(AppError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())),
    })
    .await
    .map_err(IntoResponse::into_response)
}

pub async fn done(
    State(st): State<Arc<AppState>>,
    Path(mac): Path<String>,
    Peer(peer): Peer,
    headers: HeaderMap,
    Json(report): Json<InstallReport>,
) -> Result<StatusCode, AppError> {
    let token = bearer(&headers).map(str::to_string);
    blocking(move || {
        let (mac, record) = match agent(&st, &mac, token.as_deref(), peer, INSTALL) {
            Ok(found) => found,
            Err(refused) => {
                // The same `done` again, its first answer lost on the way: answered as before,
                // so the agent reboots into what was recorded instead of stopping.
                let mac = parse_mac(&mac)?;
                let again = token
                    .as_deref()
                    .is_some_and(|t| st.tokens.finished(mac, t, peer))
                    && st
                        .fleet()
                        .host(mac)?
                        .is_some_and(|r| r.installed.as_ref() == Some(&report.image));
                return if again {
                    Ok(StatusCode::NO_CONTENT)
                } else {
                    Err(refused)
                };
            }
        };
        if record.assigned.as_ref() != Some(&report.image) {
            return Err(AppError(
                StatusCode::CONFLICT,
                format!(
                    "{mac} reports {} ({}) but was assigned {:?}",
                    report.image, report.image.digest, record.assigned
                ),
            ));
        }
        if !same_secret(&report.image.digest, &report.digest) {
            let reason = format!(
                "reported digest {} differs from the image's {}",
                report.digest, report.image.digest
            );
            st.fleet().failed(mac, &reason)?;
            st.tokens.remove(mac);
            return Err(AppError(StatusCode::CONFLICT, "digest mismatch".into()));
        }
        st.fleet().installed(mac, &report)?;
        st.tokens.finish(mac);
        st.metrics.installs_done.inc();
        tracing::info!(%mac, image = %report.image, fetched = report.bytes_fetched, reused = report.bytes_reused, "installed");
        Ok(StatusCode::NO_CONTENT)
    })
    .await
}

pub async fn failed(
    State(st): State<Arc<AppState>>,
    Path(mac): Path<String>,
    Peer(peer): Peer,
    headers: HeaderMap,
    Json(f): Json<Failed>,
) -> Result<StatusCode, AppError> {
    let token = bearer(&headers).map(str::to_string);
    blocking(move || {
        let mac = parse_mac(&mac)?;
        st.tokens
            .check_host(mac, token.as_deref(), peer, boot_now())?;
        // A reason is a line or a few, kept in the host's record and the event log: a longer
        // one is cut (the whole console log is kept apart, bounded).
        let reason = cut_to(&f.reason, REASON_MAX);
        st.fleet().failed(mac, reason)?;
        st.tokens.remove(mac);
        st.metrics.installs_failed.inc();
        tracing::warn!(%mac, %reason, "install failed");
        Ok(StatusCode::NO_CONTENT)
    })
    .await
}

/// The longest failure reason kept, in bytes.
const REASON_MAX: usize = 4096;

/// `text`, cut to at most `max` bytes at a character boundary.
fn cut_to(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// The admin token a request carries: `Authorization: Bearer TOKEN`, or from a browser, Basic
/// auth with the token as the password (any user name).
fn admin_secret(headers: &HeaderMap) -> Option<String> {
    use base64::Engine as _;
    if let Some(b) = bearer(headers) {
        return Some(b.to_string());
    }
    let basic = headers
        .get("authorization")?
        .to_str()
        .ok()?
        .strip_prefix("Basic ")?;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(basic.trim())
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    Some(text.split_once(':')?.1.to_string())
}

fn admin(st: &AppState, headers: &HeaderMap) -> Result<(), AppError> {
    match (&st.admin_token, admin_secret(headers).as_deref()) {
        (None, _) => Err(AppError(
            StatusCode::FORBIDDEN,
            "the admin API is off: set admin_token in the configuration or FLEETBOOT_ADMIN_TOKEN"
                .into(),
        )),
        (Some(t), Some(given)) if same_secret(t, given) => Ok(()),
        _ => Err(AppError(
            StatusCode::UNAUTHORIZED,
            "admin token required".into(),
        )),
    }
}

/// A host as the admin API and `fleetboot host list` show it: configuration and state.
#[derive(Debug, Serialize, Deserialize)]
pub struct HostView {
    pub mac: String,
    pub hostname: Option<String>,
    pub group: Option<String>,
    /// The image the configuration assigns (as written, `NAME` or `NAME@N`).
    pub image: Option<String>,
    /// What that resolves to in the store now.
    pub target: Option<ImageId>,
    /// What a verified install put on the disk (`None`: nothing, or an install did not finish).
    pub installed: Option<ImageId>,
    /// The next boot installs: the target differs from what is installed (by digest), or a
    /// reimage was requested.
    pub pending: bool,
    pub status: String,
    pub progress_pct: u8,
    pub ip: Option<String>,
    pub last_seen: Option<i64>,
    pub detail: Option<String>,
    pub reimage: bool,
    /// The last install's report.
    pub report: Option<InstallReport>,
    /// What its BMC last said of its power (`on`, `off`, or the error), and when (Unix s).
    pub power: Option<String>,
    pub power_at: Option<i64>,
    /// From its inventory, if it was inspected: vendor, product, CPUs, memory, disks.
    pub hardware: Option<String>,
}

/// One host in full, as `fleetboot host show --json` and `GET /api/hosts/MAC` give it.
#[derive(Debug, Serialize)]
pub struct HostDetail {
    pub host: Option<HostView>,
    /// Its BMC, never the password.
    pub bmc: Option<serde_json::Value>,
    pub inventory: Option<fleetboot_image::api::Inventory>,
    /// For a machine the YAML does not list: the `hosts:` line that enrols it.
    pub enrol: Option<String>,
    /// `disk:` as resolved (a name, or hints).
    pub disk: serde_json::Value,
    /// The disk the hints pick on the inspected machine (or `none: why`).
    pub disk_pick: Option<String>,
    /// The discovery rule it falls under: number, line, image, group.
    pub rule: Option<serde_json::Value>,
}

/// Everything known of `mac`; `None` when the YAML does not list it and it was never seen.
pub fn host_detail(
    config: &crate::config::Config,
    fleet: &crate::fleet::FleetState,
    mac: Mac,
    resolve: &dyn Fn(&crate::store::ImageRef) -> Option<ImageId>,
) -> Result<Option<HostDetail>, crate::fleet::StateError> {
    use crate::config::DiskChoice;
    let record = fleet.host(mac)?;
    let host = config.hosts.get(&mac);
    if record.is_none() && host.is_none() {
        return Ok(None);
    }
    let inventory: Option<fleetboot_image::api::Inventory> = fleet
        .inventory(mac)?
        .and_then(|(j, _)| serde_json::from_str(&j).ok());
    let mut view = host_views(config, record.as_slice(), &fleet.power()?, resolve)
        .into_iter()
        .find(|v| v.mac == mac.to_string());
    if let (Some(v), Some(inv)) = (view.as_mut(), inventory.as_ref()) {
        v.hardware = Some(hardware_line(inv));
    }
    let resolved = config.host_for(mac, inventory.as_ref());
    let disk_pick = match (&resolved.disk, &inventory) {
        (DiskChoice::Hints(h), Some(inv)) => Some(match h.pick(&inv.disks) {
            Ok(d) => d.name.clone(),
            Err(e) => format!("none: {e}"),
        }),
        _ => None,
    };
    let rule = config.rule_for(mac, inventory.as_ref()).map(|(i, r)| {
        serde_json::json!({
            "number": i + 1, "line": r.line, "group": r.group,
            "image": resolved.image.as_ref().map(ToString::to_string),
        })
    });
    Ok(Some(HostDetail {
        host: view,
        bmc: host.and_then(|h| h.bmc.as_ref()).map(|b| {
            serde_json::json!({
                "type": b.kind, "address": b.address, "port": b.port, "username": b.username,
            })
        }),
        enrol: host.is_none().then(|| enrol_line(mac, inventory.as_ref())),
        inventory,
        disk: match &resolved.disk {
            DiskChoice::Name(n) => serde_json::json!(n),
            DiskChoice::Hints(h) => serde_json::json!(h),
        },
        disk_pick,
        rule,
    }))
}

/// The `hosts:` entry that enrols a machine by hand, its inventory as a comment.
fn enrol_line(mac: Mac, inv: Option<&fleetboot_image::api::Inventory>) -> String {
    // What the machine said of itself is untrusted: one printable line in the comment.
    let plain = |s: Option<&str>| -> String {
        s.unwrap_or("?")
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .take(64)
            .collect()
    };
    let about = inv
        .map(|i| {
            let bmc = i
                .bmc_address
                .as_deref()
                .map(|a| format!(", BMC {}", plain(Some(a))))
                .unwrap_or_default();
            format!(
                "  # {} {}, serial {}{bmc}",
                plain(i.system.vendor.as_deref()),
                plain(i.system.product.as_deref()),
                plain(i.system.serial.as_deref())
            )
        })
        .unwrap_or_default();
    format!("  \"{mac}\": {{ image: IMAGE, hostname: HOSTNAME }}{about}")
}

/// One host in full (admin).
pub async fn host(
    State(st): State<Arc<AppState>>,
    Path(mac): Path<String>,
    headers: HeaderMap,
) -> Result<Json<HostDetail>, AppError> {
    admin(&st, &headers)?;
    let mac = parse_mac(&mac)?;
    blocking(move || {
        let config = st.config();
        let detail = host_detail(&config, &st.fleet(), mac, &|r| {
            st.images.resolve(&st.store, r).ok().map(|x| x.id)
        })?;
        detail
            .map(Json)
            .ok_or_else(|| AppError(StatusCode::NOT_FOUND, format!("no host {mac}")))
    })
    .await
}

/// One line about an inspected machine, for the dashboard and listings.
pub fn hardware_line(inv: &fleetboot_image::api::Inventory) -> String {
    format!(
        "{} {}, {} CPUs, {} GiB, {} disks",
        inv.system.vendor.as_deref().unwrap_or("?"),
        inv.system.product.as_deref().unwrap_or("?"),
        inv.cpus,
        inv.memory_bytes >> 30,
        inv.disks.len()
    )
}

/// Each host's last recorded power state, and when.
pub type PowerStates = std::collections::HashMap<Mac, (String, i64)>;

/// Every host the configuration names or the state has seen; `resolve` gives the identity of an
/// image as the configuration names it (`None`: not in the store).
pub fn host_views(
    config: &crate::config::Config,
    records: &[HostRecord],
    power: &PowerStates,
    resolve: &dyn Fn(&crate::store::ImageRef) -> Option<ImageId>,
) -> Vec<HostView> {
    let empty = |mac: Mac| HostView {
        mac: mac.to_string(),
        hostname: None,
        group: None,
        image: None,
        target: None,
        installed: None,
        pending: false,
        status: "unseen".into(),
        progress_pct: 0,
        ip: None,
        last_seen: None,
        detail: None,
        reimage: false,
        report: None,
        power: None,
        power_at: None,
        hardware: None,
    };
    let mut views: std::collections::BTreeMap<Mac, HostView> = std::collections::BTreeMap::new();
    for h in config.hosts.values() {
        let mut v = empty(h.mac);
        v.hostname = h.hostname.clone();
        v.group = h.group.clone();
        v.image = h.image.as_ref().map(|i| i.to_string());
        v.target = h.image.as_ref().and_then(resolve);
        views.insert(h.mac, v);
    }
    for r in records {
        let v = views.entry(r.mac).or_insert_with(|| empty(r.mac));
        v.installed = r.installed.clone();
        v.status = r.status.as_str().to_string();
        v.progress_pct = r.progress_pct;
        v.ip = r.ip.clone();
        v.last_seen = Some(r.last_seen);
        v.detail = r.detail.clone();
        v.reimage = r.reimage;
        v.report = r.report.clone();
    }
    for (mac, v) in views.iter_mut() {
        if let Some((state, at)) = power.get(mac) {
            v.power = Some(state.clone());
            v.power_at = Some(*at);
        }
        v.pending = v.target.as_ref().is_some_and(|t| {
            v.reimage || v.installed.as_ref().map(|i| &i.digest) != Some(&t.digest)
        });
    }
    views.into_values().collect()
}

/// The views as the appliance sees them now (blocking).
pub fn current_views(st: &AppState) -> Result<Vec<HostView>, AppError> {
    let (records, power, inventories) = {
        let fleet = st.fleet();
        (fleet.hosts()?, fleet.power()?, fleet.inventories()?)
    };
    let mut views = host_views(&st.config(), &records, &power, &|r| {
        st.images.resolve(&st.store, r).ok().map(|x| x.id)
    });
    for v in &mut views {
        let inv = v
            .mac
            .parse::<Mac>()
            .ok()
            .and_then(|m| inventories.get(&m))
            .and_then(|j| serde_json::from_str(j).ok());
        v.hardware = inv.as_ref().map(hardware_line);
    }
    Ok(views)
}

pub async fn hosts(
    State(st): State<Arc<AppState>>,
    headers: HeaderMap,
) -> Result<Json<Vec<HostView>>, AppError> {
    admin(&st, &headers)?;
    blocking(move || current_views(&st).map(Json)).await
}

/// `{"macs": [...]}` or `{"group": "web"}`; `"reboot": true` also boots each host from the
/// network now through its BMC (PXE once, power cycle). Follow the installs in `/api/hosts`.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct ReimageRequest {
    #[serde(default)]
    pub macs: Vec<String>,
    #[serde(default)]
    pub group: Option<String>,
    #[serde(default)]
    pub reboot: bool,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ReimageAnswer {
    pub marked: Vec<String>,
    /// With `reboot`: what each host's BMC did.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rebooted: Vec<BmcAnswer>,
}

/// `{"macs": [...]}` or `{"group": "rack"}`, and `"action": "status" | "on" | "off" | "cycle"`.
#[derive(Debug, Serialize, Deserialize)]
pub struct PowerRequest {
    #[serde(default)]
    pub macs: Vec<String>,
    #[serde(default)]
    pub group: Option<String>,
    pub action: PowerRequestAction,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PowerRequestAction {
    Status,
    On,
    Off,
    Cycle,
}

/// One host's BMC call: its power state after it, or why it failed.
#[derive(Debug, Serialize, Deserialize)]
pub struct BmcAnswer {
    pub mac: String,
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub power: Option<crate::bmc::PowerState>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// BMCs talked to at once by one API call.
const BMC_PARALLEL: usize = 8;

/// The answers, with the power states recorded for the dashboard and `host list`.
fn bmc_answers(
    st: &AppState,
    results: Vec<(Mac, Result<crate::bmc::PowerState, crate::bmc::BmcError>)>,
) -> Vec<BmcAnswer> {
    if let Err(e) = st.fleet().set_power(&crate::fleet::power_records(&results)) {
        tracing::warn!("cannot record power states: {e}");
    }
    results
        .into_iter()
        .map(|(mac, r)| match r {
            Ok(power) => BmcAnswer {
                mac: mac.to_string(),
                ok: true,
                power: Some(power),
                error: None,
            },
            Err(e) => BmcAnswer {
                mac: mac.to_string(),
                ok: false,
                power: None,
                error: Some(e.to_string()),
            },
        })
        .collect()
}

/// Power through the named hosts' BMCs; every host gets an answer, failures included.
pub async fn power(
    State(st): State<Arc<AppState>>,
    headers: HeaderMap,
    Json(req): Json<PowerRequest>,
) -> Result<Json<Vec<BmcAnswer>>, AppError> {
    use crate::bmc::PowerAction;
    admin(&st, &headers)?;
    let config = st.config();
    let macs = crate::fleet::reimage_targets(&config, &req.macs, req.group.as_deref())
        .map_err(|e| AppError(StatusCode::BAD_REQUEST, e))?;
    let hosts = crate::fleet::with_bmcs(&config, &macs);
    blocking(move || {
        use crate::bmc::PowerState;
        let results = crate::bmc::for_each(&hosts, BMC_PARALLEL, |bmc| match req.action {
            PowerRequestAction::Status => bmc.power_state(),
            PowerRequestAction::On => bmc.power(PowerAction::On).map(|_| PowerState::On),
            PowerRequestAction::Off => bmc.power(PowerAction::Off).map(|_| PowerState::Off),
            PowerRequestAction::Cycle => bmc.power(PowerAction::Cycle).map(|_| PowerState::On),
        });
        Ok(Json(bmc_answers(&st, results)))
    })
    .await
}

pub async fn reimage(
    State(st): State<Arc<AppState>>,
    headers: HeaderMap,
    Json(req): Json<ReimageRequest>,
) -> Result<Json<ReimageAnswer>, AppError> {
    admin(&st, &headers)?;
    let macs = crate::fleet::reimage_targets(&st.config(), &req.macs, req.group.as_deref())
        .map_err(|e| AppError(StatusCode::BAD_REQUEST, e))?;
    let hosts = crate::fleet::with_bmcs(&st.config(), &macs);
    blocking(move || {
        st.fleet().request_reimage(&macs)?;
        let rebooted = if req.reboot {
            let results = crate::bmc::for_each(&hosts, BMC_PARALLEL, |bmc| {
                bmc.boot_from_network().map(|_| crate::bmc::PowerState::On)
            });
            bmc_answers(&st, results)
        } else {
            Vec::new()
        };
        Ok(Json(ReimageAnswer {
            marked: macs.iter().map(|m| m.to_string()).collect(),
            rebooted,
        }))
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_long_failure_reason_is_cut_at_a_character_boundary() {
        assert_eq!(cut_to("short", REASON_MAX), "short");
        let long = "é".repeat(REASON_MAX);
        let cut = cut_to(&long, REASON_MAX);
        assert!(cut.len() <= REASON_MAX && cut.len() >= REASON_MAX - 1);
        assert!(cut.chars().all(|c| c == 'é'));
    }
}
