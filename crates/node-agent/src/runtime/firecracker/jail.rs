//! The jailer's chroot of one VMM as the agent prepares and removes it, and the
//! jailer's cgroups the agent removes: the kernel, initramfs and disks linked into
//! `<chroot_base_dir>/firecracker/<vmm id>/root` and given to the VMM's uid/gid, the
//! VMM's fresh log files, and the removal of the jail and of the groups the jailer
//! made. Needs root (chown, cgroups). This module runs no process.

use std::path::Path;
use std::time::Duration;

use super::{FirecrackerConfig, Layout, PreparedHost};
use crate::runtime::RuntimeError;

/// Links what the VMM opens into its jail: kernel, initramfs and root disk (copied
/// when a hard link is impossible), scratch disk and volumes (hard links only: a copy
/// would not share writes), and gives them and `run/` to the VMM's uid/gid.
pub(super) fn populate(
    root: &Path,
    config: &FirecrackerConfig,
    prepared: &PreparedHost,
) -> Result<(), String> {
    std::fs::create_dir_all(root.join("run"))
        .map_err(|e| format!("cannot create jail {}: {e}", root.display()))?;
    let mut links: Vec<(&Path, bool)> = vec![
        (&config.kernel, true),
        (&config.initramfs, true),
        (&prepared.root_disk, true),
        (&prepared.scratch_disk, false),
    ];
    for (_, d) in &prepared.volumes {
        links.push((&d.path, false));
    }
    for (p, copy_ok) in links {
        link_into_jail(p, root, config.uid, config.gid, copy_ok)?;
    }
    chown(&root.join("run"), config.uid, config.gid)
}

/// Removes stale sockets and creates the VMM's log and metrics files empty (owned by
/// the VMM's uid/gid in a jail).
pub(super) fn fresh_files(layout: &Layout, uid: u32, gid: u32) -> Result<(), String> {
    for p in [&layout.api_sock, &layout.vsock_uds] {
        let _ = std::fs::remove_file(p);
    }
    for p in [&layout.fc_log, &layout.metrics] {
        std::fs::write(p, b"").map_err(|e| format!("cannot create {}: {e}", p.display()))?;
        if layout.chroot.is_some() {
            chown(p, uid, gid)?;
        }
    }
    Ok(())
}

/// Links `src` into the jail as `<root>/<name>` (hard link, else a copy when `copy_ok`)
/// and gives it to the VMM's uid/gid.
fn link_into_jail(
    src: &Path,
    root: &Path,
    uid: u32,
    gid: u32,
    copy_ok: bool,
) -> Result<(), String> {
    let name = src
        .file_name()
        .ok_or_else(|| format!("{} has no file name", src.display()))?;
    let dst = root.join(name);
    let _ = std::fs::remove_file(&dst);
    if let Err(e) = std::fs::hard_link(src, &dst) {
        if !copy_ok {
            return Err(format!(
                "cannot hard-link {} into the jail {}: {e}",
                src.display(),
                root.display()
            ));
        }
        std::fs::copy(src, &dst).map_err(|e| {
            format!(
                "cannot copy {} into the jail {}: {e}",
                src.display(),
                root.display()
            )
        })?;
    }
    chown(&dst, uid, gid)
}

fn chown(p: &Path, uid: u32, gid: u32) -> Result<(), String> {
    rustix::fs::chown(
        p,
        Some(rustix::fs::Uid::from_raw(uid)),
        Some(rustix::fs::Gid::from_raw(gid)),
    )
    .map_err(|e| format!("cannot chown {} to {uid}:{gid}: {e}", p.display()))
}

/// Removes the jail of a chroot `<base>/firecracker/<id>/root`: `<base>/firecracker/<id>`.
pub(super) fn remove(root: &Path) -> Result<(), RuntimeError> {
    let jail = root.parent().unwrap_or(root).to_path_buf();
    match std::fs::remove_dir_all(&jail) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(RuntimeError::VmmStart(
            format!("cannot remove jail {}: {e}", jail.display()).into(),
        )),
    }
}

/// Removes a cgroup directory the jailer made for a VMM (idempotent). The VMM was
/// killed just before: the kernel refuses the removal (`EBUSY`) until its last task is
/// gone, so this retries for up to 2 s.
pub(super) async fn remove_cgroup_dir(dir: &Path) -> Result<(), RuntimeError> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    loop {
        match std::fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) if tokio::time::Instant::now() < deadline && e.raw_os_error() == Some(16) => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => {
                return Err(RuntimeError::VmmStart(
                    format!("cannot remove the VMM's cgroup {}: {e}", dir.display()).into(),
                ))
            }
        }
    }
}
