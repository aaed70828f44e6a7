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
//! GET  /metrics                         Prometheus text format
//! GET  /                                dashboard
//! ```

pub mod api;
mod dashboard;
pub mod packs;
mod script;

use crate::bootfiles::resolve_beneath;
use crate::config::Config;
use crate::fleet::FleetState;
use crate::metrics::Metrics;
use crate::store::Store;
use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use std::sync::{Arc, Mutex, RwLock};
use tower::ServiceExt;
use tower_http::services::{ServeDir, ServeFile};

/// Everything the handlers share.
pub struct AppState {
    /// The configuration in force; replaced whole on reload.
    pub config: RwLock<Arc<Config>>,
    pub store: Store,
    pub fleet: Mutex<FleetState>,
    pub metrics: Arc<Metrics>,
    /// How machines reach the appliance, e.g. `http://10.0.0.1:80`.
    pub base_url: String,
    /// Bearer token of the admin API (`None`: the admin API answers 403).
    pub admin_token: Option<String>,
    /// Pack files kept open for range reads.
    pub packs: packs::OpenPacks,
}

impl AppState {
    /// The state for `config`: its store, its fleet database (opened here), fresh counters.
    /// `base_url` is how machines reach the appliance; no `admin_token`: the admin API is off.
    pub fn new(
        config: Config,
        base_url: String,
        admin_token: Option<String>,
    ) -> Result<Arc<AppState>, crate::fleet::StateError> {
        let fleet = FleetState::open(&config.state_dir)?;
        Ok(Arc::new(AppState {
            store: Store::new(&config.store),
            config: RwLock::new(Arc::new(config)),
            fleet: Mutex::new(fleet),
            metrics: Arc::new(Metrics::default()),
            base_url,
            admin_token,
            packs: Default::default(),
        }))
    }

    pub fn config(&self) -> Arc<Config> {
        self.config
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn fleet(&self) -> std::sync::MutexGuard<'_, FleetState> {
        self.fleet.lock().unwrap_or_else(|p| p.into_inner())
    }
}

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
        AppError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
    }
}

/// The router.
pub fn app(state: Arc<AppState>) -> Router {
    let store_root = state.store.root().to_path_buf();
    Router::new()
        .route("/", get(dashboard::page))
        .route("/metrics", get(metrics))
        .route("/boot/{*path}", get(boot))
        .route("/api/agent/{mac}/assignment", get(api::assignment))
        .route("/api/agent/{mac}/progress", post(api::progress))
        .route("/api/agent/{mac}/done", post(api::done))
        .route("/api/agent/{mac}/failed", post(api::failed))
        .route("/api/hosts", get(api::hosts))
        .route("/api/reimage", post(api::reimage))
        .route("/store/packs/{name}", get(packs::get))
        .nest_service(
            "/store/manifests",
            ServeDir::new(store_root.join("manifests")).redirect_to_trailing_slash(false),
        )
        .with_state(state)
}

/// `/boot/…`: a host's script, or a file from `boot_dir`.
async fn boot(State(st): State<Arc<AppState>>, Path(path): Path<String>, req: Request) -> Response {
    if let Some(mac) = path.strip_suffix(".ipxe").and_then(|m| m.parse().ok()) {
        st.metrics.http_scripts.inc();
        return match script::for_host(&st, mac) {
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
    let text = st.metrics.render(&st.fleet().hosts().unwrap_or_default());
    ([("content-type", "text/plain; version=0.0.4")], text).into_response()
}

/// A random token (hex of 16 bytes from the kernel's CSPRNG).
pub fn random_token() -> Result<String, AppError> {
    let mut buf = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut buf))
        .map_err(|e| {
            AppError(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("no randomness: {e}"),
            )
        })?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

/// Compares secrets in constant time.
pub fn same_secret(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}
