//! The instance actor: one tokio task per instance that owns its lifecycle: prepare,
//! boot, wait for the workload and its health check, watch it while ready, drain and
//! stop, restart with backoff, clean up.
//!
//! The contract: the actor asks the reconciler ([`decide`]) what to do whenever
//! something changed, performs that one step, and reports every status through the
//! status manager, awaiting durability before the next side effect. It reads desired
//! state from a watch channel (latest value wins, so bursts coalesce). It never sends
//! reports itself and never touches another instance.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::clock::{Instant, SharedClock};
use crate::instance::{ReasonCode, Status};
use crate::reconciler::{decide, Desired, InstanceAction, Observed};
use crate::restart::{Ending, RestartDecision, RestartTracker};
use crate::runtime::{BootContext, Runtime, RuntimeError, VmEvent, VmHandle};
use crate::secrets::{SecretsError, SecretsSource};
use crate::spec::{Assignment, DesiredState, HealthSpec, InstanceId};
use crate::status::{Applied, StatusManager, StatusUpdate};

/// The pause after the first failed health probe of a boot; it doubles after each
/// failure up to `interval_seconds` until the first probe passes.
pub const FIRST_RETRY: Duration = Duration::from_millis(20);

/// How the message of a `failed` that is retried because of an outage begins; an agent
/// restarted during the retry reads it back to retry on instead of parking the
/// instance (a `never` policy would otherwise park it).
pub const TRANSIENT_MARK: &str = "transient, retrying in";

/// What every actor shares.
pub struct ActorEnv {
    /// The VMM.
    pub runtime: Arc<dyn Runtime>,
    /// The status owner.
    pub status: Arc<StatusManager>,
    /// Time.
    pub clock: SharedClock,
    /// Secret material.
    pub secrets: Arc<dyn SecretsSource>,
    /// Deadline from VMM start to the workload start.
    pub boot_timeout: Duration,
}

/// How an actor ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ActorExit {
    /// The instance left the plan and is cleaned up.
    Removed,
    /// The agent detaches; any VM keeps running.
    Detached,
}

pub(crate) struct Actor {
    id: InstanceId,
    env: Arc<ActorEnv>,
    rx: watch::Receiver<Desired>,
    vm: Option<VmHandle>,
    /// The assignment the VM (or the last attempt) runs.
    current: Option<Arc<Assignment>>,
    workload_started: bool,
    ready: bool,
    booted_at: Instant,
    restart: RestartTracker,
    restarts: u32,
    parked: Option<String>,
    backoff_until: Option<Instant>,
    /// The backoff running is a retry after a transient failure (not a restart).
    retrying_transient: bool,
    /// Generation whose restart counters were restored from the store at an agent
    /// restart, and whether it had failed: its first boot keeps the counters.
    resumed: Option<(i32, bool)>,
}

impl Actor {
    /// An actor; `vm` is a running VM found for this instance (adopted).
    pub(crate) fn new(
        id: InstanceId,
        env: Arc<ActorEnv>,
        rx: watch::Receiver<Desired>,
        vm: Option<VmHandle>,
    ) -> Actor {
        let brief = env.status.brief(&id);
        let failures = env.status.consecutive_failures(&id);
        let desired = rx.borrow().clone();
        let now = env.clock.now();
        let mut actor = Actor {
            id,
            env,
            rx,
            vm: None,
            current: None,
            workload_started: false,
            ready: false,
            booted_at: now,
            // The crash-loop budget survives an agent restart.
            restart: RestartTracker::resume(failures),
            restarts: brief.map(|b| b.3).unwrap_or(0),
            parked: None,
            backoff_until: None,
            retrying_transient: false,
            resumed: brief.map(|b| (b.1, b.0 == Status::Failed)),
        };
        if let Some(vm) = vm {
            let matching = desired
                .assignment
                .as_ref()
                .filter(|a| {
                    a.generation == vm.generation && a.spec_hash() == Some(vm.spec_hash.as_str())
                })
                .cloned();
            if let Some((status, generation, _, _)) = brief {
                if generation == vm.generation {
                    actor.ready = status == Status::Ready;
                    actor.workload_started = status == Status::Ready;
                }
            }
            if actor.ready {
                actor.restart.on_ready(now);
            }
            tracing::info!(instance = %actor.id, boot_id = %vm.boot_id, ready = actor.ready, "adopted running VM");
            actor.current = matching;
            actor.vm = Some(vm);
        } else if let (Some((status, generation, reason, _)), Some(a)) =
            (brief, desired.assignment.as_ref())
        {
            // No VM: an instance that ended for good before the restart stays parked;
            // one that was retrying a transient failure (an outage) retries on.
            let policy = a.workload.as_ref().map(|w| w.lifecycle.restart_policy);
            let retrying = actor
                .env
                .status
                .get(&actor.id)
                .and_then(|v| v.error_message)
                .is_some_and(|m| m.starts_with(TRANSIENT_MARK));
            let parked = generation == a.generation
                && match status {
                    Status::Failed => {
                        reason == Some(ReasonCode::CrashLoopBackoff)
                            || (policy == Some(crate::spec::RestartPolicy::Never) && !retrying)
                    }
                    Status::Stopped => {
                        reason.is_none() && policy != Some(crate::spec::RestartPolicy::Always)
                    }
                    _ => false,
                };
            if parked {
                actor.parked = a.spec_hash().map(str::to_string);
                actor.current = Some(a.clone());
            }
        }
        actor
    }

    fn observed(&self) -> Observed {
        let (status, generation, reason, _) =
            self.env
                .status
                .brief(&self.id)
                .unwrap_or((Status::Pending, 0, None, 0));
        Observed {
            status,
            reason,
            generation,
            vm: self
                .vm
                .as_ref()
                .map(|v| (v.generation, v.spec_hash.clone())),
            parked: self.parked.clone(),
            backoff_until: self.backoff_until,
            now: self.env.clock.now(),
        }
    }

    fn generation(&self) -> i32 {
        self.vm
            .as_ref()
            .map(|v| v.generation)
            .or(self.current.as_ref().map(|a| a.generation))
            .or_else(|| self.env.status.status_of(&self.id).map(|s| s.1))
            .unwrap_or(0)
    }

    /// Reports a status; returns whether it changed. Illegal transitions are logged
    /// (they are bugs) and treated as "no change".
    async fn report(&self, status: Status, f: impl FnOnce(&mut StatusUpdate)) -> bool {
        let mut u = StatusUpdate::new(self.id.clone(), self.generation(), status);
        u.restarts = self.restarts;
        u.consecutive_failures = self.restart.consecutive();
        u.boot_id = self.vm.as_ref().map(|v| v.boot_id.clone());
        f(&mut u);
        match self.env.status.update(u).await {
            Ok(Applied::Changed { .. }) => true,
            Ok(Applied::Unchanged) => false,
            Err(e) => {
                tracing::error!(instance = %self.id, error = %e, "status update refused");
                false
            }
        }
    }

    /// Waits for any change of the desired state; `false` when the supervisor is gone.
    async fn changed(&mut self) -> bool {
        self.rx.changed().await.is_ok()
    }

    /// Runs until the instance is removed or the agent detaches.
    pub(crate) async fn run(mut self) -> ActorExit {
        loop {
            let desired = self.rx.borrow_and_update().clone();
            let action = decide(&desired, &self.observed());
            tracing::debug!(instance = %self.id, ?action, "decided");
            match action {
                InstanceAction::Detach => return ActorExit::Detached,
                InstanceAction::Keep if !self.ready => self.await_ready().await,
                InstanceAction::Keep => self.monitor().await,
                InstanceAction::Boot(a) => self.boot(a).await,
                InstanceAction::Drain { reason, grace } => {
                    self.drain(reason, grace, &desired).await
                }
                InstanceAction::MarkStopped(reason) => {
                    let changed = self
                        .report(Status::Stopped, |u| {
                            u.reason = reason;
                            u.message = Some(stop_message(reason, &desired));
                        })
                        .await;
                    if !changed && !self.changed().await {
                        return ActorExit::Detached;
                    }
                }
                InstanceAction::MarkRefused(refused) => {
                    tracing::warn!(instance = %self.id, reason = %refused.reason, message = %refused.message, "spec refused");
                    let generation = refused.generation.unwrap_or_else(|| self.generation());
                    let mut u = StatusUpdate::new(self.id.clone(), generation, Status::Failed);
                    u.reason = Some(refused.reason);
                    u.message = Some(refused.message.clone());
                    u.restarts = self.restarts;
                    u.consecutive_failures = self.restart.consecutive();
                    let changed =
                        matches!(self.env.status.update(u).await, Ok(Applied::Changed { .. }));
                    if !changed && !self.changed().await {
                        return ActorExit::Detached;
                    }
                }
                InstanceAction::WaitUntil(t) => {
                    let sleep = self.env.clock.sleep_until(t);
                    tokio::select! {
                        _ = sleep => {}
                        alive = self.changed() => if !alive { return ActorExit::Detached },
                    }
                }
                InstanceAction::Hold => {
                    if !self.changed().await {
                        return ActorExit::Detached;
                    }
                }
                InstanceAction::Remove => {
                    if let Err(e) = self.env.runtime.cleanup(&self.id).await {
                        tracing::warn!(instance = %self.id, error = %e, "clean-up failed");
                    }
                    // Only the logs stay, until the retention sweep.
                    if let Some(dir) = self.env.runtime.instance_dir_of(&self.id) {
                        if let Err(e) = crate::logstore::retire(&dir, self.env.clock.wall()) {
                            tracing::warn!(instance = %self.id, error = %e, "cannot retire the instance directory");
                        }
                    }
                    let status = self.observed().status;
                    if !matches!(status, Status::Stopped | Status::Pending) {
                        self.report(Status::Stopped, |u| {
                            u.message = Some("removed from the plan".into())
                        })
                        .await;
                    }
                    // A plan that brought the instance back in the meantime wins.
                    let d = self.rx.borrow();
                    if d.assignment.is_none() && d.refused.is_none() {
                        self.env.status.mark_removed(&self.id);
                        return ActorExit::Removed;
                    }
                }
            }
        }
    }

    /// Runs `f` unless the desired state moves away from booting `a` first.
    async fn unless_superseded<F: Future>(&mut self, a: &Assignment, f: F) -> Option<F::Output> {
        let rx = &mut self.rx;
        let superseded = async move {
            loop {
                if rx.changed().await.is_err() {
                    return;
                }
                let d = rx.borrow();
                let still = d.assignment.as_ref().is_some_and(|n| {
                    n.generation == a.generation
                        && n.spec_hash() == a.spec_hash()
                        && n.desired_state == DesiredState::Running
                }) && !d.node_draining
                    && d.operator_stop != Some(a.generation)
                    && !d.detach;
                if !still {
                    return;
                }
            }
        };
        tokio::select! {
            r = f => Some(r),
            _ = superseded => None,
        }
    }

    async fn boot(&mut self, a: Arc<Assignment>) {
        let Some(w) = a.workload.clone() else { return };
        let same_spec = self
            .current
            .as_ref()
            .and_then(|c| c.spec_hash().map(str::to_string))
            == a.spec_hash().map(str::to_string)
            && self.current.as_ref().map(|c| c.generation) == Some(a.generation);
        // The first boot after an agent restart, of the generation the store knew: the
        // restored counters stay (the crash-loop budget survives the restart), and a
        // boot after a failure counts as a restart.
        let resumed = match self.resumed.take() {
            Some((generation, failed)) if self.current.is_none() && generation == a.generation => {
                Some(failed)
            }
            _ => None,
        };
        if !same_spec && resumed.is_none() {
            self.restart.reset();
            self.restarts = 0;
            self.parked = None;
        } else if (self.backoff_until.is_some() && !self.retrying_transient)
            || resumed == Some(true)
        {
            self.restarts += 1;
        }
        self.backoff_until = None;
        self.retrying_transient = false;
        self.current = Some(a.clone());
        self.report(Status::Preparing, |_| {}).await;

        let runtime = self.env.runtime.clone();
        let id = self.id.clone();
        match self.unless_superseded(&a, runtime.prepare(&id, &w)).await {
            None => return,
            Some(Err(e)) => {
                if let RuntimeError::NoSpace(msg) = &e {
                    tracing::error!(instance = %self.id, error = %msg, "host disk full; node degraded");
                    self.env
                        .status
                        .set_disk_full(Some(format!("disk full: {msg}")));
                }
                let ending = if e.is_transient() {
                    Ending::Transient
                } else {
                    Ending::Failure
                };
                return self
                    .end(ending, Some(e.reason()), e.to_string(), None)
                    .await;
            }
            Some(Ok(())) => self.env.status.set_disk_full(None),
        }

        let mut secrets = None;
        if let Some(s) = &w.spec.secrets {
            if let Some(version) = &s.secret_version_id {
                let source = self.env.secrets.clone();
                match self.unless_superseded(&a, source.fetch(version)).await {
                    None => return,
                    Some(Ok(m)) => secrets = Some(m),
                    Some(Err(SecretsError::Missing { .. })) if !s.required => {}
                    Some(Err(e)) => {
                        let ending = if e.is_transient() {
                            Ending::Transient
                        } else {
                            Ending::Failure
                        };
                        return self
                            .end(ending, Some(e.reason()), e.to_string(), None)
                            .await;
                    }
                }
            }
        }

        let boot_id = format!("{:032x}", rand::random::<u128>());
        self.report(Status::Booting, |u| u.boot_id = Some(boot_id.clone()))
            .await;
        self.booted_at = self.env.clock.now();
        self.workload_started = false;
        self.ready = false;
        match runtime
            .start(&id, &w, BootContext { boot_id, secrets })
            .await
        {
            Ok(vm) => self.vm = Some(vm),
            Err(e) => {
                self.end(Ending::Failure, Some(e.reason()), e.to_string(), None)
                    .await
            }
        }
    }

    fn health(&self) -> Option<HealthSpec> {
        self.current
            .as_ref()?
            .workload
            .as_ref()?
            .spec
            .health
            .clone()
    }

    async fn probe(&self, vm: &VmHandle, h: &HealthSpec) -> Result<(), String> {
        let timeout = self.env.clock.sleep(Duration::from_secs(h.timeout_seconds));
        tokio::select! {
            r = self.env.runtime.probe_health(vm, h) => r,
            _ = timeout => Err(format!("no answer within {} s", h.timeout_seconds)),
        }
    }

    /// Booting: waits for the workload start, then for the health check to pass.
    async fn await_ready(&mut self) {
        let Some(vm) = self.vm.clone() else { return };
        let runtime = self.env.runtime.clone();
        if !self.workload_started {
            let deadline = self.booted_at.plus(self.env.boot_timeout);
            let mut timeout = self.env.clock.sleep_until(deadline);
            loop {
                tokio::select! {
                    ev = runtime.next_event(&vm) => match ev {
                        VmEvent::WorkloadStarted => {
                            self.workload_started = true;
                            break;
                        }
                        // Only after the start; the probes below begin at once anyway.
                        VmEvent::PortListening => continue,
                        other => return self.on_vm_event(other).await,
                    },
                    _ = &mut timeout => {
                        let msg = format!(
                            "guest handshake did not complete within {} s of VMM start",
                            self.env.boot_timeout.as_secs()
                        );
                        return self.end(Ending::Failure, Some(ReasonCode::FirecrackerStartFailed), msg, None).await;
                    }
                    _ = self.rx.changed() => return,
                }
            }
        }
        if let Some(h) = self.health() {
            let started = self.env.clock.now();
            let grace_end = started.plus(Duration::from_secs(h.grace_period_seconds));
            let interval = Duration::from_secs(h.interval_seconds);
            let (mut passes, mut failures) = (0u32, 0u32);
            // Until the first pass, probes follow each other fast (FIRST_RETRY doubling
            // up to the interval), so `ready` comes as soon as the workload answers;
            // after it, and once ready, they are `interval_seconds` apart.
            let mut retry = FIRST_RETRY;
            let mut passed_once = false;
            // A failure counts at most once per interval, however fast the probes run,
            // so `failure_threshold` keeps its meaning.
            let mut last_counted: Option<Instant> = None;
            loop {
                match self.probe(&vm, &h).await {
                    Ok(()) => {
                        passes += 1;
                        failures = 0;
                        passed_once = true;
                        if passes >= h.success_threshold {
                            break;
                        }
                    }
                    Err(e) => {
                        passes = 0;
                        let now = self.env.clock.now();
                        let due = last_counted.is_none_or(|t| now.since(t) >= interval);
                        if now >= grace_end && due {
                            failures += 1;
                            last_counted = Some(now);
                            if failures >= h.failure_threshold {
                                let msg = format!("health check never passed ({failures} failures after the grace period): {e}");
                                return self
                                    .end(
                                        Ending::Failure,
                                        Some(ReasonCode::HealthcheckFailed),
                                        msg,
                                        None,
                                    )
                                    .await;
                            }
                        }
                    }
                }
                let wait = if passed_once {
                    interval
                } else {
                    let w = retry.min(interval);
                    retry = (retry * 2).min(interval);
                    w
                };
                let mut pause = self.env.clock.sleep(wait);
                loop {
                    tokio::select! {
                        _ = &mut pause => break,
                        ev = runtime.next_event(&vm) => {
                            match ev {
                                // A repeated start changes nothing: the count goes on.
                                VmEvent::WorkloadStarted => continue,
                                // The guest saw the port listen: probe now rather than
                                // at the next retry (before the first pass only).
                                VmEvent::PortListening if !passed_once => break,
                                VmEvent::PortListening => continue,
                                ev => return self.on_vm_event(ev).await,
                            }
                        }
                        _ = self.rx.changed() => return,
                    }
                }
            }
        }
        let boot_ms = self.env.clock.now().since(self.booted_at).as_millis() as u64;
        if self
            .report(Status::Ready, |u| u.boot_duration_ms = Some(boot_ms))
            .await
        {
            tracing::info!(instance = %self.id, boot_ms, "ready");
        }
        self.ready = true;
        self.restart.on_ready(self.env.clock.now());
    }

    /// Ready: watches VM events and the periodic health check until something happens.
    async fn monitor(&mut self) {
        let Some(vm) = self.vm.clone() else { return };
        let runtime = self.env.runtime.clone();
        let health = self.health();
        let mut failures = 0u32;
        let arm = |clock: &crate::clock::SharedClock| {
            health
                .as_ref()
                .map(|h| clock.sleep(Duration::from_secs(h.interval_seconds)))
        };
        let mut next_probe = arm(&self.env.clock);
        loop {
            tokio::select! {
                ev = runtime.next_event(&vm) => {
                    // A repeated start (or a late listening signal) neither resets the
                    // failure count nor delays the next probe.
                    if matches!(ev, VmEvent::WorkloadStarted | VmEvent::PortListening) {
                        continue;
                    }
                    return self.on_vm_event(ev).await;
                }
                _ = async { match next_probe.as_mut() { Some(s) => s.await, None => std::future::pending().await } } => {
                    next_probe = arm(&self.env.clock);
                    let Some(h) = &health else { continue };
                    match self.probe(&vm, h).await {
                        Ok(()) => failures = 0,
                        Err(e) => {
                            failures += 1;
                            tracing::warn!(instance = %self.id, failures, error = %e, "health check failed");
                            if failures >= h.failure_threshold {
                                let msg = format!("health check failed {failures} times in a row: {e}");
                                return self.end(Ending::Failure, Some(ReasonCode::HealthcheckFailed), msg, None).await;
                            }
                        }
                    }
                }
                _ = self.rx.changed() => return,
            }
        }
    }

    async fn on_vm_event(&mut self, ev: VmEvent) {
        match ev {
            VmEvent::WorkloadStarted => self.workload_started = true,
            VmEvent::PortListening => {}
            VmEvent::Exited {
                code,
                oom_killed: true,
            } => {
                let limit = self
                    .current
                    .as_ref()
                    .and_then(|a| a.workload.as_ref())
                    .map(|w| w.spec.resources.memory_limit_bytes)
                    .unwrap_or(0);
                let msg = format!("workload was killed by the guest kernel's OOM killer (memory_limit_bytes {limit})");
                self.end(
                    Ending::Failure,
                    Some(ReasonCode::OomKilled),
                    msg,
                    Some(code),
                )
                .await
            }
            VmEvent::Exited { code: 0, .. } => {
                self.end(
                    Ending::CleanExit,
                    None,
                    "workload exited with code 0".into(),
                    Some(0),
                )
                .await
            }
            VmEvent::Exited { code, .. } => {
                // DESIGN §2 has no reason code for a workload's own non-zero exit: the
                // exit code is the reason (docs/statuses.md).
                self.end(
                    Ending::Failure,
                    None,
                    format!("workload exited with code {code}"),
                    Some(code),
                )
                .await
            }
            VmEvent::Failed(e) => {
                self.end(Ending::Failure, Some(e.reason()), e.to_string(), None)
                    .await
            }
            // `exit_code` is the workload's exit code only (docs/statuses.md): the
            // VMM's own exit status is in the message (`detail` names it).
            VmEvent::VmmExited { detail, .. } if !self.workload_started => {
                let msg = format!("VMM exited before the guest handshake: {detail}");
                self.end(
                    Ending::Failure,
                    Some(ReasonCode::FirecrackerStartFailed),
                    msg,
                    None,
                )
                .await
            }
            VmEvent::VmmExited { detail, .. } => {
                self.end(
                    Ending::Failure,
                    None,
                    format!("VMM exited unexpectedly: {detail}"),
                    None,
                )
                .await
            }
        }
    }

    /// The VM (or the attempt) ended: stop what is left, report, apply the restart
    /// policy.
    async fn end(
        &mut self,
        ending: Ending,
        reason: Option<ReasonCode>,
        message: String,
        exit_code: Option<i32>,
    ) {
        if let Some(vm) = self.vm.take() {
            let grace = self.termination_grace();
            self.env.runtime.stop(&vm, grace).await;
        }
        if let Err(e) = self.env.runtime.cleanup(&self.id).await {
            tracing::warn!(instance = %self.id, error = %e, "clean-up after failure failed");
        }
        self.ready = false;
        self.workload_started = false;
        let lifecycle = self
            .current
            .as_ref()
            .and_then(|a| a.workload.as_ref())
            .map(|w| w.lifecycle.clone())
            .unwrap_or_default();
        let now = self.env.clock.now();
        let decision =
            self.restart
                .on_end(ending, lifecycle.restart_policy, lifecycle.max_retries, now);
        let hash = self
            .current
            .as_ref()
            .and_then(|a| a.spec_hash().map(str::to_string));
        match decision {
            RestartDecision::CrashLoop => {
                let last = match reason {
                    Some(r) => format!("{r}: {message}"),
                    None => message.clone(),
                };
                let msg = format!(
                    "restart budget spent: {} failures in a row (max_retries {}); last: {last}",
                    self.restart.consecutive(),
                    lifecycle.max_retries
                );
                tracing::warn!(instance = %self.id, %msg, "crash loop");
                self.report(Status::Failed, |u| {
                    u.reason = Some(ReasonCode::CrashLoopBackoff);
                    u.message = Some(msg);
                    u.exit_code = exit_code;
                    u.boot_id = None;
                })
                .await;
                self.parked = hash;
            }
            d => {
                let status = if ending == Ending::CleanExit {
                    Status::Stopped
                } else {
                    Status::Failed
                };
                let message = match d {
                    // The mark leads the message, so no truncation cuts it: an agent
                    // restarted during the retry reads it back (see `Actor::new`).
                    RestartDecision::RestartAfter(delay) if ending == Ending::Transient => {
                        format!(
                            "{TRANSIENT_MARK} {} s (not counted against max_retries): {message}",
                            delay.as_secs()
                        )
                    }
                    _ => message,
                };
                tracing::warn!(instance = %self.id, %status, reason = ?reason, %message, "instance ended");
                self.report(status, |u| {
                    u.reason = reason;
                    u.message = Some(message);
                    u.exit_code = exit_code;
                    u.boot_id = None;
                })
                .await;
                match d {
                    RestartDecision::RestartAfter(delay) => {
                        self.backoff_until = Some(now.plus(delay));
                        self.retrying_transient = ending == Ending::Transient;
                    }
                    _ => self.parked = hash,
                }
            }
        }
    }

    fn termination_grace(&self) -> Duration {
        let secs = self
            .current
            .as_ref()
            .and_then(|a| a.workload.as_ref())
            .map(|w| w.lifecycle.termination_grace_seconds)
            .unwrap_or(10);
        Duration::from_secs(secs)
    }

    /// Drains and stops the VM, cleans up, reports `stopped`.
    async fn drain(&mut self, reason: Option<ReasonCode>, grace: Duration, desired: &Desired) {
        let message = stop_message(reason, desired);
        let Some(vm) = self.vm.clone() else { return };
        // The VM stops while `draining` is being recorded, not after: a stuck state
        // store (a full disk, a lock another process holds) must not keep running a VM
        // an operator or the plan stopped. `draining` is queued first, so the reports
        // keep their order; `stopped` below waits for the store.
        let draining = self.report(Status::Draining, |u| {
            u.reason = reason;
            u.message = Some(message.clone());
        });
        let (_, outcome) = tokio::join!(draining, self.env.runtime.stop(&vm, grace));
        self.vm = None;
        self.ready = false;
        self.workload_started = false;
        if let Err(e) = self.env.runtime.cleanup(&self.id).await {
            tracing::warn!(instance = %self.id, error = %e, "clean-up after stop failed");
        }
        let msg = if outcome.graceful {
            message
        } else {
            format!(
                "{message}; forced after the {} s grace period",
                grace.as_secs()
            )
        };
        let generation = vm.generation;
        let mut u = StatusUpdate::new(self.id.clone(), generation, Status::Stopped);
        u.reason = reason;
        u.message = Some(msg);
        u.exit_code = outcome.exit_code;
        u.restarts = self.restarts;
        u.consecutive_failures = self.restart.consecutive();
        if let Err(e) = self.env.status.update(u).await {
            tracing::error!(instance = %self.id, error = %e, "status update refused");
        }
    }
}

fn stop_message(reason: Option<ReasonCode>, desired: &Desired) -> String {
    match reason {
        Some(ReasonCode::TerminatedByOperator) => "stopped by an operator".into(),
        Some(ReasonCode::NodeDraining) => "node is draining".into(),
        _ => match &desired.assignment {
            None if desired.refused.is_some() => "new spec refused; stopping the old VM".into(),
            None => "removed from the plan".into(),
            Some(a) if a.desired_state != DesiredState::Running => {
                format!("desired state is {:?}", a.desired_state).to_lowercase()
            }
            Some(a) => format!("replaced by generation {}", a.generation),
        },
    }
}
