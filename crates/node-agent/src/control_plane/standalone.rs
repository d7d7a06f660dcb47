//! Standalone desired state: a directory with one assignment per `*.json` or `*.toml`
//! file (same fields as a plan entry, DESIGN §3). A change to any file is a new plan.
//!
//! The contract: files are re-read on change (inotify through `notify`) and on a
//! periodic rescan; only files whose size or mtime changed are parsed again. A file that
//! stops parsing keeps its last good assignment (a typo does not drain a VM) and is
//! logged; a file that never parsed is refused, and reported `failed` when it names a
//! valid instance. Files over [`MAX_FILE_BYTES`], hidden files and subdirectories
//! (such as `secrets/`) are not assignments, nor is [`OVERLAY_FILE`] (the overlay's
//! configuration). This module reads; it never writes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The overlay configuration in the desired dir (read by the overlay owner,
/// `crate::overlay::owner::FileSource`); not an assignment.
pub const OVERLAY_FILE: &str = "overlay.json";
use std::time::{Duration, SystemTime};

use crate::spec::{decode_assignment, Assignment, InstanceId, Plan, Rejected, SpecError};

/// Largest assignment file read.
pub const MAX_FILE_BYTES: u64 = 16 * 1024 * 1024;

#[derive(Debug, Clone)]
struct FileState {
    fingerprint: (u64, Option<SystemTime>),
    last_good: Option<Assignment>,
    error: Option<Rejected>,
}

/// Scans a desired-state directory into plans.
pub struct DirSource {
    dir: PathBuf,
    files: BTreeMap<PathBuf, FileState>,
    cursor: i64,
}

impl DirSource {
    /// A source reading `dir`.
    pub fn new(dir: PathBuf) -> Self {
        DirSource {
            dir,
            files: BTreeMap::new(),
            cursor: 0,
        }
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Rescans; returns a new plan when anything changed (always on the first scan).
    pub fn scan(&mut self) -> Result<Option<Plan>, std::io::Error> {
        let mut seen = BTreeMap::new();
        let mut changed = self.cursor == 0;
        for entry in std::fs::read_dir(&self.dir)? {
            let entry = entry?;
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().to_string();
            let is_assignment = (name.ends_with(".json") || name.ends_with(".toml"))
                && !name.starts_with('.')
                && name != OVERLAY_FILE;
            let Ok(meta) = entry.metadata() else { continue };
            if !is_assignment || !meta.is_file() {
                continue;
            }
            let fingerprint = (meta.len(), meta.modified().ok());
            seen.insert(path.clone(), ());
            if self
                .files
                .get(&path)
                .is_some_and(|f| f.fingerprint == fingerprint)
            {
                continue;
            }
            changed = true;
            let previous = self.files.remove(&path).and_then(|f| f.last_good);
            let state = match read_assignment(&path, meta.len()) {
                Ok(a) => FileState {
                    fingerprint,
                    last_good: Some(a),
                    error: None,
                },
                Err(rejected) => match previous {
                    Some(good)
                        if rejected.instance_id.is_none()
                            || rejected.instance_id.as_ref() == Some(&good.instance_id)
                                && matches!(rejected.error, SpecError::Decode(_)) =>
                    {
                        tracing::warn!(file = %path.display(), error = %rejected.error, instance = %good.instance_id, "cannot read assignment file; keeping its last good version");
                        FileState {
                            fingerprint,
                            last_good: Some(good),
                            error: None,
                        }
                    }
                    _ => FileState {
                        fingerprint,
                        last_good: None,
                        error: Some(rejected),
                    },
                },
            };
            self.files.insert(path, state);
        }
        let before = self.files.len();
        self.files.retain(|p, _| seen.contains_key(p));
        changed |= self.files.len() != before;
        if !changed {
            return Ok(None);
        }
        self.cursor += 1;
        let mut plan = Plan {
            cursor: self.cursor,
            ..Plan::default()
        };
        let mut ids: BTreeMap<InstanceId, PathBuf> = BTreeMap::new();
        for (path, f) in &self.files {
            if let Some(e) = &f.error {
                plan.rejected.push(e.clone());
            }
            if let Some(a) = &f.last_good {
                if let Some(other) = ids.get(&a.instance_id) {
                    plan.rejected.push(Rejected {
                        instance_id: None,
                        generation: Some(a.generation),
                        origin: path.display().to_string(),
                        error: SpecError::Invalid {
                            field: "instance_id".into(),
                            why: format!(
                                "{} is already assigned by {}",
                                a.instance_id,
                                other.display()
                            ),
                        },
                    });
                    continue;
                }
                ids.insert(a.instance_id.clone(), path.clone());
                plan.assignments.push(a.clone());
            }
        }
        plan.refuse_shared_addresses();
        Ok(Some(plan))
    }
}

fn read_assignment(path: &Path, len: u64) -> Result<Assignment, Rejected> {
    let origin = path.display().to_string();
    let reject = |error: SpecError| Rejected {
        instance_id: None,
        generation: None,
        origin: origin.clone(),
        error,
    };
    if len > MAX_FILE_BYTES {
        return Err(reject(SpecError::Decode(format!(
            "file is {len} bytes; the limit is {MAX_FILE_BYTES}"
        ))));
    }
    let bytes = std::fs::read(path).map_err(|e| reject(SpecError::Decode(e.to_string())))?;
    let value: serde_json::Value = if path.extension().is_some_and(|e| e == "toml") {
        let text = std::str::from_utf8(&bytes)
            .map_err(|e| reject(SpecError::Decode(format!("not UTF-8: {e}"))))?;
        let table: toml::Table =
            toml::from_str(text).map_err(|e| reject(SpecError::Decode(e.message().to_string())))?;
        serde_json::to_value(table).map_err(|e| reject(SpecError::Decode(e.to_string())))?
    } else {
        serde_json::from_slice(&bytes).map_err(|e| reject(SpecError::Decode(e.to_string())))?
    };
    decode_assignment(&value, &origin)
}

/// Runs the source: scans now, then on every file event and every `rescan`, sending
/// each new plan to `apply`. Ends when `shutdown` flips.
pub async fn run<F, Fut>(
    mut source: DirSource,
    rescan: Duration,
    mut apply: F,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) where
    F: FnMut(Plan) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(1);
    // Keep the watcher alive for the loop's lifetime; without it the rescan still works.
    let _watcher = watch_dir(source.dir(), tx);
    loop {
        let dir = source.dir().to_path_buf();
        let (back, result) = match tokio::task::spawn_blocking(move || {
            let r = source.scan();
            (source, r)
        })
        .await
        {
            Ok(v) => v,
            Err(e) => {
                tracing::error!(error = %e, "desired-state scan task failed");
                return;
            }
        };
        source = back;
        match result {
            Ok(Some(plan)) => {
                tracing::info!(dir = %dir.display(), cursor = plan.cursor, assignments = plan.assignments.len(), rejected = plan.rejected.len(), "new plan from desired-state directory");
                apply(plan).await;
            }
            Ok(None) => {}
            Err(e) => {
                tracing::error!(dir = %dir.display(), error = %e, "cannot read the desired-state directory; keeping the last plan")
            }
        }
        tokio::select! {
            _ = rx.recv() => {
                // Let a burst of writes settle into one plan.
                tokio::time::sleep(Duration::from_millis(50)).await;
                while rx.try_recv().is_ok() {}
            }
            _ = tokio::time::sleep(rescan) => {}
            _ = shutdown.changed() => return,
        }
    }
}

fn watch_dir(dir: &Path, tx: tokio::sync::mpsc::Sender<()>) -> Option<notify::RecommendedWatcher> {
    use notify::Watcher;
    let mut w = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        if res.is_ok() {
            let _ = tx.try_send(());
        }
    })
    .map_err(|e| tracing::warn!(error = %e, "file notifications unavailable; relying on the periodic rescan"))
    .ok()?;
    if let Err(e) = w.watch(dir, notify::RecursiveMode::NonRecursive) {
        tracing::warn!(dir = %dir.display(), error = %e, "cannot watch directory; relying on the periodic rescan");
        return None;
    }
    Some(w)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, v: &serde_json::Value) {
        std::fs::write(dir.join(name), serde_json::to_vec(v).unwrap()).unwrap();
    }

    fn assignment(id: &str) -> serde_json::Value {
        serde_json::json!({"instance_id": id, "generation": 1, "desired_state": "running", "workload": crate::spec::tests::workload_json(id, 1)})
    }

    #[test]
    fn scan_reads_json_and_toml_and_skips_others() {
        let d = tempfile::tempdir().unwrap();
        write(d.path(), "a.json", &assignment("a"));
        let toml_text =
            toml::to_string(&serde_json::from_value::<toml::Table>(assignment("b")).unwrap())
                .unwrap();
        std::fs::write(d.path().join("b.toml"), toml_text).unwrap();
        std::fs::write(d.path().join("notes.txt"), "x").unwrap();
        std::fs::write(
            d.path().join(OVERLAY_FILE),
            r#"{"generation": 1, "node": {"overlay_ipv6": "fd00::1"}}"#,
        )
        .unwrap();
        std::fs::create_dir(d.path().join("secrets")).unwrap();
        let mut s = DirSource::new(d.path().to_path_buf());
        let plan = s.scan().unwrap().unwrap();
        let ids: Vec<_> = plan
            .assignments
            .iter()
            .map(|a| a.instance_id.to_string())
            .collect();
        assert_eq!(ids, vec!["a", "b"]);
        assert!(plan.rejected.is_empty());
        assert!(
            s.scan().unwrap().is_none(),
            "unchanged directory is no new plan"
        );
    }

    #[test]
    fn broken_file_keeps_last_good_and_new_broken_file_is_refused() {
        let d = tempfile::tempdir().unwrap();
        write(d.path(), "a.json", &assignment("a"));
        let mut s = DirSource::new(d.path().to_path_buf());
        s.scan().unwrap().unwrap();
        std::fs::write(d.path().join("a.json"), "{ not json").unwrap();
        std::fs::write(d.path().join("z.json"), "{ also not json").unwrap();
        let plan = s.scan().unwrap().unwrap();
        assert_eq!(plan.assignments.len(), 1, "a keeps its last good spec");
        assert_eq!(plan.rejected.len(), 1);
        assert!(plan.rejected[0].origin.ends_with("z.json"));
        assert!(plan.rejected[0].error.to_string().contains("cannot decode"));
    }

    #[test]
    fn removed_file_is_a_new_plan_without_it() {
        let d = tempfile::tempdir().unwrap();
        write(d.path(), "a.json", &assignment("a"));
        let mut s = DirSource::new(d.path().to_path_buf());
        s.scan().unwrap().unwrap();
        std::fs::remove_file(d.path().join("a.json")).unwrap();
        assert!(s.scan().unwrap().unwrap().assignments.is_empty());
    }

    #[test]
    fn duplicate_instance_across_files_is_refused() {
        let d = tempfile::tempdir().unwrap();
        write(d.path(), "a.json", &assignment("a"));
        write(d.path(), "b.json", &assignment("a"));
        let plan = DirSource::new(d.path().to_path_buf())
            .scan()
            .unwrap()
            .unwrap();
        assert_eq!(plan.assignments.len(), 1);
        assert!(plan.rejected[0]
            .error
            .to_string()
            .contains("already assigned"));
    }
}
