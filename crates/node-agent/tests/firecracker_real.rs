//! The Firecracker runtime against the real `firecracker` and `jailer` v1.16.1
//! (`shared/firecracker/bin/`, built from the public release source). On these hosts
//! `/dev/kvm` opens but a guest kernel dies in early boot (nested virtualization):
//! Firecracker accepts its whole configuration and `InstanceStart`, then exits 1 after
//! about 40 s. That is enough to prove, against the real peer, what the stand-in
//! cannot: the API conversation (every call answered 2xx), the command lines of the
//! plain and the jailed launch (the jailer passes `--id` itself; its cgroup arguments
//! follow the host), stop by `SendCtrlAltDel` then SIGKILL, the VMM's own failures
//! reported with its log, `kill -9` of the agent and adoption of the running VMM, and
//! cleanup that leaves no process, tap, rule, jail, cgroup or file. A guest that boots
//! and handshakes stays the stand-in's (firecracker_process.rs, firecracker_host.rs).
//!
//! Each test re-runs itself in a network namespace of its own made with `unshare -n`
//! (which, unlike `ip netns exec`, keeps the host's cgroup mounts the jailer needs);
//! addresses come from fd00::/8 and 169.254.0.0/16. Prerequisites: root, /dev/kvm,
//! the binaries in shared/, a Debian cloud kernel in /boot, `unshare`, `ip`, `nft`,
//! docker-registry and e2fsprogs (a missing one skips, or fails with
//! `PLFM_REQUIRE_SYSTEM_TESTS=1`).

#![cfg(target_os = "linux")]

mod common;
mod fc_standin;
mod image_support;
#[path = "support/vm_host.rs"]
mod vm_host;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::agent::AgentProcess;
use common::wait::{poll_until, wait_until};

use image_support::{config_json, Registry, GZIP};
use plfm_node_agent::image::testtar::{Layer, TarEntry};
use plfm_node_agent::image::ImageService;
use plfm_node_agent::instance::{ReasonCode, Status};
use plfm_node_agent::runtime::firecracker::api::ApiClient;
use plfm_node_agent::runtime::firecracker::{
    FirecrackerConfig, FirecrackerRuntime, HostResources, LocalHost, PreparedHost,
};
use plfm_node_agent::runtime::{BootContext, Runtime, RuntimeError, VmEvent};
use plfm_node_agent::spec::{InstanceId, Workload};
use plfm_node_agent::state::Store;
use plfm_node_agent::status::view::InstanceView;
use serde_json::{json, Value};

const NETNS_ENV: &str = "PLFM_FC_REAL_TEST_NETNS";
/// First uid of the jailed VMMs' range, and their shared gid.
const JAIL_UID: u32 = 10_123;
const JAIL_GID: u32 = 10_122;

fn shared_bin(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/firecracker/bin")
        .join(name)
}

fn missing_prerequisites() -> Vec<String> {
    let mut missing = Vec::new();
    if !rustix::process::geteuid().is_root() {
        missing.push("root (taps, jailer, network namespaces)".to_string());
    }
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        missing.push("/dev/kvm (Firecracker needs KVM)".into());
    }
    for b in ["firecracker", "jailer"] {
        if !shared_bin(b).is_file() {
            missing.push(format!(
                "{} (shared/firecracker/bin)",
                shared_bin(b).display()
            ));
        }
    }
    if vm_host::find_kernel().is_none() {
        missing.push("a kernel in /boot (Debian package linux-image-cloud-amd64)".into());
    }
    for (tool, pkg) in [
        ("unshare", "util-linux"),
        ("ip", "iproute2"),
        ("nft", "nftables"),
    ] {
        if !vm_host::which(tool) {
            missing.push(format!("{tool} (Debian package {pkg})"));
        }
    }
    missing
}

/// Runs `body` inside a network namespace of its own (re-running this test there).
fn in_netns<F: std::future::Future<Output = ()>>(test: &str, body: impl FnOnce(Rig) -> F) {
    if std::env::var_os(NETNS_ENV).is_none() {
        let missing = missing_prerequisites();
        if !common::gate::present(missing.is_empty(), &missing.join(", ")) {
            return;
        }
        if !image_support::prerequisites(test) {
            return;
        }
        let exe = std::env::current_exe().expect("test binary path");
        let status = Command::new("unshare")
            .args([
                "--net",
                "--",
                "sh",
                "-c",
                "ip link set lo up && exec \"$@\"",
                "sh",
            ])
            .arg(exe)
            .args(["--exact", test, "--nocapture", "--test-threads", "1"])
            .env(NETNS_ENV, "1")
            .status()
            .expect("run the test in its own network namespace");
        assert!(
            status.success(),
            "{test} failed inside its network namespace"
        );
        return;
    }
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(async {
            let rig = Rig::new().await;
            body(rig).await
        });
}

/// A temp root with the platform kernel (ELF vmlinux extracted from the installed
/// cloud kernel), an initramfs file, a registry serving a one-file image.
struct Rig {
    /// A memory cgroup parent of this test's own (`cgroup_parent`, its directory), so
    /// one agent's start-up sweep of leftover groups never meets another test's VMMs.
    cgroup: Option<(String, PathBuf)>,
    tmp: tempfile::TempDir,
    registry: Registry,
    digest: String,
    kernel: PathBuf,
    initramfs: PathBuf,
}

impl Rig {
    async fn new() -> Rig {
        let tmp = tempfile::tempdir().unwrap();
        let (bz, _) = vm_host::find_kernel().unwrap();
        let kernel = tmp.path().join("vmlinux");
        plfm_node_agent::vmlinux::extract_file(&bz, &kernel).expect("extract vmlinux");
        // Loaded as the initrd; the guest dies before it would unpack it.
        let initramfs = tmp.path().join("initramfs.cpio.gz");
        std::fs::write(&initramfs, vec![0u8; 4096]).unwrap();
        let registry = Registry::start();
        let layer = Layer::new().dir("bin", 0o755).entry(TarEntry::file(
            "bin/app",
            b"#!/bin/sh\nexit 0\n",
            0o755,
        ));
        let image = registry
            .push(
                "fc/real",
                &[(layer.tar_gz(), GZIP)],
                &config_json(&["/bin/app"], &[], &["PATH=/bin"]),
            )
            .await;
        let tag = tmp
            .path()
            .file_name()
            .map(|n| n.to_string_lossy().replace('.', ""))
            .unwrap_or_default();
        Rig {
            cgroup: test_cgroup_parent(&tag),
            digest: image.digest.as_str().to_string(),
            tmp,
            registry,
            kernel,
            initramfs,
        }
    }

    fn path(&self, p: &str) -> PathBuf {
        self.tmp.path().join(p)
    }

    fn config(&self, jailed: bool, boot_timeout: u64) -> FirecrackerConfig {
        FirecrackerConfig {
            binary: shared_bin("firecracker"),
            sandbox: jailed,
            jailer: shared_bin("jailer"),
            kernel: self.kernel.clone(),
            initramfs: self.initramfs.clone(),
            chroot_base_dir: self.path("jail"),
            vmm_uid_base: JAIL_UID,
            vmm_uid_count: 16,
            gid: JAIL_GID,
            boot_timeout,
            api_timeout_ms: 5000,
            cgroup_parent: self.cgroup.as_ref().map(|(rel, _)| rel.clone()),
            ..Default::default()
        }
    }

    /// The runtime with its real host resources under `data/`.
    fn runtime(&self, config: FirecrackerConfig) -> (Arc<FirecrackerRuntime>, Store) {
        self.runtime_with_layers(config, 1)
    }

    /// The runtime with its real host resources, the image's root stacked from
    /// `layers` disks: the image service's disk at the bottom, then small disks named
    /// `layers/layer-<i>.ext4` (the image module builds one disk per image today).
    fn runtime_with_layers(
        &self,
        config: FirecrackerConfig,
        layers: usize,
    ) -> (Arc<FirecrackerRuntime>, Store) {
        let data = self.path("data");
        std::fs::create_dir_all(&data).unwrap();
        std::fs::create_dir_all(self.path("jail")).unwrap();
        let store = Store::open(&data.join("state.db")).unwrap();
        let images = ImageService::open(&data, self.registry.image_config()).unwrap();
        let host = LocalHost::new(&data, Some(images), store.clone(), &config).unwrap();
        let host: Arc<dyn HostResources> = match layers {
            1 => Arc::new(host),
            n => Arc::new(Stacked {
                inner: host,
                dir: self.path("layers"),
                upper: n - 1,
            }),
        };
        let rt = FirecrackerRuntime::new(config, &data, Some(store.clone()), host);
        (Arc::new(rt), store)
    }

    fn assignment(&self, id: &str, ipv6: &str) -> Value {
        let digest = &self.digest;
        json!({
            "instance_id": id, "generation": 1, "desired_state": "running", "drain_grace_seconds": 2,
            "workload": {
                "spec_version": "v1", "instance_id": id, "generation": 1,
                "image": {"ref": format!("{}/fc/real@{digest}", self.registry.addr),
                          "digest": digest, "resolved_digest": digest},
                "resources": {"cpu_request": 1.0, "memory_limit_bytes": 268435456_i64,
                              "ephemeral_disk_bytes": 67108864_i64},
                "network": {"overlay_ipv6": ipv6, "gateway_ipv6": "fe80::1", "mtu": 1400},
                "lifecycle": {"termination_grace_seconds": 2, "restart_policy": "never", "max_retries": 0}
            }
        })
    }

    fn workload(&self, id: &str, ipv6: &str) -> Arc<Workload> {
        plfm_node_agent::spec::decode_assignment(&self.assignment(id, ipv6), "test")
            .unwrap()
            .workload
            .unwrap()
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        for dir in self
            .cgroup
            .iter()
            .flat_map(|(_, d)| vm_host::test_cgroup_dirs(d))
        {
            for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    let _ = std::fs::remove_dir(e.path());
                }
            }
            let _ = std::fs::remove_dir(&dir);
        }
    }
}

/// The real host resources with `upper` more root layer disks (small empty ext4
/// disks, root's like a cached disk) on top of the image's.
struct Stacked {
    inner: LocalHost,
    dir: PathBuf,
    upper: usize,
}

#[async_trait::async_trait]
impl HostResources for Stacked {
    async fn prepare(
        &self,
        id: &InstanceId,
        workload: &Workload,
        instance_dir: &Path,
        vmm_owner: Option<(u32, u32)>,
    ) -> Result<PreparedHost, RuntimeError> {
        let mut p = self
            .inner
            .prepare(id, workload, instance_dir, vmm_owner)
            .await?;
        std::fs::create_dir_all(&self.dir).unwrap();
        for i in 1..=self.upper {
            let layer = self.dir.join(format!("layer-{i}.ext4"));
            std::fs::File::create(&layer)
                .and_then(|f| f.set_len(8 << 20))
                .unwrap();
            run("mkfs.ext4", &["-q", "-F", layer.to_str().unwrap()]);
            p.root_layers.push(layer);
        }
        Ok(p)
    }
    async fn release(&self, id: &InstanceId, instance_dir: &Path) -> Result<(), RuntimeError> {
        self.inner.release(id, instance_dir).await
    }
    async fn remove_orphans(&self) -> Result<(), RuntimeError> {
        self.inner.remove_orphans().await
    }
    async fn retain_root_disks(&self, adopted: &[InstanceId]) {
        self.inner.retain_root_disks(adopted).await
    }
    fn ledger(&self) -> Option<plfm_node_agent::runtime::vmm::ledger::Ledger> {
        self.inner.ledger()
    }
}

/// The real jailer and Firecracker given a root of twelve layer disks and two volumes,
/// with the tap and vsock the 17 virtio devices the runtime allows at most
/// (`VIRTIO_DEVICES`): `InstanceStart` succeeds, Firecracker's own view of the VM
/// (`GET /vm/config`) has the shared names (bottom layer `vda`, scratch `vdb`, volumes
/// `vdc`/`vdd`, upper layers `vde` … `vdo`) on the right files, configured in that
/// order (its log), every layer read-only and linked into the jail root's (the VMM's
/// uid can read and not write it), and cleanup leaves nothing.
#[test]
fn real_jailer_takes_a_root_of_twelve_layer_disks_and_two_volumes_in_the_shared_order() {
    in_netns(
        "real_jailer_takes_a_root_of_twelve_layer_disks_and_two_volumes_in_the_shared_order",
        |rig| async move {
            const LAYERS: usize = 12;
            let (rt, store) = rig.runtime_with_layers(rig.config(true, 30), LAYERS);
            let id = InstanceId::parse("fc-stack").unwrap();
            let mut a = rig.assignment("fc-stack", "fd00::9:5");
            a["workload"]["mounts"] = json!([
                {"volume_id": "vol-b", "mount_path": "/b", "read_only": false, "filesystem": "ext4"},
                {"volume_id": "vol-a", "mount_path": "/a", "read_only": true, "filesystem": "ext4"}
            ]);
            let w = plfm_node_agent::spec::decode_assignment(&a, "test")
                .unwrap()
                .workload
                .unwrap();
            rt.prepare(&id, &w).await.expect("prepare");
            let vm = rt
                .start(&id, &w, boot("b1"))
                .await
                .unwrap_or_else(|e| panic!("start: {e}\nlog: {}", fc_log(&rig, "fc-stack", true)));
            let root = rig.path("jail/firecracker/fc-stack/root");
            let api = ApiClient::new(&root.join("run/firecracker.socket"), Duration::from_secs(5));
            let get = plfm_node_agent::runtime::firecracker::api::ApiRequest {
                method: "GET",
                path: "/vm/config".into(),
                body: None,
            };
            let config: Value =
                serde_json::from_slice(&api.send(&get).await.expect("GET /vm/config")).unwrap();
            // Firecracker lists the drives of a started VM in no particular order.
            let mut drives: Vec<(String, String, bool)> = config["drives"]
                .as_array()
                .expect("drives")
                .iter()
                .map(|d| {
                    (
                        d["drive_id"].as_str().unwrap().to_string(),
                        d["path_on_host"].as_str().unwrap().to_string(),
                        d["is_read_only"].as_bool().unwrap(),
                    )
                })
                .collect();
            drives.sort();
            let ids: Vec<&str> = drives.iter().map(|d| d.0.as_str()).collect();
            let want: Vec<String> = (0..LAYERS + 3)
                .map(plfm_guest_protocol::disk_name)
                .collect();
            assert_eq!(ids, want, "{config}");
            assert_eq!(ids.last(), Some(&"vdo"));
            let ro: Vec<bool> = drives.iter().map(|d| d.2).collect();
            let mut want_ro = vec![true, false, true, false];
            want_ro.extend([true; LAYERS - 1]);
            assert_eq!(ro, want_ro, "{config}");
            for i in 1..LAYERS {
                assert_eq!(drives[3 + i].1, format!("/layer-{i}.ext4"), "{config}");
            }
            assert!(drives[0].1.ends_with(".ext4") && drives[0].1.starts_with('/'));
            let uid: u32 = store
                .resources()
                .unwrap()
                .iter()
                .find(|r| r.kind == "uid" && r.instance_id == "fc-stack")
                .expect("a uid row for the instance")
                .name
                .parse()
                .unwrap();
            let layers = std::iter::once(&drives[0]).chain(&drives[4..]);
            for (_, path, _) in layers {
                let file = path.trim_start_matches('/').to_string();
                use std::os::unix::fs::MetadataExt;
                let m = std::fs::metadata(root.join(&file)).unwrap();
                assert_eq!(m.uid(), 0, "{file} was given to the VMM's uid");
                assert_eq!(
                    as_jailed_vmm(&root, uid, JAIL_GID, Probe::OpenForWrite(&file)),
                    Err(libc::EACCES),
                    "the VMM's uid could open /{file} for writing"
                );
                assert_eq!(
                    as_jailed_vmm(&root, uid, JAIL_GID, Probe::OpenForRead(&file)),
                    Ok(()),
                    "the VMM's uid cannot read /{file}"
                );
            }
            assert_eq!(drives[2].1, "/vol-a.ext4");
            assert_eq!(drives[3].1, "/vol-b.ext4");
            let out = rt.stop(&vm, Duration::from_secs(2)).await;
            assert!(!out.graceful);
            let log = fc_log(&rig, "fc-stack", true);
            // Firecracker attaches the drives in the order they were configured (the
            // guest names them in that order); its own log has that order.
            let at: Vec<usize> = ids
                .iter()
                .map(|d| {
                    log.find(&format!("Put request on \"/drives/{d}\""))
                        .unwrap_or_else(|| panic!("no PUT /drives/{d} in the log:\n{log}"))
                })
                .collect();
            assert!(at.windows(2).all(|w| w[0] < w[1]), "{at:?}\n{log}");
            assert!(
                !log.contains("Received Error"),
                "an API call was refused:\n{log}"
            );
            rt.cleanup(&id).await.expect("cleanup");
            let cgroups = plfm_node_agent::runtime::firecracker::process::JailerCgroups::detect(
                plfm_node_agent::runtime::firecracker::process::JAILER_CGROUP_PARENT,
            );
            assert_nothing_left(&rig, &store, "fc-stack", &cgroups.dirs("fc-stack"));
        },
    );
}

/// `<the test's own memory cgroup>/plfm-fc-<tag>`, when there is one.
fn test_cgroup_parent(tag: &str) -> Option<(String, PathBuf)> {
    vm_host::test_cgroup_parent(&format!("plfm-fc-{tag}"))
}

fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).output().expect(cmd);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn boot(id: &str) -> BootContext {
    BootContext {
        boot_id: id.into(),
        secrets: None,
    }
}

/// The recorded VMM process of an instance (`vmm.json`).
fn recorded_pid(data: &Path, id: &str) -> Option<u32> {
    let rec: Value =
        serde_json::from_slice(&std::fs::read(data.join(format!("instances/{id}/vmm.json"))).ok()?)
            .ok()?;
    rec["process"]["pid"].as_u64().map(|p| p as u32)
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, r)| r.trim_start().starts_with(['Z', 'X']))
        })
        == Some(false)
}

/// Live processes whose command line mentions `needle`.
fn processes(needle: &str) -> Vec<u32> {
    vm_host::processes_mentioning(needle)
}

/// Nothing of the instance is left on the host: no process, tap, rule, file, jail,
/// cgroup or ledger row (volumes outlive instances and are not made here).
fn assert_nothing_left(rig: &Rig, store: &Store, id: &str, cgroups: &[PathBuf]) {
    let tap = plfm_node_agent::network::tap_name(id);
    let data = rig.path("data").display().to_string();
    wait_until("no VMM process left", Duration::from_secs(10), || {
        processes(&data).is_empty()
    });
    // A jailed VMM's command line is `/firecracker --id <id> …` (inside its chroot).
    assert!(
        processes(&format!("--id\0{id}\0")).is_empty(),
        "jailed VMM left"
    );
    assert!(
        run("ip", &["-o", "link", "show"])
            .lines()
            .all(|l| !l.contains(&tap)),
        "tap {tap} left"
    );
    let rules = run("nft", &["list", "table", "inet", "plfm"]);
    assert!(!rules.contains(&format!("chain {tap}")), "{rules}");
    // Only logs may stay (a removed instance's until the retention sweep).
    let dir = rig.path(&format!("data/instances/{id}"));
    let left: Vec<String> = std::fs::read_dir(&dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !plfm_node_agent::logstore::is_log(n) && n != "removed")
        .collect();
    assert!(left.is_empty(), "instance files left: {left:?}");
    assert!(
        !rig.path(&format!("jail/firecracker/{id}")).exists(),
        "jail left"
    );
    for c in cgroups {
        assert!(!c.exists(), "cgroup {} left", c.display());
    }
    let rows: Vec<_> = store
        .resources()
        .unwrap()
        .into_iter()
        .filter(|r| r.instance_id == id)
        .collect();
    assert!(rows.is_empty(), "ledger rows left: {rows:?}");
}

/// The memory cgroup directory of a process (v1 `memory` line, else the v2 line).
fn memory_cgroup_of(pid: u32) -> Option<PathBuf> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    let v1 = text.lines().find_map(|l| {
        let mut f = l.splitn(3, ':');
        let (_, ctl, path) = (f.next()?, f.next()?, f.next()?);
        ctl.split(',')
            .any(|c| c == "memory")
            .then(|| PathBuf::from("/sys/fs/cgroup/memory").join(path.trim_start_matches('/')))
    });
    let v2 = || {
        let path = text.lines().find_map(|l| l.strip_prefix("0::"))?;
        Some(PathBuf::from("/sys/fs/cgroup").join(path.trim_start_matches('/')))
    };
    v1.filter(|p| p.join("memory.limit_in_bytes").is_file())
        .or_else(v2)
        .filter(|p| p.is_dir())
}

fn fc_log(rig: &Rig, id: &str, jailed: bool) -> String {
    let p = if jailed {
        rig.path(&format!("jail/firecracker/{id}/root/firecracker.log"))
    } else {
        rig.path(&format!("data/instances/{id}/firecracker.log"))
    };
    std::fs::read_to_string(p).unwrap_or_default()
}

/// The plain launch: every API call of the configuration and `InstanceStart` is
/// answered 2xx (`start` fails on the first refusal); the guest never handshakes, and
/// that failure carries Firecracker's own log; stop asks the guest, then sends
/// `SendCtrlAltDel` (204), then kills the VMM at the deadline; cleanup leaves nothing.
#[test]
fn real_firecracker_accepts_the_configuration_then_stop_escalates_and_cleanup_leaves_nothing() {
    in_netns(
        "real_firecracker_accepts_the_configuration_then_stop_escalates_and_cleanup_leaves_nothing",
        |rig| async move {
            let (rt, store) = rig.runtime(rig.config(false, 3));
            let id = InstanceId::parse("fc-plain").unwrap();
            let w = rig.workload("fc-plain", "fd00::9:1");
            rt.prepare(&id, &w).await.expect("prepare");
            let vm = rt
                .start(&id, &w, boot("b1"))
                .await
                .unwrap_or_else(|e| panic!("start: {e}\nlog: {}", fc_log(&rig, "fc-plain", false)));
            let api = ApiClient::new(
                &rig.path("data/instances/fc-plain/api.sock"),
                Duration::from_secs(5),
            );
            let info = api.instance_info().await.expect("GET /");
            assert_eq!(info.id, "fc-plain");
            assert_eq!(info.state, "Running", "{info:?}");
            let mc = api.machine_config().await.expect("GET /machine-config");
            assert_eq!((mc.vcpu_count, mc.mem_size_mib), (1, 256));
            let pid = recorded_pid(&rig.path("data"), "fc-plain").expect("vmm.json pid");
            assert!(alive(pid));
            // Without the jailer the VMM runs in the agent's own per-instance memory
            // cgroup: guest memory (256 MiB) + memory_overhead_mib (64).
            let group = memory_cgroup_of(pid).expect("the VMM is in a memory cgroup");
            let parent = rig.cgroup.as_ref().map(|(_, d)| d.clone()).unwrap();
            assert_eq!(group, parent.join("fc-plain"));
            let limit = std::fs::read_to_string(group.join("memory.limit_in_bytes"))
                .or_else(|_| std::fs::read_to_string(group.join("memory.max")))
                .unwrap();
            assert_eq!(limit.trim().parse::<u64>().unwrap(), 320 << 20);
            // No guest ever connects here: the handshake deadline fails the boot with
            // the VMM's own last lines.
            let ev = tokio::time::timeout(Duration::from_secs(20), rt.next_event(&vm))
                .await
                .expect("an event within the handshake deadline");
            let VmEvent::Failed(RuntimeError::VmmStart(cause)) = ev else {
                panic!("{ev:?}")
            };
            let msg = cause.to_string();
            assert!(msg.contains("guest handshake did not complete"), "{msg}");
            assert!(
                msg.contains("last VMM log lines") && msg.contains("Firecracker"),
                "{msg}"
            );
            // Stop: guest request (nobody listens), SendCtrlAltDel (the dying guest
            // ignores it), SIGKILL at the grace deadline.
            let started = Instant::now();
            let out = rt.stop(&vm, Duration::from_secs(2)).await;
            assert!(!out.graceful, "{out:?}");
            assert_eq!(
                out.exit_code, None,
                "no workload exit code from a killed VMM"
            );
            assert!(
                started.elapsed() >= Duration::from_millis(1900),
                "{:?}",
                started.elapsed()
            );
            assert!(!alive(pid), "VMM {pid} still alive after stop");
            let log = fc_log(&rig, "fc-plain", false);
            assert!(log.contains("SendCtrlAltDel"), "{log}");
            assert!(
                !log.contains("Received Error"),
                "an API call was refused:\n{log}"
            );
            rt.cleanup(&id).await.expect("cleanup");
            rt.cleanup(&id).await.expect("cleanup twice");
            assert_nothing_left(&rig, &store, "fc-plain", &[group]);
        },
    );
}

/// The jailed launch (fails on the old command line: Firecracker exits 153 on a second
/// `--id`): the jailer confines the VMM in cgroups of the host's version (v1 here:
/// `memory.limit_in_bytes`, `cpu.shares`, `pids.max`), runs it as the configured uid in its
/// chroot, the whole configuration is accepted (the tap is the VMM uid's to open), and
/// cleanup removes the jail and the cgroups.
#[test]
fn real_jailer_starts_firecracker_in_host_cgroups_and_cleanup_removes_jail_and_cgroups() {
    in_netns(
        "real_jailer_starts_firecracker_in_host_cgroups_and_cleanup_removes_jail_and_cgroups",
        |rig| async move {
            use plfm_node_agent::cgroup::VMM_PIDS_MAX;
            let cgroups = plfm_node_agent::runtime::firecracker::process::JailerCgroups::detect(
                plfm_node_agent::runtime::firecracker::process::JAILER_CGROUP_PARENT,
            );
            let (rt, store) = rig.runtime(rig.config(true, 30));
            let id = InstanceId::parse("fc-jailed").unwrap();
            let w = rig.workload("fc-jailed", "fd00::9:2");
            rt.prepare(&id, &w).await.expect("prepare");
            let vm = rt.start(&id, &w, boot("b1")).await.unwrap_or_else(|e| {
                panic!(
                    "start: {e}\nlog: {}\nconsole: {}",
                    fc_log(&rig, "fc-jailed", true),
                    std::fs::read_to_string(rig.path("data/instances/fc-jailed/console.log"))
                        .unwrap_or_default()
                )
            });
            let root = rig.path("jail/firecracker/fc-jailed/root");
            let api = ApiClient::new(&root.join("run/firecracker.socket"), Duration::from_secs(5));
            assert_eq!(api.instance_info().await.expect("GET /").state, "Running");
            let pid = recorded_pid(&rig.path("data"), "fc-jailed").expect("vmm.json pid");
            // The VMM runs as the uid the ledger holds for this instance (from the
            // range), the VMMs' gid, as init of a pid namespace of its own.
            let uid: u32 = store
                .resources()
                .unwrap()
                .iter()
                .find(|r| r.kind == "uid" && r.instance_id == "fc-jailed")
                .expect("a uid row for the instance")
                .name
                .parse()
                .unwrap();
            assert!((JAIL_UID..JAIL_UID + 16).contains(&uid), "{uid}");
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
            let field = |name: &str| -> Vec<String> {
                status
                    .lines()
                    .find_map(|l| l.strip_prefix(name))
                    .unwrap_or_default()
                    .split_whitespace()
                    .map(str::to_string)
                    .collect()
            };
            assert_eq!(field("Uid:"), vec![uid.to_string(); 4], "{status}");
            assert_eq!(field("Gid:"), vec![JAIL_GID.to_string(); 4], "{status}");
            assert_eq!(field("Groups:"), Vec::<String>::new(), "{status}");
            assert_eq!(
                field("NSpid:"),
                vec![pid.to_string(), "1".to_string()],
                "Firecracker is not init of its own pid namespace: {status}"
            );
            assert_ne!(
                std::fs::read_link(format!("/proc/{pid}/ns/pid")).unwrap(),
                std::fs::read_link("/proc/self/ns/pid").unwrap()
            );
            // The shared kernel, initramfs and root disk are linked in root's, readable
            // by the VMMs' group, writable by no one but root; the VMM cannot open
            // them for writing (it could rewrite every tenant's kernel and disks).
            use std::os::unix::fs::MetadataExt;
            let kernel_name = rig
                .kernel
                .file_name()
                .unwrap()
                .to_str()
                .unwrap()
                .to_string();
            let initramfs_name = rig
                .initramfs
                .file_name()
                .unwrap()
                .to_str()
                .unwrap()
                .to_string();
            let root_disk = std::fs::read_dir(&root)
                .unwrap()
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .find(|n| n.ends_with(".ext4") && n != "scratch.ext4")
                .expect("a root disk in the jail");
            for name in [&kernel_name, &initramfs_name, &root_disk] {
                let m = std::fs::metadata(root.join(name)).unwrap();
                assert_eq!(m.uid(), 0, "{name} was given to the VMM's uid");
                assert_eq!(
                    m.mode() & 0o022,
                    0,
                    "{name} is writable by others: {:o}",
                    m.mode()
                );
                assert!(
                    m.mode() & 0o004 != 0 || (m.gid() == JAIL_GID && m.mode() & 0o040 != 0),
                    "{name} is not readable by the VMMs' group: {:o}",
                    m.mode()
                );
                assert_eq!(
                    as_jailed_vmm(&root, uid, JAIL_GID, Probe::OpenForWrite(name)),
                    Err(libc::EACCES),
                    "the VMM's uid could open /{name} for writing"
                );
            }
            for name in [&kernel_name, &root_disk] {
                assert_eq!(
                    as_jailed_vmm(&root, uid, JAIL_GID, Probe::OpenForRead(name)),
                    Ok(()),
                    "the VMM's uid cannot read /{name}"
                );
            }
            let scratch = std::fs::metadata(root.join("scratch.ext4")).unwrap();
            assert_eq!((scratch.uid(), scratch.mode() & 0o777), (uid, 0o600));
            let cg = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
            let dirs = cgroups.dirs("fc-jailed");
            assert!(
                !dirs.is_empty(),
                "no cgroup hierarchy detected: {cgroups:?}"
            );
            assert!(
                cg.contains("/plfm-firecracker/fc-jailed"),
                "VMM not in its cgroup: {cg}"
            );
            // Guest memory 256 MiB + 64 MiB for the VMM; weight 100 (cpu_request 1).
            let limit = 320u64 << 20;
            match &cgroups {
                plfm_node_agent::runtime::firecracker::process::JailerCgroups::V1 { .. } => {
                    let mem =
                        std::fs::read_to_string(dirs[0].join("memory.limit_in_bytes")).unwrap();
                    assert_eq!(mem.trim().parse::<u64>().unwrap(), limit);
                    let shares = std::fs::read_to_string(dirs[1].join("cpu.shares")).unwrap();
                    assert_eq!(shares.trim(), "1024");
                    let pids = std::fs::read_to_string(dirs[2].join("pids.max")).unwrap();
                    assert_eq!(pids.trim(), VMM_PIDS_MAX.to_string());
                }
                plfm_node_agent::runtime::firecracker::process::JailerCgroups::V2 { .. } => {
                    let mem = std::fs::read_to_string(dirs[0].join("memory.max")).unwrap();
                    assert_eq!(mem.trim().parse::<u64>().unwrap(), limit);
                    let pids = std::fs::read_to_string(dirs[0].join("pids.max")).unwrap();
                    assert_eq!(pids.trim(), VMM_PIDS_MAX.to_string());
                }
                other => panic!("{other:?}"),
            }
            // A restarted agent adopts the jailed VMM and keeps its cgroups, but removes
            // the jailer groups no VMM owns (a crash between spawn and record).
            let leftover = cgroups.dirs("fc-leftover");
            for d in &leftover {
                std::fs::create_dir_all(d).unwrap();
            }
            let (rt2, _) = rig.runtime(rig.config(true, 30));
            let adopted = rt2.recover().await.expect("recover");
            assert_eq!(adopted.len(), 1, "{adopted:?}");
            assert_eq!(adopted[0].instance_id, id);
            for d in &leftover {
                assert!(!d.exists(), "orphan cgroup {} kept", d.display());
            }
            for d in &dirs {
                assert!(
                    d.exists(),
                    "the adopted VMM's cgroup {} was removed",
                    d.display()
                );
            }
            assert!(alive(pid));
            // The tap is the VMM uid's to open (it runs without CAP_NET_ADMIN).
            let tap = plfm_node_agent::network::tap_name("fc-jailed");
            let link = run("ip", &["-d", "link", "show", "dev", &tap]);
            assert!(
                link.contains(&format!("user {uid} group {JAIL_GID}")),
                "{link}"
            );
            // The guest listener the agent bound (as root) is reachable by the jailed
            // VMM's uid, also after the adoption bound it again.
            assert_eq!(
                as_jailed_vmm(&root, uid, JAIL_GID, Probe::Connect("v.sock_5161")),
                Ok(()),
                "the jailed VMM cannot reach its guest listener"
            );
            // A uid that is not this VMM's (another instance's) cannot.
            assert_eq!(
                as_jailed_vmm(&root, uid + 1, JAIL_GID, Probe::Connect("v.sock_5161")),
                Err(libc::EACCES)
            );
            let out = rt.stop(&vm, Duration::from_secs(2)).await;
            assert!(!out.graceful);
            assert!(!alive(pid));
            let log = fc_log(&rig, "fc-jailed", true);
            assert!(
                !log.contains("Received Error"),
                "an API call was refused:\n{log}"
            );
            rt.cleanup(&id).await.expect("cleanup");
            assert_nothing_left(&rig, &store, "fc-jailed", &dirs);
        },
    );
}

/// What [`as_jailed_vmm`] tries inside the jail.
#[derive(Clone, Copy)]
enum Probe<'a> {
    OpenForWrite(&'a str),
    OpenForRead(&'a str),
    Connect(&'a str),
}

/// Tries `probe` (a file name under the jail's root) as a process chrooted into `root`
/// with `uid` and `gid` and no supplementary groups, as a jailed VMM would: `Ok` or
/// the errno. The probe runs in the forked child before `exec` (only system calls, no
/// allocation); on success the child execs the jail's own copy of Firecracker with
/// `--version`.
fn as_jailed_vmm(root: &Path, uid: u32, gid: u32, probe: Probe<'_>) -> Result<(), i32> {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::process::CommandExt;
    let c = |b: &[u8]| std::ffi::CString::new(b).unwrap();
    let root_c = c(root.as_os_str().as_bytes());
    let (kind, name) = match probe {
        Probe::OpenForWrite(n) => (0, n),
        Probe::OpenForRead(n) => (1, n),
        Probe::Connect(n) => (2, n),
    };
    let path = c(format!("/{name}").as_bytes());
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, s) in addr.sun_path.iter_mut().zip(path.as_bytes()) {
        *d = *s as libc::c_char;
    }
    let mut cmd = std::process::Command::new("/firecracker");
    cmd.arg("--version")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    // SAFETY: the closure runs in the forked child and makes only async-signal-safe
    // system calls on data prepared before the fork; errors are returned as raw
    // errnos (no allocation).
    unsafe {
        cmd.pre_exec(move || {
            let err = || std::io::Error::last_os_error();
            if libc::chroot(root_c.as_ptr()) != 0 || libc::chdir(c"/".as_ptr()) != 0 {
                return Err(err());
            }
            if libc::setgroups(0, std::ptr::null()) != 0
                || libc::setgid(gid) != 0
                || libc::setuid(uid) != 0
            {
                return Err(err());
            }
            match kind {
                0 | 1 => {
                    let flags = if kind == 0 {
                        libc::O_WRONLY
                    } else {
                        libc::O_RDONLY
                    };
                    let fd = libc::open(path.as_ptr(), flags | libc::O_CLOEXEC);
                    if fd < 0 {
                        return Err(err());
                    }
                    libc::close(fd);
                }
                _ => {
                    let fd = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
                    if fd < 0 {
                        return Err(err());
                    }
                    let r = libc::connect(
                        fd,
                        (&addr as *const libc::sockaddr_un).cast(),
                        std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
                    );
                    if r != 0 {
                        return Err(err());
                    }
                    libc::close(fd);
                }
            }
            Ok(())
        });
    }
    match cmd.spawn() {
        Ok(mut child) => {
            let st = child.wait().unwrap();
            assert!(st.success(), "/firecracker --version in the jail: {st}");
            Ok(())
        }
        Err(e) => Err(e.raw_os_error().expect("an errno from the probe")),
    }
}

/// A kernel Firecracker cannot load: `InstanceStart` is refused and the failure says
/// what Firecracker said; nothing is left.
#[test]
fn real_firecracker_refusing_its_kernel_fails_the_start_with_its_own_words() {
    in_netns(
        "real_firecracker_refusing_its_kernel_fails_the_start_with_its_own_words",
        |rig| async move {
            let bad = rig.path("not-a-kernel");
            std::fs::write(&bad, b"this is not an ELF kernel").unwrap();
            let config = FirecrackerConfig {
                kernel: bad,
                ..rig.config(false, 5)
            };
            let (rt, store) = rig.runtime(config);
            let id = InstanceId::parse("fc-badkernel").unwrap();
            let w = rig.workload("fc-badkernel", "fd00::9:3");
            rt.prepare(&id, &w).await.expect("prepare");
            let err = rt
                .start(&id, &w, boot("b1"))
                .await
                .expect_err("a bad kernel must fail");
            let RuntimeError::VmmStart(_) = &err else {
                panic!("{err:?}")
            };
            let msg = err.to_string();
            assert!(
                msg.contains("InstanceStart") || msg.contains("/actions"),
                "{msg}"
            );
            assert!(msg.to_lowercase().contains("kernel"), "{msg}");
            rt.cleanup(&id).await.expect("cleanup");
            assert_nothing_left(&rig, &store, "fc-badkernel", &[]);
        },
    );
}

/// The agent binary with the real Firecracker, standalone, for instance `id`.
fn spawn_agent(rig: &Rig, id: &str, ipv6: &str, handshake_secs: u64) -> AgentProcess {
    std::fs::create_dir_all(rig.path("desired")).unwrap();
    std::fs::write(
        rig.path(&format!("desired/{id}.json")),
        serde_json::to_vec(&rig.assignment(id, ipv6)).unwrap(),
    )
    .unwrap();
    let cfg = format!(
        r#"node_id = "fc-real-node"
data_dir = "data"
[log]
level = "info,plfm_node_agent=debug"
[api]
listen = "127.0.0.1:{}"
[control_plane]
mode = "standalone"
desired_dir = "desired"
rescan_interval_ms = 200
[runtime]
kind = "firecracker"
[runtime.firecracker]
sandbox = false
binary = {:?}
kernel = {:?}
initramfs = {:?}
boot_timeout = {handshake_secs}
{}"#,
        common::free_port(),
        shared_bin("firecracker").display().to_string(),
        rig.kernel.display().to_string(),
        rig.initramfs.display().to_string(),
        rig.cgroup
            .as_ref()
            .map(|(rel, _)| format!("cgroup_parent = {rel:?}\n"))
            .unwrap_or_default(),
    );
    let config = rig.path("agent.toml");
    std::fs::write(&config, cfg).unwrap();
    AgentProcess::spawn(&config, &rig.path("agent.log"))
}

/// Waits until the agent shows instance `id` with `status`.
fn wait_status(agent: &AgentProcess, id: &str, status: Status, within: Duration) -> InstanceView {
    poll_until(&format!("{id} {status}"), within, || {
        agent.instance_where(|v| v.instance_id == id && v.status == status)
    })
}

/// `kill -9` of the agent while the real VMM boots: the VMM survives, the next agent
/// adopts the same process (pid and start time, no second VMM, no new report), and an
/// operator stop then kills it and leaves nothing.
#[test]
fn agent_killed_while_the_real_vmm_boots_adopts_it_and_stops_it_cleanly() {
    in_netns(
        "agent_killed_while_the_real_vmm_boots_adopts_it_and_stops_it_cleanly",
        |rig| async move {
            let mut agent = spawn_agent(&rig, "fc-adopt", "fd00::9:4", 120);
            let data = rig.path("data");
            let before = wait_status(&agent, "fc-adopt", Status::Booting, Duration::from_secs(60));
            // `booting` is reported just before the VMM is spawned and recorded.
            let pid = poll_until(
                "vmm.json with the VMM's pid",
                Duration::from_secs(30),
                || recorded_pid(&data, "fc-adopt").ok_or("not recorded yet"),
            );
            let api = ApiClient::new(
                &data.join("instances/fc-adopt/api.sock"),
                Duration::from_secs(5),
            );
            // `booting` is reported as the VMM starts: wait for InstanceStart.
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            loop {
                match api.instance_info().await {
                    Ok(info) if info.state == "Running" => break,
                    other => assert!(
                        std::time::Instant::now() < deadline,
                        "the VMM never ran: {other:?}\n{}",
                        agent.log()
                    ),
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            agent.kill9();
            assert!(alive(pid), "the VMM died with the agent");
            let agent = AgentProcess::spawn(&rig.path("agent.toml"), &rig.path("agent.log"));
            wait_until("the running VMM adopted", Duration::from_secs(30), || {
                agent.log().contains("adopted")
            });
            let v = wait_status(&agent, "fc-adopt", Status::Booting, Duration::from_secs(10));
            assert_eq!(
                recorded_pid(&data, "fc-adopt"),
                Some(pid),
                "a new VMM was started"
            );
            assert!(alive(pid));
            let vmms = processes(
                &data
                    .join("instances/fc-adopt/api.sock")
                    .display()
                    .to_string(),
            );
            assert_eq!(vmms, vec![pid], "exactly the adopted VMM runs");
            assert_eq!(
                (v.generation, v.restarts, &v.updated_at),
                (before.generation, before.restarts, &before.updated_at),
                "the adoption changed the instance's status"
            );
            // An operator stop: SendCtrlAltDel, then SIGKILL at the grace deadline.
            let out = agent.cli(&["stop", "fc-adopt"]);
            assert!(out.status.success(), "{out:?}");
            let v = wait_status(&agent, "fc-adopt", Status::Stopped, Duration::from_secs(30));
            assert_eq!(
                v.reason_code,
                Some(ReasonCode::TerminatedByOperator),
                "{v:?}"
            );
            assert!(!alive(pid), "VMM survived the stop");
            drop(agent);
            let store = Store::open(&data.join("state.db")).unwrap();
            assert_nothing_left(&rig, &store, "fc-adopt", &[]);
        },
    );
}

/// With a handshake deadline past Firecracker's own end, the VMM exits by itself
/// (exit code 1, sometimes 0, after the guest's KVM error): `failed` with `firecracker_start_failed`, the
/// VMM's exit and its last log lines in the message, and no `exit_code` (it is the
/// workload's alone).
#[test]
fn real_firecracker_exiting_by_itself_is_failed_with_its_exit_and_log_and_no_exit_code() {
    in_netns(
        "real_firecracker_exiting_by_itself_is_failed_with_its_exit_and_log_and_no_exit_code",
        |rig| async move {
            let agent = spawn_agent(&rig, "fc-exit", "fd00::9:5", 300);
            let v = wait_status(&agent, "fc-exit", Status::Failed, Duration::from_secs(180));
            assert_eq!(
                v.reason_code,
                Some(ReasonCode::FirecrackerStartFailed),
                "{v:?}"
            );
            assert_eq!(v.exit_code, None, "{v:?}");
            let msg = v.error_message.unwrap_or_default();
            assert!(
                msg.contains("VMM exited before the guest handshake"),
                "{msg}"
            );
            // Firecracker 1.16.1 ends with exit code 1 or 0 after the guest's KVM
            // error (both seen here): the message names the code and its log says why.
            assert!(msg.contains("exit code "), "{msg}");
            assert!(msg.contains("KVM_EXIT_INTERNAL_ERROR"), "{msg}");
            assert!(msg.contains("last VMM log lines"), "{msg}");
            drop(agent);
            let store = Store::open(&rig.path("data").join("state.db")).unwrap();
            assert_nothing_left(&rig, &store, "fc-exit", &[]);
        },
    );
}
