//! The VMM layer: everything about running a VM that is not one VMM's own dialect,
//! written once and used by both the qemu and the Firecracker runtime
//! (docs/runtimes.md has the picture).
//!
//! - [`process`]: process identity (pid + start time), detached spawn into the host
//!   cgroup, socket and exit waits, the meaning of an exit status;
//! - [`logs`]: the log tails every failure message carries, the console's size cap;
//! - [`guest`]: the guest config of the handshake and the VM's size (memory, vCPUs,
//!   CPU weight), from a workload whose defaults are resolved here, once;
//! - [`monitor`]: the per-VM task that turns the guest session and the VMM's exit into
//!   `VmEvent`s (one terminal event, one exit-code meaning, adoption);
//! - [`cgroup`]: the host cgroup of the VMM processes (memory, pids, cpu);
//! - [`ledger`]: the resource ledger rows written before a resource exists;
//! - [`rootdisk`]: the root disk's pin (prepare) and unpin (cleanup, restart);
//! - [`workload_logs`]: the guest's log stream (port 5163) into `workload.log` and the
//!   agent's log shipper.
//!
//! What stays in `runtime/qemu/`: QEMU's argv, vhost-device-vsock, QMP. In
//! `runtime/firecracker/`: its API calls, the jailer's arguments and chroot, its exit
//! codes. Host networking, scratch disks and volumes are `runtime::host`. This layer
//! must not decide policy (restarts, statuses: the instance actor) and must not log
//! guest configs (they carry secrets).

#[cfg(target_os = "linux")]
pub mod cgroup;
pub mod guest;
#[cfg(target_os = "linux")]
pub mod ledger;
pub mod logs;
pub mod monitor;
pub mod process;
pub mod rootdisk;
pub mod workload_logs;

/// Checks a VMM uid range (`vmm_uid_base`, `vmm_uid_count`); the error starts with the
/// bad key.
pub fn validate_uid_range(base: u32, count: u32) -> Result<(), String> {
    if base < 1000 {
        return Err(format!(
            "vmm_uid_base: {base} is below 1000 (system and user accounts live there)"
        ));
    }
    if count == 0 || u64::from(base) + u64::from(count) > 1 << 31 {
        return Err(format!(
            "vmm_uid_count: {count} uids from {base} do not fit below 2^31 (or the count is 0)"
        ));
    }
    Ok(())
}
