//! Workload logs: lines from VM consoles, batched to the control plane
//! (`POST /v1/nodes/{node_id}/logs`, at most 100 entries or 500 ms per batch).
//!
//! The contract: pushing a line never blocks and never fails. Lines longer than
//! [`MAX_LINE_BYTES`] are cut and marked `truncated`; when the queue or the retry buffer
//! is full (control plane down), the oldest lines are dropped and counted. This module
//! moves lines; it does not read consoles.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::clock::SharedClock;
use crate::metrics::Metrics;

/// Longest line shipped.
pub const MAX_LINE_BYTES: usize = 16 * 1024;
/// Most entries per batch.
pub const MAX_BATCH: usize = 100;
/// Longest a line waits for its batch.
pub const BATCH_WINDOW: Duration = Duration::from_millis(500);
/// Lines queued between producers and the shipper.
pub const QUEUE: usize = 8192;
/// Lines kept for retry while the control plane is down.
pub const RETRY_BUFFER: usize = 10_000;

/// One log line (DESIGN §3).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogEntry {
    /// RFC 3339.
    pub ts: String,
    /// Instance.
    pub instance_id: String,
    /// `console`, `stdout`, `stderr`.
    pub stream: String,
    /// The line (at most [`MAX_LINE_BYTES`]).
    pub line: String,
    /// The line was cut.
    pub truncated: bool,
}

/// Where batches go.
#[async_trait]
pub trait LogDestination: Send + Sync + 'static {
    /// Sends one batch.
    async fn send(&self, entries: &[LogEntry]) -> Result<(), String>;
}

/// Producer side: cheap to clone; a handle without a shipper discards lines.
#[derive(Clone, Default)]
pub struct LogHandle {
    tx: Option<mpsc::Sender<LogEntry>>,
    metrics: Option<Arc<Metrics>>,
    clock: Option<SharedClock>,
}

impl LogHandle {
    /// Queues a line; never blocks.
    pub fn push(&self, instance_id: &str, stream: &str, line: &str) {
        let Some(tx) = &self.tx else { return };
        let (line, truncated) = cut(line);
        let ts = self
            .clock
            .as_ref()
            .map(|c| c.wall())
            .unwrap_or_else(chrono::Utc::now)
            .to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        let entry = LogEntry {
            ts,
            instance_id: instance_id.to_string(),
            stream: stream.to_string(),
            line,
            truncated,
        };
        if tx.try_send(entry).is_err() {
            if let Some(m) = &self.metrics {
                m.log_lines_dropped.inc();
            }
        }
    }
}

impl LogHandle {
    /// Queues a line that carries its own time (RFC 3339, e.g. the guest's) and cut
    /// mark; never blocks.
    pub fn push_entry(
        &self,
        instance_id: &str,
        stream: &str,
        line: &str,
        truncated: bool,
        ts: String,
    ) {
        let Some(tx) = &self.tx else { return };
        let (line, cut) = cut(line);
        let entry = LogEntry {
            ts,
            instance_id: instance_id.to_string(),
            stream: stream.to_string(),
            line,
            truncated: truncated || cut,
        };
        if tx.try_send(entry).is_err() {
            if let Some(m) = &self.metrics {
                m.log_lines_dropped.inc();
            }
        }
    }
}

fn cut(line: &str) -> (String, bool) {
    if line.len() <= MAX_LINE_BYTES {
        return (line.to_string(), false);
    }
    let mut end = MAX_LINE_BYTES;
    while !line.is_char_boundary(end) {
        end -= 1;
    }
    (line[..end].to_string(), true)
}

/// Starts a shipper; returns the producer handle.
pub fn start(
    dest: Arc<dyn LogDestination>,
    clock: SharedClock,
    metrics: Arc<Metrics>,
    shutdown: tokio::sync::watch::Receiver<bool>,
) -> LogHandle {
    let (tx, rx) = mpsc::channel(QUEUE);
    tokio::spawn(run(rx, dest, clock.clone(), metrics.clone(), shutdown));
    LogHandle {
        tx: Some(tx),
        metrics: Some(metrics),
        clock: Some(clock),
    }
}

async fn run(
    mut rx: mpsc::Receiver<LogEntry>,
    dest: Arc<dyn LogDestination>,
    clock: SharedClock,
    metrics: Arc<Metrics>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let mut buf: VecDeque<LogEntry> = VecDeque::new();
    let mut backoff = Duration::from_millis(500);
    let mut retry_at = None;
    loop {
        if let Some(at) = retry_at.take() {
            tokio::select! {
                _ = clock.sleep_until(at) => {}
                _ = shutdown.changed() => return,
            }
        }
        while let Ok(e) = rx.try_recv() {
            buf.push_back(e);
            if buf.len() > RETRY_BUFFER {
                break;
            }
        }
        // Wait for the first line, then fill the batch window.
        if buf.is_empty() {
            tokio::select! {
                e = rx.recv() => match e {
                    Some(e) => buf.push_back(e),
                    None => return,
                },
                _ = shutdown.changed() => return,
            }
        }
        if buf.len() < MAX_BATCH {
            let window = clock.sleep(BATCH_WINDOW);
            tokio::pin!(window);
            while buf.len() < MAX_BATCH {
                tokio::select! {
                    e = rx.recv() => match e {
                        Some(e) => buf.push_back(e),
                        None => break,
                    },
                    _ = &mut window => break,
                    _ = shutdown.changed() => return,
                }
            }
        }
        while buf.len() > RETRY_BUFFER {
            buf.pop_front();
            metrics.log_lines_dropped.inc();
        }
        let n = buf.len().min(MAX_BATCH);
        let batch: Vec<LogEntry> = buf.iter().take(n).cloned().collect();
        match dest.send(&batch).await {
            Ok(()) => {
                buf.drain(..n);
                metrics.log_lines_shipped.inc_by(n as u64);
                backoff = Duration::from_millis(500);
            }
            Err(e) => {
                tracing::debug!(error = %e, buffered = buf.len(), "log shipping failed; will retry");
                retry_at = Some(clock.now().plus(backoff));
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[test]
    fn long_lines_are_cut_on_a_char_boundary() {
        let (l, t) = cut(&"é".repeat(MAX_LINE_BYTES));
        assert!(t);
        assert!(l.len() <= MAX_LINE_BYTES);
        assert_eq!(cut("short"), ("short".to_string(), false));
    }

    struct Flaky {
        up: Mutex<bool>,
        got: Mutex<Vec<usize>>,
    }

    #[async_trait]
    impl LogDestination for Flaky {
        async fn send(&self, e: &[LogEntry]) -> Result<(), String> {
            if !*self.up.lock().unwrap() {
                return Err("down".into());
            }
            self.got.lock().unwrap().push(e.len());
            Ok(())
        }
    }

    #[tokio::test]
    async fn batches_are_bounded_and_survive_an_outage() {
        let dest = Arc::new(Flaky {
            up: Mutex::new(false),
            got: Mutex::new(vec![]),
        });
        let clock = Arc::new(crate::clock::ManualClock::new());
        let metrics = Arc::new(Metrics::new());
        let (_tx, rx) = tokio::sync::watch::channel(false);
        let h = start(dest.clone(), clock.clone(), metrics.clone(), rx);
        for i in 0..250 {
            h.push("a", "console", &format!("line {i}"));
        }
        for _ in 0..20 {
            clock.advance(Duration::from_secs(1));
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(dest.got.lock().unwrap().is_empty());
        *dest.up.lock().unwrap() = true;
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while dest.got.lock().unwrap().iter().sum::<usize>() < 250 {
            assert!(std::time::Instant::now() < deadline, "lines not shipped");
            clock.advance(Duration::from_secs(1));
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(dest.got.lock().unwrap().iter().all(|n| *n <= MAX_BATCH));
        assert_eq!(metrics.log_lines_dropped.get(), 0);
    }
}
