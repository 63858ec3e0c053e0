//! Admin HTTP server.
//!
//! - `GET /metrics`: Prometheus text exposition of [`Metrics`]
//! - `GET /live`: 200 while the process runs
//! - `GET /ready`: 200 once config, model, scoring sessions and source are up, else 503. A
//!   one-way latch: it does not flap with load or input.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::telemetry::metrics::Metrics;

#[derive(Clone)]
pub struct AdminState {
    pub metrics: Arc<Metrics>,
    pub ready: Arc<AtomicBool>,
}

async fn metrics(State(s): State<AdminState>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], s.metrics.render())
}

async fn live() -> &'static str {
    "ok\n"
}

async fn ready(State(s): State<AdminState>) -> (StatusCode, &'static str) {
    if s.ready.load(Ordering::Acquire) {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "starting\n")
    }
}

/// Serves until `stop` is cancelled.
pub async fn serve(listener: TcpListener, state: AdminState, stop: CancellationToken) -> std::io::Result<()> {
    let app = Router::new().route("/metrics", get(metrics)).route("/live", get(live)).route("/ready", get(ready)).with_state(state);
    axum::serve(listener, app).with_graceful_shutdown(stop.cancelled_owned()).await
}
