//! Negative cache: images whose last attempt failed for a reason in their content.
//!
//! A hostile or broken image (unsafe entry, digest mismatch, a limit exceeded, a
//! manifest the registry does not have) fails the same way every time. Without
//! memory, every instance start and every reconcile pass would pull and unpack it
//! again, which is exactly the load a hostile tenant wants. Such a failure is
//! remembered per image (`registry/repository@digest`) and repeated at once, without
//! touching the registry, until its backoff passes: 10 s after the first failure,
//! doubling with each further failure up to 10 min. Transient failures (network,
//! registry errors, timeouts, local disk or tool trouble) are never remembered
//! ([`ImageError::is_content_failure`]); a success forgets the image.
//!
//! Contract: pure bookkeeping in memory; the caller passes the time, so backoff is
//! tested without sleeping. Bounded to [`MAX_REMEMBERED`] images.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::error::ImageError;

/// Backoff after the first content failure.
pub const FIRST_BACKOFF: Duration = Duration::from_secs(10);
/// Longest backoff.
pub const MAX_BACKOFF: Duration = Duration::from_secs(600);
/// Images remembered at most; the one retried soonest is forgotten first.
pub const MAX_REMEMBERED: usize = 4096;

#[derive(Debug)]
struct Failure {
    error: Arc<ImageError>,
    failures: u32,
    backoff: Duration,
    retry_at: Instant,
}

/// Remembered content failures, keyed by image.
#[derive(Debug, Default)]
pub struct FailureCache {
    entries: HashMap<String, Failure>,
}

impl FailureCache {
    /// The remembered failure of `key` while its backoff runs, as an
    /// [`ImageError::CachedFailure`]; `None` when the image may be tried.
    pub fn check(&self, key: &str, now: Instant) -> Option<ImageError> {
        let f = self.entries.get(key)?;
        if now >= f.retry_at {
            return None;
        }
        let left = f.retry_at - now;
        Some(ImageError::CachedFailure {
            error: f.error.clone(),
            failures: f.failures,
            retry_in_secs: left.as_secs() + u64::from(left.subsec_nanos() > 0),
        })
    }

    /// Records the outcome of an attempt at `key`. Returns the backoff applied when
    /// the failure was remembered.
    pub fn record(
        &mut self,
        key: &str,
        outcome: Result<(), &Arc<ImageError>>,
        now: Instant,
    ) -> Option<Duration> {
        let error = match outcome {
            Ok(()) => {
                self.entries.remove(key);
                return None;
            }
            Err(e) if e.is_content_failure() => e.clone(),
            // Transient: the next request tries again (the earlier backoff level,
            // if any, is kept for when the content failure comes back).
            Err(_) => return None,
        };
        let (failures, backoff) = match self.entries.get(key) {
            // A failure long after the last backoff ended starts afresh.
            Some(f) if now < f.retry_at + MAX_BACKOFF * 2 => (
                f.failures.saturating_add(1),
                (f.backoff * 2).min(MAX_BACKOFF),
            ),
            _ => (1, FIRST_BACKOFF),
        };
        if !self.entries.contains_key(key) && self.entries.len() >= MAX_REMEMBERED {
            if let Some(k) = self
                .entries
                .iter()
                .min_by_key(|(_, f)| f.retry_at)
                .map(|(k, _)| k.clone())
            {
                self.entries.remove(&k);
            }
        }
        self.entries.insert(
            key.to_string(),
            Failure {
                error,
                failures,
                backoff,
                retry_at: now + backoff,
            },
        );
        Some(backoff)
    }

    /// Images remembered.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when nothing is remembered.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hostile() -> Arc<ImageError> {
        Arc::new(ImageError::UnsafeEntry {
            layer: "sha256:ab…".into(),
            path: "../x".into(),
            why: "`..` component".into(),
        })
    }

    fn transient() -> Arc<ImageError> {
        Arc::new(ImageError::Registry {
            what: "blob".into(),
            repository: "r".into(),
            cause: "connection reset".into(),
            transient: true,
        })
    }

    #[test]
    fn content_failures_back_off_from_10_s_doubling_to_10_min() {
        let mut c = FailureCache::default();
        let t0 = Instant::now();
        let e = hostile();
        assert_eq!(c.record("img", Err(&e), t0), Some(FIRST_BACKOFF));
        let err = c.check("img", t0 + Duration::from_secs(3)).unwrap();
        let msg = err.to_string();
        assert!(msg.contains("`..` component"), "{msg}");
        assert!(msg.contains("cached failure #1"), "{msg}");
        assert!(msg.contains("not retried for another 7 s"), "{msg}");
        assert_eq!(err.reason(), e.reason());
        assert!(c.check("img", t0 + FIRST_BACKOFF).is_none());
        let mut now = t0 + FIRST_BACKOFF;
        let mut expected = FIRST_BACKOFF;
        for _ in 0..10 {
            expected = (expected * 2).min(MAX_BACKOFF);
            assert_eq!(c.record("img", Err(&e), now), Some(expected));
            now += expected;
        }
        assert_eq!(expected, MAX_BACKOFF);
    }

    #[test]
    fn transient_failures_are_not_remembered_and_success_forgets() {
        let mut c = FailureCache::default();
        let t0 = Instant::now();
        assert_eq!(c.record("img", Err(&transient()), t0), None);
        assert!(c.check("img", t0).is_none());
        let timeout = Arc::new(ImageError::LimitExceeded {
            what: "image x".into(),
            limit: "image_timeout_secs",
            detail: String::new(),
        });
        assert_eq!(c.record("img", Err(&timeout), t0), None);
        assert!(c.is_empty());
        c.record("img", Err(&hostile()), t0);
        c.record("img", Ok(()), t0 + FIRST_BACKOFF);
        assert!(c.is_empty());
    }

    #[test]
    fn memory_is_bounded() {
        let mut c = FailureCache::default();
        let t0 = Instant::now();
        let e = hostile();
        for i in 0..MAX_REMEMBERED + 10 {
            c.record(
                &format!("img{i}"),
                Err(&e),
                t0 + Duration::from_millis(i as u64),
            );
        }
        assert_eq!(c.len(), MAX_REMEMBERED);
        assert!(c.check("img0", t0).is_none(), "oldest forgotten first");
    }
}
