//! The limit on requests in flight at intake (`server.max_inflight`): past it, a webhook is answered
//! 503 at once — OrderCloud sees a failure it can act on, and nothing is half-stored — instead of
//! queueing while memory grows with every client.

use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::Response;

use super::{error, AppState};

pub(super) async fn inflight(State(app): State<AppState>, request: Request, next: Next) -> Response {
    let Ok(_permit) = app.inflight.clone().try_acquire_owned() else {
        app.refusals
            .refused("busy", "server.max_inflight requests in flight: answered 503");
        metrics::counter!("forwarder_webhooks_total", "route" => "unknown", "outcome" => "busy").increment(1);
        let mut response = error(
            StatusCode::SERVICE_UNAVAILABLE,
            "too many requests in flight (server.max_inflight): retry",
        );
        response
            .headers_mut()
            .insert(axum::http::header::RETRY_AFTER, HeaderValue::from_static("1"));
        return response;
    };
    next.run(request).await
}
