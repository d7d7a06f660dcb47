//! The platform initramfs (DESIGN §6): a gzip-compressed newc cpio whose `/init` is
//! `plfm-guest-init`, plus the kernel modules guest init needs when the kernel has them
//! as modules (virtio-mmio, virtio-blk, virtio-net, vsock with its virtio transport,
//! overlayfs, ext4, and their dependencies from `modules.dep`).
//!
//! Layout inside the archive: `/init` (0755), `/dev/console` (char 5:1, so the kernel can
//! give PID 1 a console), empty `/dev`, `/proc`, `/sys`, `/mnt`, and under
//! `/lib/modules/plfm/`: the module files at their `modules.dep` paths, `modules.dep`
//! restricted to them, and `modules.load` listing the wanted modules. Guest init loads
//! them in dependency order with `finit_module`. Compressed modules (`.ko.xz`, `.ko.zst`,
//! `.ko.gz`) are shipped as they are and decompressed by the kernel
//! (`MODULE_INIT_COMPRESSED_FILE`, needs `CONFIG_MODULE_DECOMPRESS`, which kernels that
//! compress their modules enable): the builder needs no decompressors and the archive
//! stays small. Wanted modules listed in `modules.builtin` are skipped.
//!
//! The output is deterministic: entries sorted by path, inode numbers assigned in that
//! order, mtime 0, uid/gid 0, fixed gzip header (mtime 0, no name) and level. Same inputs,
//! same bytes. The builder must not depend on the host it runs on beyond the two input
//! paths, and writes its output atomically (temp file, fsync, rename).

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};

use flate2::write::GzEncoder;
use flate2::{Compression, GzBuilder};

/// The modules guest init needs, by kernel module name.
pub const GUEST_MODULES: [&str; 7] = [
    "virtio_mmio",
    "virtio_blk",
    "virtio_net",
    "vsock",
    "vmw_vsock_virtio_transport",
    "overlay",
    "ext4",
];

/// Module directory inside the initramfs (guest init's default).
pub const MODULES_DIR: &str = "lib/modules/plfm";

/// Arguments of `plfm-node-agent build-initramfs`.
#[derive(Debug, Clone, clap::Args)]
pub struct BuildInitramfsArgs {
    /// The kernel's module directory (`/lib/modules/<version>`, with `modules.dep`);
    /// omit for a kernel with everything built in.
    #[arg(long, value_name = "DIR")]
    pub kernel_modules: Option<PathBuf>,
    /// The statically linked `plfm-guest-init` binary (see scripts/build-guest-init.sh).
    #[arg(long, value_name = "PATH")]
    pub guest_init: PathBuf,
    /// Output file (gzip-compressed newc cpio).
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
}

/// Errors of the builder.
#[derive(Debug, thiserror::Error)]
pub enum InitramfsError {
    /// An input file cannot be read.
    #[error("read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The output cannot be written.
    #[error("write {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A wanted module is neither a module nor built in.
    #[error("kernel module {name} is neither in {dir}/modules.dep nor in modules.builtin")]
    MissingModule {
        /// Module name.
        name: String,
        /// The module directory.
        dir: PathBuf,
    },
    /// `modules.dep` references a module it does not describe, or a path escapes.
    #[error("{dir}/modules.dep: {problem}")]
    BadModulesDep {
        /// The module directory.
        dir: PathBuf,
        /// What is wrong.
        problem: String,
    },
    /// The guest init binary is not a statically linked ELF executable.
    #[error("guest init {path}: {problem}")]
    BadGuestInit {
        /// The binary.
        path: PathBuf,
        /// What is wrong.
        problem: String,
    },
}

/// What went into an initramfs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InitramfsSummary {
    /// Module files shipped (paths relative to the module directory), sorted.
    pub modules: Vec<String>,
    /// Wanted modules found built into the kernel.
    pub builtin: Vec<String>,
    /// Size of the compressed archive in bytes.
    pub size: u64,
}

/// Kernel module name of a module path: file name without `.ko*`, `-` as `_`.
pub fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    let stem = file.split(".ko").next().unwrap_or(file);
    stem.replace('-', "_")
}

/// The modules to ship: wanted module paths (in [`GUEST_MODULES`] order), every file
/// with its dependencies, and the wanted modules that are built in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModuleSelection {
    /// Paths of the wanted modules (for `modules.load`).
    pub wanted: Vec<String>,
    /// All paths to ship, sorted.
    pub files: BTreeSet<String>,
    /// `modules.dep` restricted to `files`.
    pub dep: BTreeMap<String, Vec<String>>,
    /// Wanted modules that are built in.
    pub builtin: Vec<String>,
}

fn safe_rel_path(p: &str) -> bool {
    !p.is_empty()
        && !p.starts_with('/')
        && p.split('/').all(|s| !s.is_empty() && s != "." && s != "..")
}

/// Resolves `wanted` module names against `<modules_dir>/modules.dep` and
/// `modules.builtin`.
pub fn select_modules(
    modules_dir: &Path,
    wanted: &[&str],
) -> Result<ModuleSelection, InitramfsError> {
    let read = |name: &str| {
        let path = modules_dir.join(name);
        std::fs::read_to_string(&path).map_err(|source| InitramfsError::Read { path, source })
    };
    let dep_text = read("modules.dep")?;
    let builtin_text = match read("modules.builtin") {
        Ok(t) => t,
        Err(InitramfsError::Read { source, .. })
            if source.kind() == std::io::ErrorKind::NotFound =>
        {
            String::new()
        }
        Err(e) => return Err(e),
    };
    let bad = |problem: String| InitramfsError::BadModulesDep {
        dir: modules_dir.to_path_buf(),
        problem,
    };
    let mut all: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for line in dep_text.lines() {
        if let Some((m, deps)) = line.split_once(':') {
            all.insert(
                m.trim().to_string(),
                deps.split_whitespace().map(str::to_string).collect(),
            );
        }
    }
    let by_name: BTreeMap<String, &String> = all.keys().map(|p| (module_name(p), p)).collect();
    let builtin: BTreeSet<String> = builtin_text.lines().map(module_name).collect();

    let mut sel = ModuleSelection {
        wanted: Vec::new(),
        files: BTreeSet::new(),
        dep: BTreeMap::new(),
        builtin: Vec::new(),
    };
    for name in wanted {
        let Some(path) = by_name.get(*name) else {
            if builtin.contains(*name) {
                sel.builtin.push(name.to_string());
                continue;
            }
            return Err(InitramfsError::MissingModule {
                name: name.to_string(),
                dir: modules_dir.to_path_buf(),
            });
        };
        sel.wanted.push(path.to_string());
        let mut stack = vec![path.to_string()];
        while let Some(p) = stack.pop() {
            if !sel.files.insert(p.clone()) {
                continue;
            }
            if !safe_rel_path(&p) {
                return Err(bad(format!(
                    "module path {p:?} is not a plain relative path"
                )));
            }
            let deps = all
                .get(&p)
                .ok_or_else(|| bad(format!("dependency {p} has no line of its own")))?;
            sel.dep.insert(p.clone(), deps.clone());
            stack.extend(deps.iter().cloned());
        }
    }
    Ok(sel)
}

/// Refuses binaries that are not ELF or that need a program interpreter (dynamic
/// linking): the initramfs has no libc.
pub fn check_static_elf(path: &Path, bytes: &[u8]) -> Result<(), InitramfsError> {
    let bad = |problem: &str| InitramfsError::BadGuestInit {
        path: path.to_path_buf(),
        problem: problem.to_string(),
    };
    if bytes.len() < 64 || &bytes[..4] != b"\x7fELF" || bytes[4] != 2 || bytes[5] != 1 {
        return Err(bad("not a 64-bit little-endian ELF file"));
    }
    let u16_at = |o: usize| u16::from_le_bytes([bytes[o], bytes[o + 1]]) as usize;
    let phoff = u64::from_le_bytes(bytes[0x20..0x28].try_into().unwrap_or([0; 8])) as usize;
    let (phentsize, phnum) = (u16_at(0x36), u16_at(0x38));
    for i in 0..phnum {
        let off = phoff.saturating_add(i.saturating_mul(phentsize));
        let Some(ph) = bytes.get(off..off + 4) else {
            return Err(bad("truncated program headers"));
        };
        const PT_INTERP: u32 = 3;
        if u32::from_le_bytes([ph[0], ph[1], ph[2], ph[3]]) == PT_INTERP {
            return Err(bad(
                "dynamically linked (has an ELF interpreter); build it with scripts/build-guest-init.sh",
            ));
        }
    }
    Ok(())
}

/// One archive member.
#[derive(Debug, Clone)]
pub enum Member {
    /// A directory (0755).
    Dir,
    /// A regular file.
    File {
        /// Permission bits.
        mode: u32,
        /// Contents.
        data: Vec<u8>,
    },
    /// A character device node.
    CharDev {
        /// Permission bits.
        mode: u32,
        /// Major number.
        major: u32,
        /// Minor number.
        minor: u32,
    },
}

/// Adds a [`Member::Dir`] for every parent directory of `path` not there yet.
pub fn add_parents(members: &mut BTreeMap<String, Member>, path: &str) {
    let mut cur = String::new();
    let parts: Vec<&str> = path.split('/').collect();
    for part in &parts[..parts.len() - 1] {
        if !cur.is_empty() {
            cur.push('/');
        }
        cur.push_str(part);
        members.entry(cur.clone()).or_insert(Member::Dir);
    }
}

fn newc_header(
    out: &mut Vec<u8>,
    ino: u32,
    mode: u32,
    nlink: u32,
    size: u32,
    rdev: (u32, u32),
    name: &str,
) {
    let namesize = name.len() + 1;
    let fields = [
        ino,
        mode,
        0,
        0,
        nlink,
        0,
        size,
        0,
        0,
        rdev.0,
        rdev.1,
        namesize as u32,
        0,
    ];
    out.extend_from_slice(b"070701");
    for f in fields {
        out.extend_from_slice(format!("{f:08x}").as_bytes());
    }
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
}

/// Serializes members (relative paths, sorted) as a newc cpio archive (uncompressed).
pub fn cpio(members: &BTreeMap<String, Member>) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, (name, m)) in members.iter().enumerate() {
        let ino = i as u32 + 1;
        match m {
            Member::Dir => newc_header(&mut out, ino, 0o040755, 2, 0, (0, 0), name),
            Member::CharDev { mode, major, minor } => {
                newc_header(&mut out, ino, 0o020000 | mode, 1, 0, (*major, *minor), name)
            }
            Member::File { mode, data } => {
                newc_header(
                    &mut out,
                    ino,
                    0o100000 | mode,
                    1,
                    data.len() as u32,
                    (0, 0),
                    name,
                );
                out.extend_from_slice(data);
                while !out.len().is_multiple_of(4) {
                    out.push(0);
                }
            }
        }
    }
    newc_header(&mut out, 0, 0, 1, 0, (0, 0), "TRAILER!!!");
    out
}

/// The members every initramfs here starts with: empty `/dev`, `/proc`, `/sys`, `/mnt`,
/// `/dev/console` (so the kernel can give PID 1 a console) and `/init` (0755).
pub fn init_members(init: Vec<u8>) -> BTreeMap<String, Member> {
    let mut members: BTreeMap<String, Member> = BTreeMap::new();
    for d in ["dev", "proc", "sys", "mnt"] {
        members.insert(d.to_string(), Member::Dir);
    }
    members.insert(
        "dev/console".into(),
        Member::CharDev {
            mode: 0o600,
            major: 5,
            minor: 1,
        },
    );
    members.insert(
        "init".into(),
        Member::File {
            mode: 0o755,
            data: init,
        },
    );
    members
}

/// Builds the compressed initramfs in memory.
pub fn build_initramfs(
    guest_init: &Path,
    kernel_modules: Option<&Path>,
) -> Result<(Vec<u8>, InitramfsSummary), InitramfsError> {
    let init = std::fs::read(guest_init).map_err(|source| InitramfsError::Read {
        path: guest_init.to_path_buf(),
        source,
    })?;
    check_static_elf(guest_init, &init)?;
    let mut members = init_members(init);
    let mut summary = InitramfsSummary {
        modules: Vec::new(),
        builtin: Vec::new(),
        size: 0,
    };
    if let Some(dir) = kernel_modules {
        let sel = select_modules(dir, &GUEST_MODULES)?;
        for f in &sel.files {
            let path = dir.join(f);
            let data =
                std::fs::read(&path).map_err(|source| InitramfsError::Read { path, source })?;
            let name = format!("{MODULES_DIR}/{f}");
            add_parents(&mut members, &name);
            members.insert(name, Member::File { mode: 0o644, data });
        }
        if !sel.wanted.is_empty() {
            let dep: String = sel
                .dep
                .iter()
                .map(|(m, deps)| {
                    format!(
                        "{m}:{}\n",
                        deps.iter().map(|d| format!(" {d}")).collect::<String>()
                    )
                })
                .collect();
            let load: String = sel.wanted.iter().map(|w| format!("{w}\n")).collect();
            let dep_name = format!("{MODULES_DIR}/modules.dep");
            add_parents(&mut members, &dep_name);
            members.insert(
                dep_name,
                Member::File {
                    mode: 0o644,
                    data: dep.into_bytes(),
                },
            );
            members.insert(
                format!("{MODULES_DIR}/modules.load"),
                Member::File {
                    mode: 0o644,
                    data: load.into_bytes(),
                },
            );
        }
        summary.modules = sel.files.into_iter().collect();
        summary.builtin = sel.builtin;
    }
    let raw = cpio(&members);
    let mut gz: GzEncoder<Vec<u8>> = GzBuilder::new()
        .mtime(0)
        .write(Vec::new(), Compression::new(6));
    gz.write_all(&raw)
        .and_then(|()| gz.try_finish())
        .map_err(|source| InitramfsError::Write {
            path: PathBuf::from("<memory>"),
            source,
        })?;
    let bytes = gz.finish().map_err(|source| InitramfsError::Write {
        path: PathBuf::from("<memory>"),
        source,
    })?;
    summary.size = bytes.len() as u64;
    Ok((bytes, summary))
}

/// Builds the initramfs and writes it atomically to `args.out`.
pub fn write_initramfs(args: &BuildInitramfsArgs) -> Result<InitramfsSummary, InitramfsError> {
    let (bytes, summary) = build_initramfs(&args.guest_init, args.kernel_modules.as_deref())?;
    let werr = |path: &Path| {
        let path = path.to_path_buf();
        move |source| InitramfsError::Write { path, source }
    };
    let file_name = args
        .out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = args
        .out
        .with_file_name(format!(".{file_name}.tmp-{}", std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp).map_err(werr(&tmp))?;
        f.write_all(&bytes).map_err(werr(&tmp))?;
        f.sync_all().map_err(werr(&tmp))?;
        std::fs::rename(&tmp, &args.out).map_err(werr(&args.out))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map(|()| summary)
}

/// `plfm-node-agent build-initramfs`: builds, writes, prints a summary.
pub fn run(args: &BuildInitramfsArgs) -> anyhow::Result<()> {
    let summary = write_initramfs(args)?;
    println!(
        "wrote {} ({} bytes): /init from {}, {} module files{}{}",
        args.out.display(),
        summary.size,
        args.guest_init.display(),
        summary.modules.len(),
        args.kernel_modules
            .as_ref()
            .map(|d| format!(" from {}", d.display()))
            .unwrap_or_default(),
        if summary.builtin.is_empty() {
            String::new()
        } else {
            format!("; built in: {}", summary.builtin.join(", "))
        }
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    /// A minimal static ELF64 header (no program headers).
    fn fake_static_elf() -> Vec<u8> {
        let mut b = vec![0u8; 64];
        b[..4].copy_from_slice(b"\x7fELF");
        b[4] = 2;
        b[5] = 1;
        b
    }

    fn fake_dynamic_elf() -> Vec<u8> {
        let mut b = fake_static_elf();
        b[0x20..0x28].copy_from_slice(&64u64.to_le_bytes());
        b[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        b[0x38..0x3a].copy_from_slice(&1u16.to_le_bytes());
        let mut ph = vec![0u8; 56];
        ph[..4].copy_from_slice(&3u32.to_le_bytes());
        b.extend(ph);
        b
    }

    fn fake_kernel(dir: &Path) {
        let files = [
            "kernel/drivers/virtio/virtio.ko",
            "kernel/drivers/virtio/virtio_ring.ko",
            "kernel/drivers/virtio/virtio_mmio.ko",
            "kernel/drivers/block/virtio_blk.ko",
            "kernel/drivers/net/virtio_net.ko",
            "kernel/drivers/net/net_failover.ko",
            "kernel/net/core/failover.ko",
            "kernel/net/vmw_vsock/vsock.ko",
            "kernel/net/vmw_vsock/vmw_vsock_virtio_transport_common.ko",
            "kernel/net/vmw_vsock/vmw_vsock_virtio_transport.ko",
            "kernel/fs/overlayfs/overlay.ko",
            "kernel/sound/unrelated.ko",
        ];
        for f in files {
            let p = dir.join(f);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(&p, format!("module {f}")).unwrap();
        }
        std::fs::write(
            dir.join("modules.dep"),
            "kernel/fs/overlayfs/overlay.ko:\n\
             kernel/drivers/virtio/virtio_mmio.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko\n\
             kernel/drivers/virtio/virtio.ko:\n\
             kernel/drivers/virtio/virtio_ring.ko:\n\
             kernel/drivers/block/virtio_blk.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko\n\
             kernel/drivers/net/virtio_net.ko: kernel/drivers/net/net_failover.ko kernel/net/core/failover.ko kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko\n\
             kernel/drivers/net/net_failover.ko: kernel/net/core/failover.ko\n\
             kernel/net/core/failover.ko:\n\
             kernel/net/vmw_vsock/vsock.ko:\n\
             kernel/net/vmw_vsock/vmw_vsock_virtio_transport_common.ko: kernel/net/vmw_vsock/vsock.ko\n\
             kernel/net/vmw_vsock/vmw_vsock_virtio_transport.ko: kernel/net/vmw_vsock/vmw_vsock_virtio_transport_common.ko kernel/net/vmw_vsock/vsock.ko kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko\n\
             kernel/sound/unrelated.ko:\n",
        )
        .unwrap();
        std::fs::write(
            dir.join("modules.builtin"),
            "kernel/fs/ext4/ext4.ko\nkernel/fs/jbd2/jbd2.ko\n",
        )
        .unwrap();
    }

    /// Parses a gzip newc archive into (name, mode, rdev, data).
    /// (name, mode, rdev, data) of one archive member.
    type Unpacked = (String, u32, (u32, u32), Vec<u8>);

    fn unpack(gz: &[u8]) -> Vec<Unpacked> {
        let mut raw = Vec::new();
        flate2::read::GzDecoder::new(gz)
            .read_to_end(&mut raw)
            .unwrap();
        let mut out = Vec::new();
        let mut off = 0;
        let field = |raw: &[u8], off: usize, i: usize| {
            u32::from_str_radix(
                std::str::from_utf8(&raw[off + 6 + i * 8..off + 14 + i * 8]).unwrap(),
                16,
            )
            .unwrap()
        };
        loop {
            assert_eq!(&raw[off..off + 6], b"070701");
            let mode = field(&raw, off, 1);
            let mtime = field(&raw, off, 5);
            assert_eq!(mtime, 0);
            let size = field(&raw, off, 6) as usize;
            let rdev = (field(&raw, off, 9), field(&raw, off, 10));
            let namesize = field(&raw, off, 11) as usize;
            let name = std::str::from_utf8(&raw[off + 110..off + 110 + namesize - 1])
                .unwrap()
                .to_string();
            let mut p = off + 110 + namesize;
            p = (p + 3) & !3;
            let data = raw[p..p + size].to_vec();
            p = (p + size + 3) & !3;
            off = p;
            if name == "TRAILER!!!" {
                return out;
            }
            out.push((name, mode, rdev, data));
        }
    }

    #[test]
    fn modules_are_resolved_with_their_dependencies() {
        let dir = tempfile::tempdir().unwrap();
        fake_kernel(dir.path());
        let sel = select_modules(dir.path(), &GUEST_MODULES).unwrap();
        assert_eq!(sel.builtin, ["ext4"]);
        assert_eq!(sel.wanted.len(), 6);
        assert_eq!(sel.files.len(), 11);
        assert!(sel.files.contains("kernel/net/core/failover.ko"));
        assert!(!sel.files.contains("kernel/sound/unrelated.ko"));
        let err = select_modules(dir.path(), &["nonexistent"]).unwrap_err();
        assert!(
            err.to_string()
                .contains("kernel module nonexistent is neither"),
            "{err}"
        );
    }

    #[test]
    fn module_names_normalize_suffix_and_dashes() {
        assert_eq!(module_name("kernel/a/virtio-blk.ko.xz"), "virtio_blk");
        assert_eq!(module_name("kernel/fs/ext4/ext4.ko"), "ext4");
        assert_eq!(module_name("overlay.ko.zst"), "overlay");
    }

    #[test]
    fn archive_has_init_console_and_modules_and_is_deterministic() {
        let dir = tempfile::tempdir().unwrap();
        fake_kernel(dir.path());
        let init = dir.path().join("guest-init");
        std::fs::write(&init, fake_static_elf()).unwrap();
        let (a, summary) = build_initramfs(&init, Some(dir.path())).unwrap();
        // Same inputs, same bytes; file mtimes do not matter.
        std::fs::File::options()
            .write(true)
            .open(&init)
            .unwrap()
            .set_modified(
                std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(12_345),
            )
            .unwrap();
        let (b, _) = build_initramfs(&init, Some(dir.path())).unwrap();
        assert_eq!(a, b);
        assert_eq!(summary.modules.len(), 11);
        assert_eq!(summary.size, a.len() as u64);

        let entries = unpack(&a);
        let names: Vec<&str> = entries.iter().map(|e| e.0.as_str()).collect();
        let mut sorted = names.clone();
        sorted.sort();
        assert_eq!(names, sorted, "entries are sorted");
        let get = |n: &str| {
            entries
                .iter()
                .find(|e| e.0 == n)
                .unwrap_or_else(|| panic!("{n} missing"))
        };
        assert_eq!(get("init").1, 0o100755);
        assert_eq!(get("init").3, fake_static_elf());
        assert_eq!(
            (get("dev/console").1, get("dev/console").2),
            (0o020600, (5, 1))
        );
        assert_eq!(get("lib/modules/plfm").1, 0o040755);
        let load = String::from_utf8(get("lib/modules/plfm/modules.load").3.clone()).unwrap();
        assert_eq!(load.lines().count(), 6);
        assert!(load.starts_with("kernel/drivers/virtio/virtio_mmio.ko\n"));
        let dep = String::from_utf8(get("lib/modules/plfm/modules.dep").3.clone()).unwrap();
        assert_eq!(dep.lines().count(), 11);
        assert!(!dep.contains("unrelated"));
        assert!(dep.contains("kernel/drivers/net/net_failover.ko: kernel/net/core/failover.ko\n"));
        assert_eq!(
            get("lib/modules/plfm/kernel/net/vmw_vsock/vsock.ko").3,
            b"module kernel/net/vmw_vsock/vsock.ko"
        );
    }

    #[test]
    fn kernel_without_modules_gets_init_only() {
        let dir = tempfile::tempdir().unwrap();
        let init = dir.path().join("guest-init");
        std::fs::write(&init, fake_static_elf()).unwrap();
        let (a, summary) = build_initramfs(&init, None).unwrap();
        assert!(summary.modules.is_empty());
        let names: Vec<String> = unpack(&a).into_iter().map(|e| e.0).collect();
        assert_eq!(names, ["dev", "dev/console", "init", "mnt", "proc", "sys"]);
    }

    #[test]
    fn dynamically_linked_guest_init_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let init = dir.path().join("guest-init");
        std::fs::write(&init, fake_dynamic_elf()).unwrap();
        let err = build_initramfs(&init, None).unwrap_err();
        assert!(err.to_string().contains("dynamically linked"), "{err}");
        std::fs::write(&init, b"#!/bin/sh\n").unwrap();
        assert!(build_initramfs(&init, None)
            .unwrap_err()
            .to_string()
            .contains("not a 64-bit"));
    }

    #[test]
    fn write_is_atomic_and_leaves_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let init = dir.path().join("guest-init");
        std::fs::write(&init, fake_static_elf()).unwrap();
        let args = BuildInitramfsArgs {
            kernel_modules: None,
            guest_init: init,
            out: dir.path().join("initramfs.img"),
        };
        run(&args).unwrap();
        let files: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(files.len(), 2, "{files:?}");
        assert!(std::fs::metadata(&args.out).unwrap().len() > 0);
    }
}
