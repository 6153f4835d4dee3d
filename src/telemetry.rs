//! Logging (tracing, JSON by default) and the Prometheus metrics recorder.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::EnvFilter;

use crate::config::{LogFormat, LogSettings};

/// Installs the global tracing subscriber once; later calls (tests) are no-ops.
pub fn init_logging(settings: &LogSettings) {
    let filter = EnvFilter::try_new(&settings.level).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match settings.format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
        LogFormat::Pretty => builder.try_init(),
    };
}

static METRICS: OnceLock<PrometheusHandle> = OnceLock::new();

/// The process-wide Prometheus recorder (installed on first use).
pub fn metrics_handle() -> PrometheusHandle {
    METRICS
        .get_or_init(|| {
            let buckets = [
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ];
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &buckets)
                .expect("static bucket list is valid")
                .build_recorder();
            let handle = recorder.handle();
            // Another recorder may already be installed (several apps in one test process).
            let _ = metrics::set_global_recorder(recorder);
            handle
        })
        .clone()
}

/// How often histogram samples are folded into their buckets (see [`metrics_upkeep`]).
const METRICS_UPKEEP_EVERY: Duration = Duration::from_secs(5);

/// Every few seconds until `stop`: folds the histograms' recorded samples into their buckets, and
/// refreshes the queue gauges from the store. The recorder keeps every sample (16 bytes each) until
/// then: without this, a service nobody scrapes would grow by a few hundred KB a second under load.
/// The gauges are read here rather than at each scrape, so `/metrics` costs the store nothing.
pub async fn metrics_upkeep(store: Arc<dyn crate::store::Operations>, mut stop: tokio::sync::watch::Receiver<bool>) {
    let handle = metrics_handle();
    loop {
        if let Ok(stats) = store.stats().await {
            metrics::gauge!("forwarder_queue_pending").set(stats.pending as f64);
            metrics::gauge!("forwarder_dead_letters").set(stats.dead as f64);
            metrics::gauge!("forwarder_queue_oldest_pending_age_seconds")
                .set(stats.oldest_pending_age_ms as f64 / 1000.0);
        }
        tokio::select! {
            _ = tokio::time::sleep(METRICS_UPKEEP_EVERY) => handle.run_upkeep(),
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}
