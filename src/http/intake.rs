//! `POST /webhooks/ordercloud`: verify, parse, classify, commit, answer.
//! The answer is 200 `{"proceed": true}` only after the intent (or the dedupe hit) is committed.

use std::time::Instant;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::value::RawValue;
use serde_json::Value;
use sha2::{Digest, Sha256};
use tracing::{field, info, warn, Span};

use super::{error, AppState};
use crate::domain::intent::{IntentSecrets, RawIntent};
use crate::domain::now_ms;
use crate::ordercloud::envelope::Webhook;
use crate::ordercloud::routes::{classify, RouteMatch};
use crate::ordercloud::{signature, token};
use crate::store::{EnqueueOutcome, NewIntent, UNIDENTIFIED_SHOPPER};

pub(super) async fn receive(
    State(app): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let started = Instant::now();
    let span = tracing::info_span!(
        "webhook",
        log_id = field::Empty,
        verb = field::Empty,
        route = field::Empty,
        shopper = field::Empty,
        outcome = field::Empty,
        status = field::Empty,
        latency_ms = field::Empty,
    );
    let (kind, outcome, response) = handle(&app, &headers, body, &span).await;
    let status = response.status().as_u16();
    let latency = started.elapsed();
    span.record("outcome", outcome);
    span.record("status", status);
    span.record("latency_ms", latency.as_secs_f64() * 1000.0);
    span.in_scope(|| {
        if status >= 500 {
            warn!("webhook not committed");
        } else {
            info!("webhook handled");
        }
    });
    metrics::counter!("forwarder_webhooks_total", "route" => kind, "outcome" => outcome).increment(1);
    metrics::histogram!("forwarder_intake_duration_seconds", "outcome" => outcome).record(latency.as_secs_f64());
    response
}

fn proceed() -> Response {
    ([(CONTENT_TYPE, "application/json")], r#"{"proceed":true}"#).into_response()
}

/// Returns (route kind, outcome label, answer).
async fn handle(
    app: &AppState,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
    span: &Span,
) -> (&'static str, &'static str, Response) {
    let max = app.settings.server.max_body_bytes;
    let declared_too_large = headers
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok())
        .is_some_and(|len| len > max);
    let body = match body {
        _ if declared_too_large => return too_large(max),
        Ok(body) if body.len() > max => return too_large(max),
        Ok(body) => body,
        Err(rejection) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => return too_large(max),
        Err(_) => {
            return (
                "unknown",
                "400",
                error(StatusCode::BAD_REQUEST, "cannot read the request body"),
            )
        }
    };

    // Header names are case-insensitive in HeaderMap, so x-oc-hash and X-OC-HASH both match.
    let signature_header = headers.get("x-oc-hash").map(|v| v.as_bytes());
    if let Err(e) = signature::verify(signature_header, &body, &app.settings.ordercloud.hash_keys) {
        return ("unknown", "401", error(StatusCode::UNAUTHORIZED, e.to_string()));
    }

    let webhook = match Webhook::parse(&body) {
        Ok(w) => w,
        Err(e) => {
            return (
                "unknown",
                "400",
                error(StatusCode::BAD_REQUEST, format!("not an OrderCloud webhook: {e}")),
            )
        }
    };
    span.record("verb", webhook.verb.as_str());
    span.record("route", webhook.route.as_str());
    if let Some(log_id) = &webhook.log_id {
        span.record("log_id", log_id.as_str());
    }

    let Some(route) = classify(&webhook.verb, &webhook.route) else {
        return ("other", "ignored", proceed());
    };
    let kind = route.kind.label();
    let item = new_intent(webhook, route, &body);
    span.record("shopper", item.shopper_key.as_str());
    if let Some(reason) = &item.dead_reason {
        warn!(parent: span, reason = reason.as_str(), "webhook stored as a dead letter");
    }
    match app.store.enqueue(item).await {
        Ok(EnqueueOutcome::Queued(_)) => {
            app.wake.notify_waiters();
            (kind, "accepted", proceed())
        }
        Ok(EnqueueOutcome::DeadLettered(_)) => (kind, "dead_letter", proceed()),
        Ok(EnqueueOutcome::Duplicate) => (kind, "duplicate", proceed()),
        Err(e) => {
            warn!(parent: span, error = %e, "store cannot commit");
            (
                kind,
                "503",
                error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "the forwarder cannot store the webhook right now; retry",
                ),
            )
        }
    }
}

fn too_large(max: usize) -> (&'static str, &'static str, Response) {
    (
        "unknown",
        "413",
        error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("body exceeds server.max_body_bytes ({max} bytes)"),
        ),
    )
}

/// Builds the stored intent. Tokens are moved into [`IntentSecrets`], never into the intent.
/// Takes the webhook by value: its parts move into the intent instead of being copied.
fn new_intent(webhook: Webhook, route: RouteMatch, raw_body: &[u8]) -> NewIntent {
    let direction = webhook.route_param("direction");
    let order_id = webhook.route_param("orderID");
    let line_item_id = webhook.route_param(if route.bundle { "bundleItemID" } else { "lineItemID" });
    let Webhook {
        route: route_text,
        verb,
        mut query_params,
        date,
        log_id,
        user_token,
        mut request_body,
        mut response_body,
        ..
    } = webhook;
    let dedupe_key = log_id.unwrap_or_else(|| format!("sha256:{:x}", Sha256::digest(raw_body)));
    let anon_key = query_params
        .keys()
        .find(|k| k.eq_ignore_ascii_case("anonUserToken"))
        .cloned();
    let anon_user_token = anon_key.and_then(|k| query_params.remove(&k)).and_then(|v| match v {
        Value::String(s) if !s.is_empty() => Some(s),
        _ => None,
    });

    // Register answers carry the new user's access_token: a live credential, kept with the secrets.
    let [registered_token, _refresh_token] = take_strings(&mut response_body, ["access_token", "refresh_token"]);
    take_strings(&mut request_body, ["Password"]);

    let claims = match user_token.as_deref() {
        None => Err(token::TokenError::Missing),
        Some(t) => token::decode_claims(t),
    };
    let (shopper_key, dead_reason) = match claims.as_ref().map_err(Clone::clone).and_then(token::shopper_key) {
        Ok(key) => (key, None),
        Err(e) => (
            UNIDENTIFIED_SHOPPER.to_string(),
            Some(format!("{e}: cannot tell which shopper acted")),
        ),
    };
    let claims = claims.unwrap_or_default();
    let intent = RawIntent {
        kind: route.kind,
        family: route.family,
        verb,
        route: route_text,
        direction,
        order_id,
        line_item_id,
        occurred_at_ms: date.map(|d| d.timestamp_millis()).unwrap_or_else(now_ms),
        request_body,
        response_body,
        query_params,
        client_id: claims.cid.clone(),
        api_url: claims.aud.clone(),
        anonymous: claims.is_anonymous(),
        anon_order_id: claims.orderid.clone(),
        token_expires_at: claims.exp,
    };
    let needs_enrichment = !crate::delivery::enrich::answerable_without_network(&intent);
    NewIntent {
        dedupe_key,
        shopper_key,
        intent,
        secrets: IntentSecrets {
            user_token,
            anon_user_token,
            registered_token,
        },
        dead_reason,
        needs_enrichment,
    }
}

/// Removes top-level fields of an object body, returning each one's value when it is a string.
/// The body is parsed only when it may hold one of them: most bodies are stored as they came.
fn take_strings<const N: usize>(body: &mut Box<RawValue>, names: [&str; N]) -> [Option<String>; N] {
    let text = body.get();
    // A key may be spelled with escapes (`"Passw\u006frd"`); such a body is parsed too.
    if !text.contains("\\u") && !names.iter().any(|name| text.contains(name)) {
        return [const { None }; N];
    }
    let Ok(Value::Object(mut map)) = serde_json::from_str::<Value>(text) else {
        return [const { None }; N];
    };
    let taken = names.map(|name| match map.remove(name) {
        Some(Value::String(s)) => Some(s),
        _ => None,
    });
    *body = serde_json::value::to_raw_value(&map).expect("a JSON object serializes");
    taken
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(text: &str) -> Box<RawValue> {
        RawValue::from_string(text.to_string()).unwrap()
    }

    #[test]
    fn take_strings_removes_secrets_and_leaves_other_bodies_as_they_came() {
        let mut body = raw(r#"{"access_token":"tok","refresh_token":"ref","expires_in":600}"#);
        let [access, refresh] = take_strings(&mut body, ["access_token", "refresh_token"]);
        assert_eq!((access.as_deref(), refresh.as_deref()), (Some("tok"), Some("ref")));
        assert_eq!(body.get(), r#"{"expires_in":600}"#);

        // A key spelled with escapes is still found.
        let mut body = raw(r#"{"Username":"jo","Passw\u006frd":"hunter2"}"#);
        take_strings(&mut body, ["Password"]);
        assert_eq!(body.get(), r#"{"Username":"jo"}"#);

        // Bodies without the names keep their exact text (no reformatting).
        let text = r#"{ "ID": "L1", "Quantity": 2 }"#;
        let mut body = raw(text);
        assert_eq!(take_strings(&mut body, ["Password"]), [None]);
        assert_eq!(body.get(), text);

        // Only top-level strings are taken; nested ones and non-objects stay.
        let mut body = raw(r#"{"xp":{"Password":"x"},"Password":7}"#);
        assert_eq!(take_strings(&mut body, ["Password"]), [None]);
        assert_eq!(body.get(), r#"{"xp":{"Password":"x"}}"#);
        let mut body = raw(r#"["Password"]"#);
        assert_eq!(take_strings(&mut body, ["Password"]), [None]);
        assert_eq!(body.get(), r#"["Password"]"#);
    }
}
