//! `[overlay]` of the agent's config (DESIGN §8a): which interface the node's WireGuard
//! device is, which backend runs it, where the private key is, how often the device is
//! checked for drift. Validated at start-up with the bad key named, like the other
//! sections (`crate::config`).
//!
//! The kernel backend is not built yet: `backend = "kernel"` is refused at validation,
//! and `auto` uses the userspace backend, logging why when the WireGuard module is
//! loaded ([`resolve_backend`]).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Default interface name.
pub const DEFAULT_INTERFACE: &str = "plfm-wg0";
/// Default drift check period.
pub const DEFAULT_DRIFT_CHECK_SECONDS: u64 = 30;
/// Longest interface name Linux accepts (`IFNAMSIZ` - 1).
pub const MAX_INTERFACE_LEN: usize = 15;

/// Which WireGuard implementation runs the interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Backend {
    /// Kernel WireGuard when the module is loaded (`/sys/module/wireguard`), else
    /// userspace. The kernel backend is not built yet, so this is userspace for now.
    #[default]
    Auto,
    /// Kernel WireGuard over netlink (not built yet; refused at validation).
    Kernel,
    /// A userspace implementation serving the UAPI socket (`userspace_command`).
    Userspace,
}

/// `[overlay]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OverlaySettings {
    /// `false`: the agent never touches a WireGuard interface (its key is still made
    /// and shown, and sent with heartbeats).
    #[serde(default = "default_enabled")]
    pub enabled: bool,
    /// The node's WireGuard interface.
    #[serde(default = "default_interface")]
    pub interface: String,
    /// `auto`, `kernel` (not built yet) or `userspace`.
    #[serde(default)]
    pub backend: Backend,
    /// The userspace implementation to run (found on `PATH` unless absolute); it must
    /// serve the standard UAPI socket `/var/run/wireguard/<interface>.sock`.
    #[serde(default = "default_userspace_command")]
    pub userspace_command: PathBuf,
    /// The private key (base64, as `wg genkey` writes it); default
    /// `<data_dir>/overlay/private.key`, created (0600) at the first start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub private_key_file: Option<PathBuf>,
    /// Seconds between two checks of the device against the wanted configuration
    /// (1..=3600); a difference is repaired.
    #[serde(default = "default_drift")]
    pub drift_check_seconds: u64,
}

impl Default for OverlaySettings {
    fn default() -> Self {
        OverlaySettings {
            enabled: default_enabled(),
            interface: default_interface(),
            backend: Backend::default(),
            userspace_command: default_userspace_command(),
            private_key_file: None,
            drift_check_seconds: default_drift(),
        }
    }
}

fn default_enabled() -> bool {
    true
}
fn default_interface() -> String {
    DEFAULT_INTERFACE.into()
}
fn default_userspace_command() -> PathBuf {
    PathBuf::from("wireguard-go")
}
fn default_drift() -> u64 {
    DEFAULT_DRIFT_CHECK_SECONDS
}

impl OverlaySettings {
    /// The private key file: the configured one, else `<data_dir>/overlay/private.key`.
    pub fn private_key_path(&self, data_dir: &Path) -> PathBuf {
        self.private_key_file
            .clone()
            .unwrap_or_else(|| crate::identity::wireguard_key_path(data_dir))
    }

    /// Checks every key; the message names it (`overlay.<key>`).
    pub fn validate(&self) -> Result<(), String> {
        validate_interface(&self.interface).map_err(|e| format!("overlay.interface: {e}"))?;
        if self.backend == Backend::Kernel {
            return Err("overlay.backend: \"kernel\" is not built yet; use \"userspace\" or \"auto\" (which uses userspace until it is)".into());
        }
        if self.userspace_command.as_os_str().is_empty() {
            return Err("overlay.userspace_command: must not be empty".into());
        }
        if let Some(p) = &self.private_key_file {
            if p.file_name().is_none() {
                return Err(format!(
                    "overlay.private_key_file: {} names no file",
                    p.display()
                ));
            }
        }
        if !(1..=3600).contains(&self.drift_check_seconds) {
            return Err(format!(
                "overlay.drift_check_seconds: {} is not in 1..=3600",
                self.drift_check_seconds
            ));
        }
        Ok(())
    }
}

/// A Linux interface name the agent accepts: 1 to 15 bytes of `[A-Za-z0-9._-]`, not
/// `.` or `..`.
pub fn validate_interface(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_INTERFACE_LEN {
        return Err(format!(
            "{name:?} must have 1 to {MAX_INTERFACE_LEN} bytes (Linux's limit)"
        ));
    }
    if name == "." || name == ".." {
        return Err(format!("{name:?} is not an interface name"));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "{name:?} has {c:?}; use letters, digits, '.', '_' and '-'"
        ));
    }
    Ok(())
}

/// The backend that runs, and a note to log when it is not the one `auto` would pick
/// on a finished agent. `module_loaded`: `/sys/module/wireguard` exists.
pub fn resolve_backend(configured: Backend, module_loaded: bool) -> (&'static str, Option<String>) {
    match (configured, module_loaded) {
        (Backend::Auto, true) => (
            "userspace",
            Some("the WireGuard kernel module is loaded, but the agent's kernel backend is not built yet: using the userspace backend".into()),
        ),
        // Refused at validation; kept total for a config built in code.
        (Backend::Kernel, _) => (
            "userspace",
            Some("overlay.backend \"kernel\" is not built yet: using the userspace backend".into()),
        ),
        _ => ("userspace", None),
    }
}

/// Whether the WireGuard kernel module is loaded.
pub fn kernel_module_loaded() -> bool {
    Path::new("/sys/module/wireguard").exists()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interface_names_follow_linux_rules() {
        for ok in ["plfm-wg0", "wg0", "a", "x.y_z-1", "fifteen-bytes15"] {
            validate_interface(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for bad in [
            "",
            "sixteen-bytes-16",
            "wg/0",
            "wg 0",
            ".",
            "..",
            "wg\u{e9}",
        ] {
            assert!(validate_interface(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn auto_uses_userspace_and_says_why_when_the_module_is_loaded() {
        assert_eq!(resolve_backend(Backend::Auto, false), ("userspace", None));
        let (b, note) = resolve_backend(Backend::Auto, true);
        assert_eq!(b, "userspace");
        assert!(note.unwrap().contains("not built yet"));
        assert_eq!(
            resolve_backend(Backend::Userspace, true),
            ("userspace", None)
        );
    }
}
