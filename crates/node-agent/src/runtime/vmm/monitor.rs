//! One VM's monitor: a task that serves the guest channel (handshake, status events,
//! stop requests) and watches the VMM process, and turns both into [`VmEvent`]s, the
//! same way for every VMM.
//!
//! Rules it keeps for every runtime:
//! - at most one terminal event (`Exited`, `Failed`, `VmmExited`) per VM;
//! - a workload killed by signal S exits with `128 + S`;
//! - the VMM's exit before the handshake is `firecracker_start_failed` with the VMM's
//!   exit and log tails; after it, `VmmExited` (the actor reports it without an
//!   `exit_code`, which is the workload's alone);
//! - a handshake that does not come in time fails the boot with the log tails; an
//!   adopted VM's guest may reconnect whenever it likes (no deadline: a healthy VM is
//!   never failed for a slow reconnect);
//! - the host cgroup's OOM kill of a VMM process is `oom_killed`.
//!
//! What it must not do: stop or kill the VMM (the runtime does, through the VMM's own
//! controls), decide restarts or statuses, or log the guest config (it has secrets).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use plfm_guest_protocol as gp;
use tokio::sync::{mpsc, watch};

use super::logs::Evidence;
use super::process::{ExitStatus, Watch};
use crate::guest::{accept_guest, GuestEvent};
use crate::instance::ReasonCode;
use crate::runtime::{RuntimeError, VmEvent, VmHandle};
use crate::spec::InstanceId;

/// How long the monitor keeps reading the guest channel after the VMM exited, for
/// messages still in flight (it stops as soon as the channel closes).
const GUEST_DRAIN: Duration = Duration::from_secs(2);

/// What a monitor needs.
pub struct MonitorArgs {
    /// Instance id (the guest's `hello` must name it).
    pub instance: String,
    /// The guest's listener (`<uds>_5161`), bound before the VMM started.
    pub listener: tokio::net::UnixListener,
    /// The config handed over in the handshake.
    pub config: gp::Config,
    /// Handshake deadline (fresh boots).
    pub handshake: Duration,
    /// The VMM process.
    pub watch: Watch,
    /// Adopted after an agent restart.
    pub adopted: bool,
    /// Log files whose tails go into failure messages.
    pub evidence: Evidence,
    /// A console log to keep under a size cap (path, bytes).
    pub console_cap: Option<(std::path::PathBuf, u64)>,
    /// Tells whether the VMM processes' host cgroup OOM-killed one of them (and says
    /// so), when there is such a group.
    pub oom: Option<OomCheck>,
    /// The VMM's meaning of its exit codes.
    pub exit_meaning: fn(i32) -> Option<&'static str>,
    /// The guest's log stream (served next to the monitor until the VMM has exited).
    pub workload_logs: Option<super::workload_logs::WorkloadLogs>,
}

/// How long after a stop's deadline the guest has to end the VMM (sync, reboot).
pub const GUEST_MARGIN: Duration = Duration::from_secs(2);
/// How long the VMM has to end after its own stop control before it is killed.
pub const VMM_MARGIN: Duration = Duration::from_secs(3);

/// A check of the host cgroup's OOM kills: `Some(why)` once one happened.
pub type OomCheck = Box<dyn Fn() -> Option<String> + Send + Sync>;

/// The running monitor of one VM.
pub struct Monitor {
    events: tokio::sync::Mutex<mpsc::UnboundedReceiver<VmEvent>>,
    stop_tx: mpsc::UnboundedSender<Duration>,
    exited: watch::Receiver<Option<ExitStatus>>,
    workload_exit: Arc<Mutex<Option<WorkloadExit>>>,
    task: tokio::task::JoinHandle<()>,
}

/// How the workload ended, as the guest reported it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct WorkloadExit {
    /// Exit code (128 + signal for a signal).
    code: i32,
    /// SIGKILL ended it (the guest's escalation at a stop deadline, or an OOM kill).
    killed: bool,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Sends VM events: at most one `WorkloadStarted` and one terminal event per VM, so
/// the (unbounded) channel never holds more than two, whatever the guest sends; a
/// guest repeating `workload_started` cannot restart the instance's readiness or
/// health bookkeeping.
struct Events {
    tx: mpsc::UnboundedSender<VmEvent>,
    terminal_sent: bool,
    started_sent: bool,
    /// Repeated `workload_started` events dropped (warned about once).
    repeats: u64,
    /// The guest completed its handshake.
    handshake_done: bool,
}

impl Events {
    fn new(tx: mpsc::UnboundedSender<VmEvent>) -> Events {
        Events {
            tx,
            terminal_sent: false,
            started_sent: false,
            repeats: 0,
            handshake_done: false,
        }
    }

    fn send(&mut self, ev: VmEvent) {
        if matches!(ev, VmEvent::WorkloadStarted) {
            if std::mem::replace(&mut self.started_sent, true) {
                self.repeats += 1;
                if self.repeats == 1 {
                    tracing::warn!("guest repeated workload_started; repeats are ignored");
                }
                return;
            }
        } else if std::mem::replace(&mut self.terminal_sent, true) {
            return;
        }
        let _ = self.tx.send(ev);
    }
}

/// Most guest events read per second; beyond it the monitor stops reading for the rest
/// of the second (the guest's writes then block: backpressure), so a guest flooding its
/// channel costs the host a bounded amount of work.
pub const GUEST_EVENTS_PER_SECOND: u32 = 100;

/// The per-second budget of guest events.
#[derive(Debug)]
struct EventBudget {
    window: tokio::time::Instant,
    used: u32,
}

impl EventBudget {
    fn new(now: tokio::time::Instant) -> EventBudget {
        EventBudget {
            window: now,
            used: 0,
        }
    }

    /// Counts one event at `now`; how long to pause before reading the next.
    fn spend(&mut self, now: tokio::time::Instant) -> Option<Duration> {
        if now.duration_since(self.window) >= Duration::from_secs(1) {
            self.window = now;
            self.used = 0;
        }
        self.used += 1;
        (self.used >= GUEST_EVENTS_PER_SECOND)
            .then(|| (self.window + Duration::from_secs(1)).duration_since(now))
    }
}

impl Monitor {
    /// Starts the monitor task.
    pub fn spawn(args: MonitorArgs) -> Monitor {
        let (ev_tx, ev_rx) = mpsc::unbounded_channel();
        let (stop_tx, stop_rx) = mpsc::unbounded_channel();
        let (exit_tx, exit_rx) = watch::channel(None);
        let workload_exit = Arc::new(Mutex::new(None));
        let mut args = args;
        if let Some(logs) = args.workload_logs.take() {
            // Ends on its own once the VMM exited (or this monitor is gone).
            tokio::spawn(super::workload_logs::serve(logs, exit_rx.clone()));
        }
        let task = tokio::spawn(run(
            args,
            Events::new(ev_tx),
            stop_rx,
            exit_tx,
            workload_exit.clone(),
        ));
        Monitor {
            events: tokio::sync::Mutex::new(ev_rx),
            stop_tx,
            exited: exit_rx,
            workload_exit,
            task,
        }
    }

    /// The next event; pending forever once the monitor has said everything.
    /// Cancel-safe.
    pub async fn next_event(&self) -> VmEvent {
        let mut rx = self.events.lock().await;
        match rx.recv().await {
            Some(ev) => ev,
            None => std::future::pending().await,
        }
    }

    /// Asks the guest to stop its workload within `grace` (nothing happens without a
    /// guest channel; the runtime escalates).
    pub fn request_guest_stop(&self, grace: Duration) {
        let _ = self.stop_tx.send(grace);
    }

    /// Whether the VMM process has exited.
    pub fn has_exited(&self) -> bool {
        self.exited.borrow().is_some()
    }

    /// Waits until the VMM has exited or `until` passes; whether it exited.
    pub async fn wait_exit(&self, until: tokio::time::Instant) -> bool {
        let mut rx = self.exited.clone();
        let exited = tokio::time::timeout_at(until, rx.wait_for(|v| v.is_some()))
            .await
            .is_ok();
        exited
    }

    /// The workload's exit code, when the guest reported one.
    pub fn workload_exit(&self) -> Option<i32> {
        lock(&self.workload_exit).map(|w| w.code)
    }

    /// Whether the guest had to SIGKILL the workload.
    fn workload_killed(&self) -> bool {
        lock(&self.workload_exit).is_some_and(|w| w.killed)
    }

    /// Stops the VM, escalating, the same way for every VMM: the guest is asked to
    /// stop the workload within `grace` (it SIGKILLs it at the deadline, syncs and
    /// reboots, which ends the VMM); [`GUEST_MARGIN`] after the deadline the VMM's own
    /// control is used (`vmm_stop`: QMP quit, SendCtrlAltDel); [`VMM_MARGIN`] later the
    /// VMM is killed (`kill`). The stop is graceful only when the VMM ended in the
    /// first step and the workload was not SIGKILLed; `exit_code` is the workload's.
    pub async fn stop_escalating<F: std::future::Future<Output = ()>>(
        &self,
        grace: Duration,
        vmm_stop: F,
        kill: impl FnOnce(),
    ) -> crate::runtime::StopOutcome {
        let outcome = |graceful: bool| crate::runtime::StopOutcome {
            graceful: graceful && !self.workload_killed(),
            exit_code: self.workload_exit(),
        };
        if self.has_exited() {
            return outcome(true);
        }
        let start = tokio::time::Instant::now();
        self.request_guest_stop(grace);
        if self.wait_exit(start + grace + GUEST_MARGIN).await {
            return outcome(true);
        }
        vmm_stop.await;
        if self
            .wait_exit(tokio::time::Instant::now() + VMM_MARGIN)
            .await
        {
            return outcome(false);
        }
        kill();
        self.wait_exit(tokio::time::Instant::now() + Duration::from_secs(5))
            .await;
        outcome(false)
    }

    /// Stops the task (the VMM itself is not touched).
    pub fn abort(&self) {
        self.task.abort();
    }
}

/// An event for a VM this runtime does not track (stopped, replaced, never started):
/// answered at once, so no caller waits forever.
pub fn unknown_vm() -> VmEvent {
    VmEvent::VmmExited {
        code: None,
        detail: "no such VM (stopped or replaced)".into(),
    }
}

/// The monitor's side of the guest channel (everything but the VMM process).
struct GuestSide {
    instance: String,
    listener: tokio::net::UnixListener,
    config: gp::Config,
    handshake: Duration,
    adopted: bool,
    evidence: Evidence,
    oom: Option<OomCheck>,
}

async fn run(
    a: MonitorArgs,
    mut events: Events,
    mut stop_rx: mpsc::UnboundedReceiver<Duration>,
    exit_tx: watch::Sender<Option<ExitStatus>>,
    workload_exit: Arc<Mutex<Option<WorkloadExit>>>,
) {
    let MonitorArgs {
        instance,
        listener,
        config,
        handshake,
        mut watch,
        adopted,
        evidence,
        console_cap,
        oom,
        exit_meaning,
        workload_logs: _,
    } = a;
    let g = GuestSide {
        instance,
        listener,
        config,
        handshake,
        adopted,
        evidence,
        oom,
    };
    let capper = async {
        let Some((path, max)) = &console_cap else {
            return std::future::pending().await;
        };
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tick.tick().await;
            super::logs::cap_log(path, *max);
        }
    };
    let status = {
        let guest = guest(&g, &mut events, &mut stop_rx, &workload_exit);
        tokio::pin!(guest);
        tokio::select! {
            s = watch.exited() => {
                // What the guest said last (the workload's exit, and whether it had to
                // be SIGKILLed) can still be in flight when the VMM is already gone:
                // hear it out until the channel closes, for a moment at most.
                let _ = tokio::time::timeout(GUEST_DRAIN, &mut guest).await;
                s
            }
            _ = &mut guest => watch.exited().await,
            _ = capper => watch.exited().await,
        }
    };
    let _ = exit_tx.send(Some(status));
    let detail = g.evidence.attach(status.describe(exit_meaning));
    let oom = g.oom.as_ref().and_then(|f| f());
    let ev = match oom {
        Some(oom) => VmEvent::Failed(RuntimeError::HostOom(format!("{oom}; {detail}").into())),
        None if !events.handshake_done && !g.adopted => VmEvent::Failed(RuntimeError::VmmStart(
            format!("VMM exited before the guest handshake: {detail}").into(),
        )),
        None => VmEvent::VmmExited {
            code: status.code,
            detail,
        },
    };
    events.send(ev);
}

/// Serves the guest channel; returns only when there is nothing more to hear from it
/// (the channel closed, or the guest sent its terminal status).
async fn guest(
    a: &GuestSide,
    events: &mut Events,
    stop_rx: &mut mpsc::UnboundedReceiver<Duration>,
    workload_exit: &Mutex<Option<WorkloadExit>>,
) {
    // The monitor starts right after the VMM is spawned: the boot split below is
    // measured from here (`benches/boot.rs` reads these lines).
    let spawned = tokio::time::Instant::now();
    let mut session = loop {
        let accept = accept_guest(&a.listener, &a.instance, a.config.clone(), a.handshake);
        match accept.await {
            Ok(s) => {
                if !a.adopted {
                    tracing::debug!(instance = %a.instance, handshake_ms = spawned.elapsed().as_millis() as u64, "guest handshake done after VMM start");
                }
                break s;
            }
            // A running guest reconnects (every second, `resumed`) when it likes.
            Err(e) if a.adopted => {
                tracing::debug!(instance = %a.instance, error = %e, "adopted guest has not reconnected yet");
            }
            Err(e) => {
                let detail = a.evidence.attach(e.to_string());
                events.send(VmEvent::Failed(match e.reason() {
                    ReasonCode::FirecrackerStartFailed => RuntimeError::VmmStart(detail.into()),
                    reason => RuntimeError::Guest { reason, detail },
                }));
                return std::future::pending().await;
            }
        }
    };
    events.handshake_done = true;
    let mut budget = EventBudget::new(tokio::time::Instant::now());
    loop {
        tokio::select! {
            ev = session.next_event() => {
                if let Some(pause) = budget.spend(tokio::time::Instant::now()) {
                    tracing::warn!(instance = %a.instance, pause_ms = pause.as_millis() as u64, "guest event flood: reading paused");
                    tokio::time::sleep(pause).await;
                }
                match ev {
                Ok(GuestEvent::ConfigApplied) => {}
                Ok(GuestEvent::WorkloadStarted { init_time, handshake_wait, .. }) => {
                    if !a.adopted {
                        // Boot split: VMM start → workload exec, and the guest's share.
                        tracing::info!(
                            instance = %a.instance,
                            since_vmm_start_ms = spawned.elapsed().as_millis() as u64,
                            guest_init_ms = init_time.map(|d| d.as_millis() as u64),
                            guest_handshake_wait_ms = handshake_wait.map(|d| d.as_millis() as u64),
                            "workload started"
                        );
                    }
                    events.send(VmEvent::WorkloadStarted)
                }
                Ok(GuestEvent::Listening { port }) => {
                    tracing::debug!(instance = %a.instance, port, since_vmm_start_ms = spawned.elapsed().as_millis() as u64, "workload listens");
                    events.send(VmEvent::PortListening)
                }
                Ok(GuestEvent::Unknown) => {
                    tracing::debug!(instance = %a.instance, "unknown guest event ignored");
                }
                // A terminal status is the guest's last word: the channel is closed
                // on return, and that close tells the guest its status arrived (it
                // waits for it before ending the VM; see guest init's
                // `close_after_delivery`).
                Ok(GuestEvent::Exited { code, signal, oom_killed }) => {
                    let code = code.or(signal.map(|s| 128 + s)).unwrap_or(128);
                    *lock(workload_exit) = Some(WorkloadExit { code, killed: signal == Some(9) });
                    events.send(VmEvent::Exited { code, oom_killed });
                    return;
                }
                Ok(GuestEvent::Failed { reason, detail }) => {
                    events.send(VmEvent::Failed(RuntimeError::Guest { reason, detail }));
                    return;
                }
                Err(_) => {
                    // The channel ended. A host cgroup OOM kill of a helper process
                    // (vhost-device-vsock) cuts the guest off: that is this VM's end.
                    if let Some(oom) = a.oom.as_ref().and_then(|f| f()) {
                        events.send(VmEvent::Failed(RuntimeError::HostOom(format!("{oom}; guest channel closed").into())));
                    }
                    return;
                }
                }
            },
            Some(grace) = stop_rx.recv() => {
                if let Err(e) = session.request_stop(grace).await {
                    tracing::warn!(instance = %a.instance, error = %e, "guest stop request failed");
                }
            }
        }
    }
}

/// One tracked VM: its handle, its monitor and what its runtime keeps about it.
pub struct Tracked<R> {
    /// The VM.
    pub handle: VmHandle,
    /// Its monitor.
    pub monitor: Monitor,
    /// The runtime's own record (processes, addresses, cgroup).
    pub record: R,
}

/// The VMs a runtime tracks, by instance: at most one per instance (a new one stops
/// the old one's monitor).
pub struct VmTable<R> {
    vms: Mutex<std::collections::HashMap<InstanceId, Arc<Tracked<R>>>>,
}

impl<R> Default for VmTable<R> {
    fn default() -> Self {
        VmTable {
            vms: Mutex::new(Default::default()),
        }
    }
}

impl<R> VmTable<R> {
    /// Tracks `vm` (replacing the instance's previous one); returns its handle.
    pub fn insert(&self, vm: Tracked<R>) -> VmHandle {
        let handle = vm.handle.clone();
        if let Some(old) = lock(&self.vms).insert(handle.instance_id.clone(), Arc::new(vm)) {
            old.monitor.abort();
        }
        handle
    }

    /// The instance's VM.
    pub fn get(&self, id: &InstanceId) -> Option<Arc<Tracked<R>>> {
        lock(&self.vms).get(id).cloned()
    }

    /// Stops tracking the instance's VM (its monitor ends; the VMM is not touched).
    pub fn remove(&self, id: &InstanceId) -> Option<Arc<Tracked<R>>> {
        let vm = lock(&self.vms).remove(id);
        if let Some(vm) = &vm {
            vm.monitor.abort();
        }
        vm
    }

    /// Whether the instance has a tracked VM.
    pub fn contains(&self, id: &InstanceId) -> bool {
        lock(&self.vms).contains_key(id)
    }

    /// The instance's current VM handle.
    pub fn current(&self, id: &InstanceId) -> Option<VmHandle> {
        lock(&self.vms).get(id).map(|v| v.handle.clone())
    }

    /// Every tracked VM.
    pub fn all(&self) -> Vec<Arc<Tracked<R>>> {
        lock(&self.vms).values().cloned().collect()
    }

    /// The next event of `handle`'s VM; an unknown VM (stopped, replaced, never
    /// started here) is answered at once with [`unknown_vm`].
    pub async fn next_event(&self, handle: &VmHandle) -> VmEvent {
        match self
            .get(&handle.instance_id)
            .filter(|v| v.handle == *handle)
        {
            Some(vm) => vm.monitor.next_event().await,
            None => unknown_vm(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_event_budget_pauses_a_flood_until_the_second_ends() {
        let t0 = tokio::time::Instant::now();
        let mut b = EventBudget::new(t0);
        for _ in 1..GUEST_EVENTS_PER_SECOND {
            assert_eq!(b.spend(t0), None);
        }
        let at = t0 + Duration::from_millis(250);
        assert_eq!(b.spend(at), Some(Duration::from_millis(750)));
        // A new second, a new budget.
        assert_eq!(b.spend(t0 + Duration::from_secs(1)), None);
    }

    /// A guest that repeats `workload_started` thousands of times: the VM reports it
    /// once, and its exit still arrives right after (nothing queued in between).
    #[tokio::test]
    async fn a_guest_repeating_workload_started_is_reported_once() {
        use plfm_guest_protocol::{
            GuestMessage, Hello, HostMessage, MessageReader, MessageWriter, StatusEvent,
        };
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("v.sock");
        let listener = crate::guest::bind_guest_listener(&uds).unwrap();
        let sock = crate::guest::guest_socket_path(&uds);
        let guest = std::thread::spawn(move || {
            let s = std::os::unix::net::UnixStream::connect(&sock).unwrap();
            let mut r = MessageReader::new(s.try_clone().unwrap());
            let mut w = MessageWriter::new(s);
            w.write_message(&GuestMessage::Hello(Hello {
                guest_init_version: "test".into(),
                protocol: 1,
                instance_id: "flood".into(),
                boot_id: "b".into(),
                resumed: false,
            }))
            .unwrap();
            let Ok(Some(HostMessage::Config(_))) = r.read_message::<HostMessage>() else {
                panic!("no config")
            };
            w.write_message(&GuestMessage::Ack).unwrap();
            let started = GuestMessage::Status(StatusEvent::WorkloadStarted {
                pid: 7,
                init_us: None,
                handshake_wait_us: None,
            });
            for _ in 0..50 {
                w.write_message(&started).unwrap();
            }
            w.write_message(&GuestMessage::Status(StatusEvent::Exited {
                code: Some(3),
                signal: None,
                oom_killed: false,
            }))
            .unwrap();
            // The host closes the channel once it has the terminal status (the
            // guest waits for that before ending the VM), while the VMM still runs.
            r.get_ref()
                .set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            matches!(r.read_message::<HostMessage>(), Ok(None))
        });
        let child = tokio::process::Command::new("sleep")
            .arg("30")
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let config = crate::runtime::vmm::guest::resumed_config("flood", 1);
        let m = Monitor::spawn(MonitorArgs {
            instance: "flood".into(),
            listener,
            config,
            handshake: Duration::from_secs(10),
            watch: Watch::Child(child),
            adopted: false,
            evidence: Evidence::new(vec![]),
            console_cap: None,
            oom: None,
            exit_meaning: |_| None,
            workload_logs: None,
        });
        let within = |f| tokio::time::timeout(Duration::from_secs(10), f);
        assert!(matches!(
            within(m.next_event()).await.unwrap(),
            VmEvent::WorkloadStarted
        ));
        match within(m.next_event()).await.unwrap() {
            VmEvent::Exited { code: 3, .. } => {}
            other => panic!("the exit must follow the one start: {other:?}"),
        }
        assert!(
            guest.join().unwrap(),
            "the host did not close the channel after the exit"
        );
        assert!(!m.has_exited(), "the VMM is still running");
    }
}
