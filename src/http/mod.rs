//! The HTTP surface: webhook intake, health, metrics.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;

use crate::config::Settings;
use crate::store::DynStore;

pub mod admin;
mod intake;
mod limit;
pub mod refusals;
pub mod serve;

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    pub settings: Arc<Settings>,
    pub store: DynStore,
    pub health: crate::health::Health,
    /// Wakes the enrichment and delivery loops when an intent is committed.
    pub wake: Arc<tokio::sync::Notify>,
    /// Requests refused before they were verified: counted, logged sparingly.
    pub refusals: Arc<refusals::Refusals>,
    /// Bodies and webhooks in flight (`server.max_inflight`).
    pub limits: Arc<limit::Limits>,
    /// Registered shoppers' identities enrichment has stored (learned by the enricher).
    pub identities: Arc<crate::delivery::identities::KnownIdentities>,
}

impl AppState {
    pub fn new(
        settings: Arc<Settings>,
        store: DynStore,
        health: crate::health::Health,
        wake: Arc<tokio::sync::Notify>,
    ) -> AppState {
        let limits = Arc::new(limit::Limits::new(&settings.server));
        AppState {
            settings,
            store,
            health,
            wake,
            refusals: Arc::default(),
            limits,
            identities: Arc::default(),
        }
    }
}

/// The public port: the webhook, `/health/live` and `/health/ready` (status only: no error text);
/// without an operations listener (`server.admin_listen`), the operations routes too.
pub fn router(state: AppState) -> Router {
    let public = Router::new()
        .route("/webhooks/ordercloud", post(intake::receive))
        .route("/health/live", get(live))
        .route("/health/ready", get(ready_status));
    let public = match state.settings.server.admin_listen.as_deref() {
        Some(admin) if !admin.is_empty() => public,
        _ => public.merge(operations(state.clone())),
    };
    public.with_state(state)
}

/// The operations listener (`server.admin_listen`): `/metrics`, `/admin`, liveness and the
/// detailed readiness report.
pub fn admin_router(state: AppState) -> Router {
    Router::new()
        .route("/health/live", get(live))
        .route("/health/ready", get(ready_report))
        .merge(operations(state.clone()))
        .with_state(state)
}

/// `/metrics` and `/admin` (the detailed readiness report as `/admin/health`), wherever they are served.
fn operations(state: AppState) -> Router<AppState> {
    Router::new()
        .route("/metrics", get(metrics))
        .merge(admin::router(state))
}

async fn live() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

/// What readiness finds: the problems (`source: text`) and the warnings.
pub(crate) async fn readiness(app: &AppState) -> (Vec<String>, Vec<String>) {
    let mut problems = Vec::new();
    if let Err(e) = app.store.ping().await {
        problems.push(format!("store: {e}"));
    }
    problems.extend(app.health.problems());
    (problems, app.health.warnings())
}

/// For anyone: ready or not, which parts fail, and which warn (ready all the same) — never their
/// error text.
async fn ready_status(State(app): State<AppState>) -> Response {
    let (problems, warnings) = readiness(&app).await;
    let names = |list: &[String]| -> Vec<String> {
        list.iter()
            .map(|p| p.split(':').next().unwrap_or_default().to_string())
            .collect()
    };
    if problems.is_empty() {
        let mut body = json!({"status": "ready"});
        if !warnings.is_empty() {
            body["warnings"] = json!(names(&warnings));
        }
        return Json(body).into_response();
    }
    let failing: Vec<&str> = problems
        .iter()
        .map(|p| p.split(':').next().unwrap_or_default())
        .collect();
    (
        StatusCode::SERVICE_UNAVAILABLE,
        Json(json!({"status": "not ready", "failing": failing})),
    )
        .into_response()
}

/// For operators: every problem and warning, with its text.
pub(crate) async fn ready_report(State(app): State<AppState>) -> Response {
    let (problems, warnings) = readiness(&app).await;
    let mut body = if problems.is_empty() {
        json!({"status": "ready"})
    } else {
        json!({"status": "not ready", "reasons": problems})
    };
    if !warnings.is_empty() {
        body["warnings"] = json!(warnings);
    }
    let status = if problems.is_empty() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}

/// Prometheus text. The queue gauges are refreshed in the background
/// every few seconds ([`crate::telemetry::metrics_upkeep`]), not counted per scrape.
async fn metrics() -> Response {
    (
        [("content-type", "text/plain; version=0.0.4")],
        crate::telemetry::metrics_handle().render(),
    )
        .into_response()
}

/// A JSON error answer `{"error": reason}`.
pub(crate) fn error(status: StatusCode, reason: impl Into<String>) -> Response {
    (status, Json(json!({"error": reason.into()}))).into_response()
}
