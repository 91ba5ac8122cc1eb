//! Logs (`tracing`, to stderr, `RUST_LOG` sets the level) and metrics (a Prometheus recorder for the `metrics`
//! facade, rendered by the gateway's `/metrics`).

use std::time::Duration;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

/// Logs to stderr at `info` (or `RUST_LOG`), with colours only on a terminal. Safe to call more than once.
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

/// Installs the process-wide Prometheus recorder, so every breaker, limiter and cache built afterwards exports its
/// metrics. `None` (logged) if a recorder is already installed. Must run inside a Tokio runtime: it spawns the
/// recorder's upkeep.
pub fn install_metrics() -> Option<PrometheusHandle> {
    match PrometheusBuilder::new().install_recorder() {
        Ok(handle) => {
            let upkeep = handle.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(5));
                loop {
                    tick.tick().await;
                    upkeep.run_upkeep();
                }
            });
            Some(handle)
        }
        Err(error) => {
            tracing::warn!(%error, "cannot install the Prometheus recorder; /metrics will be empty");
            None
        }
    }
}
