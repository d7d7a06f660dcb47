//! The status owner: the one owner of instance statuses. Everything that changes an
//! instance's status goes through [`StatusManager::update`]; it rejects illegal
//! transitions, drops repeats, numbers reports (`seq`), persists the new status and its
//! report in the outbox in one group-committed transaction, and only then returns.
//!
//! Layout: this module owns statuses and their commit to the state store;
//! [`outbox`] delivers the queued reports to a sink; [`view`] holds the types the local
//! API and CLI show.
//!
//! Nobody else writes statuses. This module must not decide *when* a transition
//! happens (the actors do), nor send reports (the outbox does).

pub mod outbox;
pub mod view;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, Notify};

use crate::clock::SharedClock;
use crate::instance::{check_transition, Change, IllegalTransition, ReasonCode, Status};
use crate::metrics::{Metrics, StatusLabel, TransitionLabels};
use crate::spec::InstanceId;
use crate::state::{InstanceRow, StatusRecord, Store, StoreError};
use view::InstanceView;

/// Longest `error_message` kept (one line).
pub const MAX_MESSAGE_BYTES: usize = 1024;

/// A status change requested by an instance actor (or the supervisor).
#[derive(Debug, Clone, PartialEq)]
pub struct StatusUpdate {
    /// Instance.
    pub instance_id: InstanceId,
    /// Generation the status is about.
    pub generation: i32,
    /// New status.
    pub status: Status,
    /// Reason (required for most failures; see DESIGN §2).
    pub reason: Option<ReasonCode>,
    /// One-line message.
    pub message: Option<String>,
    /// Exit code, where one exists.
    pub exit_code: Option<i32>,
    /// Boot id of the VM concerned.
    pub boot_id: Option<String>,
    /// VMM start → ready, on `ready`.
    pub boot_duration_ms: Option<u64>,
    /// Restarts so far.
    pub restarts: u32,
    /// Consecutive failures the restart policy has counted (persisted, not reported).
    pub consecutive_failures: u32,
}

impl StatusUpdate {
    /// An update with only the status set.
    pub fn new(instance_id: InstanceId, generation: i32, status: Status) -> Self {
        StatusUpdate {
            instance_id,
            generation,
            status,
            reason: None,
            message: None,
            exit_code: None,
            boot_id: None,
            boot_duration_ms: None,
            restarts: 0,
            consecutive_failures: 0,
        }
    }
}

/// The report sent to the control plane (DESIGN §3).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusReport {
    /// Instance.
    pub instance_id: String,
    /// Status (never pending/preparing).
    pub status: Status,
    /// Boot id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_id: Option<String>,
    /// Reason code.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason_code: Option<ReasonCode>,
    /// Message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_message: Option<String>,
    /// Exit code.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// Generation.
    pub generation: i32,
    /// Boot duration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_duration_ms: Option<u64>,
    /// RFC 3339.
    pub observed_at: String,
    /// Per-instance sequence number, +1 per report.
    pub seq: i64,
}

/// What an update did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// The status changed; `seq` is set when it was reported.
    Changed {
        /// The report's seq, if the status is reported.
        seq: Option<i64>,
    },
    /// Same status as before; nothing persisted or reported.
    Unchanged,
}

/// Why an update was not applied.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// The transition is illegal (a bug in the caller).
    #[error("instance {instance}: {source}")]
    Illegal {
        /// Instance.
        instance: String,
        /// The refused transition.
        source: IllegalTransition,
    },
    /// The status manager is shutting down.
    #[error("status manager stopped")]
    Closed,
}

#[derive(Debug, Clone)]
struct Entry {
    generation: i32,
    status: Status,
    reason: Option<ReasonCode>,
    message: Option<Box<str>>,
    exit_code: Option<i32>,
    seq: i64,
    boot_id: Option<Box<str>>,
    restarts: u32,
    consecutive_failures: u32,
    updated_at: Box<str>,
    /// Left the plan and cleaned up: kept (for seq continuity) but not listed.
    removed: bool,
}

type Commit = (StatusRecord, oneshot::Sender<()>);

/// The one owner of statuses. Cheap to share behind an `Arc`.
pub struct StatusManager {
    entries: Mutex<HashMap<InstanceId, Entry>>,
    listeners: Mutex<Vec<Arc<Notify>>>,
    /// Why statuses cannot be persisted right now (the node is degraded), if so.
    degraded: Arc<Mutex<Option<String>>>,
    /// Why the host's disk is unusable (full), if so; set and cleared by the actors.
    disk_degraded: Mutex<Option<String>>,
    commit_tx: mpsc::Sender<Commit>,
    clock: SharedClock,
    metrics: Arc<Metrics>,
}

/// Most status changes committed in one transaction.
const MAX_BATCH: usize = 4096;

/// First wait before retrying a failed commit; doubles per failure up to
/// [`COMMIT_RETRY_MAX`].
const COMMIT_RETRY_FIRST: Duration = Duration::from_millis(50);
/// Longest wait between commit attempts.
const COMMIT_RETRY_MAX: Duration = Duration::from_secs(5);

impl StatusManager {
    /// Loads the persisted statuses and starts the group-commit task. `outbox_ready` is
    /// notified after every commit that queued reports.
    pub fn start(
        store: Store,
        clock: SharedClock,
        metrics: Arc<Metrics>,
        outbox_ready: Arc<Notify>,
    ) -> Result<Arc<StatusManager>, StoreError> {
        let rows = store.load_instances()?;
        let mut entries = HashMap::with_capacity(rows.len());
        for r in rows {
            let Ok(id) = InstanceId::parse(&r.instance_id) else {
                tracing::warn!(instance = %r.instance_id, "ignoring state row with an invalid instance id");
                continue;
            };
            let status = Status::parse(&r.status).unwrap_or(Status::Pending);
            metrics
                .instances
                .get_or_create(&StatusLabel {
                    status: status.as_str(),
                })
                .inc();
            entries.insert(
                id,
                Entry {
                    generation: r.generation,
                    status,
                    reason: r.reason_code.as_deref().and_then(ReasonCode::parse),
                    message: r.error_message.map(Into::into),
                    exit_code: r.exit_code,
                    seq: r.seq,
                    boot_id: r.boot_id.map(Into::into),
                    restarts: u32::try_from(r.restarts).unwrap_or(0),
                    consecutive_failures: u32::try_from(r.consecutive_failures).unwrap_or(0),
                    updated_at: r.updated_at.into(),
                    removed: r.desired_json.is_none()
                        && matches!(status, Status::Stopped | Status::Pending),
                },
            );
        }
        let (commit_tx, commit_rx) = mpsc::channel(MAX_BATCH);
        let degraded = Arc::new(Mutex::new(None));
        tokio::spawn(commit_loop(
            store,
            commit_rx,
            outbox_ready,
            metrics.clone(),
            degraded.clone(),
            clock.clone(),
        ));
        Ok(Arc::new(StatusManager {
            entries: Mutex::new(entries),
            listeners: Mutex::new(Vec::new()),
            degraded,
            disk_degraded: Mutex::new(None),
            commit_tx,
            clock,
            metrics,
        }))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<InstanceId, Entry>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Applies a status change: validates it, numbers it, persists it and its report,
    /// and returns once both are durable. Repeats return [`Applied::Unchanged`].
    pub async fn update(&self, u: StatusUpdate) -> Result<Applied, ReportError> {
        let (record, old, entry) = {
            let mut map = self.lock();
            let current = map
                .get(&u.instance_id)
                .map(|e| e.status)
                .unwrap_or(Status::Pending);
            let same_generation =
                map.get(&u.instance_id).map(|e| e.generation) == Some(u.generation);
            match check_transition(current, u.status) {
                Ok(Change::Unchanged) if same_generation || !u.status.is_reported() => {
                    // Keep the generation current for internal statuses.
                    if let Some(e) = map.get_mut(&u.instance_id) {
                        e.removed = false;
                    }
                    return Ok(Applied::Unchanged);
                }
                // Same status name for a new generation (e.g. failed → failed of a new
                // spec) is a change the control plane must hear about.
                Ok(_) => {}
                Err(source) => {
                    return Err(ReportError::Illegal {
                        instance: u.instance_id.to_string(),
                        source,
                    })
                }
            }
            let now = self.clock.wall();
            // The new entry becomes visible only once it is durable (below); one actor
            // per instance means no other update of this instance runs meanwhile.
            let mut entry = map.get(&u.instance_id).cloned().unwrap_or_else(|| Entry {
                generation: u.generation,
                status: Status::Pending,
                reason: None,
                message: None,
                exit_code: None,
                seq: 0,
                boot_id: None,
                restarts: 0,
                consecutive_failures: 0,
                updated_at: "".into(),
                removed: false,
            });
            let old = entry.status;
            let message = u.message.as_deref().map(one_line);
            let reported = u.status.is_reported();
            if reported {
                entry.seq += 1;
            }
            entry.generation = u.generation;
            entry.status = u.status;
            entry.reason = u.reason;
            entry.message = message.clone().map(Into::into);
            entry.exit_code = u.exit_code;
            if u.boot_id.is_some() || !u.status.has_vm() {
                entry.boot_id = u.boot_id.clone().map(Into::into);
            }
            entry.restarts = u.restarts;
            entry.consecutive_failures = u.consecutive_failures;
            entry.updated_at = now.to_rfc3339().into();
            entry.removed = false;
            let report_json = reported.then(|| {
                let report = StatusReport {
                    instance_id: u.instance_id.to_string(),
                    status: u.status,
                    boot_id: entry.boot_id.as_deref().map(str::to_string),
                    reason_code: u.reason,
                    error_message: message.clone(),
                    exit_code: u.exit_code,
                    generation: u.generation,
                    boot_duration_ms: u.boot_duration_ms,
                    observed_at: now.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
                    seq: entry.seq,
                };
                serde_json::to_string(&report).unwrap_or_default()
            });
            let row = InstanceRow {
                instance_id: u.instance_id.to_string(),
                generation: u.generation,
                status: u.status.as_str().to_string(),
                reason_code: u.reason.map(|r| r.as_str().to_string()),
                error_message: message,
                exit_code: u.exit_code,
                seq: entry.seq,
                boot_id: entry.boot_id.as_deref().map(str::to_string),
                restarts: i64::from(u.restarts),
                consecutive_failures: i64::from(u.consecutive_failures),
                desired_json: None,
                operator_stopped_generation: None,
                updated_at: entry.updated_at.to_string(),
            };
            (StatusRecord { row, report_json }, old, entry)
        };
        let seq = record.report_json.as_ref().map(|_| record.row.seq);
        let (tx, rx) = oneshot::channel();
        self.commit_tx
            .send((record, tx))
            .await
            .map_err(|_| ReportError::Closed)?;
        rx.await.map_err(|_| ReportError::Closed)?;
        self.lock().insert(u.instance_id.clone(), entry);
        self.metrics
            .instances
            .get_or_create(&StatusLabel {
                status: old.as_str(),
            })
            .dec();
        self.metrics
            .instances
            .get_or_create(&StatusLabel {
                status: u.status.as_str(),
            })
            .inc();
        self.metrics
            .transitions
            .get_or_create(&TransitionLabels {
                status: u.status.as_str(),
                reason: u.reason.map(|r| r.as_str()).unwrap_or("none"),
            })
            .inc();
        if let (Status::Ready, Some(ms)) = (u.status, u.boot_duration_ms) {
            self.metrics.boot_duration.observe(ms as f64 / 1000.0);
        }
        if seq.is_some() {
            for l in self
                .listeners
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
            {
                l.notify_one();
            }
        }
        Ok(Applied::Changed { seq })
    }

    /// Why the node is degraded (statuses cannot be persisted), if it is.
    pub fn degraded(&self) -> Option<String> {
        let store = self
            .degraded
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        store.or_else(|| {
            self.disk_degraded
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone()
        })
    }

    /// Records (or clears) that the host's disk is full (the node is degraded).
    pub fn set_disk_full(&self, reason: Option<String>) {
        *self.disk_degraded.lock().unwrap_or_else(|e| e.into_inner()) = reason;
    }

    /// A notification fired after every reported status change (e.g. to poll the plan).
    pub fn subscribe_changes(&self) -> Arc<Notify> {
        let n = Arc::new(Notify::new());
        self.listeners
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(n.clone());
        n
    }

    /// Current status and generation of an instance.
    pub fn status_of(&self, id: &InstanceId) -> Option<(Status, i32)> {
        self.lock().get(id).map(|e| (e.status, e.generation))
    }

    /// Current status, generation, reason and restart count of an instance.
    pub fn brief(&self, id: &InstanceId) -> Option<(Status, i32, Option<ReasonCode>, u32)> {
        self.lock()
            .get(id)
            .map(|e| (e.status, e.generation, e.reason, e.restarts))
    }

    /// Consecutive failures the restart policy had counted at the last status change
    /// (restored after an agent restart).
    pub fn consecutive_failures(&self, id: &InstanceId) -> u32 {
        self.lock()
            .get(id)
            .map(|e| e.consecutive_failures)
            .unwrap_or(0)
    }

    /// Marks an instance as gone from the plan (kept for seq continuity, not listed).
    pub fn mark_removed(&self, id: &InstanceId) {
        if let Some(e) = self.lock().get_mut(id) {
            e.removed = true;
        }
    }

    /// Every listed instance, sorted by id.
    pub fn list(&self) -> Vec<InstanceView> {
        let map = self.lock();
        let mut v: Vec<_> = map
            .iter()
            .filter(|(_, e)| !e.removed)
            .map(|(id, e)| view(id, e))
            .collect();
        v.sort_by(|a, b| a.instance_id.cmp(&b.instance_id));
        v
    }

    /// One instance.
    pub fn get(&self, id: &InstanceId) -> Option<InstanceView> {
        self.lock()
            .get(id)
            .filter(|e| !e.removed)
            .map(|e| view(id, e))
    }

    /// Number of listed instances per status.
    pub fn counts(&self) -> HashMap<Status, usize> {
        let mut out = HashMap::new();
        for e in self.lock().values().filter(|e| !e.removed) {
            *out.entry(e.status).or_default() += 1;
        }
        out
    }
}

fn view(id: &InstanceId, e: &Entry) -> InstanceView {
    InstanceView {
        instance_id: id.to_string(),
        generation: e.generation,
        status: e.status,
        reason_code: e.reason,
        error_message: e.message.as_deref().map(str::to_string),
        exit_code: e.exit_code,
        restarts: e.restarts,
        boot_id: e.boot_id.as_deref().map(str::to_string),
        seq: e.seq,
        updated_at: e.updated_at.to_string(),
        addresses: None,
        tap: None,
        detail: None,
    }
}

/// Collapses a message to one line of at most [`MAX_MESSAGE_BYTES`].
pub fn one_line(msg: &str) -> String {
    let mut s: String = msg
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if s.len() > MAX_MESSAGE_BYTES {
        let mut cut = MAX_MESSAGE_BYTES - 3;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push('…');
    }
    s
}

async fn commit_loop(
    store: Store,
    mut rx: mpsc::Receiver<Commit>,
    outbox_ready: Arc<Notify>,
    metrics: Arc<Metrics>,
    degraded: Arc<Mutex<Option<String>>>,
    clock: SharedClock,
) {
    let mut batch: Vec<Commit> = Vec::new();
    while let Some(first) = rx.recv().await {
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(c) => batch.push(c),
                Err(_) => break,
            }
        }
        let records: Vec<StatusRecord> = batch.iter().map(|(r, _)| r.clone()).collect();
        let queued = records.iter().any(|r| r.report_json.is_some());
        let mut delay = COMMIT_RETRY_FIRST;
        let records = Arc::new(records);
        loop {
            let recs = records.clone();
            match store.call(move |s| s.commit_statuses(&recs)).await {
                Ok(()) => {
                    metrics.status_commits.inc();
                    *degraded.lock().unwrap_or_else(|e| e.into_inner()) = None;
                    break;
                }
                Err(e) => {
                    *degraded.lock().unwrap_or_else(|p| p.into_inner()) =
                        Some(format!("state store: {e}"));
                    // Nothing is acknowledged before it is durable: callers wait.
                    tracing::error!(error = %e, "cannot persist status changes; retrying");
                    clock.sleep(delay).await;
                    delay = (delay * 2).min(COMMIT_RETRY_MAX);
                }
            }
        }
        for (_, ack) in batch.drain(..) {
            let _ = ack.send(());
        }
        if queued {
            outbox_ready.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::{Clock, ManualClock};

    fn start(store: &Store, clock: Arc<ManualClock>) -> Arc<StatusManager> {
        StatusManager::start(
            store.clone(),
            clock,
            Arc::new(Metrics::new()),
            Arc::new(Notify::new()),
        )
        .unwrap()
    }

    async fn manager() -> (Arc<StatusManager>, Store, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("state.db")).unwrap();
        let m = start(&store, Arc::new(ManualClock::new()));
        (m, store, dir)
    }

    fn id(s: &str) -> InstanceId {
        InstanceId::parse(s).unwrap()
    }

    #[tokio::test]
    async fn repeated_status_is_not_reported() {
        let (m, store, _d) = manager().await;
        for st in [
            Status::Preparing,
            Status::Booting,
            Status::Booting,
            Status::Ready,
            Status::Ready,
        ] {
            m.update(StatusUpdate::new(id("a"), 1, st)).await.unwrap();
        }
        let ob = store.outbox_peek(100).unwrap();
        let statuses: Vec<_> = ob
            .iter()
            .map(|r| serde_json::from_str::<StatusReport>(&r.report_json).unwrap())
            .map(|r| (r.status, r.seq))
            .collect();
        assert_eq!(statuses, vec![(Status::Booting, 1), (Status::Ready, 2)]);
    }

    #[tokio::test]
    async fn illegal_transition_is_refused_and_not_persisted() {
        let (m, store, _d) = manager().await;
        let err = m
            .update(StatusUpdate::new(id("a"), 1, Status::Ready))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("pending -> ready"), "{err}");
        assert!(store.outbox_peek(10).unwrap().is_empty());
        assert_eq!(m.status_of(&id("a")), None);
    }

    #[tokio::test]
    async fn messages_become_one_bounded_line() {
        let (m, store, _d) = manager().await;
        let mut u = StatusUpdate::new(id("a"), 1, Status::Failed);
        u.reason = Some(ReasonCode::ImagePullFailed);
        u.message = Some(format!("line one\nline two {}", "x".repeat(5000)));
        m.update(u).await.unwrap();
        let r: StatusReport =
            serde_json::from_str(&store.outbox_peek(1).unwrap()[0].report_json).unwrap();
        let msg = r.error_message.unwrap();
        assert!(!msg.contains('\n'));
        assert!(msg.len() <= MAX_MESSAGE_BYTES);
        assert_eq!(r.reason_code, Some(ReasonCode::ImagePullFailed));
    }

    /// Makes the store refuse (or accept again) every report it queues: an SQLite
    /// trigger on the outbox, set through a second connection.
    fn refuse_reports(db: &std::path::Path, refuse: bool) {
        let conn = rusqlite::Connection::open(db).unwrap();
        let sql = if refuse {
            "CREATE TRIGGER refuse_reports BEFORE INSERT ON outbox \
             BEGIN SELECT RAISE(ABORT, 'injected failure'); END;"
        } else {
            "DROP TRIGGER refuse_reports;"
        };
        conn.execute_batch(sql).unwrap();
    }

    /// A commit that fails is retried after 50 ms, 100 ms, … up to 5 s, each wait on
    /// the injected clock; the update returns only once a retry made it durable.
    #[tokio::test]
    async fn a_failed_commit_is_retried_on_the_clock_with_doubling_capped_backoff() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("state.db");
        let store = Store::open(&db).unwrap();
        let clock = Arc::new(ManualClock::new());
        let m = start(&store, clock.clone());
        m.update(StatusUpdate::new(id("a"), 1, Status::Preparing))
            .await
            .unwrap();
        refuse_reports(&db, true);
        let m2 = m.clone();
        let update = tokio::spawn(async move {
            m2.update(StatusUpdate::new(id("a"), 1, Status::Booting))
                .await
        });
        let waits = [50, 100, 200, 400, 800, 1600, 3200, 5000, 5000].map(Duration::from_millis);
        for (failure, wait) in waits.into_iter().enumerate() {
            let wake = clock
                .parked(Duration::from_secs(10))
                .await
                .expect("after a failed commit the commit loop waits on the injected clock");
            assert_eq!(
                wake.since(clock.now()),
                wait,
                "wait after failure {failure}"
            );
            assert!(m.degraded().is_some_and(|d| d.contains("injected failure")));
            assert_eq!(m.status_of(&id("a")), Some((Status::Preparing, 1)));
            if failure == waits.len() - 1 {
                refuse_reports(&db, false);
            }
            clock.advance(wait - Duration::from_millis(1));
            assert!(!update.is_finished(), "acknowledged before it was durable");
            assert_eq!(clock.next_deadline(), Some(wake), "retried early");
            clock.advance(Duration::from_millis(1));
        }
        let applied = tokio::time::timeout(Duration::from_secs(10), update)
            .await
            .expect("the retry after the last wait commits")
            .unwrap()
            .unwrap();
        assert_eq!(applied, Applied::Changed { seq: Some(1) });
        assert_eq!(m.degraded(), None);
        assert_eq!(m.status_of(&id("a")), Some((Status::Booting, 1)));
        assert_eq!(store.outbox_depth().unwrap(), 1);
    }

    #[tokio::test]
    async fn seq_continues_after_reload() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        {
            let store = Store::open(&path).unwrap();
            let m = start(&store, Arc::new(ManualClock::new()));
            m.update(StatusUpdate::new(id("a"), 1, Status::Preparing))
                .await
                .unwrap();
            m.update(StatusUpdate::new(id("a"), 1, Status::Booting))
                .await
                .unwrap();
        }
        let store = Store::open(&path).unwrap();
        let m = start(&store, Arc::new(ManualClock::new()));
        assert_eq!(m.status_of(&id("a")), Some((Status::Booting, 1)));
        assert_eq!(
            m.update(StatusUpdate::new(id("a"), 1, Status::Booting))
                .await
                .unwrap(),
            Applied::Unchanged
        );
        assert_eq!(
            m.update(StatusUpdate::new(id("a"), 1, Status::Ready))
                .await
                .unwrap(),
            Applied::Changed { seq: Some(2) }
        );
    }
}
