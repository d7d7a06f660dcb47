//! The VMM's and the guest's last words: the tails of a VM's log files for failure
//! messages, and the size cap of the console log.
//!
//! Every failure a runtime reports carries these tails ([`Evidence::attach`]), so an
//! operator reads why a VM died in its status, not only in files on the host. This
//! module reads at most the last 64 KiB of a file and never writes a log, except to
//! rotate the console ([`cap_log`]).

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

/// Bytes read from the end of a log for its tail.
const TAIL_READ: u64 = 64 * 1024;
/// Longest tail kept in a message.
const TAIL_MAX_CHARS: usize = 1024;

/// The last `n` non-empty lines of a log file, joined with ` | ` (at most 1 KiB), or
/// `None` when the file is missing or empty.
pub fn last_lines(path: &Path, n: usize) -> Option<String> {
    let mut f = std::fs::File::open(path).ok()?;
    let len = f.metadata().ok()?.len();
    f.seek(SeekFrom::Start(len.saturating_sub(TAIL_READ))).ok()?;
    let mut buf = Vec::new();
    f.take(TAIL_READ).read_to_end(&mut buf).ok()?;
    let text = String::from_utf8_lossy(&buf);
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    if lines.is_empty() {
        return None;
    }
    let joined = lines[lines.len().saturating_sub(n)..].join(" | ");
    let skip = joined.chars().count().saturating_sub(TAIL_MAX_CHARS);
    Some(joined.chars().skip(skip).collect())
}

/// The log files of one VM whose tails go into its failure messages, each with a
/// label (`console`, `firecracker`, `qemu`, `vhost-device-vsock`).
#[derive(Debug, Clone, Default)]
pub struct Evidence {
    logs: Vec<(&'static str, PathBuf)>,
}

impl Evidence {
    /// Evidence from these labelled files.
    pub fn new(logs: Vec<(&'static str, PathBuf)>) -> Evidence {
        Evidence { logs }
    }

    /// `label: tail` for each file that has lines, joined with `; `.
    pub fn tails(&self) -> String {
        self.logs
            .iter()
            .filter_map(|(label, p)| last_lines(p, 5).map(|t| format!("{label}: {t}")))
            .collect::<Vec<_>>()
            .join("; ")
    }

    /// `what`, followed by the tails when there are any.
    pub fn attach(&self, what: impl Into<String>) -> String {
        let what = what.into();
        let tails = self.tails();
        if tails.is_empty() {
            what
        } else {
            format!("{what}; last VMM log lines: {tails}")
        }
    }
}

/// Rotates a log that grew past `max`: the content moves to `<name>.1` and the log
/// restarts empty (VMMs append to it, so truncation is safe). A no-op below `max`.
pub fn cap_log(path: &Path, max: u64) {
    let Ok(meta) = std::fs::metadata(path) else {
        return;
    };
    if meta.len() <= max {
        return;
    }
    let mut rotated = path.as_os_str().to_owned();
    rotated.push(".1");
    let _ = std::fs::copy(path, PathBuf::from(rotated));
    if let Ok(f) = std::fs::OpenOptions::new().write(true).open(path) {
        let _ = f.set_len(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tails_keep_the_last_lines_of_each_labelled_log() {
        let d = tempfile::tempdir().unwrap();
        let a = d.path().join("a.log");
        std::fs::write(&a, "one\ntwo\n\nthree\nfour\nfive\nsix\n").unwrap();
        assert_eq!(last_lines(&a, 2).as_deref(), Some("five | six"));
        assert_eq!(last_lines(&d.path().join("none"), 2), None);
        let e = Evidence::new(vec![("console", a), ("vmm", d.path().join("none"))]);
        assert_eq!(
            e.attach("it died"),
            "it died; last VMM log lines: console: two | three | four | five | six"
        );
        assert_eq!(Evidence::default().attach("it died"), "it died");
    }

    #[test]
    fn a_huge_log_is_read_from_its_end_and_the_tail_is_bounded() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("big.log");
        let mut text = "x".repeat(1 << 20);
        text.push_str(&format!("\n{}\nlast line\n", "y".repeat(5000)));
        std::fs::write(&p, text).unwrap();
        let t = last_lines(&p, 2).unwrap();
        assert!(t.ends_with("last line"), "{}", &t[t.len() - 20..]);
        assert_eq!(t.chars().count(), TAIL_MAX_CHARS);
    }

    #[test]
    fn a_log_past_its_cap_rotates() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("console.log");
        std::fs::write(&log, vec![b'x'; 5000]).unwrap();
        cap_log(&log, 8192);
        assert_eq!(std::fs::metadata(&log).unwrap().len(), 5000);
        cap_log(&log, 4096);
        assert_eq!(std::fs::metadata(&log).unwrap().len(), 0);
        assert_eq!(
            std::fs::metadata(dir.path().join("console.log.1"))
                .unwrap()
                .len(),
            5000
        );
    }
}
