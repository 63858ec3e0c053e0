//! The Kafka side of `bench/run` and `bench/latency` (docs/performance.md):
//!
//! ```text
//! bench_kafka preload  BROKERS TOPIC RECORDS SERIES FEATURES    # the synthetic stream, keyed by series
//! bench_kafka ceiling  BROKERS TOPIC RECORDS [NAME=VALUE…]      # read and discard: the consume ceiling
//! bench_kafka paced    BROKERS TOPIC RATE SECONDS SERIES FEATURES  # event time = now (unix ms), at RATE records/s
//! bench_kafka latency  BROKERS SCORES_TOPIC INPUT_TOPIC         # event → append → score, from both topics
//! bench_kafka floor    BROKERS TOPIC RECORDS                    # append → arrival at a consumer that only reads
//! ```
//!
//! The stream: key `s{j}`, payload `ts;f0;…` with `ts` = 1700000000 + i for row i (rows
//! interleaved across series), and feature k of series j at row i =
//! sin(2π(i + 7j)/60 + k) + 0.5k + 0.05·(((31i + 17j + 13k) mod 101)/101 − 0.5), four decimals
//! (bench/make_model.py trains on the same formula). Each command prints one JSON line.

use std::fmt::Write;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Message, OwnedMessage, Timestamp};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};

fn value(series: usize, row: usize, feature: usize) -> f64 {
    let phase = 2.0 * std::f64::consts::PI * (row + 7 * series) as f64 / 60.0 + feature as f64;
    let noise = ((row * 31 + series * 17 + feature * 13) % 101) as f64 / 101.0 - 0.5;
    phase.sin() + 0.5 * feature as f64 + 0.05 * noise
}

fn payload(buf: &mut String, ts: &str, series: usize, row: usize, features: usize) {
    buf.clear();
    buf.push_str(ts);
    for k in 0..features {
        write!(buf, ";{:.4}", value(series, row, k)).unwrap();
    }
}

fn producer(brokers: &str) -> ThreadedProducer<DefaultProducerContext> {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("linger.ms", "20")
        .set("batch.num.messages", "10000")
        .set("queue.buffering.max.messages", "1000000")
        .set("compression.type", "lz4")
        .create()
        .expect("producer")
}

/// Enqueues, waiting while librdkafka's queue is full.
fn send(p: &ThreadedProducer<DefaultProducerContext>, topic: &str, key: &str, payload: &str) {
    let mut record = BaseRecord::<str, str>::to(topic).key(key).payload(payload);
    loop {
        match p.send(record) {
            Ok(()) => return,
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                record = r;
                std::thread::sleep(Duration::from_millis(1));
            }
            Err((e, _)) => panic!("produce: {e}"),
        }
    }
}

fn preload(brokers: &str, topic: &str, records: usize, series: usize, features: usize) {
    let p = producer(brokers);
    let started = Instant::now();
    let mut buf = String::new();
    for n in 0..records {
        let (row, j) = (n / series, n % series);
        payload(&mut buf, &(1_700_000_000 + row).to_string(), j, row, features);
        send(&p, topic, &format!("s{j}"), &buf);
    }
    p.flush(Duration::from_secs(120)).expect("flush");
    println!(r#"{{"records": {records}, "seconds": {:.3}}}"#, started.elapsed().as_secs_f64());
}

/// A consumer with librdkafka's defaults, and `properties` (`name=value`) over them.
fn consumer(brokers: &str, group: &str, properties: &[String]) -> BaseConsumer {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", brokers).set("group.id", group).set("auto.offset.reset", "earliest").set("enable.auto.commit", "false");
    for p in properties {
        let (name, value) = p.split_once('=').unwrap_or_else(|| panic!("{p}: expected name=value"));
        config.set(name, value);
    }
    config.create().expect("consumer")
}

fn ceiling(brokers: &str, topic: &str, records: usize, properties: &[String]) {
    let c = consumer(brokers, &format!("ceiling-{}", std::process::id()), properties);
    c.subscribe(&[topic]).unwrap();
    let (mut n, mut bytes, mut first) = (0usize, 0usize, None);
    while n < records {
        if let Some(m) = c.poll(Duration::from_millis(100)) {
            let m = m.expect("consume");
            first.get_or_insert_with(Instant::now);
            bytes += m.payload().map_or(0, <[u8]>::len) + m.key().map_or(0, <[u8]>::len);
            n += 1;
        }
    }
    let seconds = first.expect("records").elapsed().as_secs_f64();
    println!(r#"{{"records": {n}, "bytes": {bytes}, "seconds": {seconds:.3}}}"#);
}

fn now_ms() -> u128 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis()
}

fn paced(brokers: &str, topic: &str, rate: f64, seconds: f64, series: usize, features: usize) {
    // Latency, not throughput: send each record when it is due.
    let p: ThreadedProducer<DefaultProducerContext> =
        ClientConfig::new().set("bootstrap.servers", brokers).set("linger.ms", "5").create().expect("producer");
    let total = (rate * seconds) as usize;
    let started = Instant::now();
    let mut buf = String::new();
    for n in 0..total {
        let due = started + Duration::from_secs_f64(n as f64 / rate);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        let (row, j) = (n / series, n % series);
        payload(&mut buf, &now_ms().to_string(), j, row, features);
        send(&p, topic, &format!("s{j}"), &buf);
    }
    p.flush(Duration::from_secs(30)).expect("flush");
    println!(r#"{{"records": {total}, "seconds": {:.3}}}"#, started.elapsed().as_secs_f64());
}

/// Where the time from event to score goes, from both topics: the input's (which must have
/// `message.timestamp.type=LogAppendTime`: when the broker appended each record) and the scores'
/// (CreateTime: when the daemon produced the score). A window is joined to its newest record by
/// series and event time. Prints the quantiles of event → score, event → append (the producer
/// and broker) and append → score (anomalyd, fetch included), each over the windows and records
/// after the first 5 s of event time: the producer's start (connecting, fetching metadata) holds
/// back the first few thousand records, and that is not the steady state.
fn latency(brokers: &str, scores: &str, input: &str) {
    let mut appended = std::collections::HashMap::new();
    for m in messages(brokers, input) {
        let Timestamp::LogAppendTime(at) = m.timestamp() else { panic!("{input} has no LogAppendTime") };
        let payload = std::str::from_utf8(m.payload().unwrap()).unwrap();
        let event: i64 = payload.split(';').next().unwrap().parse().unwrap();
        appended.insert((m.key().unwrap().to_vec(), event), at);
    }
    let start = appended.keys().map(|&(_, event)| event).min().expect("records") + 5000;
    let mut parts = [Vec::new(), Vec::new(), Vec::new()];
    for m in messages(brokers, scores) {
        let Timestamp::CreateTime(scored) = m.timestamp() else { panic!("scores carry CreateTime") };
        let v: serde_json::Value = serde_json::from_slice(m.payload().unwrap()).unwrap();
        let event = (v["window_end_ts"].as_f64().unwrap() * 1000.0).round() as i64;
        let at = appended[&(v["series"].as_str().unwrap().as_bytes().to_vec(), event)];
        if event >= start {
            parts[0].push(scored - event);
            parts[2].push(scored - at);
        }
    }
    parts[1] = appended.into_iter().filter(|&((_, event), _)| event >= start).map(|((_, event), at)| at - event).collect();
    for (name, ms) in ["event to score", "event to broker append", "append to score (anomalyd)"].iter().zip(parts) {
        println!("{name}: {}", quantiles(ms));
    }
}

/// The latency floor next to `latency`: a consumer that only reads, with librdkafka's defaults,
/// timing each of RECORDS records from the broker's append (LogAppendTime) to its arrival here,
/// after the first 5 s as there.
fn floor(brokers: &str, topic: &str, records: usize) {
    let c = consumer(brokers, &format!("floor-{}", std::process::id()), &[]);
    c.subscribe(&[topic]).unwrap();
    let (mut n, mut start, mut ms) = (0, None, Vec::new());
    while n < records {
        if let Some(m) = c.poll(Duration::from_millis(100)) {
            let Timestamp::LogAppendTime(at) = m.expect("consume").timestamp() else { panic!("{topic} has no LogAppendTime") };
            n += 1;
            if at >= *start.get_or_insert(at + 5000) {
                ms.push(now_ms() as i64 - at);
            }
        }
    }
    println!("append to a bare consumer: {}", quantiles(ms));
}

/// Every message of every partition of `topic`, from the start.
fn messages(brokers: &str, topic: &str) -> Vec<OwnedMessage> {
    let c = consumer(brokers, &format!("latency-{}", std::process::id()), &[]);
    let metadata = c.fetch_metadata(Some(topic), Duration::from_secs(10)).unwrap();
    let total: i64 = metadata.topics()[0]
        .partitions()
        .iter()
        .map(|p| c.fetch_watermarks(topic, p.id(), Duration::from_secs(10)).map(|(low, high)| high - low).unwrap())
        .sum();
    c.subscribe(&[topic]).unwrap();
    let mut all = Vec::new();
    while (all.len() as i64) < total {
        if let Some(m) = c.poll(Duration::from_millis(200)) {
            all.push(m.expect("consume").detach());
        }
    }
    all
}

fn quantiles(mut ms: Vec<i64>) -> String {
    ms.sort_unstable();
    let q = |p: f64| ms[((ms.len() - 1) as f64 * p).round() as usize];
    format!(
        r#"{{"count": {}, "p50_ms": {}, "p90_ms": {}, "p99_ms": {}, "p99.9_ms": {}, "max_ms": {}}}"#,
        ms.len(),
        q(0.5),
        q(0.9),
        q(0.99),
        q(0.999),
        ms[ms.len() - 1]
    )
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |i: usize| args.get(i).unwrap_or_else(|| panic!("argument {i} missing: see the module docs")).as_str();
    let num = |i: usize| arg(i).parse::<usize>().unwrap_or_else(|_| panic!("argument {i}: not a number"));
    match arg(1) {
        "preload" => preload(arg(2), arg(3), num(4), num(5), num(6)),
        "ceiling" => ceiling(arg(2), arg(3), num(4), &args[5..]),
        "paced" => paced(arg(2), arg(3), num(4) as f64, num(5) as f64, num(6), num(7)),
        "latency" => latency(arg(2), arg(3), arg(4)),
        "floor" => floor(arg(2), arg(3), num(4)),
        other => panic!("unknown command {other}: preload, ceiling, paced, latency or floor"),
    }
}
