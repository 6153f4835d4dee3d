//! Intake's limits (`server.max_inflight`), so that memory stays bounded whatever clients do, and
//! no client can hold what a webhook needs by being slow:
//! - the bodies being read or handled hold at most `max_inflight × max_body_bytes` bytes between
//!   them, each client only what the bytes it has sent take to keep (a client trickling a body
//!   holds a few bytes, not a slot; a body in parts, the buffer they are gathered in);
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

    /// Reads a body of at most `max` bytes, each part taking from the budget what keeping it takes
    /// before it is kept, then takes a slot. The caller bounds the time it takes.
    pub async fn read(&self, body: Body, max: usize) -> Result<(Bytes, Held), NotRead> {
        let mut body = Limited::new(body, max);
        // A declared length (Content-Length) sizes the buffer of a body in parts at once.
        let declared = axum::body::HttpBody::size_hint(&body)
            .exact()
            .and_then(|n| usize::try_from(n).ok());
        let mut bytes = self
            .bytes
            .clone()
            .try_acquire_many_owned(0)
            .map_err(|_| NotRead::Busy)?;
        let mut first: Option<Bytes> = None;
        let mut rest: Vec<u8> = Vec::new();
        // What the budget holds for this body: the part as it came while it is the only one, then
        // the buffer the parts are gathered in, spare room included.
        let mut charged = 0usize;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| match e.downcast_ref::<LengthLimitError>() {
                Some(_) => NotRead::TooLarge,
                None => NotRead::Unreadable,
            })?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            let alone = first.is_none() && rest.is_empty();
            let need = first.as_ref().map_or(0, Bytes::len) + rest.len() + data.len();
            let holding = if alone {
                data.len()
            } else {
                buffer_for(need, rest.capacity(), declared, max)
            };
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
            // A body that comes in one part (most do) is kept as it came, not copied.
            if alone {
                first = Some(data);
                continue;
            }
            rest.reserve_exact(holding - rest.len());
            if let Some(earlier) = first.take() {
                rest.extend_from_slice(&earlier);
            }
            rest.extend_from_slice(&data);
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

/// The size of the buffer that gathers a body's parts once it must hold `need` bytes: the one it
/// has while `need` fits, else the declared length, else twice the buffer it had; never past the
/// body's limit (`Limited` keeps `need` within it), never less than `need`.
fn buffer_for(need: usize, capacity: usize, declared: Option<usize>, max: usize) -> usize {
    if need <= capacity {
        return capacity;
    }
    declared.unwrap_or(capacity * 2).min(max).max(need)
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
    use std::collections::VecDeque;
    use std::pin::Pin;
    use std::task::{Context, Poll};

    use axum::body::HttpBody;
    use hyper::body::{Frame, SizeHint};

    use super::*;

    fn limits(max_inflight: usize, max_body_bytes: usize) -> Limits {
        Limits::new(&crate::config::ServerSettings {
            max_inflight,
            max_body_bytes,
            ..Default::default()
        })
    }

    /// A body sent in parts of `size` bytes, its length declared (Content-Length) or not (chunked).
    struct Parts {
        parts: VecDeque<Bytes>,
        declared: Option<u64>,
    }

    impl HttpBody for Parts {
        type Data = Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            Poll::Ready(self.parts.pop_front().map(|part| Ok(Frame::data(part))))
        }

        fn size_hint(&self) -> SizeHint {
            self.declared.map_or_else(SizeHint::default, SizeHint::with_exact)
        }
    }

    fn in_parts(parts: usize, size: usize, declared: bool) -> Body {
        Body::new(Parts {
            parts: (0..parts).map(|_| Bytes::from(vec![b'x'; size])).collect(),
            declared: declared.then_some((parts * size) as u64),
        })
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

    /// Chunked, the parts are gathered in a buffer that doubles: the budget holds the buffer, not
    /// only the bytes in it (it counted the bytes, up to half of what a body held).
    #[tokio::test]
    async fn a_chunked_body_holds_the_buffer_it_is_gathered_in() {
        let limits = limits(4, 10_000);
        let (body, held) = limits.read(in_parts(3, 1_000, false), 10_000).await.ok().unwrap();
        assert_eq!(body.len(), 3_000);
        // 2,000 bytes for the first two parts, doubled for the third.
        assert_eq!(limits.bytes.available_permits(), 40_000 - 4_000);
        drop(held);
        assert_eq!(limits.bytes.available_permits(), 40_000);
    }

    /// With its length declared, a body in parts is gathered in a buffer of that length.
    #[tokio::test]
    async fn a_declared_body_in_parts_holds_its_length() {
        let limits = limits(4, 10_000);
        let (body, _held) = limits.read(in_parts(3, 1_000, true), 10_000).await.ok().unwrap();
        assert_eq!(body.len(), 3_000);
        assert_eq!(limits.bytes.available_permits(), 40_000 - 3_000);
    }

    /// The buffer never grows past the body's limit: with room for one body in the budget
    /// (`max_inflight` 1), a chunked body of the limit's size is read, not refused as busy.
    #[tokio::test]
    async fn a_chunked_body_of_the_limits_size_fits_a_budget_of_one_body() {
        let limits = limits(1, 3_000);
        let (body, _held) = limits.read(in_parts(3, 1_000, false), 3_000).await.ok().unwrap();
        assert_eq!(body.len(), 3_000);
        assert_eq!(limits.bytes.available_permits(), 0);
    }

    /// A body refused as busy, or as too large, gives back all it took of the budget.
    #[tokio::test]
    async fn a_refused_body_gives_its_bytes_back() {
        let limits = limits(1, 3_000);
        let (_first, held) = limits.read(Body::from(vec![b'x'; 2_500]), 3_000).await.ok().unwrap();
        let refused = limits.read(in_parts(2, 400, false), 3_000).await;
        assert!(matches!(refused, Err(NotRead::Busy)));
        assert_eq!(limits.bytes.available_permits(), 500);
        drop(held);
        let too_large = limits.read(in_parts(4, 1_000, false), 3_000).await;
        assert!(matches!(too_large, Err(NotRead::TooLarge)));
        assert_eq!(limits.bytes.available_permits(), 3_000);
    }
}
