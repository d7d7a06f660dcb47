//! The mock runtime: an in-process simulation of a VMM with configurable timings and
//! injectable faults, one per reason code a runtime can raise, so the agent's logic is
//! tested through the same code paths a real VMM would drive. Runs on any OS.
//!
//! With a `state_dir`, each simulated VM is recorded as
//! `<state_dir>/instances/<id>/mock-vm.json` (and in the resource ledger) before it
//! "starts", like a detached VMM process: it survives an agent restart and is found
//! again by [`Runtime::recover`]. Without one, VMs live in memory only (benchmarks).
//! This module simulates; it must not decide lifecycle policy.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use super::{BootContext, Runtime, RuntimeError, StopOutcome, VmEvent, VmHandle};
use crate::clock::{Instant, SharedClock};
use crate::instance::ReasonCode;
use crate::spec::{HealthSpec, InstanceId, Workload};
use crate::state::{ResourceRow, Store};

/// Timings (milliseconds) and faults of the mock runtime (`[runtime.mock]`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MockConfig {
    /// Time `prepare` takes.
    #[serde(default = "d50")]
    pub prepare_ms: u64,
    /// VMM start → workload started.
    #[serde(default = "d200")]
    pub boot_ms: u64,
    /// Time a graceful stop takes.
    #[serde(default = "d50")]
    pub stop_ms: u64,
    /// Extra boot time, spread over instances by a hash of their id (0..jitter).
    #[serde(default)]
    pub boot_jitter_ms: u64,
    /// Faults by instance id.
    #[serde(default)]
    pub faults: BTreeMap<String, MockFault>,
}

fn d50() -> u64 {
    50
}
fn d200() -> u64 {
    200
}

impl Default for MockConfig {
    fn default() -> Self {
        MockConfig {
            prepare_ms: 50,
            boot_ms: 200,
            stop_ms: 50,
            boot_jitter_ms: 0,
            faults: BTreeMap::new(),
        }
    }
}

impl MockConfig {
    /// All timings zero (benchmarks, logic tests).
    pub fn instant() -> Self {
        MockConfig {
            prepare_ms: 0,
            boot_ms: 0,
            stop_ms: 0,
            boot_jitter_ms: 0,
            faults: BTreeMap::new(),
        }
    }

    pub(crate) fn validate(&self) -> Result<(), String> {
        for (id, f) in &self.faults {
            InstanceId::parse(id).map_err(|e| format!("faults: {e}"))?;
            if let MockFault::PrepareFails { reason } | MockFault::GuestFails { reason, .. } = f {
                if reason.is_deliberate_stop() || *reason == ReasonCode::CrashLoopBackoff {
                    return Err(format!(
                        "faults.{id}: {reason} is not something a runtime raises"
                    ));
                }
            }
        }
        Ok(())
    }
}

/// A simulated failure. Times are measured from the workload start.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum MockFault {
    /// `prepare` fails with this reason (image pull, rootfs build, network, volume).
    PrepareFails {
        /// Reason.
        reason: ReasonCode,
    },
    /// The VMM refuses to start.
    StartFails,
    /// The instance actor panics while preparing (tests the supervisor).
    PanicAtPrepare,
    /// The VMM runs but the guest never reports the workload started.
    NoHandshake,
    /// The VMM exits before the handshake.
    VmmExitsAtBoot {
        /// VMM exit code.
        code: i32,
    },
    /// The guest reports a failure instead of starting the workload.
    GuestFails {
        /// Reason the guest gives.
        reason: ReasonCode,
        /// Delay.
        #[serde(default)]
        after_ms: u64,
    },
    /// The workload exits.
    Exit {
        /// Exit code.
        code: i32,
        /// Delay after start.
        #[serde(default)]
        after_ms: u64,
    },
    /// The guest kernel OOM-kills the workload.
    Oom {
        /// Delay after start.
        #[serde(default)]
        after_ms: u64,
    },
    /// Health probes fail from this time on.
    HealthFails {
        /// Delay after start.
        #[serde(default)]
        after_ms: u64,
        /// A hostile guest: after its start it repeats `workload_started` every this
        /// many ms (0: never).
        #[serde(default)]
        repeat_start_ms: u64,
    },
    /// Health probes fail until this many ms after the workload started (a workload
    /// that takes a while to listen), then pass.
    HealthFailsUntil {
        /// Delay after start.
        ms: u64,
    },
    /// As `HealthFailsUntil`, and the guest says when the port listens (as guest init
    /// does with the health check's port): one [`VmEvent::PortListening`] at `ms`.
    ListensAfter {
        /// Delay after start.
        ms: u64,
    },
}

struct MockVm {
    handle: VmHandle,
    started_at: Instant,
    fault: Option<MockFault>,
    started_reported: AtomicBool,
    terminal_reported: AtomicBool,
    listening_reported: AtomicBool,
    stopped: Notify,
}

/// The mock runtime.
pub struct MockRuntime {
    config: MockConfig,
    clock: SharedClock,
    state_dir: Option<PathBuf>,
    ledger: Option<Store>,
    vms: Mutex<HashMap<InstanceId, Arc<MockVm>>>,
    faults: Mutex<HashMap<InstanceId, MockFault>>,
    starts: Mutex<HashMap<InstanceId, u64>>,
    total_starts: AtomicU64,
    logs: crate::logs::LogHandle,
    fault_changed: Notify,
}

#[derive(Serialize, Deserialize)]
struct VmRecord {
    instance_id: String,
    generation: i32,
    boot_id: String,
    spec_hash: String,
}

impl MockRuntime {
    /// A mock runtime. With `state_dir` (and a `ledger`), VMs are recorded on disk and
    /// survive agent restarts.
    pub fn new(
        config: MockConfig,
        clock: SharedClock,
        state_dir: Option<PathBuf>,
        ledger: Option<Store>,
    ) -> Self {
        let faults = config
            .faults
            .iter()
            .filter_map(|(id, f)| InstanceId::parse(id).ok().map(|id| (id, f.clone())))
            .collect();
        MockRuntime {
            config,
            clock,
            state_dir,
            ledger,
            vms: Mutex::new(HashMap::new()),
            faults: Mutex::new(faults),
            starts: Mutex::new(HashMap::new()),
            total_starts: AtomicU64::new(0),
            logs: crate::logs::LogHandle::default(),
            fault_changed: Notify::new(),
        }
    }

    /// Sends simulated console lines (boot, workload start, exit) to `logs`.
    pub fn with_logs(mut self, logs: crate::logs::LogHandle) -> Self {
        self.logs = logs;
        self
    }

    /// A simulated line: to the shipper, and with a state dir to the instance's
    /// `workload.log` as the real runtimes write it (so `logs <id>` works here too).
    fn log_line(&self, id: &str, stream: &str, line: &str) {
        self.logs.push(id, stream, line);
        let Some(dir) = self
            .state_dir
            .as_ref()
            .map(|d| d.join("instances").join(id))
        else {
            return;
        };
        let stored = crate::logstore::StoredLine {
            ts: self
                .clock
                .wall()
                .to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            stream: stream.to_string(),
            line: line.to_string(),
            truncated: false,
        };
        let written = std::fs::create_dir_all(&dir).and_then(|()| {
            let mut f = crate::logstore::LogFile::open(
                &dir.join(crate::logstore::LOG_FILE),
                crate::runtime::vmm::workload_logs::DEFAULT_FILE_MAX_BYTES,
            )?;
            f.append(&stored)?;
            f.flush()
        });
        if let Err(e) = written {
            tracing::debug!(instance = id, error = %e, "mock: cannot write the workload log");
        }
    }

    /// Injects a fault for an instance (applies to every later attempt until cleared).
    pub fn inject(&self, id: &InstanceId, fault: MockFault) {
        lock(&self.faults).insert(id.clone(), fault);
        self.fault_changed.notify_waiters();
    }

    /// Removes an instance's fault.
    pub fn clear_fault(&self, id: &InstanceId) {
        lock(&self.faults).remove(id);
        self.fault_changed.notify_waiters();
    }

    /// Instances with a VM right now.
    pub fn running(&self) -> Vec<InstanceId> {
        let mut v: Vec<_> = lock(&self.vms).keys().cloned().collect();
        v.sort();
        v
    }

    /// The VM of an instance, if running.
    pub fn vm(&self, id: &InstanceId) -> Option<VmHandle> {
        lock(&self.vms).get(id).map(|vm| vm.handle.clone())
    }

    /// How many times `start` succeeded for an instance.
    pub fn starts(&self, id: &InstanceId) -> u64 {
        lock(&self.starts).get(id).copied().unwrap_or(0)
    }

    /// How many times `start` succeeded in total.
    pub fn total_starts(&self) -> u64 {
        self.total_starts.load(Ordering::Relaxed)
    }

    fn boot_ms(&self, id: &InstanceId) -> u64 {
        if self.config.boot_jitter_ms == 0 {
            return self.config.boot_ms;
        }
        let h = id.as_str().bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        });
        self.config.boot_ms + h % self.config.boot_jitter_ms
    }

    fn fault_of(&self, id: &InstanceId) -> Option<MockFault> {
        lock(&self.faults).get(id).cloned()
    }

    async fn pause(&self, ms: u64) {
        if ms > 0 {
            self.clock.sleep(Duration::from_millis(ms)).await;
        }
    }

    fn instance_dir(&self, id: &InstanceId) -> Option<PathBuf> {
        self.state_dir
            .as_ref()
            .map(|d| d.join("instances").join(id.as_str()))
    }

    async fn ledger<F>(&self, f: F) -> Result<(), RuntimeError>
    where
        F: FnOnce(&Store) -> Result<(), crate::state::StoreError> + Send + 'static,
    {
        if let Some(store) = &self.ledger {
            store
                .call(f)
                .await
                .map_err(|e| RuntimeError::VmmStart(format!("resource ledger: {e}").into()))?;
        }
        Ok(())
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl MockRuntime {
    /// The first event of a VM: its boot (the workload starts) or an injected boot
    /// fault.
    async fn boot_event(
        &self,
        handle: &VmHandle,
        vm: &MockVm,
        boot_done: crate::clock::Instant,
    ) -> VmEvent {
        match &vm.fault {
            Some(MockFault::NoHandshake) => {
                vm.stopped.notified().await;
                return VmEvent::VmmExited {
                    code: Some(0),
                    detail: "stopped".into(),
                };
            }
            Some(MockFault::VmmExitsAtBoot { code }) => {
                self.clock.sleep_until(boot_done).await;
                lock(&self.vms).remove(&handle.instance_id);
                return VmEvent::VmmExited {
                    code: Some(*code),
                    detail: format!("mock VMM exited with code {code} before the guest handshake"),
                };
            }
            Some(MockFault::GuestFails { reason, after_ms }) => {
                self.clock
                    .sleep_until(boot_done.plus(Duration::from_millis(*after_ms)))
                    .await;
                return VmEvent::Failed(RuntimeError::Guest {
                    reason: *reason,
                    detail: format!("guest: {reason} (injected by mock)"),
                });
            }
            _ => {}
        }
        self.clock.sleep_until(boot_done).await;
        vm.started_reported.store(true, Ordering::Release);
        self.log_line(
            handle.instance_id.as_str(),
            "console",
            "[mock] guest-init: workload started",
        );
        VmEvent::WorkloadStarted
    }

    /// Events of a running VM: injected exits and OOM kills (read live), or the stop.
    async fn running_event(
        &self,
        handle: &VmHandle,
        vm: &MockVm,
        boot_done: crate::clock::Instant,
    ) -> VmEvent {
        let after = |ms: u64| boot_done.plus(Duration::from_millis(ms));
        loop {
            // Faults after the start are read live, so a test can make a running
            // workload exit, OOM or turn unhealthy.
            let changed = self.fault_changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if let Some(MockFault::HealthFails {
                repeat_start_ms, ..
            }) = self.fault_of(&handle.instance_id)
            {
                if repeat_start_ms > 0 {
                    tokio::select! {
                        _ = self.clock.sleep(Duration::from_millis(repeat_start_ms)) => {
                            return VmEvent::WorkloadStarted;
                        }
                        _ = &mut changed => continue,
                        _ = vm.stopped.notified() => {
                            return VmEvent::VmmExited { code: Some(0), detail: "stopped".into() };
                        }
                    }
                }
            }
            if let Some(MockFault::ListensAfter { ms }) = self.fault_of(&handle.instance_id) {
                if !vm.listening_reported.load(Ordering::Acquire) {
                    tokio::select! {
                        _ = self.clock.sleep_until(after(ms)) => {
                            vm.listening_reported.store(true, Ordering::Release);
                            return VmEvent::PortListening;
                        }
                        _ = &mut changed => continue,
                        _ = vm.stopped.notified() => {
                            return VmEvent::VmmExited { code: Some(0), detail: "stopped".into() };
                        }
                    }
                }
            }
            let event = match self.fault_of(&handle.instance_id) {
                Some(MockFault::Exit { code, after_ms }) => Some((
                    after(after_ms),
                    VmEvent::Exited {
                        code,
                        oom_killed: false,
                    },
                )),
                Some(MockFault::Oom { after_ms }) => Some((
                    after(after_ms),
                    VmEvent::Exited {
                        code: 137,
                        oom_killed: true,
                    },
                )),
                _ => None,
            };
            match event {
                Some((at, ev)) if !vm.terminal_reported.load(Ordering::Acquire) => {
                    tokio::select! {
                        _ = self.clock.sleep_until(at) => {
                            vm.terminal_reported.store(true, Ordering::Release);
                            return ev;
                        }
                        _ = &mut changed => continue,
                        _ = vm.stopped.notified() => {}
                    }
                }
                _ => {
                    // Idle workload: nothing happens until the VM is stopped or a fault
                    // is injected.
                    tokio::select! {
                        _ = &mut changed => continue,
                        _ = vm.stopped.notified() => {}
                    }
                }
            }
            return VmEvent::VmmExited {
                code: Some(0),
                detail: "stopped".into(),
            };
        }
    }
}

#[async_trait]
impl Runtime for MockRuntime {
    fn kind(&self) -> &'static str {
        "mock"
    }

    async fn prepare(&self, id: &InstanceId, _workload: &Workload) -> Result<(), RuntimeError> {
        self.pause(self.config.prepare_ms).await;
        if self.fault_of(id) == Some(MockFault::PanicAtPrepare) {
            panic!("mock: injected panic while preparing {id}");
        }
        if let Some(MockFault::PrepareFails { reason }) = self.fault_of(id) {
            let what = match reason {
                ReasonCode::ImagePullFailed => {
                    return Err(RuntimeError::ImagePull(
                        "mock: blob sha256:0000… digest mismatch (injected)".into(),
                    ))
                }
                ReasonCode::RootfsBuildFailed => {
                    return Err(RuntimeError::NoSpace(
                        "mock: mkfs.ext4 failed: no space left on device (injected)".into(),
                    ))
                }
                ReasonCode::NetworkSetupFailed => {
                    return Err(RuntimeError::Network(
                        "mock: cannot create tap: Operation not permitted (injected)".into(),
                    ))
                }
                ReasonCode::VolumeAttachFailed => {
                    return Err(RuntimeError::Volume(
                        "mock: volume vol-1 is attached to another instance (injected)".into(),
                    ))
                }
                other => other,
            };
            return Err(RuntimeError::Guest {
                reason: what,
                detail: format!("mock: injected {what} at prepare"),
            });
        }
        if let Some(dir) = self.instance_dir(id) {
            let (iid, d) = (id.to_string(), dir.display().to_string());
            self.ledger(move |s| {
                s.resource_add(&ResourceRow {
                    kind: "instance_dir".into(),
                    name: d,
                    instance_id: iid,
                    detail: None,
                })
            })
            .await?;
            tokio::fs::create_dir_all(&dir).await.map_err(|e| {
                RuntimeError::RootfsBuild(format!("cannot create {}: {e}", dir.display()).into())
            })?;
        }
        Ok(())
    }

    async fn start(
        &self,
        id: &InstanceId,
        workload: &Workload,
        boot: BootContext,
    ) -> Result<VmHandle, RuntimeError> {
        let fault = self.fault_of(id);
        if fault == Some(MockFault::StartFails) {
            return Err(RuntimeError::VmmStart(
                "mock: VMM rejected its configuration: exit code 152 (bad configuration) (injected)".into(),
            ));
        }
        let handle = VmHandle {
            instance_id: id.clone(),
            generation: workload.spec.generation,
            boot_id: boot.boot_id,
            spec_hash: workload.spec_hash.clone(),
        };
        if let Some(dir) = self.instance_dir(id) {
            let rec = VmRecord {
                instance_id: id.to_string(),
                generation: handle.generation,
                boot_id: handle.boot_id.clone(),
                spec_hash: handle.spec_hash.clone(),
            };
            let path = dir.join("mock-vm.json");
            let (iid, p) = (id.to_string(), path.display().to_string());
            self.ledger(move |s| {
                s.resource_add(&ResourceRow {
                    kind: "process".into(),
                    name: p,
                    instance_id: iid,
                    detail: None,
                })
            })
            .await?;
            let json = serde_json::to_vec(&rec)
                .map_err(|e| RuntimeError::VmmStart(crate::runtime::Cause::of(e)))?;
            let tmp = dir.join("mock-vm.json.tmp");
            tokio::fs::write(&tmp, json).await.map_err(|e| {
                RuntimeError::VmmStart(format!("cannot write {}: {e}", tmp.display()).into())
            })?;
            tokio::fs::rename(&tmp, &path).await.map_err(|e| {
                RuntimeError::VmmStart(format!("cannot write {}: {e}", path.display()).into())
            })?;
        }
        let vm = Arc::new(MockVm {
            handle: handle.clone(),
            started_at: self.clock.now(),
            fault,
            started_reported: AtomicBool::new(false),
            terminal_reported: AtomicBool::new(false),
            listening_reported: AtomicBool::new(false),
            stopped: Notify::new(),
        });
        lock(&self.vms).insert(id.clone(), vm);
        self.log_line(
            id.as_str(),
            "console",
            &format!("[mock] VMM started, boot_id {}", handle.boot_id),
        );
        *lock(&self.starts).entry(id.clone()).or_default() += 1;
        self.total_starts.fetch_add(1, Ordering::Relaxed);
        Ok(handle)
    }

    async fn next_event(&self, handle: &VmHandle) -> VmEvent {
        let Some(vm) = lock(&self.vms).get(&handle.instance_id).cloned() else {
            return VmEvent::VmmExited {
                code: None,
                detail: "mock VM is gone".into(),
            };
        };
        if vm.handle.boot_id != handle.boot_id {
            return VmEvent::VmmExited {
                code: None,
                detail: "mock VM was replaced".into(),
            };
        }
        let boot_done = vm
            .started_at
            .plus(Duration::from_millis(self.boot_ms(&handle.instance_id)));
        if !vm.started_reported.load(Ordering::Acquire) {
            return self.boot_event(handle, &vm, boot_done).await;
        }
        self.running_event(handle, &vm, boot_done).await
    }

    async fn probe_health(&self, handle: &VmHandle, check: &HealthSpec) -> Result<(), String> {
        let vm = lock(&self.vms).get(&handle.instance_id).cloned();
        let Some(vm) = vm else {
            return Err(format!("port {}: connection refused (no VM)", check.port));
        };
        if let Some(MockFault::HealthFailsUntil { ms } | MockFault::ListensAfter { ms }) =
            self.fault_of(&handle.instance_id)
        {
            let until = vm.started_at.plus(Duration::from_millis(
                self.boot_ms(&handle.instance_id) + ms,
            ));
            if self.clock.now() < until {
                return Err(format!("port {}: connection refused (mock)", check.port));
            }
        }
        if let Some(MockFault::HealthFails { after_ms, .. }) = self.fault_of(&handle.instance_id) {
            let from = vm.started_at.plus(Duration::from_millis(
                self.boot_ms(&handle.instance_id) + after_ms,
            ));
            if self.clock.now() >= from {
                return Err(format!(
                    "GET :{}{}: 503 Service Unavailable (mock)",
                    check.port,
                    check.path.as_deref().unwrap_or("/")
                ));
            }
        }
        Ok(())
    }

    async fn stop(&self, handle: &VmHandle, grace: Duration) -> StopOutcome {
        let vm = lock(&self.vms).get(&handle.instance_id).cloned();
        let graceful = Duration::from_millis(self.config.stop_ms) <= grace;
        self.pause(self.config.stop_ms.min(grace.as_millis() as u64))
            .await;
        if let Some(vm) = vm {
            vm.stopped.notify_waiters();
            lock(&self.vms).remove(&handle.instance_id);
        }
        if let Some(dir) = self.instance_dir(&handle.instance_id) {
            let path = dir.join("mock-vm.json");
            let _ = tokio::fs::remove_file(&path).await;
            let p = path.display().to_string();
            let _ = self.ledger(move |s| s.resource_remove("process", &p)).await;
        }
        // A graceful stop lets the simulated workload exit 0; a forced one kills the
        // VM before the guest can report, so no workload exit code is known (as with
        // a real VMM).
        StopOutcome {
            graceful,
            exit_code: graceful.then_some(0),
        }
    }

    async fn recover(&self) -> Result<Vec<VmHandle>, RuntimeError> {
        let Some(root) = self.state_dir.as_ref().map(|d| d.join("instances")) else {
            let mut v: Vec<_> = lock(&self.vms)
                .values()
                .map(|vm| vm.handle.clone())
                .collect();
            v.sort_by(|a, b| a.instance_id.cmp(&b.instance_id));
            return Ok(v);
        };
        let mut found = Vec::new();
        let mut entries = match tokio::fs::read_dir(&root).await {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(found),
            Err(e) => {
                return Err(RuntimeError::VmmStart(
                    format!("cannot list {}: {e}", root.display()).into(),
                ))
            }
        };
        while let Ok(Some(entry)) = entries.next_entry().await {
            let path = entry.path().join("mock-vm.json");
            let Ok(bytes) = tokio::fs::read(&path).await else {
                continue;
            };
            let Ok(rec) = serde_json::from_slice::<VmRecord>(&bytes) else {
                tracing::warn!(path = %path.display(), "ignoring unreadable mock VM record");
                continue;
            };
            let Ok(id) = InstanceId::parse(&rec.instance_id) else {
                continue;
            };
            let handle = VmHandle {
                instance_id: id.clone(),
                generation: rec.generation,
                boot_id: rec.boot_id,
                spec_hash: rec.spec_hash,
            };
            let mut vms = lock(&self.vms);
            let vm = vms.entry(id.clone()).or_insert_with(|| {
                Arc::new(MockVm {
                    handle: handle.clone(),
                    // Found running: it booted long ago.
                    started_at: Instant::default(),
                    fault: lock(&self.faults).get(&id).cloned(),
                    started_reported: AtomicBool::new(false),
                    terminal_reported: AtomicBool::new(false),
                    listening_reported: AtomicBool::new(false),
                    stopped: Notify::new(),
                })
            });
            found.push(vm.handle.clone());
        }
        found.sort_by(|a, b| a.instance_id.cmp(&b.instance_id));
        Ok(found)
    }

    fn current_vm(&self, id: &InstanceId) -> Option<VmHandle> {
        self.vm(id)
    }

    fn instance_dir_of(&self, id: &InstanceId) -> Option<PathBuf> {
        self.instance_dir(id)
    }

    async fn cleanup(&self, id: &InstanceId) -> Result<(), RuntimeError> {
        if let Some(vm) = lock(&self.vms).remove(id) {
            vm.stopped.notify_waiters();
        }
        if let Some(dir) = self.instance_dir(id) {
            // Like the real runtimes: the logs stay (removal retires them).
            if let Err(e) = crate::logstore::remove_all_but_logs(&dir) {
                return Err(RuntimeError::VmmStart(
                    format!("cannot clean {}: {e}", dir.display()).into(),
                ));
            }
            let _ = std::fs::remove_dir(&dir);
            let iid = id.to_string();
            self.ledger(move |s| {
                for r in s.resources()?.into_iter().filter(|r| r.instance_id == iid) {
                    s.resource_remove(&r.kind, &r.name)?;
                }
                Ok(())
            })
            .await?;
        }
        Ok(())
    }
}
