//! Hot reload, on SIGHUP or when the config file or the model's `model.json` changes on disk.
//!
//! A reload loads and validates the whole config first, then a new model bundle if the bundle
//! changed (loaded, sessions built and test-run), and only then applies: alert policy and
//! overrides at once, through a watch channel to the alert stage; a new model or threshold
//! through the window stage, which switches at a batch boundary and keeps window state when
//! the new bundle windows and scales the same way. A failed reload changes nothing, is logged
//! once and counted; the file is retried only when it changes again. Settings that need new
//! listeners, sources or workers are reported as needing a restart.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{anyhow, Result};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::config::{AlertRules, Config};
use crate::mapping::field_map;
use crate::model::lifecycle::{build_scorers, publish_model, ModelInUse, ModelSwap};
use crate::model::Model;
use crate::preprocess::Preprocessor;
use crate::record::FieldMap;
use crate::telemetry::metrics::Metrics;

/// How often the config file and the bundle are checked for changes.
const POLL: Duration = Duration::from_secs(1);

pub struct Reloader {
    pub path: Option<PathBuf>,
    pub config: Config,
    /// How the running source reads records (mapping changes need a restart): a new bundle
    /// must read them the same way.
    pub mapping: FieldMap,
    pub model: Arc<ModelInUse>,
    pub env: ort::environment::Environment,
    pub metrics: Arc<Metrics>,
    pub rules: watch::Sender<AlertRules>,
    pub swaps: mpsc::Sender<ModelSwap>,
}

fn modified(path: &std::path::Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

impl Reloader {
    fn stamps(&self) -> (Option<SystemTime>, Option<SystemTime>) {
        (self.path.as_deref().and_then(modified), modified(&self.config.model.path.join("model.json")))
    }

    pub async fn run(mut self, stop: CancellationToken) {
        let mut hup = match signal(SignalKind::hangup()) {
            Ok(s) => s,
            Err(error) => {
                error!(%error, "Cannot listen for SIGHUP; reload on file change only.");
                return;
            }
        };
        let mut seen = self.stamps();
        let mut tick = tokio::time::interval(POLL);
        loop {
            let why = tokio::select! {
                _ = stop.cancelled() => return,
                _ = hup.recv() => "SIGHUP",
                _ = tick.tick() => {
                    let now = self.stamps();
                    if now == seen { continue; }
                    "file change"
                }
            };
            match self.reload().await {
                Ok(summary) => {
                    self.metrics.reloads.with_label_values(&["ok"]).inc();
                    info!(trigger = why, changes = %summary, "Configuration reloaded.");
                }
                Err(error) => {
                    self.metrics.reloads.with_label_values(&["error"]).inc();
                    error!(trigger = why, error = %format!("{error:#}"), "Reload failed; keeping the running configuration and model.");
                }
            }
            seen = self.stamps();
        }
    }

    async fn reload(&mut self) -> Result<String> {
        let new = Config::load(self.path.as_deref())?;
        let old = &self.config;
        let mut changes = Vec::new();
        for (section, same) in [
            ("source", old.source == new.source),
            ("mapping", old.mapping == new.mapping),
            ("windows", old.windows == new.windows),
            ("scoring", old.scoring == new.scoring),
            ("admin", old.admin == new.admin),
            ("output", old.output == new.output),
            ("kafka", old.kafka == new.kafka),
            ("shutdown", old.shutdown == new.shutdown),
        ] {
            if !same {
                warn!(section, "Changed setting takes effect only after a restart.");
            }
        }

        let bundle = Model::load(&new.model.path)?;
        let model_changed = bundle.differs_from(&self.model.model) || new.model.path != old.model.path;
        let in_use = Arc::new(ModelInUse::new(bundle, new.model.threshold));
        let threshold_changed = in_use.threshold != self.model.threshold;
        let scorers = if model_changed {
            let map = field_map(&new, &in_use.model, &Preprocessor::new(&in_use.model.meta))?;
            if map != self.mapping {
                return Err(anyhow!(
                    "model.path: {} reads {}, the running source reads {}; a bundle that reads other fields needs a restart",
                    new.model.path.display(),
                    describe(&map),
                    describe(&self.mapping)
                ));
            }
            // The worker count is a restart setting: the new pool has as many sessions as the old.
            let (env, model, workers) = (self.env.clone(), in_use.model.clone(), old.scoring.workers);
            let scorers = tokio::task::spawn_blocking(move || build_scorers(&env, &model, workers))
                .await
                .map_err(|e| anyhow!("building sessions: {e}"))??;
            Some(scorers)
        } else {
            None
        };

        // Everything is validated: apply.
        if model_changed || threshold_changed {
            self.swaps.send(ModelSwap { model: in_use.clone(), scorers }).await.map_err(|_| anyhow!("the pipeline has stopped"))?;
            publish_model(&self.metrics, Some(&self.model), &in_use);
            changes.push(if model_changed {
                format!("model {} ({})", in_use.model.meta.name, &in_use.model.meta.onnx.sha256[..12])
            } else {
                format!("threshold {}", in_use.threshold)
            });
            self.model = in_use;
        }
        let rules = new.alert_rules(&self.mapping.series);
        if rules != old.alert_rules(&self.mapping.series) {
            self.rules.send_replace(rules);
            changes.push("alert policy".into());
        }
        self.config = new;
        Ok(if changes.is_empty() { "none".into() } else { changes.join(", ") })
    }
}

/// A mapping in a log line: its fields, series fields and time field.
fn describe(map: &FieldMap) -> String {
    let fields: Vec<&str> = map.fields.iter().map(|f| f.name.as_str()).collect();
    format!("fields {fields:?}, series by {:?}, time from {:?}", map.series, map.timestamp.as_ref().map(|t| &t.0))
}
