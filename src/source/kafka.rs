//! Kafka source: a consumer-group member whose offsets follow scoring (at-least-once).
//!
//! `enable.auto.commit = true` with `enable.auto.offset.store = false`: librdkafka commits what
//! we *store*, and we store a record's offset only once it is handled — dropped (counted), or
//! windowed with every window it completed scored. The window stage records the highest handled
//! offset per partition in each batch; the alert stage, which handles batches strictly in
//! order, stores them after the batch. A crash replays from the last commit and the replayed
//! records refill the windows (series warm up again). On shutdown the stored offsets are
//! committed synchronously.

use std::collections::BTreeMap;
use std::sync::Arc;

use anyhow::{Context, Result};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::Message;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::app::Input;
use crate::config::KafkaConfig;
use crate::telemetry::metrics::Metrics;

/// Where a record came from: what to store once it is handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Ack {
    pub topic: usize,
    pub partition: i32,
    pub offset: i64,
}

/// The highest handled offset per (topic, partition) since the last store.
#[derive(Debug, Default, Clone)]
pub struct Acks(BTreeMap<(usize, i32), i64>);

impl Acks {
    pub fn add(&mut self, ack: Ack) {
        let e = self.0.entry((ack.topic, ack.partition)).or_insert(ack.offset);
        *e = (*e).max(ack.offset);
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

pub struct KafkaSource {
    consumer: Arc<StreamConsumer>,
    topics: Vec<String>,
}

/// Creates the consumer and subscribes; returns the reader and the handle that stores offsets.
pub fn connect(cfg: &KafkaConfig) -> Result<(KafkaSource, KafkaHandle)> {
    let mut client = ClientConfig::new();
    client
        .set("bootstrap.servers", &cfg.brokers)
        .set("group.id", &cfg.group_id)
        .set("auto.offset.reset", &cfg.auto_offset_reset)
        .set("enable.auto.commit", "true")
        .set("enable.auto.offset.store", "false");
    for (k, v) in &cfg.properties {
        client.set(k, v);
    }
    let consumer: StreamConsumer = client.create().context("kafka: creating the consumer")?;
    let topics: Vec<&str> = cfg.topics.iter().map(String::as_str).collect();
    consumer.subscribe(&topics).context("kafka: subscribing")?;
    let consumer = Arc::new(consumer);
    Ok((
        KafkaSource { consumer: consumer.clone(), topics: cfg.topics.clone() },
        KafkaHandle { consumer, topics: cfg.topics.clone() },
    ))
}

impl KafkaSource {
    /// Reads messages until cancelled; each payload is one record line.
    pub async fn run(self, tx: mpsc::Sender<Input>, stop: CancellationToken, metrics: Arc<Metrics>) {
        loop {
            let msg = tokio::select! {
                biased;
                _ = stop.cancelled() => break,
                msg = self.consumer.recv() => msg,
            };
            let msg = match msg {
                Ok(m) => m,
                Err(error) => {
                    metrics.errors.with_label_values(&["kafka", "consume"]).inc();
                    warn!(%error, "Kafka consume error.");
                    continue;
                }
            };
            metrics.records_received.inc();
            let topic = self.topics.iter().position(|t| t == msg.topic()).unwrap_or(0);
            let ack = Ack { topic, partition: msg.partition(), offset: msg.offset() };
            // Invalid UTF-8 becomes text the parser refuses, so it is counted and acknowledged.
            let text = String::from_utf8_lossy(msg.payload().unwrap_or_default()).into_owned();
            if tx.send(Input::Line(text, Some(ack))).await.is_err() {
                break;
            }
        }
        info!("Kafka source stopped.");
    }
}

/// What the alert stage keeps to store offsets and to commit at shutdown.
#[derive(Clone)]
pub struct KafkaHandle {
    consumer: Arc<StreamConsumer>,
    topics: Vec<String>,
}

impl KafkaHandle {
    /// Stores handled offsets; librdkafka commits them on its auto-commit interval.
    pub fn store(&self, acks: &Acks, metrics: &Metrics) {
        for (&(topic, partition), &offset) in &acks.0 {
            // A revoked partition cannot be stored any more: its records are replayed by the
            // new owner, which is what at-least-once allows.
            if let Err(error) = self.consumer.store_offset(&self.topics[topic], partition, offset) {
                metrics.errors.with_label_values(&["kafka", "offset_store"]).inc();
                warn!(%error, partition, offset, "Offset not stored.");
            }
        }
    }

    pub fn commit(&self) {
        match self.consumer.commit_consumer_state(CommitMode::Sync) {
            Ok(()) => info!("Kafka offsets committed."),
            Err(error) => error!(%error, "Kafka commit at shutdown failed; records since the last commit will be replayed."),
        }
    }
}
