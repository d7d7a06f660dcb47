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

use crate::clock::SharedClock;
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

/// First wait before retrying a delivery that failed; doubles per failure up to
/// [`RETRY_MAX`], each wait spread by ±[`RETRY_JITTER`].
pub const RETRY_FIRST: Duration = Duration::from_millis(100);
/// Longest nominal wait between delivery attempts.
pub const RETRY_MAX: Duration = Duration::from_secs(30);
/// Relative spread of each retry wait (0.2: 80 % to 120 % of the nominal wait).
pub const RETRY_JITTER: f64 = 0.2;
/// Look at the outbox at least this often, even without a notification.
const IDLE_RECHECK: Duration = Duration::from_secs(5);

/// Moves reports from the outbox to a sink, oldest first, retrying with backoff. Every
/// wait is on the injected clock.
pub struct OutboxDrainer {
    store: Store,
    sink: Arc<dyn ReportSink>,
    ready: Arc<Notify>,
    metrics: Arc<Metrics>,
    clock: SharedClock,
}

impl OutboxDrainer {
    /// A drainer; `ready` is the status manager's notification.
    pub fn new(
        store: Store,
        sink: Arc<dyn ReportSink>,
        ready: Arc<Notify>,
        metrics: Arc<Metrics>,
        clock: SharedClock,
    ) -> Self {
        OutboxDrainer {
            store,
            sink,
            ready,
            metrics,
            clock,
        }
    }

    /// Runs until `shutdown` resolves.
    pub async fn run(self, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        let mut delay = RETRY_FIRST;
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
                IDLE_RECHECK
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
                    delay = RETRY_FIRST;
                    if done == n {
                        continue;
                    }
                    delay
                } else {
                    self.metrics.delivery_errors.inc();
                    retrying = true;
                    // Exponential backoff with jitter.
                    let jitter = 1.0 - RETRY_JITTER + rand::random::<f64>() * 2.0 * RETRY_JITTER;
                    let d = delay.mul_f64(jitter);
                    tracing::warn!(
                        delivered = done,
                        pending = n - done,
                        retry_in_ms = d.as_millis() as u64,
                        "status delivery incomplete; retrying"
                    );
                    delay = (delay * 2).min(RETRY_MAX);
                    d
                }
            };
            tokio::select! {
                // While backing off, new reports wait for the retry time too.
                _ = self.ready.notified(), if !retrying => {}
                _ = self.clock.sleep(wait) => {}
                _ = shutdown.changed() => return,
            }
            if *shutdown.borrow() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Mutex;

    use tokio::sync::watch;

    use super::*;
    use crate::clock::{Clock, ManualClock};
    use crate::instance::Status;
    use crate::spec::InstanceId;
    use crate::status::{StatusManager, StatusUpdate};
    use crate::testing::count_reaches;

    /// A sink that refuses as many attempts as `refuse` says, then takes everything.
    struct Flaky {
        refuse: AtomicU32,
        attempts: watch::Sender<u32>,
        taken: Mutex<Vec<i64>>,
    }

    #[async_trait]
    impl ReportSink for Flaky {
        async fn deliver(&self, _store: &Store, rows: Vec<OutboxRow>) -> Delivery {
            self.attempts.send_modify(|a| *a += 1);
            let refused = self
                .refuse
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok();
            if refused {
                return Delivery {
                    done: Vec::new(),
                    retry: true,
                };
            }
            let ids: Vec<i64> = rows.iter().map(|r| r.id).collect();
            self.taken.lock().unwrap().extend(&ids);
            Delivery {
                done: ids,
                retry: false,
            }
        }
    }

    /// A sink that fails 12 times: each retry waits on the injected clock, 100 ms
    /// doubling up to 30 s, ±20 %; nothing is attempted before a wait ends and the
    /// next attempt comes right when it does; a delivery resets the backoff.
    #[tokio::test]
    async fn failed_deliveries_back_off_on_the_clock_doubling_capped_with_jitter() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("state.db")).unwrap();
        let clock = Arc::new(ManualClock::new());
        let ready = Arc::new(Notify::new());
        let metrics = Arc::new(Metrics::new());
        let status =
            StatusManager::start(store.clone(), clock.clone(), metrics.clone(), ready.clone())
                .unwrap();
        let (attempts, mut attempts_rx) = watch::channel(0);
        let sink = Arc::new(Flaky {
            refuse: AtomicU32::new(12),
            attempts,
            taken: Mutex::new(Vec::new()),
        });
        let (stop, stop_rx) = watch::channel(false);
        let drainer = tokio::spawn(
            OutboxDrainer::new(store.clone(), sink.clone(), ready, metrics, clock.clone())
                .run(stop_rx),
        );
        let idle = clock.parked(Duration::from_secs(10)).await;
        assert_eq!(
            idle.map(|t| t.since(clock.now())),
            Some(IDLE_RECHECK),
            "an empty outbox is looked at again after the idle wait, on the clock"
        );

        let id = InstanceId::parse("a").unwrap();
        for s in [Status::Preparing, Status::Booting] {
            status
                .update(StatusUpdate::new(id.clone(), 1, s))
                .await
                .unwrap();
        }
        let within = |wait: Duration, nominal: Duration| {
            wait >= nominal.mul_f64(1.0 - RETRY_JITTER)
                && wait <= nominal.mul_f64(1.0 + RETRY_JITTER)
        };
        let mut nominal = RETRY_FIRST;
        let mut capped = 0;
        for attempt in 1..=12 {
            count_reaches(&mut attempts_rx, attempt, "delivery attempt").await;
            let wake = clock
                .parked(Duration::from_secs(10))
                .await
                .expect("after a failed delivery the drainer waits on the injected clock");
            let wait = wake.since(clock.now());
            assert!(
                within(wait, nominal),
                "retry {attempt} waits {wait:?}; nominal {nominal:?}"
            );
            capped += usize::from(nominal == RETRY_MAX);
            clock.advance(wait - Duration::from_millis(1));
            assert_eq!(
                *attempts_rx.borrow(),
                attempt,
                "attempted before the wait ended"
            );
            assert_eq!(clock.next_deadline(), Some(wake));
            assert!(sink.taken.lock().unwrap().is_empty());
            clock.advance(Duration::from_millis(1));
            nominal = (nominal * 2).min(RETRY_MAX);
        }
        assert_eq!(capped, 3, "the wait stops doubling at {RETRY_MAX:?}");

        // Attempt 13 is taken; the drainer then idles with an empty outbox.
        count_reaches(&mut attempts_rx, 13, "delivery attempt").await;
        let idle = clock.parked(Duration::from_secs(10)).await;
        assert_eq!(idle.map(|t| t.since(clock.now())), Some(IDLE_RECHECK));
        assert_eq!(sink.taken.lock().unwrap().len(), 1);
        assert_eq!(store.outbox_depth().unwrap(), 0);

        // The next failure waits the first backoff again.
        sink.refuse.store(1, Ordering::SeqCst);
        status
            .update(StatusUpdate::new(id.clone(), 1, Status::Ready))
            .await
            .unwrap();
        count_reaches(&mut attempts_rx, 14, "delivery attempt").await;
        let wake = clock.parked(Duration::from_secs(10)).await.unwrap();
        assert!(within(wake.since(clock.now()), RETRY_FIRST));
        clock.advance(wake.since(clock.now()));
        count_reaches(&mut attempts_rx, 15, "delivery attempt").await;
        let _ = stop.send(true);
        drainer.await.unwrap();
        assert_eq!(sink.taken.lock().unwrap().len(), 2);
        assert_eq!(store.outbox_depth().unwrap(), 0);
    }
}
