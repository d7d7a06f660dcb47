//! The Firecracker runtime with its real host resources ([`LocalHost`]: root disk from a
//! real registry on loopback, scratch disk, volumes, tap, addresses and nftables rules
//! through the host module it shares with the qemu runtime), driving the stand-in
//! `firecracker` (a TEST DOUBLE under tests/fc_standin/). No real VMM can run here, so
//! the guest side is the stand-in's; everything host-side is real.
//!
//! The test re-runs itself inside a fresh network namespace, so taps and rules live
//! there; addresses come from fd00::/8 and 169.254.0.0/16. Prerequisites: root, `ip`,
//! `nft`, docker-registry, e2fsprogs, /bin/busybox (a missing one skips, or fails with
//! `PLFM_REQUIRE_SYSTEM_TESTS=1`).

#![cfg(target_os = "linux")]

mod common;
mod fc_standin;
mod image_support;
#[path = "support/vm_host.rs"]
mod vm_host;

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use fc_standin::FcEnv;
use image_support::{config_json, Registry, GZIP};
use plfm_node_agent::image::testtar::{Layer, TarEntry};
use plfm_node_agent::image::ImageService;
use plfm_node_agent::runtime::firecracker::{FirecrackerRuntime, LocalHost};
use plfm_node_agent::runtime::{BootContext, Runtime, VmEvent};
use plfm_node_agent::spec::{HealthKind, HealthSpec, InstanceId};
use plfm_node_agent::state::Store;

const NETNS_ENV: &str = "PLFM_FC_HOST_TEST_NETNS";

fn prerequisites(test: &str) -> bool {
    let mut missing = Vec::new();
    if !rustix::process::geteuid().is_root() {
        missing.push("root (taps, nftables, network namespaces)".to_string());
    }
    for tool in ["ip", "nft"] {
        if !vm_host::which(tool) {
            missing.push(format!("{tool} (Debian packages iproute2, nftables)"));
        }
    }
    if !missing.is_empty() {
        common::gate::skip_or_fail(&format!("{test}: {}", missing.join(", ")));
        return false;
    }
    image_support::prerequisites(test)
}

fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).output().expect(cmd);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `body` inside the test's own network namespace (re-running the test there).
fn in_netns<F: std::future::Future<Output = ()>>(
    test: &str,
    modes: &str,
    body: impl FnOnce(FcEnv) -> F,
) {
    if std::env::var_os(NETNS_ENV).is_none() {
        if prerequisites(test) {
            vm_host::reexec_in_netns(test, NETNS_ENV, "f");
        }
        return;
    }
    let Some(env) = FcEnv::new(modes) else { return };
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(body(env));
}

/// A registry with a one-file image, and the Firecracker runtime with real host
/// resources (`LocalHost`) driving the stand-in VMM.
struct Rig {
    registry: Registry,
    digest: String,
    store: Store,
    runtime: Arc<FirecrackerRuntime>,
}

async fn rig(env: &FcEnv) -> Rig {
    let registry = Registry::start();
    let layer = Layer::new().dir("bin", 0o755).entry(TarEntry::file(
        "bin/app",
        b"#!/bin/sh\nexit 0\n",
        0o755,
    ));
    let image = registry
        .push(
            "fc/app",
            &[(layer.tar_gz(), GZIP)],
            &config_json(&["/bin/app"], &[], &["PATH=/bin"]),
        )
        .await;
    let digest = image.digest.as_str().to_string();
    let data = env.data_dir();
    std::fs::create_dir_all(&data).unwrap();
    let store = Store::open(&data.join("state.db")).unwrap();
    let images = ImageService::open(&data, registry.image_config()).unwrap();
    // This test runs under `ip netns exec`, which mounts a fresh /sys without the cgroup
    // hierarchies; it is about host networking and disks, so the VMM may run without
    // host cgroups (the explicit opt-out).
    let config = plfm_node_agent::runtime::firecracker::FirecrackerConfig {
        cgroup: plfm_node_agent::cgroup::CgroupMode::Auto,
        ..env.config(5)
    };
    let host = LocalHost::new(&data, Some(images), store.clone(), &config).unwrap();
    let runtime = Arc::new(FirecrackerRuntime::new(
        config,
        &data,
        Some(store.clone()),
        Arc::new(host),
    ));
    Rig {
        registry,
        digest,
        store,
        runtime,
    }
}

impl Rig {
    fn assignment(&self, id: &str, ipv6: &str, policy: &str) -> serde_json::Value {
        let digest = &self.digest;
        serde_json::json!({
            "instance_id": id, "generation": 1, "desired_state": "running",
            "workload": {
                "spec_version": "v1", "instance_id": id, "generation": 1,
                "image": {"ref": format!("{}/fc/app@{digest}", self.registry.addr),
                          "digest": digest, "resolved_digest": digest},
                "resources": {"cpu_request": 1.0, "memory_limit_bytes": 268435456_i64,
                              "ephemeral_disk_bytes": 67108864_i64},
                "network": {"overlay_ipv6": ipv6, "gateway_ipv6": "fe80::1", "mtu": 1400},
                "mounts": [{"volume_id": "vol-n", "mount_path": "/data", "read_only": false, "filesystem": "ext4"}],
                "lifecycle": {"termination_grace_seconds": 2, "restart_policy": policy, "max_retries": 5}
            }
        })
    }
}

#[test]
fn local_host_gives_the_vmm_a_real_tap_addresses_rules_and_http_probes_and_cleanup_removes_them() {
    in_netns(
        "local_host_gives_the_vmm_a_real_tap_addresses_rules_and_http_probes_and_cleanup_removes_them",
        "run",
        body,
    );
}

async fn body(env: FcEnv) {
    let r = rig(&env).await;
    let (store, rt) = (&r.store, &r.runtime);
    let data = env.data_dir();
    let spec = r.assignment("i-net", "fd00::7:1", "never");
    let w = plfm_node_agent::spec::decode_assignment(&spec, "test")
        .unwrap()
        .workload
        .unwrap();
    let id = InstanceId::parse("i-net").unwrap();
    let tap = plfm_node_agent::network::tap_name("i-net");

    rt.prepare(&id, &w)
        .await
        .expect("prepare with real host resources");
    let vm = rt
        .start(
            &id,
            &w,
            BootContext {
                boot_id: "b1".into(),
                secrets: None,
            },
        )
        .await
        .expect("start");
    assert_eq!(
        tokio::time::timeout(Duration::from_secs(10), rt.next_event(&vm))
            .await
            .ok(),
        Some(VmEvent::WorkloadStarted)
    );

    // The VMM was given the instance's tap and a guest MAC.
    let reqs = env.requests();
    let nic = reqs
        .iter()
        .find(|r| r.1 == "/network-interfaces/eth0")
        .and_then(|r| r.2.clone())
        .expect("PUT /network-interfaces/eth0");
    assert_eq!(nic["host_dev_name"], tap.as_str());
    // The tap is real: MTU, fe80::1, the host end of the IPv4 /30, a /128 route.
    let link = run("ip", &["-o", "link", "show", "dev", &tap]);
    assert!(link.contains("mtu 1400"), "{link}");
    let addrs = run("ip", &["-o", "addr", "show", "dev", &tap]);
    assert!(addrs.contains("fe80::1/64"), "{addrs}");
    let host_v4 = addrs
        .split_whitespace()
        .find(|w| w.starts_with("169.254.") && w.ends_with("/30"))
        .unwrap_or_else(|| panic!("no IPv4 /30 on {tap}: {addrs}"))
        .trim_end_matches("/30")
        .to_string();
    let routes = run("ip", &["-6", "route", "show", "dev", &tap]);
    assert!(routes.contains("fd00::7:1"), "{routes}");
    let rules = run("nft", &["list", "table", "inet", "plfm"]);
    assert!(rules.contains(&format!("chain {tap}")), "{rules}");
    // The ledger shows the tap with its addresses (what `status --json` shows).
    let rows = store.resources().unwrap();
    let tap_row = rows
        .iter()
        .find(|r| r.kind == "tap" && r.instance_id == "i-net")
        .expect("tap row");
    assert_eq!(tap_row.name, tap);
    let detail: serde_json::Value =
        serde_json::from_str(tap_row.detail.as_deref().unwrap()).unwrap();
    assert_eq!(detail["ipv6"], "fd00::7:1");
    let guest_v4 = detail["ipv4"].as_str().unwrap().to_string();
    let host_octets: Vec<u8> = host_v4.split('.').map(|o| o.parse().unwrap()).collect();
    let guest_octets: Vec<u8> = guest_v4.split('.').map(|o| o.parse().unwrap()).collect();
    assert_eq!(
        guest_octets[3],
        host_octets[3] + 1,
        "{host_v4} / {guest_v4}"
    );
    // Scratch disk and volume are real ext4 files.
    let scratch = data.join("instances/i-net/scratch.ext4");
    assert_eq!(std::fs::metadata(&scratch).unwrap().len(), 64 << 20);
    assert!(data.join("volumes/vol-n.ext4").is_file());

    // HTTP health probes go to the guest's IPv4 link address (nothing listens: the
    // stand-in plays no network, so the probe fails naming what it tried).
    let check = HealthSpec {
        kind: HealthKind::Http,
        port: 8080,
        path: Some("/healthz".into()),
        interval_seconds: 1,
        timeout_seconds: 1,
        grace_period_seconds: 0,
        success_threshold: 1,
        failure_threshold: 1,
    };
    let err = rt.probe_health(&vm, &check).await.unwrap_err();
    assert!(
        err.contains(&format!("http GET /healthz on {guest_v4}:8080")),
        "{err}"
    );

    let out = rt.stop(&vm, Duration::from_secs(3)).await;
    assert!(out.graceful);
    rt.cleanup(&id).await.expect("cleanup");
    assert!(
        run("ip", &["-o", "link", "show"])
            .lines()
            .all(|l| !l.contains(&tap)),
        "tap left behind"
    );
    let rules = run("nft", &["list", "table", "inet", "plfm"]);
    assert!(!rules.contains(&format!("chain {tap}")), "{rules}");
    assert!(!scratch.exists(), "scratch disk left behind");
    assert!(
        data.join("volumes/vol-n.ext4").is_file(),
        "volumes outlive instances"
    );
    assert!(store
        .resources()
        .unwrap()
        .iter()
        .all(|r| r.instance_id != "i-net"));
}

#[test]
fn vmm_exit_before_the_handshake_removes_the_real_tap_rules_and_disk_then_restarts() {
    in_netns(
        "vmm_exit_before_the_handshake_removes_the_real_tap_rules_and_disk_then_restarts",
        "exit_after_start:152",
        exit_body,
    );
}

async fn exit_body(env: FcEnv) {
    use plfm_node_agent::agent::{Node, NodeOptions};
    use plfm_node_agent::instance::Status;
    use plfm_node_agent::status::outbox::LocalSink;

    let r = rig(&env).await;
    let data = env.data_dir();
    let node = Node::start(NodeOptions {
        data_dir: data.clone(),
        runtime: r.runtime.clone(),
        clock: Arc::new(plfm_node_agent::clock::SystemClock::new()),
        secrets: Arc::new(plfm_node_agent::secrets::DirSecrets::new(
            data.join("secrets"),
        )),
        sink: Arc::new(LocalSink),
        boot_timeout: Duration::from_secs(30),
        max_instances: 10,
        metrics: Arc::new(plfm_node_agent::metrics::Metrics::new()),
    })
    .await
    .unwrap();
    let a = plfm_node_agent::spec::decode_assignment(
        &r.assignment("i-crash", "fd00::7:2", "always"),
        "test",
    )
    .unwrap();
    node.supervisor
        .apply(plfm_node_agent::spec::Plan {
            cursor: 1,
            assignments: vec![a],
            rejected: vec![],
        })
        .await;
    let tap = plfm_node_agent::network::tap_name("i-crash");
    let reports = || -> Vec<plfm_node_agent::status::StatusReport> {
        node.store
            .delivered_reports(Some("i-crash"))
            .unwrap()
            .into_iter()
            .map(|(_, _, j)| serde_json::from_str(&j).unwrap())
            .collect()
    };
    // The tap existed for the boot (the VMM was given it).
    fc_standin::wait_until("the VMM configured eth0", Duration::from_secs(30), || {
        env.requests()
            .iter()
            .any(|r| r.1 == "/network-interfaces/eth0")
    })
    .await;
    fc_standin::wait_until("failed report", Duration::from_secs(30), || {
        reports().iter().any(|r| r.status == Status::Failed)
    })
    .await;
    let failed = reports()
        .into_iter()
        .find(|r| r.status == Status::Failed)
        .unwrap();
    assert_eq!(
        failed.reason_code.map(|c| c.as_str()),
        Some("firecracker_start_failed")
    );
    assert!(
        failed
            .error_message
            .as_deref()
            .unwrap_or_default()
            .contains("exit code 152 (bad configuration)"),
        "{failed:?}"
    );
    // Clean-up ran before the failure was reported: no tap, no rules, no scratch
    // disk, no host-resource rows (the restart backs off 1 s first).
    assert!(
        run("ip", &["-o", "link", "show"])
            .lines()
            .all(|l| !l.contains(&tap)),
        "tap left behind after the failure"
    );
    let rules = run("nft", &["list", "table", "inet", "plfm"]);
    assert!(!rules.contains(&format!("chain {tap}")), "{rules}");
    assert!(!data.join("instances/i-crash/scratch.ext4").exists());
    // The restart policy applies: it boots again, with its tap set up again.
    fc_standin::wait_until("second boot", Duration::from_secs(30), || {
        reports()
            .iter()
            .filter(|r| r.status == Status::Booting)
            .count()
            >= 2
    })
    .await;
    node.shutdown(plfm_node_agent::config::ShutdownMode::Drain)
        .await;
    assert!(
        r.store
            .resources()
            .unwrap()
            .iter()
            .all(|row| row.instance_id != "i-crash"
                || row.kind == "volume"
                || row.kind == "process"),
        "{:?}",
        r.store.resources().unwrap()
    );
}

/// Root disks are released with their instance: a node that cycles 50 distinct images
/// through a cache of about 3 disks never holds more than 3 unpinned disks (nor more
/// than 4 in all: 3 plus the one in use), no pin outlives its instance, and after the
/// last instance is removed `image gc` (what `plfm-node-agent image gc` runs) deletes
/// its disk. Real images from a loopback registry, real ext4 disks.
#[test]
fn removed_instances_release_their_root_disks_and_a_cache_of_3_disks_stays_bounded() {
    in_netns(
        "removed_instances_release_their_root_disks_and_a_cache_of_3_disks_stays_bounded",
        "run",
        disks_body,
    );
}

async fn disks_body(env: FcEnv) {
    const IMAGES: usize = 50;
    let registry = Registry::start();
    let mut digests = Vec::new();
    for i in 0..IMAGES {
        let layer = Layer::new().dir("bin", 0o755).entry(TarEntry::file(
            "bin/app",
            format!("#!/bin/sh\necho image {i}\n").as_bytes(),
            0o755,
        ));
        let image = registry
            .push(
                &format!("fc/cycle{i}"),
                &[(layer.tar_gz(), GZIP)],
                &config_json(&["/bin/app"], &[], &["PATH=/bin"]),
            )
            .await;
        digests.push(image.digest.as_str().to_string());
    }
    let assignment = |i: usize| {
        let d = &digests[i];
        let v = serde_json::json!({
            "instance_id": format!("i-cycle-{i}"), "generation": 1, "desired_state": "running",
            "workload": {
                "spec_version": "v1", "instance_id": format!("i-cycle-{i}"), "generation": 1,
                "image": {"ref": format!("{}/fc/cycle{i}@{d}", registry.addr), "digest": d, "resolved_digest": d},
                "resources": {"cpu_request": 1.0, "memory_limit_bytes": 134217728_i64, "ephemeral_disk_bytes": 67108864_i64},
                "network": {"overlay_ipv6": "fd00::8:1", "gateway_ipv6": "fe80::1"}
            }
        });
        plfm_node_agent::spec::decode_assignment(&v, "test")
            .unwrap()
            .workload
            .unwrap()
    };
    // One disk's allocated size, measured on a cache of its own.
    let probe_dir = env.path("probe");
    std::fs::create_dir_all(&probe_dir).unwrap();
    let probe = ImageService::open(&probe_dir, registry.image_config()).unwrap();
    let id0 = InstanceId::parse("probe").unwrap();
    plfm_node_agent::runtime::vmm::rootdisk::prepare(&probe, &id0, &assignment(0))
        .await
        .unwrap();
    let disk = probe.list().unwrap()[0].allocated_bytes;
    assert!(disk > 0);
    // High water (90 %) at 3.2 disks: a fourth disk triggers eviction.
    let mut config = registry.image_config();
    config.cache_max_bytes = (disk as f64 * 3.2 / 0.9) as u64;
    let data = env.data_dir();
    std::fs::create_dir_all(&data).unwrap();
    let store = Store::open(&data.join("state.db")).unwrap();
    let images = ImageService::open(&data, config).unwrap();
    let fc = env.config(5);
    let host = LocalHost::new(&data, Some(images.clone()), store.clone(), &fc).unwrap();
    let rt = FirecrackerRuntime::new(fc, &data, Some(store.clone()), Arc::new(host));
    for (i, digest) in digests.iter().enumerate() {
        let id = InstanceId::parse(&format!("i-cycle-{i}")).unwrap();
        rt.prepare(&id, &assignment(i)).await.expect("prepare");
        let cached = images.list().unwrap();
        let mine = cached
            .iter()
            .find(|c| &c.digest == digest)
            .expect("its disk is cached");
        assert_eq!(mine.refs, 1, "the instance pins its disk");
        rt.cleanup(&id).await.expect("cleanup");
        let cached = images.list().unwrap();
        let pinned: Vec<_> = cached.iter().filter(|c| c.refs > 0).collect();
        assert!(
            pinned.is_empty(),
            "pins outlive their instances: {pinned:?}"
        );
        assert!(
            cached.len() <= 3,
            "after {} images the cache holds {} unpinned disks (limit ~3 disks)",
            i + 1,
            cached.len()
        );
    }
    let last = images.list().unwrap();
    assert!(last.iter().any(|c| c.digest == digests[IMAGES - 1]));
    let report = images.gc_unreferenced().unwrap();
    assert!(report.evicted.contains(&digests[IMAGES - 1]), "{report:?}");
    assert!(images.list().unwrap().is_empty());
    for c in last {
        assert!(!c.path.exists(), "{} left after image gc", c.path.display());
    }
}
