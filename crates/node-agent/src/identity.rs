//! The node's identity on disk: the id and overlay address the control plane gave it at
//! enrollment (`<data_dir>/identity.json`) and its WireGuard key pair
//! (`<data_dir>/overlay/private.key`).
//!
//! The contract: the identity file is written once, atomically (a temporary file,
//! fsync, rename, fsync of the directory; mode 0600), and never rewritten, so the node
//! id never changes across restarts or upgrades; [`resolve_node_id`] is the one place
//! that decides which id the daemon runs as (identity file, config `node_id`, or a
//! refusal naming both when they differ). The WireGuard private key is created once
//! (0600, in a 0700 directory) and never logged, sent or shown: only its public key
//! leaves this module. This module does no network I/O (enrollment is
//! [`crate::enroll`]).

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

/// File name of the identity under the data dir.
pub const IDENTITY_FILE: &str = "identity.json";
/// The WireGuard private key under the data dir (base64, as `wg genkey` writes it).
pub const WIREGUARD_KEY_FILE: &str = "overlay/private.key";

/// An identity problem, naming the file.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// A file cannot be read, written or parsed.
    #[error("{path}: {message}")]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong (never key material).
        message: String,
    },
    /// The config and the identity file disagree, or neither names the node.
    #[error("{0}")]
    NodeId(String),
}

fn file_err(path: &Path, message: impl std::fmt::Display) -> IdentityError {
    IdentityError::File {
        path: path.to_path_buf(),
        message: message.to_string(),
    }
}

/// What enrollment gave this node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    /// The node id the control plane assigned.
    pub node_id: String,
    /// The node's overlay address (as the control plane answered it).
    #[serde(default)]
    pub overlay_ipv6: Option<String>,
    /// The control plane it enrolled with.
    pub control_plane_url: String,
    /// When (RFC 3339).
    pub enrolled_at: String,
}

/// `<data_dir>/identity.json`.
pub fn identity_path(data_dir: &Path) -> PathBuf {
    data_dir.join(IDENTITY_FILE)
}

/// The persisted identity, `None` when the node has not enrolled.
pub fn load(data_dir: &Path) -> Result<Option<Identity>, IdentityError> {
    let path = identity_path(data_dir);
    let raw = match std::fs::read(&path) {
        Ok(r) => r,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(file_err(&path, format!("cannot read: {e}"))),
    };
    let id: Identity = serde_json::from_slice(&raw)
        .map_err(|e| file_err(&path, format!("not an identity file: {e}")))?;
    crate::spec::InstanceId::parse(&id.node_id)
        .map_err(|e| file_err(&path, format!("node_id: {e}")))?;
    Ok(Some(id))
}

/// Writes `bytes` to `path` atomically with `mode`: a temporary file in the same
/// directory, fsync, rename over `path`, fsync of the directory. A crash leaves the
/// old file or the new one, never a torn one.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), IdentityError> {
    let dir = path
        .parent()
        .ok_or_else(|| file_err(path, "has no directory"))?;
    let name = path
        .file_name()
        .ok_or_else(|| file_err(path, "names no file"))?;
    let tmp = dir.join(format!(
        ".{}.tmp.{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let write = || -> std::io::Result<()> {
        let _ = std::fs::remove_file(&tmp);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        file_err(path, format!("cannot write: {e}"))
    })
}

/// Persists `identity` (0600); refuses to replace an existing identity file.
pub fn store(data_dir: &Path, identity: &Identity) -> Result<(), IdentityError> {
    let path = identity_path(data_dir);
    if path.exists() {
        return Err(file_err(
            &path,
            "exists already: a node enrolls once and keeps its id",
        ));
    }
    let json = serde_json::to_vec_pretty(identity).map_err(|e| file_err(&path, e))?;
    write_atomic(&path, &json, 0o600)
}

/// The id the daemon runs as: the enrolled identity's, else the config's `node_id`.
/// Both set and different is refused, naming both (a node must never change its id).
pub fn resolve_node_id(
    config_node_id: Option<&str>,
    data_dir: &Path,
) -> Result<String, IdentityError> {
    let enrolled = load(data_dir)?;
    match (config_node_id, enrolled) {
        (Some(c), Some(i)) if c != i.node_id => Err(IdentityError::NodeId(format!(
            "node_id {c:?} in the config differs from {:?} in {} (the id this node enrolled with); a node never changes its id: remove node_id from the config, or correct it",
            i.node_id,
            identity_path(data_dir).display()
        ))),
        (_, Some(i)) => Ok(i.node_id),
        (Some(c), None) => Ok(c.to_string()),
        (None, None) => Err(IdentityError::NodeId(format!(
            "no node id: {} does not exist and the config sets no node_id; run `plfm-node-agent enroll --url <control plane>` (or set node_id)",
            identity_path(data_dir).display()
        ))),
    }
}

/// The node's WireGuard key pair; the private half is zeroized on drop and has no
/// `Debug`, `Display` or `Serialize`.
pub struct WireguardKey {
    secret: x25519_dalek::StaticSecret,
}

impl WireguardKey {
    /// From the 32 private-key bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> WireguardKey {
        WireguardKey {
            secret: x25519_dalek::StaticSecret::from(bytes),
        }
    }

    /// The public key, base64 (standard, padded) as `wg pubkey` prints it.
    pub fn public_base64(&self) -> String {
        let public = x25519_dalek::PublicKey::from(&self.secret);
        base64::engine::general_purpose::STANDARD.encode(public.as_bytes())
    }

    /// The 32 private-key bytes, for the overlay owner to hand to the WireGuard
    /// device (and nowhere else).
    pub(crate) fn secret_bytes(&self) -> Zeroizing<[u8; 32]> {
        Zeroizing::new(self.secret.to_bytes())
    }

    fn private_base64(&self) -> Zeroizing<String> {
        Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(self.secret.as_bytes()))
    }
}

/// `<data_dir>/overlay/private.key`.
pub fn wireguard_key_path(data_dir: &Path) -> PathBuf {
    data_dir.join(WIREGUARD_KEY_FILE)
}

/// Reads the node's WireGuard key, `None` when it was never created.
pub fn load_wireguard_key(data_dir: &Path) -> Result<Option<WireguardKey>, IdentityError> {
    load_wireguard_key_at(&wireguard_key_path(data_dir))
}

/// Reads the WireGuard key at `path` (`[overlay] private_key_file`), `None` when the
/// file does not exist.
pub fn load_wireguard_key_at(path: &Path) -> Result<Option<WireguardKey>, IdentityError> {
    let path = path.to_path_buf();
    let raw = match std::fs::read(&path) {
        Ok(r) => Zeroizing::new(r),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(file_err(&path, format!("cannot read: {e}"))),
    };
    let text = std::str::from_utf8(&raw).map_err(|_| file_err(&path, "not base64 text"))?;
    let bytes = Zeroizing::new(
        base64::engine::general_purpose::STANDARD
            .decode(text.trim())
            .map_err(|_| file_err(&path, "not a base64 WireGuard key"))?,
    );
    let arr: [u8; 32] = bytes
        .as_slice()
        .try_into()
        .map_err(|_| file_err(&path, "a WireGuard key is 32 bytes"))?;
    Ok(Some(WireguardKey::from_bytes(arr)))
}

/// The node's WireGuard key, created on first use (random, 0600 in a 0700 directory)
/// and kept: later calls read the same key.
pub fn ensure_wireguard_key(data_dir: &Path) -> Result<WireguardKey, IdentityError> {
    let path = wireguard_key_path(data_dir);
    // `<data_dir>/overlay/` is the agent's own: 0700 whoever made it.
    let dir = path.parent().unwrap_or(data_dir);
    std::fs::create_dir_all(dir).map_err(|e| file_err(dir, format!("cannot create: {e}")))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| file_err(dir, format!("cannot make it 0700: {e}")))?;
    ensure_wireguard_key_at(&path)
}

/// As [`ensure_wireguard_key`], for the key file at `path` (`[overlay]
/// private_key_file`; its directory is created 0700 if missing).
pub fn ensure_wireguard_key_at(path: &Path) -> Result<WireguardKey, IdentityError> {
    if let Some(k) = load_wireguard_key_at(path)? {
        return Ok(k);
    }
    let path = path.to_path_buf();
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if !dir.exists() {
        // A directory the operator named is left as it is; one made here is 0700.
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| file_err(dir, format!("cannot create: {e}")))?;
    }
    let mut bytes = Zeroizing::new([0u8; 32]);
    rand::fill(&mut bytes[..]);
    let key = WireguardKey::from_bytes(*bytes);
    let text = Zeroizing::new(format!("{}\n", key.private_base64().as_str()));
    // Written beside, then linked into place: a link never replaces an existing file,
    // so of two processes creating the key at once (enroll and a starting daemon),
    // one wins and the other uses the winner's key.
    let tmp = dir.join(format!(".private.key.{}", std::process::id()));
    write_atomic(&tmp, text.as_bytes(), 0o600)?;
    let linked = std::fs::hard_link(&tmp, &path);
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => {
            std::fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| file_err(dir, format!("cannot sync: {e}")))?;
            Ok(key)
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => load_wireguard_key_at(&path)?
            .ok_or_else(|| file_err(&path, "vanished while it was being created")),
        Err(e) => Err(file_err(&path, format!("cannot create: {e}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 7748 §6.1: Alice's private key and public key (X25519 clamps the scalar, as
    /// WireGuard does), in the base64 form of `wg genkey` / `wg pubkey`.
    #[test]
    fn the_public_key_matches_the_rfc_7748_vector_in_wg_format() {
        let private =
            hex::decode("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
                .unwrap();
        let public =
            hex::decode("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")
                .unwrap();
        let key = WireguardKey::from_bytes(private.try_into().unwrap());
        assert_eq!(
            key.public_base64(),
            base64::engine::general_purpose::STANDARD.encode(public)
        );
        assert_eq!(
            key.public_base64(),
            "hSDwCYkwp1R0i33ctD73Wg2/Og0mOBr066SpjqqbTmo="
        );
    }

    #[test]
    fn the_wireguard_key_is_created_once_0600_and_kept() {
        let tmp = tempfile::tempdir().unwrap();
        let a = ensure_wireguard_key(tmp.path()).unwrap();
        let b = ensure_wireguard_key(tmp.path()).unwrap();
        assert_eq!(a.public_base64(), b.public_base64());
        let path = wireguard_key_path(tmp.path());
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{mode:o}");
        let dir_mode = std::fs::metadata(path.parent().unwrap())
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(dir_mode, 0o700, "{dir_mode:o}");
    }

    #[test]
    fn node_id_comes_from_the_identity_and_a_different_config_id_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        assert!(resolve_node_id(None, tmp.path())
            .unwrap_err()
            .to_string()
            .contains("enroll"));
        assert_eq!(resolve_node_id(Some("cfg-1"), tmp.path()).unwrap(), "cfg-1");
        store(
            tmp.path(),
            &Identity {
                node_id: "node-7".into(),
                overlay_ipv6: Some("fd00::7".into()),
                control_plane_url: "http://127.0.0.1:1".into(),
                enrolled_at: "2026-11-30T00:00:00Z".into(),
            },
        )
        .unwrap();
        assert_eq!(resolve_node_id(None, tmp.path()).unwrap(), "node-7");
        assert_eq!(
            resolve_node_id(Some("node-7"), tmp.path()).unwrap(),
            "node-7"
        );
        let e = resolve_node_id(Some("cfg-1"), tmp.path())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("\"cfg-1\"") && e.contains("\"node-7\""),
            "names both: {e}"
        );
        let mode = std::fs::metadata(identity_path(tmp.path()))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
        assert!(store(tmp.path(), &load(tmp.path()).unwrap().unwrap()).is_err());
    }
}
