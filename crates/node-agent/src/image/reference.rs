//! Validated image names: [`Digest`] (always `sha256:<64 lowercase hex>`) and
//! [`ImageRef`] (registry + repository + the digest to run).
//!
//! The spec's `image.ref` may carry a tag; it is used only to learn the registry and
//! repository. What runs is always `resolved_digest` (DESIGN §7: tags never run).
//! Nothing here touches the network or the disk.

use std::fmt;

use serde::Deserialize;

use super::error::ImageError;

/// A content digest, always `sha256:` followed by 64 lowercase hex digits.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(String);

impl Digest {
    /// Parses `sha256:<64 hex>`; anything else is refused.
    pub fn parse(s: &str) -> Result<Self, ImageError> {
        let bad = |why: &str| ImageError::InvalidReference {
            reference: s.to_string(),
            why: why.to_string(),
        };
        let hex = s
            .strip_prefix("sha256:")
            .ok_or_else(|| bad("digest must start with sha256:"))?;
        if hex.len() != 64 {
            return Err(bad("digest must have 64 hex digits"));
        }
        if !hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(bad("digest must be lowercase hex"));
        }
        Ok(Digest(s.to_string()))
    }

    /// The digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        use sha2::Digest as _;
        Digest(format!(
            "sha256:{}",
            hex::encode(sha2::Sha256::digest(bytes))
        ))
    }

    /// `sha256:<hex>`.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The 64 hex digits.
    pub fn hex(&self) -> &str {
        &self.0["sha256:".len()..]
    }

    /// Shortened for messages and tables: `sha256:ab12cd34ef56…`.
    pub fn short(&self) -> String {
        super::error::short(&self.0)
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The image of a workload: where to pull from and which manifest to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRef {
    /// `host[:port]` of the registry.
    pub registry: String,
    /// Repository path inside the registry (`library/app`).
    pub repository: String,
    /// The platform image manifest to pull (`resolved_digest` of the spec).
    pub digest: Digest,
}

/// The `image` object of a WorkloadSpec, as it comes over the wire (DESIGN §3).
#[derive(Debug, Clone, Deserialize)]
pub struct SpecImage {
    /// `host/repo[:tag][@digest]`: used for the registry and repository only.
    #[serde(rename = "ref", default)]
    pub reference: Option<String>,
    /// Digest the user asked for (may be an index).
    #[serde(default)]
    pub digest: Option<String>,
    /// Index digest, when the user's digest was an index.
    #[serde(default)]
    pub index_digest: Option<String>,
    /// The platform manifest the control plane resolved: what runs.
    pub resolved_digest: String,
    /// Operating system (`linux`).
    #[serde(default)]
    pub os: Option<String>,
    /// Architecture (`amd64`).
    #[serde(default)]
    pub arch: Option<String>,
}

impl ImageRef {
    /// Builds the reference to pull from a spec's `image` object: registry and
    /// repository from `ref`, digest from `resolved_digest`.
    pub fn from_spec(image: &SpecImage) -> Result<Self, ImageError> {
        let reference = image
            .reference
            .as_deref()
            .ok_or_else(|| ImageError::InvalidReference {
                reference: String::new(),
                why: "image.ref is required to know the registry and repository".into(),
            })?;
        let (registry, repository, _tag, _digest) = split_reference(reference)?;
        Ok(ImageRef {
            registry,
            repository,
            digest: Digest::parse(&image.resolved_digest)?,
        })
    }

    /// Parses an operator's `host[:port]/repo@sha256:…` (the CLI form). A tag alone
    /// is refused: tags never run.
    pub fn parse_pinned(reference: &str) -> Result<Self, ImageError> {
        let (registry, repository, _tag, digest) = split_reference(reference)?;
        let digest = digest.ok_or_else(|| ImageError::InvalidReference {
            reference: reference.to_string(),
            why: "a digest (@sha256:…) is required; tags never run".into(),
        })?;
        Ok(ImageRef {
            registry,
            repository,
            digest,
        })
    }

    /// `host:port/repository` for messages.
    pub fn repository_url(&self) -> String {
        format!("{}/{}", self.registry, self.repository)
    }

    /// `host:port/repository@sha256:…`.
    pub fn pinned(&self) -> String {
        format!("{}/{}@{}", self.registry, self.repository, self.digest)
    }
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.pinned())
    }
}

/// Splits `host[:port]/repo[:tag][@sha256:…]`. The first component must look like a
/// host (contains `.` or `:` or is `localhost`): the agent has no default registry,
/// so an implicit Docker Hub name is refused rather than guessed.
fn split_reference(
    reference: &str,
) -> Result<(String, String, Option<String>, Option<Digest>), ImageError> {
    let bad = |why: &str| ImageError::InvalidReference {
        reference: reference.to_string(),
        why: why.to_string(),
    };
    let (name, digest) = match reference.split_once('@') {
        Some((n, d)) => (n, Some(Digest::parse(d)?)),
        None => (reference, None),
    };
    let (host, rest) = name
        .split_once('/')
        .ok_or_else(|| bad("expected host[:port]/repository"))?;
    if !(host.contains('.') || host.contains(':') || host == "localhost") {
        return Err(bad("the first component must be a registry host[:port]"));
    }
    // A tag is the part after the last ':' of the last path component.
    let (repo, tag) = match rest.rsplit_once(':') {
        Some((r, t)) if !t.contains('/') => (r, Some(t.to_string())),
        _ => (rest, None),
    };
    if repo.is_empty()
        || !repo.split('/').all(|c| {
            !c.is_empty()
                && c.bytes().all(|b| {
                    b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-')
                })
        })
    {
        return Err(bad(
            "repository must be lowercase [a-z0-9._-] path components",
        ));
    }
    if host.is_empty() || host.bytes().any(|b| b.is_ascii_whitespace() || b == b'/') {
        return Err(bad("invalid registry host"));
    }
    Ok((host.to_string(), repo.to_string(), tag, digest))
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:0000000000000000000000000000000000000000000000000000000000000001";

    #[test]
    fn digest_accepts_only_sha256_hex() {
        assert!(Digest::parse(D).is_ok());
        assert!(Digest::parse("sha256:abc").is_err());
        assert!(Digest::parse(&D.replace("sha256", "sha512")).is_err());
        assert!(Digest::parse(&D.to_uppercase()).is_err());
        assert!(Digest::parse(&format!("{D}/../x")).is_err());
    }

    #[test]
    fn spec_ref_gives_registry_and_repository_and_resolved_digest_wins() {
        let spec: SpecImage = serde_json::from_value(serde_json::json!({
            "ref": "127.0.0.1:5000/team/app:v1",
            "digest": "sha256:ffff",
            "resolved_digest": D,
            "os": "linux", "arch": "amd64"
        }))
        .unwrap();
        let r = ImageRef::from_spec(&spec).unwrap();
        assert_eq!(r.registry, "127.0.0.1:5000");
        assert_eq!(r.repository, "team/app");
        assert_eq!(r.digest.as_str(), D);
        assert_eq!(r.pinned(), format!("127.0.0.1:5000/team/app@{D}"));
    }

    #[test]
    fn cli_reference_needs_a_digest() {
        assert!(ImageRef::parse_pinned("127.0.0.1:5000/app:v1").is_err());
        let r = ImageRef::parse_pinned(&format!("registry.example.com/app@{D}")).unwrap();
        assert_eq!(r.registry, "registry.example.com");
        assert_eq!(r.repository, "app");
    }

    #[test]
    fn implicit_docker_hub_and_bad_repositories_are_refused() {
        assert!(ImageRef::parse_pinned(&format!("library/app@{D}")).is_err());
        assert!(ImageRef::parse_pinned(&format!("host.io/App@{D}")).is_err());
        assert!(ImageRef::parse_pinned(&format!("host.io/a//b@{D}")).is_err());
        assert!(ImageRef::parse_pinned(&format!("host.io/@{D}")).is_err());
    }
}
