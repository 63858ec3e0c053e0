//! Window checkpoints: where each series resumes on a Kafka replay, in its stride phase
//! (docs/ARCHITECTURE.md, "Window checkpoints").
//!
//! At S > 1 a series emits a window every S rows counted from its segment's start, and a replay
//! from the partition's stored offset reaches each interleaved series at an arbitrary row of it.
//! So the offset tracker keeps, with each mark, the series' state just before a record that
//! starts a window ([`Resume`]); the newest mark a replay must reach goes to the compacted
//! `kafka.checkpoints_topic` (keyed by series, in the partition of the same number as the
//! series' input) once everything before it is delivered, and before the offsets that pass it
//! are stored. A consumer given a partition reads its checkpoints back, and then per series:
//!
//! - records before the checkpoint's offset are skipped: their windows were delivered;
//! - the record at it resumes the series from the checkpoint, so its windows fall where they fell;
//! - a first record after it means the series started again there (idle eviction, a gap in the
//!   topic): it starts afresh, as it did.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use super::Ack;
use crate::threshold::store::Record;
use crate::window::{Resume, StartPoint, WindowSpec};

const FORMAT: &str = "anomalyd-window-checkpoint";

/// A series' resume point: the record (topic index, partition, offset) that starts its window,
/// and its state just before it.
#[derive(Debug, Clone, PartialEq)]
pub struct Checkpoint {
    pub series: String,
    pub ack: Ack,
    pub resume: Resume,
}

/// The topic's value. Non-finite times and values (a fresh series' −∞, a field never valid) are
/// `null`; W and S are there so that a checkpoint of other windows is not resumed.
#[derive(Serialize, Deserialize)]
struct Value {
    format: String,
    topic: String,
    offset: i64,
    length: usize,
    stride: usize,
    rows_in_segment: u64,
    last_seen_ts: Option<f64>,
    last_kept_ts: Option<f64>,
    seq: u64,
    last_valid: Vec<Option<f64>>,
}

fn finite(x: f64) -> Option<f64> {
    x.is_finite().then_some(x)
}

/// A checkpoint as it goes to the topic: key, partition, value.
#[derive(Debug)]
pub struct Encoded {
    pub series: String,
    pub partition: i32,
    pub value: String,
}

impl Checkpoint {
    /// The checkpoint as it goes to the topic (`topic`: its input topic's name).
    pub fn encode(self, topic: &str, spec: WindowSpec) -> Encoded {
        let at = self.resume.at;
        let value = Value {
            format: FORMAT.into(),
            topic: topic.into(),
            offset: self.ack.offset,
            length: spec.length,
            stride: spec.stride,
            rows_in_segment: at.rows_in_segment,
            last_seen_ts: finite(at.last_seen_ts),
            last_kept_ts: finite(at.last_kept_ts),
            seq: at.seq,
            last_valid: self.resume.last_valid.iter().copied().map(finite).collect(),
        };
        let value = serde_json::to_string(&value).expect("checkpoints serialise");
        Encoded { series: self.series, partition: self.ack.partition, value }
    }
}

/// What a record of a series with a checkpoint does.
#[derive(Debug, PartialEq)]
pub enum Replay {
    /// No checkpoint (or no longer): window it.
    Window,
    /// Before the checkpoint: handled, holds nothing.
    Skip,
    /// The checkpoint's record: resume the series from this, then window it.
    Resume(Resume),
    /// After the checkpoint's record, or from another partition: the series starts afresh.
    Stale,
}

/// What a read of the checkpoints found.
#[derive(Debug, Default, PartialEq)]
pub struct Restored {
    pub checkpoints: usize,
    /// For other windows (W, S) than these.
    pub foreign: usize,
    /// Not a checkpoint.
    pub corrupt: usize,
}

/// The checkpoints of assigned partitions whose series have not reached them yet.
#[derive(Debug, Default)]
pub struct Resumes {
    pending: HashMap<String, Checkpoint>,
}

impl Resumes {
    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// Keeps the checkpoints among `records` (the newest of each key) of the input partitions
    /// `assigned` (topic index, partition; `topic` names an index) written for `spec`.
    pub fn restore(
        &mut self,
        records: Vec<Record>,
        assigned: &[(usize, i32)],
        topic: impl Fn(&str) -> usize,
        spec: WindowSpec,
    ) -> Restored {
        let mut found = Restored::default();
        for Record { series, partition, value } in records {
            let Some(value) = value else { continue };
            let v = match serde_json::from_slice::<Value>(&value) {
                Ok(v) if v.format == FORMAT => v,
                _ => {
                    found.corrupt += 1;
                    continue;
                }
            };
            let ack = Ack { topic: topic(&v.topic), partition, offset: v.offset };
            if !assigned.contains(&(ack.topic, ack.partition)) {
                continue;
            }
            if (v.length, v.stride) != (spec.length, spec.stride) {
                found.foreign += 1;
                continue;
            }
            let time = |t: Option<f64>| t.unwrap_or(f64::NEG_INFINITY);
            let at = StartPoint {
                rows_in_segment: v.rows_in_segment,
                last_seen_ts: time(v.last_seen_ts),
                last_kept_ts: time(v.last_kept_ts),
                seq: v.seq,
            };
            let last_valid = v.last_valid.into_iter().map(|x| x.unwrap_or(f64::NAN)).collect();
            self.pending.insert(series.clone(), Checkpoint { series, ack, resume: Resume { at, last_valid } });
            found.checkpoints += 1;
        }
        found
    }

    /// What `series`' record at `ack` does ([`Replay`]); a checkpoint is used once.
    pub fn at(&mut self, series: &str, ack: Ack) -> Replay {
        let Some(c) = self.pending.get(series) else { return Replay::Window };
        let same_partition = (c.ack.topic, c.ack.partition) == (ack.topic, ack.partition);
        if same_partition && ack.offset < c.ack.offset {
            return Replay::Skip;
        }
        let c = self.pending.remove(series).expect("looked up above");
        if same_partition && ack.offset == c.ack.offset {
            Replay::Resume(c.resume)
        } else {
            Replay::Stale
        }
    }

    /// Partitions went to another consumer: their checkpoints are its to read.
    pub fn revoke(&mut self, partitions: &[(usize, i32)]) {
        self.pending.retain(|_, c| !partitions.contains(&(c.ack.topic, c.ack.partition)));
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::model::{ColumnMeta, NanPolicy, Transform, WindowTransform};
    use crate::preprocess::Preprocessor;
    use crate::record::{RawRecord, Value};
    use crate::source::offsets::OffsetTracker;
    use crate::window::{Outcome, Windower};

    fn windower(length: usize, stride: usize) -> Windower {
        let col = |n: &str| ColumnMeta {
            name: n.into(),
            source: n.into(),
            transform: Transform::None,
            category: None,
            mean: 0.0,
            std: 1.0,
            window: WindowTransform::None,
        };
        let spec = WindowSpec { length, stride, max_gap_secs: 5.0, nan_policy: NanPolicy::Ffill };
        Windower::new(spec, Preprocessor::from_columns(&[col("x"), col("y")]))
    }

    /// 5 series interleaved unevenly on one partition, each with a gap (a new segment) now and
    /// then, a missing value (filled forward) and a record out of order.
    fn records(n: i64) -> Vec<RawRecord> {
        let mut clock = [0.0f64; 5];
        (0..n)
            .map(|offset| {
                let s = ((offset * 3 + offset / 7) % 5) as usize;
                clock[s] += if offset % 97 == s as i64 { 10.0 } else { 1.0 };
                let ts = if offset % 61 == 0 { clock[s] - 0.5 } else { clock[s] };
                let x = if offset % 13 == 0 { f64::NAN } else { offset as f64 };
                RawRecord { series: format!("s{s}"), ts: Some(ts), values: vec![Value::Num(x), Value::Num(-(offset as f64))] }
            })
            .collect()
    }

    /// Each window (series, end time) with its rows, and the offset of the record that ended it.
    type Windows = BTreeMap<(String, u64), (Vec<f32>, i64)>;

    /// Feeds `records` (the first at offset `from`) as the window stage does: the replay rule,
    /// the windower, the offset tracker; `flushed` runs after each record.
    fn run(
        spec: WindowSpec,
        resumes: &mut Resumes,
        records: &[RawRecord],
        from: i64,
        mut flushed: impl FnMut(&mut OffsetTracker),
    ) -> Windows {
        let (mut w, mut t) = (windower(spec.length, spec.stride), OffsetTracker::with_checkpoints());
        let mut windows = Windows::new();
        for (r, offset) in records.iter().zip(from..) {
            let ack = Ack { topic: 0, partition: 0, offset };
            match resumes.at(&r.series, ack) {
                Replay::Skip => {
                    t.dropped(ack);
                    flushed(&mut t);
                    continue;
                }
                Replay::Resume(resume) => assert!(w.resume(&r.series, &resume)),
                Replay::Window | Replay::Stale => {}
            }
            let mut out = Vec::new();
            let pushed = w.push(r, &mut out);
            let resume = || pushed.start.and_then(|s| w.resume_point(&r.series, s));
            match pushed.outcome {
                Outcome::Dropped(_) => t.dropped(ack),
                _ => t.windowed(ack, &r.series, pushed.held, pushed.start.is_some(), resume),
            }
            if let Outcome::Window { end_ts, .. } = pushed.outcome {
                windows.insert((r.series.clone(), end_ts.to_bits()), (out, offset));
            }
            flushed(&mut t);
        }
        windows
    }

    #[test]
    fn a_replay_from_any_crash_scores_every_window_again_and_none_off_phase() {
        let all = records(700);
        for (length, stride) in [(6, 3), (5, 7), (8, 8), (4, 11), (6, 1)] {
            let spec = windower(length, stride).spec();
            // Flushed after every record, as the window stage flushes: the newest checkpoint of
            // each series (what the compacted topic holds), then the offset safe to store.
            let (mut safe, mut topic) = (Vec::new(), Vec::new());
            let mut written: BTreeMap<String, Vec<u8>> = BTreeMap::new();
            let original = run(spec, &mut Resumes::default(), &all, 0, |t| {
                for c in t.checkpoints() {
                    let e = c.encode("metrics", spec);
                    written.insert(e.series, e.value.into_bytes());
                }
                topic.push(written.clone());
                safe.push(t.safe().iter().next().map_or(-1, |(_, o)| o));
            });
            assert!(original.len() > 40, "W {length} S {stride}: {} windows", original.len());
            for crash in 0..all.len() {
                // Checkpoints are written before the offsets they make safe are stored; the
                // stored offset may trail them.
                for lag in [0, 3] {
                    let from = safe[crash.saturating_sub(lag)] + 1;
                    let read =
                        topic[crash].iter().map(|(series, v)| Record { series: series.clone(), partition: 0, value: Some(v.clone()) });
                    let mut resumes = Resumes::default();
                    let found = resumes.restore(read.collect(), &[(0, 0)], |_| 0, spec);
                    assert_eq!((found.corrupt, found.foreign), (0, 0));
                    let replayed = run(spec, &mut resumes, &all[from as usize..], from, |_| {});
                    let context = format!("W {length} S {stride}, crash after record {crash}, replay from {from}");
                    for (key, (rows, _)) in &replayed {
                        assert_eq!(original.get(key).map(|w| &w.0), Some(rows), "{context}: {key:?} is not a window of the run before");
                    }
                    let lost: Vec<_> =
                        original.iter().filter(|(k, (_, end))| *end > crash as i64 && !replayed.contains_key(*k)).map(|(k, _)| k).collect();
                    assert!(lost.is_empty(), "{context}: {} windows never scored, e.g. {:?}", lost.len(), lost[0]);
                }
            }
        }
    }
}
