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

/// Re-runs test `test` of the current test binary inside a fresh network namespace (lo
/// up), with `env_var` set to the namespace's name so the inner run knows it is inside.
/// Returns true when already inside (the caller runs the test body), false after the
/// inner run passed (it panics when it failed). The namespace is deleted afterwards.
pub fn reexec_in_netns(test: &str, env_var: &str, tag: &str) -> bool {
    if std::env::var_os(env_var).is_some() {
        return true;
    }
    // One namespace per test (tests of a binary run in parallel).
    let h = test.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    let ns = format!("plfm-{tag}{}-{:08x}", std::process::id(), h as u32);
    let ok = Command::new("ip")
        .args(["netns", "add", &ns])
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "cannot create network namespace {ns}");
    struct DelNs(String);
    impl Drop for DelNs {
        fn drop(&mut self) {
            let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
        }
    }
    let _ns = DelNs(ns.clone());
    let up = Command::new("ip")
        .args(["-n", &ns, "link", "set", "lo", "up"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(up, "cannot bring lo up in {ns}");
    let exe = std::env::current_exe().expect("test binary path");
    let status = Command::new("ip")
        .args(["netns", "exec", &ns])
        .arg(exe)
        // `--include-ignored`: the outer run already chose to run `test` (an ignored
        // test runs only when asked for).
        .args(["--exact", test, "--nocapture", "--test-threads", "1"])
        .arg("--include-ignored")
        .env(env_var, &ns)
        .status()
        .expect("run the test inside its network namespace");
    assert!(status.success(), "{test} failed inside {ns}");
    false
}

/// Live (not zombie) processes other than this one whose command line contains
/// `needle` (a test's data dir: its QEMU and vhost-device-vsock processes).
pub fn processes_mentioning(needle: &str) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if pid == std::process::id() {
            continue;
        }
        let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
        let zombie = stat
            .rsplit(')')
            .next()
            .is_some_and(|r| r.trim_start().starts_with('Z'));
        if !zombie && String::from_utf8_lossy(&cmd).contains(needle) {
            out.push(pid);
        }
    }
    out
}

/// A cgroup parent of a test's own, `<this process's memory cgroup>/<name>` (v2 with
/// the memory, pids and cpu controllers, else v1, where the agent uses the same path in
/// the pids and cpu hierarchies): the path for a runtime's `cgroup_parent` and its
/// directory in the memory hierarchy, so one agent's start-up sweep of leftover groups
/// never meets another test's VMMs. `None` without usable cgroups (the agent then runs
/// its VMMs unconfined).
pub fn test_cgroup_parent(name: &str) -> Option<(String, PathBuf)> {
    use plfm_node_agent::cgroup::{lists_memory, missing_controllers, own_cgroup, Version};
    let controllers = std::fs::read_to_string("/sys/fs/cgroup/cgroup.controllers")
        .ok()
        .filter(|c| lists_memory(c));
    let v1 = |f: &str| Path::new("/sys/fs/cgroup").join(f).is_file();
    let (version, mount) = match controllers {
        Some(c) if missing_controllers(&c).is_empty() => (Version::V2, "/sys/fs/cgroup"),
        Some(_) => return None,
        None if v1("memory/memory.limit_in_bytes")
            && v1("pids/cgroup.procs")
            && v1("cpu/cpu.shares") =>
        {
            (Version::V1, "/sys/fs/cgroup/memory")
        }
        None => return None,
    };
    let own = own_cgroup(&std::fs::read_to_string("/proc/self/cgroup").ok()?, version)?;
    let rel = format!("{}/{name}", own.trim_end_matches('/'));
    let dir = Path::new(mount).join(rel.trim_start_matches('/'));
    Some((rel, dir))
}

/// The directories of a test's cgroup parent `dir` (from [`test_cgroup_parent`]) to
/// remove after the test: `dir`, and on cgroup v1 the same path in the pids and cpu
/// hierarchies, where the agent makes its parent too.
pub fn test_cgroup_dirs(dir: &Path) -> Vec<PathBuf> {
    let mut dirs = vec![dir.to_path_buf()];
    if let Ok(rel) = dir.strip_prefix("/sys/fs/cgroup/memory") {
        for c in ["pids", "cpu"] {
            dirs.push(Path::new("/sys/fs/cgroup").join(c).join(rel));
        }
    }
    dirs
}
