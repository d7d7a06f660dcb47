//! An instance's root disk, the same for every VMM: built (or found) in the image cache
//! and pinned to the instance at prepare, unpinned when the instance is cleaned up,
//! and, after an agent restart, kept pinned only for the instances whose VMs were
//! adopted. A disk no instance pins is evictable (LRU past the high-water mark, and
//! `image gc`), so the cache stays bounded on a node that cycles through images.
//!
//! What it must not do: delete disks itself (the image service evicts), or run the
//! workload's process definition anywhere but into the guest config.

use std::path::PathBuf;

use crate::image::{merge_process, ImageRef, ImageService, MergedProcess, SpecImage};
use crate::runtime::RuntimeError;
use crate::spec::{InstanceId, Workload};

/// A prepared root disk and the process the image defines under the spec.
#[derive(Debug, Clone)]
pub struct RootDisk {
    /// The cached ext4 disk (attached read-only as `vda`).
    pub path: PathBuf,
    /// argv, env, cwd and user: the image's defaults merged under the spec.
    pub process: MergedProcess,
}

/// Builds or finds the workload's root disk and pins it to `id`. Fails when the image
/// and the spec together give no command to run.
pub async fn prepare(
    images: &ImageService,
    id: &InstanceId,
    w: &Workload,
) -> Result<RootDisk, RuntimeError> {
    let i = &w.spec.image;
    let spec_image = SpecImage {
        reference: i.reference.clone(),
        digest: i.digest.clone(),
        index_digest: i.index_digest.clone(),
        resolved_digest: w.digest.to_string(),
        os: i.os.clone(),
        arch: i.arch.clone(),
    };
    let image = ImageRef::from_spec(&spec_image).map_err(RuntimeError::from)?;
    let disk = images
        .ensure_root_disk(&image, id.as_str())
        .await
        .map_err(RuntimeError::from)?;
    let process = merge_process(
        &disk.config,
        &w.spec.command,
        w.spec.env_vars.as_ref(),
        w.spec.workdir.as_deref(),
    );
    if process.argv.is_empty() {
        // The disk stays cached but not pinned by an instance that cannot run.
        release(images, id);
        return Err(RuntimeError::VmmStart(
            format!(
                "image {} has no entrypoint or cmd and the spec has no command",
                w.digest
            )
            .into(),
        ));
    }
    Ok(RootDisk {
        path: disk.path,
        process,
    })
}

/// Unpins `id`'s root disk (idempotent); the disk stays cached until evicted.
pub fn release(images: &ImageService, id: &InstanceId) {
    if let Err(e) = images.unpin(id.as_str()) {
        tracing::warn!(instance = %id, error = %e, "cannot unpin the root disk");
    }
}

/// After an agent restart: keeps the pins of the adopted instances only (the others
/// pin their disk again when they are prepared).
pub fn retain(images: &ImageService, adopted: &[InstanceId]) {
    let keep: Vec<&str> = adopted.iter().map(|i| i.as_str()).collect();
    match images.retain_pins(&keep) {
        Ok(0) => {}
        Ok(n) => tracing::info!(
            unpinned = n,
            "root disks of instances not running are evictable again"
        ),
        Err(e) => tracing::warn!(error = %e, "cannot drop stale root-disk pins"),
    }
}
