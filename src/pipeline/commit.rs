//! The committer: awaits each handled batch's Kafka deliveries in batch order, then stores its
//! offsets; at the end flushes the producer and commits.

use std::sync::Arc;

use rdkafka::producer::DeliveryFuture;
use tokio::sync::mpsc;
use tracing::error;

use crate::sink::kafka::{KafkaOutput, KafkaSinks};
use crate::source::kafka::KafkaHandle;
use crate::source::offsets::Acks;
use crate::telemetry::metrics::Metrics;
use crate::telemetry::LogEvery;

/// A handled batch: what it produced on Kafka, and the offsets to store once that is delivered.
#[derive(Default)]
pub struct Pending {
    pub deliveries: Vec<(DeliveryFuture, KafkaOutput)>,
    pub acks: Acks,
}

/// Awaits each batch's deliveries in batch order, then stores its offsets; at the end flushes
/// the producer and commits.
pub struct Committer {
    pub handle: KafkaHandle,
    pub sinks: Option<KafkaSinks>,
    pub metrics: Arc<Metrics>,
}

impl Committer {
    pub async fn run(self, mut rx: mpsc::Receiver<Pending>) {
        let m = &self.metrics;
        let mut failed = LogEvery::default();
        while let Some(pending) = rx.recv().await {
            for (delivery, output) in pending.deliveries {
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
            self.handle.store(&pending.acks, m);
        }
        if let Some(sinks) = &self.sinks {
            sinks.flush();
        }
        self.handle.commit();
    }
}
