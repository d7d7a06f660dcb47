//! The OCI image pipeline (DESIGN §7): turns a WorkloadSpec's image into a read-only
//! ext4 root disk, cached by digest.
//!
//! The instance actor calls [`ImageService::ensure_root_disk`] during `preparing`
//! and [`ImageService::unpin`] when the instance is removed; the agent calls
//! [`ImageService::gc`] now and then and registers [`ImageMetrics`]. The operator CLI
//! (`plfm-node-agent image …`) is [`run_cli`] with [`ImageCommand`].
//!
//! What this module owns: everything under `<data_dir>/images/`, and the tables
//! `image_cache` and `image_refs` in `<data_dir>/state.db`. It must not touch other
//! tables, mount anything, use loop devices, or write outside `<data_dir>/images/`.
//!
//! Flow of one request: pin the digest for the instance → cache hit? return → a
//! content failure of this image still in its backoff ([`failures`])? return it → else
//! join or start the single flight for that digest (one per digest per process, and a
//! `flock` per digest across processes) → pull (verify while streaming) → unpack
//! into `tmp/` → `mkfs.ext4 -d` → rename → record → evict above the high-water mark.
//! Errors are [`ImageError`]; [`ImageError::reason`] gives the reason code.

pub mod cli;
pub mod config;
pub mod defaults;
pub mod error;
pub mod failures;
pub mod metrics;
pub mod progress;
pub mod pull;
pub mod reference;
pub mod rootfs;
pub mod store;
pub mod testtar;
pub mod unpack;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::future::{BoxFuture, FutureExt, Shared};

pub use cli::{run_cli, ImageCommand};
pub use config::{ImageConfig, RegistryConfig};
pub use defaults::{merge_process, ImageDefaults, MergedProcess};
pub use error::ImageError;
pub use metrics::ImageMetrics;
pub use reference::{Digest, ImageRef, SpecImage};
pub use store::CachedImage;

use store::{CacheDb, CachePaths, DigestLock, DiskMeta, TempPath};

/// A built root disk, ready to attach read-only as `vda`.
#[derive(Debug, Clone, PartialEq)]
pub struct RootDisk {
    /// The ext4 image file.
    pub path: PathBuf,
    /// The disks to stack, bottom first; `path` is `layers[0]`. One disk (the
    /// flattened image) until the image module builds a disk per layer; the runtime
    /// attaches them in this order (`plfm_guest_protocol::disks`).
    pub layers: Vec<PathBuf>,
    /// The manifest digest it was built from.
    pub digest: Digest,
    /// Apparent size of the disk in bytes.
    pub size_bytes: u64,
    /// Process defaults from the image config; merge them under the spec with
    /// [`merge_process`].
    pub config: ImageDefaults,
}

/// Timings of one `ensure` call, for the CLI and logs.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Timings {
    /// Served from the cache.
    pub cache_hit: bool,
    /// Pulling manifest, config and layers.
    pub pull: Duration,
    /// Unpacking layers.
    pub unpack: Duration,
    /// `mkfs.ext4` and the time normalisation.
    pub mkfs: Duration,
    /// Whole call.
    pub total: Duration,
    /// Compressed bytes downloaded.
    pub downloaded_bytes: u64,
}

/// What [`ImageService::gc`] removed.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GcReport {
    /// Digests of the evicted disks.
    pub evicted: Vec<String>,
    /// Allocated bytes freed.
    pub freed_bytes: u64,
}

type FlightResult = Result<(RootDisk, Timings), Arc<ImageError>>;
type Flight = Shared<BoxFuture<'static, FlightResult>>;

struct Inner {
    paths: CachePaths,
    config: ImageConfig,
    db: Mutex<CacheDb>,
    inflight: Mutex<HashMap<Digest, Flight>>,
    /// Images whose last attempt failed for a content reason, with their backoff.
    failures: Mutex<failures::FailureCache>,
    metrics: ImageMetrics,
}

/// The image cache and pipeline of one node. Cheap to clone; share one per agent.
#[derive(Clone)]
pub struct ImageService {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for ImageService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImageService")
            .field("root", &self.inner.paths.root)
            .finish()
    }
}

impl ImageService {
    /// Opens (creating if needed) the cache under `data_dir` and cleans up what
    /// interrupted pulls and builds left behind. Safe while another process (the
    /// daemon or the CLI) uses the same cache: only leftovers whose digest lock is
    /// free are removed.
    pub fn open(data_dir: &Path, config: ImageConfig) -> Result<Self, ImageError> {
        config.validate()?;
        let paths = CachePaths::new(data_dir);
        paths.create()?;
        let db = CacheDb::open(&paths.db)?;
        let svc = ImageService {
            inner: Arc::new(Inner {
                paths,
                config,
                db: Mutex::new(db),
                inflight: Mutex::new(HashMap::new()),
                failures: Mutex::new(failures::FailureCache::default()),
                metrics: ImageMetrics::default(),
            }),
        };
        svc.recover()?;
        Ok(svc)
    }

    /// The counters (register them with [`ImageMetrics::register`]).
    pub fn metrics(&self) -> &ImageMetrics {
        &self.inner.metrics
    }

    /// The configuration in use.
    pub fn config(&self) -> &ImageConfig {
        &self.inner.config
    }

    /// Where the cache lives (`<data_dir>/images`).
    pub fn root(&self) -> &Path {
        &self.inner.paths.root
    }

    fn db(&self) -> std::sync::MutexGuard<'_, CacheDb> {
        // A panic while holding the lock leaves the connection usable.
        self.inner.db.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Returns the root disk for `image`, pulling and building it if needed, and pins
    /// the digest for `instance_id` (replacing that instance's earlier pin) so the
    /// disk is not evicted while the instance is desired. Concurrent calls for one
    /// digest share one pull and one build.
    pub async fn ensure_root_disk(
        &self,
        image: &ImageRef,
        instance_id: &str,
    ) -> Result<RootDisk, ImageError> {
        self.db().pin(instance_id, &image.digest)?;
        self.ensure(image).await.map(|(d, _)| d)
    }

    /// Like [`Self::ensure_root_disk`] without pinning, with timings (the CLI's pull).
    pub async fn ensure(&self, image: &ImageRef) -> Result<(RootDisk, Timings), ImageError> {
        self.ensure_with_progress(image, None).await
    }

    /// [`Self::ensure`], reporting bytes per layer, unpack and mkfs into `progress`
    /// (the CLI's `image pull` display). A pull already in flight for the same digest
    /// is joined without progress: only its end is seen.
    pub async fn ensure_with_progress(
        &self,
        image: &ImageRef,
        progress: Option<Arc<progress::PullProgress>>,
    ) -> Result<(RootDisk, Timings), ImageError> {
        let started = Instant::now();
        if let Some(disk) = self.lookup(&image.digest)? {
            if let Some(p) = &progress {
                p.found_in_cache();
            }
            self.inner.metrics.cache_hits.inc();
            return Ok((
                disk,
                Timings {
                    cache_hit: true,
                    total: started.elapsed(),
                    ..Default::default()
                },
            ));
        }
        // A hostile or broken image is not pulled again in a tight loop.
        if let Some(cached) = self
            .inner
            .failures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .check(&image.pinned(), Instant::now())
        {
            return Err(cached);
        }
        let flight = {
            let mut map = self
                .inner
                .inflight
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            match map.get(&image.digest) {
                Some(f) => {
                    self.inner.metrics.cache_hits.inc();
                    f.clone()
                }
                None => {
                    self.inner.metrics.cache_misses.inc();
                    let svc = self.clone();
                    let img = image.clone();
                    let handle = tokio::spawn(async move {
                        // Leaves the in-flight map however the build ends (also on
                        // panic), so a later request starts afresh.
                        let _done = FlightDone {
                            svc: svc.clone(),
                            digest: img.digest.clone(),
                        };
                        let r = svc.build_flight(&img, progress).await.map_err(Arc::new);
                        svc.remember_outcome(&img, r.as_ref().map(|_| ()));
                        r
                    });
                    let f: Flight = async move {
                        match handle.await {
                            Ok(r) => r,
                            Err(e) => Err(Arc::new(ImageError::Tool {
                                tool: "image build task",
                                what: "root disk".into(),
                                cause: e.to_string(),
                            })),
                        }
                    }
                    .boxed()
                    .shared();
                    map.insert(image.digest.clone(), f.clone());
                    f
                }
            }
        };
        match flight.await {
            Ok((disk, mut t)) => {
                t.total = started.elapsed();
                Ok((disk, t))
            }
            Err(e) => Err(ImageError::Shared(e)),
        }
    }

    /// Feeds the negative cache (see [`failures`]).
    fn remember_outcome(&self, image: &ImageRef, outcome: Result<(), &Arc<ImageError>>) {
        let backoff = self
            .inner
            .failures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .record(&image.pinned(), outcome, Instant::now());
        if let (Some(backoff), Err(e)) = (backoff, outcome) {
            tracing::warn!(
                image = %image.pinned(),
                error = %e,
                retry_in_secs = backoff.as_secs(),
                "image failed for a reason in its content; not retried before the backoff passes"
            );
        }
    }

    /// A cached disk whose file still exists.
    fn lookup(&self, digest: &Digest) -> Result<Option<RootDisk>, ImageError> {
        let db = self.db();
        match db.lookup_and_touch(digest)? {
            Some((path, meta)) if path.is_file() => Ok(Some(RootDisk {
                layers: vec![path.clone()],
                path,
                digest: digest.clone(),
                size_bytes: meta.size_bytes,
                config: meta.defaults,
            })),
            Some(_) => {
                // The file vanished behind our back: forget it and rebuild.
                db.remove(digest.as_str())?;
                Ok(None)
            }
            None => Ok(None),
        }
    }

    async fn build_flight(
        &self,
        image: &ImageRef,
        progress: Option<Arc<progress::PullProgress>>,
    ) -> Result<(RootDisk, Timings), ImageError> {
        let deadline = Instant::now() + self.inner.config.image_timeout();
        let timeout_err = || ImageError::LimitExceeded {
            what: format!("image {}", image.digest.short()),
            limit: "image_timeout_secs",
            detail: format!(
                "not ready within {} s",
                self.inner.config.image_timeout_secs
            ),
        };
        // Cross-process exclusion: the CLI and the daemon may share the cache.
        let paths = self.inner.paths.clone();
        let d = image.digest.clone();
        let lock = tokio::time::timeout_at(
            deadline.into(),
            tokio::task::spawn_blocking(move || DigestLock::acquire(&paths, &d)),
        )
        .await
        .map_err(|_| timeout_err())?
        .map_err(|e| ImageError::State {
            path: self.inner.paths.locks.clone(),
            cause: e.to_string(),
        })??;
        // Another process may have built it while we waited.
        if let Some(disk) = self.lookup(&image.digest)? {
            if let Some(p) = &progress {
                p.found_in_cache();
            }
            return Ok((
                disk,
                Timings {
                    cache_hit: true,
                    ..Default::default()
                },
            ));
        }
        let t0 = Instant::now();
        let pulled = tokio::time::timeout_at(
            deadline.into(),
            pull::pull_image(
                &self.inner.config,
                image,
                pull::PullDirs {
                    blobs: &self.inner.paths.blobs,
                    tmp: &self.inner.paths.tmp,
                },
                &self.inner.metrics,
                progress.as_deref(),
            ),
        )
        .await
        .map_err(|_| timeout_err())??;
        let pull_time = t0.elapsed();
        let downloaded_bytes = pulled.downloaded_bytes;
        let svc = self.clone();
        let img = image.clone();
        let (disk, unpack_time, mkfs_time) = tokio::task::spawn_blocking(move || {
            let r = svc.build_disk(&img, &pulled, deadline, progress.as_deref());
            if !svc.inner.config.keep_blobs {
                for l in &pulled.layers {
                    let _ = std::fs::remove_file(&l.path);
                }
            }
            drop(lock);
            r
        })
        .await
        .map_err(|e| ImageError::Tool {
            tool: "image build task",
            what: format!("root disk of {}", image.digest.short()),
            cause: e.to_string(),
        })??;
        self.inner.metrics.builds.inc();
        self.inner
            .metrics
            .build_seconds
            .inc_by((unpack_time + mkfs_time).as_secs_f64());
        if let Err(e) = self.gc() {
            tracing::warn!(error = %e, "image cache eviction failed");
        }
        Ok((
            disk,
            Timings {
                cache_hit: false,
                pull: pull_time,
                unpack: unpack_time,
                mkfs: mkfs_time,
                total: Duration::ZERO,
                downloaded_bytes,
            },
        ))
    }

    /// Unpacks and builds; runs on a blocking thread with the digest lock held.
    fn build_disk(
        &self,
        image: &ImageRef,
        pulled: &pull::PulledImage,
        deadline: Instant,
        progress: Option<&progress::PullProgress>,
    ) -> Result<(RootDisk, Duration, Duration), ImageError> {
        let stage = |s| {
            if let Some(p) = progress {
                p.advance(s)
            }
        };
        stage(progress::Stage::Unpacking);
        let paths = &self.inner.paths;
        let digest = &image.digest;
        let defaults = ImageDefaults::from_config_json(&pulled.config_json).map_err(|why| {
            ImageError::BadManifest {
                digest: digest.short(),
                repository: image.repository_url(),
                why: format!("image config: {why}"),
            }
        })?;
        let work = TempPath::new(paths.tmp.join(format!(
            "{}.build-{}",
            digest.hex(),
            store::unique()
        )));
        let tree = work.path().join("tree");
        std::fs::create_dir_all(&tree).map_err(|e| ImageError::build_io("create", &tree, e))?;
        let t0 = Instant::now();
        // The deadline is checked before every tar entry, and bounds the tools too.
        let mut unpacker = unpack::Unpacker::with_limits(
            &tree,
            unpack::UnpackLimits::from_config(&self.inner.config, deadline),
        )?;
        for layer in &pulled.layers {
            let f = std::fs::File::open(&layer.path)
                .map_err(|e| ImageError::build_io("open", &layer.path, e))?;
            unpacker.apply_layer(
                std::io::BufReader::with_capacity(256 * 1024, f),
                layer.compression,
                &layer.digest.short(),
            )?;
            if let Some(p) = progress {
                p.layer_unpacked();
            }
        }
        let stats = unpacker.finish()?;
        let unpack_time = t0.elapsed();
        tracing::debug!(digest = %digest, ?stats, "layers unpacked");
        let t1 = Instant::now();
        stage(progress::Stage::Mkfs);
        let tmp_disk = work.path().join("disk.ext4");
        let size = rootfs::build_ext4(&tree, &tmp_disk, digest, work.path(), deadline)?;
        // The tree is no longer needed; free its space before the rename.
        let _ = std::fs::remove_dir_all(&tree);
        let allocated = {
            use std::os::unix::fs::MetadataExt;
            std::fs::metadata(&tmp_disk)
                .map(|m| m.blocks() * 512)
                .map_err(|e| ImageError::build_io("stat", &tmp_disk, e))?
        };
        let meta = DiskMeta {
            digest: digest.to_string(),
            format_version: rootfs::FORMAT_VERSION,
            source: image.repository_url(),
            size_bytes: size,
            allocated_bytes: allocated,
            created_ms: store::now_ms(),
            defaults: defaults.clone(),
        };
        let final_disk = paths.disk(digest);
        std::fs::rename(&tmp_disk, &final_disk)
            .map_err(|e| ImageError::build_io("rename into", &final_disk, e))?;
        let meta_tmp = work.path().join("meta.json");
        let body = serde_json::to_vec_pretty(&meta).unwrap_or_default();
        write_synced(&meta_tmp, &body)?;
        let final_meta = paths.disk_meta(digest);
        std::fs::rename(&meta_tmp, &final_meta)
            .map_err(|e| ImageError::build_io("rename into", &final_meta, e))?;
        store::fsync_dir(&paths.disks)
            .map_err(|e| ImageError::build_io("fsync", &paths.disks, e))?;
        self.db().insert(&final_disk, &meta)?;
        let mkfs_time = t1.elapsed();
        stage(progress::Stage::Done);
        drop(work);
        Ok((
            RootDisk {
                layers: vec![final_disk.clone()],
                path: final_disk,
                digest: digest.clone(),
                size_bytes: size,
                config: defaults,
            },
            unpack_time,
            mkfs_time,
        ))
    }

    /// Removes `instance_id`'s pin. The disk stays cached until evicted.
    pub fn unpin(&self, instance_id: &str) -> Result<(), ImageError> {
        self.db().unpin(instance_id)
    }

    /// Drops the pins of every instance not in `desired` (for start-up, when the
    /// agent knows which instances it still wants).
    pub fn retain_pins(&self, desired: &[&str]) -> Result<u64, ImageError> {
        self.db().retain_pins(desired)
    }

    /// Evicts unreferenced disks, least recently used first, when usage exceeds the
    /// high-water mark, down to the low-water mark. Pinned disks are never evicted.
    pub fn gc(&self) -> Result<GcReport, ImageError> {
        let usage = self.db().usage()?;
        if usage <= self.inner.config.high_water_bytes() {
            return Ok(GcReport::default());
        }
        self.evict(Some(self.inner.config.low_water_bytes()))
    }

    /// Evicts every unreferenced disk (the operator's `image gc`).
    pub fn gc_unreferenced(&self) -> Result<GcReport, ImageError> {
        self.evict(None)
    }

    fn evict(&self, target: Option<u64>) -> Result<GcReport, ImageError> {
        let victims = self.db().evict(target)?;
        let mut report = GcReport::default();
        for v in victims {
            let Ok(d) = Digest::parse(&v.digest) else {
                continue;
            };
            let _ = std::fs::remove_file(&v.path);
            let _ = std::fs::remove_file(self.inner.paths.disk_meta(&d));
            self.inner.metrics.evictions.inc();
            report.freed_bytes += v.allocated_bytes;
            report.evicted.push(v.digest);
        }
        Ok(report)
    }

    /// Cached disks, least recently used first.
    pub fn list(&self) -> Result<Vec<CachedImage>, ImageError> {
        self.db().list()
    }

    /// Removes leftovers of interrupted work and reconciles files with rows.
    fn recover(&self) -> Result<(), ImageError> {
        let paths = &self.inner.paths;
        // tmp/<hex>.*: partial blobs and builds. Only when nobody holds that digest.
        for ent in read_dir_names(&paths.tmp)? {
            let hex = ent.split('.').next().unwrap_or("").to_string();
            let p = paths.tmp.join(&ent);
            if let Some(_lock) = DigestLock::try_acquire(paths, &hex)? {
                tracing::info!(path = %p.display(), "removing leftover of an interrupted pull or build");
                let _ = std::fs::remove_dir_all(&p).or_else(|_| std::fs::remove_file(&p));
            }
        }
        // Rows whose disk is gone.
        let rows = self.db().list()?;
        for r in &rows {
            if !r.path.is_file() {
                self.db().remove(&r.digest)?;
            }
        }
        // Disks without a row: adopt when the metadata is complete, else remove.
        let known: std::collections::HashSet<PathBuf> =
            self.db().list()?.into_iter().map(|r| r.path).collect();
        for name in read_dir_names(&paths.disks)? {
            let Some(hex) = name.strip_suffix(&format!(".v{}.ext4", rootfs::FORMAT_VERSION)) else {
                continue;
            };
            let disk = paths.disks.join(&name);
            if known.contains(&disk) {
                continue;
            }
            let Some(_lock) = DigestLock::try_acquire(paths, hex)? else {
                continue;
            };
            let Ok(digest) = Digest::parse(&format!("sha256:{hex}")) else {
                continue;
            };
            let meta: Option<DiskMeta> = std::fs::read(paths.disk_meta(&digest))
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok());
            match meta {
                Some(m) if m.digest == digest.as_str() => self.db().insert(&disk, &m)?,
                _ => {
                    let _ = std::fs::remove_file(&disk);
                }
            }
        }
        Ok(())
    }
}

/// Removes a digest's entry from the in-flight map when dropped.
struct FlightDone {
    svc: ImageService,
    digest: Digest,
}

impl Drop for FlightDone {
    fn drop(&mut self) {
        self.svc
            .inner
            .inflight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.digest);
    }
}

fn read_dir_names(dir: &Path) -> Result<Vec<String>, ImageError> {
    let rd = std::fs::read_dir(dir).map_err(|e| ImageError::build_io("list", dir, e))?;
    Ok(rd
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().into_string().ok())
        .collect())
}

fn write_synced(path: &Path, body: &[u8]) -> Result<(), ImageError> {
    use std::io::Write;
    let mut f = std::fs::File::create(path).map_err(|e| ImageError::build_io("create", path, e))?;
    f.write_all(body)
        .map_err(|e| ImageError::build_io("write", path, e))?;
    f.sync_all()
        .map_err(|e| ImageError::build_io("fsync", path, e))
}
