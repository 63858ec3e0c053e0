//! Per-series threshold state on disk, so a restart does not send every series back to warm-up.
//!
//! `{state_dir}/thresholds.jsonl`: a header line naming the model the state was learnt with
//! (`model`, `onnx_sha256`, the model's threshold), then one line per series
//! (`{"series": …, "state": …}`). Written to a temporary file and renamed, so a crash leaves the
//! previous file whole. On load, a file for another model or score scale is ignored with a
//! warning (its series start again); a line that does not parse, or parses to a state that does
//! not hold together (an empty ring, a NaN fit), is skipped and counted; a file
//! that is not a state file at all is an error the caller logs before starting without it.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{State, Thresholds};

const FORMAT: &str = "anomalyd-thresholds";
const VERSION: u32 = 1;

/// Whose scores the state was learnt from: state is only valid for the same scale.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Owner {
    pub model: String,
    pub onnx_sha256: String,
    pub score_kind: String,
    /// A digest of the input scaling (`preprocess.columns`).
    pub scaling: String,
}

#[derive(Serialize, Deserialize)]
struct Header {
    format: String,
    version: u32,
    #[serde(flatten)]
    owner: Owner,
    series: usize,
}

#[derive(Serialize, Deserialize)]
struct Line {
    series: String,
    state: State,
}

/// What a load found.
#[derive(Debug, PartialEq)]
pub enum Loaded {
    /// Series restored, and lines skipped because they did not parse.
    Restored { series: usize, skipped: usize },
    /// No file yet.
    Missing,
    /// A state file of another model (or scale): not used.
    Foreign(Owner),
}

pub fn path(dir: &Path) -> PathBuf {
    dir.join("thresholds.jsonl")
}

/// Every series' state at one moment, to be written away from the task that keeps them (at
/// 100,000 series, cloning them took 65 ms and writing them 0.48 s).
pub struct Snapshot(HashMap<String, State>);

impl Snapshot {
    /// Writes the state file; returns the bytes written.
    pub fn write(&self, dir: &Path, owner: &Owner) -> Result<u64, String> {
        write(&self.0, dir, owner)
    }
}

/// The state file of `all`: written to a temporary file, synced, and renamed into place.
fn write(all: &HashMap<String, State>, dir: &Path, owner: &Owner) -> Result<u64, String> {
    let target = path(dir);
    let tmp = dir.join("thresholds.jsonl.tmp");
    let io = |what: &str, p: &Path, e: std::io::Error| format!("{}: cannot {what}: {e}", p.display());
    std::fs::create_dir_all(dir).map_err(|e| io("create the directory", dir, e))?;
    let file = std::fs::File::create(&tmp).map_err(|e| io("create", &tmp, e))?;
    let mut out = BufWriter::new(file);
    let header = Header { format: FORMAT.into(), version: VERSION, owner: owner.clone(), series: all.len() };
    let mut line = |text: String| writeln!(out, "{text}").map_err(|e| io("write", &tmp, e));
    line(serde_json::to_string(&header).expect("headers serialise"))?;
    for (series, state) in all {
        line(serde_json::to_string(&LineRef { series, state }).expect("states serialise"))?;
    }
    let file = out.into_inner().map_err(|e| io("write", &tmp, e.into_error()))?;
    file.sync_all().map_err(|e| io("sync", &tmp, e))?;
    let bytes = file.metadata().map(|m| m.len()).unwrap_or(0);
    std::fs::rename(&tmp, &target).map_err(|e| io("rename into place", &target, e))?;
    Ok(bytes)
}

impl Thresholds {
    /// Writes every series' state; returns the bytes written.
    pub fn save(&self, dir: &Path, owner: &Owner) -> Result<u64, String> {
        write(&self.series, dir, owner)
    }

    /// The state of every series now, for [`Snapshot::write`] on another thread.
    pub fn snapshot(&self) -> Snapshot {
        Snapshot(self.series.clone())
    }

    /// Restores the series of a state file written for `owner`, replacing what is held.
    pub fn load(&mut self, dir: &Path, owner: &Owner) -> Result<Loaded, String> {
        let p = path(dir);
        let file = match std::fs::File::open(&p) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Loaded::Missing),
            Err(e) => return Err(format!("{}: cannot open: {e}", p.display())),
        };
        let mut lines = BufReader::new(file).lines();
        let first = lines.next().transpose().map_err(|e| format!("{}: cannot read: {e}", p.display()))?.unwrap_or_default();
        let header: Header = serde_json::from_str(&first)
            .ok()
            .filter(|h: &Header| h.format == FORMAT)
            .ok_or_else(|| format!("{}: not an anomalyd threshold state file (line 1)", p.display()))?;
        if header.version != VERSION {
            return Err(format!("{}: state format version {} (this anomalyd reads {VERSION})", p.display(), header.version));
        }
        if header.owner != *owner {
            return Ok(Loaded::Foreign(header.owner));
        }
        self.series.clear();
        let mut skipped = 0;
        for line in lines {
            match line.ok().and_then(|l| serde_json::from_str::<Line>(&l).ok()).filter(|l| l.state.is_sound()) {
                Some(Line { series, state }) => {
                    self.series.insert(series, state);
                }
                None => skipped += 1,
            }
        }
        self.warming = self.series.values().filter(|s| matches!(s, State::Warming(_))).count();
        Ok(Loaded::Restored { series: self.series.len(), skipped })
    }
}

#[derive(Serialize)]
struct LineRef<'a> {
    series: &'a str,
    state: &'a State,
}

/// A series' value in the thresholds' changelog topic (keyed by series, written to the number of
/// its input partition): the input topic, whose scale, and the state. A tombstone drops it.
#[derive(Serialize)]
struct ChangeRef<'a> {
    topic: &'a str,
    owner: &'a Owner,
    state: &'a State,
}

#[derive(Deserialize)]
struct Change {
    topic: String,
    owner: Owner,
    state: State,
}

/// A changelog record read back: its key (the series), its partition, its value (`None`: a
/// tombstone).
pub struct Record {
    pub series: String,
    pub partition: i32,
    pub value: Option<Vec<u8>>,
}

/// What a changelog replay found.
#[derive(Debug, Default, PartialEq)]
pub struct Replayed {
    pub restored: usize,
    /// Learnt with another model or scale.
    pub foreign: usize,
    /// Not a state, or one that does not hold together.
    pub corrupt: usize,
}

impl Thresholds {
    /// `series`' changelog value; `None` when it has no state (static mode).
    pub fn change(&self, series: &str, topic: &str, owner: &Owner) -> Option<String> {
        let state = self.series.get(series)?;
        Some(serde_json::to_string(&ChangeRef { topic, owner, state }).expect("states serialise"))
    }

    /// Restores the series of the changelog `records` (the newest of each key; tombstones drop
    /// nothing here) that belong to the input partitions `assigned` (topic name, partition),
    /// replacing what is held for them.
    pub fn replay(&mut self, records: Vec<Record>, assigned: &[(String, i32)], owner: &Owner) -> Replayed {
        let mut found = Replayed::default();
        for Record { series, partition, value } in records {
            let Some(value) = value else { continue };
            match serde_json::from_slice::<Change>(&value) {
                Ok(c) if !assigned.iter().any(|(t, p)| *t == c.topic && *p == partition) => {}
                Ok(c) if c.owner != *owner => found.foreign += 1,
                Ok(c) if c.state.is_sound() => {
                    self.put(series, c.state);
                    found.restored += 1;
                }
                _ => found.corrupt += 1,
            }
        }
        found
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Mode, ModelThreshold, Settings};
    use super::*;

    fn owner() -> Owner {
        Owner { model: "m".into(), onnx_sha256: "abc".into(), score_kind: "reconstruction_mse".into(), scaling: "0123".into() }
    }

    fn learnt() -> Thresholds {
        let settings = Settings { mode: Mode::Spot, warmup_windows: 500, ..Settings::default() };
        let mut t = Thresholds::new(settings, ModelThreshold { threshold: 2.0, tail: None, risk: 1e-3 });
        let choice = t.default_choice();
        for i in 0..2000 {
            t.observe("a", ((i * 7919) % 1000) as f64 / 1000.0, choice);
            t.observe("b", ((i * 104_729) % 1000) as f64 / 100.0, choice);
        }
        t
    }

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("anomalyd-store-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn saved_state_comes_back_the_same() {
        let (t, d) = (learnt(), dir("roundtrip"));
        t.save(&d, &owner()).unwrap();
        let mut back = Thresholds::new(t.settings.clone(), t.model.clone());
        assert_eq!(back.load(&d, &owner()).unwrap(), Loaded::Restored { series: 2, skipped: 0 });
        for s in ["a", "b"] {
            // JSON keeps 17 significant digits; the last may round.
            assert!((back.threshold(s) - t.threshold(s)).abs() <= 1e-12 * t.threshold(s).abs(), "{s}");
        }
        let other = Owner { onnx_sha256: "def".into(), ..owner() };
        assert_eq!(back.load(&d, &other).unwrap(), Loaded::Foreign(owner()));
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_corrupt_file_is_an_error_and_a_corrupt_line_is_skipped() {
        let (t, d) = (learnt(), dir("corrupt"));
        t.save(&d, &owner()).unwrap();
        let text = std::fs::read_to_string(path(&d)).unwrap();
        let mut lines: Vec<&str> = text.lines().collect();
        lines[1] = "{\"series\": \"a\", \"state\": {\"Spot\": 3}}";
        // Parses, but its ring has no room: the next peak would index out of it.
        let hollow = lines[2].replace("\"max\":64", "\"max\":0");
        assert_ne!(hollow, lines[2]);
        lines[2] = &hollow;
        std::fs::write(path(&d), lines.join("\n")).unwrap();
        let mut back = Thresholds::new(t.settings.clone(), t.model.clone());
        assert_eq!(back.load(&d, &owner()).unwrap(), Loaded::Restored { series: 0, skipped: 2 });
        std::fs::write(path(&d), "\u{0}\u{1}garbage").unwrap();
        let e = back.load(&d, &owner()).unwrap_err();
        assert!(e.contains("thresholds.jsonl: not an anomalyd threshold state file"), "{e}");
        std::fs::remove_dir_all(&d).unwrap();
        assert_eq!(back.load(&d, &owner()).unwrap(), Loaded::Missing);
    }
}
