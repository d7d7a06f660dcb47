//! Hostile and broken images pulled from a real loopback registry: each fails with
//! the right reason code and a message naming the cause, and nothing is written
//! outside the cache's build directory.

mod common;
mod image_support;

use image_support::*;
use plfm_node_agent::image::testtar::{extension_bomb_gz, Layer, TarEntry};
use plfm_node_agent::image::{ImageConfig, ImageError, ImageRef, ImageService, RootDisk};
use plfm_node_agent::instance::ReasonCode;

struct Case {
    rt: tokio::runtime::Runtime,
    reg: Registry,
    data: tempfile::TempDir,
    /// A directory outside the data dir that hostile layers aim at.
    outside: tempfile::TempDir,
}

impl Case {
    fn new() -> Case {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("victim"), b"original").unwrap();
        Case {
            rt,
            reg: Registry::start(),
            data: tempfile::tempdir().unwrap(),
            outside,
        }
    }

    fn push(&self, layers: Vec<Vec<u8>>) -> ImageRef {
        let layers: Vec<(Vec<u8>, &str)> = layers.into_iter().map(|l| (l, TAR)).collect();
        self.rt.block_on(
            self.reg
                .push("evil", &layers, &config_json(&[], &["sh"], &[])),
        )
    }

    fn ensure(&self, image: &ImageRef, config: ImageConfig) -> Result<RootDisk, ImageError> {
        let svc = ImageService::open(self.data.path(), config).unwrap();
        self.rt.block_on(svc.ensure_root_disk(image, "inst"))
    }

    fn fail(
        &self,
        image: &ImageRef,
        config: ImageConfig,
        reason: ReasonCode,
        needle: &str,
    ) -> ImageError {
        let err = self
            .ensure(image, config)
            .expect_err("the image must be refused");
        assert_eq!(err.reason(), reason, "{err}");
        assert!(err.to_string().contains(needle), "{needle:?} not in {err}");
        self.nothing_leaked();
        err
    }

    /// Makes the registry serve other bytes of the same length under `layer`'s
    /// digest, and checks `image` is then refused for a digest mismatch naming it.
    fn lie_about(&self, image: &ImageRef, layer: &[u8]) -> ImageError {
        let digest = plfm_node_agent::image::Digest::of(layer);
        let mut lie = layer.to_vec();
        lie[600] ^= 0xff;
        std::fs::write(self.reg.blob_data_path(digest.as_str()), &lie).unwrap();
        let err = self.fail(
            image,
            ImageConfig::default(),
            ReasonCode::ImagePullFailed,
            "digest mismatch (got sha256:",
        );
        assert!(
            err.to_string()
                .contains(&format!("blob {}", digest.short())),
            "{err}"
        );
        err
    }

    /// Outside dir untouched; no work left in the cache; no disk recorded.
    fn nothing_leaked(&self) {
        assert_eq!(names(self.outside.path()), vec!["victim"]);
        assert_eq!(
            std::fs::read(self.outside.path().join("victim")).unwrap(),
            b"original"
        );
        let images = self.data.path().join("images");
        assert!(
            names(&images.join("tmp")).is_empty(),
            "{:?}",
            tree(&images.join("tmp"))
        );
        assert!(names(&images.join("disks/sha256")).is_empty());
        let top = names(self.data.path());
        assert!(
            top.iter()
                .all(|n| n == "images" || n.starts_with("state.db")),
            "unexpected files in the data dir: {top:?}"
        );
        let svc = ImageService::open(self.data.path(), ImageConfig::default()).unwrap();
        assert!(svc.list().unwrap().is_empty());
    }
}

macro_rules! need {
    ($name:expr) => {
        if !prerequisites($name) {
            return;
        }
    };
}

#[test]
fn symlink_planted_by_a_lower_layer_cannot_be_written_through() {
    need!("symlink_planted_by_a_lower_layer_cannot_be_written_through");
    let c = Case::new();
    let out = c.outside.path().to_str().unwrap().to_string();
    let image = c.push(vec![
        Layer::new().symlink("etc", &out).tar(),
        Layer::new().file("etc/pwned", b"x").tar(),
    ]);
    // Each layer is unpacked into a disk of its own, so the second layer's `etc` is
    // a directory of its own disk: nothing follows the first layer's symlink. In the
    // stacked root the directory of the upper layer hides the lower symlink.
    let disk = c.ensure(&image, ImageConfig::default()).unwrap();
    assert_eq!(disk.layers.len(), 2);
    assert!(debugfs(&disk.layers[0], "stat /etc").contains("Type: symlink"));
    assert!(debugfs(&disk.layers[1], "stat /etc").contains("Type: directory"));
    assert!(debugfs(&disk.layers[1], "stat /etc/pwned").contains("Type: regular"));
    assert_eq!(names(c.outside.path()), vec!["victim"]);
    assert!(names(&c.data.path().join("images/tmp")).is_empty());
}

#[test]
fn relative_symlink_escape_in_one_layer_is_refused() {
    need!("relative_symlink_escape_in_one_layer_is_refused");
    let c = Case::new();
    let image = c.push(vec![Layer::new()
        .symlink("up", "../../../../../../../..")
        .file("up/tmp/pwned", b"x")
        .tar()]);
    c.fail(
        &image,
        ImageConfig::default(),
        ReasonCode::RootfsBuildFailed,
        "refused",
    );
}

#[test]
fn dotdot_paths_are_refused() {
    need!("dotdot_paths_are_refused");
    let c = Case::new();
    let image = c.push(vec![Layer::new()
        .entry(TarEntry::file_raw_path(b"a/../../../escaped", b"x"))
        .tar()]);
    c.fail(
        &image,
        ImageConfig::default(),
        ReasonCode::RootfsBuildFailed,
        "`..` component",
    );
}

#[test]
fn absolute_paths_are_refused() {
    need!("absolute_paths_are_refused");
    let c = Case::new();
    let target = c.outside.path().join("abs-escaped");
    let image = c.push(vec![Layer::new()
        .entry(TarEntry::file_raw_path(
            target.to_str().unwrap().as_bytes(),
            b"x",
        ))
        .tar()]);
    c.fail(
        &image,
        ImageConfig::default(),
        ReasonCode::RootfsBuildFailed,
        "absolute path",
    );
    assert!(!target.exists());
}

#[test]
fn hard_links_out_of_the_tree_are_refused() {
    need!("hard_links_out_of_the_tree_are_refused");
    let c = Case::new();
    let victim = c.outside.path().join("victim");
    let image = c.push(vec![Layer::new()
        .hardlink("stolen", victim.to_str().unwrap())
        .tar()]);
    c.fail(
        &image,
        ImageConfig::default(),
        ReasonCode::RootfsBuildFailed,
        "hard link target",
    );
    let out = c.outside.path().to_str().unwrap().to_string();
    let image = c.push(vec![
        Layer::new().symlink("o", &out).tar(),
        Layer::new().hardlink("stolen", "o/victim").tar(),
    ]);
    c.fail(
        &image,
        ImageConfig::default(),
        ReasonCode::RootfsBuildFailed,
        "symlink",
    );
}

#[test]
fn whiteouts_through_a_symlink_touch_nothing_outside() {
    need!("whiteouts_through_a_symlink_touch_nothing_outside");
    let c = Case::new();
    let out = c.outside.path().to_str().unwrap().to_string();
    // The whiteout and the opaque marker land in the upper layer's own disk, under a
    // directory `w` of that disk: the lower symlink is never followed.
    for upper in [
        Layer::new().whiteout("w/victim").tar(),
        Layer::new().opaque("w").tar(),
    ] {
        let image = c.push(vec![Layer::new().symlink("w", &out).tar(), upper]);
        let disk = c.ensure(&image, ImageConfig::default()).unwrap();
        assert!(debugfs(&disk.layers[1], "stat /w").contains("Type: directory"));
        assert_eq!(names(c.outside.path()), vec!["victim"]);
        assert_eq!(
            std::fs::read(c.outside.path().join("victim")).unwrap(),
            b"original"
        );
    }
}

#[test]
fn device_nodes_are_dropped_and_the_image_still_builds() {
    need!("device_nodes_are_dropped_and_the_image_still_builds");
    let c = Case::new();
    let image = c.push(vec![Layer::new()
        .dir("dev", 0o755)
        .entry(TarEntry::device("dev/sda", tar::EntryType::Block))
        .entry(TarEntry::device("dev/kmsg", tar::EntryType::Char))
        .file("dev/keep", b"k")
        .tar()]);
    let disk = c.ensure(&image, ImageConfig::default()).unwrap();
    let ls = debugfs(&disk.path, "ls /dev");
    assert!(
        ls.contains("keep") && !ls.contains("sda") && !ls.contains("kmsg"),
        "{ls}"
    );
}

#[test]
fn a_layer_whose_bytes_do_not_match_its_digest_is_refused_and_not_kept() {
    need!("a_layer_whose_bytes_do_not_match_its_digest_is_refused_and_not_kept");
    let c = Case::new();
    let layer = Layer::new().file("a", &[7u8; 4096]).tar();
    let image = c.push(vec![layer.clone()]);
    let err = c.lie_about(&image, &layer);
    assert!(err.to_string().contains(&c.reg.addr), "{err}");
    assert!(names(&c.data.path().join("images/blobs/sha256")).is_empty());
}

#[test]
fn a_truncated_blob_is_refused_and_not_kept() {
    need!("a_truncated_blob_is_refused_and_not_kept");
    let c = Case::new();
    let layer = Layer::new().file("a", &[9u8; 8192]).tar();
    let image = c.push(vec![layer.clone()]);
    let digest = plfm_node_agent::image::Digest::of(&layer);
    std::fs::write(
        c.reg.blob_data_path(digest.as_str()),
        &layer[..layer.len() / 2],
    )
    .unwrap();
    c.fail(
        &image,
        ImageConfig::default(),
        ReasonCode::ImagePullFailed,
        "truncated",
    );
    assert!(names(&c.data.path().join("images/blobs/sha256")).is_empty());
}

#[test]
fn a_manifest_over_the_size_limit_is_refused() {
    need!("a_manifest_over_the_size_limit_is_refused");
    let c = Case::new();
    let image = c.push(vec![Layer::new().file("a", b"x").tar()]);
    let small = ImageConfig {
        max_manifest_bytes: 200,
        ..Default::default()
    };
    c.fail(
        &image,
        small,
        ReasonCode::ImagePullFailed,
        "limit max_manifest_bytes exceeded",
    );
}

#[test]
fn size_and_layer_limits_name_the_limit() {
    need!("size_and_layer_limits_name_the_limit");
    let c = Case::new();
    let image = c.push(vec![
        Layer::new().file("a", &[1u8; 10_000]).tar(),
        Layer::new().file("b", &[2u8; 10_000]).tar(),
    ]);
    let cfg = |f: fn(&mut ImageConfig)| {
        let mut c = ImageConfig::default();
        f(&mut c);
        c
    };
    c.fail(
        &image,
        cfg(|c| c.max_layers = 1),
        ReasonCode::ImagePullFailed,
        "max_layers",
    );
    c.fail(
        &image,
        cfg(|c| c.max_compressed_bytes = 15_000),
        ReasonCode::ImagePullFailed,
        "max_compressed_bytes",
    );
    c.fail(
        &image,
        cfg(|c| c.max_unpacked_bytes = 15_000),
        ReasonCode::ImagePullFailed,
        "max_unpacked_bytes",
    );
}

#[test]
fn plain_http_to_a_non_loopback_registry_needs_insecure() {
    // No network: the config decides the scheme before any connection.
    let c = ImageConfig::default();
    assert!(!c.plain_http("registry.example.com:5000"));
    assert!(c.plain_http("127.0.0.1:5000"));
}

/// Runs inside `unshare --mount` with its data dir on a 4 MiB tmpfs (see below).
#[test]
fn helper_no_space() {
    let (Ok(data), Ok(reference)) = (
        std::env::var("PLFM_IMAGE_NOSPACE_DATA"),
        std::env::var("PLFM_IMAGE_NOSPACE_REF"),
    ) else {
        return;
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let image = ImageRef::parse_pinned(&reference).unwrap();
    // Unpacked in the data dir, not in memory staging, to fill the data dir.
    let config = ImageConfig {
        staging_memory_bytes: 0,
        ..Default::default()
    };
    let svc = ImageService::open(std::path::Path::new(&data), config).unwrap();
    let err = rt.block_on(svc.ensure_root_disk(&image, "i")).unwrap_err();
    println!(
        "RESULT reason={} no_space={} msg={err}",
        err.reason().as_str(),
        err.is_no_space()
    );
    let tmp = std::path::Path::new(&data).join("images/tmp");
    println!(
        "TMP_EMPTY={}",
        std::fs::read_dir(tmp).unwrap().next().is_none()
    );
}

#[test]
fn a_full_disk_while_unpacking_is_rootfs_build_failed_with_no_space() {
    need!("a_full_disk_while_unpacking_is_rootfs_build_failed_with_no_space");
    if std::process::Command::new("unshare")
        .arg("--version")
        .output()
        .is_err()
    {
        common::gate::skip_or_fail("unshare (util-linux)");
        return;
    }
    let c = Case::new();
    // 16 MiB of zeros: a tiny blob that does not fit the 4 MiB file system unpacked.
    let layer = Layer::new().file("big", &vec![0u8; 16 << 20]).tar_gz();
    let image = c.rt.block_on(c.reg.push(
        "full",
        &[(layer, GZIP)],
        &config_json(&[], &["sh"], &[]),
    ));
    let mnt = tempfile::tempdir().unwrap();
    let data = mnt.path().join("data");
    // A private mount namespace: the tmpfs disappears with the process.
    let script = format!(
        "mount -t tmpfs -o size=4m plfm-test {mnt} && mkdir {data} && exec \"$0\" --exact helper_no_space --nocapture --test-threads=1",
        mnt = mnt.path().display(),
        data = data.display()
    );
    let out = std::process::Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .arg(std::env::current_exe().unwrap())
        .env("PLFM_IMAGE_NOSPACE_DATA", &data)
        .env("PLFM_IMAGE_NOSPACE_REF", image.pinned())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains(
            "RESULT reason=rootfs_build_failed no_space=true msg=no space left on device"
        ),
        "{stdout}"
    );
    assert!(stdout.contains("TMP_EMPTY=true"), "{stdout}");
}

// ----- bounded memory and time (issue 13, "one small layer kills the node") -----

/// Pushes one gzip layer.
fn push_gz(c: &Case, repo: &str, layer: Vec<u8>) -> ImageRef {
    c.rt.block_on(
        c.reg
            .push(repo, &[(layer, GZIP)], &config_json(&[], &["sh"], &[])),
    )
}

#[test]
fn pax_header_bomb_is_refused_without_reading_it_into_memory() {
    need!("pax_header_bomb_is_refused_without_reading_it_into_memory");
    let c = Case::new();
    // Four PAX headers declaring 8 MiB bodies each (32 KiB of gzip): the tar crate's
    // own preprocessing would read each body whole.
    let layer = extension_bomb_gz(tar::EntryType::XHeader, 8 << 20, 4, b'0');
    let image = push_gz(&c, "paxbomb", layer);
    let err = c.fail(
        &image,
        ImageConfig::default(),
        ReasonCode::ImagePullFailed,
        "limit max_tar_extension_bytes exceeded",
    );
    assert!(
        err.to_string().contains("PAX header of 8388608 bytes"),
        "{err}"
    );
    // Global headers too.
    let layer = extension_bomb_gz(tar::EntryType::XGlobalHeader, 8 << 20, 1, b'0');
    let image = push_gz(&c, "paxgbomb", layer);
    c.fail(
        &image,
        ImageConfig::default(),
        ReasonCode::ImagePullFailed,
        "max_tar_extension_bytes",
    );
}

#[test]
fn gnu_long_name_bomb_is_refused() {
    need!("gnu_long_name_bomb_is_refused");
    let c = Case::new();
    for (kind, what) in [
        (tar::EntryType::GNULongName, "GNU long name"),
        (tar::EntryType::GNULongLink, "GNU long link"),
    ] {
        let layer = extension_bomb_gz(kind, 8 << 20, 2, b'a');
        let image = push_gz(&c, "gnubomb", layer);
        let err = c.fail(
            &image,
            ImageConfig::default(),
            ReasonCode::ImagePullFailed,
            "limit max_tar_extension_bytes exceeded",
        );
        assert!(err.to_string().contains(what), "{err}");
    }
}

#[test]
fn too_many_entries_is_refused() {
    need!("too_many_entries_is_refused");
    let c = Case::new();
    let mut l1 = Layer::new();
    let mut l2 = Layer::new();
    for i in 0..4 {
        l1 = l1.file(&format!("a{i}"), b"x");
        l2 = l2.file(&format!("b{i}"), b"x");
    }
    let image = c.push(vec![l1.tar(), l2.tar()]);
    // Counted over the image: 8 entries in two layers of 4.
    let cfg = ImageConfig {
        max_entries: 7,
        ..Default::default()
    };
    c.fail(
        &image,
        cfg,
        ReasonCode::ImagePullFailed,
        "limit max_entries exceeded (more than 7 tar entries in the image)",
    );
    let cfg = ImageConfig {
        max_entries: 8,
        ..Default::default()
    };
    c.ensure(&image, cfg).unwrap();
}

#[test]
fn hostile_digest_is_not_retried_in_a_tight_loop() {
    need!("hostile_digest_is_not_retried_in_a_tight_loop");
    let c = Case::new();
    let image = c.push(vec![Layer::new()
        .entry(TarEntry::file_raw_path(b"../../escape", b"x"))
        .tar()]);
    let svc = ImageService::open(c.data.path(), ImageConfig::default()).unwrap();
    let manifest = format!("/manifests/{}", image.digest);
    let first =
        c.rt.block_on(svc.ensure_root_disk(&image, "inst"))
            .unwrap_err();
    assert_eq!(first.reason(), ReasonCode::RootfsBuildFailed, "{first}");
    wait_for(
        "the registry logs the first manifest GET",
        std::time::Duration::from_secs(10),
        || c.reg.gets(&manifest) >= 1,
    );
    let served = c.reg.gets(&manifest);
    for _ in 0..50 {
        let again =
            c.rt.block_on(svc.ensure_root_disk(&image, "inst"))
                .unwrap_err();
        assert!(
            matches!(again, ImageError::CachedFailure { .. }),
            "retried: {again}"
        );
        assert_eq!(again.reason(), ReasonCode::RootfsBuildFailed);
        let msg = again.to_string();
        assert!(msg.contains("`..` component"), "{msg}");
        assert!(
            msg.contains("cached failure #1: not retried for another"),
            "{msg}"
        );
    }
    assert_eq!(
        c.reg.gets(&manifest),
        served,
        "the registry was asked again"
    );
    c.nothing_leaked();
}

#[test]
fn a_missing_manifest_is_not_retried_in_a_tight_loop() {
    need!("a_missing_manifest_is_not_retried_in_a_tight_loop");
    let c = Case::new();
    let pushed = c.push(vec![Layer::new().file("a", b"x").tar()]);
    let missing = ImageRef::parse_pinned(&format!(
        "{}/{}@{}",
        pushed.registry,
        pushed.repository,
        plfm_node_agent::image::Digest::of(b"never pushed")
    ))
    .unwrap();
    let svc = ImageService::open(c.data.path(), ImageConfig::default()).unwrap();
    let first =
        c.rt.block_on(svc.ensure_root_disk(&missing, "inst"))
            .unwrap_err();
    assert_eq!(first.reason(), ReasonCode::ImagePullFailed);
    assert!(first.to_string().contains("not found"), "{first}");
    let again =
        c.rt.block_on(svc.ensure_root_disk(&missing, "inst"))
            .unwrap_err();
    assert!(
        matches!(again, ImageError::CachedFailure { .. }),
        "retried: {again}"
    );
    // The image that exists is not affected.
    c.rt.block_on(svc.ensure_root_disk(&pushed, "other"))
        .unwrap();
}

#[test]
fn an_unreachable_registry_is_retried_every_time() {
    // Transient failures are never cached: each request tries the registry again.
    let port = common::free_port();
    let image = ImageRef::parse_pinned(&format!(
        "127.0.0.1:{port}/app@{}",
        plfm_node_agent::image::Digest::of(b"x")
    ))
    .unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let data = tempfile::tempdir().unwrap();
    let svc = ImageService::open(data.path(), ImageConfig::default()).unwrap();
    for _ in 0..3 {
        let err = rt.block_on(svc.ensure_root_disk(&image, "i")).unwrap_err();
        assert!(
            !matches!(err, ImageError::CachedFailure { .. }),
            "a transient failure was cached: {err}"
        );
        assert_eq!(err.reason(), ReasonCode::ImagePullFailed, "{err}");
    }
}

#[test]
fn a_lying_layer_of_a_merged_disk_is_refused_whether_it_streams_or_is_stored() {
    need!("a_lying_layer_of_a_merged_disk_is_refused_whether_it_streams_or_is_stored");
    // Ten layers: the bottom three share one disk. Its bottom layer streams into the
    // disk; the other two are stored first. A lie in either is the error reported.
    let n = plfm_node_agent::image::MAX_LAYER_DISKS + 2;
    for liar in [0usize, 1] {
        let c = Case::new();
        let layers: Vec<Vec<u8>> = (0..n)
            .map(|i| {
                Layer::new()
                    .file(&format!("l/{i}"), &vec![i as u8; 30_000])
                    .tar()
            })
            .collect();
        let image = c.push(layers.clone());
        c.lie_about(&image, &layers[liar]);
        let digest = plfm_node_agent::image::Digest::of(&layers[liar]);
        assert!(
            !names(&c.data.path().join("images/blobs/sha256")).contains(&digest.hex().to_string()),
            "layer {liar}: the lying blob was stored"
        );
    }
}
