//! Intake's limits (`server.max_inflight`), so that memory stays bounded whatever clients do, and
//! no client can hold what a webhook needs by being slow:
//! - the bodies being read or handled hold at most `max_inflight × max_body_bytes` bytes between
//!   them, each client only the bytes it has sent (a client trickling a body holds a few bytes,
//!   not a slot);
//! - at most `max_inflight` webhooks whose body has arrived are handled at once.
//!
//! Past either, a webhook is answered 503 at once — OrderCloud sees a failure it can act on, and
//! nothing is half-stored — instead of queueing while memory grows with every client.

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::http::{HeaderValue, StatusCode};
use axum::response::Response;
use http_body_util::{BodyExt as _, LengthLimitError, Limited};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::{error, AppState};
use crate::config::ServerSettings;

/// What intake's limits hold: a byte budget for bodies, and the slots of webhooks being handled.
pub struct Limits {
    bytes: Arc<Semaphore>,
    slots: Arc<Semaphore>,
}

/// What a webhook holds while it is handled: its body's bytes and its slot.
pub struct Held {
    _bytes: OwnedSemaphorePermit,
    _slot: OwnedSemaphorePermit,
}

/// Why a body was not read.
pub enum NotRead {
    /// Past `server.max_body_bytes`.
    TooLarge,
    /// The connection failed while the body was sent.
    Unreadable,
    /// The limits are reached: answered with [`busy`].
    Busy,
}

impl Limits {
    pub fn new(server: &ServerSettings) -> Limits {
        let budget = server
            .max_inflight
            .saturating_mul(server.max_body_bytes)
            .min(Semaphore::MAX_PERMITS);
        Limits {
            bytes: Arc::new(Semaphore::new(budget)),
            slots: Arc::new(Semaphore::new(server.max_inflight)),
        }
    }

    /// Reads a body of at most `max` bytes, each part taking its bytes from the budget as it
    /// arrives, then takes a slot. The caller bounds the time it takes.
    pub async fn read(&self, body: Body, max: usize) -> Result<(Bytes, Held), NotRead> {
        let mut body = Limited::new(body, max);
        let mut bytes = self
            .bytes
            .clone()
            .try_acquire_many_owned(0)
            .map_err(|_| NotRead::Busy)?;
        let mut first: Option<Bytes> = None;
        let mut rest: Vec<u8> = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| match e.downcast_ref::<LengthLimitError>() {
                Some(_) => NotRead::TooLarge,
                None => NotRead::Unreadable,
            })?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            let len = u32::try_from(data.len()).map_err(|_| NotRead::TooLarge)?;
            bytes.merge(
                self.bytes
                    .clone()
                    .try_acquire_many_owned(len)
                    .map_err(|_| NotRead::Busy)?,
            );
            // A body that comes in one part (most do) is kept as it came, not copied.
            match first.take() {
                None if rest.is_empty() => first = Some(data),
                Some(earlier) => {
                    rest.extend_from_slice(&earlier);
                    rest.extend_from_slice(&data);
                }
                None => rest.extend_from_slice(&data),
            }
        }
        let slot = self.slots.clone().try_acquire_owned().map_err(|_| NotRead::Busy)?;
        let body = first.unwrap_or_else(|| Bytes::from(rest));
        Ok((
            body,
            Held {
                _bytes: bytes,
                _slot: slot,
            },
        ))
    }
}

/// The answer past the limits: 503 at once, with `Retry-After: 1`; counted, logged sparingly.
pub fn busy(app: &AppState) -> Response {
    app.refusals.refused(
        "busy",
        "server.max_inflight reached (bodies in flight or webhooks handled): answered 503",
    );
    let mut response = error(
        StatusCode::SERVICE_UNAVAILABLE,
        "too many requests in flight (server.max_inflight): retry",
    );
    response
        .headers_mut()
        .insert(axum::http::header::RETRY_AFTER, HeaderValue::from_static("1"));
    response
}
