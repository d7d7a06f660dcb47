//! The `[images]` table of the agent configuration: cache size and water marks,
//! limits and timeouts (DESIGN §7 defaults), and per-registry credentials.
//!
//! Plain serde types with defaults; [`ImageConfig::validate`] checks them once at the
//! boundary. Credentials are referenced by file, read when a pull starts, and never
//! logged or put into error messages.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::error::ImageError;

const GIB: u64 = 1 << 30;

/// Largest accepted `max_tar_extension_bytes`: one extension body is held in memory.
pub const MAX_TAR_EXTENSION_BYTES: u64 = 16 << 20;

/// Configuration of the image pipeline (`[images]` in the agent config).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ImageConfig {
    /// Total bytes of cached root disks and blobs allowed on disk.
    pub cache_max_bytes: u64,
    /// Eviction starts when usage exceeds this fraction of `cache_max_bytes`.
    pub high_water: f64,
    /// Eviction stops when usage is at or below this fraction of `cache_max_bytes`.
    pub low_water: f64,
    /// Sum of compressed layer sizes of one image.
    pub max_compressed_bytes: u64,
    /// Sum of unpacked file sizes of one image.
    pub max_unpacked_bytes: u64,
    /// Number of layers of one image.
    pub max_layers: usize,
    /// Number of tar entries (headers, including PAX and GNU extension headers) of
    /// all layers of one image together.
    pub max_entries: u64,
    /// Size of one PAX extended header (`x`/`g`) or GNU long name/link (`L`/`K`)
    /// body; such bodies are held in memory, so this bounds what one header costs.
    pub max_tar_extension_bytes: u64,
    /// Size of a manifest or image config document.
    pub max_manifest_bytes: u64,
    /// Time allowed for downloading one layer.
    pub layer_timeout_secs: u64,
    /// Time allowed for pulling and building one image.
    pub image_timeout_secs: u64,
    /// Stored layers of one layer disk downloaded at the same time; the layer that
    /// streams into the disk (see docs/images.md, "Pull") comes on top.
    pub parallel_downloads: usize,
    /// Keep the compressed layer blobs after the root disk is built (they are not
    /// needed to run; keeping them speeds up rebuilding after a format change).
    pub keep_blobs: bool,
    /// How layer disks are built. `direct` (the default): the layer streams straight
    /// into the ext4 image, file bytes into its data area and metadata into memory,
    /// laid out when the layer ends; no tree on the host and no external program.
    /// `mkfs`: the layer is unpacked into a tree (`staging_*` below) and
    /// `mkfs.ext4 -d` builds the disk; slower, kept for hosts whose guests need the
    /// disk features `mkfs.ext4` gives (metadata checksums, hashed directories).
    pub disk_builder: DiskBuilder,
    /// With `disk_builder = "mkfs"`: memory (a tmpfs under `staging_dir`) in which
    /// layers are unpacked before their disk is built, shared by the builds running at once (each gets an equal
    /// share). Many small files written to the data dir's disk cost writeback; in
    /// memory they cost none, and only the finished disk is written. A layer larger
    /// than its share, or with xattrs the tmpfs cannot hold, is unpacked on disk
    /// instead (the disk bytes are the same either way). 0 turns this off.
    pub staging_memory_bytes: u64,
    /// A tmpfs directory for `staging_memory_bytes`; the agent works in a
    /// subdirectory of its own and removes what it leaves there.
    pub staging_dir: PathBuf,
    /// Per-registry settings, keyed by `host:port` exactly as in image references.
    pub registries: BTreeMap<String, RegistryConfig>,
}

/// See [`ImageConfig::disk_builder`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskBuilder {
    /// Straight from the tar stream into the image ([`super::ext4`]).
    #[default]
    Direct,
    /// An unpacked tree, then `mkfs.ext4 -d` ([`super::rootfs`]).
    Mkfs,
}

/// How to reach one registry.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RegistryConfig {
    /// User for basic authentication (with `password_file`).
    pub username: Option<String>,
    /// File holding the password (first line, trailing newline ignored).
    pub password_file: Option<PathBuf>,
    /// File holding a bearer token (exclusive with username/password).
    pub token_file: Option<PathBuf>,
    /// Plain HTTP. Allowed only for loopback addresses or when the registry is
    /// listed by name here (an explicit operator decision).
    pub insecure: bool,
}

impl Default for ImageConfig {
    fn default() -> Self {
        ImageConfig {
            cache_max_bytes: 50 * GIB,
            high_water: 0.9,
            low_water: 0.7,
            max_compressed_bytes: 10 * GIB,
            max_unpacked_bytes: 50 * GIB,
            max_layers: 128,
            max_entries: 1_000_000,
            max_tar_extension_bytes: 64 << 10,
            max_manifest_bytes: 4 << 20,
            layer_timeout_secs: 5 * 60,
            image_timeout_secs: 30 * 60,
            parallel_downloads: 3,
            keep_blobs: false,
            disk_builder: DiskBuilder::Direct,
            staging_memory_bytes: GIB,
            staging_dir: PathBuf::from("/dev/shm"),
            registries: BTreeMap::new(),
        }
    }
}

impl ImageConfig {
    /// Checks ranges and credential combinations.
    pub fn validate(&self) -> Result<(), ImageError> {
        let bad = |s: String| Err(ImageError::InvalidConfig(s));
        if !(0.0 < self.low_water && self.low_water <= self.high_water && self.high_water <= 1.0) {
            return bad(format!(
                "need 0 < low_water ({}) <= high_water ({}) <= 1",
                self.low_water, self.high_water
            ));
        }
        if self.max_layers == 0 || self.parallel_downloads == 0 {
            return bad("max_layers and parallel_downloads must be at least 1".into());
        }
        if self.max_entries == 0 {
            return bad("max_entries must be at least 1".into());
        }
        if !(512..=MAX_TAR_EXTENSION_BYTES).contains(&self.max_tar_extension_bytes) {
            return bad(format!(
                "max_tar_extension_bytes ({}) must be between 512 and {MAX_TAR_EXTENSION_BYTES}",
                self.max_tar_extension_bytes
            ));
        }
        if self.staging_memory_bytes > 0 && !self.staging_dir.is_absolute() {
            return bad(format!(
                "staging_dir ({}) must be an absolute path",
                self.staging_dir.display()
            ));
        }
        if self.layer_timeout_secs == 0 || self.image_timeout_secs == 0 {
            return bad("timeouts must be at least 1 second".into());
        }
        for (host, r) in &self.registries {
            if r.token_file.is_some() && (r.username.is_some() || r.password_file.is_some()) {
                return bad(format!(
                    "registries.{host:?}: token_file excludes username/password_file"
                ));
            }
            if r.username.is_some() != r.password_file.is_some() {
                return bad(format!(
                    "registries.{host:?}: username and password_file go together"
                ));
            }
        }
        Ok(())
    }

    /// Time allowed for one layer.
    pub fn layer_timeout(&self) -> Duration {
        Duration::from_secs(self.layer_timeout_secs)
    }

    /// Time allowed for one image.
    pub fn image_timeout(&self) -> Duration {
        Duration::from_secs(self.image_timeout_secs)
    }

    /// Usage above which eviction starts.
    pub fn high_water_bytes(&self) -> u64 {
        (self.cache_max_bytes as f64 * self.high_water) as u64
    }

    /// Usage eviction brings the cache down to.
    pub fn low_water_bytes(&self) -> u64 {
        (self.cache_max_bytes as f64 * self.low_water) as u64
    }

    /// Whether plain HTTP may be used for `registry` (`host[:port]`): only when it
    /// is configured `insecure = true`, which in turn is honoured for any host the
    /// operator named explicitly. Loopback registries (`127.0.0.1:5000`,
    /// `localhost:5000`, `[::1]:5000`) are plain HTTP by default.
    pub fn plain_http(&self, registry: &str) -> bool {
        match self.registries.get(registry) {
            Some(r) => r.insecure,
            None => is_loopback(registry),
        }
    }
}

/// True for `localhost[:port]`, `127.x.y.z[:port]` and `[::1][:port]`.
pub(crate) fn is_loopback(registry: &str) -> bool {
    let host = if let Some(rest) = registry.strip_prefix('[') {
        rest.split(']').next().unwrap_or("")
    } else {
        registry.split(':').next().unwrap_or("")
    };
    host == "localhost"
        || host
            .parse::<IpAddr>()
            .map(|ip| ip.is_loopback())
            .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_follow_design_section_7() {
        let c = ImageConfig::default();
        assert_eq!(c.max_compressed_bytes, 10 * GIB);
        assert_eq!(c.max_unpacked_bytes, 50 * GIB);
        assert_eq!(c.max_layers, 128);
        assert_eq!(c.layer_timeout(), Duration::from_secs(300));
        assert_eq!(c.image_timeout(), Duration::from_secs(1800));
        c.validate().unwrap();
    }

    #[test]
    fn toml_table_parses_and_unknown_fields_are_refused() {
        let c: ImageConfig = toml::from_str(
            r#"
            cache_max_bytes = 1000
            [registries."127.0.0.1:5000"]
            username = "u"
            password_file = "/etc/plfm/pw"
            insecure = true
            "#,
        )
        .unwrap();
        assert_eq!(c.cache_max_bytes, 1000);
        assert!(c.registries["127.0.0.1:5000"].insecure);
        c.validate().unwrap();
        assert!(toml::from_str::<ImageConfig>("cache_max = 1").is_err());
        assert!(toml::from_str::<ImageConfig>("[registries.\"h:1\"]\npassword = \"x\"").is_err());
    }

    #[test]
    fn invalid_combinations_are_refused() {
        let mut c = ImageConfig {
            low_water: 0.95,
            ..Default::default()
        };
        assert!(c.validate().is_err());
        c.low_water = 0.5;
        c.registries.insert(
            "r:1".into(),
            RegistryConfig {
                token_file: Some("/t".into()),
                username: Some("u".into()),
                password_file: Some("/p".into()),
                insecure: false,
            },
        );
        assert!(c.validate().is_err());
    }

    #[test]
    fn bad_entry_limits_name_the_key() {
        for (cfg, key) in [
            (
                ImageConfig {
                    max_entries: 0,
                    ..Default::default()
                },
                "max_entries",
            ),
            (
                ImageConfig {
                    max_tar_extension_bytes: 1 << 30,
                    ..Default::default()
                },
                "max_tar_extension_bytes",
            ),
            (
                ImageConfig {
                    max_tar_extension_bytes: 10,
                    ..Default::default()
                },
                "max_tar_extension_bytes",
            ),
        ] {
            let err = cfg.validate().unwrap_err().to_string();
            assert!(err.contains(key), "{key} not in {err}");
        }
    }

    #[test]
    fn plain_http_only_for_loopback_or_named_insecure_hosts() {
        let mut c = ImageConfig::default();
        assert!(c.plain_http("127.0.0.1:5000"));
        assert!(c.plain_http("localhost:5000"));
        assert!(c.plain_http("[::1]:5000"));
        assert!(!c.plain_http("registry.example.com"));
        assert!(!c.plain_http("10.0.0.1:5000"));
        c.registries.insert(
            "10.0.0.1:5000".into(),
            RegistryConfig {
                insecure: true,
                ..Default::default()
            },
        );
        assert!(c.plain_http("10.0.0.1:5000"));
        c.registries
            .insert("127.0.0.1:5000".into(), RegistryConfig::default());
        assert!(!c.plain_http("127.0.0.1:5000"));
    }
}
