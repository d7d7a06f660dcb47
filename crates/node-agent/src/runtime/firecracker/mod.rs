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
pub mod process;

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use plfm_guest_protocol as gp;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};

use self::api::{ActionType, ApiClient, VmConfiguration};
use self::process::ProcessId;
use super::{BootContext, Runtime, RuntimeError, StopOutcome, VmEvent, VmHandle};
use crate::guest::{accept_guest, bind_guest_listener, GuestEvent};
use crate::spec::{HealthSpec, InstanceId, Workload};
use crate::state::{ResourceRow, Store};

/// `[runtime.firecracker]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FirecrackerConfig {
    /// The `firecracker` binary (a bare name is looked up in `PATH`).
    #[serde(default = "default_binary")]
    pub binary: PathBuf,
    /// The `jailer` binary; when set, every VMM runs under it.
    #[serde(default)]
    pub jailer: Option<PathBuf>,
    /// Uncompressed ELF `vmlinux` (x86_64) of the platform kernel.
    #[serde(default = "default_kernel")]
    pub kernel: PathBuf,
    /// The platform initramfs (guest init).
    #[serde(default = "default_initramfs")]
    pub initramfs: PathBuf,
    /// Jailer `--chroot-base-dir`.
    #[serde(default = "default_chroot_base")]
    pub chroot_base_dir: PathBuf,
    /// Uid the jailed VMM runs as.
    #[serde(default = "default_id")]
    pub uid: u32,
    /// Gid the jailed VMM runs as.
    #[serde(default = "default_id")]
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
fn default_id() -> u32 {
    10_000
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
fn default_jailer_cgroup_parent() -> String {
    process::JAILER_CGROUP_PARENT.into()
}

impl Default for FirecrackerConfig {
    fn default() -> Self {
        FirecrackerConfig {
            binary: default_binary(),
            jailer: None,
            kernel: default_kernel(),
            initramfs: default_initramfs(),
            chroot_base_dir: default_chroot_base(),
            uid: default_id(),
            gid: default_id(),
            boot_timeout: default_boot_timeout(),
            api_timeout_ms: default_api_timeout_ms(),
            ipv4_pool: default_pool(),
            volume_default_bytes: default_volume_bytes(),
            jailer_cgroup_parent: default_jailer_cgroup_parent(),
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
        if self.jailer.is_some() && (self.uid == 0 || self.gid == 0) {
            return Err("runtime.firecracker.uid/gid must not be 0 under the jailer".into());
        }
        super::parse_ipv4_pool(&self.ipv4_pool).map_err(|e| format!("runtime.firecracker.{e}"))?;
        if self.volume_default_bytes < 16 << 20 {
            return Err("runtime.firecracker.volume_default_bytes must be at least 16 MiB".into());
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
        let jailer = match &self.jailer {
            Some(j) => Some(resolve_program(j).ok_or_else(|| {
                format!(
                    "jailer binary {} not found (runtime.firecracker.jailer)",
                    j.display()
                )
            })?),
            None => None,
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

/// A disk handed to the VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskPath {
    /// Host path.
    pub path: PathBuf,
    /// Read-only.
    pub read_only: bool,
}

/// Host resources of one instance, from [`HostResources::prepare`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreparedHost {
    /// Root disk (vda, read-only).
    pub root_disk: PathBuf,
    /// Scratch disk (vdb).
    pub scratch_disk: PathBuf,
    /// Volumes in `volume_id` order (vdc, vdd, …).
    pub volumes: Vec<(String, DiskPath)>,
    /// The tap to attach as eth0, if any.
    pub tap: Option<String>,
    /// The guest's network config (addresses on the tap), when host networking made
    /// one; else the guest gets the spec's overlay address without an IPv4 link.
    pub guest_network: Option<gp::NetworkConfig>,
    /// Where the host reaches the guest for health checks; else the overlay IPv6.
    pub address: Option<IpAddr>,
    /// Process defaults merged from the image (argv, env, cwd), if known.
    pub process: Option<crate::image::MergedProcess>,
}

/// The seam to host networking and disks (issue 6 provides the real ones).
#[async_trait]
pub trait HostResources: Send + Sync + 'static {
    /// Creates (idempotently) root disk, scratch disk, volumes and tap of an instance.
    async fn prepare(
        &self,
        id: &InstanceId,
        workload: &Workload,
        instance_dir: &Path,
    ) -> Result<PreparedHost, RuntimeError>;
    /// Releases what `prepare` created (idempotent).
    async fn release(&self, id: &InstanceId, instance_dir: &Path) -> Result<(), RuntimeError>;
    /// At start-up: removes host resources no instance owns (orphan taps, rules).
    async fn remove_orphans(&self) -> Result<(), RuntimeError> {
        Ok(())
    }
}

/// Default host resources: the root disk from the image service, and scratch disk,
/// volumes, tap, addresses and rules from the host module shared with the qemu runtime
/// ([`crate::runtime::host`]). Linux only; taps need root.
#[cfg(target_os = "linux")]
pub struct LocalHost {
    host: crate::runtime::host::Host,
    images: Option<crate::image::ImageService>,
}

#[cfg(target_os = "linux")]
impl LocalHost {
    /// Host resources under `data_dir`, recorded in the resource ledger `ledger`.
    /// Fails on a bad `ipv4_pool` (naming the key).
    pub fn new(
        data_dir: &Path,
        images: Option<crate::image::ImageService>,
        ledger: Store,
        config: &FirecrackerConfig,
    ) -> Result<Self, String> {
        let host = crate::runtime::host::Host::new(
            data_dir,
            ledger,
            crate::runtime::host::HostConfig {
                ipv4_pool: config.ipv4_pool.clone(),
                volume_default_bytes: config.volume_default_bytes,
                // A jailed Firecracker runs as `uid:gid` and must open its tap itself.
                tap_owner: config.jailer.is_some().then_some((config.uid, config.gid)),
            },
        )
        .map_err(|e| format!("runtime.firecracker.{e}"))?;
        Ok(LocalHost { host, images })
    }
}

/// The tap name of an instance: the same name host networking gives it
/// ([`crate::network::tap_name`]), so every runtime agrees on it.
pub fn tap_name(id: &InstanceId) -> String {
    crate::network::tap_name(id.as_str())
}

/// A locally administered guest MAC derived from the instance id.
pub fn guest_mac(id: &InstanceId) -> String {
    let h = id.as_str().bytes().fold(0x811c_9dc5u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    });
    let b = h.to_be_bytes();
    format!("06:00:{:02x}:{:02x}:{:02x}:{:02x}", b[0], b[1], b[2], b[3])
}

#[cfg(target_os = "linux")]
#[async_trait]
impl HostResources for LocalHost {
    async fn prepare(
        &self,
        id: &InstanceId,
        workload: &Workload,
        _instance_dir: &Path,
    ) -> Result<PreparedHost, RuntimeError> {
        let Some(images) = &self.images else {
            return Err(RuntimeError::RootfsBuild(
                "no image service: cannot build the root disk".into(),
            ));
        };
        let i = &workload.spec.image;
        let spec_image = crate::image::SpecImage {
            reference: i.reference.clone(),
            digest: i.digest.clone(),
            index_digest: i.index_digest.clone(),
            resolved_digest: workload.digest.as_str().to_string(),
            os: i.os.clone(),
            arch: i.arch.clone(),
        };
        let image = crate::image::ImageRef::from_spec(&spec_image).map_err(RuntimeError::from)?;
        let root = images
            .ensure_root_disk(&image, id.as_str())
            .await
            .map_err(RuntimeError::from)?;
        let process = crate::image::merge_process(
            &root.config,
            &workload.spec.command,
            workload.spec.env_vars.as_ref(),
            workload.spec.workdir.as_deref(),
        );
        let prep = self.host.prepare(id, workload).await?;
        Ok(PreparedHost {
            root_disk: root.path,
            scratch_disk: prep.scratch.clone(),
            volumes: prep
                .volumes
                .iter()
                .map(|(vid, path, read_only)| {
                    (
                        vid.clone(),
                        DiskPath {
                            path: path.clone(),
                            read_only: *read_only,
                        },
                    )
                })
                .collect(),
            tap: Some(prep.tap.tap.clone()),
            guest_network: Some(prep.guest_network(workload)?),
            address: Some(prep.probe_address()),
            process: Some(process),
        })
    }

    async fn release(&self, id: &InstanceId, _instance_dir: &Path) -> Result<(), RuntimeError> {
        self.host.release(id).await
    }

    async fn remove_orphans(&self) -> Result<(), RuntimeError> {
        let removed = self.host.remove_orphans().await?;
        if !removed.is_empty() {
            tracing::info!(?removed, "removed plfm taps and rules no instance owns");
        }
        Ok(())
    }
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
}

/// Shared by the runtime and one VM's monitor task.
struct VmState {
    handle: VmHandle,
    record: VmmRecord,
    events: tokio::sync::Mutex<mpsc::UnboundedReceiver<VmEvent>>,
    stop_tx: mpsc::UnboundedSender<Duration>,
    exited: watch::Receiver<Option<(Option<i32>, Option<i32>)>>,
    workload_exit: Arc<Mutex<Option<i32>>>,
    monitor: tokio::task::JoinHandle<()>,
}

/// The Firecracker runtime.
pub struct FirecrackerRuntime {
    config: FirecrackerConfig,
    data_dir: PathBuf,
    ledger: Option<Store>,
    host: Arc<dyn HostResources>,
    vms: Mutex<HashMap<InstanceId, Arc<VmState>>>,
    prepared: Mutex<HashMap<InstanceId, PreparedHost>>,
    /// How the jailer confines VMMs on this host (found once at start).
    jailer_cgroups: process::JailerCgroups,
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
        if config.jailer.is_some() {
            match &jailer_cgroups {
                process::JailerCgroups::Unavailable(why) => tracing::error!(
                    why,
                    "firecracker runtime: jailed VMs cannot run on this host; every instance will fail with firecracker_start_failed"
                ),
                c => tracing::info!(cgroups = ?c, "firecracker runtime: jailer cgroups"),
            }
        }
        FirecrackerRuntime {
            config,
            data_dir: data_dir.to_path_buf(),
            ledger,
            host,
            vms: Mutex::new(HashMap::new()),
            prepared: Mutex::new(HashMap::new()),
            jailer_cgroups,
        }
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
                dir,
            },
        }
    }

    /// At start-up, after adoption: the jailer's cgroups under our parent that no
    /// adopted VMM owns are leftovers of a crash (the agent died between spawn and
    /// record, or before cleanup). A process still in one was never recorded: it is
    /// killed (SIGKILL), then the groups are removed.
    async fn remove_orphan_cgroups(&self, adopted: &[VmHandle]) {
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
                match remove_cgroup_dir(&dir).await {
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
    /// tests).
    pub fn vm_configuration(
        &self,
        id: &InstanceId,
        workload: &Workload,
        host: &PreparedHost,
        jailed: bool,
    ) -> VmConfiguration {
        let resolved = ResolvedHost {
            binary: self.config.binary.clone(),
            jailer: jailed.then(|| PathBuf::from("jailer")),
        };
        let layout = self.layout(id, &resolved);
        let inside = |p: &Path| -> String {
            if jailed {
                format!(
                    "/{}",
                    p.file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default()
                )
            } else {
                p.display().to_string()
            }
        };
        vm_configuration(
            id,
            workload,
            host,
            &layout,
            &self.config.kernel,
            &self.config.initramfs,
            &inside,
        )
    }
}

/// Guest memory of a workload in MiB: its memory limit, at least 128 MiB.
fn guest_mem_mib(workload: &Workload) -> u64 {
    ((workload.spec.resources.memory_limit_bytes.max(0) as u64) >> 20).max(128)
}

/// Memory limit of the VMM's cgroup under the jailer: guest memory plus 64 MiB for
/// the VMM itself.
fn vmm_memory_limit(workload: &Workload) -> u64 {
    (guest_mem_mib(workload) + 64) << 20
}

/// CPU weight of the VMM's cgroup (DESIGN §5): the spec's `cpu_weight`, else
/// `cpu_request × 100`, within 1..=10000.
fn cpu_weight(workload: &Workload) -> u32 {
    let r = &workload.spec.resources;
    r.cpu_weight
        .unwrap_or_else(|| (r.cpu_request * 100.0).round().clamp(1.0, 10_000.0) as u32)
        .clamp(1, 10_000)
}

/// Builds the API configuration of a VM.
fn vm_configuration(
    id: &InstanceId,
    workload: &Workload,
    host: &PreparedHost,
    layout: &Layout,
    kernel: &Path,
    initramfs: &Path,
    inside: &dyn Fn(&Path) -> String,
) -> VmConfiguration {
    let r = &workload.spec.resources;
    let vcpus = r
        .vcpu_count
        .unwrap_or_else(|| r.cpu_request.ceil().max(1.0) as u32)
        .clamp(1, 32);
    let mem_mib = guest_mem_mib(workload);
    let mut drives = vec![
        api::Drive {
            drive_id: "vda".into(),
            path_on_host: inside(&host.root_disk),
            is_root_device: false,
            is_read_only: true,
            cache_type: None,
        },
        api::Drive {
            drive_id: "vdb".into(),
            path_on_host: inside(&host.scratch_disk),
            is_root_device: false,
            is_read_only: false,
            cache_type: None,
        },
    ];
    for (i, (_, d)) in host.volumes.iter().enumerate() {
        let letter = (b'c' + (i as u8).min(23)) as char;
        drives.push(api::Drive {
            drive_id: format!("vd{letter}"),
            path_on_host: inside(&d.path),
            is_root_device: false,
            is_read_only: d.read_only,
            cache_type: None,
        });
    }
    let interfaces = host
        .tap
        .iter()
        .map(|t| api::NetworkInterface {
            iface_id: "eth0".into(),
            host_dev_name: t.clone(),
            guest_mac: Some(guest_mac(id)),
        })
        .collect();
    VmConfiguration {
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
            vcpu_count: vcpus,
            mem_size_mib: mem_mib,
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
    }
}

/// The guest config of the handshake (DESIGN §6).
pub fn guest_config(
    workload: &Workload,
    host: &PreparedHost,
    secrets: Option<&crate::secrets::SecretMaterial>,
) -> gp::Config {
    let s = &workload.spec;
    let (argv, env, cwd) = match &host.process {
        Some(p) => (p.argv.clone(), p.env.clone(), Some(p.cwd.clone())),
        None => (
            s.command.clone(),
            s.env_vars.clone().unwrap_or_default(),
            s.workdir.clone(),
        ),
    };
    let network = host.guest_network.clone().or_else(|| {
        s.network
            .overlay_ipv6
            .parse::<IpAddr>()
            .ok()
            .map(|address| gp::NetworkConfig {
                address,
                prefix_len: 128,
                gateway: s.network.gateway_ipv6.parse().ok(),
                mtu: s.network.mtu.unwrap_or(1420),
                dns: s
                    .network
                    .dns
                    .iter()
                    .flatten()
                    .filter_map(|d| d.parse().ok())
                    .collect(),
                ipv4: None,
            })
    });
    let mut mounts: Vec<gp::MountConfig> = s
        .mounts
        .iter()
        .flatten()
        .map(|m| gp::MountConfig {
            volume_id: m.volume_id.clone(),
            mount_path: m.mount_path.clone(),
            read_only: m.read_only,
            filesystem: m.filesystem.clone(),
        })
        .collect();
    mounts.sort_by(|a, b| a.volume_id.cmp(&b.volume_id));
    let secrets = s.secrets.as_ref().map(|sec| gp::SecretsConfig {
        required: sec.required,
        path: sec.mount_path.clone(),
        mode: sec.mode.unwrap_or(0o400),
        uid: sec.uid,
        gid: sec.gid,
        data: secrets
            .map(|m| gp::SecretsData::new(String::from_utf8_lossy(m.bytes()).into_owned())),
    });
    gp::Config {
        config_version: gp::CONFIG_VERSION.to_string(),
        instance_id: s.instance_id.clone(),
        generation: i64::from(s.generation),
        workload: gp::WorkloadConfig {
            argv,
            cwd,
            env,
            uid: 0,
            gid: 0,
        },
        network,
        mounts,
        secrets,
    }
}

/// Links `src` into the jail as `<root>/<name>` (hard link, else a copy when `copy_ok`)
/// and gives it to the VMM's uid/gid.
fn link_into_jail(
    src: &Path,
    root: &Path,
    uid: u32,
    gid: u32,
    copy_ok: bool,
) -> Result<(), String> {
    let name = src
        .file_name()
        .ok_or_else(|| format!("{} has no file name", src.display()))?;
    let dst = root.join(name);
    let _ = std::fs::remove_file(&dst);
    if let Err(e) = std::fs::hard_link(src, &dst) {
        if !copy_ok {
            return Err(format!(
                "cannot hard-link {} into the jail {}: {e}",
                src.display(),
                root.display()
            ));
        }
        std::fs::copy(src, &dst).map_err(|e| {
            format!(
                "cannot copy {} into the jail {}: {e}",
                src.display(),
                root.display()
            )
        })?;
    }
    chown(&dst, uid, gid)
}

fn chown(p: &Path, uid: u32, gid: u32) -> Result<(), String> {
    rustix::fs::chown(
        p,
        Some(rustix::fs::Uid::from_raw(uid)),
        Some(rustix::fs::Gid::from_raw(gid)),
    )
    .map_err(|e| format!("cannot chown {} to {uid}:{gid}: {e}", p.display()))
}

/// `what` followed by the last lines of the VMM's log and the guest console, so every
/// failure carries the VMM's own evidence.
fn with_log_tail<P: AsRef<Path>>(what: String, logs: &[P]) -> String {
    let tail = logs
        .iter()
        .filter_map(|p| process::last_lines(p.as_ref(), 5))
        .collect::<Vec<_>>()
        .join(" | ");
    if tail.is_empty() {
        what
    } else {
        format!("{what}; last VMM log lines: {tail}")
    }
}

fn vmm_failure(what: String, logs: &[&Path]) -> RuntimeError {
    RuntimeError::VmmStart(with_log_tail(what, logs))
}

/// Kills a VMM we spawned and reaps it (bounded).
async fn kill_child(child: &mut tokio::process::Child) {
    let _ = child.start_kill();
    let _ = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
}

#[async_trait]
impl Runtime for FirecrackerRuntime {
    fn kind(&self) -> &'static str {
        "firecracker"
    }

    async fn prepare(&self, id: &InstanceId, workload: &Workload) -> Result<(), RuntimeError> {
        // A host that cannot run VMMs fails the instance before pulling anything.
        self.config.check_host().map_err(RuntimeError::VmmStart)?;
        let dir = self.instance_dir(id);
        self.ledger_add(id, "instance_dir", dir.display().to_string(), None)
            .await;
        std::fs::create_dir_all(&dir)
            .map_err(|e| RuntimeError::VmmStart(format!("cannot create {}: {e}", dir.display())))?;
        let prepared = self.host.prepare(id, workload, &dir).await?;
        lock(&self.prepared).insert(id.clone(), prepared);
        Ok(())
    }

    async fn start(
        &self,
        id: &InstanceId,
        workload: &Workload,
        boot: BootContext,
    ) -> Result<VmHandle, RuntimeError> {
        let resolved = self.config.check_host().map_err(RuntimeError::VmmStart)?;
        let prepared = match lock(&self.prepared).get(id).cloned() {
            Some(p) => p,
            None => {
                return Err(RuntimeError::VmmStart(format!(
                    "instance {id} was not prepared"
                )))
            }
        };
        let layout = self.layout(id, &resolved);
        std::fs::create_dir_all(&layout.dir).map_err(|e| {
            RuntimeError::VmmStart(format!("cannot create {}: {e}", layout.dir.display()))
        })?;
        // Jail: the VMM sees only what is linked into it.
        let (uid, gid) = (self.config.uid, self.config.gid);
        let inside_jail = layout.chroot.is_some();
        if let Some(root) = &layout.chroot {
            self.ledger_add(id, "chroot", root.display().to_string(), None)
                .await;
            std::fs::create_dir_all(root.join("run")).map_err(|e| {
                RuntimeError::VmmStart(format!("cannot create jail {}: {e}", root.display()))
            })?;
            let mut links: Vec<(&Path, bool)> = vec![
                (&self.config.kernel, true),
                (&self.config.initramfs, true),
                (&prepared.root_disk, true),
                (&prepared.scratch_disk, false),
            ];
            for (_, d) in &prepared.volumes {
                links.push((&d.path, false));
            }
            for (p, copy_ok) in links {
                link_into_jail(p, root, uid, gid, copy_ok).map_err(RuntimeError::VmmStart)?;
            }
            chown(&root.join("run"), uid, gid).map_err(RuntimeError::VmmStart)?;
        }
        for p in [&layout.api_sock, &layout.vsock_uds] {
            let _ = std::fs::remove_file(p);
        }
        for p in [&layout.fc_log, &layout.metrics] {
            std::fs::write(p, b"").map_err(|e| {
                RuntimeError::VmmStart(format!("cannot create {}: {e}", p.display()))
            })?;
            if inside_jail {
                chown(p, uid, gid).map_err(RuntimeError::VmmStart)?;
            }
        }
        // The guest connects once, early: listen before the VMM exists.
        let listener = bind_guest_listener(&layout.vsock_uds).map_err(|e| {
            RuntimeError::VmmStart(format!(
                "cannot listen on {}: {e}",
                crate::guest::guest_socket_path(&layout.vsock_uds).display()
            ))
        })?;

        let launch = match &resolved.jailer {
            Some(jailer) => {
                if let process::JailerCgroups::Unavailable(why) = &self.jailer_cgroups {
                    return Err(RuntimeError::VmmStart(format!(
                        "jailed VMs cannot run on this host: {why}"
                    )));
                }
                process::Launch {
                    program: jailer.clone(),
                    args: process::jailer_args(&process::JailerArgs {
                        exec_file: &resolved.binary,
                        id: &vmm_id(id),
                        uid,
                        gid,
                        chroot_base_dir: &self.config.chroot_base_dir,
                        cgroups: &self.jailer_cgroups,
                        memory_max: vmm_memory_limit(workload),
                        cpu_weight: cpu_weight(workload),
                    }),
                    console_log: layout.console_log.clone(),
                }
            }
            None => process::Launch {
                program: resolved.binary.clone(),
                args: process::firecracker_args(&layout.api_sock, &vmm_id(id)),
                console_log: layout.console_log.clone(),
            },
        };
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
        let record_path = layout.dir.join("vmm.json");
        self.ledger_add(id, "process", record_path.display().to_string(), None)
            .await;
        let spawned = process::spawn(&launch).map_err(RuntimeError::VmmStart)?;
        let mut child = spawned.child;
        record.process = Some(spawned.id);
        let detail = serde_json::to_string(&spawned.id).ok();
        self.ledger_add(id, "process", record_path.display().to_string(), detail)
            .await;
        if let Err(e) = write_record(&record_path, &record) {
            kill_child(&mut child).await;
            return Err(RuntimeError::VmmStart(e));
        }
        let logs = [layout.fc_log.as_path(), layout.console_log.as_path()];
        let boot_timeout = Duration::from_secs(self.config.boot_timeout);
        match process::wait_for_socket(&layout.api_sock, &mut child, boot_timeout).await {
            Ok(()) => {}
            Err(process::SocketWait::Timeout) => {
                kill_child(&mut child).await;
                return Err(vmm_failure(
                    format!(
                        "firecracker API socket {} did not appear within {boot_timeout:?}",
                        layout.api_sock.display()
                    ),
                    &logs,
                ));
            }
            Err(process::SocketWait::Exited(status)) => {
                let (c, s) = process::split_status(status);
                return Err(vmm_failure(
                    format!(
                        "{} exited before serving its API: {}",
                        launch.program.display(),
                        process::describe_exit(c, s)
                    ),
                    &logs,
                ));
            }
        }
        let client = self.api(&layout.api_sock);
        let jail_name = |p: &Path| -> String {
            if inside_jail {
                format!(
                    "/{}",
                    p.file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default()
                )
            } else {
                p.display().to_string()
            }
        };
        let vm_config = vm_configuration(
            id,
            workload,
            &prepared,
            &layout,
            &self.config.kernel,
            &self.config.initramfs,
            &jail_name,
        );
        for req in vm_config.requests() {
            if let Err(e) = client.send(&req).await {
                // Give the VMM a moment to write its exit reason, then kill it.
                tokio::time::sleep(Duration::from_millis(50)).await;
                let exit = match child.try_wait() {
                    Ok(Some(st)) => {
                        let (c, s) = process::split_status(st);
                        format!(" (VMM {})", process::describe_exit(c, s))
                    }
                    _ => String::new(),
                };
                kill_child(&mut child).await;
                return Err(vmm_failure(format!("{e}{exit}"), &logs));
            }
        }

        let config = guest_config(workload, &prepared, boot.secrets.as_ref());
        let handle = VmHandle {
            instance_id: id.clone(),
            generation: workload.spec.generation,
            boot_id: boot.boot_id,
            spec_hash: workload.spec_hash.clone(),
        };
        let state = spawn_monitor(
            handle.clone(),
            record,
            Exit::Child(child),
            listener,
            config,
            boot_timeout,
            vec![layout.fc_log.clone(), layout.console_log.clone()],
        );
        lock(&self.vms).insert(id.clone(), state);
        Ok(handle)
    }

    async fn next_event(&self, vm: &VmHandle) -> VmEvent {
        let state = lock(&self.vms).get(&vm.instance_id).cloned();
        let Some(state) = state.filter(|s| s.handle.boot_id == vm.boot_id) else {
            return VmEvent::VmmExited {
                code: None,
                detail: "no such VM (stopped or replaced)".into(),
            };
        };
        let mut rx = state.events.lock().await;
        match rx.recv().await {
            Some(ev) => ev,
            None => std::future::pending().await,
        }
    }

    async fn probe_health(&self, vm: &VmHandle, check: &HealthSpec) -> Result<(), String> {
        let addr = lock(&self.vms)
            .get(&vm.instance_id)
            .and_then(|s| s.record.address);
        let Some(addr) = addr else {
            return Err(format!("instance {}: no address to probe", vm.instance_id));
        };
        crate::health::probe(addr, check).await
    }

    async fn stop(&self, vm: &VmHandle, grace: Duration) -> StopOutcome {
        let state = lock(&self.vms).get(&vm.instance_id).cloned();
        let Some(state) = state else {
            return StopOutcome {
                graceful: true,
                exit_code: None,
            };
        };
        let outcome = stop_vm(&state, grace, &self.api(&state.record.api_sock)).await;
        lock(&self.vms).remove(&vm.instance_id);
        state.monitor.abort();
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
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(found),
            Err(e) => {
                return Err(RuntimeError::VmmStart(format!(
                    "cannot list {}: {e}",
                    root.display()
                )))
            }
        };
        for entry in entries.flatten() {
            let path = entry.path().join("vmm.json");
            let Ok(bytes) = std::fs::read(&path) else {
                continue;
            };
            let Ok(rec) = serde_json::from_slice::<VmmRecord>(&bytes) else {
                tracing::warn!(path = %path.display(), "ignoring unreadable VMM record");
                continue;
            };
            let Ok(id) = InstanceId::parse(&rec.instance_id) else {
                continue;
            };
            if lock(&self.vms).contains_key(&id) {
                continue;
            }
            let Some(pid) = rec.process.filter(|p| p.is_alive()) else {
                tracing::info!(instance = %id, "recorded VMM is gone; not adopting");
                let _ = std::fs::remove_file(&path);
                continue;
            };
            // Probe: the socket must answer and name this instance.
            match self.api(&rec.api_sock).instance_info().await {
                Ok(info) if info.id == vmm_id(&id) => {}
                other => {
                    let why = match other {
                        Ok(info) => format!("API answers for {:?}", info.id),
                        Err(e) => e.to_string(),
                    };
                    tracing::warn!(instance = %id, pid = pid.pid, why, "VMM does not answer as expected; killing it");
                    pid.signal(rustix::process::Signal::KILL);
                    let _ = std::fs::remove_file(&path);
                    continue;
                }
            }
            let handle = VmHandle {
                instance_id: id.clone(),
                generation: rec.generation,
                boot_id: rec.boot_id.clone(),
                spec_hash: rec.spec_hash.clone(),
            };
            // A running guest reconnects with `hello {resumed: true}` and does not apply
            // the config again; the config sent carries no secrets.
            let listener = match bind_guest_listener(&rec.vsock_uds) {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!(instance = %id, error = %e, "cannot listen for the adopted guest");
                    continue;
                }
            };
            let config = gp::Config {
                config_version: gp::CONFIG_VERSION.to_string(),
                instance_id: rec.instance_id.clone(),
                generation: i64::from(rec.generation),
                workload: gp::WorkloadConfig {
                    argv: vec![],
                    cwd: None,
                    env: Default::default(),
                    uid: 0,
                    gid: 0,
                },
                network: None,
                mounts: vec![],
                secrets: None,
            };
            let dir = entry.path();
            let logs = vec![
                rec.chroot
                    .as_ref()
                    .map(|r| r.join("firecracker.log"))
                    .unwrap_or_else(|| dir.join("firecracker.log")),
                dir.join("console.log"),
            ];
            let state = spawn_monitor(
                handle.clone(),
                rec,
                Exit::Adopted(pid),
                listener,
                config,
                Duration::from_secs(self.config.boot_timeout),
                logs,
            );
            lock(&self.vms).insert(id, state);
            found.push(handle);
        }
        found.sort_by(|a, b| a.instance_id.cmp(&b.instance_id));
        if self.config.jailer.is_some() {
            self.remove_orphan_cgroups(&found).await;
        }
        Ok(found)
    }

    fn current_vm(&self, id: &InstanceId) -> Option<VmHandle> {
        lock(&self.vms).get(id).map(|s| s.handle.clone())
    }

    async fn cleanup(&self, id: &InstanceId) -> Result<(), RuntimeError> {
        let dir = self.instance_dir(id);
        if let Some(state) = lock(&self.vms).remove(id) {
            if let Some(p) = state.record.process {
                p.signal(rustix::process::Signal::KILL);
            }
            state.monitor.abort();
        }
        // A record left by an earlier run: make sure its VMM is gone.
        let record: Option<VmmRecord> = std::fs::read(dir.join("vmm.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        if let Some(p) = record.as_ref().and_then(|r| r.process) {
            p.signal(rustix::process::Signal::KILL);
        }
        lock(&self.prepared).remove(id);
        self.host.release(id, &dir).await?;
        let mut chroots = vec![];
        if let Some(root) = record.and_then(|r| r.chroot) {
            chroots.push(root);
        }
        if let Ok(host) = self.config.check_host() {
            if host.jailer.is_some() {
                chroots.push(process::chroot_dir(
                    &self.config.chroot_base_dir,
                    &host.binary,
                    &vmm_id(id),
                ));
            }
        }
        if self.config.jailer.is_some() {
            for dir in self.jailer_cgroups.dirs(&vmm_id(id)) {
                remove_cgroup_dir(&dir).await?;
            }
        }
        for root in chroots {
            // `<base>/firecracker/<id>/root`: remove `<base>/firecracker/<id>`.
            let jail = root.parent().unwrap_or(&root).to_path_buf();
            match std::fs::remove_dir_all(&jail) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(RuntimeError::VmmStart(format!(
                        "cannot remove jail {}: {e}",
                        jail.display()
                    )))
                }
            }
        }
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(RuntimeError::VmmStart(format!(
                    "cannot remove {}: {e}",
                    dir.display()
                )))
            }
        }
        if let Some(store) = &self.ledger {
            let iid = id.to_string();
            store
                .call(move |s| {
                    for r in s.resources()?.into_iter().filter(|r| r.instance_id == iid) {
                        s.resource_remove(&r.kind, &r.name)?;
                    }
                    Ok(())
                })
                .await
                .map_err(|e| RuntimeError::VmmStart(format!("resource ledger: {e}")))?;
        }
        Ok(())
    }
}

/// Removes a cgroup directory the jailer made for a VMM (idempotent). The VMM was
/// killed just before: the kernel refuses the removal (`EBUSY`) until its last task is
/// gone, so this retries for up to 2 s.
async fn remove_cgroup_dir(dir: &Path) -> Result<(), RuntimeError> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    loop {
        match std::fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) if tokio::time::Instant::now() < deadline && e.raw_os_error() == Some(16) => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => {
                return Err(RuntimeError::VmmStart(format!(
                    "cannot remove the VMM's cgroup {}: {e}",
                    dir.display()
                )))
            }
        }
    }
}

fn write_record(path: &Path, rec: &VmmRecord) -> Result<(), String> {
    let json = serde_json::to_vec(rec).map_err(|e| e.to_string())?;
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, json).map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, path).map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// How the monitor learns that the VMM exited.
enum Exit {
    /// Our child: `wait()` gives the exit status.
    Child(tokio::process::Child),
    /// Adopted after a restart: poll pid + start time.
    Adopted(ProcessId),
}

impl Exit {
    async fn wait(self) -> (Option<i32>, Option<i32>) {
        match self {
            Exit::Child(mut c) => match c.wait().await {
                Ok(st) => process::split_status(st),
                Err(_) => (None, None),
            },
            Exit::Adopted(p) => {
                while p.is_alive() {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                (None, None)
            }
        }
    }
}

/// Starts the task that turns guest messages and the VMM's exit into [`VmEvent`]s
/// and forwards stop requests to the guest.
fn spawn_monitor(
    handle: VmHandle,
    record: VmmRecord,
    exit: Exit,
    listener: tokio::net::UnixListener,
    config: gp::Config,
    handshake_deadline: Duration,
    logs: Vec<PathBuf>,
) -> Arc<VmState> {
    let (ev_tx, ev_rx) = mpsc::unbounded_channel();
    let (stop_tx, mut stop_rx) = mpsc::unbounded_channel::<Duration>();
    let (exit_tx, exit_rx) = watch::channel(None);
    let adopted = matches!(exit, Exit::Adopted(_));
    let instance = handle.instance_id.to_string();
    let workload_exit = Arc::new(Mutex::new(None));
    let workload_exit_w = workload_exit.clone();
    let monitor = tokio::spawn(async move {
        let exited = exit.wait();
        tokio::pin!(exited);
        let guest = async {
            // An adopted VM's guest reconnects (every second, `resumed`) whenever it
            // likes: keep listening instead of failing a healthy VM.
            let mut session = loop {
                match accept_guest(&listener, &instance, config.clone(), handshake_deadline).await {
                    Ok(s) => break s,
                    Err(e) if adopted => {
                        tracing::debug!(instance = %instance, error = %e, "adopted guest has not reconnected yet");
                    }
                    Err(e) => {
                        // The VMM's own log and the guest console say why the guest
                        // never spoke (kernel panic, bad initramfs, KVM error …).
                        let detail = with_log_tail(e.to_string(), &logs);
                        let err = match e.reason() {
                            crate::instance::ReasonCode::FirecrackerStartFailed => {
                                RuntimeError::VmmStart(detail)
                            }
                            reason => RuntimeError::Guest { reason, detail },
                        };
                        let _ = ev_tx.send(VmEvent::Failed(err));
                        return std::future::pending::<()>().await;
                    }
                }
            };
            drop(listener);
            loop {
                tokio::select! {
                    ev = session.next_event() => match ev {
                        Ok(GuestEvent::WorkloadStarted { .. }) => {
                            let _ = ev_tx.send(VmEvent::WorkloadStarted);
                        }
                        Ok(GuestEvent::ConfigApplied) => {}
                        Ok(GuestEvent::Exited { code, signal, oom_killed }) => {
                            let code = code.unwrap_or_else(|| 128 + signal.unwrap_or(0));
                            *lock(&workload_exit_w) = Some(code);
                            let _ = ev_tx.send(VmEvent::Exited { code, oom_killed });
                        }
                        Ok(GuestEvent::Failed { reason, detail }) => {
                            let _ = ev_tx.send(VmEvent::Failed(RuntimeError::Guest { reason, detail }));
                        }
                        // The channel ended: the VMM's exit says the rest.
                        Err(_) => return std::future::pending::<()>().await,
                    },
                    Some(deadline) = stop_rx.recv() => {
                        if let Err(e) = session.request_stop(deadline).await {
                            tracing::warn!(instance = %instance, error = %e, "guest stop request failed");
                        }
                    }
                }
            }
        };
        tokio::pin!(guest);
        // `guest` never completes (it ends in `pending`): the VMM's exit ends the task.
        let (code, signal) = tokio::select! {
            r = &mut exited => r,
            _ = &mut guest => (None, None),
        };
        let _ = exit_tx.send(Some((code, signal)));
        let detail = with_log_tail(process::describe_exit(code, signal), &logs);
        let _ = ev_tx.send(VmEvent::VmmExited { code, detail });
    });
    Arc::new(VmState {
        handle,
        record,
        events: tokio::sync::Mutex::new(ev_rx),
        stop_tx,
        exited: exit_rx,
        workload_exit,
        monitor,
    })
}

/// Graceful stop: guest stop request at once; `SendCtrlAltDel` at three quarters of
/// `grace` if the VMM still runs; SIGKILL at `grace`.
async fn stop_vm(state: &VmState, grace: Duration, api: &ApiClient) -> StopOutcome {
    let mut exited = state.exited.clone();
    let start = tokio::time::Instant::now();
    let wait_exit = |until: tokio::time::Instant| {
        let mut rx = exited.clone();
        async move {
            tokio::time::timeout_at(until, rx.wait_for(|v| v.is_some()))
                .await
                .is_ok()
        }
    };
    if state.exited.borrow().is_some() {
        return StopOutcome {
            graceful: true,
            exit_code: *lock(&state.workload_exit),
        };
    }
    let _ = state.stop_tx.send(grace);
    if wait_exit(start + grace.mul_f32(0.75)).await {
        return StopOutcome {
            graceful: true,
            exit_code: *lock(&state.workload_exit),
        };
    }
    if let Err(e) = api.action(ActionType::SendCtrlAltDel).await {
        tracing::warn!(instance = %state.handle.instance_id, error = %e, "SendCtrlAltDel failed");
    }
    if wait_exit(start + grace).await {
        return StopOutcome {
            graceful: true,
            exit_code: *lock(&state.workload_exit),
        };
    }
    if let Some(p) = state.record.process {
        tracing::warn!(instance = %state.handle.instance_id, pid = p.pid, "VMM still running at the stop deadline: SIGKILL");
        p.signal(rustix::process::Signal::KILL);
    }
    let _ = tokio::time::timeout(Duration::from_secs(5), exited.wait_for(|v| v.is_some())).await;
    // `exit_code` is the workload's alone: a killed VMM says nothing about it.
    StopOutcome {
        graceful: false,
        exit_code: *lock(&state.workload_exit),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn config_rejects_zero_boot_timeout_and_root_under_jailer() {
        let mut c = FirecrackerConfig {
            boot_timeout: 0,
            ..Default::default()
        };
        assert!(c.validate().is_err());
        c.boot_timeout = 5;
        c.jailer = Some("jailer".into());
        c.uid = 0;
        assert!(c.validate().is_err());
    }
}
