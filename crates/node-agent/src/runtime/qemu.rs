//! The qemu runtime (DESIGN §5): one `qemu-system-x86_64 -M microvm` process per
//! instance, with its vsock device served by one `vhost-device-vsock` process, both
//! detached from the agent (own session) so they survive an agent restart.
//!
//! What it owns, per instance: the root disk pin (through [`ImageService`](crate::image::ImageService)), the scratch
//! disk, volume attachments, tap, addresses and rules (through the host module shared
//! with the Firecracker runtime, [`crate::runtime::host`]), the two processes, their
//! sockets and the console log. Every resource is written to the resource ledger before
//! it is created and removed from it after it is gone; processes are recorded with pid
//! and start time (from `/proc/<pid>/stat`), so [`Runtime::recover`](crate::runtime::Runtime::recover) finds exactly the
//! processes it started, never a recycled pid.
//!
//! Per VM a background task serves the guest channel (handshake, status events, stop
//! requests) and watches the QEMU process; [`Runtime::next_event`](crate::runtime::Runtime::next_event) reads what it
//! reports. This module must not decide policy (restarts, health thresholds,
//! statuses belong to the instance actor) and must not log the guest config, which
//! carries secrets.

use std::net::Ipv4Addr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::cgroup::CgroupMode;

#[cfg(target_os = "linux")]
mod vm;
#[cfg(target_os = "linux")]
pub use vm::{ProcId, QemuRuntime};

/// Acceleration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Accel {
    /// KVM when `/dev/kvm` opens read-write, else TCG.
    #[default]
    Auto,
    /// KVM (fails to start without it).
    Kvm,
    /// Software emulation.
    Tcg,
}

/// `[runtime.qemu]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QemuConfig {
    /// QEMU binary (path or name on PATH).
    #[serde(default = "default_qemu")]
    pub binary: String,
    /// Acceleration.
    #[serde(default)]
    pub accel: Accel,
    /// Guest kernel (required for `kind = "qemu"`).
    #[serde(default)]
    pub kernel: Option<PathBuf>,
    /// Platform initramfs (`plfm-node-agent build-initramfs`). Not set: the agent builds
    /// and keeps its own from `runtime.qemu.kernel` and `[guest]` (docs/guest.md).
    #[serde(default)]
    pub initramfs: Option<PathBuf>,
    /// `vhost-device-vsock` binary (path or name on PATH).
    #[serde(default = "default_vhost")]
    pub vhost_device_vsock: String,
    /// Deadline from VMM start to a completed guest handshake (covers the boot).
    #[serde(default = "default_boot_timeout")]
    pub boot_timeout_seconds: u64,
    /// Cap of the console log; it is cut back to its last half when exceeded.
    #[serde(default = "default_console_max")]
    pub console_max_bytes: u64,
    /// IPv4 pool for the per-instance /30 links (`169.254.0.0/16`).
    #[serde(default = "default_pool")]
    pub ipv4_pool: String,
    /// Size of a volume created on first use.
    #[serde(default = "default_volume_bytes")]
    pub volume_default_bytes: u64,
    /// Host cgroup per instance for QEMU and vhost-device-vsock, limiting memory, tasks
    /// and CPU weight (`auto`: when the host has usable memory, pids and cpu
    /// controllers, else unconfined with one warning; `off`: never).
    #[serde(default)]
    pub cgroup: CgroupMode,
    /// Parent of the per-instance groups, a path inside the cgroup hierarchy (on v1 the
    /// same path in the memory, pids and cpu hierarchies; default: `plfm` under the
    /// agent's own cgroup, per hierarchy on v1).
    #[serde(default)]
    pub cgroup_parent: Option<String>,
    /// Memory added to the guest memory for the instance's cgroup limit: what QEMU and
    /// vhost-device-vsock use beyond guest RAM.
    #[serde(default = "default_overhead")]
    pub memory_overhead_mib: u64,
    /// Run QEMU and vhost-device-vsock as an unprivileged uid of the instance's own, QEMU
    /// chrooted and under its seccomp sandbox (default on). A VM whose sandbox cannot be
    /// set up is not started; `false` runs both as root, unconfined (unsafe with
    /// untrusted tenants).
    #[serde(default = "default_true")]
    pub sandbox: bool,
    /// Where the per-instance jails live (sockets the unprivileged VMM processes use,
    /// QEMU's chroot); must be reachable by other users (each jail is not). Outside the
    /// data dir, which no other user may enter.
    #[serde(default = "default_jail_dir")]
    pub jail_dir: PathBuf,
    /// First uid (and gid, the same number) of the range VMM processes run as; one per
    /// instance. No account on the host may use the range.
    #[serde(default = "default_uid_base")]
    pub vmm_uid_base: u32,
    /// Size of that range (at least the number of VMs the node runs).
    #[serde(default = "default_uid_count")]
    pub vmm_uid_count: u32,
}

fn default_qemu() -> String {
    "qemu-system-x86_64".into()
}
fn default_vhost() -> String {
    "vhost-device-vsock".into()
}
fn default_boot_timeout() -> u64 {
    90
}
fn default_console_max() -> u64 {
    1 << 20
}
fn default_pool() -> String {
    "169.254.0.0/16".into()
}
fn default_volume_bytes() -> u64 {
    1 << 30
}
fn default_overhead() -> u64 {
    192
}
fn default_true() -> bool {
    true
}
fn default_jail_dir() -> PathBuf {
    PathBuf::from("/run/plfm-node-agent/qemu")
}
fn default_uid_base() -> u32 {
    400_000
}
fn default_uid_count() -> u32 {
    65_536
}
/// 64 GiB: more is a unit mistake (bytes given as MiB).
const MAX_OVERHEAD_MIB: u64 = 64 << 10;

impl Default for QemuConfig {
    fn default() -> Self {
        QemuConfig {
            binary: default_qemu(),
            accel: Accel::Auto,
            kernel: None,
            initramfs: None,
            vhost_device_vsock: default_vhost(),
            boot_timeout_seconds: default_boot_timeout(),
            console_max_bytes: default_console_max(),
            ipv4_pool: default_pool(),
            volume_default_bytes: default_volume_bytes(),
            cgroup: CgroupMode::Required,
            cgroup_parent: None,
            memory_overhead_mib: default_overhead(),
            sandbox: true,
            jail_dir: default_jail_dir(),
            vmm_uid_base: default_uid_base(),
            vmm_uid_count: default_uid_count(),
        }
    }
}

impl QemuConfig {
    /// Checks the table; the error starts with the bad key.
    pub(crate) fn validate(&self) -> Result<(), String> {
        if self.kernel.is_none() {
            return Err("kernel: required when runtime.kind = \"qemu\"".into());
        }
        if self.binary.is_empty() {
            return Err("binary: must not be empty".into());
        }
        if self.vhost_device_vsock.is_empty() {
            return Err("vhost_device_vsock: must not be empty".into());
        }
        if self.boot_timeout_seconds == 0 {
            return Err("boot_timeout_seconds: must be at least 1".into());
        }
        if self.console_max_bytes < 4096 {
            return Err("console_max_bytes: must be at least 4096".into());
        }
        self.pool().map(|_| ())?;
        if let Some(p) = &self.cgroup_parent {
            crate::cgroup::validate_parent(p).map_err(|e| format!("cgroup_parent: {e}"))?;
        }
        crate::runtime::vmm::validate_uid_range(self.vmm_uid_base, self.vmm_uid_count)?;
        if !self.jail_dir.is_absolute() {
            return Err(format!(
                "jail_dir: {} must be an absolute path",
                self.jail_dir.display()
            ));
        }
        if !(1..=MAX_OVERHEAD_MIB).contains(&self.memory_overhead_mib) {
            return Err(format!(
                "memory_overhead_mib: {} is outside 1..={MAX_OVERHEAD_MIB}",
                self.memory_overhead_mib
            ));
        }
        Ok(())
    }

    pub(crate) fn pool(&self) -> Result<(Ipv4Addr, u8), String> {
        super::parse_ipv4_pool(&self.ipv4_pool)
    }
}
