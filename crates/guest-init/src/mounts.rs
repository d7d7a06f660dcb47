//! The mount plan: which filesystem goes where, in which order, with which flags, and
//! which volume paths are refused. Pure decisions only; [`crate::init`] carries them out
//! through [`crate::sys`].
//!
//! Layout before the root switch (all under the staging directory, `/` in a VM):
//! `proc`, `sys`, `dev`; the root layers read-only: `mnt/lower` when the image is one
//! flattened disk, else `mnt/lower/0` (bottom) … `mnt/lower/<N-1>` (top);
//! `mnt/scratch` (scratch disk with `upper/` and `work/`), `mnt/newroot` (the overlay
//! of the layers under the scratch disk's upper dir). After the switch: tmpfs on `/run`
//! and `/tmp`, devpts and `/dev/shm`, then the volumes.

use std::path::{Component, Path, PathBuf};

use nix::mount::MsFlags;
use plfm_guest_protocol::{disks, MountConfig, MAX_VOLUMES};

/// One mount to perform.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountStep {
    /// Source (device path or a name for pseudo filesystems).
    pub source: String,
    /// Target directory (created if missing).
    pub target: PathBuf,
    /// Filesystem type.
    pub fstype: &'static str,
    /// Mount flags.
    pub flags: MsFlags,
    /// Filesystem options.
    pub data: Option<String>,
}

impl MountStep {
    fn new(
        source: &str,
        target: PathBuf,
        fstype: &'static str,
        flags: MsFlags,
        data: Option<&str>,
    ) -> Self {
        MountStep {
            source: source.to_string(),
            target,
            fstype,
            flags,
            data: data.map(str::to_string),
        }
    }
}

/// Paths of the pre-switch layout under a staging directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// The staging directory (`/` in a VM).
    pub staging: PathBuf,
}

impl Layout {
    /// `<staging>/mnt/lower`.
    pub fn lower(&self) -> PathBuf {
        self.staging.join("mnt/lower")
    }
    /// Where root layer `layer` (0 = bottom) of a stack of `layers` is mounted:
    /// `<staging>/mnt/lower` for a single layer (the flattened image, as before
    /// stacks), else `<staging>/mnt/lower/<layer>`.
    pub fn layer(&self, layer: usize, layers: usize) -> PathBuf {
        if layers == 1 {
            self.lower()
        } else {
            self.lower().join(layer.to_string())
        }
    }
    /// `<staging>/mnt/scratch`.
    pub fn scratch(&self) -> PathBuf {
        self.staging.join("mnt/scratch")
    }
    /// `<staging>/mnt/scratch/upper`.
    pub fn upper(&self) -> PathBuf {
        self.scratch().join("upper")
    }
    /// `<staging>/mnt/scratch/work`.
    pub fn work(&self) -> PathBuf {
        self.scratch().join("work")
    }
    /// `<staging>/mnt/newroot`.
    pub fn newroot(&self) -> PathBuf {
        self.staging.join("mnt/newroot")
    }
}

const NOSUID_NODEV_NOEXEC: MsFlags = MsFlags::MS_NOSUID
    .union(MsFlags::MS_NODEV)
    .union(MsFlags::MS_NOEXEC);

/// `/proc`, `/sys`, `/dev` under the staging directory; the first step of init.
pub fn pseudo_filesystems(layout: &Layout) -> Vec<MountStep> {
    vec![
        MountStep::new(
            "proc",
            layout.staging.join("proc"),
            "proc",
            NOSUID_NODEV_NOEXEC,
            None,
        ),
        MountStep::new(
            "sysfs",
            layout.staging.join("sys"),
            "sysfs",
            NOSUID_NODEV_NOEXEC,
            None,
        ),
        MountStep::new(
            "devtmpfs",
            layout.staging.join("dev"),
            "devtmpfs",
            MsFlags::MS_NOSUID,
            Some("mode=0755"),
        ),
    ]
}

/// Refuses paths that cannot be put into overlayfs' comma-separated option string.
fn overlay_safe(p: &Path) -> Result<&str, String> {
    let s = p
        .to_str()
        .ok_or_else(|| format!("{} is not UTF-8", p.display()))?;
    if s.contains([',', ':', '\\']) {
        return Err(format!(
            "{s}: overlay paths must not contain ',', ':' or '\\'"
        ));
    }
    Ok(s)
}

/// Longest overlay option string accepted: `mount(2)` copies at most one page of
/// filesystem options, terminating NUL included.
pub const MAX_OVERLAY_OPTIONS: usize = 4095;

/// The root: each root layer read-only at its own directory (bottom first), the scratch
/// disk read-write, then the overlay with the layers as lower dirs (top-most first, as
/// overlayfs lists them) and upper and work dirs on the scratch disk. The executor
/// creates `upper/` and `work/` on the scratch disk before the last (overlay) step.
/// `layer_devices` is bottom first and never empty; a single layer gives the plan of a
/// flattened image (`mnt/lower` as the only lower dir).
pub fn root_plan(
    layout: &Layout,
    layer_devices: &[PathBuf],
    scratch_device: &Path,
) -> Result<Vec<MountStep>, String> {
    let n = layer_devices.len();
    if n == 0 {
        return Err("no root layer device".into());
    }
    let mut lowers = Vec::with_capacity(n);
    for i in (0..n).rev() {
        lowers.push(overlay_safe(&layout.layer(i, n))?.to_string());
    }
    let data = format!(
        "lowerdir={},upperdir={},workdir={}",
        lowers.join(":"),
        overlay_safe(&layout.upper())?,
        overlay_safe(&layout.work())?
    );
    if data.len() > MAX_OVERLAY_OPTIONS {
        return Err(format!(
            "overlay options for {n} root layers are {} bytes, more than the kernel's {MAX_OVERLAY_OPTIONS} (staging directory {} too long)",
            data.len(),
            layout.staging.display()
        ));
    }
    let mut plan: Vec<MountStep> = layer_devices
        .iter()
        .enumerate()
        .map(|(i, dev)| {
            MountStep::new(
                &dev.to_string_lossy(),
                layout.layer(i, n),
                "ext4",
                MsFlags::MS_RDONLY.union(MsFlags::MS_NODEV),
                None,
            )
        })
        .collect();
    plan.push(MountStep::new(
        &scratch_device.to_string_lossy(),
        layout.scratch(),
        "ext4",
        MsFlags::MS_NODEV,
        None,
    ));
    plan.push(MountStep::new(
        "overlay",
        layout.newroot(),
        "overlay",
        MsFlags::empty(),
        Some(&data),
    ));
    Ok(plan)
}

/// Mounts made in the new root after the switch.
pub fn runtime_filesystems() -> Vec<MountStep> {
    let nosuid_nodev = MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV);
    vec![
        MountStep::new(
            "tmpfs",
            "/run".into(),
            "tmpfs",
            nosuid_nodev,
            Some("mode=0755"),
        ),
        MountStep::new(
            "tmpfs",
            "/tmp".into(),
            "tmpfs",
            nosuid_nodev,
            Some("mode=1777"),
        ),
        MountStep::new(
            "devpts",
            "/dev/pts".into(),
            "devpts",
            MsFlags::MS_NOSUID.union(MsFlags::MS_NOEXEC),
            Some("newinstance,ptmxmode=0666,mode=0620"),
        ),
        MountStep::new(
            "shm",
            "/dev/shm".into(),
            "tmpfs",
            nosuid_nodev,
            Some("mode=1777"),
        ),
    ]
}

/// Paths a volume may neither replace nor live under. `/`, `/run` and `/tmp` are refused
/// only as exact paths; the others with everything below them.
const RESERVED_EXACT: &[&str] = &["/", "/run", "/tmp"];
const RESERVED_TREES: &[&str] = &["/proc", "/sys", "/dev", "/run/secrets"];

/// Normalizes an absolute guest path (drops `.` and repeated `/`) and refuses relative
/// paths, `..`, and reserved paths.
pub fn check_mount_path(path: &str) -> Result<PathBuf, String> {
    if !path.starts_with('/') {
        return Err(format!("mount path {path:?} is not absolute"));
    }
    if path.contains('\0') {
        return Err(format!("mount path {path:?} contains NUL"));
    }
    let mut norm = PathBuf::from("/");
    for c in Path::new(path).components() {
        match c {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(n) => norm.push(n),
            Component::ParentDir => return Err(format!("mount path {path:?} contains '..'")),
            Component::Prefix(_) => return Err(format!("mount path {path:?} is not a Unix path")),
        }
    }
    check_reserved(&norm).map(|()| norm)
}

/// Refuses a normalized absolute path that is reserved (also used on the resolved path
/// after symlinks, so an image cannot redirect a volume onto `/proc` or the secrets).
pub fn check_reserved(norm: &Path) -> Result<(), String> {
    for r in RESERVED_EXACT {
        if norm == Path::new(r) {
            return Err(format!("mount path {} is reserved", norm.display()));
        }
    }
    for r in RESERVED_TREES {
        if norm.starts_with(r) {
            return Err(format!(
                "mount path {} is reserved (under {r})",
                norm.display()
            ));
        }
    }
    Ok(())
}

/// Name of the `index`-th volume device in `volume_id` order: `vdc`, `vdd`, … `vdz`
/// ([`MAX_VOLUMES`] at most; the disk order is [`plfm_guest_protocol::disks`]).
pub fn volume_device_name(index: usize) -> Option<String> {
    (index < MAX_VOLUMES).then(|| disks::disk_name(disks::volume_index(index)))
}

/// Name of root layer `layer`'s device (0 = bottom) in a VM with `volumes` volumes:
/// `vda` for the bottom layer, the others after the volumes (`vde`, `vdf` … with two
/// volumes), past `vdz` as Linux names them (`vdaa` …).
pub fn layer_device_name(layer: usize, volumes: usize) -> String {
    disks::disk_name(disks::root_layer_index(layer, volumes))
}

/// A volume ready to mount.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeMount {
    /// Volume id.
    pub volume_id: String,
    /// Its device.
    pub device: PathBuf,
    /// Normalized mount path.
    pub path: PathBuf,
    /// Read-only.
    pub read_only: bool,
}

impl VolumeMount {
    /// Flags for the mount (volumes never carry set-uid binaries or device nodes).
    pub fn flags(&self) -> MsFlags {
        let base = MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV);
        if self.read_only {
            base.union(MsFlags::MS_RDONLY)
        } else {
            base
        }
    }
}

/// Orders volumes by `volume_id`, gives each its device, and checks paths, filesystems
/// and duplicates. `device_for(i)` is the device of the i-th volume in that order.
pub fn volume_plan(
    mounts: &[MountConfig],
    device_for: impl Fn(usize) -> Option<PathBuf>,
) -> Result<Vec<VolumeMount>, String> {
    let mut sorted: Vec<&MountConfig> = mounts.iter().collect();
    sorted.sort_by(|a, b| a.volume_id.cmp(&b.volume_id));
    let mut plan: Vec<VolumeMount> = Vec::with_capacity(sorted.len());
    for (i, m) in sorted.into_iter().enumerate() {
        if plan.iter().any(|p| p.volume_id == m.volume_id) {
            return Err(format!("volume {} listed twice", m.volume_id));
        }
        if m.filesystem != "ext4" {
            return Err(format!(
                "volume {}: filesystem {:?} not supported (ext4 only)",
                m.volume_id, m.filesystem
            ));
        }
        let path =
            check_mount_path(&m.mount_path).map_err(|e| format!("volume {}: {e}", m.volume_id))?;
        if let Some(other) = plan.iter().find(|p| p.path == path) {
            return Err(format!(
                "volumes {} and {} both mount at {}",
                other.volume_id,
                m.volume_id,
                path.display()
            ));
        }
        let device = device_for(i)
            .ok_or_else(|| format!("volume {}: no device for volume #{i}", m.volume_id))?;
        plan.push(VolumeMount {
            volume_id: m.volume_id.clone(),
            device,
            path,
            read_only: m.read_only,
        });
    }
    Ok(plan)
}

/// Checks the secrets file path: absolute, normalized, directly or deeper under
/// `/run/secrets/` (a tmpfs), so secrets never land on a disk.
pub fn check_secrets_path(path: &str) -> Result<PathBuf, String> {
    if !path.starts_with("/run/secrets/") {
        return Err(format!("secrets path {path:?} is not under /run/secrets/"));
    }
    let p = Path::new(path);
    if path[1..]
        .split('/')
        .any(|seg| seg.is_empty() || seg == "." || seg == "..")
        || path.contains('\0')
    {
        return Err(format!(
            "secrets path {path:?} is not a normalized file path"
        ));
    }
    Ok(p.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(id: &str, path: &str, ro: bool) -> MountConfig {
        MountConfig {
            volume_id: id.into(),
            mount_path: path.into(),
            read_only: ro,
            filesystem: "ext4".into(),
        }
    }

    fn devs(names: &[&str]) -> Vec<PathBuf> {
        names.iter().map(PathBuf::from).collect()
    }

    #[test]
    fn root_plan_is_lower_ro_then_scratch_then_overlay() {
        // One root layer: the plan of a flattened image, exactly as before stacks.
        let l = Layout {
            staging: "/".into(),
        };
        let plan = root_plan(&l, &devs(&["/dev/vda"]), Path::new("/dev/vdb")).unwrap();
        assert_eq!(plan.len(), 3);
        assert_eq!(plan[0].source, "/dev/vda");
        assert_eq!(plan[0].target, PathBuf::from("/mnt/lower"));
        assert_eq!(plan[0].fstype, "ext4");
        assert!(plan[0].flags.contains(MsFlags::MS_RDONLY));
        assert_eq!(plan[1].source, "/dev/vdb");
        assert_eq!(plan[1].target, PathBuf::from("/mnt/scratch"));
        assert!(!plan[1].flags.contains(MsFlags::MS_RDONLY));
        assert_eq!(plan[2].fstype, "overlay");
        assert_eq!(plan[2].target, PathBuf::from("/mnt/newroot"));
        assert_eq!(
            plan[2].data.as_deref(),
            Some("lowerdir=/mnt/lower,upperdir=/mnt/scratch/upper,workdir=/mnt/scratch/work")
        );
    }

    #[test]
    fn a_stack_mounts_each_layer_ro_at_its_own_dir_and_lists_the_top_first() {
        let l = Layout {
            staging: "/".into(),
        };
        // Three layers and two volumes: vda, then after vdc/vdd the upper layers.
        let layers: Vec<PathBuf> = (0..3)
            .map(|i| PathBuf::from(format!("/dev/{}", layer_device_name(i, 2))))
            .collect();
        assert_eq!(layers, devs(&["/dev/vda", "/dev/vde", "/dev/vdf"]));
        let plan = root_plan(&l, &layers, Path::new("/dev/vdb")).unwrap();
        assert_eq!(plan.len(), 5);
        for (i, dev) in ["/dev/vda", "/dev/vde", "/dev/vdf"].iter().enumerate() {
            assert_eq!(plan[i].source, *dev);
            assert_eq!(plan[i].target, PathBuf::from(format!("/mnt/lower/{i}")));
            assert_eq!(plan[i].fstype, "ext4");
            assert!(plan[i].flags.contains(MsFlags::MS_RDONLY), "layer {i} rw");
        }
        assert_eq!(
            (plan[3].source.as_str(), plan[3].target.to_str()),
            ("/dev/vdb", Some("/mnt/scratch"))
        );
        assert!(!plan[3].flags.contains(MsFlags::MS_RDONLY));
        assert_eq!(plan[4].fstype, "overlay");
        assert_eq!(
            plan[4].data.as_deref(),
            Some(
                "lowerdir=/mnt/lower/2:/mnt/lower/1:/mnt/lower/0,upperdir=/mnt/scratch/upper,workdir=/mnt/scratch/work"
            )
        );
        assert!(root_plan(&l, &[], Path::new("/dev/vdb")).is_err());
    }

    #[test]
    fn overlay_options_longer_than_a_page_are_refused() {
        let long = Layout {
            staging: PathBuf::from(format!("/{}", "s".repeat(300))),
        };
        let sixteen: Vec<PathBuf> = (0..16).map(|i| format!("/dev/loop{i}").into()).collect();
        let err = root_plan(&long, &sixteen, Path::new("/dev/loop99")).unwrap_err();
        assert!(err.contains("more than the kernel's 4095"), "{err}");
        // The VM's own layout with the most layers fits easily.
        let vm = Layout {
            staging: "/".into(),
        };
        let plan = root_plan(&vm, &sixteen, Path::new("/dev/vdb")).unwrap();
        assert!(plan[17].data.as_deref().unwrap().len() < 400);
    }

    #[test]
    fn staging_prefixes_every_pre_switch_path() {
        let l = Layout {
            staging: "/tmp/st".into(),
        };
        let plan = root_plan(
            &l,
            &devs(&["/dev/loop1", "/dev/loop3"]),
            Path::new("/dev/loop2"),
        )
        .unwrap();
        assert!(plan.iter().all(|s| s.target.starts_with("/tmp/st/mnt")));
        let pseudo = pseudo_filesystems(&l);
        assert_eq!(pseudo[0].target, PathBuf::from("/tmp/st/proc"));
        assert_eq!(pseudo[2].fstype, "devtmpfs");
        let bad = Layout {
            staging: "/tmp/a,b".into(),
        };
        assert!(root_plan(&bad, &devs(&["/dev/vda"]), Path::new("/dev/vdb")).is_err());
        let colon = Layout {
            staging: "/tmp/a:b".into(),
        };
        assert!(root_plan(&colon, &devs(&["/dev/vda"]), Path::new("/dev/vdb")).is_err());
    }

    #[test]
    fn runtime_filesystems_are_tmpfs_on_run_and_tmp() {
        let rt = runtime_filesystems();
        assert_eq!(
            (rt[0].target.to_str(), rt[0].fstype),
            (Some("/run"), "tmpfs")
        );
        assert_eq!(
            (rt[1].target.to_str(), rt[1].data.as_deref()),
            (Some("/tmp"), Some("mode=1777"))
        );
    }

    #[test]
    fn reserved_paths_are_refused() {
        for p in [
            "/",
            "/proc",
            "/proc/sys",
            "/sys",
            "/sys/fs",
            "/dev",
            "/dev/vda",
            "/run",
            "/run/secrets",
            "/run/secrets/x",
            "/tmp",
            "//run//",
            "/tmp/.",
            "/a/../proc",
            "/data/..",
            "relative",
            "",
        ] {
            assert!(check_mount_path(p).is_err(), "{p:?} accepted");
        }
        assert_eq!(check_mount_path("/data").unwrap(), PathBuf::from("/data"));
        assert_eq!(
            check_mount_path("//var/./lib//db/").unwrap(),
            PathBuf::from("/var/lib/db")
        );
        assert_eq!(
            check_mount_path("/run/app").unwrap(),
            PathBuf::from("/run/app")
        );
        assert_eq!(
            check_mount_path("/tmp/cache").unwrap(),
            PathBuf::from("/tmp/cache")
        );
        assert_eq!(
            check_mount_path("/devices").unwrap(),
            PathBuf::from("/devices")
        );
    }

    #[test]
    fn volumes_get_devices_in_volume_id_order() {
        let mounts = [m("vol-b", "/b", true), m("vol-a", "/a", false)];
        let plan = volume_plan(&mounts, |i| {
            volume_device_name(i).map(|n| format!("/dev/{n}").into())
        })
        .unwrap();
        assert_eq!(plan[0].volume_id, "vol-a");
        assert_eq!(plan[0].device, PathBuf::from("/dev/vdc"));
        assert!(!plan[0].flags().contains(MsFlags::MS_RDONLY));
        assert_eq!(plan[1].device, PathBuf::from("/dev/vdd"));
        assert!(plan[1].flags().contains(MsFlags::MS_RDONLY));
        assert!(plan[1].flags().contains(MsFlags::MS_NODEV));
    }

    #[test]
    fn bad_volume_plans_are_refused() {
        let dev = |i: usize| volume_device_name(i).map(|n| format!("/dev/{n}").into());
        assert!(volume_plan(&[m("a", "/proc/x", false)], dev)
            .unwrap_err()
            .contains("reserved"));
        assert!(
            volume_plan(&[m("a", "/d", false), m("b", "/d/", false)], dev)
                .unwrap_err()
                .contains("both mount")
        );
        assert!(
            volume_plan(&[m("a", "/d", false), m("a", "/e", false)], dev)
                .unwrap_err()
                .contains("twice")
        );
        let mut xfs = m("a", "/d", false);
        xfs.filesystem = "xfs".into();
        assert!(volume_plan(&[xfs], dev).unwrap_err().contains("ext4 only"));
        assert!(volume_plan(&[m("a", "/d", false)], |_| None)
            .unwrap_err()
            .contains("no device"));
    }

    #[test]
    fn device_names_run_from_vdc_to_vdz_and_layers_continue_past_it() {
        assert_eq!(volume_device_name(0).as_deref(), Some("vdc"));
        assert_eq!(volume_device_name(23).as_deref(), Some("vdz"));
        assert_eq!(volume_device_name(24), None, "25 volumes");
        // Without volumes the upper layers follow the scratch disk.
        assert_eq!(layer_device_name(0, 0), "vda");
        assert_eq!(layer_device_name(1, 0), "vdc");
        // With 24 volumes (vdc … vdz) layer 1 is the first disk past vdz.
        assert_eq!(layer_device_name(0, 24), "vda");
        assert_eq!(layer_device_name(1, 24), "vdaa");
        assert_eq!(layer_device_name(2, 24), "vdab");
        assert_eq!(layer_device_name(15, 24), "vdao");
        // 23 volumes: vdc … vdy, then layer 1 is vdz and layer 2 vdaa.
        assert_eq!(layer_device_name(1, 23), "vdz");
        assert_eq!(layer_device_name(2, 23), "vdaa");
    }

    #[test]
    fn secrets_path_must_stay_in_run_secrets() {
        assert!(check_secrets_path("/run/secrets/platform.env").is_ok());
        for p in [
            "/etc/secrets",
            "/run/secrets/../x",
            "/run/secrets/",
            "/run/secretsx/a",
            "/run/secrets/./a",
        ] {
            assert!(check_secrets_path(p).is_err(), "{p}");
        }
    }
}
