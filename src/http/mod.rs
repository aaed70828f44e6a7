//! The HTTP side of the appliance (axum): iPXE scripts, boot files, the image store by range,
//! the agent and admin APIs, `/metrics` and the dashboard.
//!
//! [`app`] builds the router from an [`AppState`] without a socket, so handlers are tested with
//! `Router::oneshot`; `serve` binds the listener and runs it.
//!
//! Routes:
//! ```text
//! GET  /boot/{mac}.ipxe                 the host's iPXE script (agent or local disk)
//! GET  /boot/{file}                     files in boot_dir (Range supported)
//! GET  /store/manifests/{name}/{N}.manifest, /store/packs/{id}.pack   the store, by Range
//! GET  /api/agent/{mac}/assignment      agent API (Bearer: the per-boot token)
//! POST /api/agent/{mac}/progress|done|failed
//! GET  /api/hosts, POST /api/reimage    admin API (Bearer: the admin token)
//! GET  /meta/{mac}/meta-data|user-data|vendor-data|network-config   NoCloud-net, to the host's
//!                                       address only (or the admin token)
//! GET  /metrics                         Prometheus text format
//! GET  /                                dashboard
//! ```

pub mod api;
mod dashboard;
pub mod limits;
mod meta;
pub mod packs;
pub mod script;
mod sendfile;

pub use crate::appliance::AppState;

use crate::appliance::boot_now;
use crate::bootfiles::resolve_beneath;
use crate::config::StoreAccess;
use crate::store::{validate_name, Store};
use axum::body::Body;
use axum::extract::connect_info::{ConnectInfo, MockConnectInfo};
use axum::extract::{FromRequestParts, Path, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use tower::ServiceExt;
use tower_http::services::ServeFile;

/// An error answer: the status and a short message; details go to the log.
pub struct AppError(pub StatusCode, pub String);

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        if self.0.is_server_error() {
            tracing::warn!(status = %self.0, "{}", self.1);
        }
        (self.0, format!("{}\n", self.1)).into_response()
    }
}

impl From<crate::fleet::StateError> for AppError {
    fn from(e: crate::fleet::StateError) -> Self {
        AppError(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
    }
}

impl From<crate::appliance::AccessError> for AppError {
    fn from(e: crate::appliance::AccessError) -> Self {
        tracing::warn!("refused: {e}");
        AppError(StatusCode::UNAUTHORIZED, e.to_string())
    }
}

/// Runs blocking work (SQLite, the store's files) off the async workers.
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, AppError> + Send + 'static,
) -> Result<T, AppError> {
    tokio::task::spawn_blocking(f).await.unwrap_or_else(|e| {
        Err(AppError(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("handler failed: {e}"),
        ))
    })
}

/// The address a request came from (the TCP peer; in `oneshot` tests, `MockConnectInfo`).
pub struct Peer(pub IpAddr);

impl<S: Send + Sync> FromRequestParts<S> for Peer {
    type Rejection = AppError;
    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Peer, AppError> {
        let ext = &parts.extensions;
        ext.get::<ConnectInfo<SocketAddr>>()
            .map(|c| c.0)
            .or_else(|| ext.get::<MockConnectInfo<SocketAddr>>().map(|c| c.0))
            .map(|a| Peer(crate::appliance::canonical(a.ip())))
            .ok_or_else(|| {
                AppError(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "the peer address is unknown".into(),
                )
            })
    }
}

/// `Authorization: Bearer …`.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get("authorization")?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
}

/// Whether a request may read the store: `store_access: open`, the admin token, or a live
/// install token used from its address.
fn store_access(st: &AppState, headers: &HeaderMap, peer: IpAddr) -> Result<(), AppError> {
    store_access_with(st, bearer(headers), peer)
}

/// [`store_access`] given the bearer token itself (the sendfile path parses no `HeaderMap`).
fn store_access_with(st: &AppState, given: Option<&str>, peer: IpAddr) -> Result<(), AppError> {
    if st.config().store_access == StoreAccess::Open {
        return Ok(());
    }
    if let (Some(admin), Some(given)) = (&st.admin_token, given) {
        if crate::appliance::same_secret(admin, given) {
            return Ok(());
        }
    }
    Ok(st.tokens.check_any(given, peer, boot_now())?)
}

/// The router.
pub fn app(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/", get(dashboard::page))
        .route("/metrics", get(metrics))
        .route("/boot/{*path}", get(boot))
        .route("/api/agent/{mac}/assignment", get(api::assignment))
        .route("/api/agent/{mac}/progress", post(api::progress))
        .route("/api/agent/{mac}/done", post(api::done))
        .route("/api/agent/{mac}/failed", post(api::failed))
        .route("/api/agent/{mac}/log", post(api::log_append))
        .route("/api/agent/{mac}/inventory", post(api::inventory))
        .route("/api/agent/{mac}/wiped", post(api::wiped))
        .route("/api/retire", post(api::retire))
        .route("/api/hosts/{mac}", get(api::host))
        .route("/api/hosts/{mac}/log", get(api::log_read))
        .route("/api/hosts", get(api::hosts))
        .route("/api/reimage", post(api::reimage))
        .route("/api/power", post(api::power))
        .route("/store/packs/{name}", get(packs::get))
        .route("/store/manifests/{name}/{file}", get(manifest))
        .route("/meta/{mac}/{doc}", get(meta::get))
        .with_state(state)
}

/// `/store/manifests/{name}/{N}.manifest`: an image's descriptive data.
async fn manifest(
    State(st): State<Arc<AppState>>,
    Path((name, file)): Path<(String, String)>,
    Peer(peer): Peer,
    req: Request,
) -> Response {
    if let Err(e) = store_access(&st, req.headers(), peer) {
        return e.into_response();
    }
    let version = file
        .strip_suffix(".manifest")
        .and_then(|v| v.parse::<u32>().ok());
    let (Ok(()), Some(version)) = (validate_name(&name), version) else {
        return StatusCode::NOT_FOUND.into_response();
    };
    // Format 1 as it is (a local file with ranges and validators), format 2 expanded: agents
    // read no id tables.
    if st.store.is_local() {
        let path = st.store.manifest_path(&name, version);
        if !stored_in_format_2(&path).await {
            return match ServeFile::new(path).oneshot(req).await {
                Ok(resp) => resp.map(Body::new),
                Err(never) => match never {},
            };
        }
    }
    let key = Store::manifest_key(&name, version);
    let learn = !st.store.is_local();
    let st = st.clone();
    match tokio::task::spawn_blocking(move || {
        let bytes = st.store.served_manifest_bytes(&key)?;
        // Agents fetch frames from an object store by what this manifest says, even after gc
        // rewrites it.
        if let (true, Some(m)) = (
            learn,
            bytes
                .as_deref()
                .and_then(|b| fleetboot_image::Manifest::decode(b).ok()),
        ) {
            st.frames.learn(&m);
        }
        Ok::<_, crate::store::StoreError>(bytes)
    })
    .await
    {
        Ok(Ok(Some(bytes))) => bytes.into_response(),
        Ok(Ok(None)) => StatusCode::NOT_FOUND.into_response(),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "serving a manifest");
            let status = if learn {
                StatusCode::BAD_GATEWAY
            } else {
                StatusCode::INTERNAL_SERVER_ERROR
            };
            (status, e.to_string()).into_response()
        }
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

/// Whether the manifest file at `path` is format 2 (false if it cannot be read: ServeFile then
/// answers as it does for any missing file).
async fn stored_in_format_2(path: &std::path::Path) -> bool {
    use tokio::io::AsyncReadExt;
    let mut head = [0u8; 12];
    let Ok(mut f) = tokio::fs::File::open(path).await else {
        return false;
    };
    f.read_exact(&mut head).await.is_ok()
        && fleetboot_image::Manifest::format_of(&head)
            == Some(fleetboot_image::manifest::FORMAT_VERSION_TABLES)
}

/// Serves the router on `listener` until `shutdown` completes, with each request's peer address
/// known (install tokens are bound to it).
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<AppState>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let limits = limits::HttpLimits::from_config(&state.config().http);
    serve_limited(listener, state, &limits, shutdown).await
}

/// [`serve`] under the given limits.
pub async fn serve_limited(
    listener: tokio::net::TcpListener,
    state: Arc<AppState>,
    limits: &limits::HttpLimits,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    sendfile::serve(listener, app(state.clone()), Some(state), limits, shutdown).await
}

/// Serves `router` (the appliance's, maybe with test layers) under `limits`; every request goes
/// through the router (no `sendfile` path).
pub async fn serve_router(
    listener: tokio::net::TcpListener,
    router: Router,
    limits: &limits::HttpLimits,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    sendfile::serve(listener, router, None, limits, shutdown).await
}

/// `/boot/…`: a host's script, or a file from `boot_dir`.
async fn boot(
    State(st): State<Arc<AppState>>,
    Path(path): Path<String>,
    Peer(peer): Peer,
    req: Request,
) -> Response {
    if let Some(mac) = path.strip_suffix(".ipxe").and_then(|m| m.parse().ok()) {
        st.metrics.http_scripts.inc();
        return match script::for_host(st, mac, peer).await {
            Ok(text) => ([("content-type", "text/plain")], text).into_response(),
            Err(e) => e.into_response(),
        };
    }
    let boot_dir = st.config().boot_dir.clone();
    let file = match resolve_beneath(&boot_dir, &path) {
        Ok(f) => f,
        Err(e) => return AppError(StatusCode::NOT_FOUND, e.to_string()).into_response(),
    };
    match ServeFile::new(file).oneshot(req).await {
        Ok(resp) => resp.map(Body::new),
        Err(never) => match never {},
    }
}

async fn metrics(State(st): State<Arc<AppState>>) -> Response {
    let text = blocking(move || {
        let hosts = st.fleet().hosts().unwrap_or_default();
        let mut text = st.metrics.render(&hosts);
        if !st.store.is_local() {
            text.push_str(&st.frames.stats().render());
        }
        Ok(text)
    })
    .await;
    match text {
        Ok(text) => ([("content-type", "text/plain; version=0.0.4")], text).into_response(),
        Err(e) => e.into_response(),
    }
}
