//! Host resources of one instance that every VM runtime needs the same way (DESIGN §7,
//! §8): the scratch disk, volume attachments, and the tap with its addresses and
//! rules. The qemu runtime and the Firecracker runtime's [`LocalHost`] both use this
//! one implementation, so an instance gets the same tap name, IPv4 link, disks and
//! cleanup whichever VMM runs it. Linux only; taps need root (see [`crate::network`]).
//!
//! What it owns: the resource-ledger rows of kinds `disk`, `volume`, `ipv4` and `tap`
//! (each written before the thing exists, removed after it is gone, so a crash in
//! between leaks nothing a later [`Host::release`] or [`Host::remove_orphans`] cannot
//! find), the scratch-disk templates under `<data_dir>/templates/`, and the allocation
//! of IPv4 /30 links from the configured pool. What it must not do: start or stop
//! processes, decide statuses, or delete a volume (volumes outlive instances).
//!
//! [`LocalHost`]: crate::runtime::firecracker::LocalHost

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use plfm_guest_protocol::{Ipv4Config, NetworkConfig};

use crate::network::{self, TapPlan};
use crate::runtime::RuntimeError;
use crate::spec::{InstanceId, Workload};
use crate::state::{ResourceRow, Store};

/// Ledger kind of a scratch disk (name = its path).
pub const KIND_DISK: &str = "disk";
/// Ledger kind of a tap (name = tap, detail = `{"ipv6", "ipv4"}` for the API).
pub const KIND_TAP: &str = "tap";
/// Ledger kind of an IPv4 link (name = block index in the pool).
pub const KIND_IPV4: &str = "ipv4";
/// Ledger kind of a volume attachment (name = volume id).
pub const KIND_VOLUME: &str = "volume";
/// Space kept free on the data dir's file system when a disk is created: 5 % of it,
/// at least 1 GiB (the agent's state, logs and image cache need room too).
pub fn disk_reserve(fs_bytes: u64) -> u64 {
    (fs_bytes / 20).max(1 << 30)
}

/// Refuses resources this node cannot give at all (before anything is made): more vCPUs
/// than it has (or than a VM may have), more memory than it has. The error names the
/// field; the VMM would otherwise fail obscurely or silently get less.
pub fn check_capacity(w: &Workload) -> Result<(), RuntimeError> {
    use crate::runtime::vmm::guest::{guest_mem_mib, MAX_VCPUS};
    let r = &w.spec.resources;
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(1);
    if let Some(v) = r.vcpu_count {
        let max = cpus.min(MAX_VCPUS);
        if v > max {
            return Err(RuntimeError::VmmStart(
                format!("workload.resources.vcpu_count {v} is more than this node can give (at most {max}: {cpus} CPUs, {MAX_VCPUS} per VM)").into(),
            ));
        }
    }
    let total = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map(|kib| kib * 1024);
    if let Some(total) = total {
        let want = guest_mem_mib(w) << 20;
        if want > total {
            return Err(RuntimeError::VmmStart(
                format!("workload.resources.memory_limit_bytes {} is more than this node's memory ({} MiB)", r.memory_limit_bytes, total >> 20).into(),
            ));
        }
    }
    Ok(())
}

/// Ledger kind: the unprivileged uid of an instance's VMM processes (name: the number).
pub use crate::runtime::vmm::ledger::KIND_UID;

/// Scratch disks smaller than this are made this size (ext4 needs room for a journal).
pub const MIN_SCRATCH_BYTES: u64 = 16 << 20;
/// Scratch disk size when the spec gives none.
pub const DEFAULT_SCRATCH_BYTES: u64 = 4 << 30;

/// Settings of host resources (from the runtime's config table).
#[derive(Debug, Clone)]
pub struct HostConfig {
    /// IPv4 pool as written in the config (for messages).
    pub ipv4_pool: String,
    /// Size of a volume created on first use.
    pub volume_default_bytes: u64,
}

/// What [`Host::prepare`] made for an instance.
#[derive(Debug, Clone)]
pub struct HostPrep {
    /// Scratch disk (vdb).
    pub scratch: PathBuf,
    /// Volumes in `volume_id` order (vdc, vdd, …): id, path, read-only.
    pub volumes: Vec<(String, PathBuf, bool)>,
    /// The tap and its addresses.
    pub tap: TapPlan,
}

impl HostPrep {
    /// The address the host probes health checks on: the guest's IPv4 link address
    /// when there is one (it needs no IPv6 routing on the host), else its IPv6.
    pub fn probe_address(&self) -> IpAddr {
        self.tap
            .ipv4
            .map_or(IpAddr::V6(self.tap.ipv6), |l| IpAddr::V4(l.guest))
    }

    /// The guest's network config (DESIGN §6): its overlay IPv6 /128 with the host's
    /// `fe80::1` as gateway, and the IPv4 /30 link.
    pub fn guest_network(&self, w: &Workload) -> Result<NetworkConfig, RuntimeError> {
        let mut dns = Vec::new();
        for d in w.spec.network.dns.iter().flatten() {
            dns.push(d.parse::<IpAddr>().map_err(|_| {
                RuntimeError::Network(format!("network.dns {d:?} is not an IP address").into())
            })?);
        }
        Ok(NetworkConfig {
            address: IpAddr::V6(self.tap.ipv6),
            prefix_len: 128,
            gateway: Some(IpAddr::V6(network::HOST_LINK_LOCAL)),
            mtu: self.tap.mtu,
            dns,
            ipv4: self.tap.ipv4.map(|l| Ipv4Config {
                address: l.guest,
                prefix_len: 30,
                gateway: Some(l.host),
            }),
        })
    }
}

/// Host resources of the instances of one node (one per runtime).
pub struct Host {
    data_dir: PathBuf,
    ledger: Store,
    config: HostConfig,
    pool: (Ipv4Addr, u8),
    /// Serialises allocation (IPv4 blocks, volume attachments) across instances.
    allocation: tokio::sync::Mutex<()>,
    /// Serialises the making of scratch templates (one `mkfs.ext4` per size).
    templates: tokio::sync::Mutex<()>,
}

impl Host {
    /// Host resources under `data_dir`, recorded in `ledger`. Fails on a bad pool.
    pub fn new(data_dir: &Path, ledger: Store, config: HostConfig) -> Result<Host, String> {
        let pool = crate::runtime::parse_ipv4_pool(&config.ipv4_pool)?;
        Ok(Host {
            data_dir: data_dir.to_path_buf(),
            ledger,
            config,
            pool,
            allocation: tokio::sync::Mutex::new(()),
            templates: tokio::sync::Mutex::new(()),
        })
    }

    /// `<data_dir>/instances/<id>`.
    pub fn instance_dir(&self, id: &InstanceId) -> PathBuf {
        self.data_dir.join("instances").join(id.as_str())
    }

    /// Records a resource row of `id` in the ledger (before the resource exists).
    pub(crate) async fn ledger_add(
        &self,
        kind: &str,
        name: &str,
        id: &InstanceId,
        detail: Option<String>,
    ) -> Result<(), RuntimeError> {
        self.ledger().add(kind, name, id, detail).await
    }

    /// Removes a resource row (after the resource is gone); a failure is logged.
    pub(crate) async fn ledger_remove(&self, kind: &str, name: &str) {
        self.ledger().remove(kind, name).await
    }

    /// Every resource row of the ledger.
    pub(crate) async fn rows(&self) -> Result<Vec<ResourceRow>, RuntimeError> {
        self.ledger().rows().await
    }

    /// The resource ledger these host resources are recorded in.
    pub fn ledger(&self) -> crate::runtime::vmm::ledger::Ledger {
        crate::runtime::vmm::ledger::Ledger(self.ledger.clone())
    }

    /// Scratch disk, volumes and tap of an instance (idempotent). `tap_owner`: the
    /// uid and gid of the instance's own unprivileged VMM when that VMM opens the tap
    /// itself (a jailed Firecracker); else root owns it.
    pub async fn prepare(
        &self,
        id: &InstanceId,
        w: &Workload,
        tap_owner: Option<(u32, u32)>,
    ) -> Result<HostPrep, RuntimeError> {
        let bytes = w
            .spec
            .resources
            .ephemeral_disk_bytes
            .map(|b| (b.max(0) as u64).max(MIN_SCRATCH_BYTES))
            .unwrap_or(DEFAULT_SCRATCH_BYTES);
        check_capacity(w)?;
        if !self.instance_dir(id).join("scratch.ext4").exists() {
            self.check_disk_space("workload.resources.ephemeral_disk_bytes", bytes)
                .map_err(|e| RuntimeError::RootfsBuild(e.into()))?;
        }
        let scratch = self.prepare_scratch(id, bytes).await?;
        let volumes = self.prepare_volumes(id, w).await?;
        let tap = self.prepare_network(id, w, tap_owner).await?;
        Ok(HostPrep {
            scratch,
            volumes,
            tap,
        })
    }

    /// The scratch disk: a sparse copy of a once-formatted ext4 template of the same
    /// size (`<data_dir>/templates/scratch-<bytes>.ext4`), so an instance start costs a
    /// few extent copies instead of a `mkfs.ext4` run. Every scratch disk of a size has
    /// the same filesystem UUID; each is attached to one VM only, so that is harmless.
    async fn prepare_scratch(&self, id: &InstanceId, bytes: u64) -> Result<PathBuf, RuntimeError> {
        let dir = self.instance_dir(id);
        std::fs::create_dir_all(&dir).map_err(|e| {
            RuntimeError::RootfsBuild(format!("instance directory {}: {e}", dir.display()).into())
        })?;
        let path = dir.join("scratch.ext4");
        self.ledger_add(KIND_DISK, &path.display().to_string(), id, None)
            .await?;
        if path.exists() {
            return Ok(path);
        }
        // An open descriptor: the copy reads it even if the template is evicted meanwhile.
        let template = self.scratch_template(bytes).await?;
        let tmp = dir.join("scratch.ext4.tmp");
        let to = tmp.clone();
        tokio::task::spawn_blocking(move || sparse_copy(&template, &to))
            .await
            .map_err(|e| RuntimeError::RootfsBuild(format!("scratch disk copy: {e}").into()))?
            .map_err(|e| {
                let _ = std::fs::remove_file(&tmp);
                scratch_err(&tmp, "copy of the template", e)
            })?;
        std::fs::rename(&tmp, &path).map_err(|e| scratch_err(&path, "rename", e))?;
        Ok(path)
    }

    /// The formatted template of a scratch size, opened for reading; made once
    /// (formatted under a temporary name, then renamed). At most [`MAX_TEMPLATES`] sizes
    /// are kept: making a new one evicts the least recently used (each costs a few MiB of
    /// real disk: specs may ask for any size).
    async fn scratch_template(&self, bytes: u64) -> Result<std::fs::File, RuntimeError> {
        let dir = self.data_dir.join("templates");
        let path = dir.join(format!("scratch-{bytes}.ext4"));
        let _making = self.templates.lock().await;
        if !path.exists() {
            std::fs::create_dir_all(&dir).map_err(|e| scratch_err(&dir, "create", e))?;
            let tmp = dir.join(format!("scratch-{bytes}.ext4.tmp"));
            make_ext4(&tmp, bytes).await.map_err(|e| {
                RuntimeError::RootfsBuild(format!("scratch disk template: {e}").into())
            })?;
            std::fs::rename(&tmp, &path).map_err(|e| scratch_err(&path, "rename", e))?;
            evict_templates(&dir, &path);
        }
        let f = std::fs::File::open(&path).map_err(|e| scratch_err(&path, "open", e))?;
        // Its modification time records its last use (for eviction).
        let _ = std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .and_then(|w| w.set_modified(std::time::SystemTime::now()));
        Ok(f)
    }

    /// Volumes: `<data_dir>/volumes/<volume_id>.ext4`, created on first use and kept
    /// when the instance goes; refused while another instance holds the attachment.
    async fn prepare_volumes(
        &self,
        id: &InstanceId,
        w: &Workload,
    ) -> Result<Vec<(String, PathBuf, bool)>, RuntimeError> {
        let mut mounts: Vec<_> = w.spec.mounts.clone().unwrap_or_default();
        mounts.sort_by(|a, b| a.volume_id.cmp(&b.volume_id));
        if mounts.is_empty() {
            return Ok(Vec::new());
        }
        let _allocating = self.allocation.lock().await;
        let rows = self.rows().await?;
        let dir = self.data_dir.join("volumes");
        std::fs::create_dir_all(&dir).map_err(|e| {
            RuntimeError::Volume(format!("volumes directory {}: {e}", dir.display()).into())
        })?;
        let mut out = Vec::new();
        for m in mounts {
            let vid = &m.volume_id;
            if vid.is_empty() || vid.contains('/') || vid.starts_with('.') || vid.len() > 128 {
                return Err(RuntimeError::Volume(
                    format!("volume id {vid:?} is not a valid file name").into(),
                ));
            }
            if m.filesystem != "ext4" {
                return Err(RuntimeError::Volume(
                    format!("volume {vid}: filesystem {:?} is not ext4", m.filesystem).into(),
                ));
            }
            if let Some(other) = rows
                .iter()
                .find(|r| r.kind == KIND_VOLUME && r.name == *vid && r.instance_id != id.as_str())
            {
                return Err(RuntimeError::Volume(
                    format!("volume {vid} is attached to instance {}", other.instance_id).into(),
                ));
            }
            self.ledger_add(KIND_VOLUME, vid, id, None).await?;
            let path = dir.join(format!("{vid}.ext4"));
            if !path.exists() {
                self.check_disk_space("volume_default_bytes", self.config.volume_default_bytes)
                    .map_err(|e| RuntimeError::Volume(format!("volume {vid}: {e}").into()))?;
                let tmp = dir.join(format!("{vid}.ext4.tmp"));
                make_ext4(&tmp, self.config.volume_default_bytes)
                    .await
                    .map_err(|e| RuntimeError::Volume(format!("volume {vid}: {e}").into()))?;
                std::fs::rename(&tmp, &path).map_err(|e| {
                    RuntimeError::Volume(format!("volume {vid}: rename: {e}").into())
                })?;
            }
            out.push((vid.clone(), path, m.read_only));
        }
        Ok(out)
    }

    /// Whether a new disk of `bytes` (sparse, but the guest may fill it) fits on the data
    /// dir's file system with [`disk_reserve`] left over; the error names `what`.
    fn check_disk_space(&self, what: &str, bytes: u64) -> Result<(), String> {
        let Ok(st) = rustix::fs::statvfs(&self.data_dir) else {
            return Ok(()); // Unknown: the write itself reports a full disk.
        };
        let free = st.f_bavail.saturating_mul(st.f_frsize);
        let reserve = disk_reserve(st.f_blocks.saturating_mul(st.f_frsize));
        if bytes.saturating_add(reserve) > free {
            return Err(format!(
                "{what} {bytes} does not fit: {} has {free} bytes free, {reserve} of which stay in reserve",
                self.data_dir.display()
            ));
        }
        Ok(())
    }

    /// The tap, its addresses and rules ([`network::setup`]), and the IPv4 link: the
    /// block this instance already holds, else the first free one from a hash of its
    /// id. Recorded in the ledger before anything is created.
    async fn prepare_network(
        &self,
        id: &InstanceId,
        w: &Workload,
        owner: Option<(u32, u32)>,
    ) -> Result<TapPlan, RuntimeError> {
        let ipv6 = network::parse_ipv6(&w.spec.network.overlay_ipv6)
            .map_err(|e| RuntimeError::Network(crate::runtime::Cause::of(e)))?;
        let tap = network::tap_name(id.as_str());
        let allocating = self.allocation.lock().await;
        let rows = self.rows().await?;
        let owned = rows
            .iter()
            .any(|r| r.kind == KIND_TAP && r.name == tap && r.instance_id == id.as_str());
        let (pool, len) = self.pool;
        let count = network::ipv4_link_count(len);
        let mine = rows
            .iter()
            .find(|r| r.kind == KIND_IPV4 && r.instance_id == id.as_str())
            .and_then(|r| r.name.parse::<u32>().ok());
        let index = match mine {
            Some(i) => i,
            None => {
                let taken: HashSet<u32> = rows
                    .iter()
                    .filter(|r| r.kind == KIND_IPV4)
                    .filter_map(|r| r.name.parse().ok())
                    .collect();
                let hex = &tap[network::TAP_PREFIX.len()..network::TAP_PREFIX.len() + 7];
                let start = u32::from_str_radix(hex, 16).unwrap_or(0) % count.max(1);
                (0..count)
                    .map(|k| (start + k) % count)
                    .find(|i| !taken.contains(i))
                    .ok_or_else(|| {
                        RuntimeError::Network(
                            format!("ipv4 pool {} is exhausted", self.config.ipv4_pool).into(),
                        )
                    })?
            }
        };
        self.ledger_add(KIND_IPV4, &index.to_string(), id, None)
            .await?;
        drop(allocating);
        let plan = TapPlan {
            instance_id: id.to_string(),
            tap: tap.clone(),
            mtu: w.spec.network.mtu.unwrap_or(1420),
            ipv6,
            ipv4: network::ipv4_link(pool, len, index),
            owner,
            guest_mac: network::guest_mac(id.as_str()),
            ingress: network::ingress_ports(w.spec.network.ports.as_deref().unwrap_or_default()),
            health_port: w.spec.health.as_ref().map(|h| h.port),
        };
        let detail = serde_json::json!({
            "ipv6": ipv6.to_string(),
            "ipv4": plan.ipv4.map(|l| l.guest.to_string()),
        })
        .to_string();
        if !owned && network::link_exists(&tap).await {
            return Err(RuntimeError::Network(
                network::NetworkError::Collision {
                    tap,
                    instance_id: id.to_string(),
                }
                .to_string()
                .into(),
            ));
        }
        self.ledger_add(KIND_TAP, &tap, id, Some(detail)).await?;
        network::setup(&plan, true)
            .await
            .map_err(|e| RuntimeError::Network(crate::runtime::Cause::of(e)))?;
        Ok(plan)
    }

    /// Removes what [`Host::prepare`] made for an instance (tap and rules, scratch disk)
    /// and its ledger rows of these kinds; volumes stay, their attachment goes.
    /// Idempotent; the first failure is returned after the rest was tried.
    pub async fn release(&self, id: &InstanceId) -> Result<(), RuntimeError> {
        let rows = self.rows().await?;
        let mut first_err = None;
        for r in rows.iter().filter(|r| r.instance_id == id.as_str()) {
            match r.kind.as_str() {
                KIND_TAP => {
                    if let Err(e) = network::teardown(&r.name).await {
                        first_err
                            .get_or_insert(RuntimeError::Network(crate::runtime::Cause::of(e)));
                        continue;
                    }
                }
                KIND_DISK => match std::fs::remove_file(&r.name) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => {
                        first_err.get_or_insert(scratch_err(Path::new(&r.name), "remove", e));
                        continue;
                    }
                },
                KIND_IPV4 | KIND_VOLUME | KIND_UID => {}
                _ => continue, // the runtime's own rows
            }
            self.ledger_remove(&r.kind, &r.name).await;
        }
        let _ = std::fs::remove_file(self.instance_dir(id).join("scratch.ext4.tmp"));
        match first_err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Removes taps and rule chains with the plfm prefix that no ledger row owns
    /// (leftovers of a crash or of another agent's data dir), and half-made templates.
    pub async fn remove_orphans(&self) -> Result<Vec<String>, RuntimeError> {
        let owned: Vec<String> = self
            .rows()
            .await?
            .into_iter()
            .filter(|r| r.kind == KIND_TAP)
            .map(|r| r.name)
            .collect();
        if let Ok(entries) = std::fs::read_dir(self.data_dir.join("templates")) {
            for e in entries.flatten() {
                if e.file_name().to_string_lossy().ends_with(".tmp") {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        Ok(network::remove_orphans(&owned).await)
    }
}

/// Most scratch-disk template sizes kept in `<data_dir>/templates/`.
pub const MAX_TEMPLATES: usize = 8;

/// Removes the least recently used templates beyond [`MAX_TEMPLATES`], never `keep`.
fn evict_templates(dir: &Path, keep: &Path) {
    let mut found: Vec<(std::time::SystemTime, PathBuf)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "ext4") && p != keep)
        .filter_map(|p| Some((std::fs::metadata(&p).ok()?.modified().ok()?, p)))
        .collect();
    found.sort();
    let excess = (found.len() + 1).saturating_sub(MAX_TEMPLATES);
    for (_, p) in found.into_iter().take(excess) {
        if let Err(e) = std::fs::remove_file(&p) {
            tracing::warn!(path = %p.display(), error = %e, "cannot evict a scratch template");
        }
    }
}

fn scratch_err(path: &Path, what: &str, e: std::io::Error) -> RuntimeError {
    let msg = format!("scratch disk {}: {what}: {e}", path.display());
    if e.raw_os_error() == Some(rustix::io::Errno::NOSPC.raw_os_error()) {
        RuntimeError::NoSpace(msg.into())
    } else {
        RuntimeError::RootfsBuild(msg.into())
    }
}

/// Creates a sparse file of `size` bytes and formats it ext4 with lazy inode-table and
/// journal init (fast; the guest kernel finishes the init in the background). Bounded
/// by a 60 s timeout; a failure removes the file.
pub async fn make_ext4(path: &Path, size: u64) -> Result<(), String> {
    let f = std::fs::File::create(path).map_err(|e| format!("create {}: {e}", path.display()))?;
    f.set_len(size)
        .map_err(|e| format!("size {} to {size}: {e}", path.display()))?;
    drop(f);
    let mut cmd = tokio::process::Command::new("mkfs.ext4");
    cmd.args([
        "-q",
        "-F",
        "-E",
        "lazy_itable_init=1,lazy_journal_init=1,nodiscard,root_owner=0:0",
    ])
    .arg(path)
    .stdin(std::process::Stdio::null())
    .stdout(std::process::Stdio::null())
    .stderr(std::process::Stdio::piped())
    .kill_on_drop(true);
    let out = match tokio::time::timeout(Duration::from_secs(60), cmd.output()).await {
        Ok(Ok(out)) => out,
        Ok(Err(e)) => {
            let _ = std::fs::remove_file(path);
            return Err(format!("cannot run mkfs.ext4: {e}"));
        }
        Err(_) => {
            let _ = std::fs::remove_file(path);
            return Err(format!("mkfs.ext4 {}: no exit within 60 s", path.display()));
        }
    };
    if out.status.success() {
        Ok(())
    } else {
        let _ = std::fs::remove_file(path);
        Err(format!(
            "mkfs.ext4 {}: {} ({})",
            path.display(),
            String::from_utf8_lossy(&out.stderr).trim(),
            out.status
        ))
    }
}

/// Copies `src` (read from its start) to `to` keeping holes: only the data extents (found with
/// `SEEK_DATA`/`SEEK_HOLE`) are copied, the rest stays unallocated. Hand-written
/// because `std::fs::copy` (copy_file_range) fills holes on filesystems without
/// reflinks, which would allocate every byte of a 4 GiB scratch disk. The result is
/// fsync'd.
pub fn sparse_copy(src: &std::fs::File, to: &Path) -> std::io::Result<()> {
    use rustix::fs::SeekFrom;
    use std::io::{Read, Seek, Write};

    let mut src = src;
    let len = src.metadata()?.len();
    let mut dst = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(to)?;
    dst.set_len(len)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = 0u64;
    while pos < len {
        let data = match rustix::fs::seek(src, SeekFrom::Data(pos)) {
            Ok(d) => d,
            Err(rustix::io::Errno::NXIO) => break, // no data after `pos`
            Err(e) => return Err(e.into()),
        };
        let hole = rustix::fs::seek(src, SeekFrom::Hole(data))
            .map_err(std::io::Error::from)?
            .min(len);
        src.seek(std::io::SeekFrom::Start(data))?;
        dst.seek(std::io::SeekFrom::Start(data))?;
        let mut left = hole - data;
        while left > 0 {
            let n = (left as usize).min(buf.len());
            src.read_exact(&mut buf[..n])?;
            dst.write_all(&buf[..n])?;
            left -= n as u64;
        }
        pos = hole;
    }
    dst.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Seek, Write};

    #[test]
    fn sparse_copy_keeps_data_and_holes() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        let mut f = std::fs::File::create(&a).unwrap();
        f.set_len(64 << 20).unwrap();
        for (off, byte) in [(0u64, 1u8), (10 << 20, 2), ((64 << 20) - 4096, 3)] {
            f.seek(std::io::SeekFrom::Start(off)).unwrap();
            f.write_all(&vec![byte; 4096]).unwrap();
        }
        drop(f);
        sparse_copy(&std::fs::File::open(&a).unwrap(), &b).unwrap();
        assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
        use std::os::unix::fs::MetadataExt;
        let blocks = std::fs::metadata(&b).unwrap().blocks() * 512;
        assert!(blocks < 4 << 20, "copy allocated {blocks} bytes of 64 MiB");
    }

    #[test]
    fn templates_beyond_the_cap_are_evicted_least_recently_used_first() {
        let dir = tempfile::tempdir().unwrap();
        let base = std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let mut paths = Vec::new();
        for i in 0..(MAX_TEMPLATES as u64 + 3) {
            let p = dir.path().join(format!("scratch-{i}.ext4"));
            let f = std::fs::File::create(&p).unwrap();
            f.set_modified(base + Duration::from_secs(i)).unwrap();
            paths.push(p);
        }
        std::fs::write(dir.path().join("scratch-x.ext4.tmp"), b"").unwrap();
        // The new template is the oldest by time but must stay.
        let keep = paths[0].clone();
        evict_templates(dir.path(), &keep);
        let left: Vec<_> = paths.iter().filter(|p| p.exists()).cloned().collect();
        assert_eq!(left.len(), MAX_TEMPLATES);
        assert!(keep.exists());
        assert!(!paths[1].exists() && !paths[2].exists() && !paths[3].exists());
        assert!(paths[4..].iter().all(|p| p.exists()));
        assert!(dir.path().join("scratch-x.ext4.tmp").exists());
    }

    #[tokio::test]
    async fn scratch_template_copies_are_valid_sparse_ext4() {
        if which("mkfs.ext4").is_none() || which("dumpe2fs").is_none() {
            crate::testing::gate::skip_or_fail("e2fsprogs (mkfs.ext4, dumpe2fs) not installed");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let template = dir.path().join("t.ext4");
        make_ext4(&template, 1 << 30).await.unwrap();
        let copy = dir.path().join("c.ext4");
        sparse_copy(&std::fs::File::open(&template).unwrap(), &copy).unwrap();
        let out = std::process::Command::new("dumpe2fs")
            .arg("-h")
            .arg(&copy)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stdout).contains("Filesystem magic number:  0xEF53"));
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(&copy).unwrap();
        assert_eq!(m.len(), 1 << 30);
        assert!(m.blocks() * 512 < 64 << 20, "copy is not sparse");
    }

    fn which(tool: &str) -> Option<PathBuf> {
        let path = std::env::var_os("PATH")?;
        std::env::split_paths(&path)
            .chain(["/sbin".into(), "/usr/sbin".into()])
            .map(|d| d.join(tool))
            .find(|p| p.is_file())
    }
}
