//! The secrets file (format v1, DESIGN §6): validation of what the host sent, the
//! canonical rendering, and the atomic 0400 write into tmpfs.
//!
//! Format: UTF-8; first non-empty line `# TRC_SECRETS_V1`; then `KEY=VALUE` lines with
//! KEY matching `[A-Z_][A-Z0-9_]*` (at most 128 bytes); values plain (no CR, LF, NUL) or
//! `base64:<standard base64>`; no duplicate keys; at most 256 KiB and 256 keys. Blank
//! lines and further `#` comment lines are accepted and dropped by rendering.
//!
//! The contract: no error message, `Debug` output or console line of this module contains
//! a value; errors name the line number and, where known, the key.

use std::fmt;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// Header line of format v1.
pub const HEADER: &str = "# TRC_SECRETS_V1";
/// Maximum file size in bytes.
pub const MAX_BYTES: usize = 256 * 1024;
/// Maximum number of keys.
pub const MAX_KEYS: usize = 256;
/// Maximum key length in bytes.
pub const MAX_KEY_BYTES: usize = 128;

/// A validated secrets file. `Debug` shows the keys only.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretsFile {
    entries: Vec<(String, String)>,
}

impl fmt::Debug for SecretsFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SecretsFile")
            .field("keys", &self.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl Drop for SecretsFile {
    fn drop(&mut self) {
        for (_, v) in &mut self.entries {
            // Overwrite the value bytes; they are plain ASCII/UTF-8 so zeros keep it valid.
            // SAFETY: only NUL bytes are written, which keeps the String valid UTF-8.
            unsafe { v.as_bytes_mut() }.fill(0);
        }
    }
}

fn valid_key(k: &str) -> bool {
    let mut bytes = k.bytes();
    matches!(bytes.next(), Some(b'A'..=b'Z' | b'_'))
        && bytes.all(|b| matches!(b, b'A'..=b'Z' | b'0'..=b'9' | b'_'))
}

fn valid_base64(s: &str) -> bool {
    let b = s.as_bytes();
    if !b.len().is_multiple_of(4) {
        return false;
    }
    let pad = b.iter().rev().take_while(|&&c| c == b'=').count();
    pad <= 2
        && b[..b.len() - pad]
            .iter()
            .all(|c| c.is_ascii_alphanumeric() || *c == b'+' || *c == b'/')
}

impl SecretsFile {
    /// Validates a secrets file.
    pub fn parse(text: &str) -> Result<SecretsFile, String> {
        if text.len() > MAX_BYTES {
            return Err(format!(
                "secrets file is {} bytes, more than {MAX_BYTES}",
                text.len()
            ));
        }
        if text.contains('\0') {
            return Err("secrets file contains a NUL byte".into());
        }
        let mut header_seen = false;
        let mut entries: Vec<(String, String)> = Vec::new();
        for (i, line) in text.split('\n').enumerate() {
            let n = i + 1;
            if line.contains('\r') {
                return Err(format!(
                    "secrets file line {n}: carriage return not allowed"
                ));
            }
            if line.trim().is_empty() {
                continue;
            }
            if !header_seen {
                if line != HEADER {
                    return Err(format!(
                        "secrets file line {n}: first non-empty line must be {HEADER:?}"
                    ));
                }
                header_seen = true;
                continue;
            }
            if line.starts_with('#') {
                continue;
            }
            let Some((key, value)) = line.split_once('=') else {
                return Err(format!("secrets file line {n}: expected KEY=VALUE"));
            };
            if key.len() > MAX_KEY_BYTES {
                return Err(format!(
                    "secrets file line {n}: key longer than {MAX_KEY_BYTES} bytes"
                ));
            }
            if !valid_key(key) {
                // Possibly secret material (a PEM line with '=' padding): never shown.
                return Err(format!(
                    "secrets file line {n}: the {} bytes before '=' are not a key ([A-Z_][A-Z0-9_]*; not shown)",
                    key.len()
                ));
            }
            if let Some(b64) = value.strip_prefix("base64:") {
                if !valid_base64(b64) {
                    return Err(format!(
                        "secrets file line {n}: key {key}: invalid base64 value"
                    ));
                }
            }
            if entries.iter().any(|(k, _)| k == key) {
                return Err(format!("secrets file line {n}: duplicate key {key}"));
            }
            if entries.len() == MAX_KEYS {
                return Err(format!("secrets file has more than {MAX_KEYS} keys"));
            }
            entries.push((key.to_string(), value.to_string()));
        }
        if !header_seen {
            return Err(format!(
                "secrets file is empty or lacks the {HEADER:?} header"
            ));
        }
        Ok(SecretsFile { entries })
    }

    /// Keys in file order.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.entries.iter().map(|(k, _)| k.as_str())
    }

    /// Canonical text: header, then `KEY=VALUE` lines in the original order.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(
            64 + self
                .entries
                .iter()
                .map(|(k, v)| k.len() + v.len() + 2)
                .sum::<usize>(),
        );
        out.push_str(HEADER);
        out.push('\n');
        for (k, v) in &self.entries {
            out.push_str(k);
            out.push('=');
            out.push_str(v);
            out.push('\n');
        }
        out
    }
}

/// Writes `content` to `path` atomically: a temporary file created exclusively with
/// `mode` in the same directory, owned by `uid:gid`, fsynced, then renamed over `path`.
/// The parent directory is created with mode 0755 (root-owned) when missing.
pub fn write_atomically(
    path: &Path,
    content: &[u8],
    mode: u32,
    uid: u32,
    gid: u32,
) -> Result<(), String> {
    let dir = path
        .parent()
        .ok_or_else(|| format!("secrets path {} has no parent", path.display()))?;
    fs::create_dir_all(dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o755))
        .map_err(|e| format!("chmod {}: {e}", dir.display()))?;
    let name = path
        .file_name()
        .ok_or_else(|| format!("secrets path {} has no file name", path.display()))?;
    let tmp = dir.join(format!(".{}.tmp", name.to_string_lossy()));
    let _ = fs::remove_file(&tmp);
    let result = (|| {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode & 0o777)
            .open(&tmp)
            .map_err(|e| format!("create {}: {e}", tmp.display()))?;
        // The umask may have narrowed the mode; set it exactly.
        f.set_permissions(fs::Permissions::from_mode(mode & 0o777))
            .map_err(|e| format!("chmod {}: {e}", tmp.display()))?;
        std::os::unix::fs::fchown(&f, Some(uid), Some(gid))
            .map_err(|e| format!("chown {}: {e}", tmp.display()))?;
        f.write_all(content)
            .map_err(|e| format!("write {}: {e}", tmp.display()))?;
        f.sync_all()
            .map_err(|e| format!("fsync {}: {e}", tmp.display()))?;
        fs::rename(&tmp, path).map_err(|e| format!("rename to {}: {e}", path.display()))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str =
        "\n# TRC_SECRETS_V1\nDB_PASSWORD=hunter2\n\n# comment\n_TOKEN2=base64:aGk=\nEMPTY=\n";

    #[test]
    fn valid_file_renders_canonically() {
        let f = SecretsFile::parse(GOOD).unwrap();
        assert_eq!(
            f.keys().collect::<Vec<_>>(),
            ["DB_PASSWORD", "_TOKEN2", "EMPTY"]
        );
        assert_eq!(
            f.render(),
            "# TRC_SECRETS_V1\nDB_PASSWORD=hunter2\n_TOKEN2=base64:aGk=\nEMPTY=\n"
        );
        // Rendering is a fixed point.
        assert_eq!(
            SecretsFile::parse(&f.render()).unwrap().render(),
            f.render()
        );
        // Values may contain '=' and spaces.
        let f = SecretsFile::parse("# TRC_SECRETS_V1\nA=x=y z\n").unwrap();
        assert_eq!(f.render(), "# TRC_SECRETS_V1\nA=x=y z\n");
    }

    #[test]
    fn invalid_files_are_refused_without_values_in_errors() {
        let cases = [
            ("", "header"),
            ("A=hunter2\n", "first non-empty line"),
            ("# TRC_SECRETS_V1\nlower=hunter2\n", "are not a key"),
            ("# TRC_SECRETS_V1\n1A=hunter2\n", "are not a key"),
            // What stands before '=' may itself be secret (a PEM line with padding).
            (
                "# TRC_SECRETS_V1\nMIIEhunter2AgEAAoIBAQ==\n",
                "are not a key",
            ),
            (
                "# TRC_SECRETS_V1\nA=hunter2\nA=hunter2\n",
                "duplicate key A",
            ),
            ("# TRC_SECRETS_V1\nA=hunter2\r\n", "carriage return"),
            ("# TRC_SECRETS_V1\nA=hunter2\0\n", "NUL"),
            ("# TRC_SECRETS_V1\nhunter2\n", "KEY=VALUE"),
            ("# TRC_SECRETS_V1\nA=base64:hunter2\n", "invalid base64"),
        ];
        for (text, want) in cases {
            let err = SecretsFile::parse(text).unwrap_err();
            assert!(err.contains(want), "{text:?}: {err}");
            assert!(!err.contains("hunter2"), "value leaked: {err}");
        }
    }

    #[test]
    fn limits_are_enforced() {
        let long_key = format!("# TRC_SECRETS_V1\n{}=v\n", "K".repeat(129));
        assert!(SecretsFile::parse(&long_key).unwrap_err().contains("128"));
        let ok_key = format!("# TRC_SECRETS_V1\n{}=v\n", "K".repeat(128));
        assert!(SecretsFile::parse(&ok_key).is_ok());
        let mut many = String::from("# TRC_SECRETS_V1\n");
        for i in 0..257 {
            many.push_str(&format!("K{i}=v\n"));
        }
        assert!(SecretsFile::parse(&many).unwrap_err().contains("256 keys"));
        let big = format!("# TRC_SECRETS_V1\nA={}\n", "v".repeat(MAX_BYTES));
        assert!(SecretsFile::parse(&big).unwrap_err().contains("bytes"));
    }

    #[test]
    fn debug_shows_keys_not_values() {
        let f = SecretsFile::parse(GOOD).unwrap();
        let dbg = format!("{f:?}");
        assert!(
            dbg.contains("DB_PASSWORD") && !dbg.contains("hunter2"),
            "{dbg}"
        );
    }

    #[test]
    fn atomic_write_sets_mode_and_content() {
        let dir = std::env::temp_dir().join(format!("plfm-secrets-test-{}", std::process::id()));
        let path = dir.join("secrets/platform.env");
        let uid = nix::unistd::getuid().as_raw();
        let gid = nix::unistd::getgid().as_raw();
        write_atomically(&path, b"# TRC_SECRETS_V1\nA=1\n", 0o400, uid, gid).unwrap();
        let meta = fs::metadata(&path).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o400);
        // A second write replaces the first (the old file is read-only, rename still works).
        write_atomically(&path, b"# TRC_SECRETS_V1\nA=2\n", 0o400, uid, gid).unwrap();
        assert_eq!(
            fs::read_to_string(&path).unwrap(),
            "# TRC_SECRETS_V1\nA=2\n"
        );
        assert_eq!(
            fs::read_dir(path.parent().unwrap()).unwrap().count(),
            1,
            "temp file left behind"
        );
        fs::remove_dir_all(&dir).unwrap();
    }
}
