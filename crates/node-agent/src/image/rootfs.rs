//! Builds the read-only ext4 root disk from an unpacked tree with `mkfs.ext4 -d`,
//! deterministically: the same tree and digest always give the same bytes.
//!
//! Contract: the caller passes an unpacked tree and a temp output path inside the
//! cache; this module writes and fsyncs that file but never renames it (the cache
//! does). It never mounts anything and never uses a loop device.
//!
//! Determinism: `mkfs.ext4` gets its own `mke2fs.conf` (host defaults differ), a UUID
//! and directory hash seed derived from the digest, `E2FSPROGS_FAKE_TIME` for every
//! time it stamps itself, `LC_ALL=C` (it sorts directory entries with `alphasort`) and
//! `root_owner=0:0`. `mkfs.ext4 -d` (e2fsprogs 1.47.0) copies each file's host
//! `ctime` and `atime`, which no program can set; a `debugfs -w` pass then sets both
//! to the fixed time on every used inode (found from `dumpe2fs`'s inode bitmaps), and
//! the superblock's last-check time that `e2fsck` stamps.
//!
//! Order, for speed: `mkfs.ext4 -d` without `metadata_csum` (with it, every directory
//! entry added recomputes its block's checksum), the overlay marks (`debugfs`), then
//! `tune2fs -O metadata_csum` and `e2fsck -fyD` checksum everything once and index the
//! directories, then the time pass. The inode tables are not zeroed by `mkfs`
//! (`lazy_itable_init=1`): the disk starts as a sparse file, so they read as zeros,
//! and a read-only disk is never initialized later.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::error::ImageError;
use super::reference::Digest;
use super::unpack::OverlayMarks;

/// Version of the disk layout produced here; part of the cache key. Bump it when what a
/// disk holds or how the guest reads it changes, so old disks are rebuilt rather than
/// reused. A faster way to build the same content keeps it (the checksum pass and the
/// lazy inode tables did: the files, marks and features are the same), so an upgrade
/// does not rebuild every cached disk.
pub const FORMAT_VERSION: u32 = 2;

/// Time stamped on everything the tools would otherwise take from the clock.
const FAKE_TIME: i64 = super::unpack::WHITEOUT_MTIME;

const MIB: u64 = 1 << 20;
/// Smallest flattened root disk (DESIGN §7).
pub const MIN_DISK_BYTES: u64 = 512 * MIB;
/// Smallest layer disk: layers are often tiny, and the guest writes to its scratch
/// disk, never to a layer, so a layer disk only needs room for its own files.
pub const MIN_LAYER_DISK_BYTES: u64 = 16 * MIB;
const BLOCK: u64 = 4096;
const INODE_SIZE: u64 = 256;
/// How often a running tool is checked against the deadline.
const TOOL_POLL: Duration = Duration::from_millis(20);

const MKE2FS_CONF: &str = "\
[defaults]
\tbase_features = sparse_super,large_file,filetype,resize_inode,dir_index,ext_attr
\tdefault_mntopts = acl,user_xattr
\tblocksize = 4096
\tinode_size = 256
\tinode_ratio = 16384
\tenable_periodic_fsck = 0
[fs_types]
\text4 = {
\t\tfeatures = extent,huge_file,flex_bg,metadata_csum,64bit,dir_nlink,extra_isize
\t}
";

/// What a walk of the tree found.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct TreeUsage {
    /// Bytes the tree needs on an ext4 with 4 KiB blocks (data rounded to blocks,
    /// one block per directory, inode table entries).
    pub used_bytes: u64,
    /// Inodes needed.
    pub inodes: u64,
}

/// Sums what the tree will need on disk. Hard links count once; symlinks are not
/// followed.
pub fn tree_usage(tree: &Path) -> Result<TreeUsage, ImageError> {
    let mut usage = TreeUsage::default();
    let mut seen = std::collections::HashSet::new();
    let mut stack = vec![tree.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let rd = std::fs::read_dir(&dir).map_err(|e| ImageError::build_io("list", &dir, e))?;
        // Directory blocks from its entries (8 bytes + name, 4-aligned, blocks
        // filled to 3/4 as hashed directories leave slack), not from the host's copy,
        // so the size does not depend on the host file system.
        let mut dir_bytes: u64 = 24;
        usage.inodes += 1;
        usage.used_bytes += INODE_SIZE;
        for ent in rd {
            let ent = ent.map_err(|e| ImageError::build_io("list", &dir, e))?;
            dir_bytes += (8 + ent.file_name().len() as u64).div_ceil(4) * 4;
            let path = ent.path();
            let m = std::fs::symlink_metadata(&path)
                .map_err(|e| ImageError::build_io("stat", &path, e))?;
            if m.is_dir() {
                stack.push(path);
                continue;
            }
            if m.nlink() > 1 && !seen.insert((m.dev(), m.ino())) {
                continue;
            }
            usage.inodes += 1;
            usage.used_bytes += INODE_SIZE + m.len().div_ceil(BLOCK) * BLOCK;
        }
        usage.used_bytes += (dir_bytes * 4).div_ceil(BLOCK * 3).max(1) * BLOCK;
    }
    Ok(usage)
}

/// Disk size for a tree: max(512 MiB, 1.2 × used) rounded up to a MiB.
pub fn disk_size(usage: TreeUsage) -> u64 {
    disk_size_at_least(usage, MIN_DISK_BYTES)
}

/// max(`min`, 1.2 × used) rounded up to a MiB.
pub fn disk_size_at_least(usage: TreeUsage, min: u64) -> u64 {
    let scaled = usage.used_bytes.saturating_mul(6).div_ceil(5);
    scaled.div_ceil(MIB).saturating_mul(MIB).max(min)
}

/// What kind of disk [`build_ext4`] makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskKind {
    /// The whole image flattened (at least [`MIN_DISK_BYTES`]).
    Flat,
    /// One layer or run of layers in overlay format (at least
    /// [`MIN_LAYER_DISK_BYTES`]), with its whiteouts and opaque marks.
    Layer,
}

/// A 16-byte value derived from the digest and a purpose, with the version 4 and
/// variant bits of a UUID set so tools accept it.
pub fn derived_bytes(digest: &Digest, purpose: &str) -> [u8; 16] {
    use sha2::Digest as _;
    let mut h = sha2::Sha256::new();
    h.update(b"plfm-rootfs\0");
    h.update(purpose.as_bytes());
    h.update(b"\0");
    h.update(digest.as_str().as_bytes());
    let mut b: [u8; 16] = h.finalize()[..16].try_into().unwrap_or([0; 16]);
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    b
}

/// [`derived_bytes`] formatted as a UUID.
pub fn derived_uuid(digest: &Digest, purpose: &str) -> String {
    let x = hex::encode(derived_bytes(digest, purpose));
    format!(
        "{}-{}-{}-{}-{}",
        &x[0..8],
        &x[8..12],
        &x[12..16],
        &x[16..20],
        &x[20..32]
    )
}

/// The parameters of a layer disk built by [`super::ext4`]: the same UUID, hash
/// seed, label and fixed time as the `mkfs.ext4` builds.
pub fn direct_params(digest: &Digest, kind: DiskKind) -> super::ext4::Params {
    super::ext4::Params {
        uuid: derived_bytes(digest, "uuid"),
        hash_seed: derived_bytes(digest, "hash_seed"),
        label: "plfm-root".into(),
        time: FAKE_TIME,
        min_bytes: match kind {
            DiskKind::Flat => MIN_DISK_BYTES,
            DiskKind::Layer => MIN_LAYER_DISK_BYTES,
        },
    }
}

/// Builds `out` (created or truncated) from `tree`. Returns the disk size. Every
/// program run is killed if it is still running at `deadline`.
pub fn build_ext4(
    tree: &Path,
    out: &Path,
    digest: &Digest,
    work: &Path,
    deadline: Instant,
    kind: DiskKind,
    marks: &OverlayMarks,
) -> Result<u64, ImageError> {
    let mut usage = tree_usage(tree)?;
    let n_marks = marks.whiteouts.len() as u64;
    usage.inodes += n_marks;
    usage.used_bytes += n_marks * (INODE_SIZE + 64);
    let size = match kind {
        DiskKind::Flat => disk_size(usage),
        DiskKind::Layer => disk_size_at_least(usage, MIN_LAYER_DISK_BYTES),
    };
    let what = format!("root disk of {}", digest.short());
    let conf = work.join("mke2fs.conf");
    std::fs::write(&conf, MKE2FS_CONF).map_err(|e| ImageError::build_io("write", &conf, e))?;
    // Pre-size as a sparse file; mkfs writes into it.
    {
        let f = File::create(out).map_err(|e| ImageError::build_io("create", out, e))?;
        f.set_len(size)
            .map_err(|e| ImageError::build_io("size", out, e))?;
    }
    let inodes = (usage.inodes + usage.inodes / 4 + 1024).max(size / 16384);
    let mut mkfs = Command::new("mkfs.ext4");
    mkfs.env("MKE2FS_CONFIG", &conf)
        .arg("-q")
        .arg("-F")
        .args([
            "-t",
            "ext4",
            "-b",
            "4096",
            "-I",
            "256",
            "-m",
            "0",
            "-L",
            "plfm-root",
        ])
        .arg("-N")
        .arg(inodes.to_string())
        .arg("-U")
        .arg(derived_uuid(digest, "uuid"))
        .arg("-E")
        .arg(format!(
            "hash_seed={},root_owner=0:0,lazy_itable_init=1,nodiscard",
            derived_uuid(digest, "hash_seed")
        ))
        .arg("-d")
        .arg(tree)
        .arg(out)
        .arg(format!("{}k", size / 1024));
    run_tool("mkfs.ext4", &what, mkfs, Output::Discard, &[0], deadline)?;
    if !marks.is_empty() {
        write_marks(out, work, marks, &what, deadline)?;
    }
    add_checksums(out, &what, deadline)?;
    normalize_times(out, work, &what, deadline)?;
    let f = File::options()
        .write(true)
        .open(out)
        .map_err(|e| ImageError::build_io("open", out, e))?;
    f.sync_all()
        .map_err(|e| ImageError::build_io("fsync", out, e))?;
    Ok(size)
}

/// Turns on `metadata_csum` once the disk is complete. `mkfs.ext4 -d` with checksums on
/// recomputes a directory block's checksum for every entry it adds, which made it
/// three times slower (29 s against 9 s for 55,000 files of `/usr/share`); `tune2fs`
/// then `e2fsck -fyD` checksum every block once and index the directories (an `htree`
/// for each directory of more than one block, which also makes lookups in the guest
/// faster). `e2fsck` exits 1 when it changed the disk, which it does here.
fn add_checksums(disk: &Path, what: &str, deadline: Instant) -> Result<(), ImageError> {
    let mut tune = Command::new("tune2fs");
    tune.args(["-O", "metadata_csum"]).arg(disk);
    run_tool("tune2fs", what, tune, Output::Discard, &[0], deadline)?;
    let mut fsck = Command::new("e2fsck");
    fsck.arg("-fyD").arg(disk);
    run_tool("e2fsck", what, fsck, Output::Discard, &[0, 1], deadline)?;
    Ok(())
}

fn tool_env(cmd: &mut Command) {
    cmd.env("E2FSPROGS_FAKE_TIME", FAKE_TIME.to_string())
        .env("LC_ALL", "C")
        .env("TZ", "UTC")
        .stdin(Stdio::null());
}

/// What [`run_tool`] does with a tool's standard output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Output {
    /// Returned to the caller (`dumpe2fs`).
    Keep,
    /// Not read (`debugfs` echoes every command: two lines per inode).
    Discard,
}

/// Runs `cmd` to completion (an exit code in `ok_codes` is success), killing it when
/// `deadline` passes (the image's
/// `image_timeout_secs`): a tool stuck on a pathological tree must not hold the
/// digest lock and a build thread forever.
fn run_tool(
    tool: &'static str,
    what: &str,
    mut cmd: Command,
    stdout: Output,
    ok_codes: &[i32],
    deadline: Instant,
) -> Result<Vec<u8>, ImageError> {
    tool_env(&mut cmd);
    let cannot_run = |e: std::io::Error| ImageError::Tool {
        tool,
        what: what.to_string(),
        cause: format!("cannot run: {e}"),
    };
    let started = Instant::now();
    let mut child = cmd
        .stdout(match stdout {
            Output::Keep => Stdio::piped(),
            Output::Discard => Stdio::null(),
        })
        .stderr(Stdio::piped())
        .spawn()
        .map_err(cannot_run)?;
    // Both pipes are drained on threads so a chatty tool cannot block on a full pipe
    // while this thread waits for it.
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_end(&mut buf);
            }
            buf
        })
    };
    let out_reader = drain(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let err_reader = drain(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let status = loop {
        match child.try_wait().map_err(cannot_run)? {
            Some(status) => break status,
            None => {
                let now = Instant::now();
                if now >= deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    // The reader threads end when the pipes close; not joined, in
                    // case something the tool started still holds them.
                    return Err(ImageError::LimitExceeded {
                        what: format!("{tool} building {what}"),
                        limit: "image_timeout_secs",
                        detail: format!(
                            "{tool} killed after {:.1} s: the image deadline passed",
                            started.elapsed().as_secs_f64()
                        ),
                    });
                }
                std::thread::sleep((deadline - now).min(TOOL_POLL));
            }
        }
    };
    let stdout = out_reader.join().unwrap_or_default();
    let stderr_bytes = err_reader.join().unwrap_or_default();
    let stderr = String::from_utf8_lossy(&stderr_bytes);
    // debugfs reports per-command failures on stderr with exit status 0.
    // Anything but its banner and "Allocated inode" notes is a failed command (a
    // `cd` that failed would make the next `mknod` land in the wrong directory).
    let failed_cmd = tool == "debugfs"
        && stderr.lines().any(|l| {
            let l = l.trim();
            !(l.is_empty() || l.starts_with("debugfs ") || l.starts_with("Allocated inode:"))
        });
    let ok = status.code().is_some_and(|c| ok_codes.contains(&c));
    if !ok || failed_cmd {
        if stderr.contains("No space left on device") {
            return Err(ImageError::NoSpace {
                what: format!("{tool} building {what}"),
            });
        }
        let last = stderr
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("");
        return Err(ImageError::Tool {
            tool,
            what: what.to_string(),
            cause: format!("{}: {}", status, last.trim()),
        });
    }
    Ok(stdout)
}

/// Used inode numbers of an ext4 image, from `dumpe2fs`'s free-inode ranges.
fn used_inodes(disk: &Path, what: &str, deadline: Instant) -> Result<Vec<u64>, ImageError> {
    let mut cmd = Command::new("dumpe2fs");
    cmd.arg(disk);
    let text = String::from_utf8_lossy(&run_tool(
        "dumpe2fs",
        what,
        cmd,
        Output::Keep,
        &[0],
        deadline,
    )?)
    .into_owned();
    parse_used_inodes(&text).ok_or_else(|| ImageError::Tool {
        tool: "dumpe2fs",
        what: what.to_string(),
        cause: "unexpected output".into(),
    })
}

/// Parses `dumpe2fs` output into the list of used inodes ≥ 11 plus the root (2).
pub fn parse_used_inodes(text: &str) -> Option<Vec<u64>> {
    let field = |name: &str| -> Option<u64> {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse().ok())
    };
    let count = field("Inode count:")?;
    let per_group = field("Inodes per group:")?;
    let first = field("First inode:").unwrap_or(11);
    let mut free = vec![false; count as usize + 1];
    // The header also has a "Free inodes:" total; only per-group lines count.
    let mut group = None;
    for line in text.lines() {
        let l = line.trim();
        // "Group 3: (Blocks …)", not "Group descriptor size:".
        if let Some(rest) = l.strip_prefix("Group ") {
            if let Ok(g) = rest.split(':').next().unwrap_or("").trim().parse::<u64>() {
                group = Some(g);
                continue;
            }
        }
        let Some(group) = group else { continue };
        if let Some(ranges) = l.strip_prefix("Free inodes:") {
            for r in ranges.split(',').map(str::trim).filter(|r| !r.is_empty()) {
                let (a, b) = match r.split_once('-') {
                    Some((a, b)) => (a.parse::<u64>().ok()?, b.parse::<u64>().ok()?),
                    None => {
                        let a = r.parse::<u64>().ok()?;
                        (a, a)
                    }
                };
                let lo = group * per_group + 1;
                let hi = (group + 1) * per_group;
                if a < lo || b > hi || a > b || b > count {
                    return None;
                }
                for i in a..=b {
                    free[i as usize] = true;
                }
            }
        }
    }
    let mut used = vec![2];
    used.extend((first..=count).filter(|i| !free[*i as usize]));
    Some(used)
}

/// A path as a quoted `debugfs` argument. Names debugfs cannot take quoted (a quote,
/// a backslash, control characters, not UTF-8) are refused: the image cannot be
/// stacked with such a whiteout.
fn debugfs_quoted(p: &Path, what: &str) -> Result<String, ImageError> {
    let s = p
        .to_str()
        .filter(|s| !s.chars().any(|c| c == '"' || c == '\\' || c.is_control()));
    match s {
        Some(s) => Ok(format!("\"/{s}\"")),
        None => Err(ImageError::UnsafeEntry {
            layer: what.to_string(),
            path: p.to_string_lossy().into_owned(),
            why: "a whiteout or opaque directory whose name has a quote, backslash or control character cannot be written into a layer disk".into(),
        }),
    }
}

/// Writes the overlay marks into the built image with `debugfs -w`: each whiteout a
/// character device 0:0 (mode 0, owner 0:0, fixed mtime), each opaque directory the
/// xattr `trusted.overlay.opaque=y`. Done on the image rather than in the host tree
/// so that building needs no privileges and the host never holds device nodes.
fn write_marks(
    disk: &Path,
    work: &Path,
    marks: &OverlayMarks,
    what: &str,
    deadline: Instant,
) -> Result<(), ImageError> {
    let mut s = String::new();
    for w in &marks.whiteouts {
        let parent = w.parent().unwrap_or(Path::new(""));
        let name = w.file_name().map(Path::new).unwrap_or(Path::new(""));
        let dir = debugfs_quoted(parent, what)?;
        let name = debugfs_quoted(name, what)?;
        // `mknod` takes a name in the current directory, not a path.
        let name = format!("\"{}", &name[2..]);
        s.push_str(&format!(
            "cd {dir}\nmknod {name} c 0 0\nsif {name} mtime @{FAKE_TIME}\n"
        ));
    }
    s.push_str("cd \"/\"\n");
    for o in &marks.opaque {
        s.push_str(&format!(
            "ea_set {} trusted.overlay.opaque y\n",
            debugfs_quoted(o, what)?
        ));
    }
    let script = work.join("debugfs-marks.cmds");
    std::fs::write(&script, s.as_bytes()).map_err(|e| ImageError::build_io("write", &script, e))?;
    let mut cmd = Command::new("debugfs");
    cmd.arg("-w").arg("-f").arg(&script).arg(disk);
    run_tool("debugfs", what, cmd, Output::Discard, &[0], deadline)?;
    Ok(())
}

fn normalize_times(
    disk: &Path,
    work: &Path,
    what: &str,
    deadline: Instant,
) -> Result<(), ImageError> {
    let inodes = used_inodes(disk, what, deadline)?;
    let script = work.join("debugfs.cmds");
    let mut s = String::with_capacity(inodes.len() * 48);
    for i in inodes {
        s.push_str(&format!(
            "sif <{i}> ctime @{FAKE_TIME}\nsif <{i}> atime @{FAKE_TIME}\n"
        ));
    }
    // `e2fsck` stamps its check time from the clock.
    s.push_str(&format!("ssv lastcheck @{FAKE_TIME}\n"));
    let mut f = File::create(&script).map_err(|e| ImageError::build_io("create", &script, e))?;
    f.write_all(s.as_bytes())
        .map_err(|e| ImageError::build_io("write", &script, e))?;
    let mut cmd = Command::new("debugfs");
    cmd.arg("-w").arg("-f").arg(&script).arg(disk);
    run_tool("debugfs", what, cmd, Output::Discard, &[0], deadline)?;
    Ok(())
}

/// Paths of the tools this module runs, or the first one missing.
pub fn tools_available() -> Result<(), String> {
    for t in ["mkfs.ext4", "debugfs", "dumpe2fs", "tune2fs", "e2fsck"] {
        if find_in_path(t).is_none() {
            return Err(format!("{t} not found in PATH (Debian package e2fsprogs)"));
        }
    }
    Ok(())
}

fn find_in_path(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain([PathBuf::from("/sbin"), PathBuf::from("/usr/sbin")])
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_is_at_least_512_mib_and_1_2_times_used() {
        assert_eq!(
            disk_size(TreeUsage {
                used_bytes: 1,
                inodes: 1
            }),
            MIN_DISK_BYTES
        );
        let used = 1000 * MIB;
        assert_eq!(
            disk_size(TreeUsage {
                used_bytes: used,
                inodes: 1
            }),
            1200 * MIB
        );
        assert_eq!(
            disk_size(TreeUsage {
                used_bytes: used + 1,
                inodes: 1
            }),
            1201 * MIB
        );
    }

    #[test]
    fn uuids_are_derived_from_the_digest() {
        let a = Digest::of(b"a");
        let b = Digest::of(b"b");
        assert_eq!(derived_uuid(&a, "uuid"), derived_uuid(&a, "uuid"));
        assert_ne!(derived_uuid(&a, "uuid"), derived_uuid(&b, "uuid"));
        assert_ne!(derived_uuid(&a, "uuid"), derived_uuid(&a, "hash_seed"));
        assert_eq!(derived_uuid(&a, "uuid").len(), 36);
        assert_eq!(&derived_uuid(&a, "uuid")[14..15], "4");
    }

    #[test]
    fn a_tool_still_running_at_the_deadline_is_killed_and_named() {
        let mut cmd = Command::new("sleep");
        cmd.arg("60");
        let started = Instant::now();
        let err = run_tool(
            "sleep",
            "root disk of test",
            cmd,
            Output::Discard,
            &[0],
            Instant::now() + Duration::from_millis(200),
        )
        .unwrap_err();
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "not killed: {:?}",
            started.elapsed()
        );
        let msg = err.to_string();
        assert!(msg.contains("sleep killed after"), "{msg}");
        assert!(msg.contains("image_timeout_secs"), "{msg}");
        assert_eq!(err.reason(), crate::instance::ReasonCode::ImagePullFailed);
    }

    #[test]
    fn a_tool_that_finishes_in_time_returns_its_output() {
        let mut cmd = Command::new("echo");
        cmd.arg("hello");
        let out = run_tool(
            "echo",
            "test",
            cmd,
            Output::Keep,
            &[0],
            Instant::now() + Duration::from_secs(60),
        )
        .unwrap();
        assert_eq!(out, b"hello\n");
    }

    #[test]
    fn an_exit_code_is_success_only_when_allowed() {
        let run = |ok: &[i32]| {
            let mut cmd = Command::new("sh");
            cmd.args(["-c", "echo why >&2; exit 1"]);
            run_tool(
                "sh",
                "test",
                cmd,
                Output::Discard,
                ok,
                Instant::now() + Duration::from_secs(60),
            )
        };
        let err = run(&[0]).unwrap_err().to_string();
        assert!(
            err.contains("exit status: 1") && err.contains("why"),
            "{err}"
        );
        run(&[0, 1]).unwrap();
    }

    #[test]
    fn dumpe2fs_free_inode_ranges_parse() {
        let text = "Inode count:              32\nFree inodes:              27\nGroup descriptor size:    64\nInodes per group:         16\nFirst inode:              11\n\
            Group 0: (Blocks 0-1)\n  Free inodes: 14-16\nGroup 1: (Blocks 2-3)\n  Free inodes: 17, 19-32\n";
        assert_eq!(parse_used_inodes(text).unwrap(), vec![2, 11, 12, 13, 18]);
        assert!(parse_used_inodes("garbage").is_none());
        let bad = "Inode count: 16\nInodes per group: 16\nGroup 0:\n  Free inodes: 5-99\n";
        assert!(parse_used_inodes(bad).is_none());
    }
}
