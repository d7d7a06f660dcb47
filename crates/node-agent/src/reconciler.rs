//! The reconciler: the one place that turns desired vs observed into actions.
//!
//! Pure functions. [`plan_actions`] compares a plan with the instances the supervisor
//! has actors for and says which actors to create, update or tell to leave. [`decide`]
//! compares one instance's desired state with what its actor observes and says what the
//! actor does next; [`drain_done`] says, from the same rules, when a node drain is over
//! for an instance. None performs I/O or reads a clock.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use crate::clock::Instant;
use crate::instance::{ReasonCode, Status};
use crate::spec::{Assignment, DesiredState, InstanceId, Rejected, SpecError};

/// A spec the agent refused, for an instance it could identify.
#[derive(Debug, Clone, PartialEq)]
pub struct RefusedSpec {
    /// Generation of the refused spec, when known.
    pub generation: Option<i32>,
    /// Reason it is reported with.
    pub reason: ReasonCode,
    /// What is wrong.
    pub message: String,
}

/// Everything an instance actor is told about what should be. Sent on a watch channel,
/// so a burst of updates coalesces into the latest value.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Desired {
    /// The assignment; `None` when the instance left the plan.
    pub assignment: Option<Arc<Assignment>>,
    /// The latest spec for it was refused.
    pub refused: Option<Arc<RefusedSpec>>,
    /// The node is draining.
    pub node_draining: bool,
    /// An operator stopped this generation.
    pub operator_stop: Option<i32>,
    /// The agent is shutting down and leaves VMs running.
    pub detach: bool,
}

impl Desired {
    /// Whether `other` differs in a way the actor must act on.
    pub fn differs(&self, other: &Desired) -> bool {
        let same_assignment = match (&self.assignment, &other.assignment) {
            (None, None) => true,
            (Some(a), Some(b)) => {
                Arc::ptr_eq(a, b)
                    || (a.generation == b.generation
                        && a.desired_state == b.desired_state
                        && a.drain_grace == b.drain_grace
                        && a.spec_hash() == b.spec_hash())
            }
            _ => false,
        };
        !same_assignment
            || self.refused != other.refused
            || self.node_draining != other.node_draining
            || self.operator_stop != other.operator_stop
            || self.detach != other.detach
    }
}

/// What an actor knows about its instance.
#[derive(Debug, Clone, PartialEq)]
pub struct Observed {
    /// Current status.
    pub status: Status,
    /// Reason of the current status.
    pub reason: Option<ReasonCode>,
    /// Generation of the current status.
    pub generation: i32,
    /// The VM, if one runs: its generation and spec hash.
    pub vm: Option<(i32, String)>,
    /// Spec hash the instance is parked on (no restart, crash loop) until it changes.
    pub parked: Option<String>,
    /// No boot before this time (restart backoff).
    pub backoff_until: Option<Instant>,
    /// Now.
    pub now: Instant,
}

/// The actor's next step.
#[derive(Debug, Clone, PartialEq)]
pub enum InstanceAction {
    /// The VM runs the desired spec: watch it.
    Keep,
    /// Prepare and boot the desired spec.
    Boot(Arc<Assignment>),
    /// Drain and stop the VM (reason for deliberate stops), then re-decide.
    Drain {
        /// `terminated_by_operator`, `node_draining`, or none.
        reason: Option<ReasonCode>,
        /// Graceful stop window.
        grace: Duration,
    },
    /// No VM; record `stopped` (with a reason for deliberate stops).
    MarkStopped(Option<ReasonCode>),
    /// No VM; record the refused spec as `failed`.
    MarkRefused(Arc<RefusedSpec>),
    /// Wait for the backoff to end (or for a change).
    WaitUntil(Instant),
    /// Nothing to do until the desired state changes.
    Hold,
    /// The instance left the plan and has no VM: clean up and end the actor.
    Remove,
    /// The agent detaches: end the actor, leave the VM running.
    Detach,
}

const DEFAULT_GRACE: Duration = Duration::from_secs(10);

/// Decides an instance's next step.
pub fn decide(desired: &Desired, obs: &Observed) -> InstanceAction {
    if desired.detach {
        return InstanceAction::Detach;
    }
    let grace = desired
        .assignment
        .as_ref()
        .map(|a| a.drain_grace)
        .unwrap_or(DEFAULT_GRACE);
    let has_vm = obs.vm.is_some();
    let stop_or_mark = |reason: Option<ReasonCode>| {
        if has_vm {
            InstanceAction::Drain { reason, grace }
        } else if obs.status == Status::Stopped || obs.status == Status::Pending && reason.is_none()
        {
            InstanceAction::Hold
        } else if obs.status == Status::Failed && reason.is_none() {
            // A failed instance that should stop: record that it is stopped.
            InstanceAction::MarkStopped(None)
        } else {
            InstanceAction::MarkStopped(reason)
        }
    };
    let Some(a) = &desired.assignment else {
        if let Some(refused) = &desired.refused {
            if has_vm {
                return InstanceAction::Drain {
                    reason: None,
                    grace,
                };
            }
            if obs.status == Status::Failed && obs.reason == Some(refused.reason) {
                return InstanceAction::Hold;
            }
            return InstanceAction::MarkRefused(refused.clone());
        }
        return if has_vm {
            InstanceAction::Drain {
                reason: None,
                grace,
            }
        } else {
            InstanceAction::Remove
        };
    };
    if desired.node_draining {
        return stop_or_mark(Some(ReasonCode::NodeDraining));
    }
    if desired.operator_stop == Some(a.generation) {
        return stop_or_mark(Some(ReasonCode::TerminatedByOperator));
    }
    if a.desired_state != DesiredState::Running {
        return stop_or_mark(None);
    }
    let Some(w) = &a.workload else {
        return stop_or_mark(None);
    };
    if let Some((generation, hash)) = &obs.vm {
        return if *generation == a.generation && *hash == w.spec_hash {
            InstanceAction::Keep
        } else {
            InstanceAction::Drain {
                reason: None,
                grace,
            }
        };
    }
    if obs.parked.as_deref() == Some(w.spec_hash.as_str()) {
        return InstanceAction::Hold;
    }
    match obs.backoff_until {
        Some(t) if t > obs.now => InstanceAction::WaitUntil(t),
        _ => InstanceAction::Boot(a.clone()),
    }
}

/// Whether an instance has reached its end state of a node drain (`desired` has
/// `node_draining` set): its next step would be to hold or to leave. That is `stopped`
/// (a VM drained, or an instance that had failed marked stopped with `node_draining`),
/// a refused spec's `failed`, or gone from the plan. `status`, `reason` and `generation`
/// are the status owner's; a VM is taken to exist exactly when the status has one.
pub fn drain_done(
    desired: &Desired,
    status: Status,
    reason: Option<ReasonCode>,
    generation: i32,
) -> bool {
    let obs = Observed {
        status,
        reason,
        generation,
        // No spec hash is needed: with the node draining, a VM is drained whatever it runs.
        vm: status.has_vm().then(|| (generation, String::new())),
        parked: None,
        backoff_until: None,
        now: Instant::default(),
    };
    matches!(
        decide(desired, &obs),
        InstanceAction::Hold | InstanceAction::Remove
    )
}

/// A supervisor step.
#[derive(Debug, Clone, PartialEq)]
pub enum SupervisorAction {
    /// Start an actor for a new instance.
    Spawn(InstanceId),
    /// Tell an existing actor its new desired state.
    Update(InstanceId),
    /// The instance left the plan: tell its actor (it drains, cleans up, ends).
    Remove(InstanceId),
}

/// Compares a plan with the instances that have actors.
pub fn plan_actions<'a>(
    plan_ids: impl IntoIterator<Item = &'a InstanceId>,
    actors: &HashSet<InstanceId>,
) -> Vec<SupervisorAction> {
    let mut out = Vec::new();
    let mut in_plan = HashSet::new();
    for id in plan_ids {
        if !in_plan.insert(id.clone()) {
            continue;
        }
        if actors.contains(id) {
            out.push(SupervisorAction::Update(id.clone()));
        } else {
            out.push(SupervisorAction::Spawn(id.clone()));
        }
    }
    let mut gone: Vec<_> = actors
        .iter()
        .filter(|id| !in_plan.contains(*id))
        .cloned()
        .collect();
    gone.sort();
    out.extend(gone.into_iter().map(SupervisorAction::Remove));
    out
}

/// The reason a refused spec is reported with: the part of the spec that is wrong
/// decides (DESIGN §2 has no code for "invalid spec"; see docs/statuses.md).
pub fn refused_reason(error: &SpecError) -> ReasonCode {
    let field = match error {
        SpecError::Invalid { field, .. } => field.as_str(),
        SpecError::Missing(field) => field,
        SpecError::BadDigest { .. } => "workload.image",
        SpecError::BadId { what, .. } => what,
        SpecError::Decode(_) => "",
    };
    if field.starts_with("workload.image") {
        ReasonCode::ImagePullFailed
    } else if field.starts_with("workload.mounts") || field == "volume_id" {
        ReasonCode::VolumeAttachFailed
    } else if field.starts_with("workload.network") {
        ReasonCode::NetworkSetupFailed
    } else if field.starts_with("workload.secrets") || field == "secret_version_id" {
        ReasonCode::SecretsInjectionFailed
    } else {
        // The VMM cannot be configured from this spec.
        ReasonCode::FirecrackerStartFailed
    }
}

/// Turns rejected plan entries into refusals by instance (entries that name no valid
/// instance are only logged by the caller).
pub fn refusals(rejected: &[Rejected]) -> BTreeMap<InstanceId, RefusedSpec> {
    rejected
        .iter()
        .filter_map(|r| {
            r.instance_id.clone().map(|id| {
                (
                    id,
                    RefusedSpec {
                        generation: r.generation,
                        reason: refused_reason(&r.error),
                        message: format!("invalid spec ({}): {}", r.origin, r.error),
                    },
                )
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::decode_assignment;

    fn assignment(id: &str, generation: i32, state: &str) -> Arc<Assignment> {
        let mut w = crate::spec::tests::workload_json(id, generation);
        w["generation"] = generation.into();
        let v = serde_json::json!({"instance_id": id, "generation": generation, "desired_state": state, "workload": w});
        Arc::new(decode_assignment(&v, "t").unwrap())
    }

    fn obs(status: Status) -> Observed {
        Observed {
            status,
            reason: None,
            generation: 1,
            vm: None,
            parked: None,
            backoff_until: None,
            now: Instant::default(),
        }
    }

    fn running(a: &Arc<Assignment>) -> Desired {
        Desired {
            assignment: Some(a.clone()),
            ..Desired::default()
        }
    }

    fn vm_of(a: &Assignment) -> Option<(i32, String)> {
        Some((a.generation, a.spec_hash().unwrap().to_string()))
    }

    #[test]
    fn new_running_instance_boots() {
        let a = assignment("a", 1, "running");
        assert_eq!(
            decide(&running(&a), &obs(Status::Pending)),
            InstanceAction::Boot(a)
        );
    }

    #[test]
    fn matching_vm_is_kept() {
        let a = assignment("a", 1, "running");
        let o = Observed {
            vm: vm_of(&a),
            ..obs(Status::Ready)
        };
        assert_eq!(decide(&running(&a), &o), InstanceAction::Keep);
    }

    #[test]
    fn new_generation_replaces_by_draining_first() {
        let old = assignment("a", 1, "running");
        let new = assignment("a", 2, "running");
        let o = Observed {
            vm: vm_of(&old),
            ..obs(Status::Ready)
        };
        assert!(matches!(
            decide(&running(&new), &o),
            InstanceAction::Drain { reason: None, .. }
        ));
        // Once the old VM is gone, the new spec boots.
        let o = Observed {
            vm: None,
            ..obs(Status::Stopped)
        };
        assert_eq!(decide(&running(&new), &o), InstanceAction::Boot(new));
    }

    #[test]
    fn plan_removal_drains_then_removes() {
        let a = assignment("a", 1, "running");
        let gone = Desired::default();
        let o = Observed {
            vm: vm_of(&a),
            ..obs(Status::Ready)
        };
        assert!(matches!(
            decide(&gone, &o),
            InstanceAction::Drain { reason: None, .. }
        ));
        assert_eq!(decide(&gone, &obs(Status::Stopped)), InstanceAction::Remove);
    }

    #[test]
    fn desired_stopped_drains_and_then_holds() {
        let a = assignment("a", 1, "stopped");
        let o = Observed {
            vm: vm_of(&a),
            ..obs(Status::Ready)
        };
        assert!(matches!(
            decide(&running(&a), &o),
            InstanceAction::Drain { .. }
        ));
        assert_eq!(
            decide(&running(&a), &obs(Status::Stopped)),
            InstanceAction::Hold
        );
        assert_eq!(
            decide(&running(&a), &obs(Status::Failed)),
            InstanceAction::MarkStopped(None)
        );
    }

    #[test]
    fn operator_stop_and_node_drain_carry_their_reason() {
        let a = assignment("a", 1, "running");
        let o = Observed {
            vm: vm_of(&a),
            ..obs(Status::Ready)
        };
        let d = Desired {
            operator_stop: Some(1),
            ..running(&a)
        };
        assert!(matches!(
            decide(&d, &o),
            InstanceAction::Drain {
                reason: Some(ReasonCode::TerminatedByOperator),
                ..
            }
        ));
        let d = Desired {
            node_draining: true,
            ..running(&a)
        };
        assert!(matches!(
            decide(&d, &o),
            InstanceAction::Drain {
                reason: Some(ReasonCode::NodeDraining),
                ..
            }
        ));
        // A failed instance with no VM is marked stopped for the node drain.
        assert_eq!(
            decide(&d, &obs(Status::Failed)),
            InstanceAction::MarkStopped(Some(ReasonCode::NodeDraining))
        );
        // Operator stop of an older generation does not stop the new one.
        let d = Desired {
            operator_stop: Some(0),
            ..running(&a)
        };
        assert_eq!(decide(&d, &o), InstanceAction::Keep);
    }

    #[test]
    fn a_node_drain_is_done_for_an_instance_only_once_it_is_stopped() {
        use ReasonCode::*;
        use Status::*;
        let a = assignment("a", 1, "running");
        let draining = Desired {
            node_draining: true,
            ..running(&a)
        };
        let refused = Desired {
            assignment: None,
            refused: Some(Arc::new(RefusedSpec {
                generation: Some(1),
                reason: ImagePullFailed,
                message: String::new(),
            })),
            node_draining: true,
            ..Desired::default()
        };
        let gone = Desired {
            node_draining: true,
            ..Desired::default()
        };
        let cases = [
            // Anything on its way or running still has to stop.
            (&draining, Pending, None, false),
            (&draining, Preparing, None, false),
            (&draining, Booting, None, false),
            (&draining, Ready, None, false),
            (&draining, Draining, Some(NodeDraining), false),
            // An instance that had failed is done only once it is marked stopped.
            (&draining, Failed, None, false),
            (&draining, Failed, Some(CrashLoopBackoff), false),
            (&draining, Stopped, Some(NodeDraining), true),
            // Stopped before the drain (by an operator, or by itself): nothing to do.
            (&draining, Stopped, Some(TerminatedByOperator), true),
            // A refused spec stays failed.
            (&refused, Failed, Some(ImagePullFailed), true),
            // Gone from the plan: done once its VM is.
            (&gone, Ready, None, false),
            (&gone, Stopped, None, true),
        ];
        for (desired, status, reason, done) in cases {
            assert_eq!(
                drain_done(desired, status, reason, 1),
                done,
                "{status:?} {reason:?}"
            );
        }
    }

    #[test]
    fn backoff_waits_and_parked_spec_holds() {
        let a = assignment("a", 1, "running");
        let now = Instant(Duration::from_secs(5));
        let o = Observed {
            backoff_until: Some(Instant(Duration::from_secs(7))),
            now,
            ..obs(Status::Failed)
        };
        assert_eq!(
            decide(&running(&a), &o),
            InstanceAction::WaitUntil(Instant(Duration::from_secs(7)))
        );
        let o = Observed {
            backoff_until: Some(Instant(Duration::from_secs(4))),
            now,
            ..obs(Status::Failed)
        };
        assert_eq!(decide(&running(&a), &o), InstanceAction::Boot(a.clone()));
        let o = Observed {
            parked: a.spec_hash().map(str::to_string),
            ..obs(Status::Failed)
        };
        assert_eq!(decide(&running(&a), &o), InstanceAction::Hold);
        // A new spec un-parks.
        let b = assignment("a", 2, "running");
        assert_eq!(decide(&running(&b), &o), InstanceAction::Boot(b));
    }

    #[test]
    fn refused_spec_drains_then_fails() {
        let a = assignment("a", 1, "running");
        let refused = Arc::new(RefusedSpec {
            generation: Some(2),
            reason: ReasonCode::VolumeAttachFailed,
            message: "bad".into(),
        });
        let d = Desired {
            refused: Some(refused.clone()),
            ..Desired::default()
        };
        let o = Observed {
            vm: vm_of(&a),
            ..obs(Status::Ready)
        };
        assert!(matches!(decide(&d, &o), InstanceAction::Drain { .. }));
        assert_eq!(
            decide(&d, &obs(Status::Stopped)),
            InstanceAction::MarkRefused(refused)
        );
    }

    #[test]
    fn detach_wins() {
        let a = assignment("a", 1, "running");
        let d = Desired {
            detach: true,
            ..running(&a)
        };
        assert_eq!(decide(&d, &obs(Status::Ready)), InstanceAction::Detach);
    }

    #[test]
    fn plan_actions_spawn_update_remove() {
        let ids: Vec<InstanceId> = ["a", "b"]
            .iter()
            .map(|s| InstanceId::parse(s).unwrap())
            .collect();
        let actors: HashSet<InstanceId> = ["b", "c"]
            .iter()
            .map(|s| InstanceId::parse(s).unwrap())
            .collect();
        let acts = plan_actions(&ids, &actors);
        assert_eq!(
            acts,
            vec![
                SupervisorAction::Spawn(ids[0].clone()),
                SupervisorAction::Update(ids[1].clone()),
                SupervisorAction::Remove(InstanceId::parse("c").unwrap()),
            ]
        );
    }

    #[test]
    fn desired_differs_ignores_equal_specs() {
        let a = assignment("a", 1, "running");
        let a2 = assignment("a", 1, "running");
        assert!(!running(&a).differs(&running(&a2)));
        assert!(running(&a).differs(&running(&assignment("a", 2, "running"))));
        assert!(running(&a).differs(&Desired {
            node_draining: true,
            ..running(&a)
        }));
    }

    #[test]
    fn refused_reason_follows_the_field() {
        let r = |field: &str| {
            refused_reason(&SpecError::Invalid {
                field: field.into(),
                why: String::new(),
            })
        };
        assert_eq!(
            r("workload.mounts[0].mount_path"),
            ReasonCode::VolumeAttachFailed
        );
        assert_eq!(r("workload.network.mtu"), ReasonCode::NetworkSetupFailed);
        assert_eq!(r("workload.command"), ReasonCode::FirecrackerStartFailed);
        assert_eq!(
            refused_reason(&SpecError::Missing("workload.image.resolved_digest")),
            ReasonCode::ImagePullFailed
        );
    }
}
