//! `POST /webhooks/ordercloud`: verify, parse, classify, commit, answer.
//! The answer is 200 `{"proceed": true}` only after the intent (or the dedupe hit) is committed.

use std::time::Instant;

use axum::body::Body;
use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::value::RawValue;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use tracing::{field, info, warn, Span};

use super::limit::{self, NotRead};
use super::{error, AppState};
use crate::domain::credentials::{self, is_credential_key};
use crate::domain::intent::{submit_dedupe_key, IntentKind, IntentSecrets, RawIntent};
use crate::domain::now_ms;
use crate::ordercloud::envelope::Webhook;
use crate::ordercloud::routes::{classify, RouteMatch};
use crate::ordercloud::{signature, token};
use crate::store::{EnqueueOutcome, NewIntent, UNIDENTIFIED_SHOPPER};

pub(super) async fn receive(State(app): State<AppState>, headers: HeaderMap, body: Body) -> Response {
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
    if let Some(reason) = refusal(outcome) {
        // Anyone can send these: counted, and logged sparingly (never the body).
        app.refusals
            .refused(reason, "webhook refused before it was read or verified");
    } else if outcome == "busy" {
        // Counted and logged sparingly where it was refused (`limit::busy`).
    } else {
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
    }
    metrics::counter!("forwarder_webhooks_total", "route" => kind, "outcome" => outcome).increment(1);
    metrics::histogram!("forwarder_intake_duration_seconds", "outcome" => outcome).record(latency.as_secs_f64());
    response
}

/// The refusal reason of an outcome that an unauthenticated client can cause.
fn refusal(outcome: &'static str) -> Option<&'static str> {
    matches!(outcome, "401" | "413" | "400" | "408").then_some(outcome)
}

fn proceed() -> Response {
    ([(CONTENT_TYPE, "application/json")], r#"{"proceed":true}"#).into_response()
}

/// Returns (route kind, outcome label, answer).
async fn handle(
    app: &AppState,
    headers: &HeaderMap,
    body: Body,
    span: &Span,
) -> (&'static str, &'static str, Response) {
    let max = app.settings.server.max_body_bytes;
    // The declared length is checked before anything is read; the limit and the read timeout hold
    // while reading, whatever was declared.
    let declared_too_large = headers
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok())
        .is_some_and(|len| len > max);
    if declared_too_large {
        return too_large(max);
    }
    // Header names are case-insensitive in HeaderMap, so x-oc-hash and X-OC-HASH both match.
    let expected = match signature::expected(headers.get("x-oc-hash").map(|v| v.as_bytes())) {
        Ok(expected) => expected,
        Err(e) => {
            return (
                "unknown",
                "401",
                closing(error(StatusCode::UNAUTHORIZED, e.to_string())),
            )
        }
    };
    let read = tokio::time::timeout(app.settings.server.read_timeout(), app.limits.read(body, max)).await;
    // What the webhook holds until it is answered: its body's bytes and its slot.
    let (body, _held) = match read {
        Ok(Ok(read)) => read,
        Ok(Err(NotRead::TooLarge)) => return too_large(max),
        Ok(Err(NotRead::Busy)) => return ("unknown", "busy", limit::busy(app)),
        Ok(Err(NotRead::Unreadable)) => {
            return (
                "unknown",
                "400",
                closing(error(StatusCode::BAD_REQUEST, "cannot read the request body")),
            )
        }
        Err(_) => {
            return (
                "unknown",
                "408",
                closing(error(
                    StatusCode::REQUEST_TIMEOUT,
                    format!(
                        "the body did not arrive within server.read_timeout_ms ({} ms)",
                        app.settings.server.read_timeout_ms
                    ),
                )),
            )
        }
    };

    if let Err(e) = signature::verify_expected(&expected, &body, &app.settings.ordercloud.hash_keys) {
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
    let mut item = new_intent(webhook, route, &body);
    if let Some(reason) = unkeyable(&item) {
        return (kind, "400", error(StatusCode::BAD_REQUEST, reason));
    }
    let identity_known = enrich_with_known_identity(app, &mut item);
    span.record("shopper", item.shopper_key.as_str());
    if let Some(reason) = &item.dead_reason {
        warn!(parent: span, reason = reason.as_str(), "webhook stored as a dead letter");
    }
    match app.store.enqueue(item).await {
        Ok(EnqueueOutcome::Queued(_)) => {
            if identity_known {
                metrics::counter!("forwarder_identity_lookups_total", "source" => "memory").increment(1);
            }
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

/// Longest shopper or dedupe key taken (OrderCloud's IDs are at most 100 characters).
const MAX_KEY_BYTES: usize = 1024;

/// Why the webhook's IDs cannot key a shopper's queue or its dedupe (a control character, which
/// PostgreSQL cannot store in a key if it is U+0000, or an ID no OrderCloud object has), if so.
fn unkeyable(item: &NewIntent) -> Option<&'static str> {
    [&item.shopper_key, &item.dedupe_key]
        .into_iter()
        .any(|key| key.len() > MAX_KEY_BYTES || key.chars().any(char::is_control))
        .then_some("an ID in the webhook (order, user or token claim) holds control characters or is too long to be OrderCloud's")
}

fn too_large(max: usize) -> (&'static str, &'static str, Response) {
    (
        "unknown",
        "413",
        closing(error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("body exceeds server.max_body_bytes ({max} bytes)"),
        )),
    )
}

/// The answer, and the connection closed after it: what is left of the body is not read.
fn closing(mut response: Response) -> Response {
    response
        .headers_mut()
        .insert(axum::http::header::CONNECTION, HeaderValue::from_static("close"));
    response
}

/// A registered shopper's line change whose identity enrichment has stored already is stored
/// enriched, as enrichment would find it, and without its token: it skips the enrichment round.
/// True when it was.
fn enrich_with_known_identity(app: &AppState, item: &mut NewIntent) -> bool {
    use crate::delivery::enrich::{answerable_with_identity, with_known_identity};
    if !item.needs_enrichment || item.dead_reason.is_some() || !answerable_with_identity(&item.intent) {
        return false;
    }
    let Some(identity) = app.identities.get(&item.shopper_key) else {
        return false;
    };
    match serde_json::to_value(with_known_identity(&item.intent, identity)) {
        Ok(enrichment) => {
            item.enrichment = Some(enrichment);
            item.needs_enrichment = false;
            true
        }
        Err(_) => false,
    }
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
    let claims = match user_token.as_deref() {
        None => Err(token::TokenError::Missing),
        Some(t) => token::decode_claims(t),
    };
    let token_order = claims.as_ref().ok().and_then(|c| c.orderid.as_deref());
    let submitted_order = (route.kind == IntentKind::OrderSubmitted)
        .then(|| submitted_order_id(order_id.as_deref(), token_order, &response_body))
        .flatten();
    let (shopper_key, dead_reason) = match claims.as_ref().map_err(Clone::clone).and_then(token::shopper_key) {
        Ok(key) => (key, None),
        Err(e) => (
            UNIDENTIFIED_SHOPPER.to_string(),
            Some(format!("{e}: cannot tell which shopper acted")),
        ),
    };
    let dedupe_key = match &submitted_order {
        // One submit per order, whether it comes as a webhook or from reconciliation. A submit that
        // names no shopper is a dead letter under its LogID instead: it does not stand for the
        // order, which reconciliation can still find and send under the shopper it names.
        Some(order) if dead_reason.is_none() => submit_dedupe_key(order),
        _ => log_id.unwrap_or_else(|| format!("sha256:{:x}", Sha256::digest(raw_body))),
    };
    let anon_key = query_params
        .keys()
        .find(|k| k.eq_ignore_ascii_case("anonUserToken"))
        .cloned();
    let anon_user_token = anon_key.and_then(|k| query_params.remove(&k)).and_then(|v| match v {
        Value::String(s) if !s.is_empty() => Some(s),
        _ => None,
    });

    // Register answers carry the new user's access_token: a live credential, kept with the secrets.
    let [registered_token] = take_strings(&mut response_body, ["access_token"]);
    // No credential is stored with the intent, at any depth (a password in `xp`, a token in a
    // query parameter): they are erased before the store ever sees them.
    strip_credentials(&mut request_body);
    strip_credentials(&mut response_body);
    strip_credentials_in_map(&mut query_params);

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
        enrichment: None,
    }
}

/// The ID of the order a submit webhook submitted: the route's `orderID`, else the `ID` of the
/// Order it answered with (Cart API routes name no order), else an anonymous token's `orderid`.
fn submitted_order_id(route_order: Option<&str>, token_order: Option<&str>, response: &RawValue) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct OrderId {
        #[serde(rename = "ID")]
        id: Option<String>,
    }
    route_order
        .map(str::to_string)
        .or_else(|| serde_json::from_str::<OrderId>(response.get()).ok().and_then(|o| o.id))
        .or_else(|| token_order.map(str::to_string))
        .filter(|id| !id.is_empty())
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

/// Removes every credential-like key ([`credentials::is_credential_key`]) of a body, at every depth. The body is
/// parsed only when its text may hold one (most bodies are stored as they came).
fn strip_credentials(body: &mut Box<RawValue>) {
    let text = body.get().as_bytes();
    // A key may be spelled with escapes (`"Passw\u006frd"`): such a body is parsed too.
    let may_hold = may_hold_credential(text);
    if !may_hold {
        return;
    }
    let Ok(mut value) = serde_json::from_str::<Value>(body.get()) else {
        return;
    };
    if credentials::strip(&mut value) {
        *body = serde_json::value::to_raw_value(&value).expect("a JSON value serializes");
    }
}

fn strip_credentials_in_map(map: &mut Map<String, Value>) {
    map.retain(|k, _| !is_credential_key(k));
    for value in map.values_mut() {
        credentials::strip(value);
    }
}

/// Whether a body's text may hold a credential-like key: one of the words of [`is_credential_key`]
/// in any letter case, or an escape (`\u`) that could spell one. One pass over the bytes, looking
/// closer only where a word could start: most bodies hold none and are stored as they came.
fn may_hold_credential(text: &[u8]) -> bool {
    const WORDS: [&[u8]; 4] = [b"pass", b"pwd", b"token", b"secret"];
    text.iter().enumerate().any(|(at, byte)| match byte | 0x20 {
        b'p' | b't' | b's' => WORDS
            .iter()
            .any(|w| text.len() - at >= w.len() && text[at..at + w.len()].eq_ignore_ascii_case(w)),
        // `\` | 0x20 is `|`: a backslash, followed by `u`.
        b'|' => *byte == b'\\' && text.get(at + 1) == Some(&b'u'),
        _ => false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(text: &str) -> Box<RawValue> {
        RawValue::from_string(text.to_string()).unwrap()
    }

    #[test]
    fn the_quick_scan_finds_every_word_in_any_case_and_escapes() {
        for text in [
            "PaSsWoRd",
            "xpwd",
            "apiTOKEN",
            "Secret",
            "tokenx",
            r#""Passw\u006frd""#,
            r"a\u0041",
        ] {
            assert!(may_hold_credential(text.as_bytes()), "{text}");
        }
        for text in [
            r#"{"ID":"abc","Quantity":2,"Product":{"Name":"Shoes"}}"#,
            "pas",
            "toke",
            "\\n",
            "secre",
            "",
        ] {
            assert!(!may_hold_credential(text.as_bytes()), "{text}");
        }
    }

    #[test]
    fn credentials_are_stripped_at_every_depth_in_any_letter_case() {
        let mut body = raw(
            r#"{"Username":"jo","PASSWORD":"a","xp":{"nested":[{"apiToken":"b","ok":1}],"ClientSecret":"c","Pwd":"d"},"Passw\u006frd":"e"}"#,
        );
        strip_credentials(&mut body);
        assert_eq!(body.get(), r#"{"Username":"jo","xp":{"nested":[{"ok":1}]}}"#);
        // Words in values are not keys: nothing removed, the text kept as it came.
        let text = r#"{ "Name": "Passport holder", "Note": "a token of thanks" }"#;
        let mut body = raw(text);
        strip_credentials(&mut body);
        assert_eq!(body.get(), text);
        let mut query: Map<String, Value> =
            serde_json::from_str(r#"{"anonusertoken":"x","page":"2","filters":{"password":"y"}}"#).unwrap();
        strip_credentials_in_map(&mut query);
        assert_eq!(Value::Object(query), serde_json::json!({"page": "2", "filters": {}}));
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
