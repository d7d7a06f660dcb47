//! The fixtures of the conformance suite: one [`Kind`] per runtime, and a [`Lab`] per
//! agent run — the agent binary with a config in a temp dir, its desired directory
//! (standalone mode), and for `qemu` and `firecracker` a private network namespace, a
//! loopback registry with the busybox images, and the VMM (QEMU under TCG, or the
//! stand-in Firecracker of `tests/fc_standin/`).
//!
//! A scenario says what its workload does ([`Behaviour`]); the lab turns that into what
//! its runtime understands: a `/bin/sh -c` script in busybox (qemu), a verb the stand-in
//! guest plays (firecracker, see `fake_firecracker.rs`), or a `[runtime.mock.faults]`
//! entry (mock).
//!
//! Network namespaces are per *thread*: libtest runs each test on a thread of its own,
//! and a thread that `unshare`s (or `setns`es into) a namespace takes every process it
//! spawns (agent, registry, `ip`, `nft`, the CLI) and every socket it opens along, while
//! the rest of the test process stays where it was. That lets several tests share one
//! qemu (or stand-in) agent and its registry — [`Lab::shared`] — which `reexec_in_netns`
//! (one process per test) cannot; scenarios that kill or restart the agent get a lab of
//! their own ([`Lab::own`]). Shared labs are torn down when the test process exits
//! (`atexit`): agent, VMMs, registry, temp dir, cgroup parent.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use crate::common::agent::AgentProcess;
use crate::common::gate::skip_or_fail;
use crate::common::wait::Poll;
use crate::image_support::{busybox_image, Registry};
use crate::vm_host;
use plfm_node_agent::state::Store;
use plfm_node_agent::status::view::InstanceView;
use plfm_node_agent::status::StatusReport;
use serde_json::{json, Value};

/// The runtimes under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Mock,
    Qemu,
    /// The `firecracker` runtime driving the stand-in VMM.
    Firecracker,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Mock => "mock",
            Kind::Qemu => "qemu",
            Kind::Firecracker => "firecracker",
        }
    }

    /// Whether this runtime has host networking (tap, addresses, nftables).
    pub fn has_network(self) -> bool {
        self != Kind::Mock
    }

    /// Whether its VMs are real host processes.
    pub fn has_vmm_process(self) -> bool {
        self != Kind::Mock
    }

    /// How long a boot may take (QEMU under TCG on a loaded 2-core machine is slow).
    pub fn boot_within(self) -> Duration {
        match self {
            Kind::Mock => Duration::from_secs(30),
            Kind::Qemu => Duration::from_secs(180),
            Kind::Firecracker => Duration::from_secs(60),
        }
    }
}

/// A scenario this runtime cannot run: says why (in the gate's `SKIP` format) and the
/// test returns. Not a missing prerequisite, so it never fails under
/// `PLFM_REQUIRE_SYSTEM_TESTS=1`.
pub fn unsupported(kind: Kind, why: &str) {
    use std::io::Write;
    let test = std::thread::current()
        .name()
        .map(|n| format!(" {n}"))
        .unwrap_or_default();
    let _ = writeln!(
        std::io::stderr(),
        "SKIP{test}: the {} runtime cannot run this scenario: {why}",
        kind.name()
    );
}

/// What a scenario's workload does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Behaviour {
    /// Runs until stopped; answers HTTP (any path: 200) on `port`.
    Serve(u16),
    /// Runs until stopped; answers nothing.
    Idle,
    /// Exits with this code right after its start.
    Exit(i32),
    /// Is killed by this signal.
    Signal(i32),
    /// Allocates more than the guest has: the guest kernel OOM-kills it.
    Oom,
    /// Ignores SIGTERM (a stop has to kill it); once it does, answers HTTP on `port`
    /// (a health check on it tells when the SIGTERM disposition is in place: under TCG
    /// a drain can otherwise reach the shell before its `trap` ran).
    IgnoreTerm(u16),
    /// Exits 42 when it runs as uid 1000 / gid 1000, else 43 (the image's `User`).
    UserCheck,
}

/// A stable overlay address per instance id (fd00::/8).
pub fn overlay_ipv6(id: &str) -> String {
    let h = id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    format!("fd00::c:{:x}", h as u16)
}

/// A health check of a scenario.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    Http(u16),
    Tcp(u16),
    /// HTTP on a port nothing answers, with a short grace: never passes.
    Never(u16),
}

impl Health {
    fn json(self) -> Value {
        match self {
            Health::Http(port) => {
                json!({"type": "http", "port": port, "path": "/", "interval_seconds": 1, "timeout_seconds": 2, "grace_period_seconds": 300, "success_threshold": 1, "failure_threshold": 3})
            }
            Health::Tcp(port) => {
                json!({"type": "tcp", "port": port, "interval_seconds": 1, "timeout_seconds": 2, "grace_period_seconds": 300, "success_threshold": 1, "failure_threshold": 3})
            }
            Health::Never(port) => {
                json!({"type": "http", "port": port, "path": "/", "interval_seconds": 1, "timeout_seconds": 1, "grace_period_seconds": 0, "success_threshold": 1, "failure_threshold": 3})
            }
        }
    }
}

/// One instance of a scenario.
#[derive(Debug, Clone)]
pub struct Inst {
    pub id: String,
    pub behaviour: Behaviour,
    pub health: Option<Health>,
    /// Secret version bound with `required = true`.
    pub secrets: Option<String>,
    /// Run the image whose config says `User: 1000:1000`.
    pub user_image: bool,
    /// `termination_grace_seconds` and `drain_grace_seconds`.
    pub grace: u64,
    pub desired_state: &'static str,
    /// A `/bin/sh -c` script that replaces the behaviour's command (qemu only).
    pub shell: Option<String>,
    /// Fields merged into `workload.resources`.
    pub resources: Option<Value>,
    /// TCP ports declared in `workload.network.ports` (the only ones other hosts and
    /// guests may open flows to).
    pub ports: Vec<u16>,
}

impl Inst {
    pub fn new(id: &str, behaviour: Behaviour) -> Inst {
        Inst {
            id: id.to_string(),
            behaviour,
            health: None,
            secrets: None,
            user_image: false,
            grace: 10,
            desired_state: "running",
            shell: None,
            resources: None,
            ports: Vec::new(),
        }
    }
    pub fn ports(mut self, ports: &[u16]) -> Inst {
        self.ports = ports.to_vec();
        self
    }
    pub fn resources(mut self, fields: Value) -> Inst {
        self.resources = Some(fields);
        self
    }
    pub fn shell(mut self, script: &str) -> Inst {
        self.shell = Some(script.to_string());
        self
    }
    pub fn health(mut self, h: Health) -> Inst {
        self.health = Some(h);
        self
    }
    pub fn secrets(mut self, version: &str) -> Inst {
        self.secrets = Some(version.to_string());
        self
    }
    pub fn user_image(mut self) -> Inst {
        self.user_image = true;
        self
    }
    pub fn grace(mut self, secs: u64) -> Inst {
        self.grace = secs;
        self
    }
}

// ---------------------------------------------------------------- namespaces

/// Moves the calling thread into a fresh network namespace (lo up); returns it.
fn new_thread_netns() -> File {
    // SAFETY: unshare(2) with a constant flag; affects only the calling thread.
    let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
    assert_eq!(
        rc,
        0,
        "unshare(CLONE_NEWNET): {}",
        std::io::Error::last_os_error()
    );
    let up = Command::new("ip")
        .args(["link", "set", "lo", "up"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(up, "cannot bring lo up in the test's network namespace");
    File::open("/proc/thread-self/ns/net").expect("open the thread's network namespace")
}

/// Moves the calling thread into `ns`.
fn enter_netns(ns: &File) {
    // SAFETY: setns(2) on an open namespace fd; affects only the calling thread.
    let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
}

// ---------------------------------------------------------------- prerequisites

fn which(tool: &str) -> bool {
    vm_host::which(tool)
}

/// The host prerequisites of a runtime: `Err(why)` when one is missing.
pub fn prerequisites(kind: Kind) -> Result<(), String> {
    if kind == Kind::Mock {
        return Ok(());
    }
    if !rustix::process::geteuid().is_root() {
        return Err("root (taps, nftables, network namespaces, image unpacking)".into());
    }
    let mut tools = vec![
        ("docker-registry", "Debian package docker-registry"),
        ("mkfs.ext4", "Debian package e2fsprogs"),
        ("nft", "Debian package nftables"),
        ("ip", "Debian package iproute2"),
    ];
    if kind == Kind::Qemu {
        tools.push(("qemu-system-x86_64", "Debian package qemu-system-x86"));
        tools.push(("vhost-device-vsock", "cargo install vhost-device-vsock"));
    }
    for (tool, pkg) in tools {
        if !which(tool) {
            return Err(format!("{tool} ({pkg})"));
        }
    }
    if !Path::new("/bin/busybox").is_file() || !Path::new("/dev/net/tun").exists() {
        return Err("/bin/busybox (busybox-static) and /dev/net/tun".into());
    }
    if kind == Kind::Qemu {
        qemu_boot_files().map(|_| ())?;
    }
    Ok(())
}

/// Kernel and initramfs for QEMU, built once per test process.
fn qemu_boot_files() -> Result<(PathBuf, PathBuf), String> {
    static FILES: OnceLock<Result<(PathBuf, PathBuf), String>> = OnceLock::new();
    FILES
        .get_or_init(|| {
            let (kernel, modules) = vm_host::find_kernel().ok_or(
                "a /boot/vmlinuz-*-cloud-amd64 kernel with modules (linux-image-cloud-amd64)",
            )?;
            let init = vm_host::static_guest_init()
                .ok_or("static plfm-guest-init (scripts/build-guest-init.sh failed)")?;
            let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("conformance");
            std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
            let out = dir.join(format!("initramfs-{}.img", std::process::id()));
            plfm_node_agent::initramfs::write_initramfs(
                &plfm_node_agent::initramfs::BuildInitramfsArgs {
                    kernel_modules: Some(modules),
                    guest_init: init,
                    out: out.clone(),
                },
            )
            .map_err(|e| format!("cannot build the initramfs: {e}"))?;
            Ok((kernel, out))
        })
        .clone()
}

/// A memory cgroup parent of this lab's own, so one agent's start-up sweep never meets
/// another's groups: (path for `cgroup_parent`, its directory).
fn cgroup_parent(tag: &str) -> Option<(String, PathBuf)> {
    vm_host::test_cgroup_parent(&format!("plfm-conf-{tag}"))
}

// ---------------------------------------------------------------- the lab

/// One agent run: config, data and desired dirs, and (qemu, firecracker) the network
/// namespace, registry and images it uses.
pub struct Lab {
    pub kind: Kind,
    pub root: PathBuf,
    tmp: Option<tempfile::TempDir>,
    netns: Option<File>,
    registry: Option<Registry>,
    /// `host:port/repo@digest` of the busybox image, and of the same with `User 1000:1000`.
    image: String,
    user_image: String,
    fc: Option<crate::fc_standin::FcEnv>,
    cgroup: Option<(String, PathBuf)>,
    /// `[runtime.mock]` lines and faults (written at the agent's start).
    mock_faults: Mutex<BTreeMap<String, String>>,
    mock_stop_ms: Mutex<u64>,
    /// Extra `[runtime.qemu]` lines ([`Lab::qemu_config`]).
    runtime_extra: Mutex<String>,
    /// An `[exec]` table replacing the lab's own ([`Lab::exec_config`]).
    exec_table: Mutex<Option<String>>,
    /// Top-level tables appended to the config ([`Lab::config_tables`]).
    extra_tables: Mutex<String>,
    /// The exec gateway port (plaintext from 127.0.0.1 unless [`Lab::exec_config`]).
    pub exec_port: u16,
    agent: Mutex<Option<Arc<AgentProcess>>>,
    pub shared: bool,
}

static SHARED_QEMU: OnceLock<Result<Arc<Lab>, String>> = OnceLock::new();
static SHARED_FC: OnceLock<Result<Arc<Lab>, String>> = OnceLock::new();

extern "C" fn teardown_shared_labs() {
    for lab in [&SHARED_QEMU, &SHARED_FC] {
        if let Some(Ok(lab)) = lab.get() {
            lab.teardown();
        }
    }
}

impl Lab {
    /// The lab this test process shares among the scenarios of `kind` that neither
    /// restart nor kill the agent (`None`: prerequisite missing, skipped or failed by
    /// the gate). The calling thread joins its network namespace.
    pub fn shared(kind: Kind) -> Option<Arc<Lab>> {
        assert!(
            kind != Kind::Mock,
            "mock scenarios run in labs of their own"
        );
        let cell = if kind == Kind::Qemu {
            &SHARED_QEMU
        } else {
            &SHARED_FC
        };
        let lab = cell.get_or_init(|| {
            prerequisites(kind)?;
            let lab = Lab::build(kind, true, None)?;
            lab.start(&[]);
            // SAFETY: registers a plain extern "C" function.
            unsafe { libc::atexit(teardown_shared_labs) };
            Ok(Arc::new(lab))
        });
        match lab {
            Ok(lab) => {
                if let Some(ns) = &lab.netns {
                    enter_netns(ns);
                }
                Some(lab.clone())
            }
            Err(why) => {
                skip_or_fail(why);
                None
            }
        }
    }

    /// A lab of this test's own (its agent is not started yet: [`Lab::start`]).
    pub fn own(kind: Kind) -> Option<Lab> {
        match prerequisites(kind).and_then(|()| Lab::build(kind, false, None)) {
            Ok(lab) => Some(lab),
            Err(why) => {
                skip_or_fail(&why);
                None
            }
        }
    }

    /// As [`Lab::own`], in the existing network namespace `netns` (a file such as
    /// `/run/netns/<name>`, made by the test: a "host" it wires to others) instead of a
    /// fresh one. The calling thread joins it.
    pub fn own_in(kind: Kind, netns: &Path) -> Option<Lab> {
        assert!(kind.has_network(), "a {} lab has no network", kind.name());
        let ns = File::open(netns).unwrap_or_else(|e| panic!("{}: {e}", netns.display()));
        enter_netns(&ns);
        match prerequisites(kind).and_then(|()| Lab::build(kind, false, Some(ns))) {
            Ok(lab) => Some(lab),
            Err(why) => {
                skip_or_fail(&why);
                None
            }
        }
    }

    /// Moves the calling thread into the lab's network namespace (processes it spawns
    /// and sockets it opens from then on are the lab's).
    pub fn enter(&self) {
        if let Some(ns) = &self.netns {
            enter_netns(ns);
        }
    }

    fn build(kind: Kind, shared: bool, netns: Option<File>) -> Result<Lab, String> {
        let tmp = tempfile::Builder::new()
            .prefix(&format!("conf-{}-", kind.name()))
            .tempdir()
            .map_err(|e| e.to_string())?;
        let root = tmp.path().to_path_buf();
        // Traversable (not listable) by others: the sandboxed VMM uids reach their jails
        // under `jails/`.
        std::fs::set_permissions(&root, std::os::unix::fs::PermissionsExt::from_mode(0o711))
            .map_err(|e| e.to_string())?;
        std::fs::create_dir_all(root.join("desired/secrets")).map_err(|e| e.to_string())?;
        let netns = match netns {
            Some(ns) => Some(ns),
            None => kind.has_network().then(new_thread_netns),
        };
        let (registry, image, user_image) = if kind.has_network() {
            let registry = Registry::start();
            let (layers, config) = busybox_image();
            let mut user_config: Value = serde_json::from_slice(&config).unwrap();
            user_config["config"]["User"] = json!("1000:1000");
            let user_config = serde_json::to_vec(&user_config).unwrap();
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let a = rt.block_on(registry.push("conf/busybox", &layers, &config));
            let b = rt.block_on(registry.push("conf/busybox-user", &layers, &user_config));
            let image = format!("{}/conf/busybox@{}", registry.addr, a.digest.as_str());
            let user_image = format!("{}/conf/busybox-user@{}", registry.addr, b.digest.as_str());
            (Some(registry), image, user_image)
        } else {
            let i = format!("127.0.0.1:9/app@{}", crate::common::DIGEST);
            (None, i.clone(), i)
        };
        let fc = if kind == Kind::Firecracker {
            Some(
                crate::fc_standin::FcEnv::new("run")
                    .ok_or("the firecracker stand-in cannot be built")?,
            )
        } else {
            None
        };
        let tag = root
            .file_name()
            .map(|n| n.to_string_lossy().replace(['.', '-'], ""))
            .unwrap_or_default();
        // qemu and a plain Firecracker put their VMMs in per-instance memory groups.
        let cgroup = matches!(kind, Kind::Qemu | Kind::Firecracker)
            .then(|| cgroup_parent(&tag))
            .flatten();
        Ok(Lab {
            kind,
            root,
            tmp: Some(tmp),
            netns,
            registry,
            image,
            user_image,
            fc,
            cgroup,
            mock_faults: Mutex::new(BTreeMap::new()),
            mock_stop_ms: Mutex::new(50),
            runtime_extra: Mutex::new(String::new()),
            exec_table: Mutex::new(None),
            extra_tables: Mutex::new(String::new()),
            exec_port: crate::common::free_port(),
            agent: Mutex::new(None),
            shared,
        })
    }

    pub fn data(&self) -> PathBuf {
        self.root.join("data")
    }

    pub fn config_path(&self) -> PathBuf {
        self.root.join("agent.toml")
    }

    fn write_config(&self) {
        let port = crate::common::free_port();
        let runtime = match self.kind {
            Kind::Mock => {
                let faults: String = lock(&self.mock_faults)
                    .iter()
                    .map(|(id, f)| format!("{id:?} = {f}\n"))
                    .collect();
                format!(
                    "[runtime]\nkind = \"mock\"\n[runtime.mock]\nprepare_ms = 20\nboot_ms = 200\nstop_ms = {}\n[runtime.mock.faults]\n{faults}",
                    *lock(&self.mock_stop_ms)
                )
            }
            Kind::Qemu => {
                let (kernel, initramfs) = qemu_boot_files().expect("checked by prerequisites");
                let cgroup = self
                    .cgroup
                    .as_ref()
                    .map(|(rel, _)| format!("cgroup_parent = {rel:?}\n"))
                    .unwrap_or_default();
                // A `jail_dir` from the extra lines replaces the lab's own.
                let extra = lock(&self.runtime_extra).clone();
                let jails = if extra.contains("jail_dir") {
                    String::new()
                } else {
                    format!("jail_dir = {:?}\n", self.jail_dir().display().to_string())
                };
                format!(
                    "[runtime]\nkind = \"qemu\"\n[runtime.qemu]\nkernel = {:?}\ninitramfs = {:?}\nboot_timeout_seconds = 150\naccel = \"tcg\"\n{cgroup}{jails}{extra}",
                    kernel.display().to_string(),
                    initramfs.display().to_string(),
                )
            }
            Kind::Firecracker => {
                let fc = self.fc.as_ref().unwrap();
                let cgroup = self
                    .cgroup
                    .as_ref()
                    .map(|(rel, _)| format!("cgroup_parent = {rel:?}\n"))
                    .unwrap_or_default();
                let extra = lock(&self.runtime_extra).clone();
                let sandbox = if extra.contains("sandbox") {
                    ""
                } else {
                    "sandbox = false\n"
                };
                format!(
                    "[runtime]\nkind = \"firecracker\"\n[runtime.firecracker]\n{sandbox}binary = {:?}\nkernel = {:?}\ninitramfs = {:?}\nboot_timeout = 30\n{cgroup}{extra}",
                    fc.binary.display().to_string(),
                    fc.path("vmlinux").display().to_string(),
                    fc.path("initramfs.cpio.gz").display().to_string()
                )
            }
        };
        let cfg = format!(
            r#"node_id = "conformance-{kind}"
data_dir = "data"
[log]
level = "info,plfm_node_agent=debug"
[api]
listen = "127.0.0.1:{port}"
[control_plane]
mode = "standalone"
desired_dir = "desired"
rescan_interval_ms = 200
[agent]
boot_timeout_seconds = 170
reconcile_interval_ms = 200
{exec}
{runtime}
{tables}"#,
            kind = self.kind.name(),
            exec = lock(&self.exec_table).clone().unwrap_or_else(|| format!(
                "[exec]\nlisten = \"127.0.0.1:{}\"\nallow_plaintext_from = [\"127.0.0.1\"]",
                self.exec_port
            )),
            tables = lock(&self.extra_tables).clone(),
        );
        std::fs::write(self.config_path(), cfg).unwrap();
    }

    /// Starts the agent (writes the config first), with `env` set; waits for its API.
    pub fn start(&self, env: &[(&str, &str)]) {
        self.spawn(env);
        self.agent().wait_api(Duration::from_secs(60));
    }

    /// Starts the agent unless it runs (mock faults are added by then).
    pub fn ensure_started(&self) {
        if lock(&self.agent).is_none() {
            self.start(&[]);
        }
    }

    /// Starts the agent without waiting for its API (in the lab's network namespace:
    /// the calling thread joins it).
    pub fn spawn(&self, env: &[(&str, &str)]) {
        self.enter();
        self.write_config();
        let root = self.root.clone();
        let agent =
            AgentProcess::spawn_with(&self.config_path(), &self.root.join("agent.log"), env)
                .diagnose(move || consoles(&root));
        *lock(&self.agent) = Some(Arc::new(agent));
    }

    /// The running agent.
    pub fn agent(&self) -> Arc<AgentProcess> {
        lock(&self.agent)
            .clone()
            .expect("the lab's agent is running")
    }

    /// SIGKILLs the agent (VMMs stay: they are detached).
    pub fn kill_agent(&self) {
        lock(&self.agent).take();
    }

    /// The agent's pid.
    pub fn agent_pid(&self) -> u32 {
        self.agent().pid()
    }

    fn teardown(&self) {
        if let Some(a) = lock(&self.agent).as_ref() {
            // SAFETY: kill(2) of the agent child this lab spawned.
            unsafe { libc::kill(a.pid() as i32, libc::SIGKILL) };
        }
        for pid in vm_host::processes_mentioning(&self.root.display().to_string()) {
            // SAFETY: kill(2) of a process whose command line names this lab's dir.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
        if let Some(r) = &self.registry {
            for pid in vm_host::processes_mentioning(&r.dir.path().display().to_string()) {
                // SAFETY: as above, this lab's registry.
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            }
            let _ = std::fs::remove_dir_all(r.dir.path());
        }
        if let Some(fc) = &self.fc {
            for pid in fc.pids() {
                if crate::fc_standin::standin_alive(pid) {
                    // SAFETY: a stand-in this lab spawned.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
        for dir in self
            .cgroup
            .iter()
            .flat_map(|(_, d)| vm_host::test_cgroup_dirs(d))
        {
            for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    let _ = Poll::within(Duration::from_secs(5))
                        .every(Duration::from_millis(50))
                        .try_until(|| std::fs::remove_dir(e.path()));
                }
            }
            let _ = std::fs::remove_dir(&dir);
        }
        if self.shared {
            let _ = std::fs::remove_dir_all(&self.root);
        }
    }

    // ------------------------------------------------------------ instances

    /// The workload (and mock fault) for `inst` on this runtime; writes its assignment
    /// to the desired dir. Mock faults must be added before [`Lab::start`].
    pub fn add(&self, inst: &Inst) {
        let a = self.assignment(inst);
        self.write_desired(&inst.id, &a);
    }

    /// Replaces the desired state of `inst` (e.g. `draining`).
    pub fn set_desired_state(&self, inst: &Inst, state: &'static str) {
        let mut i = inst.clone();
        i.desired_state = state;
        let a = self.assignment(&i);
        self.write_desired(&inst.id, &a);
    }

    /// Removes `id` from the plan.
    pub fn remove(&self, id: &str) {
        let _ = std::fs::remove_file(self.root.join("desired").join(format!("{id}.json")));
    }

    fn write_desired(&self, id: &str, v: &Value) {
        let dir = self.root.join("desired");
        let tmp = dir.join(format!(".{id}.tmp"));
        std::fs::write(&tmp, serde_json::to_vec(v).unwrap()).unwrap();
        std::fs::rename(&tmp, dir.join(format!("{id}.json"))).unwrap();
    }

    /// Writes secret material for `version` (raw bytes).
    pub fn write_secret(&self, version: &str, bytes: &[u8]) {
        std::fs::write(
            self.root.join(format!("desired/secrets/{version}.env")),
            bytes,
        )
        .unwrap();
    }

    fn command(&self, inst: &Inst) -> Vec<String> {
        let sh = |s: &str| vec!["/bin/sh".to_string(), "-c".to_string(), s.to_string()];
        let v = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        if let Some(script) = &inst.shell {
            assert_eq!(self.kind, Kind::Qemu, "only qemu guests run shell scripts");
            return sh(script);
        }
        match (self.kind, inst.behaviour) {
            (Kind::Mock, _) => v(&["/app"]),
            (Kind::Qemu, Behaviour::Serve(port)) => sh(&format!(
                "mkdir -p /www && echo ok > /www/index.html && exec httpd -f -p {port} -h /www"
            )),
            (Kind::Qemu, Behaviour::Idle) => sh("exec sleep 100000"),
            (Kind::Qemu, Behaviour::Exit(code)) => sh(&format!("echo exiting {code}; exit {code}")),
            (Kind::Qemu, Behaviour::Signal(sig)) => sh(&format!("kill -{sig} $$; sleep 100")),
            (Kind::Qemu, Behaviour::Oom) => sh(
                "for i in 1 2 3 4; do dd if=/dev/zero of=/dev/null bs=64M count=1 & done; wait",
            ),
            (Kind::Qemu, Behaviour::IgnoreTerm(port)) => sh(&format!(
                "trap '' TERM; mkdir -p /www && echo ok > /www/index.html; httpd -f -p {port} -h /www & while true; do sleep 1; done"
            )),
            (Kind::Qemu, Behaviour::UserCheck) => sh(
                "u=$(busybox id -u); g=$(busybox id -g); echo \"uid=$u gid=$g\"; [ \"$u:$g\" = 1000:1000 ] && exit 42; exit 43",
            ),
            (Kind::Firecracker, Behaviour::Serve(port)) => v(&["serve", &port.to_string()]),
            (Kind::Firecracker, Behaviour::Idle) => v(&["idle"]),
            (Kind::Firecracker, Behaviour::Exit(code)) => v(&["exit", &code.to_string()]),
            (Kind::Firecracker, Behaviour::Signal(sig)) => v(&["kill", &sig.to_string()]),
            (Kind::Firecracker, Behaviour::Oom) => v(&["oom"]),
            (Kind::Firecracker, Behaviour::IgnoreTerm(port)) => {
                v(&["ignore-term", &port.to_string()])
            }
            (Kind::Firecracker, Behaviour::UserCheck) => v(&["user-check", "1000", "1000"]),
        }
    }

    fn mock_fault(&self, inst: &Inst) {
        let fault = match (inst.behaviour, inst.health) {
            (_, Some(Health::Never(_))) => Some("{ kind = \"health_fails\" }".to_string()),
            (Behaviour::Exit(code), _) => Some(format!("{{ kind = \"exit\", code = {code} }}")),
            (Behaviour::Oom, _) => Some("{ kind = \"oom\" }".to_string()),
            (Behaviour::IgnoreTerm(_), _) => {
                // The mock's "workload" takes stop_ms to stop: longer than any grace.
                *lock(&self.mock_stop_ms) = 600_000;
                None
            }
            (Behaviour::Signal(_) | Behaviour::UserCheck, _) => {
                panic!("the mock cannot play {:?}", inst.behaviour)
            }
            _ => None,
        };
        if let Some(f) = fault {
            assert!(
                lock(&self.agent).is_none(),
                "mock faults are configuration: add mock instances before the agent starts"
            );
            lock(&self.mock_faults).insert(inst.id.clone(), f);
        }
    }

    fn assignment(&self, inst: &Inst) -> Value {
        if self.kind == Kind::Mock {
            self.mock_fault(inst);
        }
        let image = if inst.user_image {
            &self.user_image
        } else {
            &self.image
        };
        let digest = image.rsplit('@').next().unwrap();
        let ipv6 = overlay_ipv6(&inst.id);
        let memory: i64 = if inst.behaviour == Behaviour::Oom {
            192 << 20
        } else {
            256 << 20
        };
        let mut w = json!({
            "spec_version": "v1",
            "instance_id": inst.id,
            "generation": 1,
            "image": {"ref": image, "resolved_digest": digest, "os": "linux", "arch": "amd64"},
            "command": self.command(inst),
            "resources": {"cpu_request": 1.0, "memory_limit_bytes": memory, "ephemeral_disk_bytes": 64i64 << 20, "vcpu_count": 1},
            "network": {"overlay_ipv6": ipv6, "gateway_ipv6": "fe80::1", "mtu": 1400},
            "lifecycle": {"termination_grace_seconds": inst.grace, "restart_policy": "never", "max_retries": 0}
        });
        if let Some(h) = inst.health {
            w["health"] = h.json();
        }
        if !inst.ports.is_empty() {
            w["network"]["ports"] = inst
                .ports
                .iter()
                .map(|p| json!({"name": format!("p{p}"), "port": p, "protocol": "tcp"}))
                .collect();
        }
        if let Some(Value::Object(fields)) = &inst.resources {
            for (k, v) in fields {
                w["resources"][k] = v.clone();
            }
        }
        if let Some(v) = &inst.secrets {
            w["secrets"] = json!({"required": true, "secret_version_id": v, "mount_path": "/run/secrets/platform.env"});
        }
        json!({"instance_id": inst.id, "generation": 1, "desired_state": inst.desired_state,
               "drain_grace_seconds": inst.grace, "workload": w})
    }

    // ------------------------------------------------------------ observations

    /// Waits until `cond` holds for instance `id` (its view from `status --json`).
    pub fn wait(
        &self,
        id: &str,
        what: &str,
        within: Duration,
        cond: impl Fn(&InstanceView) -> bool,
    ) -> InstanceView {
        let agent = self.agent();
        Poll::within(within)
            .every(Duration::from_millis(200))
            .until(&format!("{id}: {what}"), || {
                agent.instance_where(|v| v.instance_id == id && cond(v))
            })
    }

    /// Waits for `id` to reach `status` (any reason).
    pub fn wait_status(
        &self,
        id: &str,
        status: plfm_node_agent::instance::Status,
        within: Duration,
    ) -> InstanceView {
        self.wait(id, &format!("status {status:?}"), within, |v| {
            v.status == status
        })
    }

    pub fn store(&self) -> Store {
        Store::open(&self.data().join("state.db")).unwrap()
    }

    /// Every report of `id` so far.
    /// The reports of `id` the local sink took, once none of its reports still waits
    /// in the outbox (the API shows a status as soon as it is committed; its delivery
    /// follows a moment later), for 10 s at most.
    pub fn reports(&self, id: &str) -> Vec<StatusReport> {
        let s = self.store();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while s
            .outbox_peek(100_000)
            .unwrap()
            .iter()
            .any(|r| r.instance_id == id)
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let mut out: Vec<StatusReport> = s
            .delivered_reports(Some(id))
            .unwrap()
            .into_iter()
            .map(|(_, _, j)| serde_json::from_str(&j).unwrap())
            .collect();
        out.sort_by_key(|r| r.seq);
        out
    }

    /// The agent log and the VM consoles.
    pub fn log(&self) -> String {
        format!(
            "agent log:\n{}\n{}",
            std::fs::read_to_string(self.root.join("agent.log")).unwrap_or_default(),
            consoles(&self.root)
        )
    }

    /// `<data>/instances/<id>/`, which every VMM process of the instance names.
    pub fn instance_dir(&self, id: &str) -> PathBuf {
        self.data().join("instances").join(id)
    }

    /// Live VMM processes of `id`: QEMU, or the stand-in Firecracker (not
    /// vhost-device-vsock).
    pub fn vmm_pids(&self, id: &str) -> Vec<u32> {
        let needle = format!("{}/", self.instance_dir(id).display());
        let marker = match self.kind {
            Kind::Qemu => "qemu-system",
            Kind::Firecracker => "fake-firecracker",
            Kind::Mock => return Vec::new(),
        };
        vm_host::processes_mentioning(&needle)
            .into_iter()
            .filter(|pid| {
                let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                String::from_utf8_lossy(&cmd).contains(marker)
            })
            .collect()
    }

    /// Every live process naming the instance's directory (VMM, vhost-device-vsock…).
    /// Processes of an instance: those naming its instance dir, and a sandboxed
    /// vhost-device-vsock, which names only the sockets in its jail (under this lab's
    /// `jails/`).
    pub fn processes_of(&self, id: &str) -> Vec<u32> {
        let mut pids =
            vm_host::processes_mentioning(&format!("{}/", self.instance_dir(id).display()));
        let jails = format!("{}/", self.jail_dir().display());
        for p in vm_host::processes_mentioning(&format!("/{id}/vhost.sock")) {
            let cmd = std::fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&cmd).contains(&jails) && !pids.contains(&p) {
                pids.push(p);
            }
        }
        pids
    }

    /// The qemu runtime's `jail_dir` of this lab (inside the lab, so teardown finds
    /// the sandboxed processes by the lab's path).
    pub fn jail_dir(&self) -> PathBuf {
        self.root.join("jails")
    }

    /// Replaces the lab's `[exec]` table (before start); `{port}` is [`Lab::exec_port`].
    pub fn exec_config(&self, table: &str) {
        *lock(&self.exec_table) = Some(table.replace("{port}", &self.exec_port.to_string()));
    }

    /// Appends top-level tables (`[overlay]`, `[network]`…) to the agent's config
    /// (before [`Lab::start`]).
    pub fn config_tables(&self, toml: &str) {
        let mut t = lock(&self.extra_tables);
        t.push('\n');
        t.push_str(toml);
    }

    /// Adds lines to the `[runtime.qemu]` table of the agent's config (before start).
    pub fn qemu_config(&self, lines: &str) {
        assert_eq!(self.kind, Kind::Qemu);
        lock(&self.runtime_extra).push_str(lines);
    }

    /// Adds lines to the agent's `[runtime.firecracker]` table (before [`Lab::start`]);
    /// a `sandbox` line replaces the lab's `sandbox = false` (the stand-in runs unjailed).
    pub fn firecracker_config(&self, lines: &str) {
        assert_eq!(self.kind, Kind::Firecracker);
        lock(&self.runtime_extra).push_str(lines);
    }

    /// What identifies the running VM of `id`: `pid:start time` of its VMM process, or
    /// (mock) the boot id in its record.
    pub fn vm_identity(&self, id: &str) -> Option<String> {
        if self.kind == Kind::Mock {
            let rec = std::fs::read(self.instance_dir(id).join("mock-vm.json")).ok()?;
            let v: Value = serde_json::from_slice(&rec).ok()?;
            return v["boot_id"].as_str().map(str::to_string);
        }
        let pids = self.vmm_pids(id);
        let [pid] = pids[..] else { return None };
        Some(format!("{pid}:{}", start_time(pid)?))
    }

    /// The address the host reaches the guest's services on: its IPv4 link address from
    /// the local API.
    pub fn guest_ipv4(&self, id: &str) -> Option<String> {
        self.agent()
            .instances()?
            .into_iter()
            .find(|v| v.instance_id == id)?
            .addresses?
            .ipv4
    }

    /// Turns on IPv4 and IPv6 forwarding in the lab's network namespace (this thread
    /// is in it), as on a node that routes its guests' overlay traffic.
    pub fn enable_forwarding(&self) {
        for key in ["ipv4/ip_forward", "ipv6/conf/all/forwarding"] {
            let path = format!("/proc/sys/net/{key}");
            std::fs::write(&path, "1").unwrap_or_else(|e| panic!("{path}: {e}"));
        }
    }

    /// `ip` / `nft` output (this thread's namespace).
    pub fn run(cmd: &str, args: &[&str]) -> (bool, String) {
        match Command::new(cmd).args(args).output() {
            Ok(o) => (
                o.status.success(),
                String::from_utf8_lossy(&o.stdout).into_owned(),
            ),
            Err(e) => (false, e.to_string()),
        }
    }

    /// Recorded stand-in events (firecracker).
    pub fn standin_lines(&self) -> Vec<String> {
        self.fc.as_ref().map(|f| f.lines()).unwrap_or_default()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if !self.shared {
            self.kill_agent();
            self.teardown();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Field 22 of `/proc/<pid>/stat` (start time in clock ticks), for a live process.
pub fn start_time(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = s.rsplit(')').next()?;
    let mut f = rest.split_whitespace();
    if f.next()? == "Z" {
        return None;
    }
    f.nth(18)?.parse().ok()
}

/// Whether `pid` runs and is not a zombie.
pub fn alive(pid: u32) -> bool {
    start_time(pid).is_some()
}

/// The guest init lines of every QEMU console and every VMM log under `root`.
fn consoles(root: &Path) -> String {
    std::fs::read_dir(root.join("data/instances"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| {
            let c = std::fs::read_to_string(e.path().join("console.log")).unwrap_or_default();
            let lines: Vec<&str> = c
                .lines()
                .filter(|l| {
                    l.contains("plfm-guest-init")
                        || l.contains("Out of memory")
                        || l.contains("uid=")
                        || l.contains("exiting")
                })
                .collect();
            format!("--- console of {:?}\n{}", e.file_name(), lines.join("\n"))
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The runtime of `kind` built in-process as the agent builds it (no VM is started),
/// with what must outlive it; `None` when a prerequisite is missing (gate).
pub fn runtime_in_process(
    kind: Kind,
    dir: &Path,
) -> Option<(
    Arc<dyn plfm_node_agent::runtime::Runtime>,
    Option<crate::fc_standin::FcEnv>,
)> {
    use plfm_node_agent::clock::SystemClock;
    let clock = Arc::new(SystemClock::new());
    if kind == Kind::Mock {
        let rt = plfm_node_agent::runtime::mock::MockRuntime::new(
            plfm_node_agent::runtime::mock::MockConfig::default(),
            clock,
            None,
            None,
        );
        return Some((Arc::new(rt), None));
    }
    if let Err(why) = prerequisites(kind) {
        skip_or_fail(&why);
        return None;
    }
    let mut fc = None;
    let runtime = match kind {
        Kind::Qemu => {
            let (kernel, initramfs) = qemu_boot_files().expect("checked by prerequisites");
            format!(
                "[runtime]\nkind = \"qemu\"\n[runtime.qemu]\nkernel = {:?}\ninitramfs = {:?}\naccel = \"tcg\"\ncgroup = \"off\"\n",
                kernel.display().to_string(),
                initramfs.display().to_string()
            )
        }
        _ => {
            let env = crate::fc_standin::FcEnv::new("run")?;
            let t = format!(
                "[runtime]\nkind = \"firecracker\"\n[runtime.firecracker]\nsandbox = false\nbinary = {:?}\nkernel = {:?}\ninitramfs = {:?}\n",
                env.binary.display().to_string(),
                env.path("vmlinux").display().to_string(),
                env.path("initramfs.cpio.gz").display().to_string()
            );
            fc = Some(env);
            t
        }
    };
    let toml = format!(
        "node_id = \"conformance\"\ndata_dir = \"data\"\n[control_plane]\nmode = \"standalone\"\ndesired_dir = \"desired\"\n{runtime}"
    );
    let config = plfm_node_agent::config::Config::from_toml(&toml, "test", dir, std::iter::empty())
        .expect("conformance runtime config");
    std::fs::create_dir_all(&config.data_dir).unwrap();
    let ledger = Store::open(&config.state_db()).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    // Some runtimes spawn tasks while they are built.
    let _guard = rt.enter();
    let runtime = plfm_node_agent::agent::build_runtime(
        &config,
        clock,
        Some(ledger),
        plfm_node_agent::logs::LogHandle::default(),
        None,
    )
    .expect("build the runtime");
    drop(_guard);
    std::mem::forget(rt);
    Some((runtime, fc))
}
