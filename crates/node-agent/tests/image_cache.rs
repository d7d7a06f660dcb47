//! The cache against a real loopback registry: single flight, LRU eviction that
//! spares pinned disks, and recovery after the process is killed mid-pull and
//! mid-build.

mod common;
mod image_support;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use image_support::*;
use plfm_node_agent::image::testtar::Layer;
use plfm_node_agent::image::{Digest, ImageConfig, ImageRef, ImageService};

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn small_image(tag: &str) -> Vec<(Vec<u8>, &'static str)> {
    vec![
        (Layer::new().file("etc/name", tag.as_bytes()).tar_gz(), GZIP),
        (
            Layer::new()
                .file(&format!("srv/{tag}"), &[1u8; 50_000])
                .tar_gz(),
            GZIP,
        ),
    ]
}

#[test]
fn eight_concurrent_requests_share_one_pull_and_one_build() {
    if !prerequisites("eight_concurrent_requests_share_one_pull_and_one_build") {
        return;
    }
    let rt = rt();
    let reg = Registry::start();
    let layers = small_image("one");
    let image = rt.block_on(reg.push("app", &layers, &config_json(&[], &["x"], &[])));
    let data = tempfile::tempdir().unwrap();
    let svc = ImageService::open(data.path(), reg.image_config()).unwrap();
    let disks = rt.block_on(async {
        let tasks: Vec<_> = (0..8)
            .map(|i| {
                let svc = svc.clone();
                let image = image.clone();
                tokio::spawn(
                    async move { svc.ensure_root_disk(&image, &format!("inst-{i}")).await },
                )
            })
            .collect();
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.unwrap().unwrap());
        }
        out
    });
    assert!(disks.iter().all(|d| *d == disks[0]));
    let m = svc.metrics();
    assert_eq!(m.pulls.get(), 1, "pulls");
    assert_eq!(m.builds.get(), 1, "builds");
    assert_eq!(m.cache_misses.get(), 1, "misses");
    assert_eq!(m.cache_hits.get(), 7, "hits");
    // The registry agrees: one manifest GET and one GET per layer.
    assert_eq!(reg.gets(&format!("/manifests/{}", image.digest)), 1);
    for (blob, _) in &layers {
        assert_eq!(reg.gets(&format!("/blobs/{}", Digest::of(blob))), 1);
    }
    let rows = svc.list().unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].refs, 8);
}

#[test]
fn eviction_removes_the_least_recently_used_unreferenced_disks_only() {
    if !prerequisites("eviction_removes_the_least_recently_used_unreferenced_disks_only") {
        return;
    }
    let rt = rt();
    let reg = Registry::start();
    let data = tempfile::tempdir().unwrap();
    let big = ImageConfig {
        cache_max_bytes: u64::MAX / 4,
        ..Default::default()
    };
    let svc = ImageService::open(data.path(), big).unwrap();
    let mut images = Vec::new();
    for name in ["a", "b", "c", "d"] {
        let image = rt.block_on(reg.push(name, &small_image(name), &config_json(&[], &["x"], &[])));
        rt.block_on(svc.ensure_root_disk(&image, &format!("inst-{name}")))
            .unwrap();
        images.push(image);
    }
    // a stays desired (pinned) although it is the least recently used; b, c, d not.
    for name in ["b", "c", "d"] {
        svc.unpin(&format!("inst-{name}")).unwrap();
    }
    let rows = svc.list().unwrap();
    assert_eq!(rows.len(), 4);
    let total: u64 = rows.iter().map(|r| r.allocated_bytes).sum();
    let size_of = |img: &ImageRef| {
        rows.iter()
            .find(|r| r.digest == img.digest.as_str())
            .unwrap()
            .allocated_bytes
    };
    // Usage is above the high-water mark; the low-water mark is reached by removing
    // exactly one disk: b, the oldest unreferenced.
    let cfg = ImageConfig {
        cache_max_bytes: total,
        high_water: 0.99,
        low_water: (total - size_of(&images[1])) as f64 / total as f64,
        ..Default::default()
    };
    drop(svc);
    let svc = ImageService::open(data.path(), cfg).unwrap();
    let report = svc.gc().unwrap();
    assert_eq!(report.evicted, vec![images[1].digest.to_string()]);
    assert_eq!(svc.metrics().evictions.get(), 1);
    let left: Vec<String> = svc.list().unwrap().into_iter().map(|r| r.digest).collect();
    assert!(
        left.contains(&images[0].digest.to_string()),
        "pinned disk evicted"
    );
    assert!(!Path::new(
        &rows
            .iter()
            .find(|r| r.digest == images[1].digest.as_str())
            .unwrap()
            .path
    )
    .exists());

    // A tiny cache: everything unreferenced goes, the pinned disk survives.
    drop(svc);
    let tiny = ImageConfig {
        cache_max_bytes: 1,
        ..Default::default()
    };
    let svc = ImageService::open(data.path(), tiny).unwrap();
    let report = svc.gc().unwrap();
    assert_eq!(report.evicted.len(), 2);
    let left = svc.list().unwrap();
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].digest, images[0].digest.as_str());
    assert!(left[0].path.exists());
    // An evicted image is pulled and built again on demand.
    let again = rt
        .block_on(svc.ensure_root_disk(&images[1], "inst-b2"))
        .unwrap();
    assert!(again.path.exists());
}

fn tmp_entries(data: &Path, kind: &str) -> Vec<String> {
    names(&data.join("images/tmp"))
        .into_iter()
        .filter(|n| n.contains(kind))
        .collect()
}

/// Starts `plfm-node-agent image pull` (the operator's pull, a process of its own) on
/// the cache under `data` and SIGKILLs it as soon as `cond` holds.
fn kill_pull_when(
    data: &Path,
    image: &ImageRef,
    keep_blobs: bool,
    what: &str,
    cond: impl Fn() -> bool,
) {
    let config = data.join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "node_id = \"n1\"\ndata_dir = {:?}\n[control_plane]\nmode = \"standalone\"\ndesired_dir = \"desired\"\n[runtime]\nkind = \"mock\"\n[images]\nkeep_blobs = {keep_blobs}\n",
            data.display().to_string()
        ),
    )
    .unwrap();
    let mut child = Command::new(common::agent::BIN)
        .arg("--config")
        .arg(&config)
        .args(["image", "pull", &image.pinned()])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_for(what, Duration::from_secs(60), || {
        cond() || matches!(child.try_wait(), Ok(Some(_)))
    });
    assert!(
        child.try_wait().unwrap().is_none(),
        "the pull finished before it could be killed ({what})"
    );
    child.kill().unwrap();
    child.wait().unwrap();
}

#[test]
fn a_kill_during_pull_or_build_leaves_nothing_behind_and_the_next_start_succeeds() {
    if !prerequisites(
        "a_kill_during_pull_or_build_leaves_nothing_behind_and_the_next_start_succeeds",
    ) {
        return;
    }
    let rt = rt();
    let reg = Registry::start();
    // Incompressible content so both the download and the unpack take a while.
    let mut noise = vec![0u8; 48 << 20];
    let mut x: u64 = 0x9e3779b97f4a7c15;
    for chunk in noise.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    let layer = Layer::new()
        .file("data/noise", &noise)
        .file("data/more", &noise[..8 << 20])
        .tar();
    let blob_digest = Digest::of(&layer);
    let image = rt.block_on(reg.push("big", &[(layer, TAR)], &config_json(&[], &["x"], &[])));
    let data = tempfile::tempdir().unwrap();
    let d = data.path();
    // Blobs stored (`keep_blobs`): the layer downloads into tmp/, then its disk is
    // built from the stored blob.
    let keep = ImageConfig {
        keep_blobs: true,
        ..Default::default()
    };

    // 1. Killed while the layer is downloading into tmp/.
    kill_pull_when(d, &image, true, "a partial blob in tmp/", || {
        !tmp_entries(d, ".blob-").is_empty()
    });
    assert!(
        !tmp_entries(d, ".blob-").is_empty(),
        "the partial blob should still be there before restart"
    );
    let svc = ImageService::open(d, keep.clone()).unwrap();
    assert!(
        names(&d.join("images/tmp")).is_empty(),
        "start-up left {:?}",
        names(&d.join("images/tmp"))
    );
    assert!(svc.list().unwrap().is_empty());
    drop(svc);

    // 2. Killed while unpacking/building in tmp/.
    kill_pull_when(d, &image, true, "a build directory in tmp/", || {
        !tmp_entries(d, ".build-").is_empty()
    });
    let svc = ImageService::open(d, keep.clone()).unwrap();
    assert!(
        names(&d.join("images/tmp")).is_empty(),
        "start-up left {:?}",
        names(&d.join("images/tmp"))
    );
    assert!(svc.list().unwrap().is_empty());
    // The verified blob from the interrupted run is reused, not downloaded again.
    let gets_before = reg.gets(&format!("/blobs/{blob_digest}"));
    assert!(d
        .join("images/blobs/sha256")
        .join(blob_digest.hex())
        .is_file());

    // 3. The next start succeeds.
    let disk = rt.block_on(svc.ensure_root_disk(&image, "inst")).unwrap();
    assert!(disk.path.is_file());
    assert_eq!(reg.gets(&format!("/blobs/{blob_digest}")), gets_before);
    assert!(names(&d.join("images/tmp")).is_empty());

    // 4. Blobs not kept (the default): the layer streams from the registry into its
    // disk and no blob is stored. Killed mid-stream, the next start removes the
    // half-built disk and builds it again from a new download.
    let data = tempfile::tempdir().unwrap();
    let d = data.path();
    kill_pull_when(d, &image, false, "a disk streaming in tmp/", || {
        !tmp_entries(d, ".build-").is_empty()
    });
    assert!(
        tmp_entries(d, ".blob-").is_empty(),
        "a streamed layer is not stored as a blob"
    );
    let svc = ImageService::open(d, ImageConfig::default()).unwrap();
    assert!(names(&d.join("images/tmp")).is_empty());
    assert!(svc.list().unwrap().is_empty());
    let disk = rt.block_on(svc.ensure_root_disk(&image, "inst")).unwrap();
    assert!(disk.path.is_file());
    // Counted by the service: the registry's log may still be missing the killed
    // process's request, so it cannot tell this download from that one.
    assert_eq!(svc.metrics().layer_downloads.get(), 1, "downloaded again");
    assert!(names(&d.join("images/blobs/sha256")).is_empty());
    assert!(names(&d.join("images/tmp")).is_empty());
}

#[test]
fn cli_pull_ls_and_gc_share_the_cache_with_a_running_service() {
    if !prerequisites("cli_pull_ls_and_gc_share_the_cache_with_a_running_service") {
        return;
    }
    use plfm_node_agent::image::{run_cli, ImageCommand};
    let rt = rt();
    let reg = Registry::start();
    let pinned = rt.block_on(reg.push("pinned", &small_image("p"), &config_json(&[], &["x"], &[])));
    let loose = rt.block_on(reg.push("loose", &small_image("l"), &config_json(&[], &["x"], &[])));
    let data = tempfile::tempdir().unwrap();
    // The "daemon": a service that pins one image for an instance and stays open.
    let daemon = ImageService::open(data.path(), ImageConfig::default()).unwrap();
    rt.block_on(daemon.ensure_root_disk(&pinned, "inst-1"))
        .unwrap();
    // The operator's CLI, on the same data dir at the same time.
    rt.block_on(run_cli(
        ImageCommand::Pull {
            reference: loose.pinned(),
            json: true,
            quiet: true,
        },
        data.path(),
        ImageConfig::default(),
    ))
    .unwrap();
    // A tag alone is refused.
    let err = rt
        .block_on(run_cli(
            ImageCommand::Pull {
                reference: format!("{}/loose:latest", reg.addr),
                json: false,
                quiet: true,
            },
            data.path(),
            ImageConfig::default(),
        ))
        .unwrap_err();
    assert!(err.to_string().contains("tags never run"), "{err}");
    rt.block_on(run_cli(
        ImageCommand::Ls { json: true },
        data.path(),
        ImageConfig::default(),
    ))
    .unwrap();
    rt.block_on(run_cli(
        ImageCommand::Ls { json: false },
        data.path(),
        ImageConfig::default(),
    ))
    .unwrap();
    assert_eq!(daemon.list().unwrap().len(), 2);
    rt.block_on(run_cli(
        ImageCommand::Gc { json: false },
        data.path(),
        ImageConfig::default(),
    ))
    .unwrap();
    let left = daemon.list().unwrap();
    assert_eq!(left.len(), 1, "gc must remove only the unreferenced disk");
    assert_eq!(left[0].digest, pinned.digest.as_str());
}

#[test]
fn cli_pull_shows_each_layer_and_stage_as_lines_off_a_terminal_and_as_bars_on_one() {
    if !prerequisites(
        "cli_pull_shows_each_layer_and_stage_as_lines_off_a_terminal_and_as_bars_on_one",
    ) {
        return;
    }
    let rt = rt();
    let reg = Registry::start();
    let layers = small_image("progress");
    let digests: Vec<Digest> = layers.iter().map(|(l, _)| Digest::of(l)).collect();
    let image = rt.block_on(reg.push("progress", &layers, &config_json(&[], &["x"], &[])));
    let data = tempfile::tempdir().unwrap();
    let config = data.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "node_id = \"n1\"\ndata_dir = {:?}\n[control_plane]\nmode = \"standalone\"\ndesired_dir = \"desired\"\n[runtime]\nkind = \"mock\"\n",
            data.path().display().to_string()
        ),
    )
    .unwrap();
    let pull = || {
        Command::new(common::agent::BIN)
            .arg("--config")
            .arg(&config)
            .args(["image", "pull", &image.pinned()])
            .output()
            .unwrap()
    };
    // stdout and stderr are pipes here, not terminals: plain lines on stderr, and
    // stdout keeps only the result.
    let out = pull();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    let at = |want: &str| {
        lines
            .iter()
            .position(|l| l.contains(want))
            .unwrap_or_else(|| panic!("no line with {want:?} in:\n{stderr}"))
    };
    let announce = at("pulling 2 layer(s)");
    let unpacking = at("unpacking 2 layer(s)");
    let mut downloaded = Vec::new();
    for (i, d) in digests.iter().enumerate() {
        let line = at(&format!("layer {}/2 {}: downloaded", i + 1, d.short()));
        assert!(line > announce, "{stderr}");
        downloaded.push(line);
        // Layers download and unpack in parallel, but each is reported unpacked
        // only after its own download is complete and verified.
        let unpacked = at(&format!("unpacked layer {}/2 {}", i + 1, d.short()));
        assert!(line < unpacked && unpacking < unpacked, "{stderr}");
    }
    let mkfs = at("building the ext4 root disk (mkfs)");
    let built = at("root disk built");
    // No order between "downloaded" and "unpacking": a layer that gets a disk of its
    // own streams into it, so its unpacking starts while it downloads.
    assert!(unpacking < mkfs && mkfs < built, "{stderr}");
    for stage in [
        "pulling ",
        "layer ",
        "unpacking ",
        "unpacked layer",
        "building the ext4",
        "root disk built",
    ] {
        assert!(
            !stdout.lines().any(|l| l.starts_with(stage)),
            "progress leaked into stdout:\n{stdout}"
        );
    }
    assert!(
        stdout.lines().next().is_some_and(|l| l.ends_with(".ext4")),
        "{stdout}"
    );
    // A second pull is a cache hit, and says so.
    let out = pull();
    assert!(out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("root disk found in the cache"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // On a terminal (a pseudo-terminal from script(1), when the host has it): bars
    // per layer, finished, and the stage line ends with the build.
    if image_support::which("script").is_none() {
        eprintln!("script(1) missing: the terminal display is not checked");
        return;
    }
    let fresh = tempfile::tempdir().unwrap();
    let tty_config = fresh.path().join("agent.toml");
    std::fs::write(
        &tty_config,
        std::fs::read_to_string(&config).unwrap().replace(
            &format!("{:?}", data.path().display().to_string()),
            &format!("{:?}", fresh.path().display().to_string()),
        ),
    )
    .unwrap();
    let cmdline = format!(
        "{} --config {} image pull {}",
        common::agent::BIN,
        tty_config.display(),
        image.pinned()
    );
    let out = Command::new("script")
        .args(["-qec", &cmdline, "/dev/null"])
        .env("TERM", "xterm")
        .output()
        .unwrap();
    let screen = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{screen}");
    for d in &digests {
        let prefix: String = d.short().chars().take(14).collect();
        assert!(screen.contains(&prefix), "no bar for {prefix}:\n{screen}");
    }
    assert!(screen.contains("done"), "{screen}");
    assert!(screen.contains("root disk built"), "{screen}");
    assert!(
        !screen.contains("pulling 2 layer(s)"),
        "plain lines on a terminal:\n{screen}"
    );
}

#[test]
fn a_redeploy_reuses_the_base_layers_and_eviction_keeps_what_another_image_shares() {
    if !prerequisites(
        "a_redeploy_reuses_the_base_layers_and_eviction_keeps_what_another_image_shares",
    ) {
        return;
    }
    let rt = rt();
    let reg = Registry::start();
    let base = [
        Layer::new().file("usr/lib/base1", &[1u8; 100_000]).tar_gz(),
        Layer::new().file("usr/lib/base2", &[2u8; 100_000]).tar_gz(),
    ];
    let release = |top: &str| -> Vec<(Vec<u8>, &'static str)> {
        let mut v: Vec<(Vec<u8>, &'static str)> = base.iter().map(|l| (l.clone(), GZIP)).collect();
        v.push((
            Layer::new()
                .file("srv/app", top.as_bytes())
                .whiteout("usr/lib/base1")
                .tar_gz(),
            GZIP,
        ));
        v
    };
    let config = config_json(&[], &["sh"], &[]);
    let r1 = rt.block_on(reg.push("app", &release("v1"), &config));
    let r2 = rt.block_on(reg.push("app", &release("v2"), &config));
    let data = tempfile::tempdir().unwrap();
    let svc = ImageService::open(data.path(), reg.image_config()).unwrap();
    let blob_gets = || reg.gets("/blobs/sha256:");

    let (d1, t1) = rt.block_on(svc.ensure(&r1)).unwrap();
    assert_eq!((t1.layers_built, t1.layers_reused), (3, 0));
    // The registry logs a request once it has sent the response, which can be just
    // after the client has read it all: wait for the log, then count.
    wait_for(
        "config and three layers logged",
        Duration::from_secs(10),
        || blob_gets() >= 4,
    );
    let gets_r1 = blob_gets();
    let builds_r1 = svc.metrics().layer_builds.get();
    assert_eq!(builds_r1, 3);

    // The next release: only its top layer is downloaded, unpacked and built.
    let (d2, t2) = rt.block_on(svc.ensure(&r2)).unwrap();
    assert_eq!((t2.layers_built, t2.layers_reused), (1, 2));
    assert_eq!(
        svc.metrics().layer_builds.get(),
        builds_r1 + 1,
        "one unpack"
    );
    assert_eq!(svc.metrics().layer_downloads.get(), 3 + 1, "one download");
    wait_for("release 2's GETs logged", Duration::from_secs(10), || {
        blob_gets() >= gets_r1 + 2
    });
    assert_eq!(
        blob_gets() - gets_r1,
        2,
        "the config and the new top layer only"
    );
    assert_eq!(
        d2.layers[..2],
        d1.layers[..2],
        "the base disks are the same files"
    );
    assert_ne!(d2.layers[2], d1.layers[2]);
    let t = merged(&d2.layers);
    assert_eq!(names(&t.path().join("usr/lib")), vec!["base2"]);
    assert_eq!(std::fs::read(t.path().join("srv/app")).unwrap(), b"v2");

    // Release 1 is evicted; release 2 is pinned and keeps the shared base.
    rt.block_on(svc.ensure_root_disk(&r2, "inst")).unwrap();
    let report = svc.gc_unreferenced().unwrap();
    assert_eq!(report.evicted, vec![r1.digest.to_string()]);
    assert!(!d1.layers[2].exists(), "release 1's own top layer is freed");
    assert!(d2.layers.iter().all(|l| l.exists()), "release 2 is whole");
    let again = rt.block_on(svc.ensure(&r2)).unwrap();
    assert!(again.1.cache_hit);
    assert_eq!(again.0, d2);
}

#[test]
fn a_flattened_disk_from_an_earlier_agent_is_served_as_a_stack_of_one_and_evicted_whole() {
    // No registry: the request must be answered from the cache.
    let data = tempfile::tempdir().unwrap();
    let svc = ImageService::open(data.path(), ImageConfig::default()).unwrap();
    let image =
        ImageRef::parse_pinned(&format!("127.0.0.1:9/app@sha256:{}", "cd".repeat(32))).unwrap();
    let disk = data
        .path()
        .join(format!("images/disks/sha256/{}.v1.ext4", "cd".repeat(32)));
    std::fs::write(&disk, vec![0u8; 8192]).unwrap();
    let db = rusqlite::Connection::open(data.path().join("state.db")).unwrap();
    db.execute(
        "INSERT INTO image_cache (cache_key, digest, format_version, source, disk_path, size_bytes,
           allocated_bytes, defaults_json, created_ms, last_used_ms)
         VALUES (?1, ?2, 1, '127.0.0.1:9/app', ?3, 8192, 8192, '{}', 1, 1)",
        rusqlite::params![
            format!("{}#v1", image.digest),
            image.digest.as_str(),
            disk.to_string_lossy()
        ],
    )
    .unwrap();
    drop(db);
    let (root, t) = rt().block_on(svc.ensure(&image)).unwrap();
    assert!(t.cache_hit);
    assert_eq!(root.layers, vec![disk.clone()]);
    assert_eq!(svc.list().unwrap().len(), 1, "`image ls` shows it");
    let report = svc.gc_unreferenced().unwrap();
    assert_eq!(report.evicted, vec![image.digest.to_string()]);
    assert_eq!(report.freed_bytes, 8192);
    assert!(!disk.exists());
}

#[test]
fn a_merged_disk_streams_its_bottom_layer_and_builds_the_bytes_a_stored_blob_gives() {
    if !prerequisites(
        "a_merged_disk_streams_its_bottom_layer_and_builds_the_bytes_a_stored_blob_gives",
    ) {
        return;
    }
    let rt = rt();
    let reg = Registry::start();
    // Ten layers: the bottom three share one disk. Layer 1 removes a file of layer 0
    // and layer 2 replaces one, inside that disk.
    let n = plfm_node_agent::image::MAX_LAYER_DISKS + 2;
    let layers: Vec<(Vec<u8>, &'static str)> = (0..n)
        .map(|i| {
            let mut l = Layer::new().file(&format!("l/{i}"), &vec![i as u8; 40_000 + i]);
            l = match i {
                0 => l.file("etc/base", b"v0").file("etc/gone", b"x"),
                1 => l.whiteout("etc/gone"),
                2 => l.file("etc/base", b"v2"),
                _ => l,
            };
            (l.tar_gz(), GZIP)
        })
        .collect();
    let image = rt.block_on(reg.push("many", &layers, &config_json(&[], &["sh"], &[])));

    // Blobs not kept (the default): the bottom layer of every disk streams, the
    // merged disk's other two are stored, then deleted once the image is recorded.
    let streamed = tempfile::tempdir().unwrap();
    let svc = ImageService::open(streamed.path(), reg.image_config()).unwrap();
    let (disk, t) = rt.block_on(svc.ensure(&image)).unwrap();
    assert_eq!(disk.layers.len(), plfm_node_agent::image::MAX_LAYER_DISKS);
    assert_eq!(t.layers_built, plfm_node_agent::image::MAX_LAYER_DISKS);
    let m = svc.metrics();
    assert_eq!(
        m.layer_downloads.get(),
        n as u64,
        "each layer downloaded once"
    );
    assert_eq!(
        m.layers_streamed.get(),
        plfm_node_agent::image::MAX_LAYER_DISKS as u64,
        "one streamed layer per disk, the merged one's included"
    );
    wait_for(
        "the config and every layer logged",
        Duration::from_secs(10),
        || reg.gets("/blobs/sha256:") > n,
    );
    assert_eq!(reg.gets("/blobs/sha256:"), n + 1, "no blob fetched twice");
    assert!(names(&streamed.path().join("images/blobs/sha256")).is_empty());
    assert!(names(&streamed.path().join("images/tmp")).is_empty());
    let t = merged(&disk.layers);
    assert_eq!(std::fs::read(t.path().join("etc/base")).unwrap(), b"v2");
    assert!(!t.path().join("etc/gone").exists(), "the whiteout applied");
    for i in 0..n {
        assert_eq!(
            std::fs::read(t.path().join(format!("l/{i}"))).unwrap(),
            vec![i as u8; 40_000 + i]
        );
    }

    // Blobs kept: nothing streams, every layer is built from its stored blob, and
    // the disks are the same bytes.
    let stored = tempfile::tempdir().unwrap();
    let keep = ImageConfig {
        keep_blobs: true,
        ..reg.image_config()
    };
    let svc2 = ImageService::open(stored.path(), keep).unwrap();
    let (disk2, _) = rt.block_on(svc2.ensure(&image)).unwrap();
    assert_eq!(svc2.metrics().layers_streamed.get(), 0);
    assert_eq!(names(&stored.path().join("images/blobs/sha256")).len(), n);
    assert_eq!(disk2.layers.len(), disk.layers.len());
    for (a, b) in disk.layers.iter().zip(&disk2.layers) {
        assert_eq!(a.file_name(), b.file_name(), "the same layer disk keys");
        assert!(
            std::fs::read(a).unwrap() == std::fs::read(b).unwrap(),
            "{} differs between the streamed and the stored build",
            a.display()
        );
    }
}
