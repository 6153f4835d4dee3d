//! The Stream API client: one pooled keep-alive HTTP client; answers classified in one place
//! ([`classify`], the "retry logic" seam), apart from the sending code.
//!
//! Redirects are never followed: a 3xx would re-send the event (and the client key in it) to
//! wherever it points, or turn the POST into a GET whose 2xx would count as delivered. A 3xx is a
//! configuration error instead: delivery pauses and readiness names the redirect.

use std::time::{Duration, Instant};

use serde_json::Value;
use tracing::info;

use crate::cdp::Event;
use crate::config::{CdpSettings, Secret, Transport};
use crate::domain::BrowserId;

/// What an answer from CDP means for the intent.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Accepted (2xx).
    Done,
    /// 404: CDP does not know the browser id; mint a new one and send again.
    BrowserUnknown,
    /// The event will never be accepted (400 and other 4xx): dead letter with CDP's reason.
    Permanent(String),
    /// 401/403: the client key or endpoint is wrong. Pause delivery, burn nothing.
    Config(String),
    /// 408, 429, 5xx, connection errors and timeouts: try again, not before `after` when CDP said so.
    Retry { after: Option<Duration>, reason: String },
}

/// The headers of an answer that [`classify`] reads.
#[derive(Debug, Clone, Copy, Default)]
pub struct AnswerHeaders<'a> {
    pub retry_after: Option<&'a str>,
    pub location: Option<&'a str>,
}

/// Classifies an answer: status, `Retry-After` and `Location` headers, body.
pub fn classify(status: u16, headers: AnswerHeaders<'_>, body: &[u8]) -> Outcome {
    let message = || error_message(body).unwrap_or_else(|| format!("HTTP {status}"));
    match status {
        300..=399 => Outcome::Config(format!(
            "CDP answered HTTP {status} redirecting to {}: the forwarder follows no redirect; \
             set cdp.region or cdp.base_url to the host that serves the Stream API",
            headers.location.map(without_query).unwrap_or_else(|| "nowhere".into())
        )),
        // Only the status is read: a body that is not a JSON object, or a status that is not text,
        // counts as accepted.
        200..=299 => match accepted_status(body) {
            Some(s) if !s.eq_ignore_ascii_case("OK") => {
                Outcome::Permanent(format!("CDP answered status {s:?}: {}", message()))
            }
            _ => Outcome::Done,
        },
        404 => Outcome::BrowserUnknown,
        401 | 403 => Outcome::Config(format!(
            "CDP refused the client key (HTTP {status}: {}): check cdp.client_key and cdp.region/cdp.base_url",
            message()
        )),
        408 | 429 | 500..=599 => Outcome::Retry {
            after: headers.retry_after.and_then(parse_retry_after),
            reason: format!("CDP answered HTTP {status}: {}", message()),
        },
        _ => Outcome::Permanent(format!("CDP answered HTTP {status}: {}", message())),
    }
}

/// The `status` a 2xx answer gives the event, when its body is a JSON object whose status is text
/// (the last one, as a whole parse would keep it).
fn accepted_status(body: &[u8]) -> Option<String> {
    let entries = object_entries(body)?;
    let (_, status) = entries.iter().rev().find(|(key, _)| key == "status")?;
    serde_json::from_str::<String>(status.get()).ok()
}

/// A JSON object's top-level entries in the order written, repeated keys kept, their values left
/// unparsed (skipped, not built into a tree); `None` when the body is not a JSON object.
pub(crate) fn object_entries(body: &[u8]) -> Option<Vec<(String, &serde_json::value::RawValue)>> {
    struct Entries<'a>(Vec<(String, &'a serde_json::value::RawValue)>);
    impl<'de> serde::Deserialize<'de> for Entries<'de> {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Entries<'de>, D::Error> {
            d.deserialize_map(EntriesVisitor)
        }
    }
    struct EntriesVisitor;
    impl<'de> serde::de::Visitor<'de> for EntriesVisitor {
        type Value = Entries<'de>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("an object")
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Entries<'de>, A::Error> {
            let mut entries = Vec::new();
            while let Some(entry) = map.next_entry()? {
                entries.push(entry);
            }
            Ok(Entries(entries))
        }
    }
    serde_json::from_slice::<Entries>(body).ok().map(|e| e.0)
}

/// A URL as it may be shown: scheme, host and path, no query (it could carry a key).
pub fn without_query(url: &str) -> String {
    let end = url.find(['?', '#']).unwrap_or(url.len());
    url[..end].chars().take(200).collect()
}

/// CDP's `error_msg` (or `message`), shortened.
fn error_message(body: &[u8]) -> Option<String> {
    let v: Value = serde_json::from_slice(body).ok()?;
    let msg = v
        .get("error_msg")
        .or_else(|| v.get("message"))
        .or_else(|| v.get("moreInfo"))?;
    let text = msg.as_str().map(str::to_string).unwrap_or_else(|| msg.to_string());
    Some(text.chars().take(300).collect())
}

/// `Retry-After` as delay-seconds or an HTTP date.
pub fn parse_retry_after(value: &str) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = chrono::DateTime::parse_from_rfc2822(value).ok()?;
    let delta = at.timestamp_millis() - chrono::Utc::now().timestamp_millis();
    Some(Duration::from_millis(delta.max(0) as u64))
}

pub struct CdpClient {
    http: reqwest::Client,
    host: String,
    /// `{host}/v1.2/events`, parsed once rather than for every event (`None` if the host does not
    /// make a URL: then each request fails as it would).
    events_url: Option<reqwest::Url>,
    client_key: Secret,
    transport: Transport,
    dry_run: bool,
}

impl CdpClient {
    pub fn new(settings: &CdpSettings, request_timeout: Duration) -> anyhow::Result<CdpClient> {
        let http = crate::outbound::client_builder(request_timeout)
            .pool_idle_timeout(Duration::from_secs(90))
            .tcp_keepalive(Duration::from_secs(60))
            .build()?;
        let host = settings.host();
        Ok(CdpClient {
            http,
            events_url: reqwest::Url::parse(&format!("{host}/v1.2/events")).ok(),
            host,
            client_key: settings.client_key.clone(),
            transport: settings.transport,
            dry_run: settings.dry_run,
        })
    }

    /// Mints a browser id with `browser/create` (locally in dry run), within `timeout`.
    pub async fn create_browser(&self, timeout: Duration) -> Result<String, Outcome> {
        if self.dry_run {
            return Ok(format!("dry-run-{}", uuid::Uuid::new_v4()));
        }
        let request = self
            .http
            .get(format!("{}/v1.2/browser/create.json", self.host))
            .timeout(timeout)
            .query(&[("client_key", self.client_key.expose()), ("message", "{}")]);
        let started = Instant::now();
        let result = request.send().await;
        metrics::histogram!("forwarder_cdp_request_duration_seconds", "event" => "BROWSER_CREATE")
            .record(started.elapsed().as_secs_f64());
        let response = result.map_err(transport_error)?;
        let status = response.status().as_u16();
        let (retry_after, location) = (header(&response, "retry-after"), header(&response, "location"));
        let body = response.bytes().await.map_err(transport_error)?;
        let headers = AnswerHeaders {
            retry_after: retry_after.as_deref(),
            location: location.as_deref(),
        };
        match classify(status, headers, &body) {
            Outcome::Done => serde_json::from_slice::<Value>(&body)
                .ok()
                .and_then(|v| v.get("ref").and_then(Value::as_str).and_then(BrowserId::parse))
                .map(BrowserId::into_string)
                .ok_or_else(|| Outcome::Retry {
                    after: None,
                    reason: "browser/create answered without a usable ref".into(),
                }),
            Outcome::BrowserUnknown => Err(Outcome::Config(
                "browser/create answered 404: check cdp.region or cdp.base_url".into(),
            )),
            other => Err(other),
        }
    }

    /// Sends one event (logs it instead in dry run); gives up after `timeout`. The event's JSON is
    /// written straight into the request's body.
    pub async fn send(&self, event: &Event, timeout: Duration) -> Outcome {
        let event_type = event.kind.name();
        // The POST transport carries the client key in the body; the GET one in its query, beside the
        // event; a dry run's log never shows it.
        let key_in_body = !self.dry_run && matches!(self.transport, Transport::Post);
        let json = match event.wire_json(key_in_body.then(|| self.client_key.expose())) {
            Ok(json) => json,
            Err(e) => return Outcome::Permanent(format!("the event cannot be written as JSON: {e}")),
        };
        if self.dry_run {
            info!(event = %json, "dry run: CDP event not sent");
            return Outcome::Done;
        }
        let request = match self.transport {
            Transport::Post => {
                let request = match &self.events_url {
                    Some(url) => self.http.post(url.clone()),
                    None => self.http.post(format!("{}/v1.2/events", self.host)),
                };
                request
                    .header(reqwest::header::CONTENT_TYPE, "application/json")
                    .body(json)
            }
            Transport::Get => self
                .http
                .get(format!("{}/v1.2/event/create.json", self.host))
                .query(&[("client_key", self.client_key.expose()), ("message", &json)]),
        };
        let started = Instant::now();
        let result = request.timeout(timeout).send().await;
        metrics::histogram!("forwarder_cdp_request_duration_seconds", "event" => event_type)
            .record(started.elapsed().as_secs_f64());
        let response = match result {
            Ok(r) => r,
            Err(e) => return transport_error(e),
        };
        let status = response.status().as_u16();
        let (retry_after, location) = (header(&response, "retry-after"), header(&response, "location"));
        let headers = AnswerHeaders {
            retry_after: retry_after.as_deref(),
            location: location.as_deref(),
        };
        match response.bytes().await {
            Ok(body) => classify(status, headers, &body),
            Err(e) => transport_error(e),
        }
    }
}

fn header(response: &reqwest::Response, name: &str) -> Option<String> {
    response
        .headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

/// Network failures are retried. The URL is stripped: it carries the client key in GET mode.
fn transport_error(e: reqwest::Error) -> Outcome {
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "cannot connect"
    } else {
        "request failed"
    };
    Outcome::Retry {
        after: None,
        reason: format!("CDP {kind}: {}", e.without_url()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NONE: AnswerHeaders<'static> = AnswerHeaders {
        retry_after: None,
        location: None,
    };

    #[test]
    fn answers_are_classified_in_one_place() {
        assert_eq!(
            classify(201, NONE, br#"{"status":"OK","version":"1.2"}"#),
            Outcome::Done
        );
        assert_eq!(classify(200, NONE, b""), Outcome::Done);
        // Only a status that is text, and not OK in any case, refuses the event.
        assert_eq!(classify(201, NONE, br#"{"ref":"r","status":"ok"}"#), Outcome::Done);
        assert_eq!(classify(201, NONE, br#"{"status":7}"#), Outcome::Done);
        assert_eq!(classify(201, NONE, br#"{"status":null}"#), Outcome::Done);
        assert_eq!(classify(201, NONE, b"not json"), Outcome::Done);
        assert_eq!(classify(201, NONE, br#"["ERROR"]"#), Outcome::Done);
        assert!(matches!(
            classify(201, NONE, br#"{"status":"OK","status":"ERROR"}"#),
            Outcome::Permanent(_)
        ));
        assert_eq!(
            classify(201, NONE, br#"{"status":"ERROR","status":"OK"}"#),
            Outcome::Done
        );
        assert!(matches!(
            classify(201, NONE, br#"{"status":"\u0045RROR","ref":{"nested":[1]}}"#),
            Outcome::Permanent(m) if m.contains("ERROR")
        ));
        assert!(matches!(
            classify(201, NONE, br#"{"status":"ERROR"}"#),
            Outcome::Permanent(_)
        ));
        assert_eq!(classify(404, NONE, b"{}"), Outcome::BrowserUnknown);
        assert_eq!(
            classify(400, NONE, br#"{"error_msg":"type is missing"}"#),
            Outcome::Permanent("CDP answered HTTP 400: type is missing".into())
        );
        assert!(matches!(classify(401, NONE, b""), Outcome::Config(_)));
        assert!(matches!(classify(403, NONE, b""), Outcome::Config(_)));
        for status in [408, 429, 500, 502, 503, 504] {
            assert!(
                matches!(classify(status, NONE, b""), Outcome::Retry { after: None, .. }),
                "{status}"
            );
        }
        assert!(matches!(classify(415, NONE, b""), Outcome::Permanent(_)));
    }

    #[test]
    fn a_redirect_is_a_configuration_error_that_names_where_without_the_query() {
        for status in [301, 302, 307, 308] {
            let headers = AnswerHeaders {
                retry_after: None,
                location: Some("https://elsewhere.example/v1.2/events?client_key=secret"),
            };
            let Outcome::Config(reason) = classify(status, headers, b"") else {
                panic!("{status} is not a configuration error")
            };
            assert!(reason.contains("https://elsewhere.example/v1.2/events"), "{reason}");
            assert!(!reason.contains("secret"), "{reason}");
        }
    }

    #[test]
    fn retry_after_in_seconds_or_as_a_date() {
        let seven = AnswerHeaders {
            retry_after: Some("7"),
            location: None,
        };
        assert_eq!(
            classify(429, seven, b""),
            Outcome::Retry {
                after: Some(Duration::from_secs(7)),
                reason: "CDP answered HTTP 429: HTTP 429".into()
            }
        );
        let in_a_minute = (chrono::Utc::now() + chrono::Duration::seconds(60)).to_rfc2822();
        let after = parse_retry_after(&in_a_minute).unwrap();
        assert!(
            after > Duration::from_secs(55) && after <= Duration::from_secs(60),
            "{after:?}"
        );
        assert_eq!(parse_retry_after("Sun, 06 Nov 1994 08:49:37 GMT"), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("soon"), None);
    }
}
