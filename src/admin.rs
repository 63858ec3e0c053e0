//! Admin HTTP server (HTTP/1.1).
//!
//! - `GET /metrics`: Prometheus text exposition of [`Metrics`]
//! - `GET /live`: 200 until a pipeline task fails (the daemon is then stopping), else 503
//! - `GET /ready`: 200 once config, model, scoring sessions and source are up and until a task
//!   fails, else 503. It does not flap with load or input.
//!
//! Limits (`[admin]`), so that no client can hold the port or the process' file descriptors,
//! and a probe gets through while slow clients try:
//!
//! - A connection sends each request head (line and headers) within `header_read_timeout_ms`,
//!   the first one and each next one on a kept-alive connection, or it is closed.
//! - At most `max_connections` are open. At the cap, a new connection takes the place of the
//!   oldest one that is not inside a request (still sending its head, or idle between
//!   requests); if every open connection is inside a request, the new one is closed at once.
//!   Either way the descriptor is released at once, so the process never nears its limit, and
//!   a fresh request (a probe, a scrape) is not starved by clients that never finish theirs.
//! - A request head over `max_request_head_bytes` is answered 431 and the connection closed.
//!   The endpoints read no request body.
//!
//! Each early close is counted in `anomalyd_admin_connections_closed_total{reason}`.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower_service::Service;
use tracing::{debug, warn};

use crate::config::AdminConfig;
use crate::supervisor::Health;
use crate::telemetry::metrics::{AdminClose, Metrics};
use crate::telemetry::LogEvery;

/// Pause after a failed accept (out of descriptors, say), so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// hyper's smallest read buffer; a smaller head cap is enforced by `max_header_size`.
const MIN_READ_BUFFER: usize = 8192;

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

/// One open connection, shared by its task and the accept loop. The task holds it while it
/// runs, so a slot only the loop still holds belongs to a closed connection.
#[derive(Default)]
struct Slot {
    /// Between a complete request head and the end of its handler: not to be evicted.
    in_request: AtomicBool,
    /// Cancelled to evict the connection: its task drops the socket.
    evict: CancellationToken,
}

/// Marks its slot inside a request until dropped (the handler done, or the connection gone).
struct InRequest(Arc<Slot>);

impl InRequest {
    fn enter(slot: &Arc<Slot>) -> InRequest {
        slot.in_request.store(true, Ordering::Release);
        InRequest(slot.clone())
    }
}

impl Drop for InRequest {
    fn drop(&mut self) {
        self.0.in_request.store(false, Ordering::Release);
    }
}

/// The open connections, oldest first; only the accept loop touches it.
struct Open(VecDeque<Arc<Slot>>);

impl Open {
    /// Room for one more connection under `max`: forgets closed ones, then evicts the oldest
    /// one not inside a request. `Err` when all `max` are inside a request.
    fn make_room(&mut self, max: usize, metrics: &Metrics) -> Result<(), ()> {
        self.0.retain(|slot| Arc::strong_count(slot) > 1);
        if self.0.len() < max {
            return Ok(());
        }
        let idle = self.0.iter().position(|slot| !slot.in_request.load(Ordering::Acquire)).ok_or(())?;
        let slot = self.0.remove(idle).expect("position is in range");
        slot.evict.cancel();
        metrics.admin_connection_closed(AdminClose::Evicted);
        Ok(())
    }
}

/// Serves until `stop` is cancelled, within the limits of `limits` (see the module docs); then
/// lets requests in progress finish, for at most the header read timeout.
pub async fn serve(listener: TcpListener, state: AdminState, limits: AdminConfig, stop: CancellationToken) -> std::io::Result<()> {
    let metrics = state.metrics.clone();
    let router =
        Router::new().route("/metrics", get(self::metrics)).route("/live", get(live)).route("/ready", get(ready)).with_state(state);
    let grace = limits.header_read_timeout();
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(grace)
        .max_header_size(limits.max_request_head_bytes)
        .max_buf_size(limits.max_request_head_bytes.max(MIN_READ_BUFFER));
    let http = Arc::new(http);
    let tasks = TaskTracker::new();
    let mut open = Open(VecDeque::with_capacity(limits.max_connections));
    let mut accept_errors = LogEvery::default();
    loop {
        let stream = tokio::select! {
            // Once asked to stop, no new connection even if more are waiting.
            biased;
            _ = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(error) => {
                    if let Some(count) = accept_errors.tick() {
                        warn!(%error, count, "Admin server cannot accept a connection; retrying.");
                    }
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
        };
        if open.make_room(limits.max_connections, &metrics).is_err() {
            metrics.admin_connection_closed(AdminClose::Rejected);
            debug!("Admin connection refused: every connection is inside a request.");
            continue; // dropping the stream closes it
        }
        let slot = Arc::new(Slot::default());
        open.0.push_back(slot.clone());
        tasks.spawn(connection(stream, slot, http.clone(), router.clone(), metrics.clone(), stop.clone(), grace));
    }
    drop(listener);
    tasks.close();
    tasks.wait().await;
    Ok(())
}

/// Serves one connection until it ends, is evicted, or `stop` (then at most `grace` more).
async fn connection(
    stream: TcpStream,
    slot: Arc<Slot>,
    http: Arc<http1::Builder>,
    router: Router,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
    grace: Duration,
) {
    let in_slot = slot.clone();
    let service = service_fn(move |request: hyper::Request<Incoming>| {
        let inside = InRequest::enter(&in_slot);
        let mut router = router.clone();
        async move {
            let response = router.call(request).await;
            drop(inside);
            Ok::<_, Infallible>(response.unwrap_or_else(|never| match never {}))
        }
    });
    let conn = http.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    let result = tokio::select! {
        result = conn.as_mut() => result,
        _ = slot.evict.cancelled() => return,
        _ = stop.cancelled() => {
            conn.as_mut().graceful_shutdown();
            match tokio::time::timeout(grace, conn).await {
                Ok(result) => result,
                Err(_) => return,
            }
        }
    };
    if let Err(error) = result {
        if error.is_timeout() {
            metrics.admin_connection_closed(AdminClose::HeaderTimeout);
        } else if error.is_parse_too_large() {
            metrics.admin_connection_closed(AdminClose::HeadTooLarge);
        }
        debug!(%error, "Admin connection closed.");
    }
}
