//! Outbox delivery: moves the reports the status owner queued in the state store's
//! outbox to a [`ReportSink`] (the local `reports` table, or the control plane), oldest
//! first and in order per instance, and removes them once the sink took them; retries
//! with backoff when it could not.
//!
//! This module must not create, change or renumber reports (only
//! [`super::StatusManager`] does), and never drops one the sink did not take or refuse
//! for good.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::Notify;

use crate::metrics::Metrics;
use crate::state::{OutboxRow, Store};

/// What a delivery attempt achieved.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Delivery {
    /// Outbox ids that are done (accepted, or refused for good) and leave the outbox.
    pub done: Vec<i64>,
    /// Some reports could not be delivered now: retry later with backoff.
    pub retry: bool,
}

/// Where delivered reports go.
#[async_trait]
pub trait ReportSink: Send + Sync + 'static {
    /// Delivers `rows`, keeping each instance's reports in order: a report is only
    /// attempted after every earlier report of its instance is done.
    async fn deliver(&self, store: &Store, rows: Vec<OutboxRow>) -> Delivery;
}

/// Standalone mode's sink: the `reports` table of the state store, served by the local
/// API. Delivery and outbox removal are one transaction.
pub struct LocalSink;

#[async_trait]
impl ReportSink for LocalSink {
    async fn deliver(&self, store: &Store, rows: Vec<OutboxRow>) -> Delivery {
        let ids: Vec<i64> = rows.iter().map(|r| r.id).collect();
        match store.call(move |s| s.deliver_to_local_sink(&rows)).await {
            Ok(()) => Delivery {
                done: ids,
                retry: false,
            },
            Err(e) => {
                tracing::error!(error = %e, "local report sink failed");
                Delivery {
                    done: Vec::new(),
                    retry: true,
                }
            }
        }
    }
}

/// Moves reports from the outbox to a sink, oldest first, retrying with backoff.
pub struct OutboxDrainer {
    store: Store,
    sink: Arc<dyn ReportSink>,
    ready: Arc<Notify>,
    metrics: Arc<Metrics>,
}

impl OutboxDrainer {
    /// A drainer; `ready` is the status manager's notification.
    pub fn new(
        store: Store,
        sink: Arc<dyn ReportSink>,
        ready: Arc<Notify>,
        metrics: Arc<Metrics>,
    ) -> Self {
        OutboxDrainer {
            store,
            sink,
            ready,
            metrics,
        }
    }

    /// Runs until `shutdown` resolves.
    pub async fn run(self, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        let mut delay = Duration::from_millis(100);
        loop {
            let rows = match self.store.call(|s| s.outbox_peek(1000)).await {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!(error = %e, "cannot read the outbox");
                    Vec::new()
                }
            };
            if let Ok(depth) = self.store.call(|s| s.outbox_depth()).await {
                self.metrics.outbox_depth.set(depth);
            }
            let mut retrying = false;
            let wait = if rows.is_empty() {
                Duration::from_secs(5)
            } else {
                let n = rows.len();
                let d = self.sink.deliver(&self.store, rows).await;
                let done = d.done.len();
                if done > 0 {
                    let ids = d.done;
                    if let Err(e) = self.store.call(move |s| s.outbox_ack(&ids)).await {
                        tracing::error!(error = %e, "cannot remove delivered reports from the outbox");
                    }
                    self.metrics.reports_delivered.inc_by(done as u64);
                }
                if !d.retry {
                    delay = Duration::from_millis(100);
                    if done == n {
                        continue;
                    }
                    delay
                } else {
                    self.metrics.delivery_errors.inc();
                    retrying = true;
                    // Exponential backoff with ±20 % jitter.
                    let jitter = 0.8 + rand::random::<f64>() * 0.4;
                    let d = delay.mul_f64(jitter);
                    tracing::warn!(
                        delivered = done,
                        pending = n - done,
                        retry_in_ms = d.as_millis() as u64,
                        "status delivery incomplete; retrying"
                    );
                    delay = (delay * 2).min(Duration::from_secs(30));
                    d
                }
            };
            tokio::select! {
                // While backing off, new reports wait for the retry time too.
                _ = self.ready.notified(), if !retrying => {}
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.changed() => return,
            }
            if *shutdown.borrow() {
                return;
            }
        }
    }
}
