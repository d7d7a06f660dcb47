//! Time as a seam: every deadline, backoff, grace period and health interval in the
//! agent goes through a [`Clock`], so tests can move time by hand instead of sleeping.
//!
//! This module owns "now" and "sleep". It must not hold any lifecycle policy.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::{oneshot, Notify};

/// A point on the clock's monotonic timeline (time since the clock's origin).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Instant(pub Duration);

impl Instant {
    /// `self + d`.
    pub fn plus(self, d: Duration) -> Instant {
        Instant(self.0.saturating_add(d))
    }
    /// Time from `earlier` to `self`, zero if `earlier` is later.
    pub fn since(self, earlier: Instant) -> Duration {
        self.0.saturating_sub(earlier.0)
    }
}

/// A boxed sleep future.
pub type Sleep = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Source of time for the agent.
pub trait Clock: Send + Sync + 'static {
    /// Monotonic now.
    fn now(&self) -> Instant;
    /// Wall-clock now (for `observed_at`).
    fn wall(&self) -> DateTime<Utc>;
    /// Resolves once `now() >= deadline`.
    fn sleep_until(&self, deadline: Instant) -> Sleep;
    /// Resolves after `d`.
    fn sleep(&self, d: Duration) -> Sleep {
        self.sleep_until(self.now().plus(d))
    }
}

/// Shared clock handle.
pub type SharedClock = Arc<dyn Clock>;

/// The real clock, backed by tokio's timer.
#[derive(Debug, Clone)]
pub struct SystemClock {
    origin: tokio::time::Instant,
}

impl SystemClock {
    /// A clock whose origin is now.
    pub fn new() -> Self {
        SystemClock {
            origin: tokio::time::Instant::now(),
        }
    }
}

impl Default for SystemClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant(self.origin.elapsed())
    }
    fn wall(&self) -> DateTime<Utc> {
        Utc::now()
    }
    fn sleep_until(&self, deadline: Instant) -> Sleep {
        Box::pin(tokio::time::sleep_until(self.origin + deadline.0))
    }
}

/// A clock that only moves when told to. Sleepers wake when [`ManualClock::advance`]
/// passes their deadline.
#[derive(Clone)]
pub struct ManualClock {
    inner: Arc<Mutex<ManualInner>>,
    /// Fired whenever someone starts sleeping.
    slept: Arc<Notify>,
    wall_origin: DateTime<Utc>,
}

struct ManualInner {
    now: Instant,
    next_id: u64,
    waiters: BTreeMap<(Instant, u64), oneshot::Sender<()>>,
}

impl ManualClock {
    /// A clock at time zero.
    pub fn new() -> Self {
        ManualClock {
            inner: Arc::new(Mutex::new(ManualInner {
                now: Instant::default(),
                next_id: 0,
                waiters: BTreeMap::new(),
            })),
            slept: Arc::new(Notify::new()),
            wall_origin: Utc::now(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ManualInner> {
        // A panic while holding this lock cannot leave the map inconsistent.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Moves time forward by `d` and wakes every sleeper whose deadline passed.
    pub fn advance(&self, d: Duration) {
        let woken = {
            let mut g = self.lock();
            g.now = g.now.plus(d);
            let now = g.now;
            let later = g.waiters.split_off(&(now, u64::MAX));
            std::mem::replace(&mut g.waiters, later)
        };
        for (_, tx) in woken {
            let _ = tx.send(());
        }
    }

    /// Number of pending sleepers (lets tests wait until actors are parked).
    pub fn sleepers(&self) -> usize {
        let mut g = self.lock();
        g.waiters.retain(|_, tx| !tx.is_closed());
        g.waiters.len()
    }

    /// The earliest deadline a pending sleeper waits for, if anyone sleeps.
    pub fn next_deadline(&self) -> Option<Instant> {
        let mut g = self.lock();
        g.waiters.retain(|_, tx| !tx.is_closed());
        g.waiters.keys().next().map(|(deadline, _)| *deadline)
    }

    /// Waits until someone sleeps on this clock and returns the earliest deadline
    /// (see [`ManualClock::next_deadline`]); `None` if nobody did within `within` of
    /// real time. Lets a test see that a task parked on this clock, and until when,
    /// without sleeping itself.
    pub async fn parked(&self, within: Duration) -> Option<Instant> {
        let give_up = tokio::time::Instant::now() + within;
        loop {
            let slept = self.slept.notified();
            tokio::pin!(slept);
            slept.as_mut().enable();
            if let Some(d) = self.next_deadline() {
                return Some(d);
            }
            if tokio::time::timeout_at(give_up, slept).await.is_err() {
                return None;
            }
        }
    }
}

impl Default for ManualClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Instant {
        self.lock().now
    }
    fn wall(&self) -> DateTime<Utc> {
        let now = self.now();
        self.wall_origin + chrono::Duration::from_std(now.0).unwrap_or_default()
    }
    fn sleep_until(&self, deadline: Instant) -> Sleep {
        let rx = {
            let mut g = self.lock();
            if deadline <= g.now {
                return Box::pin(async {});
            }
            let (tx, rx) = oneshot::channel();
            let id = g.next_id;
            g.next_id += 1;
            g.waiters.insert((deadline, id), tx);
            rx
        };
        self.slept.notify_waiters();
        Box::pin(async move {
            let _ = rx.await;
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn manual_clock_wakes_only_passed_deadlines() {
        let clock = ManualClock::new();
        let mut early = clock.sleep(Duration::from_secs(1));
        let mut late = clock.sleep(Duration::from_secs(5));
        clock.advance(Duration::from_secs(2));
        tokio::time::timeout(Duration::from_secs(1), &mut early)
            .await
            .expect("1 s sleeper must wake after 2 s");
        assert!(
            tokio::time::timeout(Duration::from_millis(20), &mut late)
                .await
                .is_err(),
            "5 s sleeper must still sleep"
        );
        clock.advance(Duration::from_secs(3));
        tokio::time::timeout(Duration::from_secs(1), late)
            .await
            .expect("5 s sleeper wakes at 5 s");
        assert_eq!(clock.now(), Instant(Duration::from_secs(5)));
    }

    #[tokio::test]
    async fn parked_reports_the_earliest_live_sleeper() {
        let clock = ManualClock::new();
        assert_eq!(clock.parked(Duration::from_millis(1)).await, None);
        let c = clock.clone();
        let sleeper = tokio::spawn(async move { c.sleep(Duration::from_secs(3)).await });
        assert_eq!(
            clock.parked(Duration::from_secs(10)).await,
            Some(Instant(Duration::from_secs(3)))
        );
        let dropped = clock.sleep(Duration::from_secs(1));
        assert_eq!(clock.next_deadline(), Some(Instant(Duration::from_secs(1))));
        drop(dropped);
        assert_eq!(clock.next_deadline(), Some(Instant(Duration::from_secs(3))));
        clock.advance(Duration::from_secs(3));
        tokio::time::timeout(Duration::from_secs(10), sleeper)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(clock.next_deadline(), None);
    }

    #[tokio::test]
    async fn past_deadline_resolves_immediately() {
        let clock = ManualClock::new();
        clock.advance(Duration::from_secs(10));
        tokio::time::timeout(
            Duration::from_secs(1),
            clock.sleep_until(Instant(Duration::from_secs(3))),
        )
        .await
        .unwrap();
    }
}
