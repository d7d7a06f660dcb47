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

/// What a runtime failure means for the instance. The mapping to a reason code is the
/// one `match` in [`RuntimeError::reason`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RuntimeError {
    /// Pulling the image failed.
    #[error("{0}")]
    ImagePull(String),
    /// Building the root disk failed.
    #[error("{0}")]
    RootfsBuild(String),
    /// The host's disk is full (a `rootfs_build_failed` that also degrades the node).
    #[error("{0}")]
    NoSpace(String),
    /// The VMM did not start, refused its configuration, or died before the handshake.
    #[error("{0}")]
    VmmStart(String),
    /// Host or guest network setup failed.
    #[error("{0}")]
    Network(String),
    /// A volume could not be attached or mounted.
    #[error("{0}")]
    Volume(String),
    /// Secrets could not be written in the guest.
    #[error("{0}")]
    SecretsInjection(String),
    /// The host cgroup of the VMM processes OOM-killed one of them.
    #[error("{0}")]
    HostOom(String),
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
}

impl From<crate::image::ImageError> for RuntimeError {
    fn from(e: crate::image::ImageError) -> Self {
        if e.is_no_space() {
            RuntimeError::NoSpace(e.to_string())
        } else if e.reason() == ReasonCode::RootfsBuildFailed {
            RuntimeError::RootfsBuild(e.to_string())
        } else {
            RuntimeError::ImagePull(e.to_string())
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

    /// Removes every host resource of an instance (idempotent; the VM must be stopped).
    async fn cleanup(&self, id: &InstanceId) -> Result<(), RuntimeError>;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::ImageError;

    #[test]
    fn image_errors_map_to_runtime_errors_and_disk_full_is_its_own_kind() {
        let full = ImageError::build_io("write", "/x", std::io::Error::from_raw_os_error(28));
        assert!(
            matches!(RuntimeError::from(full), RuntimeError::NoSpace(m) if m.contains("no space"))
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
