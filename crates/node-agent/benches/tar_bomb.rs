//! Tar header bomb benchmark (issue 13, "one small layer kills the node"): a gzip
//! layer of about 5 MB made of PAX extended headers, each declaring a 1 GiB body of
//! zeros, pulled by `ImageService` from a loopback `docker-registry` (the agent's
//! code path end to end). Prints the pull's error and this process's peak RSS
//! (`VmHWM`); fails when the peak is 128 MiB or more or the error does not name the
//! limit. For comparison, a child process then walks the same layer the way the tar
//! crate does by itself (`Archive::entries()` without `raw`), which reads each body
//! into memory, and reports its own peak RSS.
//!
//! Run: `cargo bench -p plfm-node-agent --bench tar_bomb`
//! (env `PLFM_BENCH_BOMB_GIB`: declared GiB per header, default 1; `PLFM_BENCH_BOMB_N`:
//! headers, default 5; `PLFM_BENCH_BOMB_NO_CRATE=1` skips the comparison child).

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "../tests/image_support/mod.rs"]
#[allow(unused_imports)]
mod image_support;

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::Instant;

use image_support::{config_json, Registry, GZIP};
use plfm_node_agent::image::testtar::{extension_header, Layer};
use plfm_node_agent::image::{ImageConfig, ImageService};

const LIMIT_KIB: u64 = 128 * 1024;

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn status_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(field))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// One gzip member holding `bytes` of `fill`, compressed from a 1 MiB buffer.
fn gz_member(bytes: u64, fill: u8) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    let chunk = vec![fill; 1 << 20];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        gz.write_all(&chunk[..n]).expect("gzip into memory");
        left -= n as u64;
    }
    gz.finish().expect("gzip into memory")
}

/// `n` PAX headers declaring `body` bytes each, then a small file. Gzip members
/// are concatenated (RFC 1952 allows it; the agent and registries' clients decode
/// multi-member streams), so the zeros are compressed once and reused.
fn bomb(body: u64, n: u64) -> Vec<u8> {
    let zeros = gz_member(body, 0);
    let pad = (512 - body % 512) % 512;
    let mut out = Vec::new();
    for _ in 0..n {
        let head = extension_header(tar::EntryType::XHeader, body);
        out.extend(gz_member_bytes(head.as_bytes()));
        out.extend_from_slice(&zeros);
        out.extend(gz_member_bytes(&vec![0u8; pad as usize]));
    }
    out.extend(gz_member_bytes(&Layer::new().file("after", b"x").tar()));
    out
}

fn gz_member_bytes(data: &[u8]) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    gz.write_all(data).expect("gzip into memory");
    gz.finish().expect("gzip into memory")
}

/// The comparison child: the tar crate's own preprocessing over the layer file.
fn crate_child() -> bool {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) != Some("--crate-walk") {
        return false;
    }
    let f = std::fs::File::open(&args[2]).expect("layer file");
    let t0 = Instant::now();
    let mut archive = tar::Archive::new(flate2::read::MultiGzDecoder::new(f));
    let mut outcome = String::from("walked to the end");
    match archive.entries() {
        Ok(entries) => {
            for e in entries {
                match e {
                    Ok(mut e) => {
                        let _ = e.path_bytes();
                        let _ = std::io::copy(&mut e, &mut std::io::sink());
                    }
                    Err(e) => {
                        outcome = e.to_string();
                        break;
                    }
                }
            }
        }
        Err(e) => outcome = e.to_string(),
    }
    println!(
        "CRATE vmhwm_kib={} ms={} outcome={outcome}",
        status_kib("VmHWM:"),
        t0.elapsed().as_millis()
    );
    true
}

fn main() {
    if crate_child() {
        return;
    }
    // `cargo test --benches` runs us without `--bench`: a measurement, not a test.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    if !image_support::prerequisites("tar_bomb bench") {
        return;
    }
    let gib = env_num("PLFM_BENCH_BOMB_GIB", 1);
    let n = env_num("PLFM_BENCH_BOMB_N", 5);
    let body = gib << 30;
    let t0 = Instant::now();
    let layer = bomb(body, n);
    eprintln!(
        "layer: {n} PAX headers declaring {gib} GiB each ({} GiB of tar) in {} bytes of gzip, built in {:.1} s",
        gib * n,
        layer.len(),
        t0.elapsed().as_secs_f64()
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let reg = Registry::start();
    let image = rt.block_on(reg.push(
        "bomb",
        &[(layer.clone(), GZIP)],
        &config_json(&[], &["sh"], &[]),
    ));
    let data = tempfile::tempdir().expect("tempdir");
    let svc = ImageService::open(data.path(), ImageConfig::default()).expect("open");
    let rss_before = status_kib("VmRSS:");
    let hwm_before = status_kib("VmHWM:");
    let t1 = Instant::now();
    let result = rt.block_on(svc.ensure_root_disk(&image, "bench"));
    let elapsed = t1.elapsed();
    let hwm = status_kib("VmHWM:");
    let err = match result {
        Ok(disk) => panic!("the bomb was accepted: {}", disk.path.display()),
        Err(e) => e,
    };
    println!("agent: error after {:.3} s: {err}", elapsed.as_secs_f64());
    println!("agent: reason {}", err.reason().as_str());
    println!(
        "agent: VmRSS before the pull {rss_before} KiB, VmHWM before {hwm_before} KiB, peak RSS (VmHWM) after {hwm} KiB ({:.1} MiB)",
        hwm as f64 / 1024.0
    );
    let named = err.to_string().contains("max_tar_extension_bytes");
    if std::env::var("PLFM_BENCH_BOMB_NO_CRATE").as_deref() != Ok("1") {
        let path = data.path().join("bomb.tar.gz");
        std::fs::write(&path, &layer).expect("write layer");
        let out = Command::new(std::env::current_exe().expect("self"))
            .arg("--crate-walk")
            .arg(&path)
            .stderr(Stdio::inherit())
            .output()
            .expect("run comparison child");
        let mut text = String::new();
        let _ = (&out.stdout[..]).read_to_string(&mut text);
        println!(
            "tar crate preprocessing (comparison child): {}",
            text.trim()
        );
    }
    assert!(
        named,
        "the error does not name max_tar_extension_bytes: {err}"
    );
    assert!(
        hwm < LIMIT_KIB,
        "peak RSS {hwm} KiB is not under {LIMIT_KIB} KiB"
    );
    println!("PASS: peak RSS under 128 MiB and the pull fails naming the limit");
}
