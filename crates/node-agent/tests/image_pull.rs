//! Pull → root disk against a real `docker-registry` on loopback; disks are read
//! back with `debugfs` (no mount).

mod common;
mod image_support;

use std::path::Path;
use std::time::{Duration, Instant};

use image_support::*;
use plfm_node_agent::image::config::DiskBuilder;
use plfm_node_agent::image::testtar::{Layer, TarEntry};
use plfm_node_agent::image::{merge_process, ImageError, ImageService};
use plfm_node_agent::instance::ReasonCode;

fn busybox_layers() -> Vec<(Vec<u8>, &'static str)> {
    let busybox = std::fs::read("/bin/busybox").expect("read /bin/busybox");
    let base = Layer::new()
        .dir("bin", 0o755)
        .dir("etc", 0o755)
        .dir("tmp", 0o1777)
        .entry(TarEntry::dir("home/user", 0o750).owner(1000, 1000))
        .entry(TarEntry::file("bin/busybox", &busybox, 0o755))
        .hardlink("bin/sh", "bin/busybox")
        .symlink("bin/ls", "busybox")
        .file(
            "etc/passwd",
            b"root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000::/home/user:/bin/sh\n",
        )
        .file("etc/motd", b"welcome\n")
        .entry(TarEntry::file("etc/secret", b"s", 0o600).owner(1000, 1000))
        .file("var/cache/app/old1", b"1")
        .file("var/cache/app/old2", b"2")
        .entry(TarEntry::device("dev/null", tar::EntryType::Char))
        .tar_gz();
    let top = Layer::new()
        .whiteout("etc/motd")
        .opaque("var/cache/app")
        .file("var/cache/app/new", b"n")
        .file("etc/hostname", b"plfm\n")
        .entry(TarEntry::file("bin/suid", b"#!/bin/sh\n", 0o4755))
        .tar();
    let top = zstd::encode_all(&top[..], 3).expect("zstd");
    vec![(base, GZIP), (top, ZSTD)]
}

/// A registry serving the busybox image (entrypoint-less, `cmd = ["sh"]`).
fn busybox_registry(rt: &tokio::runtime::Runtime) -> (Registry, plfm_node_agent::image::ImageRef) {
    let reg = Registry::start();
    let image = rt.block_on(reg.push(
        "busybox",
        &busybox_layers(),
        &config_json(&[], &["sh"], &[]),
    ));
    (reg, image)
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

#[test]
fn busybox_image_becomes_an_ext4_disk_with_the_expected_tree() {
    if !prerequisites("busybox_image_becomes_an_ext4_disk_with_the_expected_tree") {
        return;
    }
    busybox_case(DiskBuilder::Direct);
}

#[test]
fn busybox_image_becomes_an_ext4_disk_with_the_expected_tree_with_mkfs() {
    if !prerequisites("busybox_image_becomes_an_ext4_disk_with_the_expected_tree_with_mkfs") {
        return;
    }
    busybox_case(DiskBuilder::Mkfs);
}

fn config_for(reg: &Registry, builder: DiskBuilder) -> plfm_node_agent::image::ImageConfig {
    let mut c = reg.image_config();
    c.disk_builder = builder;
    c
}

fn busybox_case(builder: DiskBuilder) {
    let rt = rt();
    let reg = Registry::start();
    let config = config_json(
        &["/bin/sh"],
        &["-c", "echo hi"],
        &["PATH=/bin", "MODE=image"],
    );
    let image = rt.block_on(reg.push("busybox", &busybox_layers(), &config));
    let data = tempfile::tempdir().unwrap();
    let svc = ImageService::open(data.path(), config_for(&reg, builder)).unwrap();
    let disk = rt.block_on(svc.ensure_root_disk(&image, "inst-1")).unwrap();

    assert!(disk.path.starts_with(data.path().join("images")));
    assert_eq!(disk.digest, image.digest);
    // One read-only disk per layer, bottom first.
    assert_eq!(disk.layers.len(), 2);
    assert_eq!(disk.path, disk.layers[0]);
    let sizes: u64 = disk
        .layers
        .iter()
        .map(|l| std::fs::metadata(l).unwrap().len())
        .sum();
    assert_eq!(sizes, disk.size_bytes);

    // Each file system is clean.
    for l in &disk.layers {
        let fsck = std::process::Command::new("e2fsck")
            .args(["-fn"])
            .arg(l)
            .output()
            .unwrap();
        assert!(
            fsck.status.success(),
            "e2fsck: {}",
            String::from_utf8_lossy(&fsck.stdout)
        );
        // The mkfs builder adds metadata checksums (after mkfs, see rootfs.rs); the
        // direct one writes none and keeps no backup superblocks (see ext4.rs).
        let header = std::process::Command::new("dumpe2fs")
            .arg("-h")
            .arg(l)
            .output()
            .unwrap();
        let header = String::from_utf8_lossy(&header.stdout);
        let features = header
            .lines()
            .find(|l| l.starts_with("Filesystem features:"))
            .unwrap_or("");
        match builder {
            DiskBuilder::Mkfs => assert!(features.contains("metadata_csum"), "{features}"),
            DiskBuilder::Direct => assert!(
                features.contains("sparse_super2") && !features.contains("metadata_csum"),
                "{features}"
            ),
        }
    }

    // The top layer keeps its whiteout and opaque marker for the overlay.
    assert_eq!(
        overlay_marks(&disk.layers[1]),
        (
            vec!["etc/motd".to_string()],
            vec!["var/cache/app".to_string()]
        )
    );
    assert_eq!(overlay_marks(&disk.layers[0]), (vec![], vec![]));

    // The merged tree: whiteouts, opaque dir, devices dropped.
    let t = merged(&disk.layers);
    let root = t.path();
    assert_eq!(
        names(&root.join("etc")),
        vec!["hostname", "passwd", "secret"]
    );
    assert_eq!(names(&root.join("var/cache/app")), vec!["new"]);
    assert!(!root.join("dev/null").exists());
    assert_eq!(
        std::fs::read_link(root.join("bin/ls")).unwrap(),
        Path::new("busybox")
    );
    assert_eq!(
        std::fs::read(root.join("bin/busybox")).unwrap(),
        std::fs::read("/bin/busybox").unwrap()
    );
    // Modes and ownership.
    let st = |p: &str| stat_in(&disk.layers, p);
    assert_eq!(st("/tmp"), (0o1777, 0, 0));
    assert_eq!(st("/bin/suid"), (0o4755, 0, 0));
    assert_eq!(st("/etc/secret"), (0o600, 1000, 1000));
    assert_eq!(st("/home/user"), (0o750, 1000, 1000));
    assert_eq!(st("/bin/busybox"), (0o755, 0, 0));
    assert_eq!(st("/"), (0o755, 0, 0));
    // Hard link: one inode, two links.
    let ls = debugfs(&disk.path, "ls -l /bin");
    let ino = |name: &str| {
        ls.lines()
            .find(|l| l.split_whitespace().last() == Some(name))
            .and_then(|l| l.split_whitespace().next())
            .map(str::to_string)
            .unwrap_or_else(|| panic!("{name} not in {ls}"))
    };
    assert_eq!(ino("sh"), ino("busybox"));
    assert!(debugfs(&disk.path, "stat /bin/sh").contains("Links: 2"));

    // Image defaults come back and merge under the spec.
    assert_eq!(disk.config.entrypoint, vec!["/bin/sh"]);
    let merged = merge_process(&disk.config, &[], None, None);
    assert_eq!(merged.argv, vec!["/bin/sh", "-c", "echo hi"]);
    assert_eq!(merged.cwd, "/srv");

    // Second request: cache hit, same disk, no new pull.
    let manifest_path = format!("/manifests/{}", image.digest);
    let gets = reg.gets(&manifest_path);
    assert_eq!(gets, 1, "one manifest GET for the first pull");
    let t0 = Instant::now();
    let again = rt.block_on(svc.ensure_root_disk(&image, "inst-2")).unwrap();
    let warm = t0.elapsed();
    assert_eq!(again, disk);
    assert_eq!(svc.metrics().pulls.get(), 1);
    assert_eq!(svc.metrics().builds.get(), 1);
    assert_eq!(svc.metrics().cache_hits.get(), 1);
    assert_eq!(reg.gets(&manifest_path), gets);
    eprintln!("warm cache lookup: {warm:?}");
    assert!(
        warm < Duration::from_millis(100),
        "warm lookup took {warm:?}"
    );

    // The pins are recorded; list shows two references.
    let rows = svc.list().unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].refs, 2);
    // Blobs are dropped after the build (keep_blobs = false), tmp is empty.
    assert!(names(&data.path().join("images/tmp")).is_empty());
    assert!(names(&data.path().join("images/blobs/sha256")).is_empty());
    // The image's metadata file.
    let meta = data.path().join(format!(
        "images/disks/sha256/{}.v2.json",
        image.digest.hex()
    ));
    let meta: serde_json::Value = serde_json::from_slice(&std::fs::read(meta).unwrap()).unwrap();
    assert_eq!(meta["digest"], image.digest.as_str());
}

#[test]
fn the_same_digest_yields_a_byte_identical_disk() {
    if !prerequisites("the_same_digest_yields_a_byte_identical_disk") {
        return;
    }
    let rt = rt();
    let (reg, image) = busybox_registry(&rt);
    let a = tempfile::tempdir().unwrap();
    // The mkfs builder: the one that unpacks into a tree on the host.
    let svc_a = ImageService::open(a.path(), config_for(&reg, DiskBuilder::Mkfs)).unwrap();
    let disk_a = rt.block_on(svc_a.ensure_root_disk(&image, "x")).unwrap();
    assert_eq!(
        svc_a.metrics().staging_fallbacks.get(),
        0,
        "the first build unpacks in memory (/dev/shm)"
    );
    // Make sure the second build happens in a later second of the clock, so host
    // ctimes and atimes differ between the two unpacked trees.
    let now = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    };
    let t0 = now();
    wait_for("the clock's next second", Duration::from_secs(3), || {
        now() > t0
    });
    // The second build's memory staging is too small for any layer, so each is
    // unpacked on disk after all: where a layer is unpacked must not change the disk.
    let b = tempfile::tempdir().unwrap();
    let mut on_disk = config_for(&reg, DiskBuilder::Mkfs);
    on_disk.staging_memory_bytes = 2;
    let svc_b = ImageService::open(b.path(), on_disk).unwrap();
    let disk_b = rt.block_on(svc_b.ensure_root_disk(&image, "x")).unwrap();
    assert_eq!(
        svc_b.metrics().staging_fallbacks.get(),
        2,
        "both layers fell back"
    );
    // `cmp` rather than hashing here: sha2 in a debug build needs a minute per GiB.
    // Every layer disk, the one with the whiteout and opaque marks too.
    assert_eq!(disk_a.layers.len(), disk_b.layers.len());
    for (la, lb) in disk_a.layers.iter().zip(&disk_b.layers) {
        let same = std::process::Command::new("cmp")
            .arg("-s")
            .arg(la)
            .arg(lb)
            .status()
            .unwrap();
        assert!(
            same.success(),
            "layer disks of the same digest differ: {la:?} {lb:?}"
        );
        assert_ne!(la, lb);
    }
}

/// Every path of the merged layers with its mode, owner, mtime and content (or
/// link target), read back with `debugfs`.
fn listing(layers: &[std::path::PathBuf]) -> Vec<String> {
    let t = merged(layers);
    tree(t.path())
        .into_iter()
        .filter(|p| p != "lost+found")
        .map(|p| {
            let abs = t.path().join(&p);
            let what = match std::fs::symlink_metadata(&abs) {
                Ok(m) if m.file_type().is_symlink() => {
                    format!("-> {:?}", std::fs::read_link(&abs).unwrap())
                }
                Ok(m) if m.is_file() => {
                    format!("{} bytes {:x}", m.len(), crc(&std::fs::read(&abs).unwrap()))
                }
                Ok(m) => format!("{:?}", m.file_type()),
                Err(e) => format!("{e}"),
            };
            let top = layers
                .iter()
                .rev()
                .find(|d| !debugfs(d, &format!("stat \"/{p}\"")).is_empty())
                .unwrap();
            let st = debugfs(top, &format!("stat \"/{p}\""));
            let mtime = st
                .lines()
                .find_map(|l| l.trim().strip_prefix("mtime:"))
                .unwrap_or("")
                .to_string();
            format!(
                "{p} {:?} {what} mtime{mtime}",
                stat_in(layers, &format!("/{p}"))
            )
        })
        .collect()
}

fn crc(b: &[u8]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    b.hash(&mut h);
    h.finish()
}

#[test]
fn the_direct_builder_is_deterministic_and_gives_the_tree_mkfs_gives() {
    if !prerequisites("the_direct_builder_is_deterministic_and_gives_the_tree_mkfs_gives") {
        return;
    }
    let rt = rt();
    let (reg, image) = busybox_registry(&rt);
    let build = |builder| {
        let d = tempfile::tempdir().unwrap();
        let svc = ImageService::open(d.path(), config_for(&reg, builder)).unwrap();
        let disk = rt.block_on(svc.ensure_root_disk(&image, "x")).unwrap();
        (d, disk)
    };
    let (_a, direct_a) = build(DiskBuilder::Direct);
    let (_b, direct_b) = build(DiskBuilder::Direct);
    let (_c, mkfs) = build(DiskBuilder::Mkfs);
    for (la, lb) in direct_a.layers.iter().zip(&direct_b.layers) {
        let same = std::process::Command::new("cmp")
            .arg("-s")
            .arg(la)
            .arg(lb)
            .status()
            .unwrap();
        assert!(same.success(), "direct layer disks of one digest differ");
    }
    // Layer by layer (so whiteouts and opaque marks count too) and merged.
    for (d, m) in direct_a.layers.iter().zip(&mkfs.layers) {
        assert_eq!(overlay_marks(d), overlay_marks(m));
        assert_eq!(
            listing(std::slice::from_ref(d)),
            listing(std::slice::from_ref(m))
        );
    }
    let l = listing(&direct_a.layers);
    assert!(l.iter().any(|e| e.starts_with("bin/busybox ")), "{l:?}");
    assert_eq!(l, listing(&mkfs.layers));
}

#[test]
fn an_index_digest_is_refused_with_a_clear_message() {
    if !prerequisites("an_index_digest_is_refused_with_a_clear_message") {
        return;
    }
    let rt = rt();
    let reg = Registry::start();
    let image = rt.block_on(reg.push("multi", &busybox_layers()[..1], &config_json(&[], &[], &[])));
    // An index pointing at the image's manifest.
    let manifest_size = 0;
    let index = rt.block_on(reg.push_with(
        "multi",
        &busybox_layers()[..1],
        &config_json(&[], &[], &[]),
        |_| {
            serde_json::json!({
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.index.v1+json",
                "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                               "digest": image.digest.to_string(), "size": manifest_size,
                               "platform": {"os": "linux", "architecture": "amd64"}}]
            })
        },
    ));
    let data = tempfile::tempdir().unwrap();
    let svc = ImageService::open(data.path(), reg.image_config()).unwrap();
    let err = rt.block_on(svc.ensure_root_disk(&index, "i")).unwrap_err();
    assert_eq!(err.reason(), ReasonCode::ImagePullFailed);
    assert!(err.to_string().contains("is an image index"), "{err}");
    assert!(
        matches!(err, ImageError::Shared(ref e) if matches!(**e, ImageError::IndexNotAllowed { .. }))
    );
}

#[test]
fn a_missing_manifest_is_final_and_an_unreachable_registry_is_transient() {
    if !prerequisites("a_missing_manifest_is_final_and_an_unreachable_registry_is_transient") {
        return;
    }
    let rt = rt();
    let reg = Registry::start();
    let data = tempfile::tempdir().unwrap();
    let svc = ImageService::open(data.path(), reg.image_config()).unwrap();
    let missing = plfm_node_agent::image::ImageRef::parse_pinned(&format!(
        "{}/nothing@{}",
        reg.addr,
        plfm_node_agent::image::Digest::of(b"none")
    ))
    .unwrap();
    let err = rt
        .block_on(svc.ensure_root_disk(&missing, "i"))
        .unwrap_err();
    assert_eq!(err.reason(), ReasonCode::ImagePullFailed);
    assert!(err.to_string().contains("127.0.0.1"), "{err}");
    assert!(
        !err.is_transient(),
        "a digest the registry does not have is the image's failure: {err}"
    );
    let addr = reg.addr.clone();
    drop(reg);
    let gone = plfm_node_agent::image::ImageRef::parse_pinned(&format!(
        "{addr}/app@{}",
        plfm_node_agent::image::Digest::of(b"x")
    ))
    .unwrap();
    let err = rt.block_on(svc.ensure_root_disk(&gone, "i")).unwrap_err();
    assert_eq!(err.reason(), ReasonCode::ImagePullFailed);
    assert!(
        err.is_transient(),
        "an unreachable registry is retried without spending the budget: {err}"
    );
}

#[test]
fn basic_auth_comes_from_the_config_and_missing_credentials_are_refused() {
    if !prerequisites("basic_auth_comes_from_the_config_and_missing_credentials_are_refused") {
        return;
    }
    let rt = rt();
    let reg = Registry::start_with_basic_auth();
    let image = rt.block_on(reg.push(
        "private",
        &busybox_layers()[..1],
        &config_json(&[], &["sh"], &[]),
    ));
    let secrets = tempfile::tempdir().unwrap();
    let pw = secrets.path().join("password");
    std::fs::write(&pw, format!("{TEST_PASSWORD}\n")).unwrap();
    let with = |password_file: &Path| {
        let mut c = plfm_node_agent::image::ImageConfig::default();
        c.registries.insert(
            reg.addr.clone(),
            plfm_node_agent::image::RegistryConfig {
                username: Some(TEST_USER.into()),
                password_file: Some(password_file.to_path_buf()),
                insecure: true,
                ..Default::default()
            },
        );
        c
    };

    // Anonymous: refused by the registry.
    let data = tempfile::tempdir().unwrap();
    let svc = ImageService::open(data.path(), reg.image_config()).unwrap();
    let err = rt.block_on(svc.ensure_root_disk(&image, "i")).unwrap_err();
    assert_eq!(err.reason(), ReasonCode::ImagePullFailed, "{err}");

    // Wrong password: refused, and the password is not in the message.
    let bad = secrets.path().join("bad");
    std::fs::write(&bad, "wrong-password\n").unwrap();
    let svc = ImageService::open(data.path(), with(&bad)).unwrap();
    let err = rt.block_on(svc.ensure_root_disk(&image, "i")).unwrap_err();
    assert_eq!(err.reason(), ReasonCode::ImagePullFailed, "{err}");
    assert!(!err.to_string().contains("wrong-password"), "{err}");

    // Right password from the file: pulled and built.
    let svc = ImageService::open(data.path(), with(&pw)).unwrap();
    let disk = rt.block_on(svc.ensure_root_disk(&image, "i")).unwrap();
    assert!(disk.path.is_file());
}
