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
use crate::control_plane::standalone;
use crate::metrics::Metrics;
use crate::report::{LocalSink, OutboxDrainer, ReportSink, StatusManager};
use crate::runtime::mock::MockRuntime;
use crate::runtime::Runtime;
use crate::secrets::{DirSecrets, SecretsSource};
use crate::state::{Store, StoreError};
use crate::supervisor::{ActorEnv, Supervisor, SupervisorConfig};

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
    /// The local API cannot listen.
    #[error("api.listen {addr}: {message}")]
    Listen {
        /// Address.
        addr: String,
        /// Cause.
        message: String,
    },
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
fn lock_data_dir(dir: &Path) -> Result<File, AgentError> {
    let err = |message: String| AgentError::DataDir {
        path: dir.to_path_buf(),
        message,
    };
    std::fs::create_dir_all(dir).map_err(|e| err(format!("cannot create: {e}")))?;
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

impl Node {
    /// Opens the state, recovers running VMs and starts the supervisor. Nothing boots
    /// or stops until the first plan is applied.
    pub async fn start(opts: NodeOptions) -> Result<Node, AgentError> {
        let lock = lock_data_dir(&opts.data_dir)?;
        let store = Store::open(&opts.data_dir.join("state.db"))?;
        let metrics = Arc::new(Metrics::new());
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
                if let Err(e) = self.sink.deliver(&self.store, rows).await {
                    tracing::warn!(error = %e, "reports left in the outbox for the next start");
                }
            }
        }
    }
}

/// Builds the runtime named in the config.
pub fn build_runtime(
    config: &Config,
    clock: SharedClock,
    store: Option<Store>,
) -> Arc<dyn Runtime> {
    match config.runtime.kind {
        RuntimeKind::Mock => Arc::new(MockRuntime::new(
            config.runtime.mock.clone(),
            clock,
            Some(config.data_dir.clone()),
            store,
        )),
    }
}

/// Runs the agent until SIGINT/SIGTERM.
pub async fn run_daemon(config: Config) -> anyhow::Result<()> {
    let clock: SharedClock = Arc::new(SystemClock::new());
    std::fs::create_dir_all(&config.data_dir).map_err(|e| AgentError::DataDir {
        path: config.data_dir.clone(),
        message: format!("cannot create: {e}"),
    })?;
    // The ledger store is opened by the node too; SQLite (WAL) arbitrates both handles.
    let ledger = Store::open(&config.state_db())?;
    let runtime = build_runtime(&config, clock.clone(), Some(ledger));
    let desired_dir = match config.control_plane.mode {
        ControlPlaneMode::Standalone => {
            config.control_plane.desired_dir.clone().unwrap_or_default()
        }
    };
    let node = Node::start(NodeOptions {
        data_dir: config.data_dir.clone(),
        runtime,
        clock,
        secrets: Arc::new(DirSecrets::new(desired_dir.join("secrets"))),
        sink: Arc::new(LocalSink),
        boot_timeout: Duration::from_secs(config.agent.boot_timeout_seconds),
        max_instances: config.agent.max_instances,
    })
    .await?;

    let listener = tokio::net::TcpListener::bind(config.api.listen)
        .await
        .map_err(|e| AgentError::Listen {
            addr: config.api.listen.to_string(),
            message: e.to_string(),
        })?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let app = crate::api::router(crate::api::ApiState {
        status: node.status.clone(),
        supervisor: node.supervisor.clone(),
        metrics: node.metrics.clone(),
        store: node.store.clone(),
    });
    let mut api_stop = stop_rx.clone();
    let api = tokio::spawn(async move {
        let r = axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = api_stop.changed().await;
            })
            .await;
        if let Err(e) = r {
            tracing::error!(error = %e, "local API failed");
        }
    });
    tracing::info!(
        node_id = %config.node_id,
        data_dir = %config.data_dir.display(),
        api = %config.api.listen,
        runtime = node.runtime.kind(),
        desired_dir = %desired_dir.display(),
        "agent started"
    );

    if !desired_dir.is_dir() {
        anyhow::bail!(
            "control_plane.desired_dir {} is not a directory",
            desired_dir.display()
        );
    }
    let supervisor = node.supervisor.clone();
    let source = tokio::spawn(standalone::run(
        standalone::DirSource::new(desired_dir),
        Duration::from_millis(config.control_plane.rescan_interval_ms),
        move |plan| {
            let s = supervisor.clone();
            async move { s.apply(plan).await }
        },
        stop_rx,
    ));

    wait_for_signal().await;
    tracing::info!(mode = ?config.agent.on_shutdown, "shutting down (a second signal exits at once)");
    let _ = stop_tx.send(true);
    let _ = source.await;
    tokio::select! {
        _ = node.shutdown(config.agent.on_shutdown) => {}
        _ = wait_for_signal() => tracing::warn!("second signal: exiting without waiting"),
    }
    let _ = api.await;
    tracing::info!("agent stopped");
    Ok(())
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
