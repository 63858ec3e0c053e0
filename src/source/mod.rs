//! Sources: where record lines come from, and the contract they hand to the window stage.
//!
//! - [`lines`]: a file or stdin;
//! - [`kafka`]: a consumer-group member, whose messages carry their [`Origin`];
//! - [`offsets`]: which Kafka offsets are safe to store while windows still hold records;
//! - [`checkpoints`]: where a replay resumes each series, in its stride phase.

pub mod checkpoints;
pub mod kafka;
pub mod lines;
pub mod offsets;

/// Line batches buffered between the source and the window task ...
pub const LINE_QUEUE: usize = 64;
/// ... each of at most this many lines: what the source has at hand, so a quiet stream is not
/// delayed and a busy one crosses the channel (a task wake-up) once per batch, not per line.
pub const MAX_LINE_BATCH: usize = 1024;

/// One line from the source, or why it could not be one.
pub enum Input {
    /// A stream's CSV header line (not a record, not counted as one).
    Header(String),
    /// A record line, with its Kafka position and key when it came from Kafka.
    Line(String, Option<Origin>),
    /// A Kafka message whose payload is not UTF-8 (dead-lettered as it is).
    Undecodable(Vec<u8>, Origin),
    /// Partitions this consumer no longer owns (after the records it read from them).
    Revoked(Vec<(usize, i32)>),
    /// Partitions this consumer now owns (before the records it reads from them).
    Assigned(Vec<(usize, i32)>),
    Bad {
        reason: &'static str,
        detail: String,
    },
}

/// Where a record came from: what to store once it is handled. `topic` indexes [`Topics`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Ack {
    pub topic: usize,
    pub partition: i32,
    pub offset: i64,
}

/// A Kafka message's position and key, as it travels with its payload.
#[derive(Debug, Clone, PartialEq)]
pub struct Origin {
    pub ack: Ack,
    pub key: Option<Vec<u8>>,
}
