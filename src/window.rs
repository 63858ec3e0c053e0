//! Per-series windows, exactly per docs/model-contract.md §2.
//!
//! Each series moves through this state machine, one record at a time:
//!
//! ```text
//!            record (in order, values resolved)          W-th row of the segment
//!   (new) ─────────────────────────────────▶ Warming ───────────────────────────▶ Full
//!                                               ▲                                   │ every S rows: emit
//!                                               └──── gap > max_gap_secs ───────────┘
//! ```
//!
//! A record is dropped (and the caller counts it) when its event time is not after the last one
//! seen for its series (`out_of_order`), or when a numeric value is missing / NaN / ±inf (or so
//! large that the model cannot score it: `Preprocessor::in_range`) and the NaN policy cannot
//! resolve it (`nan`).
//! The order check uses every record that passed it, the gap check only rows that were kept — the
//! trainer drops duplicate timestamps before the NaN policy, and cuts segments after it.
//!
//! Windows end every S rows counted from the segment's start (the stride phase). A series resumed
//! on a Kafka replay ([`Windower::resume`], from the state a push gave at a record that starts a
//! window) enters Warming with its row count kept, so its windows end on the same rows as before.

use std::collections::HashMap;

use crate::model::{Model, NanPolicy};
use crate::preprocess::Preprocessor;
use crate::record::{RawRecord, Value};

#[derive(Debug, Clone, Copy)]
pub struct WindowSpec {
    /// W
    pub length: usize,
    /// S: a window is emitted after every S-th row once the segment holds W rows.
    pub stride: usize,
    /// 0 = never split.
    pub max_gap_secs: f64,
    pub nan_policy: NanPolicy,
}

impl WindowSpec {
    /// How `model` windows (its W, gap and NaN policy), emitting every `stride`-th window.
    pub fn for_model(model: &Model, stride: usize) -> WindowSpec {
        let w = &model.meta.window;
        WindowSpec { length: model.window_len(), stride, max_gap_secs: w.max_gap_secs, nan_policy: w.nan_policy }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dropped {
    OutOfOrder,
    Nan,
    /// A new series while `max_series` are live: refused rather than evicting a live one.
    SeriesLimit,
}

impl Dropped {
    /// Metric label value.
    pub fn reason(self) -> &'static str {
        match self {
            Dropped::OutOfOrder => "out_of_order",
            Dropped::Nan => "nan",
            Dropped::SeriesLimit => "series_limit",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Outcome {
    /// The record's row is in; no window this time (warming up, or between strides).
    Buffered,
    /// A window ending at this record was appended to the output buffer.
    Window {
        start_ts: f64,
        end_ts: f64,
    },
    Dropped(Dropped),
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Pushed {
    pub outcome: Outcome,
    /// A categorical value unseen in training (the row is kept with that field's one-hot all 0).
    pub unknown_category: bool,
    /// How many of this series' newest records (this one included) a replay must start from so
    /// that the next window is built in this series' stride phase: back to that window's first
    /// row, or (at S > 1, when that row is still to come) to the previous window's first row.
    /// Meaningless for a dropped record, which changes nothing.
    pub held: usize,
    /// When this record is the first row of a window: the series' state just before it, from
    /// which a replay can resume the series here in the same phase ([`Windower::resume_point`]).
    pub start: Option<StartPoint>,
}

/// A series' counters just before a record that starts a window.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StartPoint {
    pub rows_in_segment: u64,
    pub last_seen_ts: f64,
    pub last_kept_ts: f64,
    pub seq: u64,
}

/// What a replay needs to resume a series at a record that starts a window, in the phase the
/// series had: its counters before that record, and its last valid values (for `ffill`; those
/// after the record serve as well, as the record itself sets only the fields it has).
#[derive(Debug, Clone, PartialEq)]
pub struct Resume {
    pub at: StartPoint,
    pub last_valid: Vec<f64>,
}

struct Series {
    /// Ring of the last W scaled rows and their event times; `next` is where the next row goes.
    ring: Vec<f32>,
    times: Vec<f64>,
    next: usize,
    /// Rows in the current segment: their count sets the stride phase.
    rows_in_segment: u64,
    /// Rows of the segment in the ring since it started or the series resumed (a resumed series
    /// counts its rows on, with an empty ring): a window needs W of them.
    filled: u64,
    last_seen_ts: f64,
    last_kept_ts: f64,
    /// Sequence number for inputs without event time.
    seq: u64,
    /// Last finite value of each numeric field, for `ffill`.
    last_valid: Vec<f64>,
}

pub struct Windower {
    spec: WindowSpec,
    pre: Preprocessor,
    max_series: usize,
    series: HashMap<String, Series>,
    /// Live series that have not completed their first window yet.
    warming: usize,
    row: Vec<f32>,
    values: Vec<Value>,
}

impl Windower {
    pub fn new(spec: WindowSpec, pre: Preprocessor) -> Windower {
        Self::with_max_series(spec, pre, usize::MAX)
    }

    pub fn with_max_series(spec: WindowSpec, pre: Preprocessor, max_series: usize) -> Windower {
        let width = pre.width();
        Windower { spec, pre, max_series, series: HashMap::new(), warming: 0, row: vec![0.0; width], values: Vec::new() }
    }

    pub fn spec(&self) -> WindowSpec {
        self.spec
    }

    pub fn live_series(&self) -> usize {
        self.series.len()
    }

    pub fn warming_series(&self) -> usize {
        self.warming
    }

    /// Bytes the window rings hold (what the series cap bounds).
    pub fn window_bytes(&self) -> usize {
        self.series.len() * self.spec.length * (self.pre.width() * 4 + 8)
    }

    /// Drops series whose last record is older than `now_ts - idle_secs`; returns their names.
    pub fn evict_idle(&mut self, now_ts: f64, idle_secs: f64) -> Vec<String> {
        let mut gone = Vec::new();
        self.series.retain(|name, s| {
            let keep = s.last_seen_ts >= now_ts - idle_secs;
            if !keep {
                gone.push(name.clone());
            }
            keep
        });
        self.recount_warming();
        gone
    }

    /// Drops these series' state (their partition went to another consumer).
    pub fn drop_series(&mut self, names: &[String]) {
        for name in names {
            self.series.remove(name);
        }
        self.recount_warming();
    }

    /// Recounted rather than tracked per removal: removals are rare and the count must stay exact.
    fn recount_warming(&mut self) {
        let w = self.spec.length as u64;
        self.warming = self.series.values().filter(|s| s.filled < w).count();
    }

    /// The state to resume `series` from at a record that starts a window, whose `start` this
    /// push returned; `None` if the series is gone.
    pub fn resume_point(&self, series: &str, start: StartPoint) -> Option<Resume> {
        self.series.get(series).map(|s| Resume { at: start, last_valid: s.last_valid.clone() })
    }

    /// Starts `series` from `resume`, in the phase it had: its next record is the first row of a
    /// window. False (and nothing changes) when the series is live, the cap is reached, or the
    /// state is for another model's fields.
    pub fn resume(&mut self, series: &str, resume: &Resume) -> bool {
        let (w, f) = (self.spec.length, self.pre.width());
        if self.series.contains_key(series) || self.series.len() >= self.max_series || resume.last_valid.len() != self.pre.fields().len() {
            return false;
        }
        let at = resume.at;
        let state = Series {
            ring: vec![0.0; w * f],
            times: vec![0.0; w],
            next: 0,
            rows_in_segment: at.rows_in_segment,
            filled: 0,
            last_seen_ts: at.last_seen_ts,
            last_kept_ts: at.last_kept_ts,
            seq: at.seq,
            last_valid: resume.last_valid.clone(),
        };
        self.series.insert(series.to_string(), state);
        self.warming += 1;
        true
    }

    /// Feeds one record; when it completes a window, appends `W × F` f32 (oldest row first) to `out`.
    pub fn push(&mut self, record: &RawRecord, out: &mut Vec<f32>) -> Pushed {
        let (w, f) = (self.spec.length, self.pre.width());
        let n_fields = self.pre.fields().len();
        if !self.series.contains_key(&record.series) {
            if self.series.len() >= self.max_series {
                return Pushed { outcome: Outcome::Dropped(Dropped::SeriesLimit), unknown_category: false, held: 0, start: None };
            }
            self.warming += 1;
        }
        let state = self.series.entry(record.series.clone()).or_insert_with(|| Series {
            ring: vec![0.0; w * f],
            times: vec![0.0; w],
            next: 0,
            rows_in_segment: 0,
            filled: 0,
            last_seen_ts: f64::NEG_INFINITY,
            last_kept_ts: f64::NEG_INFINITY,
            seq: 0,
            last_valid: vec![f64::NAN; n_fields],
        });
        let before = StartPoint {
            rows_in_segment: state.rows_in_segment,
            last_seen_ts: state.last_seen_ts,
            last_kept_ts: state.last_kept_ts,
            seq: state.seq,
        };
        let ts = record.ts.unwrap_or_else(|| {
            state.seq += 1;
            (state.seq - 1) as f64
        });
        let dropped = |d| Pushed { outcome: Outcome::Dropped(d), unknown_category: false, held: 0, start: None };
        if ts <= state.last_seen_ts {
            return dropped(Dropped::OutOfOrder);
        }
        state.last_seen_ts = ts;

        // NaN policy on the raw numeric values (contract §1). Finite values are remembered first:
        // the trainer forward-fills column by column, so a row dropped for one field still feeds
        // later fills of its other fields.
        for (i, v) in record.values.iter().enumerate() {
            if let Value::Num(x) = v {
                if self.pre.in_range(i, *x) {
                    state.last_valid[i] = *x;
                }
            }
        }
        self.values.clear();
        for (i, v) in record.values.iter().enumerate() {
            match v {
                Value::Num(x) if !self.pre.in_range(i, *x) => match self.spec.nan_policy {
                    NanPolicy::Ffill if state.last_valid[i].is_finite() => self.values.push(Value::Num(state.last_valid[i])),
                    _ => return dropped(Dropped::Nan),
                },
                _ => self.values.push(v.clone()),
            }
        }

        if self.spec.max_gap_secs > 0.0 && ts - state.last_kept_ts > self.spec.max_gap_secs {
            if state.filled >= w as u64 {
                self.warming += 1;
            }
            state.rows_in_segment = 0;
            state.filled = 0;
        }
        state.last_kept_ts = ts;

        let unknown_category = self.pre.row(&self.values, &mut self.row);
        state.ring[state.next * f..(state.next + 1) * f].copy_from_slice(&self.row);
        state.times[state.next] = ts;
        state.next = (state.next + 1) % w;
        state.rows_in_segment += 1;
        state.filled += 1;
        if state.filled == w as u64 {
            self.warming -= 1;
        }

        let n = state.rows_in_segment;
        let (w64, s64) = (w as u64, self.spec.stride as u64);
        // Window k holds rows kS+1 ..= kS+W of the segment.
        let start = ((n - 1) % s64 == 0).then_some(before);
        let held = held(n, w64, s64) as usize;
        if state.filled < w64 || (n - w64) % s64 != 0 {
            return Pushed { outcome: Outcome::Buffered, unknown_category, held, start };
        }
        // Oldest row first: the ring from `next` to the end, then from the start to `next`.
        let at = out.len();
        out.extend_from_slice(&state.ring[state.next * f..]);
        out.extend_from_slice(&state.ring[..state.next * f]);
        self.pre.finish_window(&mut out[at..]);
        Pushed { outcome: Outcome::Window { start_ts: state.times[state.next], end_ts: ts }, unknown_category, held, start }
    }
}

/// After row `n` of a segment at W = `w`, S = `s`: how many of its newest rows a replay must
/// start from ([`Pushed::held`]). The next window is the first to end after row n; when its
/// first row is still to come (S > W, or W = 1), the previous window's first row keeps the
/// phase: a replay scores that window again. At S = 1 any row is a window's first, and nothing
/// is held then.
fn held(n: u64, w: u64, s: u64) -> u64 {
    let next = if n < w { 0 } else { (n - w) / s + 1 };
    let first = next * s + 1;
    match (first <= n, s) {
        (true, _) => n - first + 1,
        (false, 1) => 0,
        (false, _) => n - (first - s) + 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ColumnMeta, Transform};

    fn windower(length: usize, stride: usize, gap: f64, nan_policy: NanPolicy) -> Windower {
        let col = ColumnMeta {
            name: "x".into(),
            source: "x".into(),
            transform: Transform::None,
            category: None,
            mean: 0.0,
            std: 1.0,
            window: crate::model::WindowTransform::None,
        };
        Windower::new(WindowSpec { length, stride, max_gap_secs: gap, nan_policy }, Preprocessor::from_columns(&[col]))
    }

    fn rec(series: &str, ts: f64, x: f64) -> RawRecord {
        RawRecord { series: series.into(), ts: Some(ts), values: vec![Value::Num(x)] }
    }

    #[test]
    fn emits_after_w_rows_then_every_stride_oldest_first() {
        let mut w = windower(3, 2, 0.0, NanPolicy::Error);
        let mut out = Vec::new();
        let ends: Vec<_> = (0..8)
            .filter_map(|i| match w.push(&rec("a", i as f64, i as f64), &mut out).outcome {
                Outcome::Window { start_ts, end_ts } => Some((start_ts, end_ts)),
                _ => None,
            })
            .collect();
        assert_eq!(ends, [(0.0, 2.0), (2.0, 4.0), (4.0, 6.0)]);
        assert_eq!(out, [0.0, 1.0, 2.0, 2.0, 3.0, 4.0, 4.0, 5.0, 6.0]);
    }

    #[test]
    fn gaps_restart_the_segment_and_series_are_independent() {
        let mut w = windower(2, 1, 5.0, NanPolicy::Error);
        let mut out = Vec::new();
        let mut outcomes = Vec::new();
        for (s, ts) in [("a", 0.0), ("b", 0.0), ("a", 1.0), ("a", 10.0), ("a", 11.0), ("b", 1.0)] {
            outcomes.push(w.push(&rec(s, ts, ts), &mut out).outcome);
        }
        let windows: Vec<bool> = outcomes.iter().map(|o| matches!(o, Outcome::Window { .. })).collect();
        assert_eq!(windows, [false, false, true, false, true, true]);
        assert_eq!(w.live_series(), 2);
    }

    #[test]
    fn series_cap_refuses_new_series_and_idle_ones_are_evicted() {
        let mut w = Windower::with_max_series(
            WindowSpec { length: 2, stride: 1, max_gap_secs: 0.0, nan_policy: NanPolicy::Error },
            windower(1, 1, 0.0, NanPolicy::Error).pre.clone(),
            2,
        );
        let mut out = Vec::new();
        w.push(&rec("a", 0.0, 0.0), &mut out);
        w.push(&rec("b", 50.0, 0.0), &mut out);
        assert_eq!(w.push(&rec("c", 60.0, 0.0), &mut out).outcome, Outcome::Dropped(Dropped::SeriesLimit));
        assert_eq!((w.live_series(), w.warming_series()), (2, 2));
        w.push(&rec("b", 51.0, 0.0), &mut out);
        assert_eq!(w.warming_series(), 1);
        assert_eq!(w.evict_idle(60.0, 30.0), ["a"]);
        assert_eq!((w.live_series(), w.warming_series()), (1, 0));
        assert!(matches!(w.push(&rec("c", 61.0, 0.0), &mut out).outcome, Outcome::Buffered));
    }

    #[test]
    fn out_of_order_and_nan_records_are_dropped_by_policy() {
        let mut w = windower(1, 1, 0.0, NanPolicy::Ffill);
        let mut out = Vec::new();
        assert_eq!(w.push(&rec("a", 1.0, f64::NAN), &mut out).outcome, Outcome::Dropped(Dropped::Nan));
        assert!(matches!(w.push(&rec("a", 2.0, 4.0), &mut out).outcome, Outcome::Window { .. }));
        assert_eq!(w.push(&rec("a", 2.0, 5.0), &mut out).outcome, Outcome::Dropped(Dropped::OutOfOrder));
        assert!(matches!(w.push(&rec("a", 3.0, f64::INFINITY), &mut out).outcome, Outcome::Window { .. }));
        assert_eq!(out, [4.0, 4.0]);
        let mut strict = windower(1, 1, 0.0, NanPolicy::Drop);
        assert_eq!(strict.push(&rec("a", 1.0, f64::NAN), &mut out).outcome, Outcome::Dropped(Dropped::Nan));
    }

    #[test]
    fn a_row_dropped_for_one_field_still_fills_the_others_like_pandas_ffill() {
        let cols: Vec<ColumnMeta> = ["x", "y"]
            .iter()
            .map(|n| ColumnMeta {
                name: (*n).into(),
                source: (*n).into(),
                transform: Transform::None,
                category: None,
                mean: 0.0,
                std: 1.0,
                window: crate::model::WindowTransform::None,
            })
            .collect();
        let spec = WindowSpec { length: 1, stride: 1, max_gap_secs: 0.0, nan_policy: NanPolicy::Ffill };
        let mut w = Windower::new(spec, Preprocessor::from_columns(&cols));
        let r = |ts: f64, x: f64, y: f64| RawRecord { series: "a".into(), ts: Some(ts), values: vec![Value::Num(x), Value::Num(y)] };
        let mut out = Vec::new();
        assert_eq!(w.push(&r(1.0, f64::NAN, 7.0), &mut out).outcome, Outcome::Dropped(Dropped::Nan));
        assert!(matches!(w.push(&r(2.0, 1.0, f64::NAN), &mut out).outcome, Outcome::Window { .. }));
        assert_eq!(out, [1.0, 7.0]);
    }
}
