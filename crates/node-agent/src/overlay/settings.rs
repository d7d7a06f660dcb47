//! `[overlay]` of the agent's config (DESIGN §8a): which interface the node's WireGuard
//! device is, which backend runs it, where the private key is, how often the device is
//! checked for drift. Validated at start-up with the bad key named, like the other
//! sections (`crate::config`).
//!
//! The backend is chosen once at start ([`resolve_backend`]): `auto` takes the kernel's
//! WireGuard when this kernel has it (the module loaded, built in, or installed for the
//! running kernel, so the kernel loads it when the link is made), else the userspace
//! implementation, and logs why; `kernel` on a kernel without WireGuard stops the agent
//! at start with the reason.

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
    /// Kernel WireGuard when this kernel has it, else userspace.
    #[default]
    Auto,
    /// Kernel WireGuard over generic netlink; the agent does not start without it.
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
    /// `auto`, `kernel` or `userspace`.
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

/// The backend that runs (`kernel` or `userspace`) and a note to log, or why the
/// configured one cannot run. `kernel`: `Ok(())` when this kernel has WireGuard, else
/// why not ([`kernel_wireguard`]).
pub fn resolve_backend(
    configured: Backend,
    kernel: Result<(), String>,
) -> Result<(&'static str, Option<String>), String> {
    match (configured, kernel) {
        (Backend::Auto, Ok(())) => Ok(("kernel", None)),
        (Backend::Auto, Err(why)) => Ok((
            "userspace",
            Some(format!("{why}: using the userspace WireGuard backend")),
        )),
        (Backend::Kernel, Ok(())) => Ok(("kernel", None)),
        (Backend::Kernel, Err(why)) => Err(format!(
            "overlay.backend = \"kernel\", but {why}; load the wireguard module or use \"auto\" or \"userspace\""
        )),
        (Backend::Userspace, _) => Ok(("userspace", None)),
    }
}

/// Whether this kernel has WireGuard: the module is loaded (`/sys/module/wireguard`),
/// built in (`modules.builtin`), or installed for the running kernel (`modules.dep`
/// lists it; the kernel loads it when the first WireGuard link is made). The error says
/// what was looked at.
pub fn kernel_wireguard() -> Result<(), String> {
    kernel_wireguard_at(
        Path::new("/sys/module"),
        Path::new("/lib/modules"),
        &kernel_release(),
    )
}

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// [`kernel_wireguard`] with its roots given (for tests).
pub fn kernel_wireguard_at(
    sys_module: &Path,
    lib_modules: &Path,
    release: &str,
) -> Result<(), String> {
    if sys_module.join("wireguard").exists() {
        return Ok(());
    }
    let dir = lib_modules.join(release);
    let lists = |name: &str| {
        std::fs::read_to_string(dir.join(name))
            .map(|t| {
                t.lines().any(|l| {
                    let path = l.split(':').next().unwrap_or("");
                    crate::initramfs::module_name(path) == "wireguard"
                })
            })
            .unwrap_or(false)
    };
    if !release.is_empty() && (lists("modules.builtin") || lists("modules.dep")) {
        return Ok(());
    }
    Err(format!(
        "this kernel ({}) has no WireGuard: no {} and no wireguard module in {}",
        if release.is_empty() {
            "release unknown"
        } else {
            release
        },
        sys_module.join("wireguard").display(),
        dir.display()
    ))
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
    fn auto_takes_the_kernel_when_it_has_wireguard_and_kernel_without_it_stops_the_agent() {
        assert_eq!(resolve_backend(Backend::Auto, Ok(())), Ok(("kernel", None)));
        let (b, note) = resolve_backend(Backend::Auto, Err("no module".into())).unwrap();
        assert_eq!(b, "userspace");
        assert!(note.unwrap().contains("no module"));
        assert_eq!(
            resolve_backend(Backend::Kernel, Ok(())),
            Ok(("kernel", None))
        );
        let e = resolve_backend(Backend::Kernel, Err("this kernel has no WireGuard".into()))
            .unwrap_err();
        assert!(
            e.contains("overlay.backend") && e.contains("no WireGuard"),
            "{e}"
        );
        assert_eq!(
            resolve_backend(Backend::Userspace, Ok(())),
            Ok(("userspace", None))
        );
    }

    #[test]
    fn the_kernel_has_wireguard_when_loaded_built_in_or_installed() {
        let tmp = tempfile::tempdir().unwrap();
        let (sys, lib) = (tmp.path().join("sys"), tmp.path().join("lib"));
        std::fs::create_dir_all(lib.join("6.1.0")).unwrap();
        std::fs::create_dir_all(&sys).unwrap();
        let e = kernel_wireguard_at(&sys, &lib, "6.1.0").unwrap_err();
        assert!(e.contains("6.1.0") && e.contains("no WireGuard"), "{e}");
        // Installed: modules.dep lists it (compressed or not).
        std::fs::write(
            lib.join("6.1.0/modules.dep"),
            "kernel/net/ipv4/udp_tunnel.ko:\nkernel/drivers/net/wireguard/wireguard.ko.xz: kernel/net/ipv4/udp_tunnel.ko\n",
        )
        .unwrap();
        kernel_wireguard_at(&sys, &lib, "6.1.0").unwrap();
        // Another kernel's modules do not count.
        assert!(kernel_wireguard_at(&sys, &lib, "6.2.0").is_err());
        // Built in.
        std::fs::write(lib.join("6.1.0/modules.dep"), "").unwrap();
        std::fs::write(
            lib.join("6.1.0/modules.builtin"),
            "kernel/drivers/net/wireguard/wireguard.ko\n",
        )
        .unwrap();
        kernel_wireguard_at(&sys, &lib, "6.1.0").unwrap();
        // Loaded.
        std::fs::create_dir_all(sys.join("wireguard")).unwrap();
        kernel_wireguard_at(&sys, &lib, "9.9").unwrap();
    }
}
