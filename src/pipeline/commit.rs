//! The committer: awaits each handled batch's Kafka deliveries in batch order, then writes its
//! window checkpoints, and stores its offsets once those are delivered (one half awaits outputs,
//! the other checkpoints, so their round trips overlap); at the end flushes the producer and
//! commits.

use std::sync::Arc;

use rdkafka::producer::DeliveryFuture;
use tokio::sync::mpsc;
use tracing::error;

use crate::sink::kafka::{KafkaOutput, KafkaSinks};
use crate::source::checkpoints::Encoded;
use crate::source::kafka::KafkaHandle;
use crate::source::offsets::Acks;
use crate::telemetry::metrics::Metrics;
use crate::telemetry::LogEvery;

/// A handled batch: what it produced on Kafka, the window checkpoints to write once that is
/// delivered (a checkpoint says that its series' windows before it are), and the offsets to
/// store once those are.
#[derive(Default)]
pub struct Pending {
    pub deliveries: Vec<(DeliveryFuture, KafkaOutput)>,
    pub checkpoints: Vec<Encoded>,
    pub acks: Acks,
}

/// Awaits each batch's deliveries in batch order, then writes its checkpoints, and stores its
/// offsets once those are delivered; at the end flushes the producer and commits.
pub struct Committer {
    pub handle: KafkaHandle,
    pub sinks: Option<KafkaSinks>,
    pub metrics: Arc<Metrics>,
}

/// Batches whose checkpoints are written and not yet delivered: their round trips overlap with
/// the next batches' deliveries instead of adding to each.
const CHECKPOINTS_IN_FLIGHT: usize = 64;

impl Committer {
    pub async fn run(self, mut rx: mpsc::Receiver<Pending>) {
        let (written_tx, mut written_rx) = mpsc::channel::<(Vec<(DeliveryFuture, KafkaOutput)>, Acks)>(CHECKPOINTS_IN_FLIGHT);
        let this = &self;
        let deliver = async move {
            let mut failed = LogEvery::default();
            while let Some(pending) = rx.recv().await {
                this.delivered(pending.deliveries, &mut failed).await;
                let written = this.write(&pending.checkpoints).await;
                if written_tx.send((written, pending.acks)).await.is_err() {
                    break;
                }
            }
        };
        let store = async {
            let mut failed = LogEvery::default();
            while let Some((written, acks)) = written_rx.recv().await {
                this.delivered(written, &mut failed).await;
                this.handle.store(&acks, &this.metrics);
            }
        };
        tokio::join!(deliver, store);
        if let Some(sinks) = &self.sinks {
            sinks.flush();
        }
        self.handle.commit();
    }

    /// Enqueues a batch's window checkpoints; their deliveries.
    async fn write(&self, checkpoints: &[Encoded]) -> Vec<(DeliveryFuture, KafkaOutput)> {
        let (Some(sinks), false) = (&self.sinks, checkpoints.is_empty()) else { return Vec::new() };
        let mut written = Vec::with_capacity(checkpoints.len());
        for checkpoint in checkpoints {
            match sinks.checkpoint(checkpoint).await {
                Some(delivery) => written.push((delivery, KafkaOutput::Checkpoint)),
                None => self.metrics.produce_errors.with_label_values(&[KafkaOutput::Checkpoint.label()]).inc(),
            }
        }
        self.metrics.window_checkpoints.with_label_values(&["written"]).inc_by(written.len() as u64);
        written
    }

    /// Awaits `deliveries`; an output not delivered is counted and logged.
    async fn delivered(&self, deliveries: Vec<(DeliveryFuture, KafkaOutput)>, failed: &mut LogEvery) {
        let m = &self.metrics;
        for (delivery, output) in deliveries {
            match delivery.await {
                Ok(Ok(_)) => {
                    if let KafkaOutput::DeadLetter(reason) = output {
                        m.dead_letters.with_label_values(&[reason]).inc();
                    }
                }
                // Counted and logged; holding the partition for an output that cannot be
                // written would stall it for good.
                result => {
                    m.produce_errors.with_label_values(&[output.label()]).inc();
                    if let Some(count) = failed.tick() {
                        let error = match result {
                            Ok(Err((e, _))) => e.to_string(),
                            _ => "producer gone".to_string(),
                        };
                        error!(output = output.label(), %error, count, "Kafka output not delivered; its offset moves on.");
                    }
                }
            }
        }
    }
}
