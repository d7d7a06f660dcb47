//! The Linux part of the qemu runtime: QEMU's command line, vhost-device-vsock, QMP,
//! and the QEMU-specific steps of start, stop, recovery and cleanup (see the parent
//! module for the contract). Process identity, spawning, the guest config, the
//! per-VM monitor, the host cgroup and the root disk come from the shared VMM layer
//! ([`crate::runtime::vmm`]).

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use super::{Accel, QemuConfig};
use crate::cgroup::{Entry, Group};
use crate::guest::{bind_guest_listener, guest_socket_path};
use crate::image::ImageService;
use crate::runtime::host::{Host, HostConfig, HostPrep};
use crate::runtime::vmm::cgroup::VmmCgroups;
use crate::runtime::vmm::logs::Evidence;
use crate::runtime::vmm::monitor::{Monitor, MonitorArgs, Tracked, VmTable};
use crate::runtime::vmm::process::{self as vproc, ProcessId, SocketWait, Watch};
use crate::runtime::vmm::workload_logs::{self, LogSink, WorkloadLogs};
use crate::runtime::vmm::{guest, rootdisk};
use crate::runtime::{BootContext, Runtime, RuntimeError, StopOutcome, VmEvent, VmHandle};
use crate::spec::{HealthSpec, InstanceId, Workload};

/// Ledger kind of this runtime's VM record.
const KIND_PROCESS: &str = "process";

/// A process identity: pid and start time (the VMM layer's [`ProcessId`]).
pub type ProcId = ProcessId;

/// What the ledger says about a VM's processes (the `detail` of its `process` row).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct VmRecord {
    instance_id: String,
    generation: i32,
    boot_id: String,
    spec_hash: String,
    qemu: Option<ProcessId>,
    vhost: Option<ProcessId>,
    /// Where the health check connects.
    address: Option<IpAddr>,
    /// The jail and uid the VMM processes run in (absent: unsandboxed).
    #[serde(default)]
    sandbox: Option<Sandbox>,
    /// The kernel and initramfs it booted from: the agent keeps their artifact set
    /// while the VM runs (`crate::guest_artifacts`).
    #[serde(default)]
    kernel: Option<PathBuf>,
    #[serde(default)]
    initramfs: Option<PathBuf>,
    /// The root layer disks it booted from, bottom first (`describe` shows them).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    root_layers: Vec<PathBuf>,
}

/// The confinement of one VM's processes: its jail directory (their sockets; QEMU's
/// chroot below it) and the uid/gid they run as.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Sandbox {
    dir: PathBuf,
    uid: u32,
}

/// QEMU's seccomp sandbox. `elevateprivileges=allow` is a deliberate deviation from
/// `deny`: QEMU 7.2 installs the filter before `-runas` calls setuid, so `deny` kills
/// it with SIGSYS at the drop. After the drop real, effective and saved ids are all the
/// instance's, so set*id calls cannot regain root; `spawn=deny` forbids exec (no
/// setuid binary), and the kernel sets no_new_privs.
const QEMU_SANDBOX: &str =
    "on,obsolete=deny,elevateprivileges=allow,spawn=deny,resourcecontrol=deny";

/// What `prepare` produced for an instance, used by `start`.
#[derive(Debug, Clone)]
struct Prepared {
    root: rootdisk::RootDisk,
    host: HostPrep,
}

/// What the runtime keeps about a tracked VM.
struct Vm {
    record: VmRecord,
    /// Host cgroup of its processes, removed once they are gone.
    cgroup: Option<Group>,
}

/// The qemu runtime.
pub struct QemuRuntime {
    config: QemuConfig,
    data_dir: PathBuf,
    images: ImageService,
    /// Scratch disk, volumes, tap and addresses (shared with the Firecracker runtime).
    host: Host,
    prepared: Mutex<HashMap<InstanceId, Prepared>>,
    vms: VmTable<Vm>,
    /// Host cgroups (memory, pids, cpu) for the VMM processes, when usable.
    cgroups: VmmCgroups,
    /// This agent's directory under `jail_dir` (named by a hash of the data dir, so two
    /// agents on one host never share jails).
    jails: PathBuf,
    /// What `status` says about this runtime on this host ([`Runtime::notices`]).
    notices: Vec<String>,
    /// Where the guests' log lines go.
    log_sink: LogSink,
}

/// The KVM device QEMU opens.
const KVM_DEVICE: &str = "/dev/kvm";

/// Opens the KVM device read-write, as QEMU must to use KVM.
fn open_kvm(device: &Path) -> std::io::Result<()> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(device)
        .map(drop)
}

/// What `status` says about a qemu runtime with `config` on a host whose KVM device is
/// `kvm`: software emulation chosen by `accel = "auto"`, and defences turned off.
fn qemu_notices(config: &QemuConfig, kvm: &Path, cgroups: &VmmCgroups) -> Vec<String> {
    let mut out = Vec::new();
    if config.accel == Accel::Auto {
        if let Err(e) = open_kvm(kvm) {
            out.push(format!(
                "runtime.qemu.accel = \"auto\": {} cannot be opened ({e}); VMs run under TCG, software emulation many times slower than KVM",
                kvm.display()
            ));
        }
    }
    if !config.sandbox {
        out.push(
            "runtime.qemu.sandbox = false: QEMU and vhost-device-vsock run as root, unconfined"
                .into(),
        );
    }
    out.extend(cgroups.notice());
    out
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// QEMU gives its exit codes no meaning of their own.
fn qemu_exit_meaning(_: i32) -> Option<&'static str> {
    None
}

/// The files of one VM under its instance directory.
struct Paths {
    dir: PathBuf,
    uds: PathBuf,
    vhost_sock: PathBuf,
    qmp: PathBuf,
    console: PathBuf,
}

impl Paths {
    /// The files under the instance dir `dir`; the sockets the VMM processes use go
    /// into `jail` when they run sandboxed (they cannot enter the data dir).
    fn of(dir: PathBuf, jail: Option<&Path>) -> Paths {
        let sockets = jail.unwrap_or(&dir).to_path_buf();
        Paths {
            uds: sockets.join("vsock.sock"),
            vhost_sock: sockets.join("vhost.sock"),
            qmp: dir.join("qmp.sock"),
            console: dir.join("console.log"),
            dir,
        }
    }

    fn evidence(&self) -> Evidence {
        Evidence::new(vec![
            ("console", self.console.clone()),
            ("qemu", self.dir.join("qemu.log")),
            ("vhost-device-vsock", self.dir.join("vhost.log")),
        ])
    }
}

impl QemuRuntime {
    /// A qemu runtime; fails on a config that did not pass validation (bad pool).
    /// Detects host cgroups (`runtime.qemu.cgroup`); where they are not usable it warns
    /// once and VMMs run without.
    pub fn new(
        config: QemuConfig,
        data_dir: PathBuf,
        images: ImageService,
        ledger: crate::state::Store,
    ) -> Result<Self, String> {
        let host = Host::new(
            &data_dir,
            ledger,
            HostConfig {
                ipv4_pool: config.ipv4_pool.clone(),
                volume_default_bytes: config.volume_default_bytes,
            },
        )
        .map_err(|e| format!("runtime.qemu.{e}"))?;
        let cgroups = VmmCgroups::detect(
            config.cgroup,
            config.cgroup_parent.as_deref(),
            "runtime.qemu.cgroup",
        );
        let tag = {
            use sha2::Digest as _;
            hex::encode(sha2::Sha256::digest(
                data_dir.as_os_str().as_encoded_bytes(),
            ))
        };
        let jails = config.jail_dir.join(&tag[..12]);
        let notices = qemu_notices(&config, Path::new(KVM_DEVICE), &cgroups);
        Ok(QemuRuntime {
            jails,
            notices,
            cgroups,
            config,
            data_dir,
            images,
            host,
            prepared: Mutex::new(HashMap::new()),
            vms: VmTable::default(),
            log_sink: LogSink::default(),
        })
    }

    /// Sends the guests' log lines to `sink` (its shipper and file cap).
    pub fn with_workload_logs(mut self, sink: LogSink) -> Self {
        self.log_sink = sink;
        self
    }

    /// The log stream of a VM whose vsock socket is `uds` (given to `owner`).
    fn workload_logs(
        &self,
        id: &InstanceId,
        uds: &Path,
        owner: Option<(u32, u32)>,
    ) -> Result<WorkloadLogs, String> {
        workload_logs::listen(
            id.as_str(),
            uds,
            &self.instance_dir(id),
            &self.log_sink,
            |sock| match owner {
                Some((uid, gid)) => std::os::unix::fs::chown(sock, Some(uid), Some(gid))
                    .map_err(|e| format!("chown: {e}")),
                None => Ok(()),
            },
        )
    }

    fn instance_dir(&self, id: &InstanceId) -> PathBuf {
        self.data_dir.join("instances").join(id.as_str())
    }

    /// The console log of an instance.
    pub fn console_path(&self, id: &InstanceId) -> PathBuf {
        self.instance_dir(id).join("console.log")
    }

    fn accel(&self) -> &'static str {
        match self.config.accel {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
            Accel::Auto => match open_kvm(Path::new(KVM_DEVICE)) {
                Ok(()) => "kvm",
                Err(e) => {
                    tracing::warn!(error = %e, "accel = \"auto\": /dev/kvm cannot be opened, falling back to TCG (software emulation, many times slower)");
                    "tcg"
                }
            },
        }
    }

    /// The jail of an instance: `<jail_dir>/<agent tag>/<id>`.
    fn jail_of(&self, id: &InstanceId) -> PathBuf {
        self.jails.join(id.as_str())
    }

    /// Makes a fresh jail for `id` owned by `uid` (0700; only its VMM processes and
    /// root enter it), with an empty root-owned `chroot` directory for QEMU. The jail
    /// dir and this agent's directory in it are 0711 (traversable, not listable), and
    /// every ancestor must let other users traverse it, or the VMM user could not
    /// reach its jail: then nothing is started (fail closed) and the error names the
    /// key. Needs root (chown).
    fn make_jail(&self, id: &InstanceId, uid: u32) -> Result<PathBuf, RuntimeError> {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let err =
            |what: String| RuntimeError::VmmStart(format!("runtime.qemu.jail_dir: {what}").into());
        // Missing directories on the way are made traversable (the umask is 077).
        let missing: Vec<&Path> = self.jails.ancestors().take_while(|d| !d.exists()).collect();
        for d in missing.into_iter().rev() {
            std::fs::create_dir(d)
                .or_else(|e| match e.kind() {
                    std::io::ErrorKind::AlreadyExists => Ok(()),
                    _ => Err(e),
                })
                .and_then(|()| std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o711)))
                .map_err(|e| err(format!("cannot create {}: {e}", d.display())))?;
        }
        for d in [self.config.jail_dir.as_path(), self.jails.as_path()] {
            let meta = std::fs::metadata(d).map_err(|e| err(format!("{}: {e}", d.display())))?;
            if meta.uid() != 0 {
                return Err(err(format!(
                    "{} is owned by uid {}, not root",
                    d.display(),
                    meta.uid()
                )));
            }
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o711))
                .map_err(|e| err(format!("chmod {}: {e}", d.display())))?;
        }
        for a in self.config.jail_dir.ancestors().skip(1) {
            let mode = std::fs::metadata(a).map(|m| m.mode()).unwrap_or(0);
            if mode & 0o001 == 0 {
                return Err(err(format!(
                    "{} is not traversable by other users (mode {:o}): the VMM user could not reach its jail",
                    a.display(),
                    mode & 0o7777
                )));
            }
        }
        let jail = self.jail_of(id);
        match std::fs::remove_dir_all(&jail) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(err(format!("cannot remove old {}: {e}", jail.display()))),
        }
        let made = std::fs::create_dir(&jail)
            .and_then(|()| std::os::unix::fs::chown(&jail, Some(uid), Some(uid)))
            .and_then(|()| std::fs::set_permissions(&jail, std::fs::Permissions::from_mode(0o700)))
            .and_then(|()| std::fs::create_dir(jail.join("chroot")));
        made.map_err(|e| err(format!("cannot make {}: {e}", jail.display())))?;
        Ok(jail)
    }

    async fn save(&self, id: &InstanceId, record: &VmRecord) -> Result<(), RuntimeError> {
        let detail = serde_json::to_string(record).ok();
        self.host
            .ledger_add(KIND_PROCESS, &format!("{id}/vm"), id, detail)
            .await
    }

    /// Kills the processes of every VM recorded for `id` (idempotent start, cleanup).
    async fn kill_recorded(&self, id: &InstanceId) {
        let Ok(rows) = self.host.rows().await else {
            return;
        };
        for r in rows
            .iter()
            .filter(|r| r.kind == KIND_PROCESS && r.instance_id == id.as_str())
        {
            if let Some(rec) = r
                .detail
                .as_deref()
                .and_then(|d| serde_json::from_str::<VmRecord>(d).ok())
            {
                for p in [rec.qemu, rec.vhost].into_iter().flatten() {
                    p.kill(Duration::from_secs(5)).await;
                }
            }
        }
    }

    /// Starts vhost-device-vsock (the vsock backend) and waits for its socket.
    async fn spawn_vhost(
        &self,
        paths: &Paths,
        entry: Option<&Entry>,
        identity: Option<(u32, u32)>,
    ) -> Result<ProcessId, RuntimeError> {
        let args = vec![
            "--vm".to_string(),
            format!(
                "guest-cid=3,socket={},uds-path={}",
                paths.vhost_sock.display(),
                paths.uds.display()
            ),
        ];
        let log = paths.dir.join("vhost.log");
        let program = match identity {
            Some(_) => vproc::resolve_for_others(&self.config.vhost_device_vsock).map_err(|e| {
                RuntimeError::VmmStart(format!("runtime.qemu.vhost_device_vsock: {e}").into())
            })?,
            None => PathBuf::from(&self.config.vhost_device_vsock),
        };
        let spawned = vproc::spawn_detached_as(&program, &args, &log, entry, identity)
            .map_err(RuntimeError::VmmStart)?;
        let id = spawned.id;
        // Not reaped while we live: stop and cleanup SIGKILL it and poll /proc.
        let mut watch = Watch::Child(spawned.child);
        match vproc::wait_for_socket(
            &paths.vhost_sock,
            &mut watch,
            Duration::from_secs(10),
            false,
        )
        .await
        {
            Ok(()) => Ok(id),
            Err(e) => {
                watch.kill().await;
                let what = match e {
                    SocketWait::Timeout => format!("no {} within 10 s", paths.vhost_sock.display()),
                    SocketWait::Exited(st) => {
                        format!("exited ({})", st.describe(qemu_exit_meaning))
                    }
                };
                Err(RuntimeError::VmmStart(
                    paths
                        .evidence()
                        .attach(format!("vhost-device-vsock: {what}"))
                        .into(),
                ))
            }
        }
    }
}

/// virtio-mmio transports of QEMU's `microvm` machine (with its second I/O APIC, the
/// default): one per virtio device.
const MICROVM_VIRTIO_TRANSPORTS: usize = 24;

/// QEMU's command line for a prepared instance.
fn qemu_args(
    id: &InstanceId,
    w: &Workload,
    p: &Prepared,
    paths: &Paths,
    accel: &str,
    (kernel, initramfs): (&Path, &Path),
    sandbox: Option<&Sandbox>,
) -> Result<Vec<String>, RuntimeError> {
    let mem_mib = guest::guest_mem_mib(w);
    let mut args: Vec<String> = vec![
        "-M".into(),
        format!("microvm,accel={accel},memory-backend=mem"),
        "-m".into(),
        format!("{mem_mib}M"),
        "-smp".into(),
        guest::vcpus(w).to_string(),
        "-object".into(),
        format!("memory-backend-memfd,id=mem,size={mem_mib}M,share=on"),
    ];
    if accel == "tcg" {
        // The guest calibrates its TSC against instruction counts, not a loaded host.
        args.extend(["-icount".into(), "shift=auto".into()]);
    }
    args.extend(["-no-reboot", "-nodefaults", "-no-user-config", "-nographic"].map(String::from));
    args.extend([
        // append=on: the agent can cut the log back while QEMU writes it.
        "-chardev".into(),
        format!("file,id=con0,path={},append=on", paths.console.display()),
        "-serial".into(),
        "chardev:con0".into(),
        "-qmp".into(),
        format!("unix:{},server=on,wait=off", paths.qmp.display()),
        "-kernel".into(),
        kernel.display().to_string(),
        "-initrd".into(),
        initramfs.display().to_string(),
        "-append".into(),
        format!("console=ttyS0 reboot=t panic=1 platform.instance_id={id}"),
        "-chardev".into(),
        format!("socket,id=vsock0,path={}", paths.vhost_sock.display()),
        "-device".into(),
        "vhost-user-vsock-device,chardev=vsock0".into(),
    ]);
    // The virtio-mmio transports are probed in the order the devices are given, so
    // the guest names the disks in this order (`vda`, `vdb`, …).
    let volumes: Vec<(PathBuf, bool)> = p
        .host
        .volumes
        .iter()
        .map(|(_, path, ro)| (path.clone(), *ro))
        .collect();
    let disks = rootdisk::vm_disks(&p.root.layers, &p.host.scratch, &volumes)?;
    // The disks, the network device and the vsock device each take a transport.
    let devices = disks.len() + 2;
    if devices > MICROVM_VIRTIO_TRANSPORTS {
        return Err(RuntimeError::VmmStart(
            format!(
                "the VM needs {devices} virtio devices ({} root layer disks, the scratch disk, {} volumes, network, vsock); QEMU's microvm machine has {MICROVM_VIRTIO_TRANSPORTS}",
                p.root.layers.len(),
                volumes.len()
            )
            .into(),
        ));
    }
    for d in disks {
        args.push("-drive".into());
        args.push(format!(
            "id={},file={},format=raw,if=none{}",
            d.name,
            d.path.display(),
            if d.read_only { ",readonly=on" } else { "" }
        ));
        args.push("-device".into());
        args.push(format!("virtio-blk-device,drive={}", d.name));
    }
    args.extend([
        "-netdev".into(),
        format!(
            "tap,id=net0,ifname={},script=no,downscript=no",
            p.host.tap.tap
        ),
        "-device".into(),
        // The MAC fixes the guest's link-local address, the only one its tap admits.
        format!(
            "virtio-net-device,netdev=net0,mac={}",
            crate::network::mac_string(p.host.tap.guest_mac)
        ),
    ]);
    if let Some(sb) = sandbox {
        // Everything above is opened as root during start-up; then QEMU chroots into
        // an empty directory and drops to the instance's uid before the guest runs.
        args.extend([
            "-runas".into(),
            format!("{}:{}", sb.uid, sb.uid),
            "-chroot".into(),
            sb.dir.join("chroot").display().to_string(),
            "-sandbox".into(),
            QEMU_SANDBOX.into(),
        ]);
    }
    Ok(args)
}

/// Asks QEMU to quit over QMP (bounded by 2 s).
async fn qmp_quit(sock: &Path) -> Result<(), String> {
    let fut = async {
        let s = tokio::net::UnixStream::connect(sock)
            .await
            .map_err(|e| e.to_string())?;
        let (r, mut w) = s.into_split();
        let mut lines = BufReader::new(r).lines();
        lines.next_line().await.map_err(|e| e.to_string())?; // greeting
        w.write_all(b"{\"execute\":\"qmp_capabilities\"}\n")
            .await
            .map_err(|e| e.to_string())?;
        lines.next_line().await.map_err(|e| e.to_string())?;
        w.write_all(b"{\"execute\":\"quit\"}\n")
            .await
            .map_err(|e| e.to_string())?;
        let _ = lines.next_line().await;
        Ok::<(), String>(())
    };
    tokio::time::timeout(Duration::from_secs(2), fut)
        .await
        .map_err(|_| "qmp: no answer within 2 s".to_string())?
}

#[async_trait]
impl Runtime for QemuRuntime {
    fn kind(&self) -> &'static str {
        "qemu"
    }

    fn notices(&self) -> Vec<String> {
        self.notices.clone()
    }

    async fn prepare(&self, id: &InstanceId, w: &Workload) -> Result<(), RuntimeError> {
        let dir = self.instance_dir(id);
        std::fs::create_dir_all(&dir).map_err(|e| {
            RuntimeError::VmmStart(format!("instance directory {}: {e}", dir.display()).into())
        })?;
        crate::logstore::revive(&dir);
        let root = rootdisk::prepare(&self.images, id, w).await?;
        // QEMU opens the tap as root before it drops to the instance's uid; the tap is
        // still that uid's (with root, the only ones that may attach to it).
        let owner = match self.config.sandbox {
            true => {
                let uid = self
                    .host
                    .ledger()
                    .allocate_uid(id, self.config.vmm_uid_base, self.config.vmm_uid_count)
                    .await?;
                Some((uid, uid))
            }
            false => None,
        };
        let host = self.host.prepare(id, w, owner).await?;
        lock(&self.prepared).insert(id.clone(), Prepared { root, host });
        Ok(())
    }

    async fn start(
        &self,
        id: &InstanceId,
        w: &Workload,
        boot: BootContext,
    ) -> Result<VmHandle, RuntimeError> {
        let p = lock(&self.prepared).get(id).cloned().ok_or_else(|| {
            RuntimeError::VmmStart(format!("instance {id}: start before prepare").into())
        })?;
        let kernel = self.config.kernel.clone().unwrap_or_default();
        let initramfs = self.config.initramfs.clone().unwrap_or_default();
        for (what, f) in [("kernel", &kernel), ("initramfs", &initramfs)] {
            if !f.is_file() {
                return Err(RuntimeError::VmmStart(
                    format!("runtime.qemu.{what} {}: no such file", f.display()).into(),
                ));
            }
        }
        let network = Some(p.host.guest_network(w)?);
        let config = guest::guest_config(
            w,
            Some(&p.root.process),
            p.root.count(),
            network,
            boot.secrets.as_ref(),
        )?;
        // Any VM still recorded for this instance goes first (idempotent start).
        self.kill_recorded(id).await;
        let sandbox = if self.config.sandbox {
            let uid = self
                .host
                .ledger()
                .allocate_uid(id, self.config.vmm_uid_base, self.config.vmm_uid_count)
                .await?;
            let dir = self.make_jail(id, uid)?;
            Some(Sandbox { dir, uid })
        } else {
            None
        };
        let identity = sandbox.as_ref().map(|s| (s.uid, s.uid));
        let paths = Paths::of(
            self.instance_dir(id),
            sandbox.as_ref().map(|s| s.dir.as_path()),
        );
        for s in [&paths.vhost_sock, &paths.qmp] {
            let _ = std::fs::remove_file(s);
        }
        let listener = bind_guest_listener(&paths.uds).map_err(|e| {
            RuntimeError::VmmStart(format!("guest socket {}: {e}", paths.uds.display()).into())
        })?;
        if let Some((uid, gid)) = identity {
            // vhost-device-vsock connects to it for the guest; it is this VM's alone.
            let sock = guest_socket_path(&paths.uds);
            std::os::unix::fs::chown(&sock, Some(uid), Some(gid)).map_err(|e| {
                RuntimeError::VmmStart(format!("chown {}: {e}", sock.display()).into())
            })?;
        }
        let logs = self
            .workload_logs(id, &paths.uds, identity)
            .map_err(|e| RuntimeError::VmmStart(e.into()))?;
        let handle = VmHandle {
            instance_id: id.clone(),
            generation: w.spec.generation,
            boot_id: boot.boot_id.clone(),
            spec_hash: w.spec_hash.clone(),
        };
        let mut record = VmRecord {
            instance_id: id.to_string(),
            generation: handle.generation,
            boot_id: handle.boot_id.clone(),
            spec_hash: handle.spec_hash.clone(),
            qemu: None,
            vhost: None,
            address: Some(p.host.probe_address()),
            sandbox: sandbox.clone(),
            kernel: Some(kernel.clone()),
            initramfs: Some(initramfs.clone()),
            root_layers: p.root.layers.clone(),
        };
        // Recorded before anything is spawned.
        self.save(id, &record).await?;
        let limit = guest::vmm_memory_limit(w, self.config.memory_overhead_mib);
        let (oom, entry) = self
            .cgroups
            .create(&self.host.ledger(), id, limit, guest::cpu_weight(w))
            .await?
            .unzip();
        let vhost = self.spawn_vhost(&paths, entry.as_ref(), identity).await?;
        record.vhost = Some(vhost);
        self.save(id, &record).await?;
        let accel = self.accel();
        let _ = std::fs::remove_file(&paths.console);
        let args = qemu_args(
            id,
            w,
            &p,
            &paths,
            accel,
            (&kernel, &initramfs),
            sandbox.as_ref(),
        )?;
        let qemu = match vproc::spawn_detached(
            Path::new(&self.config.binary),
            &args,
            &paths.dir.join("qemu.log"),
            entry.as_ref(),
        ) {
            Ok(c) => c,
            Err(e) => {
                vhost.kill(Duration::from_secs(5)).await;
                return Err(RuntimeError::VmmStart(e));
            }
        };
        record.qemu = Some(qemu.id);
        self.save(id, &record).await?;
        let cgroup = oom.as_ref().map(|o| o.group().clone());
        tracing::info!(instance = %id, accel, qemu_pid = qemu.id.pid, vmm_uid = ?identity.map(|i| i.0), cgroup = ?cgroup.as_ref().map(|g| g.path().to_path_buf()), "qemu started");
        let monitor = Monitor::spawn(MonitorArgs {
            instance: id.to_string(),
            listener,
            config,
            handshake: Duration::from_secs(self.config.boot_timeout_seconds),
            watch: Watch::Child(qemu.child),
            adopted: false,
            evidence: paths.evidence(),
            console_cap: Some((paths.console.clone(), self.config.console_max_bytes)),
            oom: oom.map(|o| o.into_check()),
            exit_meaning: qemu_exit_meaning,
            workload_logs: Some(logs),
        });
        Ok(self.vms.insert(Tracked {
            handle,
            monitor,
            record: Vm { record, cgroup },
        }))
    }

    async fn next_event(&self, handle: &VmHandle) -> VmEvent {
        self.vms.next_event(handle).await
    }

    async fn probe_health(&self, handle: &VmHandle, check: &HealthSpec) -> Result<(), String> {
        let addr = self
            .vms
            .get(&handle.instance_id)
            .and_then(|v| v.record.record.address)
            .ok_or_else(|| format!("instance {}: no address to probe", handle.instance_id))?;
        crate::health::probe(addr, check).await
    }

    /// Stop: the guest stops its workload within `grace`, syncs and reboots (QEMU
    /// exits); else QMP `quit`, then SIGKILL ([`Monitor::stop_escalating`]); then
    /// vhost-device-vsock and the host cgroup go.
    async fn stop(&self, handle: &VmHandle, grace: Duration) -> StopOutcome {
        let Some(vm) = self.vms.get(&handle.instance_id) else {
            self.kill_recorded(&handle.instance_id).await;
            return StopOutcome {
                graceful: true,
                exit_code: None,
            };
        };
        let qmp = self.instance_dir(&handle.instance_id).join("qmp.sock");
        let qemu = vm.record.record.qemu;
        let outcome = vm
            .monitor
            .stop_escalating(
                grace,
                async {
                    if let Err(e) = qmp_quit(&qmp).await {
                        tracing::warn!(instance = %handle.instance_id, error = %e, "qmp quit failed; killing qemu");
                    }
                },
                || {
                    if let Some(q) = qemu {
                        tracing::warn!(instance = %handle.instance_id, pid = q.pid, "qemu still running after quit: SIGKILL");
                        q.signal(rustix::process::Signal::KILL);
                    }
                },
            )
            .await;
        if let Some(v) = vm.record.record.vhost {
            v.signal(rustix::process::Signal::TERM);
            if !v.wait_gone(Duration::from_secs(2)).await {
                v.kill(Duration::from_secs(2)).await;
            }
        }
        if let Some(g) = &vm.record.cgroup {
            if let Err(e) = g.remove(Duration::from_secs(5)).await {
                tracing::warn!(instance = %handle.instance_id, error = %e, "VMM cgroup not removed");
            }
        }
        outcome
    }

    async fn recover(&self) -> Result<Vec<VmHandle>, RuntimeError> {
        let rows = self.host.rows().await?;
        let mut found = Vec::new();
        for r in rows.iter().filter(|r| r.kind == KIND_PROCESS) {
            let Some(rec) = r
                .detail
                .as_deref()
                .and_then(|d| serde_json::from_str::<VmRecord>(d).ok())
            else {
                continue;
            };
            let Ok(id) = InstanceId::parse(&rec.instance_id) else {
                continue;
            };
            let Some(q) = rec.qemu.filter(|q| q.is_alive()) else {
                // Dead VM: its processes go; the instance's other resources are removed
                // by `cleanup` when the supervisor decides.
                if let Some(v) = rec.vhost {
                    v.signal(rustix::process::Signal::KILL);
                }
                continue;
            };
            let handle = self.adopt(&rows, &id, rec, q)?;
            found.push(handle);
        }
        // Groups under the parent that no adopted VM runs in are leftovers.
        let live: Vec<PathBuf> = self
            .vms
            .all()
            .iter()
            .filter_map(|v| v.record.cgroup.as_ref().map(|g| g.path().to_path_buf()))
            .collect();
        self.cgroups.remove_orphans(&live).await;
        // Taps and rule chains with the plfm prefix that no ledger row owns are leftovers.
        let removed = self.host.remove_orphans().await?;
        if !removed.is_empty() {
            tracing::info!(?removed, "removed plfm taps and rules no instance owns");
        }
        let adopted: Vec<InstanceId> = found.iter().map(|h| h.instance_id.clone()).collect();
        rootdisk::retain(&self.images, &adopted);
        Ok(found)
    }

    fn current_vm(&self, id: &InstanceId) -> Option<VmHandle> {
        self.vms.current(id)
    }

    fn guest_vsock(&self, id: &InstanceId) -> Option<PathBuf> {
        let vm = self.vms.get(id)?;
        let jail = vm.record.record.sandbox.as_ref().map(|s| s.dir.clone());
        Some(Paths::of(self.instance_dir(id), jail.as_deref()).uds)
    }

    fn instance_dir_of(&self, id: &InstanceId) -> Option<PathBuf> {
        Some(self.instance_dir(id))
    }

    async fn cleanup(&self, id: &InstanceId) -> Result<(), RuntimeError> {
        self.vms.remove(id);
        lock(&self.prepared).remove(id);
        self.kill_recorded(id).await;
        let released = self.host.release(id).await;
        let cgroups = self.cgroups.release(&self.host.ledger(), id).await;
        let rows = self.host.rows().await?;
        for r in rows
            .iter()
            .filter(|r| r.instance_id == id.as_str() && r.kind == KIND_PROCESS)
        {
            self.host.ledger_remove(&r.kind, &r.name).await;
        }
        rootdisk::release(&self.images, id);
        let dir = self.instance_dir(id);
        for f in [
            "vsock.sock",
            "vsock.sock_5161",
            "vsock.sock_5163",
            "vhost.sock",
            "qmp.sock",
        ] {
            let _ = std::fs::remove_file(dir.join(f));
        }
        // The jail (its owner, the VMM uid, may have planted anything: remove_dir_all
        // removes links, never follows them).
        match std::fs::remove_dir_all(self.jail_of(id)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!(instance = %id, error = %e, "jail not removed"),
        }
        released?;
        cgroups
    }
}

impl QemuRuntime {
    /// Adopts the running QEMU `q` of a recorded VM after an agent restart.
    fn adopt(
        &self,
        rows: &[crate::state::ResourceRow],
        id: &InstanceId,
        rec: VmRecord,
        q: ProcessId,
    ) -> Result<VmHandle, RuntimeError> {
        let paths = Paths::of(
            self.instance_dir(id),
            rec.sandbox.as_ref().map(|s| s.dir.as_path()),
        );
        let listener = bind_guest_listener(&paths.uds).map_err(|e| {
            RuntimeError::VmmStart(format!("guest socket {}: {e}", paths.uds.display()).into())
        })?;
        if let Some(sb) = &rec.sandbox {
            let sock = guest_socket_path(&paths.uds);
            std::os::unix::fs::chown(&sock, Some(sb.uid), Some(sb.uid)).map_err(|e| {
                RuntimeError::VmmStart(format!("chown {}: {e}", sock.display()).into())
            })?;
        }
        let handle = VmHandle {
            instance_id: id.clone(),
            generation: rec.generation,
            boot_id: rec.boot_id.clone(),
            spec_hash: rec.spec_hash.clone(),
        };
        let logs = self
            .workload_logs(id, &paths.uds, rec.sandbox.as_ref().map(|s| (s.uid, s.uid)))
            .map_err(|e| tracing::warn!(instance = %id, error = %e, "the adopted VM's log stream is not served"))
            .ok();
        // It keeps its cgroup; OOM kills count from now.
        let oom = VmmCgroups::adopt(rows, id);
        let cgroup = oom.as_ref().map(|o| o.group().clone());
        let monitor = Monitor::spawn(MonitorArgs {
            instance: id.to_string(),
            listener,
            config: guest::resumed_config(id.as_str(), rec.generation),
            handshake: Duration::from_secs(30),
            watch: Watch::Adopted(q),
            adopted: true,
            evidence: paths.evidence(),
            console_cap: Some((paths.console.clone(), self.config.console_max_bytes)),
            oom: oom.map(|o| o.into_check()),
            exit_meaning: qemu_exit_meaning,
            workload_logs: logs,
        });
        tracing::info!(instance = %id, qemu_pid = q.pid, "found running qemu");
        Ok(self.vms.insert(Tracked {
            handle,
            monitor,
            record: Vm {
                record: rec,
                cgroup,
            },
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn workload() -> std::sync::Arc<Workload> {
        let a = serde_json::json!({"instance_id": "i-1", "generation": 2, "desired_state": "running", "workload": {
            "spec_version": "v1", "instance_id": "i-1", "generation": 2,
            "image": {"digest": format!("sha256:{}", "a".repeat(64)), "resolved_digest": format!("sha256:{}", "a".repeat(64))},
            "command": ["/app"],
            "resources": {"cpu_request": 1.0, "memory_limit_bytes": 268435456_i64},
            "network": {"overlay_ipv6": "fd00::1", "gateway_ipv6": "fe80::1"}
        }});
        crate::spec::decode_assignment(&a, "test")
            .unwrap()
            .workload
            .unwrap()
    }

    /// The drives of a root stacked from 3 layer disks with 2 volumes: bottom layer
    /// `vda`, scratch `vdb`, volumes `vdc`/`vdd`, upper layers `vde`/`vdf`, every layer
    /// read-only, each drive's device given in that order.
    #[test]
    fn qemu_attaches_the_layers_around_scratch_and_volumes_in_the_shared_order() {
        let layers: Vec<PathBuf> = ["/c/l0.ext4", "/c/l1.ext4", "/c/l2.ext4"]
            .map(PathBuf::from)
            .into();
        let p = Prepared {
            root: rootdisk::RootDisk {
                layers,
                process: crate::image::MergedProcess {
                    argv: vec!["/app".into()],
                    env: Default::default(),
                    cwd: "/".into(),
                    user: None,
                },
            },
            host: HostPrep {
                scratch: "/i/scratch.ext4".into(),
                volumes: vec![
                    ("vol-a".into(), "/v/vol-a.ext4".into(), false),
                    ("vol-b".into(), "/v/vol-b.ext4".into(), true),
                ],
                tap: crate::network::TapPlan {
                    instance_id: "i-1".into(),
                    tap: "plfm-t".into(),
                    mtu: 1420,
                    ipv6: "fd00::1".parse().unwrap(),
                    ipv4: None,
                    owner: None,
                    guest_mac: crate::network::guest_mac("i-1"),
                    ingress: vec![],
                    health_port: None,
                },
            },
        };
        let paths = Paths::of("/i".into(), None);
        let id = InstanceId::parse("i-1").unwrap();
        let args = qemu_args(
            &id,
            &workload(),
            &p,
            &paths,
            "tcg",
            (Path::new("/k"), Path::new("/r")),
            None,
        )
        .unwrap();
        let drives: Vec<&str> = args
            .windows(2)
            .filter(|w| w[0] == "-drive")
            .map(|w| w[1].as_str())
            .collect();
        assert_eq!(
            drives,
            [
                "id=vda,file=/c/l0.ext4,format=raw,if=none,readonly=on",
                "id=vdb,file=/i/scratch.ext4,format=raw,if=none",
                "id=vdc,file=/v/vol-a.ext4,format=raw,if=none",
                "id=vdd,file=/v/vol-b.ext4,format=raw,if=none,readonly=on",
                "id=vde,file=/c/l1.ext4,format=raw,if=none,readonly=on",
                "id=vdf,file=/c/l2.ext4,format=raw,if=none,readonly=on",
            ]
        );
        let devices: Vec<&str> = args
            .windows(2)
            .filter(|w| w[0] == "-device" && w[1].starts_with("virtio-blk-device"))
            .map(|w| w[1].as_str())
            .collect();
        assert_eq!(
            devices,
            ["vda", "vdb", "vdc", "vdd", "vde", "vdf"]
                .map(|d| format!("virtio-blk-device,drive={d}"))
        );
        // 22 disks (16 layers, scratch, 5 volumes) + network + vsock fill microvm's 24
        // transports; one volume more is refused before QEMU runs, naming the count.
        let mut big = p.clone();
        big.root.layers = (0..16).map(|i| format!("/c/{i}").into()).collect();
        big.host.volumes = (0..5)
            .map(|i| (format!("v{i}"), format!("/v/{i}").into(), false))
            .collect();
        let run = |p: &Prepared| {
            qemu_args(
                &id,
                &workload(),
                p,
                &paths,
                "tcg",
                (Path::new("/k"), Path::new("/r")),
                None,
            )
        };
        let args = run(&big).unwrap();
        assert_eq!(args.iter().filter(|a| *a == "-drive").count(), 22);
        big.host.volumes.push(("v5".into(), "/v/5".into(), false));
        let e = run(&big).unwrap_err();
        assert!(
            e.to_string().contains("needs 25 virtio devices")
                && e.to_string().contains("microvm machine has 24"),
            "{e}"
        );
    }

    /// `accel = "auto"` on a host whose KVM device cannot be opened falls back to TCG,
    /// and `status` says so; a sandbox turned off is said too. An explicit `tcg` or a
    /// usable device says nothing.
    #[test]
    fn status_says_when_auto_fell_back_to_tcg_or_the_sandbox_is_off() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("no-kvm");
        let none = VmmCgroups::none();
        let mut c = QemuConfig {
            accel: Accel::Auto,
            ..Default::default()
        };
        let n = qemu_notices(&c, &missing, &none);
        assert_eq!(n.len(), 1, "{n:?}");
        assert!(
            n[0].contains("accel = \"auto\"") && n[0].contains("TCG"),
            "{n:?}"
        );
        let usable = dir.path().join("kvm");
        std::fs::write(&usable, b"").unwrap();
        assert_eq!(qemu_notices(&c, &usable, &none), Vec::<String>::new());
        c.accel = Accel::Tcg;
        assert_eq!(qemu_notices(&c, &missing, &none), Vec::<String>::new());
        c.sandbox = false;
        let n = qemu_notices(&c, &missing, &none);
        assert!(n.len() == 1 && n[0].contains("sandbox = false"), "{n:?}");
    }
    use crate::cgroup::testing::TestParent;
    use crate::cgroup::{Limits, VMM_PIDS_MAX};

    fn limits(memory: u64) -> Limits {
        Limits {
            memory,
            pids: VMM_PIDS_MAX,
            cpu_weight: 100,
        }
    }

    /// A process spawned through `spawn_detached` into a small memory cgroup is in the
    /// group from the start, gets OOM-killed there, the counter shows it, and the group
    /// is removed leaving nothing. Needs root and usable memory, pids and cpu cgroups
    /// (v1 or v2): skips with a message without them, fails when
    /// `PLFM_REQUIRE_SYSTEM_TESTS=1`.
    #[tokio::test]
    async fn process_spawned_into_a_small_cgroup_is_oom_killed_and_the_group_removed() {
        // A parent of its own, so no agent's start-up sweep meets it.
        let Some(t) = TestParent::new("unit") else {
            return;
        };
        let h = &t.h;
        let g = h.create("oom-unit", &limits(32 << 20)).unwrap();
        assert_eq!(g.limit(), Some(32 << 20));
        assert_eq!(g.oom_kills().unwrap(), 0);
        let entry = g.entry().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("out.log");

        // In the group from its first instruction: there as soon as spawn returns.
        let mut sleeper =
            vproc::spawn_detached(Path::new("/bin/sleep"), &["30".into()], &log, Some(&entry))
                .unwrap()
                .child;
        let pid = sleeper.id().unwrap();
        assert!(g.pids().contains(&pid), "{pid} not in {:?}", g.pids());
        sleeper.start_kill().unwrap();
        sleeper.wait().await.unwrap();

        // tail keeps the whole newline-free 200 MiB "last line" in memory.
        let script = "head -c 200M /dev/zero | tail -c 300M > /dev/null".to_string();
        let mut hog = vproc::spawn_detached(
            Path::new("/bin/sh"),
            &["-c".into(), script],
            &log,
            Some(&entry),
        )
        .unwrap()
        .child;
        let status = tokio::time::timeout(Duration::from_secs(60), hog.wait())
            .await
            .expect("allocating process ended within 60 s")
            .unwrap();
        assert!(
            !status.success(),
            "{status:?}; log: {:?}",
            crate::runtime::vmm::logs::last_lines(&log, 3)
        );
        assert!(g.oom_kills().unwrap() >= 1, "no OOM kill counted");
        let peak = g.peak().unwrap_or(0);
        assert!(peak <= 33 << 20, "peak {peak} above the limit");

        drop(entry);
        g.remove(Duration::from_secs(5)).await.unwrap();
        assert!(!g.path().exists());
        assert!(g.dirs().iter().all(|d| !d.exists()), "{:?}", g.dirs());
        assert!(h.children().is_empty());
        for p in h.parents() {
            std::fs::remove_dir(p).unwrap();
        }
    }

    /// An instance id that names a control file of the parent (`cgroup.procs`,
    /// `memory.max`, …) gets no group and an error naming the collision: before, the
    /// existing file passed for a group and the VMM ran without its limit.
    #[test]
    fn an_instance_id_naming_a_control_file_gets_no_group() {
        let Some(t) = TestParent::new("collide") else {
            return;
        };
        let h = &t.h;
        let control = h.parent().join("cgroup.procs");
        assert!(
            control.is_file(),
            "{} exists in every group",
            control.display()
        );
        let e = h
            .create("cgroup.procs", &limits(64 << 20))
            .expect_err("a control file is not a group");
        assert!(e.to_string().contains("control file"), "{e}");
        assert!(control.is_file());
        // `pids.max` names a file of the parent only in the pids hierarchy on v1.
        let e = h
            .create("pids.max", &limits(64 << 20))
            .expect_err("a control file is not a group");
        assert!(e.to_string().contains("control file"), "{e}");
        let made: Vec<_> = h
            .parents()
            .iter()
            .map(|p| p.join("pids.max"))
            .filter(|d| d.is_dir())
            .collect();
        for d in &made {
            std::fs::remove_dir(d).unwrap();
        }
        for p in h.parents() {
            std::fs::remove_dir(p).unwrap();
        }
    }

    #[test]
    fn config_validation_names_the_key() {
        let c = QemuConfig::default();
        assert!(c.validate().unwrap_err().starts_with("kernel:"));
        let c = QemuConfig {
            kernel: Some("/k".into()),
            initramfs: Some("/i".into()),
            ipv4_pool: "10.0.0.0/8".into(),
            ..QemuConfig::default()
        };
        assert!(c.validate().unwrap_err().starts_with("ipv4_pool:"));
    }
}
