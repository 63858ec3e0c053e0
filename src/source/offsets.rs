//! Kafka offsets that are safe to store: per partition, trailing to the oldest record a window
//! still needs (docs/ARCHITECTURE.md, "Kafka offsets").

use std::collections::{BTreeMap, HashMap, VecDeque};

use super::checkpoints::Checkpoint;
use super::Ack;
use crate::window::Resume;

/// Offsets to store, per (topic, partition): the last record whose successors a replay must
/// start from (librdkafka commits the one after it).
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Acks(BTreeMap<(usize, i32), i64>);

impl Acks {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// ((topic, partition), offset to store), in partition order.
    pub fn iter(&self) -> impl Iterator<Item = ((usize, i32), i64)> + '_ {
        self.0.iter().map(|(&p, &o)| (p, o))
    }
}

/// A series keeps the offset of a record that starts one of its windows every `MARK_EVERY` of its
/// records or so (the first start at least that far from the previous mark), not of every one:
/// a replay may start up to `MARK_EVERY` + S − 2 of its records early (their windows are scored
/// again, as at-least-once allows), and a series with W = 64 keeps 5 offsets instead of 63.
const MARK_EVERY: u64 = 16;

/// With window checkpoints, a series' checkpoint is written when its first mark first moves and
/// then every `CHECKPOINT_EVERY` moves (about 64 of its records), and it holds the partition's
/// stored offset at its last written one. Writing at every move cost 20–28% of the throughput at
/// stride 8 and 2,000 series, every 4th 11% (docs/performance.md), for up to 48 more of a
/// series' records in a replay.
const CHECKPOINT_EVERY: u32 = 4;

/// A record that starts a window: where a replay of its series may begin.
#[derive(Debug)]
struct Mark {
    /// Its number among the series' records windowed from the partition.
    row: u64,
    offset: i64,
    /// The series' state just before it, with window checkpoints.
    resume: Option<Box<Resume>>,
}

/// What a series holds of the input: the partition of its records, and marks from which a
/// replay rebuilds its next window. Producers key by series, so a series' records share a
/// partition; should one move anyway, its rows from the old partition stop being held (the
/// windows spanning both are then not covered by a replay).
#[derive(Debug)]
struct Held {
    partition: (usize, i32),
    /// Records of this series windowed from `partition`.
    rows: u64,
    /// The first is at or before the first record of the next window (`Pushed::held`).
    marks: VecDeque<Mark>,
    /// With checkpoints: the offset of the last one taken (where a replay resumes the series,
    /// so the stored offset must not pass it), how often the first mark moved since, and
    /// whether the next one is due.
    checkpoint: Option<i64>,
    moves: u32,
    due: bool,
}

impl Held {
    /// The offset this series holds the partition at: its last checkpoint, or else its first mark.
    fn oldest(&self) -> Option<((usize, i32), i64)> {
        let first = self.marks.front().map(|m| m.offset);
        self.checkpoint.or(first).map(|offset| (self.partition, offset))
    }

    /// Record `offset` was windowed (`start`: it starts a window, and the state to resume from
    /// there), and the series now needs its newest `held` records.
    fn push(&mut self, offset: i64, held: usize, start: Option<impl FnOnce() -> Option<Resume>>) {
        let row = self.rows;
        self.rows += 1;
        if let Some(resume) = start.filter(|_| self.marks.back().is_none_or(|m| row >= m.row + MARK_EVERY)) {
            self.marks.push_back(Mark { row, offset, resume: resume().map(Box::new) });
        }
        if held == 0 {
            // Only at S = 1 and W = 1, where a replay needs no phase.
            self.marks.clear();
            self.checkpoint = None;
            return;
        }
        let oldest = self.rows.saturating_sub(held as u64);
        while self.marks.len() > 1 && self.marks[1].row <= oldest {
            self.marks.pop_front();
        }
    }
}

/// What a replay must start from so that every window is scored at least once.
///
/// Committing the newest handled record is not enough: a replay after a crash would start after
/// it, and the first W−1 replayed records of a series could not complete their windows. So per
/// partition the stored offset trails to the oldest record that some series' next window still
/// needs (`Pushed::held`), or up to `MARK_EVERY` + S − 2 of that series' records before it;
/// with no such record, to the newest handled one. With window checkpoints, each series' first
/// mark is also where its replay resumes ([`super::checkpoints`]), and the stored offset trails
/// to the last checkpoint taken.
#[derive(Debug, Default)]
pub struct OffsetTracker {
    /// Marks keep the state to resume from, and changed first marks become checkpoints.
    checkpoints: bool,
    held: HashMap<String, Held>,
    /// Series whose checkpoint is due ([`OffsetTracker::checkpoints`]).
    due: Vec<String>,
    /// Per partition: multiset of the series' oldest held offsets.
    oldest: BTreeMap<(usize, i32), BTreeMap<i64, u32>>,
    /// Per partition: the newest handled offset.
    newest: BTreeMap<(usize, i32), i64>,
}

impl OffsetTracker {
    /// A tracker whose marks become window checkpoints.
    pub fn with_checkpoints() -> OffsetTracker {
        OffsetTracker { checkpoints: true, ..OffsetTracker::default() }
    }

    /// A record was dropped (and counted): handled, holds nothing.
    pub fn dropped(&mut self, ack: Ack) {
        let e = self.newest.entry((ack.topic, ack.partition)).or_insert(ack.offset);
        *e = (*e).max(ack.offset);
    }

    /// A record went into its series' window state; the series now needs its newest `held`
    /// records. `start`: the record starts a window, and `resume` gives the state to resume
    /// from there (asked for only when it becomes a mark with checkpoints).
    pub fn windowed(&mut self, ack: Ack, series: &str, held: usize, start: bool, resume: impl FnOnce() -> Option<Resume>) {
        self.dropped(ack);
        let partition = (ack.topic, ack.partition);
        // Look up before inserting: a key is allocated once per series, not per record.
        if !self.held.contains_key(series) {
            let h = Held { partition, rows: 0, marks: VecDeque::new(), checkpoint: None, moves: 0, due: false };
            self.held.insert(series.to_string(), h);
        }
        let h = self.held.get_mut(series).expect("inserted above");
        let before = h.oldest();
        if h.partition != partition {
            (h.partition, h.rows, h.checkpoint) = (partition, 0, None);
            h.marks.clear();
        }
        let checkpoints = self.checkpoints;
        let first = h.marks.front().map(|m| m.offset);
        h.push(ack.offset, held, start.then_some(|| resume().filter(|_| checkpoints)));
        if checkpoints && h.marks.front().map(|m| m.offset) != first {
            h.moves += 1;
            if !h.due && (h.checkpoint.is_none() || h.moves >= CHECKPOINT_EVERY) {
                h.due = true;
                self.due.push(series.to_string());
            }
        }
        let after = h.oldest();
        self.rehold(before, after);
    }

    /// A series' hold moved from `before` to `after`.
    fn rehold(&mut self, before: Option<((usize, i32), i64)>, after: Option<((usize, i32), i64)>) {
        if before == after {
            return;
        }
        self.unhold(before);
        if let Some((p, offset)) = after {
            *self.oldest.entry(p).or_default().entry(offset).or_default() += 1;
        }
    }

    /// The checkpoints due, taken at each series' first mark: where its replay resumes. The
    /// stored offset then trails to them, so they are taken before [`OffsetTracker::safe`], and
    /// written before what it gives is stored.
    pub fn checkpoints(&mut self) -> Vec<Checkpoint> {
        let mut out = Vec::new();
        for series in std::mem::take(&mut self.due) {
            let Some(h) = self.held.get_mut(&series).filter(|h| h.due) else { continue };
            h.due = false;
            let Some(Mark { offset, resume: Some(resume), .. }) = h.marks.front() else { continue };
            let before = h.oldest();
            (h.checkpoint, h.moves) = (Some(*offset), 0);
            let ack = Ack { topic: h.partition.0, partition: h.partition.1, offset: *offset };
            out.push(Checkpoint { series, ack, resume: (**resume).clone() });
            let after = h.oldest();
            self.rehold(before, after);
        }
        out
    }

    /// Forgets every series (the windows restart: a reload to other windows).
    pub fn forget_all(&mut self) {
        let all: Vec<String> = self.held.keys().cloned().collect();
        all.iter().for_each(|s| self.forget(s));
    }

    /// A series left (idle eviction): its rows are no longer needed.
    pub fn forget(&mut self, series: &str) {
        if let Some(h) = self.held.remove(series) {
            self.unhold(h.oldest());
        }
    }

    /// Partitions went to another consumer: forgets them, and every series of one of them (its
    /// window state must go too: the new owner rebuilds it). Returns those series.
    pub fn revoke(&mut self, partitions: &[(usize, i32)]) -> Vec<String> {
        let gone: Vec<String> =
            self.held.iter().filter(|(_, h)| partitions.contains(&h.partition)).map(|(series, _)| series.clone()).collect();
        gone.iter().for_each(|s| self.forget(s));
        for p in partitions {
            self.oldest.remove(p);
            self.newest.remove(p);
        }
        gone
    }

    fn unhold(&mut self, oldest: Option<((usize, i32), i64)>) {
        let Some((p, offset)) = oldest else { return };
        if let Some(set) = self.oldest.get_mut(&p) {
            if let Some(n) = set.get_mut(&offset) {
                *n -= 1;
                if *n == 0 {
                    set.remove(&offset);
                }
            }
        }
    }

    /// The offsets that are safe to store now (see the type's docs).
    pub fn safe(&self) -> Acks {
        let mut out = BTreeMap::new();
        for (&part, &newest) in &self.newest {
            let last = match self.oldest.get(&part).and_then(|set| set.keys().next()) {
                Some(&oldest) => oldest - 1,
                None => newest,
            };
            if last >= 0 {
                out.insert(part, last);
            }
        }
        Acks(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ack(offset: i64) -> Ack {
        Ack { topic: 0, partition: 0, offset }
    }

    #[test]
    fn stored_offset_trails_to_the_oldest_row_a_window_still_needs() {
        let mut t = OffsetTracker::default();
        // W = 3: each series needs its last 2 records.
        t.windowed(ack(0), "a", 1, true, || None);
        t.windowed(ack(1), "b", 1, true, || None);
        t.windowed(ack(2), "a", 2, true, || None);
        assert_eq!(t.safe().0.get(&(0, 0)), None, "record 0 is still needed by a: nothing to store");
        t.dropped(ack(3));
        t.forget("a");
        assert_eq!(t.safe().0[&(0, 0)], 0, "b needs 1: replay from 1");
        t.forget("b");
        assert_eq!(t.safe().0[&(0, 0)], 3, "nothing held: everything handled");
    }

    #[test]
    fn stored_offset_is_never_past_a_needed_record_and_at_most_a_mark_before_it() {
        // 7 series interleaved on one partition with W = 40 (39 records held), a gap now and
        // then (the window restarts: fewer held), checked against every record kept exactly.
        let mut t = OffsetTracker::default();
        let mut exact: HashMap<String, VecDeque<i64>> = HashMap::new();
        let mut held_by: HashMap<String, usize> = HashMap::new();
        for offset in 0..5_000i64 {
            let series = format!("s{}", (offset * 5 + offset / 11) % 7);
            let held = held_by.entry(series.clone()).or_default();
            *held = if offset % 401 == 0 { 1 } else { (*held + 1).min(39) };
            t.windowed(ack(offset), &series, *held, true, || None);
            let rows = exact.entry(series).or_default();
            rows.push_back(offset);
            while rows.len() > *held {
                rows.pop_front();
            }
            let oldest_needed = exact.values().filter_map(|r| r.front()).min().copied().unwrap();
            let stored = t.safe().0.get(&(0, 0)).copied().unwrap_or(-1);
            assert!(stored < oldest_needed, "at {offset}: stored {stored} but record {oldest_needed} is still needed");
            // A series' marks are at most MARK_EVERY - 1 of its own records apart; its records are
            // at most 7 x 2 offsets apart here.
            assert!(stored >= oldest_needed - 1 - 14 * MARK_EVERY as i64, "at {offset}: stored {stored} trails {oldest_needed} too far");
        }
    }

    #[test]
    fn a_revoke_drops_the_partitions_series_and_keeps_the_others() {
        let mut t = OffsetTracker::default();
        let at = |partition, offset| Ack { topic: 0, partition, offset };
        t.windowed(at(0, 5), "a", 1, true, || None);
        t.windowed(at(1, 7), "b", 1, true, || None);
        t.windowed(at(1, 8), "c", 0, true, || None); // W = 1: holds no rows, still lives on partition 1
        let mut gone = t.revoke(&[(0, 1)]);
        gone.sort();
        assert_eq!(gone, ["b", "c"]);
        assert_eq!(t.safe().0.keys().collect::<Vec<_>>(), [&(0, 0)], "partition 1 is no longer stored");
        t.windowed(at(1, 3), "b", 1, true, || None);
        assert_eq!(t.safe().0.get(&(0, 1)), Some(&2), "re-assigned and replayed from 3: b holds 3");
    }
}
