//! The agent API (token per boot) and the admin API (admin bearer token), as JSON.

use super::{same_secret, AppError, AppState};
use crate::fleet::HostRecord;
use crate::mac::Mac;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use fleetboot_image::api::{Assignment, Done, Failed, Progress};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get("authorization")?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
}

fn parse_mac(s: &str) -> Result<Mac, AppError> {
    s.parse()
        .map_err(|e| AppError(StatusCode::BAD_REQUEST, format!("{e}")))
}

/// Checks the per-boot token of `mac`; returns its record.
fn agent(st: &AppState, mac: &str, headers: &HeaderMap) -> Result<(Mac, HostRecord), AppError> {
    let mac = parse_mac(mac)?;
    let record = st.fleet().host(mac)?;
    match (&record, bearer(headers)) {
        (Some(r), Some(given)) if r.token.as_deref().is_some_and(|t| same_secret(t, given)) => {
            Ok((mac, record.expect("matched Some")))
        }
        _ => Err(AppError(
            StatusCode::UNAUTHORIZED,
            format!("no valid agent token for {mac}"),
        )),
    }
}

pub async fn assignment(
    State(st): State<Arc<AppState>>,
    Path(mac): Path<String>,
    headers: HeaderMap,
) -> Result<Json<Assignment>, AppError> {
    let (mac, record) = agent(&st, &mac, &headers)?;
    let image = record
        .assigned
        .ok_or_else(|| AppError(StatusCode::CONFLICT, format!("{mac} has no assignment")))?;
    let r = image
        .parse()
        .map_err(|e| AppError(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}")))?;
    let (v, manifest) = st
        .store
        .manifest(&r)
        .map_err(|e| AppError(StatusCode::NOT_FOUND, e.to_string()))?;
    let config = st.config();
    let host = config.hosts.get(&mac);
    Ok(Json(Assignment {
        mac: mac.to_string(),
        image,
        size: manifest.meta.size,
        digest: manifest.meta.digest,
        manifest_url: format!(
            "{}/store/manifests/{}/{}.manifest",
            st.base_url, v.name, v.version
        ),
        packs_url: format!("{}/store/packs", st.base_url),
        disk: host
            .map(|h| h.disk.clone())
            .or_else(|| config.defaults.disk.clone())
            .unwrap_or_else(|| "auto".into()),
        hostname: host.and_then(|h| h.hostname.clone()),
        installed_manifest_url: record
            .installed
            .as_deref()
            .and_then(|i| i.parse().ok())
            .and_then(|r| st.store.resolve(&r).ok())
            .map(|v| {
                format!(
                    "{}/store/manifests/{}/{}.manifest",
                    st.base_url, v.name, v.version
                )
            }),
    }))
}

pub async fn progress(
    State(st): State<Arc<AppState>>,
    Path(mac): Path<String>,
    headers: HeaderMap,
    Json(p): Json<Progress>,
) -> Result<StatusCode, AppError> {
    let (mac, _) = agent(&st, &mac, &headers)?;
    st.fleet().progress(mac, p.done, p.total)?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn done(
    State(st): State<Arc<AppState>>,
    Path(mac): Path<String>,
    headers: HeaderMap,
    Json(d): Json<Done>,
) -> Result<StatusCode, AppError> {
    let (mac, record) = agent(&st, &mac, &headers)?;
    if record.assigned.as_deref() != Some(d.image.as_str()) {
        return Err(AppError(
            StatusCode::CONFLICT,
            format!(
                "{mac} reports {} but was assigned {:?}",
                d.image, record.assigned
            ),
        ));
    }
    let expected = image_digest(&st, &d.image)?;
    if !same_secret(&expected, &d.digest) {
        st.fleet().failed(
            mac,
            &format!(
                "reported digest {} differs from the image's {expected}",
                d.digest
            ),
        )?;
        return Err(AppError(StatusCode::CONFLICT, "digest mismatch".into()));
    }
    st.fleet().installed(
        mac,
        &d.image,
        &d.digest,
        &format!(
            "fetched {} bytes, reused {} bytes",
            d.bytes_fetched, d.bytes_reused
        ),
    )?;
    st.metrics.installs_done.inc();
    tracing::info!(%mac, image = %d.image, fetched = d.bytes_fetched, reused = d.bytes_reused, "installed");
    Ok(StatusCode::NO_CONTENT)
}

fn image_digest(st: &AppState, image: &str) -> Result<String, AppError> {
    let r = image
        .parse()
        .map_err(|e| AppError(StatusCode::BAD_REQUEST, format!("{e}")))?;
    let (_, m) = st
        .store
        .manifest(&r)
        .map_err(|e| AppError(StatusCode::NOT_FOUND, e.to_string()))?;
    Ok(m.meta.digest)
}

pub async fn failed(
    State(st): State<Arc<AppState>>,
    Path(mac): Path<String>,
    headers: HeaderMap,
    Json(f): Json<Failed>,
) -> Result<StatusCode, AppError> {
    let (mac, _) = agent(&st, &mac, &headers)?;
    st.fleet().failed(mac, &f.reason)?;
    st.metrics.installs_failed.inc();
    tracing::warn!(%mac, reason = %f.reason, "install failed");
    Ok(StatusCode::NO_CONTENT)
}

fn admin(st: &AppState, headers: &HeaderMap) -> Result<(), AppError> {
    match (&st.admin_token, bearer(headers)) {
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
    pub installed: Option<String>,
    pub status: String,
    pub progress_pct: u8,
    pub ip: Option<String>,
    pub last_seen: Option<i64>,
    pub detail: Option<String>,
    pub reimage: bool,
}

/// Every host the configuration names or the state has seen.
pub fn host_views(config: &crate::config::Config, records: &[HostRecord]) -> Vec<HostView> {
    let mut views: std::collections::BTreeMap<Mac, HostView> = std::collections::BTreeMap::new();
    for h in config.hosts.values() {
        views.insert(
            h.mac,
            HostView {
                mac: h.mac.to_string(),
                hostname: h.hostname.clone(),
                group: h.group.clone(),
                image: h.image.as_ref().map(|i| i.to_string()),
                installed: None,
                status: "unseen".into(),
                progress_pct: 0,
                ip: None,
                last_seen: None,
                detail: None,
                reimage: false,
            },
        );
    }
    for r in records {
        let v = views.entry(r.mac).or_insert_with(|| HostView {
            mac: r.mac.to_string(),
            hostname: None,
            group: None,
            image: None,
            installed: None,
            status: String::new(),
            progress_pct: 0,
            ip: None,
            last_seen: None,
            detail: None,
            reimage: false,
        });
        v.installed = r.installed.clone();
        v.status = r.status.as_str().to_string();
        v.progress_pct = r.progress_pct;
        v.ip = r.ip.clone();
        v.last_seen = Some(r.last_seen);
        v.detail = r.detail.clone();
        v.reimage = r.reimage;
    }
    views.into_values().collect()
}

pub async fn hosts(
    State(st): State<Arc<AppState>>,
    headers: HeaderMap,
) -> Result<Json<Vec<HostView>>, AppError> {
    admin(&st, &headers)?;
    let records = st.fleet().hosts()?;
    Ok(Json(host_views(&st.config(), &records)))
}

/// `{"macs": [...]}` or `{"group": "web"}`.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct ReimageRequest {
    #[serde(default)]
    pub macs: Vec<String>,
    #[serde(default)]
    pub group: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ReimageAnswer {
    pub marked: Vec<String>,
}

pub async fn reimage(
    State(st): State<Arc<AppState>>,
    headers: HeaderMap,
    Json(req): Json<ReimageRequest>,
) -> Result<Json<ReimageAnswer>, AppError> {
    admin(&st, &headers)?;
    let macs = crate::fleet::reimage_targets(&st.config(), &req.macs, req.group.as_deref())
        .map_err(|e| AppError(StatusCode::BAD_REQUEST, e))?;
    st.fleet().request_reimage(&macs)?;
    Ok(Json(ReimageAnswer {
        marked: macs.iter().map(|m| m.to_string()).collect(),
    }))
}
