//! The Kafka source against a real Apache Kafka broker (scripts/kafka, started by scripts/test,
//! which exports ANOMALYD_TEST_KAFKA=host:port).

mod common;

use std::time::Duration;

use common::{repo, temp_dir, Daemon};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::TopicPartitionList;

fn brokers() -> String {
    std::env::var("ANOMALYD_TEST_KAFKA")
        .expect("ANOMALYD_TEST_KAFKA=host:port of a real broker: run scripts/test, or scripts/kafka start and export it")
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

fn create_topic(name: &str, partitions: i32) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new().set("bootstrap.servers", brokers()).create().unwrap();
    let topic = NewTopic::new(name, partitions, TopicReplication::Fixed(1));
    let results = runtime().block_on(admin.create_topics(&[topic], &AdminOptions::new())).unwrap();
    results.into_iter().for_each(|r| {
        r.unwrap();
    });
}

fn produce(topic: &str, key: &str, lines: &[&str]) {
    let producer: FutureProducer = ClientConfig::new().set("bootstrap.servers", brokers()).create().unwrap();
    runtime().block_on(async {
        for line in lines {
            producer.send(FutureRecord::to(topic).key(key).payload(*line), Duration::from_secs(10)).await.unwrap();
        }
    });
}

/// A daemon config reading CSV lines with `columns` from `topic` as `group`; `kafka` continues
/// the `[kafka]` section, `extra` the `[source]` section (and may add sections of its own).
fn config(topic: &str, group: &str, columns: &[String], kafka: &str, extra: &str) -> String {
    let columns: Vec<String> = columns.iter().map(|c| format!("{c:?}")).collect();
    format!(
        r#"
[model]
path = "models/skab-convae"
[admin]
listen = "127.0.0.1:{{port}}"
[kafka]
brokers = "{}"
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
        brokers(),
        columns.join(", ")
    )
}

/// A message as the tests look at it: key, payload, headers.
type Received = (Option<String>, String, Vec<(String, String)>);

/// Up to `want` messages of partition 0 of `topic`, read from the start.
fn read_all(topic: &str, want: usize) -> Vec<Received> {
    let consumer: BaseConsumer = ClientConfig::new().set("bootstrap.servers", brokers()).set("group.id", "reader").create().unwrap();
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, rdkafka::Offset::Beginning).unwrap();
    consumer.assign(&tpl).unwrap();
    let mut out = Vec::new();
    let started = std::time::Instant::now();
    while out.len() < want && started.elapsed() < Duration::from_secs(20) {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) {
            let text = |b: Option<&[u8]>| String::from_utf8_lossy(b.unwrap_or_default()).into_owned();
            let headers = m
                .headers()
                .map(|h| h.iter().map(|x| (x.key.to_string(), text(x.value))).collect())
                .unwrap_or_default();
            out.push((m.key().map(|k| text(Some(k))), text(m.payload()), headers));
        }
    }
    out
}

/// The group's committed offset of partition 0.
fn committed(topic: &str, group: &str) -> i64 {
    let consumer: BaseConsumer = ClientConfig::new().set("bootstrap.servers", brokers()).set("group.id", group).create().unwrap();
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition(topic, 0);
    let got = consumer.committed_offsets(tpl, Duration::from_secs(10)).unwrap();
    got.elements()[0].offset().to_raw().unwrap_or(-1)
}

#[test]
fn produced_records_are_scored_alerted_and_committed() {
    let topic = format!("metrics-{}", std::process::id());
    let group = format!("anomalyd-{}", std::process::id());
    create_topic(&topic, 1);
    let csv = std::fs::read_to_string(repo().join("contracts/skab-convae/records.csv")).unwrap();
    let mut lines = csv.lines();
    let header: Vec<String> = lines.next().unwrap().split(';').map(String::from).collect();
    let records: Vec<&str> = lines.collect();
    produce(&topic, "pump", &records);

    let dir = temp_dir("kafka");
    let config = config(&topic, &group, &header, "", "series_name = \"pump\"\n[alerts]\nsink = \"file\"\npath = \"{dir}/alerts.jsonl\"")
        + "[kafka.properties]\n\"statistics.interval.ms\" = \"200\"\n";
    let d = Daemon::start(&dir, &config);
    d.wait_for(|d| d.metric("anomalyd_windows_scored_total") == Some(138.0), "138 windows from Kafka");
    assert_eq!(d.metric("anomalyd_alerts_total{state=\"firing\"}"), Some(1.0));
    assert_eq!(d.metric("anomalyd_records_discarded_total{reason=\"out_of_order\"}"), Some(1.0));
    assert_eq!(d.metric("anomalyd_kafka_rebalances_total{kind=\"assign\"}"), Some(1.0));
    let lag = format!("anomalyd_kafka_consumer_lag_messages{{partition=\"0\",topic=\"{topic}\"}}");
    d.wait_for(|d| d.metric(&lag) == Some(0.0), "consumer lag 0 from librdkafka statistics");
    assert_eq!(d.stop(), 0);
    // Every record was handled, but the series' next window still needs its last W − 1 = 31
    // records: the committed offset trails to the oldest of them, so a restart refills the window.
    assert_eq!(committed(&topic, &group), records.len() as i64 - 31);
}

/// Five series of 400 rows each, interleaved, with the sample's sensor values, keyed by series.
fn five_series() -> (Vec<String>, Vec<String>, Vec<String>) {
    let csv = std::fs::read_to_string(repo().join("contracts/skab-convae/records.csv")).unwrap();
    let mut lines = csv.lines();
    let header: Vec<String> = lines.next().unwrap().split(';').skip(1).map(String::from).collect();
    let values: Vec<&str> = lines.map(|l| l.split_once(';').unwrap().1).collect();
    let (mut keys, mut rows) = (Vec::new(), Vec::new());
    for i in 0..400 {
        for s in 0..5 {
            keys.push(format!("s{s}"));
            rows.push(format!("{};s{s};{}", 1_700_000_000 + i, values[(i * 5 + s) % values.len()]));
        }
    }
    let mut columns = vec!["ts".to_string(), "series".to_string()];
    columns.extend(header);
    (columns, keys, rows)
}

#[test]
fn after_kill_9_every_window_is_scored_at_least_once() {
    let topic = format!("crash-{}", std::process::id());
    let group = format!("anomalyd-crash-{}", std::process::id());
    create_topic(&topic, 1);
    let (columns, keys, rows) = five_series();
    let dir = temp_dir("kafka-crash");
    let config = |n: usize| {
        let extra = format!(
            r#"
[mapping]
timestamp_field = "ts"
timestamp_format = "unix_s"
series_fields = ["series"]
[alerts]
sink = "file"
path = "{{dir}}/alerts.jsonl"
scores_path = "{{dir}}/scores-{n}.jsonl"
"#
        );
        // The killed member's partitions move once the broker gives up on it: keep that short.
        config(&topic, &group, &columns, "", &extra)
            + "[kafka.properties]\n\"auto.commit.interval.ms\" = \"100\"\n\"session.timeout.ms\" = \"6000\"\n"
    };
    let produce_range = |from: usize, to: usize| {
        let producer: FutureProducer = ClientConfig::new().set("bootstrap.servers", brokers()).create().unwrap();
        runtime().block_on(async {
            for i in from..to {
                producer.send(FutureRecord::to(&topic).key(&keys[i]).payload(&rows[i]), Duration::from_secs(10)).await.unwrap();
            }
        });
    };

    // First half; the daemon scores it, commits (every 100 ms), and is killed without warning.
    produce_range(0, 1000);
    let mut d = Daemon::start(&dir, &config(1));
    d.wait_for(|d| d.metric("anomalyd_windows_scored_total").is_some_and(|v| v >= 5.0 * (200.0 - 31.0)), "first half scored");
    std::thread::sleep(Duration::from_millis(500));
    d.child.kill().unwrap();
    d.child.wait().unwrap();
    let committed_at_crash = committed(&topic, &group);
    assert!(committed_at_crash > 0 && committed_at_crash < 1000, "committed {committed_at_crash}");

    // Second half, and a new daemon in the same group: it replays from the committed offset.
    produce_range(1000, 2000);
    let d = Daemon::start(&dir, &config(2));
    d.wait_for(|d| d.metric("anomalyd_records_received_total") == Some(2000.0 - committed_at_crash as f64), "the replay");
    d.wait_for(|d| d.metric("anomalyd_windows_scored_total").is_some_and(|v| v > 0.0), "scoring after restart");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(d.stop(), 0);

    let mut seen = std::collections::HashSet::new();
    for n in [1, 2] {
        for line in std::fs::read_to_string(dir.join(format!("scores-{n}.jsonl"))).unwrap_or_default().lines() {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            seen.insert((v["series"].as_str().unwrap().to_string(), v["window_end_ts"].as_f64().unwrap() as i64));
        }
    }
    // Every series' windows end at its rows 32..400 (W = 32): all of them, across both runs.
    let missing: Vec<_> = (0..5)
        .flat_map(|s| (31..400).map(move |i| (format!("s{s}"), 1_700_000_000 + i)))
        .filter(|w| !seen.contains(w))
        .collect();
    assert!(missing.is_empty(), "{} windows never scored, e.g. {:?}", missing.len(), &missing[..missing.len().min(3)]);
}

#[test]
fn poison_messages_are_dead_lettered_and_alerts_published() {
    let id = std::process::id();
    let (topic, dlq, alerts_topic, group) = (format!("in-{id}"), format!("dlq-{id}"), format!("alerts-{id}"), format!("g-{id}"));
    for t in [&topic, &dlq, &alerts_topic] {
        create_topic(t, 1);
    }
    let csv = std::fs::read_to_string(repo().join("contracts/skab-convae/records.csv")).unwrap();
    let mut lines = csv.lines();
    let header: Vec<String> = lines.next().unwrap().split(';').map(String::from).collect();
    let mut records: Vec<String> = lines.map(String::from).collect();
    // Three poison messages amid the stream: not CSV, a word for a number, too few columns.
    let poison = ["\u{1}\u{2} binary junk".to_string(), records[50].replacen(";", ";many;", 1), "2026-01-05 10:00:00;1".to_string()];
    for (i, p) in [10usize, 60, 120].iter().zip(&poison) {
        records.insert(*i, p.clone());
    }
    produce(&topic, "pump", &records.iter().map(String::as_str).collect::<Vec<_>>());
    let kafka = format!("dead_letter_topic = \"{dlq}\"\nalerts_topic = \"{alerts_topic}\"");
    let text = config(&topic, &group, &header, &kafka, "series_name = \"pump\"");
    let dir = temp_dir("kafka-dlq");
    let d = Daemon::start(&dir, &text);
    d.wait_for(|d| d.metric("anomalyd_windows_scored_total") == Some(138.0), "the good records scored");
    d.wait_for(|d| d.metric("anomalyd_dead_letters_total{reason=\"missing_field\"}").is_some(), "dead letters delivered");
    assert_eq!(d.stop(), 0);

    let dead = read_all(&dlq, 3);
    assert_eq!(dead.len(), 3);
    for ((_, payload, headers), (offset, original)) in dead.iter().zip([10usize, 60, 120].iter().zip(&poison)) {
        assert_eq!(payload, original, "original bytes kept");
        let h = |k: &str| headers.iter().find(|(key, _)| key == k).map(|(_, v)| v.clone()).unwrap_or_default();
        assert_eq!(h("anomalyd.source_topic"), topic);
        assert_eq!(h("anomalyd.source_offset"), offset.to_string());
        assert!(!h("anomalyd.error").is_empty() && !h("anomalyd.error_message").is_empty());
    }
    let events = read_all(&alerts_topic, 2);
    assert!(events.iter().any(|(key, payload, _)| key.as_deref() == Some("pump") && payload.contains("\"event\":\"firing\"")));
    // The poison did not stall the partition: the commit moved past it to the window's rows.
    assert_eq!(committed(&topic, &group), records.len() as i64 - 31);
}
