//! Secret material: fetching the bound version, validating it against the secrets file
//! format v1 (DESIGN §6), and holding it in memory only until the guest has it.
//!
//! The contract: material lives in [`SecretMaterial`], which zeroizes on drop and never
//! prints its bytes (Debug is redacted); errors name the version, line and key, never a
//! value. This module must not write material to disk or log it.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use base64::Engine as _;
use zeroize::Zeroizing;

use crate::clock::SharedClock;
use crate::instance::ReasonCode;

/// Largest secrets file.
pub const MAX_BYTES: usize = 256 * 1024;
/// Most keys.
pub const MAX_KEYS: usize = 256;
/// Longest key.
pub const MAX_KEY_BYTES: usize = 128;
/// Required first non-empty line.
pub const HEADER: &str = "# TRC_SECRETS_V1";

/// Validated secret material of one version.
pub struct SecretMaterial {
    /// Version id.
    pub version_id: String,
    data: Zeroizing<Vec<u8>>,
}

impl SecretMaterial {
    /// Validates `data` and wraps it. The input is zeroized whatever the outcome.
    pub fn new(version_id: &str, data: Vec<u8>) -> Result<SecretMaterial, SecretsError> {
        let data = Zeroizing::new(data);
        validate(version_id, &data)?;
        Ok(SecretMaterial {
            version_id: version_id.to_string(),
            data,
        })
    }
    /// The file content for the guest.
    pub fn bytes(&self) -> &[u8] {
        &self.data
    }
}

impl fmt::Debug for SecretMaterial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "SecretMaterial {{ version_id: {:?}, data: <{} bytes redacted> }}",
            self.version_id,
            self.data.len()
        )
    }
}

/// A secrets failure. Messages never contain secret values.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretsError {
    /// The version has no material.
    #[error("secret version {version_id} has no material ({detail})")]
    Missing {
        /// Version.
        version_id: String,
        /// Where it was looked for.
        detail: String,
    },
    /// The material does not follow the format.
    #[error("secret version {version_id} is malformed: {detail}")]
    Invalid {
        /// Version.
        version_id: String,
        /// Line, key and rule broken (no values).
        detail: String,
    },
    /// Fetching failed.
    #[error("cannot fetch secret version {version_id}: {detail}")]
    Fetch {
        /// Version.
        version_id: String,
        /// Cause.
        detail: String,
    },
}

impl SecretsError {
    /// The reason code this failure is reported with.
    pub fn reason(&self) -> ReasonCode {
        match self {
            SecretsError::Missing { .. } => ReasonCode::SecretsMissing,
            SecretsError::Invalid { .. } | SecretsError::Fetch { .. } => {
                ReasonCode::SecretsInjectionFailed
            }
        }
    }

    /// The source could not be reached or answered with an error (not 404): a later
    /// fetch will likely succeed, so the instance is retried without spending its
    /// restart budget. A missing or malformed version is final.
    pub fn is_transient(&self) -> bool {
        matches!(self, SecretsError::Fetch { .. })
    }
}

/// Checks the secrets file format v1 without ever echoing a value.
pub fn validate(version_id: &str, data: &[u8]) -> Result<(), SecretsError> {
    let bad = |detail: String| SecretsError::Invalid {
        version_id: version_id.to_string(),
        detail,
    };
    if data.len() > MAX_BYTES {
        return Err(bad(format!(
            "{} bytes exceed the limit of {MAX_BYTES}",
            data.len()
        )));
    }
    let text = std::str::from_utf8(data)
        .map_err(|e| bad(format!("not UTF-8 (at byte {})", e.valid_up_to())))?;
    if text.contains('\0') {
        return Err(bad("contains NUL".into()));
    }
    if text.contains('\r') {
        return Err(bad("contains CR".into()));
    }
    let mut header_seen = false;
    let mut keys = std::collections::BTreeSet::new();
    for (i, line) in text.split('\n').enumerate() {
        let n = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        if !header_seen {
            if line.trim_end() != HEADER {
                return Err(bad(format!(
                    "line {n}: first non-empty line must be {HEADER:?}"
                )));
            }
            header_seen = true;
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            return Err(bad(format!("line {n}: expected KEY=VALUE")));
        };
        if key.len() > MAX_KEY_BYTES {
            return Err(bad(format!(
                "line {n}: key longer than {MAX_KEY_BYTES} bytes"
            )));
        }
        let mut chars = key.chars();
        let first_ok = chars
            .next()
            .is_some_and(|c| c.is_ascii_uppercase() || c == '_');
        if !first_ok || !chars.all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_') {
            // What stands before `=` is not a key: it may be secret material (a PEM or
            // base64 line with `=` padding), so it is never shown; only where and why.
            return Err(bad(format!(
                "line {n}: the {} bytes before '=' are not a key ([A-Z_][A-Z0-9_]*; not shown)",
                key.len()
            )));
        }
        if let Some(b64) = value.strip_prefix("base64:") {
            if base64::engine::general_purpose::STANDARD
                .decode(b64)
                .is_err()
            {
                return Err(bad(format!("line {n}: value of {key} is not valid base64")));
            }
        }
        if !keys.insert(key) {
            return Err(bad(format!("line {n}: duplicate key {key}")));
        }
        if keys.len() > MAX_KEYS {
            return Err(bad(format!("more than {MAX_KEYS} keys")));
        }
    }
    if !header_seen {
        return Err(bad(format!("missing header {HEADER:?}")));
    }
    Ok(())
}

/// Where secret material comes from.
#[async_trait]
pub trait SecretsSource: Send + Sync + 'static {
    /// Fetches and validates one version.
    async fn fetch(&self, version_id: &str) -> Result<SecretMaterial, SecretsError>;
}

/// Fetch attempts of [`RetryingSecrets::new`].
pub const FETCH_ATTEMPTS: u32 = 3;
/// Wait before the second attempt; doubles before each further one.
pub const FETCH_RETRY_FIRST: Duration = Duration::from_millis(500);

/// Retries another source's transient failures ([`SecretsError::Fetch`]) with backoff
/// on the injected clock; a missing or malformed version is final and returned at once.
pub struct RetryingSecrets {
    inner: Arc<dyn SecretsSource>,
    clock: SharedClock,
    attempts: u32,
}

impl RetryingSecrets {
    /// `inner` with [`FETCH_ATTEMPTS`] attempts, waiting [`FETCH_RETRY_FIRST`], then
    /// twice as long, between them.
    pub fn new(inner: Arc<dyn SecretsSource>, clock: SharedClock) -> Self {
        RetryingSecrets {
            inner,
            clock,
            attempts: FETCH_ATTEMPTS,
        }
    }
}

#[async_trait]
impl SecretsSource for RetryingSecrets {
    async fn fetch(&self, version_id: &str) -> Result<SecretMaterial, SecretsError> {
        let mut delay = FETCH_RETRY_FIRST;
        let mut attempt = 1;
        loop {
            match self.inner.fetch(version_id).await {
                Err(e @ SecretsError::Fetch { .. }) if attempt < self.attempts => {
                    tracing::warn!(version = version_id, attempt, retry_in_ms = delay.as_millis() as u64, error = %e, "secret fetch failed");
                    self.clock.sleep(delay).await;
                    delay *= 2;
                    attempt += 1;
                }
                other => return other,
            }
        }
    }
}

/// Standalone mode: `<desired_dir>/secrets/<version_id>.env`.
pub struct DirSecrets {
    dir: PathBuf,
}

impl DirSecrets {
    /// Reads versions from `dir`.
    pub fn new(dir: PathBuf) -> Self {
        DirSecrets { dir }
    }
}

#[async_trait]
impl SecretsSource for DirSecrets {
    async fn fetch(&self, version_id: &str) -> Result<SecretMaterial, SecretsError> {
        // version ids are validated like instance ids (no '/', no '..') in `spec`.
        let path = self.dir.join(format!("{version_id}.env"));
        let version = version_id.to_string();
        let data = tokio::task::spawn_blocking(move || -> Result<Vec<u8>, SecretsError> {
            use std::io::Read;
            let file = match std::fs::File::open(&path) {
                Ok(f) => f,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    return Err(SecretsError::Missing {
                        version_id: version.clone(),
                        detail: format!("{} does not exist", path.display()),
                    })
                }
                Err(e) => {
                    return Err(SecretsError::Fetch {
                        version_id: version.clone(),
                        detail: format!("{}: {e}", path.display()),
                    })
                }
            };
            let mut buf = Vec::new();
            file.take(MAX_BYTES as u64 + 1)
                .read_to_end(&mut buf)
                .map_err(|e| SecretsError::Fetch {
                    version_id: version.clone(),
                    detail: format!("{}: {e}", path.display()),
                })?;
            Ok(buf)
        })
        .await
        .map_err(|e| SecretsError::Fetch {
            version_id: version_id.to_string(),
            detail: e.to_string(),
        })??;
        SecretMaterial::new(version_id, data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "# TRC_SECRETS_V1\nDB_PASSWORD=hunter2\nTOKEN=base64:aGVsbG8=\n";

    #[test]
    fn valid_file_passes() {
        validate("v1", GOOD.as_bytes()).unwrap();
    }

    #[test]
    fn header_is_required() {
        let e = validate("v1", b"DB=x\n").unwrap_err();
        assert!(e.to_string().contains("TRC_SECRETS_V1"));
    }

    #[test]
    fn errors_never_contain_values() {
        let cases: [&[u8]; 6] = [
            b"# TRC_SECRETS_V1\nlower=s3cr3tvalue\n",
            // A PEM body line with '=' padding where a KEY=VALUE line should be: what
            // stands before '=' is secret material too.
            b"# TRC_SECRETS_V1\nMIIEs3cr3tvalueBADANBgkqhkiG9w0BAQEFAASC==\n",
            b"# TRC_SECRETS_V1\nA=1\ns3cr3tvalue-in-a-bad-key=x\n",
            b"# TRC_SECRETS_V1\nA=s3cr3tvalue\nA=s3cr3tvalue\n",
            b"# TRC_SECRETS_V1\nA=base64:s3cr3tvalue!!\n",
            b"# TRC_SECRETS_V1\nA=s3cr3tvalue\r\n",
        ];
        for c in cases {
            let e = validate("v1", c).unwrap_err().to_string();
            assert!(!e.contains("s3cr3tvalue"), "{e}");
            assert_eq!(
                SecretsError::Invalid {
                    version_id: "v1".into(),
                    detail: String::new()
                }
                .reason(),
                ReasonCode::SecretsInjectionFailed
            );
        }
    }

    #[test]
    fn limits_are_enforced() {
        let mut many = String::from("# TRC_SECRETS_V1\n");
        for i in 0..=MAX_KEYS {
            many.push_str(&format!("K{i}=v\n"));
        }
        assert!(validate("v1", many.as_bytes())
            .unwrap_err()
            .to_string()
            .contains("keys"));
        let long_key = format!("# TRC_SECRETS_V1\n{}=v\n", "K".repeat(MAX_KEY_BYTES + 1));
        assert!(validate("v1", long_key.as_bytes()).is_err());
        let big = format!("# TRC_SECRETS_V1\nA={}\n", "x".repeat(MAX_BYTES));
        assert!(validate("v1", big.as_bytes())
            .unwrap_err()
            .to_string()
            .contains("limit"));
    }

    #[test]
    fn debug_is_redacted() {
        let m = SecretMaterial::new("v1", GOOD.as_bytes().to_vec()).unwrap();
        let dbg = format!("{m:?}");
        assert!(!dbg.contains("hunter2"), "{dbg}");
    }

    /// A source whose next answers are scripted; counts its fetches.
    struct Scripted {
        answers: std::sync::Mutex<Vec<Result<SecretMaterial, SecretsError>>>,
        fetches: tokio::sync::watch::Sender<u32>,
    }

    #[async_trait]
    impl SecretsSource for Scripted {
        async fn fetch(&self, version_id: &str) -> Result<SecretMaterial, SecretsError> {
            self.fetches.send_modify(|n| *n += 1);
            self.answers.lock().unwrap().remove(0).map_err(|e| match e {
                SecretsError::Fetch { detail, .. } => SecretsError::Fetch {
                    version_id: version_id.into(),
                    detail,
                },
                other => other,
            })
        }
    }

    fn unreachable_cp() -> Result<SecretMaterial, SecretsError> {
        Err(SecretsError::Fetch {
            version_id: String::new(),
            detail: "connection refused".into(),
        })
    }

    fn scripted(
        answers: Vec<Result<SecretMaterial, SecretsError>>,
    ) -> (Arc<Scripted>, tokio::sync::watch::Receiver<u32>) {
        let (fetches, rx) = tokio::sync::watch::channel(0);
        let source = Arc::new(Scripted {
            answers: std::sync::Mutex::new(answers),
            fetches,
        });
        (source, rx)
    }

    /// Transient failures are retried after 0.5 s and then 1 s on the injected clock,
    /// never earlier; the third failure is final.
    #[tokio::test]
    async fn transient_fetch_failures_are_retried_on_the_clock() {
        use crate::clock::{Clock, ManualClock};
        use crate::testing::count_reaches;
        let good = || SecretMaterial::new("v1", GOOD.as_bytes().to_vec());
        for (answers, succeeds) in [
            (vec![unreachable_cp(), unreachable_cp(), good()], true),
            (
                vec![unreachable_cp(), unreachable_cp(), unreachable_cp()],
                false,
            ),
        ] {
            let clock = Arc::new(ManualClock::new());
            let (source, mut fetches) = scripted(answers);
            let retrying = RetryingSecrets::new(source, clock.clone());
            let fetch = tokio::spawn(async move { retrying.fetch("v1").await });
            for (n, wait) in [(1, FETCH_RETRY_FIRST), (2, FETCH_RETRY_FIRST * 2)] {
                count_reaches(&mut fetches, n, "fetch").await;
                let wake = clock
                    .parked(Duration::from_secs(10))
                    .await
                    .expect("a failed fetch waits on the injected clock");
                assert_eq!(wake.since(clock.now()), wait);
                clock.advance(wait - Duration::from_millis(1));
                assert_eq!(*fetches.borrow(), n, "retried before the wait ended");
                assert!(!fetch.is_finished());
                clock.advance(Duration::from_millis(1));
            }
            let result = tokio::time::timeout(Duration::from_secs(10), fetch)
                .await
                .expect("the third attempt ends the fetch")
                .unwrap();
            assert_eq!(*fetches.borrow(), 3);
            match result {
                Ok(m) => assert!(succeeds && m.bytes() == GOOD.as_bytes()),
                Err(e) => assert!(!succeeds && matches!(e, SecretsError::Fetch { .. }), "{e}"),
            }
        }
    }

    /// Missing or malformed material is final: no retry, no wait.
    #[tokio::test]
    async fn missing_or_malformed_versions_are_not_retried() {
        let clock = Arc::new(crate::clock::ManualClock::new());
        let missing = Err(SecretsError::Missing {
            version_id: "v1".into(),
            detail: "404".into(),
        });
        let malformed = SecretMaterial::new("v1", b"nope".to_vec());
        for answer in [missing, malformed] {
            let (source, fetches) = scripted(vec![answer]);
            let retrying = RetryingSecrets::new(source, clock.clone());
            let e = retrying.fetch("v1").await.unwrap_err();
            assert!(!matches!(e, SecretsError::Fetch { .. }), "{e}");
            assert_eq!(*fetches.borrow(), 1);
            assert_eq!(clock.next_deadline(), None);
        }
    }

    #[tokio::test]
    async fn dir_source_maps_missing_and_malformed() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("good.env"), GOOD).unwrap();
        std::fs::write(dir.path().join("bad.env"), "nope").unwrap();
        let src = DirSecrets::new(dir.path().to_path_buf());
        assert_eq!(src.fetch("good").await.unwrap().bytes(), GOOD.as_bytes());
        assert_eq!(
            src.fetch("absent").await.unwrap_err().reason(),
            ReasonCode::SecretsMissing
        );
        assert_eq!(
            src.fetch("bad").await.unwrap_err().reason(),
            ReasonCode::SecretsInjectionFailed
        );
    }
}
