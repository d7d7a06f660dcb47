//! An instance's root disk, the same for every VMM: built (or found) in the image cache
//! and pinned to the instance at prepare, unpinned when the instance is cleaned up,
//! and, after an agent restart, kept pinned only for the instances whose VMs were
//! adopted. A disk no instance pins is evictable (LRU past the high-water mark, and
//! `image gc`), so the cache stays bounded on a node that cycles through images.
//!
//! What it must not do: delete disks itself (the image service evicts), or run the
//! workload's process definition anywhere but into the guest config.

use std::path::{Path, PathBuf};

use plfm_guest_protocol as gp;

use crate::image::{merge_process, ImageRef, ImageService, MergedProcess, SpecImage};
use crate::runtime::RuntimeError;
use crate::spec::{InstanceId, Workload};

/// A prepared root (a stack of read-only layer disks) and the process the image
/// defines under the spec.
#[derive(Debug, Clone)]
pub struct RootDisk {
    /// The cached ext4 layer disks, bottom first, never empty (1 ..=
    /// [`plfm_guest_protocol::MAX_ROOT_LAYERS`]), attached read-only: layer 0 as `vda`,
    /// the others after the volumes ([`plfm_guest_protocol::disks`]).
    pub layers: Vec<PathBuf>,
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
    let layers = match root_layers(disk.layers, disk.path) {
        Ok(l) => l,
        Err(e) => {
            release(images, id);
            return Err(e);
        }
    };
    Ok(RootDisk { layers, process })
}

/// The layer list of an image's disk: never empty (an image service that names no
/// layers gives its one disk), at most [`plfm_guest_protocol::MAX_ROOT_LAYERS`].
fn root_layers(layers: Vec<PathBuf>, path: PathBuf) -> Result<Vec<PathBuf>, RuntimeError> {
    let layers = if layers.is_empty() {
        vec![path]
    } else {
        layers
    };
    let max = plfm_guest_protocol::MAX_ROOT_LAYERS as usize;
    if layers.len() > max {
        return Err(RuntimeError::RootfsBuild(
            format!(
                "the image's root is a stack of {} layer disks, at most {max} are supported",
                layers.len()
            )
            .into(),
        ));
    }
    Ok(layers)
}

impl RootDisk {
    /// The bottom layer (`vda`).
    pub fn bottom(&self) -> &std::path::Path {
        &self.layers[0]
    }

    /// `root_layers` of the guest config.
    pub fn count(&self) -> u32 {
        // At most MAX_ROOT_LAYERS (16), checked when the stack was prepared.
        u32::try_from(self.layers.len()).unwrap_or(u32::MAX)
    }
}

/// One disk of a VM as its VMM attaches it: the guest's name for it, the host file,
/// read-only or not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmDisk {
    /// `vda`, `vdb`, … (the VMM's drive id, the guest kernel's device name).
    pub name: String,
    /// Host path.
    pub path: PathBuf,
    /// Attached read-only.
    pub read_only: bool,
}

/// Every disk of a VM in attach order, the one order both VMMs and guest init follow
/// ([`plfm_guest_protocol::disks`]): root layer 0 (`vda`), scratch (`vdb`), the
/// volumes in `volume_id` order, then root layers 1 … N-1. Root layers are read-only.
pub fn vm_disks(
    layers: &[PathBuf],
    scratch: &Path,
    volumes: &[(PathBuf, bool)],
) -> Result<Vec<VmDisk>, RuntimeError> {
    if volumes.len() > gp::MAX_VOLUMES {
        return Err(RuntimeError::Volume(
            format!("more than {} volumes", gp::MAX_VOLUMES).into(),
        ));
    }
    if layers.is_empty() || layers.len() > gp::MAX_ROOT_LAYERS as usize {
        return Err(RuntimeError::RootfsBuild(
            format!(
                "{} root layer disks: 1 to {} are supported",
                layers.len(),
                gp::MAX_ROOT_LAYERS
            )
            .into(),
        ));
    }
    let mut out = Vec::with_capacity(layers.len() + 1 + volumes.len());
    for (name, role) in gp::disks::disk_order(layers.len(), volumes.len()) {
        let (path, read_only) = match role {
            gp::disks::DiskRole::RootLayer(i) => (&layers[i], true),
            gp::disks::DiskRole::Scratch => (&scratch.to_path_buf(), false),
            gp::disks::DiskRole::Volume(i) => (&volumes[i].0, volumes[i].1),
        };
        out.push(VmDisk {
            name,
            path: path.clone(),
            read_only,
        });
    }
    Ok(out)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn three_layers_and_two_volumes_are_vda_scratch_volumes_then_the_upper_layers() {
        let layers: Vec<PathBuf> = ["/c/l0.ext4", "/c/l1.ext4", "/c/l2.ext4"]
            .map(PathBuf::from)
            .into();
        let volumes = [
            (PathBuf::from("/v/vol-a.ext4"), false),
            (PathBuf::from("/v/vol-b.ext4"), true),
        ];
        let disks = vm_disks(&layers, Path::new("/i/scratch.ext4"), &volumes).unwrap();
        let got: Vec<(&str, &str, bool)> = disks
            .iter()
            .map(|d| (d.name.as_str(), d.path.to_str().unwrap(), d.read_only))
            .collect();
        assert_eq!(
            got,
            [
                ("vda", "/c/l0.ext4", true),
                ("vdb", "/i/scratch.ext4", false),
                ("vdc", "/v/vol-a.ext4", false),
                ("vdd", "/v/vol-b.ext4", true),
                ("vde", "/c/l1.ext4", true),
                ("vdf", "/c/l2.ext4", true),
            ]
        );
    }

    #[test]
    fn disk_counts_past_the_limits_are_refused() {
        let one = [PathBuf::from("/c/l0")];
        let vols: Vec<(PathBuf, bool)> =
            (0..25).map(|i| (format!("/v/{i}").into(), false)).collect();
        let e = vm_disks(&one, Path::new("/s"), &vols).unwrap_err();
        assert_eq!(e.to_string(), "more than 24 volumes");
        let e = vm_disks(&[], Path::new("/s"), &[]).unwrap_err();
        assert!(e.to_string().contains("0 root layer disks"), "{e}");
        // The largest VM: 16 layers and 24 volumes, the last layers named past vdz.
        let sixteen: Vec<PathBuf> = (0..16).map(|i| format!("/c/{i}").into()).collect();
        let d = vm_disks(&sixteen, Path::new("/s"), &vols[..24]).unwrap();
        assert_eq!(d.len(), 41);
        assert_eq!(
            (d[26].name.as_str(), d[26].path.to_str()),
            ("vdaa", Some("/c/1"))
        );
        assert_eq!(
            (d[40].name.as_str(), d[40].path.to_str()),
            ("vdao", Some("/c/15"))
        );
    }

    #[test]
    fn the_stack_is_never_empty_and_at_most_sixteen_disks() {
        let one = root_layers(vec![], "/d/flat.ext4".into()).unwrap();
        assert_eq!(one, vec![PathBuf::from("/d/flat.ext4")]);
        let three: Vec<PathBuf> = ["/d/0", "/d/1", "/d/2"].map(PathBuf::from).into();
        assert_eq!(
            root_layers(three.clone(), "/d/0".into()).unwrap(),
            three,
            "bottom first, as given"
        );
        let many: Vec<PathBuf> = (0..17).map(|i| format!("/d/{i}").into()).collect();
        let e = root_layers(many, "/d/0".into()).unwrap_err();
        assert!(e.to_string().contains("stack of 17 layer disks"), "{e}");
    }
}
