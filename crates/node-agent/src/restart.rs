//! Restart policy and backoff (DESIGN §2): whether an instance that failed or exited is
//! booted again, after how long, and when the restart budget is spent.
//!
//! Pure: time comes in as an argument. Backoff doubles from 1 s to 5 min; the count of
//! consecutive failures resets after 10 min of `ready`; once more than `max_retries`
//! consecutive failures happened, the answer is [`RestartDecision::CrashLoop`].

use std::time::Duration;

use crate::clock::Instant;
use crate::spec::RestartPolicy;

/// First backoff.
pub const INITIAL_BACKOFF: Duration = Duration::from_secs(1);
/// Longest backoff.
pub const MAX_BACKOFF: Duration = Duration::from_secs(300);
/// Time in `ready` after which past failures are forgotten.
pub const RESET_AFTER_READY: Duration = Duration::from_secs(600);

/// How an instance ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// The workload exited with code 0 by itself.
    CleanExit,
    /// Anything else: non-zero exit, OOM, health check, VMM or preparation failure.
    Failure,
    /// A preparation failure outside the instance that will likely pass (control
    /// plane or registry unreachable, 5xx, timeout): retried after
    /// [`transient_backoff`] whatever the restart policy, and never counted against
    /// `max_retries`, so an outage of any length ends with the instance booting.
    Transient,
}

/// What to do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestartDecision {
    /// Boot again after this delay.
    RestartAfter(Duration),
    /// The policy says no restart: stay stopped/failed until the spec changes.
    Stay,
    /// Restart budget spent: `crash_loop_backoff` until the spec changes.
    CrashLoop,
}

/// Longest wait between retries after transient failures: short, so an instance boots
/// soon after an outage ends.
pub const MAX_TRANSIENT_BACKOFF: Duration = Duration::from_secs(60);

/// Restart bookkeeping of one instance.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RestartTracker {
    consecutive: u32,
    /// Transient failures in a row (not persisted: they spend no budget).
    transient: u32,
    ready_since: Option<Instant>,
}

impl RestartTracker {
    /// The instance became ready at `now`.
    pub fn on_ready(&mut self, now: Instant) {
        self.ready_since = Some(now);
        self.transient = 0;
    }

    /// Bookkeeping restored after an agent restart: `consecutive` failures already
    /// counted (the persisted count), not ready since.
    pub fn resume(consecutive: u32) -> Self {
        RestartTracker {
            consecutive,
            transient: 0,
            ready_since: None,
        }
    }

    /// Consecutive failures counted so far.
    pub fn consecutive(&self) -> u32 {
        self.consecutive
    }

    /// Forgets everything (new spec).
    pub fn reset(&mut self) {
        *self = RestartTracker::default();
    }

    /// Decides what follows an ending at `now`.
    pub fn on_end(
        &mut self,
        ending: Ending,
        policy: RestartPolicy,
        max_retries: u32,
        now: Instant,
    ) -> RestartDecision {
        if ending == Ending::Transient {
            self.transient = self.transient.saturating_add(1);
            return RestartDecision::RestartAfter(transient_backoff(self.transient));
        }
        self.transient = 0;
        if let Some(since) = self.ready_since.take() {
            if now.since(since) >= RESET_AFTER_READY {
                self.consecutive = 0;
            }
        }
        let restart = !matches!(
            (policy, ending),
            (RestartPolicy::Never, _) | (RestartPolicy::OnFailure, Ending::CleanExit)
        );
        if !restart {
            return RestartDecision::Stay;
        }
        self.consecutive += 1;
        if self.consecutive > max_retries {
            return RestartDecision::CrashLoop;
        }
        RestartDecision::RestartAfter(backoff(self.consecutive))
    }
}

/// Backoff before the `n`-th consecutive restart (1-based): 1 s, 2 s, 4 s, … 5 min.
pub fn backoff(n: u32) -> Duration {
    let exp = n.saturating_sub(1).min(16);
    INITIAL_BACKOFF.saturating_mul(1 << exp).min(MAX_BACKOFF)
}

/// Wait before the retry after the `n`-th transient failure in a row: 1 s, 2 s, 4 s, …
/// up to [`MAX_TRANSIENT_BACKOFF`].
pub fn transient_backoff(n: u32) -> Duration {
    backoff(n).min(MAX_TRANSIENT_BACKOFF)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: u64) -> Instant {
        Instant(Duration::from_secs(s))
    }

    #[test]
    fn backoff_doubles_and_caps_at_five_minutes() {
        let secs: Vec<u64> = (1..=12).map(|n| backoff(n).as_secs()).collect();
        assert_eq!(secs, vec![1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300, 300]);
        assert_eq!(backoff(1000), MAX_BACKOFF);
    }

    #[test]
    fn transient_failures_never_spend_the_budget_and_back_off_to_a_minute() {
        let mut t = RestartTracker::default();
        let d: Vec<_> = (0..20)
            .map(|i| t.on_end(Ending::Transient, RestartPolicy::Never, 0, at(i)))
            .collect();
        let delays: Vec<u64> = d
            .iter()
            .map(|d| match d {
                RestartDecision::RestartAfter(d) => d.as_secs(),
                other => panic!("a transient failure must be retried: {other:?}"),
            })
            .collect();
        assert_eq!(&delays[..8], &[1, 2, 4, 8, 16, 32, 60, 60]);
        assert_eq!(t.consecutive(), 0, "no budget spent");
        // A real failure afterwards is the first one counted.
        assert_eq!(
            t.on_end(Ending::Failure, RestartPolicy::Always, 3, at(30)),
            RestartDecision::RestartAfter(Duration::from_secs(1))
        );
        assert_eq!(t.consecutive(), 1);
    }

    #[test]
    fn budget_spent_after_max_retries() {
        let mut t = RestartTracker::default();
        let d: Vec<_> = (0..4)
            .map(|i| t.on_end(Ending::Failure, RestartPolicy::Always, 3, at(i)))
            .collect();
        assert_eq!(
            d,
            vec![
                RestartDecision::RestartAfter(Duration::from_secs(1)),
                RestartDecision::RestartAfter(Duration::from_secs(2)),
                RestartDecision::RestartAfter(Duration::from_secs(4)),
                RestartDecision::CrashLoop,
            ]
        );
    }

    #[test]
    fn policies() {
        let mut t = RestartTracker::default();
        assert_eq!(
            t.on_end(Ending::Failure, RestartPolicy::Never, 3, at(0)),
            RestartDecision::Stay
        );
        assert_eq!(
            t.on_end(Ending::CleanExit, RestartPolicy::OnFailure, 3, at(0)),
            RestartDecision::Stay
        );
        assert!(matches!(
            t.on_end(Ending::Failure, RestartPolicy::OnFailure, 3, at(0)),
            RestartDecision::RestartAfter(_)
        ));
        assert!(matches!(
            t.on_end(Ending::CleanExit, RestartPolicy::Always, 3, at(0)),
            RestartDecision::RestartAfter(_)
        ));
    }

    #[test]
    fn ten_minutes_ready_resets_the_count() {
        let mut t = RestartTracker::default();
        for i in 0..3 {
            t.on_end(Ending::Failure, RestartPolicy::Always, 3, at(i));
        }
        t.on_ready(at(100));
        // 9 minutes of ready is not enough.
        assert_eq!(
            t.on_end(Ending::Failure, RestartPolicy::Always, 3, at(100 + 540)),
            RestartDecision::CrashLoop
        );
        let mut t = RestartTracker::default();
        for i in 0..3 {
            t.on_end(Ending::Failure, RestartPolicy::Always, 3, at(i));
        }
        t.on_ready(at(100));
        assert_eq!(
            t.on_end(Ending::Failure, RestartPolicy::Always, 3, at(100 + 600)),
            RestartDecision::RestartAfter(Duration::from_secs(1))
        );
    }
}
