//! Deploy benchmark on a realistic image (issue 17, items 3 and the single-flight
//! figure): an image made locally from files of this host's `/usr` (`/usr/bin`,
//! Python's standard library, then `/usr/share`: many small files, symlinks, hard
//! links), at least
//! `PLFM_BENCH_MB` (default 300) MB in 4 gzip layers, plus a release pair that differs
//! only in a ~1 MB top layer. Served by a loopback `docker-registry`. Measured in one
//! run, side by side:
//! - the standard tools on release 1: `skopeo copy` + `umoci raw unpack` +
//!   `mkfs.ext4 -d`;
//! - the agent's cold pull of release 1 (a child process with an empty data dir, for
//!   its peak RSS);
//! - the redeploy: release 2 in the same data dir (its base layers already pulled
//!   once), as the agent does it today;
//! - 20 requests for release 1 at once in a fresh data dir (one pull and one build
//!   expected: single flight) against one.
//!
//! Run: `cargo bench -p plfm-node-agent --bench image_deploy` (root not needed;
//! needs docker-registry, skopeo, umoci, mkfs.ext4).

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "../tests/image_support/mod.rs"]
#[allow(unused_imports)]
mod image_support;
mod machine_limit;

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use image_support::{env_num, vmhwm_kib, Registry, GZIP};
use plfm_node_agent::image::testtar::{Layer, TarEntry};
use plfm_node_agent::image::{ImageConfig, ImageRef, ImageService};

const LAYERS: usize = 4;

/// Files of `roots` in a stable order (sorted walk), up to `budget` bytes of file
/// data: regular files, symlinks, and hard links (a second name of an inode already
/// taken). Paths are made relative (`usr/…`). Unreadable entries are skipped.
/// One entry of the corpus: the tar entry, its path, its data size, and for a hard
/// link the path of its target.
struct Item {
    entry: TarEntry,
    path: String,
    size: usize,
    link_to: Option<String>,
}

fn corpus(roots: &[&str], budget: usize) -> (Vec<Item>, usize, [usize; 3]) {
    let mut entries = Vec::new();
    let mut seen: HashMap<(u64, u64), String> = HashMap::new();
    let mut total = 0usize;
    let mut counts = [0usize; 3]; // files, symlinks, hard links
    let mut stack: Vec<PathBuf> = roots.iter().rev().map(PathBuf::from).collect();
    while let Some(p) = stack.pop() {
        if total >= budget {
            break;
        }
        let Ok(meta) = std::fs::symlink_metadata(&p) else {
            continue;
        };
        let rel = p.to_string_lossy().trim_start_matches('/').to_string();
        if meta.is_dir() {
            let Ok(rd) = std::fs::read_dir(&p) else {
                continue;
            };
            let mut kids: Vec<PathBuf> = rd.flatten().map(|e| e.path()).collect();
            kids.sort();
            stack.extend(kids.into_iter().rev());
        } else if meta.file_type().is_symlink() {
            if let Ok(t) = std::fs::read_link(&p) {
                entries.push(Item {
                    entry: TarEntry::symlink(&rel, &t.to_string_lossy()),
                    path: rel,
                    size: 0,
                    link_to: None,
                });
                counts[1] += 1;
            }
        } else if meta.is_file() {
            let key = (meta.dev(), meta.ino());
            if meta.nlink() > 1 {
                if let Some(first) = seen.get(&key) {
                    entries.push(Item {
                        entry: TarEntry::hardlink(&rel, first),
                        path: rel,
                        size: 0,
                        link_to: Some(first.clone()),
                    });
                    counts[2] += 1;
                    continue;
                }
            }
            let Ok(data) = std::fs::read(&p) else {
                continue;
            };
            total += data.len();
            seen.insert(key, rel.clone());
            entries.push(Item {
                entry: TarEntry::file(&rel, &data, meta.mode() & 0o777),
                path: rel,
                size: data.len(),
                link_to: None,
            });
            counts[0] += 1;
        }
    }
    (entries, total, counts)
}

/// A ~1 MB top layer of an app release (`v` names it).
fn top_layer(v: &str) -> Layer {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15 ^ v.len() as u64 ^ u64::from(v.as_bytes()[0]);
    let mut layer = Layer::new();
    for i in 0..64 {
        let mut data = vec![0u8; 16 * 1024];
        for chunk in data.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
        }
        layer = layer.entry(TarEntry::file(
            &format!("app/{v}/part-{i}.bin"),
            &data,
            0o644,
        ));
    }
    layer
}

fn timed(cmd: &mut Command) -> Duration {
    let t0 = Instant::now();
    let out = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .expect("spawn tool");
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    t0.elapsed()
}

/// Child mode: `--child <data_dir> <n> <image>`: `n` concurrent `ensure` calls in one
/// image service; prints JSON with the wall time, the sum of the downloads, how many
/// calls were served from a build of their own, and the peak RSS.
fn child_mode() -> bool {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) != Some("--child") {
        return false;
    }
    let data = PathBuf::from(&args[2]);
    let n: usize = args[3].parse().expect("n");
    let image = ImageRef::parse_pinned(&args[4]).expect("reference");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let svc = ImageService::open(&data, ImageConfig::default()).expect("open");
    let t0 = Instant::now();
    let results = rt.block_on(async {
        let calls = (0..n).map(|_| {
            let svc = svc.clone();
            let image = image.clone();
            async move { svc.ensure(&image).await }
        });
        futures_util::future::join_all(calls).await
    });
    let total = t0.elapsed();
    // Calls that joined one flight report that flight's timings: count the distinct
    // disks and the distinct downloads, not their sum.
    let mut paths = std::collections::BTreeSet::new();
    let mut flights = std::collections::BTreeSet::new();
    let mut t_first = None;
    for r in results {
        let (disk, t) = r.expect("pull and build");
        paths.insert(disk.path.clone());
        flights.insert((t.downloaded_bytes, t.pull, t.unpack, t.mkfs));
        t_first.get_or_insert(t);
    }
    let downloaded: u64 = flights.iter().map(|f| f.0).sum();
    let t = t_first.expect("one call at least");
    println!(
        "{}",
        serde_json::json!({
            "total_ms": total.as_millis() as u64,
            "pull_ms": t.pull.as_millis() as u64,
            "unpack_ms": t.unpack.as_millis() as u64,
            "mkfs_ms": t.mkfs.as_millis() as u64,
            "downloaded": downloaded,
            "disks": paths.len(),
            "flights": flights.len(),
            "layers_built": t.layers_built,
            "layers_reused": t.layers_reused,
            "vmhwm_kib": vmhwm_kib("self").unwrap_or(0),
            "cpu_self_ms": cpu_ms(libc::RUSAGE_SELF),
            "cpu_tools_ms": cpu_ms(libc::RUSAGE_CHILDREN),
        })
    );
    true
}

/// User + system CPU time of `who` (this process, or its waited-for children: the
/// e2fsprogs tools), in ms.
fn cpu_ms(who: libc::c_int) -> u64 {
    // SAFETY: getrusage writes one `rusage` into the zeroed value it is given.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `ru` is a valid, writable rusage for the call.
    if unsafe { libc::getrusage(who, &mut ru) } != 0 {
        return 0;
    }
    let ms = |t: libc::timeval| t.tv_sec as u64 * 1000 + t.tv_usec as u64 / 1000;
    ms(ru.ru_utime) + ms(ru.ru_stime)
}

fn child(data: &Path, n: usize, image: &ImageRef) -> serde_json::Value {
    // Each measurement starts with nothing dirty left by the one before (else the
    // kernel's writeback of the previous disk competes with this one).
    let _ = Command::new("sync").status();
    let out = Command::new(std::env::current_exe().expect("exe"))
        .arg("--child")
        .arg(data)
        .arg(n.to_string())
        .arg(image.pinned())
        .output()
        .expect("run child");
    assert!(
        out.status.success(),
        "child failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("child output")
}

fn secs(v: &serde_json::Value, k: &str) -> f64 {
    v[k].as_u64().unwrap_or(0) as f64 / 1000.0
}

fn main() {
    if child_mode() {
        return;
    }
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    for tool in ["docker-registry", "mkfs.ext4", "skopeo", "umoci", "curl"] {
        if image_support::which(tool).is_none() {
            eprintln!("SKIP image_deploy bench: {tool} not installed");
            return;
        }
    }
    let budget = env_num("PLFM_BENCH_MB", 300) << 20;
    let t0 = Instant::now();
    // Mostly small files (Python's library, /usr/share), and 30 MB of /usr/bin, where
    // the hard links are.
    let bin_budget = 30 << 20;
    let (mut entries, small, mut counts) = corpus(
        &["/usr/lib/python3.11", "/usr/lib/python3", "/usr/share"],
        budget - bin_budget,
    );
    let (bin, bin_raw, bin_counts) = corpus(&["/usr/bin"], bin_budget);
    entries.extend(bin);
    let raw = small + bin_raw;
    for (c, b) in counts.iter_mut().zip(bin_counts) {
        *c += b;
    }
    assert!(
        raw >= budget * 9 / 10,
        "this host's /usr gave only {} MB",
        raw >> 20
    );
    // 4 layers of about equal data, in walk order; a hard link goes into its target's
    // layer (as image builders write them).
    let mut layers: Vec<Layer> = (0..LAYERS).map(|_| Layer::new()).collect();
    let mut layer_of: HashMap<String, usize> = HashMap::new();
    let mut acc = 0usize;
    for it in entries {
        let i = match &it.link_to {
            Some(t) => layer_of.get(t).copied().unwrap_or(LAYERS - 1),
            None => (acc * LAYERS / raw.max(1)).min(LAYERS - 1),
        };
        acc += it.size;
        layer_of.insert(it.path, i);
        layers[i] = std::mem::take(&mut layers[i]).entry(it.entry);
    }
    let mut base = Vec::new();
    let mut diff_ids = Vec::new();
    for l in &layers {
        diff_ids.push(plfm_node_agent::image::Digest::of(&l.tar()).to_string());
        base.push((l.tar_gz(), GZIP));
    }
    drop(layers);
    let compressed: usize = base.iter().map(|(b, _)| b.len()).sum();
    eprintln!(
        "corpus in {:.1} s: {} MB raw ({} files, {} symlinks, {} hard links), {} MB gzip in {LAYERS} layers",
        t0.elapsed().as_secs_f64(),
        raw >> 20,
        counts[0],
        counts[1],
        counts[2],
        compressed >> 20
    );

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let reg = Registry::start();
    let release = |v: &str| {
        let top = top_layer(v);
        let mut ids = diff_ids.clone();
        ids.push(plfm_node_agent::image::Digest::of(&top.tar()).to_string());
        let config = serde_json::to_vec(&serde_json::json!({
            "architecture": "amd64", "os": "linux",
            "config": {"Cmd": ["sh"]},
            "rootfs": {"type": "layers", "diff_ids": ids}
        }))
        .expect("config");
        let mut layers = base.clone();
        layers.push((top.tar_gz(), GZIP));
        rt.block_on(reg.push("deploy", &layers, &config))
    };
    let r1 = release("v1");
    let r2 = release("v2");
    let work = tempfile::tempdir().expect("tempdir");

    // The standard tools on release 1.
    let oci = work.path().join("oci");
    let _ = Command::new("sync").status();
    let t_skopeo = timed(
        Command::new("skopeo")
            .args(["copy", "--quiet", "--src-tls-verify=false"])
            .arg(format!("docker://{}", r1.pinned()))
            .arg(format!("oci:{}:r1", oci.display())),
    );
    let rootfs = work.path().join("bundle");
    let t_umoci = timed(
        Command::new("umoci")
            .args(["raw", "unpack", "--image"])
            .arg(format!("{}:r1", oci.display()))
            .arg(&rootfs),
    );
    let disk = work.path().join("tools.ext4");
    let size_mb = (raw >> 20) * 3 / 2 + 64;
    let t_mkfs = timed(
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-d"])
            .arg(&rootfs)
            .arg(&disk)
            .arg(format!("{size_mb}M")),
    );
    let tools = (t_skopeo + t_umoci + t_mkfs).as_secs_f64();
    let _ = std::fs::remove_dir_all(&rootfs);
    let _ = std::fs::remove_dir_all(&oci);
    let _ = std::fs::remove_file(&disk);

    // The machine's own limits for this image (see `machine_limit`).
    let blob_urls = machine_limit::blob_urls(&r1, &base);
    let limits = machine_limit::Limits::measure(&blob_urls, &base, raw, work.path());

    // Ours: cold release 1, then release 2 in the same data dir.
    let data = work.path().join("data");
    let cold = child(&data, 1, &r1);
    let redeploy = child(&data, 1, &r2);
    let _ = std::fs::remove_dir_all(&data);
    // 20 at once, fresh.
    let data20 = work.path().join("data20");
    let many = child(&data20, 20, &r1);

    println!("== image deploy benchmark (realistic corpus) ==");
    println!(
        "image: {} MB raw from /usr ({} files, {} symlinks, {} hard links), {} MB gzip, {LAYERS} base layers + 1 top layer of 1 MiB",
        raw >> 20,
        counts[0],
        counts[1],
        counts[2],
        compressed >> 20
    );
    println!(
        "tools (release 1): {tools:.2} s = skopeo copy {:.2} s + umoci raw unpack {:.2} s + mkfs.ext4 -d {:.2} s",
        t_skopeo.as_secs_f64(),
        t_umoci.as_secs_f64(),
        t_mkfs.as_secs_f64()
    );
    println!(
        "ours cold (release 1): {:.2} s (downloads done at {:.2}; summed over the layer disks: unpack {:.2}, file systems {:.2}); downloaded {} MB; peak RSS {} MiB; ratio to the tools {:.2} (target <= 0.35)",
        secs(&cold, "total_ms"),
        secs(&cold, "pull_ms"),
        secs(&cold, "unpack_ms"),
        secs(&cold, "mkfs_ms"),
        cold["downloaded"].as_u64().unwrap_or(0) >> 20,
        cold["vmhwm_kib"].as_u64().unwrap_or(0) / 1024,
        secs(&cold, "total_ms") / tools
    );
    println!(
        "ours cold (release 1) CPU: {:.2} s in the agent + {:.2} s in the e2fsprogs tools = {:.2} CPU-s over {:.2} s wall on {} cores",
        secs(&cold, "cpu_self_ms"),
        secs(&cold, "cpu_tools_ms"),
        secs(&cold, "cpu_self_ms") + secs(&cold, "cpu_tools_ms"),
        secs(&cold, "total_ms"),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!("{}", limits.report(raw, secs(&cold, "total_ms")));
    println!(
        "ours redeploy (release 2 after release 1): layer disks built {}, reused {}",
        redeploy["layers_built"], redeploy["layers_reused"]
    );
    println!(
        "ours redeploy (release 2 after release 1): {:.2} s (downloads done at {:.2}; summed over the layer disks: unpack {:.2}, file systems {:.2}); downloaded {} MB; ratio to cold {:.2} (target <= 0.1)",
        secs(&redeploy, "total_ms"),
        secs(&redeploy, "pull_ms"),
        secs(&redeploy, "unpack_ms"),
        secs(&redeploy, "mkfs_ms"),
        redeploy["downloaded"].as_u64().unwrap_or(0) >> 20,
        secs(&redeploy, "total_ms") / secs(&cold, "total_ms").max(0.001)
    );
    println!(
        "ours 20 at once (release 1, fresh): {:.2} s (flight: downloads done at {:.2}; unpack {:.2}, file systems {:.2} summed), {} disk(s) from {} pull-and-build flight(s), downloaded {} MB; ratio to one cold pull {:.2} (target <= 1.2)",
        secs(&many, "total_ms"),
        secs(&many, "pull_ms"),
        secs(&many, "unpack_ms"),
        secs(&many, "mkfs_ms"),
        many["disks"],
        many["flights"],
        many["downloaded"].as_u64().unwrap_or(0) >> 20,
        secs(&many, "total_ms") / secs(&cold, "total_ms").max(0.001)
    );
}
