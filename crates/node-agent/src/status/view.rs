//! What the local API and the CLI show of an instance: plain data, serialized as JSON.
//!
//! The status owner ([`super::StatusManager`]) fills these in from its entries and the
//! API adds the addresses from the resource ledger. These types must not hold
//! behaviour: no status decisions, no I/O.

use serde::{Deserialize, Serialize};

use crate::instance::{ReasonCode, Status};

/// What the API shows for one instance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstanceView {
    /// Instance.
    pub instance_id: String,
    /// Generation.
    pub generation: i32,
    /// Current status.
    pub status: Status,
    /// Reason code.
    pub reason_code: Option<ReasonCode>,
    /// Message.
    pub error_message: Option<String>,
    /// Exit code.
    pub exit_code: Option<i32>,
    /// Restarts.
    pub restarts: u32,
    /// Boot id.
    pub boot_id: Option<String>,
    /// Last report seq.
    pub seq: i64,
    /// Last change (RFC 3339).
    pub updated_at: String,
    /// The instance's addresses (runtimes with host networking; filled in by the API
    /// from the resource ledger).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub addresses: Option<InstanceAddresses>,
    /// The instance's tap (runtimes with host networking).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tap: Option<String>,
    /// Everything else the node knows of the instance: only in `GET
    /// /v1/instances/{id}` (the list leaves it out).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<InstanceDetail>,
}

/// What `GET /v1/instances/{id}` (and `describe`) adds to an [`InstanceView`]: the
/// desired spec in brief, the host resources the runtime recorded, the VMM processes
/// and the last reports.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstanceDetail {
    /// The desired state of the last assignment (`running`, `draining`, `stopped`),
    /// absent once the instance left the plan.
    #[serde(default)]
    pub desired_state: Option<String>,
    /// Generation an operator stopped (`stop`), until `start` or a new spec.
    #[serde(default)]
    pub operator_stopped_generation: Option<i32>,
    /// The desired workload in brief (absent once the instance left the plan).
    #[serde(default)]
    pub spec: Option<SpecSummary>,
    /// The root disk the instance boots from: the bottom of its root layers (the
    /// image cache's disk of its digest for a flattened image), when it exists.
    #[serde(default)]
    pub root_disk: Option<String>,
    /// Every read-only root layer disk the instance's root is stacked from, bottom
    /// first (`root_disk` is the first): as recorded by the VM's runtime, else the
    /// image cache's disk.
    #[serde(default)]
    pub root_layers: Vec<String>,
    /// Host resources recorded for the instance in the resource ledger (`tap`, `disk`,
    /// `volume`, `ipv4`, `uid`, `cgroup`, `process`, `instance_dir`, …).
    #[serde(default)]
    pub resources: Vec<ResourceView>,
    /// The VMM processes recorded for the instance (`qemu`, `vhost`, `vmm`).
    #[serde(default)]
    pub processes: Vec<ProcessView>,
    /// The instance's last reports, oldest first.
    #[serde(default)]
    pub recent_reports: Vec<EventView>,
}

/// The desired workload in brief. Environment values are left out (they may hold
/// credentials); their names are listed.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SpecSummary {
    /// Generation of the spec.
    pub generation: i32,
    /// Image reference as the control plane named it.
    #[serde(default)]
    pub image: Option<String>,
    /// Image digest (the resolved one when given).
    #[serde(default)]
    pub image_digest: Option<String>,
    /// Release.
    #[serde(default)]
    pub release_id: Option<String>,
    /// Command (empty: the image's).
    #[serde(default)]
    pub command: Vec<String>,
    /// Names of the environment variables.
    #[serde(default)]
    pub env_names: Vec<String>,
    /// vCPUs.
    #[serde(default)]
    pub vcpu_count: Option<u32>,
    /// CPU request (cores).
    pub cpu_request: f64,
    /// Memory limit.
    pub memory_limit_bytes: i64,
    /// Scratch disk size.
    #[serde(default)]
    pub ephemeral_disk_bytes: Option<i64>,
    /// The overlay address the spec gives the instance.
    #[serde(default)]
    pub overlay_ipv6: Option<String>,
    /// Ports (`name:port/protocol`).
    #[serde(default)]
    pub ports: Vec<String>,
    /// Volumes (`volume_id → mount_path (ro|rw)`).
    #[serde(default)]
    pub mounts: Vec<String>,
    /// Health check in brief (`http :8080/healthz every 10s, timeout 2s, …`).
    #[serde(default)]
    pub health: Option<String>,
    /// Restart policy (`always`, `on-failure`, `never`).
    pub restart_policy: String,
    /// Restarts allowed inside the window before `crash_loop_backoff`.
    pub max_retries: u32,
    /// Grace between SIGTERM and SIGKILL.
    pub termination_grace_seconds: u64,
    /// Spec hash.
    #[serde(default)]
    pub spec_hash: Option<String>,
}

/// One resource-ledger row of an instance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResourceView {
    /// Kind.
    pub kind: String,
    /// Name or path.
    pub name: String,
    /// Runtime-specific details (JSON), as recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<serde_json::Value>,
}

/// A VMM process of an instance, as the runtime recorded it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessView {
    /// Role (`qemu`, `vhost`, `vmm`).
    pub role: String,
    /// Pid.
    pub pid: u32,
}

/// One entry of the report history (`GET /v1/reports`, `events`): a status report and
/// whether it still waits in the outbox for delivery.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventView {
    /// The report as sent.
    #[serde(flatten)]
    pub report: super::StatusReport,
    /// Still queued (the control plane has not taken it yet).
    #[serde(default)]
    pub pending: bool,
}

/// Addresses of an instance, as the local API shows them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceAddresses {
    /// Overlay IPv6 address.
    pub ipv6: String,
    /// IPv4 link address, if one was assigned.
    #[serde(default)]
    pub ipv4: Option<String>,
}
