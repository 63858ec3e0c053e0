//! The Kafka outputs: dead letters, scores, alert events, the thresholds' changelog and the window
//! checkpoints, through one idempotent producer.

use std::time::Duration;

use anyhow::Result;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use tracing::{error, warn};

use crate::config::KafkaConfig;
use crate::source::checkpoints::Encoded;
use crate::source::kafka::{client_config, create_client, Topics};
use crate::source::Origin;

/// Which Kafka output a message was for (a metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KafkaOutput {
    /// With the reason the record was dropped.
    DeadLetter(&'static str),
    Score,
    Alert,
    /// A series' threshold state, or its tombstone.
    Thresholds,
    /// A series' window checkpoint.
    Checkpoint,
}

impl KafkaOutput {
    pub fn label(self) -> &'static str {
        match self {
            KafkaOutput::DeadLetter(_) => "dead_letter",
            KafkaOutput::Score => "score",
            KafkaOutput::Alert => "alert",
            KafkaOutput::Thresholds => "thresholds",
            KafkaOutput::Checkpoint => "checkpoint",
        }
    }
}

/// The Kafka outputs: dead letters, scores, alert events, the thresholds' changelog and the window
/// checkpoints, through one idempotent producer.
#[derive(Clone)]
pub struct KafkaSinks {
    producer: FutureProducer,
    topics: Topics,
    dead_letter_topic: Option<String>,
    dead_letter_max_bytes: usize,
    scores_topic: Option<String>,
    alerts_topic: Option<String>,
    thresholds_topic: Option<String>,
    checkpoints_topic: Option<String>,
}

impl KafkaSinks {
    /// `None` when no output topic is configured.
    pub fn new(cfg: &KafkaConfig, topics: Topics) -> Result<Option<KafkaSinks>> {
        let topic = |t: &str| (!t.is_empty()).then(|| t.to_string());
        let sinks = (topic(&cfg.dead_letter_topic), topic(&cfg.scores_topic), topic(&cfg.alerts_topic), topic(&cfg.thresholds_topic));
        let checkpoints_topic = topic(&cfg.checkpoints_topic);
        if sinks == (None, None, None, None) && checkpoints_topic.is_none() {
            return Ok(None);
        }
        let mut client = client_config(cfg);
        client.set("enable.idempotence", "true");
        let producer: FutureProducer = create_client(cfg, "producer", || client.create())?;
        let (dead_letter_topic, scores_topic, alerts_topic, thresholds_topic) = sinks;
        let dead_letter_max_bytes = cfg.dead_letter_max_bytes;
        Ok(Some(KafkaSinks {
            producer,
            topics,
            dead_letter_topic,
            dead_letter_max_bytes,
            scores_topic,
            alerts_topic,
            thresholds_topic,
            checkpoints_topic,
        }))
    }

    /// The input topics' names by index.
    pub fn topics(&self) -> &Topics {
        &self.topics
    }

    /// Whether `dead_letter_topic` is configured (`dead_letter` sends).
    pub fn has_dead_letters(&self) -> bool {
        self.dead_letter_topic.is_some()
    }

    /// Whether `scores_topic` is configured (`score` sends).
    pub fn has_scores(&self) -> bool {
        self.scores_topic.is_some()
    }

    /// Whether `alerts_topic` is configured (`alert` sends).
    pub fn has_alerts(&self) -> bool {
        self.alerts_topic.is_some()
    }

    /// Enqueues a message, waiting while librdkafka's queue is full; `None` (logged) when the
    /// producer refuses it for another reason.
    async fn send(&self, mut record: FutureRecord<'_, [u8], [u8]>) -> Option<DeliveryFuture> {
        loop {
            match self.producer.send_result(record) {
                Ok(delivery) => return Some(delivery),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    record = r;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err((error, r)) => {
                    warn!(%error, topic = r.topic, "Kafka message not enqueued.");
                    return None;
                }
            }
        }
    }

    /// The original key and bytes, with headers naming the error and where the record came from.
    pub async fn dead_letter(&self, payload: &[u8], origin: &Origin, reason: &str, error: &str) -> Option<DeliveryFuture> {
        let topic = self.dead_letter_topic.as_ref()?;
        let (source, partition, offset) =
            (self.topics.name(origin.ack.topic), origin.ack.partition.to_string(), origin.ack.offset.to_string());
        let mut headers = OwnedHeaders::new()
            .insert(Header { key: "anomalyd.error", value: Some(reason) })
            .insert(Header { key: "anomalyd.error_message", value: Some(error) })
            .insert(Header { key: "anomalyd.source_topic", value: Some(source.as_str()) })
            .insert(Header { key: "anomalyd.source_partition", value: Some(partition.as_str()) })
            .insert(Header { key: "anomalyd.source_offset", value: Some(offset.as_str()) });
        let original = payload.len().to_string();
        if payload.len() > self.dead_letter_max_bytes {
            headers = headers
                .insert(Header { key: "anomalyd.truncated", value: Some("true") })
                .insert(Header { key: "anomalyd.original_bytes", value: Some(original.as_str()) });
        }
        let kept = &payload[..payload.len().min(self.dead_letter_max_bytes)];
        let mut record = FutureRecord::to(topic).payload(kept).headers(headers);
        if let Some(key) = &origin.key {
            record = record.key(key.as_slice());
        }
        self.send(record).await
    }

    /// A window's score (JSON), keyed by series.
    pub async fn score(&self, series: &str, line: &str) -> Option<DeliveryFuture> {
        let topic = self.scores_topic.as_ref()?;
        self.send(FutureRecord::to(topic).key(series.as_bytes()).payload(line.as_bytes())).await
    }

    /// An alert event (JSON), keyed by series so one series' events stay in order.
    pub async fn alert(&self, series: &str, event: &str) -> Option<DeliveryFuture> {
        let topic = self.alerts_topic.as_ref()?;
        self.send(FutureRecord::to(topic).key(series.as_bytes()).payload(event.as_bytes())).await
    }

    /// A series' threshold state (`None`: a tombstone) to the changelog's partition of the same
    /// number as the series' input `partition`.
    pub async fn threshold(&self, series: &str, partition: i32, state: Option<&str>) -> Option<DeliveryFuture> {
        let topic = self.thresholds_topic.as_ref()?;
        let record = FutureRecord::to(topic).key(series.as_bytes()).partition(partition);
        self.send(match state {
            Some(state) => record.payload(state.as_bytes()),
            None => record,
        })
        .await
    }

    /// A series' window checkpoint to the topic's partition of the same number as its input's.
    pub async fn checkpoint(&self, checkpoint: &Encoded) -> Option<DeliveryFuture> {
        let topic = self.checkpoints_topic.as_ref()?;
        let record = FutureRecord::to(topic).key(checkpoint.series.as_bytes()).partition(checkpoint.partition);
        self.send(record.payload(checkpoint.value.as_bytes())).await
    }

    /// Waits (bounded) for everything enqueued to be delivered: at shutdown, before the commit.
    pub fn flush(&self) {
        if let Err(error) = self.producer.flush(Duration::from_secs(10)) {
            error!(%error, "Kafka producer flush at shutdown failed; some output may be lost.");
        }
    }
}
