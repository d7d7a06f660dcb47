//! The one error type of the image pipeline.
//!
//! Every failure of pulling, unpacking, building or caching an image is an
//! [`ImageError`]. The mapping to the wire's reason codes is the single `match` in
//! [`ImageError::reason`], so a new variant forces a decision about its reason.
//! Messages name the thing (blob, layer entry, limit, file) and the cause; they never
//! contain a credential.

use std::path::PathBuf;

use crate::instance::ReasonCode;

/// Shortens a digest for messages: `sha256:ab12cd34ef56…`.
pub(crate) fn short(digest: &str) -> String {
    match digest.split_once(':') {
        Some((alg, hex)) if hex.len() > 12 => format!("{alg}:{}…", &hex[..12]),
        _ => digest.to_string(),
    }
}

/// A failure of the image pipeline.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The image reference or digest from the spec is malformed.
    #[error("image reference {reference:?}: {why}")]
    InvalidReference {
        /// The reference as given.
        reference: String,
        /// What is wrong with it.
        why: String,
    },
    /// The agent configuration's `[images]` table is invalid.
    #[error("image configuration: {0}")]
    InvalidConfig(String),
    /// Reading credentials (password or token file) failed.
    #[error("credentials for registry {registry}: {why}")]
    Credentials {
        /// `host:port` of the registry.
        registry: String,
        /// What went wrong (never the secret itself).
        why: String,
    },
    /// The registry refused, was unreachable, or answered with an error.
    #[error("{what} from {repository}: {cause}")]
    Registry {
        /// What was being fetched (`manifest sha256:…`, `blob sha256:…`).
        what: String,
        /// `host:port/repository`.
        repository: String,
        /// The registry or transport error.
        cause: String,
        /// The registry was unreachable, overloaded (5xx, 429) or the transfer broke
        /// off: worth retrying later without blaming the instance (see
        /// [`ImageError::is_transient`]).
        transient: bool,
    },
    /// The content received does not hash to the digest it was asked for.
    #[error("{what} from {repository}: digest mismatch (got {got})")]
    DigestMismatch {
        /// `blob sha256:…` or `manifest sha256:…`.
        what: String,
        /// `host:port/repository`.
        repository: String,
        /// Digest actually received (shortened).
        got: String,
    },
    /// The registry says the manifest does not exist (404, `MANIFEST_UNKNOWN`).
    #[error("{what} from {repository}: not found ({cause})")]
    NotFound {
        /// `manifest sha256:…`.
        what: String,
        /// `host:port/repository`.
        repository: String,
        /// The registry's answer.
        cause: String,
    },
    /// The digest names an image index; the control plane must resolve it first.
    #[error(
        "manifest {digest} from {repository} is an image index ({media_type}); \
         resolved_digest must name a platform image manifest"
    )]
    IndexNotAllowed {
        /// The digest given.
        digest: String,
        /// `host:port/repository`.
        repository: String,
        /// Media type received.
        media_type: String,
    },
    /// The manifest or image config is not a usable OCI/Docker v2 image.
    #[error("manifest {digest} from {repository}: {why}")]
    BadManifest {
        /// Manifest digest (shortened).
        digest: String,
        /// `host:port/repository`.
        repository: String,
        /// What is wrong.
        why: String,
    },
    /// A configured limit was exceeded.
    #[error("{what}: limit {limit} exceeded ({detail})")]
    LimitExceeded {
        /// The thing that is too large or too slow (`image sha256:…`, `blob sha256:…`).
        what: String,
        /// The configuration key of the limit (`max_compressed_bytes`, …).
        limit: &'static str,
        /// Numbers: actual versus allowed.
        detail: String,
    },
    /// A layer entry would write outside the build tree, or is otherwise unsafe.
    #[error("layer {layer}: entry {path:?} refused: {why}")]
    UnsafeEntry {
        /// Layer digest (shortened) or index.
        layer: String,
        /// The entry's path as found in the tar stream.
        path: String,
        /// Why it was refused.
        why: String,
    },
    /// A hard link in a layer points at a file of a lower layer: a per-layer disk
    /// cannot hold it. The pipeline catches this and builds the image as one
    /// flattened disk; it reaches a caller only if that is not possible either.
    #[error("layer {layer}: hard link {path:?} points into a lower layer")]
    HardLinkAcrossLayers {
        /// Layer digest (shortened).
        layer: String,
        /// The link's path as found in the tar stream.
        path: String,
    },
    /// The layer does not fit the memory staging area (its share is full, or the
    /// tmpfs refuses one of its xattrs). The pipeline catches this and unpacks the
    /// layer on disk instead.
    #[error("layer {layer}: memory staging: {why}")]
    StagingFull {
        /// Layer digest (shortened).
        layer: String,
        /// What did not fit.
        why: String,
    },
    /// A layer could not be read or decoded (bad gzip/zstd/tar).
    #[error("layer {layer}: cannot read: {cause}")]
    LayerFormat {
        /// Layer digest (shortened).
        layer: String,
        /// The decoder's error.
        cause: String,
    },
    /// The device holding the data dir is full.
    #[error("no space left on device while {what}")]
    NoSpace {
        /// What was being written.
        what: String,
    },
    /// `mkfs.ext4` or `debugfs` failed or could not run.
    #[error("{tool} failed for {what}: {cause}")]
    Tool {
        /// Program name.
        tool: &'static str,
        /// Disk being built.
        what: String,
        /// Exit status and the last line of its stderr.
        cause: String,
    },
    /// A local file operation failed while building the root disk.
    #[error("{what} {path}: {source}")]
    BuildIo {
        /// What was being done (`unpack into`, `write`, …).
        what: &'static str,
        /// The file or directory concerned.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A local file operation failed while storing pulled blobs.
    #[error("{what} {path}: {source}")]
    PullIo {
        /// What was being done.
        what: &'static str,
        /// The file concerned.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The cache's state store failed.
    #[error("image cache state {path}: {cause}")]
    State {
        /// The state database.
        path: PathBuf,
        /// The SQLite error.
        cause: String,
    },
    /// A build that this request was waiting on failed in another task.
    #[error("{0}")]
    Shared(std::sync::Arc<ImageError>),
    /// An earlier attempt at this image failed for a reason in its content
    /// ([`ImageError::is_content_failure`]); it is not retried until its backoff
    /// passes, and this repeats that failure.
    #[error("{error} [cached failure #{failures}: not retried for another {retry_in_secs} s]")]
    CachedFailure {
        /// The failure of the last attempt.
        error: std::sync::Arc<ImageError>,
        /// Attempts that failed so far.
        failures: u32,
        /// Seconds until the next attempt is allowed (rounded up).
        retry_in_secs: u64,
    },
}

impl ImageError {
    /// A failure of the path to the registry rather than of the image: unreachable,
    /// 5xx/429, a transfer that broke off, or a pull that ran out of time. The instance
    /// is retried with backoff without spending its restart budget; every other
    /// failure (missing digest, mismatch, hostile layer, limits) is the image's own.
    pub fn is_transient(&self) -> bool {
        match self {
            ImageError::Registry { transient, .. } => *transient,
            ImageError::LimitExceeded { limit, .. } => {
                matches!(*limit, "layer_timeout_secs" | "image_timeout_secs")
            }
            ImageError::Shared(e) => e.is_transient(),
            _ => false,
        }
    }

    /// The reason code this failure reports to the control plane (DESIGN §2).
    pub fn reason(&self) -> ReasonCode {
        match self {
            ImageError::InvalidReference { .. }
            | ImageError::InvalidConfig(_)
            | ImageError::Credentials { .. }
            | ImageError::Registry { .. }
            | ImageError::DigestMismatch { .. }
            | ImageError::NotFound { .. }
            | ImageError::IndexNotAllowed { .. }
            | ImageError::BadManifest { .. }
            | ImageError::LimitExceeded { .. }
            | ImageError::PullIo { .. } => ReasonCode::ImagePullFailed,
            ImageError::UnsafeEntry { .. }
            | ImageError::HardLinkAcrossLayers { .. }
            | ImageError::StagingFull { .. }
            | ImageError::LayerFormat { .. }
            | ImageError::NoSpace { .. }
            | ImageError::Tool { .. }
            | ImageError::BuildIo { .. }
            | ImageError::State { .. } => ReasonCode::RootfsBuildFailed,
            ImageError::Shared(inner) => inner.reason(),
            ImageError::CachedFailure { error, .. } => error.reason(),
        }
    }

    /// True when the failure lies in the image itself (its bytes, its manifest, its
    /// size), so that retrying at once would fail the same way: such failures are
    /// remembered with a backoff. Network trouble, registry errors, timeouts, local
    /// disk and tool failures are not: they may pass on their own.
    pub fn is_content_failure(&self) -> bool {
        match self {
            ImageError::InvalidReference { .. }
            | ImageError::NotFound { .. }
            | ImageError::DigestMismatch { .. }
            | ImageError::IndexNotAllowed { .. }
            | ImageError::BadManifest { .. }
            | ImageError::UnsafeEntry { .. }
            | ImageError::HardLinkAcrossLayers { .. }
            | ImageError::LayerFormat { .. } => true,
            ImageError::LimitExceeded { limit, .. } => {
                !matches!(*limit, "image_timeout_secs" | "layer_timeout_secs")
            }
            ImageError::InvalidConfig(_)
            | ImageError::Credentials { .. }
            | ImageError::Registry { .. }
            | ImageError::StagingFull { .. }
            | ImageError::NoSpace { .. }
            | ImageError::Tool { .. }
            | ImageError::BuildIo { .. }
            | ImageError::PullIo { .. }
            | ImageError::State { .. }
            | ImageError::CachedFailure { .. } => false,
            ImageError::Shared(inner) => inner.is_content_failure(),
        }
    }

    /// True when the failure is the host's disk being full: the node should report
    /// itself degraded.
    pub fn is_no_space(&self) -> bool {
        match self {
            ImageError::NoSpace { .. } => true,
            ImageError::Shared(inner) => inner.is_no_space(),
            ImageError::CachedFailure { error, .. } => error.is_no_space(),
            _ => false,
        }
    }

    /// Maps an I/O error during a build step; ENOSPC/EDQUOT become [`ImageError::NoSpace`].
    pub(crate) fn build_io(
        what: &'static str,
        path: impl Into<PathBuf>,
        e: std::io::Error,
    ) -> Self {
        let path = path.into();
        if is_enospc(&e) {
            ImageError::NoSpace {
                what: format!("{what} {}", path.display()),
            }
        } else {
            ImageError::BuildIo {
                what,
                path,
                source: e,
            }
        }
    }

    /// Maps an I/O error while storing a pulled blob; ENOSPC is a build failure
    /// with "no space" as the node's disk, not the registry, is at fault.
    pub(crate) fn pull_io(what: &'static str, path: impl Into<PathBuf>, e: std::io::Error) -> Self {
        let path = path.into();
        if is_enospc(&e) {
            ImageError::NoSpace {
                what: format!("{what} {}", path.display()),
            }
        } else {
            ImageError::PullIo {
                what,
                path,
                source: e,
            }
        }
    }
}

/// ENOSPC or EDQUOT.
pub(crate) fn is_enospc(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(28) | Some(122))
        || e.kind() == std::io::ErrorKind::StorageFull
        || e.kind() == std::io::ErrorKind::QuotaExceeded
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pull_errors_map_to_image_pull_failed() {
        let e = ImageError::DigestMismatch {
            what: "blob sha256:ab12…".into(),
            repository: "127.0.0.1:5000/app".into(),
            got: "sha256:ff00…".into(),
        };
        assert_eq!(e.reason(), ReasonCode::ImagePullFailed);
        assert_eq!(
            e.to_string(),
            "blob sha256:ab12… from 127.0.0.1:5000/app: digest mismatch (got sha256:ff00…)"
        );
    }

    #[test]
    fn enospc_is_rootfs_build_failed_with_no_space() {
        let e = ImageError::build_io("write", "/x", std::io::Error::from_raw_os_error(28));
        assert_eq!(e.reason(), ReasonCode::RootfsBuildFailed);
        assert!(e.to_string().contains("no space"));
        assert!(e.is_no_space());
        let e = ImageError::pull_io("write", "/x", std::io::Error::from_raw_os_error(28));
        assert_eq!(e.reason(), ReasonCode::RootfsBuildFailed);
        let shared = ImageError::Shared(std::sync::Arc::new(e));
        assert!(shared.is_no_space());
        assert_eq!(shared.reason(), ReasonCode::RootfsBuildFailed);
    }

    #[test]
    fn unsafe_entries_are_rootfs_build_failed() {
        let e = ImageError::UnsafeEntry {
            layer: "sha256:ab…".into(),
            path: "../x".into(),
            why: "`..` component".into(),
        };
        assert_eq!(e.reason(), ReasonCode::RootfsBuildFailed);
    }

    #[test]
    fn content_failures_are_told_from_transient_ones() {
        let limit = |limit| ImageError::LimitExceeded {
            what: "image x".into(),
            limit,
            detail: String::new(),
        };
        assert!(limit("max_entries").is_content_failure());
        assert!(limit("max_tar_extension_bytes").is_content_failure());
        assert!(!limit("image_timeout_secs").is_content_failure());
        assert!(!limit("layer_timeout_secs").is_content_failure());
        let registry = ImageError::Registry {
            what: "blob".into(),
            repository: "r".into(),
            cause: "connection refused".into(),
            transient: true,
        };
        assert!(!registry.is_content_failure());
        assert!(registry.is_transient());
        let not_found = ImageError::NotFound {
            what: "manifest".into(),
            repository: "r".into(),
            cause: "404".into(),
        };
        assert!(not_found.is_content_failure());
        assert_eq!(not_found.reason(), ReasonCode::ImagePullFailed);
        let shared = ImageError::Shared(std::sync::Arc::new(not_found));
        assert!(shared.is_content_failure());
        let cached = ImageError::CachedFailure {
            error: std::sync::Arc::new(shared),
            failures: 1,
            retry_in_secs: 10,
        };
        assert!(!cached.is_content_failure(), "never re-cached");
        assert_eq!(cached.reason(), ReasonCode::ImagePullFailed);
    }

    #[test]
    fn short_digest() {
        assert_eq!(short("sha256:0123456789abcdef0123"), "sha256:0123456789ab…");
        assert_eq!(short("x"), "x");
    }
}
