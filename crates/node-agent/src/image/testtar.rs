//! Builds tar layers in memory with full control over every header byte, for the
//! image pipeline's tests, benchmark and fuzz target (adversarial layers need paths
//! such as `../x` or `/abs` that tar writers refuse to produce).
//!
//! Not used by the agent at run time. Nothing here touches the disk.

use std::io::Write;

/// One tar entry to write.
#[derive(Debug, Clone)]
pub struct TarEntry {
    path: Vec<u8>,
    kind: tar::EntryType,
    data: Vec<u8>,
    link: Vec<u8>,
    mode: u32,
    uid: u64,
    gid: u64,
    mtime: u64,
    xattrs: Vec<(String, Vec<u8>)>,
}

impl TarEntry {
    fn base(path: &[u8], kind: tar::EntryType, mode: u32) -> Self {
        TarEntry {
            path: path.to_vec(),
            kind,
            data: Vec::new(),
            link: Vec::new(),
            mode,
            uid: 0,
            gid: 0,
            mtime: 1_700_000_000,
            xattrs: Vec::new(),
        }
    }
    /// A regular file.
    pub fn file(path: &str, data: &[u8], mode: u32) -> Self {
        let mut e = Self::base(path.as_bytes(), tar::EntryType::Regular, mode);
        e.data = data.to_vec();
        e
    }
    /// A regular file whose path bytes are written verbatim (may be hostile).
    pub fn file_raw_path(path: &[u8], data: &[u8]) -> Self {
        let mut e = Self::base(path, tar::EntryType::Regular, 0o644);
        e.data = data.to_vec();
        e
    }
    /// A directory.
    pub fn dir(path: &str, mode: u32) -> Self {
        Self::base(path.as_bytes(), tar::EntryType::Directory, mode)
    }
    /// A symlink to `target` (verbatim).
    pub fn symlink(path: &str, target: &str) -> Self {
        let mut e = Self::base(path.as_bytes(), tar::EntryType::Symlink, 0o777);
        e.link = target.as_bytes().to_vec();
        e
    }
    /// A hard link to `target` (verbatim).
    pub fn hardlink(path: &str, target: &str) -> Self {
        let mut e = Self::base(path.as_bytes(), tar::EntryType::Link, 0o644);
        e.link = target.as_bytes().to_vec();
        e
    }
    /// A device node or FIFO.
    pub fn device(path: &str, kind: tar::EntryType) -> Self {
        Self::base(path.as_bytes(), kind, 0o666)
    }
    /// Any entry with raw path and link bytes (for fuzzing).
    pub fn raw(path: &[u8], kind: tar::EntryType, link: &[u8], data: &[u8]) -> Self {
        let mut e = Self::base(path, kind, 0o644);
        e.link = link.to_vec();
        e.data = data.to_vec();
        e
    }
    /// Sets owner.
    pub fn owner(mut self, uid: u64, gid: u64) -> Self {
        self.uid = uid;
        self.gid = gid;
        self
    }
    /// Sets mtime.
    pub fn mtime(mut self, mtime: u64) -> Self {
        self.mtime = mtime;
        self
    }
    /// Adds an extended attribute (PAX `SCHILY.xattr.`).
    pub fn xattr(mut self, name: &str, value: &[u8]) -> Self {
        self.xattrs.push((name.to_string(), value.to_vec()));
        self
    }
}

/// A layer under construction.
#[derive(Debug, Clone, Default)]
pub struct Layer {
    entries: Vec<TarEntry>,
}

impl Layer {
    /// An empty layer.
    pub fn new() -> Self {
        Self::default()
    }
    /// Adds an entry.
    pub fn entry(mut self, e: TarEntry) -> Self {
        self.entries.push(e);
        self
    }
    /// Adds a 0644 root-owned file.
    pub fn file(self, path: &str, data: &[u8]) -> Self {
        self.entry(TarEntry::file(path, data, 0o644))
    }
    /// Adds a root-owned directory.
    pub fn dir(self, path: &str, mode: u32) -> Self {
        self.entry(TarEntry::dir(path, mode))
    }
    /// Adds a symlink.
    pub fn symlink(self, path: &str, target: &str) -> Self {
        self.entry(TarEntry::symlink(path, target))
    }
    /// Adds a hard link.
    pub fn hardlink(self, path: &str, target: &str) -> Self {
        self.entry(TarEntry::hardlink(path, target))
    }
    /// Adds a whiteout for `path` (`dir/.wh.name`).
    pub fn whiteout(self, path: &str) -> Self {
        let (dir, name) = match path.rsplit_once('/') {
            Some((d, n)) => (format!("{d}/"), n),
            None => (String::new(), path),
        };
        self.entry(TarEntry::file(&format!("{dir}.wh.{name}"), b"", 0o644))
    }
    /// Adds an opaque marker for `dir`.
    pub fn opaque(self, dir: &str) -> Self {
        self.entry(TarEntry::file(&format!("{dir}/.wh..wh..opq"), b"", 0o644))
    }
    /// Number of entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }
    /// True without entries.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The uncompressed tar stream.
    pub fn tar(&self) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for e in &self.entries {
            // Infallible: the builder writes into a Vec.
            append(&mut b, e).expect("writing a tar into memory");
        }
        b.into_inner().expect("finishing a tar in memory")
    }

    /// The tar stream, gzip-compressed (fast level).
    pub fn tar_gz(&self) -> Vec<u8> {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&self.tar()).expect("gzip into memory");
        gz.finish().expect("gzip into memory")
    }
}

fn special(
    b: &mut tar::Builder<Vec<u8>>,
    kind: tar::EntryType,
    data: &[u8],
) -> std::io::Result<()> {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_size(data.len() as u64);
    h.set_mode(0o644);
    let name = b"././@LongLink";
    h.as_gnu_mut().expect("gnu header").name[..name.len()].copy_from_slice(name);
    h.set_cksum();
    b.append(&h, data)
}

fn append(b: &mut tar::Builder<Vec<u8>>, e: &TarEntry) -> std::io::Result<()> {
    if !e.xattrs.is_empty() {
        let mut pax = Vec::new();
        for (k, v) in &e.xattrs {
            let body_len = 1 + "SCHILY.xattr.".len() + k.len() + 1 + v.len() + 1;
            let mut len = body_len + 1;
            while len.to_string().len() + body_len != len {
                len = len.to_string().len() + body_len;
            }
            pax.extend_from_slice(format!("{len} SCHILY.xattr.{k}=").as_bytes());
            pax.extend_from_slice(v);
            pax.push(b'\n');
        }
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::XHeader);
        h.set_size(pax.len() as u64);
        h.set_mode(0o644);
        h.as_ustar_mut().expect("ustar").name[..10].copy_from_slice(b"PaxHeaders");
        h.set_cksum();
        b.append(&h, &pax[..])?;
    }
    if e.path.len() > 100 {
        let mut d = e.path.clone();
        d.push(0);
        special(b, tar::EntryType::GNULongName, &d)?;
    }
    if e.link.len() > 100 {
        let mut d = e.link.clone();
        d.push(0);
        special(b, tar::EntryType::GNULongLink, &d)?;
    }
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(e.kind);
    h.set_size(e.data.len() as u64);
    h.set_mode(e.mode);
    h.set_uid(e.uid);
    h.set_gid(e.gid);
    h.set_mtime(e.mtime);
    {
        let g = h.as_gnu_mut().expect("gnu header");
        let n = e.path.len().min(100);
        g.name[..n].copy_from_slice(&e.path[..n]);
        let n = e.link.len().min(100);
        g.linkname[..n].copy_from_slice(&e.link[..n]);
    }
    h.set_cksum();
    b.append(&h, &e.data[..])
}
