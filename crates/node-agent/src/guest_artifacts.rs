//! Guest artifacts managed by the agent: the kernel and initramfs VMs boot with, kept
//! as verified sets under `<data_dir>/guest/`.
//!
//! When `runtime.qemu.initramfs` is not configured, the agent builds the initramfs
//! itself at start from the configured kernel, that kernel's modules
//! (`<guest.modules_dir>/<release>`) and the installed static guest init
//! (`guest.init`, packaged at `/usr/lib/plfm/plfm-guest-init`). A set lives in
//! `<data_dir>/guest/<kernel release>_<id>/` with a copy of the kernel (`vmlinuz`), the
//! initramfs (`initramfs.img`), `SHA256SUMS` (the format `sha256sum -c` reads) and
//! `artifacts.json` (release, protocols, sources). The id is a digest of the inputs
//! (kernel bytes, guest init bytes, the modules of that release, the builder version),
//! and the build is deterministic, so the same inputs give the same set, byte for byte:
//! a restart with unchanged inputs reuses the set after checking its sums, a changed
//! kernel or guest init (a package upgrade) gives a new set, and a set whose files no
//! longer match their sums is rebuilt. The newest `guest.keep` sets are kept, and any
//! older set a running VM booted from (its `process` row in the resource ledger names
//! the files) stays until that VM is replaced.
//!
//! This module builds, verifies and prunes files under the guest dir; it starts no VM
//! and reads nothing of the host beyond the three inputs.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::initramfs::{write_initramfs, BuildInitramfsArgs};

/// Changes when the builder's output for the same inputs changes; part of the set id.
const BUILDER_VERSION: u32 = 1;

/// A guest artifact problem; the message names the file and what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum GuestArtifactError {
    /// An input or output file.
    #[error("guest artifacts: {path}: {message}")]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The initramfs builder refused.
    #[error("guest artifacts: building the initramfs: {0}")]
    Build(#[from] crate::initramfs::InitramfsError),
}

fn file_err(path: &Path, message: impl std::fmt::Display) -> GuestArtifactError {
    GuestArtifactError::File {
        path: path.to_path_buf(),
        message: message.to_string(),
    }
}

/// What the agent builds from.
#[derive(Debug, Clone)]
pub struct Inputs {
    /// The guest kernel (a bzImage; `/vmlinuz` on Debian).
    pub kernel: PathBuf,
    /// The static guest init binary.
    pub guest_init: PathBuf,
    /// The root of the kernels' module trees (`/lib/modules`).
    pub modules_dir: PathBuf,
}

/// One built and verified set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ArtifactSet {
    /// `<kernel release>_<id>`; the directory name.
    pub name: String,
    /// The kernel release (`6.1.0-28-cloud-amd64`).
    pub kernel_release: String,
    /// Handshake versions of its guest init.
    pub guest_init_protocols: Vec<u32>,
    /// sha256 of `vmlinuz`.
    pub kernel_sha256: String,
    /// sha256 of `initramfs.img`.
    pub initramfs_sha256: String,
    /// sha256 of the guest init it was built from.
    pub guest_init_sha256: String,
    /// Where the kernel and guest init came from (informational).
    pub kernel_source: PathBuf,
    /// See `kernel_source`.
    pub guest_init_source: PathBuf,
    /// Whether the kernel's modules were found and included.
    pub modules: bool,
}

/// The set in use and the sets kept, as the agent advertises them.
#[derive(Debug, Clone)]
pub struct GuestArtifacts {
    /// The set new VMs boot with.
    pub current: ArtifactSet,
    /// Its directory.
    pub dir: PathBuf,
    /// Every kept set (the current one first).
    pub kept: Vec<ArtifactSet>,
    /// Whether this start built the current set (false: reused after verification).
    pub built: bool,
}

impl GuestArtifacts {
    /// The kernel file of the current set.
    pub fn kernel(&self) -> PathBuf {
        self.dir.join("vmlinuz")
    }

    /// The initramfs of the current set.
    pub fn initramfs(&self) -> PathBuf {
        self.dir.join("initramfs.img")
    }

    /// Kernel releases of the kept sets, current first, without repeats.
    pub fn kernel_versions(&self) -> Vec<String> {
        let mut v: Vec<String> = Vec::new();
        for s in &self.kept {
            if !v.contains(&s.kernel_release) {
                v.push(s.kernel_release.clone());
            }
        }
        v
    }

    /// Guest handshake versions of the current set.
    pub fn guest_init_protocols(&self) -> Vec<u32> {
        self.current.guest_init_protocols.clone()
    }
}

/// The release of a bzImage kernel from its setup header (`kernel_version` at 0x20e,
/// an offset from 0x200 to a NUL-terminated string whose first word is the release).
pub fn bzimage_release(bytes: &[u8]) -> Option<String> {
    if bytes.get(0x202..0x206)? != b"HdrS" {
        return None;
    }
    let ptr = u16::from_le_bytes([*bytes.get(0x20e)?, *bytes.get(0x20f)?]) as usize;
    if ptr == 0 {
        return None;
    }
    let s = bytes.get(0x200 + ptr..)?;
    let end = s.iter().take(256).position(|&b| b == 0 || b == b' ')?;
    let release = std::str::from_utf8(&s[..end]).ok()?;
    let ok = !release.is_empty()
        && !release.starts_with('.')
        && release
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._+-~".contains(&b));
    ok.then(|| release.to_string())
}

/// The release from the kernel file's header, or from its (resolved) name
/// `vmlinuz-<release>`.
fn kernel_release(kernel: &Path, bytes: &[u8]) -> Option<String> {
    bzimage_release(bytes).or_else(|| {
        let real = std::fs::canonicalize(kernel).ok()?;
        let name = real.file_name()?.to_str()?;
        name.strip_prefix("vmlinuz-")
            .or_else(|| name.strip_prefix("vmlinux-"))
            .map(str::to_string)
    })
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn read(path: &Path) -> Result<Vec<u8>, GuestArtifactError> {
    std::fs::read(path).map_err(|e| file_err(path, format!("cannot read: {e}")))
}

/// sha256 of a file, streamed (a kernel or an initramfs is megabytes: the agent does
/// not hold them in memory to hash them).
fn sha256_file(path: &Path) -> std::io::Result<[u8; 32]> {
    let mut hasher = Sha256::new();
    std::io::copy(&mut std::fs::File::open(path)?, &mut hasher)?;
    Ok(hasher.finalize().into())
}

/// The first `n` bytes of a file (fewer if it is shorter).
fn read_head(path: &Path, n: u64) -> Result<Vec<u8>, GuestArtifactError> {
    use std::io::Read as _;
    let mut head = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(n).read_to_end(&mut head))
        .map_err(|e| file_err(path, format!("cannot read: {e}")))?;
    Ok(head)
}

/// Bytes of a bzImage read for its setup header and version string (the setup code,
/// where both live, is at most 32 KiB).
const KERNEL_HEAD_BYTES: u64 = 64 * 1024;

/// Builds (or reuses after verification) the set for `inputs` under `guest_dir`, then
/// prunes to the newest `keep` sets plus those named in `in_use` (files running VMs
/// booted from). Blocking; the agent runs it once at start.
pub fn ensure(
    inputs: &Inputs,
    guest_dir: &Path,
    keep: usize,
    in_use: &[PathBuf],
) -> Result<GuestArtifacts, GuestArtifactError> {
    let kernel_head = read_head(&inputs.kernel, KERNEL_HEAD_BYTES)?;
    let kernel_digest = sha256_file(&inputs.kernel)
        .map_err(|e| file_err(&inputs.kernel, format!("cannot read: {e}")))?;
    let release = kernel_release(&inputs.kernel, &kernel_head).ok_or_else(|| {
        file_err(
            &inputs.kernel,
            "not a bzImage kernel with a version in its header, and its name is not vmlinuz-<release>",
        )
    })?;
    let init = read(&inputs.guest_init)?;
    crate::initramfs::check_static_elf(&inputs.guest_init, &init)?;
    let protocols = plfm_guest_protocol::protocols_in(&init).ok_or_else(|| {
        file_err(
            &inputs.guest_init,
            "carries no guest protocol marker: not a plfm-guest-init, or one older than this agent",
        )
    })?;
    let modules_root = inputs.modules_dir.join(&release);
    let modules_dep = modules_root.join("modules.dep");
    let modules = modules_dep.is_file();
    let mut id = Sha256::new();
    id.update(BUILDER_VERSION.to_le_bytes());
    id.update(kernel_digest);
    id.update(Sha256::digest(&init));
    if modules {
        // The modules' identity: their dependency list and builtin list (a kernel
        // package's modules change with its release, which is in the name too).
        for f in ["modules.dep", "modules.builtin"] {
            let p = modules_root.join(f);
            id.update(std::fs::read(&p).unwrap_or_default());
        }
    }
    let name = format!("{release}_{}", &hex::encode(id.finalize())[..16]);
    let dir = guest_dir.join(&name);
    std::fs::create_dir_all(guest_dir)
        .map_err(|e| file_err(guest_dir, format!("cannot create: {e}")))?;

    let (current, built) = match verify(&dir) {
        Ok(set) => (set, false),
        Err(why) => {
            if dir.exists() {
                tracing::warn!(dir = %dir.display(), reason = %why, "guest artifacts fail verification; rebuilding them");
            }
            let set = ArtifactSet {
                name: name.clone(),
                kernel_release: release.clone(),
                guest_init_protocols: protocols,
                kernel_sha256: hex::encode(kernel_digest),
                initramfs_sha256: String::new(),
                guest_init_sha256: sha256_hex(&init),
                kernel_source: inputs.kernel.clone(),
                guest_init_source: inputs.guest_init.clone(),
                modules,
            };
            (build(guest_dir, &dir, set, inputs, &modules_root)?, true)
        }
    };
    // The set in use is the newest: its mtime orders the pruning.
    touch(&dir);
    let kept = prune(guest_dir, &name, keep, in_use);
    if !modules {
        tracing::warn!(dir = %modules_root.display(), "no modules for the guest kernel; the initramfs has none (fine for a kernel with virtio, vsock, ext4 and overlayfs built in)");
    }
    Ok(GuestArtifacts {
        current,
        dir,
        kept,
        built,
    })
}

/// Reads a set's `artifacts.json` and checks its files against `SHA256SUMS` and the
/// record.
pub fn verify(dir: &Path) -> Result<ArtifactSet, String> {
    let record = dir.join("artifacts.json");
    let text =
        std::fs::read_to_string(&record).map_err(|e| format!("{}: {e}", record.display()))?;
    let set: ArtifactSet =
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", record.display()))?;
    let sums = std::fs::read_to_string(dir.join("SHA256SUMS"))
        .map_err(|e| format!("{}: {e}", dir.join("SHA256SUMS").display()))?;
    for (file, want) in [
        ("vmlinuz", &set.kernel_sha256),
        ("initramfs.img", &set.initramfs_sha256),
    ] {
        if !sums.lines().any(|l| l == format!("{want}  {file}")) {
            return Err(format!(
                "SHA256SUMS does not list {file} as in artifacts.json"
            ));
        }
        let p = dir.join(file);
        let got = sha256_file(&p)
            .map(hex::encode)
            .map_err(|e| format!("{}: {e}", p.display()))?;
        if &got != want {
            return Err(format!("{} has sha256 {got}, recorded {want}", p.display()));
        }
    }
    Ok(set)
}

/// Copies `from` to `to` and syncs it (the copy is the kernel's page cache's work, not
/// a buffer of the agent's).
fn copy_synced(from: &Path, to: &Path) -> Result<(), GuestArtifactError> {
    std::fs::copy(from, to)
        .and_then(|_| std::fs::File::open(to)?.sync_all())
        .map_err(|e| file_err(to, format!("cannot copy {} here: {e}", from.display())))
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), GuestArtifactError> {
    let mut f =
        std::fs::File::create(path).map_err(|e| file_err(path, format!("cannot create: {e}")))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(|e| file_err(path, format!("cannot write: {e}")))
}

/// Builds a set in a temporary directory next to `dir` and renames it into place (a
/// set is either complete or absent).
fn build(
    guest_dir: &Path,
    dir: &Path,
    mut set: ArtifactSet,
    inputs: &Inputs,
    modules_root: &Path,
) -> Result<ArtifactSet, GuestArtifactError> {
    let tmp = guest_dir.join(format!(".build-{}-{}", set.name, std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir(&tmp).map_err(|e| file_err(&tmp, format!("cannot create: {e}")))?;
    let result = (|| {
        copy_synced(&inputs.kernel, &tmp.join("vmlinuz"))?;
        let out = tmp.join("initramfs.img");
        write_initramfs(&BuildInitramfsArgs {
            kernel_modules: set.modules.then(|| modules_root.to_path_buf()),
            guest_init: inputs.guest_init.clone(),
            out: out.clone(),
        })?;
        set.initramfs_sha256 = hex::encode(
            sha256_file(&out).map_err(|e| file_err(&out, format!("cannot read: {e}")))?,
        );
        write_synced(
            &tmp.join("SHA256SUMS"),
            format!(
                "{}  vmlinuz\n{}  initramfs.img\n",
                set.kernel_sha256, set.initramfs_sha256
            )
            .as_bytes(),
        )?;
        let json = serde_json::to_vec_pretty(&set).unwrap_or_default();
        write_synced(&tmp.join("artifacts.json"), &json)?;
        crate::image::store::fsync_dir(&tmp).map_err(|e| file_err(&tmp, e))?;
        if dir.exists() {
            // A set that failed verification: replaced whole.
            std::fs::remove_dir_all(dir)
                .map_err(|e| file_err(dir, format!("cannot remove: {e}")))?;
        }
        std::fs::rename(&tmp, dir)
            .map_err(|e| file_err(dir, format!("cannot rename into place: {e}")))?;
        crate::image::store::fsync_dir(guest_dir).map_err(|e| file_err(guest_dir, e))
    })();
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result.map(|()| {
        tracing::info!(dir = %dir.display(), kernel_release = %set.kernel_release, "built the guest artifacts");
        set
    })
}

fn touch(dir: &Path) {
    if let Ok(f) = std::fs::File::open(dir) {
        let _ = f.set_modified(std::time::SystemTime::now());
    }
}

/// Keeps the newest `keep` sets (by directory mtime; `current` always) and those a
/// running VM uses; removes the rest and leftover build directories. Returns the kept
/// sets, current first.
fn prune(guest_dir: &Path, current: &str, keep: usize, in_use: &[PathBuf]) -> Vec<ArtifactSet> {
    let mut sets: Vec<(std::time::SystemTime, String)> = Vec::new();
    for e in std::fs::read_dir(guest_dir).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with(".build-") {
            // A build that a crash interrupted; one younger than an hour may be another
            // agent's, starting on this data dir (it will then fail to take the lock).
            let stale = e
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age > std::time::Duration::from_secs(3600));
            if stale {
                let _ = std::fs::remove_dir_all(e.path());
            }
            continue;
        }
        if name.starts_with('.') || !e.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let mtime = e
            .metadata()
            .and_then(|m| m.modified())
            .unwrap_or(std::time::UNIX_EPOCH);
        sets.push((mtime, name));
    }
    sets.sort_by(|a, b| b.cmp(a));
    let mut kept = Vec::new();
    let mut count = 0;
    for (_, name) in sets {
        let dir = guest_dir.join(&name);
        let used = in_use.iter().any(|p| p.starts_with(&dir));
        let newest = name == current || count < keep;
        if newest || used {
            if newest {
                count += 1;
            }
            if let Ok(set) = verify(&dir) {
                kept.push(set);
            }
            continue;
        }
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => tracing::info!(dir = %dir.display(), "removed old guest artifacts"),
            Err(e) => {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot remove old guest artifacts")
            }
        }
    }
    kept.sort_by_key(|s| s.name != current);
    kept
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal bzImage header: "HdrS" at 0x202, the version pointer at 0x20e.
    fn bzimage(release: &str, filler: u8) -> Vec<u8> {
        let mut b = vec![filler; 0x1000];
        b[0x202..0x206].copy_from_slice(b"HdrS");
        let ptr: u16 = 0x300;
        b[0x20e..0x210].copy_from_slice(&ptr.to_le_bytes());
        let s = format!("{release} (builder@example) #1 SMP\0");
        b[0x500..0x500 + s.len()].copy_from_slice(s.as_bytes());
        b
    }

    #[test]
    fn the_release_is_read_from_the_bzimage_header() {
        assert_eq!(
            bzimage_release(&bzimage("6.1.0-28-cloud-amd64", 0)).as_deref(),
            Some("6.1.0-28-cloud-amd64")
        );
        assert_eq!(bzimage_release(&[0; 0x1000]), None);
        assert_eq!(bzimage_release(&[0; 16]), None);
        let mut bad = bzimage("../../etc", 0);
        bad[0x500] = b'/';
        assert_eq!(bzimage_release(&bad), None, "a release with a slash");
    }
}
