//! Helpers shared by the unit tests. Test-only; nothing here runs in the agent.

/// The one system-test gate of the workspace (`PLFM_REQUIRE_SYSTEM_TESTS=1` turns a
/// missing prerequisite into a failure), shared with the integration tests.
#[path = "../tests/common/gate.rs"]
pub(crate) mod gate;

use std::time::Duration;

use tokio::sync::watch;

/// Waits until a counter a fake (sink, source) bumps on every call reaches `n`; panics
/// after 10 s of real time naming `what`. A condition wait, never a sleep.
pub(crate) async fn count_reaches(rx: &mut watch::Receiver<u32>, n: u32, what: &str) {
    tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|c| *c >= n))
        .await
        .unwrap_or_else(|_| panic!("no {what} {n}"))
        .unwrap_or_else(|_| panic!("the {what} counter is gone"));
}
