//! File and stdin: lines read in batches, each at most `MAX_LINE_BYTES`, optionally paced.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncRead, BufReader};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

use super::{Input, MAX_LINE_BATCH};
use crate::record::{line_text, MAX_LINE_BYTES};
use crate::telemetry::metrics::Metrics;

/// Reads one line of at most `MAX_LINE_BYTES`: a longer one is skipped to its end without being
/// held in memory, so a runaway producer cannot exhaust it. `None` at EOF.
async fn read_line<R: AsyncBufRead + Unpin>(reader: &mut R, buf: &mut Vec<u8>) -> std::io::Result<Option<Input>> {
    buf.clear();
    let mut skipped = 0usize;
    loop {
        let chunk = reader.fill_buf().await?;
        if chunk.is_empty() {
            return Ok(match (buf.is_empty(), skipped) {
                (true, 0) => None,
                _ => Some(finish_line(buf, skipped)),
            });
        }
        let (part, done) = match chunk.iter().position(|&b| b == b'\n') {
            Some(i) => (&chunk[..i], Some(i + 1)),
            None => (chunk, None),
        };
        if skipped > 0 || buf.len() + part.len() > MAX_LINE_BYTES {
            skipped += buf.len() + part.len();
            buf.clear();
        } else {
            buf.extend_from_slice(part);
        }
        let used = done.unwrap_or(chunk.len());
        reader.consume(used);
        if done.is_some() {
            return Ok(Some(finish_line(buf, skipped)));
        }
    }
}

fn finish_line(buf: &mut Vec<u8>, skipped: usize) -> Input {
    if skipped > 0 {
        return Input::Bad { reason: "too_long", detail: format!("line of {skipped} bytes or more") };
    }
    match line_text(std::mem::take(buf)) {
        Ok(line) => Input::Line(line, None),
        Err(e) => Input::Bad { reason: e.reason(), detail: e.to_string() },
    }
}

/// Reads lines from the file or stdin, paced by `replay_rate_per_sec`, until EOF or cancellation.
/// Lines go in batches of what is already buffered (at most [`MAX_LINE_BATCH`]); paced, one by one.
pub async fn read_source<R: AsyncRead + Unpin>(
    mut reader: BufReader<R>,
    mut header_next: bool,
    rate: f64,
    tx: mpsc::Sender<Vec<Input>>,
    stop: CancellationToken,
    metrics: Arc<Metrics>,
) {
    let started = Instant::now();
    let mut n = 0u64;
    let mut buf = Vec::new();
    let mut batch = Vec::new();
    loop {
        let due = !batch.is_empty() && (reader.buffer().is_empty() || batch.len() >= MAX_LINE_BATCH || rate > 0.0);
        if due && tx.send(std::mem::take(&mut batch)).await.is_err() {
            return;
        }
        if rate > 0.0 && n > 0 {
            let due = started + Duration::from_secs_f64(n as f64 / rate);
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tokio::time::sleep_until(due.into()) => {}
            }
        }
        let input = tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            input = read_line(&mut reader, &mut buf) => input,
        };
        match input {
            Ok(Some(Input::Line(line, _))) if line.trim().is_empty() => continue,
            Ok(Some(Input::Line(line, _))) if header_next => {
                header_next = false;
                batch.push(Input::Header(line));
            }
            Ok(Some(input)) => {
                metrics.records_received.inc();
                n += 1;
                batch.push(input);
            }
            Ok(None) => {
                info!(records = n, "Source reached its end.");
                break;
            }
            Err(error) => {
                metrics.errors.with_label_values(&["source", "read"]).inc();
                error!(%error, "Source read failed; no more records.");
                break;
            }
        }
    }
    // Lines already read are handled (the drain scores them).
    if !batch.is_empty() {
        let _ = tx.send(batch).await;
    }
}
