//! Reloading the control-plane client's TLS material (CA bundle, client certificate and
//! key) and bearer token when their files change, without a restart.
//!
//! The contract: the files are watched by path, polling `stat` every
//! `control_plane.reload_interval_ms` for a different device, inode, size, mtime or
//! ctime, so an atomic rename (cert-manager, step, Vault agent), a symlink swap (a
//! Kubernetes secret volume) and an in-place write are all seen; inotify would watch
//! the inode that a rename replaces, and polling four `stat`s costs nothing at this
//! rate. A change is acted on once the files have looked the same for two polls in a
//! row, so a certificate and its key written one after the other are loaded together.
//! Then all of them are read and checked (PEM parses, the key matches the certificate,
//! the token is not empty) and only a complete, consistent set replaces the old one:
//! on any error the old material stays in use, the error is logged naming the file and
//! the cause, counted in `plfm_agent_cert_reload_total{outcome="error"}` and shown by
//! `status` until a later reload succeeds. The token's value is never logged or shown.
//! `plfm_agent_cert_expiry_seconds` follows the certificate in use, and a warning is
//! logged when it expires within 7 days (at most once a day).

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::http::{read_token, ControlPlaneClient};
use crate::metrics::{Metrics, OutcomeLabel};

/// Below this, the certificate's expiry is warned about.
pub const EXPIRY_WARNING: Duration = Duration::from_secs(7 * 24 * 3600);
/// At most one expiry warning per this period.
const WARN_EVERY: Duration = Duration::from_secs(24 * 3600);

/// The client certificate in use.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertInfo {
    /// Its file.
    pub file: PathBuf,
    /// Subject (e.g. `CN=node-1`).
    pub subject: String,
    /// Serial number (hex).
    pub serial: String,
    /// notAfter (RFC 3339).
    pub not_after: String,
    /// notAfter (Unix seconds).
    pub not_after_unix: i64,
}

/// The last failed reload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReloadFailure {
    /// When (RFC 3339).
    pub at: String,
    /// What is wrong, naming the file (never a secret).
    pub message: String,
}

/// What the reloader did last, for `status` and `/healthz`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReloadView {
    /// The client certificate in use, if any.
    pub client_cert: Option<CertInfo>,
    /// The last successful reload (RFC 3339); none since the start.
    pub last_reload_at: Option<String>,
    /// The last reload error, kept until a later reload succeeds; the previous
    /// material stays in use meanwhile.
    pub last_error: Option<ReloadFailure>,
}

/// Shared reload state.
#[derive(Debug, Default)]
pub struct ReloadStatus {
    view: Mutex<ReloadView>,
}

impl ReloadStatus {
    /// A copy of the current state.
    pub fn view(&self) -> ReloadView {
        self.view.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub(crate) fn set_cert(&self, info: CertInfo, metrics: &Metrics) {
        let left = (info.not_after_unix - chrono::Utc::now().timestamp()) as f64;
        metrics.cert_expiry_seconds.set(left);
        self.view
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .client_cert = Some(info);
    }

    fn succeeded(&self, cert: Option<CertInfo>, metrics: &Metrics) {
        let left = match &cert {
            Some(c) => (c.not_after_unix - chrono::Utc::now().timestamp()) as f64,
            None => f64::INFINITY,
        };
        metrics.cert_expiry_seconds.set(left);
        let mut v = self.view.lock().unwrap_or_else(|e| e.into_inner());
        v.client_cert = cert;
        v.last_reload_at = Some(now_rfc3339());
        v.last_error = None;
    }

    fn failed(&self, message: String) {
        self.view
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .last_error = Some(ReloadFailure {
            at: now_rfc3339(),
            message,
        });
    }
}

fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// Reads the first certificate of a PEM file: subject, serial and notAfter.
pub fn cert_not_after(path: &Path) -> Result<CertInfo, String> {
    use rustls_pki_types::pem::PemObject;
    let named = |e: &dyn std::fmt::Display| {
        format!("control_plane.client_cert_file {}: {e}", path.display())
    };
    let der = rustls_pki_types::CertificateDer::from_pem_file(path).map_err(|e| named(&e))?;
    let (_, cert) = x509_parser::parse_x509_certificate(&der).map_err(|e| named(&e))?;
    let not_after = cert.validity().not_after.timestamp();
    Ok(CertInfo {
        file: path.to_path_buf(),
        subject: cert.subject().to_string(),
        serial: cert.raw_serial_as_string().replace(':', ""),
        not_after: chrono::DateTime::from_timestamp(not_after, 0)
            .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
            .unwrap_or_default(),
        not_after_unix: not_after,
    })
}

/// What `stat` says of a path (following symlinks), `None` when it is missing.
type Fingerprint = Option<(u64, u64, u64, i64, i64, i64, i64)>;

fn fingerprint(path: &Path) -> Fingerprint {
    let m = std::fs::metadata(path).ok()?;
    Some((
        m.dev(),
        m.ino(),
        m.size(),
        m.mtime(),
        m.mtime_nsec(),
        m.ctime(),
        m.ctime_nsec(),
    ))
}

/// Reads, checks and installs the client's material; on error nothing changes.
fn reload(client: &ControlPlaneClient) -> Result<Option<CertInfo>, String> {
    let (files, token_file) = client.material_files();
    let tls = files.load().map_err(|e| e.to_string())?;
    let cert = files.cert.as_deref().map(cert_not_after).transpose()?;
    let token = token_file
        .map(read_token)
        .transpose()
        .map_err(|e| e.to_string())?;
    client.install(tls, token).map_err(|e| e.to_string())?;
    Ok(cert)
}

/// Polls the client's material files and reloads them when they change, until
/// `shutdown`. Also keeps `plfm_agent_cert_expiry_seconds` current and warns about a
/// certificate that expires within [`EXPIRY_WARNING`].
pub async fn run_reloader(
    client: Arc<ControlPlaneClient>,
    interval: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let paths: Vec<PathBuf> = {
        let (files, token) = client.material_files();
        [&files.ca, &files.cert, &files.key]
            .into_iter()
            .flatten()
            .cloned()
            .chain(token.map(Path::to_path_buf))
            .collect()
    };
    if paths.is_empty() {
        return;
    }
    let status = client.reload_status();
    let mut current: Vec<Fingerprint> = paths.iter().map(|p| fingerprint(p)).collect();
    let mut pending: Option<Vec<Fingerprint>> = None;
    let mut last_warning: Option<Instant> = None;
    loop {
        check_expiry(&status, client.metrics(), &mut last_warning);
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = shutdown.changed() => return,
        }
        let seen: Vec<Fingerprint> = paths.iter().map(|p| fingerprint(p)).collect();
        if seen == current {
            pending = None;
            continue;
        }
        if pending.as_ref() != Some(&seen) {
            // Changed since the last poll: wait until the writer is done with the set.
            pending = Some(seen);
            continue;
        }
        pending = None;
        current = seen;
        let reloaded = {
            let client = client.clone();
            tokio::task::spawn_blocking(move || reload(&client))
                .await
                .unwrap_or_else(|e| Err(format!("reload task failed: {e}")))
        };
        match reloaded {
            Ok(cert) => {
                client
                    .metrics()
                    .cert_reloads
                    .get_or_create(&OutcomeLabel { outcome: "ok" })
                    .inc();
                tracing::info!(
                    subject = cert.as_ref().map(|c| c.subject.as_str()).unwrap_or(""),
                    serial = cert.as_ref().map(|c| c.serial.as_str()).unwrap_or(""),
                    not_after = cert.as_ref().map(|c| c.not_after.as_str()).unwrap_or(""),
                    "control-plane TLS material and token reloaded; new connections use them"
                );
                status.succeeded(cert, client.metrics());
                last_warning = None;
            }
            Err(message) => {
                client
                    .metrics()
                    .cert_reloads
                    .get_or_create(&OutcomeLabel { outcome: "error" })
                    .inc();
                tracing::error!(error = %message, "control-plane TLS material or token changed but cannot be loaded; the previous material stays in use");
                status.failed(message);
            }
        }
    }
}

fn check_expiry(status: &ReloadStatus, metrics: &Metrics, last_warning: &mut Option<Instant>) {
    let Some(cert) = status.view().client_cert else {
        return;
    };
    let left = cert.not_after_unix - chrono::Utc::now().timestamp();
    metrics.cert_expiry_seconds.set(left as f64);
    if left < EXPIRY_WARNING.as_secs() as i64
        && last_warning.is_none_or(|t| t.elapsed() >= WARN_EVERY)
    {
        *last_warning = Some(Instant::now());
        tracing::warn!(
            file = %cert.file.display(),
            subject = %cert.subject,
            not_after = %cert.not_after,
            days_left = left / 86_400,
            "the control-plane client certificate expires within 7 days; renew it (the agent reloads it when its file changes)"
        );
    }
}
