//! The operations artefacts of deploy/ against the real tools: a real Prometheus and Alertmanager
//! (Debian packages) on loopback scrape and route a running anomalyd fed with an anomaly; promtool
//! unit-tests the alert rules; helm lints and renders the chart; systemd-analyze verifies the unit.
//! A second daemon reads from a real Kafka broker (ANOMALYD_TEST_KAFKA, which scripts/test sets),
//! for the consumer-lag panel and the dead-letter alert.

mod common;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{free_port, metric, repo, stdin_config, temp_dir, Daemon};
use serde_json::Value;

// === Tools ===

/// A tool's process, killed when the test ends, however it ends.
struct Service {
    child: Child,
    log: PathBuf,
}

impl Service {
    fn start(program: &str, args: &[String], log: PathBuf) -> Service {
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new(program)
            .args(args)
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("{program}: {e} (scripts/setup installs it)"));
        Service { child, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A GET over HTTP/1.0 (no chunked replies): (status, body).
fn get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let code = text.split(' ').nth(1)?.parse().ok()?;
    Some((code, text.split_once("\r\n\r\n")?.1.to_string()))
}

fn wait_for<T>(what: &str, secs: u64, mut probe: impl FnMut() -> Option<T>, context: impl Fn() -> String) -> T {
    let started = Instant::now();
    loop {
        if let Some(v) = probe() {
            return v;
        }
        assert!(started.elapsed() < Duration::from_secs(secs), "timed out waiting for {what}\n{}", context());
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs_f64()
}

/// A shipped file with test edits; every edit must find its text, so the files cannot drift
/// away from what the test assumes unnoticed.
fn render(path: &str, edits: &[(&str, &str)]) -> String {
    let mut text = std::fs::read_to_string(repo().join(path)).unwrap();
    for (from, to) in edits {
        assert!(text.contains(from), "{path} no longer contains {from:?}");
        text = text.replace(from, to);
    }
    text
}

fn run(program: &str, args: &[&str]) -> Output {
    Command::new(program).args(args).current_dir(repo()).output().unwrap_or_else(|e| panic!("{program}: {e} (scripts/setup installs it)"))
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

struct Prometheus {
    _service: Service,
    port: u16,
}

impl Prometheus {
    /// Prometheus on deploy/prometheus/prometheus.yml and the shipped rules, with 1 s scrape and
    /// evaluation intervals and every `for:` cut to 1 s (the rules' logic stays as shipped).
    fn start(dir: &Path, targets: &[u16], alertmanager: u16) -> Prometheus {
        let dir = dir.join("prometheus");
        std::fs::create_dir_all(&dir).unwrap();
        let targets: Vec<String> = targets.iter().map(|p| format!("\"127.0.0.1:{p}\"")).collect();
        let config = render(
            "deploy/prometheus/prometheus.yml",
            &[
                ("scrape_interval: 15s", "scrape_interval: 1s"),
                ("evaluation_interval: 15s", "evaluation_interval: 1s"),
                ("\"127.0.0.1:9187\"", &targets.join(", ")),
                ("127.0.0.1:9093", &format!("127.0.0.1:{alertmanager}")),
            ],
        );
        std::fs::write(dir.join("prometheus.yml"), config).unwrap();
        let rules = std::fs::read_to_string(repo().join("deploy/prometheus/anomalyd-rules.yml")).unwrap();
        let rules: Vec<String> = rules
            .lines()
            .map(|l| {
                if l.trim_start().starts_with("for: ") {
                    format!("{}for: 1s", &l[..l.len() - l.trim_start().len()])
                } else {
                    l.to_string()
                }
            })
            .collect();
        std::fs::write(dir.join("anomalyd-rules.yml"), rules.join("\n")).unwrap();
        let port = free_port();
        let args = [
            format!("--config.file={}", dir.join("prometheus.yml").display()),
            format!("--storage.tsdb.path={}", dir.join("data").display()),
            format!("--web.listen-address=127.0.0.1:{port}"),
        ];
        let service = Service::start("prometheus", &args, dir.join("log"));
        wait_for("Prometheus ready", 30, || get(port, "/-/ready").filter(|(c, _)| *c == 200), || service.log());
        Prometheus { _service: service, port }
    }

    fn api(&self, path: &str) -> Value {
        let (code, body) = get(self.port, path).expect("Prometheus answers");
        let v: Value = serde_json::from_str(&body).unwrap_or_else(|_| panic!("{code}: {body}"));
        assert_eq!(v["status"], "success", "{path}: {body}");
        v["data"].clone()
    }

    /// An instant query's result vector.
    fn query(&self, expr: &str) -> Vec<Value> {
        self.api(&format!("/api/v1/query?query={}", encode(expr)))["result"].as_array().unwrap().clone()
    }

    /// A range query from `start` to now, 1 s steps: its series.
    fn query_range(&self, expr: &str, start: f64) -> Vec<Value> {
        let path = format!("/api/v1/query_range?query={}&start={start:.3}&end={:.3}&step=1", encode(expr), now());
        self.api(&path)["result"].as_array().unwrap().clone()
    }

    /// Labels of the firing alerts named `name`.
    fn firing(&self, name: &str) -> Vec<Value> {
        self.query(&format!("ALERTS{{alertname=\"{name}\",alertstate=\"firing\"}}")).into_iter().map(|s| s["metric"].clone()).collect()
    }
}

fn start_alertmanager(dir: &Path, webhook: u16) -> (Service, u16) {
    let dir = dir.join("alertmanager");
    std::fs::create_dir_all(&dir).unwrap();
    let config = render(
        "deploy/prometheus/alertmanager.yml",
        &[
            ("group_wait: 30s", "group_wait: 1s"),
            ("group_interval: 5m", "group_interval: 1s"),
            ("127.0.0.1:5001", &format!("127.0.0.1:{webhook}")),
        ],
    );
    std::fs::write(dir.join("alertmanager.yml"), config).unwrap();
    let port = free_port();
    let args = [
        format!("--config.file={}", dir.join("alertmanager.yml").display()),
        format!("--storage.path={}", dir.join("data").display()),
        format!("--web.listen-address=127.0.0.1:{port}"),
        // No gossip listener: a single instance on loopback.
        "--cluster.listen-address=".to_string(),
    ];
    let service = Service::start("prometheus-alertmanager", &args, dir.join("log"));
    wait_for("Alertmanager ready", 30, || get(port, "/-/ready").filter(|(c, _)| *c == 200), || service.log());
    (service, port)
}

/// Alertmanager's webhook notifications, as (path, JSON body).
#[derive(Clone)]
struct Webhook {
    port: u16,
    received: Arc<Mutex<Vec<(String, Value)>>>,
}

impl Webhook {
    fn start() -> Webhook {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let hook = Webhook { port: listener.local_addr().unwrap().port(), received: Arc::default() };
        let received = hook.received.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                if let Some(request) = read_request(stream) {
                    received.lock().unwrap().push(request);
                }
            }
        });
        hook
    }

    /// Alerts named `name` with `status` that reached `path`.
    fn alerts(&self, path: &str, name: &str, status: &str) -> Vec<Value> {
        let received = self.received.lock().unwrap();
        received
            .iter()
            .filter(|(p, _)| p == path)
            .flat_map(|(_, body)| body["alerts"].as_array().cloned().unwrap_or_default())
            .filter(|a| a["labels"]["alertname"] == name && a["status"] == status)
            .collect()
    }

    fn dump(&self) -> String {
        format!("{:#?}", self.received.lock().unwrap())
    }
}

fn read_request(mut stream: TcpStream) -> Option<(String, Value)> {
    stream.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let header_end = loop {
        let n = stream.read(&mut chunk).ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
    };
    let head = String::from_utf8_lossy(&buf[..header_end]).to_string();
    let path = head.split(' ').nth(1)?.to_string();
    let length: usize = head
        .lines()
        .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_string()))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    while buf.len() < header_end + length {
        let n = stream.read(&mut chunk).ok()?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").ok()?;
    Some((path, serde_json::from_slice(&buf[header_end..]).ok()?))
}

// === The stack, live ===

fn alert_events(dir: &Path) -> Vec<Value> {
    std::fs::read_to_string(dir.join("alerts.jsonl")).unwrap_or_default().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// A dashboard panel's query: (panel title, expr, instant).
type PanelQuery = (String, String, bool);

/// Every panel's queries, and the template variables' `label_values(metric, label)` queries, as
/// (metric, label).
fn dashboard_queries() -> (Vec<PanelQuery>, Vec<(String, String)>) {
    let dash: Value =
        serde_json::from_str(&std::fs::read_to_string(repo().join("deploy/grafana/anomalyd-dashboard.json")).unwrap()).unwrap();
    let mut panels: Vec<Value> = dash["panels"].as_array().unwrap().clone();
    let mut queries = Vec::new();
    while let Some(p) = panels.pop() {
        panels.extend(p["panels"].as_array().cloned().unwrap_or_default());
        if p["type"] == "row" {
            continue;
        }
        let targets = p["targets"].as_array().cloned().unwrap_or_default();
        assert!(!targets.is_empty(), "panel {} has no query", p["title"]);
        for t in targets {
            queries.push((p["title"].as_str().unwrap().to_string(), t["expr"].as_str().unwrap().to_string(), t["instant"] == true));
        }
    }
    let variables = dash["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| v["type"] == "query")
        .map(|v| {
            let q = v["query"]["query"].as_str().unwrap();
            let (metric, label) =
                q.strip_prefix("label_values(").and_then(|r| r.strip_suffix(')')).and_then(|r| r.split_once(", ")).unwrap();
            (metric.to_string(), label.to_string())
        })
        .collect();
    (queries, variables)
}

/// What Grafana would send with "All" selected and a 1 s scrape interval.
fn as_grafana_sends(expr: &str) -> String {
    let q = expr.replace("$__rate_interval", "5s").replace("$model", ".*").replace("$series", ".*");
    assert!(!q.contains('$'), "unknown variable in {expr}");
    q
}

/// A second daemon, reading the records and one unparseable message from a Kafka topic with a
/// dead-letter topic: the consumer-lag panel and RecordsDeadLettered need a Kafka source.
struct KafkaFeed {
    daemon: Daemon,
    topic: String,
}

mod kafka {
    use std::time::Duration;

    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::client::DefaultClientContext;
    use rdkafka::config::ClientConfig;
    use rdkafka::producer::{FutureProducer, FutureRecord};

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
    }

    pub fn create_topics(brokers: &str, names: &[&str]) {
        let admin: AdminClient<DefaultClientContext> = ClientConfig::new().set("bootstrap.servers", brokers).create().unwrap();
        let topics: Vec<NewTopic> = names.iter().map(|n| NewTopic::new(n, 1, TopicReplication::Fixed(1))).collect();
        for r in runtime().block_on(admin.create_topics(&topics, &AdminOptions::new())).unwrap() {
            r.unwrap();
        }
    }

    pub fn produce(brokers: &str, topic: &str, lines: &[&str]) {
        let producer: FutureProducer = ClientConfig::new().set("bootstrap.servers", brokers).create().unwrap();
        runtime().block_on(async {
            for line in lines {
                producer.send(FutureRecord::to(topic).key("pump").payload(*line), Duration::from_secs(10)).await.unwrap();
            }
        });
    }
}

impl KafkaFeed {
    fn start(dir: &Path, brokers: &str, header: &str) -> KafkaFeed {
        let topic = format!("ops-{}", std::process::id());
        kafka::create_topics(brokers, &[&topic, &format!("{topic}-dead")]);
        let columns: Vec<String> = header.split(';').map(|c| format!("{c:?}")).collect();
        let config = format!(
            r#"
[model]
path = "models/skab-convae"
[source]
kind = "kafka"
format = "csv"
csv_delimiter = ";"
csv_columns = [{}]
[kafka]
brokers = "{brokers}"
topics = ["{topic}"]
group_id = "{topic}"
dead_letter_topic = "{topic}-dead"
[kafka.properties]
"statistics.interval.ms" = "1000"
[admin]
listen = "127.0.0.1:{{port}}"
[output]
sink = "file"
path = "{{dir}}/alerts.jsonl"
"#,
            columns.join(", ")
        );
        let dir = dir.join("kafka");
        std::fs::create_dir_all(&dir).unwrap();
        KafkaFeed { daemon: Daemon::start(&dir, &config), topic }
    }
}

#[test]
fn anomalies_and_outages_alert_through_prometheus_and_alertmanager_and_every_panel_has_data() {
    let started = now();
    let dir = temp_dir("operations");
    let records = std::fs::read_to_string(repo().join("contracts/skab-convae/records.csv")).unwrap();
    let lines: Vec<&str> = records.lines().collect();
    let hook = Webhook::start();
    let mut daemon = Daemon::start_piped(&dir, &stdin_config("models/skab-convae", 0.0));
    // The consumer-lag panel and RecordsDeadLettered need a Kafka-fed daemon: a real broker.
    let brokers = std::env::var("ANOMALYD_TEST_KAFKA")
        .expect("ANOMALYD_TEST_KAFKA=host:port of a real broker: run scripts/test, or scripts/kafka start and export it");
    let feed = KafkaFeed::start(&dir, &brokers, lines[0]);
    let (_alertmanager, am_port) = start_alertmanager(&dir, hook.port);
    let targets = [daemon.port, feed.daemon.port];
    let prom = Prometheus::start(&dir, &targets, am_port);
    let rules = prom.api("/api/v1/rules")["groups"][0]["rules"].as_array().unwrap().len();
    assert_eq!(rules, 6, "the shipped rules are loaded");
    wait_for("every target scraped", 30, || (prom.query("up{job=\"anomalyd\"} == 1").len() == targets.len()).then_some(()), String::new);

    // The level shift of Current and Pressure starts at file line 134 and the first window above
    // the threshold ends at line 153; the stream pauses at line 165, with the alert firing, so it
    // stays firing until the rest arrives.
    daemon.send(&lines[..165]);
    let fired =
        wait_for("anomalyd's own alert", 30, || alert_events(&dir).into_iter().find(|e| e["event"] == "firing"), || daemon.stderr());
    let names: Vec<&str> = fired["top_features"].as_array().unwrap().iter().map(|f| f["name"].as_str().unwrap()).collect();
    assert!(names[0] == "Current" || names[0] == "Pressure", "{fired}");
    let top_features = names.join(",");

    // (b) AnomalyDetected fires in Prometheus with the series and its top features ...
    let instance = format!("127.0.0.1:{}", daemon.port);
    let alert = wait_for("AnomalyDetected firing in Prometheus", 30, || prom.firing("AnomalyDetected").pop(), || daemon.metrics());
    assert_eq!(alert["series"], "stdin", "{alert}");
    assert_eq!(alert["top_features"], top_features.as_str(), "{alert}");
    assert_eq!(alert["model"], "skab-convae");
    assert_eq!(alert["instance"], instance.as_str());
    // ... and reaches the webhook through Alertmanager's anomaly route, annotations filled in.
    let sent =
        wait_for("AnomalyDetected at the webhook", 30, || hook.alerts("/anomalies", "AnomalyDetected", "firing").pop(), || hook.dump());
    assert_eq!(sent["labels"]["series"], "stdin");
    assert_eq!(sent["labels"]["top_features"], top_features.as_str());
    assert_eq!(sent["annotations"]["top_features"], top_features.as_str());
    assert_eq!(sent["annotations"]["threshold"], "1.0");
    let score: f64 = sent["annotations"]["score"].as_str().unwrap().parse().unwrap();
    assert!(score > 0.0, "{sent}");
    let raw: f64 = sent["annotations"]["raw_threshold"].as_str().unwrap().parse().unwrap();
    let threshold = daemon.metric("anomalyd_series_threshold{series=\"stdin\"}").unwrap();
    assert!((raw - threshold).abs() <= 1e-5 * threshold, "annotation {raw}, daemon {threshold}");
    assert!(sent["annotations"]["summary"].as_str().unwrap().contains("stdin"), "{sent}");
    assert!(hook.alerts("/operators", "AnomalyDetected", "firing").is_empty(), "anomalies have their own route");

    // The rest of the stream: anomalyd resolves, its alert_info goes, and so does the alert.
    daemon.send(&lines[165..]);
    wait_for("anomalyd's resolve", 30, || alert_events(&dir).into_iter().find(|e| e["event"] == "resolved"), || daemon.stderr());
    wait_for(
        "AnomalyDetected resolved at the webhook",
        30,
        || hook.alerts("/anomalies", "AnomalyDetected", "resolved").pop(),
        || hook.dump(),
    );
    assert!(prom.firing("AnomalyDetected").is_empty());

    // Kafka: the poison message is dead-lettered and RecordsDeadLettered fires for that daemon.
    let mut messages: Vec<&str> = lines[1..].to_vec();
    messages.insert(20, "garbage");
    kafka::produce(&brokers, &feed.topic, &messages);
    let kafka_instance = format!("127.0.0.1:{}", feed.daemon.port);
    let dead = wait_for("RecordsDeadLettered", 30, || prom.firing("RecordsDeadLettered").pop(), || feed.daemon.metrics());
    assert_eq!(dead["instance"], kafka_instance.as_str());
    assert_eq!(dead["reason"], "missing_field", "a line of the wrong column count");
    // In a range query's steps, not only at this instant: the panel check below uses one.
    let lag = || (!prom.query_range("anomalyd_kafka_consumer_lag_messages", started).is_empty()).then_some(());
    wait_for("consumer lag scraped", 30, lag, || feed.daemon.metrics());

    // (a) Every panel's query returns data, as Grafana would send it.
    let (queries, variables) = dashboard_queries();
    let mut empty = Vec::new();
    for (panel, expr, instant) in &queries {
        let q = as_grafana_sends(expr);
        let result = if *instant { prom.query(&q) } else { prom.query_range(&q, started) };
        if result.is_empty() {
            empty.push(format!("{panel}: {q}"));
        }
    }
    assert!(empty.is_empty(), "panels without data:\n{}", empty.join("\n"));
    assert!(queries.len() >= 20, "{} queries", queries.len());
    for (metric, label) in variables {
        let values: BTreeSet<String> =
            prom.query(&metric).iter().filter_map(|s| s["metric"][label.as_str()].as_str().map(String::from)).collect();
        let expected = if label == "model" { "skab-convae" } else { "stdin" };
        assert!(values.contains(expected), "variable {label}: {values:?}");
    }

    // (c) The daemon stops: AnomalydDown fires for it, and only for it, and is routed to operators.
    let stopped = daemon.stop();
    assert_eq!(stopped, 0);
    let down = wait_for("AnomalydDown", 30, || Some(prom.firing("AnomalydDown")).filter(|f| !f.is_empty()), String::new);
    assert_eq!(down.len(), 1, "only the stopped daemon: {down:?}");
    assert_eq!(down[0]["instance"], instance.as_str());
    wait_for("AnomalydDown at the webhook", 30, || hook.alerts("/operators", "AnomalydDown", "firing").pop(), || hook.dump());
    eprintln!("live stack test: {:.1} s", now() - started);
}

// === Alert rules ===

#[test]
fn alert_rules_pass_promtool_and_every_rule_has_a_firing_unit_test() {
    let check = run("promtool", &["check", "rules", "deploy/prometheus/anomalyd-rules.yml"]);
    assert!(check.status.success(), "{}", text(&check));
    let config = run("promtool", &["check", "config", "deploy/prometheus/prometheus.yml"]);
    assert!(config.status.success(), "{}", text(&config));
    let am = run("amtool", &["check-config", "deploy/prometheus/alertmanager.yml"]);
    assert!(am.status.success(), "{}", text(&am));
    let unit = run("promtool", &["test", "rules", "deploy/prometheus/anomalyd-rules.test.yml"]);
    assert!(unit.status.success() && text(&unit).contains("SUCCESS"), "{}", text(&unit));

    // Each rule is asserted firing at least once (an `alertname:` followed by a non-empty `exp_alerts:`).
    let rules = std::fs::read_to_string(repo().join("deploy/prometheus/anomalyd-rules.yml")).unwrap();
    let alerts: BTreeSet<&str> = rules.lines().filter_map(|l| l.trim().strip_prefix("- alert: ")).collect();
    let tests = std::fs::read_to_string(repo().join("deploy/prometheus/anomalyd-rules.test.yml")).unwrap();
    let lines: Vec<&str> = tests.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    let fired: BTreeSet<&str> =
        lines.windows(2).filter(|w| w[1] == "exp_alerts:").filter_map(|w| w[0].strip_prefix("alertname: ")).collect();
    assert_eq!(alerts.len(), 6, "{alerts:?}");
    assert_eq!(alerts, fired, "rules without a firing unit test");
}

// === Helm chart ===

fn helm(args: &[&str]) -> Output {
    let helm = repo().join(".cache/bin/helm");
    assert!(helm.exists(), "{} missing: scripts/setup builds it", helm.display());
    run(helm.to_str().unwrap(), args)
}

/// `helm template` with `sets`: the rendered documents by kind.
fn template(sets: &[&str]) -> Result<Vec<(String, String)>, String> {
    let mut args = vec!["template", "ops", "deploy/helm/anomalyd", "--kube-version", "1.30.0"];
    for s in sets {
        args.extend(["--set", s]);
    }
    let out = helm(&args);
    if !out.status.success() {
        return Err(text(&out));
    }
    Ok(String::from_utf8(out.stdout)
        .unwrap()
        .split("\n---\n")
        .filter_map(|doc| {
            let kind = doc.lines().find_map(|l| l.strip_prefix("kind: "))?;
            Some((kind.to_string(), doc.to_string()))
        })
        .collect())
}

fn doc<'a>(docs: &'a [(String, String)], kind: &str) -> &'a str {
    &docs.iter().find(|(k, _)| k == kind).unwrap_or_else(|| panic!("no {kind} rendered")).1
}

/// The value of the first `key: value` line in a document.
fn field<'a>(doc: &'a str, key: &str) -> &'a str {
    doc.lines().find_map(|l| l.trim().strip_prefix(&format!("{key}: "))).unwrap_or_else(|| panic!("no {key} in\n{doc}"))
}

#[test]
fn helm_chart_lints_and_renders_a_hardened_deployment_with_monitoring() {
    let lint = helm(&["lint", "--strict", "deploy/helm/anomalyd"]);
    assert!(lint.status.success(), "{}", text(&lint));

    let docs = template(&["serviceMonitor.enabled=true", "prometheusRule.enabled=true", "autoscaling.enabled=true"]).unwrap();
    let kinds: BTreeSet<&str> = docs.iter().map(|(k, _)| k.as_str()).collect();
    for kind in [
        "ConfigMap",
        "Deployment",
        "Service",
        "ServiceAccount",
        "ServiceMonitor",
        "PrometheusRule",
        "PodDisruptionBudget",
        "HorizontalPodAutoscaler",
    ] {
        assert!(kinds.contains(kind), "{kind} missing: {kinds:?}");
    }
    let deployment = doc(&docs, "Deployment");
    for line in [
        "runAsNonRoot: true",
        "readOnlyRootFilesystem: true",
        "allowPrivilegeEscalation: false",
        "- ALL",
        "type: RuntimeDefault",
        "enableServiceLinks: false",
        "path: /live",
        "path: /ready",
        "mountPath: /etc/anomalyd",
        "mountPath: /var/lib/anomalyd/models",
    ] {
        assert!(deployment.lines().any(|l| l.trim() == line), "Deployment lacks {line:?}\n{deployment}");
    }
    assert!(!deployment.contains("replicas:"), "the autoscaler owns the replica count");
    let grace: u64 = field(deployment, "terminationGracePeriodSeconds").parse().unwrap();
    let drain_ms: u64 = deployment
        .split("name: ANOMALYD__SHUTDOWN__DRAIN_TIMEOUT_MS")
        .nth(1)
        .map(|rest| field(rest, "value").trim_matches('"').parse().unwrap())
        .expect("the drain deadline is set from the chart");
    assert!(grace * 1000 > drain_ms, "grace {grace} s, drain {drain_ms} ms");

    let hpa = doc(&docs, "HorizontalPodAutoscaler");
    assert!(
        hpa.contains("- type: External") && hpa.contains("name: anomalyd_kafka_consumer_lag_messages"),
        "scales on consumer lag\n{hpa}"
    );
    assert_eq!(field(hpa.split_once("scaleTargetRef:").unwrap().1, "name"), "ops-anomalyd");
    let monitor = doc(&docs, "ServiceMonitor");
    assert!(monitor.contains("targetLabel: job") && monitor.contains("replacement: anomalyd"), "rules expect job=\"anomalyd\"\n{monitor}");
    assert_eq!(field(monitor, "path"), "/metrics");

    // The PrometheusRule is the promtool-tested rules file, verbatim.
    let rule = doc(&docs, "PrometheusRule");
    let spec: Vec<&str> = rule.split_once("\nspec:\n").unwrap().1.lines().map(|l| l.strip_prefix("  ").unwrap_or(l).trim_end()).collect();
    let shipped = std::fs::read_to_string(repo().join("deploy/prometheus/anomalyd-rules.yml")).unwrap();
    let shipped: Vec<&str> = shipped.lines().map(str::trim_end).collect();
    assert!(spec.ends_with(&shipped), "PrometheusRule differs from deploy/prometheus/anomalyd-rules.yml\n{rule}");

    // The ConfigMap's TOML is a config the daemon accepts (with the chart's environment; the
    // model path points at the local bundle instead of the pod's volume).
    let configmap = doc(&docs, "ConfigMap");
    let toml: Vec<&str> =
        configmap.split_once("anomalyd.toml: |\n").unwrap().1.lines().map(|l| l.strip_prefix("    ").unwrap_or(l)).collect();
    assert!(toml.contains(&"path = \"/var/lib/anomalyd/models/skab-convae\""), "model.path lies on the models volume");
    let dir = temp_dir("helm");
    std::fs::write(dir.join("anomalyd.toml"), toml.join("\n")).unwrap();
    let validate = Command::new(env!("CARGO_BIN_EXE_anomalyd"))
        .args(["validate", "--config", dir.join("anomalyd.toml").to_str().unwrap()])
        .current_dir(repo())
        .env("ANOMALYD__MODEL__PATH", "models/skab-convae")
        .env("ANOMALYD__ADMIN__LISTEN", "0.0.0.0:9187")
        .env("ANOMALYD__SHUTDOWN__DRAIN_TIMEOUT_MS", drain_ms.to_string())
        .output()
        .unwrap();
    assert!(validate.status.success(), "the chart's config: {}", text(&validate));
    assert!(text(&validate).contains("from 1380 windows (holdout))"), "validate names the threshold's sample: {}", text(&validate));

    // A Kafka password from a Secret: mounted as a file that the ConfigMap names, never the value.
    let secret = [
        "kafka.secretProperties.sasl\\.password.secretName=kafka-credentials",
        "kafka.secretProperties.sasl\\.password.key=password",
        "kafka.properties.sasl\\.username=anomalyd",
    ];
    let with_secret = template(&secret).unwrap();
    assert!(with_secret.iter().all(|(k, _)| k != "Secret"), "the chart creates no Secret: it mounts an existing one");
    let configmap = doc(&with_secret, "ConfigMap");
    let file = "/run/secrets/anomalyd/sasl.password";
    assert!(configmap.contains(&format!("\"sasl.password\" = {{ file = \"{file}\" }}")), "{configmap}");
    assert!(configmap.contains("\"sasl.username\" = \"anomalyd\""), "{configmap}");
    let deployment = doc(&with_secret, "Deployment");
    let volume = deployment.split_once("- name: kafka-secrets\n          projected:").expect("a projected Secret volume").1;
    assert_eq!((field(volume, "name"), field(volume, "- key"), field(volume, "path")), ("kafka-credentials", "password", "sasl.password"));
    assert!(deployment.contains("mountPath: /run/secrets/anomalyd"), "{deployment}");
    // The daemon reads that config, with the file where the pod would have it mounted.
    let password = dir.join("kafka-password");
    std::fs::write(&password, "from-the-secret\n").unwrap();
    let toml: Vec<String> = configmap
        .split_once("anomalyd.toml: |\n")
        .unwrap()
        .1
        .lines()
        .map(|l| l.strip_prefix("    ").unwrap_or(l).replace(file, password.to_str().unwrap()))
        .collect();
    std::fs::write(dir.join("secret.toml"), toml.join("\n")).unwrap();
    let validate = Command::new(env!("CARGO_BIN_EXE_anomalyd"))
        .args(["validate", "--config", dir.join("secret.toml").to_str().unwrap()])
        .current_dir(repo())
        .env("ANOMALYD__MODEL__PATH", "models/skab-convae")
        .output()
        .unwrap();
    assert!(validate.status.success(), "the chart's config with a Secret: {}", text(&validate));
    // Its own [kafka.properties] table would be a second one: refused with the way out.
    let twice = template(&[secret[0], secret[1], "config=[kafka.properties]"]).unwrap_err();
    assert!(twice.contains("config has its own [kafka.properties] table"), "{twice}");

    // Defaults: no Prometheus Operator objects, a fixed replica count, bundles copied from the image.
    let plain = template(&[]).unwrap();
    for kind in ["ServiceMonitor", "PrometheusRule", "HorizontalPodAutoscaler"] {
        assert!(plain.iter().all(|(k, _)| k != kind), "{kind} rendered by default");
    }
    let deployment = doc(&plain, "Deployment");
    assert_eq!(field(deployment, "replicas"), "1");
    assert!(deployment.contains("/usr/share/anomalyd/models/."), "{deployment}");

    // Bundles from a volume of one's own: mounted read-only, no copy.
    let pvc = template(&["models.volume.persistentVolumeClaim.claimName=bundles"]).unwrap();
    let deployment = doc(&pvc, "Deployment");
    assert_eq!(field(deployment, "claimName"), "bundles");
    assert!(!deployment.contains("initContainers"), "{deployment}");

    // The grace period follows the drain deadline and may not undercut it.
    let long = template(&["drainTimeoutMs=60000"]).unwrap();
    assert_eq!(field(doc(&long, "Deployment"), "terminationGracePeriodSeconds"), "75");
    let short = template(&["terminationGracePeriodSeconds=10"]).unwrap_err();
    assert!(short.contains("must exceed the drain deadline"), "{short}");
}

// === systemd ===

/// The unit's `Key=` command lines, with the binary, config and main PID replaced.
fn unit_commands(unit: &str, key: &str, config: &Path, pid: u32) -> Vec<Vec<String>> {
    unit.lines()
        .filter_map(|l| l.strip_prefix(&format!("{key}=")))
        .map(|cmd| {
            cmd.split_whitespace()
                .map(|w| match w {
                    "/usr/bin/anomalyd" => env!("CARGO_BIN_EXE_anomalyd").to_string(),
                    "/etc/anomalyd/anomalyd.toml" => config.display().to_string(),
                    "$MAINPID" => pid.to_string(),
                    w => w.to_string(),
                })
                .collect()
        })
        .collect()
}

/// Runs commands one after the other until one fails, as systemd does: the failing one's status.
fn run_like_systemd(commands: &[Vec<String>]) -> Option<std::process::ExitStatus> {
    for c in commands {
        let status = Command::new(&c[0]).args(&c[1..]).current_dir(repo()).stdout(Stdio::null()).stderr(Stdio::null()).status().unwrap();
        if !status.success() {
            return Some(status);
        }
    }
    None
}

#[test]
fn systemd_unit_verifies_and_its_reload_validates_before_signalling() {
    let dir = temp_dir("systemd");
    let unit = std::fs::read_to_string(repo().join("deploy/systemd/anomalyd.service")).unwrap();
    // systemd-analyze checks that the commands exist: point them at the binary under test.
    let path = dir.join("anomalyd.service");
    // With the Kafka password credential in use, as docs/operations.md describes.
    assert!(unit.contains("\n#LoadCredential=kafka-password:/etc/anomalyd/kafka-password\n"), "the credential line is missing");
    let with_credential = unit.replace("#LoadCredential=", "LoadCredential=");
    std::fs::write(&path, with_credential.replace("/usr/bin/anomalyd", env!("CARGO_BIN_EXE_anomalyd"))).unwrap();
    let verify = run("systemd-analyze", &["verify", path.to_str().unwrap()]);
    assert!(verify.status.success() && text(&verify).trim().is_empty(), "systemd-analyze verify: {}", text(&verify));
    let security = run("systemd-analyze", &["security", "--offline=true", "--threshold=20", path.to_str().unwrap()]);
    let report = text(&security);
    let exposure: f64 = report
        .lines()
        .find_map(|l| l.split_once("Overall exposure level for anomalyd.service: "))
        .and_then(|(_, rest)| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("{report}"));
    assert!(security.status.success() && exposure <= 2.0, "exposure {exposure} (0 best, 10 worst)\n{report}");
    for key in ["NoNewPrivileges=yes", "ProtectSystem=strict", "CapabilityBoundingSet=", "User=anomalyd"] {
        assert!(unit.lines().any(|l| l == key), "{key} missing");
    }

    // ExecStartPre and ExecReload as systemd runs them: before the daemon starts, and against it.
    let records = repo().join("contracts/skab-convae/records.csv");
    let config = format!(
        "[source]\npath = \"{}\"\n[admin]\nlisten = \"127.0.0.1:{{port}}\"\n[output]\nsink = \"file\"\npath = \"{{dir}}/alerts.jsonl\"\n",
        records.display()
    );
    // ExecStartPre runs before the daemon, whose port is still free.
    let before = dir.join("before.toml");
    std::fs::write(&before, config.replace("{port}", "0").replace("{dir}", &dir.display().to_string())).unwrap();
    assert_eq!(run_like_systemd(&unit_commands(&unit, "ExecStartPre", &before, 0)), None);
    let d = Daemon::start(&dir, &config);
    let file = dir.join("anomalyd.toml");
    let pid = d.child.id();
    let reload = unit_commands(&unit, "ExecReload", &file, pid);
    assert_eq!(reload.len(), 2);
    assert_eq!(run_like_systemd(&reload), None);
    d.wait_for(|d| d.metric("anomalyd_reloads_total{result=\"ok\"}") == Some(1.0), "the SIGHUP reload");

    // A broken file: validation fails the reload command, so no SIGHUP is sent.
    d.write_config(&format!("{config}[alert_policy]\nfire_hits = 0\n"));
    let failed = run_like_systemd(&reload).expect("systemctl reload fails");
    assert_eq!(failed.code(), Some(2));
    // The daemon's own file watch refuses it as well (within its 1 s poll), and keeps running.
    d.wait_for(|d| d.metric("anomalyd_reloads_total{result=\"error\"}") == Some(1.0), "the file-change reload refused");
    let log = d.stderr();
    assert_eq!(log.matches("trigger=\"SIGHUP\"").count(), 1, "one SIGHUP only\n{log}");
    assert!(metric(&d.metrics(), "anomalyd_ready") == Some(1.0));
    assert_eq!(d.stop(), 0);
}
