//! Kafka source: a consumer-group member whose offsets follow scoring (at-least-once), and the
//! Kafka outputs (dead letters, scores, alert events). docs/ARCHITECTURE.md, "Kafka offsets".
//!
//! `enable.auto.commit = true` with `enable.auto.offset.store = false`: librdkafka commits what
//! we *store*, and we store an offset only once every record up to it is handled — dropped
//! (dead-lettered), or windowed with every window it completed scored — and everything those
//! records produced on Kafka is delivered. On a revoke and on shutdown the stored offsets are
//! committed synchronously.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::{Context, Result};
use rdkafka::client::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::statistics::Statistics;
use rdkafka::TopicPartitionList;
use rdkafka::message::{BorrowedMessage, Header, Message, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::app::{Input, LOG_EVERY, MAX_LINE_BATCH};
use crate::config::KafkaConfig;
use crate::telemetry::metrics::Metrics;

/// Where a record came from: what to store once it is handled. `topic` indexes [`Topics`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Ack {
    pub topic: usize,
    pub partition: i32,
    pub offset: i64,
}

/// A Kafka message's position and key, as it travels with its payload.
#[derive(Debug, Clone, PartialEq)]
pub struct Origin {
    pub ack: Ack,
    pub key: Option<Vec<u8>>,
}

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

/// Offsets to store, per (topic, partition): the last record whose successors a replay must
/// start from (librdkafka commits the one after it).
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Acks(BTreeMap<(usize, i32), i64>);

impl Acks {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// A series keeps the offset of every `MARK_EVERY`-th record it windowed, not of every one: a
/// replay may start up to `MARK_EVERY` − 1 of its records early (their windows are scored
/// again, as at-least-once allows), and a series with W = 64 keeps 5 offsets instead of 63.
const MARK_EVERY: u64 = 16;

/// What a series holds of the input: the partition of its records, and marks from which a
/// replay rebuilds its next window. Producers key by series, so a series' records share a
/// partition; should one move anyway, its rows from the old partition stop being held (the
/// windows spanning both are then not covered by a replay).
#[derive(Debug)]
struct Held {
    partition: (usize, i32),
    /// Records of this series windowed from `partition`.
    rows: u64,
    /// Offsets of its records number `first`, `first + MARK_EVERY`, …; the first mark is at or
    /// before the oldest record the next window needs.
    first: u64,
    marks: VecDeque<i64>,
}

impl Held {
    fn oldest(&self) -> Option<((usize, i32), i64)> {
        self.marks.front().map(|&offset| (self.partition, offset))
    }

    /// Record `offset` was windowed, and the series now needs its newest `held` records.
    fn push(&mut self, offset: i64, held: usize) {
        let n = self.rows;
        self.rows += 1;
        if self.marks.is_empty() {
            self.first = n;
        }
        if n == self.first + self.marks.len() as u64 * MARK_EVERY {
            self.marks.push_back(offset);
        }
        if held == 0 {
            self.marks.clear();
            return;
        }
        let oldest = self.rows.saturating_sub(held as u64);
        while self.marks.len() > 1 && self.first + MARK_EVERY <= oldest {
            self.marks.pop_front();
            self.first += MARK_EVERY;
        }
    }
}

/// What a replay must start from so that every window is scored at least once.
///
/// Committing the newest handled record is not enough: a replay after a crash would start after
/// it, and the first W−1 replayed records of a series could not complete their windows. So per
/// partition the stored offset trails to the oldest record that some series' next window still
/// needs (`Pushed::held`), or up to `MARK_EVERY` − 1 of that series' records before it; with no
/// such record, to the newest handled one.
#[derive(Debug, Default)]
pub struct OffsetTracker {
    held: HashMap<String, Held>,
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
        let partition = (ack.topic, ack.partition);
        // Look up before inserting: a key is allocated once per series, not per record.
        if !self.held.contains_key(series) {
            self.held.insert(series.to_string(), Held { partition, rows: 0, first: 0, marks: VecDeque::new() });
        }
        let h = self.held.get_mut(series).expect("inserted above");
        let before = h.oldest();
        if h.partition != partition {
            (h.partition, h.rows) = (partition, 0);
            h.marks.clear();
        }
        h.push(ack.offset, held);
        let after = h.oldest();
        if before != after {
            self.unhold(before);
            if let Some((p, offset)) = after {
                *self.oldest.entry(p).or_default().entry(offset).or_default() += 1;
            }
        }
    }

    /// A series left (idle eviction): its rows are no longer needed.
    pub fn forget(&mut self, series: &str) {
        if let Some(h) = self.held.remove(series) {
            self.unhold(h.oldest());
        }
    }

    /// Partitions went to another consumer: forgets them, and every series of one of them (its
    /// window state must go too: the new owner rebuilds it). Returns those series.
    pub fn revoke(&mut self, partitions: &[(usize, i32)]) -> Vec<String> {
        let gone: Vec<String> =
            self.held.iter().filter(|(_, h)| partitions.contains(&h.partition)).map(|(series, _)| series.clone()).collect();
        gone.iter().for_each(|s| self.forget(s));
        for p in partitions {
            self.oldest.remove(p);
            self.newest.remove(p);
        }
        gone
    }

    fn unhold(&mut self, oldest: Option<((usize, i32), i64)>) {
        let Some((p, offset)) = oldest else { return };
        if let Some(set) = self.oldest.get_mut(&p) {
            if let Some(n) = set.get_mut(&offset) {
                *n -= 1;
                if *n == 0 {
                    set.remove(&offset);
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

fn client_config(cfg: &KafkaConfig) -> ClientConfig {
    let mut client = ClientConfig::new();
    client.set("bootstrap.servers", &cfg.brokers);
    for (k, v) in &cfg.properties {
        client.set(k, v);
    }
    client
}

/// Partitions taken from this consumer, by topic name: from the rebalance callback to the source task.
type Revoked = Vec<(String, i32)>;

/// librdkafka's callbacks: consumer lag per partition (from its statistics), rebalances and
/// commits as metrics; on a revoke, the commit and the marker for the window stage.
pub struct Observed {
    metrics: Arc<Metrics>,
    revoked: mpsc::UnboundedSender<Revoked>,
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
        let _ = self.revoked.send(tpl.elements().iter().map(|e| (e.topic().to_string(), e.partition())).collect());
    }

    fn post_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let kind = match rebalance {
            Rebalance::Assign(tpl) => {
                self.metrics.assigned_partitions.add(tpl.count() as i64);
                info!(partitions = ?partitions(tpl), "Kafka partitions assigned.");
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

type ObservedConsumer = StreamConsumer<Observed>;

/// Reads the subscribed topics; each message goes down the line queue with its [`Origin`].
pub struct KafkaSource {
    consumer: Arc<ObservedConsumer>,
    topics: Topics,
    revoked: mpsc::UnboundedReceiver<Revoked>,
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
    let (revoked_tx, revoked) = mpsc::unbounded_channel();
    let consumer: ObservedConsumer = client
        .set("group.id", &cfg.group_id)
        .set("auto.offset.reset", &cfg.auto_offset_reset)
        .set("enable.auto.commit", "true")
        .set("enable.auto.offset.store", "false")
        .create_with_context(Observed { metrics, revoked: revoked_tx })
        .context("kafka: creating the consumer")?;
    let names: Vec<&str> = cfg.topics.iter().map(String::as_str).collect();
    consumer.subscribe(&names).with_context(|| format!("kafka.topics: subscribing to {names:?}"))?;
    let consumer = Arc::new(consumer);
    Ok((KafkaSource { consumer: consumer.clone(), topics: topics.clone(), revoked }, KafkaHandle { consumer, topics }))
}

impl KafkaSource {
    /// Reads messages until cancelled; each payload is one record line. Messages go down the
    /// line queue in batches of what librdkafka has at hand (at most [`MAX_LINE_BATCH`]).
    pub async fn run(mut self, tx: mpsc::Sender<Vec<Input>>, stop: CancellationToken, metrics: Arc<Metrics>) {
        loop {
            let first = tokio::select! {
                biased;
                _ = stop.cancelled() => break,
                Some(revoked) = self.revoked.recv() => {
                    let marker = revoke_marker(&self.topics, revoked);
                    if tx.send(vec![marker]).await.is_err() {
                        break;
                    }
                    continue;
                }
                msg = self.consumer.recv() => msg,
            };
            let mut batch = Vec::new();
            take(&mut self.revoked, &self.topics, first, &mut batch, &metrics);
            while batch.len() < MAX_LINE_BATCH {
                match ready_now(self.consumer.recv()) {
                    Some(msg) => take(&mut self.revoked, &self.topics, msg, &mut batch, &metrics),
                    None => break,
                }
            }
            if tx.send(batch).await.is_err() {
                break;
            }
        }
        info!("Kafka source stopped.");
    }
}

/// Appends a received message (or counts the error), after the revoke markers of any
/// rebalance callback that ran while receiving it: those partitions' earlier records are
/// already in the batch, and this message may be from after the rebalance.
fn take(
    revoked: &mut mpsc::UnboundedReceiver<Revoked>,
    topics: &Topics,
    msg: KafkaResult<BorrowedMessage<'_>>,
    batch: &mut Vec<Input>,
    metrics: &Metrics,
) {
    while let Ok(partitions) = revoked.try_recv() {
        batch.push(revoke_marker(topics, partitions));
    }
    let msg = match msg {
        Ok(m) => m,
        Err(error) => {
            metrics.errors.with_label_values(&["kafka", "consume"]).inc();
            warn!(%error, "Kafka consume error.");
            return;
        }
    };
    metrics.records_received.inc();
    let ack = Ack { topic: topics.index(msg.topic()), partition: msg.partition(), offset: msg.offset() };
    let origin = Origin { ack, key: msg.key().map(<[u8]>::to_vec) };
    let payload = msg.payload().unwrap_or_default();
    batch.push(match std::str::from_utf8(payload) {
        Ok(text) => Input::Line(text.to_string(), Some(origin)),
        Err(_) => Input::Undecodable(payload.to_vec(), origin),
    });
}

fn revoke_marker(topics: &Topics, revoked: Revoked) -> Input {
    Input::Revoked(revoked.iter().map(|(topic, p)| (topics.index(topic), *p)).collect())
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
    fn store(&self, acks: &Acks, metrics: &Metrics) {
        for (&(topic, partition), &offset) in &acks.0 {
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

    fn commit(&self) {
        match self.consumer.commit_consumer_state(CommitMode::Sync) {
            Ok(()) | Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => info!("Kafka offsets committed."),
            Err(error) => error!(%error, "Kafka commit at shutdown failed; records since the last commit will be replayed."),
        }
    }
}

/// Which Kafka output a message was for (a metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    /// With the reason the record was dropped.
    DeadLetter(&'static str),
    Score,
    Alert,
}

impl Output {
    fn label(self) -> &'static str {
        match self {
            Output::DeadLetter(_) => "dead_letter",
            Output::Score => "score",
            Output::Alert => "alert",
        }
    }
}

/// A handled batch: what it produced on Kafka, and the offsets to store once that is delivered.
#[derive(Default)]
pub struct Pending {
    pub deliveries: Vec<(DeliveryFuture, Output)>,
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
        let mut failed = 0u64;
        while let Some(pending) = rx.recv().await {
            for (delivery, output) in pending.deliveries {
                match delivery.await {
                    Ok(Ok(_)) => {
                        if let Output::DeadLetter(reason) = output {
                            m.dead_letters.with_label_values(&[reason]).inc();
                        }
                    }
                    // Counted and logged; holding the partition for an output that cannot be
                    // written would stall it for good.
                    result => {
                        m.produce_errors.with_label_values(&[output.label()]).inc();
                        failed += 1;
                        if failed % LOG_EVERY == 1 {
                            let error = match result {
                                Ok(Err((e, _))) => e.to_string(),
                                _ => "producer gone".to_string(),
                            };
                            error!(output = output.label(), %error, count = failed, "Kafka output not delivered; its offset moves on.");
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

/// The Kafka outputs: dead letters, scores and alert events, through one idempotent producer.
#[derive(Clone)]
pub struct KafkaSinks {
    producer: FutureProducer,
    topics: Topics,
    dead_letter_topic: Option<String>,
    scores_topic: Option<String>,
    alerts_topic: Option<String>,
}

impl KafkaSinks {
    /// `None` when no output topic is configured.
    pub fn new(cfg: &KafkaConfig, topics: Topics) -> Result<Option<KafkaSinks>> {
        let topic = |t: &str| (!t.is_empty()).then(|| t.to_string());
        let sinks = (topic(&cfg.dead_letter_topic), topic(&cfg.scores_topic), topic(&cfg.alerts_topic));
        if sinks == (None, None, None) {
            return Ok(None);
        }
        let producer: FutureProducer = client_config(cfg)
            .set("enable.idempotence", "true")
            .create()
            .context("kafka: creating the producer")?;
        let (dead_letter_topic, scores_topic, alerts_topic) = sinks;
        Ok(Some(KafkaSinks { producer, topics, dead_letter_topic, scores_topic, alerts_topic }))
    }

    pub fn dead_letters(&self) -> bool {
        self.dead_letter_topic.is_some()
    }

    pub fn scores(&self) -> bool {
        self.scores_topic.is_some()
    }

    pub fn alerts(&self) -> bool {
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
        let (source, partition, offset) = (self.topics.name(origin.ack.topic), origin.ack.partition.to_string(), origin.ack.offset.to_string());
        let headers = OwnedHeaders::new()
            .insert(Header { key: "anomalyd.error", value: Some(reason) })
            .insert(Header { key: "anomalyd.error_message", value: Some(error) })
            .insert(Header { key: "anomalyd.source_topic", value: Some(source.as_str()) })
            .insert(Header { key: "anomalyd.source_partition", value: Some(partition.as_str()) })
            .insert(Header { key: "anomalyd.source_offset", value: Some(offset.as_str()) });
        let mut record = FutureRecord::to(topic).payload(payload).headers(headers);
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

    /// Waits (bounded) for everything enqueued to be delivered: at shutdown, before the commit.
    fn flush(&self) {
        if let Err(error) = self.producer.flush(Duration::from_secs(10)) {
            error!(%error, "Kafka producer flush at shutdown failed; some output may be lost.");
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
        t.dropped(ack(3));
        t.forget("a");
        assert_eq!(t.safe().0[&(0, 0)], 0, "b needs 1: replay from 1");
        t.forget("b");
        assert_eq!(t.safe().0[&(0, 0)], 3, "nothing held: everything handled");
    }

    #[test]
    fn stored_offset_is_never_past_a_needed_record_and_at_most_a_mark_before_it() {
        // 7 series interleaved on one partition with W = 40 (39 records held), a gap now and
        // then (the window restarts: fewer held), checked against every record kept exactly.
        let mut t = OffsetTracker::default();
        let mut exact: HashMap<String, VecDeque<i64>> = HashMap::new();
        let mut held_by: HashMap<String, usize> = HashMap::new();
        for offset in 0..5_000i64 {
            let series = format!("s{}", (offset * 5 + offset / 11) % 7);
            let held = held_by.entry(series.clone()).or_default();
            *held = if offset % 401 == 0 { 1 } else { (*held + 1).min(39) };
            t.windowed(ack(offset), &series, *held);
            let rows = exact.entry(series).or_default();
            rows.push_back(offset);
            while rows.len() > *held {
                rows.pop_front();
            }
            let oldest_needed = exact.values().filter_map(|r| r.front()).min().copied().unwrap();
            let stored = t.safe().0.get(&(0, 0)).copied().unwrap_or(-1);
            assert!(stored < oldest_needed, "at {offset}: stored {stored} but record {oldest_needed} is still needed");
            // A series' marks are at most MARK_EVERY - 1 of its own records apart; its records are
            // at most 7 x 2 offsets apart here.
            assert!(stored >= oldest_needed - 1 - 14 * MARK_EVERY as i64, "at {offset}: stored {stored} trails {oldest_needed} too far");
        }
    }

    #[test]
    fn a_revoke_drops_the_partitions_series_and_keeps_the_others() {
        let mut t = OffsetTracker::default();
        let at = |partition, offset| Ack { topic: 0, partition, offset };
        t.windowed(at(0, 5), "a", 1);
        t.windowed(at(1, 7), "b", 1);
        t.windowed(at(1, 8), "c", 0); // W = 1: holds no rows, still lives on partition 1
        let mut gone = t.revoke(&[(0, 1)]);
        gone.sort();
        assert_eq!(gone, ["b", "c"]);
        assert_eq!(t.safe().0.keys().collect::<Vec<_>>(), [&(0, 0)], "partition 1 is no longer stored");
        t.windowed(at(1, 3), "b", 1);
        assert_eq!(t.safe().0.get(&(0, 1)), Some(&2), "re-assigned and replayed from 3: b holds 3");
    }
}
