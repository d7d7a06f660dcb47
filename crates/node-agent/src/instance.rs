//! Instance statuses, the transitions allowed between them, and the closed set of
//! reason codes (DESIGN §2).
//!
//! This module owns the vocabulary only: it decides whether a transition is legal and
//! how statuses and reasons are spelled on the wire. It must not perform I/O or decide
//! *when* a transition happens; that is the instance actor's job, and numbering and
//! delivering reports is the status manager's (`report`).

use std::fmt;

use serde::{Deserialize, Serialize};

/// Lifecycle status of one instance.
///
/// `Pending` and `Preparing` are internal: the control plane never receives them
/// (see [`Status::is_reported`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Known to the agent; nothing done yet.
    Pending,
    /// Image, disks, network and secrets are being prepared.
    Preparing,
    /// The VMM has been started; waiting for the workload and its health check.
    Booting,
    /// The workload started and passed its health check.
    Ready,
    /// Stopping gracefully (grace period running).
    Draining,
    /// The VM is gone, its resources released.
    Stopped,
    /// Failed with a reason code.
    Failed,
}

impl Status {
    /// All statuses, in lifecycle order.
    pub const ALL: [Status; 7] = [
        Status::Pending,
        Status::Preparing,
        Status::Booting,
        Status::Ready,
        Status::Draining,
        Status::Stopped,
        Status::Failed,
    ];

    /// The snake_case wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Pending => "pending",
            Status::Preparing => "preparing",
            Status::Booting => "booting",
            Status::Ready => "ready",
            Status::Draining => "draining",
            Status::Stopped => "stopped",
            Status::Failed => "failed",
        }
    }

    /// Parses a wire name.
    pub fn parse(s: &str) -> Option<Status> {
        Status::ALL.into_iter().find(|st| st.as_str() == s)
    }

    /// Whether this status is sent to the control plane (DESIGN §2: `pending` and
    /// `preparing` are internal).
    pub fn is_reported(self) -> bool {
        !matches!(self, Status::Pending | Status::Preparing)
    }

    /// Whether a VM may exist in this status.
    pub fn has_vm(self) -> bool {
        matches!(self, Status::Booting | Status::Ready | Status::Draining)
    }

    /// Whether moving from `self` to `next` is allowed. A status "moving" to itself is
    /// not a transition (callers treat it as "no change"), so this returns `false`.
    pub fn can_transition_to(self, next: Status) -> bool {
        use Status::*;
        match (self, next) {
            (a, b) if a == b => false,
            // Anything can fail.
            (_, Failed) => true,
            (Pending, Preparing | Stopped) => true,
            (Preparing, Booting | Stopped) => true,
            // A workload that exits by itself goes straight to stopped.
            (Booting, Ready | Draining | Stopped) => true,
            (Ready, Draining | Stopped) => true,
            (Draining, Stopped) => true,
            // Restarts (policy, new generation) and operator clean-up.
            (Stopped, Preparing) => true,
            (Failed, Preparing | Stopped) => true,
            _ => false,
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why an instance failed or was stopped (DESIGN §2, closed set).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum ReasonCode {
    /// Registry unreachable, auth refused, blob missing, digest mismatch, limits.
    ImagePullFailed,
    /// A layer cannot be unpacked safely, mkfs fails, disk full while building.
    RootfsBuildFailed,
    /// The VMM cannot start, rejects its configuration, or exits before the handshake.
    FirecrackerStartFailed,
    /// Tap, address, route or firewall setup failed, or the guest could not set up eth0.
    NetworkSetupFailed,
    /// A volume is missing, in use, of the wrong filesystem, or cannot be mounted.
    VolumeAttachFailed,
    /// The spec requires secrets but the bound version has no material.
    SecretsMissing,
    /// Fetching, validating or writing the secrets file failed.
    SecretsInjectionFailed,
    /// The health check failed `failure_threshold` times.
    HealthcheckFailed,
    /// The workload or the VMM was killed for lack of memory.
    OomKilled,
    /// The restart budget is spent.
    CrashLoopBackoff,
    /// An operator stopped the instance through the agent's API or CLI.
    TerminatedByOperator,
    /// The node is draining.
    NodeDraining,
}

impl ReasonCode {
    /// All twelve codes.
    pub const ALL: [ReasonCode; 12] = [
        ReasonCode::ImagePullFailed,
        ReasonCode::RootfsBuildFailed,
        ReasonCode::FirecrackerStartFailed,
        ReasonCode::NetworkSetupFailed,
        ReasonCode::VolumeAttachFailed,
        ReasonCode::SecretsMissing,
        ReasonCode::SecretsInjectionFailed,
        ReasonCode::HealthcheckFailed,
        ReasonCode::OomKilled,
        ReasonCode::CrashLoopBackoff,
        ReasonCode::TerminatedByOperator,
        ReasonCode::NodeDraining,
    ];

    /// The snake_case wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            ReasonCode::ImagePullFailed => "image_pull_failed",
            ReasonCode::RootfsBuildFailed => "rootfs_build_failed",
            ReasonCode::FirecrackerStartFailed => "firecracker_start_failed",
            ReasonCode::NetworkSetupFailed => "network_setup_failed",
            ReasonCode::VolumeAttachFailed => "volume_attach_failed",
            ReasonCode::SecretsMissing => "secrets_missing",
            ReasonCode::SecretsInjectionFailed => "secrets_injection_failed",
            ReasonCode::HealthcheckFailed => "healthcheck_failed",
            ReasonCode::OomKilled => "oom_killed",
            ReasonCode::CrashLoopBackoff => "crash_loop_backoff",
            ReasonCode::TerminatedByOperator => "terminated_by_operator",
            ReasonCode::NodeDraining => "node_draining",
        }
    }

    /// Parses a wire name; `None` for anything outside the closed set.
    pub fn parse(s: &str) -> Option<ReasonCode> {
        ReasonCode::ALL.into_iter().find(|r| r.as_str() == s)
    }

    /// Reasons that describe a deliberate stop rather than a fault; they go with
    /// `draining`/`stopped`, not `failed`.
    pub fn is_deliberate_stop(self) -> bool {
        matches!(
            self,
            ReasonCode::TerminatedByOperator | ReasonCode::NodeDraining
        )
    }
}

impl fmt::Display for ReasonCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A transition that [`Status::can_transition_to`] refuses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("illegal status transition {from} -> {to}")]
pub struct IllegalTransition {
    /// Current status.
    pub from: Status,
    /// Requested status.
    pub to: Status,
}

/// Outcome of asking for a status change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// The status really changed.
    Changed,
    /// Same status as before: nothing to report.
    Unchanged,
}

/// Checks a requested change: `Unchanged` for the same status, an error for an illegal
/// move, `Changed` otherwise.
pub fn check_transition(from: Status, to: Status) -> Result<Change, IllegalTransition> {
    if from == to {
        Ok(Change::Unchanged)
    } else if from.can_transition_to(to) {
        Ok(Change::Changed)
    } else {
        Err(IllegalTransition { from, to })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn happy_path_is_legal() {
        let path = [
            Status::Pending,
            Status::Preparing,
            Status::Booting,
            Status::Ready,
            Status::Draining,
            Status::Stopped,
        ];
        for w in path.windows(2) {
            assert_eq!(check_transition(w[0], w[1]), Ok(Change::Changed), "{w:?}");
        }
    }

    #[test]
    fn every_status_can_fail_except_failed_itself() {
        for s in Status::ALL {
            let expected = if s == Status::Failed {
                Ok(Change::Unchanged)
            } else {
                Ok(Change::Changed)
            };
            assert_eq!(check_transition(s, Status::Failed), expected, "{s}");
        }
    }

    #[test]
    fn illegal_transitions_are_rejected() {
        let illegal = [
            (Status::Pending, Status::Ready),
            (Status::Pending, Status::Booting),
            (Status::Preparing, Status::Ready),
            (Status::Ready, Status::Booting),
            (Status::Ready, Status::Preparing),
            (Status::Draining, Status::Ready),
            (Status::Draining, Status::Booting),
            (Status::Stopped, Status::Ready),
            (Status::Stopped, Status::Draining),
            (Status::Failed, Status::Ready),
            (Status::Failed, Status::Draining),
        ];
        for (from, to) in illegal {
            assert_eq!(
                check_transition(from, to),
                Err(IllegalTransition { from, to }),
                "{from} -> {to}"
            );
        }
    }

    #[test]
    fn repeated_status_is_unchanged_not_an_error() {
        for s in Status::ALL {
            assert_eq!(check_transition(s, s), Ok(Change::Unchanged));
        }
    }

    #[test]
    fn restart_paths_go_through_preparing() {
        assert!(Status::Failed.can_transition_to(Status::Preparing));
        assert!(Status::Stopped.can_transition_to(Status::Preparing));
        assert!(!Status::Failed.can_transition_to(Status::Booting));
    }

    #[test]
    fn statuses_serialize_snake_case() {
        for s in Status::ALL {
            let json = serde_json::to_string(&s).unwrap();
            assert_eq!(json, format!("\"{}\"", s.as_str()));
            assert_eq!(Status::parse(s.as_str()), Some(s));
        }
    }

    #[test]
    fn internal_statuses_are_not_reported() {
        let reported: Vec<_> = Status::ALL
            .into_iter()
            .filter(|s| s.is_reported())
            .collect();
        assert_eq!(
            reported,
            vec![
                Status::Booting,
                Status::Ready,
                Status::Draining,
                Status::Stopped,
                Status::Failed
            ]
        );
    }

    #[test]
    fn twelve_reason_codes_round_trip_snake_case() {
        let names: Vec<_> = ReasonCode::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(names.len(), 12);
        let mut dedup = names.clone();
        dedup.sort();
        dedup.dedup();
        assert_eq!(dedup.len(), 12, "reason codes must be distinct");
        for r in ReasonCode::ALL {
            let json = serde_json::to_string(&r).unwrap();
            assert_eq!(json, format!("\"{}\"", r.as_str()));
            let back: ReasonCode = serde_json::from_str(&json).unwrap();
            assert_eq!(back, r);
            assert!(r
                .as_str()
                .chars()
                .all(|c| c.is_ascii_lowercase() || c == '_'));
        }
    }

    #[test]
    fn unknown_reason_is_refused() {
        assert_eq!(ReasonCode::parse("disk_on_fire"), None);
        assert!(serde_json::from_str::<ReasonCode>("\"disk_on_fire\"").is_err());
    }
}
