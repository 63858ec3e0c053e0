//! Configuration: embedded defaults (config/anomalyd.toml) → the `--config` file → environment
//! variables `ANOMALYD__SECTION__KEY`. Unknown keys are errors, every error names the key, and
//! [`Config::validate`] runs the cross-field checks before any I/O. `[kafka.properties]` values
//! given by file or variable ([`Property`]) are read at load.
//!
//! One file for the whole tree (about 660 lines before its tests): every section is a plain
//! struct whose field docs are the reference, next to the checks across sections.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use globset::{Glob, GlobMatcher};
use serde::Deserialize;
use tracing::warn;

use crate::alert::{Direction, Policy};
use crate::record::LineFormat;
use crate::threshold;

/// The reference file is also the embedded default, so the two cannot drift apart.
pub const DEFAULT_TOML: &str = include_str!("../../config/anomalyd.toml");

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{source_name}: {message}")]
    Load { source_name: String, message: String },
    #[error("{key}: {reason}")]
    Invalid { key: String, reason: String },
}

fn invalid(key: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { key: key.to_string(), reason: reason.into() }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub model: ModelConfig,
    pub source: SourceConfig,
    pub mapping: MappingConfig,
    pub windows: WindowsConfig,
    pub scoring: ScoringConfig,
    /// When a series alerts (`[alert_policy]`; `[alerting]` before, still read with a warning).
    pub alert_policy: Policy,
    /// Per-series thresholds (`[thresholds]`).
    pub thresholds: threshold::Settings,
    #[serde(default)]
    pub alert_overrides: Vec<AlertOverride>,
    /// Where alert events and scores go as JSON lines (`[output]`; `[alerts]` before, still read).
    pub output: OutputConfig,
    pub kafka: KafkaConfig,
    pub admin: AdminConfig,
    pub shutdown: ShutdownConfig,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// Model bundle folder.
    pub path: PathBuf,
    /// Raw-score threshold for anomaly_score 1.0; 0 = the bundle's.
    pub threshold: f64,
}

/// The slowest replay: a record each 1,000 s (a slower one's pacing overflows a `Duration`).
pub const MIN_REPLAY_RATE: f64 = 0.001;

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum SourceKind {
    File,
    Stdin,
    /// A Kafka consumer group; see `[kafka]`.
    Kafka,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum RecordFormat {
    Csv,
    Ndjson,
    /// InfluxDB line protocol.
    Influx,
    /// goflow2 flow records, aggregated into per-host buckets for a flow model.
    Goflow2,
}

impl RecordFormat {
    /// The line format of a record parser; `None` for flows (aggregated before they are records).
    pub fn line_format(self) -> Option<LineFormat> {
        match self {
            RecordFormat::Csv => Some(LineFormat::Csv),
            RecordFormat::Ndjson => Some(LineFormat::Ndjson),
            RecordFormat::Influx => Some(LineFormat::Influx),
            RecordFormat::Goflow2 => None,
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    pub kind: SourceKind,
    pub path: PathBuf,
    pub format: RecordFormat,
    pub csv_delimiter: String,
    pub csv_columns: Vec<String>,
    /// Records per second for replays; 0 = unthrottled, else at least [`MIN_REPLAY_RATE`].
    pub replay_rate_per_sec: f64,
    pub series_name: String,
    /// goflow2: a bucket is scored once flows ending this long after its end have been seen.
    pub flow_lateness_secs: u64,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MappingConfig {
    pub timestamp_field: String,
    pub timestamp_format: String,
    pub series_fields: Vec<String>,
    /// Model source field → record field.
    pub fields: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct WindowsConfig {
    pub stride: usize,
    pub max_series: usize,
    pub idle_timeout_secs: f64,
    /// A record whose series name is longer is refused (`series_name_too_long`).
    pub max_series_name_bytes: usize,
    /// A record dated more than this ahead of the clock is refused (`future_timestamp`); 0 = no limit.
    pub max_future_secs: f64,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ScoringConfig {
    pub workers: usize,
    pub batch_max_windows: usize,
    pub batch_max_wait_ms: u64,
    pub flush_when_idle: bool,
    pub onnxruntime_library: String,
}

impl ScoringConfig {
    pub fn batch_max_wait(&self) -> Duration {
        Duration::from_millis(self.batch_max_wait_ms)
    }
}

/// Replaces the keys it sets for the series it matches: `series` is a glob (`*` any run of
/// characters, `/` included; `?` one; `[...]` a class; `{a,b}` either) on the series key,
/// `labels` globs on the values of the series fields; both must match.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AlertOverride {
    #[serde(default = "match_all")]
    pub series: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    pub min_anomaly_score: Option<f64>,
    pub direction: Option<Direction>,
    pub min_deviation: Option<f64>,
    pub fire_hits: Option<u32>,
    pub fire_windows: Option<u32>,
    pub resolve_after: Option<u32>,
    pub cooldown_secs: Option<f64>,
    /// `[thresholds] mode` for these series.
    pub threshold_mode: Option<threshold::Mode>,
    /// `[thresholds] risk` for these series.
    pub threshold_risk: Option<f64>,
}

fn match_all() -> String {
    "*".into()
}

/// The alert policy and threshold choice in force for each series: `[alert_policy]` and
/// `[thresholds]`, then the first matching `[[alert_overrides]]` entry. Its globs are compiled
/// once, when the rules are made.
#[derive(Debug, Clone)]
pub struct AlertRules {
    pub base: Policy,
    pub thresholds: threshold::Settings,
    pub overrides: Vec<AlertOverride>,
    /// Names of the series fields, whose values (joined with `/`) make the series key.
    pub label_names: Vec<String>,
    matchers: Vec<OverrideMatcher>,
}

/// An override's series glob, and per label glob the label's index in `label_names` (`None`: no
/// such series field, so the override matches nothing).
#[derive(Debug, Clone)]
struct OverrideMatcher {
    series: GlobMatcher,
    labels: Vec<(Option<usize>, GlobMatcher)>,
}

impl PartialEq for AlertRules {
    /// The matchers follow from the overrides.
    fn eq(&self, other: &AlertRules) -> bool {
        (&self.base, &self.thresholds, &self.overrides, &self.label_names)
            == (&other.base, &other.thresholds, &other.overrides, &other.label_names)
    }
}

fn glob(pattern: &str) -> Result<GlobMatcher, globset::Error> {
    Glob::new(pattern).map(|g| g.compile_matcher())
}

impl AlertRules {
    /// `overrides` must have passed [`Config::validate`] (their globs compile).
    fn new(base: Policy, thresholds: threshold::Settings, overrides: Vec<AlertOverride>, label_names: Vec<String>) -> AlertRules {
        let compiled = |p: &str| glob(p).expect("validated: the override's globs compile");
        let matchers = overrides
            .iter()
            .map(|o| {
                let labels = o.labels.iter().map(|(name, p)| (label_names.iter().position(|n| n == name), compiled(p))).collect();
                OverrideMatcher { series: compiled(&o.series), labels }
            })
            .collect();
        AlertRules { base, thresholds, overrides, label_names, matchers }
    }

    pub fn policy_for(&self, series: &str) -> Policy {
        self.for_series(series).policy
    }

    /// One glob match for both the policy and the threshold of a series.
    pub fn for_series(&self, series: &str) -> SeriesRules {
        let values: Vec<&str> = series.splitn(self.label_names.len().max(1), '/').collect();
        let matches = |m: &OverrideMatcher| {
            m.series.is_match(series) && m.labels.iter().all(|(i, g)| i.and_then(|i| values.get(i)).is_some_and(|v| g.is_match(v)))
        };
        let mut rules = SeriesRules { policy: self.base.clone(), threshold_mode: self.thresholds.mode, threshold_risk: None };
        if let Some(i) = self.matchers.iter().position(matches) {
            let o = &self.overrides[i];
            o.apply(&mut rules.policy);
            rules.threshold_mode = o.threshold_mode.unwrap_or(rules.threshold_mode);
            rules.threshold_risk = o.threshold_risk;
        }
        rules
    }
}

/// What [`AlertRules`] say for one series.
pub struct SeriesRules {
    pub policy: Policy,
    pub threshold_mode: threshold::Mode,
    /// An override's risk; `None`: `[thresholds] risk`, or the bundle's.
    pub threshold_risk: Option<f64>,
}

impl AlertOverride {
    fn apply(&self, p: &mut Policy) {
        if let Some(v) = self.min_anomaly_score {
            p.min_anomaly_score = v;
        }
        if let Some(v) = self.direction {
            p.direction = v;
        }
        if let Some(v) = self.min_deviation {
            p.min_deviation = v;
        }
        if let Some(v) = self.fire_hits {
            p.fire_hits = v;
        }
        if let Some(v) = self.fire_windows {
            p.fire_windows = v;
        }
        if let Some(v) = self.resolve_after {
            p.resolve_after = v;
        }
        if let Some(v) = self.cooldown_secs {
            p.cooldown_secs = v;
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    /// bootstrap.servers
    pub brokers: String,
    pub topics: Vec<String>,
    pub group_id: String,
    /// Where a new group starts: "earliest" or "latest".
    pub auto_offset_reset: String,
    /// Records that cannot be parsed or mapped go here with their original bytes; "" = off.
    pub dead_letter_topic: String,
    /// A dead letter's payload is cut to this many bytes (marked in its headers), so it fits the
    /// producer's and the broker's message size limits.
    pub dead_letter_max_bytes: usize,
    /// Every scored window (JSON, keyed by series); "" = off.
    pub scores_topic: String,
    /// Alert events (JSON, keyed by series); "" = off.
    pub alerts_topic: String,
    /// The per-series thresholds' changelog: a compacted topic with at least as many partitions
    /// as the input topics, keyed by series, replayed by the consumer a partition moves to
    /// (docs/thresholds.md); "" = off.
    #[serde(default)]
    pub thresholds_topic: String,
    /// Window checkpoints: a compacted topic with at least as many partitions as the input
    /// topics, keyed by series, from which a replay resumes each series in its stride phase
    /// (docs/ARCHITECTURE.md, "Window checkpoints"); "" = off, and at `windows.stride` > 1 a replay
    /// then places windows anew.
    #[serde(default)]
    pub checkpoints_topic: String,
    /// The message key names the series, instead of `mapping.series_fields`.
    pub series_from_key: bool,
    /// Any librdkafka property (TLS, SASL, timeouts, ...), passed through to consumer and producer:
    /// a string, or `{ file = "PATH" }` / `{ env = "VARIABLE" }` read at load ([`Property`]).
    pub properties: BTreeMap<String, Property>,
}

/// `ANOMALYD__KAFKA__PROPERTIES__SASL.PASSWORD` (or `…__SASL__PASSWORD`) sets `sasl.password`.
/// The config crate cannot: it reads every `.` of a variable's key as a level of nesting, so the
/// value would land in a table `sasl = { password = … }` where a string is expected.
const PROPERTY_ENV_PREFIX: &str = "ANOMALYD__KAFKA__PROPERTIES__";

/// A `[kafka.properties]` value: a string in the config, or read when the config is loaded from
/// a file (`{ file = "/run/secrets/kafka-password" }`, without its trailing newline) or an
/// environment variable (`{ env = "KAFKA_PASSWORD" }`), so that a secret need not sit in the
/// config. Neither `Debug` nor any error prints a value.
#[derive(Clone, PartialEq, Eq)]
pub struct Property {
    from: PropertySource,
    /// What librdkafka gets; for a file or a variable, read by [`Config::load`].
    value: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum PropertySource {
    Inline,
    File(PathBuf),
    Env(String),
}

impl Property {
    pub fn value(&self) -> &str {
        &self.value
    }

    fn inline(value: String) -> Property {
        Property { from: PropertySource::Inline, value }
    }

    /// Reads the value of a file or a variable from `env`; errors name `key` and where it was
    /// looked for, never what was found.
    fn resolve(&mut self, key: &str, env: &BTreeMap<String, String>) -> Result<(), ConfigError> {
        let key = format!("kafka.properties.{key}");
        self.value = match &self.from {
            PropertySource::Inline => return Ok(()),
            PropertySource::File(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| invalid(&key, format!("cannot read {}: {e}", path.display())))?;
                let value = text.strip_suffix('\n').map(|v| v.strip_suffix('\r').unwrap_or(v)).unwrap_or(&text);
                if value.is_empty() {
                    return Err(invalid(&key, format!("{} is empty", path.display())));
                }
                value.to_string()
            }
            PropertySource::Env(name) => {
                env.get(name).cloned().ok_or_else(|| invalid(&key, format!("environment variable {name} is not set")))?
            }
        };
        Ok(())
    }
}

impl std::fmt::Debug for Property {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.from {
            PropertySource::Inline => f.write_str("<value>"),
            PropertySource::File(path) => write!(f, "{{ file = {path:?} }}"),
            PropertySource::Env(name) => write!(f, "{{ env = {name:?} }}"),
        }
    }
}

impl<'de> Deserialize<'de> for Property {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Property, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = Property;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a string, { file = \"PATH\" } or { env = \"VARIABLE\" }")
            }

            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Property, E> {
                Ok(Property::inline(v.to_string()))
            }

            fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<Property, E> {
                Ok(Property::inline(v.to_string()))
            }

            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Property, E> {
                Ok(Property::inline(v.to_string()))
            }

            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Property, E> {
                Ok(Property::inline(v.to_string()))
            }

            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Property, E> {
                Ok(Property::inline(v.to_string()))
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Property, A::Error> {
                let from = match map.next_key::<String>()?.as_deref() {
                    Some("file") => PropertySource::File(map.next_value()?),
                    Some("env") => PropertySource::Env(map.next_value()?),
                    Some(other) => return Err(serde::de::Error::unknown_field(other, &["file", "env"])),
                    None => return Err(serde::de::Error::invalid_length(0, &self)),
                };
                if map.next_key::<String>()?.is_some() {
                    return Err(serde::de::Error::invalid_length(2, &self));
                }
                Ok(Property { from, value: String::new() })
            }
        }
        deserializer.deserialize_any(Visit)
    }
}

impl KafkaConfig {
    /// Applies the `ANOMALYD__KAFKA__PROPERTIES__*` overrides of `env`, then reads the values
    /// given by file or variable.
    fn resolve_properties(&mut self, env: &BTreeMap<String, String>) -> Result<(), ConfigError> {
        for (name, value) in env {
            if let Some(key) = name.strip_prefix(PROPERTY_ENV_PREFIX) {
                self.properties.insert(key.replace("__", ".").to_lowercase(), Property::inline(value.clone()));
            }
        }
        for (key, property) in &mut self.properties {
            property.resolve(key, env)?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum SinkKind {
    Stdout,
    File,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct OutputConfig {
    pub sink: SinkKind,
    pub path: PathBuf,
    /// Every scored window as a JSON line (series, window end, raw and normalised score); "" = off.
    pub scores_path: PathBuf,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    pub listen: SocketAddr,
    pub max_series_metrics: usize,
    /// A connection must send each request head (line and headers) within this, or it is
    /// closed: the first one, and the next one on a kept-alive connection.
    pub header_read_timeout_ms: u64,
    /// Open connections at most; at the cap a new one takes the place of the oldest one not
    /// inside a request, or is closed at once (src/admin.rs).
    pub max_connections: usize,
    /// A request head (line and headers) over this is answered 431.
    pub max_request_head_bytes: usize,
}

impl AdminConfig {
    pub fn header_read_timeout(&self) -> Duration {
        Duration::from_millis(self.header_read_timeout_ms)
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ShutdownConfig {
    pub drain_timeout_ms: u64,
}

impl ShutdownConfig {
    pub fn drain_timeout(&self) -> Duration {
        Duration::from_millis(self.drain_timeout_ms)
    }
}

/// Sections renamed for readers, (old, new): `[alerting]` held the policy and `[alerts]` the
/// outputs, one letter apart. The old names are read as the new ones, with a warning.
const RENAMED_SECTIONS: [(&str, &str); 2] = [("alerting", "alert_policy"), ("alerts", "output")];

/// The config text with the old section headers renamed (`[alerting]`, `[alerts.x]`, …).
fn renamed_sections(text: &str, source: &str) -> String {
    let rename = |line: &str| -> Option<String> {
        let header = line.trim_start().strip_prefix('[').filter(|h| !h.starts_with('['))?;
        let name = header.trim_start();
        RENAMED_SECTIONS.iter().find_map(|(old, new)| {
            let rest = name.strip_prefix(old).filter(|r| r.trim_start().starts_with([']', '.']))?;
            warn!(file = source, section = old, now = new, "Deprecated config section name; read as the new one.");
            Some(format!("[{new}{rest}"))
        })
    };
    text.lines().map(|line| rename(line).unwrap_or_else(|| line.to_string())).collect::<Vec<_>>().join("\n")
}

/// `ANOMALYD__ALERTING__X` → `ANOMALYD__ALERT_POLICY__X`, and so on, with a warning.
fn renamed_env_key(key: &str) -> String {
    for (old, new) in RENAMED_SECTIONS {
        let prefix = format!("ANOMALYD__{}__", old.to_uppercase());
        if let Some(rest) = key.strip_prefix(&prefix) {
            let renamed = format!("ANOMALYD__{}__{rest}", new.to_uppercase());
            warn!(variable = key, now = %renamed, "Deprecated environment variable; read as the new one.");
            return renamed;
        }
    }
    key.to_string()
}

/// A TOML syntax error as "line L, column C: what is wrong". Not the parser's own message, which
/// quotes the line, and so a password on it.
fn check_syntax(text: &str) -> Result<(), String> {
    let error = match toml::de::DeTable::parse(text) {
        Ok(_) => return Ok(()),
        Err(error) => error,
    };
    let at = error.span().map_or(0, |s| s.start).min(text.len());
    let before = text.get(..at).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().unwrap_or("").chars().count() + 1;
    Err(format!("TOML syntax error at line {line}, column {column}: {}", error.message().trim_end()))
}

impl Config {
    /// `label_names`: the series fields in force (the mapping's, or the bundle's series columns).
    pub fn alert_rules(&self, label_names: &[String]) -> AlertRules {
        AlertRules::new(self.alert_policy.clone(), self.thresholds.clone(), self.alert_overrides.clone(), label_names.to_vec())
    }

    /// Defaults ← file ← environment (`ANOMALYD__SECTION__KEY`), then [`Config::validate`].
    pub fn load(file: Option<&Path>) -> Result<Config, ConfigError> {
        Self::load_with_env(file, std::env::vars())
    }

    /// As [`Config::load`], with the environment given (tests).
    pub fn load_with_env(file: Option<&Path>, env: impl IntoIterator<Item = (String, String)>) -> Result<Config, ConfigError> {
        let env: BTreeMap<String, String> = env.into_iter().map(|(k, v)| (renamed_env_key(&k), v)).collect();
        let mut builder = config::Config::builder().add_source(config::File::from_str(DEFAULT_TOML, config::FileFormat::Toml));
        let mut name = "defaults".to_string();
        if let Some(path) = file {
            name = path.display().to_string();
            let text = std::fs::read_to_string(path)
                .map_err(|e| ConfigError::Load { source_name: name.clone(), message: format!("cannot read: {e}") })?;
            let text = renamed_sections(&text, &name);
            check_syntax(&text).map_err(|message| ConfigError::Load { source_name: name.clone(), message })?;
            builder = builder.add_source(config::File::from_str(&text, config::FileFormat::Toml));
        }
        let settings: config::Map<String, String> = env
            .iter()
            .filter(|(k, _)| k.starts_with("ANOMALYD__") && !k.starts_with(PROPERTY_ENV_PREFIX))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        if env.keys().any(|k| k.starts_with("ANOMALYD__")) {
            name = format!("{name} + environment");
        }
        builder = builder.add_source(
            config::Environment::with_prefix("ANOMALYD")
                .prefix_separator("__")
                .separator("__")
                .try_parsing(true)
                .list_separator(",")
                .with_list_parse_key("mapping.series_fields")
                .with_list_parse_key("source.csv_columns")
                .source(Some(settings)),
        );
        let load = |e: config::ConfigError| ConfigError::Load { source_name: name.clone(), message: e.to_string() };
        let mut cfg: Config = builder.build().map_err(load)?.try_deserialize().map_err(load)?;
        cfg.kafka.resolve_properties(&env)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Cross-field checks; the error names the key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.model.path.as_os_str().is_empty() {
            return Err(invalid("model.path", "is empty"));
        }
        if !(self.model.threshold.is_finite() && self.model.threshold >= 0.0) {
            return Err(invalid("model.threshold", "must be a number >= 0 (0 = the bundle's)"));
        }
        if self.source.kind == SourceKind::File && self.source.path.as_os_str().is_empty() {
            return Err(invalid("source.path", "is empty but source.kind is \"file\""));
        }
        if self.source.kind == SourceKind::Kafka {
            if self.kafka.topics.is_empty() {
                return Err(invalid("kafka.topics", "name at least one topic"));
            }
            if !matches!(self.kafka.auto_offset_reset.as_str(), "earliest" | "latest") {
                return Err(invalid("kafka.auto_offset_reset", "must be \"earliest\" or \"latest\""));
            }
            for key in ["enable.auto.commit", "enable.auto.offset.store", "group.id", "bootstrap.servers"] {
                if self.kafka.properties.contains_key(key) {
                    return Err(invalid(&format!("kafka.properties.{key}"), "is managed by anomalyd (offsets follow scoring)"));
                }
            }
            if self.source.format == RecordFormat::Csv && self.source.csv_columns.is_empty() {
                return Err(invalid("source.csv_columns", "CSV from Kafka has no header line: name the columns"));
            }
            if self.kafka.series_from_key && self.source.format == RecordFormat::Goflow2 {
                return Err(invalid("kafka.series_from_key", "flow records name their host: series come from the flows"));
            }
            if self.kafka.series_from_key && !self.mapping.series_fields.is_empty() {
                return Err(invalid("kafka.series_from_key", "conflicts with mapping.series_fields: choose one"));
            }
        }
        if self.source.csv_delimiter.len() != 1 || !self.source.csv_delimiter.is_ascii() {
            return Err(invalid("source.csv_delimiter", "must be exactly one ASCII character"));
        }
        let rate = self.source.replay_rate_per_sec;
        if !(rate == 0.0 || (rate.is_finite() && rate >= MIN_REPLAY_RATE)) {
            return Err(invalid(
                "source.replay_rate_per_sec",
                format!("must be 0 (unthrottled) or from {MIN_REPLAY_RATE} to a finite rate, not {rate}"),
            ));
        }
        if self.kafka.dead_letter_max_bytes == 0 {
            return Err(invalid("kafka.dead_letter_max_bytes", "must be >= 1"));
        }
        if self.windows.max_series_name_bytes == 0 {
            return Err(invalid("windows.max_series_name_bytes", "must be >= 1"));
        }
        if !(self.windows.max_future_secs.is_finite() && self.windows.max_future_secs >= 0.0) {
            return Err(invalid("windows.max_future_secs", "must be >= 0 (0 = no limit)"));
        }
        if self.windows.stride == 0 {
            return Err(invalid("windows.stride", "must be >= 1"));
        }
        if self.windows.max_series == 0 {
            return Err(invalid("windows.max_series", "must be >= 1"));
        }
        if !(self.windows.idle_timeout_secs.is_finite() && self.windows.idle_timeout_secs > 0.0) {
            return Err(invalid("windows.idle_timeout_secs", "must be > 0"));
        }
        if self.scoring.workers == 0 || self.scoring.workers > 64 {
            return Err(invalid("scoring.workers", "must be between 1 and 64"));
        }
        if self.scoring.batch_max_windows == 0 {
            return Err(invalid("scoring.batch_max_windows", "must be >= 1"));
        }
        self.alert_policy.validate().map_err(|e| invalid("alert_policy", e))?;
        self.thresholds.validate().map_err(|e| invalid("thresholds", e))?;
        for (i, o) in self.alert_overrides.iter().enumerate() {
            for (key, pattern) in
                std::iter::once(("series".to_string(), &o.series)).chain(o.labels.iter().map(|(k, v)| (format!("labels.{k}"), v)))
            {
                glob(pattern).map_err(|e| invalid(&format!("alert_overrides[{i}].{key}"), e.kind().to_string()))?;
            }
            let mut p = self.alert_policy.clone();
            o.apply(&mut p);
            p.validate().map_err(|e| invalid(&format!("alert_overrides[{i}] (series = {:?})", o.series), e))?;
            let mut t = self.thresholds.clone();
            t.risk = o.threshold_risk.unwrap_or(t.risk);
            t.validate().map_err(|e| invalid(&format!("alert_overrides[{i}].threshold_risk"), e))?;
        }
        if self.output.sink == SinkKind::File && self.output.path.as_os_str().is_empty() {
            return Err(invalid("output.path", "is empty but output.sink is \"file\""));
        }
        if self.admin.header_read_timeout_ms == 0 {
            return Err(invalid("admin.header_read_timeout_ms", "must be > 0"));
        }
        if self.admin.max_connections == 0 {
            return Err(invalid("admin.max_connections", "must be >= 1"));
        }
        if !(1024..=1 << 20).contains(&self.admin.max_request_head_bytes) {
            return Err(invalid("admin.max_request_head_bytes", "must be between 1024 and 1048576"));
        }
        if self.shutdown.drain_timeout_ms == 0 {
            return Err(invalid("shutdown.drain_timeout_ms", "must be > 0"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(toml: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let path = std::env::temp_dir().join(format!("anomalyd-cfg-{}-{}.toml", std::process::id(), toml.len()));
        std::fs::write(&path, toml).unwrap();
        let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string()));
        let out = Config::load_with_env(Some(&path), env);
        let _ = std::fs::remove_file(path);
        out
    }

    #[test]
    fn embedded_default_deserialises_and_validates() {
        let cfg = Config::load_with_env(None, []).unwrap();
        assert_eq!(cfg.scoring.workers, 2);
        assert_eq!(cfg.alert_policy, Policy::default());
    }

    #[test]
    fn file_then_environment_override_defaults() {
        let cfg = load("[scoring]\nworkers = 3\n[mapping]\nseries_fields = [\"host\"]\n", &[("ANOMALYD__SCORING__WORKERS", "4")]).unwrap();
        assert_eq!(cfg.scoring.workers, 4);
        assert_eq!(cfg.mapping.series_fields, ["host"]);
    }

    #[test]
    fn unknown_keys_and_wrong_types_name_the_key() {
        let e = load("[scoring]\nworkerz = 3\n", &[]).unwrap_err().to_string();
        assert!(e.contains("workerz"), "{e}");
        let e = load("[scoring]\nworkers = \"many\"\n", &[]).unwrap_err().to_string();
        assert!(e.contains("workers"), "{e}");
        let e = load("[alert_policy]\nfire_hits = 5\nfire_windows = 3\n", &[]).unwrap_err().to_string();
        assert!(e.starts_with("alert_policy:") && e.contains("fire_hits"), "{e}");
        let e = load("[[alert_overrides]]\nseries = \"db-*\"\nresolve_after = 0\n", &[]).unwrap_err().to_string();
        assert!(e.contains("alert_overrides[0]"), "{e}");
    }

    #[test]
    fn overrides_apply_to_matching_series_only() {
        let cfg = load("[[alert_overrides]]\nseries = \"db-*/eth?\"\nmin_anomaly_score = 2.5\n", &[]).unwrap();
        let rules = cfg.alert_rules(&[]);
        assert_eq!(rules.policy_for("db-1/eth0").min_anomaly_score, 2.5);
        assert_eq!(rules.policy_for("web-1/eth0").min_anomaly_score, 1.0);
        let cfg = load("[[alert_overrides]]\nlabels = { dc = \"eu-*\" }\nfire_hits = 2\nfire_windows = 3\n", &[]).unwrap();
        let rules = cfg.alert_rules(&["host".into(), "dc".into()]);
        assert_eq!(rules.policy_for("db-1/eu-west").fire_hits, 2);
        assert_eq!(rules.policy_for("db-1/us-east").fire_hits, 1);
        assert_eq!(cfg.alert_rules(&["host".into()]).policy_for("db-1").fire_hits, 1, "no such label: no match");
        let cfg = load("[[alert_overrides]]\nseries = \"a?c\"\nfire_hits = 2\nfire_windows = 3\n", &[]).unwrap();
        let rules = cfg.alert_rules(&[]);
        assert_eq!((rules.policy_for("abc").fire_hits, rules.policy_for("abbc").fire_hits), (2, 1), "? is one character");
        let e = load("[[alert_overrides]]\nlabels = { dc = \"eu-[\" }\nfire_hits = 2\nfire_windows = 3\n", &[]).unwrap_err().to_string();
        assert!(e.starts_with("alert_overrides[0].labels.dc:") && e.contains("unclosed character class"), "{e}");
    }

    #[test]
    fn kafka_properties_come_from_the_file_a_variable_or_an_override_and_debug_prints_none() {
        let secret = std::env::temp_dir().join(format!("anomalyd-cfg-secret-{}", std::process::id()));
        std::fs::write(&secret, "from-file\r\n").unwrap();
        let toml = format!(
            "[kafka.properties]\n\"a\" = \"inline\"\n\"b\" = {{ file = \"{}\" }}\n\"c\" = {{ env = \"C_VALUE\" }}\n\"d\" = 5\n",
            secret.display()
        );
        let cfg = load(&toml, &[("C_VALUE", "from-env"), ("ANOMALYD__KAFKA__PROPERTIES__SASL__PASSWORD", "from-override")]).unwrap();
        let _ = std::fs::remove_file(&secret);
        let values: Vec<(&str, &str)> = cfg.kafka.properties.iter().map(|(k, v)| (k.as_str(), v.value())).collect();
        assert_eq!(values, [("a", "inline"), ("b", "from-file"), ("c", "from-env"), ("d", "5"), ("sasl.password", "from-override")]);
        let debug = format!("{cfg:?}");
        assert!(["inline", "from-file", "from-env", "from-override"].iter().all(|v| !debug.contains(v)), "{debug}");
        assert!(debug.contains("C_VALUE"), "{debug}");

        let e = load("[kafka.properties]\n\"x\" = { fil = \"/a\" }\n", &[]).unwrap_err().to_string();
        assert!(e.contains("fil") && e.contains("kafka.properties"), "{e}");
        let e = load("[kafka.properties]\n\"x\" = { env = \"NOT_SET_ANYWHERE\" }\n", &[]).unwrap_err().to_string();
        assert_eq!(e, "kafka.properties.x: environment variable NOT_SET_ANYWHERE is not set");
    }

    #[test]
    fn toml_syntax_errors_name_line_and_column_but_quote_nothing() {
        for toml in [
            "[kafka.properties]\n\"sasl.password\" = \"hunter2\n",
            "[kafka.properties]\n\"sasl.password\" = hunter2\n",
            "[kafka.properties]\n\"sasl.password\" = \"hunter2\" hunter3\n",
            "[kafka.properties]\n\"sasl.password\" = \"hunt\\qer2\"\n",
        ] {
            let e = load(toml, &[]).unwrap_err().to_string();
            assert!(e.contains("TOML syntax error at line 2, column ") && !e.contains("hunt"), "{e}");
        }
    }

    #[test]
    fn a_non_ascii_csv_delimiter_is_refused() {
        let e = load("[source]\ncsv_delimiter = \"§\"\n", &[]).unwrap_err().to_string();
        assert!(e.starts_with("source.csv_delimiter:") && e.contains("ASCII"), "{e}");
    }

    #[test]
    fn a_replay_rate_too_slow_to_pace_is_refused() {
        for rate in ["1e-300", "-1", "inf", "nan"] {
            let e = load(&format!("[source]\nreplay_rate_per_sec = {rate}\n"), &[]).unwrap_err().to_string();
            assert!(e.starts_with("source.replay_rate_per_sec:"), "{e}");
        }
        assert_eq!(load("[source]\nreplay_rate_per_sec = 0.001\n", &[]).unwrap().source.replay_rate_per_sec, 0.001);
    }

    #[test]
    fn the_old_section_names_still_read_as_the_new_ones() {
        let cfg = load("[alerting]\nfire_hits = 2\nfire_windows = 3\n[alerts]\nsink = \"file\"\npath = \"/tmp/a.jsonl\"\n", &[]).unwrap();
        assert_eq!((cfg.alert_policy.fire_hits, cfg.output.sink, cfg.output.path.to_str()), (2, SinkKind::File, Some("/tmp/a.jsonl")));
        let cfg = load("", &[("ANOMALYD__ALERTING__RESOLVE_AFTER", "7"), ("ANOMALYD__ALERTS__SCORES_PATH", "/tmp/s")]).unwrap();
        assert_eq!((cfg.alert_policy.resolve_after, cfg.output.scores_path.to_str()), (7, Some("/tmp/s")));
        // Only section headers: a key or a table that merely starts with the old name is left alone.
        assert_eq!(
            renamed_sections("[alerts_extra]\n[[alert_overrides]]\nalerts = 1", "f"),
            "[alerts_extra]\n[[alert_overrides]]\nalerts = 1"
        );
        assert_eq!(renamed_sections("  [ alerting ]  # policy", "f"), "[alert_policy ]  # policy");
    }
}
