//! The Firecracker runtime (DESIGN §5, §6): one `firecracker` process per instance,
//! optionally under `jailer`, configured through its API socket and booted with the
//! platform kernel and initramfs; the guest handshake runs over Firecracker's hybrid
//! vsock (`<instance dir>/v.sock_5161`).
//!
//! What it owns: the VMM process (spawn detached, record pid + start time in the
//! resource ledger and in `<instance dir>/vmm.json` before configuring it, adopt it
//! after an agent restart by probing its API socket, stop it: guest stop request →
//! `SendCtrlAltDel` → SIGKILL at the deadline), the jailer chroot, the instance's
//! sockets and logs. What it must not do: decide restarts or statuses (the instance
//! actor does), or build host networking, root disks and scratch disks itself: those
//! come through the [`HostResources`] seam, whose default [`LocalHost`] uses the image
//! service and the host module shared with the qemu runtime ([`crate::runtime::host`]:
//! scratch disk, volumes, tap, addresses, nftables rules).

pub mod api;
mod host;
mod jail;
pub mod process;

#[cfg(target_os = "linux")]
pub use host::LocalHost;
pub use host::{DiskPath, HostResources, PreparedHost};

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use self::api::{ActionType, ApiClient, VmConfiguration};
use super::vmm::logs::Evidence;
use super::vmm::monitor::{Monitor, MonitorArgs, OomCheck, Tracked, VmTable};
use super::vmm::process::{self as vproc, ProcessId, Watch};
use super::vmm::{guest, rootdisk};
use super::{BootContext, Runtime, RuntimeError, StopOutcome, VmEvent, VmHandle};
use crate::guest::bind_guest_listener;
use crate::spec::{HealthSpec, InstanceId, Workload};
use crate::state::{ResourceRow, Store};

/// `[runtime.firecracker]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FirecrackerConfig {
    /// The `firecracker` binary (a bare name is looked up in `PATH`).
    #[serde(default = "default_binary")]
    pub binary: PathBuf,
    /// Run every VMM under the jailer (default on): chrooted, in its own mount and pid
    /// namespaces and cgroups, as an unprivileged uid of the instance's own. A VM whose
    /// jail cannot be set up is not started; `false` runs Firecracker as root with no
    /// jail (unsafe with untrusted tenants).
    #[serde(default = "default_true")]
    pub sandbox: bool,
    /// The `jailer` binary (a bare name is looked up in `PATH`).
    #[serde(default = "default_jailer")]
    pub jailer: PathBuf,
    /// Uncompressed ELF `vmlinux` (x86_64) of the platform kernel.
    #[serde(default = "default_kernel")]
    pub kernel: PathBuf,
    /// The platform initramfs (guest init).
    #[serde(default = "default_initramfs")]
    pub initramfs: PathBuf,
    /// Jailer `--chroot-base-dir`.
    #[serde(default = "default_chroot_base")]
    pub chroot_base_dir: PathBuf,
    /// First uid of the range jailed VMMs run as, one per instance. No account on the
    /// host may use the range.
    #[serde(default = "default_uid_base")]
    pub vmm_uid_base: u32,
    /// Size of that range (at least the number of VMs the node runs).
    #[serde(default = "default_uid_count")]
    pub vmm_uid_count: u32,
    /// Gid every jailed VMM runs as: the group that may read (never write) the shared
    /// kernel, initramfs and cached root disks linked into the jails. No account on
    /// the host should be in it.
    #[serde(default = "default_gid")]
    pub gid: u32,
    /// Seconds for the API socket to appear and, separately, for the guest handshake.
    #[serde(default = "default_boot_timeout")]
    pub boot_timeout: u64,
    /// Timeout of one API call, milliseconds.
    #[serde(default = "default_api_timeout_ms")]
    pub api_timeout_ms: u64,
    /// IPv4 pool for the per-instance /30 links (inside `169.254.0.0/16`).
    #[serde(default = "default_pool")]
    pub ipv4_pool: String,
    /// Size of a volume created on first use.
    #[serde(default = "default_volume_bytes")]
    pub volume_default_bytes: u64,
    /// Under the jailer: `--parent-cgroup` of the VMMs' cgroups, relative to each
    /// cgroup mount (`<mount>/<parent>/<vmm id>`).
    #[serde(default = "default_jailer_cgroup_parent")]
    pub jailer_cgroup_parent: String,
    /// Without the jailer: a host memory cgroup per VMM (`auto`: when the host has a
    /// usable memory controller; `off`: never), as the qemu runtime's.
    #[serde(default)]
    pub cgroup: crate::cgroup::CgroupMode,
    /// Without the jailer: parent of the per-instance groups, a path inside the memory
    /// hierarchy (default: `plfm` under the agent's own memory cgroup).
    #[serde(default)]
    pub cgroup_parent: Option<String>,
    /// Memory added to the guest memory for the VMM's cgroup limit (jailed or not).
    #[serde(default = "default_overhead")]
    pub memory_overhead_mib: u64,
}

fn default_binary() -> PathBuf {
    PathBuf::from("firecracker")
}
fn default_kernel() -> PathBuf {
    PathBuf::from("/var/lib/plfm/guest/vmlinux")
}
fn default_initramfs() -> PathBuf {
    PathBuf::from("/var/lib/plfm/guest/initramfs.cpio.gz")
}
fn default_chroot_base() -> PathBuf {
    PathBuf::from("/srv/jailer")
}
fn default_true() -> bool {
    true
}
fn default_jailer() -> PathBuf {
    PathBuf::from("jailer")
}
fn default_uid_base() -> u32 {
    300_000
}
fn default_uid_count() -> u32 {
    65_536
}
fn default_gid() -> u32 {
    299_999
}
fn default_boot_timeout() -> u64 {
    10
}
fn default_api_timeout_ms() -> u64 {
    2_000
}
fn default_pool() -> String {
    "169.254.0.0/16".into()
}
fn default_volume_bytes() -> u64 {
    1 << 30
}
fn default_overhead() -> u64 {
    64
}
fn default_jailer_cgroup_parent() -> String {
    process::JAILER_CGROUP_PARENT.into()
}

impl Default for FirecrackerConfig {
    fn default() -> Self {
        FirecrackerConfig {
            binary: default_binary(),
            sandbox: true,
            jailer: default_jailer(),
            kernel: default_kernel(),
            initramfs: default_initramfs(),
            chroot_base_dir: default_chroot_base(),
            vmm_uid_base: default_uid_base(),
            vmm_uid_count: default_uid_count(),
            gid: default_gid(),
            boot_timeout: default_boot_timeout(),
            api_timeout_ms: default_api_timeout_ms(),
            ipv4_pool: default_pool(),
            volume_default_bytes: default_volume_bytes(),
            jailer_cgroup_parent: default_jailer_cgroup_parent(),
            cgroup: crate::cgroup::CgroupMode::Required,
            cgroup_parent: None,
            memory_overhead_mib: default_overhead(),
        }
    }
}

impl FirecrackerConfig {
    /// Static checks (config load). Missing files are not errors here: they fail each
    /// instance with `firecracker_start_failed` (see [`FirecrackerConfig::check_host`]).
    pub fn validate(&self) -> Result<(), String> {
        if self.boot_timeout == 0 || self.boot_timeout > 600 {
            return Err(format!(
                "runtime.firecracker.boot_timeout {} must be 1..=600 seconds",
                self.boot_timeout
            ));
        }
        if self.api_timeout_ms == 0 {
            return Err("runtime.firecracker.api_timeout_ms must be > 0".into());
        }
        super::vmm::validate_uid_range(self.vmm_uid_base, self.vmm_uid_count)
            .map_err(|e| format!("runtime.firecracker.{e}"))?;
        if self.gid == 0 {
            return Err("runtime.firecracker.gid must not be 0 (root's group)".into());
        }
        super::parse_ipv4_pool(&self.ipv4_pool).map_err(|e| format!("runtime.firecracker.{e}"))?;
        if self.volume_default_bytes < 16 << 20 {
            return Err("runtime.firecracker.volume_default_bytes must be at least 16 MiB".into());
        }
        if let Some(p) = &self.cgroup_parent {
            crate::cgroup::validate_parent(p)
                .map_err(|e| format!("runtime.firecracker.cgroup_parent: {e}"))?;
        }
        if !(1..=65_536).contains(&self.memory_overhead_mib) {
            return Err(format!(
                "runtime.firecracker.memory_overhead_mib {} is outside 1..=65536",
                self.memory_overhead_mib
            ));
        }
        let p = &self.jailer_cgroup_parent;
        if p.is_empty()
            || p.len() > 200
            || p.starts_with('/')
            || p.split('/').any(|c| c.is_empty() || c == "." || c == "..")
            || !p
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c))
        {
            return Err(format!(
                "runtime.firecracker.jailer_cgroup_parent {p:?} must be a relative cgroup path of [A-Za-z0-9._-] components, e.g. \"plfm-firecracker\""
            ));
        }
        Ok(())
    }

    /// Resolves the binaries and checks that binaries, kernel and initramfs exist.
    /// The error names the missing thing.
    pub fn check_host(&self) -> Result<ResolvedHost, String> {
        let binary = resolve_program(&self.binary)
            .ok_or_else(|| format!("firecracker binary {} not found (runtime.firecracker.binary; is Firecracker installed?)", self.binary.display()))?;
        let jailer = match self.sandbox {
            true => Some(resolve_program(&self.jailer).ok_or_else(|| {
                format!(
                    "jailer binary {} not found (runtime.firecracker.jailer; runtime.firecracker.sandbox = true runs every VMM under it)",
                    self.jailer.display()
                )
            })?),
            false => None,
        };
        for (what, p) in [("kernel", &self.kernel), ("initramfs", &self.initramfs)] {
            if !p.is_file() {
                return Err(format!(
                    "{what} {} not found (runtime.firecracker.{what})",
                    p.display()
                ));
            }
        }
        Ok(ResolvedHost { binary, jailer })
    }
}

/// Binaries found on this host.
#[derive(Debug, Clone)]
pub struct ResolvedHost {
    /// Absolute path of firecracker.
    pub binary: PathBuf,
    /// Absolute path of the jailer, when configured.
    pub jailer: Option<PathBuf>,
}

fn resolve_program(p: &Path) -> Option<PathBuf> {
    if p.components().count() > 1 || p.is_absolute() {
        return p.is_file().then(|| p.to_path_buf());
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(p))
        .find(|c| c.is_file())
}

/// Kernel command line: small and fixed (DESIGN §6).
pub fn boot_args(id: &InstanceId) -> String {
    format!("console=ttyS0 reboot=k panic=1 pci=off platform.instance_id={id}")
}

/// The `--id` of an instance's VMM. Firecracker and the jailer accept 1–64
/// alphanumerics and hyphens; instance ids may also hold `.` and `_` and be longer, so
/// such ids are mapped to hyphens and, when changed or too long, suffixed with a hash
/// of the full id (kept unique).
pub fn vmm_id(id: &InstanceId) -> String {
    let s = id.as_str();
    if s.len() <= 64 && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
        return s.to_string();
    }
    let h = s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    let clean: String = s
        .chars()
        .take(47)
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    format!("{clean}-{h:016x}")
}

/// The tap name of an instance: the same name host networking gives it
/// ([`crate::network::tap_name`]), so every runtime agrees on it.
pub fn tap_name(id: &InstanceId) -> String {
    crate::network::tap_name(id.as_str())
}

/// The guest MAC of an instance ([`crate::network::guest_mac`], as text).
pub fn guest_mac(id: &InstanceId) -> String {
    crate::network::mac_string(crate::network::guest_mac(id.as_str()))
}

/// What `vmm.json` records about a running VMM (no secrets).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct VmmRecord {
    instance_id: String,
    generation: i32,
    boot_id: String,
    spec_hash: String,
    process: Option<ProcessId>,
    api_sock: PathBuf,
    vsock_uds: PathBuf,
    chroot: Option<PathBuf>,
    address: Option<IpAddr>,
}

/// Where the files of one VMM live on the host, and how the VMM names them.
#[derive(Debug, Clone)]
struct Layout {
    dir: PathBuf,
    /// Host path of the API socket.
    api_sock: PathBuf,
    /// Host path of the vsock Unix socket.
    vsock_uds: PathBuf,
    /// The jail's root (host path), when jailed.
    chroot: Option<PathBuf>,
    /// Where the jailer writes the pid of the Firecracker it started, when jailed.
    pid_file: Option<PathBuf>,
    fc_log: PathBuf,
    metrics: PathBuf,
    console_log: PathBuf,
}

impl Layout {
    /// Path as the VMM sees it (inside the jail, or unchanged).
    fn vmm_path(&self, host: &Path) -> String {
        match &self.chroot {
            Some(root) => match host.strip_prefix(root) {
                Ok(rel) => format!("/{}", rel.display()),
                Err(_) => host.display().to_string(),
            },
            None => host.display().to_string(),
        }
    }

    /// How the VMM names a file linked into its jail (`/<file name>`), or the host
    /// path when it is not jailed.
    fn linked_name(&self, host: &Path) -> String {
        match &self.chroot {
            Some(_) => format!(
                "/{}",
                host.file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default()
            ),
            None => host.display().to_string(),
        }
    }

    fn evidence(&self) -> Evidence {
        Evidence::new(vec![
            ("firecracker", self.fc_log.clone()),
            ("console", self.console_log.clone()),
        ])
    }
}

/// A tracked VM: its handle, monitor and `vmm.json` record.
type VmState = Tracked<VmmRecord>;

/// The Firecracker runtime.
pub struct FirecrackerRuntime {
    config: FirecrackerConfig,
    data_dir: PathBuf,
    ledger: Option<Store>,
    host: Arc<dyn HostResources>,
    vms: VmTable<VmmRecord>,
    prepared: Mutex<HashMap<InstanceId, PreparedHost>>,
    /// How the jailer confines VMMs on this host (found once at start).
    jailer_cgroups: process::JailerCgroups,
    /// Host memory cgroups of plain (not jailed) VMMs.
    #[cfg(target_os = "linux")]
    cgroups: crate::runtime::vmm::cgroup::VmmCgroups,
    /// Where the guests' log lines go.
    log_sink: crate::runtime::vmm::workload_logs::LogSink,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl FirecrackerRuntime {
    /// A runtime keeping instance files under `<data_dir>/instances/<id>/`.
    pub fn new(
        config: FirecrackerConfig,
        data_dir: &Path,
        ledger: Option<Store>,
        host: Arc<dyn HostResources>,
    ) -> Self {
        if let Err(e) = config.check_host() {
            tracing::error!(error = %e, "firecracker runtime: host is not ready; every instance will fail with firecracker_start_failed");
        }
        let jailer_cgroups = process::JailerCgroups::detect(&config.jailer_cgroup_parent);
        if !config.sandbox {
            tracing::warn!(
                "firecracker runtime: runtime.firecracker.sandbox = false: VMMs run as root, without the jailer (unsafe with untrusted tenants)"
            );
        }
        if config.sandbox {
            match &jailer_cgroups {
                process::JailerCgroups::Unavailable(why) => tracing::error!(
                    why,
                    "firecracker runtime: jailed VMs cannot run on this host; every instance will fail with firecracker_start_failed"
                ),
                c => tracing::info!(cgroups = ?c, "firecracker runtime: jailer cgroups"),
            }
        }
        // Under the jailer its own `--cgroup` arguments confine the VMM; without it the
        // VMM layer's per-instance group does, when the ledger can record it.
        #[cfg(target_os = "linux")]
        let cgroups = if config.sandbox || host.ledger().is_none() {
            crate::runtime::vmm::cgroup::VmmCgroups::none()
        } else {
            crate::runtime::vmm::cgroup::VmmCgroups::detect(
                config.cgroup,
                config.cgroup_parent.as_deref(),
                "runtime.firecracker.cgroup",
            )
        };
        FirecrackerRuntime {
            config,
            data_dir: data_dir.to_path_buf(),
            ledger,
            host,
            vms: VmTable::default(),
            prepared: Mutex::new(HashMap::new()),
            jailer_cgroups,
            #[cfg(target_os = "linux")]
            cgroups,
            log_sink: Default::default(),
        }
    }

    /// Sends the guests' log lines to `sink` (its shipper and file cap).
    pub fn with_workload_logs(mut self, sink: crate::runtime::vmm::workload_logs::LogSink) -> Self {
        self.log_sink = sink;
        self
    }

    /// The log stream of a VM whose vsock socket is `uds`, given to the jailed VMM's
    /// user when there is one.
    fn workload_logs(
        &self,
        id: &InstanceId,
        uds: &Path,
        who: Option<jail::Identity>,
    ) -> Result<crate::runtime::vmm::workload_logs::WorkloadLogs, String> {
        crate::runtime::vmm::workload_logs::listen(
            id.as_str(),
            uds,
            &self.instance_dir(id),
            &self.log_sink,
            |sock| match who {
                Some(who) => jail::give_listener(sock, who),
                None => Ok(()),
            },
        )
    }

    fn instance_dir(&self, id: &InstanceId) -> PathBuf {
        self.data_dir.join("instances").join(id.as_str())
    }

    fn layout(&self, id: &InstanceId, host: &ResolvedHost) -> Layout {
        let dir = self.instance_dir(id);
        match &host.jailer {
            Some(_) => {
                let root =
                    process::chroot_dir(&self.config.chroot_base_dir, &host.binary, &vmm_id(id));
                Layout {
                    api_sock: root.join(process::JAILED_API_SOCK.trim_start_matches('/')),
                    vsock_uds: root.join("v.sock"),
                    fc_log: root.join("firecracker.log"),
                    metrics: root.join("firecracker.metrics"),
                    console_log: dir.join("console.log"),
                    pid_file: Some(root.join(format!(
                        "{}.pid",
                        host.binary
                            .file_name()
                            .map(|n| n.to_string_lossy().into_owned())
                            .unwrap_or_default()
                    ))),
                    chroot: Some(root),
                    dir,
                }
            }
            None => Layout {
                api_sock: dir.join("api.sock"),
                vsock_uds: dir.join("v.sock"),
                fc_log: dir.join("firecracker.log"),
                metrics: dir.join("firecracker.metrics"),
                console_log: dir.join("console.log"),
                chroot: None,
                pid_file: None,
                dir,
            },
        }
    }

    /// At start-up, after adoption: the jailer's cgroups under our parent that no
    /// adopted VMM owns are leftovers of a crash (the agent died between spawn and
    /// record, or before cleanup). A process still in one was never recorded: it is
    /// killed (SIGKILL), then the groups are removed.
    async fn remove_orphan_jailer_cgroups(&self, adopted: &[VmHandle]) {
        let owned: Vec<String> = adopted.iter().map(|h| vmm_id(&h.instance_id)).collect();
        for name in self.jailer_cgroups.children() {
            if owned.contains(&name) {
                continue;
            }
            for pid in self.jailer_cgroups.pids(&name) {
                if let Some(p) = ProcessId::of(pid) {
                    tracing::warn!(pid, cgroup = %name, "killing an unrecorded VMM left in a jailer cgroup");
                    p.signal(rustix::process::Signal::KILL);
                }
            }
            for dir in self.jailer_cgroups.dirs(&name) {
                match jail::remove_cgroup_dir(&dir).await {
                    Ok(()) => {
                        tracing::info!(cgroup = %dir.display(), "removed a jailer cgroup no VMM owns")
                    }
                    Err(e) => tracing::warn!(error = %e, "cannot remove an orphan jailer cgroup"),
                }
            }
        }
    }

    fn api(&self, sock: &Path) -> ApiClient {
        ApiClient::new(sock, Duration::from_millis(self.config.api_timeout_ms))
    }

    async fn ledger_add(&self, id: &InstanceId, kind: &str, name: String, detail: Option<String>) {
        if let Some(store) = &self.ledger {
            let row = ResourceRow {
                kind: kind.into(),
                name,
                instance_id: id.to_string(),
                detail,
            };
            if let Err(e) = store.call(move |s| s.resource_add(&row)).await {
                tracing::warn!(instance = %id, error = %e, "resource ledger write failed");
            }
        }
    }

    /// The VM configuration sent to the API for an instance (also used by contract
    /// tests). Fails when the disks are more than a VM takes (volumes, root layers).
    pub fn vm_configuration(
        &self,
        id: &InstanceId,
        workload: &Workload,
        host: &PreparedHost,
        jailed: bool,
    ) -> Result<VmConfiguration, RuntimeError> {
        let resolved = ResolvedHost {
            binary: self.config.binary.clone(),
            jailer: jailed.then(|| PathBuf::from("jailer")),
        };
        let layout = self.layout(id, &resolved);
        vm_configuration(
            id,
            workload,
            host,
            &layout,
            &self.config.kernel,
            &self.config.initramfs,
        )
    }

    /// The uid and gid of `id`'s jailed VMM: a uid of its own from the configured
    /// range (held in the resource ledger until cleanup), the VMMs' shared gid.
    async fn identity(&self, id: &InstanceId) -> Result<jail::Identity, RuntimeError> {
        #[cfg(target_os = "linux")]
        {
            let ledger = self
                .host
                .ledger()
                .or_else(|| self.ledger.clone().map(super::vmm::ledger::Ledger));
            let Some(ledger) = ledger else {
                return Err(RuntimeError::VmmStart(
                    "a jailed VMM needs the resource ledger to get a uid of its own".into(),
                ));
            };
            let uid = ledger
                .allocate_uid(id, self.config.vmm_uid_base, self.config.vmm_uid_count)
                .await?;
            Ok(jail::Identity {
                uid,
                gid: self.config.gid,
            })
        }
        #[cfg(not(target_os = "linux"))]
        {
            let _ = id;
            Err(RuntimeError::VmmStart(
                "the jailer runs on Linux only".into(),
            ))
        }
    }

    /// The command line of a VMM: plain, or the jailer's (refused where the jailer
    /// cannot confine it).
    fn launch(
        &self,
        id: &InstanceId,
        workload: &Workload,
        resolved: &ResolvedHost,
        layout: &Layout,
        who: Option<jail::Identity>,
    ) -> Result<process::Launch, RuntimeError> {
        let Some(jailer) = &resolved.jailer else {
            return Ok(process::Launch {
                program: resolved.binary.clone(),
                args: process::firecracker_args(&layout.api_sock, &vmm_id(id)),
                console_log: layout.console_log.clone(),
            });
        };
        let Some(who) = who else {
            return Err(RuntimeError::VmmStart(
                format!("instance {id}: a jailed VMM without a uid of its own is not started")
                    .into(),
            ));
        };
        if let process::JailerCgroups::Unavailable(why) = &self.jailer_cgroups {
            return Err(RuntimeError::VmmStart(
                format!("jailed VMs cannot run on this host: {why}").into(),
            ));
        }
        Ok(process::Launch {
            program: jailer.clone(),
            args: process::jailer_args(&process::JailerArgs {
                exec_file: &resolved.binary,
                id: &vmm_id(id),
                uid: who.uid,
                gid: who.gid,
                chroot_base_dir: &self.config.chroot_base_dir,
                cgroups: &self.jailer_cgroups,
                memory_max: guest::vmm_memory_limit(workload, self.config.memory_overhead_mib),
                cpu_weight: guest::cpu_weight(workload),
            }),
            console_log: layout.console_log.clone(),
        })
    }

    /// Spawns the VMM (in its host cgroup when there is one), recorded in the ledger
    /// and in `vmm.json` before anything else happens to it.
    async fn spawn_vmm(
        &self,
        id: &InstanceId,
        workload: &Workload,
        launch: &process::Launch,
        record: &mut VmmRecord,
        layout: &Layout,
        root_layers: &[PathBuf],
    ) -> Result<(Watch, Option<OomCheck>), RuntimeError> {
        let record_path = layout.dir.join("vmm.json");
        let evidence = layout.evidence();
        self.ledger_add(id, "process", record_path.display().to_string(), None)
            .await;
        #[cfg(target_os = "linux")]
        let (oom, entry) = match self.host.ledger() {
            Some(ledger) if self.cgroups.enabled() => {
                let limit = guest::vmm_memory_limit(workload, self.config.memory_overhead_mib);
                let weight = guest::cpu_weight(workload);
                self.cgroups
                    .create(&ledger, id, limit, weight)
                    .await?
                    .unzip()
            }
            _ => (None, None),
        };
        #[cfg(not(target_os = "linux"))]
        let (oom, entry): (Option<OomCheck>, Option<()>) = {
            let _ = workload;
            (None, None)
        };
        let spawned = vproc::spawn_detached(
            &launch.program,
            &launch.args,
            &launch.console_log,
            entry.as_ref(),
        )
        .map_err(RuntimeError::VmmStart)?;
        let (vmm, mut watch) = match &layout.pid_file {
            // Jailed with `--new-pid-ns`: the jailer forks Firecracker into a new pid
            // namespace, writes its (host) pid to the file and exits; Firecracker is
            // then nobody's child here and is watched by pid and start time. A crash
            // before it is recorded leaves it in its jailer cgroup, whose unrecorded
            // processes the next start kills.
            Some(pid_file) => {
                let wait = Duration::from_secs(self.config.boot_timeout);
                let vmm = handed_over(spawned.child, pid_file, wait)
                    .await
                    .map_err(|e| RuntimeError::VmmStart(evidence.attach(e).into()))?;
                (vmm, Watch::Adopted(vmm))
            }
            None => (spawned.id, Watch::Child(spawned.child)),
        };
        record.process = Some(vmm);
        // The VMM's identity, and the root layer disks it was given (for `describe`).
        let detail = serde_json::to_value(vmm).ok().map(|mut v| {
            if let Some(o) = v.as_object_mut() {
                o.insert("root_layers".into(), serde_json::json!(root_layers));
            }
            v.to_string()
        });
        self.ledger_add(id, "process", record_path.display().to_string(), detail)
            .await;
        if let Err(e) = write_record(&record_path, record) {
            watch.kill().await;
            return Err(RuntimeError::VmmStart(e.into()));
        }
        #[cfg(target_os = "linux")]
        let oom = oom.map(|o| o.into_check());
        Ok((watch, oom))
    }

    /// Waits for the API socket and sends the whole configuration, `InstanceStart`
    /// last. Any failure kills the VMM and carries its exit and log tails.
    async fn configure(
        &self,
        id: &InstanceId,
        workload: &Workload,
        prepared: &PreparedHost,
        layout: &Layout,
        launch: &process::Launch,
        watch: &mut Watch,
    ) -> Result<(), RuntimeError> {
        let evidence = layout.evidence();
        let boot_timeout = Duration::from_secs(self.config.boot_timeout);
        match vproc::wait_for_socket(&layout.api_sock, watch, boot_timeout, true).await {
            Ok(()) => {}
            Err(vproc::SocketWait::Timeout) => {
                watch.kill().await;
                return Err(RuntimeError::VmmStart(
                    evidence
                        .attach(format!(
                            "firecracker API socket {} did not appear within {boot_timeout:?}",
                            layout.api_sock.display()
                        ))
                        .into(),
                ));
            }
            Err(vproc::SocketWait::Exited(st)) => {
                return Err(RuntimeError::VmmStart(
                    evidence
                        .attach(format!(
                            "{} exited before serving its API: {}",
                            launch.program.display(),
                            st.describe(process::exit_code_meaning)
                        ))
                        .into(),
                ));
            }
        }
        let client = self.api(&layout.api_sock);
        let vm_config = match vm_configuration(
            id,
            workload,
            prepared,
            layout,
            &self.config.kernel,
            &self.config.initramfs,
        ) {
            Ok(c) => c,
            Err(e) => {
                watch.kill().await;
                return Err(e);
            }
        };
        for req in vm_config.requests() {
            if let Err(e) = client.send(&req).await {
                // Give the VMM a moment to write its exit reason, then kill it.
                tokio::time::sleep(Duration::from_millis(50)).await;
                let exit = match watch.try_exited() {
                    Some(st) => format!(" (VMM {})", st.describe(process::exit_code_meaning)),
                    None => String::new(),
                };
                watch.kill().await;
                return Err(RuntimeError::VmmStart(
                    evidence.attach(format!("{e}{exit}")).into(),
                ));
            }
        }
        Ok(())
    }
}

/// Waits for the jailer (our child) to start Firecracker in its new pid namespace and
/// exit, then reads Firecracker's pid from `pid_file`. The error says what went wrong.
async fn handed_over(
    mut jailer: tokio::process::Child,
    pid_file: &Path,
    within: Duration,
) -> Result<ProcessId, String> {
    match tokio::time::timeout(within, jailer.wait()).await {
        Err(_) => {
            let _ = jailer.start_kill();
            let _ = jailer.wait().await;
            return Err(format!(
                "the jailer did not start Firecracker within {within:?} (killed)"
            ));
        }
        Ok(Err(e)) => return Err(format!("cannot wait for the jailer: {e}")),
        Ok(Ok(st)) if !st.success() => {
            return Err(format!(
                "the jailer failed before starting Firecracker: {}",
                vproc::ExitStatus::of(st).describe(process::exit_code_meaning)
            ))
        }
        Ok(Ok(_)) => {}
    }
    let text = std::fs::read_to_string(pid_file).map_err(|e| {
        format!(
            "the jailer exited without writing {}: {e}",
            pid_file.display()
        )
    })?;
    let pid: u32 = text.trim().parse().map_err(|_| {
        format!(
            "{} does not hold a pid: {:?}",
            pid_file.display(),
            crate::guest::guest_text(&text)
        )
    })?;
    ProcessId::of(pid)
        .ok_or_else(|| format!("Firecracker (pid {pid}) exited as soon as the jailer started it"))
}

/// virtio devices Firecracker v1.16.1 attaches on x86_64: with 18 its `InstanceStart`
/// fails ("Could not allocate GSI" for its ACPI devices; measured with the real binary,
/// tests/firecracker_real.rs).
const VIRTIO_DEVICES: usize = 17;

/// Builds the API configuration of a VM.
fn vm_configuration(
    id: &InstanceId,
    workload: &Workload,
    host: &PreparedHost,
    layout: &Layout,
    kernel: &Path,
    initramfs: &Path,
) -> Result<VmConfiguration, RuntimeError> {
    let inside = |p: &Path| layout.linked_name(p);
    let volumes: Vec<(PathBuf, bool)> = host
        .volumes
        .iter()
        .map(|(_, d)| (d.path.clone(), d.read_only))
        .collect();
    // Firecracker attaches the drives in the order they are configured, so the guest
    // names them in this order (`vda`, `vdb`, …).
    let disks = rootdisk::vm_disks(&host.root_layers, &host.scratch_disk, &volumes)?;
    let devices = disks.len() + host.tap.iter().count() + 1;
    if devices > VIRTIO_DEVICES {
        return Err(RuntimeError::VmmStart(
            format!(
                "the VM needs {devices} virtio devices ({} root layer disks, the scratch disk, {} volumes{}, vsock); Firecracker takes {VIRTIO_DEVICES}",
                host.root_layers.len(),
                volumes.len(),
                if host.tap.is_some() { ", network" } else { "" }
            )
            .into(),
        ));
    }
    let drives = disks
        .into_iter()
        .map(|d| api::Drive {
            drive_id: d.name,
            path_on_host: inside(&d.path),
            is_root_device: false,
            is_read_only: d.read_only,
            cache_type: None,
        })
        .collect();
    let interfaces = host
        .tap
        .iter()
        .map(|t| api::NetworkInterface {
            iface_id: "eth0".into(),
            host_dev_name: t.clone(),
            guest_mac: Some(guest_mac(id)),
        })
        .collect();
    Ok(VmConfiguration {
        logger: api::Logger {
            log_path: layout.vmm_path(&layout.fc_log),
            level: "Info".into(),
            show_level: true,
            show_log_origin: false,
        },
        metrics: api::Metrics {
            metrics_path: layout.vmm_path(&layout.metrics),
        },
        machine: api::MachineConfig {
            vcpu_count: guest::vcpus(workload),
            mem_size_mib: guest::guest_mem_mib(workload),
            smt: Some(false),
            track_dirty_pages: None,
            huge_pages: None,
        },
        boot: api::BootSource {
            kernel_image_path: inside(kernel),
            initrd_path: Some(inside(initramfs)),
            boot_args: Some(boot_args(id)),
        },
        drives,
        interfaces,
        vsock: api::Vsock {
            guest_cid: 3,
            uds_path: layout.vmm_path(&layout.vsock_uds),
        },
    })
}

#[async_trait]
impl Runtime for FirecrackerRuntime {
    fn kind(&self) -> &'static str {
        "firecracker"
    }

    fn notices(&self) -> Vec<String> {
        let mut out = Vec::new();
        if !self.config.sandbox {
            out.push(
                "runtime.firecracker.sandbox = false: Firecracker runs as root, without the jailer"
                    .into(),
            );
        }
        #[cfg(target_os = "linux")]
        out.extend(self.cgroups.notice());
        out
    }

    async fn prepare(&self, id: &InstanceId, workload: &Workload) -> Result<(), RuntimeError> {
        // A host that cannot run VMMs fails the instance before pulling anything.
        self.config
            .check_host()
            .map_err(|e| RuntimeError::VmmStart(e.into()))?;
        let dir = self.instance_dir(id);
        self.ledger_add(id, "instance_dir", dir.display().to_string(), None)
            .await;
        std::fs::create_dir_all(&dir).map_err(|e| {
            RuntimeError::VmmStart(format!("cannot create {}: {e}", dir.display()).into())
        })?;
        crate::logstore::revive(&dir);
        // A jailed VMM opens its tap itself, as its own uid.
        let owner = match self.config.sandbox {
            true => Some(self.identity(id).await?).map(|w| (w.uid, w.gid)),
            false => None,
        };
        let prepared = self.host.prepare(id, workload, &dir, owner).await?;
        lock(&self.prepared).insert(id.clone(), prepared);
        Ok(())
    }

    async fn start(
        &self,
        id: &InstanceId,
        workload: &Workload,
        boot: BootContext,
    ) -> Result<VmHandle, RuntimeError> {
        let resolved = self
            .config
            .check_host()
            .map_err(|e| RuntimeError::VmmStart(e.into()))?;
        let Some(prepared) = lock(&self.prepared).get(id).cloned() else {
            return Err(RuntimeError::VmmStart(
                format!("instance {id} was not prepared").into(),
            ));
        };
        let config = guest::guest_config(
            workload,
            prepared.process.as_ref(),
            u32::try_from(prepared.root_layers.len()).unwrap_or(u32::MAX),
            prepared.guest_network.clone(),
            boot.secrets.as_ref(),
        )?;
        let layout = self.layout(id, &resolved);
        std::fs::create_dir_all(&layout.dir).map_err(|e| {
            RuntimeError::VmmStart(format!("cannot create {}: {e}", layout.dir.display()).into())
        })?;
        let who = match &layout.chroot {
            Some(root) => {
                let who = self.identity(id).await?;
                self.ledger_add(id, "chroot", root.display().to_string(), None)
                    .await;
                jail::populate(
                    root,
                    &self.config.kernel,
                    &self.config.initramfs,
                    &prepared,
                    who,
                )
                .map_err(|e| RuntimeError::VmmStart(e.into()))?;
                Some(who)
            }
            None => None,
        };
        jail::fresh_files(&layout, who).map_err(|e| RuntimeError::VmmStart(e.into()))?;
        // The guest connects once, early: listen before the VMM exists.
        let listener = bind_guest_listener(&layout.vsock_uds).map_err(|e| {
            RuntimeError::VmmStart(
                format!(
                    "cannot listen on {}: {e}",
                    crate::guest::guest_socket_path(&layout.vsock_uds).display()
                )
                .into(),
            )
        })?;
        if let Some(who) = who {
            jail::give_listener(&crate::guest::guest_socket_path(&layout.vsock_uds), who)
                .map_err(|e| RuntimeError::VmmStart(e.into()))?;
        }
        let logs = self
            .workload_logs(id, &layout.vsock_uds, who)
            .map_err(|e| RuntimeError::VmmStart(e.into()))?;
        let launch = self.launch(id, workload, &resolved, &layout, who)?;
        let mut record = VmmRecord {
            instance_id: id.to_string(),
            generation: workload.spec.generation,
            boot_id: boot.boot_id.clone(),
            spec_hash: workload.spec_hash.clone(),
            process: None,
            api_sock: layout.api_sock.clone(),
            vsock_uds: layout.vsock_uds.clone(),
            chroot: layout.chroot.clone(),
            address: prepared
                .address
                .or_else(|| workload.spec.network.overlay_ipv6.parse().ok()),
        };
        let (mut watch, oom) = self
            .spawn_vmm(
                id,
                workload,
                &launch,
                &mut record,
                &layout,
                &prepared.root_layers,
            )
            .await?;
        self.configure(id, workload, &prepared, &layout, &launch, &mut watch)
            .await?;
        let handle = VmHandle {
            instance_id: id.clone(),
            generation: workload.spec.generation,
            boot_id: boot.boot_id,
            spec_hash: workload.spec_hash.clone(),
        };
        let monitor = Monitor::spawn(MonitorArgs {
            instance: id.to_string(),
            listener,
            config,
            handshake: Duration::from_secs(self.config.boot_timeout),
            watch,
            adopted: false,
            evidence: layout.evidence(),
            console_cap: Some((layout.console_log.clone(), CONSOLE_MAX_BYTES)),
            oom,
            exit_meaning: process::exit_code_meaning,
            workload_logs: Some(logs),
        });
        Ok(self.vms.insert(Tracked {
            handle,
            monitor,
            record,
        }))
    }

    async fn next_event(&self, vm: &VmHandle) -> VmEvent {
        self.vms.next_event(vm).await
    }

    async fn probe_health(&self, vm: &VmHandle, check: &HealthSpec) -> Result<(), String> {
        let addr = self.vms.get(&vm.instance_id).and_then(|s| s.record.address);
        let Some(addr) = addr else {
            return Err(format!("instance {}: no address to probe", vm.instance_id));
        };
        crate::health::probe(addr, check).await
    }

    async fn stop(&self, vm: &VmHandle, grace: Duration) -> StopOutcome {
        let Some(state) = self.vms.get(&vm.instance_id) else {
            return StopOutcome {
                graceful: true,
                exit_code: None,
            };
        };
        let outcome = stop_vm(&state, grace, &self.api(&state.record.api_sock)).await;
        self.vms.remove(&vm.instance_id);
        outcome
    }

    async fn recover(&self) -> Result<Vec<VmHandle>, RuntimeError> {
        // Taps and rules no instance owns are leftovers of a crash.
        if let Err(e) = self.host.remove_orphans().await {
            tracing::warn!(error = %e, "cannot remove orphan host resources");
        }
        let root = self.data_dir.join("instances");
        let mut found = Vec::new();
        let entries = match std::fs::read_dir(&root) {
            Ok(e) => e.flatten().collect::<Vec<_>>(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => vec![],
            Err(e) => {
                return Err(RuntimeError::VmmStart(
                    format!("cannot list {}: {e}", root.display()).into(),
                ))
            }
        };
        for entry in entries {
            if let Some(handle) = self.adopt(&entry.path()).await {
                found.push(handle);
            }
        }
        found.sort_by(|a, b| a.instance_id.cmp(&b.instance_id));
        if self.config.sandbox {
            self.remove_orphan_jailer_cgroups(&found).await;
        }
        #[cfg(target_os = "linux")]
        {
            let live: Vec<PathBuf> = found
                .iter()
                .filter_map(|h| {
                    self.cgroups
                        .parent()
                        .map(|p| p.join(h.instance_id.as_str()))
                })
                .collect();
            self.cgroups.remove_orphans(&live).await;
        }
        let adopted: Vec<InstanceId> = found.iter().map(|h| h.instance_id.clone()).collect();
        self.host.retain_root_disks(&adopted).await;
        Ok(found)
    }

    fn current_vm(&self, id: &InstanceId) -> Option<VmHandle> {
        self.vms.current(id)
    }

    fn guest_vsock(&self, id: &InstanceId) -> Option<PathBuf> {
        self.vms.get(id).map(|vm| vm.record.vsock_uds.clone())
    }

    fn instance_dir_of(&self, id: &InstanceId) -> Option<PathBuf> {
        Some(self.instance_dir(id))
    }

    async fn cleanup(&self, id: &InstanceId) -> Result<(), RuntimeError> {
        let dir = self.instance_dir(id);
        if let Some(state) = self.vms.remove(id) {
            if let Some(p) = state.record.process {
                p.signal(rustix::process::Signal::KILL);
            }
        }
        // A record left by an earlier run: make sure its VMM is gone.
        let record: Option<VmmRecord> = std::fs::read(dir.join("vmm.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        if let Some(p) = record.as_ref().and_then(|r| r.process) {
            p.kill(Duration::from_secs(5)).await;
        }
        lock(&self.prepared).remove(id);
        self.host.release(id, &dir).await?;
        #[cfg(target_os = "linux")]
        if let Some(ledger) = self.host.ledger() {
            self.cgroups.release(&ledger, id).await?;
        }
        if self.config.sandbox {
            for d in self.jailer_cgroups.dirs(&vmm_id(id)) {
                jail::remove_cgroup_dir(&d).await?;
            }
        }
        let mut chroots: Vec<PathBuf> = record.and_then(|r| r.chroot).into_iter().collect();
        if let Ok(host) = self.config.check_host() {
            if host.jailer.is_some() {
                chroots.push(process::chroot_dir(
                    &self.config.chroot_base_dir,
                    &host.binary,
                    &vmm_id(id),
                ));
            }
        }
        for root in chroots {
            jail::remove(&root)?;
        }
        // The logs stay (the console, the workload's): removal retires them.
        if let Err(e) = crate::logstore::remove_all_but_logs(&dir) {
            return Err(RuntimeError::VmmStart(
                format!("cannot clean {}: {e}", dir.display()).into(),
            ));
        }
        if let Some(store) = &self.ledger {
            #[cfg(target_os = "linux")]
            crate::runtime::vmm::ledger::Ledger(store.clone())
                .remove_instance(id)
                .await?;
            #[cfg(not(target_os = "linux"))]
            let _ = store;
        }
        Ok(())
    }
}

impl FirecrackerRuntime {
    /// Adopts the VMM recorded in an instance directory after an agent restart: its
    /// pid and start time must still run and its API must answer with its id. A VMM
    /// that is alive but does not answer is killed; a dead one is forgotten.
    async fn adopt(&self, dir: &Path) -> Option<VmHandle> {
        let path = dir.join("vmm.json");
        let bytes = std::fs::read(&path).ok()?;
        let Ok(rec) = serde_json::from_slice::<VmmRecord>(&bytes) else {
            tracing::warn!(path = %path.display(), "ignoring unreadable VMM record");
            return None;
        };
        let id = InstanceId::parse(&rec.instance_id).ok()?;
        if self.vms.contains(&id) {
            return None;
        }
        let Some(pid) = rec.process.filter(|p| p.is_alive()) else {
            tracing::info!(instance = %id, "recorded VMM is gone; not adopting");
            let _ = std::fs::remove_file(&path);
            return None;
        };
        match self.api(&rec.api_sock).instance_info().await {
            Ok(info) if info.id == vmm_id(&id) => {}
            other => {
                let why = match other {
                    Ok(info) => format!("API answers for {:?}", info.id),
                    Err(e) => e.to_string(),
                };
                tracing::warn!(instance = %id, pid = pid.pid, why, "VMM does not answer as expected; killing it");
                pid.kill(Duration::from_secs(5)).await;
                let _ = std::fs::remove_file(&path);
                return None;
            }
        }
        let handle = VmHandle {
            instance_id: id.clone(),
            generation: rec.generation,
            boot_id: rec.boot_id.clone(),
            spec_hash: rec.spec_hash.clone(),
        };
        let listener = match bind_guest_listener(&rec.vsock_uds) {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(instance = %id, error = %e, "cannot listen for the adopted guest");
                return None;
            }
        };
        let who = match rec.chroot.is_some() {
            true => self.identity(&id).await.ok(),
            false => None,
        };
        let logs = self
            .workload_logs(&id, &rec.vsock_uds, who)
            .map_err(|e| tracing::warn!(instance = %id, error = %e, "the adopted VM's log stream is not served"))
            .ok();
        if rec.chroot.is_some() {
            // The jailed VMM connects as its own uid (the one the ledger holds for it).
            let given = match self.identity(&id).await {
                Ok(who) => {
                    jail::give_listener(&crate::guest::guest_socket_path(&rec.vsock_uds), who)
                }
                Err(e) => Err(e.to_string()),
            };
            if let Err(e) = given {
                tracing::warn!(instance = %id, error = %e, "the adopted jailed VMM cannot reach its guest listener");
            }
        }
        let layout = Layout {
            dir: dir.to_path_buf(),
            api_sock: rec.api_sock.clone(),
            vsock_uds: rec.vsock_uds.clone(),
            fc_log: rec
                .chroot
                .as_ref()
                .map(|r| r.join("firecracker.log"))
                .unwrap_or_else(|| dir.join("firecracker.log")),
            metrics: PathBuf::new(),
            console_log: dir.join("console.log"),
            chroot: rec.chroot.clone(),
            pid_file: None,
        };
        #[cfg(target_os = "linux")]
        let oom = match &self.ledger {
            Some(store) => store
                .call(|s| s.resources())
                .await
                .ok()
                .and_then(|rows| crate::runtime::vmm::cgroup::VmmCgroups::adopt(&rows, &id))
                .map(|o| o.into_check()),
            None => None,
        };
        #[cfg(not(target_os = "linux"))]
        let oom = None;
        let monitor = Monitor::spawn(MonitorArgs {
            instance: id.to_string(),
            listener,
            config: guest::resumed_config(id.as_str(), rec.generation),
            handshake: Duration::from_secs(self.config.boot_timeout),
            watch: Watch::Adopted(pid),
            adopted: true,
            evidence: layout.evidence(),
            console_cap: Some((layout.console_log.clone(), CONSOLE_MAX_BYTES)),
            oom,
            exit_meaning: process::exit_code_meaning,
            workload_logs: logs,
        });
        tracing::info!(instance = %id, pid = pid.pid, "adopted running firecracker");
        Some(self.vms.insert(Tracked {
            handle,
            monitor,
            record: rec,
        }))
    }
}

/// Largest console log of a VM before it is rotated (`console.log.1`).
const CONSOLE_MAX_BYTES: u64 = 1 << 20;

fn write_record(path: &Path, rec: &VmmRecord) -> Result<(), String> {
    let json = serde_json::to_vec(rec).map_err(|e| e.to_string())?;
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, json).map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, path).map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// Stop: the guest stops its workload within `grace` and reboots (Firecracker
/// exits); else `SendCtrlAltDel`, then SIGKILL ([`Monitor::stop_escalating`]).
async fn stop_vm(state: &VmState, grace: Duration, api: &ApiClient) -> StopOutcome {
    let id = &state.handle.instance_id;
    let pid = state.record.process;
    state
        .monitor
        .stop_escalating(
            grace,
            async {
                if let Err(e) = api.action(ActionType::SendCtrlAltDel).await {
                    tracing::warn!(instance = %id, error = %e, "SendCtrlAltDel failed");
                }
            },
            || {
                if let Some(p) = pid {
                    tracing::warn!(instance = %id, pid = p.pid, "VMM still running after SendCtrlAltDel: SIGKILL");
                    p.signal(rustix::process::Signal::KILL);
                }
            },
        )
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 15 disks (12 layers, scratch, 2 volumes) + network + vsock are the most
    /// Firecracker starts; one layer more is refused before the VMM is asked, naming
    /// the count.
    #[test]
    fn more_virtio_devices_than_firecracker_takes_are_refused() {
        let id = InstanceId::parse("i-many").unwrap();
        let w = crate::spec::decode_assignment(
            &serde_json::json!({"instance_id": "i-many", "generation": 1, "desired_state": "running", "workload": {
                "spec_version": "v1", "instance_id": "i-many", "generation": 1,
                "image": {"digest": format!("sha256:{}", "a".repeat(64)), "resolved_digest": format!("sha256:{}", "a".repeat(64))},
                "command": ["/app"],
                "resources": {"cpu_request": 1.0, "memory_limit_bytes": 268435456_i64},
                "network": {"overlay_ipv6": "fd00::1", "gateway_ipv6": "fe80::1"}
            }}),
            "test",
        )
        .unwrap()
        .workload
        .unwrap();
        let mut host = PreparedHost {
            root_layers: (0..12).map(|i| format!("/c/{i}.ext4").into()).collect(),
            scratch_disk: "/i/scratch.ext4".into(),
            volumes: ["vol-a", "vol-b"]
                .map(|v| {
                    (
                        v.to_string(),
                        DiskPath {
                            path: format!("/v/{v}.ext4").into(),
                            read_only: false,
                        },
                    )
                })
                .into(),
            tap: Some("plfm-t".into()),
            guest_network: None,
            address: None,
            process: None,
        };
        let layout = Layout {
            dir: "/i".into(),
            api_sock: "/i/api.sock".into(),
            vsock_uds: "/i/v.sock".into(),
            chroot: None,
            pid_file: None,
            fc_log: "/i/firecracker.log".into(),
            metrics: "/i/firecracker.metrics".into(),
            console_log: "/i/console.log".into(),
        };
        let config = |h: &PreparedHost| {
            vm_configuration(&id, &w, h, &layout, Path::new("/k"), Path::new("/r"))
        };
        let ok = config(&host).unwrap();
        let names: Vec<&str> = ok.drives.iter().map(|d| d.drive_id.as_str()).collect();
        assert_eq!(names.len(), 15);
        assert_eq!(&names[..5], ["vda", "vdb", "vdc", "vdd", "vde"]);
        assert_eq!(ok.drives[4].path_on_host, "/c/1.ext4");
        assert_eq!(ok.drives[14].path_on_host, "/c/11.ext4");
        host.root_layers.push("/c/12.ext4".into());
        let e = config(&host).unwrap_err();
        assert!(
            e.to_string().contains("needs 18 virtio devices")
                && e.to_string().contains("Firecracker takes 17"),
            "{e}"
        );
        // Without a tap the network device is not counted.
        host.tap = None;
        assert!(config(&host).is_ok());
    }

    #[test]
    fn boot_args_are_fixed_and_name_the_instance() {
        let id = InstanceId::parse("i-abc").unwrap();
        assert_eq!(
            boot_args(&id),
            "console=ttyS0 reboot=k panic=1 pci=off platform.instance_id=i-abc"
        );
    }

    #[test]
    fn tap_names_fit_ifnamsiz_and_have_the_prefix() {
        let t = tap_name(&InstanceId::parse("some-long-instance-id-0001").unwrap());
        assert_eq!(t.len(), 15);
        assert!(t.starts_with("plfm"));
    }

    #[test]
    fn vmm_ids_are_what_firecracker_accepts_and_stay_unique() {
        let ok = |s: &str| {
            (1..=64).contains(&s.len()) && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        };
        let a = vmm_id(&InstanceId::parse("web.1_a").unwrap());
        let b = vmm_id(&InstanceId::parse("web-1-a").unwrap());
        assert!(ok(&a) && ok(&b));
        assert_eq!(b, "web-1-a");
        assert_ne!(a, b);
        let long = vmm_id(&InstanceId::parse(&"x".repeat(100)).unwrap());
        assert!(ok(&long), "{long}");
    }

    #[test]
    fn missing_binary_is_named() {
        let c = FirecrackerConfig {
            binary: PathBuf::from("/nonexistent/firecracker"),
            ..Default::default()
        };
        let e = c.check_host().unwrap_err();
        assert!(e.contains("/nonexistent/firecracker"), "{e}");
    }

    #[test]
    fn config_rejects_zero_boot_timeout_root_ids_and_a_bad_uid_range() {
        let mut c = FirecrackerConfig {
            boot_timeout: 0,
            ..Default::default()
        };
        assert!(c.validate().unwrap_err().contains("boot_timeout"));
        c.boot_timeout = 5;
        assert_eq!(c.validate(), Ok(()));
        assert!(c.sandbox, "the jailer is on by default");
        c.gid = 0;
        assert!(c
            .validate()
            .unwrap_err()
            .contains("runtime.firecracker.gid"));
        c.gid = 299_999;
        c.vmm_uid_base = 0;
        assert!(c
            .validate()
            .unwrap_err()
            .contains("runtime.firecracker.vmm_uid_base"));
        c.vmm_uid_base = u32::MAX - 5;
        assert!(c
            .validate()
            .unwrap_err()
            .contains("runtime.firecracker.vmm_uid_count"));
    }

    #[test]
    fn a_missing_jailer_is_named_unless_the_sandbox_is_off() {
        let dir = tempfile::tempdir().unwrap();
        let fc = dir.path().join("firecracker");
        std::fs::write(&fc, b"").unwrap();
        for f in ["vmlinux", "initramfs"] {
            std::fs::write(dir.path().join(f), b"").unwrap();
        }
        let mut c = FirecrackerConfig {
            binary: fc,
            jailer: dir.path().join("no-jailer"),
            kernel: dir.path().join("vmlinux"),
            initramfs: dir.path().join("initramfs"),
            ..Default::default()
        };
        let e = c.check_host().unwrap_err();
        assert!(
            e.contains("no-jailer") && e.contains("runtime.firecracker.jailer"),
            "{e}"
        );
        c.sandbox = false;
        assert!(c.check_host().unwrap().jailer.is_none());
    }
}
