//! The one owner of the node's WireGuard interface in the daemon (DESIGN §8a): it takes
//! the overlay configuration from its source, applies it through the device, keeps the
//! last good one on disk, checks the device for drift on a timer, and publishes what it
//! sees ([`super::status`]).
//!
//! Sources ([`Source`]): connected mode `GET /v1/nodes/{node_id}/overlay` ([`CpSource`];
//! 404 means the control plane has no overlay service: the overlay is off, logged once
//! and asked again every [`OFF_RETRY`]; any other failure keeps what is applied);
//! standalone mode `<desired_dir>/overlay.json` ([`FileSource`]; re-read when its size,
//! mtime or inode change; a missing file means the overlay is off).
//!
//! Decisions ([`Owner`]): a document is parsed with [`super::config::parse`]; refused
//! peers are logged one by one and kept out, the rest applied; a document refused whole
//! keeps what is applied; a generation lower than the applied one is ignored (stale).
//! A usable document is written atomically to `<data_dir>/overlay/last-good.json`
//! before it is applied, and at start that file is applied at once, before the source
//! answers, so an agent restarted while the control plane is down keeps its overlay.
//! "Off" removes the interface (which stops `wireguard-go`) and the last-good file.
//! The drift check re-applies the wanted configuration: `apply` is idempotent and
//! repairs a killed `wireguard-go`, a peer removed by hand, a lost address or route.
//! Every outcome is counted in `plfm_overlay_apply_total{outcome}`.
//!
//! Every step is bounded: the control-plane client has its request timeout, the device
//! its UAPI and netlink timeouts, a document at most [`MAX_DOCUMENT_BYTES`]. The private
//! key is held here (zeroized on drop) only to hand it to the device; it is never logged,
//! published or returned.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::watch;
use zeroize::Zeroizing;

use super::config::{parse, OverlayConfig, PublicKey, RefusedPeer};
use super::status::{OverlayHandle, OverlayState, PeerSnapshot, Snapshot};
use super::uapi::DeviceState;
use crate::metrics::{Metrics, OutcomeLabel};

/// The last good configuration under the data dir (the source's JSON as it came).
pub const LAST_GOOD_FILE: &str = "overlay/last-good.json";
/// How often a control plane that answered 404 (no overlay service) is asked again.
pub const OFF_RETRY: Duration = Duration::from_secs(300);
/// Largest overlay document read (a full mesh of 4096 nodes with their instances).
pub const MAX_DOCUMENT_BYTES: u64 = 64 << 20;
/// The `outcome` label values of `plfm_overlay_apply_total`.
pub const APPLY_OUTCOMES: [&str; 4] = ["applied", "unchanged", "drift_repaired", "error"];

/// `<data_dir>/overlay/last-good.json`.
pub fn last_good_path(data_dir: &Path) -> PathBuf {
    data_dir.join(LAST_GOOD_FILE)
}

/// What a source answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fetched {
    /// An overlay document (not parsed yet).
    Document(Vec<u8>),
    /// The source says there is no overlay (why).
    Off(String),
    /// The source could not be read (why); what is applied stays.
    Unavailable(String),
}

/// Where the overlay configuration comes from.
#[async_trait]
pub trait Source: Send {
    /// For logs and `source` in the overlay view.
    fn name(&self) -> String;
    /// One read; bounded.
    async fn fetch(&mut self) -> Fetched;
    /// How long to wait before the next read after `last`.
    fn next_poll(&self, last: &Fetched) -> Duration;
}

/// Standalone mode: `<desired_dir>/overlay.json`.
pub struct FileSource {
    path: PathBuf,
    interval: Duration,
    seen: Option<(u64, i64, i64, u64)>,
    cached: Option<Vec<u8>>,
}

impl FileSource {
    /// Reads `path` every `interval` (only when its size, mtime or inode changed).
    pub fn new(path: PathBuf, interval: Duration) -> FileSource {
        FileSource {
            path,
            interval,
            seen: None,
            cached: None,
        }
    }
}

#[async_trait]
impl Source for FileSource {
    fn name(&self) -> String {
        format!("file {}", self.path.display())
    }

    async fn fetch(&mut self) -> Fetched {
        use std::os::unix::fs::MetadataExt;
        let off = |p: &Path| Fetched::Off(format!("{} does not exist", p.display()));
        let meta = match tokio::fs::metadata(&self.path).await {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                self.seen = None;
                self.cached = None;
                return off(&self.path);
            }
            Err(e) => return Fetched::Unavailable(format!("{}: {e}", self.path.display())),
        };
        let key = (meta.len(), meta.mtime(), meta.mtime_nsec(), meta.ino());
        if self.seen == Some(key) {
            if let Some(c) = &self.cached {
                return Fetched::Document(c.clone());
            }
        }
        let too_big = |n: u64| {
            Fetched::Unavailable(format!(
                "{} has {n} bytes, more than {MAX_DOCUMENT_BYTES}",
                self.path.display()
            ))
        };
        if meta.len() > MAX_DOCUMENT_BYTES {
            return too_big(meta.len());
        }
        match tokio::fs::read(&self.path).await {
            Ok(b) if b.len() as u64 > MAX_DOCUMENT_BYTES => too_big(b.len() as u64),
            Ok(b) => {
                self.seen = Some(key);
                self.cached = Some(b.clone());
                Fetched::Document(b)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => off(&self.path),
            Err(e) => Fetched::Unavailable(format!("{}: {e}", self.path.display())),
        }
    }

    fn next_poll(&self, _last: &Fetched) -> Duration {
        self.interval
    }
}

/// Connected mode: `GET /v1/nodes/{node_id}/overlay`.
pub struct CpSource {
    client: Arc<crate::control_plane::http::ControlPlaneClient>,
    interval: Duration,
}

impl CpSource {
    /// Asks every `interval` (every [`OFF_RETRY`] after a 404).
    pub fn new(
        client: Arc<crate::control_plane::http::ControlPlaneClient>,
        interval: Duration,
    ) -> CpSource {
        CpSource { client, interval }
    }
}

#[async_trait]
impl Source for CpSource {
    fn name(&self) -> String {
        "control plane".into()
    }

    async fn fetch(&mut self) -> Fetched {
        match self.client.get_overlay().await {
            Ok(Some(body)) => Fetched::Document(body),
            Ok(None) => Fetched::Off(
                "the control plane has no overlay service (GET …/overlay answered 404)".into(),
            ),
            Err(e) => Fetched::Unavailable(e.to_string()),
        }
    }

    fn next_poll(&self, last: &Fetched) -> Duration {
        off_or(last, self.interval)
    }
}

fn off_or(last: &Fetched, interval: Duration) -> Duration {
    match last {
        Fetched::Off(_) => OFF_RETRY,
        _ => interval,
    }
}

/// What one device apply changed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Changed {
    /// The implementation was (re)started.
    pub started: bool,
    /// Key or listen port were (re)set.
    pub interface_set: bool,
    /// Peer changes sent.
    pub changes: usize,
}

impl Changed {
    /// Whether anything had to change.
    pub fn any(&self) -> bool {
        self.started || self.interface_set || self.changes > 0
    }
}

/// The WireGuard device as the owner drives it.
#[async_trait]
pub trait Device: Send + Sync {
    /// Brings the device to `cfg` (idempotent).
    async fn apply(&self, cfg: &OverlayConfig, private_key: &[u8; 32]) -> Result<Changed, String>;
    /// The device's state, `None` when there is no device.
    async fn state(&self) -> Result<Option<DeviceState>, String>;
    /// Removes the interface; whether it existed.
    async fn remove(&self) -> Result<bool, String>;
}

#[cfg(target_os = "linux")]
#[async_trait]
impl Device for super::device::AnyDevice {
    async fn apply(&self, cfg: &OverlayConfig, private_key: &[u8; 32]) -> Result<Changed, String> {
        super::device::AnyDevice::apply(self, cfg, private_key)
            .await
            .map(|a| Changed {
                started: a.started,
                interface_set: a.interface_set,
                changes: a.changes,
            })
            .map_err(|e| e.to_string())
    }

    async fn state(&self) -> Result<Option<DeviceState>, String> {
        super::device::AnyDevice::state(self)
            .await
            .map_err(|e| e.to_string())
    }

    async fn remove(&self) -> Result<bool, String> {
        super::device::AnyDevice::remove(self)
            .await
            .map_err(|e| e.to_string())
    }
}

/// What the owner did with one input (for its tests and logs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// A new configuration was applied.
    Applied,
    /// A new configuration was taken but the device failed (retried by the drift check).
    ApplyFailed,
    /// The document is the one already handled.
    Same,
    /// A lower generation than the applied one: ignored.
    Stale {
        /// Applied generation.
        applied: i64,
        /// The document's.
        got: i64,
    },
    /// The document is not an overlay document: ignored, what is applied stays.
    Invalid,
    /// The overlay was on and is now off (interface removed).
    TurnedOff,
    /// The overlay stays off.
    Off,
    /// The source failed; what is applied stays.
    Kept,
    /// Drift check: nothing to change.
    Unchanged,
    /// Drift check: something was repaired.
    DriftRepaired,
}

struct Wanted {
    cfg: OverlayConfig,
    refused: Vec<RefusedPeer>,
    source: String,
    /// Whether this configuration has reached the device once. Until it has, a
    /// successful apply (also one retried by the drift check) is `applied`; after,
    /// a change the drift check had to make is a repair.
    reached_device: bool,
}

/// The owner's state. One per daemon.
pub struct Owner<D: Device> {
    device: D,
    key: Zeroizing<[u8; 32]>,
    public_key: PublicKey,
    interface: String,
    backend: String,
    last_good: PathBuf,
    handle: Arc<OverlayHandle>,
    metrics: Arc<Metrics>,
    wanted: Option<Wanted>,
    /// sha256 of the last document handled, and what was wrong with it.
    last_doc: Option<([u8; 32], Option<String>)>,
    off_reason: Option<String>,
    source_error: Option<String>,
    apply_error: Option<String>,
}

/// How the owner is set up.
pub struct OwnerSetup {
    /// The interface's name.
    pub interface: String,
    /// The backend in use (`userspace`).
    pub backend: String,
    /// `<data_dir>/overlay/last-good.json`.
    pub last_good: PathBuf,
    /// Where the owner publishes.
    pub handle: Arc<OverlayHandle>,
    /// `plfm_overlay_apply_total`.
    pub metrics: Arc<Metrics>,
}

fn count(metrics: &Metrics, outcome: &'static str) {
    metrics
        .overlay_apply
        .get_or_create(&OutcomeLabel { outcome })
        .inc();
}

impl<D: Device> Owner<D> {
    /// An owner of `device` with the node's private key.
    pub fn new(device: D, private_key: Zeroizing<[u8; 32]>, setup: OwnerSetup) -> Owner<D> {
        let secret = x25519_dalek::StaticSecret::from(*private_key);
        let public_key = PublicKey(x25519_dalek::PublicKey::from(&secret).to_bytes());
        Owner {
            device,
            key: private_key,
            public_key,
            interface: setup.interface,
            backend: setup.backend,
            last_good: setup.last_good,
            handle: setup.handle,
            metrics: setup.metrics,
            wanted: None,
            last_doc: None,
            off_reason: None,
            source_error: None,
            apply_error: None,
        }
    }

    /// Applies the last good configuration, if one was kept, before any source answers.
    pub async fn start(&mut self) -> Option<Decision> {
        let doc = match std::fs::read(&self.last_good) {
            Ok(d) => d,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                self.publish().await;
                return None;
            }
            Err(e) => {
                tracing::warn!(file = %self.last_good.display(), error = %e, "cannot read the last good overlay configuration; waiting for the source");
                self.publish().await;
                return None;
            }
        };
        tracing::info!(file = %self.last_good.display(), "applying the last good overlay configuration until the source answers");
        let name = format!("last good ({})", self.last_good.display());
        Some(self.consider(doc, &name, false).await)
    }

    /// Handles one answer of the source named `source`.
    pub async fn on_fetched(&mut self, fetched: Fetched, source: &str) -> Decision {
        match fetched {
            Fetched::Document(doc) => self.consider(doc, source, true).await,
            Fetched::Off(reason) => self.turn_off(reason).await,
            Fetched::Unavailable(e) => {
                if self.source_error.as_deref() != Some(e.as_str()) {
                    if self.wanted.is_some() {
                        tracing::warn!(source, error = %e, "overlay source unavailable; the applied overlay configuration stays");
                    } else {
                        tracing::warn!(source, error = %e, "overlay source unavailable");
                    }
                }
                self.source_error = Some(e);
                self.publish().await;
                Decision::Kept
            }
        }
    }

    async fn consider(&mut self, doc: Vec<u8>, source: &str, persist: bool) -> Decision {
        let hash = super::uapi::sha256(&doc);
        if let Some((h, problem)) = &self.last_doc {
            if *h == hash {
                if self.source_error != *problem {
                    self.source_error = problem.clone();
                    self.publish().await;
                }
                return Decision::Same;
            }
        }
        let (cfg, refused) = match parse(&doc, Some(&self.public_key)) {
            Ok(p) => p,
            Err(e) => {
                let msg = format!("{source}: overlay configuration refused whole: {e}");
                tracing::warn!(source, error = %e, "overlay configuration refused whole; what is applied stays");
                self.last_doc = Some((hash, Some(msg.clone())));
                self.source_error = Some(msg);
                self.publish().await;
                return Decision::Invalid;
            }
        };
        if let Some(w) = &self.wanted {
            if cfg.generation < w.cfg.generation {
                let (applied, got) = (w.cfg.generation, cfg.generation);
                let msg = format!(
                    "{source}: generation {got} is lower than the applied {applied}: ignored (stale)"
                );
                tracing::info!(source, applied, got, "stale overlay configuration ignored");
                self.last_doc = Some((hash, Some(msg.clone())));
                self.source_error = Some(msg);
                self.publish().await;
                return Decision::Stale { applied, got };
            }
        }
        for r in &refused {
            tracing::warn!(
                source,
                index = r.index,
                node = r.node_id.as_deref().unwrap_or("-"),
                reason = %r.reason,
                "overlay peer refused; the other peers apply"
            );
        }
        self.last_doc = Some((hash, None));
        self.source_error = None;
        self.off_reason = None;
        if persist {
            if let Err(e) = persist_last_good(&self.last_good, &doc) {
                tracing::warn!(error = %e, "cannot keep the last good overlay configuration; applying it anyway");
            }
        }
        tracing::info!(
            source,
            generation = cfg.generation,
            peers = cfg.peers.len(),
            refused = refused.len(),
            "applying the overlay configuration"
        );
        self.wanted = Some(Wanted {
            cfg,
            refused,
            source: source.to_string(),
            reached_device: false,
        });
        self.apply().await
    }

    async fn turn_off(&mut self, reason: String) -> Decision {
        self.source_error = None;
        if self.wanted.is_none() && self.off_reason.as_deref() == Some(reason.as_str()) {
            return Decision::Off;
        }
        let was_on = self.wanted.is_some();
        tracing::info!(reason = %reason, "overlay off");
        self.off_reason = Some(reason);
        self.wanted = None;
        self.last_doc = None;
        self.apply_error = None;
        match self.device.remove().await {
            Ok(true) => tracing::info!(interface = %self.interface, "overlay interface removed"),
            Ok(false) => {}
            Err(e) => {
                tracing::error!(error = %e, "cannot remove the overlay interface");
                self.apply_error = Some(e);
            }
        }
        match std::fs::remove_file(&self.last_good) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(file = %self.last_good.display(), error = %e, "cannot remove the last good overlay configuration")
            }
        }
        self.publish().await;
        if was_on {
            Decision::TurnedOff
        } else {
            Decision::Off
        }
    }

    /// The drift check: re-applies the wanted configuration (nothing is sent when the
    /// device matches it) and counts what it found.
    pub async fn drift_check(&mut self) -> Decision {
        if self.wanted.is_none() {
            self.publish().await;
            return Decision::Off;
        }
        self.apply().await
    }

    async fn apply(&mut self) -> Decision {
        let Some(w) = &mut self.wanted else {
            return Decision::Off;
        };
        let result = self.device.apply(&w.cfg, &self.key).await;
        let first = !w.reached_device;
        if result.is_ok() {
            w.reached_device = true;
        }
        let w = &*w;
        let (outcome, decision) = match &result {
            Ok(_) if first => ("applied", Decision::Applied),
            Ok(c) if c.any() => ("drift_repaired", Decision::DriftRepaired),
            Ok(_) => ("unchanged", Decision::Unchanged),
            Err(_) => ("error", Decision::ApplyFailed),
        };
        count(&self.metrics, outcome);
        match result {
            Ok(c) => {
                if decision == Decision::DriftRepaired {
                    tracing::warn!(
                        interface = %self.interface,
                        restarted = c.started,
                        interface_set = c.interface_set,
                        peer_changes = c.changes,
                        "overlay drift repaired"
                    );
                } else if decision == Decision::Applied {
                    tracing::info!(interface = %self.interface, generation = w.cfg.generation, started = c.started, peer_changes = c.changes, "overlay configuration applied");
                }
                self.apply_error = None;
            }
            Err(e) => {
                if self.apply_error.as_deref() != Some(e.as_str()) {
                    tracing::error!(error = %e, "overlay apply failed; retried at the next drift check");
                }
                self.apply_error = Some(e);
            }
        }
        self.publish().await;
        decision
    }

    /// Publishes what the owner wants and what the device reports.
    async fn publish(&self) {
        let mut s = Snapshot::initial(
            &self.interface,
            &self.backend,
            Some(self.public_key.base64()),
        );
        s.checked_at = Some(chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true));
        s.last_source_error = self.source_error.clone();
        s.last_apply_error = self.apply_error.clone();
        match &self.wanted {
            None => {
                s.state = OverlayState::Off;
                s.off_reason = Some(
                    self.off_reason
                        .clone()
                        .unwrap_or_else(|| "no overlay configuration yet".into()),
                );
            }
            Some(w) => {
                s.state = OverlayState::On;
                s.off_reason = None;
                s.listen_port = Some(w.cfg.node.listen_port);
                s.node_overlay_ipv6 = Some(w.cfg.node.overlay_ipv6.to_string());
                s.generation = Some(w.cfg.generation);
                s.source = Some(w.source.clone());
                s.refused = w.refused.clone();
                let dev = match self.device.state().await {
                    Ok(d) => d,
                    Err(e) => {
                        tracing::debug!(error = %e, "cannot read the overlay device's state");
                        None
                    }
                };
                s.peers = w
                    .cfg
                    .peers
                    .iter()
                    .map(|p| {
                        let d = dev.as_ref().and_then(|d| {
                            d.peers.iter().find(|x| x.public_key == Some(p.public_key))
                        });
                        PeerSnapshot {
                            node_id: p.node_id.clone(),
                            public_key: p.public_key.base64(),
                            endpoint: d
                                .and_then(|d| d.endpoint)
                                .or(p.endpoint)
                                .map(|e| e.to_string()),
                            allowed_ips: p.allowed_ips.iter().map(|a| a.to_string()).collect(),
                            last_handshake_unix: d.map(|d| d.last_handshake_secs).unwrap_or(0),
                            rx_bytes: d.map(|d| d.rx_bytes).unwrap_or(0),
                            tx_bytes: d.map(|d| d.tx_bytes).unwrap_or(0),
                        }
                    })
                    .collect();
            }
        }
        self.handle.set(s);
    }
}

/// Writes the last good document atomically (its directory made 0700 if missing).
fn persist_last_good(path: &Path, doc: &[u8]) -> Result<(), String> {
    if let Some(dir) = path.parent() {
        if !dir.exists() {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|e| format!("{}: {e}", dir.display()))?;
        }
    }
    crate::identity::write_atomic(path, doc, 0o600).map_err(|e| e.to_string())
}

/// Runs the owner until `stop` changes: the last good configuration first, then the
/// source every [`Source::next_poll`] and the drift check every `drift`. The interface
/// is left as it is at stop (it outlives the agent; the next one adopts it).
pub async fn run<D: Device, S: Source>(
    mut owner: Owner<D>,
    mut source: S,
    drift: Duration,
    mut stop: watch::Receiver<bool>,
) {
    owner.start().await;
    let name = source.name();
    let mut next_poll = tokio::time::Instant::now();
    let mut next_drift = tokio::time::Instant::now() + drift;
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(next_poll) => {
                let fetched = source.fetch().await;
                let wait = source.next_poll(&fetched);
                owner.on_fetched(fetched, &name).await;
                next_poll = tokio::time::Instant::now() + wait;
            }
            _ = tokio::time::sleep_until(next_drift) => {
                owner.drift_check().await;
                next_drift = tokio::time::Instant::now() + drift;
            }
            _ = stop.changed() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;
    use serde_json::json;
    use std::sync::Mutex;

    #[derive(Default)]
    struct FakeState {
        applied: Vec<OverlayConfig>,
        present: bool,
        removed: usize,
        fail: Option<String>,
        drift: bool,
    }

    #[derive(Clone, Default)]
    struct Fake(Arc<Mutex<FakeState>>);

    impl Fake {
        fn lock(&self) -> std::sync::MutexGuard<'_, FakeState> {
            self.0.lock().unwrap()
        }
    }

    #[async_trait]
    impl Device for Fake {
        async fn apply(&self, cfg: &OverlayConfig, _key: &[u8; 32]) -> Result<Changed, String> {
            let mut s = self.lock();
            if let Some(e) = &s.fail {
                return Err(e.clone());
            }
            let started = !s.present;
            s.present = true;
            s.applied.push(cfg.clone());
            let changes = usize::from(std::mem::take(&mut s.drift));
            Ok(Changed {
                started,
                interface_set: started,
                changes,
            })
        }
        async fn state(&self) -> Result<Option<DeviceState>, String> {
            Ok(self.lock().present.then(DeviceState::default))
        }
        async fn remove(&self) -> Result<bool, String> {
            let mut s = self.lock();
            s.removed += 1;
            Ok(std::mem::take(&mut s.present))
        }
    }

    fn key(n: u8) -> String {
        base64::engine::general_purpose::STANDARD.encode([n; 32])
    }

    fn doc(generation: i64, peers: serde_json::Value) -> Vec<u8> {
        serde_json::to_vec(
            &json!({"generation": generation, "node": {"overlay_ipv6": "fd00::1"}, "peers": peers}),
        )
        .unwrap()
    }

    fn good(generation: i64) -> Vec<u8> {
        doc(
            generation,
            json!([{"node_id": "node-2", "public_key": key(2), "endpoint": "[fd00:ffff::2]:51820", "allowed_ips": ["fd00::2"]}]),
        )
    }

    struct Rig {
        _tmp: tempfile::TempDir,
        last_good: PathBuf,
        fake: Fake,
        handle: Arc<OverlayHandle>,
        metrics: Arc<Metrics>,
    }

    impl Rig {
        fn new() -> Rig {
            let tmp = tempfile::tempdir().unwrap();
            Rig {
                last_good: last_good_path(tmp.path()),
                _tmp: tmp,
                fake: Fake::default(),
                handle: OverlayHandle::new(Snapshot::initial("wg", "userspace", None)),
                metrics: Arc::new(Metrics::new()),
            }
        }
        fn owner(&self) -> Owner<Fake> {
            Owner::new(
                self.fake.clone(),
                Zeroizing::new([7u8; 32]),
                OwnerSetup {
                    interface: "wg".into(),
                    backend: "userspace".into(),
                    last_good: self.last_good.clone(),
                    handle: self.handle.clone(),
                    metrics: self.metrics.clone(),
                },
            )
        }
        fn applied_generations(&self) -> Vec<i64> {
            self.fake
                .lock()
                .applied
                .iter()
                .map(|c| c.generation)
                .collect()
        }
        fn count(&self, outcome: &'static str) -> u64 {
            self.metrics
                .overlay_apply
                .get_or_create(&OutcomeLabel { outcome })
                .get()
        }
    }

    #[tokio::test]
    async fn a_document_is_persisted_and_applied_again_at_start_before_the_source_answers() {
        let rig = Rig::new();
        let mut o = rig.owner();
        assert_eq!(o.start().await, None, "nothing kept yet");
        assert_eq!(
            o.on_fetched(Fetched::Document(good(5)), "file").await,
            Decision::Applied
        );
        assert_eq!(std::fs::read(&rig.last_good).unwrap(), good(5));
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&rig.last_good)
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        // The same document again: nothing applied.
        assert_eq!(
            o.on_fetched(Fetched::Document(good(5)), "file").await,
            Decision::Same
        );
        assert_eq!(rig.applied_generations(), [5]);
        // A restart with the source unreachable: the kept config is applied at once
        // and stays.
        let mut o = rig.owner();
        assert_eq!(o.start().await, Some(Decision::Applied));
        assert_eq!(rig.applied_generations(), [5, 5]);
        assert_eq!(
            o.on_fetched(Fetched::Unavailable("connection refused".into()), "cp")
                .await,
            Decision::Kept
        );
        let v = rig.handle.view();
        assert_eq!((v.state, v.generation), (OverlayState::On, Some(5)));
        assert_eq!(v.last_source_error.as_deref(), Some("connection refused"));
        assert_eq!(rig.fake.lock().removed, 0);
        // The source answers with what was kept: nothing to do; then with a newer one:
        // that replaces the kept one.
        assert_eq!(
            o.on_fetched(Fetched::Document(good(5)), "cp").await,
            Decision::Same
        );
        assert_eq!(
            o.on_fetched(Fetched::Document(good(6)), "cp").await,
            Decision::Applied
        );
        assert_eq!(std::fs::read(&rig.last_good).unwrap(), good(6));
        assert_eq!(rig.count("applied"), 3);
    }

    #[tokio::test]
    async fn a_lower_generation_is_ignored_as_stale() {
        let rig = Rig::new();
        let mut o = rig.owner();
        o.on_fetched(Fetched::Document(good(5)), "cp").await;
        assert_eq!(
            o.on_fetched(Fetched::Document(good(4)), "cp").await,
            Decision::Stale { applied: 5, got: 4 }
        );
        assert_eq!(rig.applied_generations(), [5]);
        assert_eq!(std::fs::read(&rig.last_good).unwrap(), good(5));
        let v = rig.handle.view();
        assert_eq!(v.generation, Some(5));
        assert!(v.last_source_error.unwrap().contains("stale"));
        // The same generation with other content is a new config; a higher one too.
        assert_eq!(
            o.on_fetched(Fetched::Document(doc(5, json!([]))), "cp")
                .await,
            Decision::Applied
        );
        assert_eq!(
            o.on_fetched(Fetched::Document(good(7)), "cp").await,
            Decision::Applied
        );
        assert_eq!(rig.applied_generations(), [5, 5, 7]);
        assert_eq!(rig.handle.view().last_source_error, None);
    }

    #[tokio::test]
    async fn off_removes_the_interface_and_the_kept_config_once() {
        let rig = Rig::new();
        let mut o = rig.owner();
        o.on_fetched(Fetched::Document(good(5)), "cp").await;
        let off = || Fetched::Off("the control plane has no overlay service (404)".into());
        assert_eq!(o.on_fetched(off(), "cp").await, Decision::TurnedOff);
        assert_eq!(rig.fake.lock().removed, 1);
        assert!(!rig.last_good.exists());
        let v = rig.handle.view();
        assert_eq!(v.state, OverlayState::Off);
        assert!(v.off_reason.unwrap().contains("404"));
        assert!(v.public_key.is_some(), "the public key is shown while off");
        assert_eq!(o.on_fetched(off(), "cp").await, Decision::Off);
        assert_eq!(rig.fake.lock().removed, 1, "off once, not at every poll");
        // The drift check does nothing while off.
        assert_eq!(o.drift_check().await, Decision::Off);
        assert_eq!(rig.applied_generations(), [5]);
        // On again, even with a lower generation: nothing is applied while off.
        assert_eq!(
            o.on_fetched(Fetched::Document(good(2)), "cp").await,
            Decision::Applied
        );
        // The control plane's 404 asks again slowly.
        assert_eq!(off_or(&off(), Duration::from_secs(5)), OFF_RETRY);
        assert_eq!(
            off_or(&Fetched::Unavailable(String::new()), Duration::from_secs(5)),
            Duration::from_secs(5)
        );
    }

    #[tokio::test]
    async fn refused_peers_are_kept_out_and_listed_and_a_bad_document_changes_nothing() {
        let rig = Rig::new();
        let mut o = rig.owner();
        let own = {
            let secret = x25519_dalek::StaticSecret::from([7u8; 32]);
            base64::engine::general_purpose::STANDARD
                .encode(x25519_dalek::PublicKey::from(&secret).as_bytes())
        };
        let d = doc(
            3,
            json!([
                {"node_id": "node-2", "public_key": key(2), "allowed_ips": ["fd00::2"]},
                {"node_id": "node-3", "public_key": key(3), "allowed_ips": ["::/0"]},
                {"node_id": "me", "public_key": own, "allowed_ips": ["fd00::9"]},
            ]),
        );
        assert_eq!(
            o.on_fetched(Fetched::Document(d), "file").await,
            Decision::Applied
        );
        let applied = rig.fake.lock().applied[0].clone();
        assert_eq!(applied.peers.len(), 1);
        assert_eq!(applied.peers[0].node_id, "node-2");
        let v = rig.handle.view();
        assert_eq!(
            v.refused.iter().map(|r| r.index).collect::<Vec<_>>(),
            [1, 2]
        );
        assert!(v.refused[1].reason.contains("this node's own"));
        assert_eq!(v.peers.len(), 1);
        assert_eq!(
            o.on_fetched(Fetched::Document(b"{not json".to_vec()), "file")
                .await,
            Decision::Invalid
        );
        assert_eq!(rig.applied_generations(), [3]);
        assert_eq!(rig.handle.view().generation, Some(3));
        assert!(rig
            .handle
            .view()
            .last_source_error
            .unwrap()
            .contains("refused whole"));
    }

    #[tokio::test]
    async fn the_drift_check_repairs_and_counts_and_a_failed_apply_is_retried_and_counted_once() {
        let rig = Rig::new();
        let mut o = rig.owner();
        o.on_fetched(Fetched::Document(good(1)), "file").await;
        assert_eq!(o.drift_check().await, Decision::Unchanged);
        rig.fake.lock().drift = true;
        assert_eq!(o.drift_check().await, Decision::DriftRepaired);
        rig.fake.lock().present = false; // wireguard-go killed
        assert_eq!(o.drift_check().await, Decision::DriftRepaired);
        // A check that meets a dying wireguard-go fails; the next one restarts it,
        // and that is a repair of a configuration the device had: not `applied`.
        rig.fake.lock().fail = Some("wireguard-go: not found".into());
        assert_eq!(o.drift_check().await, Decision::ApplyFailed);
        assert_eq!(
            rig.handle.view().last_apply_error.as_deref(),
            Some("wireguard-go: not found")
        );
        rig.fake.lock().fail = None;
        rig.fake.lock().present = false;
        assert_eq!(o.drift_check().await, Decision::DriftRepaired);
        assert_eq!(rig.handle.view().last_apply_error, None);
        // A new configuration whose first apply fails is `applied` when the drift
        // check gets it through, even though the device had to change.
        rig.fake.lock().fail = Some("uapi: timed out".into());
        assert_eq!(
            o.on_fetched(Fetched::Document(good(2)), "file").await,
            Decision::ApplyFailed
        );
        rig.fake.lock().fail = None;
        rig.fake.lock().drift = true;
        assert_eq!(o.drift_check().await, Decision::Applied);
        assert_eq!(o.drift_check().await, Decision::Unchanged);
        assert_eq!(
            (
                rig.count("applied"),
                rig.count("unchanged"),
                rig.count("drift_repaired"),
                rig.count("error")
            ),
            (2, 2, 3, 2)
        );
    }

    #[tokio::test]
    async fn the_file_source_reads_changes_and_a_missing_file_is_off() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("overlay.json");
        let mut s = FileSource::new(path.clone(), Duration::from_secs(1));
        assert!(matches!(s.fetch().await, Fetched::Off(r) if r.contains("does not exist")));
        std::fs::write(&path, good(1)).unwrap();
        assert_eq!(s.fetch().await, Fetched::Document(good(1)));
        assert_eq!(s.fetch().await, Fetched::Document(good(1)));
        std::fs::write(&path, good(22)).unwrap();
        assert_eq!(s.fetch().await, Fetched::Document(good(22)));
        std::fs::remove_file(&path).unwrap();
        assert!(matches!(s.fetch().await, Fetched::Off(_)));
    }
}
