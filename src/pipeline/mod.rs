//! The stages between a source and the outputs, and what travels between them:
//!
//! ```text
//! lines ──▶ window_stage ──Batch──▶ dispatch ──(blocking) scorers──Scored──▶ alert_stage ──Pending──▶ commit
//! ```
//!
//! Each stage is one task that owns its state and ends when its input channel closes, after
//! finishing what it holds; `app` builds and wires them.

pub mod alert_stage;
pub mod commit;
pub mod dispatch;
pub mod window_stage;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use rdkafka::producer::DeliveryFuture;
use tokio::sync::Notify;

use crate::model::lifecycle::ModelInUse;
use crate::model::{Scorer, Scores};
use crate::sink::kafka::KafkaOutput;
use crate::source::checkpoints::Encoded;
use crate::source::offsets::Acks;

/// Windows of one inference call, with what the alert stage needs to know about each.
pub struct Batch {
    seq: u64,
    model: Arc<ModelInUse>,
    windows: Vec<f32>,
    meta: Vec<WindowInfo>,
    /// Series evicted (idle) since the previous batch: the alert stage forgets them after this
    /// batch's windows, so their per-series state and gauges go too.
    evicted: Vec<String>,
    /// Series of partitions revoked since the previous batch: forgotten as `evicted` are, their
    /// threshold state handed to the thresholds' changelog first.
    revoked: Vec<String>,
    /// Partitions assigned since the previous batch (topic index, partition): the alert stage
    /// replays their thresholds from the changelog before this batch's windows.
    assigned: Vec<(usize, i32)>,
    /// Kafka offsets safe to store once this batch is scored ...
    acks: Acks,
    /// ... and once these window checkpoints are written, after this batch's outputs.
    checkpoints: Vec<Encoded>,
    /// Dead letters enqueued since the previous batch: delivered before the batch's offsets are
    /// stored.
    deliveries: Vec<(DeliveryFuture, KafkaOutput)>,
}

impl Batch {
    /// No windows yet, for `model`.
    pub fn empty(seq: u64, model: Arc<ModelInUse>) -> Batch {
        Batch {
            seq,
            model,
            windows: Vec::new(),
            meta: Vec::new(),
            evicted: Vec::new(),
            revoked: Vec::new(),
            assigned: Vec::new(),
            acks: Acks::default(),
            checkpoints: Vec::new(),
            deliveries: Vec::new(),
        }
    }
}

pub struct WindowInfo {
    series: String,
    /// The Kafka partition of its last record (topic index, partition).
    input: Option<(usize, i32)>,
    start_ts: f64,
    end_ts: f64,
}

pub enum ToScoring {
    Batch(Batch),
    Swap(Vec<Scorer>),
}

/// Batches sent to scoring whose inference has not finished. While fewer are in flight than
/// there are scorers, one sits idle: the window stage then sends what it has rather than wait
/// for a full batch, so a quiet stream is scored at once and a busy one still in full batches.
/// A finished batch wakes a window stage that holds a partial batch for want of an idle scorer.
#[derive(Clone, Default)]
pub struct InFlight {
    count: Arc<AtomicUsize>,
    freed: Arc<Notify>,
}

impl InFlight {
    fn sent(&self) {
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    fn done(&self) {
        self.count.fetch_sub(1, Ordering::Relaxed);
        // One stored permit: a scorer freed before the window stage waits still wakes it.
        self.freed.notify_one();
    }

    fn below(&self, scorers: usize) -> bool {
        self.count.load(Ordering::Relaxed) < scorers
    }

    fn freed(&self) -> Arc<Notify> {
        self.freed.clone()
    }
}

pub struct Scored {
    batch: Batch,
    scores: Result<Scores, String>,
}
