//! The supervisor's writes to the state store (desired state, operator stops, node
//! drain), applied in the order they were asked for by one task of their own, so a
//! stuck store (a full disk, a lock another process holds, a hung device) delays only
//! the write and never the supervisor: it waits at most [`STORE_WAIT`] for each, then
//! goes on while the write stays queued and is retried until the store takes it.
//!
//! What it must not do: decide anything from what it writes, or reorder writes (a
//! later write of the same row must land last).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use crate::clock::SharedClock;
use crate::state::{Store, StoreError};

/// The longest the supervisor waits for one of its writes before it goes on.
pub const STORE_WAIT: Duration = Duration::from_secs(1);
/// Writes queued at most; beyond that a write is dropped with an error log (the store
/// has then been stuck for hundreds of supervisor writes).
const QUEUE: usize = 256;
/// Retry delays of a failed write: doubling from the first to the last.
const RETRY_FIRST: Duration = Duration::from_millis(50);
const RETRY_MAX: Duration = Duration::from_secs(5);

/// One write: what it is (for logs) and the store call, which may run more than once.
type Op = Arc<dyn Fn(&Store) -> Result<(), StoreError> + Send + Sync>;

/// Handle to the writer task.
pub(super) struct Writer {
    tx: mpsc::Sender<(&'static str, Op, oneshot::Sender<()>)>,
}

impl Writer {
    /// Starts the task writing to `store` (retries sleep on `clock`).
    pub(super) fn start(store: Store, clock: SharedClock) -> Writer {
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(run(store, clock, rx));
        Writer { tx }
    }

    /// Queues `op` and waits until it is durable, or [`STORE_WAIT`] at most (it is
    /// then written later, in order). `what` names it in logs.
    pub(super) async fn write(
        &self,
        what: &'static str,
        op: impl Fn(&Store) -> Result<(), StoreError> + Send + Sync + 'static,
    ) {
        let (done, durable) = oneshot::channel();
        let deadline = tokio::time::Instant::now() + STORE_WAIT;
        match tokio::time::timeout_at(deadline, self.tx.send((what, Arc::new(op), done))).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => {
                tracing::error!(what, "state store writer is gone; write lost");
                return;
            }
            Err(_) => {
                tracing::error!(
                    what,
                    "state store is stuck and {QUEUE} writes are queued; this write is dropped"
                );
                return;
            }
        }
        if tokio::time::timeout_at(deadline, durable).await.is_err() {
            tracing::warn!(
                what,
                "state store did not take the write within {STORE_WAIT:?}; going on, it stays queued"
            );
        }
    }
}

async fn run(
    store: Store,
    clock: SharedClock,
    mut rx: mpsc::Receiver<(&'static str, Op, oneshot::Sender<()>)>,
) {
    while let Some((what, op, done)) = rx.recv().await {
        let mut delay = RETRY_FIRST;
        loop {
            let call = op.clone();
            match store.call(move |s| call(s)).await {
                Ok(()) => break,
                Err(e) => {
                    tracing::error!(what, error = %e, "cannot persist; retrying");
                    clock.sleep(delay).await;
                    delay = (delay * 2).min(RETRY_MAX);
                }
            }
        }
        let _ = done.send(());
    }
}
