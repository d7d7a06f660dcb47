//! The image cache on disk and in the state store.
//!
//! Layout under `<data_dir>/images/`:
//! - `blobs/sha256/<hex>`: verified layer blobs (removed after a build unless
//!   `keep_blobs`);
//! - `disks/sha256/<hex>.v<format>.json`: metadata of each built image (older
//!   formats also kept a flattened `.ext4` here);
//! - `layers/sha256/<key>.v<format>.ext4`: layer disks, shared by every image that
//!   has the layer (`<key>` is the layer's blob digest, or a digest of the run of
//!   blob digests for a disk that holds several layers);
//! - `tmp/<hex>.*`: work in progress (partial blobs, build trees, disks being built);
//! - `locks/<hex>.lock`: `flock`ed by whoever pulls or builds that digest, in this
//!   process or another (the daemon and the `image` CLI share the cache).
//!
//! State: tables `image_cache` (one row per built image), `image_layers` (its layer
//! disks, bottom first), `layer_disks` (one row per layer disk) and `image_refs` (which
//! instance pins which digest) in `<data_dir>/state.db`, a SQLite file shared with the
//! rest of the agent (WAL mode, busy timeout). This module creates only its own tables.
//!
//! Contract: a row in `layer_disks` exists only for a disk that is completely
//! written, fsynced and renamed into place, and a row in `image_cache` only once all
//! its layer disks have rows; anything under `tmp/` whose lock is free is garbage and
//! is removed at start-up. A layer disk is deleted only when no image row names it
//! and nobody holds its lock (a build that reuses it holds the lock until its image
//! row is written), so eviction never takes a layer from under an image.

use std::fs::File;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use rusqlite::{params, Connection, OptionalExtension};
use serde::{Deserialize, Serialize};

use super::error::ImageError;
use super::reference::Digest;
use super::rootfs::FORMAT_VERSION;

/// Directories of the cache.
#[derive(Debug, Clone)]
pub struct CachePaths {
    /// `<data_dir>/images`.
    pub root: PathBuf,
    /// `blobs/sha256`.
    pub blobs: PathBuf,
    /// `disks/sha256`.
    pub disks: PathBuf,
    /// `layers/sha256`.
    pub layers: PathBuf,
    /// `tmp`.
    pub tmp: PathBuf,
    /// `locks`.
    pub locks: PathBuf,
    /// `<data_dir>/state.db`.
    pub db: PathBuf,
}

impl CachePaths {
    /// Paths for `data_dir` (nothing is created).
    pub fn new(data_dir: &Path) -> Self {
        let root = data_dir.join("images");
        CachePaths {
            blobs: root.join("blobs").join("sha256"),
            disks: root.join("disks").join("sha256"),
            layers: root.join("layers").join("sha256"),
            tmp: root.join("tmp"),
            locks: root.join("locks"),
            db: data_dir.join("state.db"),
            root,
        }
    }

    /// Creates the directories.
    pub fn create(&self) -> Result<(), ImageError> {
        for d in [
            &self.blobs,
            &self.disks,
            &self.layers,
            &self.tmp,
            &self.locks,
        ] {
            std::fs::create_dir_all(d).map_err(|e| ImageError::build_io("create", d, e))?;
        }
        Ok(())
    }

    /// Final path of the root disk of `digest`.
    pub fn disk(&self, digest: &Digest) -> PathBuf {
        self.disks
            .join(format!("{}.v{FORMAT_VERSION}.ext4", digest.hex()))
    }

    /// Final path of the layer disk `key` (hex).
    pub fn layer_disk(&self, key: &str) -> PathBuf {
        self.layers.join(format!("{key}.v{FORMAT_VERSION}.ext4"))
    }

    /// Metadata file of an image.
    pub fn disk_meta(&self, digest: &Digest) -> PathBuf {
        self.disks
            .join(format!("{}.v{FORMAT_VERSION}.json", digest.hex()))
    }
}

/// Metadata written next to each disk (and stored in `image_cache`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DiskMeta {
    /// Manifest digest.
    pub digest: String,
    /// Root disk format version.
    pub format_version: u32,
    /// Where it was pulled from (`host:port/repository`).
    pub source: String,
    /// Apparent size of the disk file.
    pub size_bytes: u64,
    /// Bytes allocated on the host (the disk is sparse).
    pub allocated_bytes: u64,
    /// Creation time, Unix milliseconds.
    pub created_ms: i64,
    /// Process defaults from the image config.
    pub defaults: super::defaults::ImageDefaults,
}

/// A built layer disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerDisk {
    /// Its key: the layer blob's hex digest, or that of a run of layers.
    pub key: String,
    /// The ext4 file.
    pub path: PathBuf,
    /// Apparent size.
    pub size_bytes: u64,
    /// Allocated bytes on the host.
    pub allocated_bytes: u64,
}

/// One cached image as listed by [`super::ImageService::list`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CachedImage {
    /// Manifest digest.
    pub digest: String,
    /// `host:port/repository` it was pulled from.
    pub source: String,
    /// Bottom layer disk (every layer disk: [`CacheDb::image_layers`]).
    pub path: PathBuf,
    /// Apparent size.
    pub size_bytes: u64,
    /// Allocated bytes, what counts against `cache_max_bytes`.
    pub allocated_bytes: u64,
    /// Creation time, Unix milliseconds.
    pub created_ms: i64,
    /// Last use, Unix milliseconds.
    pub last_used_ms: i64,
    /// Instances pinning it.
    pub refs: u64,
}

/// The format of the flattened root disks of earlier agents: one disk per image,
/// whiteouts applied. Still served after an upgrade until evicted.
pub const FLAT_FORMAT_VERSION: u32 = 1;

/// What [`CacheDb::evict`] took out of the state store.
#[derive(Debug, Default)]
pub struct Eviction {
    /// Images forgotten.
    pub images: Vec<CachedImage>,
    /// Layer disks to delete, each with its lock held until the file is gone.
    pub layers: Vec<(LayerDisk, DigestLock)>,
    /// Flattened disks of an older format to delete.
    pub legacy_files: Vec<PathBuf>,
}

/// An `image_cache` row selected as digest, source, disk_path, size_bytes,
/// allocated_bytes, created_ms, last_used_ms and the count of its pins.
fn cached_image_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<CachedImage> {
    Ok(CachedImage {
        digest: r.get(0)?,
        source: r.get(1)?,
        path: PathBuf::from(r.get::<_, String>(2)?),
        size_bytes: r.get::<_, i64>(3)? as u64,
        allocated_bytes: r.get::<_, i64>(4)? as u64,
        created_ms: r.get(5)?,
        last_used_ms: r.get(6)?,
        refs: r.get::<_, i64>(7)? as u64,
    })
}

fn layer_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<LayerDisk> {
    let key: String = r.get(0)?;
    Ok(LayerDisk {
        key: key.split('#').next().unwrap_or_default().to_string(),
        path: PathBuf::from(r.get::<_, String>(1)?),
        size_bytes: r.get::<_, i64>(2)? as u64,
        allocated_bytes: r.get::<_, i64>(3)? as u64,
    })
}

/// Now in Unix milliseconds.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// A name component unique within this process run: `<pid>-<counter>-<nanos>`.
pub fn unique() -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "{}-{}-{nanos}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// fsync a directory so a rename in it is durable.
pub fn fsync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// A file or directory removed on drop unless persisted.
pub struct TempPath {
    path: PathBuf,
    armed: bool,
}

impl TempPath {
    /// Takes responsibility for `path` (which may not exist yet).
    pub fn new(path: PathBuf) -> Self {
        TempPath { path, armed: true }
    }
    /// The path.
    pub fn path(&self) -> &Path {
        &self.path
    }
    /// Renames to `dest` and disarms.
    pub fn persist(mut self, dest: &Path) -> std::io::Result<()> {
        std::fs::rename(&self.path, dest)?;
        self.armed = false;
        Ok(())
    }
}

impl Drop for TempPath {
    fn drop(&mut self) {
        if self.armed {
            let _ =
                std::fs::remove_dir_all(&self.path).or_else(|_| std::fs::remove_file(&self.path));
        }
    }
}

/// An exclusive `flock` on `locks/<hex>.lock`, held while pulling or building.
#[derive(Debug)]
pub struct DigestLock {
    _file: File,
}

impl DigestLock {
    /// Blocks until the lock is held. Call from a blocking context.
    pub fn acquire(paths: &CachePaths, digest: &Digest) -> Result<Self, ImageError> {
        Self::take(paths, digest.hex(), false)?.ok_or_else(|| ImageError::State {
            path: paths.locks.clone(),
            cause: "lock not acquired".into(),
        })
    }

    /// Blocks until the lock of a layer disk key (hex) is held.
    pub fn acquire_key(paths: &CachePaths, key: &str) -> Result<Self, ImageError> {
        Self::take(paths, key, false)?.ok_or_else(|| ImageError::State {
            path: paths.locks.clone(),
            cause: "lock not acquired".into(),
        })
    }

    /// Takes the lock if free.
    pub fn try_acquire(paths: &CachePaths, hex: &str) -> Result<Option<Self>, ImageError> {
        Self::take(paths, hex, true)
    }

    fn take(paths: &CachePaths, hex: &str, nonblocking: bool) -> Result<Option<Self>, ImageError> {
        let p = paths.locks.join(format!("{hex}.lock"));
        let f = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&p)
            .map_err(|e| ImageError::build_io("open lock", &p, e))?;
        let op = if nonblocking {
            rustix::fs::FlockOperation::NonBlockingLockExclusive
        } else {
            rustix::fs::FlockOperation::LockExclusive
        };
        match rustix::fs::flock(f.as_fd(), op) {
            Ok(()) => Ok(Some(DigestLock { _file: f })),
            Err(rustix::io::Errno::WOULDBLOCK) if nonblocking => Ok(None),
            Err(e) => Err(ImageError::build_io(
                "lock",
                &p,
                std::io::Error::from_raw_os_error(e.raw_os_error()),
            )),
        }
    }
}

/// The cache's tables in the state store.
pub struct CacheDb {
    conn: Connection,
    path: PathBuf,
}

impl CacheDb {
    /// Opens `state.db` (WAL, busy timeout) and creates the tables if needed.
    pub fn open(path: &Path) -> Result<Self, ImageError> {
        let err = |e: rusqlite::Error| ImageError::State {
            path: path.to_path_buf(),
            cause: e.to_string(),
        };
        let conn = Connection::open(path).map_err(err)?;
        conn.busy_timeout(std::time::Duration::from_secs(10))
            .map_err(err)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(err)?;
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(err)?;
        // The same file as the state store: a newer agent's database is refused here
        // too, before any table is created in it.
        let found = crate::state::schema_version(&conn).map_err(err)?;
        if found > crate::state::SCHEMA_VERSION {
            return Err(ImageError::State {
                path: path.to_path_buf(),
                cause: crate::state::StoreError::NewerSchema {
                    path: path.display().to_string(),
                    found,
                    supported: crate::state::SCHEMA_VERSION,
                }
                .to_string(),
            });
        }
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS image_cache (
                cache_key TEXT PRIMARY KEY,
                digest TEXT NOT NULL,
                format_version INTEGER NOT NULL,
                source TEXT NOT NULL,
                disk_path TEXT NOT NULL,
                size_bytes INTEGER NOT NULL,
                allocated_bytes INTEGER NOT NULL,
                defaults_json TEXT NOT NULL,
                created_ms INTEGER NOT NULL,
                last_used_ms INTEGER NOT NULL
            );
            CREATE TABLE IF NOT EXISTS image_refs (
                instance_id TEXT PRIMARY KEY,
                digest TEXT NOT NULL,
                pinned_ms INTEGER NOT NULL
            );
            CREATE INDEX IF NOT EXISTS image_refs_digest ON image_refs(digest);
            CREATE TABLE IF NOT EXISTS layer_disks (
                layer_key TEXT PRIMARY KEY,
                disk_path TEXT NOT NULL,
                size_bytes INTEGER NOT NULL,
                allocated_bytes INTEGER NOT NULL,
                created_ms INTEGER NOT NULL,
                last_used_ms INTEGER NOT NULL
            );
            CREATE TABLE IF NOT EXISTS image_layers (
                cache_key TEXT NOT NULL,
                position INTEGER NOT NULL,
                layer_key TEXT NOT NULL,
                PRIMARY KEY (cache_key, position)
            );
            CREATE INDEX IF NOT EXISTS image_layers_layer ON image_layers(layer_key);",
        )
        .map_err(err)?;
        Ok(CacheDb {
            conn,
            path: path.to_path_buf(),
        })
    }

    fn err(&self, e: rusqlite::Error) -> ImageError {
        ImageError::State {
            path: self.path.clone(),
            cause: e.to_string(),
        }
    }

    /// Cache key of a digest for the current disk format.
    pub fn key(digest: &str) -> String {
        format!("{digest}#v{FORMAT_VERSION}")
    }

    /// Pins `digest` for `instance_id` (replacing an earlier pin of that instance).
    pub fn pin(&self, instance_id: &str, digest: &Digest) -> Result<(), ImageError> {
        self.conn
            .execute(
                "INSERT INTO image_refs (instance_id, digest, pinned_ms) VALUES (?1, ?2, ?3)
                 ON CONFLICT(instance_id) DO UPDATE SET digest = excluded.digest, pinned_ms = excluded.pinned_ms",
                params![instance_id, digest.as_str(), now_ms()],
            )
            .map(|_| ())
            .map_err(|e| self.err(e))
    }

    /// Removes the pin of `instance_id`.
    pub fn unpin(&self, instance_id: &str) -> Result<(), ImageError> {
        self.conn
            .execute(
                "DELETE FROM image_refs WHERE instance_id = ?1",
                params![instance_id],
            )
            .map(|_| ())
            .map_err(|e| self.err(e))
    }

    /// Removes every pin whose instance is not in `keep`.
    pub fn retain_pins(&mut self, keep: &[&str]) -> Result<u64, ImageError> {
        let tx = self.conn.transaction().map_err(|e| ImageError::State {
            path: self.path.clone(),
            cause: e.to_string(),
        })?;
        let ids: Vec<String> = {
            let mut st = tx
                .prepare("SELECT instance_id FROM image_refs")
                .map_err(|e| ImageError::State {
                    path: self.path.clone(),
                    cause: e.to_string(),
                })?;
            let rows = st
                .query_map([], |r| r.get(0))
                .map_err(|e| ImageError::State {
                    path: self.path.clone(),
                    cause: e.to_string(),
                })?;
            rows.filter_map(Result::ok).collect()
        };
        let mut removed = 0;
        for id in ids.iter().filter(|id| !keep.contains(&id.as_str())) {
            tx.execute("DELETE FROM image_refs WHERE instance_id = ?1", params![id])
                .map_err(|e| ImageError::State {
                    path: self.path.clone(),
                    cause: e.to_string(),
                })?;
            removed += 1;
        }
        tx.commit().map_err(|e| ImageError::State {
            path: self.path.clone(),
            cause: e.to_string(),
        })?;
        Ok(removed)
    }

    /// The cached disk of `digest`, touching its last use.
    pub fn lookup_and_touch(
        &self,
        digest: &Digest,
    ) -> Result<Option<(PathBuf, DiskMeta)>, ImageError> {
        // The current format first; then a flattened disk an agent of format 1 built
        // (kept after an upgrade: it boots as a stack of one disk).
        for format in [FORMAT_VERSION, FLAT_FORMAT_VERSION] {
            let key = format!("{digest}#v{format}");
            let row = self
                .conn
                .query_row(
                    "UPDATE image_cache SET last_used_ms = ?2 WHERE cache_key = ?1
                     RETURNING disk_path, source, size_bytes, allocated_bytes, defaults_json, created_ms",
                    params![key, now_ms()],
                    |r| {
                        Ok((
                            r.get::<_, String>(0)?,
                            r.get::<_, String>(1)?,
                            r.get::<_, i64>(2)?,
                            r.get::<_, i64>(3)?,
                            r.get::<_, String>(4)?,
                            r.get::<_, i64>(5)?,
                        ))
                    },
                )
                .optional()
                .map_err(|e| self.err(e))?;
            if let Some((path, source, size, alloc, defaults, created)) = row {
                return Ok(Some((
                    PathBuf::from(path),
                    DiskMeta {
                        digest: digest.to_string(),
                        format_version: format,
                        source,
                        size_bytes: size as u64,
                        allocated_bytes: alloc as u64,
                        created_ms: created,
                        defaults: serde_json::from_str(&defaults).unwrap_or_default(),
                    },
                )));
            }
        }
        Ok(None)
    }

    /// Key of a layer disk row.
    pub fn layer_key(key: &str) -> String {
        format!("{key}#v{FORMAT_VERSION}")
    }

    /// The layer disks of a cached image, bottom first (empty when it has none).
    pub fn image_layers(&self, digest: &str) -> Result<Vec<LayerDisk>, ImageError> {
        let mut st = self
            .conn
            .prepare(
                "SELECT l.layer_key, l.disk_path, l.size_bytes, l.allocated_bytes
                 FROM image_layers i JOIN layer_disks l ON l.layer_key = i.layer_key
                 WHERE i.cache_key = ?1 ORDER BY i.position",
            )
            .map_err(|e| self.err(e))?;
        let rows = st
            .query_map(params![Self::key(digest)], layer_row)
            .map_err(|e| self.err(e))?;
        rows.collect::<Result<Vec<_>, _>>().map_err(|e| self.err(e))
    }

    /// How many layer disks the image row names (to tell a missing one).
    pub fn image_layer_count(&self, digest: &str) -> Result<u64, ImageError> {
        self.conn
            .query_row(
                "SELECT COUNT(*) FROM image_layers WHERE cache_key = ?1",
                params![Self::key(digest)],
                |r| r.get::<_, i64>(0),
            )
            .map(|n| n as u64)
            .map_err(|e| self.err(e))
    }

    /// The layer disk `key`, touching its last use.
    pub fn lookup_layer(&self, key: &str) -> Result<Option<LayerDisk>, ImageError> {
        self.conn
            .query_row(
                "UPDATE layer_disks SET last_used_ms = ?2 WHERE layer_key = ?1
                 RETURNING layer_key, disk_path, size_bytes, allocated_bytes",
                params![Self::layer_key(key), now_ms()],
                layer_row,
            )
            .optional()
            .map_err(|e| self.err(e))
    }

    /// Records a completed layer disk.
    pub fn insert_layer(&self, d: &LayerDisk) -> Result<(), ImageError> {
        self.conn
            .execute(
                "INSERT OR REPLACE INTO layer_disks (layer_key, disk_path, size_bytes, allocated_bytes,
                   created_ms, last_used_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?5)",
                params![
                    Self::layer_key(&d.key),
                    d.path.to_string_lossy(),
                    d.size_bytes as i64,
                    d.allocated_bytes as i64,
                    now_ms()
                ],
            )
            .map(|_| ())
            .map_err(|e| self.err(e))
    }

    /// Forgets a layer disk and every image row that names it (the files are removed
    /// by the caller).
    pub fn remove_layer(&mut self, key: &str) -> Result<(), ImageError> {
        let lk = Self::layer_key(key);
        let path = self.path.clone();
        let e2 = move |e: rusqlite::Error| ImageError::State {
            path: path.clone(),
            cause: e.to_string(),
        };
        let tx = self.conn.transaction().map_err(&e2)?;
        tx.execute(
            "DELETE FROM image_cache WHERE cache_key IN
               (SELECT cache_key FROM image_layers WHERE layer_key = ?1)",
            params![lk],
        )
        .map_err(&e2)?;
        tx.execute(
            "DELETE FROM image_layers WHERE cache_key NOT IN (SELECT cache_key FROM image_cache)",
            [],
        )
        .map_err(&e2)?;
        tx.execute("DELETE FROM layer_disks WHERE layer_key = ?1", params![lk])
            .map_err(&e2)?;
        tx.commit().map_err(&e2)
    }

    /// Every layer disk row.
    pub fn layers(&self) -> Result<Vec<LayerDisk>, ImageError> {
        let mut st = self
            .conn
            .prepare("SELECT layer_key, disk_path, size_bytes, allocated_bytes FROM layer_disks")
            .map_err(|e| self.err(e))?;
        let rows = st.query_map([], layer_row).map_err(|e| self.err(e))?;
        rows.collect::<Result<Vec<_>, _>>().map_err(|e| self.err(e))
    }

    /// Records a completed image made of `layers` (bottom first; their rows exist).
    pub fn insert_image(
        &mut self,
        meta: &DiskMeta,
        layers: &[LayerDisk],
    ) -> Result<(), ImageError> {
        let path = self.path.clone();
        let e2 = move |e: rusqlite::Error| ImageError::State {
            path: path.clone(),
            cause: e.to_string(),
        };
        let key = Self::key(&meta.digest);
        let defaults = serde_json::to_string(&meta.defaults).unwrap_or_else(|_| "{}".into());
        let bottom = layers
            .first()
            .map(|l| l.path.to_string_lossy().into_owned())
            .unwrap_or_default();
        let tx = self.conn.transaction().map_err(&e2)?;
        tx.execute(
            "DELETE FROM image_layers WHERE cache_key = ?1",
            params![key],
        )
        .map_err(&e2)?;
        for (i, l) in layers.iter().enumerate() {
            tx.execute(
                "INSERT INTO image_layers (cache_key, position, layer_key) VALUES (?1, ?2, ?3)",
                params![key, i as i64, Self::layer_key(&l.key)],
            )
            .map_err(&e2)?;
        }
        tx.execute(
            "INSERT OR REPLACE INTO image_cache (cache_key, digest, format_version, source, disk_path,
               size_bytes, allocated_bytes, defaults_json, created_ms, last_used_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
            params![
                key,
                meta.digest,
                meta.format_version,
                meta.source,
                bottom,
                meta.size_bytes as i64,
                meta.allocated_bytes as i64,
                defaults,
                meta.created_ms,
                now_ms()
            ],
        )
        .map_err(&e2)?;
        tx.commit().map_err(&e2)
    }

    /// Forgets an image (its layer disks stay until evicted).
    pub fn remove(&self, digest: &str) -> Result<(), ImageError> {
        self.conn
            .execute_batch("BEGIN IMMEDIATE")
            .map_err(|e| self.err(e))?;
        let r = self
            .conn
            .execute(
                "DELETE FROM image_cache WHERE cache_key = ?1",
                params![Self::key(digest)],
            )
            .and_then(|_| {
                self.conn.execute(
                    "DELETE FROM image_layers WHERE cache_key = ?1",
                    params![Self::key(digest)],
                )
            });
        match r {
            Ok(_) => self.conn.execute_batch("COMMIT").map_err(|e| self.err(e)),
            Err(e) => {
                let _ = self.conn.execute_batch("ROLLBACK");
                Err(self.err(e))
            }
        }
    }

    /// Every image row of any format, as (digest, disk path).
    pub fn list_all(&self) -> Result<Vec<CachedImage>, ImageError> {
        self.list_where("1 = 1 OR ?1 = ?1")
    }

    /// Forgets an image row of any format naming `path`.
    pub fn remove_any_format(&self, digest: &str, path: &Path) -> Result<(), ImageError> {
        self.conn
            .execute(
                "DELETE FROM image_cache WHERE digest = ?1 AND disk_path = ?2",
                params![digest, path.to_string_lossy()],
            )
            .map(|_| ())
            .map_err(|e| self.err(e))
    }

    /// All cached disks with their reference counts, oldest use first.
    pub fn list(&self) -> Result<Vec<CachedImage>, ImageError> {
        // Flattened disks of format 1 are listed too: they are served and take space.
        self.list_where("c.format_version IN (?1, 1)")
    }

    fn list_where(&self, filter: &str) -> Result<Vec<CachedImage>, ImageError> {
        let mut st = self
            .conn
            .prepare(&format!(
                "SELECT c.digest, c.source, c.disk_path, c.size_bytes, c.allocated_bytes, c.created_ms,
                        c.last_used_ms, (SELECT COUNT(*) FROM image_refs r WHERE r.digest = c.digest)
                 FROM image_cache c WHERE {filter} ORDER BY c.last_used_ms, c.digest"
            ))
            .map_err(|e| self.err(e))?;
        let rows = st
            .query_map(params![FORMAT_VERSION], cached_image_row)
            .map_err(|e| self.err(e))?;
        rows.collect::<Result<Vec<_>, _>>().map_err(|e| self.err(e))
    }

    /// In one transaction: choose what to free, oldest use first, until usage is at or
    /// below `target` (or everything unreferenced when `target` is `None`), and delete
    /// its rows. First layer disks that no image names, then unpinned images: an
    /// image's layer disks go with it unless another image still names them. A layer
    /// disk whose lock is held (a build is reusing or writing it) is left alone. The
    /// caller deletes the files, then drops the locks.
    /// Pinned digests are never chosen, and a pin taken concurrently either happens
    /// before (and protects the image) or after (and then misses the row and rebuilds,
    /// reusing whatever layer disks are left).
    pub fn evict(
        &mut self,
        paths: &CachePaths,
        target: Option<u64>,
    ) -> Result<Eviction, ImageError> {
        let usage = self.usage()?;
        let path = self.path.clone();
        let e2 = move |e: rusqlite::Error| ImageError::State {
            path: path.clone(),
            cause: e.to_string(),
        };
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(&e2)?;
        let all: Vec<(CachedImage, u32)> = {
            let mut st = tx
                .prepare(
                    "SELECT c.digest, c.source, c.disk_path, c.size_bytes, c.allocated_bytes, c.created_ms,
                            c.last_used_ms, (SELECT COUNT(*) FROM image_refs r WHERE r.digest = c.digest),
                            c.format_version
                     FROM image_cache c ORDER BY c.last_used_ms, c.digest",
                )
                .map_err(&e2)?;
            let rows = st
                .query_map([], |r| Ok((cached_image_row(r)?, r.get::<_, u32>(8)?)))
                .map_err(&e2)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(&e2)?
        };
        let orphans: Vec<LayerDisk> = {
            let mut st = tx
                .prepare(
                    "SELECT layer_key, disk_path, size_bytes, allocated_bytes FROM layer_disks l
                     WHERE NOT EXISTS (SELECT 1 FROM image_layers i WHERE i.layer_key = l.layer_key)
                     ORDER BY last_used_ms, layer_key",
                )
                .map_err(&e2)?;
            let rows = st.query_map([], layer_row).map_err(&e2)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(&e2)?
        };
        let mut out = Eviction::default();
        let mut usage = usage;
        let reached = |usage: u64| matches!(target, Some(t) if usage <= t);
        // Frees one layer disk no image names any more, unless a build holds it.
        let free_layer = |tx: &rusqlite::Transaction<'_>,
                          d: LayerDisk,
                          out: &mut Eviction,
                          usage: &mut u64|
         -> Result<(), ImageError> {
            let Some(lock) = DigestLock::try_acquire(paths, &d.key)? else {
                return Ok(());
            };
            tx.execute(
                "DELETE FROM layer_disks WHERE layer_key = ?1",
                params![Self::layer_key(&d.key)],
            )
            .map_err(&e2)?;
            *usage = usage.saturating_sub(d.allocated_bytes);
            out.layers.push((d, lock));
            Ok(())
        };
        for d in orphans {
            if reached(usage) {
                break;
            }
            free_layer(&tx, d, &mut out, &mut usage)?;
        }
        for (c, format) in all {
            if reached(usage) {
                break;
            }
            if c.refs > 0 {
                continue;
            }
            let key = Self::key(&c.digest);
            let layer_keys: Vec<String> = {
                let mut st = tx
                    .prepare("SELECT layer_key FROM image_layers WHERE cache_key = ?1")
                    .map_err(&e2)?;
                let rows = st
                    .query_map(params![key], |r| r.get::<_, String>(0))
                    .map_err(&e2)?;
                rows.collect::<Result<Vec<_>, _>>().map_err(&e2)?
            };
            tx.execute(
                "DELETE FROM image_cache WHERE digest = ?1 AND disk_path = ?2",
                params![c.digest, c.path.to_string_lossy()],
            )
            .map_err(&e2)?;
            tx.execute(
                "DELETE FROM image_layers WHERE cache_key = ?1",
                params![key],
            )
            .map_err(&e2)?;
            if format != FORMAT_VERSION {
                // An older format's image owns a flattened disk of its own.
                usage = usage.saturating_sub(c.allocated_bytes);
                out.legacy_files.push(c.path.clone());
            }
            for lk in layer_keys {
                let still_named: i64 = tx
                    .query_row(
                        "SELECT COUNT(*) FROM image_layers WHERE layer_key = ?1",
                        params![lk],
                        |r| r.get(0),
                    )
                    .map_err(&e2)?;
                if still_named > 0 {
                    continue;
                }
                let d = tx
                    .query_row(
                        "SELECT layer_key, disk_path, size_bytes, allocated_bytes FROM layer_disks
                         WHERE layer_key = ?1",
                        params![lk],
                        layer_row,
                    )
                    .optional()
                    .map_err(&e2)?;
                if let Some(d) = d {
                    free_layer(&tx, d, &mut out, &mut usage)?;
                }
            }
            out.images.push(c);
        }
        tx.commit().map_err(&e2)?;
        Ok(out)
    }

    /// Allocated bytes of the cache: every layer disk once, however many images share
    /// it, plus the flattened disks of older formats.
    pub fn usage(&self) -> Result<u64, ImageError> {
        self.conn
            .query_row(
                "SELECT (SELECT COALESCE(SUM(allocated_bytes), 0) FROM layer_disks)
                      + (SELECT COALESCE(SUM(allocated_bytes), 0) FROM image_cache
                         WHERE format_version != ?1)",
                params![FORMAT_VERSION],
                |r| r.get::<_, i64>(0),
            )
            .map(|v| v as u64)
            .map_err(|e| self.err(e))
    }

    /// Pins as (instance, digest).
    pub fn pins(&self) -> Result<Vec<(String, String)>, ImageError> {
        let mut st = self
            .conn
            .prepare("SELECT instance_id, digest FROM image_refs ORDER BY instance_id")
            .map_err(|e| self.err(e))?;
        let rows = st
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .map_err(|e| self.err(e))?;
        rows.collect::<Result<Vec<_>, _>>().map_err(|e| self.err(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(d: &Digest, alloc: u64) -> DiskMeta {
        DiskMeta {
            digest: d.to_string(),
            format_version: FORMAT_VERSION,
            source: "127.0.0.1:5000/app".into(),
            size_bytes: alloc,
            allocated_bytes: alloc,
            created_ms: 1,
            defaults: Default::default(),
        }
    }

    fn layer(dir: &Path, key: &str, alloc: u64) -> LayerDisk {
        LayerDisk {
            key: key.into(),
            path: dir.join(format!("{key}.ext4")),
            size_bytes: alloc,
            allocated_bytes: alloc,
        }
    }

    fn cached(db: &mut CacheDb, d: &Digest, layers: &[LayerDisk], last_use: i64) {
        for l in layers {
            db.insert_layer(l).unwrap();
        }
        let alloc = layers.iter().map(|l| l.allocated_bytes).sum();
        db.insert_image(&meta(d, alloc), layers).unwrap();
        db.conn
            .execute(
                "UPDATE image_cache SET last_used_ms = ?1 WHERE digest = ?2",
                params![last_use, d.as_str()],
            )
            .unwrap();
    }

    fn freed(e: &Eviction) -> (Vec<String>, Vec<String>) {
        (
            e.images.iter().map(|c| c.digest.clone()).collect(),
            e.layers.iter().map(|(l, _)| l.key.clone()).collect(),
        )
    }

    #[test]
    fn eviction_takes_oldest_unreferenced_first_never_pinned_and_counts_shared_layers_once() {
        let dir = tempfile::tempdir().unwrap();
        let paths = CachePaths::new(dir.path());
        paths.create().unwrap();
        let mut db = CacheDb::open(&dir.path().join("state.db")).unwrap();
        let ds: Vec<Digest> = (0..4u8).map(|i| Digest::of(&[i])).collect();
        // Four releases on one base layer of 300, each with its own top of 100.
        let base = layer(dir.path(), "base", 300);
        for (i, d) in ds.iter().enumerate() {
            let top = layer(dir.path(), &format!("top{i}"), 100);
            cached(&mut db, d, &[base.clone(), top], i as i64);
        }
        assert_eq!(db.usage().unwrap(), 700, "the shared base counts once");
        db.pin("inst-a", &ds[0]).unwrap();
        // Target 500: the oldest unpinned releases go first (ds[1], ds[2]) with
        // their tops; the base stays, ds[0] and ds[3] still name it.
        let e = db.evict(&paths, Some(500)).unwrap();
        assert_eq!(
            freed(&e),
            (
                vec![ds[1].to_string(), ds[2].to_string()],
                vec!["top1".into(), "top2".into()]
            )
        );
        drop(e);
        assert_eq!(db.usage().unwrap(), 500);
        // Everything unreferenced: ds[3] and its top; the pinned ds[0] keeps the base.
        let e = db.evict(&paths, None).unwrap();
        assert_eq!(freed(&e), (vec![ds[3].to_string()], vec!["top3".into()]));
        drop(e);
        assert_eq!(db.list().unwrap()[0].refs, 1);
        assert_eq!(db.image_layers(ds[0].as_str()).unwrap().len(), 2);
        db.unpin("inst-a").unwrap();
        // A build holding the base's lock (reusing it) keeps it; the image goes.
        let held = DigestLock::try_acquire(&paths, "base").unwrap().unwrap();
        let e = db.evict(&paths, None).unwrap();
        assert_eq!(freed(&e), (vec![ds[0].to_string()], vec!["top0".into()]));
        drop(e);
        assert_eq!(db.usage().unwrap(), 300, "the locked base is still there");
        drop(held);
        // Unnamed and unlocked now: an orphan, freed first.
        let e = db.evict(&paths, None).unwrap();
        assert_eq!(freed(&e), (vec![], vec!["base".into()]));
        drop(e);
        assert_eq!(db.usage().unwrap(), 0);
    }

    #[test]
    fn pins_move_with_the_instance_and_retain_drops_unknown_instances() {
        let dir = tempfile::tempdir().unwrap();
        let mut db = CacheDb::open(&dir.path().join("state.db")).unwrap();
        let (a, b) = (Digest::of(b"a"), Digest::of(b"b"));
        db.pin("i1", &a).unwrap();
        db.pin("i1", &b).unwrap();
        db.pin("i2", &a).unwrap();
        assert_eq!(
            db.pins().unwrap(),
            vec![("i1".into(), b.to_string()), ("i2".into(), a.to_string())]
        );
        assert_eq!(db.retain_pins(&["i2"]).unwrap(), 1);
        assert_eq!(db.pins().unwrap().len(), 1);
    }

    #[test]
    fn lookup_touches_last_use_and_lists_the_layers_bottom_first() {
        let dir = tempfile::tempdir().unwrap();
        let mut db = CacheDb::open(&dir.path().join("state.db")).unwrap();
        let d = Digest::of(b"x");
        assert!(db.lookup_and_touch(&d).unwrap().is_none());
        let (a, b) = (layer(dir.path(), "a", 5), layer(dir.path(), "b", 7));
        cached(&mut db, &d, &[b.clone(), a.clone()], 0);
        let (p, m) = db.lookup_and_touch(&d).unwrap().unwrap();
        assert_eq!(p, b.path);
        assert_eq!(m.allocated_bytes, 12);
        assert!(db.list().unwrap()[0].last_used_ms > 0);
        assert_eq!(db.image_layers(d.as_str()).unwrap(), vec![b, a.clone()]);
        // Losing a layer disk forgets the images that name it.
        db.remove_layer("a").unwrap();
        assert!(db.lookup_and_touch(&d).unwrap().is_none());
        assert!(db.lookup_layer("a").unwrap().is_none());
    }

    #[test]
    fn temp_paths_are_removed_unless_persisted() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t");
        std::fs::write(&p, b"x").unwrap();
        drop(TempPath::new(p.clone()));
        assert!(!p.exists());
        std::fs::create_dir_all(p.join("sub")).unwrap();
        drop(TempPath::new(p.clone()));
        assert!(!p.exists());
        std::fs::write(&p, b"x").unwrap();
        TempPath::new(p.clone())
            .persist(&dir.path().join("u"))
            .unwrap();
        assert!(dir.path().join("u").exists());
    }
}
