//! The supervisor: owns one actor per instance, hands each the latest desired state,
//! restarts actors that panic (with backoff), and carries operator requests (stop,
//! node drain) and shutdown to them.
//!
//! The contract: nothing happens before the first plan (so VMs found after an agent
//! restart are not drained by mistake); after it, every instance known from the plan,
//! the runtime's running VMs, the state store or the resource ledger has an actor, and
//! an actor leaves only when its instance is removed and cleaned up. The supervisor
//! never changes a status itself; actors report through the status manager.
//!
//! Liveness: [`Supervisor::ping`] is answered by the main loop itself, between
//! commands, so it is answered only while that loop is not stuck (the systemd watchdog
//! relies on it). For the tests of that, and only for them, the environment variable
//! `PLFM_TESTING_STALL_RECONCILE_FILE=<path>` makes every reconcile pass (plan apply)
//! wait while `<path>` exists: an honest stall of the main loop, inactive unless that
//! variable is set. Never set it on a real node.

pub mod actor;
mod writer;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinSet;

use crate::config::ShutdownMode;
use crate::instance::Status;
use crate::metrics::{KindLabel, Metrics};
use crate::reconciler::{drain_done, plan_actions, refusals, Desired, SupervisorAction};
use crate::runtime::VmHandle;
use crate::spec::{Assignment, AssignmentWire, InstanceId, Plan};
use crate::state::Store;
use actor::Actor;
pub use actor::{ActorEnv, ActorExit};

/// Supervisor settings.
#[derive(Debug, Clone)]
pub struct SupervisorConfig {
    /// Most instances accepted.
    pub max_instances: usize,
}

/// An operator request could not be carried out.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OperatorError {
    /// No such instance on this node.
    #[error("instance {0} is not assigned to this node")]
    UnknownInstance(String),
    /// The supervisor is gone.
    #[error("the agent is shutting down")]
    ShuttingDown,
    /// `start` of an instance no operator stopped.
    #[error("instance {0} was not stopped by an operator (nothing to start)")]
    NotStopped(String),
}

/// What the node's instances reserve (for heartbeats).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Usage {
    /// Sum of `cpu_request` of instances meant to run.
    pub cpu_reserved: f64,
    /// Sum of `memory_limit_bytes` of instances meant to run.
    pub memory_reserved: i64,
    /// Instances meant to run.
    pub instances: usize,
    /// The node is draining.
    pub node_draining: bool,
    /// Why the node is degraded, if it is.
    pub degraded: Option<String>,
}

enum Command {
    Apply(Plan, oneshot::Sender<()>),
    Usage(oneshot::Sender<Usage>),
    Stop(InstanceId, oneshot::Sender<Result<(), OperatorError>>),
    Start(InstanceId, oneshot::Sender<Result<(), OperatorError>>),
    DrainNode(oneshot::Sender<()>),
    UndrainNode(oneshot::Sender<()>),
    Shutdown(ShutdownMode, oneshot::Sender<()>),
    Ping(oneshot::Sender<()>),
}

/// Handle to the supervisor task.
#[derive(Clone)]
pub struct Supervisor {
    tx: mpsc::Sender<Command>,
    first_plan: watch::Receiver<bool>,
}

impl Supervisor {
    /// Starts the supervisor. `recovered` are VMs the runtime found running; they are
    /// adopted by the actors of their instances once the first plan arrives.
    pub fn start(
        env: Arc<ActorEnv>,
        store: Store,
        metrics: Arc<Metrics>,
        config: SupervisorConfig,
        recovered: Vec<VmHandle>,
    ) -> Result<Supervisor, crate::state::StoreError> {
        let rows = store.load_instances()?;
        let operator_stops = rows
            .iter()
            .filter_map(|r| {
                Some((
                    InstanceId::parse(&r.instance_id).ok()?,
                    r.operator_stopped_generation?,
                ))
            })
            .collect();
        let ledger: HashSet<InstanceId> = store
            .resources()?
            .into_iter()
            .filter_map(|r| InstanceId::parse(&r.instance_id).ok())
            .collect();
        let node_draining = store.meta_get("node_state")?.as_deref() == Some("draining");
        let (tx, rx) = mpsc::channel(64);
        let (respawn_tx, respawn_rx) = mpsc::unbounded_channel();
        let writer = writer::Writer::start(store, env.clock.clone());
        let (first_plan_tx, first_plan) = watch::channel(false);
        let task = SupervisorTask {
            first_plan_tx,
            testing_stall: std::env::var_os(crate::systemd::TESTING_STALL_ENV)
                .map(std::path::PathBuf::from),
            env,
            writer,
            metrics,
            config,
            slots: HashMap::new(),
            tasks: JoinSet::new(),
            task_ids: HashMap::new(),
            node_draining,
            operator_stops,
            adopt: recovered
                .into_iter()
                .map(|vm| (vm.instance_id.clone(), vm))
                .collect(),
            ledger,
            first_plan_applied: false,
            respawn_tx,
            shutdown: None,
        };
        tokio::spawn(task.run(rx, respawn_rx));
        Ok(Supervisor { tx, first_plan })
    }

    /// Returns once the first plan was applied: every VM found running at start whose
    /// instance is known has been adopted by its actor by then.
    pub async fn first_plan_applied(&self) {
        let mut rx = self.first_plan.clone();
        let _ = rx.wait_for(|applied| *applied).await;
    }

    /// Whether the main loop answers (it does so between commands, so a loop stuck in
    /// one does not). `false` when the supervisor is gone.
    pub async fn ping(&self) -> bool {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Command::Ping(tx)).await.is_err() {
            return false;
        }
        rx.await.is_ok()
    }

    /// Applies a full plan; returns once every actor has been told.
    pub async fn apply(&self, plan: Plan) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Command::Apply(plan, tx)).await.is_ok() {
            let _ = rx.await;
        }
    }

    /// What the instances reserve, for heartbeats.
    pub async fn usage(&self) -> Option<Usage> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(Command::Usage(tx)).await.ok()?;
        rx.await.ok()
    }

    /// Operator stop of one instance (`terminated_by_operator`).
    pub async fn stop_instance(&self, id: InstanceId) -> Result<(), OperatorError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Command::Stop(id, tx))
            .await
            .map_err(|_| OperatorError::ShuttingDown)?;
        rx.await.map_err(|_| OperatorError::ShuttingDown)?
    }

    /// Undoes an operator stop: the instance runs its current spec again.
    pub async fn start_instance(&self, id: InstanceId) -> Result<(), OperatorError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Command::Start(id, tx))
            .await
            .map_err(|_| OperatorError::ShuttingDown)?;
        rx.await.map_err(|_| OperatorError::ShuttingDown)?
    }

    /// Ends a node drain: instances run again and new ones boot.
    pub async fn undrain_node(&self) -> Result<(), OperatorError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Command::UndrainNode(tx))
            .await
            .map_err(|_| OperatorError::ShuttingDown)?;
        rx.await.map_err(|_| OperatorError::ShuttingDown)
    }

    /// Drains the node: every instance stops with `node_draining`, nothing new boots.
    pub async fn drain_node(&self) -> Result<(), OperatorError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Command::DrainNode(tx))
            .await
            .map_err(|_| OperatorError::ShuttingDown)?;
        rx.await.map_err(|_| OperatorError::ShuttingDown)
    }

    /// Stops every actor. `Detach` leaves VMs running for the next agent; `Drain` stops
    /// them first. Returns when all actors ended.
    pub async fn shutdown(&self, mode: ShutdownMode) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Command::Shutdown(mode, tx)).await.is_ok() {
            let _ = rx.await;
        }
    }
}

struct Slot {
    tx: watch::Sender<Desired>,
    panics: u32,
    running: bool,
}

struct SupervisorTask {
    env: Arc<ActorEnv>,
    /// The supervisor's own writes, which never hold it up for long.
    writer: writer::Writer,
    metrics: Arc<Metrics>,
    config: SupervisorConfig,
    slots: HashMap<InstanceId, Slot>,
    tasks: JoinSet<(InstanceId, ActorExit)>,
    task_ids: HashMap<tokio::task::Id, InstanceId>,
    node_draining: bool,
    operator_stops: HashMap<InstanceId, i32>,
    adopt: HashMap<InstanceId, VmHandle>,
    ledger: HashSet<InstanceId>,
    first_plan_applied: bool,
    respawn_tx: mpsc::UnboundedSender<InstanceId>,
    shutdown: Option<(ShutdownMode, Vec<oneshot::Sender<()>>)>,
    first_plan_tx: watch::Sender<bool>,
    /// Test-only stall hook (module docs); `None` on every real node.
    testing_stall: Option<std::path::PathBuf>,
}

impl SupervisorTask {
    async fn run(
        mut self,
        mut rx: mpsc::Receiver<Command>,
        mut respawn_rx: mpsc::UnboundedReceiver<InstanceId>,
    ) {
        loop {
            if self.shutdown.is_some() && self.tasks.is_empty() {
                if let Some((_, waiters)) = self.shutdown.take() {
                    for w in waiters {
                        let _ = w.send(());
                    }
                }
                return;
            }
            tokio::select! {
                cmd = rx.recv(), if self.shutdown.is_none() => match cmd {
                    Some(cmd) => self.command(cmd).await,
                    None => self.begin_shutdown(ShutdownMode::Detach, None).await,
                },
                Some(joined) = self.tasks.join_next_with_id(), if !self.tasks.is_empty() => self.actor_ended(joined),
                Some(id) = respawn_rx.recv() => self.respawn(id),
            }
        }
    }

    async fn command(&mut self, cmd: Command) {
        match cmd {
            Command::Apply(plan, done) => {
                let started = std::time::Instant::now();
                if let Some(path) = &self.testing_stall {
                    while path.exists() {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
                self.apply(plan).await;
                self.first_plan_tx.send_replace(true);
                self.metrics
                    .reconcile_duration
                    .observe(started.elapsed().as_secs_f64());
                let _ = done.send(());
            }
            Command::Stop(id, reply) => {
                let generation = self
                    .slots
                    .get(&id)
                    .map(|slot| slot.tx.borrow().assignment.as_ref().map(|a| a.generation));
                let r = match generation {
                    Some(Some(generation)) => {
                        // The actor stops the VM first; recording the stop (so it
                        // outlives an agent restart) must not hold it up.
                        self.operator_stops.insert(id.clone(), generation);
                        self.push(&id);
                        tracing::info!(instance = %id, generation, "operator stop");
                        let iid = id.to_string();
                        self.writer
                            .write("operator stop", move |s| {
                                s.set_operator_stop(&iid, Some(generation))
                            })
                            .await;
                        Ok(())
                    }
                    _ => Err(OperatorError::UnknownInstance(id.to_string())),
                };
                let _ = reply.send(r);
            }
            Command::Start(id, reply) => {
                let r = if !self.slots.contains_key(&id) {
                    Err(OperatorError::UnknownInstance(id.to_string()))
                } else if self.operator_stops.remove(&id).is_none() {
                    Err(OperatorError::NotStopped(id.to_string()))
                } else {
                    self.push(&id);
                    tracing::info!(instance = %id, "operator start (stop lifted)");
                    let iid = id.to_string();
                    self.writer
                        .write("operator start", move |s| s.set_operator_stop(&iid, None))
                        .await;
                    Ok(())
                };
                let _ = reply.send(r);
            }
            Command::UndrainNode(reply) => {
                self.node_draining = false;
                tracing::info!("node drain ended");
                let ids: Vec<_> = self.slots.keys().cloned().collect();
                for id in ids {
                    self.push(&id);
                }
                self.writer
                    .write("node undrain", |s| s.meta_set("node_state", "active"))
                    .await;
                let _ = reply.send(());
            }
            Command::DrainNode(reply) => {
                self.node_draining = true;
                tracing::info!("node drain requested");
                let ids: Vec<_> = self.slots.keys().cloned().collect();
                for id in ids {
                    self.push(&id);
                }
                self.writer
                    .write("node drain", |s| s.meta_set("node_state", "draining"))
                    .await;
                let _ = reply.send(());
            }
            Command::Shutdown(mode, reply) => self.begin_shutdown(mode, Some(reply)).await,
            Command::Ping(reply) => {
                let _ = reply.send(());
            }
            Command::Usage(reply) => {
                let mut u = Usage {
                    node_draining: self.node_draining,
                    degraded: self.env.status.degraded(),
                    ..Usage::default()
                };
                for slot in self.slots.values() {
                    let d = slot.tx.borrow();
                    let Some(a) = d.assignment.as_ref() else {
                        continue;
                    };
                    let Some(w) = a.workload.as_ref() else {
                        continue;
                    };
                    if a.desired_state == crate::spec::DesiredState::Running
                        && d.operator_stop != Some(a.generation)
                    {
                        u.instances += 1;
                        u.cpu_reserved += w.spec.resources.cpu_request;
                        u.memory_reserved += w.spec.resources.memory_limit_bytes;
                    }
                }
                let _ = reply.send(u);
            }
        }
    }

    async fn begin_shutdown(&mut self, mode: ShutdownMode, reply: Option<oneshot::Sender<()>>) {
        tracing::info!(
            ?mode,
            instances = self.slots.len(),
            "supervisor shutting down"
        );
        if mode == ShutdownMode::Drain {
            // Drain every instance (without persisting a node drain), then detach.
            self.drain_before_detach().await;
        }
        for slot in self.slots.values() {
            slot.tx.send_modify(|d| d.detach = true);
        }
        self.shutdown = Some((mode, reply.into_iter().collect()));
    }

    /// Tells every actor the node drains and waits until each instance reached its
    /// drained end state ([`drain_done`]: stopped, including one that had failed, now
    /// marked stopped with `node_draining`), or until a deadline on the clock. Wakes on
    /// reported status changes: the step that reaches an end state always is one.
    async fn drain_before_detach(&mut self) {
        let changes = self.env.status.subscribe_changes();
        self.node_draining = true;
        let ids: Vec<_> = self.slots.keys().cloned().collect();
        for id in &ids {
            self.push(id);
        }
        let limit = Duration::from_secs(crate::spec::MAX_GRACE_SECONDS + 30);
        let mut deadline = self.env.clock.sleep(limit);
        loop {
            let pending: Vec<&InstanceId> = ids.iter().filter(|id| !self.drained(id)).collect();
            if pending.is_empty() {
                return;
            }
            tokio::select! {
                _ = changes.notified() => {}
                _ = &mut deadline => {
                    tracing::warn!(instances = ?pending, limit_s = limit.as_secs(), "drain on shutdown did not finish in time; detaching");
                    return;
                }
            }
        }
    }

    /// Whether an instance reached its end state of the node drain.
    fn drained(&self, id: &InstanceId) -> bool {
        // No slot, or no actor (it panicked; the respawn waits): nothing will change.
        let Some(slot) = self.slots.get(id).filter(|s| s.running) else {
            return true;
        };
        let (status, generation, reason, _) =
            self.env
                .status
                .brief(id)
                .unwrap_or((Status::Pending, 0, None, 0));
        drain_done(&slot.tx.borrow(), status, reason, generation)
    }

    fn desired_for(&self, id: &InstanceId, assignment: Option<Arc<Assignment>>) -> Desired {
        Desired {
            assignment,
            refused: None,
            node_draining: self.node_draining,
            operator_stop: self.operator_stops.get(id).copied(),
            detach: false,
        }
    }

    /// Re-sends an instance's desired state with the node-level flags refreshed.
    fn push(&mut self, id: &InstanceId) {
        let Some(slot) = self.slots.get(id) else {
            return;
        };
        let current = slot.tx.borrow().clone();
        let mut next = self.desired_for(id, current.assignment.clone());
        next.refused = current.refused.clone();
        slot.tx.send_if_modified(|d| {
            if d.differs(&next) {
                *d = next;
                true
            } else {
                false
            }
        });
    }

    async fn apply(&mut self, plan: Plan) {
        let mut refused = refusals(&plan.rejected);
        for r in plan.rejected.iter() {
            self.metrics
                .rejected
                .get_or_create(&KindLabel { kind: "assignment" })
                .inc();
            match &r.instance_id {
                Some(id) => {
                    tracing::warn!(instance = %id, origin = %r.origin, error = %r.error, "assignment refused")
                }
                None => {
                    tracing::warn!(origin = %r.origin, error = %r.error, "assignment refused; no valid instance id")
                }
            }
        }
        let mut assignments: HashMap<InstanceId, Arc<Assignment>> =
            HashMap::with_capacity(plan.assignments.len());
        for a in plan.assignments {
            if assignments.len() >= self.config.max_instances
                && !self.slots.contains_key(&a.instance_id)
            {
                refused.insert(
                    a.instance_id.clone(),
                    crate::reconciler::RefusedSpec {
                        generation: Some(a.generation),
                        reason: crate::instance::ReasonCode::FirecrackerStartFailed,
                        message: format!(
                            "node is full: agent.max_instances is {}",
                            self.config.max_instances
                        ),
                    },
                );
                continue;
            }
            refused.remove(&a.instance_id);
            assignments.insert(a.instance_id.clone(), Arc::new(a));
        }
        let mut plan_ids: Vec<InstanceId> =
            assignments.keys().chain(refused.keys()).cloned().collect();
        if !self.first_plan_applied {
            // Everything known from before the restart gets an actor too: VMs found
            // running, instances in the store that were not removed, ledger owners.
            let mut known: Vec<InstanceId> = self.adopt.keys().cloned().collect();
            known.extend(
                self.env
                    .status
                    .list()
                    .into_iter()
                    .filter_map(|v| InstanceId::parse(&v.instance_id).ok()),
            );
            known.extend(self.ledger.drain());
            for id in known {
                if !assignments.contains_key(&id)
                    && !refused.contains_key(&id)
                    && !self.slots.contains_key(&id)
                {
                    plan_ids.push(id);
                }
            }
            self.first_plan_applied = true;
        }
        let actors: HashSet<InstanceId> = self.slots.keys().cloned().collect();
        let mut desired_rows = Vec::new();
        for action in plan_actions(&plan_ids, &actors) {
            let (id, assignment) = match &action {
                SupervisorAction::Spawn(id) | SupervisorAction::Update(id) => {
                    (id.clone(), assignments.get(id).cloned())
                }
                SupervisorAction::Remove(id) => (id.clone(), None),
            };
            let mut desired = self.desired_for(&id, assignment.clone());
            desired.refused = refused.get(&id).cloned().map(Arc::new);
            let changed = match self.slots.get(&id) {
                Some(slot) => slot.tx.send_if_modified(|d| {
                    if d.differs(&desired) {
                        *d = desired;
                        true
                    } else {
                        false
                    }
                }),
                None => {
                    let (tx, _) = watch::channel(desired);
                    self.slots.insert(
                        id.clone(),
                        Slot {
                            tx,
                            panics: 0,
                            running: false,
                        },
                    );
                    self.spawn(&id);
                    true
                }
            };
            if changed {
                desired_rows.push((id.to_string(), assignment.map(|a| wire_json(&a))));
            }
        }
        if !desired_rows.is_empty() {
            let now = self.env.clock.wall().to_rfc3339();
            self.writer
                .write("desired state", move |s| s.set_desired(&desired_rows, &now))
                .await;
        }
    }

    fn spawn(&mut self, id: &InstanceId) {
        let Some(slot) = self.slots.get_mut(id) else {
            return;
        };
        let vm = self.adopt.remove(id);
        let actor = Actor::new(id.clone(), self.env.clone(), slot.tx.subscribe(), vm);
        let iid = id.clone();
        let handle = self.tasks.spawn(async move { (iid, actor.run().await) });
        self.task_ids.insert(handle.id(), id.clone());
        slot.running = true;
    }

    fn actor_ended(
        &mut self,
        joined: Result<(tokio::task::Id, (InstanceId, ActorExit)), tokio::task::JoinError>,
    ) {
        match joined {
            Ok((task, (id, exit))) => {
                self.task_ids.remove(&task);
                let Some(slot) = self.slots.get_mut(&id) else {
                    return;
                };
                slot.running = false;
                match exit {
                    ActorExit::Removed => {
                        let back = {
                            let d = slot.tx.borrow();
                            d.assignment.is_some() || d.refused.is_some()
                        };
                        if back && self.shutdown.is_none() {
                            self.spawn(&id);
                        } else {
                            self.slots.remove(&id);
                            self.operator_stops.remove(&id);
                        }
                    }
                    ActorExit::Detached => {}
                }
            }
            Err(e) => {
                let Some(id) = self.task_ids.remove(&e.id()) else {
                    return;
                };
                self.metrics.actor_panics.inc();
                let Some(slot) = self.slots.get_mut(&id) else {
                    return;
                };
                slot.running = false;
                slot.panics += 1;
                let delay = crate::restart::backoff(slot.panics).min(Duration::from_secs(60));
                tracing::error!(instance = %id, panics = slot.panics, retry_in_s = delay.as_secs(), error = %e, "instance actor panicked; restarting it");
                if self.shutdown.is_some() {
                    return;
                }
                let (tx, clock) = (self.respawn_tx.clone(), self.env.clock.clone());
                tokio::spawn(async move {
                    clock.sleep(delay).await;
                    let _ = tx.send(id);
                });
            }
        }
    }

    fn respawn(&mut self, id: InstanceId) {
        if self.shutdown.is_some() || self.slots.get(&id).is_none_or(|s| s.running) {
            return;
        }
        // A VM the panicked actor started is adopted by the new one.
        if let Some(vm) = self.env.runtime.current_vm(&id) {
            self.adopt.insert(id.clone(), vm);
        }
        self.spawn(&id);
    }
}

fn wire_json(a: &Assignment) -> String {
    let wire = AssignmentWire {
        assignment_id: a.assignment_id.clone(),
        node_id: None,
        instance_id: a.instance_id.to_string(),
        generation: a.generation,
        desired_state: a.desired_state,
        drain_grace_seconds: Some(a.drain_grace.as_secs()),
        workload: a.workload.as_ref().map(|w| w.spec.clone()),
    };
    serde_json::to_string(&wire).unwrap_or_default()
}
