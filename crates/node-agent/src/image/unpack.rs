//! Applies OCI layers (tar, optionally gzip or zstd compressed) in order onto a tree,
//! with whiteouts, and without ever writing outside that tree. One set of rules, two
//! outputs ([`Backend`]):
//!
//! - [`Unpacker`] ([`HostFs`]): a build directory on the host's file system.
//! - [`MemUnpacker`] ([`MemFs`]): an in-memory [`FsTree`], file bytes written to a
//!   [`DataSink`] (the data area of the ext4 image being built), for the direct
//!   builder.
//!
//! Contract: the caller hands a directory it owns (the build tree), or a sink, and
//! then the layers bottom-up; `finish` fixes directory times (and, in memory, hands
//! back the tree). On error the tree is left half-built and the caller deletes it.
//!
//! Why this is hand-written rather than `tar::Entry::unpack_in`: the tar crate's
//! unpacking follows symlinks planted by earlier entries or layers for parent
//! directories, knows nothing of OCI whiteouts, and uses path-based calls. Here every
//! file system call is relative to a directory handle obtained by walking the entry's
//! parent components one at a time without following symlinks (on the host, a
//! directory file descriptor opened with `O_NOFOLLOW | O_DIRECTORY`, starting at the
//! tree's root descriptor). A symlink (or anything not a directory) in a parent
//! position therefore fails the walk instead of being followed, so no entry can write
//! through a symlink, whatever earlier layers planted. The final component is never
//! followed either: an existing entry is removed and the new one created exclusively
//! (on the host `unlinkat`, then `O_CREAT | O_EXCL | O_NOFOLLOW`, `mkdirat`,
//! `symlinkat` or `linkat` without `AT_SYMLINK_FOLLOW`); metadata is set through the
//! new handle or without following.
//!
//! The rules ([`Unpack`]) only see the primitive operations of [`Backend`] and the
//! errnos they answer with; the memory backend answers as the host would for the
//! same tree (`ENOENT`, `ELOOP`, `ENOTDIR`, `ENAMETOOLONG`, ...), so both backends
//! take the same decisions, and the tests check that they end with the same tree.
//! Directory times go through one record for both (a real file system changes a
//! directory's mtime when children are added, so the host sets them at the end).
//!
//! Policy (DESIGN §7): absolute paths and `..` components refuse the whole layer;
//! a parent that is a symlink refuses the layer; character and block devices are
//! dropped (counted); FIFOs are kept; hard links must point at an existing non-directory
//! inside the tree, resolved with the same rules (in memory: the same inode under two
//! names). Whiteouts (`.wh.<name>`) and opaque markers (`.wh..wh..opq`) hide entries
//! of lower layers only, never entries of the layer that carries them (OCI image
//! spec, "Whiteouts").
//!
//! Two output formats. *Applied* (the default): whiteouts delete from the tree, which
//! ends as the flattened image. *Overlay* ([`Unpack::overlay_format`]): the tree
//! holds one layer (or a run of layers) for a disk that guest init stacks under
//! overlayfs, so a whiteout must stay visible to hide what lower disks hold. The host
//! tree never gets device nodes or `trusted.*` xattrs (that would need root and put
//! device nodes on the host); whiteouts and opaque directories are returned as lists
//! ([`OverlayMarks`]) that the disk builder writes into the ext4 image itself. The
//! memory backend returns the same lists and also writes the marks into its tree at
//! finish, as the disk builder would. In both formats `trusted.overlay.*` xattrs from
//! a layer are dropped and counted: a layer must not forge overlayfs' own metadata
//! (opaque, redirect, metacopy).
//!
//! Bounds ([`UnpackLimits`], each named by its `[images]` key when exceeded): regular
//! file bytes (`max_unpacked_bytes`), tar headers over all layers (`max_entries`), the
//! size of each PAX or GNU extension body held in memory (`max_tar_extension_bytes`;
//! see [`Unpack::apply_layer`] for why the tar crate's own handling is bypassed),
//! and the image deadline (`image_timeout_secs`), checked before every entry. They
//! apply to both backends alike; only the host's memory staging
//! ([`Unpacker::staging`]) has a cap of its own.

use std::collections::{HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::io::{self, Read};
use std::os::fd::OwnedFd;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::time::Instant;

use rustix::fs::{self as rfs, AtFlags, Mode, OFlags, Timespec, Timestamps};
use rustix::io::Errno;

use super::error::ImageError;
use super::fstree::{DataSink, FsTree, Inode, InodeId, Kind, ROOT};

/// Longest entry path accepted (bytes), and deepest nesting: bounds recursion.
const MAX_PATH_BYTES: usize = 4096;
const MAX_DEPTH: usize = 128;

/// Fixed time given to directories that a layer creates implicitly (missing parents)
/// and to the tree's root, so the disk does not depend on when it was built.
pub const FIXED_MTIME: i64 = 0;

/// The mtime of a whiteout written into a layer disk: what [`super::rootfs`] gives
/// the whiteouts it makes with `debugfs` (its `FAKE_TIME`), so that both ways of
/// building a layer disk agree.
pub const WHITEOUT_MTIME: i64 = 1;

/// How a layer blob is compressed, from its media type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// Plain tar.
    None,
    /// `+gzip` (also Docker's `.tar.gzip` media type).
    Gzip,
    /// `+zstd`.
    Zstd,
}

impl Compression {
    /// Chooses by media type; unknown layer media types are refused by the caller.
    pub fn from_media_type(media_type: &str) -> Option<Self> {
        match media_type {
            "application/vnd.oci.image.layer.v1.tar"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar" => Some(Compression::None),
            "application/vnd.oci.image.layer.v1.tar+gzip"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
            | "application/vnd.docker.image.rootfs.diff.tar.gzip" => Some(Compression::Gzip),
            "application/vnd.oci.image.layer.v1.tar+zstd"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd" => {
                Some(Compression::Zstd)
            }
            _ => None,
        }
    }

    /// Wraps `r` in the matching decoder.
    pub fn decoder<'a, R: Read + 'a>(self, r: R) -> io::Result<Box<dyn Read + 'a>> {
        Ok(match self {
            Compression::None => Box::new(r),
            Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(r)),
            Compression::Zstd => Box::new(zstd::stream::read::Decoder::new(r)?),
        })
    }

    /// Decodes `r` on a thread of its own and returns the plain tar stream: the
    /// layer's decompression runs on one core while its entries are applied on
    /// another. At most [`DECODED_AHEAD`] chunks of [`DECODED_CHUNK`] bytes wait
    /// between the two, so memory stays bounded; when the reader is dropped early
    /// (the layer was refused) the thread stops at its next chunk. A decoding error
    /// reaches the reader as the stream's error.
    pub fn decoder_thread<R: Read + Send + 'static>(self, r: R) -> io::Result<DecodedStream> {
        let (tx, rx) = std::sync::mpsc::sync_channel::<io::Result<Vec<u8>>>(DECODED_AHEAD);
        // Read chunks come back to be filled again: no allocation, zeroing or
        // unmapping of 128 KiB per chunk (0.1 CPU-s on a 300 MB image).
        let (back, returned) = std::sync::mpsc::sync_channel::<Vec<u8>>(DECODED_AHEAD + 2);
        let thread = std::thread::Builder::new()
            .name("layer-decode".into())
            .spawn(move || {
                let mut d = match self.decoder(r) {
                    Ok(d) => d,
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                };
                loop {
                    let mut chunk = returned.try_recv().unwrap_or_default();
                    chunk.resize(DECODED_CHUNK, 0);
                    let mut filled = 0;
                    // Fill whole chunks: decoders return small reads.
                    let end = loop {
                        match d.read(&mut chunk[filled..]) {
                            Ok(0) => break true,
                            Ok(n) => {
                                filled += n;
                                if filled == chunk.len() {
                                    break false;
                                }
                            }
                            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                            Err(e) => {
                                let _ = tx.send(Err(e));
                                return;
                            }
                        }
                    };
                    chunk.truncate(filled);
                    if (!chunk.is_empty() && tx.send(Ok(chunk)).is_err()) || end {
                        return;
                    }
                }
            })?;
        Ok(DecodedStream {
            rx: Some(rx),
            back,
            cur: Vec::new(),
            pos: 0,
            thread: Some(thread),
        })
    }
}

/// Bytes per chunk handed from a decoding thread to its reader.
pub const DECODED_CHUNK: usize = 128 * 1024;
/// Chunks a decoding thread may run ahead of its reader.
pub const DECODED_AHEAD: usize = 4;

/// The reading end of [`Compression::decoder_thread`].
/// Dropping it ends the thread before returning.
#[derive(Debug)]
pub struct DecodedStream {
    rx: Option<std::sync::mpsc::Receiver<io::Result<Vec<u8>>>>,
    /// Where read chunks go back to the thread for reuse.
    back: std::sync::mpsc::SyncSender<Vec<u8>>,
    cur: Vec<u8>,
    pos: usize,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for DecodedStream {
    fn drop(&mut self) {
        // Closing the channel first fails the thread's next send, so it returns
        // after at most one more chunk.
        self.rx = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Read for DecodedStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.cur.len() {
            let Some(rx) = &self.rx else { return Ok(0) };
            match rx.recv() {
                Ok(Ok(chunk)) => {
                    let used = std::mem::replace(&mut self.cur, chunk);
                    if used.capacity() > 0 {
                        // Full or gone: the chunk is just freed.
                        let _ = self.back.try_send(used);
                    }
                    self.pos = 0;
                }
                Ok(Err(e)) => return Err(e),
                // The thread ended after the last chunk.
                Err(_) => return Ok(0),
            }
        }
        let n = buf.len().min(self.cur.len() - self.pos);
        buf[..n].copy_from_slice(&self.cur[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// What an entry path means once validated.
#[derive(Debug, PartialEq, Eq)]
pub enum EntryPath {
    /// The tree's root (`./`): its metadata is ignored (the disk's root is 0:0 0755).
    Root,
    /// A normal path: parent components and the final name.
    Normal {
        /// Parent directory components (may be empty).
        parent: Vec<OsString>,
        /// Final component.
        name: OsString,
    },
    /// `.wh.<name>`: delete `name` from `parent` (lower layers only).
    Whiteout {
        /// Directory holding the marker.
        parent: Vec<OsString>,
        /// Name to delete.
        name: OsString,
    },
    /// `.wh..wh..opq`: hide everything lower layers put in `dir`.
    Opaque {
        /// The opaque directory.
        dir: Vec<OsString>,
    },
    /// Other `.wh..wh.` names (aufs internals): ignored.
    Ignored,
}

/// Validates a raw tar path and classifies it. Pure: the heart of the containment
/// rules, unit-tested and fuzzed.
pub fn classify_path(raw: &[u8]) -> Result<EntryPath, &'static str> {
    let mut comps = split_relative(raw)?;
    let Some(last) = comps.pop() else {
        return Ok(EntryPath::Root);
    };
    let last_bytes = last.as_bytes();
    if last_bytes == b".wh..wh..opq" {
        return Ok(EntryPath::Opaque { dir: comps });
    }
    if last_bytes.starts_with(b".wh..wh.") {
        return Ok(EntryPath::Ignored);
    }
    if let Some(target) = last_bytes.strip_prefix(b".wh.") {
        if target.is_empty() || target == b"." || target == b".." {
            return Err("whiteout without a name");
        }
        return Ok(EntryPath::Whiteout {
            parent: comps,
            name: OsStr::from_bytes(target).to_os_string(),
        });
    }
    Ok(EntryPath::Normal {
        parent: comps,
        name: last,
    })
}

/// Splits a relative path into components, dropping empty and `.` components.
/// Refuses absolute paths, `..`, NUL bytes, and paths too long or deep.
pub fn split_relative(raw: &[u8]) -> Result<Vec<OsString>, &'static str> {
    if raw.is_empty() {
        return Err("empty path");
    }
    if raw.len() > MAX_PATH_BYTES {
        return Err("path too long");
    }
    if raw[0] == b'/' {
        return Err("absolute path");
    }
    if raw.contains(&0) {
        return Err("NUL byte in path");
    }
    let mut out = Vec::new();
    for c in raw.split(|b| *b == b'/') {
        match c {
            b"" | b"." => continue,
            b".." => return Err("`..` component"),
            _ => out.push(OsStr::from_bytes(c).to_os_string()),
        }
    }
    if out.len() > MAX_DEPTH {
        return Err("path too deep");
    }
    Ok(out)
}

/// Counters of one unpack.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct UnpackStats {
    /// Entries applied (files, dirs, links).
    pub entries: u64,
    /// Bytes of regular file content written.
    pub bytes: u64,
    /// Device nodes dropped.
    pub devices_dropped: u64,
    /// Whiteouts and opaque markers applied.
    pub whiteouts: u64,
    /// `trusted.overlay.*` xattrs found in the layers and dropped.
    pub overlay_xattrs_dropped: u64,
}

/// Whiteouts and opaque directories of an overlay-format tree, for the disk builder
/// (paths relative to the tree's root, sorted).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct OverlayMarks {
    /// Entries to create as whiteouts (character device 0:0).
    pub whiteouts: Vec<PathBuf>,
    /// Directories to mark `trusted.overlay.opaque=y`.
    pub opaque: Vec<PathBuf>,
}

impl OverlayMarks {
    /// True when there is nothing to write.
    pub fn is_empty(&self) -> bool {
        self.whiteouts.is_empty() && self.opaque.is_empty()
    }
}

/// Counters shared by the unpackers of one image, so that `max_unpacked_bytes` and
/// `max_entries` bound the whole image even when its layers are unpacked in parallel
/// into separate trees.
#[derive(Debug, Default)]
pub struct SharedBudget {
    bytes: std::sync::atomic::AtomicU64,
    entries: std::sync::atomic::AtomicU64,
}

impl SharedBudget {
    fn add(counter: &std::sync::atomic::AtomicU64, n: u64) -> u64 {
        counter
            .fetch_add(n, std::sync::atomic::Ordering::Relaxed)
            .saturating_add(n)
    }
}

/// What one unpack (all layers of one image) may cost; each bound names the
/// `[images]` key it comes from when exceeded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnpackLimits {
    /// `max_unpacked_bytes`: regular file bytes written.
    pub max_unpacked_bytes: u64,
    /// `max_entries`: tar headers read, extension headers included.
    pub max_entries: u64,
    /// `max_tar_extension_bytes`: one PAX or GNU long name/link body.
    pub max_tar_extension_bytes: u64,
    /// `image_timeout_secs`: checked before every entry.
    pub deadline: Option<Instant>,
}

impl UnpackLimits {
    /// `max_unpacked_bytes` as given; entries and extension bodies as the
    /// configuration's defaults; no deadline.
    pub fn new(max_unpacked_bytes: u64) -> Self {
        let d = super::config::ImageConfig::default();
        UnpackLimits {
            max_unpacked_bytes,
            max_entries: d.max_entries,
            max_tar_extension_bytes: d.max_tar_extension_bytes,
            deadline: None,
        }
    }

    /// The bounds of `config`, with the image's `deadline`.
    pub fn from_config(config: &super::config::ImageConfig, deadline: Instant) -> Self {
        UnpackLimits {
            max_unpacked_bytes: config.max_unpacked_bytes,
            max_entries: config.max_entries,
            max_tar_extension_bytes: config.max_tar_extension_bytes,
            deadline: Some(deadline),
        }
    }
}

/// Applies layers onto one tree through a [`Backend`]. See the module docs for the
/// rules; [`Unpacker`] (a host directory) and [`MemUnpacker`] (an [`FsTree`]) are
/// the two instances.
pub struct Unpack<B: Backend> {
    fs: B,
    limits: UnpackLimits,
    /// Raw tar headers read so far, over all layers (for `max_entries`).
    raw_entries: u64,
    stats: UnpackStats,
    /// Directory mtimes to set once all layers are applied (children change them on
    /// a real file system; the memory backend goes through the same record so that
    /// both end with the same times, quirks included).
    dir_times: HashMap<PathBuf, i64>,
    /// Paths (and their ancestors) written by the current layer.
    touched: HashSet<PathBuf>,
    /// Last parent directory opened, reused while entries stay in one directory.
    cached_parent: Option<(Vec<OsString>, B::Handle)>,
    layer: String,
    /// Overlay format: whiteouts and opaque markers are recorded, not applied.
    overlay: bool,
    whiteouts: std::collections::BTreeSet<PathBuf>,
    opaque: std::collections::BTreeSet<PathBuf>,
    /// Image-wide counters when several unpackers share the limits.
    budget: Option<std::sync::Arc<SharedBudget>>,
}

/// Applies layers onto a host directory (the build tree).
pub type Unpacker = Unpack<HostFs>;

/// Applies layers into an in-memory [`FsTree`], file bytes into a [`DataSink`].
pub type MemUnpacker<S> = Unpack<MemFs<S>>;

/// What a name in a directory is, seen without following it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeKind {
    /// A directory.
    Dir,
    /// A symbolic link.
    Symlink,
    /// Anything else (file, FIFO, device).
    Other,
}

/// A name's type and identity (equal identities are the same inode).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stat {
    /// Its type.
    pub kind: NodeKind,
    /// Device and inode number on the host; `(0, id)` in memory.
    pub id: (u64, u64),
}

/// Why a [`Backend`] operation that is more than one system call failed.
#[derive(Debug)]
pub enum FsError {
    /// The output (file system or data area) failed doing `.0`.
    Io(&'static str, io::Error),
    /// The layer stream failed while a file's bytes were copied.
    Layer(io::Error),
    /// Host memory staging only: the staging area cannot hold this (see
    /// [`Unpacker::staging`]).
    StagingFull(String),
}

/// Owner, permission bits and time of one entry, as the layer gives them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Meta {
    /// Permission bits (`& 0o7777`).
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Modification time.
    pub mtime: i64,
}

/// The primitive file system operations the unpacking rules are made of. Every name
/// is one path component, looked up in a directory handle, never followed when it
/// is a symlink. Simple operations fail with the errno the host would give
/// (`NOENT`, `NOTDIR`, `LOOP`, `EXIST`, `NAMETOOLONG`, ...), so that the rules can
/// decide on one set of outcomes for both backends.
pub trait Backend {
    /// An open directory (or, after [`Backend::write_file`], a file).
    type Handle;
    /// The path shown in errors for `rel` (relative to the tree's root).
    fn describe(&self, rel: &Path) -> PathBuf;
    /// The tree's root directory.
    fn open_root(&self) -> Result<Self::Handle, Errno>;
    /// A second handle on the same directory.
    fn dup(&self, h: &Self::Handle) -> io::Result<Self::Handle>;
    /// Opens the directory `name` in `dir`: `NOENT` when missing, `LOOP` or
    /// `NOTDIR` when it is a symlink or not a directory.
    fn open_dir(&self, dir: &Self::Handle, name: &OsStr) -> Result<Self::Handle, Errno>;
    /// Type and identity of `name` in `dir`, not following it.
    fn stat(&self, dir: &Self::Handle, name: &OsStr) -> Result<Stat, Errno>;
    /// Makes the directory `name` (which must not exist) with `mode`, owned 0:0.
    fn mkdir(&mut self, dir: &Self::Handle, name: &OsStr, mode: u32) -> Result<(), Errno>;
    /// Sets the permission bits of the open directory `d`.
    fn chmod_dir(&mut self, d: &Self::Handle, mode: u32) -> Result<(), Errno>;
    /// Removes `name` from `dir` with everything below it (nothing when missing).
    fn remove(&mut self, dir: &Self::Handle, name: &OsStr) -> io::Result<()>;
    /// The names in `dir`, without `.` and `..`.
    fn list(&self, dir: &Self::Handle) -> Result<Vec<OsString>, Errno>;
    /// Creates the regular file `name` (which must not exist) holding the `size`
    /// bytes read from `data`; returns its handle and the bytes written.
    fn write_file(
        &mut self,
        dir: &Self::Handle,
        name: &OsStr,
        data: &mut dyn Read,
        size: u64,
    ) -> Result<(Self::Handle, u64), FsError>;
    /// Sets owner, mode, xattrs (added to any already there) and mtime of `h`
    /// (`rel` names it in logs).
    fn set_meta(
        &mut self,
        h: &Self::Handle,
        rel: &Path,
        meta: &Meta,
        xattrs: &[(OsString, Vec<u8>)],
    ) -> Result<(), FsError>;
    /// Creates the symlink `name` to `target` (`name` must not exist).
    fn symlink(&mut self, dir: &Self::Handle, name: &OsStr, target: &[u8]) -> Result<(), Errno>;
    /// Creates the FIFO `name` (`name` must not exist).
    fn mkfifo(&mut self, dir: &Self::Handle, name: &OsStr) -> Result<(), Errno>;
    /// Sets owner, mode when `chmod`, and mtime of `name` without following it.
    fn set_meta_at(
        &mut self,
        dir: &Self::Handle,
        name: &OsStr,
        meta: &Meta,
        chmod: bool,
    ) -> Result<(), FsError>;
    /// Links the inode at `tname` in `tdir` as `name` in `dir` (must not exist).
    fn hard_link(
        &mut self,
        tdir: &Self::Handle,
        tname: &OsStr,
        dir: &Self::Handle,
        name: &OsStr,
    ) -> Result<(), Errno>;
    /// Sets the mtime of the directory `d` (best effort, at finish).
    fn set_dir_mtime(&mut self, d: &Self::Handle, mtime: i64);
    /// Makes the root 0755 with [`FIXED_MTIME`] (best effort, at finish).
    fn finish_root(&mut self);
    /// Host memory staging: the file bytes the tree may hold.
    fn staging_cap(&self) -> Option<u64> {
        None
    }
}

fn errno_io(e: Errno) -> io::Error {
    io::Error::from_raw_os_error(e.raw_os_error())
}

fn join(comps: &[OsString]) -> PathBuf {
    comps.iter().collect()
}

impl Unpack<HostFs> {
    /// Opens `root` (must be an existing directory, created by the caller), with only
    /// the unpacked size bounded beyond the defaults of [`UnpackLimits::new`].
    pub fn new(root: &Path, max_unpacked_bytes: u64) -> Result<Self, ImageError> {
        Self::with_limits(root, UnpackLimits::new(max_unpacked_bytes))
    }

    /// Opens `root` (must be an existing directory, created by the caller).
    pub fn with_limits(root: &Path, limits: UnpackLimits) -> Result<Self, ImageError> {
        let fd = rfs::open(
            root,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| ImageError::build_io("open build tree", root, errno_io(e)))?;
        Ok(Self::with_backend(
            HostFs {
                root: fd,
                root_path: root.to_path_buf(),
                staging_cap: None,
            },
            limits,
        ))
    }

    /// The tree is a memory staging area that holds at most `cap` bytes of file
    /// data, and must not drop xattrs: past the cap, or on an xattr the file system
    /// refuses, [`ImageError::StagingFull`] tells the caller to unpack on disk.
    pub fn staging(mut self, cap: u64) -> Self {
        self.fs.staging_cap = Some(cap);
        self
    }

    /// Sets the recorded directory times and returns the counters.
    pub fn finish(self) -> Result<UnpackStats, ImageError> {
        self.finish_with_marks().map(|(stats, _)| stats)
    }

    /// [`Self::finish`], also returning the overlay marks (empty in the applied
    /// format). A whiteout is kept only where the tree has nothing at its path and
    /// its parent is still a directory; an opaque mark only on a directory.
    pub fn finish_with_marks(self) -> Result<(UnpackStats, OverlayMarks), ImageError> {
        self.finish_parts().map(|(_, stats, marks)| (stats, marks))
    }
}

impl<S: DataSink> Unpack<MemFs<S>> {
    /// An unpacker into an empty [`FsTree`] (root 0:0 0755 [`FIXED_MTIME`]), writing
    /// file bytes to `sink` in stream order.
    pub fn in_memory(limits: UnpackLimits, sink: S) -> Self {
        Self::with_backend(
            MemFs {
                tree: FsTree::new(FIXED_MTIME),
                sink,
            },
            limits,
        )
    }

    /// Sets the directory times and returns the tree, the sink and the counters.
    /// In the overlay format the marks are written into the tree, as the disk
    /// builder writes them into a layer disk (see [`Self::finish_with_marks`]).
    pub fn finish(self) -> Result<(FsTree, S, UnpackStats), ImageError> {
        self.finish_with_marks()
            .map(|(tree, sink, stats, _)| (tree, sink, stats))
    }

    /// [`Self::finish`], also returning the marks it wrote: each whiteout is a
    /// character device 0:0 (mode 0, owner 0:0, mtime [`WHITEOUT_MTIME`]), each
    /// opaque directory gets `trusted.overlay.opaque=y`, exactly what
    /// [`super::rootfs`] writes with `debugfs` for a host tree's marks.
    pub fn finish_with_marks(self) -> Result<(FsTree, S, UnpackStats, OverlayMarks), ImageError> {
        let (mut fs, stats, marks) = self.finish_parts()?;
        for w in &marks.whiteouts {
            let comps: Vec<OsString> = w.iter().map(|c| c.to_os_string()).collect();
            let (Some(name), parent) = (comps.last(), &comps[..comps.len().saturating_sub(1)])
            else {
                continue;
            };
            // The marks were kept only where the parent is a directory.
            let Ok(dir) = mem_walk(&fs.tree, parent) else {
                continue;
            };
            let node = Inode::new(Kind::CharDev { major: 0, minor: 0 }, 0, WHITEOUT_MTIME);
            let id = fs.tree.add(node);
            fs.tree.link(dir, name.as_bytes(), id);
        }
        for o in &marks.opaque {
            let comps: Vec<OsString> = o.iter().map(|c| c.to_os_string()).collect();
            if let Ok(dir) = mem_walk(&fs.tree, &comps) {
                fs.tree
                    .get_mut(dir)
                    .xattrs
                    .insert(b"trusted.overlay.opaque".to_vec(), b"y".to_vec());
            }
        }
        Ok((fs.tree, fs.sink, stats, marks))
    }

    /// The tree as built so far.
    pub fn tree(&self) -> &FsTree {
        &self.fs.tree
    }
}

impl<B: Backend> Unpack<B> {
    fn with_backend(fs: B, limits: UnpackLimits) -> Self {
        Unpack {
            fs,
            limits,
            raw_entries: 0,
            stats: UnpackStats::default(),
            dir_times: HashMap::new(),
            touched: HashSet::new(),
            cached_parent: None,
            layer: String::new(),
            overlay: false,
            whiteouts: Default::default(),
            opaque: Default::default(),
            budget: None,
        }
    }

    /// Produces the overlay format (see the module docs): the tree of a layer disk.
    pub fn overlay_format(mut self) -> Self {
        self.overlay = true;
        self
    }

    /// Counts bytes and entries against `budget` (shared with the image's other
    /// unpackers) instead of this unpacker alone.
    pub fn shared_budget(mut self, budget: std::sync::Arc<SharedBudget>) -> Self {
        self.budget = Some(budget);
        self
    }

    /// Gives back to the shared budget what this unpacker counted (it failed and its
    /// layers are unpacked again elsewhere).
    pub fn release_budget(&self) {
        if let Some(b) = &self.budget {
            b.entries
                .fetch_sub(self.raw_entries, std::sync::atomic::Ordering::Relaxed);
            b.bytes
                .fetch_sub(self.stats.bytes, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// The counters so far.
    pub fn stats(&self) -> &UnpackStats {
        &self.stats
    }

    /// Entries read so far: this unpacker's, or the image's when the budget is shared.
    fn count_entry(&mut self) -> u64 {
        self.raw_entries += 1;
        match &self.budget {
            Some(b) => SharedBudget::add(&b.entries, 1),
            None => self.raw_entries,
        }
    }

    /// Bytes written so far after adding `n` (see [`Self::count_entry`]).
    fn would_write(&self, n: u64) -> u64 {
        match &self.budget {
            Some(b) => b
                .bytes
                .load(std::sync::atomic::Ordering::Relaxed)
                .saturating_add(n),
            None => self.stats.bytes.saturating_add(n),
        }
    }

    /// Applies one layer read from `blob` (compressed as `compression`). `layer` names
    /// it in errors (short digest).
    ///
    /// Why the tar stream is walked raw (`Entries::raw(true)`) and PAX and GNU
    /// extension headers are handled here: the tar crate (0.4.46), when it
    /// preprocesses them itself, reads each PAX (`x`/`g`) and GNU long name/link
    /// (`L`/`K`) body into memory whole, with no cap. A few MB of gzip holding
    /// extension headers that declare gigabyte bodies of zeros took the agent to
    /// 1 GiB of memory. Here a body's declared size is checked against
    /// `max_tar_extension_bytes` before a byte of it is read, and it is read through
    /// `Read::take(cap + 1)` as well, so no header costs more than the cap.
    pub fn apply_layer<R: Read>(
        &mut self,
        blob: R,
        compression: Compression,
        layer: &str,
    ) -> Result<(), ImageError> {
        self.layer = layer.to_string();
        self.touched.clear();
        self.cached_parent = None;
        let fmt_err = |e: io::Error, layer: &str| ImageError::LayerFormat {
            layer: layer.to_string(),
            cause: e.to_string(),
        };
        let decoder = compression.decoder(blob).map_err(|e| fmt_err(e, layer))?;
        let mut archive = tar::Archive::new(decoder);
        let entries = archive.entries().map_err(|e| fmt_err(e, layer))?.raw(true);
        let mut pending = Extensions::default();
        for entry in entries {
            self.check_deadline()?;
            if self.count_entry() > self.limits.max_entries {
                return Err(ImageError::LimitExceeded {
                    what: format!("layer {}", self.layer),
                    limit: "max_entries",
                    detail: format!(
                        "more than {} tar entries in the image",
                        self.limits.max_entries
                    ),
                });
            }
            let mut entry = entry.map_err(|e| fmt_err(e, layer))?;
            use tar::EntryType as T;
            let kind = entry.header().entry_type();
            let slot = match kind {
                T::GNULongName => &mut pending.long_name,
                T::GNULongLink => &mut pending.long_link,
                T::XHeader => &mut pending.pax,
                T::XGlobalHeader => {
                    // Global defaults: read (bounded) and ignored, as before.
                    self.read_extension(&mut entry, "PAX global header")?;
                    continue;
                }
                _ => {
                    let ext = std::mem::take(&mut pending);
                    self.apply_entry(&mut entry, ext)?;
                    continue;
                }
            };
            if slot.is_some() {
                return Err(ImageError::LayerFormat {
                    layer: self.layer.clone(),
                    cause: format!("two {kind:?} headers describe the same entry"),
                });
            }
            let what = match kind {
                T::GNULongName => "GNU long name",
                T::GNULongLink => "GNU long link",
                _ => "PAX header",
            };
            let body = self.read_extension(&mut entry, what)?;
            *slot = Some(body);
        }
        if !pending.is_empty() {
            return Err(ImageError::LayerFormat {
                layer: self.layer.clone(),
                cause: "extension header at the end of the layer describes no entry".into(),
            });
        }
        Ok(())
    }

    /// Refuses to go on once the image's deadline has passed (checked per entry, so
    /// a layer of millions of tiny entries cannot outlive `image_timeout_secs`).
    fn check_deadline(&self) -> Result<(), ImageError> {
        match self.limits.deadline {
            Some(d) if Instant::now() > d => Err(ImageError::LimitExceeded {
                what: format!("layer {}", self.layer),
                limit: "image_timeout_secs",
                detail: format!(
                    "unpacking did not finish in time (stopped after {} tar entries)",
                    self.raw_entries
                ),
            }),
            _ => Ok(()),
        }
    }

    /// Reads a PAX or GNU extension body, refusing it (before reading anything when
    /// the header declares it) when it exceeds `max_tar_extension_bytes`.
    fn read_extension<R: Read>(
        &self,
        entry: &mut tar::Entry<'_, R>,
        what: &str,
    ) -> Result<Vec<u8>, ImageError> {
        let cap = self.limits.max_tar_extension_bytes;
        let too_big = |size: String| ImageError::LimitExceeded {
            what: format!("layer {}", self.layer),
            limit: "max_tar_extension_bytes",
            detail: format!("{what} of {size} bytes > {cap}"),
        };
        let declared = entry.size();
        if declared > cap {
            return Err(too_big(declared.to_string()));
        }
        let mut body = Vec::new();
        entry
            .take(cap.saturating_add(1))
            .read_to_end(&mut body)
            .map_err(|e| ImageError::LayerFormat {
                layer: self.layer.clone(),
                cause: format!("{what}: {e}"),
            })?;
        if body.len() as u64 > cap {
            return Err(too_big(format!("more than {cap}")));
        }
        Ok(body)
    }

    /// Works out the overlay marks, sets the recorded directory times and the
    /// root's, and hands back the backend. A whiteout is kept only where the tree
    /// has nothing at its path and its parent is still a directory; an opaque mark
    /// only on a directory.
    fn finish_parts(mut self) -> Result<(B, UnpackStats, OverlayMarks), ImageError> {
        let mut marks = OverlayMarks::default();
        for w in std::mem::take(&mut self.whiteouts) {
            let comps: Vec<OsString> = w.iter().map(|c| c.to_os_string()).collect();
            let (Some(name), parent) = (comps.last(), &comps[..comps.len().saturating_sub(1)])
            else {
                continue;
            };
            let Ok(dir) = self.walk(parent) else {
                continue;
            };
            if matches!(self.fs.stat(&dir, name.as_os_str()), Err(Errno::NOENT)) {
                marks.whiteouts.push(w);
            }
        }
        for o in std::mem::take(&mut self.opaque) {
            let comps: Vec<OsString> = o.iter().map(|c| c.to_os_string()).collect();
            if self.walk(&comps).is_ok() {
                marks.opaque.push(o);
            }
        }
        self.cached_parent = None;
        let mut dirs: Vec<(PathBuf, i64)> = self.dir_times.drain().collect();
        dirs.sort();
        for (path, mtime) in dirs {
            let comps: Vec<OsString> = path.iter().map(|c| c.to_os_string()).collect();
            // Whited out later, or replaced by a non-directory: nothing to set.
            let Ok(d) = self.walk(&comps) else {
                continue;
            };
            self.fs.set_dir_mtime(&d, mtime);
        }
        // The disk's root is 0:0 0755 whatever the umask or the layers said.
        self.fs.finish_root();
        Ok((self.fs, self.stats, marks))
    }

    fn refuse(&self, path: &[u8], why: impl Into<String>) -> ImageError {
        ImageError::UnsafeEntry {
            layer: self.layer.clone(),
            path: String::from_utf8_lossy(path).into_owned(),
            why: why.into(),
        }
    }

    fn io_err(&self, what: &'static str, rel: &Path, e: io::Error) -> ImageError {
        ImageError::build_io(what, self.fs.describe(rel), e)
    }

    fn fs_err(&self, rel: &Path, e: FsError) -> ImageError {
        match e {
            FsError::Io(what, e) => self.io_err(what, rel, e),
            // A read error here is the layer stream failing, not the disk.
            FsError::Layer(e) => ImageError::LayerFormat {
                layer: self.layer.clone(),
                cause: format!("{}: {e}", rel.display()),
            },
            FsError::StagingFull(why) => ImageError::StagingFull {
                layer: self.layer.clone(),
                why,
            },
        }
    }

    fn apply_entry<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        ext: Extensions,
    ) -> Result<(), ImageError> {
        use tar::EntryType as T;
        let kind = entry.header().entry_type();
        let header_path = entry.header().path_bytes().into_owned();
        let pax = match &ext.pax {
            Some(body) => parse_pax(body).map_err(|why| self.refuse(&header_path, why))?,
            None => Pax::default(),
        };
        // Same precedence as the tar crate: GNU long name, then PAX, then the header.
        let raw_path = match (ext.long_name, pax.path.clone()) {
            (Some(n), _) => strip_nul(n),
            (None, Some(p)) => p,
            (None, None) => header_path,
        };
        if let Some(size) = pax.size {
            // The crate walks the stream by the header's size in raw mode; a PAX size
            // that disagrees would desynchronise it (and parsers that disagree on
            // sizes are how smuggled entries are built).
            if size != entry.size() {
                return Err(self.refuse(
                    &raw_path,
                    format!(
                        "PAX size {size} differs from the header's {} (not supported)",
                        entry.size()
                    ),
                ));
            }
        }
        let link = match (ext.long_link, pax.linkpath.clone()) {
            (Some(l), _) => Some(strip_nul(l)),
            (None, Some(l)) => Some(l),
            (None, None) => entry.link_name_bytes().map(|t| t.into_owned()),
        };
        let classified = classify_path(&raw_path).map_err(|why| self.refuse(&raw_path, why))?;
        match classified {
            EntryPath::Root | EntryPath::Ignored => Ok(()),
            EntryPath::Whiteout { parent, name } => {
                self.stats.whiteouts += 1;
                self.whiteout(&raw_path, &parent, &name)
            }
            EntryPath::Opaque { dir } => {
                self.stats.whiteouts += 1;
                self.opaque(&raw_path, &dir)
            }
            EntryPath::Normal { parent, name } => {
                if matches!(kind, T::Char | T::Block) {
                    self.stats.devices_dropped += 1;
                    return Ok(());
                }
                let header = entry.header();
                let meta = Meta {
                    mode: header
                        .mode()
                        .map_err(|e| self.refuse(&raw_path, format!("bad mode: {e}")))?
                        & 0o7777,
                    uid: id32(pax.uid.map_or_else(|| header.uid(), Ok))
                        .ok_or_else(|| self.refuse(&raw_path, "bad uid"))?,
                    gid: id32(pax.gid.map_or_else(|| header.gid(), Ok))
                        .ok_or_else(|| self.refuse(&raw_path, "bad gid"))?,
                    mtime: header
                        .mtime()
                        .map(|m| m.min(i64::MAX as u64) as i64)
                        .unwrap_or(0),
                };
                let mut xattrs = pax.xattrs;
                let before = xattrs.len();
                xattrs.retain(|(k, _)| !k.as_bytes().starts_with(b"trusted.overlay."));
                self.stats.overlay_xattrs_dropped += (before - xattrs.len()) as u64;
                let parent_fd = self.parent(&raw_path, &parent)?;
                let mut rel = join(&parent);
                rel.push(&name);
                self.mark_touched(&rel);
                self.stats.entries += 1;
                match kind {
                    T::GNUSparse => {
                        Err(self.refuse(&raw_path, "GNU sparse entries are not supported"))
                    }
                    T::Regular | T::Continuous => {
                        let size = entry.size();
                        if let Some(cap) = self.fs.staging_cap() {
                            if self.stats.bytes.saturating_add(size) > cap {
                                return Err(ImageError::StagingFull {
                                    layer: self.layer.clone(),
                                    why: format!("more than {cap} bytes"),
                                });
                            }
                        }
                        if self.would_write(size) > self.limits.max_unpacked_bytes {
                            return Err(ImageError::LimitExceeded {
                                what: format!("layer {}", self.layer),
                                limit: "max_unpacked_bytes",
                                detail: format!(
                                    "more than {} bytes unpacked",
                                    self.limits.max_unpacked_bytes
                                ),
                            });
                        }
                        self.write_file(&parent_fd, &name, &rel, entry, size, &meta, &xattrs)
                    }
                    T::Directory => self.make_dir(&parent_fd, &name, &rel, &meta, &xattrs),
                    T::Symlink => {
                        let target = link
                            .filter(|t| !t.is_empty() && !t.contains(&0))
                            .ok_or_else(|| self.refuse(&raw_path, "symlink without a target"))?;
                        self.make_symlink(&parent_fd, &name, &rel, &target, &meta)
                    }
                    T::Link => {
                        let target = link
                            .ok_or_else(|| self.refuse(&raw_path, "hard link without a target"))?;
                        self.make_hardlink(&raw_path, &parent_fd, &name, &rel, &target)
                    }
                    T::Fifo => self.make_fifo(&parent_fd, &name, &rel, &meta),
                    other => {
                        Err(self.refuse(&raw_path, format!("unsupported entry type {other:?}")))
                    }
                }
            }
        }
    }

    fn mark_touched(&mut self, rel: &Path) {
        let mut p = rel.to_path_buf();
        loop {
            if !self.touched.insert(p.clone()) {
                break;
            }
            if !p.pop() || p.as_os_str().is_empty() {
                break;
            }
        }
    }

    /// Opens the parent directory of an entry, creating missing directories (with
    /// fixed times, owner 0:0, mode 0755). Reuses the last one when unchanged.
    fn parent(&mut self, raw: &[u8], comps: &[OsString]) -> Result<B::Handle, ImageError> {
        if let Some((c, fd)) = &self.cached_parent {
            if c.as_slice() == comps {
                return self
                    .fs
                    .dup(fd)
                    .map_err(|e| self.io_err("duplicate descriptor of", &join(comps), e));
            }
        }
        let fd = self.walk_creating(raw, comps)?;
        let dup = self
            .fs
            .dup(&fd)
            .map_err(|e| self.io_err("duplicate descriptor of", &join(comps), e))?;
        self.cached_parent = Some((comps.to_vec(), dup));
        Ok(fd)
    }

    fn walk_creating(&mut self, raw: &[u8], comps: &[OsString]) -> Result<B::Handle, ImageError> {
        let mut cur = self
            .fs
            .open_root()
            .map_err(|e| self.io_err("open", Path::new("."), errno_io(e)))?;
        for (i, c) in comps.iter().enumerate() {
            let next = match self.fs.open_dir(&cur, c.as_os_str()) {
                Ok(fd) => fd,
                Err(Errno::NOENT) => {
                    let rel = join(&comps[..=i]);
                    self.fs
                        .mkdir(&cur, c.as_os_str(), 0o755)
                        .map_err(|e| self.io_err("create directory", &rel, errno_io(e)))?;
                    if self.overlay && self.whiteouts.remove(&rel) {
                        self.opaque.insert(rel.clone());
                    }
                    self.dir_times.entry(rel.clone()).or_insert(FIXED_MTIME);
                    let fd = self
                        .fs
                        .open_dir(&cur, c.as_os_str())
                        .map_err(|e| self.io_err("open directory", &rel, errno_io(e)))?;
                    // 0755 whatever the process umask (the agent runs with 077): in a
                    // layer disk an implicit directory is what overlayfs shows when it
                    // is the upper-most, so it must not lock the workload out.
                    self.fs
                        .chmod_dir(&fd, 0o755)
                        .map_err(|e| self.io_err("chmod", &rel, errno_io(e)))?;
                    fd
                }
                Err(Errno::LOOP) | Err(Errno::NOTDIR) => {
                    let rel = join(&comps[..=i]);
                    let what = match self.fs.stat(&cur, c.as_os_str()) {
                        Ok(st) if st.kind == NodeKind::Symlink => "is a symlink",
                        _ => "is not a directory",
                    };
                    return Err(self.refuse(raw, format!("parent {} {what}", rel.display())));
                }
                Err(e) => {
                    return Err(self.io_err("open directory", &join(&comps[..=i]), errno_io(e)))
                }
            };
            cur = next;
        }
        Ok(cur)
    }

    /// Walks existing directories only, never following symlinks.
    fn walk(&self, comps: &[OsString]) -> Result<B::Handle, Errno> {
        let mut cur = self.fs.open_root()?;
        for c in comps {
            cur = self.fs.open_dir(&cur, c.as_os_str())?;
        }
        Ok(cur)
    }

    /// Removes whatever is at `name` unless it is a directory and `keep_dir`.
    /// Returns true when a directory is still there.
    fn clear(
        &mut self,
        parent: &B::Handle,
        name: &OsStr,
        rel: &Path,
        keep_dir: bool,
    ) -> Result<bool, ImageError> {
        if self.overlay {
            // Whatever is created here now hides the lower layers' entry by itself.
            self.whiteouts.remove(rel);
        }
        match self.fs.stat(parent, name) {
            Err(Errno::NOENT) => Ok(false),
            Err(e) => Err(self.io_err("inspect", rel, errno_io(e))),
            Ok(st) => {
                let is_dir = st.kind == NodeKind::Dir;
                if is_dir && keep_dir {
                    return Ok(true);
                }
                if is_dir {
                    self.cached_parent = None;
                }
                self.fs
                    .remove(parent, name)
                    .map_err(|e| self.io_err("remove", rel, e))?;
                Ok(false)
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn write_file(
        &mut self,
        parent: &B::Handle,
        name: &OsStr,
        rel: &Path,
        entry: &mut dyn Read,
        size: u64,
        meta: &Meta,
        xattrs: &[(OsString, Vec<u8>)],
    ) -> Result<(), ImageError> {
        self.clear(parent, name, rel, false)?;
        let (file, n) = self
            .fs
            .write_file(parent, name, entry, size)
            .map_err(|e| self.fs_err(rel, e))?;
        self.stats.bytes += n;
        if let Some(b) = &self.budget {
            SharedBudget::add(&b.bytes, n);
        }
        self.fs
            .set_meta(&file, rel, meta, xattrs)
            .map_err(|e| self.fs_err(rel, e))
    }

    fn make_dir(
        &mut self,
        parent: &B::Handle,
        name: &OsStr,
        rel: &Path,
        meta: &Meta,
        xattrs: &[(OsString, Vec<u8>)],
    ) -> Result<(), ImageError> {
        if self.overlay && self.whiteouts.remove(rel) {
            // A directory where a lower layer's was whited out must not merge with it.
            self.opaque.insert(rel.to_path_buf());
        }
        if !self.clear(parent, name, rel, true)? {
            self.fs
                .mkdir(parent, name, 0o700)
                .map_err(|e| self.io_err("create directory", rel, errno_io(e)))?;
        }
        let fd = self
            .fs
            .open_dir(parent, name)
            .map_err(|e| self.io_err("open directory", rel, errno_io(e)))?;
        self.fs
            .set_meta(&fd, rel, meta, xattrs)
            .map_err(|e| self.fs_err(rel, e))?;
        self.dir_times.insert(rel.to_path_buf(), meta.mtime);
        Ok(())
    }

    fn make_symlink(
        &mut self,
        parent: &B::Handle,
        name: &OsStr,
        rel: &Path,
        target: &[u8],
        meta: &Meta,
    ) -> Result<(), ImageError> {
        self.clear(parent, name, rel, false)?;
        self.fs
            .symlink(parent, name, target)
            .map_err(|e| self.io_err("create symlink", rel, errno_io(e)))?;
        self.fs
            .set_meta_at(parent, name, meta, false)
            .map_err(|e| self.fs_err(rel, e))
    }

    fn make_fifo(
        &mut self,
        parent: &B::Handle,
        name: &OsStr,
        rel: &Path,
        meta: &Meta,
    ) -> Result<(), ImageError> {
        self.clear(parent, name, rel, false)?;
        self.fs
            .mkfifo(parent, name)
            .map_err(|e| self.io_err("create fifo", rel, errno_io(e)))?;
        self.fs
            .set_meta_at(parent, name, meta, true)
            .map_err(|e| self.fs_err(rel, e))
    }

    fn make_hardlink(
        &mut self,
        raw: &[u8],
        parent: &B::Handle,
        name: &OsStr,
        rel: &Path,
        target: &[u8],
    ) -> Result<(), ImageError> {
        let mut tcomps = split_relative(target)
            .map_err(|why| self.refuse(raw, format!("hard link target: {why}")))?;
        let Some(tname) = tcomps.pop() else {
            return Err(self.refuse(raw, "hard link to the root"));
        };
        let tparent = match self.walk(&tcomps) {
            Ok(fd) => fd,
            Err(Errno::LOOP) | Err(Errno::NOTDIR) => {
                return Err(self.refuse(
                    raw,
                    "hard link target's parent is a symlink or not a directory",
                ))
            }
            Err(_) => return Err(self.missing_link_target(raw)),
        };
        let tst = match self.fs.stat(&tparent, tname.as_os_str()) {
            Ok(st) => st,
            Err(_) => return Err(self.missing_link_target(raw)),
        };
        if tst.kind == NodeKind::Dir {
            return Err(self.refuse(raw, "hard link to a directory"));
        }
        if let Ok(st) = self.fs.stat(parent, name) {
            if st.id == tst.id {
                return Ok(());
            }
        }
        self.clear(parent, name, rel, false)?;
        self.fs
            .hard_link(&tparent, tname.as_os_str(), parent, name)
            .map_err(|e| self.io_err("create hard link", rel, errno_io(e)))
    }

    /// A hard link whose target is not in the tree. In the overlay format the target
    /// may be in a lower layer, which a layer disk cannot link to: the caller builds
    /// the image as one flattened disk instead.
    fn missing_link_target(&self, raw: &[u8]) -> ImageError {
        if self.overlay {
            ImageError::HardLinkAcrossLayers {
                layer: self.layer.clone(),
                path: String::from_utf8_lossy(raw).into_owned(),
            }
        } else {
            self.refuse(raw, "hard link target does not exist")
        }
    }

    fn whiteout(
        &mut self,
        raw: &[u8],
        parent: &[OsString],
        name: &OsStr,
    ) -> Result<(), ImageError> {
        let mut rel = join(parent);
        rel.push(name);
        if self.overlay {
            return self.overlay_whiteout(raw, parent, name, rel);
        }
        if self.touched.contains(&rel) {
            // Same-layer entries are not hidden by the layer's own whiteouts.
            return Ok(());
        }
        let dir = match self.walk(parent) {
            Ok(fd) => fd,
            Err(Errno::NOENT) => return Ok(()),
            Err(Errno::LOOP) | Err(Errno::NOTDIR) => {
                return Err(self.refuse(raw, "whiteout under a symlink or non-directory"))
            }
            Err(e) => return Err(self.io_err("open directory", &join(parent), errno_io(e))),
        };
        self.cached_parent = None;
        self.clear(&dir, name, &rel, false)?;
        self.dir_times.retain(|p, _| !p.starts_with(&rel));
        Ok(())
    }

    /// Overlay format: the entry is hidden in lower disks by a whiteout at its path,
    /// and whatever earlier layers of this tree put there is removed. An entry this
    /// layer wrote itself stays (the layer's own whiteouts hide lower layers only);
    /// when it is a directory it becomes opaque, which hides the lower one the same way.
    fn overlay_whiteout(
        &mut self,
        raw: &[u8],
        parent: &[OsString],
        name: &OsStr,
        rel: PathBuf,
    ) -> Result<(), ImageError> {
        let dir = self.walk_creating(raw, parent)?;
        self.cached_parent = None;
        if self.touched.contains(&rel) {
            if let Ok(st) = self.fs.stat(&dir, name) {
                if st.kind == NodeKind::Dir {
                    self.opaque.insert(rel);
                }
            }
            return Ok(());
        }
        self.clear(&dir, name, &rel, false)?;
        self.dir_times.retain(|p, _| !p.starts_with(&rel));
        self.opaque.retain(|p| !p.starts_with(&rel));
        self.whiteouts.retain(|p| !p.starts_with(&rel));
        self.whiteouts.insert(rel);
        Ok(())
    }

    fn opaque(&mut self, raw: &[u8], dir: &[OsString]) -> Result<(), ImageError> {
        let rel_dir = join(dir);
        let fd = self.walk_creating(raw, dir)?;
        if self.overlay {
            self.opaque.insert(rel_dir.clone());
            self.whiteouts
                .retain(|p| !p.starts_with(&rel_dir) || p == &rel_dir);
        }
        self.mark_touched(&rel_dir);
        self.cached_parent = None;
        let listing = self
            .fs
            .list(&fd)
            .map_err(|e| self.io_err("list", &rel_dir, errno_io(e)))?;
        let mut doomed = Vec::new();
        for n in listing {
            let child = rel_dir.join(&n);
            if !self.touched.contains(&child) {
                doomed.push((n, child));
            }
        }
        for (n, child) in doomed {
            self.fs
                .remove(&fd, &n)
                .map_err(|e| self.io_err("remove", &child, e))?;
            self.dir_times.retain(|p, _| !p.starts_with(&child));
        }
        Ok(())
    }
}

/// The host backend: a directory of the host's file system, every call relative to
/// a directory descriptor (see the module docs for why).
pub struct HostFs {
    root: OwnedFd,
    root_path: PathBuf,
    /// Memory staging: file bytes this tree may hold, and xattrs must be kept.
    staging_cap: Option<u64>,
}

fn host_stat(st: &rfs::Stat) -> Stat {
    let kind = match rfs::FileType::from_raw_mode(st.st_mode) {
        rfs::FileType::Directory => NodeKind::Dir,
        rfs::FileType::Symlink => NodeKind::Symlink,
        _ => NodeKind::Other,
    };
    Stat {
        kind,
        id: (st.st_dev, st.st_ino),
    }
}

impl Backend for HostFs {
    type Handle = OwnedFd;

    fn describe(&self, rel: &Path) -> PathBuf {
        self.root_path.join(rel)
    }

    fn open_root(&self) -> Result<OwnedFd, Errno> {
        rfs::openat(&self.root, ".", dir_flags(), Mode::empty())
    }

    fn dup(&self, h: &OwnedFd) -> io::Result<OwnedFd> {
        h.try_clone()
    }

    fn open_dir(&self, dir: &OwnedFd, name: &OsStr) -> Result<OwnedFd, Errno> {
        rfs::openat(dir, name, dir_flags(), Mode::empty())
    }

    fn stat(&self, dir: &OwnedFd, name: &OsStr) -> Result<Stat, Errno> {
        rfs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW).map(|st| host_stat(&st))
    }

    fn mkdir(&mut self, dir: &OwnedFd, name: &OsStr, mode: u32) -> Result<(), Errno> {
        rfs::mkdirat(dir, name, Mode::from_raw_mode(mode))
    }

    fn chmod_dir(&mut self, d: &OwnedFd, mode: u32) -> Result<(), Errno> {
        rfs::fchmod(d, Mode::from_raw_mode(mode))
    }

    fn remove(&mut self, dir: &OwnedFd, name: &OsStr) -> io::Result<()> {
        remove_tree_at(dir, name, 0)
    }

    fn list(&self, dir: &OwnedFd) -> Result<Vec<OsString>, Errno> {
        let mut names = Vec::new();
        for ent in rfs::Dir::read_from(dir)? {
            let ent = ent?;
            let n = ent.file_name().to_bytes();
            if n != b"." && n != b".." {
                names.push(OsStr::from_bytes(n).to_os_string());
            }
        }
        Ok(names)
    }

    fn write_file(
        &mut self,
        dir: &OwnedFd,
        name: &OsStr,
        data: &mut dyn Read,
        _size: u64,
    ) -> Result<(OwnedFd, u64), FsError> {
        let fd = rfs::openat(
            dir,
            name,
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )
        .map_err(|e| FsError::Io("create", errno_io(e)))?;
        let mut file = std::fs::File::from(fd);
        // The tar entry reader stops at the entry's size by itself.
        let n = io::copy(data, &mut file).map_err(|e| {
            if super::error::is_enospc(&e) {
                FsError::Io("write", e)
            } else {
                FsError::Layer(e)
            }
        })?;
        Ok((OwnedFd::from(file), n))
    }

    fn set_meta(
        &mut self,
        fd: &OwnedFd,
        rel: &Path,
        meta: &Meta,
        xattrs: &[(OsString, Vec<u8>)],
    ) -> Result<(), FsError> {
        rfs::fchown(fd, Some(uid(meta.uid)), Some(gid(meta.gid)))
            .map_err(|e| FsError::Io("chown", errno_io(e)))?;
        // After chown: chown clears set-id bits.
        rfs::fchmod(fd, Mode::from_raw_mode(meta.mode))
            .map_err(|e| FsError::Io("chmod", errno_io(e)))?;
        for (k, v) in xattrs {
            match rfs::fsetxattr(fd, k.as_os_str(), v, rfs::XattrFlags::empty()) {
                Ok(()) => {}
                // The build dir's file system may not take every namespace; the image
                // still runs, so this is logged, not fatal.
                Err(Errno::OPNOTSUPP) | Err(Errno::PERM) | Err(Errno::INVAL)
                    if self.staging_cap.is_some() =>
                {
                    return Err(FsError::StagingFull(format!("xattr {k:?} not supported")));
                }
                Err(Errno::OPNOTSUPP) | Err(Errno::PERM) | Err(Errno::INVAL) => {
                    tracing::warn!(path = %rel.display(), xattr = ?k, "xattr not supported by the build file system; dropped");
                }
                Err(e) => return Err(FsError::Io("set xattr on", errno_io(e))),
            }
        }
        rfs::futimens(fd, &times(meta.mtime)).map_err(|e| FsError::Io("set times of", errno_io(e)))
    }

    fn symlink(&mut self, dir: &OwnedFd, name: &OsStr, target: &[u8]) -> Result<(), Errno> {
        rfs::symlinkat(OsStr::from_bytes(target), dir, name)
    }

    fn mkfifo(&mut self, dir: &OwnedFd, name: &OsStr) -> Result<(), Errno> {
        rfs::mknodat(
            dir,
            name,
            rfs::FileType::Fifo,
            Mode::from_raw_mode(0o600),
            0,
        )
    }

    fn set_meta_at(
        &mut self,
        dir: &OwnedFd,
        name: &OsStr,
        meta: &Meta,
        chmod: bool,
    ) -> Result<(), FsError> {
        rfs::chownat(
            dir,
            name,
            Some(uid(meta.uid)),
            Some(gid(meta.gid)),
            AtFlags::SYMLINK_NOFOLLOW,
        )
        .map_err(|e| FsError::Io("chown", errno_io(e)))?;
        if chmod {
            // Only for FIFOs: fchmodat does not follow a non-symlink final component.
            rfs::chmodat(dir, name, Mode::from_raw_mode(meta.mode), AtFlags::empty())
                .map_err(|e| FsError::Io("chmod", errno_io(e)))?;
        }
        rfs::utimensat(dir, name, &times(meta.mtime), AtFlags::SYMLINK_NOFOLLOW)
            .map_err(|e| FsError::Io("set times of", errno_io(e)))
    }

    fn hard_link(
        &mut self,
        tdir: &OwnedFd,
        tname: &OsStr,
        dir: &OwnedFd,
        name: &OsStr,
    ) -> Result<(), Errno> {
        rfs::linkat(tdir, tname, dir, name, AtFlags::empty())
    }

    fn set_dir_mtime(&mut self, d: &OwnedFd, mtime: i64) {
        let _ = rfs::futimens(d, &times(mtime));
    }

    fn finish_root(&mut self) {
        let _ = rfs::fchmod(&self.root, Mode::from_raw_mode(0o755));
        let _ = rfs::futimens(&self.root, &times(FIXED_MTIME));
    }

    fn staging_cap(&self) -> Option<u64> {
        self.staging_cap
    }
}

/// The memory backend: metadata in an [`FsTree`], file bytes in a [`DataSink`].
/// It answers with the errnos the host would give for the same tree, so the rules
/// take the same decisions.
pub struct MemFs<S> {
    tree: FsTree,
    sink: S,
}

/// Longest name in a directory, as on the host (and in ext4).
const NAME_MAX: usize = 255;

/// Longest symlink target, as on the host (`PATH_MAX` with its NUL).
const SYMLINK_MAX: usize = 4095;

fn mem_name(name: &OsStr) -> Result<&[u8], Errno> {
    if name.len() > NAME_MAX {
        Err(Errno::NAMETOOLONG)
    } else {
        Ok(name.as_bytes())
    }
}

fn mem_lookup(tree: &FsTree, dir: InodeId, name: &OsStr) -> Result<InodeId, Errno> {
    let name = mem_name(name)?;
    match tree.entries(dir) {
        None => Err(Errno::NOTDIR),
        Some(e) => e.get(name).copied().ok_or(Errno::NOENT),
    }
}

fn mem_open_dir(tree: &FsTree, dir: InodeId, name: &OsStr) -> Result<InodeId, Errno> {
    let id = mem_lookup(tree, dir, name)?;
    match tree.get(id).kind {
        Kind::Dir(_) => Ok(id),
        // What `O_NOFOLLOW | O_DIRECTORY` gives on the host.
        Kind::Symlink(_) => Err(Errno::LOOP),
        _ => Err(Errno::NOTDIR),
    }
}

/// Walks existing directories from the root, never following symlinks.
fn mem_walk(tree: &FsTree, comps: &[OsString]) -> Result<InodeId, Errno> {
    let mut cur = ROOT;
    for c in comps {
        cur = mem_open_dir(tree, cur, c)?;
    }
    Ok(cur)
}

impl<S> MemFs<S> {
    /// Links a new inode as `name` in `dir`, which must not exist there.
    fn create(&mut self, dir: InodeId, name: &OsStr, inode: Inode) -> Result<InodeId, Errno> {
        match mem_lookup(&self.tree, dir, name) {
            Err(Errno::NOENT) => {}
            Ok(_) => return Err(Errno::EXIST),
            Err(e) => return Err(e),
        }
        let id = self.tree.add(inode);
        if !self.tree.link(dir, name.as_bytes(), id) {
            return Err(Errno::NOTDIR);
        }
        Ok(id)
    }
}

/// Remembers whether the layer stream failed, to tell its errors from the sink's.
struct TrackRead<'a> {
    inner: &'a mut dyn Read,
    failed: bool,
}

impl Read for TrackRead<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let r = self.inner.read(buf);
        if r.is_err() {
            self.failed = true;
        }
        r
    }
}

impl<S: DataSink> Backend for MemFs<S> {
    type Handle = InodeId;

    fn describe(&self, rel: &Path) -> PathBuf {
        Path::new("/").join(rel)
    }

    fn open_root(&self) -> Result<InodeId, Errno> {
        Ok(ROOT)
    }

    fn dup(&self, h: &InodeId) -> io::Result<InodeId> {
        Ok(*h)
    }

    fn open_dir(&self, dir: &InodeId, name: &OsStr) -> Result<InodeId, Errno> {
        mem_open_dir(&self.tree, *dir, name)
    }

    fn stat(&self, dir: &InodeId, name: &OsStr) -> Result<Stat, Errno> {
        let id = mem_lookup(&self.tree, *dir, name)?;
        let kind = match self.tree.get(id).kind {
            Kind::Dir(_) => NodeKind::Dir,
            Kind::Symlink(_) => NodeKind::Symlink,
            _ => NodeKind::Other,
        };
        Ok(Stat {
            kind,
            id: (0, id as u64),
        })
    }

    fn mkdir(&mut self, dir: &InodeId, name: &OsStr, mode: u32) -> Result<(), Errno> {
        // The time is what the unpacker records for it; it sets it again at finish.
        let inode = Inode::new(
            Kind::Dir(Default::default()),
            (mode & 0o7777) as u16,
            FIXED_MTIME,
        );
        self.create(*dir, name, inode).map(|_| ())
    }

    fn chmod_dir(&mut self, d: &InodeId, mode: u32) -> Result<(), Errno> {
        self.tree.get_mut(*d).mode = (mode & 0o7777) as u16;
        Ok(())
    }

    fn remove(&mut self, dir: &InodeId, name: &OsStr) -> io::Result<()> {
        // The subtree becomes unreachable; its file bytes stay in the data area.
        self.tree.unlink(*dir, name.as_bytes());
        Ok(())
    }

    fn list(&self, dir: &InodeId) -> Result<Vec<OsString>, Errno> {
        let e = self.tree.entries(*dir).ok_or(Errno::NOTDIR)?;
        Ok(e.keys().map(|k| OsString::from_vec(k.clone())).collect())
    }

    fn write_file(
        &mut self,
        dir: &InodeId,
        name: &OsStr,
        data: &mut dyn Read,
        size: u64,
    ) -> Result<(InodeId, u64), FsError> {
        let errno = |e: Errno| FsError::Io("create", errno_io(e));
        // Checked before any byte goes to the data area, as the host creates the
        // file before writing it.
        match mem_lookup(&self.tree, *dir, name) {
            Err(Errno::NOENT) => {}
            Ok(_) => return Err(errno(Errno::EXIST)),
            Err(e) => return Err(errno(e)),
        }
        let mut track = TrackRead {
            inner: data,
            failed: false,
        };
        let data = self.sink.write_data(&mut track, size).map_err(|e| {
            if track.failed || e.kind() == io::ErrorKind::UnexpectedEof {
                FsError::Layer(e)
            } else {
                // ENOSPC or any other failure of the data area: the disk's.
                FsError::Io("write", e)
            }
        })?;
        let id = self
            .create(*dir, name, Inode::new(Kind::File(data), 0o600, FIXED_MTIME))
            .map_err(errno)?;
        Ok((id, size))
    }

    fn set_meta(
        &mut self,
        h: &InodeId,
        _rel: &Path,
        meta: &Meta,
        xattrs: &[(OsString, Vec<u8>)],
    ) -> Result<(), FsError> {
        let node = self.tree.get_mut(*h);
        node.uid = meta.uid;
        node.gid = meta.gid;
        node.mode = (meta.mode & 0o7777) as u16;
        for (k, v) in xattrs {
            node.xattrs.insert(k.as_bytes().to_vec(), v.clone());
        }
        node.mtime = meta.mtime;
        Ok(())
    }

    fn symlink(&mut self, dir: &InodeId, name: &OsStr, target: &[u8]) -> Result<(), Errno> {
        if target.len() > SYMLINK_MAX {
            return Err(Errno::NAMETOOLONG);
        }
        // Symlinks are 0777 on Linux; their mode is never set.
        let inode = Inode::new(Kind::Symlink(target.to_vec()), 0o777, FIXED_MTIME);
        self.create(*dir, name, inode).map(|_| ())
    }

    fn mkfifo(&mut self, dir: &InodeId, name: &OsStr) -> Result<(), Errno> {
        self.create(*dir, name, Inode::new(Kind::Fifo, 0o600, FIXED_MTIME))
            .map(|_| ())
    }

    fn set_meta_at(
        &mut self,
        dir: &InodeId,
        name: &OsStr,
        meta: &Meta,
        chmod: bool,
    ) -> Result<(), FsError> {
        let id =
            mem_lookup(&self.tree, *dir, name).map_err(|e| FsError::Io("chown", errno_io(e)))?;
        let node = self.tree.get_mut(id);
        node.uid = meta.uid;
        node.gid = meta.gid;
        if chmod {
            node.mode = (meta.mode & 0o7777) as u16;
        }
        node.mtime = meta.mtime;
        Ok(())
    }

    fn hard_link(
        &mut self,
        tdir: &InodeId,
        tname: &OsStr,
        dir: &InodeId,
        name: &OsStr,
    ) -> Result<(), Errno> {
        let target = mem_lookup(&self.tree, *tdir, tname)?;
        if self.tree.get(target).is_dir() {
            return Err(Errno::PERM);
        }
        match mem_lookup(&self.tree, *dir, name) {
            Err(Errno::NOENT) => {}
            Ok(_) => return Err(Errno::EXIST),
            Err(e) => return Err(e),
        }
        if self.tree.link(*dir, name.as_bytes(), target) {
            Ok(())
        } else {
            Err(Errno::NOTDIR)
        }
    }

    fn set_dir_mtime(&mut self, d: &InodeId, mtime: i64) {
        self.tree.get_mut(*d).mtime = mtime;
    }

    fn finish_root(&mut self) {
        let root = self.tree.get_mut(ROOT);
        root.mode = 0o755;
        root.mtime = FIXED_MTIME;
    }
}

fn id32(v: io::Result<u64>) -> Option<u32> {
    v.ok()
        .and_then(|v| u32::try_from(v).ok())
        .filter(|v| *v != u32::MAX)
}

fn uid(v: u32) -> rfs::Uid {
    rfs::Uid::from_raw(v)
}

fn gid(v: u32) -> rfs::Gid {
    rfs::Gid::from_raw(v)
}

fn dir_flags() -> OFlags {
    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC
}

fn times(mtime: i64) -> Timestamps {
    let t = Timespec {
        tv_sec: mtime,
        tv_nsec: 0,
    };
    Timestamps {
        last_access: t,
        last_modification: t,
    }
}

/// Extension headers seen since the last real entry; they describe the next one.
#[derive(Debug, Default)]
struct Extensions {
    long_name: Option<Vec<u8>>,
    long_link: Option<Vec<u8>>,
    pax: Option<Vec<u8>>,
}

impl Extensions {
    fn is_empty(&self) -> bool {
        self.long_name.is_none() && self.long_link.is_none() && self.pax.is_none()
    }
}

/// The PAX records this unpacker honours (the ones the tar crate applied before).
#[derive(Debug, Default)]
struct Pax {
    path: Option<Vec<u8>>,
    linkpath: Option<Vec<u8>>,
    size: Option<u64>,
    uid: Option<u64>,
    gid: Option<u64>,
    xattrs: Vec<(OsString, Vec<u8>)>,
}

/// Parses a (size-capped) PAX body. Malformed records refuse the entry.
fn parse_pax(body: &[u8]) -> Result<Pax, String> {
    let mut pax = Pax::default();
    let num = |key: &str, v: &[u8]| -> Result<u64, String> {
        std::str::from_utf8(v)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("bad PAX {key} record"))
    };
    for rec in tar::PaxExtensions::new(body) {
        let rec = rec.map_err(|e| format!("bad PAX record: {e}"))?;
        let v = rec.value_bytes();
        match rec.key_bytes() {
            b"path" => pax.path = Some(v.to_vec()),
            b"linkpath" => pax.linkpath = Some(v.to_vec()),
            b"size" => pax.size = Some(num("size", v)?),
            b"uid" => pax.uid = Some(num("uid", v)?),
            b"gid" => pax.gid = Some(num("gid", v)?),
            k => {
                if let Some(name) = k.strip_prefix(b"SCHILY.xattr.") {
                    if !name.is_empty() && !name.contains(&0) {
                        pax.xattrs
                            .push((OsString::from_vec(name.to_vec()), v.to_vec()));
                    }
                }
            }
        }
    }
    Ok(pax)
}

/// A GNU long name/link body ends with a NUL (GNU tar writes one).
fn strip_nul(mut v: Vec<u8>) -> Vec<u8> {
    if v.last() == Some(&0) {
        v.pop();
    }
    v
}

/// Removes `name` in `dir` and, if it is a directory, everything below it, never
/// following symlinks (each level is opened with `O_NOFOLLOW`).
fn remove_tree_at(dir: &OwnedFd, name: &OsStr, depth: usize) -> io::Result<()> {
    if depth > MAX_DEPTH * 2 {
        return Err(io::Error::other("directory nesting too deep to remove"));
    }
    match rfs::unlinkat(dir, name, AtFlags::empty()) {
        Ok(()) => return Ok(()),
        Err(Errno::ISDIR) | Err(Errno::PERM) => {}
        Err(Errno::NOENT) => return Ok(()),
        Err(e) => return Err(errno_io(e)),
    }
    let sub = rfs::openat(dir, name, dir_flags(), Mode::empty()).map_err(errno_io)?;
    let mut names = Vec::new();
    for ent in rfs::Dir::read_from(&sub).map_err(errno_io)? {
        let ent = ent.map_err(errno_io)?;
        let n = ent.file_name().to_bytes();
        if n != b"." && n != b".." {
            names.push(OsStr::from_bytes(n).to_os_string());
        }
    }
    for n in names {
        remove_tree_at(&sub, &n, depth + 1)?;
    }
    rfs::unlinkat(dir, name, AtFlags::REMOVEDIR).map_err(errno_io)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(v: &[&str]) -> Vec<OsString> {
        v.iter().map(OsString::from).collect()
    }

    #[test]
    fn plain_paths_split_into_parent_and_name() {
        assert_eq!(
            classify_path(b"./usr/bin/env").unwrap(),
            EntryPath::Normal {
                parent: os(&["usr", "bin"]),
                name: "env".into()
            }
        );
        assert_eq!(
            classify_path(b"etc//passwd").unwrap(),
            EntryPath::Normal {
                parent: os(&["etc"]),
                name: "passwd".into()
            }
        );
        assert_eq!(
            classify_path(b"etc/").unwrap(),
            EntryPath::Normal {
                parent: vec![],
                name: "etc".into()
            }
        );
    }

    #[test]
    fn root_entries_are_recognised() {
        assert_eq!(classify_path(b"./").unwrap(), EntryPath::Root);
        assert_eq!(classify_path(b".").unwrap(), EntryPath::Root);
    }

    #[test]
    fn absolute_paths_are_refused() {
        assert_eq!(classify_path(b"/etc/passwd"), Err("absolute path"));
        assert_eq!(classify_path(b"//x"), Err("absolute path"));
    }

    #[test]
    fn dotdot_anywhere_is_refused() {
        assert_eq!(classify_path(b"../x"), Err("`..` component"));
        assert_eq!(classify_path(b"a/../../x"), Err("`..` component"));
        assert_eq!(classify_path(b"a/.."), Err("`..` component"));
        // A name that merely contains dots is fine.
        assert!(classify_path(b"a/..b").is_ok());
        assert!(classify_path(b"a/...").is_ok());
    }

    #[test]
    fn nul_empty_long_and_deep_paths_are_refused() {
        assert!(classify_path(b"").is_err());
        assert!(classify_path(b"a\0b").is_err());
        assert!(classify_path(&vec![b'a'; MAX_PATH_BYTES + 1]).is_err());
        let deep = "a/".repeat(MAX_DEPTH + 1);
        assert_eq!(classify_path(deep.as_bytes()), Err("path too deep"));
    }

    #[test]
    fn whiteouts_name_the_hidden_entry() {
        assert_eq!(
            classify_path(b"etc/.wh.motd").unwrap(),
            EntryPath::Whiteout {
                parent: os(&["etc"]),
                name: "motd".into()
            }
        );
        assert_eq!(
            classify_path(b".wh.tmp").unwrap(),
            EntryPath::Whiteout {
                parent: vec![],
                name: "tmp".into()
            }
        );
        assert!(classify_path(b"a/.wh.").is_err());
        assert!(classify_path(b"a/.wh...").is_err());
        assert!(
            classify_path(b"a/.wh./b").is_ok(),
            ".wh. as a parent is a plain name"
        );
    }

    #[test]
    fn opaque_markers_name_their_directory() {
        assert_eq!(
            classify_path(b"var/cache/.wh..wh..opq").unwrap(),
            EntryPath::Opaque {
                dir: os(&["var", "cache"])
            }
        );
        assert_eq!(
            classify_path(b".wh..wh..opq").unwrap(),
            EntryPath::Opaque { dir: vec![] }
        );
        assert_eq!(
            classify_path(b"x/.wh..wh.plnk").unwrap(),
            EntryPath::Ignored
        );
    }

    #[test]
    fn media_types_choose_the_decoder() {
        assert_eq!(
            Compression::from_media_type("application/vnd.oci.image.layer.v1.tar+zstd"),
            Some(Compression::Zstd)
        );
        assert_eq!(
            Compression::from_media_type("application/vnd.docker.image.rootfs.diff.tar.gzip"),
            Some(Compression::Gzip)
        );
        assert_eq!(Compression::from_media_type("application/json"), None);
    }

    // ----- applying layers to a real directory -----

    use super::super::testtar::{Layer, TarEntry};
    use std::os::unix::fs::MetadataExt;

    /// Unpacks `layers` into a host tree, and checks that the memory backend gives
    /// the same result (see [`check_memory`]).
    fn unpack(layers: &[Vec<u8>]) -> (tempfile::TempDir, Result<UnpackStats, ImageError>) {
        let dir = tempfile::tempdir().unwrap();
        let tree = dir.path().join("tree");
        std::fs::create_dir(&tree).unwrap();
        let res = (|| {
            let mut u = Unpacker::new(&tree, u64::MAX)?;
            for (i, l) in layers.iter().enumerate() {
                u.apply_layer(&l[..], Compression::None, &format!("#{i}"))?;
            }
            u.finish_with_marks()
        })();
        check_memory(&tree, false, &res, layers);
        (dir, res.map(|(stats, _)| stats))
    }

    /// Nothing was written next to the host tree. The memory backend has no
    /// outside: it can only link inodes into its own tree, so there is nothing to
    /// check for it (its tree is compared with the host's by [`check_memory`]).
    fn outside_is_untouched(dir: &tempfile::TempDir) {
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(
            names,
            vec![OsString::from("tree")],
            "something landed outside the tree"
        );
    }

    // ----- both backends: the same rules must give the same tree -----

    use super::super::fstree::{DataRef, MemSink};
    use std::collections::BTreeMap;

    /// One entry of a rendered tree.
    #[derive(Debug, Clone, PartialEq, Eq)]
    struct Row {
        kind: String,
        mode: u32,
        uid: u32,
        gid: u32,
        mtime: i64,
        /// File bytes or symlink target.
        content: Vec<u8>,
        xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
        /// The first path (sorted) of the inode when it has several names.
        same_as: Option<PathBuf>,
    }

    /// A tree rendered for comparison, by path ("." is the root).
    type Listing = BTreeMap<PathBuf, Row>;

    /// Fills `same_as` from the inode identity of every non-directory.
    fn mark_shared<K: Ord>(rows: &mut Listing, ids: Vec<(PathBuf, K)>) {
        let mut groups: BTreeMap<K, Vec<PathBuf>> = BTreeMap::new();
        for (p, k) in ids {
            groups.entry(k).or_default().push(p);
        }
        for paths in groups.values().filter(|v| v.len() > 1) {
            let first = paths.iter().min().cloned();
            for p in paths {
                if let Some(r) = rows.get_mut(p) {
                    r.same_as = first.clone();
                }
            }
        }
    }

    fn host_listing(root: &Path) -> Listing {
        use std::os::unix::fs::FileTypeExt;
        let mut rows = Listing::new();
        let mut ids = Vec::new();
        let mut todo = vec![PathBuf::from(".")];
        while let Some(rel) = todo.pop() {
            let path = root.join(&rel);
            let m = std::fs::symlink_metadata(&path).unwrap();
            let ft = m.file_type();
            let (kind, content) = if ft.is_dir() {
                for e in std::fs::read_dir(&path).unwrap() {
                    todo.push(rel.join(e.unwrap().file_name()));
                }
                ("dir".to_string(), vec![])
            } else if ft.is_symlink() {
                let t = std::fs::read_link(&path).unwrap();
                ("symlink".into(), t.into_os_string().into_vec())
            } else if ft.is_file() {
                ("file".into(), std::fs::read(&path).unwrap())
            } else if ft.is_fifo() {
                ("fifo".into(), vec![])
            } else {
                (format!("other {:o}", m.mode()), vec![])
            };
            if !ft.is_dir() {
                ids.push((rel.clone(), (m.dev(), m.ino())));
            }
            let mut xattrs = BTreeMap::new();
            let mut names = [0u8; 4096];
            let n = rfs::llistxattr(&path, &mut names[..]).unwrap_or(0);
            for name in names[..n].split(|b| *b == 0).filter(|n| !n.is_empty()) {
                let mut v = [0u8; 4096];
                let k = OsStr::from_bytes(name);
                let len = rfs::lgetxattr(&path, k, &mut v[..]).unwrap();
                xattrs.insert(name.to_vec(), v[..len].to_vec());
            }
            let row = Row {
                kind,
                mode: m.mode() & 0o7777,
                uid: m.uid(),
                gid: m.gid(),
                mtime: m.mtime(),
                content,
                xattrs,
                same_as: None,
            };
            rows.insert(rel, row);
        }
        mark_shared(&mut rows, ids);
        rows
    }

    /// The host tree as the disk builder finishes it: the marks written in.
    fn with_marks(mut rows: Listing, marks: &OverlayMarks) -> Listing {
        for w in &marks.whiteouts {
            let row = Row {
                kind: "chardev 0:0".into(),
                mode: 0,
                uid: 0,
                gid: 0,
                mtime: WHITEOUT_MTIME,
                content: vec![],
                xattrs: BTreeMap::new(),
                same_as: None,
            };
            rows.insert(Path::new(".").join(w), row);
        }
        for o in &marks.opaque {
            let key = Path::new(".").join(o);
            rows.get_mut(&key)
                .expect("opaque mark on a missing directory")
                .xattrs
                .insert(b"trusted.overlay.opaque".to_vec(), b"y".to_vec());
        }
        rows
    }

    fn mem_listing(tree: &FsTree, sink: &MemSink) -> Listing {
        let mut rows = Listing::new();
        let mut ids = Vec::new();
        let mut todo = vec![(PathBuf::from("."), ROOT)];
        while let Some((rel, id)) = todo.pop() {
            let node = tree.get(id);
            let (kind, content) = match &node.kind {
                Kind::Dir(entries) => {
                    for (n, c) in entries {
                        todo.push((key_join(&rel, n), *c));
                    }
                    ("dir".to_string(), vec![])
                }
                Kind::File(d) => (
                    "file".into(),
                    d.map(|d| sink.read(d).to_vec()).unwrap_or_default(),
                ),
                Kind::Symlink(t) => ("symlink".into(), t.clone()),
                Kind::Fifo => ("fifo".into(), vec![]),
                Kind::CharDev { major, minor } => (format!("chardev {major}:{minor}"), vec![]),
            };
            let key = rel;
            if !node.is_dir() {
                ids.push((key.clone(), id));
            }
            rows.insert(
                key,
                Row {
                    kind,
                    mode: u32::from(node.mode),
                    uid: node.uid,
                    gid: node.gid,
                    mtime: node.mtime,
                    content,
                    xattrs: node.xattrs.clone(),
                    same_as: None,
                },
            );
        }
        mark_shared(&mut rows, ids);
        rows
    }

    fn key_join(rel: &Path, n: &[u8]) -> PathBuf {
        rel.join(OsStr::from_bytes(n))
    }

    /// What must match when both backends refuse: the variant, and the limit's key
    /// or the message when it names no host path.
    #[derive(Debug, PartialEq, Eq)]
    enum Failure {
        Limit(&'static str),
        Message(String),
        Variant(std::mem::Discriminant<ImageError>),
    }

    fn failure(e: &ImageError) -> Failure {
        match e {
            ImageError::LimitExceeded { limit, .. } => Failure::Limit(limit),
            ImageError::UnsafeEntry { .. } | ImageError::HardLinkAcrossLayers { .. } => {
                Failure::Message(e.to_string())
            }
            _ => Failure::Variant(std::mem::discriminant(e)),
        }
    }

    type Outcome = Result<(Listing, UnpackStats, OverlayMarks), Failure>;

    fn host_outcome(tree: &Path, res: &Result<(UnpackStats, OverlayMarks), ImageError>) -> Outcome {
        match res {
            Ok((stats, marks)) => Ok((
                with_marks(host_listing(tree), marks),
                stats.clone(),
                marks.clone(),
            )),
            Err(e) => Err(failure(e)),
        }
    }

    /// Unpacks `layers` into memory, as [`unpack`] and [`unpack_overlay`] do on disk.
    fn mem_unpack(limits: UnpackLimits, overlay: bool, layers: Vec<Box<dyn Read>>) -> Outcome {
        let mut sink = MemSink::default();
        let res = (|| {
            let mut u = MemUnpacker::in_memory(limits, &mut sink);
            if overlay {
                u = u.overlay_format();
            }
            for (i, l) in layers.into_iter().enumerate() {
                u.apply_layer(l, Compression::None, &format!("#{i}"))?;
            }
            u.finish_with_marks()
                .map(|(tree, _, stats, marks)| (tree, stats, marks))
        })();
        match res {
            Ok((tree, stats, marks)) => Ok((mem_listing(&tree, &sink), stats, marks)),
            Err(e) => Err(failure(&e)),
        }
    }

    fn boxed(layers: &[Vec<u8>]) -> Vec<Box<dyn Read>> {
        layers
            .iter()
            .map(|l| Box::new(io::Cursor::new(l.clone())) as Box<dyn Read>)
            .collect()
    }

    /// Runs `layers` through the memory backend and checks that it gives the host's
    /// result `host` (tree at `tree`): the same listing, counters and marks, or the
    /// same refusal.
    fn check_memory(
        tree: &Path,
        overlay: bool,
        host: &Result<(UnpackStats, OverlayMarks), ImageError>,
        layers: &[Vec<u8>],
    ) {
        let host = host_outcome(tree, host);
        let mem = mem_unpack(UnpackLimits::new(u64::MAX), overlay, boxed(layers));
        assert_eq!(host, mem, "host (left) and memory (right) differ");
    }

    #[test]
    fn files_keep_mode_owner_and_mtime() {
        let l = Layer::new()
            .dir("bin", 0o755)
            .entry(
                TarEntry::file("bin/tool", b"#!/bin/sh\n", 0o4755)
                    .owner(1000, 1001)
                    .mtime(12345),
            )
            .tar();
        let (dir, res) = unpack(&[l]);
        res.unwrap();
        let m = std::fs::symlink_metadata(dir.path().join("tree/bin/tool")).unwrap();
        assert_eq!(m.mode() & 0o7777, 0o4755);
        assert_eq!((m.uid(), m.gid()), (1000, 1001));
        assert_eq!(m.mtime(), 12345);
    }

    #[test]
    fn whiteout_removes_lower_layer_entry_only() {
        let l1 = Layer::new()
            .file("etc/motd", b"hi")
            .file("etc/keep", b"k")
            .tar();
        let l2 = Layer::new().whiteout("etc/motd").tar();
        let (dir, res) = unpack(&[l1, l2]);
        res.unwrap();
        assert!(!dir.path().join("tree/etc/motd").exists());
        assert!(dir.path().join("tree/etc/keep").exists());
    }

    #[test]
    fn whiteout_of_a_directory_removes_its_subtree() {
        let l1 = Layer::new().file("opt/app/a/b", b"x").tar();
        let l2 = Layer::new().whiteout("opt/app").tar();
        let (dir, res) = unpack(&[l1, l2]);
        res.unwrap();
        assert!(!dir.path().join("tree/opt/app").exists());
        assert!(dir.path().join("tree/opt").is_dir());
    }

    #[test]
    fn whiteout_does_not_hide_same_layer_entry() {
        let l1 = Layer::new().file("a", b"old").tar();
        let l2 = Layer::new().file("a", b"new").whiteout("a").tar();
        let (dir, res) = unpack(&[l1, l2]);
        res.unwrap();
        assert_eq!(std::fs::read(dir.path().join("tree/a")).unwrap(), b"new");
    }

    #[test]
    fn opaque_dir_hides_lower_children_but_keeps_its_own() {
        let l1 = Layer::new()
            .file("var/lib/old1", b"1")
            .file("var/lib/sub/old2", b"2")
            .tar();
        // Marker after a same-layer child: order inside a layer must not matter.
        let l2 = Layer::new()
            .file("var/lib/new", b"n")
            .opaque("var/lib")
            .tar();
        let (dir, res) = unpack(&[l1, l2]);
        res.unwrap();
        let t = dir.path().join("tree/var/lib");
        assert!(!t.join("old1").exists());
        assert!(!t.join("sub").exists());
        assert!(t.join("new").exists());
    }

    #[test]
    fn whiteout_through_symlink_is_refused_and_target_survives() {
        let dir0 = tempfile::tempdir().unwrap();
        let victim = dir0.path().join("victim");
        std::fs::write(&victim, b"v").unwrap();
        let l1 = Layer::new()
            .symlink("link", dir0.path().to_str().unwrap())
            .tar();
        let l2 = Layer::new().whiteout("link/victim").tar();
        let (dir, res) = unpack(&[l1, l2]);
        assert!(
            matches!(res, Err(ImageError::UnsafeEntry { .. })),
            "{res:?}"
        );
        assert!(victim.exists());
        outside_is_untouched(&dir);
    }

    #[test]
    fn write_through_symlink_planted_by_an_earlier_layer_is_refused() {
        let l1 = Layer::new().symlink("etc", "/tmp").tar();
        let l2 = Layer::new().file("etc/evil", b"x").tar();
        let (dir, res) = unpack(&[l1, l2]);
        let err = res.unwrap_err();
        assert!(err.to_string().contains("is a symlink"), "{err}");
        assert!(!Path::new("/tmp/evil").exists());
        outside_is_untouched(&dir);
    }

    #[test]
    fn write_through_relative_symlink_in_same_layer_is_refused() {
        let l = Layer::new()
            .symlink("a", "../../..")
            .file("a/escaped", b"x")
            .tar();
        let (dir, res) = unpack(&[l]);
        assert!(matches!(res, Err(ImageError::UnsafeEntry { .. })));
        outside_is_untouched(&dir);
    }

    #[test]
    fn file_replacing_a_symlink_replaces_the_link_not_its_target() {
        let dir0 = tempfile::tempdir().unwrap();
        let victim = dir0.path().join("victim");
        std::fs::write(&victim, b"original").unwrap();
        let l1 = Layer::new().symlink("f", victim.to_str().unwrap()).tar();
        let l2 = Layer::new().file("f", b"new").tar();
        let (dir, res) = unpack(&[l1, l2]);
        res.unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"original");
        let f = dir.path().join("tree/f");
        assert!(std::fs::symlink_metadata(&f).unwrap().is_file());
    }

    #[test]
    fn dotdot_and_absolute_entries_refuse_the_layer() {
        for bad in [&b"../escape"[..], b"a/../../escape", b"/abs"] {
            let l = Layer::new().entry(TarEntry::file_raw_path(bad, b"x")).tar();
            let (dir, res) = unpack(&[l]);
            assert!(
                matches!(res, Err(ImageError::UnsafeEntry { .. })),
                "{bad:?}"
            );
            outside_is_untouched(&dir);
        }
    }

    #[test]
    fn hard_links_share_the_inode_and_stay_inside() {
        let l = Layer::new()
            .file("bin/busybox", b"elf")
            .hardlink("bin/sh", "bin/busybox")
            .tar();
        let (dir, res) = unpack(&[l]);
        res.unwrap();
        let a = std::fs::metadata(dir.path().join("tree/bin/busybox")).unwrap();
        let b = std::fs::metadata(dir.path().join("tree/bin/sh")).unwrap();
        assert_eq!(a.ino(), b.ino());
        assert_eq!(a.nlink(), 2);
    }

    #[test]
    fn hard_link_escapes_are_refused() {
        for target in ["../../etc/passwd", "/etc/passwd", "link/passwd", "missing"] {
            let l = Layer::new()
                .symlink("link", "/etc")
                .hardlink("x", target)
                .tar();
            let (dir, res) = unpack(&[l]);
            assert!(
                matches!(res, Err(ImageError::UnsafeEntry { .. })),
                "{target}: {res:?}"
            );
            outside_is_untouched(&dir);
        }
    }

    #[test]
    fn hard_link_to_a_symlink_links_the_symlink_itself() {
        let l = Layer::new()
            .symlink("s", "/etc/shadow")
            .hardlink("h", "s")
            .tar();
        let (dir, res) = unpack(&[l]);
        res.unwrap();
        let h = std::fs::symlink_metadata(dir.path().join("tree/h")).unwrap();
        assert!(h.file_type().is_symlink());
    }

    #[test]
    fn device_nodes_are_dropped_and_fifos_kept() {
        let l = Layer::new()
            .entry(TarEntry::device("dev/sda", tar::EntryType::Block))
            .entry(TarEntry::device("dev/null", tar::EntryType::Char))
            .entry(TarEntry::device("run/fifo", tar::EntryType::Fifo))
            .tar();
        let (dir, res) = unpack(&[l]);
        let stats = res.unwrap();
        assert_eq!(stats.devices_dropped, 2);
        assert!(!dir.path().join("tree/dev/sda").exists());
        assert!(!dir.path().join("tree/dev/null").exists());
        use std::os::unix::fs::FileTypeExt;
        assert!(std::fs::symlink_metadata(dir.path().join("tree/run/fifo"))
            .unwrap()
            .file_type()
            .is_fifo());
    }

    #[test]
    fn directory_replaces_file_and_file_replaces_directory() {
        let l1 = Layer::new().file("x", b"f").file("y/z", b"z").tar();
        let l2 = Layer::new().dir("x", 0o750).file("y", b"now a file").tar();
        let (dir, res) = unpack(&[l1, l2]);
        res.unwrap();
        assert!(dir.path().join("tree/x").is_dir());
        assert!(dir.path().join("tree/y").is_file());
    }

    #[test]
    fn directory_mtimes_survive_children_and_implicit_parents_get_fixed_time() {
        let l = Layer::new()
            .entry(TarEntry::dir("d", 0o755).mtime(777))
            .file("d/f", b"x")
            .file("implicit/g", b"y")
            .tar();
        let (dir, res) = unpack(&[l]);
        res.unwrap();
        let d = std::fs::metadata(dir.path().join("tree/d")).unwrap();
        assert_eq!(d.mtime(), 777);
        let i = std::fs::metadata(dir.path().join("tree/implicit")).unwrap();
        assert_eq!(i.mtime(), FIXED_MTIME);
    }

    /// Unpacks `layers` into one overlay-format tree, and checks the memory backend
    /// against it (with the marks written into both, see [`with_marks`]).
    fn unpack_overlay(
        layers: &[Vec<u8>],
    ) -> (
        tempfile::TempDir,
        Result<(UnpackStats, OverlayMarks), ImageError>,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let tree = dir.path().join("tree");
        std::fs::create_dir(&tree).unwrap();
        let res = (|| {
            let mut u = Unpacker::new(&tree, u64::MAX)?.overlay_format();
            for (i, l) in layers.iter().enumerate() {
                u.apply_layer(&l[..], Compression::None, &format!("#{i}"))?;
            }
            u.finish_with_marks()
        })();
        check_memory(&tree, true, &res, layers);
        (dir, res)
    }

    fn paths(v: &[&str]) -> Vec<PathBuf> {
        v.iter().map(PathBuf::from).collect()
    }

    #[test]
    fn overlay_format_records_whiteouts_and_opaque_dirs_instead_of_applying_them() {
        let l = Layer::new()
            .file("keep", b"k")
            .whiteout("etc/motd")
            .whiteout("gone")
            .dir("var/lib", 0o755)
            .opaque("var/lib")
            .file("var/lib/new", b"n")
            .tar();
        let (dir, res) = unpack_overlay(&[l]);
        let (_, marks) = res.unwrap();
        assert_eq!(marks.whiteouts, paths(&["etc/motd", "gone"]));
        assert_eq!(marks.opaque, paths(&["var/lib"]));
        let tree = dir.path().join("tree");
        // The tree holds no device node: the marks are written into the disk later.
        assert!(
            tree.join("etc").is_dir(),
            "the whiteout's parent exists for it"
        );
        assert!(!tree.join("etc/motd").exists() && !tree.join("gone").exists());
        assert!(tree.join("var/lib/new").is_file());
    }

    #[test]
    fn overlay_format_within_a_run_of_layers_applies_lower_entries_and_keeps_marks() {
        let l1 = Layer::new().file("a/x", b"1").file("b", b"1").tar();
        // Whiting out `a` removes the lower entry in this tree and hides it below;
        // recreating `a` as a directory makes it opaque; recreating `b` as a file
        // needs no mark at all.
        let l2 = Layer::new().whiteout("a").whiteout("b").tar();
        let l3 = Layer::new().file("a/y", b"3").file("b", b"3").tar();
        let (dir, res) = unpack_overlay(&[l1, l2, l3]);
        let (_, marks) = res.unwrap();
        assert_eq!(marks.whiteouts, Vec::<PathBuf>::new());
        assert_eq!(marks.opaque, paths(&["a"]));
        let tree = dir.path().join("tree");
        assert!(!tree.join("a/x").exists());
        assert!(tree.join("a/y").is_file());
        assert_eq!(std::fs::read(tree.join("b")).unwrap(), b"3");
    }

    #[test]
    fn a_layers_own_directory_that_it_also_whites_out_becomes_opaque() {
        let l = Layer::new()
            .dir("d", 0o755)
            .file("d/f", b"x")
            .whiteout("d")
            .tar();
        let (_, res) = unpack_overlay(&[l]);
        let (_, marks) = res.unwrap();
        assert_eq!(marks.opaque, paths(&["d"]));
        assert!(marks.whiteouts.is_empty());
    }

    #[test]
    fn a_hard_link_into_a_lower_layer_is_named_in_the_overlay_format_only() {
        let l = Layer::new().hardlink("link", "bin/lower").tar();
        let (_, res) = unpack_overlay(std::slice::from_ref(&l));
        assert!(
            matches!(res, Err(ImageError::HardLinkAcrossLayers { ref path, .. }) if path == "link"),
            "{res:?}"
        );
        let (_, res) = unpack(&[l]);
        assert!(
            matches!(res, Err(ImageError::UnsafeEntry { .. })),
            "{res:?}"
        );
    }

    #[test]
    fn overlay_xattrs_from_a_layer_are_dropped_and_counted() {
        let l = Layer::new()
            .entry(TarEntry::dir("d", 0o755).xattr("trusted.overlay.opaque", b"y"))
            .entry(TarEntry::file("f", b"x", 0o644).xattr("trusted.overlay.redirect", b"/etc"))
            .tar();
        let (dir, res) = unpack_overlay(std::slice::from_ref(&l));
        let (stats, marks) = res.unwrap();
        assert_eq!(stats.overlay_xattrs_dropped, 2);
        assert!(
            marks.opaque.is_empty(),
            "a layer cannot make itself opaque by xattr"
        );
        let mut buf = [0u8; 16];
        assert!(rfs::getxattr(
            dir.path().join("tree/d"),
            "trusted.overlay.opaque",
            &mut buf[..]
        )
        .is_err());
        let (_, res) = unpack(&[l]);
        assert_eq!(res.unwrap().overlay_xattrs_dropped, 2);
    }

    #[test]
    fn a_shared_budget_bounds_the_bytes_of_all_unpackers_together() {
        let budget = std::sync::Arc::new(SharedBudget::default());
        let dir = tempfile::tempdir().unwrap();
        let mut results = Vec::new();
        for i in 0..2 {
            let tree = dir.path().join(format!("t{i}"));
            std::fs::create_dir(&tree).unwrap();
            let mut u = Unpacker::new(&tree, 150)
                .unwrap()
                .overlay_format()
                .shared_budget(budget.clone());
            let l = Layer::new().file("f", &[7u8; 100]).tar();
            results.push(u.apply_layer(&l[..], Compression::None, "#0"));
        }
        assert!(results[0].is_ok());
        assert!(
            matches!(
                &results[1],
                Err(ImageError::LimitExceeded {
                    limit: "max_unpacked_bytes",
                    ..
                })
            ),
            "200 bytes over two trees exceed 150: {:?}",
            results[1]
        );
        // The same budget bounds memory unpackers, and the two kinds together: 100
        // bytes on the host and 60 in memory exceed 150.
        let mut sink = MemSink::default();
        let mut u = MemUnpacker::in_memory(UnpackLimits::new(150), &mut sink)
            .overlay_format()
            .shared_budget(budget.clone());
        let l = Layer::new().file("f", &[7u8; 60]).tar();
        let err = u.apply_layer(&l[..], Compression::None, "#0").unwrap_err();
        assert_eq!(failure(&err), Failure::Limit("max_unpacked_bytes"));
        let budget = std::sync::Arc::new(SharedBudget::default());
        let mut results = Vec::new();
        for _ in 0..2 {
            let mut u = MemUnpacker::in_memory(UnpackLimits::new(150), MemSink::default())
                .shared_budget(budget.clone());
            let l = Layer::new().file("f", &[7u8; 100]).tar();
            results.push(u.apply_layer(&l[..], Compression::None, "#0"));
        }
        assert!(results[0].is_ok());
        assert!(
            matches!(
                &results[1],
                Err(ImageError::LimitExceeded {
                    limit: "max_unpacked_bytes",
                    ..
                })
            ),
            "{:?}",
            results[1]
        );
    }

    #[test]
    fn xattrs_are_applied() {
        let l = Layer::new()
            .entry(TarEntry::file("f", b"x", 0o644).xattr("user.plfm", b"yes"))
            .tar();
        let (dir, res) = unpack(&[l]);
        res.unwrap();
        let path = dir.path().join("tree/f");
        let mut buf = [0u8; 16];
        match rfs::getxattr(&path, "user.plfm", &mut buf[..]) {
            Ok(n) => assert_eq!(&buf[..n], b"yes"),
            Err(Errno::OPNOTSUPP) => eprintln!("skip: build fs has no user xattrs"),
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn unpacked_size_limit_names_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let l = Layer::new().file("big", &[0u8; 4096]).tar();
        let mut u = Unpacker::new(dir.path(), 1000).unwrap();
        let err = u.apply_layer(&l[..], Compression::None, "#0").unwrap_err();
        assert!(err.to_string().contains("max_unpacked_bytes"), "{err}");
        let mut u = MemUnpacker::in_memory(UnpackLimits::new(1000), MemSink::default());
        let err = u.apply_layer(&l[..], Compression::None, "#0").unwrap_err();
        assert!(err.to_string().contains("max_unpacked_bytes"), "{err}");
    }

    #[test]
    fn a_decoding_thread_gives_the_same_bytes_and_its_errors_and_stops_when_dropped() {
        use std::io::Write;
        let body: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&body).unwrap();
        let gz = gz.finish().unwrap();
        let mut out = Vec::new();
        Compression::Gzip
            .decoder_thread(io::Cursor::new(gz.clone()))
            .unwrap()
            .read_to_end(&mut out)
            .unwrap();
        assert!(out == body, "decoded bytes differ");
        let zst = zstd::encode_all(&body[..], 1).unwrap();
        let mut out = Vec::new();
        Compression::Zstd
            .decoder_thread(io::Cursor::new(zst))
            .unwrap()
            .read_to_end(&mut out)
            .unwrap();
        assert!(out == body, "decoded zstd bytes differ");
        let mut broken = gz.clone();
        let mid = broken.len() / 2;
        broken[mid..mid + 64].fill(0xff);
        let mut out = Vec::new();
        let err = Compression::Gzip
            .decoder_thread(io::Cursor::new(broken))
            .unwrap()
            .read_to_end(&mut out)
            .unwrap_err();
        assert_ne!(err.kind(), io::ErrorKind::UnexpectedEof, "{err}");
        // Dropped after one read, with the thread blocked on a full channel:
        // dropping joins the thread, so this returns only if the thread ended.
        let mut s = Compression::Gzip
            .decoder_thread(io::Cursor::new(gz))
            .unwrap();
        let mut one = [0u8; 10];
        s.read_exact(&mut one).unwrap();
        drop(s);
    }

    #[test]
    fn gzip_and_zstd_layers_decode() {
        let plain = Layer::new().file("a", b"x").tar();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        io::Write::write_all(&mut gz, &plain).unwrap();
        let gz = gz.finish().unwrap();
        let zs = zstd::encode_all(&plain[..], 1).unwrap();
        for (blob, c) in [(gz, Compression::Gzip), (zs, Compression::Zstd)] {
            let dir = tempfile::tempdir().unwrap();
            let mut u = Unpacker::new(dir.path(), u64::MAX).unwrap();
            u.apply_layer(&blob[..], c, "#0").unwrap();
            assert!(dir.path().join("a").exists());
            let mut m = MemUnpacker::in_memory(limits(), MemSink::default());
            m.apply_layer(&blob[..], c, "#0").unwrap();
            let (tree, sink, _) = m.finish().unwrap();
            let a = tree.lookup(ROOT, b"a").unwrap();
            assert!(matches!(tree.get(a).kind, Kind::File(Some(d)) if sink.read(d) == b"x"));
        }
    }

    // ----- bounded memory and time (issue 13) -----

    use super::super::testtar::{extension_header, pax_record};
    use std::cell::Cell;
    use std::rc::Rc;

    /// Counts the bytes the unpacker pulls from the layer stream.
    struct Counting<R> {
        inner: R,
        read: Rc<Cell<u64>>,
    }

    impl<R: Read> Read for Counting<R> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = self.inner.read(buf)?;
            self.read.set(self.read.get() + n as u64);
            Ok(n)
        }
    }

    /// A plain tar stream: one extension header of `kind` whose body is `size` bytes
    /// of `fill`, generated lazily (never held in memory here), then a small file.
    fn bomb(kind: tar::EntryType, size: u64, fill: u8) -> (impl Read, Rc<Cell<u64>>) {
        let header = extension_header(kind, size).as_bytes().to_vec();
        let pad = ((512 - size % 512) % 512) as usize;
        let tail = Layer::new().file("after", b"x").tar();
        let stream = io::Cursor::new(header)
            .chain(io::repeat(fill).take(size))
            .chain(io::Cursor::new(vec![0u8; pad]))
            .chain(io::Cursor::new(tail));
        let read = Rc::new(Cell::new(0));
        (
            Counting {
                inner: stream,
                read: read.clone(),
            },
            read,
        )
    }

    fn limits() -> UnpackLimits {
        UnpackLimits::new(u64::MAX)
    }

    fn unpack_with(
        limits: UnpackLimits,
        layers: Vec<Box<dyn Read>>,
    ) -> (tempfile::TempDir, Result<UnpackStats, ImageError>) {
        let dir = tempfile::tempdir().unwrap();
        let tree = dir.path().join("tree");
        std::fs::create_dir(&tree).unwrap();
        let res = (|| {
            let mut u = Unpacker::with_limits(&tree, limits)?;
            for (i, l) in layers.into_iter().enumerate() {
                u.apply_layer(l, Compression::None, &format!("#{i}"))?;
            }
            u.finish()
        })();
        (dir, res)
    }

    fn assert_limit(res: &Result<UnpackStats, ImageError>, key: &str) {
        match res {
            Err(e @ ImageError::LimitExceeded { limit, .. }) if *limit == key => {
                assert!(e.to_string().contains(key), "{e}");
                assert_eq!(e.reason(), crate::instance::ReasonCode::ImagePullFailed);
            }
            other => panic!("expected limit {key}, got {other:?}"),
        }
    }

    #[test]
    fn pax_header_bomb_is_refused_without_reading_it_into_memory() {
        // 256 MiB of PAX body: the tar crate's own preprocessing reads it whole.
        for kind in [tar::EntryType::XHeader, tar::EntryType::XGlobalHeader] {
            let (stream, read) = bomb(kind, 256 << 20, b'0');
            let (dir, res) = unpack_with(limits(), vec![Box::new(stream)]);
            assert_limit(&res, "max_tar_extension_bytes");
            assert!(
                read.get() < 1 << 20,
                "{kind:?}: {} bytes read from the layer",
                read.get()
            );
            assert!(!dir.path().join("tree/after").exists());
            let (stream, read) = bomb(kind, 256 << 20, b'0');
            let mem = mem_unpack(limits(), false, vec![Box::new(stream)]);
            assert_eq!(mem, Err(Failure::Limit("max_tar_extension_bytes")));
            assert!(read.get() < 1 << 20, "memory: {} bytes read", read.get());
        }
    }

    #[test]
    fn gnu_long_name_bomb_is_refused() {
        for kind in [tar::EntryType::GNULongName, tar::EntryType::GNULongLink] {
            let (stream, read) = bomb(kind, 256 << 20, b'a');
            let (_dir, res) = unpack_with(limits(), vec![Box::new(stream)]);
            assert_limit(&res, "max_tar_extension_bytes");
            assert!(read.get() < 1 << 20, "{kind:?}: {} bytes read", read.get());
            let (stream, read) = bomb(kind, 256 << 20, b'a');
            let mem = mem_unpack(limits(), false, vec![Box::new(stream)]);
            assert_eq!(mem, Err(Failure::Limit("max_tar_extension_bytes")));
            assert!(read.get() < 1 << 20, "memory: {} bytes read", read.get());
        }
    }

    #[test]
    fn extension_bodies_are_capped_even_when_declared_small() {
        // Declared within the cap is read; a body one byte over the cap is refused.
        let cap = limits().max_tar_extension_bytes;
        let (stream, _) = bomb(tar::EntryType::XGlobalHeader, cap, b'0');
        let (_d, res) = unpack_with(limits(), vec![Box::new(stream)]);
        res.unwrap();
        let (stream, _) = bomb(tar::EntryType::XGlobalHeader, cap + 1, b'0');
        let (_d, res) = unpack_with(limits(), vec![Box::new(stream)]);
        assert_limit(&res, "max_tar_extension_bytes");
        let (stream, _) = bomb(tar::EntryType::XGlobalHeader, cap, b'0');
        assert!(mem_unpack(limits(), false, vec![Box::new(stream)]).is_ok());
        let (stream, _) = bomb(tar::EntryType::XGlobalHeader, cap + 1, b'0');
        let mem = mem_unpack(limits(), false, vec![Box::new(stream)]);
        assert_eq!(mem, Err(Failure::Limit("max_tar_extension_bytes")));
    }

    #[test]
    fn pax_and_gnu_names_links_and_owners_apply_to_the_next_entry() {
        let long_dir = "d".repeat(150);
        let mut pax = pax_record("path", format!("{long_dir}/from-pax").as_bytes());
        pax.extend(pax_record("uid", b"4242"));
        pax.extend(pax_record("gid", b"4343"));
        let mut link_pax = pax_record("linkpath", format!("{long_dir}/from-pax").as_bytes());
        link_pax.extend(pax_record("SCHILY.xattr.user.plfm", b"yes"));
        let l = Layer::new()
            .dir(&long_dir, 0o755)
            .entry(TarEntry::extension(tar::EntryType::XHeader, &pax))
            .file("short-name-ignored", b"pax")
            .entry(TarEntry::extension(tar::EntryType::XHeader, &link_pax))
            .symlink("link", "ignored")
            // testtar writes GNU `L`/`K` entries for names over 100 bytes.
            .hardlink(&format!("{long_dir}/hard"), &format!("{long_dir}/from-pax"))
            .tar();
        let (dir, res) = unpack(&[l]);
        res.unwrap();
        let t = dir.path().join("tree");
        let f = t.join(&long_dir).join("from-pax");
        assert_eq!(std::fs::read(&f).unwrap(), b"pax");
        let m = std::fs::metadata(&f).unwrap();
        assert_eq!((m.uid(), m.gid()), (4242, 4343));
        assert!(!t.join("short-name-ignored").exists());
        assert_eq!(
            std::fs::read_link(t.join("link")).unwrap(),
            PathBuf::from(format!("{long_dir}/from-pax"))
        );
        let h = std::fs::metadata(t.join(&long_dir).join("hard")).unwrap();
        assert_eq!(h.ino(), m.ino());
    }

    #[test]
    fn long_names_from_pax_and_gnu_obey_the_path_rules() {
        let too_long = "a/".repeat(MAX_PATH_BYTES / 2 + 1);
        for path in [too_long.as_bytes(), b"../escape", b"/abs"] {
            let pax = Layer::new()
                .entry(TarEntry::extension(
                    tar::EntryType::XHeader,
                    &pax_record("path", path),
                ))
                .file("innocent", b"x")
                .tar();
            let mut gnu_name = path.to_vec();
            gnu_name.push(0);
            let gnu = Layer::new()
                .entry(TarEntry::extension(tar::EntryType::GNULongName, &gnu_name))
                .file("innocent", b"x")
                .tar();
            for l in [pax, gnu] {
                let (dir, res) = unpack(&[l]);
                assert!(
                    matches!(res, Err(ImageError::UnsafeEntry { .. })),
                    "{}: {res:?}",
                    String::from_utf8_lossy(&path[..path.len().min(20)])
                );
                assert!(!dir.path().join("tree/innocent").exists());
                outside_is_untouched(&dir);
            }
        }
    }

    #[test]
    fn pax_size_that_disagrees_with_the_header_is_refused() {
        let l = Layer::new()
            .entry(TarEntry::extension(
                tar::EntryType::XHeader,
                &pax_record("size", b"1000"),
            ))
            .file("f", b"abc")
            .tar();
        let (_dir, res) = unpack(&[l]);
        let err = res.unwrap_err();
        assert!(err.to_string().contains("PAX size 1000"), "{err}");
    }

    #[test]
    fn dangling_or_doubled_extension_headers_are_format_errors() {
        let dangling = Layer::new()
            .file("f", b"x")
            .entry(TarEntry::extension(
                tar::EntryType::XHeader,
                &pax_record("path", b"g"),
            ))
            .tar();
        let doubled = Layer::new()
            .entry(TarEntry::extension(tar::EntryType::GNULongName, b"a\0"))
            .entry(TarEntry::extension(tar::EntryType::GNULongName, b"b\0"))
            .file("f", b"x")
            .tar();
        for l in [dangling, doubled] {
            let (_dir, res) = unpack(&[l]);
            assert!(
                matches!(res, Err(ImageError::LayerFormat { .. })),
                "{res:?}"
            );
        }
    }

    #[test]
    fn too_many_entries_is_refused() {
        let mut many = Layer::new();
        for i in 0..20 {
            many = many.file(&format!("f{i}"), b"x");
        }
        let lim = UnpackLimits {
            max_entries: 10,
            ..limits()
        };
        let many = many.tar();
        let (dir, res) = unpack_with(lim, boxed(std::slice::from_ref(&many)));
        assert_limit(&res, "max_entries");
        assert!(!dir.path().join("tree/f10").exists());
        let mem = mem_unpack(lim, false, boxed(&[many]));
        assert_eq!(mem, Err(Failure::Limit("max_entries")));
        // The count is per image: two layers of 6 exceed 10 together.
        let six = || {
            let mut l = Layer::new();
            for i in 0..6 {
                l = l.file(&format!("g{i}"), b"x");
            }
            Box::new(io::Cursor::new(l.tar())) as Box<dyn Read>
        };
        let (_dir, res) = unpack_with(lim, vec![six(), six()]);
        assert_limit(&res, "max_entries");
        let mem = mem_unpack(lim, false, vec![six(), six()]);
        assert_eq!(mem, Err(Failure::Limit("max_entries")));
        // Extension headers count too: they cost a read each.
        let mut l = Layer::new();
        for _ in 0..11 {
            l = l.entry(TarEntry::extension(tar::EntryType::XGlobalHeader, b""));
        }
        let l = l.file("f", b"x").tar();
        let (_dir, res) = unpack_with(lim, boxed(std::slice::from_ref(&l)));
        assert_limit(&res, "max_entries");
        let mem = mem_unpack(lim, false, boxed(&[l]));
        assert_eq!(mem, Err(Failure::Limit("max_entries")));
    }

    /// An endless-looking stream of `count` PAX global headers (cheap to parse,
    /// nothing written to disk), generated lazily.
    struct GlobalHeaders {
        block: Vec<u8>,
        left: u64,
        pos: usize,
    }

    impl Read for GlobalHeaders {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if self.left == 0 {
                return Ok(0);
            }
            let n = (self.block.len() - self.pos).min(buf.len());
            buf[..n].copy_from_slice(&self.block[self.pos..self.pos + n]);
            self.pos += n;
            if self.pos == self.block.len() {
                self.pos = 0;
                self.left -= 1;
            }
            Ok(n)
        }
    }

    #[test]
    fn unpack_deadline_is_checked_per_entry() {
        // Ten million headers in one layer: far more than can be read before the
        // deadline, so only a per-entry check stops it in time.
        let body = pax_record("comment", &[b'x'; 400]);
        let mut block = extension_header(tar::EntryType::XGlobalHeader, body.len() as u64)
            .as_bytes()
            .to_vec();
        block.extend_from_slice(&body);
        block.resize(1024, 0);
        let stream = || GlobalHeaders {
            block: block.clone(),
            left: 10_000_000,
            pos: 0,
        };
        let lim = || UnpackLimits {
            max_entries: u64::MAX,
            deadline: Some(Instant::now() + std::time::Duration::from_millis(300)),
            ..limits()
        };
        let started = Instant::now();
        let mem = mem_unpack(lim(), false, vec![Box::new(stream())]);
        assert_eq!(mem, Err(Failure::Limit("image_timeout_secs")));
        assert!(started.elapsed() < std::time::Duration::from_secs(30));
        let started = Instant::now();
        let (_dir, res) = unpack_with(lim(), vec![Box::new(stream())]);
        assert_limit(&res, "image_timeout_secs");
        let msg = res.unwrap_err().to_string();
        assert!(msg.contains("unpacking did not finish in time"), "{msg}");
        assert!(
            started.elapsed() < std::time::Duration::from_secs(30),
            "stopped only after {:?}",
            started.elapsed()
        );
    }

    #[test]
    fn corrupt_layer_is_a_format_error() {
        let dir = tempfile::tempdir().unwrap();
        let mut u = Unpacker::new(dir.path(), u64::MAX).unwrap();
        let err = u
            .apply_layer(&b"not gzip at all"[..], Compression::Gzip, "#0")
            .unwrap_err();
        assert!(matches!(err, ImageError::LayerFormat { .. }), "{err}");
        let mut u = MemUnpacker::in_memory(limits(), MemSink::default());
        let err = u
            .apply_layer(&b"not gzip at all"[..], Compression::Gzip, "#0")
            .unwrap_err();
        assert!(matches!(err, ImageError::LayerFormat { .. }), "{err}");
    }

    // ----- the memory backend's own outputs -----

    fn mem_apply(layers: &[Vec<u8>], overlay: bool) -> (FsTree, MemSink, OverlayMarks) {
        let mut u = MemUnpacker::in_memory(limits(), MemSink::default());
        if overlay {
            u = u.overlay_format();
        }
        for (i, l) in layers.iter().enumerate() {
            u.apply_layer(&l[..], Compression::None, &format!("#{i}"))
                .unwrap();
        }
        let (tree, sink, _, marks) = u.finish_with_marks().unwrap();
        (tree, sink, marks)
    }

    fn mem_path(tree: &FsTree, path: &str) -> Option<InodeId> {
        path.split('/')
            .try_fold(ROOT, |dir, c| tree.lookup(dir, c.as_bytes()))
    }

    #[test]
    fn memory_overlay_marks_are_written_into_the_tree_as_the_disk_builder_does() {
        let l = Layer::new()
            .whiteout("etc/motd")
            .dir("var/lib", 0o755)
            .opaque("var/lib")
            .file("var/lib/new", b"n")
            .tar();
        let (tree, _, marks) = mem_apply(&[l], true);
        assert_eq!(marks.whiteouts, paths(&["etc/motd"]));
        assert_eq!(marks.opaque, paths(&["var/lib"]));
        let w = tree.get(mem_path(&tree, "etc/motd").unwrap());
        assert_eq!(w.kind, Kind::CharDev { major: 0, minor: 0 });
        assert_eq!((w.mode, w.uid, w.gid, w.mtime), (0, 0, 0, WHITEOUT_MTIME));
        let lib = tree.get(mem_path(&tree, "var/lib").unwrap());
        assert_eq!(
            lib.xattrs.get(&b"trusted.overlay.opaque"[..]),
            Some(&b"y".to_vec())
        );
        let root = tree.get(ROOT);
        assert_eq!(
            (root.mode, root.uid, root.gid, root.mtime),
            (0o755, 0, 0, FIXED_MTIME)
        );
        let etc = tree.get(mem_path(&tree, "etc").unwrap());
        assert_eq!((etc.mode, etc.mtime), (0o755, FIXED_MTIME), "implicit");
    }

    #[test]
    fn memory_hard_links_are_one_inode_under_two_names() {
        let l = Layer::new()
            .file("bin/busybox", b"elf")
            .hardlink("bin/sh", "bin/busybox")
            .tar();
        let (tree, sink, _) = mem_apply(&[l], false);
        let sh = mem_path(&tree, "bin/sh").unwrap();
        assert_eq!(Some(sh), mem_path(&tree, "bin/busybox"));
        assert!(matches!(tree.get(sh).kind, Kind::File(Some(d)) if sink.read(d) == b"elf"));
    }

    #[test]
    fn both_backends_agree_on_replaced_and_recreated_directories() {
        // Directory times come from one record for both backends, with its history:
        // `x` is replaced by a file and then recreated implicitly.
        let l1 = Layer::new()
            .entry(TarEntry::dir("x", 0o711).mtime(5).xattr("user.a", b"1"))
            .entry(TarEntry::dir("x/y", 0o700).mtime(6))
            .file("x/y/f", b"f")
            .entry(TarEntry::dir("keep", 0o750).mtime(9).xattr("user.a", b"1"))
            .tar();
        let l2 = Layer::new()
            .file("x", b"now a file")
            .entry(TarEntry::dir("keep", 0o755).mtime(10).xattr("user.b", b"2"))
            .hardlink("keep/h", "x")
            .entry(TarEntry::device("keep/p", tar::EntryType::Fifo))
            .tar();
        // `x` comes back as a directory; its old child's recorded time is still
        // there when `x/y` is recreated implicitly.
        let l3 = Layer::new()
            .entry(TarEntry::dir("x", 0o755).mtime(7))
            .file("x/y/g", b"g")
            .whiteout("keep/h")
            .symlink("keep/s", "../x")
            .tar();
        let (_d, res) = unpack(&[l1.clone(), l2.clone(), l3.clone()]);
        res.unwrap();
        let (_d, res) = unpack_overlay(&[l1, l2, l3]);
        res.unwrap();
    }

    /// The differential check on random layers: 1,500 pseudo-random layer sets from
    /// the fuzz target's generator, each unpacked in both formats on the host and in
    /// memory, must give the same tree, counters and marks, or the same refusal (the
    /// comparison is [`check_memory`], run by [`unpack`] and [`unpack_overlay`]).
    /// Every third set uses the fuzz target's hostile names (`..`, `/a`, empty); the
    /// rest names that stay inside the tree. With this seed 1,042 of the 3,000
    /// unpacks are accepted and 1,958 refused (hard links to missing targets,
    /// writes through symlinks, unsafe paths).
    #[test]
    fn both_backends_agree_on_random_layers() {
        use super::super::testtar::{
            layers_from_bytes, layers_from_bytes_with, pseudo_random_bytes,
        };
        /// Names the round that failed, if one does.
        struct Round(u32);
        impl Drop for Round {
            fn drop(&mut self) {
                if std::thread::panicking() {
                    eprintln!("both_backends_agree_on_random_layers: round {}", self.0);
                }
            }
        }
        let outside = "/nonexistent-plfm-outside";
        let inside = ["a", "b", "c", ".wh.a", ".wh.b", ".wh..wh..opq", "a/b"];
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let (mut accepted, mut refused) = (0u32, 0u32);
        for round in 0..1500u32 {
            let guard = Round(round);
            // Short inputs: a long one almost always holds an entry that refuses it.
            let data = pseudo_random_bytes(&mut x, 4 + round as usize % 60);
            let layers = if round % 3 == 0 {
                layers_from_bytes(&data, outside)
            } else {
                layers_from_bytes_with(&data, outside, &inside)
            };
            let (_d, applied) = unpack(&layers);
            let (_d, overlay) = unpack_overlay(&layers);
            for ok in [applied.is_ok(), overlay.is_ok()] {
                if ok {
                    accepted += 1;
                } else {
                    refused += 1;
                }
            }
            drop(guard);
        }
        eprintln!("{accepted} unpacks accepted, {refused} refused");
        // Both outcomes must be common, or half of the check compares nothing.
        assert!(
            accepted >= 800 && refused >= 800,
            "{accepted} unpacks accepted, {refused} refused"
        );
    }

    /// A data area that is full after `room` bytes.
    struct FullSink {
        room: u64,
    }

    impl DataSink for FullSink {
        fn write_data(&mut self, r: &mut dyn Read, len: u64) -> io::Result<Option<DataRef>> {
            let take = len.min(self.room);
            io::copy(&mut r.take(take), &mut io::sink())?;
            if len > self.room {
                return Err(io::Error::from_raw_os_error(28));
            }
            self.room -= len;
            Ok(None)
        }
    }

    /// A layer stream that fails after `ok` bytes.
    struct FailingStream {
        data: io::Cursor<Vec<u8>>,
        ok: u64,
    }

    impl Read for FailingStream {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if self.data.position() >= self.ok {
                return Err(io::Error::other("connection reset"));
            }
            let room = (self.ok - self.data.position()).min(buf.len() as u64) as usize;
            self.data.read(&mut buf[..room])
        }
    }

    #[test]
    fn a_full_data_area_is_the_disks_fault_and_a_failing_stream_the_layers() {
        let l = Layer::new().file("f", &[1u8; 8192]).tar();
        let mut u = MemUnpacker::in_memory(limits(), FullSink { room: 100 });
        let err = u.apply_layer(&l[..], Compression::None, "#0").unwrap_err();
        assert!(matches!(err, ImageError::NoSpace { .. }), "{err:?}");
        assert!(err.to_string().contains("/f"), "{err}");
        let stream = || FailingStream {
            data: io::Cursor::new(l.clone()),
            ok: 512 + 1000,
        };
        let mut u = MemUnpacker::in_memory(limits(), MemSink::default());
        let err = u
            .apply_layer(stream(), Compression::None, "#0")
            .unwrap_err();
        assert!(matches!(err, ImageError::LayerFormat { .. }), "{err:?}");
        let dir = tempfile::tempdir().unwrap();
        let mut u = Unpacker::new(dir.path(), u64::MAX).unwrap();
        let err = u
            .apply_layer(stream(), Compression::None, "#0")
            .unwrap_err();
        assert!(matches!(err, ImageError::LayerFormat { .. }), "{err:?}");
    }
}
