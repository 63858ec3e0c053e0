//! Admin HTTP server.
//!
//! - `GET /metrics`: Prometheus text exposition of [`Metrics`]
//! - `GET /live`: 200 until a pipeline task fails (the daemon is then stopping), else 503
//! - `GET /ready`: 200 once config, model, scoring sessions and source are up and until a task
//!   fails, else 503. It does not flap with load or input.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::supervisor::Health;
use crate::telemetry::metrics::Metrics;

#[derive(Clone)]
pub struct AdminState {
    pub metrics: Arc<Metrics>,
    pub health: Arc<Health>,
}

async fn metrics(State(s): State<AdminState>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], s.metrics.render())
}

async fn live(State(s): State<AdminState>) -> (StatusCode, &'static str) {
    if s.health.live() {
        (StatusCode::OK, "ok\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "failed\n")
    }
}

async fn ready(State(s): State<AdminState>) -> (StatusCode, &'static str) {
    match (s.health.ready(), s.health.live()) {
        (true, _) => (StatusCode::OK, "ready\n"),
        (false, true) => (StatusCode::SERVICE_UNAVAILABLE, "starting\n"),
        (false, false) => (StatusCode::SERVICE_UNAVAILABLE, "failed\n"),
    }
}

/// Serves until `stop` is cancelled.
pub async fn serve(listener: TcpListener, state: AdminState, stop: CancellationToken) -> std::io::Result<()> {
    let app = Router::new().route("/metrics", get(metrics)).route("/live", get(live)).route("/ready", get(ready)).with_state(state);
    axum::serve(listener, app).with_graceful_shutdown(stop.cancelled_owned()).await
}
