//! The jailer's chroot of one VMM as the agent prepares and removes it, and the
//! jailer's cgroups the agent removes: the kernel, initramfs and disks linked into
//! `<chroot_base_dir>/firecracker/<vmm id>/root`, the VMM's fresh log files, and the
//! removal of the jail and of the groups the jailer made. Needs root (chown, cgroups).
//! This module runs no process.
//!
//! Who may touch what: a jailed VMM runs as a uid of its instance's own and the VMMs'
//! shared gid. Files shared between instances (kernel, initramfs, a cached root disk)
//! stay root's: their group is the VMMs' gid with read permission only, so a VMM can
//! read them and no VMM (nor any other user) can write them. They are never given to
//! an instance's uid: a hard link shares the inode, so that would hand the shared file
//! to one tenant. The instance's own files (scratch disk, volumes, logs, `run/`) are
//! given to its uid, mode 0600.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{Layout, PreparedHost};
use crate::runtime::RuntimeError;

/// The identity of one jailed VMM: its own uid, the VMMs' shared gid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Identity {
    /// The instance's own uid.
    pub uid: u32,
    /// The gid every jailed VMM shares (read access to the shared files).
    pub gid: u32,
}

/// Links what the VMM opens into its jail: kernel, initramfs and every root layer disk
/// read-only for the VMMs' group (hard links, or copies when a hard link is impossible), scratch
/// disk and volumes owned by the VMM's uid (hard links only: a copy would not share
/// writes), and `run/` for its sockets.
pub(super) fn populate(
    root: &Path,
    kernel: &Path,
    initramfs: &Path,
    prepared: &PreparedHost,
    who: Identity,
) -> Result<(), String> {
    std::fs::create_dir_all(root.join("run"))
        .map_err(|e| format!("cannot create jail {}: {e}", root.display()))?;
    let mut own: Vec<&Path> = vec![&prepared.scratch_disk];
    own.extend(prepared.volumes.iter().map(|(_, d)| d.path.as_path()));
    let mut shared: Vec<&Path> = vec![kernel, initramfs];
    shared.extend(prepared.root_layers.iter().map(PathBuf::as_path));
    // Everything lands in the jail's root under its file name: two files of one name
    // would replace each other (a layer disk would be read as another).
    let mut names = std::collections::HashSet::new();
    for p in shared.iter().chain(own.iter()) {
        let name = jail_path(p, root)?;
        if !names.insert(name) {
            return Err(format!(
                "{} has the file name of another file linked into the jail {}",
                p.display(),
                root.display()
            ));
        }
    }
    for p in shared {
        link_shared(p, root, who.gid)?;
    }
    for p in own {
        let dst = jail_path(p, root)?;
        let _ = std::fs::remove_file(&dst);
        std::fs::hard_link(p, &dst).map_err(|e| {
            format!(
                "cannot hard-link {} into the jail {}: {e}",
                p.display(),
                root.display()
            )
        })?;
        give(&dst, who, 0o600)?;
    }
    give(&root.join("run"), who, 0o700)
}

/// Whether a shared file is already safe to link into a jail as it is: root's, no one
/// but root may write it, and the VMMs' group (or everyone) may read it.
fn shared_ok(meta: &std::fs::Metadata, gid: u32) -> bool {
    let mode = meta.mode();
    meta.uid() == 0
        && mode & 0o022 == 0
        && (mode & 0o004 != 0 || (meta.gid() == gid && mode & 0o040 != 0))
}

/// Links a file shared between instances into the jail so the VMM can read and not
/// write it: the file stays root's, its group becomes the VMMs' with read permission
/// (`0640`). A file that cannot be changed or linked (another file system, a read-only
/// mount) is copied into the jail with those permissions instead.
fn link_shared(src: &Path, root: &Path, gid: u32) -> Result<(), String> {
    let dst = jail_path(src, root)?;
    let _ = std::fs::remove_file(&dst);
    let meta = std::fs::metadata(src).map_err(|e| format!("cannot stat {}: {e}", src.display()))?;
    let ready = shared_ok(&meta, gid) || set_owner_mode(src, 0, gid, 0o640).is_ok();
    if ready && std::fs::hard_link(src, &dst).is_ok() {
        return Ok(());
    }
    std::fs::copy(src, &dst).map_err(|e| {
        format!(
            "cannot copy {} into the jail {}: {e}",
            src.display(),
            root.display()
        )
    })?;
    set_owner_mode(&dst, 0, gid, 0o640)
}

/// `<root>/<file name of p>`.
fn jail_path(p: &Path, root: &Path) -> Result<std::path::PathBuf, String> {
    let name = p
        .file_name()
        .ok_or_else(|| format!("{} has no file name", p.display()))?;
    Ok(root.join(name))
}

/// Gives a file of the instance's own to its VMM.
fn give(p: &Path, who: Identity, mode: u32) -> Result<(), String> {
    set_owner_mode(p, who.uid, who.gid, mode)
}

fn set_owner_mode(p: &Path, uid: u32, gid: u32, mode: u32) -> Result<(), String> {
    std::os::unix::fs::chown(p, Some(uid), Some(gid))
        .map_err(|e| format!("cannot chown {} to {uid}:{gid}: {e}", p.display()))?;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode))
        .map_err(|e| format!("cannot chmod {} to {mode:o}: {e}", p.display()))
}

/// Removes stale sockets and creates the VMM's log and metrics files empty (owned by
/// the VMM's uid in a jail).
pub(super) fn fresh_files(layout: &Layout, who: Option<Identity>) -> Result<(), String> {
    for p in [&layout.api_sock, &layout.vsock_uds] {
        let _ = std::fs::remove_file(p);
    }
    for p in [&layout.fc_log, &layout.metrics] {
        std::fs::write(p, b"").map_err(|e| format!("cannot create {}: {e}", p.display()))?;
        if let Some(who) = who {
            give(p, who, 0o600)?;
        }
    }
    Ok(())
}

/// Gives the guest listener (bound by the agent, as root) to the jailed VMM, which
/// connects to it for the guest.
pub(super) fn give_listener(sock: &Path, who: Identity) -> Result<(), String> {
    give(sock, who, 0o600)
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Every file lands in the jail's root under its own name: two layer disks of one
    /// name (from two directories) are refused before anything is linked, never linked
    /// over each other.
    #[test]
    fn files_of_one_name_are_refused_before_linking() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("jail/root");
        let prepared = PreparedHost {
            root_layers: vec![
                dir.path().join("a/disk.ext4"),
                dir.path().join("b/disk.ext4"),
            ],
            scratch_disk: dir.path().join("scratch.ext4"),
            volumes: vec![],
            tap: None,
            guest_network: None,
            address: None,
            process: None,
        };
        let who = Identity { uid: 1, gid: 1 };
        let e = populate(
            &root,
            Path::new("/k/vmlinux"),
            Path::new("/k/initrd"),
            &prepared,
            who,
        )
        .unwrap_err();
        assert!(
            e.contains("b/disk.ext4 has the file name of another"),
            "{e}"
        );
        let linked: Vec<_> = std::fs::read_dir(&root)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(linked, vec![std::ffi::OsString::from("run")]);
    }
}
