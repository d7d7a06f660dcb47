//! Host resources of a Firecracker VM through one seam ([`HostResources`]): the root
//! disk (pinned in the image cache, unpinned at release), scratch disk, volumes, tap,
//! addresses and rules. [`LocalHost`] is the real one, built on the host module shared
//! with the qemu runtime and the VMM layer's root disk; tests put their own behind the
//! seam. This module starts no VMM and decides nothing about an instance's status.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use plfm_guest_protocol as gp;

use super::FirecrackerConfig;
use crate::runtime::vmm::rootdisk;
use crate::runtime::RuntimeError;
use crate::spec::{InstanceId, Workload};
use crate::state::Store;

/// A disk handed to the VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskPath {
    /// Host path.
    pub path: PathBuf,
    /// Read-only.
    pub read_only: bool,
}

/// Host resources of one instance, from [`HostResources::prepare`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreparedHost {
    /// Root layer disks, bottom first, never empty, read-only: layer 0 is `vda`, the
    /// others follow the volumes (`plfm_guest_protocol::disks`).
    pub root_layers: Vec<PathBuf>,
    /// Scratch disk (vdb).
    pub scratch_disk: PathBuf,
    /// Volumes in `volume_id` order (vdc, vdd, …).
    pub volumes: Vec<(String, DiskPath)>,
    /// The tap to attach as eth0, if any.
    pub tap: Option<String>,
    /// The guest's network config (addresses on the tap), when host networking made
    /// one; else the guest gets the spec's overlay address without an IPv4 link.
    pub guest_network: Option<gp::NetworkConfig>,
    /// Where the host reaches the guest for health checks; else the overlay IPv6.
    pub address: Option<IpAddr>,
    /// Process defaults merged from the image (argv, env, cwd), if known.
    pub process: Option<crate::image::MergedProcess>,
}

/// The seam to host networking and disks (issue 6 provides the real ones).
#[async_trait]
pub trait HostResources: Send + Sync + 'static {
    /// Creates (idempotently) root disk, scratch disk, volumes and tap of an instance.
    /// `vmm_owner`: the uid and gid of the instance's jailed VMM, which opens the tap
    /// itself (None: not jailed, root owns the tap).
    async fn prepare(
        &self,
        id: &InstanceId,
        workload: &Workload,
        instance_dir: &Path,
        vmm_owner: Option<(u32, u32)>,
    ) -> Result<PreparedHost, RuntimeError>;
    /// Releases what `prepare` created (idempotent).
    async fn release(&self, id: &InstanceId, instance_dir: &Path) -> Result<(), RuntimeError>;
    /// At start-up: removes host resources no instance owns (orphan taps, rules).
    async fn remove_orphans(&self) -> Result<(), RuntimeError> {
        Ok(())
    }
    /// After an agent restart: keeps the root-disk pins of the adopted instances only.
    async fn retain_root_disks(&self, _adopted: &[InstanceId]) {}
    /// The resource ledger host resources are recorded in (for the VMM's cgroup).
    #[cfg(target_os = "linux")]
    fn ledger(&self) -> Option<crate::runtime::vmm::ledger::Ledger> {
        None
    }
}

/// Default host resources: the root disk from the image service, and scratch disk,
/// volumes, tap, addresses and rules from the host module shared with the qemu runtime
/// ([`crate::runtime::host`]). Linux only; taps need root.
#[cfg(target_os = "linux")]
pub struct LocalHost {
    host: crate::runtime::host::Host,
    images: Option<crate::image::ImageService>,
}

#[cfg(target_os = "linux")]
impl LocalHost {
    /// Host resources under `data_dir`, recorded in the resource ledger `ledger`.
    /// Fails on a bad `ipv4_pool` (naming the key).
    pub fn new(
        data_dir: &Path,
        images: Option<crate::image::ImageService>,
        ledger: Store,
        config: &FirecrackerConfig,
    ) -> Result<Self, String> {
        let host = crate::runtime::host::Host::new(
            data_dir,
            ledger,
            crate::runtime::host::HostConfig {
                ipv4_pool: config.ipv4_pool.clone(),
                volume_default_bytes: config.volume_default_bytes,
            },
        )
        .map_err(|e| format!("runtime.firecracker.{e}"))?;
        Ok(LocalHost { host, images })
    }
}

#[cfg(target_os = "linux")]
#[async_trait]
impl HostResources for LocalHost {
    async fn prepare(
        &self,
        id: &InstanceId,
        workload: &Workload,
        _instance_dir: &Path,
        vmm_owner: Option<(u32, u32)>,
    ) -> Result<PreparedHost, RuntimeError> {
        let Some(images) = &self.images else {
            return Err(RuntimeError::RootfsBuild(
                "no image service: cannot build the root disk".into(),
            ));
        };
        let root = rootdisk::prepare(images, id, workload).await?;
        let prep = self.host.prepare(id, workload, vmm_owner).await?;
        Ok(PreparedHost {
            root_layers: root.layers,
            scratch_disk: prep.scratch.clone(),
            volumes: prep
                .volumes
                .iter()
                .map(|(vid, path, read_only)| {
                    (
                        vid.clone(),
                        DiskPath {
                            path: path.clone(),
                            read_only: *read_only,
                        },
                    )
                })
                .collect(),
            tap: Some(prep.tap.tap.clone()),
            guest_network: Some(prep.guest_network(workload)?),
            address: Some(prep.probe_address()),
            process: Some(root.process),
        })
    }

    async fn release(&self, id: &InstanceId, _instance_dir: &Path) -> Result<(), RuntimeError> {
        if let Some(images) = &self.images {
            rootdisk::release(images, id);
        }
        self.host.release(id).await
    }

    async fn retain_root_disks(&self, adopted: &[InstanceId]) {
        if let Some(images) = &self.images {
            rootdisk::retain(images, adopted);
        }
    }

    fn ledger(&self) -> Option<crate::runtime::vmm::ledger::Ledger> {
        Some(self.host.ledger())
    }

    async fn remove_orphans(&self) -> Result<(), RuntimeError> {
        let removed = self.host.remove_orphans().await?;
        if !removed.is_empty() {
            tracing::info!(?removed, "removed plfm taps and rules no instance owns");
        }
        Ok(())
    }
}
