//! `/admin`: dead letters and the queue over HTTP. Off unless `admin.token` is set; the bearer
//! token is compared in constant time.

use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use hmac::{Hmac, Mac};
use serde::Deserialize;
use serde_json::json;
use sha2::Sha256;

use super::{error, AppState};
use crate::dead_letters::{self, Selection};

pub fn router(state: AppState) -> Router<AppState> {
    Router::new()
        .route("/admin/dead-letters", get(list))
        .route("/admin/dead-letters/replay", post(replay))
        .route("/admin/dead-letters/purge", post(purge))
        .route("/admin/queue", get(queue))
        .route("/admin/health", get(super::ready_report))
        .layer(middleware::from_fn_with_state(state, authorize))
}

/// Constant-time comparison: both sides are MACed with a per-process random key and the MACs
/// compared with `verify_slice`, so neither the token's content nor its length leaks through timing.
fn token_matches(given: &str, expected: &str) -> bool {
    static KEY: std::sync::OnceLock<[u8; 32]> = std::sync::OnceLock::new();
    let key = KEY.get_or_init(rand::random);
    let mac = |text: &str| {
        let mut m = Hmac::<Sha256>::new_from_slice(key).expect("any key length");
        m.update(text.as_bytes());
        m
    };
    let expected = mac(expected).finalize().into_bytes();
    mac(given).verify_slice(&expected).is_ok()
}

async fn authorize(
    State(app): State<AppState>,
    headers: HeaderMap,
    request: axum::extract::Request,
    next: Next,
) -> Response {
    let Some(token) = app.settings.admin.token.as_ref().filter(|t| !t.is_empty()) else {
        return error(
            StatusCode::NOT_FOUND,
            "the admin API is off: set admin.token to enable it",
        );
    };
    let given = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if !token_matches(given, token.expose()) {
        return error(StatusCode::UNAUTHORIZED, "missing or wrong bearer token");
    }
    next.run(request).await
}

#[derive(Deserialize)]
struct ListQuery {
    since: Option<String>,
    limit: Option<usize>,
}

async fn list(State(app): State<AppState>, Query(q): Query<ListQuery>) -> Response {
    let since = match q.since.as_deref().map(dead_letters::parse_time).transpose() {
        Ok(s) => s,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    match dead_letters::list(&*app.store, since, q.limit.unwrap_or(100).min(10_000)).await {
        Ok(list) => Json(json!({"dead_letters": list})).into_response(),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

#[derive(Deserialize)]
struct ReplayBody {
    ids: Option<Vec<i64>>,
    #[serde(default)]
    all: bool,
    since: Option<String>,
}

async fn replay(State(app): State<AppState>, Json(body): Json<ReplayBody>) -> Response {
    let selection = match (body.ids, body.all, body.since) {
        (Some(ids), false, None) => Selection::Ids(ids),
        (None, true, None) => Selection::All,
        (None, false, Some(since)) => match dead_letters::parse_time(&since) {
            Ok(t) => Selection::Since(t),
            Err(e) => return error(StatusCode::BAD_REQUEST, e),
        },
        _ => return error(StatusCode::BAD_REQUEST, "give exactly one of ids, all or since"),
    };
    match dead_letters::replay(&*app.store, &selection).await {
        Ok(n) => {
            app.wake.notify_waiters();
            Json(json!({"replayed": n})).into_response()
        }
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

#[derive(Deserialize)]
struct PurgeBody {
    before: String,
    /// Without it, the answer only says how many would go.
    #[serde(default)]
    confirm: bool,
    /// Allows a `before` later than an hour ago.
    #[serde(default)]
    force: bool,
}

async fn purge(State(app): State<AppState>, Json(body): Json<PurgeBody>) -> Response {
    let before = match dead_letters::parse_time(&body.before) {
        Ok(t) => t,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    if let Err(e) = dead_letters::check_purge_age(before, body.force) {
        return error(StatusCode::BAD_REQUEST, format!("{e}: send \"force\": true"));
    }
    if !body.confirm {
        return match app.store.count_dead_letters_before(before).await {
            Ok(n) => Json(json!({
                "would_purge": n,
                "purged": 0,
                "confirm": "nothing was purged: send the same request with \"confirm\": true",
            }))
            .into_response(),
            Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
        };
    }
    match dead_letters::purge(&*app.store, before).await {
        Ok(n) => Json(json!({"purged": n})).into_response(),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

async fn queue(State(app): State<AppState>) -> Response {
    match (app.store.stats().await, app.store.pending(100).await) {
        (Ok(stats), Ok(pending)) => Json(json!({"stats": stats, "oldest": pending})).into_response(),
        (Err(e), _) | (_, Err(e)) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn token_comparison() {
        assert!(super::token_matches("a-long-admin-token", "a-long-admin-token"));
        assert!(!super::token_matches("a-long-admin-tokeN", "a-long-admin-token"));
        assert!(!super::token_matches("", "a-long-admin-token"));
    }
}
