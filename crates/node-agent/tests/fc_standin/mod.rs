//! Harness for the Firecracker runtime tests: builds the stand-in `firecracker`
//! (`fake_firecracker.rs`, a TEST DOUBLE) with rustc, writes per-test wrapper scripts
//! choosing its behaviour, provides test host resources, and kills every stand-in a
//! test spawned when the test ends (a Drop guard).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use plfm_node_agent::runtime::firecracker::{
    DiskPath, FirecrackerConfig, FirecrackerRuntime, HostResources, PreparedHost,
};
use plfm_node_agent::runtime::RuntimeError;
use plfm_node_agent::spec::{InstanceId, Workload};

/// Whether a missing prerequisite must fail the test (CI): the shared gate's answer
/// (`common::gate`; every crate including this module includes `common`).
pub fn require_system_tests() -> bool {
    crate::common::gate::system_tests_required()
}

/// Path of the compiled stand-in, or why it could not be built (the test then skips,
/// or fails under `PLFM_REQUIRE_SYSTEM_TESTS=1`).
pub fn standin() -> Option<PathBuf> {
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let r = BUILT.get_or_init(|| {
        let src =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fc_standin/fake_firecracker.rs");
        let out_dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("fc-standin");
        std::fs::create_dir_all(&out_dir).map_err(|e| e.to_string())?;
        let out = out_dir.join("fake-firecracker");
        // Each test process builds its own copy in a directory of its own (rustc's
        // intermediate files are named after the output, so concurrent builds must not
        // share a directory) and renames it in place: no races.
        let build_dir = out_dir.join(format!("build-{}", std::process::id()));
        std::fs::create_dir_all(&build_dir).map_err(|e| e.to_string())?;
        let tmp = build_dir.join("fake-firecracker");
        let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
        let status = std::process::Command::new(rustc)
            .args(["--edition", "2021", "-O", "-o"])
            .arg(&tmp)
            .arg(&src)
            .status()
            .map_err(|e| format!("cannot run rustc: {e}"))?;
        if !status.success() {
            let _ = std::fs::remove_dir_all(&build_dir);
            return Err(format!("rustc failed on {}: {status}", src.display()));
        }
        let renamed = std::fs::rename(&tmp, &out).map_err(|e| e.to_string());
        let _ = std::fs::remove_dir_all(&build_dir);
        renamed?;
        Ok(out)
    });
    match r {
        Ok(p) => Some(p.clone()),
        Err(e) => {
            crate::common::gate::skip_or_fail(&format!(
                "the firecracker stand-in (cannot be built: {e})"
            ));
            None
        }
    }
}

/// A temp workspace for one test: data dir, wrapper script, request record. Kills the
/// stand-ins it spawned on drop.
pub struct FcEnv {
    pub root: tempfile::TempDir,
    pub binary: PathBuf,
    pub record: PathBuf,
}

impl FcEnv {
    /// A workspace whose `firecracker` behaves as `modes` (see fake_firecracker.rs).
    pub fn new(modes: &str) -> Option<FcEnv> {
        let standin = standin()?;
        let root = tempfile::tempdir().unwrap();
        let record = root.path().join("requests.log");
        let binary = root.path().join("firecracker");
        for (name, role) in [("firecracker", ""), ("jailer", "FAKE_FC_ROLE=jailer ")] {
            let p = root.path().join(name);
            std::fs::write(
                &p,
                format!(
                    "#!/bin/sh\n{role}FAKE_FC='{modes}' FAKE_FC_RECORD='{}' exec '{}' \"$@\"\n",
                    record.display(),
                    standin.display()
                ),
            )
            .unwrap();
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        for f in ["vmlinux", "initramfs.cpio.gz", "root.ext4"] {
            std::fs::write(root.path().join(f), b"test").unwrap();
        }
        Some(FcEnv {
            root,
            binary,
            record,
        })
    }

    pub fn path(&self, p: &str) -> PathBuf {
        self.root.path().join(p)
    }

    pub fn data_dir(&self) -> PathBuf {
        self.path("data")
    }

    pub fn config(&self, boot_timeout: u64) -> FirecrackerConfig {
        FirecrackerConfig {
            binary: self.binary.clone(),
            kernel: self.path("vmlinux"),
            initramfs: self.path("initramfs.cpio.gz"),
            boot_timeout,
            api_timeout_ms: 2000,
            sandbox: false,
            ..Default::default()
        }
    }

    /// The same stand-in started through `jailer` (uids from 10001, gid 10000, chroot
    /// under `jail/`).
    pub fn jailed_config(&self, boot_timeout: u64) -> FirecrackerConfig {
        FirecrackerConfig {
            sandbox: true,
            jailer: self.path("jailer"),
            chroot_base_dir: self.path("jail"),
            vmm_uid_base: 10001,
            vmm_uid_count: 100,
            gid: 10000,
            ..self.config(boot_timeout)
        }
    }

    pub fn runtime(&self, boot_timeout: u64) -> FirecrackerRuntime {
        FirecrackerRuntime::new(
            self.config(boot_timeout),
            &self.data_dir(),
            None,
            Arc::new(TestHost::new(self.root.path(), Some("plfmtest0"))),
        )
    }

    /// Recorded lines (`METHOD PATH BODY` and `EVENT name ms [pid]`).
    pub fn lines(&self) -> Vec<String> {
        std::fs::read_to_string(&self.record)
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// Recorded API requests: (method, path, body).
    pub fn requests(&self) -> Vec<(String, String, Option<serde_json::Value>)> {
        self.lines()
            .into_iter()
            .filter(|l| !l.starts_with("EVENT "))
            .map(|l| {
                let mut it = l.splitn(3, ' ');
                let m = it.next().unwrap_or("").to_string();
                let p = it.next().unwrap_or("").to_string();
                let b = it.next().unwrap_or("").trim();
                let body = if b.is_empty() {
                    None
                } else {
                    Some(serde_json::from_str(b).expect("recorded body is JSON"))
                };
                (m, p, body)
            })
            .collect()
    }

    /// Recorded events: (name, unix ms).
    pub fn events(&self) -> Vec<(String, u128)> {
        self.lines()
            .into_iter()
            .filter_map(|l| {
                let mut it = l.strip_prefix("EVENT ")?.split(' ');
                Some((it.next()?.to_string(), it.next()?.parse().ok()?))
            })
            .collect()
    }

    /// Pids of the stand-ins spawned so far.
    pub fn pids(&self) -> Vec<i32> {
        self.lines()
            .into_iter()
            .filter_map(|l| {
                let rest = l.strip_prefix("EVENT spawned ")?;
                rest.split(' ').nth(1)?.parse().ok()
            })
            .collect()
    }
}

/// Whether pid runs the stand-in (not a zombie, not a recycled pid).
pub fn standin_alive(pid: i32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, r)| r.split_whitespace().next())
        .unwrap_or("X");
    let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    state != "Z" && String::from_utf8_lossy(&cmd).contains("fake-firecracker")
}

impl Drop for FcEnv {
    fn drop(&mut self) {
        for pid in self.pids() {
            if standin_alive(pid) {
                // SAFETY: kill(2) with a pid we just verified runs our stand-in.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
            }
        }
    }
}

/// Host resources for tests: files in the workspace, a fixed tap name, no mkfs.
pub struct TestHost {
    root: PathBuf,
    tap: Option<String>,
    layers: usize,
}

impl TestHost {
    pub fn new(root: &Path, tap: Option<&str>) -> Self {
        TestHost {
            root: root.to_path_buf(),
            tap: tap.map(str::to_string),
            layers: 1,
        }
    }

    /// A root stacked from `n` layer disks: `root.ext4` (the bottom), then
    /// `layer-1.ext4` … `layer-<n-1>.ext4`.
    #[allow(dead_code)]
    pub fn with_layers(mut self, n: usize) -> Self {
        self.layers = n;
        self
    }
}

#[async_trait]
impl HostResources for TestHost {
    async fn prepare(
        &self,
        _id: &InstanceId,
        workload: &Workload,
        instance_dir: &Path,
        _vmm_owner: Option<(u32, u32)>,
    ) -> Result<PreparedHost, RuntimeError> {
        let scratch = instance_dir.join("scratch.ext4");
        let f = std::fs::File::create(&scratch)
            .map_err(|e| RuntimeError::RootfsBuild(plfm_node_agent::runtime::Cause::of(e)))?;
        f.set_len(1 << 30)
            .map_err(|e| RuntimeError::RootfsBuild(plfm_node_agent::runtime::Cause::of(e)))?;
        let mut mounts = workload.spec.mounts.clone().unwrap_or_default();
        mounts.sort_by(|a, b| a.volume_id.cmp(&b.volume_id));
        let volumes = mounts
            .iter()
            .map(|m| {
                let path = self.root.join(format!("{}.ext4", m.volume_id));
                let _ = std::fs::write(&path, b"vol");
                (
                    m.volume_id.clone(),
                    DiskPath {
                        path,
                        read_only: m.read_only,
                    },
                )
            })
            .collect();
        let mut root_layers = vec![self.root.join("root.ext4")];
        for i in 1..self.layers {
            let p = self.root.join(format!("layer-{i}.ext4"));
            let _ = std::fs::write(&p, format!("layer {i}"));
            root_layers.push(p);
        }
        Ok(PreparedHost {
            root_layers,
            scratch_disk: scratch,
            volumes,
            tap: self.tap.clone(),
            guest_network: None,
            address: None,
            process: None,
        })
    }

    async fn release(&self, _id: &InstanceId, instance_dir: &Path) -> Result<(), RuntimeError> {
        let _ = std::fs::remove_file(instance_dir.join("scratch.ext4"));
        Ok(())
    }
}

/// A realistic workload: two volumes, secrets, health check.
pub fn realistic_workload(instance: &str) -> Arc<Workload> {
    let v = serde_json::json!({
        "instance_id": instance, "generation": 3, "desired_state": "running",
        "workload": {
            "spec_version": "v1", "instance_id": instance, "generation": 3,
            "image": {"ref": "127.0.0.1:5000/app:v1",
                      "digest": "sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
                      "resolved_digest": "sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
                      "os": "linux", "arch": "amd64"},
            "command": ["/app", "--serve"],
            "env_vars": {"MODE": "prod"},
            "resources": {"cpu_request": 1.5, "memory_limit_bytes": 536870912_i64, "ephemeral_disk_bytes": 1073741824_i64, "cpu_weight": 200},
            "network": {"overlay_ipv6": "fd00::1:2", "gateway_ipv6": "fe80::1", "mtu": 1400, "dns": ["fd00::53"]},
            "mounts": [
                {"volume_id": "vol-b", "mount_path": "/data", "read_only": false, "filesystem": "ext4"},
                {"volume_id": "vol-a", "mount_path": "/ref", "read_only": true, "filesystem": "ext4"}
            ],
            "lifecycle": {"termination_grace_seconds": 2, "restart_policy": "always", "max_retries": 3}
        }
    });
    plfm_node_agent::spec::decode_assignment(&v, "test")
        .unwrap()
        .workload
        .unwrap()
}

/// Waits for `cond` with a deadline.
pub async fn wait_until(what: &str, timeout: Duration, cond: impl FnMut() -> bool) {
    crate::common::wait::wait_until_async(what, timeout, cond).await
}
