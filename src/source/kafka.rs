//! Kafka source: a consumer-group member whose offsets follow scoring (at-least-once).
//!
//! `enable.auto.commit = true` with `enable.auto.offset.store = false`: librdkafka commits what
//! we *store*, and we store a record's offset only once it is handled — dropped (counted), or
//! windowed with every window it completed scored. The window stage records the highest handled
//! offset per partition in each batch; the alert stage, which handles batches strictly in
//! order, stores them after the batch. A crash replays from the last commit and the replayed
//! records refill the windows (series warm up again). On shutdown the stored offsets are
//! committed synchronously.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;

use anyhow::{Context, Result};
use rdkafka::client::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::error::KafkaResult;
use rdkafka::statistics::Statistics;
use rdkafka::TopicPartitionList;
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
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

/// Offsets to store, per (topic, partition): the last record whose successors a replay must
/// start from (librdkafka commits the one after it).
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Acks(BTreeMap<(usize, i32), i64>);

impl Acks {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// What a replay must start from so that every window is scored at least once.
///
/// Committing the newest handled record is not enough: a replay after a crash would start after
/// it, and the first W−1 replayed records of a series could not complete their windows. So per
/// partition the stored offset trails to the oldest record that some series' next window still
/// needs (`Pushed::held`); with no such record, to the newest handled one.
#[derive(Debug, Default)]
pub struct OffsetTracker {
    /// Per series: positions of the records its next window needs, oldest first.
    held: HashMap<String, VecDeque<Ack>>,
    /// Per partition: multiset of the series' oldest held offsets.
    oldest: BTreeMap<(usize, i32), BTreeMap<i64, u32>>,
    /// Per partition: the newest handled offset.
    newest: BTreeMap<(usize, i32), i64>,
}

impl OffsetTracker {
    /// A record was dropped (and counted): handled, holds nothing.
    pub fn dropped(&mut self, ack: Ack) {
        let e = self.newest.entry((ack.topic, ack.partition)).or_insert(ack.offset);
        *e = (*e).max(ack.offset);
    }

    /// A record went into its series' window state; the series now needs its newest `held` records.
    pub fn windowed(&mut self, ack: Ack, series: &str, held: usize) {
        self.dropped(ack);
        let rows = self.held.entry(series.to_string()).or_default();
        let before = rows.front().copied();
        rows.push_back(ack);
        while rows.len() > held {
            rows.pop_front();
        }
        let after = rows.front().copied();
        if rows.is_empty() {
            self.held.remove(series);
        }
        if before != after {
            self.unhold(before);
            if let Some(a) = after {
                *self.oldest.entry((a.topic, a.partition)).or_default().entry(a.offset).or_default() += 1;
            }
        }
    }

    /// A series left (idle eviction): its rows are no longer needed.
    pub fn forget(&mut self, series: &str) {
        if let Some(rows) = self.held.remove(series) {
            self.unhold(rows.front().copied());
        }
    }

    fn unhold(&mut self, ack: Option<Ack>) {
        let Some(a) = ack else { return };
        if let Some(set) = self.oldest.get_mut(&(a.topic, a.partition)) {
            if let Some(n) = set.get_mut(&a.offset) {
                *n -= 1;
                if *n == 0 {
                    set.remove(&a.offset);
                }
            }
        }
    }

    /// The offsets that are safe to store now (see the type's docs).
    pub fn safe(&self) -> Acks {
        let mut out = BTreeMap::new();
        for (&part, &newest) in &self.newest {
            let last = match self.oldest.get(&part).and_then(|set| set.keys().next()) {
                Some(&oldest) => oldest - 1,
                None => newest,
            };
            if last >= 0 {
                out.insert(part, last);
            }
        }
        Acks(out)
    }
}

pub struct KafkaSource {
    consumer: Arc<ObservedConsumer>,
    topics: Vec<String>,
}

fn client_config(cfg: &KafkaConfig) -> ClientConfig {
    let mut client = ClientConfig::new();
    client.set("bootstrap.servers", &cfg.brokers);
    for (k, v) in &cfg.properties {
        client.set(k, v);
    }
    client
}

/// librdkafka's callbacks as metrics: consumer lag per partition (from its statistics),
/// rebalances and commits.
pub struct Observed {
    metrics: Arc<Metrics>,
}

impl ClientContext for Observed {
    fn stats(&self, stats: Statistics) {
        for (topic, t) in &stats.topics {
            // Lag is what is not yet read: high watermark minus the next offset to fetch.
            // librdkafka's own consumer_lag counts from the committed offset, which trails by
            // the rows windows still hold (Kafka offsets in docs/ARCHITECTURE.md).
            // Partition -1 is librdkafka's internal "unassigned" bucket; -1 offsets are unknown.
            for (p, part) in t.partitions.iter().filter(|(p, part)| **p >= 0 && part.app_offset >= 0 && part.hi_offset >= 0) {
                let lag = (part.hi_offset - part.app_offset).max(0);
                self.metrics.consumer_lag.with_label_values(&[topic, &p.to_string()]).set(lag);
            }
        }
    }
}

impl ConsumerContext for Observed {
    fn post_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let kind = match rebalance {
            Rebalance::Assign(tpl) => {
                info!(partitions = tpl.count(), "Kafka partitions assigned.");
                "assign"
            }
            Rebalance::Revoke(tpl) => {
                for e in tpl.elements() {
                    let _ = self.metrics.consumer_lag.remove_label_values(&[e.topic(), &e.partition().to_string()]);
                }
                info!(partitions = tpl.count(), "Kafka partitions revoked.");
                "revoke"
            }
            Rebalance::Error(error) => {
                warn!(%error, "Kafka rebalance error.");
                "error"
            }
        };
        self.metrics.rebalances.with_label_values(&[kind]).inc();
    }

    fn commit_callback(&self, result: KafkaResult<()>, _: &TopicPartitionList) {
        let label = if result.is_ok() { "ok" } else { "error" };
        self.metrics.commits.with_label_values(&[label]).inc();
        if let Err(error) = result {
            warn!(%error, "Kafka offset commit failed; it is retried with the next one.");
        }
    }
}

type ObservedConsumer = StreamConsumer<Observed>;

/// Creates the consumer and subscribes; returns the reader and the handle that stores offsets.
pub fn connect(cfg: &KafkaConfig, metrics: Arc<Metrics>) -> Result<(KafkaSource, KafkaHandle)> {
    let mut client = client_config(cfg);
    if !cfg.properties.contains_key("statistics.interval.ms") {
        client.set("statistics.interval.ms", "5000");
    }
    let consumer: ObservedConsumer = client
        .set("group.id", &cfg.group_id)
        .set("auto.offset.reset", &cfg.auto_offset_reset)
        .set("enable.auto.commit", "true")
        .set("enable.auto.offset.store", "false")
        .create_with_context(Observed { metrics })
        .context("kafka: creating the consumer")?;
    let topics: Vec<&str> = cfg.topics.iter().map(String::as_str).collect();
    consumer.subscribe(&topics).context("kafka: subscribing")?;
    let consumer = Arc::new(consumer);
    Ok((
        KafkaSource { consumer: consumer.clone(), topics: cfg.topics.clone() },
        KafkaHandle { consumer, topics: cfg.topics.clone() },
    ))
}

/// The Kafka outputs: dead letters and alert events, through one idempotent producer.
#[derive(Clone)]
pub struct KafkaSinks {
    producer: FutureProducer,
    topics: Vec<String>,
    dead_letter_topic: Option<String>,
    alerts_topic: Option<String>,
}

impl KafkaSinks {
    /// `None` when no output topic is configured.
    pub fn new(cfg: &KafkaConfig) -> Result<Option<KafkaSinks>> {
        let topic = |t: &str| (!t.is_empty()).then(|| t.to_string());
        let (dead_letter_topic, alerts_topic) = (topic(&cfg.dead_letter_topic), topic(&cfg.alerts_topic));
        if dead_letter_topic.is_none() && alerts_topic.is_none() {
            return Ok(None);
        }
        let producer: FutureProducer = client_config(cfg)
            .set("enable.idempotence", "true")
            .create()
            .context("kafka: creating the producer")?;
        Ok(Some(KafkaSinks { producer, topics: cfg.topics.clone(), dead_letter_topic, alerts_topic }))
    }

    pub fn dead_letters(&self) -> bool {
        self.dead_letter_topic.is_some()
    }

    /// The original bytes, with headers naming the error and where the record came from.
    pub fn dead_letter(&self, payload: &str, ack: Ack, reason: &str, error: &str) -> Option<DeliveryFuture> {
        let topic = self.dead_letter_topic.as_ref()?;
        let (partition, offset) = (ack.partition.to_string(), ack.offset.to_string());
        let headers = OwnedHeaders::new()
            .insert(Header { key: "anomalyd.error", value: Some(reason) })
            .insert(Header { key: "anomalyd.error_message", value: Some(error) })
            .insert(Header { key: "anomalyd.source_topic", value: Some(self.topics[ack.topic].as_str()) })
            .insert(Header { key: "anomalyd.source_partition", value: Some(partition.as_str()) })
            .insert(Header { key: "anomalyd.source_offset", value: Some(offset.as_str()) });
        let record = FutureRecord::<(), str>::to(topic).payload(payload).headers(headers);
        self.producer.send_result(record).map_err(|(e, _)| warn!(error = %e, "Dead letter not enqueued.")).ok()
    }

    /// Waits (bounded) for everything enqueued to be delivered: at shutdown, before the commit.
    pub fn flush(&self) {
        if let Err(error) = self.producer.flush(std::time::Duration::from_secs(10)) {
            error!(%error, "Kafka producer flush at shutdown failed; some output may be lost.");
        }
    }

    /// An alert event, keyed by series so one series' events stay in order.
    pub fn alert(&self, series: &str, event: &str) -> Option<DeliveryFuture> {
        let topic = self.alerts_topic.as_ref()?;
        let record = FutureRecord::to(topic).key(series).payload(event);
        self.producer.send_result(record).map_err(|(e, _)| warn!(error = %e, "Alert not enqueued.")).ok()
    }
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
    consumer: Arc<ObservedConsumer>,
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

#[cfg(test)]
mod tests {
    use super::*;

    fn ack(offset: i64) -> Ack {
        Ack { topic: 0, partition: 0, offset }
    }

    #[test]
    fn stored_offset_trails_to_the_oldest_row_a_window_still_needs() {
        let mut t = OffsetTracker::default();
        // W = 3: each series needs its last 2 records.
        t.windowed(ack(0), "a", 1);
        t.windowed(ack(1), "b", 1);
        t.windowed(ack(2), "a", 2);
        assert_eq!(t.safe().0.get(&(0, 0)), None, "record 0 is still needed by a: nothing to store");
        t.windowed(ack(3), "a", 2);
        assert_eq!(t.safe().0[&(0, 0)], 0, "a needs 2 and 3, b needs 1: replay from 1");
        t.dropped(ack(4));
        t.forget("b");
        assert_eq!(t.safe().0[&(0, 0)], 1, "only a's 2 and 3 are needed");
        t.forget("a");
        assert_eq!(t.safe().0[&(0, 0)], 4, "nothing held: everything handled");
    }
}
