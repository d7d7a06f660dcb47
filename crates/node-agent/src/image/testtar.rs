//! Builds tar layers in memory with full control over every header byte, for the
//! image pipeline's tests, benchmark and fuzz target (adversarial layers need paths
//! such as `../x` or `/abs` that tar writers refuse to produce).
//!
//! Not used by the agent at run time. Only the fuzz checks at the end touch the disk,
//! in the scratch directory they are given.

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
    /// A PAX (`x`/`g`) or GNU long name/link (`L`/`K`) extension header whose body
    /// is `body` verbatim (build PAX bodies with [`pax_record`]); it describes the
    /// entry that follows it in the layer.
    pub fn extension(kind: tar::EntryType, body: &[u8]) -> Self {
        let mut e = Self::base(b"", kind, 0o644);
        e.data = body.to_vec();
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

fn is_extension(kind: tar::EntryType) -> bool {
    use tar::EntryType as T;
    matches!(
        kind,
        T::XHeader | T::XGlobalHeader | T::GNULongName | T::GNULongLink
    )
}

/// One PAX record: `"<len> <key>=<value>\n"`, where `len` counts the whole record.
pub fn pax_record(key: &str, value: &[u8]) -> Vec<u8> {
    let body_len = 1 + key.len() + 1 + value.len() + 1;
    let mut len = body_len + 1;
    while len.to_string().len() + body_len != len {
        len = len.to_string().len() + body_len;
    }
    let mut out = format!("{len} {key}=").into_bytes();
    out.extend_from_slice(value);
    out.push(b'\n');
    out
}

/// The 512-byte header of an extension entry of `kind` declaring `size` body bytes.
pub fn extension_header(kind: tar::EntryType, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_size(size);
    h.set_mode(0o644);
    let name: &[u8] = match kind {
        tar::EntryType::GNULongName | tar::EntryType::GNULongLink => b"././@LongLink",
        _ => b"PaxHeaders/x",
    };
    h.as_gnu_mut().expect("gnu header").name[..name.len()].copy_from_slice(name);
    h.set_cksum();
    h
}

/// A gzip-compressed layer made of `count` extension headers of `kind`, each with a
/// body of `body_len` bytes of `fill`, then one small file: the "tar bomb" that
/// decompresses to `count × body_len` bytes of headers from a blob about a
/// thousandth of that. Streams through the encoder: memory stays small whatever the
/// sizes.
pub fn extension_bomb_gz(kind: tar::EntryType, body_len: u64, count: usize, fill: u8) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let chunk = vec![fill; 1 << 20];
    for _ in 0..count {
        gz.write_all(extension_header(kind, body_len).as_bytes())
            .expect("gzip into memory");
        let mut left = body_len;
        while left > 0 {
            let n = left.min(chunk.len() as u64) as usize;
            gz.write_all(&chunk[..n]).expect("gzip into memory");
            left -= n as u64;
        }
        let pad = (512 - body_len % 512) % 512;
        gz.write_all(&vec![0u8; pad as usize])
            .expect("gzip into memory");
    }
    let tail = Layer::new().file("after-the-bomb", b"x").tar();
    gz.write_all(&tail).expect("gzip into memory");
    gz.finish().expect("gzip into memory")
}

fn append(b: &mut tar::Builder<Vec<u8>>, e: &TarEntry) -> std::io::Result<()> {
    if is_extension(e.kind) {
        let h = extension_header(e.kind, e.data.len() as u64);
        return b.append(&h, &e.data[..]);
    }
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

/// Decodes arbitrary bytes into up to four small layers of hostile-looking entries
/// (names from a tiny alphabet including `..`, `.wh.` names, absolute paths, and
/// symlinks into `outside`), for the fuzz target and the bounded property test.
pub fn layers_from_bytes(data: &[u8], outside: &str) -> Vec<Vec<u8>> {
    const NAMES: [&str; 12] = [
        "a",
        "b",
        "c",
        "..",
        ".",
        "",
        ".wh.a",
        ".wh.b",
        ".wh..wh..opq",
        "/a",
        "/b",
        "a/b",
    ];
    layers_from_bytes_with(data, outside, &NAMES)
}

/// [`layers_from_bytes`] with the path components drawn from `NAMES` (at least one).
pub fn layers_from_bytes_with(data: &[u8], outside: &str, names: &[&str]) -> Vec<Vec<u8>> {
    #[allow(non_snake_case)]
    let NAMES = names;
    let mut it = data.iter().copied();
    let mut next = move || it.next();
    let mut layers = Vec::new();
    let mut layer = Layer::new();
    let path_of = |n: &mut dyn FnMut() -> Option<u8>| -> Option<String> {
        let depth = n()? % 4 + 1;
        let mut parts = Vec::new();
        for _ in 0..depth {
            parts.push(NAMES[n()? as usize % NAMES.len()]);
        }
        Some(parts.join("/"))
    };
    while let Some(op) = next() {
        let Some(path) = path_of(&mut next) else {
            break;
        };
        let e = match op % 10 {
            0 => TarEntry::file(&path, &[op; 3], 0o644),
            // Up to 10 KB: files of several blocks and with a partial last one.
            1 => TarEntry::file(&path, &vec![op; op as usize * 41], 0o644),
            2 => TarEntry::dir(&path, 0o755),
            3 => TarEntry::symlink(&path, outside),
            4 => {
                let t = match next() {
                    Some(b) => NAMES[b as usize % NAMES.len()],
                    None => break,
                };
                TarEntry::symlink(&path, t)
            }
            5 => {
                let Some(t) = path_of(&mut next) else { break };
                TarEntry::hardlink(&path, &t)
            }
            6 => TarEntry::hardlink(&path, &format!("{outside}/victim")),
            7 => TarEntry::device(&path, tar::EntryType::Char),
            8 => TarEntry::device(&path, tar::EntryType::Fifo),
            _ => {
                layers.push(std::mem::take(&mut layer).tar());
                if layers.len() == 4 {
                    break;
                }
                continue;
            }
        };
        layer = layer.entry(e);
    }
    if !layer.is_empty() {
        layers.push(layer.tar());
    }
    layers
}

/// `n` pseudo-random bytes from the xorshift state `x` (advanced), for the bounded
/// stand-ins of the fuzz target: the same seed gives the same inputs on every run.
pub fn pseudo_random_bytes(x: &mut u64, n: usize) -> Vec<u8> {
    (0..n)
        .map(|_| {
            *x ^= *x << 13;
            *x ^= *x >> 7;
            *x ^= *x << 17;
            (*x >> 24) as u8
        })
        .collect()
}

/// One fuzz iteration: unpacks `data` (either decoded by [`layers_from_bytes`] or,
/// when the first byte is odd, taken as a raw tar stream) into `scratch/tree` and
/// panics if anything was written outside it: `scratch/outside/victim` must be
/// unchanged, `scratch` must hold only `tree` and `outside`, and `/a`, `/b` must not
/// exist. Errors from the unpacker are fine; escapes and panics are not.
pub fn check_unpack_containment(data: &[u8], scratch: &std::path::Path) {
    // The previous iteration's direct-built disk.
    let _ = std::fs::remove_file(scratch.join("disk.ext4"));
    let tree = scratch.join("tree");
    let outside = scratch.join("outside");
    let _ = std::fs::remove_dir_all(&tree);
    std::fs::create_dir_all(&tree).expect("create tree");
    std::fs::create_dir_all(&outside).expect("create outside");
    std::fs::write(outside.join("victim"), b"original").expect("write victim");
    let layers = match data.first() {
        Some(b) if b % 2 == 1 => vec![data[1..].to_vec()],
        _ => layers_from_bytes(data.get(1..).unwrap_or(&[]), &outside.to_string_lossy()),
    };
    if let Ok(mut u) = super::unpack::Unpacker::new(&tree, 1 << 20) {
        let mut ok = true;
        for (i, l) in layers.iter().enumerate() {
            if u.apply_layer(&l[..], super::unpack::Compression::None, &format!("#{i}"))
                .is_err()
            {
                ok = false;
                break;
            }
        }
        if ok {
            let _ = u.finish();
        }
    }
    let mut top: Vec<_> = std::fs::read_dir(scratch)
        .expect("list scratch")
        .map(|e| e.expect("entry").file_name())
        .collect();
    top.sort();
    assert_eq!(
        top,
        vec!["outside", "tree"],
        "something landed next to the tree"
    );
    let mut out: Vec<_> = std::fs::read_dir(&outside)
        .expect("list outside")
        .map(|e| e.expect("entry").file_name())
        .collect();
    out.sort();
    assert_eq!(out, vec!["victim"], "something landed in the outside dir");
    let victim = outside.join("victim");
    assert_eq!(
        std::fs::read(&victim).expect("victim"),
        b"original",
        "victim modified"
    );
    let m = std::fs::symlink_metadata(&victim).expect("victim");
    {
        use std::os::unix::fs::MetadataExt;
        assert_eq!(m.nlink(), 1, "victim was hard-linked into the tree");
    }
    for p in ["/a", "/b"] {
        assert!(std::fs::symlink_metadata(p).is_err(), "{p} was created");
    }
    check_direct_build(&layers, scratch);
}

/// The default builder's half of a fuzz iteration: unpacks `layers` in overlay
/// format into an in-memory tree whose file data goes straight into
/// `scratch/disk.ext4` (the direct builder of `image/ext4.rs`), then lays out the
/// file system. Refusals are fine (an unpack error, or a tree the builder names as
/// unfit with `InvalidData`); a panic, any other I/O error, or a built disk that is
/// not the length the builder reports or lacks the ext4 magic is not. Returns the
/// disk when one was built (removed at the next call).
pub fn check_direct_build(
    layers: &[Vec<u8>],
    scratch: &std::path::Path,
) -> Option<std::path::PathBuf> {
    use super::unpack::{Compression, MemUnpacker, UnpackLimits};
    use std::io::{Read, Seek};
    let disk = scratch.join("disk.ext4");
    let _ = std::fs::remove_file(&disk);
    let mut builder = super::ext4::Ext4Builder::create(&disk).expect("create the disk");
    let limits = UnpackLimits {
        max_unpacked_bytes: 1 << 20,
        max_entries: 10_000,
        max_tar_extension_bytes: 64 << 10,
        deadline: None,
    };
    let mut u = MemUnpacker::in_memory(limits, &mut builder).overlay_format();
    for (i, l) in layers.iter().enumerate() {
        if u.apply_layer(&l[..], Compression::None, &format!("#{i}"))
            .is_err()
        {
            return None;
        }
    }
    let (tree, _, _, _) = u.finish_with_marks().ok()?;
    let params =
        super::rootfs::direct_params(&super::Digest::of(b"fuzz"), super::rootfs::DiskKind::Layer);
    let size = match builder.finish(&tree, &params) {
        Ok(size) => size,
        Err(e) => {
            assert_eq!(
                e.kind(),
                std::io::ErrorKind::InvalidData,
                "the builder failed: {e}"
            );
            return None;
        }
    };
    let mut f = std::fs::File::open(&disk).expect("open the built disk");
    assert_eq!(
        f.metadata().expect("stat the disk").len(),
        size,
        "disk length"
    );
    let mut magic = [0u8; 2];
    f.seek(std::io::SeekFrom::Start(1024 + 56)).expect("seek");
    f.read_exact(&mut magic).expect("read the superblock");
    assert_eq!(magic, [0x53, 0xef], "no ext4 magic in the superblock");
    Some(disk)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bounded stand-in for the fuzz target, run with every `cargo test`:
    /// 3,000 pseudo-random inputs plus the committed corpus's shapes, through both
    /// the on-disk unpacker and the direct builder.
    #[test]
    fn unpacking_random_layers_never_writes_outside_the_tree() {
        let scratch = tempfile::tempdir().expect("tempdir");
        let mut x: u64 = 0x853c49e6748fea9b;
        for round in 0..3000u32 {
            let mut data = pseudo_random_bytes(&mut x, 8 + (round as usize % 120));
            // Mostly structured inputs; every 16th as a raw tar stream.
            data[0] = if round % 16 == 0 { 1 } else { 0 };
            check_unpack_containment(&data, scratch.path());
        }
    }

    /// The disks the direct builder makes from random hostile layers are ones
    /// `e2fsck -fn` finds nothing wrong with (every 4th disk built from 1,000 inputs checked).
    #[test]
    fn disks_built_from_random_layers_pass_e2fsck() {
        if std::process::Command::new("e2fsck")
            .arg("-V")
            .output()
            .is_err()
        {
            crate::testing::gate::skip_or_fail("e2fsck (e2fsprogs) is not installed");
            return;
        }
        let scratch = tempfile::tempdir().expect("tempdir");
        let mut x: u64 = 0x2545f4914f6cdd1d;
        let (mut built, mut checked) = (0, 0);
        for round in 0..1000u32 {
            let data = pseudo_random_bytes(&mut x, 16 + round as usize % 144);
            // Names the unpacker accepts, so that most inputs give a disk.
            let layers = layers_from_bytes_with(
                &data,
                "/nonexistent-outside",
                &["a", "b", "c", ".wh.a", ".wh.b", ".wh..wh..opq", "a/b"],
            );
            let Some(disk) = check_direct_build(&layers, scratch.path()) else {
                continue;
            };
            built += 1;
            if built % 4 != 1 {
                continue;
            }
            let out = std::process::Command::new("e2fsck")
                .arg("-fn")
                .arg(&disk)
                .output()
                .expect("run e2fsck");
            assert!(
                out.status.success(),
                "round {round}: e2fsck: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            checked += 1;
        }
        // The generator must keep producing buildable trees, or this checks nothing.
        assert!(checked >= 30, "only {built} disks built, {checked} checked");
    }

    /// Every input of the committed fuzz corpus, as a regression test.
    #[test]
    fn fuzz_corpus_inputs_stay_contained() {
        let scratch = tempfile::tempdir().expect("tempdir");
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/unpack_paths");
        let mut n = 0;
        for e in std::fs::read_dir(&dir).expect("corpus dir") {
            let data = std::fs::read(e.expect("entry").path()).expect("read");
            check_unpack_containment(&data, scratch.path());
            n += 1;
        }
        assert!(n > 0, "empty corpus");
    }
}
