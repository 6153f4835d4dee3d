//! The webhook envelope OrderCloud posts (WebhookPayload in the .NET SDK), parsed tolerantly:
//! unknown fields are ignored and any field may be null.
//!
//! The request and response bodies are kept as the webhook's JSON text (checked, not parsed into a
//! tree): intake stores them as they came, and delivery parses them when it reads them.

use chrono::{DateTime, FixedOffset};
use serde::{Deserialize, Deserializer};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

/// One webhook as OrderCloud sends it.
#[derive(Debug, Clone, Deserialize)]
pub struct Envelope {
    #[serde(rename = "Route")]
    pub route: Option<String>,
    #[serde(rename = "RouteParams", default, deserialize_with = "object_or_empty")]
    pub route_params: Map<String, Value>,
    #[serde(rename = "QueryParams", default, deserialize_with = "object_or_empty")]
    pub query_params: Map<String, Value>,
    #[serde(rename = "Verb")]
    pub verb: Option<String>,
    #[serde(rename = "Date", default)]
    pub date: Option<String>,
    #[serde(rename = "LogID", default)]
    pub log_id: Option<String>,
    #[serde(rename = "UserToken", default)]
    pub user_token: Option<String>,
    #[serde(rename = "Request", default)]
    pub request: Option<Message>,
    #[serde(rename = "Response", default)]
    pub response: Option<Message>,
}

/// `Request` or `Response`: the body (the headers, which OrderCloud sends as null since v1.0.169,
/// and the envelope's ConfigData are not read).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Message {
    #[serde(rename = "Body", default)]
    pub body: Option<Box<RawValue>>,
}

/// The deepest nesting of arrays and objects a webhook may have, counting the envelope itself.
///
/// One limit from intake to delivery: a webhook within it is stored, and its intent — which nests
/// the webhook's bodies one level less deep than the envelope does — decodes at claim (serde_json
/// reads 127 levels, one less than this). Deeper is answered 400 at intake; a stored row that still
/// cannot be decoded is dead-lettered on its own at claim.
pub const MAX_DEPTH: usize = 128;

/// Why a signed body is not a webhook; the reason is short and carries no body content.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeError {
    #[error("body is not a JSON object")]
    NotJson,
    #[error("body nests arrays and objects deeper than {MAX_DEPTH} levels")]
    TooDeep,
    /// JSON that parses only when skipped: a number out of range (`1e400`), an unpaired surrogate
    /// (`"\ud800"`). Stored, it could not be read back.
    #[error("a body holds a value that cannot be read back (a number out of range or an invalid escape)")]
    Unreadable,
    #[error("{0} is missing")]
    Missing(&'static str),
    #[error("Date is not an RFC 3339 timestamp")]
    BadDate,
}

/// A checked envelope: route and verb present, date parsed.
#[derive(Debug, Clone)]
pub struct Webhook {
    pub route: String,
    /// Upper case.
    pub verb: String,
    pub route_params: Map<String, Value>,
    pub query_params: Map<String, Value>,
    pub date: Option<DateTime<FixedOffset>>,
    pub log_id: Option<String>,
    pub user_token: Option<String>,
    /// The JSON text of `Request.Body` (`null` when absent).
    pub request_body: Box<RawValue>,
    /// The JSON text of `Response.Body` (`null` when absent).
    pub response_body: Box<RawValue>,
}

impl Webhook {
    pub fn parse(body: &[u8]) -> Result<Webhook, EnvelopeError> {
        // An object, not an array read field by field into the envelope.
        if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
            return Err(EnvelopeError::NotJson);
        }
        // The bodies are kept as text here (serde_json skips them without counting their depth):
        // what delivery could not parse back is refused now.
        if !nesting_within(body, MAX_DEPTH) {
            return Err(EnvelopeError::TooDeep);
        }
        let env: Envelope = serde_json::from_slice(body).map_err(|_| EnvelopeError::NotJson)?;
        let route = env
            .route
            .filter(|r| !r.is_empty())
            .ok_or(EnvelopeError::Missing("Route"))?;
        let verb = env
            .verb
            .filter(|v| !v.is_empty())
            .ok_or(EnvelopeError::Missing("Verb"))?;
        let date = match env.date.as_deref().filter(|d| !d.is_empty()) {
            None => None,
            Some(d) => Some(DateTime::parse_from_rfc3339(d).map_err(|_| EnvelopeError::BadDate)?),
        };
        let request_body = env
            .request
            .and_then(|m| m.body)
            .unwrap_or_else(|| RawValue::NULL.to_owned());
        let response_body = env
            .response
            .and_then(|m| m.body)
            .unwrap_or_else(|| RawValue::NULL.to_owned());
        // The bodies were only skipped over: read them through once, allocating nothing, so that
        // what is stored can be read back.
        for body in [&request_body, &response_body] {
            serde_json::from_str::<ReadBack>(body.get()).map_err(|_| EnvelopeError::Unreadable)?;
        }
        Ok(Webhook {
            route: route.trim_start_matches('/').to_string(),
            verb: verb.to_ascii_uppercase(),
            route_params: env.route_params,
            query_params: env.query_params,
            date,
            // A LogID that cannot be a key (control characters, or too long to be OrderCloud's GUID)
            // is as good as none: the webhook is deduplicated on its body's hash.
            log_id: env
                .log_id
                .filter(|l| !l.is_empty() && l.len() <= 256 && !l.chars().any(char::is_control)),
            user_token: env.user_token.filter(|t| !t.is_empty()),
            request_body,
            response_body,
        })
    }

    /// A route parameter looked up case-insensitively (`orderID`, `OrderID`, …).
    pub fn route_param(&self, name: &str) -> Option<String> {
        lookup_ci(&self.route_params, name)
    }

    /// A query parameter looked up case-insensitively.
    pub fn query_param(&self, name: &str) -> Option<String> {
        lookup_ci(&self.query_params, name)
    }
}

/// A JSON value read through — every number converted, every string unescaped — and dropped: what
/// delivery does with a stored body, without building it.
struct ReadBack;

impl<'de> Deserialize<'de> for ReadBack {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ReadBackVisitor)
    }
}

struct ReadBackVisitor;

impl<'de> serde::de::Visitor<'de> for ReadBackVisitor {
    type Value = ReadBack;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E>(self, _: bool) -> Result<ReadBack, E> {
        Ok(ReadBack)
    }
    fn visit_i64<E>(self, _: i64) -> Result<ReadBack, E> {
        Ok(ReadBack)
    }
    fn visit_u64<E>(self, _: u64) -> Result<ReadBack, E> {
        Ok(ReadBack)
    }
    fn visit_f64<E>(self, _: f64) -> Result<ReadBack, E> {
        Ok(ReadBack)
    }
    fn visit_str<E>(self, _: &str) -> Result<ReadBack, E> {
        Ok(ReadBack)
    }
    fn visit_unit<E>(self) -> Result<ReadBack, E> {
        Ok(ReadBack)
    }
    fn visit_none<E>(self) -> Result<ReadBack, E> {
        Ok(ReadBack)
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<ReadBack, D::Error> {
        ReadBack::deserialize(d)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<ReadBack, A::Error> {
        while seq.next_element::<ReadBack>()?.is_some() {}
        Ok(ReadBack)
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<ReadBack, A::Error> {
        while map.next_entry::<ReadBack, ReadBack>()?.is_some() {}
        Ok(ReadBack)
    }
}

/// Whether the arrays and objects of a JSON text nest at most `max` levels deep (brackets inside
/// strings do not count). Malformed text is left to the parser.
fn nesting_within(json: &[u8], max: usize) -> bool {
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for &b in json {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'{' | b'[' => {
                depth += 1;
                if depth > max {
                    return false;
                }
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    true
}

fn lookup_ci(map: &Map<String, Value>, name: &str) -> Option<String> {
    map.iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .and_then(|(_, v)| match v {
            Value::String(s) if !s.is_empty() => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            _ => None,
        })
}

fn object_or_empty<'de, D: Deserializer<'de>>(d: D) -> Result<Map<String, Value>, D::Error> {
    Ok(match Option::<Value>::deserialize(d)? {
        Some(Value::Object(map)) => map,
        _ => Map::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_documented_example_with_seven_fraction_digits() {
        let body = br#"{"Route":"v1/buyers/{buyerID}","RouteParams":{"buyerID":"buyer_10"},"QueryParams":{},"Verb":"PUT","Date":"2021-04-04T19:41:39.6504645+00:00","LogID":"71ce120a-17d5-4833-89f6-4f9a33ddd42f","UserToken":"...","Request":{"Body":{"Active":true},"Headers":null},"Response":{"Body":{},"Headers":null},"ConfigData":{"config_key":"config_value"},"Unknown":1}"#;
        let w = Webhook::parse(body).unwrap();
        assert_eq!(w.route, "v1/buyers/{buyerID}");
        assert_eq!(w.verb, "PUT");
        assert_eq!(w.route_param("BUYERID").as_deref(), Some("buyer_10"));
        assert_eq!(w.date.unwrap().timestamp_subsec_nanos(), 650_464_500);
        assert_eq!(w.log_id.as_deref(), Some("71ce120a-17d5-4833-89f6-4f9a33ddd42f"));
        assert_eq!(
            w.request_body.get(),
            r#"{"Active":true}"#,
            "bodies are kept as they came"
        );
        assert_eq!(w.response_body.get(), "{}");
    }

    /// A webhook whose body nests `levels` deep inside `Request.Body.xp` (the envelope, Request and
    /// Body are three levels more).
    fn nested(levels: usize) -> Vec<u8> {
        let xp = format!("{}1{}", "[".repeat(levels), "]".repeat(levels));
        format!(r#"{{"Route":"v1/cart/lineitems","Verb":"POST","Request":{{"Body":{{"ID":"L1","xp":{xp}}}}}}}"#)
            .into_bytes()
    }

    #[test]
    fn nesting_is_limited_to_what_delivery_can_read_back() {
        let deepest = nested(MAX_DEPTH - 3);
        let w = Webhook::parse(&deepest).expect("at the limit");
        // What delivery does with it: the body inside a stored intent, one level deeper than the
        // body itself, two less than in the envelope.
        let stored = format!(r#"{{"request_body":{}}}"#, w.request_body.get());
        serde_json::from_str::<Value>(&stored).expect("decodes at claim");
        assert_eq!(
            Webhook::parse(&nested(MAX_DEPTH - 2)).unwrap_err(),
            EnvelopeError::TooDeep
        );
        assert_eq!(Webhook::parse(&nested(200)).unwrap_err(), EnvelopeError::TooDeep);
        // Values that a skim accepts and a read refuses are refused now.
        for body in [r#"{"Total": 1e400}"#, r#"{"Name": "\ud800"}"#, r#"[-1e999]"#] {
            let webhook = format!(r#"{{"Route":"r","Verb":"PUT","Request":{{"Body":{body}}}}}"#);
            assert_eq!(
                Webhook::parse(webhook.as_bytes()).unwrap_err(),
                EnvelopeError::Unreadable,
                "{body}"
            );
        }
        // Brackets inside strings are text.
        let strings = format!(
            r#"{{"Route":"r","Verb":"PUT","x":"{}\"{}"}}"#,
            "[".repeat(300),
            "{".repeat(300)
        );
        assert!(Webhook::parse(strings.as_bytes()).is_ok());
    }

    #[test]
    fn tolerates_nulls_and_rejects_non_webhooks() {
        let w = Webhook::parse(br#"{"Route":"v1/cart","Verb":"delete","RouteParams":null,"QueryParams":null,"Request":null,"Response":null,"Date":null}"#).unwrap();
        assert_eq!(w.verb, "DELETE");
        assert!(w.route_params.is_empty());
        assert_eq!((w.request_body.get(), w.response_body.get()), ("null", "null"));
        let w = Webhook::parse(br#" {"Route":"v1/cart","Verb":"DELETE","Request":{"Headers":null}}"#).unwrap();
        assert_eq!(w.request_body.get(), "null");
        assert_eq!(Webhook::parse(b"not json").unwrap_err(), EnvelopeError::NotJson);
        assert_eq!(Webhook::parse(b"[1,2]").unwrap_err(), EnvelopeError::NotJson);
        assert_eq!(
            Webhook::parse(br#"["v1/cart",null,null,"PUT"]"#).unwrap_err(),
            EnvelopeError::NotJson
        );
        assert_eq!(
            Webhook::parse(br#"{"Route":"v1/cart","Verb":"PUT","Request":{"Body":{"a":}}}"#).unwrap_err(),
            EnvelopeError::NotJson,
            "a malformed body inside the envelope is caught"
        );
        assert_eq!(
            Webhook::parse(br#"{"Verb":"PUT"}"#).unwrap_err(),
            EnvelopeError::Missing("Route")
        );
        assert_eq!(
            Webhook::parse(br#"{"Route":"v1/cart","Verb":"PUT","Date":"yesterday"}"#).unwrap_err(),
            EnvelopeError::BadDate
        );
    }
}
