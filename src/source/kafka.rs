//! Kafka source: a consumer-group member whose offsets follow scoring (at-least-once).
//! docs/ARCHITECTURE.md, "Kafka offsets".
//!
//! `enable.auto.commit = true` with `enable.auto.offset.store = false`: librdkafka commits what
//! we *store*, and we store an offset only once every record up to it is handled — dropped
//! (dead-lettered), or windowed with every window it completed scored — and everything those
//! records produced on Kafka is delivered. On a revoke and on shutdown the stored offsets are
//! committed synchronously.

use std::sync::{Arc, RwLock};

use anyhow::{Context, Result};
use rdkafka::client::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::statistics::Statistics;
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use super::offsets::Acks;
use super::{Ack, Input, Origin, MAX_LINE_BATCH};
use crate::config::KafkaConfig;
use crate::telemetry::metrics::Metrics;
use crate::telemetry::LogEvery;
use crate::threshold::store::Record;

/// Topic names by index: positions carry the index, and a regex subscription finds new topics
/// at run time.
#[derive(Debug, Clone, Default)]
pub struct Topics(Arc<RwLock<Vec<String>>>);

impl Topics {
    pub fn index(&self, name: &str) -> usize {
        if let Some(i) = self.0.read().expect("topics lock is never poisoned").iter().position(|t| t == name) {
            return i;
        }
        let mut names = self.0.write().expect("topics lock is never poisoned");
        names.iter().position(|t| t == name).unwrap_or_else(|| {
            names.push(name.to_string());
            names.len() - 1
        })
    }

    pub fn name(&self, index: usize) -> String {
        self.0.read().expect("topics lock is never poisoned")[index].clone()
    }
}

pub(crate) fn client_config(cfg: &KafkaConfig) -> ClientConfig {
    let mut client = ClientConfig::new();
    client.set("bootstrap.servers", &cfg.brokers);
    for (k, v) in &cfg.properties {
        client.set(k, v.value());
    }
    client
}

/// Creates a librdkafka client (`what`: "consumer", ...) with `create`. An error names the
/// setting librdkafka refused and its reason, never a value: rdkafka's own message ends with the
/// value, and librdkafka's reason may quote it, so a password would be printed.
pub(crate) fn create_client<T>(cfg: &KafkaConfig, what: &str, create: impl FnOnce() -> KafkaResult<T>) -> Result<T> {
    create().map_err(|error| anyhow::anyhow!("kafka: creating the {what}: {}", without_values(&error, cfg)))
}

/// `error`'s message with the value it was about and every `[kafka.properties]` value (of four
/// characters or more: shorter ones are not secrets, and would garble the text) replaced.
fn without_values(error: &KafkaError, cfg: &KafkaConfig) -> String {
    const HIDDEN: &str = "<value>";
    let (mut text, refused) = match error {
        KafkaError::ClientConfig(_, reason, key, value) => {
            let setting = match key.as_str() {
                "bootstrap.servers" => "kafka.brokers".to_string(),
                "group.id" => "kafka.group_id".to_string(),
                "auto.offset.reset" => "kafka.auto_offset_reset".to_string(),
                key => format!("kafka.properties.{key}"),
            };
            (format!("{setting}: {reason}"), Some(value.as_str()).filter(|v| !v.is_empty()))
        }
        error => (error.to_string(), None),
    };
    let values = cfg.properties.values().map(|p| p.value()).filter(|v| v.len() >= 4);
    for value in refused.into_iter().chain(values) {
        text = text.replace(value, HIDDEN);
    }
    text
}

/// Partitions given to (`true`) or taken from this consumer, by topic name: from the rebalance
/// callback to the source task.
type Moved = (bool, Vec<(String, i32)>);

/// librdkafka's callbacks: consumer lag per partition (from its statistics), rebalances and
/// commits as metrics; on a revoke, the commit; on either, the marker for the window stage.
pub struct Observed {
    metrics: Arc<Metrics>,
    moved: mpsc::UnboundedSender<Moved>,
}

impl ClientContext for Observed {
    /// librdkafka retries on its own (reconnects, re-authenticates): counted and logged.
    fn error(&self, error: KafkaError, reason: &str) {
        let kind = match error.rdkafka_error_code() {
            Some(RDKafkaErrorCode::Authentication) => "authentication",
            Some(RDKafkaErrorCode::AllBrokersDown) => "all_brokers_down",
            _ => "client",
        };
        self.metrics.errors.with_label_values(&["kafka", kind]).inc();
        warn!(%error, reason, "Kafka client error; librdkafka retries.");
    }

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
    /// Before partitions are given up: commit what is stored for them, and tell the window
    /// stage (behind the records already read) to drop their series.
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Revoke(tpl) = rebalance else { return };
        match consumer.commit_consumer_state(CommitMode::Sync) {
            Ok(()) | Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => {}
            Err(error) => warn!(%error, "Kafka commit on revoke failed; the new owner replays from the previous commit."),
        }
        let _ = self.moved.send((false, topic_partitions(tpl)));
    }

    fn post_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let kind = match rebalance {
            Rebalance::Assign(tpl) => {
                self.metrics.assigned_partitions.add(tpl.count() as i64);
                info!(partitions = ?partitions(tpl), "Kafka partitions assigned.");
                let _ = self.moved.send((true, topic_partitions(tpl)));
                "assign"
            }
            Rebalance::Revoke(tpl) => {
                self.metrics.assigned_partitions.sub(tpl.count() as i64);
                for e in tpl.elements() {
                    let _ = self.metrics.consumer_lag.remove_label_values(&[e.topic(), &e.partition().to_string()]);
                }
                info!(partitions = ?partitions(tpl), "Kafka partitions revoked.");
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
        match result {
            // Nothing stored since the last commit: not a commit, not a failure.
            Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => {}
            Ok(()) => self.metrics.commits.with_label_values(&["ok"]).inc(),
            Err(error) => {
                self.metrics.commits.with_label_values(&["error"]).inc();
                warn!(%error, "Kafka offset commit failed; it is retried with the next one.");
            }
        }
    }
}

/// "topic/partition" of each element, for logs.
fn partitions(tpl: &TopicPartitionList) -> Vec<String> {
    tpl.elements().iter().map(|e| format!("{}/{}", e.topic(), e.partition())).collect()
}

fn topic_partitions(tpl: &TopicPartitionList) -> Vec<(String, i32)> {
    tpl.elements().iter().map(|e| (e.topic().to_string(), e.partition())).collect()
}

type ObservedConsumer = StreamConsumer<Observed>;

/// Reads the subscribed topics; each message goes down the line queue with its [`Origin`].
pub struct KafkaSource {
    consumer: Arc<ObservedConsumer>,
    topics: Topics,
    moved: mpsc::UnboundedReceiver<Moved>,
    /// Consume errors: counted, logged at a limited rate (a broker outage gives one per poll).
    errors: LogEvery,
}

/// Creates the consumer and subscribes (a topic starting with `^` is a regex); returns the
/// reader and the handle that stores and commits offsets.
pub fn connect(cfg: &KafkaConfig, topics: Topics, metrics: Arc<Metrics>) -> Result<(KafkaSource, KafkaHandle)> {
    let mut client = client_config(cfg);
    // librdkafka waits fetch.queue.backoff.ms (1 s by default) before fetching again once its
    // prefetch queue is over a threshold; at 10 ms a small queue keeps up. Small records cost
    // librdkafka about 300 bytes each while queued, so the queue is bounded in messages too.
    // Measured against 2 MB fetches and a 16 MB queue: more records/s, and about 110 MB less
    // RSS at 100k series (docs/performance.md, "Fetch settings").
    let defaults = [
        ("statistics.interval.ms", "5000"),
        ("partition.assignment.strategy", "cooperative-sticky"),
        ("fetch.queue.backoff.ms", "10"),
        ("queued.min.messages", "5000"),
        ("queued.max.messages.kbytes", "2048"),
        ("max.partition.fetch.bytes", "262144"),
    ];
    for (key, value) in defaults {
        if !cfg.properties.contains_key(key) {
            client.set(key, value);
        }
    }
    let (moved_tx, moved) = mpsc::unbounded_channel();
    client
        .set("group.id", &cfg.group_id)
        .set("auto.offset.reset", &cfg.auto_offset_reset)
        .set("enable.auto.commit", "true")
        .set("enable.auto.offset.store", "false");
    let consumer: ObservedConsumer = create_client(cfg, "consumer", || client.create_with_context(Observed { metrics, moved: moved_tx }))?;
    let names: Vec<&str> = cfg.topics.iter().map(String::as_str).collect();
    consumer.subscribe(&names).with_context(|| format!("kafka.topics: subscribing to {names:?}"))?;
    let consumer = Arc::new(consumer);
    Ok((
        KafkaSource { consumer: consumer.clone(), topics: topics.clone(), moved, errors: LogEvery::default() },
        KafkaHandle { consumer, topics },
    ))
}

impl KafkaSource {
    /// Reads messages until cancelled; each payload is one record line. Messages go down the
    /// line queue in batches of what librdkafka has at hand (at most [`MAX_LINE_BATCH`]).
    pub async fn run(mut self, tx: mpsc::Sender<Vec<Input>>, stop: CancellationToken, metrics: Arc<Metrics>) {
        // A received message borrows the consumer; `take` needs `self` mutably.
        let consumer = self.consumer.clone();
        loop {
            let first = tokio::select! {
                biased;
                _ = stop.cancelled() => break,
                Some(moved) = self.moved.recv() => {
                    let marker = rebalance_marker(&self.topics, moved);
                    if tx.send(vec![marker]).await.is_err() {
                        break;
                    }
                    continue;
                }
                msg = consumer.recv() => msg,
            };
            let mut batch = Vec::new();
            self.take(first, &mut batch, &metrics);
            while batch.len() < MAX_LINE_BATCH {
                match ready_now(consumer.recv()) {
                    Some(msg) => self.take(msg, &mut batch, &metrics),
                    None => break,
                }
            }
            if tx.send(batch).await.is_err() {
                break;
            }
        }
        info!("Kafka source stopped.");
    }

    /// Appends a received message (or counts the error), after the markers of any rebalance
    /// callback that ran while receiving it: a revoked partition's earlier records are already in
    /// the batch, and this message may be from after the rebalance (from an assigned partition,
    /// say).
    fn take(&mut self, msg: KafkaResult<BorrowedMessage<'_>>, batch: &mut Vec<Input>, metrics: &Metrics) {
        while let Ok(moved) = self.moved.try_recv() {
            batch.push(rebalance_marker(&self.topics, moved));
        }
        let msg = match msg {
            Ok(m) => m,
            Err(error) => {
                metrics.errors.with_label_values(&["kafka", "consume"]).inc();
                if let Some(count) = self.errors.tick() {
                    warn!(%error, count, "Kafka consume error.");
                }
                return;
            }
        };
        metrics.records_received.inc();
        let ack = Ack { topic: self.topics.index(msg.topic()), partition: msg.partition(), offset: msg.offset() };
        let origin = Origin { ack, key: msg.key().map(<[u8]>::to_vec) };
        let payload = msg.payload().unwrap_or_default();
        batch.push(match std::str::from_utf8(payload) {
            Ok(text) => Input::Line(text.to_string(), Some(origin)),
            Err(_) => Input::Undecodable(payload.to_vec(), origin),
        });
    }
}

fn rebalance_marker(topics: &Topics, (assigned, partitions): Moved) -> Input {
    let partitions = partitions.iter().map(|(topic, p)| (topics.index(topic), *p)).collect();
    if assigned {
        Input::Assigned(partitions)
    } else {
        Input::Revoked(partitions)
    }
}

/// How long reading a compacted topic's partitions back may take (see [`read_back`]).
const READ_BACK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// The newest record of each key in the partitions of a compacted topic (the thresholds'
/// changelog, the window checkpoints; `setting` names it in errors) of the same numbers as the
/// input partitions `assigned`, read on a blocking thread ([`read_to_end`]).
pub async fn read_back(cfg: &KafkaConfig, setting: &'static str, topic: &str, assigned: &[(usize, i32)]) -> Result<Vec<Record>> {
    let mut numbers: Vec<i32> = assigned.iter().map(|&(_, p)| p).collect();
    numbers.sort_unstable();
    numbers.dedup();
    let (cfg, topic) = (cfg.clone(), topic.to_string());
    tokio::task::spawn_blocking(move || read_to_end(&cfg, setting, &topic, &numbers, READ_BACK_TIMEOUT)).await?
}

/// The newest record of each key in `partitions` of `topic` (a compacted topic: the thresholds'
/// changelog, the window checkpoints; `setting` names it in errors), read from their start to
/// their end as of now by a consumer of no group; blocking. A key that is not UTF-8 is read
/// lossily (its value then fails to restore and is counted).
fn read_to_end(cfg: &KafkaConfig, setting: &str, topic: &str, partitions: &[i32], timeout: std::time::Duration) -> Result<Vec<Record>> {
    let mut client = client_config(cfg);
    client
        .set("group.id", format!("{}-changelog-reader", cfg.group_id))
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false");
    let consumer: BaseConsumer = create_client(cfg, "changelog reader", || client.create())?;
    let deadline = std::time::Instant::now() + timeout;
    let mut assignment = TopicPartitionList::new();
    let mut ends = std::collections::HashMap::new();
    for &p in partitions {
        let (low, high) = consumer.fetch_watermarks(topic, p, timeout).with_context(|| format!("{setting}: {topic} partition {p}"))?;
        if high > low {
            assignment.add_partition_offset(topic, p, Offset::Beginning)?;
            ends.insert(p, high);
        }
    }
    // Only the newest value of a key is kept: a changelog not yet compacted holds many.
    let mut newest = std::collections::HashMap::new();
    if ends.is_empty() {
        return Ok(Vec::new());
    }
    consumer.assign(&assignment).context("kafka: assigning the changelog's partitions")?;
    while !ends.is_empty() {
        if std::time::Instant::now() >= deadline {
            anyhow::bail!("{setting}: {topic}: partitions {:?} not read to their end in {timeout:?}", ends.keys());
        }
        if let Some(msg) = consumer.poll(std::time::Duration::from_millis(100)) {
            let msg = msg.with_context(|| format!("{setting}: reading {topic}"))?;
            let series = String::from_utf8_lossy(msg.key().unwrap_or_default()).into_owned();
            newest.insert((msg.partition(), series), msg.payload().map(<[u8]>::to_vec));
        }
        // Done with a partition once its position passed the end: the last offsets may hold no
        // record (compacted away).
        let positions = consumer.position().context("kafka: the changelog reader's position")?;
        ends.retain(|&p, &mut end| positions.find_partition(topic, p).and_then(|e| e.offset().to_raw()).is_none_or(|at| at < end));
    }
    Ok(newest.into_iter().map(|((partition, series), value)| Record { series, partition, value }).collect())
}

/// The future's output if it is ready without waiting.
fn ready_now<F: std::future::Future>(future: F) -> Option<F::Output> {
    let mut future = std::pin::pin!(future);
    match future.as_mut().poll(&mut std::task::Context::from_waker(std::task::Waker::noop())) {
        std::task::Poll::Ready(output) => Some(output),
        std::task::Poll::Pending => None,
    }
}

/// What the committer keeps to store offsets and to commit at shutdown.
pub struct KafkaHandle {
    consumer: Arc<ObservedConsumer>,
    topics: Topics,
}

impl KafkaHandle {
    /// Stores handled offsets; librdkafka commits them on its auto-commit interval.
    pub fn store(&self, acks: &Acks, metrics: &Metrics) {
        for ((topic, partition), offset) in acks.iter() {
            match self.consumer.store_offset(&self.topics.name(topic), partition, offset) {
                Ok(()) => {}
                // Revoked while the batch was in flight: the new owner replays these records,
                // which at-least-once allows.
                Err(KafkaError::StoreOffset(RDKafkaErrorCode::State)) => {
                    debug!(partition, offset, "Offset of a revoked partition not stored.")
                }
                Err(error) => {
                    metrics.errors.with_label_values(&["kafka", "offset_store"]).inc();
                    warn!(%error, partition, offset, "Offset not stored.");
                }
            }
        }
    }

    pub fn commit(&self) {
        match self.consumer.commit_consumer_state(CommitMode::Sync) {
            Ok(()) | Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => info!("Kafka offsets committed."),
            Err(error) => error!(%error, "Kafka commit at shutdown failed; records since the last commit will be replayed."),
        }
    }
}
