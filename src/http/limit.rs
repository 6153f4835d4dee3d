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
        // The budget holds what this body holds: a part as it came, or the buffer the parts are
        // gathered in, with its spare room (it grows by doubling, never past `max`).
        let mut charged = 0usize;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| match e.downcast_ref::<LengthLimitError>() {
                Some(_) => NotRead::TooLarge,
                None => NotRead::Unreadable,
            })?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            // A body that comes in one part (most do) is kept as it came, not copied.
            match first.take() {
                None if rest.is_empty() => first = Some(data),
                Some(earlier) => {
                    append(&mut rest, &earlier, max);
                    append(&mut rest, &data, max);
                }
                None => append(&mut rest, &data, max),
            }
            let holding = first.as_ref().map_or(0, Bytes::len) + rest.capacity();
            if holding > charged {
                let more = u32::try_from(holding - charged).map_err(|_| NotRead::TooLarge)?;
                bytes.merge(
                    self.bytes
                        .clone()
                        .try_acquire_many_owned(more)
                        .map_err(|_| NotRead::Busy)?,
                );
                charged = holding;
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

/// Appends a part to the buffer, which grows by doubling but never past the body's limit (a body
/// of `max` bytes in parts holds at most `max`; the parts' lengths are bounded by `max` already).
fn append(rest: &mut Vec<u8>, data: &[u8], max: usize) {
    let need = rest.len() + data.len();
    if need > rest.capacity() {
        let target = (rest.capacity() * 2).min(max).max(need);
        rest.reserve_exact(target - rest.len());
    }
    rest.extend_from_slice(data);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max_inflight: usize, max_body_bytes: usize) -> Limits {
        let mut server = crate::config::Settings::default().server;
        server.max_inflight = max_inflight;
        server.max_body_bytes = max_body_bytes;
        Limits::new(&server)
    }

    /// A body sent in several parts, as a chunked upload comes.
    fn in_parts(parts: usize, size: usize) -> Body {
        let frames = (0..parts).map(move |_| Ok::<_, std::convert::Infallible>(Bytes::from(vec![b'x'; size])));
        Body::from_stream(futures_util::stream::iter(frames))
    }

    #[tokio::test]
    async fn a_body_in_one_part_holds_its_bytes_of_the_budget() {
        let limits = limits(4, 10_000);
        let (body, held) = limits.read(Body::from(vec![b'x'; 3_000]), 10_000).await.ok().unwrap();
        assert_eq!(body.len(), 3_000);
        assert_eq!(limits.bytes.available_permits(), 40_000 - 3_000);
        drop(held);
        assert_eq!(limits.bytes.available_permits(), 40_000);
    }

    /// The parts are gathered in a buffer that grows by doubling: the budget counts the buffer, not
    /// only the bytes in it (it counted the bytes, half of what a body could hold).
    #[tokio::test]
    async fn a_body_in_parts_holds_the_buffer_it_is_gathered_in() {
        let limits = limits(4, 10_000);
        let (body, held) = limits.read(in_parts(3, 1_000), 10_000).await.ok().unwrap();
        assert_eq!(body.len(), 3_000);
        let taken = 40_000 - limits.bytes.available_permits();
        assert!(taken > 3_000, "the buffer's spare room is counted: {taken}");
        assert!(taken <= 6_000, "at most twice the bytes: {taken}");
        drop(held);
        assert_eq!(limits.bytes.available_permits(), 40_000);
    }

    /// The buffer never grows past the body's limit: with room for one body in the budget
    /// (`max_inflight` 1), a body of the limit's size in parts is read, not refused as busy.
    #[tokio::test]
    async fn a_body_of_the_limits_size_in_parts_fits_a_budget_of_one_body() {
        let limits = limits(1, 3_000);
        let (body, _held) = limits.read(in_parts(3, 1_000), 3_000).await.ok().unwrap();
        assert_eq!(body.len(), 3_000);
        assert_eq!(limits.bytes.available_permits(), 0);
    }
}
