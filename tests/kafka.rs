//! The Kafka source against a real Apache Kafka broker (scripts/kafka, started by scripts/test,
//! which exports ANOMALYD_TEST_KAFKA=host:port).

mod common;

use std::time::Duration;

use common::{repo, temp_dir, Daemon};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
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
    let header: Vec<String> = lines.next().unwrap().split(';').map(|c| format!("{c:?}")).collect();
    let records: Vec<&str> = lines.collect();
    produce(&topic, "pump", &records);

    let dir = temp_dir("kafka");
    let config = format!(
        r#"
[model]
path = "models/skab-convae"
[source]
kind = "kafka"
format = "csv"
csv_delimiter = ";"
csv_columns = [{}]
series_name = "pump"
[kafka]
brokers = "{}"
topics = ["{topic}"]
group_id = "{group}"
[admin]
listen = "127.0.0.1:{{port}}"
[alerts]
sink = "file"
path = "{{dir}}/alerts.jsonl"
"#,
        header.join(", "),
        brokers()
    );
    let d = Daemon::start(&dir, &config);
    d.wait_for(|d| d.metric("anomalyd_windows_scored_total") == Some(138.0), "138 windows from Kafka");
    assert_eq!(d.metric("anomalyd_alerts_total{state=\"firing\"}"), Some(1.0));
    assert_eq!(d.metric("anomalyd_records_discarded_total{reason=\"out_of_order\"}"), Some(1.0));
    assert_eq!(d.stop(), 0);
    // Every record was handled (scored or counted), so the group's next offset is past the last.
    assert_eq!(committed(&topic, &group), records.len() as i64);
}
