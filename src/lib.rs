//! ordercloud-cdp-forwarder: receives signed Sitecore OrderCloud webhooks and forwards them to
//! the Sitecore CDP Stream API, durably, in per-shopper order. See README.md and DESIGN notes.

pub mod cdp;
pub mod config;
pub mod dead_letters;
pub mod delivery;
pub mod domain;
pub mod health;
pub mod http;
pub mod ordercloud;
pub mod outbound;
pub mod planner;
pub mod reconcile;
pub mod store;
pub mod telemetry;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tracing::{info, warn};

use crate::config::Settings;
use crate::http::AppState;
use crate::store::DynStore;

/// The service, built and bound, not yet serving.
pub struct Application {
    listener: TcpListener,
    /// The operations listener (`server.admin_listen`), when configured.
    admin_listener: Option<TcpListener>,
    state: AppState,
}

impl Application {
    /// Opens the store and binds `server.listen` (port 0 picks a free port; see [`Self::local_addr`]).
    pub async fn build(settings: Settings) -> anyhow::Result<Application> {
        let role = store::Role::Service {
            takeover: settings.delivery.takeover(),
        };
        let store = store::open(&settings.store, role).await?;
        Self::build_with_store(settings, store).await
    }

    /// As [`Self::build`], on a store the caller opened as the service's (`store::Role::Service`):
    /// for embedding, and for tests that put faults between the service and its store.
    pub async fn build_with_store(settings: Settings, store: DynStore) -> anyhow::Result<Application> {
        let listener = listen(&settings.server.listen)
            .with_context(|| format!("cannot listen on server.listen = {}", settings.server.listen))?;
        let admin_listener = match settings.server.admin_listen.as_deref().filter(|a| !a.is_empty()) {
            Some(admin) => {
                Some(listen(admin).with_context(|| format!("cannot listen on server.admin_listen = {admin}"))?)
            }
            None => None,
        };
        telemetry::metrics_handle();
        let state = AppState::new(
            Arc::new(settings),
            store,
            health::Health::default(),
            Arc::new(tokio::sync::Notify::new()),
        );
        Ok(Application {
            listener,
            admin_listener,
            state,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().expect("a bound listener has an address")
    }

    /// The operations listener's address, when `server.admin_listen` is set.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_listener
            .as_ref()
            .map(|l| l.local_addr().expect("a bound listener has an address"))
    }

    pub fn store(&self) -> DynStore {
        self.state.store.clone()
    }

    /// Serves until `shutdown` completes, then stops accepting, lets requests in flight finish
    /// within `server.shutdown_timeout_secs`, and closes the store.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send + 'static) -> anyhow::Result<()> {
        let Application {
            listener,
            admin_listener,
            state,
        } = self;
        let settings = state.settings.clone();
        let store = state.store.clone();
        let addr = listener.local_addr()?;
        let (stop_tx, _) = tokio::sync::watch::channel(false);

        let housekeeping = tokio::spawn(housekeeping(store.clone(), settings.clone(), stop_tx.subscribe()));
        let metrics_upkeep = tokio::spawn(telemetry::metrics_upkeep(store.clone(), stop_tx.subscribe()));
        let deps = delivery::Deps::new(
            settings.clone(),
            store.clone(),
            state.health.clone(),
            state.wake.clone(),
            state.identities.clone(),
        )?;
        let workers = delivery::spawn(Arc::new(deps), stop_tx.subscribe());
        let reconciler = if settings.reconciles() {
            let reconciler = reconcile::Reconciler::new(
                settings.clone(),
                store.clone(),
                state.health.clone(),
                state.wake.clone(),
            )?;
            let reconciler = Arc::new(reconciler);
            Some(tokio::spawn(delivery::supervised(
                "reconciler",
                stop_tx.subscribe(),
                move |stop| reconcile::run_reconciler(reconciler.clone(), stop),
            )))
        } else {
            None
        };
        let verifier = if settings.verifies_orders() {
            let verifier = reconcile::verify::Verifier::new(
                settings.clone(),
                store.clone(),
                state.health.clone(),
                state.wake.clone(),
            )?;
            let verifier = Arc::new(verifier);
            Some(tokio::spawn(delivery::supervised(
                "verifier",
                stop_tx.subscribe(),
                move |stop| reconcile::verify::run_verifier(verifier.clone(), stop),
            )))
        } else {
            None
        };

        let admin = admin_listener.map(|listener| {
            let (router, settings, refusals) = (
                http::admin_router(state.clone()),
                settings.clone(),
                state.refusals.clone(),
            );
            let stop = stop_tx.subscribe();
            let addr = listener.local_addr().ok();
            info!(addr = ?addr, "operations listener: /metrics, /admin, /health/ready with reasons");
            tokio::spawn(async move { http::serve::serve(listener, router, &settings.server, refusals, stop).await })
        });
        if settings.cdp.dry_run {
            tracing::warn!("cdp.dry_run is on: events are logged and counted as delivered, never sent to CDP");
        }
        let router = http::router(state.clone());
        let (server_settings, refusals, stop) = (settings.clone(), state.refusals.clone(), stop_tx.subscribe());
        let mut server = tokio::spawn(async move {
            http::serve::serve(listener, router, &server_settings.server, refusals, stop).await;
            Ok::<(), std::io::Error>(())
        });
        info!(%addr, store = %config::redacted_url(&settings.store.url), "serving");

        tokio::select! {
            result = &mut server => {
                let _ = stop_tx.send(true);
                for task in reconciler.iter().chain(verifier.iter()) {
                    task.abort();
                }
                for worker in workers {
                    let _ = worker.await;
                }
                let _ = metrics_upkeep.await;
                store.close().await;
                return match result {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(e)) => Err(e).context("HTTP server failed"),
                    Err(e) => Err(e).context("HTTP server panicked"),
                };
            }
            _ = shutdown => {}
        }
        info!("shutting down: no new webhooks accepted; deliveries in flight finish or release their claims");
        let _ = stop_tx.send(true);
        // The server drains its requests while the delivery loops finish theirs, under one deadline.
        let deadline = tokio::time::Instant::now() + settings.server.shutdown_timeout();
        let drain_server = async {
            if tokio::time::timeout_at(deadline, &mut server).await.is_err() {
                warn!("requests still in flight at the shutdown deadline");
                server.abort();
            }
        };
        let drain_workers = async {
            for mut worker in workers {
                if tokio::time::timeout_at(deadline, &mut worker).await.is_err() {
                    warn!("deliveries still in flight at the shutdown deadline: their leases will expire");
                    worker.abort();
                }
            }
        };
        tokio::join!(drain_server, drain_workers);
        if let Some(admin) = admin {
            admin.abort();
        }
        // A pass stopped midway leaves its lease to run out; every submit it stored is committed.
        for task in reconciler.iter().chain(verifier.iter()) {
            task.abort();
        }
        let _ = housekeeping.await;
        let _ = metrics_upkeep.await;
        store.close().await;
        info!("stopped");
        Ok(())
    }
}

/// Periodic upkeep: forgets dedupe records past their retention.
async fn housekeeping(
    store: Arc<dyn store::Operations>,
    settings: Arc<Settings>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let retention_ms = i64::try_from(settings.store.dedupe_retention().as_millis()).unwrap_or(i64::MAX);
    loop {
        if let Err(e) = store.prune_dedupe(domain::now_ms().saturating_sub(retention_ms)).await {
            warn!(error = %e, "cannot prune dedupe records");
        }
        if let Some(retention) = settings.store.shopper_retention() {
            let before = domain::now_ms().saturating_sub(i64::try_from(retention.as_millis()).unwrap_or(i64::MAX));
            match store.prune_shoppers(before).await {
                Ok(0) => {}
                Ok(n) => info!(rows = n, "forgot what shoppers left past store.shopper_retention_secs"),
                Err(e) => warn!(error = %e, "cannot prune shoppers' records"),
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(600)) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

/// Completes on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = terminate => {}
    }
}

/// Connections the kernel completes and queues for the accept loop (capped by `net.core.somaxconn`).
/// `TcpListener::bind` queues 128: a burst of more connection attempts than that (300 slow clients
/// opening at once) overflowed it, and a client whose handshake was dropped waited for the kernel's
/// one-second retransmission before its first webhook was even read.
pub const LISTEN_BACKLOG: u32 = 1024;

/// Listens on `addr` (`host:port`, as `server.listen`, which configuration checks is an address)
/// with [`LISTEN_BACKLOG`].
pub fn listen(addr: &str) -> std::io::Result<TcpListener> {
    let addr: SocketAddr = addr
        .parse()
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}
