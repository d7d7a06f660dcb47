//! The image cache on disk and in the state store.
//!
//! Layout under `<data_dir>/images/`:
//! - `blobs/sha256/<hex>`: verified layer blobs (removed after a build unless
//!   `keep_blobs`);
//! - `disks/sha256/<hex>.v<format>.ext4` and `.json` (metadata): built root disks;
//! - `tmp/<hex>.*`: work in progress (partial blobs, build trees, disks being built);
//! - `locks/<hex>.lock`: `flock`ed by whoever pulls or builds that digest, in this
//!   process or another (the daemon and the `image` CLI share the cache).
//!
//! State: tables `image_cache` (one row per built disk) and `image_refs` (which
//! instance pins which digest) in `<data_dir>/state.db`, a SQLite file shared with the
//! rest of the agent (WAL mode, busy timeout). This module creates only its own tables.
//!
//! Contract: a row in `image_cache` exists only for a disk that is completely written,
//! fsynced and renamed into place; anything under `tmp/` whose digest lock is free is
//! garbage and is removed at start-up.

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
            tmp: root.join("tmp"),
            locks: root.join("locks"),
            db: data_dir.join("state.db"),
            root,
        }
    }

    /// Creates the directories.
    pub fn create(&self) -> Result<(), ImageError> {
        for d in [&self.blobs, &self.disks, &self.tmp, &self.locks] {
            std::fs::create_dir_all(d).map_err(|e| ImageError::build_io("create", d, e))?;
        }
        Ok(())
    }

    /// Final path of the root disk of `digest`.
    pub fn disk(&self, digest: &Digest) -> PathBuf {
        self.disks
            .join(format!("{}.v{FORMAT_VERSION}.ext4", digest.hex()))
    }

    /// Metadata file next to the disk.
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

/// One cached disk as listed by [`super::ImageService::list`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CachedImage {
    /// Manifest digest.
    pub digest: String,
    /// `host:port/repository` it was pulled from.
    pub source: String,
    /// Disk path.
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
            CREATE INDEX IF NOT EXISTS image_refs_digest ON image_refs(digest);",
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
        let key = Self::key(digest.as_str());
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
        Ok(row.map(|(path, source, size, alloc, defaults, created)| {
            (
                PathBuf::from(path),
                DiskMeta {
                    digest: digest.to_string(),
                    format_version: FORMAT_VERSION,
                    source,
                    size_bytes: size as u64,
                    allocated_bytes: alloc as u64,
                    created_ms: created,
                    defaults: serde_json::from_str(&defaults).unwrap_or_default(),
                },
            )
        }))
    }

    /// Records a completed disk.
    pub fn insert(&self, path: &Path, meta: &DiskMeta) -> Result<(), ImageError> {
        let defaults = serde_json::to_string(&meta.defaults).unwrap_or_else(|_| "{}".into());
        self.conn
            .execute(
                "INSERT OR REPLACE INTO image_cache (cache_key, digest, format_version, source, disk_path,
                   size_bytes, allocated_bytes, defaults_json, created_ms, last_used_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
                params![
                    Self::key(&meta.digest),
                    meta.digest,
                    meta.format_version,
                    meta.source,
                    path.to_string_lossy(),
                    meta.size_bytes as i64,
                    meta.allocated_bytes as i64,
                    defaults,
                    meta.created_ms,
                    now_ms()
                ],
            )
            .map(|_| ())
            .map_err(|e| self.err(e))
    }

    /// Forgets a disk (its files are removed by the caller).
    pub fn remove(&self, digest: &str) -> Result<(), ImageError> {
        self.conn
            .execute(
                "DELETE FROM image_cache WHERE cache_key = ?1",
                params![Self::key(digest)],
            )
            .map(|_| ())
            .map_err(|e| self.err(e))
    }

    /// All cached disks with their reference counts, oldest use first.
    pub fn list(&self) -> Result<Vec<CachedImage>, ImageError> {
        let mut st = self
            .conn
            .prepare(
                "SELECT c.digest, c.source, c.disk_path, c.size_bytes, c.allocated_bytes, c.created_ms,
                        c.last_used_ms, (SELECT COUNT(*) FROM image_refs r WHERE r.digest = c.digest)
                 FROM image_cache c WHERE c.format_version = ?1 ORDER BY c.last_used_ms, c.digest",
            )
            .map_err(|e| self.err(e))?;
        let rows = st
            .query_map(params![FORMAT_VERSION], |r| {
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
            })
            .map_err(|e| self.err(e))?;
        rows.collect::<Result<Vec<_>, _>>().map_err(|e| self.err(e))
    }

    /// In one transaction: choose unreferenced disks, oldest use first, until usage
    /// is at or below `target` (or all unreferenced when `target` is `None`), and
    /// delete their rows. Returns what was removed; the caller deletes the files.
    /// Pinned digests are never chosen, and a pin taken concurrently either happens
    /// before (and protects the disk) or after (and then misses the row and rebuilds).
    pub fn evict(&mut self, target: Option<u64>) -> Result<Vec<CachedImage>, ImageError> {
        let path = self.path.clone();
        let e2 = move |e: rusqlite::Error| ImageError::State {
            path: path.clone(),
            cause: e.to_string(),
        };
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(&e2)?;
        let all: Vec<CachedImage> = {
            let mut st = tx
                .prepare(
                    "SELECT c.digest, c.source, c.disk_path, c.size_bytes, c.allocated_bytes, c.created_ms,
                            c.last_used_ms, (SELECT COUNT(*) FROM image_refs r WHERE r.digest = c.digest)
                     FROM image_cache c ORDER BY c.last_used_ms, c.digest",
                )
                .map_err(&e2)?;
            let rows = st
                .query_map([], |r| {
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
                })
                .map_err(&e2)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(&e2)?
        };
        let mut usage: u64 = all.iter().map(|c| c.allocated_bytes).sum();
        let mut victims = Vec::new();
        for c in all {
            if let Some(t) = target {
                if usage <= t {
                    break;
                }
            }
            if c.refs > 0 {
                continue;
            }
            tx.execute(
                "DELETE FROM image_cache WHERE digest = ?1 AND disk_path = ?2",
                params![c.digest, c.path.to_string_lossy()],
            )
            .map_err(&e2)?;
            usage = usage.saturating_sub(c.allocated_bytes);
            victims.push(c);
        }
        tx.commit().map_err(&e2)?;
        Ok(victims)
    }

    /// Total allocated bytes of cached disks.
    pub fn usage(&self) -> Result<u64, ImageError> {
        self.conn
            .query_row(
                "SELECT COALESCE(SUM(allocated_bytes), 0) FROM image_cache",
                [],
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

    #[test]
    fn eviction_takes_oldest_unreferenced_first_and_never_pinned() {
        let dir = tempfile::tempdir().unwrap();
        let mut db = CacheDb::open(&dir.path().join("state.db")).unwrap();
        let ds: Vec<Digest> = (0..4u8).map(|i| Digest::of(&[i])).collect();
        for (i, d) in ds.iter().enumerate() {
            db.insert(Path::new(&format!("/d{i}")), &meta(d, 100))
                .unwrap();
            // Distinct, increasing last use.
            db.conn
                .execute(
                    "UPDATE image_cache SET last_used_ms = ?1 WHERE digest = ?2",
                    params![i as i64, d.as_str()],
                )
                .unwrap();
        }
        db.pin("inst-a", &ds[0]).unwrap();
        // Usage 400, target 200: oldest unreferenced are ds[1], ds[2].
        let v = db.evict(Some(200)).unwrap();
        let gone: Vec<_> = v.iter().map(|c| c.digest.clone()).collect();
        assert_eq!(gone, vec![ds[1].to_string(), ds[2].to_string()]);
        assert_eq!(db.usage().unwrap(), 200);
        // Everything unreferenced: ds[3]; ds[0] stays pinned.
        let v = db.evict(None).unwrap();
        assert_eq!(v.len(), 1);
        assert_eq!(db.list().unwrap()[0].refs, 1);
        db.unpin("inst-a").unwrap();
        assert_eq!(db.evict(None).unwrap().len(), 1);
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
    fn lookup_touches_last_use() {
        let dir = tempfile::tempdir().unwrap();
        let db = CacheDb::open(&dir.path().join("state.db")).unwrap();
        let d = Digest::of(b"x");
        assert!(db.lookup_and_touch(&d).unwrap().is_none());
        db.insert(Path::new("/x"), &meta(&d, 5)).unwrap();
        db.conn
            .execute("UPDATE image_cache SET last_used_ms = 0", [])
            .unwrap();
        let (p, m) = db.lookup_and_touch(&d).unwrap().unwrap();
        assert_eq!(p, Path::new("/x"));
        assert_eq!(m.allocated_bytes, 5);
        assert!(db.list().unwrap()[0].last_used_ms > 0);
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
