//! Self-observation: Prometheus metrics and log setup.

pub mod logging;
pub mod metrics;

/// At most one warning per this many bad records (or failures) of a kind; the rest are counted,
/// and logged at debug.
pub const LOG_EVERY: u64 = 1000;

/// Counts occurrences of one kind of trouble and says which to log: the first, then one in
/// [`LOG_EVERY`], so a failing disk or a stream of bad records cannot flood the log.
#[derive(Debug, Default)]
pub struct LogEvery(u64);

impl LogEvery {
    /// Counts one; `Some(count so far)` when this one is to be logged at its level (the others
    /// at debug at most).
    pub fn tick(&mut self) -> Option<u64> {
        self.0 += 1;
        Self::due(self.0).then_some(self.0)
    }

    /// Whether the `count`-th occurrence (from 1) is one to log, for counts kept elsewhere (a
    /// metric's counter).
    pub fn due(count: u64) -> bool {
        count % LOG_EVERY == 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logs_the_first_and_then_one_in_log_every() {
        let mut e = LogEvery::default();
        let logged: Vec<u64> = (0..2 * LOG_EVERY + 1).filter_map(|_| e.tick()).collect();
        assert_eq!(logged, [1, LOG_EVERY + 1, 2 * LOG_EVERY + 1]);
    }
}
