//! Kafka offsets that are safe to store: per partition, trailing to the oldest record a window
//! still needs (docs/ARCHITECTURE.md, "Kafka offsets").

use std::collections::{BTreeMap, HashMap, VecDeque};

use super::Ack;

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

/// A series keeps the offset of every `MARK_EVERY`-th record it windowed, not of every one: a
/// replay may start up to `MARK_EVERY` − 1 of its records early (their windows are scored
/// again, as at-least-once allows), and a series with W = 64 keeps 5 offsets instead of 63.
const MARK_EVERY: u64 = 16;

/// What a series holds of the input: the partition of its records, and marks from which a
/// replay rebuilds its next window. Producers key by series, so a series' records share a
/// partition; should one move anyway, its rows from the old partition stop being held (the
/// windows spanning both are then not covered by a replay).
#[derive(Debug)]
struct Held {
    partition: (usize, i32),
    /// Records of this series windowed from `partition`.
    rows: u64,
    /// Offsets of its records number `first`, `first + MARK_EVERY`, …; the first mark is at or
    /// before the oldest record the next window needs.
    first: u64,
    marks: VecDeque<i64>,
}

impl Held {
    fn oldest(&self) -> Option<((usize, i32), i64)> {
        self.marks.front().map(|&offset| (self.partition, offset))
    }

    /// Record `offset` was windowed, and the series now needs its newest `held` records.
    fn push(&mut self, offset: i64, held: usize) {
        let n = self.rows;
        self.rows += 1;
        if self.marks.is_empty() {
            self.first = n;
        }
        if n == self.first + self.marks.len() as u64 * MARK_EVERY {
            self.marks.push_back(offset);
        }
        if held == 0 {
            self.marks.clear();
            return;
        }
        let oldest = self.rows.saturating_sub(held as u64);
        while self.marks.len() > 1 && self.first + MARK_EVERY <= oldest {
            self.marks.pop_front();
            self.first += MARK_EVERY;
        }
    }
}

/// What a replay must start from so that every window is scored at least once.
///
/// Committing the newest handled record is not enough: a replay after a crash would start after
/// it, and the first W−1 replayed records of a series could not complete their windows. So per
/// partition the stored offset trails to the oldest record that some series' next window still
/// needs (`Pushed::held`), or up to `MARK_EVERY` − 1 of that series' records before it; with no
/// such record, to the newest handled one.
#[derive(Debug, Default)]
pub struct OffsetTracker {
    held: HashMap<String, Held>,
    /// Per partition: multiset of the series' oldest held offsets.
    oldest: BTreeMap<(usize, i32), BTreeMap<i64, u32>>,
    /// Per partition: the newest handled offset.
    newest: BTreeMap<(usize, i32), i64>,
}

impl OffsetTracker {
    /// A record was dropped (and counted): handled, holds nothing.
    pub fn dropped(&mut self, ack: Ack) {
        let e = self.newest.entry((ack.topic, ack.partition)).or_insert(ack.offset);
        *e = (*e).max(ack.offset);
    }

    /// A record went into its series' window state; the series now needs its newest `held` records.
    pub fn windowed(&mut self, ack: Ack, series: &str, held: usize) {
        self.dropped(ack);
        let partition = (ack.topic, ack.partition);
        // Look up before inserting: a key is allocated once per series, not per record.
        if !self.held.contains_key(series) {
            self.held.insert(series.to_string(), Held { partition, rows: 0, first: 0, marks: VecDeque::new() });
        }
        let h = self.held.get_mut(series).expect("inserted above");
        let before = h.oldest();
        if h.partition != partition {
            (h.partition, h.rows) = (partition, 0);
            h.marks.clear();
        }
        h.push(ack.offset, held);
        let after = h.oldest();
        if before != after {
            self.unhold(before);
            if let Some((p, offset)) = after {
                *self.oldest.entry(p).or_default().entry(offset).or_default() += 1;
            }
        }
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
        t.windowed(ack(0), "a", 1);
        t.windowed(ack(1), "b", 1);
        t.windowed(ack(2), "a", 2);
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
            t.windowed(ack(offset), &series, *held);
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
        t.windowed(at(0, 5), "a", 1);
        t.windowed(at(1, 7), "b", 1);
        t.windowed(at(1, 8), "c", 0); // W = 1: holds no rows, still lives on partition 1
        let mut gone = t.revoke(&[(0, 1)]);
        gone.sort();
        assert_eq!(gone, ["b", "c"]);
        assert_eq!(t.safe().0.keys().collect::<Vec<_>>(), [&(0, 0)], "partition 1 is no longer stored");
        t.windowed(at(1, 3), "b", 1);
        assert_eq!(t.safe().0.get(&(0, 1)), Some(&2), "re-assigned and replayed from 3: b holds 3");
    }
}
