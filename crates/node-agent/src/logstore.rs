//! Workload logs on disk: one JSON-lines file per instance
//! (`<data_dir>/instances/<id>/workload.log`, rotated to `workload.log.1`), how they
//! are read back (tail, since, stream, follow), and how long they outlive their
//! instance (retention).
//!
//! What it owns: the file format ([`StoredLine`]), the size cap and rotation
//! ([`LogFile`]), the reading ([`read`], [`Follower`]) and the retention of removed
//! instances' logs ([`retire`], [`revive`], [`sweep`]). What it must not do: read
//! guests or ship lines to the control plane (`runtime::vmm::workload_logs`,
//! [`crate::logs`]), or delete the directory of an instance that is not removed.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{BufRead, BufReader, Read as _, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// The workload log of an instance directory.
pub const LOG_FILE: &str = "workload.log";
/// Marks a removed instance's directory; holds the removal time (RFC 3339).
pub const REMOVED_MARKER: &str = "removed";
/// Longest line read back from a file (a longer one is skipped as damaged).
const MAX_STORED_LINE: usize = 64 * 1024;

/// One stored line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredLine {
    /// RFC 3339 (the guest's clock).
    pub ts: String,
    /// `stdout`, `stderr` or `console`.
    pub stream: String,
    /// The text.
    pub line: String,
    /// The line was cut at 16 KiB.
    #[serde(default)]
    pub truncated: bool,
}

/// RFC 3339 with milliseconds of a Unix-epoch millisecond count.
pub fn ts_of_ms(ms: u64) -> String {
    DateTime::<Utc>::from_timestamp_millis(ms as i64)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// A size-capped, rotated log file (mode 0600): past `max` bytes the file becomes
/// `<name>.1` (replacing the previous one) and a new one starts, so an instance's log
/// takes at most about twice `max`.
pub struct LogFile {
    path: PathBuf,
    out: std::io::BufWriter<File>,
    size: u64,
    max: u64,
}

fn open_append(path: &Path) -> std::io::Result<File> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
}

/// The rotated sibling `<path>.1`.
pub fn rotated(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".1");
    PathBuf::from(s)
}

impl LogFile {
    /// Opens (appending) `path` with a cap of `max` bytes.
    pub fn open(path: &Path, max: u64) -> std::io::Result<LogFile> {
        let f = open_append(path)?;
        let size = f.metadata()?.len();
        Ok(LogFile {
            path: path.to_path_buf(),
            out: std::io::BufWriter::with_capacity(64 * 1024, f),
            size,
            max: max.max(4096),
        })
    }

    /// Appends one line (buffered; see [`LogFile::flush`]).
    pub fn append(&mut self, l: &StoredLine) -> std::io::Result<()> {
        let mut text = serde_json::to_vec(l).map_err(std::io::Error::other)?;
        text.push(b'\n');
        if self.size > 0 && self.size + text.len() as u64 > self.max {
            self.rotate()?;
        }
        self.out.write_all(&text)?;
        self.size += text.len() as u64;
        Ok(())
    }

    fn rotate(&mut self) -> std::io::Result<()> {
        self.out.flush()?;
        std::fs::rename(&self.path, rotated(&self.path))?;
        self.out = std::io::BufWriter::with_capacity(64 * 1024, open_append(&self.path)?);
        self.size = 0;
        Ok(())
    }

    /// Writes what is buffered.
    pub fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

/// What to read back.
#[derive(Debug, Clone, Default)]
pub struct Query {
    /// Only lines at or after this time.
    pub since: Option<DateTime<Utc>>,
    /// Only the last N lines (of those matching).
    pub tail: Option<usize>,
    /// Only this stream.
    pub stream: Option<String>,
}

impl Query {
    /// Whether `l` passes the stream and time filters.
    pub fn matches(&self, l: &StoredLine) -> bool {
        if self.stream.as_deref().is_some_and(|s| s != l.stream) {
            return false;
        }
        match self.since {
            None => true,
            Some(since) => DateTime::parse_from_rfc3339(&l.ts)
                .map(|t| t.with_timezone(&Utc) >= since)
                .unwrap_or(true),
        }
    }
}

fn read_lines(path: &Path, from: u64, each: impl FnMut(StoredLine)) -> u64 {
    read_lines_upto(path, from, u64::MAX, each)
}

/// Reads the complete lines of `path` between `from` and `end`; returns where it stopped.
fn read_lines_upto(path: &Path, from: u64, end: u64, mut each: impl FnMut(StoredLine)) -> u64 {
    let Ok(mut f) = File::open(path) else {
        return from;
    };
    if f.seek(SeekFrom::Start(from)).is_err() {
        return from;
    }
    let mut r = BufReader::new(f);
    let mut pos = from;
    let mut buf = Vec::new();
    loop {
        if pos >= end {
            return pos;
        }
        buf.clear();
        match (&mut r)
            .take(MAX_STORED_LINE as u64 + 1)
            .read_until(b'\n', &mut buf)
        {
            Ok(0) | Err(_) => return pos,
            Ok(n) => {
                if buf.last() != Some(&b'\n') {
                    if n > MAX_STORED_LINE {
                        // A damaged over-long line: skip to its end.
                        pos += n as u64;
                        let mut rest = Vec::new();
                        match r.read_until(b'\n', &mut rest) {
                            Ok(m) => pos += m as u64,
                            Err(_) => return pos,
                        }
                        continue;
                    }
                    // A line still being written: read it next time.
                    return pos;
                }
                pos += n as u64;
                if let Ok(l) = serde_json::from_slice::<StoredLine>(&buf) {
                    each(l);
                }
            }
        }
    }
}

/// The stored lines of the log in `dir` (rotated file first) that match `q`, oldest
/// first; with `tail`, at most that many (memory stays bounded by `tail`).
pub fn read(dir: &Path, q: &Query, each: impl FnMut(StoredLine)) {
    read_upto(dir, q, u64::MAX, each)
}

/// [`read`], stopping at byte `end` of the current file (where a [`Follower`] made
/// just before starts, so that following repeats no line).
pub fn read_upto(dir: &Path, q: &Query, end: u64, mut each: impl FnMut(StoredLine)) {
    let path = dir.join(LOG_FILE);
    match q.tail {
        Some(n) => {
            let mut last: VecDeque<StoredLine> = VecDeque::with_capacity(n.min(10_000));
            for (p, end) in [(rotated(&path), u64::MAX), (path, end)] {
                read_lines_upto(&p, 0, end, |l| {
                    if q.matches(&l) && n > 0 {
                        if last.len() == n {
                            last.pop_front();
                        }
                        last.push_back(l);
                    }
                });
            }
            last.into_iter().for_each(each);
        }
        None => {
            for (p, end) in [(rotated(&path), u64::MAX), (path, end)] {
                read_lines_upto(&p, 0, end, |l| {
                    if q.matches(&l) {
                        each(l)
                    }
                });
            }
        }
    }
}

/// Follows a log file from its current end (rotations are noticed: the new file is
/// read from its start).
pub struct Follower {
    path: PathBuf,
    pos: u64,
    ino: u64,
}

fn ino(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).map(|m| m.ino()).unwrap_or(0)
}

impl Follower {
    /// A follower of the log in `dir`, starting at its end.
    pub fn at_end(dir: &Path) -> Follower {
        let path = dir.join(LOG_FILE);
        let pos = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        Follower {
            ino: ino(&path),
            path,
            pos,
        }
    }

    /// Where in the current file the next poll starts.
    pub fn position(&self) -> u64 {
        self.pos
    }

    /// The lines written since the last call.
    pub fn poll(&mut self, mut each: impl FnMut(StoredLine)) {
        let now = ino(&self.path);
        if now != self.ino {
            // Rotated: finish the old file (now `.1`), then the new one from its start.
            if self.ino != 0 && ino(&rotated(&self.path)) == self.ino {
                read_lines(&rotated(&self.path), self.pos, &mut each);
            }
            self.ino = now;
            self.pos = 0;
        }
        self.pos = read_lines(&self.path, self.pos, each);
    }
}

/// Whether `name` is a log file kept when an instance is removed.
pub fn is_log(name: &str) -> bool {
    name.ends_with(".log") || name.ends_with(".log.1")
}

/// Deletes everything in an instance directory but its log files (sockets, disks,
/// records, anything else). Sub-directories go entirely.
pub fn remove_all_but_logs(dir: &Path) -> std::io::Result<()> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let is_dir = e.file_type().map(|t| t.is_dir()).unwrap_or(false);
        if !is_dir && is_log(&name.to_string_lossy()) {
            continue;
        }
        let r = if is_dir {
            std::fs::remove_dir_all(e.path())
        } else {
            std::fs::remove_file(e.path())
        };
        match r {
            Ok(()) => {}
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
            Err(err) => return Err(err),
        }
    }
    Ok(())
}

/// Marks an instance directory removed at `now`, keeping only its logs (they stay
/// until [`sweep`] deletes them). A directory without logs goes at once.
pub fn retire(dir: &Path, now: DateTime<Utc>) -> std::io::Result<()> {
    remove_all_but_logs(dir)?;
    let empty = std::fs::read_dir(dir)
        .map(|mut d| d.next().is_none())
        .unwrap_or(true);
    if empty {
        return match std::fs::remove_dir(dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        };
    }
    std::fs::write(
        dir.join(REMOVED_MARKER),
        now.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
    )
}

/// An instance that comes back takes its directory back: the removal mark goes (its
/// old logs stay, and its new lines follow them).
pub fn revive(dir: &Path) {
    let _ = std::fs::remove_file(dir.join(REMOVED_MARKER));
}

/// When the instance of `dir` was removed, if it was.
pub fn removed_at(dir: &Path) -> Option<DateTime<Utc>> {
    let text = std::fs::read_to_string(dir.join(REMOVED_MARKER)).ok()?;
    DateTime::parse_from_rfc3339(text.trim())
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.metadata().ok())
        .filter(|m| m.is_file())
        .map(|m| m.len())
        .sum()
}

/// Deletes the directories of removed instances under `instances` whose removal is
/// older than `retention`, then, oldest removal first, as many more as it takes to
/// bring the removed instances' logs under `max_bytes`. Returns the ids deleted.
pub fn sweep(
    instances: &Path,
    now: DateTime<Utc>,
    retention: Duration,
    max_bytes: u64,
) -> Vec<String> {
    let mut removed: Vec<(DateTime<Utc>, PathBuf, u64)> = std::fs::read_dir(instances)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter_map(|d| Some((removed_at(&d)?, d.clone(), dir_bytes(&d))))
        .collect();
    removed.sort();
    let mut total: u64 = removed.iter().map(|r| r.2).sum();
    let retention = chrono::Duration::from_std(retention).unwrap_or(chrono::Duration::MAX);
    let mut gone = Vec::new();
    for (at, dir, bytes) in removed {
        let expired = now.signed_duration_since(at) >= retention;
        if !expired && total <= max_bytes {
            continue;
        }
        // The mark is read again: an instance that came back in the meantime stays.
        if removed_at(&dir) != Some(at) {
            continue;
        }
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => {
                total = total.saturating_sub(bytes);
                gone.push(
                    dir.file_name()
                        .unwrap_or_default()
                        .to_string_lossy()
                        .into_owned(),
                );
            }
            Err(e) => {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot delete a removed instance's logs")
            }
        }
    }
    gone
}

/// How often removed instances' logs are looked at.
pub const SWEEP_INTERVAL: Duration = Duration::from_secs(60);

/// Runs [`sweep`] over `<data_dir>/instances` now and every [`SWEEP_INTERVAL`] of
/// `clock`, until `shutdown` turns true.
pub async fn run_sweeper(
    instances: PathBuf,
    clock: crate::clock::SharedClock,
    retention: Duration,
    max_bytes: u64,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        let (dir, now) = (instances.clone(), clock.wall());
        let gone = tokio::task::spawn_blocking(move || sweep(&dir, now, retention, max_bytes))
            .await
            .unwrap_or_default();
        if !gone.is_empty() {
            tracing::info!(instances = ?gone, "removed instances' logs deleted (retention)");
        }
        tokio::select! {
            _ = clock.sleep(SWEEP_INTERVAL) => {}
            _ = shutdown.changed() => return,
        }
        if *shutdown.borrow() {
            return;
        }
    }
}

/// Parses `24h`, `10m`, `30s`, `2d`, `500ms` or a plain number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (like 30s, 10m, 24h, 7d)"))?;
    let secs = match unit {
        "" | "s" => n,
        "ms" => return Ok(Duration::from_millis(n)),
        "m" => n.saturating_mul(60),
        "h" => n.saturating_mul(3600),
        "d" => n.saturating_mul(86_400),
        _ => {
            return Err(format!(
                "{s:?}: unknown unit {unit:?} (use ms, s, m, h or d)"
            ))
        }
    };
    Ok(Duration::from_secs(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(i: usize, stream: &str) -> StoredLine {
        StoredLine {
            ts: ts_of_ms(1_700_000_000_000 + i as u64 * 1000),
            stream: stream.into(),
            line: format!("line {i}"),
            truncated: false,
        }
    }

    #[test]
    fn the_log_rotates_at_its_cap_and_reads_back_in_order() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join(LOG_FILE);
        let mut f = LogFile::open(&path, 4096).unwrap();
        for i in 0..200 {
            f.append(&line(i, if i % 2 == 0 { "stdout" } else { "stderr" }))
                .unwrap();
        }
        f.flush().unwrap();
        let cur = std::fs::metadata(&path).unwrap();
        assert!(cur.len() <= 4096, "{}", cur.len());
        assert_eq!(cur.permissions().mode() & 0o777, 0o600);
        assert!(std::fs::metadata(rotated(&path)).unwrap().len() <= 4096);
        let mut got = Vec::new();
        read(d.path(), &Query::default(), |l| got.push(l.line));
        assert!(got.len() < 200, "old lines went with the rotation");
        assert_eq!(got.last().unwrap(), "line 199");
        let nums: Vec<usize> = got.iter().map(|l| l[5..].parse().unwrap()).collect();
        assert!(
            nums.windows(2).all(|w| w[1] == w[0] + 1),
            "in order, no gap"
        );
        let mut tail = Vec::new();
        let q = Query {
            tail: Some(3),
            stream: Some("stderr".into()),
            since: None,
        };
        read(d.path(), &q, |l| tail.push(l.line));
        assert_eq!(tail, ["line 195", "line 197", "line 199"]);
        let mut since = Vec::new();
        let q = Query {
            since: DateTime::parse_from_rfc3339(&line(198, "").ts)
                .ok()
                .map(|t| t.with_timezone(&Utc)),
            ..Query::default()
        };
        read(d.path(), &q, |l| since.push(l.line));
        assert_eq!(since, ["line 198", "line 199"]);
    }

    #[test]
    fn a_follower_sees_new_lines_across_a_rotation() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join(LOG_FILE);
        let mut f = LogFile::open(&path, 4096).unwrap();
        f.append(&line(0, "stdout")).unwrap();
        f.flush().unwrap();
        let mut follow = Follower::at_end(d.path());
        let mut got = Vec::new();
        follow.poll(|l| got.push(l.line));
        assert!(got.is_empty());
        for i in 1..100 {
            f.append(&line(i, "stdout")).unwrap();
            f.flush().unwrap();
            follow.poll(|l| got.push(l.line.clone()));
        }
        let want: Vec<String> = (1..100).map(|i| format!("line {i}")).collect();
        assert_eq!(got, want);
    }

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("24h").unwrap(), Duration::from_secs(86_400));
        assert_eq!(parse_duration("10m").unwrap(), Duration::from_secs(600));
        assert_eq!(parse_duration("45").unwrap(), Duration::from_secs(45));
        assert_eq!(parse_duration("2d").unwrap(), Duration::from_secs(172_800));
        assert!(parse_duration("ten")
            .unwrap_err()
            .contains("not a duration"));
        assert!(parse_duration("3w").unwrap_err().contains("unknown unit"));
    }

    #[test]
    fn a_removed_instance_keeps_only_its_logs_until_the_retention_ends() {
        let d = tempfile::tempdir().unwrap();
        let inst = d.path().join("a");
        std::fs::create_dir_all(inst.join("sub")).unwrap();
        for f in [
            "workload.log",
            "workload.log.1",
            "console.log",
            "qemu.log",
            "vm.json",
            "scratch.ext4",
        ] {
            std::fs::write(inst.join(f), "x").unwrap();
        }
        let t0 = Utc::now();
        retire(&inst, t0).unwrap();
        let mut left: Vec<String> = std::fs::read_dir(&inst)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(
            left,
            [
                "console.log",
                "qemu.log",
                "removed",
                "workload.log",
                "workload.log.1"
            ]
        );
        let day = Duration::from_secs(86_400);
        assert!(sweep(d.path(), t0 + chrono::Duration::hours(23), day, u64::MAX).is_empty());
        assert!(inst.exists());
        assert_eq!(
            sweep(d.path(), t0 + chrono::Duration::hours(24), day, u64::MAX),
            ["a"]
        );
        assert!(!inst.exists());
    }

    #[test]
    fn the_size_cap_deletes_the_oldest_removals_first_and_spares_revived_ones() {
        let d = tempfile::tempdir().unwrap();
        let t0 = Utc::now();
        for (i, id) in ["old", "mid", "new", "back"].iter().enumerate() {
            let dir = d.path().join(id);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("workload.log"), vec![b'x'; 1000]).unwrap();
            retire(&dir, t0 + chrono::Duration::minutes(i as i64)).unwrap();
        }
        revive(&d.path().join("back"));
        // A live instance's directory is never touched.
        std::fs::create_dir_all(d.path().join("live")).unwrap();
        std::fs::write(d.path().join("live/workload.log"), vec![b'x'; 5000]).unwrap();
        let gone = sweep(
            d.path(),
            t0 + chrono::Duration::minutes(5),
            Duration::from_secs(86_400),
            1500,
        );
        assert_eq!(gone, ["old", "mid"]);
        assert!(d.path().join("new").exists());
        assert!(d.path().join("back/workload.log").exists());
        assert!(d.path().join("live/workload.log").exists());
    }

    #[test]
    fn a_directory_without_logs_goes_at_once() {
        let d = tempfile::tempdir().unwrap();
        let inst = d.path().join("a");
        std::fs::create_dir_all(&inst).unwrap();
        std::fs::write(inst.join("vm.json"), "{}").unwrap();
        retire(&inst, Utc::now()).unwrap();
        assert!(!inst.exists());
    }
}
