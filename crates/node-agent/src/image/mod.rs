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
//! An image becomes a *stack of layer disks*, bottom first: one read-only ext4 disk
//! per layer, in overlayfs' format (whiteouts as character devices 0:0, opaque
//! directories marked), which guest init stacks under its overlay root. A layer disk
//! is keyed by its blob digest and shared by every image that has the layer, so a
//! new release that changes only its top layer downloads, unpacks and builds only
//! that layer. Images of more than [`MAX_LAYER_DISKS`] layers get their bottom layers
//! merged into one disk; an image whose hard links cross layers gets one disk of all
//! its layers (a disk cannot link into another). Both choices depend only on the
//! image's content, so the same digest always gives the same disks.
//!
//! Flow of one request: pin the digest for the instance → cache hit? return → a
//! content failure of this image still in its backoff ([`failures`])? return it → else
//! join or start the single flight for that digest (one per digest per process, and a
//! `flock` per digest across processes) → fetch and verify manifest and config →
//! plan the layer disks and lock them (sorted, so flights never deadlock) → for each
//! disk not cached, in parallel: with the direct builder and blobs not kept, its
//! bottom layer streams from the registry into the disk being built while the run's
//! other layers (if merged) download to the blob store, then they follow; otherwise
//! its blobs download (verified while streaming), then, on one of the machine's
//! cores, they are unpacked and the disk built in `tmp/` (in-process, or by
//! `mkfs.ext4 -d`) → rename → record → record the image → evict above the
//! high-water mark.
//! Errors are [`ImageError`]; [`ImageError::reason`] gives the reason code.

pub mod cli;
pub mod config;
pub mod defaults;
pub mod error;
pub mod ext4;
pub mod failures;
pub mod fstree;
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

use store::{CacheDb, CachePaths, DigestLock, DiskMeta, LayerDisk, TempPath};

/// Most layer disks one image is made of; an image with more layers gets its bottom
/// layers merged into one disk. Guest init stacks up to
/// `plfm_guest_protocol::disks::MAX_ROOT_LAYERS` (16), but every disk is a virtio
/// device and Firecracker v1.16.1 starts at most 17 of them (15 disks next to the
/// network and vsock devices): 8 layers leave room for the scratch disk and 6 volumes.
/// Base layers change least, so merging them costs little reuse.
pub const MAX_LAYER_DISKS: usize = 8;
const _: () = assert!(MAX_LAYER_DISKS <= plfm_guest_protocol::disks::MAX_ROOT_LAYERS as usize);

/// A built root disk, ready to attach read-only as `vda`.
#[derive(Debug, Clone, PartialEq)]
pub struct RootDisk {
    /// The bottom layer disk (`layers[0]`).
    pub path: PathBuf,
    /// The layer disks to stack, bottom first; never empty.
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
    /// From the start of the pull (manifest and config) until the last layer was
    /// downloaded.
    pub pull: Duration,
    /// Unpacking, summed over the layer disks built. The disks build at the same
    /// time (and overlap the downloads), so the sum can exceed `total`.
    pub unpack: Duration,
    /// Writing each layer disk's file system once its layers are unpacked (the
    /// metadata with the direct builder; `mkfs.ext4` and the time normalisation
    /// with the mkfs builder), summed like `unpack`.
    pub mkfs: Duration,
    /// Whole call.
    pub total: Duration,
    /// Compressed bytes downloaded.
    pub downloaded_bytes: u64,
    /// Layer disks found in the cache (shared with other images).
    pub layers_reused: usize,
    /// Layer disks built by this call.
    pub layers_built: usize,
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
    /// Memory staging for unpacking (`staging_memory_bytes`), when available.
    staging: Option<Staging>,
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
        let staging = Staging::open(&config, data_dir);
        let svc = ImageService {
            inner: Arc::new(Inner {
                staging,
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

    /// A cached image whose layer disks all still exist.
    fn lookup(&self, digest: &Digest) -> Result<Option<RootDisk>, ImageError> {
        let db = self.db();
        let Some((path, meta)) = db.lookup_and_touch(digest)? else {
            return Ok(None);
        };
        if meta.format_version == store::FLAT_FORMAT_VERSION {
            // A flattened disk from before layer disks: a stack of one.
            if !path.is_file() {
                db.remove_any_format(digest.as_str(), &path)?;
                return Ok(None);
            }
            return Ok(Some(RootDisk {
                layers: vec![path.clone()],
                path,
                digest: digest.clone(),
                size_bytes: meta.size_bytes,
                config: meta.defaults,
            }));
        }
        let layers = db.image_layers(digest.as_str())?;
        let named = db.image_layer_count(digest.as_str())?;
        if layers.is_empty()
            || layers.len() as u64 != named
            || layers.iter().any(|l| !l.path.is_file())
        {
            // A layer disk vanished behind our back: forget the image and rebuild
            // (reusing the layer disks that are left).
            db.remove(digest.as_str())?;
            return Ok(None);
        }
        let paths: Vec<PathBuf> = layers.into_iter().map(|l| l.path).collect();
        Ok(Some(RootDisk {
            path: paths[0].clone(),
            layers: paths,
            digest: digest.clone(),
            size_bytes: meta.size_bytes,
            config: meta.defaults,
        }))
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
        let blobs = self.inner.paths.blobs.clone();
        let session = tokio::time::timeout_at(
            deadline.into(),
            pull::open(&self.inner.config, image, &blobs),
        )
        .await
        .map_err(|_| timeout_err())??;
        let defaults = ImageDefaults::from_config_json(&session.config_json).map_err(|why| {
            ImageError::BadManifest {
                digest: image.digest.short(),
                repository: image.repository_url(),
                why: format!("image config: {why}"),
            }
        })?;
        let session = Arc::new(session);
        let mut flat = false;
        let (layers, mut timings, run_locks) = loop {
            let runs = plan_runs(&session.layers, flat);
            // The runs stop at the deadline themselves (downloads are cut, unpacking
            // checks it per entry) and wait for their builds to end, so nothing is
            // left behind in `tmp/`; this bound is only the backstop.
            let r = tokio::time::timeout_at(
                (deadline + RUNS_GRACE).into(),
                self.build_runs(&session, &runs, deadline, progress.clone(), t0),
            )
            .await
            .map_err(|_| timeout_err())?;
            match r {
                Err(ImageError::HardLinkAcrossLayers { layer, path }) if !flat => {
                    tracing::info!(
                        image = %image.pinned(),
                        layer = %layer,
                        link = %path,
                        "a hard link crosses layers: building the image as one disk"
                    );
                    flat = true;
                }
                r => break r?,
            }
        };
        session.finished(&self.inner.metrics);
        let meta = DiskMeta {
            digest: image.digest.to_string(),
            format_version: rootfs::FORMAT_VERSION,
            source: image.repository_url(),
            size_bytes: layers.iter().map(|l| l.size_bytes).sum(),
            allocated_bytes: layers.iter().map(|l| l.allocated_bytes).sum(),
            created_ms: store::now_ms(),
            defaults: defaults.clone(),
        };
        let svc = self.clone();
        let (m, ls) = (meta.clone(), layers.clone());
        let paths_for_meta = self.inner.paths.clone();
        let digest = image.digest.clone();
        tokio::task::spawn_blocking(move || -> Result<(), ImageError> {
            let meta_tmp =
                paths_for_meta
                    .tmp
                    .join(format!("{}.meta-{}", digest.hex(), store::unique()));
            let body = serde_json::to_vec_pretty(&m).unwrap_or_default();
            write_synced(&meta_tmp, &body)?;
            let final_meta = paths_for_meta.disk_meta(&digest);
            std::fs::rename(&meta_tmp, &final_meta)
                .map_err(|e| ImageError::build_io("rename into", &final_meta, e))?;
            store::fsync_dir(&paths_for_meta.disks)
                .map_err(|e| ImageError::build_io("fsync", &paths_for_meta.disks, e))?;
            svc.db().insert_image(&m, &ls)?;
            drop(run_locks);
            if !svc.inner.config.keep_blobs {
                for l in &session.layers {
                    let _ = std::fs::remove_file(&l.path);
                }
            }
            drop(lock);
            Ok(())
        })
        .await
        .map_err(|e| ImageError::Tool {
            tool: "image build task",
            what: format!("root disk of {}", image.digest.short()),
            cause: e.to_string(),
        })??;
        if let Some(p) = &progress {
            p.advance(progress::Stage::Done);
        }
        self.inner.metrics.builds.inc();
        self.inner
            .metrics
            .build_seconds
            .inc_by((timings.unpack + timings.mkfs).as_secs_f64());
        if let Err(e) = self.gc() {
            tracing::warn!(error = %e, "image cache eviction failed");
        }
        let paths: Vec<PathBuf> = layers.into_iter().map(|l| l.path).collect();
        timings.cache_hit = false;
        Ok((
            RootDisk {
                path: paths[0].clone(),
                layers: paths,
                digest: image.digest.clone(),
                size_bytes: meta.size_bytes,
                config: defaults,
            },
            timings,
        ))
    }

    /// Locks the layer disks of `runs` (sorted by key, so two flights never wait on
    /// each other), reuses those cached, and for the others downloads their blobs
    /// and builds them, each disk as soon as its own blobs are in, at most one build
    /// per core. Returns the disks bottom first, with their locks: the caller holds
    /// them until the image row names the disks, so eviction cannot take one first.
    async fn build_runs(
        &self,
        session: &Arc<pull::Session>,
        runs: &[Run],
        deadline: Instant,
        progress: Option<Arc<progress::PullProgress>>,
        t0: Instant,
    ) -> Result<(Vec<LayerDisk>, Timings, Vec<DigestLock>), ImageError> {
        let mut keys: Vec<String> = runs.iter().map(|r| r.key.clone()).collect();
        keys.sort();
        keys.dedup();
        let paths = self.inner.paths.clone();
        let locks = tokio::task::spawn_blocking(move || {
            keys.iter()
                .map(|k| DigestLock::acquire_key(&paths, k))
                .collect::<Result<Vec<_>, _>>()
        })
        .await
        .map_err(|e| ImageError::State {
            path: self.inner.paths.locks.clone(),
            cause: e.to_string(),
        })??;
        let mut found: Vec<Option<LayerDisk>> = Vec::with_capacity(runs.len());
        {
            let mut db = self.db();
            for r in runs {
                match db.lookup_layer(&r.key)? {
                    Some(d) if d.path.is_file() => found.push(Some(d)),
                    Some(_) => {
                        db.remove_layer(&r.key)?;
                        found.push(None);
                    }
                    None => found.push(None),
                }
            }
        }
        let mut wanted = vec![false; session.layers.len()];
        for (r, f) in runs.iter().zip(&found) {
            if f.is_none() {
                wanted[r.start..r.end].iter_mut().for_each(|w| *w = true);
            }
        }
        session.announce(&wanted, progress.as_deref());
        let reused = found.iter().filter(|f| f.is_some()).count();
        self.inner.metrics.layer_reuses.inc_by(reused as u64);
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        let cpu = Arc::new(tokio::sync::Semaphore::new(cores));
        let budget = Arc::new(unpack::SharedBudget::default());
        let pulled_at = Arc::new(Mutex::new(t0));
        let builds = runs
            .iter()
            .zip(&found)
            .filter(|(_, f)| f.is_none())
            .map(|(r, _)| {
                let (svc, session, cpu, budget) =
                    (self.clone(), session.clone(), cpu.clone(), budget.clone());
                let (run, progress, pulled_at) = (r.clone(), progress.clone(), pulled_at.clone());
                async move {
                    // A run whose bottom layer is not stored, built by the direct
                    // builder, with blobs not to be kept: that layer streams from the
                    // registry into the disk (the run's other layers download beside it).
                    let streamed = svc.inner.config.disk_builder == config::DiskBuilder::Direct
                        && !svc.inner.config.keep_blobs
                        && !session.layers[run.start].path.is_file();
                    if streamed {
                        return svc
                            .stream_run(session, run, deadline, budget, progress, pulled_at)
                            .await;
                    }
                    let mut mask = vec![false; session.layers.len()];
                    mask[run.start..run.end].iter_mut().for_each(|w| *w = true);
                    let dirs = pull::PullDirs {
                        blobs: &svc.inner.paths.blobs,
                        tmp: &svc.inner.paths.tmp,
                    };
                    let n = tokio::time::timeout_at(
                        deadline.into(),
                        session.download(
                            &svc.inner.config,
                            &mask,
                            dirs,
                            &svc.inner.metrics,
                            progress.as_deref(),
                        ),
                    )
                    .await
                    .map_err(|_| svc.deadline_passed(&run))??;
                    {
                        let mut at = pulled_at.lock().unwrap_or_else(|p| p.into_inner());
                        *at = (*at).max(Instant::now());
                    }
                    let _permit = cpu.acquire_owned().await.map_err(|e| ImageError::Tool {
                        tool: "image build task",
                        what: run.key.clone(),
                        cause: e.to_string(),
                    })?;
                    let key = run.key.clone();
                    let built = tokio::task::spawn_blocking(move || {
                        svc.build_run(&session, &run, deadline, &budget, progress.as_deref(), None)
                    })
                    .await
                    .map_err(|e| ImageError::Tool {
                        tool: "image build task",
                        what: format!("layer disk {key}"),
                        cause: e.to_string(),
                    })??;
                    Ok::<_, ImageError>((built, n))
                }
            });
        // Every build ends (or fails) before this returns, so a failed flight leaves
        // no work behind in `tmp/` and no build running under a released lock. The
        // first failure in layer order is reported.
        let built = futures_util::future::join_all(builds)
            .await
            .into_iter()
            .collect::<Result<Vec<_>, _>>()?;
        let mut timings = Timings {
            layers_reused: reused,
            layers_built: built.len(),
            ..Default::default()
        };
        let mut built = built.into_iter();
        let mut out = Vec::with_capacity(runs.len());
        for f in found {
            match f {
                Some(d) => out.push(d),
                None => {
                    let Some(((d, unpack_t, mkfs_t), n)) = built.next() else {
                        return Err(ImageError::Tool {
                            tool: "image build task",
                            what: "layer disks".into(),
                            cause: "a build result is missing".into(),
                        });
                    };
                    timings.downloaded_bytes += n;
                    timings.unpack += unpack_t;
                    timings.mkfs += mkfs_t;
                    out.push(d);
                }
            }
        }
        timings.pull = pulled_at
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .duration_since(t0);
        Ok((out, timings, locks))
    }

    /// The error of a run stopped by the image's deadline.
    fn deadline_passed(&self, run: &Run) -> ImageError {
        ImageError::LimitExceeded {
            what: format!("layer disk {}", &run.key[..run.key.len().min(12)]),
            limit: "image_timeout_secs",
            detail: format!(
                "not ready within {} s",
                self.inner.config.image_timeout_secs
            ),
        }
    }

    /// Builds the disk of a run while its bottom layer downloads: the bytes go from
    /// the registry through a bounded channel into the decoding thread and the disk,
    /// and no blob is stored for it. The run's other layers (a merged run's) download
    /// to the blob store at the same time, and the build opens them only once all
    /// of them are verified there. The download verifies the digest as the bytes
    /// pass; the build commits its disk only after the download said the layer was
    /// whole and matched, and a failed download is the error reported (the build's
    /// own failure then only follows from the broken stream).
    async fn stream_run(
        &self,
        session: Arc<pull::Session>,
        run: Run,
        deadline: Instant,
        budget: Arc<unpack::SharedBudget>,
        progress: Option<Arc<progress::PullProgress>>,
        pulled_at: Arc<Mutex<Instant>>,
    ) -> Result<((LayerDisk, Duration, Duration), u64), ImageError> {
        let (tee, blob) = pull::stream_channel();
        let (verified_tx, verified_rx) = std::sync::mpsc::sync_channel::<bool>(1);
        let (rest_tx, rest_rx) = std::sync::mpsc::sync_channel::<bool>(1);
        let rest: Vec<bool> = (0..session.layers.len())
            .map(|i| i > run.start && i < run.end)
            .collect();
        let stream = Streamed {
            blob,
            verified: verified_rx,
            rest: rest_rx,
        };
        let (svc, s2, r2, p2) = (self.clone(), session.clone(), run.clone(), progress.clone());
        let mut build = tokio::task::spawn_blocking(move || {
            svc.build_run(&s2, &r2, deadline, &budget, p2.as_deref(), Some(stream))
        });
        let streamed = session.stream_layer(
            &self.inner.config,
            run.start,
            &self.inner.paths.tmp,
            &self.inner.metrics,
            progress.as_deref(),
            tee,
        );
        let others = async {
            // Owned by this future: dropped with it (at the deadline), so a build
            // waiting for the verdict is never left waiting.
            let rest_tx = rest_tx;
            let dirs = pull::PullDirs {
                blobs: &self.inner.paths.blobs,
                tmp: &self.inner.paths.tmp,
            };
            let r = session
                .download(
                    &self.inner.config,
                    &rest,
                    dirs,
                    &self.inner.metrics,
                    progress.as_deref(),
                )
                .await;
            let _ = rest_tx.send(r.is_ok());
            r
        };
        // Ends at the first failure of either, so that failure (not the build's
        // report that its input stopped) is the error reported.
        let download = tokio::time::timeout_at(
            deadline.into(),
            futures_util::future::try_join(streamed, others),
        );
        let join_err = |e: tokio::task::JoinError| ImageError::Tool {
            tool: "image build task",
            what: format!("layer disk {}", run.key),
            cause: e.to_string(),
        };
        // The build waits for the download's verdict before it can succeed, so a
        // build that ends first has failed (it refused the layer): the download is
        // dropped then rather than run to its end for nothing. The download is
        // polled first: when it failed, the reader's error comes from it, and its
        // error (digest, truncation, timeout) is the one to report.
        let downloaded = tokio::select! {
            biased;
            d = download => d
                .unwrap_or_else(|_| Err(self.deadline_passed(&run)))
                .map(|(a, b)| a + b),
            b = &mut build => {
                let _ = verified_tx.send(false);
                return match b.map_err(join_err)? {
                    Err(e) => Err(e),
                    Ok(_) => Err(ImageError::Tool {
                        tool: "image build task",
                        what: format!("layer disk {}", run.key),
                        cause: "the build ended before its layer was verified".into(),
                    }),
                };
            }
        };
        let _ = verified_tx.send(downloaded.is_ok());
        {
            let mut at = pulled_at.lock().unwrap_or_else(|p| p.into_inner());
            *at = (*at).max(Instant::now());
        }
        let built = build.await.map_err(join_err);
        let n = downloaded?;
        let built = built??;
        self.inner.metrics.layers_streamed.inc();
        Ok((built, n))
    }

    /// Unpacks one run of layers in overlay format and builds its disk; runs on a
    /// blocking thread with the run's lock held. Returns the disk and the time spent
    /// unpacking and building.
    fn build_run(
        &self,
        session: &pull::Session,
        run: &Run,
        deadline: Instant,
        budget: &Arc<unpack::SharedBudget>,
        progress: Option<&progress::PullProgress>,
        stream: Option<Streamed>,
    ) -> Result<(LayerDisk, Duration, Duration), ImageError> {
        if let Some(p) = progress {
            p.advance(progress::Stage::Unpacking);
        }
        let paths = &self.inner.paths;
        let work = TempPath::new(
            paths
                .tmp
                .join(format!("{}.build-{}", run.key, store::unique())),
        );
        std::fs::create_dir_all(work.path())
            .map_err(|e| ImageError::build_io("create", work.path(), e))?;
        let t0 = Instant::now();
        let seed = Digest::parse(&format!("sha256:{}", run.key)).map_err(|_| ImageError::Tool {
            tool: "image build task",
            what: format!("layer disk {}", run.key),
            cause: "key is not a sha256 hex digest".into(),
        })?;
        let tmp_disk = work.path().join("disk.ext4");
        let (size, unpack_time, t1) = match self.inner.config.disk_builder {
            config::DiskBuilder::Direct => {
                let (size, unpack_time) = self.build_direct(
                    session, run, &tmp_disk, &seed, deadline, budget, progress, stream,
                )?;
                // The file system's writing (metadata, fsync) counts from the
                // end of the unpacking, like `mkfs` in the other builder.
                (size, unpack_time, t0 + unpack_time)
            }
            config::DiskBuilder::Mkfs => self.build_with_mkfs(
                session, run, &work, &tmp_disk, &seed, deadline, budget, progress, t0,
            )?,
        };
        let allocated = {
            use std::os::unix::fs::MetadataExt;
            std::fs::metadata(&tmp_disk)
                .map(|m| m.blocks() * 512)
                .map_err(|e| ImageError::build_io("stat", &tmp_disk, e))?
        };
        let final_disk = paths.layer_disk(&run.key);
        std::fs::rename(&tmp_disk, &final_disk)
            .map_err(|e| ImageError::build_io("rename into", &final_disk, e))?;
        store::fsync_dir(&paths.layers)
            .map_err(|e| ImageError::build_io("fsync", &paths.layers, e))?;
        let disk = LayerDisk {
            key: run.key.clone(),
            path: final_disk,
            size_bytes: size,
            allocated_bytes: allocated,
        };
        self.db().insert_layer(&disk)?;
        self.inner.metrics.layer_builds.inc();
        drop(work);
        Ok((disk, unpack_time, t1.elapsed()))
    }

    /// The direct builder: the run's layers stream into `out` (an ext4 image whose
    /// data area takes the file bytes), then the metadata is laid out. Returns the
    /// disk size and the time the layers took to stream in.
    #[allow(clippy::too_many_arguments)]
    fn build_direct(
        &self,
        session: &pull::Session,
        run: &Run,
        out: &Path,
        seed: &Digest,
        deadline: Instant,
        budget: &Arc<unpack::SharedBudget>,
        progress: Option<&progress::PullProgress>,
        stream: Option<Streamed>,
    ) -> Result<(u64, Duration), ImageError> {
        let t0 = Instant::now();
        let (mut streamed_blob, verified, mut rest) = match stream {
            Some(s) => (Some(s.blob), Some(s.verified), Some(s.rest)),
            None => (None, None, None),
        };
        let mut builder =
            ext4::Ext4Builder::create(out).map_err(|e| ImageError::build_io("create", out, e))?;
        let mut unpacker = unpack::MemUnpacker::in_memory(
            unpack::UnpackLimits::from_config(&self.inner.config, deadline),
            &mut builder,
        )
        .overlay_format()
        .shared_budget(budget.clone());
        for layer in &session.layers[run.start..run.end] {
            let source: Box<dyn std::io::Read + Send> = match streamed_blob.take() {
                Some(blob) => Box::new(blob),
                None => {
                    // A streamed run's other layers are opened once they are stored.
                    if let Some(rest) = rest.take() {
                        if rest.recv() != Ok(true) {
                            return Err(ImageError::Tool {
                                tool: "image build task",
                                what: format!("layer disk {}", run.key),
                                cause: "a layer of the run failed to download".into(),
                            });
                        }
                    }
                    let f = std::fs::File::open(&layer.path)
                        .map_err(|e| ImageError::build_io("open", &layer.path, e))?;
                    Box::new(std::io::BufReader::with_capacity(256 * 1024, f))
                }
            };
            let tar = layer
                .compression
                .decoder_thread(source)
                .map_err(|e| ImageError::Tool {
                    tool: "image build task",
                    what: format!("layer {}", layer.digest.short()),
                    cause: format!("cannot start its decoding thread: {e}"),
                })?;
            unpacker.apply_layer(tar, unpack::Compression::None, &layer.digest.short())?;
        }
        let (tree, _, stats, _) = unpacker.finish_with_marks()?;
        let unpack_time = t0.elapsed();
        tracing::debug!(
            layer_disk = %run.key,
            ?stats,
            inodes = tree.inodes.len(),
            o_direct = builder.writes_direct(),
            "layers streamed into the disk"
        );
        if let Some(p) = progress {
            p.advance(progress::Stage::Mkfs);
        }
        let size = builder
            .finish(&tree, &rootfs::direct_params(seed, rootfs::DiskKind::Layer))
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::InvalidData => ImageError::Tool {
                    tool: "ext4 builder",
                    what: format!("layer disk {}", run.key),
                    cause: e.to_string(),
                },
                _ => ImageError::build_io("write", out, e),
            })?;
        if let Some(verified) = verified {
            // Nothing is committed from bytes the download has not vouched for.
            if verified.recv() != Ok(true) {
                return Err(ImageError::Tool {
                    tool: "image build task",
                    what: format!("layer disk {}", run.key),
                    cause: "the layer's download failed".into(),
                });
            }
        }
        // After the verdict: a streamed layer is unpacked only once it is known whole.
        if let Some(p) = progress {
            for i in run.start..run.end {
                p.layer_unpacked(i);
            }
        }
        Ok((size, unpack_time))
    }

    /// The `mkfs` builder: the run's layers are unpacked into a tree (in memory
    /// staging first, on disk when they do not fit), then `mkfs.ext4 -d` builds
    /// `out`. Returns the disk size, the unpack time and when the build began.
    #[allow(clippy::too_many_arguments)]
    fn build_with_mkfs(
        &self,
        session: &pull::Session,
        run: &Run,
        work: &TempPath,
        tmp_disk: &Path,
        seed: &Digest,
        deadline: Instant,
        budget: &Arc<unpack::SharedBudget>,
        progress: Option<&progress::PullProgress>,
        t0: Instant,
    ) -> Result<(u64, Duration, Instant), ImageError> {
        // In memory first when staging is on; on disk when the layer does not fit.
        let mut attempts: Vec<(TempPath, Option<u64>)> = Vec::new();
        if let Some(st) = &self.inner.staging {
            attempts.push((
                TempPath::new(
                    st.dir
                        .join(format!("{}.build-{}", run.key, store::unique())),
                ),
                Some(st.share),
            ));
        }
        attempts.push((TempPath::new(work.path().join("tree")), None));
        let mut staged = None;
        for (tree_dir, cap) in attempts {
            match self.unpack_run(
                session,
                run,
                tree_dir.path(),
                cap,
                deadline,
                budget,
                progress,
            ) {
                Ok(r) => {
                    staged = Some((tree_dir, r));
                    break;
                }
                Err(ImageError::StagingFull { layer, why }) => {
                    tracing::info!(layer_disk = %run.key, %layer, %why, "layer does not fit the memory staging; unpacking it on disk");
                    self.inner.metrics.staging_fallbacks.inc();
                }
                Err(e) => return Err(e),
            }
        }
        let Some((tree_dir, (stats, marks))) = staged else {
            return Err(ImageError::Tool {
                tool: "image build task",
                what: format!("layer disk {}", run.key),
                cause: "no place to unpack".into(),
            });
        };
        let tree = tree_dir.path().to_path_buf();
        let unpack_time = t0.elapsed();
        tracing::debug!(layer_disk = %run.key, ?stats, "layers unpacked");
        let t1 = Instant::now();
        if let Some(p) = progress {
            p.advance(progress::Stage::Mkfs);
        }
        let size = rootfs::build_ext4(
            &tree,
            tmp_disk,
            seed,
            work.path(),
            deadline,
            rootfs::DiskKind::Layer,
            &marks,
        )?;
        // The tree is no longer needed; free its space (or memory) before the rename.
        drop(tree_dir);
        Ok((size, unpack_time, t1))
    }

    /// Unpacks the layers of `run` into `tree` (created here) in overlay format; with
    /// `staging_cap`, as a memory staging area of that many bytes.
    #[allow(clippy::too_many_arguments)]
    fn unpack_run(
        &self,
        session: &pull::Session,
        run: &Run,
        tree: &Path,
        staging_cap: Option<u64>,
        deadline: Instant,
        budget: &Arc<unpack::SharedBudget>,
        progress: Option<&progress::PullProgress>,
    ) -> Result<(unpack::UnpackStats, unpack::OverlayMarks), ImageError> {
        std::fs::create_dir_all(tree).map_err(|e| ImageError::build_io("create", tree, e))?;
        // The deadline is checked before every tar entry, and bounds the tools too.
        let mut unpacker = unpack::Unpacker::with_limits(
            tree,
            unpack::UnpackLimits::from_config(&self.inner.config, deadline),
        )?
        .overlay_format()
        .shared_budget(budget.clone());
        if let Some(cap) = staging_cap {
            unpacker = unpacker.staging(cap);
        }
        for layer in &session.layers[run.start..run.end] {
            let r = std::fs::File::open(&layer.path)
                .map_err(|e| ImageError::build_io("open", &layer.path, e))
                .and_then(|f| {
                    unpacker.apply_layer(
                        std::io::BufReader::with_capacity(256 * 1024, f),
                        layer.compression,
                        &layer.digest.short(),
                    )
                });
            if let Err(e) = r {
                if matches!(e, ImageError::StagingFull { .. }) {
                    unpacker.release_budget();
                }
                return Err(e);
            }
        }
        if let Some(p) = progress {
            for i in run.start..run.end {
                p.layer_unpacked(i);
            }
        }
        unpacker.finish_with_marks()
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
        let ev = self.db().evict(&self.inner.paths, target)?;
        let mut report = GcReport::default();
        for (d, lock) in ev.layers {
            let _ = std::fs::remove_file(&d.path);
            report.freed_bytes += d.allocated_bytes;
            drop(lock);
        }
        for f in ev.legacy_files {
            let _ = std::fs::remove_file(&f);
        }
        for v in ev.images {
            if let Ok(d) = Digest::parse(&v.digest) {
                let _ = std::fs::remove_file(self.inner.paths.disk_meta(&d));
            }
            if v.path.parent() == Some(self.inner.paths.disks.as_path()) {
                // An older format's flattened disk.
                report.freed_bytes += v.allocated_bytes;
            }
            self.inner.metrics.evictions.inc();
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
        // The memory staging area's leftovers, likewise.
        if let Some(st) = &self.inner.staging {
            for ent in read_dir_names(&st.dir)? {
                let key = ent.split('.').next().unwrap_or("").to_string();
                if let Some(_lock) = DigestLock::try_acquire(paths, &key)? {
                    let p = st.dir.join(&ent);
                    let _ = std::fs::remove_dir_all(&p).or_else(|_| std::fs::remove_file(&p));
                }
            }
        }
        // Layer disks whose file is gone: forget them and the images naming them.
        let layers = self.db().layers()?;
        for l in &layers {
            if !l.path.is_file() {
                self.db().remove_layer(&l.key)?;
            }
        }
        // Layer disk files without a row (a crash between rename and record): removed
        // when nobody holds them; the next build makes them again.
        let known: std::collections::HashSet<PathBuf> =
            self.db().layers()?.into_iter().map(|r| r.path).collect();
        for name in read_dir_names(&paths.layers)? {
            let disk = paths.layers.join(&name);
            if known.contains(&disk) {
                continue;
            }
            let key = name.split('.').next().unwrap_or("").to_string();
            if let Some(_lock) = DigestLock::try_acquire(paths, &key)? {
                tracing::info!(path = %disk.display(), "removing a layer disk with no record");
                let _ = std::fs::remove_file(&disk);
            }
        }
        // Images of older formats whose flattened disk is gone, and flattened disks
        // no row names.
        let rows = self.db().list_all()?;
        for r in &rows {
            if r.path.parent() == Some(paths.disks.as_path()) && !r.path.is_file() {
                self.db().remove_any_format(&r.digest, &r.path)?;
            }
        }
        let named: std::collections::HashSet<PathBuf> =
            self.db().list_all()?.into_iter().map(|r| r.path).collect();
        for name in read_dir_names(&paths.disks)? {
            let file = paths.disks.join(&name);
            if !name.ends_with(".ext4") || named.contains(&file) {
                continue;
            }
            let hex = name.split('.').next().unwrap_or("").to_string();
            if let Some(_lock) = DigestLock::try_acquire(paths, &hex)? {
                let _ = std::fs::remove_file(&file);
            }
        }
        Ok(())
    }
}

/// The memory staging area of this cache: a directory of its own under the
/// configured tmpfs, and each build's share of `staging_memory_bytes`.
struct Staging {
    dir: PathBuf,
    share: u64,
}

impl Staging {
    /// Off when `staging_memory_bytes` is 0 or `staging_dir` is unusable (logged).
    fn open(config: &ImageConfig, data_dir: &Path) -> Option<Staging> {
        // The direct builder writes no tree, so it needs no staging area.
        if config.staging_memory_bytes == 0 || config.disk_builder == config::DiskBuilder::Direct {
            return None;
        }
        use sha2::Digest as _;
        let abs = std::path::absolute(data_dir).unwrap_or_else(|_| data_dir.to_path_buf());
        let tag = hex::encode(&sha2::Sha256::digest(abs.as_os_str().as_encoded_bytes())[..8]);
        let dir = config.staging_dir.join(format!("plfm-images-{tag}"));
        if let Err(why) = Self::make_private_dir(&dir) {
            tracing::warn!(dir = %dir.display(), error = %why, "memory staging unavailable; layers are unpacked on disk");
            return None;
        }
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get()) as u64;
        Some(Staging {
            dir,
            share: config.staging_memory_bytes / cores,
        })
    }
}

impl Staging {
    /// Creates `dir` (mode 0700) or accepts it only if it is a real directory (not a
    /// symlink) owned by this process's user with no group or other permissions. The
    /// staging dir sits in a world-writable tmpfs under a predictable name: another
    /// local user who made it first (or planted a symlink there) must not get to see
    /// or change the trees unpacked in it.
    fn make_private_dir(dir: &Path) -> Result<(), String> {
        use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
        match std::fs::DirBuilder::new().mode(0o700).create(dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e.to_string()),
        }
        let m = std::fs::symlink_metadata(dir).map_err(|e| e.to_string())?;
        let me = rustix::process::geteuid().as_raw();
        if !m.file_type().is_dir() {
            return Err("exists and is not a directory (a symlink?)".into());
        }
        if m.uid() != me {
            return Err(format!(
                "owned by uid {}, not by this agent (uid {me})",
                m.uid()
            ));
        }
        if m.permissions().mode() & 0o077 != 0 {
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    }
}

/// One layer disk of an image: layers `start..end` (bottom-up indices), and its key.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Run {
    start: usize,
    end: usize,
    key: String,
}

/// How long past the image's deadline its runs may take to stop and clean up.
const RUNS_GRACE: Duration = Duration::from_secs(5);

/// A layer arriving from the registry while its disk is built (see
/// [`ImageService::stream_run`]).
struct Streamed {
    blob: pull::StreamedBlob,
    /// The download's verdict: true once the whole layer arrived and matched.
    verified: std::sync::mpsc::Receiver<bool>,
    /// True once the run's other layers are all stored and verified (sent at once
    /// for a run of one layer).
    rest: std::sync::mpsc::Receiver<bool>,
}

/// The layer disks of an image with these layers: one per layer, the bottom ones
/// merged when there are more than [`MAX_LAYER_DISKS`], or one for all when `flat`.
fn plan_runs(layers: &[pull::PulledLayer], flat: bool) -> Vec<Run> {
    let n = layers.len();
    let run = |start: usize, end: usize| Run {
        start,
        end,
        key: run_key(&layers[start..end]),
    };
    if flat || n <= 1 {
        return vec![run(0, n)];
    }
    let merged = n.saturating_sub(MAX_LAYER_DISKS - 1).max(1);
    let mut runs = vec![run(0, merged)];
    runs.extend((merged..n).map(|i| run(i, i + 1)));
    runs
}

/// A single layer's disk is keyed by its blob's hex digest; a disk of several
/// layers by the sha256 of their digests in order.
fn run_key(layers: &[pull::PulledLayer]) -> String {
    if let [one] = layers {
        return one.digest.hex().to_string();
    }
    use sha2::Digest as _;
    let mut h = sha2::Sha256::new();
    h.update(b"plfm-layer-run\n");
    for l in layers {
        h.update(l.digest.as_str().as_bytes());
        h.update(b"\n");
    }
    hex::encode(h.finalize())
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

#[cfg(test)]
mod tests {
    use super::*;

    fn layers(n: u8) -> Vec<pull::PulledLayer> {
        (0..n)
            .map(|i| pull::PulledLayer {
                digest: Digest::of(&[i]),
                compression: unpack::Compression::Gzip,
                path: PathBuf::from(format!("/blobs/{i}")),
                size: 1,
            })
            .collect()
    }

    fn spans(runs: &[Run]) -> Vec<(usize, usize)> {
        runs.iter().map(|r| (r.start, r.end)).collect()
    }

    #[test]
    fn a_staging_dir_planted_by_someone_else_is_not_used() {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let tmp = tempfile::tempdir().unwrap();
        // Made here: a private directory.
        let ok = tmp.path().join("ok");
        Staging::make_private_dir(&ok).unwrap();
        assert_eq!(
            std::fs::metadata(&ok).unwrap().permissions().mode() & 0o777,
            0o700
        );
        // A symlink planted at the name (to a directory the planter controls).
        let theirs = tmp.path().join("theirs");
        std::fs::create_dir(&theirs).unwrap();
        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(&theirs, &link).unwrap();
        let e = Staging::make_private_dir(&link).unwrap_err();
        assert!(e.contains("not a directory"), "{e}");
        // A directory another user made first (needs root to give it away).
        if rustix::process::geteuid().is_root() {
            let other = tmp.path().join("other");
            std::fs::create_dir(&other).unwrap();
            std::os::unix::fs::chown(&other, Some(65534), Some(65534)).unwrap();
            let e = Staging::make_private_dir(&other).unwrap_err();
            assert!(e.contains("owned by uid 65534"), "{e}");
            assert_eq!(std::fs::metadata(&other).unwrap().uid(), 65534);
        }
        // Staging is then off: open() falls back to unpacking on disk.
        let cfg = ImageConfig {
            staging_dir: tmp.path().to_path_buf(),
            disk_builder: config::DiskBuilder::Mkfs,
            ..Default::default()
        };
        let data = tmp.path().join("data");
        let st = Staging::open(&cfg, &data).expect("a fresh name is made private");
        std::fs::remove_dir(&st.dir).unwrap();
        std::os::unix::fs::symlink(&theirs, &st.dir).unwrap();
        assert!(Staging::open(&cfg, &data).is_none());
    }

    #[test]
    fn one_disk_per_layer_up_to_the_limit_then_the_bottom_layers_merge() {
        let l = layers(3);
        let runs = plan_runs(&l, false);
        assert_eq!(spans(&runs), vec![(0, 1), (1, 2), (2, 3)]);
        // A single layer's disk is keyed by the layer's digest: shared by every image.
        assert_eq!(runs[1].key, l[1].digest.hex());

        let l = layers(12);
        let runs = plan_runs(&l, false);
        assert_eq!(runs.len(), MAX_LAYER_DISKS);
        assert_eq!(
            runs[0],
            Run {
                start: 0,
                end: 5,
                key: run_key(&l[..5])
            }
        );
        assert_eq!(
            spans(&runs[1..]),
            (5..12).map(|i| (i, i + 1)).collect::<Vec<_>>()
        );
        // The merged key depends on the layers and their order only.
        assert_eq!(plan_runs(&layers(12), false), runs);
        let mut swapped = l.clone();
        swapped.swap(0, 1);
        assert_ne!(plan_runs(&swapped, false)[0].key, runs[0].key);

        let runs = plan_runs(&l, true);
        assert_eq!(spans(&runs), vec![(0, 12)]);
        assert_eq!(spans(&plan_runs(&layers(0), false)), vec![(0, 0)]);
    }
}
