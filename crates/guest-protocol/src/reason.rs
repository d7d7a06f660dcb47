//! Reasons a guest may give in `status/failed`. Each is one of the closed reason codes of
//! DESIGN §2 with the same snake_case wire name; the guest can only raise this subset.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Why the guest failed; a subset of the agent's `ReasonCode`, same wire names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureReason {
    /// Handshake or config refused (wrong instance, bad config version or content), or
    /// guest init itself could not start: the VM did not come up as asked.
    FirecrackerStartFailed,
    /// The root disk or scratch disk cannot be mounted, or the overlay root cannot be
    /// assembled.
    RootfsBuildFailed,
    /// eth0 (MTU, address, route) or resolv.conf cannot be configured.
    NetworkSetupFailed,
    /// A volume's device is missing, its path is reserved, or the mount fails.
    VolumeAttachFailed,
    /// Secrets are required but none were sent.
    SecretsMissing,
    /// The secrets file is invalid or cannot be written.
    SecretsInjectionFailed,
    /// The kernel OOM-killed guest init's work before the workload could be reported.
    OomKilled,
}

impl FailureReason {
    /// Every reason.
    pub const ALL: [FailureReason; 7] = [
        FailureReason::FirecrackerStartFailed,
        FailureReason::RootfsBuildFailed,
        FailureReason::NetworkSetupFailed,
        FailureReason::VolumeAttachFailed,
        FailureReason::SecretsMissing,
        FailureReason::SecretsInjectionFailed,
        FailureReason::OomKilled,
    ];

    /// The snake_case wire name (identical to the DESIGN §2 reason code).
    pub fn as_str(self) -> &'static str {
        match self {
            FailureReason::FirecrackerStartFailed => "firecracker_start_failed",
            FailureReason::RootfsBuildFailed => "rootfs_build_failed",
            FailureReason::NetworkSetupFailed => "network_setup_failed",
            FailureReason::VolumeAttachFailed => "volume_attach_failed",
            FailureReason::SecretsMissing => "secrets_missing",
            FailureReason::SecretsInjectionFailed => "secrets_injection_failed",
            FailureReason::OomKilled => "oom_killed",
        }
    }
}

impl fmt::Display for FailureReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
