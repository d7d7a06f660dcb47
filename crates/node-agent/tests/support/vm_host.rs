//! Host-side helpers shared by the tests and benchmarks that boot real VMs: where the
//! repository, tools, the guest kernel and the static guest init are.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Whether `tool` is on PATH (or in /usr/sbin, /sbin).
pub fn which(tool: &str) -> bool {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .any(|d| d.join(tool).is_file())
}

/// The guest kernel and its modules: `PLFM_TEST_KERNEL` + `PLFM_TEST_KERNEL_MODULES`, or
/// the newest Debian cloud kernel in /boot.
pub fn find_kernel() -> Option<(PathBuf, PathBuf)> {
    if let (Ok(k), Ok(m)) = (
        std::env::var("PLFM_TEST_KERNEL"),
        std::env::var("PLFM_TEST_KERNEL_MODULES"),
    ) {
        return Some((k.into(), m.into()));
    }
    let mut kernels: Vec<PathBuf> = std::fs::read_dir("/boot")
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("vmlinuz-") && n.ends_with("-cloud-amd64"))
        })
        .collect();
    kernels.sort();
    let kernel = kernels.pop()?;
    let version = kernel
        .file_name()?
        .to_str()?
        .strip_prefix("vmlinuz-")?
        .to_string();
    let modules = PathBuf::from("/lib/modules").join(version);
    modules
        .join("modules.dep")
        .exists()
        .then_some((kernel, modules))
}

/// The static guest init: `PLFM_GUEST_INIT_BIN`, or built by the project's script.
pub fn static_guest_init() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("PLFM_GUEST_INIT_BIN") {
        return Some(p.into());
    }
    let out = Command::new("bash")
        .arg(repo_root().join("scripts/build-guest-init.sh"))
        .stderr(Stdio::inherit())
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let path = String::from_utf8(out.stdout)
        .ok()?
        .lines()
        .last()?
        .trim()
        .to_string();
    Some(path.into())
}
