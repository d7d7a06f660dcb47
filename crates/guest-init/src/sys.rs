//! The raw system calls of guest init behind small named functions, so the rest of the
//! crate reads as policy. Each function does one call (or one fixed sequence) and
//! reports the OS error; none decides what to do on failure.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::unistd::{chdir, chroot, pivot_root};

use crate::mounts::MountStep;

/// `MODULE_INIT_COMPRESSED_FILE` of <linux/module.h>.
const MODULE_INIT_COMPRESSED_FILE: libc::c_uint = 4;

/// `finit_module(fd, "", flags)`.
pub fn finit_module(file: &File, compressed: bool) -> io::Result<()> {
    let flags = if compressed {
        MODULE_INIT_COMPRESSED_FILE
    } else {
        0
    };
    let params = c"";
    // SAFETY: finit_module reads only the open fd and the NUL-terminated empty parameter
    // string, which lives for the duration of the call; it writes no user memory.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_finit_module,
            file.as_raw_fd(),
            params.as_ptr(),
            flags,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Creates the target directory and performs one mount step.
pub fn mount_step(step: &MountStep) -> Result<(), String> {
    std::fs::create_dir_all(&step.target)
        .map_err(|e| format!("mkdir {}: {e}", step.target.display()))?;
    mount(
        Some(step.source.as_str()),
        &step.target,
        Some(step.fstype),
        step.flags,
        step.data.as_deref(),
    )
    .map_err(|e| {
        format!(
            "mount {} ({}) on {}: {e}",
            step.source,
            step.fstype,
            step.target.display()
        )
    })
}

/// Mounts a tmpfs (used for the test-mode staging directory).
pub fn mount_tmpfs(target: &Path, data: &str) -> Result<(), String> {
    mount(
        Some("tmpfs"),
        target,
        Some("tmpfs"),
        MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
        Some(data),
    )
    .map_err(|e| format!("mount tmpfs on {}: {e}", target.display()))
}

/// Mounts an ext4 volume.
pub fn mount_ext4(device: &Path, target: &Path, flags: MsFlags) -> Result<(), String> {
    mount(Some(device), target, Some("ext4"), flags, None::<&str>)
        .map_err(|e| format!("mount {} on {}: {e}", device.display(), target.display()))
}

/// Moves a mount.
pub fn move_mount(from: &Path, to: &Path) -> Result<(), String> {
    std::fs::create_dir_all(to).map_err(|e| format!("mkdir {}: {e}", to.display()))?;
    mount(Some(from), to, None::<&str>, MsFlags::MS_MOVE, None::<&str>)
        .map_err(|e| format!("move mount {} to {}: {e}", from.display(), to.display()))
}

/// Makes `newroot` the root: `pivot_root(".", ".")` and a lazy unmount of the old root;
/// when the old root is the initramfs (rootfs cannot be pivoted, pivot_root(2) NOTES),
/// move the new root onto `/` and chroot instead (what switch_root does). Returns which
/// of the two happened.
pub fn switch_root(newroot: &Path) -> Result<&'static str, String> {
    chdir(newroot).map_err(|e| format!("chdir {}: {e}", newroot.display()))?;
    match pivot_root(".", ".") {
        Ok(()) => {
            umount2(".", MntFlags::MNT_DETACH).map_err(|e| format!("detach old root: {e}"))?;
            chdir("/").map_err(|e| format!("chdir /: {e}"))?;
            Ok("pivot_root")
        }
        Err(nix::errno::Errno::EINVAL) => {
            mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
                .map_err(|e| format!("move new root onto /: {e}"))?;
            chroot(".").map_err(|e| format!("chroot: {e}"))?;
            chdir("/").map_err(|e| format!("chdir /: {e}"))?;
            Ok("move+chroot (initramfs root)")
        }
        Err(e) => Err(format!("pivot_root {}: {e}", newroot.display())),
    }
}

/// Unmounts a path (no flags).
pub fn unmount(path: &Path) -> Result<(), String> {
    umount2(path, MntFlags::empty()).map_err(|e| format!("unmount {}: {e}", path.display()))
}

/// Remounts `/` read-only (best effort before reboot).
pub fn remount_root_readonly() -> Result<(), String> {
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REMOUNT.union(MsFlags::MS_RDONLY),
        None::<&str>,
    )
    .map_err(|e| format!("remount / read-only: {e}"))
}

/// `sync(2)`.
pub fn sync() {
    nix::unistd::sync();
}

/// `reboot(RB_AUTOBOOT)`: Firecracker (with `reboot=k`) and QEMU (with `-no-reboot`) exit.
pub fn reboot() -> String {
    match nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT) {
        Ok(never) => match never {},
        Err(e) => format!("reboot: {e}"),
    }
}

/// True when file descriptor `fd` is open.
pub fn fd_is_open(fd: i32) -> bool {
    // SAFETY: F_GETFD on an integer fd only queries the descriptor table.
    unsafe { libc::fcntl(fd, libc::F_GETFD) != -1 }
}

/// Points stdin, stdout and stderr at `path` (the console) when stderr is not open.
pub fn ensure_console(path: &Path) {
    if fd_is_open(2) {
        return;
    }
    if let Ok(f) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
    {
        for target in 0..3 {
            // SAFETY: dup2 onto 0..2 only replaces those descriptors; `f` stays valid.
            unsafe { libc::dup2(f.as_raw_fd(), target) };
        }
    }
}
