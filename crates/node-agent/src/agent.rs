//! Wiring: builds a running node (state store, status manager, outbox delivery,
//! runtime recovery, supervisor) from its parts, and runs the daemon (local API,
//! desired-state source, signals) from a [`Config`].
//!
//! Tests use [`Node`] directly with their own runtime and clock; the binary uses
//! [`run_daemon`]. This module connects parts; the decisions live in them.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;

use crate::clock::{SharedClock, SystemClock};
use crate::config::{Config, ControlPlaneMode, RuntimeKind, ShutdownMode};
use crate::control_plane::http::{
    load_persisted_plan, run_heartbeat, run_plan_poller, ControlPlaneClient, GuestAdvert, HttpSink,
};
use crate::control_plane::secrets::http_secrets;
use crate::control_plane::standalone;
use crate::identity;
use crate::logs::LogHandle;
use crate::metrics::Metrics;
use crate::runtime::mock::MockRuntime;
use crate::runtime::Runtime;
use crate::secrets::{DirSecrets, SecretsSource};
use crate::state::{Store, StoreError};
use crate::status::outbox::{LocalSink, OutboxDrainer, ReportSink};
use crate::status::StatusManager;
use crate::supervisor::{ActorEnv, Supervisor, SupervisorConfig};
use crate::systemd::Notifier;

/// A start-up failure, naming what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The data directory is unusable.
    #[error("data_dir {path}: {message}")]
    DataDir {
        /// Path.
        path: PathBuf,
        /// Cause.
        message: String,
    },
    /// The state store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The runtime could not list its VMs.
    #[error("runtime {kind}: cannot recover running VMs: {message}")]
    Recover {
        /// Runtime kind.
        kind: &'static str,
        /// Cause.
        message: String,
    },
    /// The local API cannot listen (the message names the key).
    #[error("{0}")]
    Api(String),
    /// The node's identity is unusable or contradicts the config.
    #[error(transparent)]
    Identity(#[from] crate::identity::IdentityError),
}

/// Parts of a node.
pub struct NodeOptions {
    /// Data directory (created if missing).
    pub data_dir: PathBuf,
    /// The VMM.
    pub runtime: Arc<dyn Runtime>,
    /// Time.
    pub clock: SharedClock,
    /// Secret material.
    pub secrets: Arc<dyn SecretsSource>,
    /// Where reports go.
    pub sink: Arc<dyn ReportSink>,
    /// VMM start → workload start deadline.
    pub boot_timeout: Duration,
    /// Most instances.
    pub max_instances: usize,
    /// Metrics registry shared with the caller's other parts.
    pub metrics: Arc<Metrics>,
}

/// A running node: everything but the API and the desired-state source.
pub struct Node {
    /// State store.
    pub store: Store,
    /// Status owner.
    pub status: Arc<StatusManager>,
    /// Supervisor.
    pub supervisor: Supervisor,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// The VMM.
    pub runtime: Arc<dyn Runtime>,
    sink: Arc<dyn ReportSink>,
    shutdown_tx: watch::Sender<bool>,
    drainer: JoinHandle<()>,
    _lock: File,
}

/// Takes the data directory's lock so two agents never share one state.
pub(crate) fn lock_data_dir(dir: &Path) -> Result<File, AgentError> {
    let err = |message: String| AgentError::DataDir {
        path: dir.to_path_buf(),
        message,
    };
    std::fs::create_dir_all(dir).map_err(|e| err(format!("cannot create: {e}")))?;
    restrict_data_dir(dir).map_err(err)?;
    let path = dir.join("agent.lock");
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| err(format!("cannot open {}: {e}", path.display())))?;
    file.try_lock()
        .map_err(|e| err(format!("another agent holds {} ({e})", path.display())))?;
    Ok(file)
}

/// The data dir holds tenants' disks, unpacked image trees (setuid files included),
/// secrets-bearing state and the sockets that hand a guest its config: it must be
/// owned by the agent's user and reachable by nobody else (0700). A dir another user
/// owns is refused, not adopted: that user could have planted links in it.
fn restrict_data_dir(dir: &Path) -> Result<(), String> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let meta = std::fs::metadata(dir).map_err(|e| format!("cannot stat: {e}"))?;
    let euid = rustix::process::geteuid().as_raw();
    if meta.uid() != euid {
        return Err(format!(
            "owned by uid {}, not by the agent's uid {euid}: refusing a data dir another user controls",
            meta.uid()
        ));
    }
    if meta.mode() & 0o777 != 0o700 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| format!("cannot make it 0700: {e}"))?;
    }
    Ok(())
}

/// The daemon's file-creation mask: everything it creates (disks, logs, sockets,
/// `state.db`, image trees' directories) gets no group or other permission bits.
pub const DAEMON_UMASK: u32 = 0o077;

impl Node {
    /// Opens the state, recovers running VMs and starts the supervisor. Nothing boots
    /// or stops until the first plan is applied.
    pub async fn start(opts: NodeOptions) -> Result<Node, AgentError> {
        let lock = lock_data_dir(&opts.data_dir)?;
        let store = Store::open(&opts.data_dir.join("state.db"))?;
        let metrics = opts.metrics.clone();
        let outbox_ready = Arc::new(Notify::new());
        let status = StatusManager::start(
            store.clone(),
            opts.clock.clone(),
            metrics.clone(),
            outbox_ready.clone(),
        )?;
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let drainer = tokio::spawn(
            OutboxDrainer::new(
                store.clone(),
                opts.sink.clone(),
                outbox_ready,
                metrics.clone(),
                opts.clock.clone(),
            )
            .run(shutdown_rx),
        );
        let recovered = opts
            .runtime
            .recover()
            .await
            .map_err(|e| AgentError::Recover {
                kind: opts.runtime.kind(),
                message: e.to_string(),
            })?;
        if !recovered.is_empty() {
            tracing::info!(
                count = recovered.len(),
                "found running VMs; they will be adopted"
            );
        }
        let env = Arc::new(ActorEnv {
            runtime: opts.runtime.clone(),
            status: status.clone(),
            clock: opts.clock.clone(),
            secrets: opts.secrets,
            boot_timeout: opts.boot_timeout,
        });
        let supervisor = Supervisor::start(
            env,
            store.clone(),
            metrics.clone(),
            SupervisorConfig {
                max_instances: opts.max_instances,
            },
            recovered,
        )?;
        Ok(Node {
            store,
            status,
            supervisor,
            metrics,
            runtime: opts.runtime,
            sink: opts.sink,
            shutdown_tx,
            drainer,
            _lock: lock,
        })
    }

    /// Stops the supervisor (`Detach` leaves VMs running), delivers what is queued, and
    /// releases the data directory.
    pub async fn shutdown(self, mode: ShutdownMode) {
        self.supervisor.shutdown(mode).await;
        let _ = self.shutdown_tx.send(true);
        let _ = self.drainer.await;
        // One last delivery pass; whatever fails stays in the outbox for next time.
        if let Ok(rows) = self.store.call(|s| s.outbox_peek(100_000)).await {
            if !rows.is_empty() {
                let d = self.sink.deliver(&self.store, rows).await;
                let ids = d.done;
                if let Err(e) = self.store.call(move |s| s.outbox_ack(&ids)).await {
                    tracing::warn!(error = %e, "cannot remove delivered reports from the outbox");
                }
                if d.retry {
                    tracing::warn!("some reports stay in the outbox for the next start");
                }
            }
        }
    }
}

/// Builds the runtime named in the config; the image service's counters are registered
/// in `metrics` when given.
pub fn build_runtime(
    config: &Config,
    clock: SharedClock,
    store: Option<Store>,
    logs: LogHandle,
    metrics: Option<&crate::metrics::Metrics>,
) -> anyhow::Result<Arc<dyn Runtime>> {
    let register = |images: &crate::image::ImageService| {
        if let Some(m) = metrics {
            m.with_registry(|r| images.metrics().register(r));
        }
    };
    // The VMMs' guests send their lines to `workload.log` and to the shipper.
    #[cfg(target_os = "linux")]
    let log_sink = crate::runtime::vmm::workload_logs::LogSink {
        handle: logs.clone(),
        file_max_bytes: config.logs.file_max_bytes,
    };
    Ok(match config.runtime.kind {
        RuntimeKind::Mock => {
            // The image counters exist on every node, so dashboards and the metrics
            // reference (docs/metrics.md) need no case for this runtime; it pulls
            // nothing, so they stay at 0.
            if let Some(m) = metrics {
                m.with_registry(|r| crate::image::ImageMetrics::default().register(r));
            }
            Arc::new(
                MockRuntime::new(
                    config.runtime.mock.clone(),
                    clock,
                    Some(config.data_dir.clone()),
                    store,
                )
                .with_logs(logs),
            )
        }
        #[cfg(not(target_os = "linux"))]
        RuntimeKind::Firecracker => {
            let _ = (clock, logs, store, register);
            anyhow::bail!("runtime firecracker needs Linux (KVM, taps)")
        }
        #[cfg(target_os = "linux")]
        RuntimeKind::Firecracker => {
            let _ = clock;
            let images = crate::image::ImageService::open(&config.data_dir, config.images.clone())
                .map_err(|e| tracing::error!(error = %e, "image service unavailable; root disks cannot be built"))
                .ok();
            if let Some(i) = &images {
                register(i);
            }
            let store = store.ok_or_else(|| {
                anyhow::anyhow!("runtime firecracker needs the resource ledger (state store)")
            })?;
            let host = Arc::new(
                crate::runtime::firecracker::LocalHost::new(
                    &config.data_dir,
                    images,
                    store.clone(),
                    &config.runtime.firecracker,
                )
                .map_err(|e| anyhow::anyhow!(e))?,
            );
            Arc::new(
                crate::runtime::firecracker::FirecrackerRuntime::new(
                    config.runtime.firecracker.clone(),
                    &config.data_dir,
                    Some(store),
                    host,
                )
                .with_workload_logs(log_sink),
            )
        }
        #[cfg(not(target_os = "linux"))]
        RuntimeKind::Qemu => {
            let _ = (store, register);
            anyhow::bail!("runtime qemu needs Linux (taps, vhost-user, /proc)")
        }
        #[cfg(target_os = "linux")]
        RuntimeKind::Qemu => {
            let images = crate::image::ImageService::open(&config.data_dir, config.images.clone())
                .map_err(|e| {
                    anyhow::anyhow!("image service in {}: {e}", config.data_dir.display())
                })?;
            register(&images);
            let store = store.ok_or_else(|| {
                anyhow::anyhow!("runtime qemu needs the resource ledger (state store)")
            })?;
            Arc::new(
                crate::runtime::qemu::QemuRuntime::new(
                    config.runtime.qemu.clone(),
                    config.data_dir.clone(),
                    images,
                    store,
                )
                .map_err(|e| anyhow::anyhow!(e))?
                .with_workload_logs(log_sink),
            )
        }
    })
}

/// What the control-plane mode provides: the client (connected mode), the report sink,
/// the secrets source and the workload-log handle.
type ModeParts = (
    Option<Arc<ControlPlaneClient>>,
    Arc<dyn ReportSink>,
    Arc<dyn SecretsSource>,
    LogHandle,
);

/// The qemu runtime without a configured initramfs: builds (or reuses, verified) the
/// guest artifact set under `<data_dir>/guest/` and points the runtime at it. Sets a
/// running VM booted from (named in its ledger row) are kept.
fn prepare_guest_artifacts(
    config: &mut Config,
    ledger: &Store,
) -> anyhow::Result<Option<crate::guest_artifacts::GuestArtifacts>> {
    let q = &config.runtime.qemu;
    if config.runtime.kind != RuntimeKind::Qemu || q.initramfs.is_some() {
        return Ok(None);
    }
    let Some(kernel) = q.kernel.clone() else {
        return Ok(None);
    };
    let in_use: Vec<PathBuf> = ledger
        .resources()?
        .into_iter()
        .filter_map(|r| r.detail)
        .filter_map(|d| serde_json::from_str::<serde_json::Value>(&d).ok())
        .flat_map(|v| {
            ["kernel", "initramfs"]
                .into_iter()
                .filter_map(|k| v.get(k).and_then(|p| p.as_str()).map(PathBuf::from))
                .collect::<Vec<_>>()
        })
        .collect();
    let inputs = crate::guest_artifacts::Inputs {
        kernel,
        guest_init: config.guest.init.clone(),
        modules_dir: config.guest.modules_dir.clone(),
    };
    let set = crate::guest_artifacts::ensure(
        &inputs,
        &config.data_dir.join("guest"),
        config.guest.keep,
        &in_use,
    )?;
    tracing::info!(
        set = %set.current.name,
        built = set.built,
        kernel_versions = ?set.kernel_versions(),
        "guest artifacts ready"
    );
    config.runtime.qemu.kernel = Some(set.kernel());
    config.runtime.qemu.initramfs = Some(set.initramfs());
    Ok(Some(set))
}

/// Runs the agent until SIGINT/SIGTERM, telling systemd (`notifier`) when it is ready,
/// what it runs, that it is alive and when it stops.
pub async fn run_daemon(mut config: Config, notifier: Arc<Notifier>) -> anyhow::Result<()> {
    let clock: SharedClock = Arc::new(SystemClock::new());
    std::fs::create_dir_all(&config.data_dir).map_err(|e| AgentError::DataDir {
        path: config.data_dir.clone(),
        message: format!("cannot create: {e}"),
    })?;
    // The ledger store is opened by the node too; SQLite (WAL) arbitrates both handles.
    let ledger = Store::open(&config.state_db())?;
    let guest = prepare_guest_artifacts(&mut config, &ledger)?;
    // The id never changes: the enrolled identity's, or the config's when not enrolled;
    // both and different stops the start naming both.
    let node_id = identity::resolve_node_id(config.node_id.as_deref(), &config.data_dir)?;
    let enrolled = identity::load(&config.data_dir)?;
    // The WireGuard key exists from the first start on (its public half is shown and
    // sent before any overlay exists); the private half goes only to the overlay owner.
    let wireguard_key = match &config.overlay.private_key_file {
        None => identity::ensure_wireguard_key(&config.data_dir),
        Some(path) => identity::ensure_wireguard_key_at(path),
    };
    let wireguard_key = match wireguard_key {
        Ok(k) => Some(k),
        Err(e) => {
            tracing::error!(error = %e, "no WireGuard key; heartbeats go without one and the overlay stays off");
            None
        }
    };
    let wireguard_public_key = wireguard_key.as_ref().map(|k| k.public_base64());
    let metrics = Arc::new(Metrics::new());
    let resolved = crate::overlay::settings::resolve_backend(
        config.overlay.backend,
        crate::overlay::settings::kernel_wireguard(),
    );
    let (overlay_backend, note) = match resolved {
        Ok(r) => r,
        Err(e) if config.overlay.enabled => anyhow::bail!("{e}"),
        Err(e) => (
            "kernel",
            Some(format!("{e} (overlay.enabled = false, so nothing uses it)")),
        ),
    };
    if let Some(note) = note {
        tracing::info!("{note}");
    }
    let overlay = {
        let mut s = crate::overlay::status::Snapshot::initial(
            &config.overlay.interface,
            overlay_backend,
            wireguard_public_key.clone(),
        );
        if !config.overlay.enabled {
            s.state = crate::overlay::status::OverlayState::Disabled;
            s.off_reason =
                Some("overlay.enabled = false: the agent does not touch the interface".into());
        }
        crate::overlay::status::OverlayHandle::new(s)
    };
    metrics.with_registry(|r| {
        r.register_collector(Box::new(crate::overlay::status::OverlayCollector(
            overlay.clone(),
        )))
    });
    let (stop_tx, stop_rx) = watch::channel(false);
    let cp = &config.control_plane;

    // Where desired state, secrets and reports go, by mode.
    let (client, sink, secrets, logs): ModeParts = match cp.mode {
        ControlPlaneMode::Standalone => {
            let dir = cp.desired_dir.clone().unwrap_or_default();
            if !dir.is_dir() {
                anyhow::bail!(
                    "control_plane.desired_dir {} is not a directory",
                    dir.display()
                );
            }
            (
                None,
                Arc::new(LocalSink),
                Arc::new(DirSecrets::new(dir.join("secrets"))),
                LogHandle::default(),
            )
        }
        ControlPlaneMode::Http => {
            let client = Arc::new(
                ControlPlaneClient::new(cp, &node_id, metrics.clone())?
                    .with_wireguard_public_key(wireguard_public_key.clone())
                    .with_overlay(overlay.clone()),
            );
            let logs = crate::logs::start(
                client.clone(),
                clock.clone(),
                metrics.clone(),
                stop_rx.clone(),
            );
            (
                Some(client.clone()),
                Arc::new(HttpSink::new(client.clone(), metrics.clone())),
                Arc::new(http_secrets(client, clock.clone())),
                logs,
            )
        }
    };

    #[cfg(target_os = "linux")]
    if config.runtime.kind != RuntimeKind::Mock {
        configure_host_network(&config).await?;
    }
    let runtime = build_runtime(
        &config,
        clock.clone(),
        Some(ledger),
        logs,
        Some(metrics.as_ref()),
    )?;
    let node = Node::start(NodeOptions {
        data_dir: config.data_dir.clone(),
        runtime,
        clock: clock.clone(),
        secrets,
        sink,
        boot_timeout: Duration::from_secs(config.agent.boot_timeout_seconds),
        max_instances: config.agent.max_instances,
        metrics: metrics.clone(),
    })
    .await?;

    let exec =
        crate::exec::ExecService::new(node.runtime.clone(), node.status.clone(), &node.metrics);
    let (mut api, api_path) = serve_api(
        &config.api,
        crate::api::ApiState {
            status: node.status.clone(),
            supervisor: node.supervisor.clone(),
            metrics: node.metrics.clone(),
            store: node.store.clone(),
            cp_refusals: client.as_ref().map(|c| c.refusals()),
            notices: node.runtime.notices(),
            data_dir: config.data_dir.clone(),
            exec: Some(exec.clone()),
            instances_dir: Some(config.data_dir.join("instances")),
            node: Some(Arc::new(crate::api::NodeFacts {
                node_id: node_id.clone(),
                overlay_ipv6: enrolled.as_ref().and_then(|i| i.overlay_ipv6.clone()),
                wireguard_public_key: wireguard_public_key.clone(),
                control_plane_tls: client.as_ref().map(|c| c.reload_status()),
            })),
            overlay: Some(overlay.clone()),
        },
        &stop_rx,
    )
    .await?;
    if let Some(addr) = config.exec.listen {
        let auth = crate::exec::gateway::GatewayAuth::from_config(&config.exec)
            .map_err(AgentError::Api)?;
        let task = crate::exec::gateway::serve(addr, auth, exec.clone(), stop_rx.clone())
            .await
            .map_err(AgentError::Api)?;
        api.push(task);
    }
    let api_at = api_path.display().to_string();

    // Removed instances' logs go after `logs.retention` (or past `logs.retained_bytes`).
    let mut tasks = vec![tokio::spawn(crate::logstore::run_sweeper(
        config.data_dir.join("instances"),
        clock.clone(),
        config.logs.retention(),
        config.logs.retained_bytes,
        stop_rx.clone(),
    ))];
    // READY=1 once the VMs found at start are adopted: their actors adopt them when the
    // first plan is applied (the persisted one in connected mode, the first scan of the
    // directory in standalone mode). A connected node without a persisted plan has
    // nothing to adopt into until the control plane answers: it is ready at once.
    let mut ready_now = false;
    match (&client, cp.mode) {
        (Some(client), ControlPlaneMode::Http) => {
            tracing::info!(node_id = %node_id, url = cp.url.as_deref().unwrap_or(""), api = %api_at, runtime = node.runtime.kind(), "agent started (connected)");
            // Run the last applied plan until the control plane answers; never guess.
            match load_persisted_plan(&node.store) {
                Some(plan) => {
                    tracing::info!(cursor = plan.cursor, "resuming the last applied plan");
                    node.supervisor.apply(plan).await;
                }
                None => {
                    tracing::info!("no plan applied yet; waiting for the control plane");
                    ready_now = true;
                }
            }
            tasks.push(tokio::spawn(crate::control_plane::reload::run_reloader(
                client.clone(),
                Duration::from_millis(cp.reload_interval_ms),
                stop_rx.clone(),
            )));
            tasks.push(tokio::spawn(run_plan_poller(
                client.clone(),
                node.supervisor.clone(),
                node.store.clone(),
                clock.clone(),
                Duration::from_millis(cp.poll_interval_ms),
                node.status.subscribe_changes(),
                metrics.clone(),
                stop_rx.clone(),
            )));
            tasks.push(tokio::spawn(run_heartbeat(
                client.clone(),
                node.supervisor.clone(),
                node.store.clone(),
                clock.clone(),
                node_id.clone(),
                Duration::from_secs(cp.heartbeat_interval_secs),
                0,
                GuestAdvert {
                    kernel_versions: guest
                        .as_ref()
                        .map(|g| g.kernel_versions())
                        .unwrap_or_default(),
                    guest_init_protocols: guest
                        .as_ref()
                        .map(|g| g.guest_init_protocols())
                        .unwrap_or_else(|| vec![plfm_guest_protocol::PROTOCOL_VERSION]),
                },
                stop_rx.clone(),
            )));
        }
        _ => {
            let desired_dir = cp.desired_dir.clone().unwrap_or_default();
            tracing::info!(node_id = %node_id, data_dir = %config.data_dir.display(), api = %api_at, runtime = node.runtime.kind(), desired_dir = %desired_dir.display(), "agent started (standalone)");
            let supervisor = node.supervisor.clone();
            tasks.push(tokio::spawn(standalone::run(
                standalone::DirSource::new(desired_dir),
                Duration::from_millis(cp.rescan_interval_ms),
                move |plan| {
                    let s = supervisor.clone();
                    async move { s.apply(plan).await }
                },
                stop_rx.clone(),
            )));
        }
    }

    // The one owner of the WireGuard interface.
    #[cfg(target_os = "linux")]
    if let (true, Some(key)) = (config.overlay.enabled, wireguard_key.as_ref()) {
        tasks.push(spawn_overlay_owner(
            &config,
            overlay_backend,
            key,
            overlay.clone(),
            metrics.clone(),
            client.clone(),
            stop_rx.clone(),
        )?);
    }
    #[cfg(not(target_os = "linux"))]
    if config.overlay.enabled {
        tracing::warn!("the overlay needs Linux; it stays off");
    }

    let supervisor = node.supervisor.clone();
    tasks.push(tokio::spawn(crate::systemd::run(
        notifier.clone(),
        node.supervisor.clone(),
        node.status.clone(),
        async move {
            if !ready_now {
                supervisor.first_plan_applied().await;
            }
        },
        stop_rx.clone(),
    )));

    wait_for_signal().await;
    notifier.notify("STOPPING=1\nSTATUS=stopping\n");
    tracing::info!(mode = ?config.agent.on_shutdown, "shutting down (a second signal exits at once)");
    let _ = stop_tx.send(true);
    for t in tasks {
        let _ = t.await;
    }
    tokio::select! {
        _ = node.shutdown(config.agent.on_shutdown) => {}
        _ = wait_for_signal() => tracing::warn!("second signal: exiting without waiting"),
    }
    for t in api {
        let _ = t.await;
    }
    let _ = std::fs::remove_file(&api_path);
    tracing::info!("agent stopped");
    Ok(())
}
/// The node's network policy from `[network]` and `[overlay]`, applied before any
/// instance is adopted or set up ([`crate::network::apply_policy`]). Egress with no
/// uplink (none configured, no default route) is turned off with a warning that says
/// how to fix it; a failure to apply stops the start, naming the step.
#[cfg(target_os = "linux")]
async fn configure_host_network(config: &Config) -> anyhow::Result<()> {
    use crate::config::EgressMode;
    use crate::network::NetPolicy;
    let overlay_prefix = config
        .network
        .overlay_prefix()
        .map_err(|e| anyhow::anyhow!(e))?;
    let egress_uplink = match config.network.egress {
        EgressMode::Off => None,
        EgressMode::Nat => {
            let uplink = config
                .network
                .uplink
                .clone()
                .or_else(crate::network::default_route_interface);
            if uplink.is_none() {
                tracing::warn!("network.egress = \"nat\" but there is no uplink: no network.uplink is set and this host has no default route; instances get no egress");
            }
            uplink
        }
    };
    let policy = NetPolicy {
        egress_uplink,
        overlay_interface: config
            .overlay
            .enabled
            .then(|| config.overlay.interface.clone()),
        overlay_prefix,
    };
    tracing::info!(
        egress_uplink = policy.egress_uplink.as_deref().unwrap_or("none"),
        overlay_interface = policy.overlay_interface.as_deref().unwrap_or("none"),
        overlay_prefix = %format!("{}/{}", policy.overlay_prefix.0, policy.overlay_prefix.1),
        "network policy"
    );
    if !rustix::process::geteuid().is_root() {
        // Instances fail at their tap's setup with the same cause, named there.
        tracing::warn!("not root: the network policy is not applied");
    } else {
        crate::network::apply_policy(&policy)
            .await
            .map_err(|e| anyhow::anyhow!("network policy: {e}"))?;
    }
    crate::network::set_policy(policy);
    Ok(())
}

/// Starts the overlay owner ([`crate::overlay::owner`]) with the source of the mode:
/// the control plane's `GET …/overlay`, or `<desired_dir>/overlay.json`.
#[cfg(target_os = "linux")]
fn spawn_overlay_owner(
    config: &Config,
    backend: &str,
    key: &identity::WireguardKey,
    handle: Arc<crate::overlay::status::OverlayHandle>,
    metrics: Arc<Metrics>,
    client: Option<Arc<ControlPlaneClient>>,
    stop: watch::Receiver<bool>,
) -> anyhow::Result<JoinHandle<()>> {
    use crate::overlay::owner::{self, CpSource, FileSource, Owner, OwnerSetup};
    let dir = config.data_dir.join("overlay");
    if !dir.exists() {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(|e| anyhow::anyhow!("{}: cannot create: {e}", dir.display()))?;
    }
    let ov = &config.overlay;
    let device = match backend {
        "kernel" => crate::overlay::device::AnyDevice::Kernel(
            crate::overlay::kernel::KernelDevice::new(&ov.interface),
        ),
        _ => crate::overlay::device::AnyDevice::Userspace(
            crate::overlay::device::UserspaceDevice::new(
                &ov.interface,
                &ov.userspace_command,
                &dir.join("wireguard-go.log"),
            ),
        ),
    };
    let owner = Owner::new(
        device,
        key.secret_bytes(),
        OwnerSetup {
            interface: ov.interface.clone(),
            backend: backend.to_string(),
            last_good: owner::last_good_path(&config.data_dir),
            handle,
            metrics,
        },
    );
    let drift = Duration::from_secs(ov.drift_check_seconds);
    let cp = &config.control_plane;
    tracing::info!(interface = %ov.interface, backend, drift_check_seconds = ov.drift_check_seconds, "overlay owner started");
    Ok(match client {
        Some(c) => tokio::spawn(owner::run(
            owner,
            CpSource::new(c, Duration::from_millis(cp.poll_interval_ms)),
            drift,
            stop,
        )),
        None => tokio::spawn(owner::run(
            owner,
            FileSource::new(
                cp.desired_dir
                    .clone()
                    .unwrap_or_default()
                    .join(standalone::OVERLAY_FILE),
                Duration::from_millis(cp.rescan_interval_ms),
            ),
            drift,
            stop,
        )),
    })
}

#[cfg(unix)]
async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[cfg(not(unix))]
async fn wait_for_signal() {
    let _ = tokio::signal::ctrl_c().await;
}

/// Serves the local API on its Unix socket and, when `api.listen` is set, on TCP with
/// the bearer token; both stop when `stop` changes. Returns the serving tasks and the
/// socket's path (removed by the caller at exit).
async fn serve_api(
    config: &crate::config::ApiConfig,
    state: crate::api::ApiState,
    stop: &watch::Receiver<bool>,
) -> Result<(Vec<JoinHandle<()>>, PathBuf), AgentError> {
    use crate::api::access::{self, Access, Caller};
    let group = config
        .socket_group
        .as_deref()
        .map(access::resolve_group)
        .transpose()
        .map_err(AgentError::Api)?;
    let token = match (&config.listen, &config.token_file) {
        (Some(_), Some(f)) => Some(Arc::new(access::read_token(f).map_err(AgentError::Api)?)),
        _ => None,
    };
    let rules = Access { group, token };
    let app = crate::api::router(state, rules);
    let unix = access::bind_socket(&config.socket, group).map_err(AgentError::Api)?;
    let mut tasks = Vec::new();
    let mut stopped = stop.clone();
    let service = app.clone().into_make_service_with_connect_info::<Caller>();
    tasks.push(tokio::spawn(async move {
        let r = axum::serve(unix, service)
            .with_graceful_shutdown(async move {
                let _ = stopped.changed().await;
            })
            .await;
        if let Err(e) = r {
            tracing::error!(error = %e, "local API (Unix socket) failed");
        }
    }));
    if let Some(addr) = config.listen {
        let tcp = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| AgentError::Api(format!("api.listen {addr}: {e}")))?;
        let mut stopped = stop.clone();
        let service = app.into_make_service_with_connect_info::<Caller>();
        tasks.push(tokio::spawn(async move {
            let r = axum::serve(tcp, service)
                .with_graceful_shutdown(async move {
                    let _ = stopped.changed().await;
                })
                .await;
            if let Err(e) = r {
                tracing::error!(error = %e, "local API (TCP) failed");
            }
        }));
    }
    Ok((tasks, config.socket.clone()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_data_dir_open_to_others_is_made_0700() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("data");
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let _lock = lock_data_dir(&dir).unwrap();
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700, "{mode:o}");
    }

    #[test]
    fn a_data_dir_planted_by_another_user_is_refused() {
        if !rustix::process::geteuid().is_root() {
            return crate::testing::gate::skip_or_fail("chown to another uid needs root");
        }
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("data");
        std::fs::create_dir(&dir).unwrap();
        std::os::unix::fs::chown(&dir, Some(65534), Some(65534)).unwrap();
        let err = lock_data_dir(&dir).expect_err("a dir uid 65534 owns must be refused");
        let msg = err.to_string();
        assert!(msg.contains("owned by uid 65534"), "{msg}");
        assert!(
            !dir.join("agent.lock").exists(),
            "nothing is created in a refused dir"
        );
    }
}
