//! The HTTP surface: webhook intake, health, metrics.

use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;

use crate::config::Settings;
use crate::store::DynStore;

pub mod admin;
mod intake;

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    pub settings: Arc<Settings>,
    pub store: DynStore,
    pub health: crate::health::Health,
    /// Wakes the enrichment and delivery loops when an intent is committed.
    pub wake: Arc<tokio::sync::Notify>,
}

pub fn router(state: AppState) -> Router {
    // Axum's own limit is set above ours so that intake answers 413 itself, with its metrics.
    let body_limit = state.settings.server.max_body_bytes;
    Router::new()
        .route(
            "/webhooks/ordercloud",
            post(intake::receive).layer(DefaultBodyLimit::max(body_limit)),
        )
        .route("/health/live", get(live))
        .route("/health/ready", get(ready))
        .route("/metrics", get(metrics))
        .merge(admin::router(state.clone()))
        .with_state(state)
}

async fn live() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

async fn ready(State(app): State<AppState>) -> Response {
    let mut problems = Vec::new();
    if let Err(e) = app.store.ping().await {
        problems.push(format!("store: {e}"));
    }
    problems.extend(app.health.problems());
    let warnings = app.health.warnings();
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

async fn metrics(State(app): State<AppState>) -> Response {
    if let Ok(stats) = app.store.stats().await {
        metrics::gauge!("forwarder_queue_pending").set(stats.pending as f64);
        metrics::gauge!("forwarder_dead_letters").set(stats.dead as f64);
        metrics::gauge!("forwarder_queue_oldest_pending_age_seconds").set(stats.oldest_pending_age_ms as f64 / 1000.0);
    }
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
