//! The Kafka source and outputs against a real Apache Kafka broker: the one scripts/test starts
//! (it exports ANOMALYD_TEST_KAFKA=host:port), or, for the outage test, one of its own.

mod common;

use std::collections::HashSet;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{assert_flow_alert, attacked_host_minutes, repo, temp_dir, Daemon};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::TopicPartitionList;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

/// A message as the tests look at it: key, payload, headers.
type Received = (Option<String>, String, Vec<(String, String)>);

/// One record to produce: key, payload, and the partition when the test picks it.
type Record = (String, String, Option<i32>);

/// A real broker, by its bootstrap address.
struct Cluster {
    bootstrap: String,
}

impl Cluster {
    fn shared() -> Cluster {
        let bootstrap = std::env::var("ANOMALYD_TEST_KAFKA")
            .expect("ANOMALYD_TEST_KAFKA=host:port of a real broker: run scripts/test, or scripts/kafka start and export it");
        Cluster { bootstrap }
    }

    /// The SASL_PLAINTEXT listener scripts/kafka opens at the plain port + 2.
    fn sasl_bootstrap(&self) -> String {
        let (host, port) = self.bootstrap.rsplit_once(':').unwrap();
        format!("{host}:{}", port.parse::<u16>().unwrap() + 2)
    }

    fn client(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.bootstrap);
        c
    }

    fn create_topic(&self, name: &str, partitions: i32) {
        self.create_topic_with(name, partitions, &[]);
    }

    fn create_topic_with(&self, name: &str, partitions: i32, config: &[(&str, &str)]) {
        let admin: AdminClient<DefaultClientContext> = self.client().create().unwrap();
        let topic = config.iter().fold(NewTopic::new(name, partitions, TopicReplication::Fixed(1)), |t, (k, v)| t.set(k, v));
        for result in runtime().block_on(admin.create_topics(&[topic], &AdminOptions::new())).unwrap() {
            result.unwrap();
        }
    }

    /// Produces in order and waits for every delivery (an idempotent producer: no duplicates
    /// when it retries, e.g. across a broker outage).
    fn produce(&self, topic: &str, records: &[Record]) {
        let producer: FutureProducer = self.client().set("enable.idempotence", "true").create().unwrap();
        runtime().block_on(async {
            let mut pending = Vec::new();
            for (key, payload, partition) in records {
                let mut r = FutureRecord::to(topic).key(key.as_str()).payload(payload.as_str());
                r.partition = *partition;
                pending.push(producer.send_result(r).map_err(|(e, _)| e).unwrap());
            }
            for p in pending {
                p.await.unwrap().unwrap();
            }
        });
    }

    /// Every message of partition 0 of `topic` up to its current end.
    fn read_all(&self, topic: &str) -> Vec<Received> {
        let consumer: BaseConsumer = self.client().set("group.id", "test-reader").create().unwrap();
        let (low, high) = consumer.fetch_watermarks(topic, 0, Duration::from_secs(10)).unwrap();
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, 0, rdkafka::Offset::Beginning).unwrap();
        consumer.assign(&tpl).unwrap();
        let mut out = Vec::new();
        let started = Instant::now();
        while (out.len() as i64) < high - low && started.elapsed() < Duration::from_secs(30) {
            if let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) {
                let text = |b: Option<&[u8]>| String::from_utf8_lossy(b.unwrap_or_default()).into_owned();
                let headers = m.headers().map(|h| h.iter().map(|x| (x.key.to_string(), text(x.value))).collect()).unwrap_or_default();
                out.push((m.key().map(|k| text(Some(k))), text(m.payload()), headers));
            }
        }
        assert_eq!(out.len() as i64, high - low, "read all of {topic}");
        out
    }

    /// The group's committed offset of `topic`'s partition 0.
    fn committed(&self, topic: &str, group: &str) -> i64 {
        let consumer: BaseConsumer = self.client().set("group.id", group).create().unwrap();
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(topic, 0);
        let got = consumer.committed_offsets(tpl, Duration::from_secs(10)).unwrap();
        got.elements()[0].offset().to_raw().unwrap_or(-1)
    }

    /// The committed offset trails to `needed`, the oldest record the (one) series' next window
    /// still needs, or to up to 15 records before it: offsets are marked every 16 records of a
    /// series (the caller makes sure no other record lies among those 15).
    fn assert_commit_trails(&self, topic: &str, group: &str, needed: i64) {
        let committed = self.committed(topic, group);
        assert!((needed - 15..=needed).contains(&committed), "committed {committed}, the oldest needed record {needed}");
    }

    /// The `(series, window_end_ts)` of every score on the scores topic.
    fn scored(&self, scores_topic: &str) -> HashSet<(String, i64)> {
        self.read_all(scores_topic)
            .iter()
            .map(|(key, payload, _)| {
                let v: serde_json::Value = serde_json::from_str(payload).unwrap();
                assert_eq!(key.as_deref(), v["series"].as_str(), "scores are keyed by series");
                (v["series"].as_str().unwrap().to_string(), v["window_end_ts"].as_f64().unwrap() as i64)
            })
            .collect()
    }

    /// Polls the scores topic until every `(series, window_end_ts)` of `want` is on it; returns
    /// those still missing after `timeout`.
    fn wait_for_scores(&self, scores_topic: &str, want: &[(String, i64)], timeout: Duration) -> Vec<(String, i64)> {
        let started = Instant::now();
        loop {
            let seen = self.scored(scores_topic);
            let missing: Vec<_> = want.iter().filter(|w| !seen.contains(*w)).cloned().collect();
            if missing.is_empty() || started.elapsed() > timeout {
                return missing;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

/// A daemon config reading CSV lines with `columns` from `topic` as `group`; `kafka` continues
/// the `[kafka]` section, `extra` the `[source]` section (and may add sections of its own).
fn config(brokers: &str, topic: &str, group: &str, columns: &[String], kafka: &str, extra: &str) -> String {
    let columns: Vec<String> = columns.iter().map(|c| format!("{c:?}")).collect();
    format!(
        r#"
[model]
path = "models/skab-convae"
[admin]
listen = "127.0.0.1:{{port}}"
[kafka]
brokers = "{brokers}"
topics = ["{topic}"]
group_id = "{group}"
{kafka}
[source]
kind = "kafka"
format = "csv"
csv_delimiter = ";"
csv_columns = [{}]
{extra}
"#,
        columns.join(", ")
    )
}

/// The sample stream: its CSV header and its 201 record lines.
fn sample() -> (Vec<String>, Vec<String>) {
    let csv = std::fs::read_to_string(repo().join("contracts/skab-convae/records.csv")).unwrap();
    let mut lines = csv.lines();
    let header = lines.next().unwrap().split(';').map(String::from).collect();
    (header, lines.map(String::from).collect())
}

fn keyed(key: &str, lines: &[String]) -> Vec<Record> {
    lines.iter().map(|l| (key.to_string(), l.clone(), None)).collect()
}

/// `n` series of `rows` rows each with the sample's sensor values, interleaved row by row and
/// keyed by series ("s0", "s1", ...); the payload is `ts;series;values…`, or `ts;values…` when
/// the key alone names the series. Returns the CSV columns and the records.
fn interleaved(n: usize, rows: usize, series_column: bool) -> (Vec<String>, Vec<Record>) {
    let (header, lines) = sample();
    let values: Vec<&str> = lines.iter().map(|l| l.split_once(';').unwrap().1).collect();
    let mut records = Vec::new();
    for i in 0..rows {
        for s in 0..n {
            let series = format!("s{s}");
            let column = if series_column { format!("{series};") } else { String::new() };
            let payload = format!("{};{column}{}", 1_700_000_000 + i, values[(i * n + s) % values.len()]);
            records.push((series, payload, None));
        }
    }
    let mut columns = vec!["ts".to_string()];
    if series_column {
        columns.push("series".to_string());
    }
    columns.extend(header.into_iter().skip(1));
    (columns, records)
}

/// Every window of `n` series whose rows `from..to` end at `stride` (W = 32 rows, one row per
/// second; the first window ends on row 31, the next ones every `stride` rows).
fn windows(n: usize, from: usize, to: usize, stride: usize) -> Vec<(String, i64)> {
    let ends = move || (from.max(31)..to).filter(move |i| (i - 31) % stride == 0);
    (0..n).flat_map(|s| ends().map(move |i| (format!("s{s}"), 1_700_000_000 + i as i64))).collect()
}

/// A record's series (its key) and event time (the payload's first field).
fn series_ts((series, payload, _): &Record) -> (String, i64) {
    (series.clone(), payload.split(';').next().unwrap().parse().unwrap())
}

/// Puts series "s{k}" k rows behind "s0", so that a replay from one offset reaches the series of
/// a partition at different rows of a stride.
fn skewed(mut records: Vec<Record>) -> Vec<Record> {
    records.sort_by_key(|r| {
        let (series, ts) = series_ts(r);
        let k: i64 = series[1..].parse().unwrap();
        (ts + k, k)
    });
    records
}

/// Of `all` windows, those that a record of `produced` ends.
fn ended_by(all: &[(String, i64)], produced: &[Record]) -> Vec<(String, i64)> {
    let ends: HashSet<_> = produced.iter().map(series_ts).collect();
    all.iter().filter(|w| ends.contains(*w)).cloned().collect()
}

const TIME_MAPPING: &str = "[mapping]\ntimestamp_field = \"ts\"\ntimestamp_format = \"unix_s\"\n";

#[test]
fn produced_records_are_scored_alerted_and_committed() {
    let c = Cluster::shared();
    let topic = format!("metrics-{}", std::process::id());
    let group = format!("anomalyd-{}", std::process::id());
    c.create_topic(&topic, 1);
    let (header, records) = sample();
    c.produce(&topic, &keyed("pump", &records));

    let dir = temp_dir("kafka");
    let config = config(
        &c.bootstrap,
        &topic,
        &group,
        &header,
        "",
        "series_name = \"pump\"\n[output]\nsink = \"file\"\npath = \"{dir}/alerts.jsonl\"",
    ) + "[kafka.properties]\n\"statistics.interval.ms\" = \"200\"\n";
    let d = Daemon::start(&dir, &config);
    d.wait_for(|d| d.metric("anomalyd_windows_scored_total") == Some(138.0), "138 windows from Kafka");
    assert_eq!(d.metric("anomalyd_alerts_total{state=\"firing\"}"), Some(1.0));
    assert_eq!(d.metric("anomalyd_records_discarded_total{reason=\"out_of_order\"}"), Some(1.0));
    assert_eq!(d.metric("anomalyd_kafka_rebalances_total{kind=\"assign\"}"), Some(1.0));
    assert_eq!(d.metric("anomalyd_kafka_assigned_partitions"), Some(1.0));
    let lag = format!("anomalyd_kafka_consumer_lag_messages{{partition=\"0\",topic=\"{topic}\"}}");
    d.wait_for(|d| d.metric(&lag) == Some(0.0), "consumer lag 0 from librdkafka statistics");
    assert_eq!(d.stop(), 0);
    // Every record was handled, but the series' next window still needs its last W − 1 = 31
    // records: the committed offset trails to (a mark before) the oldest of them, so a restart
    // refills the window.
    c.assert_commit_trails(&topic, &group, records.len() as i64 - 31);
}

#[test]
fn after_kill_9_every_window_is_on_the_scores_topic() {
    kill_9_and_replay(1);
}

#[test]
fn after_kill_9_every_window_at_a_stride_is_on_the_scores_topic_and_none_off_it() {
    kill_9_and_replay(3);
}

/// 5 series × 400 rows at `stride`, [`skewed`]; the daemon is killed after the first
/// half, and a new one replays from the committed offset (at a stride, resuming each series from
/// its checkpoint): every window is on the scores topic, and none that the stride does not place.
fn kill_9_and_replay(stride: usize) {
    let c = Cluster::shared();
    let id = format!("{}-{stride}", std::process::id());
    let (topic, scores, group) = (format!("crash-{id}"), format!("crash-scores-{id}"), format!("anomalyd-crash-{id}"));
    c.create_topic(&topic, 1);
    c.create_topic(&scores, 1);
    let mut kafka = format!("scores_topic = \"{scores}\"");
    if stride > 1 {
        let checkpoints = format!("crash-checkpoints-{id}");
        c.create_topic_with(&checkpoints, 1, &[("cleanup.policy", "compact")]);
        kafka += &format!("\ncheckpoints_topic = \"{checkpoints}\"");
    }
    let (columns, records) = interleaved(5, 400, true);
    let records = skewed(records);
    let dir = temp_dir(&format!("kafka-crash-{stride}"));
    let extra = format!("{TIME_MAPPING}series_fields = [\"series\"]\n[windows]\nstride = {stride}\n");
    // The killed member's partition moves once the broker gives up on it: keep that short.
    let config = config(&c.bootstrap, &topic, &group, &columns, &kafka, &extra)
        + "[kafka.properties]\n\"auto.commit.interval.ms\" = \"100\"\n\"session.timeout.ms\" = \"6000\"\n";

    // First half; the daemon scores it, commits (every 100 ms), and is killed without warning.
    c.produce(&topic, &records[..1000]);
    let mut d = Daemon::start(&dir, &config);
    let first_half = ended_by(&windows(5, 0, 400, stride), &records[..1000]).len() as f64;
    d.wait_for(|d| d.metric("anomalyd_windows_scored_total").is_some_and(|v| v >= first_half), "first half scored");
    d.wait_for(|_| c.committed(&topic, &group) > 0, "an offset committed");
    d.child.kill().unwrap();
    d.child.wait().unwrap();
    let committed_at_crash = c.committed(&topic, &group);
    assert!(committed_at_crash > 0 && committed_at_crash < 1000, "committed {committed_at_crash}");

    // Second half, and a new daemon in the same group: it replays from the committed offset and
    // the replayed rows refill the windows before new ones are scored.
    c.produce(&topic, &records[1000..]);
    let d = Daemon::start(&dir, &config);
    d.wait_for(|d| d.metric("anomalyd_records_received_total") == Some(2000.0 - committed_at_crash as f64), "the replay");
    let want = windows(5, 0, 400, stride);
    let missing = c.wait_for_scores(&scores, &want, Duration::from_secs(30));
    assert!(missing.is_empty(), "{} windows never scored, e.g. {:?}", missing.len(), &missing[..missing.len().min(3)]);
    assert_eq!(d.metric("anomalyd_series_warming"), Some(0.0));
    if stride > 1 {
        assert_eq!(d.metric("anomalyd_window_checkpoints_total{event=\"restored\"}"), Some(5.0), "one checkpoint per series read back");
    }
    assert_eq!(d.stop(), 0);
    let placed: HashSet<_> = want.into_iter().collect();
    let off: Vec<_> = c.scored(&scores).into_iter().filter(|w| !placed.contains(w)).collect();
    assert!(off.is_empty(), "{} windows scored off the stride, e.g. {:?}", off.len(), &off[..off.len().min(3)]);
}

#[test]
fn poison_messages_are_dead_lettered_and_alerts_published() {
    let c = Cluster::shared();
    let id = std::process::id();
    let (topic, dlq, alerts_topic, group) = (format!("in-{id}"), format!("dlq-{id}"), format!("alerts-{id}"), format!("g-{id}"));
    for t in [&topic, &dlq, &alerts_topic] {
        c.create_topic(t, 1);
    }
    let (header, mut records) = sample();
    // Three poison messages amid the stream, each with the wrong number of columns.
    let poison = ["\u{1}\u{2} binary junk".to_string(), records[50].replacen(";", ";many;", 1), "2026-01-05 10:00:00;1".to_string()];
    for (i, p) in [10usize, 60, 120].iter().zip(&poison) {
        records.insert(*i, p.clone());
    }
    let mut messages = keyed("pump", &records);
    // And one that is not even UTF-8: its exact bytes must reach the dead-letter topic too.
    let producer: FutureProducer = c.client().create().unwrap();
    let kafka = format!("dead_letter_topic = \"{dlq}\"\nalerts_topic = \"{alerts_topic}\"");
    // Subscribed by regex: the dead letters still name the topic the record came from.
    let text = config(&c.bootstrap, &format!("^{topic}$"), &group, &header, &kafka, "series_name = \"pump\"");
    c.produce(&topic, &messages[..150]);
    runtime().block_on(async {
        let record = FutureRecord::<str, [u8]>::to(&topic).key("pump").payload(&[0xff, 0xfe, b';', 0x80]);
        producer.send(record, Duration::from_secs(10)).await.unwrap();
    });
    c.produce(&topic, &messages.split_off(150));
    let dir = temp_dir("kafka-dlq");
    let d = Daemon::start(&dir, &text);
    d.wait_for(|d| d.metric("anomalyd_windows_scored_total") == Some(138.0), "the good records scored");
    let delivered = |d: &Daemon, reason: &str| d.metric(&format!("anomalyd_dead_letters_total{{reason=\"{reason}\"}}"));
    d.wait_for(|d| delivered(d, "missing_field") == Some(3.0) && delivered(d, "malformed") == Some(1.0), "four dead letters delivered");
    assert_eq!(d.stop(), 0);

    let dead = c.read_all(&dlq);
    assert_eq!(dead.len(), 4);
    let offsets = [10usize, 60, 120, 150];
    let originals = poison.iter().cloned().chain([String::from_utf8_lossy(&[0xff, 0xfe, b';', 0x80]).into_owned()]);
    for ((key, payload, headers), (offset, original)) in dead.iter().zip(offsets.iter().zip(originals)) {
        assert_eq!(payload, &original, "original bytes kept");
        assert_eq!(key.as_deref(), Some("pump"), "original key kept");
        let h = |k: &str| headers.iter().find(|(key, _)| key == k).map(|(_, v)| v.clone()).unwrap_or_default();
        assert_eq!(h("anomalyd.source_topic"), topic);
        assert_eq!(h("anomalyd.source_partition"), "0");
        assert_eq!(h("anomalyd.source_offset"), offset.to_string());
        assert!(!h("anomalyd.error").is_empty() && !h("anomalyd.error_message").is_empty());
    }
    let events = c.read_all(&alerts_topic);
    assert!(events.iter().any(|(key, payload, _)| key.as_deref() == Some("pump") && payload.contains("\"event\":\"firing\"")));
    // The poison did not stall the partition: the commit moved past it (the last at offset 150)
    // to the window's rows.
    c.assert_commit_trails(&topic, &group, records.len() as i64 + 1 - 31);
}

#[test]
fn a_dead_letter_over_a_megabyte_keeps_its_head_and_where_the_whole_record_is() {
    let c = Cluster::shared();
    let id = std::process::id();
    let (topic, dlq, group) = (format!("big-{id}"), format!("big-dlq-{id}"), format!("big-g-{id}"));
    // The input topic takes records of 4 MB; the dead-letter topic has the broker's default
    // limit (about 1 MB), as a dead-letter topic created without thought would.
    c.create_topic_with(&topic, 1, &[("max.message.bytes", "4000000")]);
    c.create_topic(&dlq, 1);
    let (header, records) = sample();
    let big = format!("{};{}", records[0], "9".repeat(1_500_000));
    let producer: FutureProducer = c.client().set("message.max.bytes", "4000000").create().unwrap();
    runtime().block_on(async {
        for payload in [big.as_str(), records[0].as_str()] {
            producer.send(FutureRecord::to(&topic).key("pump").payload(payload), Duration::from_secs(10)).await.unwrap();
        }
    });
    let kafka = format!("dead_letter_topic = \"{dlq}\"");
    let config = config(&c.bootstrap, &topic, &group, &header, &kafka, "series_name = \"pump\"")
        + "[kafka.properties]\n\"fetch.message.max.bytes\" = \"4000000\"\n";
    let d = Daemon::start(&temp_dir("kafka-big"), &config);
    d.wait_for(|d| d.metric("anomalyd_dead_letters_total{reason=\"too_long\"}") == Some(1.0), "the 1.5 MB record dead-lettered");
    assert_eq!(d.metric("anomalyd_kafka_produce_errors_total{output=\"dead_letter\"}"), Some(0.0));
    assert_eq!(d.stop(), 0);

    let dead = c.read_all(&dlq);
    assert_eq!(dead.len(), 1);
    let (key, payload, headers) = &dead[0];
    let h = |k: &str| headers.iter().find(|(key, _)| key == k).map(|(_, v)| v.clone()).unwrap_or_default();
    assert_eq!(key.as_deref(), Some("pump"));
    assert_eq!((payload.len(), h("anomalyd.truncated"), h("anomalyd.original_bytes")), (900_000, "true".into(), big.len().to_string()));
    assert!(big.starts_with(payload.as_str()), "the dead letter holds the record's head");
    assert_eq!((h("anomalyd.source_topic"), h("anomalyd.source_offset")), (topic.clone(), "0".to_string()));
}

#[test]
fn flow_records_alert_on_the_attacking_host_through_kafka() {
    let c = Cluster::shared();
    let id = std::process::id();
    let (topic, alerts_topic, group) = (format!("flows-{id}"), format!("flow-alerts-{id}"), format!("flows-g-{id}"));
    c.create_topic(&topic, 1);
    c.create_topic(&alerts_topic, 1);
    let flows = std::fs::read_to_string(repo().join("contracts/flows-vae/records.ndjson")).unwrap();
    let lines: Vec<String> = flows.lines().map(String::from).collect();
    c.produce(&topic, &keyed("collector-1", &lines));
    let config = format!(
        r#"
[model]
path = "models/flows-vae"
[admin]
listen = "127.0.0.1:{{port}}"
[kafka]
brokers = "{}"
topics = ["{topic}"]
group_id = "{group}"
alerts_topic = "{alerts_topic}"
[source]
kind = "kafka"
format = "goflow2"
"#,
        c.bootstrap
    );
    let dir = temp_dir("kafka-flows");
    let d = Daemon::start(&dir, &config);
    // A stream does not end: every bucket but each host's newest closes by the watermark.
    d.wait_for(|d| d.metric("anomalyd_records_received_total") == Some(lines.len() as f64), "all flows read");
    d.wait_for(|d| d.metric("anomalyd_alerts_total{state=\"firing\"}").is_some_and(|n| n > 0.0), "an alert");
    assert_eq!(d.stop(), 0);

    let attacked = attacked_host_minutes();
    let events = c.read_all(&alerts_topic);
    let mut fired = 0;
    for (key, payload, _) in events {
        let e: serde_json::Value = serde_json::from_str(&payload).unwrap();
        assert_eq!(key.as_deref(), e["series"].as_str(), "keyed by host");
        if e["event"] == "firing" {
            assert_flow_alert(&e, &attacked);
            fired += 1;
        }
    }
    assert!(fired > 0);
}

/// The per-series score gauges a daemon exports: the series it owns now.
/// `interleaved` series keyed by name alone, series `sK` on partition K mod 4.
fn over_four_partitions(n: usize, rows: usize) -> (Vec<String>, Vec<Record>) {
    let (columns, mut records) = interleaved(n, rows, false);
    for r in &mut records {
        r.2 = Some(r.0[1..].parse::<i32>().unwrap() % 4);
    }
    (columns, records)
}

fn owned_series(d: &Daemon) -> HashSet<String> {
    d.metrics()
        .lines()
        .filter_map(|l| l.strip_prefix("anomalyd_anomaly_score{series=\"")?.split_once('"').map(|(s, _)| s.to_string()))
        .collect()
}

#[test]
fn two_daemons_split_four_partitions_and_hand_over() {
    split_and_hand_over(1);
}

#[test]
fn two_daemons_hand_over_at_a_stride_and_keep_its_phase() {
    split_and_hand_over(3);
}

/// Eight series, two per partition ([`skewed`]), at `stride`: two daemons split the partitions,
/// then one leaves and the other takes its partitions over (at a stride, resuming their series
/// from their checkpoints). Every window is scored, and none off the stride.
fn split_and_hand_over(stride: usize) {
    let c = Cluster::shared();
    let id = format!("{}-{stride}", std::process::id());
    let (topic, scores, group) = (format!("split-{id}"), format!("split-scores-{id}"), format!("split-g-{id}"));
    c.create_topic(&topic, 4);
    c.create_topic(&scores, 1);
    // Eight series keyed by name, two per partition; the key alone names the series.
    let (columns, records) = over_four_partitions(8, 300);
    let records = skewed(records);
    let rows = |from: usize, to: usize| &records[from * 8..to * 8];
    let all = windows(8, 0, 300, stride);
    let mut kafka = format!("series_from_key = true\nscores_topic = \"{scores}\"");
    if stride > 1 {
        let checkpoints = format!("split-checkpoints-{id}");
        c.create_topic_with(&checkpoints, 4, &[("cleanup.policy", "compact")]);
        kafka += &format!("\ncheckpoints_topic = \"{checkpoints}\"");
    }
    let extra = format!("{TIME_MAPPING}[windows]\nstride = {stride}\n");
    let config = config(&c.bootstrap, &topic, &group, &columns, &kafka, &extra) + "[kafka.properties]\n\"session.timeout.ms\" = \"6000\"\n";
    let assigned = |d: &Daemon| d.metric("anomalyd_kafka_assigned_partitions");

    c.produce(&topic, rows(0, 100));
    let dir_a = temp_dir(&format!("kafka-split-a-{stride}"));
    let a = Daemon::start(&dir_a, &config);
    a.wait_for(|a| assigned(a) == Some(4.0), "a owns all four partitions");
    let dir_b = temp_dir(&format!("kafka-split-b-{stride}"));
    let b = Daemon::start(&dir_b, &config);
    b.wait_for(|b| assigned(b) == Some(2.0) && assigned(&a) == Some(2.0), "two partitions each");
    assert_eq!(a.metric("anomalyd_kafka_rebalances_total{kind=\"revoke\"}"), Some(1.0), "a gave two partitions up");

    // Both score their own partitions' series, and together all of them.
    c.produce(&topic, rows(100, 200));
    let missing = c.wait_for_scores(&scores, &ended_by(&all, rows(0, 200)), Duration::from_secs(30));
    assert!(missing.is_empty(), "{} windows never scored, e.g. {:?}", missing.len(), &missing[..missing.len().min(3)]);
    let (sa, sb) = (owned_series(&a), owned_series(&b));
    assert_eq!((sa.len(), sb.len()), (4, 4), "a: {sa:?}, b: {sb:?}");
    assert!(sa.is_disjoint(&sb));

    // b leaves: a takes its partitions over, rebuilds their windows from the committed offsets
    // and scores every later window of all eight series.
    assert_eq!(b.stop(), 0);
    a.wait_for(|a| assigned(a) == Some(4.0), "a owns all four partitions again");
    c.produce(&topic, rows(200, 300));
    let missing = c.wait_for_scores(&scores, &ended_by(&all, rows(200, 300)), Duration::from_secs(30));
    assert!(missing.is_empty(), "{} windows never scored after the hand-over, e.g. {:?}", missing.len(), &missing[..missing.len().min(3)]);
    assert_eq!(owned_series(&a).len(), 8);
    assert_eq!(a.stop(), 0);
    let placed: HashSet<_> = all.into_iter().collect();
    let off: Vec<_> = c.scored(&scores).into_iter().filter(|w| !placed.contains(w)).collect();
    assert!(off.is_empty(), "{} windows scored off the stride, e.g. {:?}", off.len(), &off[..off.len().min(3)]);
}

#[test]
fn sasl_listener_authenticates_and_a_wrong_password_is_reported() {
    let c = Cluster::shared();
    let id = std::process::id();
    let (topic, alerts_topic) = (format!("sasl-{id}"), format!("sasl-alerts-{id}"));
    c.create_topic(&topic, 1);
    c.create_topic(&alerts_topic, 1);
    let (header, records) = sample();
    c.produce(&topic, &keyed("pump", &records));
    // `password`: a TOML value, a string or { file = ... }.
    let sasl = |group: &str, password: &str| {
        config(&c.sasl_bootstrap(), &topic, group, &header, &format!("alerts_topic = \"{alerts_topic}\""), "series_name = \"pump\"")
            + "[kafka.properties]\n\"security.protocol\" = \"SASL_PLAINTEXT\"\n\"sasl.mechanism\" = \"PLAIN\"\n"
            + &format!("\"sasl.username\" = \"anomalyd\"\n\"sasl.password\" = {password}\n")
    };

    // The password from a file, as a mounted Secret or a systemd credential gives it.
    let dir = temp_dir("kafka-sasl");
    std::fs::write(dir.join("kafka-password"), "anomalyd-secret\n").unwrap();
    let from_file = format!("{{ file = \"{}\" }}", dir.join("kafka-password").display());
    let d = Daemon::start(&dir, &sasl(&format!("sasl-g-{id}"), &from_file));
    d.wait_for(|d| d.metric("anomalyd_windows_scored_total") == Some(138.0), "138 windows through the SASL listener");
    assert_eq!(d.stop(), 0);
    assert!(c.read_all(&alerts_topic).iter().any(|(key, _, _)| key.as_deref() == Some("pump")), "alert produced over SASL");

    let dir = temp_dir("kafka-sasl-wrong");
    let d = Daemon::start(&dir, &sasl(&format!("sasl-wrong-{id}"), "\"not-the-password\""));
    d.wait_for(
        |d| d.metric("anomalyd_errors_total{error_type=\"authentication\",stage=\"kafka\"}").is_some_and(|n| n > 0.0),
        "the authentication error counted",
    );
    assert!(d.stderr().contains("Authentication failed") && !d.stderr().contains("not-the-password"), "{}", d.stderr());
    assert_eq!(d.metric("anomalyd_records_received_total"), Some(0.0));
    assert_eq!(d.stop(), 0);
}

/// Runs scripts/kafka with `args`; panics with its output when it fails.
fn kafka_script(args: &[&str]) -> String {
    let out = Command::new(repo().join("scripts/kafka")).args(args).output().unwrap();
    assert!(out.status.success(), "scripts/kafka {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// A broker of the test's own in `dir`, on a base port whose three ports are free; stopped on drop.
struct OwnBroker<'a> {
    dir: &'a Path,
}

impl OwnBroker<'_> {
    fn start(dir: &Path) -> (OwnBroker<'_>, Cluster) {
        let free = |p: u16| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok();
        let base = (20_000..60_000).step_by(97).find(|&p| (p..p + 3).all(free)).unwrap();
        let bootstrap = kafka_script(&["start", "--port", &base.to_string(), "--dir", dir.to_str().unwrap()]);
        (OwnBroker { dir }, Cluster { bootstrap })
    }
}

impl Drop for OwnBroker<'_> {
    fn drop(&mut self) {
        let _ = Command::new(repo().join("scripts/kafka")).args(["stop", "--dir", self.dir.to_str().unwrap()]).output();
    }
}

#[test]
fn a_15_second_broker_outage_loses_nothing() {
    let dir = temp_dir("kafka-outage");
    let broker_dir = dir.join("broker");
    let (_broker, c) = OwnBroker::start(&broker_dir);
    let (topic, scores, group) = ("outage", "outage-scores", "outage-g");
    c.create_topic(topic, 1);
    c.create_topic(scores, 1);
    let (columns, records) = interleaved(5, 400, true);
    let kafka = format!("scores_topic = \"{scores}\"");
    let extra = format!("{TIME_MAPPING}series_fields = [\"series\"]\n");
    let d = Daemon::start(&dir, &config(&c.bootstrap, topic, group, &columns, &kafka, &extra));

    // The producer keeps writing through the outage: librdkafka queues and retries.
    let outage = std::thread::scope(|scope| {
        let writer = scope.spawn(|| {
            for chunk in records.chunks(50) {
                c.produce(topic, chunk);
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        d.wait_for(|d| d.metric("anomalyd_windows_scored_total").is_some_and(|v| v > 0.0), "scoring before the outage");
        kafka_script(&["stop", "--dir", broker_dir.to_str().unwrap()]);
        let stopped = Instant::now();
        std::thread::sleep(Duration::from_secs(15));
        kafka_script(&["resume", "--dir", broker_dir.to_str().unwrap()]);
        let outage = stopped.elapsed();
        writer.join().unwrap();
        outage
    });
    assert!(outage >= Duration::from_secs(15));
    assert_eq!(d.get("/live").map(|(code, _)| code).ok(), Some(200), "the daemon lives through the outage");

    let missing = c.wait_for_scores(scores, &windows(5, 0, 400, 1), Duration::from_secs(60));
    assert!(missing.is_empty(), "{} windows never scored, e.g. {:?}", missing.len(), &missing[..missing.len().min(3)]);
    assert!(
        d.metric("anomalyd_errors_total{error_type=\"all_brokers_down\",stage=\"kafka\"}").is_some_and(|n| n > 0.0),
        "the outage was seen"
    );
    assert_eq!(d.metric("anomalyd_kafka_produce_errors_total{output=\"score\"}"), Some(0.0), "no score lost");
    assert_eq!(d.stop(), 0);
}

#[test]
fn thresholds_follow_their_series_to_the_consumer_a_partition_moves_to() {
    let c = Cluster::shared();
    let id = std::process::id();
    let (topic, changelog, group) = (format!("follow-{id}"), format!("follow-thresholds-{id}"), format!("follow-g-{id}"));
    c.create_topic(&topic, 4);
    c.create_topic(&changelog, 4);
    // Eight series, two per partition; each warms up on its first 100 windows, then has its own
    // threshold.
    let (columns, records) = over_four_partitions(8, 250);
    let rows = |from: usize, to: usize| &records[from * 8..to * 8];
    let kafka = format!("series_from_key = true\nthresholds_topic = \"{changelog}\"");
    let thresholds = "[thresholds]\nmode = \"spot\"\nlevel = 0.89\nwarmup_windows = 100\nsave_interval_secs = 1\n";
    let config = config(&c.bootstrap, &topic, &group, &columns, &kafka, TIME_MAPPING)
        + thresholds
        + "[kafka.properties]\n\"session.timeout.ms\" = \"6000\"\n";
    let assigned = |d: &Daemon| d.metric("anomalyd_kafka_assigned_partitions");
    let phase = |d: &Daemon, p: &str| d.metric(&format!("anomalyd_threshold_series{{phase=\"{p}\"}}"));

    c.produce(&topic, rows(0, 200));
    let a = Daemon::start(&temp_dir("kafka-follow-a"), &config);
    a.wait_for(|a| a.metric("anomalyd_windows_scored_total") == Some(8.0 * 169.0), "a scored every window");
    assert_eq!(phase(&a, "own"), Some(8.0), "every series past its warm-up");
    a.wait_for(|a| a.metric("anomalyd_threshold_changelog_records_total{event=\"written\"}") >= Some(8.0), "a wrote them");

    // b joins: two partitions move to it, and their four series keep the thresholds they had.
    let b = Daemon::start(&temp_dir("kafka-follow-b"), &config);
    b.wait_for(|b| assigned(b) == Some(2.0) && assigned(&a) == Some(2.0), "two partitions each");
    c.produce(&topic, rows(200, 250));
    b.wait_for(|b| owned_series(b).len() == 4, "b scores its series");
    assert_eq!(b.metric("anomalyd_threshold_changelog_records_total{event=\"restored\"}"), Some(4.0));
    assert_eq!((phase(&b, "own"), phase(&b, "warming")), (Some(4.0), Some(0.0)), "none warms up again on b");
    assert_eq!(a.stop(), 0);
    assert_eq!(b.stop(), 0);
}
