//! A submit built from an order OrderCloud lists but the service never got a webhook for: the
//! intent a submit webhook of that order would have stored, enriched already (the order and its
//! lines were read with the forwarder's own API client), planned like any other submit.

use serde_json::value::RawValue;
use serde_json::{Map, Value};

use crate::delivery::enrich::{profile_of, Enrichment};
use crate::domain::credentials;
use crate::domain::intent::{submit_dedupe_key, IntentKind, IntentSecrets, RawIntent, RouteFamily};
use crate::planner::lines::Line;
use crate::store::NewIntent;

/// Who placed an order: its CDP identity and the queue of the shopper's intents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shopper {
    pub identity: String,
    pub shopper_key: String,
    pub anonymous: bool,
}

/// `anon-<orderID>` when the order's `FromUser.Username` is an anonymous shopper's (a default
/// context user, or listed in `reconcile.anonymous_usernames`); `<FromCompanyID>-<FromUser.ID>`
/// otherwise, in the queue `user:<api host>:<Username>` that the shopper's webhooks use.
pub fn shopper_of(order: &Value, api_url: &str, anonymous_usernames: &[String]) -> Option<Shopper> {
    let text = |pointer: &str| order.pointer(pointer).and_then(Value::as_str).filter(|s| !s.is_empty());
    let order_id = text("/ID")?;
    let username = text("/FromUser/Username");
    if username.is_none_or(|u| anonymous_usernames.iter().any(|a| a == u)) {
        return Some(Shopper {
            identity: format!("anon-{order_id}"),
            shopper_key: format!("anon-{order_id}"),
            anonymous: true,
        });
    }
    let buyer = text("/FromCompanyID")?;
    let user = text("/FromUser/ID").or_else(|| text("/FromUserID"))?;
    let host = api_url
        .trim_start_matches("https://")
        .trim_start_matches("http://")
        .trim_end_matches('/');
    Some(Shopper {
        identity: format!("{buyer}-{user}"),
        shopper_key: format!("user:{host}:{}", username?),
        anonymous: false,
    })
}

/// The intent of the order's submit, with what enrichment would have found.
pub fn submit_of(order: &Value, lines: Vec<Value>, shopper: Shopper, api_url: &str, submitted_at_ms: i64) -> NewIntent {
    // No credential is stored with an intent (a password or a token in an `xp`), as at intake.
    let mut order = order.clone();
    credentials::strip(&mut order);
    let order = &order;
    // Of each line, what planning reads, as enrichment keeps it (`Line::kept`).
    let lines: Vec<Value> = lines
        .into_iter()
        .map(|mut line| {
            credentials::strip(&mut line);
            Line::kept(&line)
        })
        .collect();
    let order_id = order.get("ID").and_then(Value::as_str).unwrap_or_default().to_string();
    let enrichment = Enrichment {
        identity: shopper.identity.clone(),
        profile: profile_of(order.get("FromUser").unwrap_or(&Value::Null)),
        order_id: Some(order_id.clone()),
        order_currency: order.get("Currency").and_then(Value::as_str).map(str::to_string),
        order_total: order.get("Total").and_then(Value::as_f64),
        lines: Some(lines),
        ..Enrichment::default()
    };
    let intent = RawIntent {
        kind: IntentKind::OrderSubmitted,
        family: RouteFamily::Orders,
        verb: "POST".into(),
        route: "v1/orders/{direction}/{orderID}/submit".into(),
        direction: Some("Incoming".into()),
        order_id: Some(order_id.clone()),
        line_item_id: None,
        occurred_at_ms: submitted_at_ms,
        request_body: raw(&Value::Object(Map::new())),
        response_body: raw(order),
        query_params: Map::new(),
        client_id: None,
        api_url: Some(api_url.to_string()),
        anonymous: shopper.anonymous,
        anon_order_id: shopper.anonymous.then(|| order_id.clone()),
        token_expires_at: None,
    };
    NewIntent {
        dedupe_key: submit_dedupe_key(&order_id),
        shopper_key: shopper.shopper_key,
        intent,
        secrets: IntentSecrets::default(),
        dead_reason: None,
        needs_enrichment: false,
        enrichment: serde_json::to_value(&enrichment).ok(),
    }
}

fn raw(value: &Value) -> Box<RawValue> {
    serde_json::value::to_raw_value(value).expect("a JSON value serializes")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const API: &str = "https://westeurope-production.ordercloud.io";

    #[test]
    fn registered_and_anonymous_orders_get_their_identity_and_queue() {
        let registered = json!({"ID": "O1", "FromCompanyID": "buyer1", "FromUser": {"ID": "u1", "Username": "jo"}});
        assert_eq!(
            shopper_of(&registered, API, &[]),
            Some(Shopper {
                identity: "buyer1-u1".into(),
                shopper_key: "user:westeurope-production.ordercloud.io:jo".into(),
                anonymous: false
            })
        );
        let anonymous =
            json!({"ID": "O2", "FromCompanyID": "buyer1", "FromUser": {"ID": "tmpl", "Username": "anon-template"}});
        let shopper = shopper_of(&anonymous, API, &["anon-template".into()]).unwrap();
        assert_eq!((shopper.identity.as_str(), shopper.anonymous), ("anon-O2", true));
        assert_eq!(shopper.shopper_key, "anon-O2");
    }

    #[test]
    fn the_submit_is_enriched_and_keyed_by_its_order() {
        let order = json!({"ID": "O1", "FromCompanyID": "b", "FromUser": {"ID": "u", "Username": "jo", "Email": "jo@example.com"},
                           "Currency": "EUR", "Total": 12.5});
        let shopper = shopper_of(&order, API, &[]).unwrap();
        let submit = submit_of(&order, vec![json!({"ID": "L1"})], shopper, API, 1_000);
        assert_eq!(submit.dedupe_key, submit_dedupe_key("O1"));
        assert!(!submit.needs_enrichment);
        let enrichment: Enrichment = serde_json::from_value(submit.enrichment.unwrap()).unwrap();
        assert_eq!(enrichment.identity, "b-u");
        assert_eq!(enrichment.order_currency.as_deref(), Some("EUR"));
        assert_eq!(enrichment.lines.unwrap().len(), 1);
        assert_eq!(enrichment.profile.email.as_deref(), Some("jo@example.com"));
    }
}
