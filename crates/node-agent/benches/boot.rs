//! Boot benchmark for the qemu runtime (issue 6, item 4): desired → `ready` for one
//! instance with a warm image cache, split into the agent's share (desired seen →
//! QEMU spawned: root disk lookup, tap + nftables, scratch disk, vhost-device-vsock and
//! QEMU spawn), VMM boot to the guest handshake, workload start and the first HTTP
//! health pass; then N instances (default 10) booted concurrently.
//!
//! Same setup as tests/qemu_runtime.rs: the agent binary in standalone mode, a loopback
//! `docker-registry` with a busybox httpd image, all inside a network namespace this
//! bench creates (re-exec through `ip netns exec`); instance addresses from fd00::/8 and
//! 169.254.0.0/16. The figures come from the agent's JSON log (timestamps of `decided`,
//! `qemu started`, `ready` and the boot split fields of `workload started`).
//!
//! Run (root): `PLFM_GUEST_INIT_BIN=<static plfm-guest-init> cargo bench -p
//! plfm-node-agent --bench boot`. Env: `PLFM_BOOT_BENCH_N` (concurrent instances,
//! default 10), `PLFM_BOOT_BENCH_DEADLINE_S` (deadline of the concurrent run, default
//! 300), `PLFM_BOOT_BENCH_KEEP_LOG` (copy the agent's JSON log there at the end),
//! `PLFM_BOOT_BENCH_DIRECT_CMD` (the listen-at-once workload's argv, split at spaces;
//! default `/bin/httpd -f -p 8080 -h /`).

#[cfg(target_os = "linux")]
#[path = "../tests/common/mod.rs"]
mod common;

#[cfg(target_os = "linux")]
#[path = "../tests/image_support/mod.rs"]
#[allow(unused_imports)]
mod image_support;

#[cfg(target_os = "linux")]
#[path = "../tests/support/vm_host.rs"]
mod vm_host;

#[cfg(not(target_os = "linux"))]
fn main() {
    eprintln!("boot bench: linux only");
}

#[cfg(target_os = "linux")]
fn main() {
    linux::main();
}

#[cfg(target_os = "linux")]
mod linux {
    use std::collections::HashMap;
    use std::path::{Path, PathBuf};
    use std::process::Command;
    use std::time::{Duration, Instant};

    use chrono::{DateTime, Utc};
    use plfm_node_agent::initramfs::{write_initramfs, BuildInitramfsArgs};
    use serde_json::{json, Value};

    use crate::common::agent::AgentProcess;
    use crate::common::wait::{holds, Poll};
    use crate::image_support::{busybox_image, Registry};
    use crate::vm_host::{find_kernel, processes_mentioning, static_guest_init, which};

    const NETNS_ENV: &str = "PLFM_BOOT_BENCH_NETNS";

    /// Kernel, modules and guest init, or the name of what is missing.
    fn prerequisites() -> Result<(PathBuf, PathBuf, PathBuf), String> {
        if !rustix::process::geteuid().is_root() {
            return Err("root (taps, nftables, network namespaces)".into());
        }
        for tool in [
            "qemu-system-x86_64",
            "vhost-device-vsock",
            "docker-registry",
            "mkfs.ext4",
            "nft",
            "ip",
        ] {
            if !which(tool) {
                return Err(tool.into());
            }
        }
        if !Path::new("/bin/busybox").is_file() || !Path::new("/dev/net/tun").exists() {
            return Err("/bin/busybox and /dev/net/tun".into());
        }
        let (kernel, modules) =
            find_kernel().ok_or("a /boot/vmlinuz-*-cloud-amd64 kernel with modules")?;
        let init = static_guest_init().ok_or("static plfm-guest-init")?;
        Ok((kernel, modules, init))
    }

    struct DelNs(String);
    impl Drop for DelNs {
        fn drop(&mut self) {
            let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
        }
    }

    pub fn main() {
        if std::env::var_os(NETNS_ENV).is_some() {
            run();
            return;
        }
        if let Err(what) = prerequisites() {
            eprintln!("boot bench SKIPPED: prerequisite missing: {what}");
            return;
        }
        let ns = format!("plfm-boot{}", std::process::id());
        let ok = Command::new("ip")
            .args(["netns", "add", &ns])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "cannot create network namespace {ns}");
        let _ns = DelNs(ns.clone());
        let up = Command::new("ip")
            .args(["-n", &ns, "link", "set", "lo", "up"])
            .status()
            .is_ok_and(|s| s.success());
        assert!(up, "cannot bring lo up in {ns}");
        let status = Command::new("ip")
            .args(["netns", "exec", &ns])
            .arg(std::env::current_exe().unwrap())
            .env(NETNS_ENV, &ns)
            .status()
            .expect("run the bench inside its network namespace");
        assert!(status.success(), "boot bench failed inside {ns}");
    }

    /// Stops the agent, then kills every QEMU / vhost-device-vsock of this data dir
    /// (the namespace deletion afterwards removes the taps and the nftables table).
    struct Cleanup {
        dir: PathBuf,
        agent: Option<AgentProcess>,
    }

    impl Drop for Cleanup {
        fn drop(&mut self) {
            drop(self.agent.take()); // SIGKILL
                                     // QEMU names the data dir; the sandboxed vhost-device-vsock its jail.
            let jails = self.dir.with_file_name("jails");
            for d in [&self.dir, &jails] {
                for pid in processes_mentioning(&d.display().to_string()) {
                    let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
                }
            }
        }
    }

    const HTTPD_SCRIPT: &str =
        "mkdir -p /www && echo hello-from-the-vm > /www/index.html && exec httpd -f -p 8080 -h /www";

    fn assignment(id: &str, image: &str, n: u32) -> Value {
        json!({"instance_id": id, "generation": 1, "desired_state": "running", "drain_grace_seconds": 10, "workload": {
            "spec_version": "v1",
            "instance_id": id,
            "generation": 1,
            "image": {"ref": image, "resolved_digest": image.rsplit('@').next().unwrap(), "os": "linux", "arch": "amd64"},
            "command": ["/bin/sh", "-c", HTTPD_SCRIPT],
            "resources": {"cpu_request": 1.0, "memory_limit_bytes": 256i64 << 20, "ephemeral_disk_bytes": 64i64 << 20, "vcpu_count": 1},
            "network": {"overlay_ipv6": format!("fd00::{:x}", 0x10 + n), "gateway_ipv6": "fe80::1", "mtu": 1400},
            "lifecycle": {"termination_grace_seconds": 10, "restart_policy": "never", "max_retries": 0},
            "health": {"type": "http", "port": 8080, "path": "/", "interval_seconds": 1, "timeout_seconds": 2, "grace_period_seconds": 300, "success_threshold": 1, "failure_threshold": 3}
        }})
    }

    /// One instance's events from the agent log.
    #[derive(Default, Debug, Clone)]
    struct Boot {
        decided: Option<DateTime<Utc>>,
        qemu_started: Option<DateTime<Utc>>,
        handshake_ms: Option<u64>,
        workload_ms: Option<u64>,
        guest_init_ms: Option<u64>,
        ready: Option<DateTime<Utc>>,
    }

    fn ms(a: DateTime<Utc>, b: DateTime<Utc>) -> f64 {
        (b - a).num_microseconds().unwrap_or(0) as f64 / 1000.0
    }

    /// Fields drop in order: VMs and agent first, then the registry, then the files.
    struct Bench {
        cleanup: Cleanup,
        _registry: Registry,
        _tmp: tempfile::TempDir,
        root: PathBuf,
        image: String,
    }

    impl Bench {
        fn write(&self, id: &str, n: u32) {
            self.write_value(id, assignment(id, &self.image, n));
        }

        /// A workload that listens at once: `httpd` exec'd directly (no shell), or the
        /// words of `PLFM_BOOT_BENCH_DIRECT_CMD` (it must listen on 8080), with a TCP
        /// health check on its port.
        fn write_direct(&self, id: &str, n: u32) {
            let mut v = assignment(id, &self.image, n);
            let argv: Vec<String> = match std::env::var("PLFM_BOOT_BENCH_DIRECT_CMD") {
                Ok(c) if !c.trim().is_empty() => c.split_whitespace().map(String::from).collect(),
                _ => ["/bin/httpd", "-f", "-p", "8080", "-h", "/"]
                    .map(String::from)
                    .to_vec(),
            };
            v["workload"]["command"] = json!(argv);
            v["workload"]["health"] = json!({"type": "tcp", "port": 8080, "interval_seconds": 1, "timeout_seconds": 2, "grace_period_seconds": 300, "success_threshold": 1, "failure_threshold": 3});
            self.write_value(id, v);
        }

        fn write_value(&self, id: &str, v: Value) {
            let tmp = self.root.join("desired").join(format!(".{id}.tmp"));
            std::fs::write(&tmp, serde_json::to_vec(&v).unwrap()).unwrap();
            std::fs::rename(&tmp, self.root.join("desired").join(format!("{id}.json"))).unwrap();
        }

        /// Per-instance events parsed from the JSON agent log.
        fn boots(&self) -> HashMap<String, Boot> {
            let log = std::fs::read_to_string(self.root.join("agent.log")).unwrap_or_default();
            let mut out: HashMap<String, Boot> = HashMap::new();
            for line in log.lines() {
                let Ok(v) = serde_json::from_str::<Value>(line) else {
                    continue;
                };
                let f = &v["fields"];
                let (Some(id), Some(msg)) = (f["instance"].as_str(), f["message"].as_str()) else {
                    continue;
                };
                let Some(ts) = v["timestamp"]
                    .as_str()
                    .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
                    .map(|t| t.with_timezone(&Utc))
                else {
                    continue;
                };
                let b = out.entry(id.to_string()).or_default();
                match msg {
                    "decided" => {
                        b.decided.get_or_insert(ts);
                    }
                    "qemu started" => {
                        b.qemu_started.get_or_insert(ts);
                    }
                    "guest handshake done after VMM start" => {
                        b.handshake_ms = b.handshake_ms.or(f["handshake_ms"].as_u64());
                    }
                    "workload started" => {
                        b.workload_ms = b.workload_ms.or(f["since_vmm_start_ms"].as_u64());
                        b.guest_init_ms = b.guest_init_ms.or(f["guest_init_ms"].as_u64());
                    }
                    "ready" => {
                        b.ready.get_or_insert(ts);
                    }
                    _ => {}
                }
            }
            out
        }

        /// The boots once every one of `ids` is ready, or as they are after `within`.
        fn wait_ready(&self, ids: &[String], within: Duration) -> HashMap<String, Boot> {
            let all_ready = || {
                let boots = self.boots();
                let all = ids
                    .iter()
                    .all(|id| boots.get(id).is_some_and(|b| b.ready.is_some()));
                if all {
                    Ok(boots)
                } else {
                    Err(boots)
                }
            };
            Poll::within(within)
                .every(Duration::from_millis(50))
                .try_until(all_ready)
                .unwrap_or_else(|boots| boots)
        }
    }

    fn setup() -> Bench {
        let (kernel, modules, init) = prerequisites().expect("prerequisites checked outside");
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().to_path_buf();
        // Sandboxed VMM uids reach their jails under `jails/` (traversable, not listable).
        std::fs::set_permissions(&root, std::os::unix::fs::PermissionsExt::from_mode(0o711))
            .unwrap();
        std::fs::create_dir_all(root.join("desired")).unwrap();
        let initramfs = root.join("initramfs.img");
        write_initramfs(&BuildInitramfsArgs {
            kernel_modules: Some(modules),
            guest_init: init,
            out: initramfs.clone(),
        })
        .unwrap();
        let registry = Registry::start();
        let (layers, config) = busybox_image();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let pushed = rt.block_on(registry.push("demo/busybox", &layers, &config));
        let image = format!("{}/demo/busybox@{}", registry.addr, pushed.digest.as_str());
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let cfg = format!(
            r#"node_id = "boot-bench-node"
data_dir = "data"
[log]
level = "info,plfm_node_agent=debug"
format = "json"
[api]
listen = "127.0.0.1:{port}"
[control_plane]
mode = "standalone"
desired_dir = "desired"
rescan_interval_ms = 200
[runtime]
kind = "qemu"
[runtime.qemu]
kernel = {:?}
initramfs = {:?}
boot_timeout_seconds = 300
accel = "tcg"
jail_dir = {:?}
# `ip netns exec` mounts a sysfs without the cgroup hierarchies: no host cgroups here.
cgroup = "auto"
[agent]
boot_timeout_seconds = 400
reconcile_interval_ms = 200
"#,
            kernel.display().to_string(),
            initramfs.display().to_string(),
            root.join("jails").display().to_string()
        );
        std::fs::write(root.join("agent.toml"), cfg).unwrap();
        let agent = AgentProcess::spawn(&root.join("agent.toml"), &root.join("agent.log"));
        Bench {
            cleanup: Cleanup {
                dir: root.join("data"),
                agent: Some(agent),
            },
            root,
            _tmp: tmp,
            _registry: registry,
            image,
        }
    }

    fn print_one(id: &str, b: &Boot) -> Option<f64> {
        let (d, q, r) = (b.decided?, b.qemu_started?, b.ready?);
        let agent = ms(d, q);
        let handshake = b.handshake_ms? as f64;
        let workload = b.workload_ms? as f64;
        let to_ready = ms(q, r);
        println!(
            "{id}: agent (desired seen → QEMU spawned: root disk, tap, nft, scratch disk, vhost + qemu spawn) {agent:.1} ms | \
             VMM boot to guest handshake {handshake:.0} ms (guest init at {} ms) | workload start +{:.0} ms | \
             first health pass +{:.0} ms | total desired → ready {:.0} ms",
            b.guest_init_ms.map_or("?".into(), |v| v.to_string()),
            workload - handshake,
            to_ready - workload,
            ms(d, r)
        );
        Some(agent)
    }

    /// Creation times (statx birth time) of the files in an instance's directory,
    /// relative to `from`: where the agent's share goes (scratch disk, vhost-device-vsock
    /// spawn = vhost.log, QEMU spawn = qemu.log, ...).
    fn file_split(dir: &Path, from: DateTime<Utc>) -> String {
        let mut files: Vec<(f64, String)> = std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let born: DateTime<Utc> = e.metadata().ok()?.created().ok()?.into();
                Some((ms(from, born), e.file_name().to_string_lossy().into_owned()))
            })
            .collect();
        files.sort_by(|a, b| a.0.total_cmp(&b.0));
        files
            .iter()
            .map(|(t, n)| format!("{n} +{t:.1} ms"))
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn run() {
        let n: u32 = std::env::var("PLFM_BOOT_BENCH_N")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(10);
        let deadline = Duration::from_secs(
            std::env::var("PLFM_BOOT_BENCH_DEADLINE_S")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(300),
        );
        let bench = setup();
        let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
        println!("boot bench: qemu runtime, accel = tcg, {cpus} host CPUs");

        // Warm the image cache (pull + unpack + root disk), then remove the instance.
        let t = Instant::now();
        bench.write("warm-0", 0);
        let boots = bench.wait_ready(&["warm-0".into()], Duration::from_secs(300));
        let warm = boots.get("warm-0").cloned().unwrap_or_default();
        assert!(warm.ready.is_some(), "warm-up instance never got ready");
        println!(
            "warm-up (cold image cache) desired → ready: {:.1} s",
            t.elapsed().as_secs_f64()
        );
        std::fs::remove_file(bench.root.join("desired/warm-0.json")).unwrap();
        let dir = bench
            .root
            .join("data/instances/warm-0")
            .display()
            .to_string();
        let _ = Poll::within(Duration::from_secs(60))
            .every(Duration::from_millis(200))
            .try_until(|| holds(processes_mentioning(&dir).is_empty()));

        // One instance, warm cache.
        bench.write("one-1", 1);
        let boots = bench.wait_ready(&["one-1".into()], Duration::from_secs(300));
        println!("\n== one instance (warm image cache) ==");
        let one = boots.get("one-1").cloned().unwrap_or_default();
        match print_one("one-1", &one) {
            Some(a) => println!(
                "agent share {a:.1} ms: {} the 50 ms target",
                if a < 50.0 { "under" } else { "OVER" }
            ),
            None => println!("one-1 did not reach ready: {one:?}"),
        }
        if let Some(d) = one.decided {
            println!(
                "one-1 files created after desired seen: {}",
                file_split(&bench.root.join("data/instances/one-1"), d)
            );
        }
        std::fs::remove_file(bench.root.join("desired/one-1.json")).unwrap();
        let dir = bench
            .root
            .join("data/instances/one-1")
            .display()
            .to_string();
        let _ = Poll::within(Duration::from_secs(60))
            .every(Duration::from_millis(200))
            .try_until(|| holds(processes_mentioning(&dir).is_empty()));

        // One instance whose workload listens at once (issue 17: workload started →
        // ready within 100 ms).
        bench.write_direct("direct-1", 2);
        let boots = bench.wait_ready(&["direct-1".into()], Duration::from_secs(300));
        println!(
            "\n== one instance, a workload that listens at once ({}, exec'd directly, tcp health) ==",
            std::env::var("PLFM_BOOT_BENCH_DIRECT_CMD").unwrap_or_else(|_| "httpd".into())
        );
        let direct = boots.get("direct-1").cloned().unwrap_or_default();
        if print_one("direct-1", &direct).is_none() {
            println!("direct-1 did not reach ready: {direct:?}");
        }
        std::fs::remove_file(bench.root.join("desired/direct-1.json")).unwrap();
        let dir = bench
            .root
            .join("data/instances/direct-1")
            .display()
            .to_string();
        let _ = Poll::within(Duration::from_secs(60))
            .every(Duration::from_millis(200))
            .try_until(|| holds(processes_mentioning(&dir).is_empty()));

        // N instances at once.
        println!("\n== {n} instances concurrently (deadline {deadline:?}) ==");
        let ids: Vec<String> = (0..n).map(|i| format!("con-{i}")).collect();
        let written = Utc::now();
        let t = Instant::now();
        for (i, id) in ids.iter().enumerate() {
            bench.write(id, 2 + i as u32);
        }
        let boots = bench.wait_ready(&ids, deadline);
        let waited = t.elapsed();
        let mut agents = Vec::new();
        let mut last_ready = None;
        for id in &ids {
            let b = boots.get(id).cloned().unwrap_or_default();
            if let Some(a) = print_one(id, &b) {
                agents.push(a);
            } else {
                println!("{id}: not ready within the deadline: {b:?}");
            }
            if let Some(r) = b.ready {
                last_ready = last_ready.max(Some(r));
            }
        }
        println!(
            "{} of {n} ready; {}",
            agents.len(),
            match (agents.len() == n as usize, last_ready) {
                (true, Some(r)) => format!(
                    "desired written → all ready {:.1} s",
                    ms(written, r) / 1000.0
                ),
                _ => format!("stopped waiting after {:.1} s", waited.as_secs_f64()),
            }
        );
        if !agents.is_empty() {
            agents.sort_by(f64::total_cmp);
            let mean = agents.iter().sum::<f64>() / agents.len() as f64;
            println!(
                "agent share per instance: mean {mean:.1} ms, median {:.1} ms, max {:.1} ms ({} the 50 ms target)",
                agents[agents.len() / 2],
                agents[agents.len() - 1],
                if mean < 50.0 { "mean under" } else { "mean OVER" }
            );
        }
        if let Ok(keep) = std::env::var("PLFM_BOOT_BENCH_KEEP_LOG") {
            match std::fs::copy(bench.root.join("agent.log"), &keep) {
                Ok(_) => println!("agent log kept in {keep}"),
                Err(e) => println!("cannot keep the agent log in {keep}: {e}"),
            }
        }
        drop(bench.cleanup);
    }
}
