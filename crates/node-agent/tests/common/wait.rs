//! Waiting for a condition with a deadline: the one poll loop of the tests and benches.
//!
//! A probe returns `Ok(value)` once the condition holds, or `Err(seen)` with what it
//! observed instead; on timeout the wait panics naming what it waited for and the last
//! `seen` (its `Debug`, formatted only then). [`settle`] is the other half: it proves
//! that nothing *more* happens, by running the runtime until it is idle.
#![allow(dead_code)]

use std::fmt::Debug;
use std::time::{Duration, Instant};

/// How often a condition is checked unless the caller says otherwise.
pub const EVERY: Duration = Duration::from_millis(10);

/// A wait: how long at most, and how often to check.
#[derive(Debug, Clone, Copy)]
pub struct Poll {
    pub within: Duration,
    pub every: Duration,
}

impl Poll {
    /// Gives up after `within`, checking every [`EVERY`].
    pub const fn within(within: Duration) -> Poll {
        Poll {
            within,
            every: EVERY,
        }
    }

    /// Checks every `every` instead.
    pub const fn every(self, every: Duration) -> Poll {
        Poll { every, ..self }
    }

    /// As [`Poll::until_async`], but each check comes after [`settle`] and `between`
    /// (say, a manual clock step) runs between checks instead of a sleep: when it
    /// returns, what `probe` waited for happened after the last `between`.
    pub async fn until_settled<T, S: Debug>(
        self,
        what: &str,
        mut between: impl FnMut(),
        mut probe: impl FnMut() -> Result<T, S>,
    ) -> T {
        let deadline = Instant::now() + self.within;
        loop {
            settle().await;
            match probe() {
                Ok(v) => return v,
                Err(seen) if Instant::now() >= deadline => self.timed_out(what, &seen),
                Err(_) => between(),
            }
        }
    }

    fn timed_out(&self, what: &str, seen: &dyn Debug) -> ! {
        panic!(
            "timed out after {:?} waiting for {what}; last observed: {seen:#?}",
            self.within
        )
    }

    /// Blocks the thread until `probe` returns `Ok`, and returns its value.
    pub fn until<T, S: Debug>(self, what: &str, probe: impl FnMut() -> Result<T, S>) -> T {
        self.try_until(probe)
            .unwrap_or_else(|seen| self.timed_out(what, &seen))
    }

    /// As [`Poll::until`], but gives up quietly: `Err` with the last observation.
    pub fn try_until<T, S>(self, mut probe: impl FnMut() -> Result<T, S>) -> Result<T, S> {
        let deadline = Instant::now() + self.within;
        loop {
            match probe() {
                Ok(v) => return Ok(v),
                Err(seen) if Instant::now() >= deadline => return Err(seen),
                Err(_) => std::thread::sleep(self.every),
            }
        }
    }

    /// As [`Poll::until`], sleeping on tokio's timer between checks.
    pub async fn until_async<T, S: Debug>(
        self,
        what: &str,
        probe: impl FnMut() -> Result<T, S>,
    ) -> T {
        self.try_until_async(probe)
            .await
            .unwrap_or_else(|seen| self.timed_out(what, &seen))
    }

    /// As [`Poll::try_until`], sleeping on tokio's timer between checks.
    pub async fn try_until_async<T, S>(
        self,
        mut probe: impl FnMut() -> Result<T, S>,
    ) -> Result<T, S> {
        let deadline = Instant::now() + self.within;
        loop {
            match probe() {
                Ok(v) => return Ok(v),
                Err(seen) if Instant::now() >= deadline => return Err(seen),
                Err(_) => tokio::time::sleep(self.every).await,
            }
        }
    }
}

/// Blocks until `probe` returns `Ok` (checked every [`EVERY`]); panics after `within`
/// with `what` and the last `Err` it returned.
pub fn poll_until<T, S: Debug>(
    what: &str,
    within: Duration,
    probe: impl FnMut() -> Result<T, S>,
) -> T {
    Poll::within(within).until(what, probe)
}

/// The async [`poll_until`].
pub async fn poll_until_async<T, S: Debug>(
    what: &str,
    within: Duration,
    probe: impl FnMut() -> Result<T, S>,
) -> T {
    Poll::within(within).until_async(what, probe).await
}

/// `cond` as a probe: `Err("still false")` until it holds.
pub fn holds(cond: bool) -> Result<(), &'static str> {
    if cond {
        Ok(())
    } else {
        Err("the condition is still false")
    }
}

/// Blocks until `cond` holds; panics after `within` naming `what`.
pub fn wait_until(what: &str, within: Duration, mut cond: impl FnMut() -> bool) {
    poll_until(what, within, || holds(cond()))
}

/// The async [`wait_until`].
pub async fn wait_until_async(what: &str, within: Duration, mut cond: impl FnMut() -> bool) {
    poll_until_async(what, within, || holds(cond())).await
}

/// Runs every task of the current-thread tokio runtime until all of them wait for
/// something no task will do (the manual clock, the test itself): returns only when
/// the runtime is idle, with no blocking task (state store call) in flight.
///
/// This is how a test proves that something did *not* happen: after `settle`, every
/// consequence of what the test did so far has happened, so an assertion that a count
/// stayed the same is no longer a bet on a sleep being long enough. It pauses tokio's
/// clock (which then only moves when the runtime is idle, and not while a blocking task
/// runs) for the duration of a 1 ms sleep and resumes it. Panics outside a
/// current-thread runtime (`#[tokio::test]` without `flavor`).
pub async fn settle() {
    tokio::time::pause();
    tokio::time::sleep(Duration::from_millis(1)).await;
    tokio::time::resume();
}
