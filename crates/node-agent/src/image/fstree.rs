//! The in-memory file tree of one disk under construction: what the direct builder
//! ([`super::ext4`]) needs to lay out an ext4 image, with every file's bytes already
//! written into that image's data area.
//!
//! Contract: this module only holds metadata (names, modes, owners, times, xattrs,
//! link targets) and references to data already written ([`DataRef`]); it does no
//! I/O and never touches the host's file system. Unpacking rules (containment,
//! whiteouts, limits) live in [`super::unpack`]; the tree only offers the small
//! operations those rules are made of. Memory is one [`Inode`] per entry, bounded by
//! the unpacker's `max_entries`.

use std::collections::BTreeMap;
use std::io::{self, Read};

/// Index of an inode in [`FsTree::inodes`].
pub type InodeId = usize;

/// The root directory's id.
pub const ROOT: InodeId = 0;

/// File bytes already written to the image's data area: `len` bytes starting at
/// block `first_block` (4 KiB blocks), contiguous.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataRef {
    /// First block of the data in the image.
    pub first_block: u64,
    /// Length in bytes (the last block is zero-padded).
    pub len: u64,
}

/// What an inode is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// A directory: entries by name (never `.` or `..`), sorted.
    Dir(BTreeMap<Vec<u8>, InodeId>),
    /// A regular file; `None` when empty.
    File(Option<DataRef>),
    /// A symbolic link and its target (1 to 4095 bytes).
    Symlink(Vec<u8>),
    /// A named pipe.
    Fifo,
    /// A character device; only the overlay whiteout (0:0) is ever made.
    CharDev {
        /// Major number.
        major: u32,
        /// Minor number.
        minor: u32,
    },
}

/// One inode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inode {
    /// Type and its content.
    pub kind: Kind,
    /// Permission bits (`0o7777`).
    pub mode: u16,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Modification time (seconds since the epoch).
    pub mtime: i64,
    /// Extended attributes by full name (`user.x`, `security.capability`,
    /// `trusted.overlay.opaque`, ...), values as the VFS sees them.
    pub xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
}

impl Inode {
    /// An inode of `kind` owned by 0:0 with `mode` and `mtime`, no xattrs.
    pub fn new(kind: Kind, mode: u16, mtime: i64) -> Self {
        Inode {
            kind,
            mode,
            uid: 0,
            gid: 0,
            mtime,
            xattrs: BTreeMap::new(),
        }
    }

    /// True for a directory.
    pub fn is_dir(&self) -> bool {
        matches!(self.kind, Kind::Dir(_))
    }
}

/// A tree of inodes; [`ROOT`] is a directory. Unlinked inodes stay in the vector
/// (ids are stable) but are unreachable, and the builder skips them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FsTree {
    /// All inodes ever made; only those reachable from [`ROOT`] are written.
    pub inodes: Vec<Inode>,
}

impl Default for FsTree {
    fn default() -> Self {
        Self::new(0)
    }
}

impl FsTree {
    /// A tree holding only its root: 0:0, 0755, `mtime`.
    pub fn new(mtime: i64) -> Self {
        FsTree {
            inodes: vec![Inode::new(Kind::Dir(BTreeMap::new()), 0o755, mtime)],
        }
    }

    /// Adds an inode (not linked anywhere yet) and returns its id.
    pub fn add(&mut self, inode: Inode) -> InodeId {
        self.inodes.push(inode);
        self.inodes.len() - 1
    }

    /// The inode `id`.
    pub fn get(&self, id: InodeId) -> &Inode {
        &self.inodes[id]
    }

    /// The inode `id`, mutable.
    pub fn get_mut(&mut self, id: InodeId) -> &mut Inode {
        &mut self.inodes[id]
    }

    /// The entries of directory `dir`, or `None` when it is not a directory.
    pub fn entries(&self, dir: InodeId) -> Option<&BTreeMap<Vec<u8>, InodeId>> {
        match &self.inodes[dir].kind {
            Kind::Dir(e) => Some(e),
            _ => None,
        }
    }

    /// `name` in directory `dir`.
    pub fn lookup(&self, dir: InodeId, name: &[u8]) -> Option<InodeId> {
        self.entries(dir).and_then(|e| e.get(name).copied())
    }

    /// Links `id` as `name` in `dir` (replacing whatever was there). Returns false,
    /// changing nothing, when `dir` is not a directory.
    pub fn link(&mut self, dir: InodeId, name: &[u8], id: InodeId) -> bool {
        match &mut self.inodes[dir].kind {
            Kind::Dir(e) => {
                e.insert(name.to_vec(), id);
                true
            }
            _ => false,
        }
    }

    /// Removes `name` from `dir` (with everything below it, which becomes
    /// unreachable); returns what was there.
    pub fn unlink(&mut self, dir: InodeId, name: &[u8]) -> Option<InodeId> {
        match &mut self.inodes[dir].kind {
            Kind::Dir(e) => e.remove(name),
            _ => None,
        }
    }
}

/// Where file bytes go as they are unpacked: the image's data area, in stream order.
pub trait DataSink {
    /// Copies exactly `len` bytes from `r` into the data area and says where they
    /// are (`None` for `len == 0`). A short read is an error of kind
    /// `UnexpectedEof`; an error of the data area itself keeps its own kind (ENOSPC
    /// stays ENOSPC), so callers can tell the layer's fault from the disk's.
    fn write_data(&mut self, r: &mut dyn Read, len: u64) -> io::Result<Option<DataRef>>;
}

/// A borrowed sink is a sink, so that an unpacker can write into one the caller
/// keeps (`&mut dyn DataSink` included).
impl<S: DataSink + ?Sized> DataSink for &mut S {
    fn write_data(&mut self, r: &mut dyn Read, len: u64) -> io::Result<Option<DataRef>> {
        (**self).write_data(r, len)
    }
}

/// A [`DataSink`] in memory, for tests: block-aligned like the real data area.
#[derive(Debug, Default)]
pub struct MemSink {
    /// The data area (block 0 is its first block).
    pub bytes: Vec<u8>,
}

impl MemSink {
    /// The bytes `d` refers to.
    pub fn read(&self, d: DataRef) -> &[u8] {
        let start = (d.first_block * 4096) as usize;
        &self.bytes[start..start + d.len as usize]
    }
}

impl DataSink for MemSink {
    fn write_data(&mut self, r: &mut dyn Read, len: u64) -> io::Result<Option<DataRef>> {
        if len == 0 {
            return Ok(None);
        }
        let first_block = (self.bytes.len() / 4096) as u64;
        let before = self.bytes.len();
        let n = r.take(len).read_to_end(&mut self.bytes)? as u64;
        if n != len {
            self.bytes.truncate(before);
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("file ended after {n} of {len} bytes"),
            ));
        }
        let padded = self.bytes.len().div_ceil(4096) * 4096;
        self.bytes.resize(padded, 0);
        Ok(Some(DataRef { first_block, len }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_lookup_and_unlink() {
        let mut t = FsTree::new(5);
        let f = t.add(Inode::new(Kind::File(None), 0o644, 7));
        assert!(t.link(ROOT, b"a", f));
        assert_eq!(t.lookup(ROOT, b"a"), Some(f));
        assert!(!t.link(f, b"x", ROOT), "a file has no entries");
        assert_eq!(t.unlink(ROOT, b"a"), Some(f));
        assert_eq!(t.lookup(ROOT, b"a"), None);
        assert_eq!(t.get(ROOT).mtime, 5);
    }

    #[test]
    fn the_memory_sink_is_block_aligned_and_refuses_short_files() {
        let mut s = MemSink::default();
        let a = s.write_data(&mut &b"hello"[..], 5).unwrap().unwrap();
        let b = s.write_data(&mut &b"world!"[..], 6).unwrap().unwrap();
        assert_eq!((a.first_block, b.first_block), (0, 1));
        assert_eq!(s.read(b), b"world!");
        assert_eq!(s.write_data(&mut &b""[..], 0).unwrap(), None);
        let e = s.write_data(&mut &b"abc"[..], 4).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        assert_eq!(s.bytes.len(), 2 * 4096);
    }
}
