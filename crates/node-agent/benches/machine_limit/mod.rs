//! The machine's own limit for an image pull, shared by the image benches (issue 17):
//! the three stages a pull cannot avoid, each alone and all at once. Not a bench
//! target itself (cargo only finds `benches/*.rs` and `benches/*/main.rs`).

use std::path::Path;
use std::process::Command;
use std::time::Instant;

/// The blob URLs of `blobs` in `image`'s repository.
pub fn blob_urls(
    image: &plfm_node_agent::image::ImageRef,
    blobs: &[(Vec<u8>, &'static str)],
) -> Vec<String> {
    blobs
        .iter()
        .map(|(b, _)| {
            format!(
                "http://{}/v2/{}/blobs/{}",
                image.registry,
                image.repository,
                plfm_node_agent::image::Digest::of(b)
            )
        })
        .collect()
}

/// The stages' times, in seconds.
pub struct Limits {
    pub download: f64,
    pub decompress: f64,
    /// The faster of `write_buffered` and `write_direct`.
    pub write: f64,
    pub write_buffered: f64,
    pub write_direct: f64,
    /// The slowest stage measured alone.
    pub slowest: f64,
    /// All three stages at once, sharing the machine.
    pub all_at_once: f64,
}

impl Limits {
    /// Measures the limits for `blobs` (gzip), served at `urls`, that unpack to
    /// `raw` bytes; the write stages write into `dir`.
    pub fn measure(
        urls: &[String],
        blobs: &[(Vec<u8>, &'static str)],
        raw: usize,
        dir: &Path,
    ) -> Limits {
        let _ = Command::new("sync").status();
        let download = timed_stages(|sc| download_stage(sc, urls));
        let decompress = timed_stages(|sc| decompress_stage(sc, blobs));
        let _ = Command::new("sync").status();
        let write_buffered = timed_stages(|sc| write_stage(sc, dir, raw, false));
        let _ = Command::new("sync").status();
        let write_direct = timed_stages(|sc| write_stage(sc, dir, raw, true));
        // The machine's way to write is the faster of the two.
        let direct = write_direct < write_buffered;
        let write = write_buffered.min(write_direct);
        // All three stages at once, as a perfectly overlapped pipeline would run them
        // on this machine: they share its cores, memory bandwidth and disk.
        let _ = Command::new("sync").status();
        let all_at_once = timed_stages(|sc| {
            download_stage(sc, urls);
            decompress_stage(sc, blobs);
            write_stage(sc, dir, raw, direct);
        });
        Limits {
            download,
            decompress,
            write,
            write_buffered,
            write_direct,
            slowest: download.max(decompress).max(write),
            all_at_once,
        }
    }

    /// One line with every figure and `ours` (seconds) as a ratio to both limits.
    pub fn report(&self, raw: usize, ours: f64) -> String {
        format!(
            "machine limit (each stage alone, layers in parallel): download {:.2} s, decompress {:.2} s, write {} MB once {:.2} s (page cache + fsync {:.2} s, O_DIRECT {:.2} s); slowest stage {:.2} s, sequential {:.2} s; ours cold / slowest stage {:.2}\n\
             machine limit (all three stages at once, sharing the machine): {:.2} s; ours cold / all at once {:.2} (target <= 1.5)",
            self.download,
            self.decompress,
            raw >> 20,
            self.write,
            self.write_buffered,
            self.write_direct,
            self.slowest,
            self.download + self.decompress + self.write,
            ours / self.slowest.max(0.001),
            self.all_at_once,
            ours / self.all_at_once.max(0.001)
        )
    }
}

/// Wall time of the threads `stages` spawns, all run to their end.
pub fn timed_stages<'env>(
    stages: impl for<'scope> FnOnce(&'scope std::thread::Scope<'scope, 'env>),
) -> f64 {
    let t = Instant::now();
    std::thread::scope(|sc| stages(sc));
    t.elapsed().as_secs_f64()
}

/// The download stage of the machine's limit: every blob from the registry to
/// `/dev/null` with `curl`, all at once.
pub fn download_stage<'scope>(sc: &'scope std::thread::Scope<'scope, '_>, urls: &'scope [String]) {
    for url in urls {
        sc.spawn(move || {
            let st = Command::new("curl")
                .args(["-sfo", "/dev/null"])
                .arg(url)
                .status()
                .expect("curl");
            assert!(st.success(), "curl {url}");
        });
    }
}

/// The decompress stage: every blob decoded to nothing, one thread each, with the
/// decoder the agent uses (`flate2` with `miniz_oxide`).
pub fn decompress_stage<'scope>(
    sc: &'scope std::thread::Scope<'scope, '_>,
    blobs: &'scope [(Vec<u8>, &'static str)],
) {
    for (b, _) in blobs {
        sc.spawn(move || {
            let mut d = flate2::read::MultiGzDecoder::new(&b[..]);
            std::io::copy(&mut d, &mut std::io::sink()).expect("gunzip");
        });
    }
}

/// The write stage: `bytes` written once into one file in `dir`, 1 MiB at a time,
/// then fsynced; through the page cache, or with `O_DIRECT` (as the agent writes
/// its layer data where the file system allows it).
pub fn write_stage<'scope>(
    sc: &'scope std::thread::Scope<'scope, '_>,
    dir: &'scope Path,
    bytes: usize,
    direct: bool,
) {
    sc.spawn(move || {
        use std::os::unix::fs::FileExt;
        #[cfg(target_os = "linux")]
        use std::os::unix::fs::OpenOptionsExt;
        let p = dir.join(format!("limit-write-{direct}"));
        let mut o = std::fs::OpenOptions::new();
        o.write(true).create(true).truncate(true);
        #[cfg(target_os = "linux")]
        if direct {
            o.custom_flags(libc::O_DIRECT);
        }
        let f = o.open(&p).expect("create the write-limit file");
        // A block-aligned 1 MiB buffer (O_DIRECT needs one).
        let mem = vec![0x5au8; (2 << 20) + 4096];
        let at = mem.as_ptr().align_offset(4096);
        let chunk = &mem[at..at + (1 << 20)];
        for i in 0..(bytes >> 20) {
            f.write_all_at(chunk, (i as u64) << 20).expect("write");
        }
        f.sync_all().expect("fsync");
        drop(f);
        let _ = std::fs::remove_file(&p);
    });
}
