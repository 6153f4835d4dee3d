//! The HTTP server, bounded by design: whatever clients do, the connections, the requests in flight
//! and the time each may take are bounded by configuration.
//!
//! - A connection must send a request's headers within `server.read_timeout_ms`, also when it waits
//!   idle between requests (keep-alive); otherwise it is closed.
//! - A request's headers take at most 16 KiB (more: 431), so a connection buffers little before
//!   anything is verified.
//! - At most [`ServerSettings::max_connections`] connections are open; more are closed at once
//!   (idle or slow sockets cannot use up the file descriptors).
//! - Bodies are read within the same timeout and up to `server.max_body_bytes` by the handlers that
//!   read them (intake), from a byte budget of `server.max_inflight × server.max_body_bytes`; webhooks
//!   whose body has arrived past `server.max_inflight` are answered 503 at once (`http::limit`).

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};

use super::refusals::Refusals;
use crate::config::ServerSettings;

/// What a connection buffers of a request's head (and of its body at a time), at most: 16 KiB.
const MAX_HEADER_BUFFER: usize = 16 * 1024;

/// Serves `router` on `listener` until `stop` turns true, then stops accepting and waits for the
/// connections in flight (the caller bounds that wait).
pub async fn serve(
    listener: TcpListener,
    router: Router,
    settings: &ServerSettings,
    refusals: Arc<Refusals>,
    mut stop: watch::Receiver<bool>,
) {
    let read_timeout = settings.read_timeout();
    let connections = Arc::new(Semaphore::new(settings.max_connections()));
    let graceful = GracefulShutdown::new();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stop.wait_for(|s| *s) => break,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of file descriptors, say: let connections close before accepting again.
                refusals.refused("accept", &e.to_string());
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            refusals.refused("connections", "too many open connections: closed at once");
            continue;
        };
        let _ = stream.set_nodelay(true);
        let connection = http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(read_timeout)
            // Headers past this are answered 431 (hyper's default buffers about 400 KiB per
            // connection before anything is verified; a webhook's headers take a few hundred bytes).
            .max_buf_size(MAX_HEADER_BUFFER)
            .keep_alive(true)
            .serve_connection(TokioIo::new(stream), TowerToHyperService::new(router.clone()));
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            let _ = connection.await;
            drop(permit);
        });
    }
    drop(listener);
    graceful.shutdown().await;
}
