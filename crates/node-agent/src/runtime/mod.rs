//! The VMM seam: one [`Runtime`] trait, implemented by the mock (any OS) and, in later
//! work, by qemu and firecracker.
//!
//! The contract: a runtime owns everything host-side about one instance's VM (image and
//! disks in `prepare`, the VMM process in `start`/`stop`, leftovers in `cleanup`) and
//! reports what the guest says as [`VmEvent`]s. It never decides policy: restarts,
//! health thresholds, deadlines between steps and statuses belong to the instance
//! actor. Every method is idempotent, and `stop`/`cleanup` never leave a VM behind.

pub mod firecracker;
#[cfg(target_os = "linux")]
pub mod host;
pub mod mock;
pub mod qemu;
pub mod vmm;

use std::time::Duration;

use async_trait::async_trait;

use crate::instance::ReasonCode;
use crate::secrets::SecretMaterial;
use crate::spec::{HealthSpec, InstanceId, Workload};

/// Parses an IPv4 pool for the per-instance /30 links: a prefix of length 16–29 inside
/// 169.254.0.0/16 (`runtime.qemu.ipv4_pool`, `runtime.firecracker.ipv4_pool`). The
/// error names the key's value and what it must be.
pub fn parse_ipv4_pool(pool: &str) -> Result<(std::net::Ipv4Addr, u8), String> {
    let bad = || {
        format!(
            "ipv4_pool: {pool:?} is not an IPv4 prefix of length 16-29 inside 169.254.0.0/16 (e.g. 169.254.0.0/16)"
        )
    };
    let (a, l) = pool.split_once('/').ok_or_else(bad)?;
    let a: std::net::Ipv4Addr = a.parse().map_err(|_| bad())?;
    let l: u8 = l.parse().map_err(|_| bad())?;
    if !(16..=29).contains(&l) || a.octets()[..2] != [169, 254] {
        return Err(bad());
    }
    Ok((a, l))
}

/// What failed (one line, never a secret) and, where one exists, the typed error that
/// caused it (an I/O, network, image, cgroup or ledger error), reachable through
/// [`std::error::Error::source`].
#[derive(Debug, Clone)]
pub struct Cause {
    what: String,
    source: Option<std::sync::Arc<dyn std::error::Error + Send + Sync + 'static>>,
}

impl Cause {
    /// A failure described by `what` alone.
    pub fn new(what: impl Into<String>) -> Cause {
        Cause {
            what: what.into(),
            source: None,
        }
    }

    /// `what` failed because of `source`.
    pub fn because(
        what: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Cause {
        Cause {
            what: what.into(),
            source: Some(std::sync::Arc::new(source)),
        }
    }

    /// A typed error that says it all.
    pub fn of(source: impl std::error::Error + Send + Sync + 'static) -> Cause {
        Cause::because(String::new(), source)
    }
}

impl std::fmt::Display for Cause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (&self.source, self.what.is_empty()) {
            (Some(s), true) => write!(f, "{s}"),
            (Some(s), false) => write!(f, "{}: {s}", self.what),
            (None, _) => f.write_str(&self.what),
        }
    }
}

impl std::error::Error for Cause {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

/// Equal when they say the same (the typed sources are not comparable).
impl PartialEq for Cause {
    fn eq(&self, other: &Cause) -> bool {
        self.to_string() == other.to_string()
    }
}

impl Eq for Cause {}

impl From<String> for Cause {
    fn from(what: String) -> Cause {
        Cause::new(what)
    }
}

impl From<&str> for Cause {
    fn from(what: &str) -> Cause {
        Cause::new(what)
    }
}

/// What a runtime failure means for the instance, with its cause. The mapping to a
/// reason code is the one `match` in [`RuntimeError::reason`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RuntimeError {
    /// Pulling the image failed.
    #[error(transparent)]
    ImagePull(Cause),
    /// Building the root disk failed.
    #[error(transparent)]
    RootfsBuild(Cause),
    /// The host's disk is full (a `rootfs_build_failed` that also degrades the node).
    #[error(transparent)]
    NoSpace(Cause),
    /// The VMM did not start, refused its configuration, or died before the handshake.
    #[error(transparent)]
    VmmStart(Cause),
    /// Host or guest network setup failed.
    #[error(transparent)]
    Network(Cause),
    /// A volume could not be attached or mounted.
    #[error(transparent)]
    Volume(Cause),
    /// Secrets could not be written in the guest.
    #[error(transparent)]
    SecretsInjection(Cause),
    /// The host cgroup of the VMM processes OOM-killed one of them.
    #[error(transparent)]
    HostOom(Cause),
    /// The guest reported a failure with its own reason.
    #[error("{detail}")]
    Guest {
        /// Reason the guest gave.
        reason: ReasonCode,
        /// What it said.
        detail: String,
    },
}

impl RuntimeError {
    /// The reason code this failure is reported with.
    pub fn reason(&self) -> ReasonCode {
        match self {
            RuntimeError::ImagePull(_) => ReasonCode::ImagePullFailed,
            RuntimeError::RootfsBuild(_) | RuntimeError::NoSpace(_) => {
                ReasonCode::RootfsBuildFailed
            }
            RuntimeError::VmmStart(_) => ReasonCode::FirecrackerStartFailed,
            RuntimeError::Network(_) => ReasonCode::NetworkSetupFailed,
            RuntimeError::Volume(_) => ReasonCode::VolumeAttachFailed,
            RuntimeError::SecretsInjection(_) => ReasonCode::SecretsInjectionFailed,
            RuntimeError::HostOom(_) => ReasonCode::OomKilled,
            RuntimeError::Guest { reason, .. } => *reason,
        }
    }

    /// A failure of something outside the instance that will likely pass (the registry
    /// unreachable, 5xx, a pull that timed out): the instance is retried with backoff
    /// and its restart budget is not spent. Found through the typed source chain.
    pub fn is_transient(&self) -> bool {
        let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(self);
        while let Some(e) = cur {
            if let Some(image) = e.downcast_ref::<crate::image::ImageError>() {
                return image.is_transient();
            }
            cur = e.source();
        }
        false
    }
}

impl From<crate::image::ImageError> for RuntimeError {
    fn from(e: crate::image::ImageError) -> Self {
        if e.is_no_space() {
            RuntimeError::NoSpace(Cause::of(e))
        } else if e.reason() == ReasonCode::RootfsBuildFailed {
            RuntimeError::RootfsBuild(Cause::of(e))
        } else {
            RuntimeError::ImagePull(Cause::of(e))
        }
    }
}

/// What the VM is told at boot.
#[derive(Debug, Default)]
pub struct BootContext {
    /// Fresh id of this boot.
    pub boot_id: String,
    /// Secret material for the guest, when the spec binds secrets.
    pub secrets: Option<SecretMaterial>,
}

/// A running (or starting) VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmHandle {
    /// Instance.
    pub instance_id: InstanceId,
    /// Generation it runs.
    pub generation: i32,
    /// Boot id.
    pub boot_id: String,
    /// Spec hash it runs.
    pub spec_hash: String,
}

/// Something the VM or its guest did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmEvent {
    /// The guest applied its config and exec'd the workload.
    WorkloadStarted,
    /// The guest saw the workload listen on the health check's port: probe now.
    PortListening,
    /// The workload exited.
    Exited {
        /// Exit code (128+signal when killed by a signal).
        code: i32,
        /// The guest kernel (or the host cgroup) OOM-killed it.
        oom_killed: bool,
    },
    /// The guest or VMM failed (before or after the workload started).
    Failed(RuntimeError),
    /// The VMM process exited without the guest saying why.
    VmmExited {
        /// Its exit code, if known.
        code: Option<i32>,
        /// What is known (exit code meaning, last log lines).
        detail: String,
    },
}

/// How a stop went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StopOutcome {
    /// The VM stopped within the grace period (no forced kill).
    pub graceful: bool,
    /// The workload's exit code, if the guest reported one.
    pub exit_code: Option<i32>,
}

/// A VMM implementation.
#[async_trait]
pub trait Runtime: Send + Sync + 'static {
    /// `mock`, `qemu` or `firecracker`.
    fn kind(&self) -> &'static str;

    /// What an operator should know about how this runtime runs VMs on this host, said
    /// by `/healthz` and `status`: software emulation, or a defence the config turned
    /// off. Found at start; not failures (those fail instances).
    fn notices(&self) -> Vec<String> {
        Vec::new()
    }

    /// Host-side preparation: image and root disk, scratch disk, network, volumes.
    /// Idempotent.
    async fn prepare(&self, id: &InstanceId, workload: &Workload) -> Result<(), RuntimeError>;

    /// Starts the VMM and hands the guest its config; returns once the VMM runs (the
    /// workload start arrives later as [`VmEvent::WorkloadStarted`]).
    async fn start(
        &self,
        id: &InstanceId,
        workload: &Workload,
        boot: BootContext,
    ) -> Result<VmHandle, RuntimeError>;

    /// The next event of a VM. Cancel-safe: dropping the future loses no event.
    async fn next_event(&self, vm: &VmHandle) -> VmEvent;

    /// One health probe from the host to the instance. `Err` carries why it failed.
    async fn probe_health(&self, vm: &VmHandle, check: &HealthSpec) -> Result<(), String>;

    /// Stops the VM: graceful (workload SIGTERM) up to `grace`, then forced. Never
    /// leaves the VMM running.
    async fn stop(&self, vm: &VmHandle, grace: Duration) -> StopOutcome;

    /// VMs found running (after an agent restart): adopted or stopped by the caller.
    async fn recover(&self) -> Result<Vec<VmHandle>, RuntimeError>;

    /// The VM this runtime tracks for an instance right now, if any.
    fn current_vm(&self, id: &InstanceId) -> Option<VmHandle>;

    /// The host end of the instance's running VM's vsock device (the hybrid-vsock Unix
    /// socket through which the host connects to guest ports, e.g. exec on 5162);
    /// `None` when the runtime has no such device or no VM runs.
    fn guest_vsock(&self, _id: &InstanceId) -> Option<std::path::PathBuf> {
        None
    }

    /// Removes every host resource of an instance (idempotent; the VM must be stopped).
    async fn cleanup(&self, id: &InstanceId) -> Result<(), RuntimeError>;

    /// The instance's directory, where its logs are (`workload.log`, the console),
    /// when this runtime keeps one.
    fn instance_dir_of(&self, _id: &InstanceId) -> Option<std::path::PathBuf> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::ImageError;

    #[test]
    fn a_runtime_error_keeps_its_typed_cause_as_the_source() {
        let io = std::io::Error::from_raw_os_error(2);
        let e = RuntimeError::VmmStart(Cause::because("cannot execute /x/vmm", io));
        assert!(e.to_string().starts_with("cannot execute /x/vmm: "), "{e}");
        let src = std::error::Error::source(&e).expect("a source");
        assert!(src.downcast_ref::<std::io::Error>().is_some(), "{src:?}");
        let plain = RuntimeError::Volume("more than 24 volumes".into());
        assert!(std::error::Error::source(&plain).is_none());
        assert_eq!(plain.to_string(), "more than 24 volumes");
        let image = ImageError::build_io("write", "/x", std::io::Error::from_raw_os_error(5));
        let text = image.to_string();
        let e = RuntimeError::from(image);
        assert_eq!(e.to_string(), text);
        assert!(std::error::Error::source(&e)
            .and_then(|s| s.downcast_ref::<ImageError>())
            .is_some());
    }

    #[test]
    fn only_a_transient_image_failure_makes_a_transient_runtime_error() {
        let registry = |transient| ImageError::Registry {
            what: "manifest sha256:ab".into(),
            repository: "127.0.0.1:1/app".into(),
            cause: "connection refused".into(),
            transient,
        };
        assert!(RuntimeError::from(registry(true)).is_transient());
        assert!(!RuntimeError::from(registry(false)).is_transient());
        let shared = ImageError::Shared(std::sync::Arc::new(registry(true)));
        assert!(RuntimeError::from(shared).is_transient());
        let timeout = ImageError::LimitExceeded {
            what: "image".into(),
            limit: "image_timeout_secs",
            detail: "x".into(),
        };
        assert!(RuntimeError::from(timeout).is_transient());
        let big = ImageError::LimitExceeded {
            what: "image".into(),
            limit: "max_unpacked_bytes",
            detail: "x".into(),
        };
        assert!(!RuntimeError::from(big).is_transient());
        assert!(!RuntimeError::VmmStart("exited".into()).is_transient());
    }

    #[test]
    fn image_errors_map_to_runtime_errors_and_disk_full_is_its_own_kind() {
        let full = ImageError::build_io("write", "/x", std::io::Error::from_raw_os_error(28));
        assert!(
            matches!(RuntimeError::from(full), RuntimeError::NoSpace(m) if m.to_string().contains("no space"))
        );
        let build = ImageError::build_io("write", "/x", std::io::Error::from_raw_os_error(5));
        assert!(matches!(
            RuntimeError::from(build),
            RuntimeError::RootfsBuild(_)
        ));
        assert_eq!(
            RuntimeError::NoSpace("x".into()).reason(),
            ReasonCode::RootfsBuildFailed
        );
    }
}
