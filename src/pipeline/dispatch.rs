//! Dispatch: batches onto the scorer pool (blocking threads), as many at once as there are scorers.

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc;

use super::{InFlight, Scored, ToScoring};
use crate::model::{as_windows, Scorer, Scores};
use crate::telemetry::metrics::Metrics;

/// Runs batches on the scorer pool (blocking threads), as many at once as there are scorers. A
/// `Swap` replaces the pool: scorers of batches still in flight go back to the old pool, which
/// nobody reads any more, and are dropped there.
pub async fn dispatch(
    scorers: Vec<Scorer>,
    mut rx: mpsc::Receiver<ToScoring>,
    tx: mpsc::Sender<Scored>,
    in_flight: InFlight,
    metrics: Arc<Metrics>,
) {
    let new_pool = |scorers: Vec<Scorer>| {
        let (pool_tx, pool_rx) = mpsc::channel(scorers.len().max(1));
        for s in scorers {
            pool_tx.try_send(s).expect("pool channel holds every scorer");
        }
        (pool_tx, pool_rx)
    };
    let (mut pool_tx, mut pool_rx) = new_pool(scorers);
    let mut inflight = tokio::task::JoinSet::new();
    while let Some(msg) = rx.recv().await {
        let batch = match msg {
            ToScoring::Swap(scorers) => {
                (pool_tx, pool_rx) = new_pool(scorers);
                continue;
            }
            ToScoring::Batch(batch) if batch.meta.is_empty() => {
                // Evictions only: nothing to score, but the alert stage must see it in order.
                in_flight.done();
                let _ = tx.send(Scored { batch, scores: Ok(Scores::default()) }).await;
                continue;
            }
            ToScoring::Batch(batch) => batch,
        };
        let mut scorer: Scorer = pool_rx.recv().await.expect("the pool sender lives in this function");
        let (pool_tx, tx, in_flight, metrics) = (pool_tx.clone(), tx.clone(), in_flight.clone(), metrics.clone());
        inflight.spawn(async move {
            let n = batch.meta.len();
            let (scorer, batch, scores, took) = tokio::task::spawn_blocking(move || {
                let started = Instant::now();
                let (w, f) = batch.model.dims();
                let scores = scorer.score(as_windows(&batch.windows, w, f)).map_err(|e| e.to_string());
                (scorer, batch, scores, started.elapsed())
            })
            .await
            .expect("inference does not panic on valid buffers");
            in_flight.done();
            metrics.inference_duration.observe(took.as_secs_f64());
            metrics.inference_batch.observe(n as f64);
            let _ = pool_tx.send(scorer).await;
            let _ = tx.send(Scored { batch, scores }).await;
        });
        while let Some(done) = inflight.try_join_next() {
            rethrow(done);
        }
    }
    while let Some(done) = inflight.join_next().await {
        rethrow(done);
    }
}

/// A scoring task's panic is the dispatcher's, for the supervisor to see.
fn rethrow(done: Result<(), tokio::task::JoinError>) {
    if let Err(error) = done {
        if error.is_panic() {
            std::panic::resume_unwind(error.into_panic());
        }
    }
}
