//! Desired state as the control plane (or a standalone directory) sends it: `NodePlan`,
//! assignments and the `WorkloadSpec` of DESIGN §3, plus their validation into domain
//! types ([`InstanceId`], [`Digest`], [`Assignment`]).
//!
//! The contract: wire types are plain serde structs that ignore unknown fields; every
//! value coming from outside passes through [`validate_assignment`] (or
//! [`parse_plan`]) exactly once, and one bad assignment fails alone, never the plan.
//! This module does no I/O.

use std::collections::BTreeMap;
use std::fmt;
use std::net::Ipv6Addr;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

/// Largest accepted `command` (sum of argument bytes). Linux refuses a single argument
/// over 128 KiB anyway; a bigger argv is a broken or hostile spec.
pub const MAX_ARGV_BYTES: usize = 128 * 1024;
/// Largest accepted number of `command` elements.
pub const MAX_ARGV_ITEMS: usize = 4096;
/// Largest accepted environment (sum of key and value bytes).
pub const MAX_ENV_BYTES: usize = 128 * 1024;
/// Smallest memory a microVM gets.
pub const MIN_MEMORY_BYTES: i64 = 64 * 1024 * 1024;
/// Longest accepted drain grace period.
pub const MAX_GRACE_SECONDS: u64 = 3600;
/// Longest health-check interval or timeout, seconds.
pub const MAX_HEALTH_SECONDS: u64 = 3600;
/// Largest health-check success or failure threshold.
pub const MAX_HEALTH_THRESHOLD: u64 = 1000;
/// Paths a volume or secrets file may not be mounted on (DESIGN §6); their children are
/// refused too.
pub const RESERVED_MOUNT_PATHS: [&str; 7] =
    ["/", "/proc", "/sys", "/dev", "/run", "/run/secrets", "/tmp"];

/// An instance id that is safe as a file name and a map key: 1–128 bytes of
/// `[A-Za-z0-9._-]`, not `.`/`..`, no `..` anywhere.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct InstanceId(Arc<str>);

impl Serialize for InstanceId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl InstanceId {
    /// Validates `s`.
    pub fn parse(s: &str) -> Result<InstanceId, SpecError> {
        check_id("instance_id", s)?;
        Ok(InstanceId(Arc::from(s)))
    }
    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for InstanceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for InstanceId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        InstanceId::parse(&s).map_err(serde::de::Error::custom)
    }
}

fn check_id(what: &'static str, s: &str) -> Result<(), SpecError> {
    let bad = |why: &str| SpecError::BadId {
        what,
        value: printable(s, 64),
        why: why.to_string(),
    };
    if s.is_empty() {
        return Err(bad("empty"));
    }
    if s.len() > 128 {
        return Err(bad("longer than 128 bytes"));
    }
    if s.contains('/') {
        return Err(bad("contains '/'"));
    }
    if s.contains("..") || s == "." {
        return Err(bad("contains '..' or is '.'"));
    }
    if let Some(c) = s
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(bad(&format!("contains {c:?}; allowed: A-Z a-z 0-9 . _ -")));
    }
    Ok(())
}

/// Shortens and escapes a value for an error message.
fn printable(s: &str, max: usize) -> String {
    let mut out: String = s.chars().take(max).flat_map(|c| c.escape_debug()).collect();
    if s.chars().count() > max {
        out.push('…');
    }
    out
}

/// A content digest, always `sha256:<64 lowercase hex>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct Digest(String);

impl Digest {
    /// Validates `s`.
    pub fn parse(s: &str) -> Result<Digest, SpecError> {
        let hex = s
            .strip_prefix("sha256:")
            .ok_or_else(|| SpecError::BadDigest {
                value: printable(s, 80),
            })?;
        if hex.len() != 64 || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(SpecError::BadDigest {
                value: printable(s, 80),
            });
        }
        Ok(Digest(s.to_string()))
    }
    /// The digest as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A validation failure; names the field and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    /// An id is unusable.
    #[error("{what} {value:?} is invalid: {why}")]
    BadId {
        /// Which id.
        what: &'static str,
        /// The offending value (shortened, escaped).
        value: String,
        /// Why.
        why: String,
    },
    /// A digest is not `sha256:<64 hex>`.
    #[error("digest {value:?} is not sha256:<64 lowercase hex>")]
    BadDigest {
        /// The offending value.
        value: String,
    },
    /// A required field is missing.
    #[error("{0} is required")]
    Missing(&'static str),
    /// A field has a bad value.
    #[error("{field}: {why}")]
    Invalid {
        /// The field path, e.g. `workload.mounts[1].mount_path`.
        field: String,
        /// Why.
        why: String,
    },
    /// The JSON/TOML itself does not decode.
    #[error("cannot decode: {0}")]
    Decode(String),
}

fn invalid(field: impl Into<String>, why: impl Into<String>) -> SpecError {
    SpecError::Invalid {
        field: field.into(),
        why: why.into(),
    }
}

/// What the control plane wants for an instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DesiredState {
    /// Boot it and keep it serving.
    Running,
    /// Drain and stop it, keep it known.
    Draining,
    /// Stop it.
    Stopped,
}

/// `GET /v1/nodes/{node_id}/plan` (wire type).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodePlanWire {
    /// "v1".
    #[serde(default)]
    pub spec_version: Option<String>,
    /// Node the plan is for.
    pub node_id: String,
    /// Plan id.
    #[serde(default)]
    pub plan_id: Option<String>,
    /// RFC 3339.
    #[serde(default)]
    pub created_at: Option<String>,
    /// Monotonic cursor.
    pub cursor_event_id: i64,
    /// Assignments, kept as raw JSON so one bad entry cannot fail the plan.
    #[serde(default)]
    pub instances: Vec<serde_json::Value>,
}

/// One assignment (wire type).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AssignmentWire {
    /// Assignment id.
    #[serde(default)]
    pub assignment_id: Option<String>,
    /// Node id.
    #[serde(default)]
    pub node_id: Option<String>,
    /// Instance id (validated).
    pub instance_id: String,
    /// Generation of the spec.
    pub generation: i32,
    /// Desired state.
    pub desired_state: DesiredState,
    /// Grace period for draining.
    #[serde(default)]
    pub drain_grace_seconds: Option<u64>,
    /// Workload (required unless stopped).
    #[serde(default)]
    pub workload: Option<WorkloadSpec>,
}

/// The WorkloadSpec of DESIGN §3.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkloadSpec {
    /// Spec version.
    #[serde(default)]
    pub spec_version: Option<String>,
    /// Organisation.
    #[serde(default)]
    pub org_id: Option<String>,
    /// App.
    #[serde(default)]
    pub app_id: Option<String>,
    /// Environment.
    #[serde(default)]
    pub env_id: Option<String>,
    /// Process type.
    #[serde(default)]
    pub process_type: Option<String>,
    /// Instance id (must match the assignment).
    pub instance_id: String,
    /// Generation (must match the assignment).
    pub generation: i32,
    /// Release.
    #[serde(default)]
    pub release_id: Option<String>,
    /// Image to run.
    pub image: ImageSpec,
    /// Manifest hash.
    #[serde(default)]
    pub manifest_hash: Option<String>,
    /// argv of the workload (empty: the image's entrypoint + cmd).
    #[serde(default)]
    pub command: Vec<String>,
    /// Working directory.
    #[serde(default)]
    pub workdir: Option<String>,
    /// Environment.
    #[serde(default)]
    pub env_vars: Option<BTreeMap<String, String>>,
    /// Resources.
    pub resources: Resources,
    /// Network.
    pub network: NetworkSpec,
    /// Volumes.
    #[serde(default)]
    pub mounts: Option<Vec<MountSpec>>,
    /// Secrets binding.
    #[serde(default)]
    pub secrets: Option<SecretsSpec>,
    /// Health check.
    #[serde(default)]
    pub health: Option<HealthSpec>,
    /// Lifecycle.
    #[serde(default)]
    pub lifecycle: Option<LifecycleSpec>,
    /// Hash of the spec, if the control plane computed one.
    #[serde(default)]
    pub spec_hash: Option<String>,
}

/// Image reference; only `resolved_digest` is ever run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageSpec {
    /// Human reference (`host/repo:tag`); where to pull from.
    #[serde(default, rename = "ref")]
    pub reference: Option<String>,
    /// Digest as given.
    #[serde(default)]
    pub digest: Option<String>,
    /// Index digest when multi-arch.
    #[serde(default)]
    pub index_digest: Option<String>,
    /// The platform-specific manifest digest that is pulled.
    #[serde(default)]
    pub resolved_digest: Option<String>,
    /// OS.
    #[serde(default)]
    pub os: Option<String>,
    /// Architecture.
    #[serde(default)]
    pub arch: Option<String>,
}

/// Resources.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Resources {
    /// CPU request in cores.
    pub cpu_request: f64,
    /// Memory limit.
    pub memory_limit_bytes: i64,
    /// Scratch disk size (default 4 GiB).
    #[serde(default)]
    pub ephemeral_disk_bytes: Option<i64>,
    /// vCPUs.
    #[serde(default)]
    pub vcpu_count: Option<u32>,
    /// cgroup cpu weight.
    #[serde(default)]
    pub cpu_weight: Option<u32>,
}

/// Network.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NetworkSpec {
    /// Instance address.
    pub overlay_ipv6: String,
    /// Gateway.
    pub gateway_ipv6: String,
    /// MTU (default 1420).
    #[serde(default)]
    pub mtu: Option<u32>,
    /// DNS servers.
    #[serde(default)]
    pub dns: Option<Vec<String>>,
    /// Exposed ports.
    #[serde(default)]
    pub ports: Option<Vec<PortSpec>>,
}

/// An exposed port.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PortSpec {
    /// Name.
    #[serde(default)]
    pub name: Option<String>,
    /// Port.
    pub port: u16,
    /// Protocol.
    #[serde(default)]
    pub protocol: Option<String>,
}

/// Most ports a workload may declare.
pub const MAX_PORTS: usize = 64;

/// Transport protocol of a declared port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Transport {
    /// TCP (the default).
    Tcp,
    /// UDP.
    Udp,
}

impl Transport {
    /// The protocol's name (as nftables and the spec write it).
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Tcp => "tcp",
            Transport::Udp => "udp",
        }
    }
}

impl PortSpec {
    /// The port's protocol: `tcp` when absent; `None` when it is neither tcp nor udp.
    pub fn transport(&self) -> Option<Transport> {
        match self
            .protocol
            .as_deref()
            .map(str::to_ascii_lowercase)
            .as_deref()
        {
            None | Some("tcp") => Some(Transport::Tcp),
            Some("udp") => Some(Transport::Udp),
            Some(_) => None,
        }
    }
}

/// The ports a spec's `network.ports` lets in (validated: tcp or udp, 1..=65535),
/// sorted and without repeats.
pub fn ingress_ports(ports: &[PortSpec]) -> Vec<(Transport, u16)> {
    let mut v: Vec<(Transport, u16)> = ports
        .iter()
        .filter_map(|p| Some((p.transport()?, p.port)))
        .filter(|(_, port)| *port != 0)
        .collect();
    v.sort();
    v.dedup();
    v
}

/// A volume mount.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MountSpec {
    /// Volume id.
    pub volume_id: String,
    /// Where in the guest.
    pub mount_path: String,
    /// Read-only.
    #[serde(default)]
    pub read_only: bool,
    /// Filesystem (only "ext4").
    #[serde(default = "default_fs")]
    pub filesystem: String,
    /// Device hint.
    #[serde(default)]
    pub device_hint: Option<String>,
}

fn default_fs() -> String {
    "ext4".to_string()
}

/// Secrets binding.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SecretsSpec {
    /// Whether the instance needs material to run.
    pub required: bool,
    /// Bound version.
    #[serde(default)]
    pub secret_version_id: Option<String>,
    /// Path of the secrets file in the guest.
    #[serde(default = "default_secrets_path")]
    pub mount_path: String,
    /// File mode (default 0400).
    #[serde(default)]
    pub mode: Option<u32>,
    /// Owner uid.
    #[serde(default)]
    pub uid: Option<u32>,
    /// Owner gid.
    #[serde(default)]
    pub gid: Option<u32>,
}

fn default_secrets_path() -> String {
    "/run/secrets/platform.env".to_string()
}

/// Health check kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HealthKind {
    /// TCP connect.
    Tcp,
    /// HTTP GET, 2xx/3xx passes.
    Http,
}

/// Health check.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HealthSpec {
    /// Kind.
    #[serde(rename = "type")]
    pub kind: HealthKind,
    /// Port.
    pub port: u16,
    /// HTTP path.
    #[serde(default)]
    pub path: Option<String>,
    /// Seconds between probes.
    #[serde(default = "d10")]
    pub interval_seconds: u64,
    /// Probe timeout.
    #[serde(default = "d2")]
    pub timeout_seconds: u64,
    /// Failures during this time after workload start do not count.
    #[serde(default = "d10")]
    pub grace_period_seconds: u64,
    /// Passes needed for ready.
    #[serde(default = "d1")]
    pub success_threshold: u32,
    /// Consecutive failures that fail the instance.
    #[serde(default = "d3")]
    pub failure_threshold: u32,
}

fn d1() -> u32 {
    1
}
fn d2() -> u64 {
    2
}
fn d3() -> u32 {
    3
}
fn d10() -> u64 {
    10
}

/// Restart policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum RestartPolicy {
    /// Restart after every exit.
    #[default]
    Always,
    /// Restart after failures and non-zero exits.
    OnFailure,
    /// Never restart.
    Never,
}

/// Lifecycle.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LifecycleSpec {
    /// Grace between SIGTERM and SIGKILL.
    #[serde(default = "d10")]
    pub termination_grace_seconds: u64,
    /// Restart policy.
    #[serde(default)]
    pub restart_policy: RestartPolicy,
    /// Restarts allowed inside the window before `crash_loop_backoff`.
    #[serde(default = "d3")]
    pub max_retries: u32,
}

impl Default for LifecycleSpec {
    fn default() -> Self {
        LifecycleSpec {
            termination_grace_seconds: 10,
            restart_policy: RestartPolicy::Always,
            max_retries: 3,
        }
    }
}

/// A validated assignment: the only form the rest of the agent sees.
#[derive(Debug, Clone, PartialEq)]
pub struct Assignment {
    /// Instance.
    pub instance_id: InstanceId,
    /// Assignment id.
    pub assignment_id: Option<String>,
    /// Generation.
    pub generation: i32,
    /// Desired state.
    pub desired_state: DesiredState,
    /// Drain grace.
    pub drain_grace: Duration,
    /// Validated workload (absent only when stopped).
    pub workload: Option<Arc<Workload>>,
}

/// A validated workload.
#[derive(Debug, Clone, PartialEq)]
pub struct Workload {
    /// The spec as received (validated).
    pub spec: WorkloadSpec,
    /// The digest that is pulled and run.
    pub digest: Digest,
    /// `spec_hash` or, when absent, sha256 of the canonical spec JSON.
    pub spec_hash: String,
    /// Lifecycle with defaults applied.
    pub lifecycle: LifecycleSpec,
}

impl Assignment {
    /// Whether `other` asks for a different VM (new generation or spec hash), which
    /// means replace, never patch.
    pub fn needs_replace(&self, other: &Assignment) -> bool {
        self.generation != other.generation || self.spec_hash() != other.spec_hash()
    }
    /// The spec hash, if there is a workload.
    pub fn spec_hash(&self) -> Option<&str> {
        self.workload.as_deref().map(|w| w.spec_hash.as_str())
    }
}

/// An assignment that could not be validated.
#[derive(Debug, Clone, PartialEq)]
pub struct Rejected {
    /// The instance, when it could be identified safely.
    pub instance_id: Option<InstanceId>,
    /// The generation, when known.
    pub generation: Option<i32>,
    /// Where it came from (file name, plan index).
    pub origin: String,
    /// What is wrong.
    pub error: SpecError,
}

/// A decoded plan: valid assignments and the rejected ones.
#[derive(Debug, Clone, Default)]
pub struct Plan {
    /// Cursor of the plan (standalone: a local counter).
    pub cursor: i64,
    /// Valid assignments.
    pub assignments: Vec<Assignment>,
    /// Rejected entries.
    pub rejected: Vec<Rejected>,
}

impl Plan {
    /// One `overlay_ipv6` per instance on the node: host routes are installed with
    /// *replace*, so a second instance with the same address would take the first one's
    /// traffic (and its spoof filter would allow it). The instance that comes first in
    /// instance-id order keeps the address; every other one is refused, identifiably, so
    /// it fails with `network_setup_failed` and a message naming the holder.
    pub fn refuse_shared_addresses(&mut self) {
        let mut order: Vec<usize> = (0..self.assignments.len()).collect();
        order.sort_by(|a, b| {
            self.assignments[*a]
                .instance_id
                .cmp(&self.assignments[*b].instance_id)
        });
        let mut holders: std::collections::BTreeMap<Ipv6Addr, InstanceId> = Default::default();
        let mut refused = std::collections::BTreeSet::new();
        for i in order {
            let a = &self.assignments[i];
            let Some(addr) = a
                .workload
                .as_deref()
                .and_then(|w| w.spec.network.overlay_ipv6.parse::<Ipv6Addr>().ok())
            else {
                continue;
            };
            match holders.get(&addr) {
                Some(holder) => {
                    self.rejected.push(Rejected {
                        instance_id: Some(a.instance_id.clone()),
                        generation: Some(a.generation),
                        origin: format!("instance {}", a.instance_id),
                        error: invalid(
                            "workload.network.overlay_ipv6",
                            format!(
                                "{addr} is already the address of instance {holder} on this node"
                            ),
                        ),
                    });
                    refused.insert(i);
                }
                None => {
                    holders.insert(addr, a.instance_id.clone());
                }
            }
        }
        let mut i = 0;
        self.assignments.retain(|_| {
            let keep = !refused.contains(&i);
            i += 1;
            keep
        });
    }
}

/// Decodes one assignment from JSON, never failing the caller: the result is either a
/// valid assignment or a rejection that names the instance when it can.
pub fn decode_assignment(value: &serde_json::Value, origin: &str) -> Result<Assignment, Rejected> {
    let instance_id = value
        .get("instance_id")
        .and_then(|v| v.as_str())
        .and_then(|s| InstanceId::parse(s).ok());
    let generation = value
        .get("generation")
        .and_then(|v| v.as_i64())
        .and_then(|g| i32::try_from(g).ok());
    let reject = |error: SpecError| Rejected {
        instance_id: instance_id.clone(),
        generation,
        origin: origin.to_string(),
        error,
    };
    let wire: AssignmentWire = serde_json::from_value(value.clone())
        .map_err(|e| reject(SpecError::Decode(e.to_string())))?;
    validate_assignment(wire).map_err(reject)
}

/// Validates a wire assignment into an [`Assignment`].
pub fn validate_assignment(wire: AssignmentWire) -> Result<Assignment, SpecError> {
    let instance_id = InstanceId::parse(&wire.instance_id)?;
    let drain = wire.drain_grace_seconds.unwrap_or(10);
    if drain > MAX_GRACE_SECONDS {
        return Err(invalid(
            "drain_grace_seconds",
            format!("{drain} exceeds the limit of {MAX_GRACE_SECONDS}"),
        ));
    }
    let workload = match (wire.workload, wire.desired_state) {
        (None, DesiredState::Stopped) => None,
        (None, _) => return Err(SpecError::Missing("workload")),
        (Some(w), _) => Some(Arc::new(validate_workload(
            w,
            &instance_id,
            wire.generation,
        )?)),
    };
    Ok(Assignment {
        instance_id,
        assignment_id: wire.assignment_id,
        generation: wire.generation,
        desired_state: wire.desired_state,
        drain_grace: Duration::from_secs(drain),
        workload,
    })
}

fn check_guest_path(field: &str, path: &str) -> Result<(), SpecError> {
    if !path.starts_with('/') {
        return Err(invalid(
            field,
            format!("{:?} is not absolute", printable(path, 80)),
        ));
    }
    if path.split('/').any(|c| c == ".." || c == ".") {
        return Err(invalid(
            field,
            format!("{:?} contains '.' or '..'", printable(path, 80)),
        ));
    }
    if path.contains('\0') {
        return Err(invalid(field, "contains NUL"));
    }
    Ok(())
}

/// Whether `path` is a reserved guest path or lies under one (other than `/`).
pub fn is_reserved_mount_path(path: &str) -> bool {
    let p = path.trim_end_matches('/');
    let p = if p.is_empty() { "/" } else { p };
    RESERVED_MOUNT_PATHS.iter().any(|r| {
        p == *r || (*r != "/" && p.starts_with(r) && p.as_bytes().get(r.len()) == Some(&b'/'))
    })
}

fn validate_workload(
    spec: WorkloadSpec,
    instance_id: &InstanceId,
    generation: i32,
) -> Result<Workload, SpecError> {
    if spec.instance_id != instance_id.as_str() {
        return Err(invalid(
            "workload.instance_id",
            format!(
                "{:?} does not match the assignment's {instance_id}",
                printable(&spec.instance_id, 64)
            ),
        ));
    }
    if spec.generation != generation {
        return Err(invalid(
            "workload.generation",
            format!(
                "{} does not match the assignment's {generation}",
                spec.generation
            ),
        ));
    }
    let digest = match spec.image.resolved_digest.as_deref() {
        None | Some("") => return Err(SpecError::Missing("workload.image.resolved_digest")),
        Some(d) => Digest::parse(d)
            .map_err(|e| invalid("workload.image.resolved_digest", e.to_string()))?,
    };
    if spec.command.len() > MAX_ARGV_ITEMS {
        return Err(invalid(
            "workload.command",
            format!(
                "{} arguments exceed the limit of {MAX_ARGV_ITEMS}",
                spec.command.len()
            ),
        ));
    }
    let argv_bytes: usize = spec.command.iter().map(|a| a.len() + 1).sum();
    if argv_bytes > MAX_ARGV_BYTES {
        return Err(invalid(
            "workload.command",
            format!("{argv_bytes} bytes exceed the limit of {MAX_ARGV_BYTES}"),
        ));
    }
    if spec.command.iter().any(|a| a.contains('\0')) {
        return Err(invalid("workload.command", "an argument contains NUL"));
    }
    if let Some(env) = &spec.env_vars {
        let bytes: usize = env.iter().map(|(k, v)| k.len() + v.len() + 2).sum();
        if bytes > MAX_ENV_BYTES {
            return Err(invalid(
                "workload.env_vars",
                format!("{bytes} bytes exceed the limit of {MAX_ENV_BYTES}"),
            ));
        }
        for k in env.keys() {
            if k.is_empty() || k.contains('=') || k.contains('\0') {
                return Err(invalid(
                    "workload.env_vars",
                    format!("bad name {:?}", printable(k, 64)),
                ));
            }
        }
        if env.values().any(|v| v.contains('\0')) {
            return Err(invalid("workload.env_vars", "a value contains NUL"));
        }
    }
    if let Some(wd) = &spec.workdir {
        check_guest_path("workload.workdir", wd)?;
    }
    let r = &spec.resources;
    if r.memory_limit_bytes < MIN_MEMORY_BYTES {
        return Err(invalid(
            "workload.resources.memory_limit_bytes",
            format!(
                "{} is below the minimum of {MIN_MEMORY_BYTES} (64 MiB)",
                r.memory_limit_bytes
            ),
        ));
    }
    if !(r.cpu_request.is_finite() && r.cpu_request > 0.0) {
        return Err(invalid(
            "workload.resources.cpu_request",
            "must be a positive number",
        ));
    }
    if let Some(d) = r.ephemeral_disk_bytes {
        if d < 64 * 1024 * 1024 {
            return Err(invalid(
                "workload.resources.ephemeral_disk_bytes",
                "below 64 MiB",
            ));
        }
    }
    if r.vcpu_count == Some(0) {
        return Err(invalid(
            "workload.resources.vcpu_count",
            "must be at least 1",
        ));
    }
    let n = &spec.network;
    let overlay = n.overlay_ipv6.parse::<Ipv6Addr>().map_err(|_| {
        invalid(
            "workload.network.overlay_ipv6",
            format!(
                "{:?} is not an IPv6 address",
                printable(&n.overlay_ipv6, 64)
            ),
        )
    })?;
    // An instance address must be a unicast address routed to its tap: never the
    // host's loopback, the unspecified address, multicast or link-local (fe80::/10 is
    // the host side of every tap).
    let class = if overlay.is_loopback() {
        Some("loopback")
    } else if overlay.is_unspecified() {
        Some("unspecified")
    } else if overlay.is_multicast() {
        Some("multicast")
    } else if overlay.segments()[0] & 0xffc0 == 0xfe80 {
        Some("link-local")
    } else {
        None
    };
    if let Some(class) = class {
        return Err(invalid(
            "workload.network.overlay_ipv6",
            format!("{overlay} is a {class} address, not an instance address"),
        ));
    }
    n.gateway_ipv6.parse::<Ipv6Addr>().map_err(|_| {
        invalid(
            "workload.network.gateway_ipv6",
            format!(
                "{:?} is not an IPv6 address",
                printable(&n.gateway_ipv6, 64)
            ),
        )
    })?;
    if let Some(mtu) = n.mtu {
        if !(1280..=9000).contains(&mtu) {
            return Err(invalid(
                "workload.network.mtu",
                format!("{mtu} is outside 1280..=9000"),
            ));
        }
    }
    if let Some(mounts) = &spec.mounts {
        let mut ids = std::collections::BTreeSet::new();
        let mut paths = std::collections::BTreeSet::new();
        for (i, m) in mounts.iter().enumerate() {
            let f = format!("workload.mounts[{i}]");
            check_id("volume_id", &m.volume_id)
                .map_err(|e| invalid(format!("{f}.volume_id"), e.to_string()))?;
            check_guest_path(&format!("{f}.mount_path"), &m.mount_path)?;
            if is_reserved_mount_path(&m.mount_path) {
                return Err(invalid(
                    format!("{f}.mount_path"),
                    format!(
                        "{} is reserved ({})",
                        m.mount_path,
                        RESERVED_MOUNT_PATHS.join(", ")
                    ),
                ));
            }
            if m.filesystem != "ext4" {
                return Err(invalid(
                    format!("{f}.filesystem"),
                    format!(
                        "{:?} is not supported (only ext4)",
                        printable(&m.filesystem, 32)
                    ),
                ));
            }
            if !ids.insert(&m.volume_id) {
                return Err(invalid(
                    format!("{f}.volume_id"),
                    format!("{} is mounted twice", m.volume_id),
                ));
            }
            if !paths.insert(m.mount_path.trim_end_matches('/')) {
                return Err(invalid(
                    format!("{f}.mount_path"),
                    format!("{} is used twice", m.mount_path),
                ));
            }
        }
    }
    if let Some(s) = &spec.secrets {
        check_guest_path("workload.secrets.mount_path", &s.mount_path)?;
        if s.required && s.secret_version_id.as_deref().unwrap_or("").is_empty() {
            return Err(SpecError::Missing(
                "workload.secrets.secret_version_id (secrets are required)",
            ));
        }
        if let Some(v) = &s.secret_version_id {
            check_id("secret_version_id", v)
                .map_err(|e| invalid("workload.secrets.secret_version_id", e.to_string()))?;
        }
        if let Some(mode) = s.mode {
            if mode > 0o777 {
                return Err(invalid(
                    "workload.secrets.mode",
                    format!("{mode:o} is not a file mode"),
                ));
            }
        }
    }
    let ports = spec.network.ports.as_deref().unwrap_or_default();
    if ports.len() > MAX_PORTS {
        return Err(invalid(
            "workload.network.ports",
            format!("{} ports; at most {MAX_PORTS}", ports.len()),
        ));
    }
    for (i, p) in ports.iter().enumerate() {
        if p.port == 0 {
            return Err(invalid(
                format!("workload.network.ports[{i}].port"),
                "must be 1..=65535",
            ));
        }
        if p.transport().is_none() {
            return Err(invalid(
                format!("workload.network.ports[{i}].protocol"),
                format!(
                    "{:?} is not \"tcp\" or \"udp\"",
                    p.protocol.as_deref().unwrap_or_default()
                ),
            ));
        }
    }
    if let Some(h) = &spec.health {
        if h.port == 0 {
            return Err(invalid("workload.health.port", "must be 1..=65535"));
        }
        if h.interval_seconds == 0 || h.timeout_seconds == 0 {
            return Err(invalid(
                "workload.health",
                "interval_seconds and timeout_seconds must be at least 1",
            ));
        }
        if h.success_threshold == 0 || h.failure_threshold == 0 {
            return Err(invalid(
                "workload.health",
                "success_threshold and failure_threshold must be at least 1",
            ));
        }
        // Bounded, so no deadline computed from them can overflow (a hostile plan with
        // `interval_seconds` near 2^63 used to panic the instance's task).
        for (field, value, max) in [
            ("interval_seconds", h.interval_seconds, MAX_HEALTH_SECONDS),
            ("timeout_seconds", h.timeout_seconds, MAX_HEALTH_SECONDS),
            (
                "grace_period_seconds",
                h.grace_period_seconds,
                MAX_GRACE_SECONDS,
            ),
            (
                "success_threshold",
                u64::from(h.success_threshold),
                MAX_HEALTH_THRESHOLD,
            ),
            (
                "failure_threshold",
                u64::from(h.failure_threshold),
                MAX_HEALTH_THRESHOLD,
            ),
        ] {
            if value > max {
                return Err(invalid(
                    format!("workload.health.{field}"),
                    format!("{value} exceeds the limit of {max}"),
                ));
            }
        }
        if let Some(p) = &h.path {
            if !p.starts_with('/') || p.chars().any(|c| c.is_control() || c == ' ') {
                return Err(invalid(
                    "workload.health.path",
                    format!("{:?} is not an absolute URL path", printable(p, 64)),
                ));
            }
        }
    }
    let lifecycle = spec.lifecycle.clone().unwrap_or_default();
    if lifecycle.termination_grace_seconds > MAX_GRACE_SECONDS {
        return Err(invalid(
            "workload.lifecycle.termination_grace_seconds",
            format!("exceeds the limit of {MAX_GRACE_SECONDS}"),
        ));
    }
    let spec_hash = match &spec.spec_hash {
        Some(h) if !h.is_empty() => h.clone(),
        _ => {
            // Struct fields serialize in declaration order and env is a BTreeMap, so
            // the JSON (and its hash) is canonical for a given spec.
            let bytes = serde_json::to_vec(&spec).unwrap_or_default();
            format!("sha256:{}", hex::encode(Sha256::digest(&bytes)))
        }
    };
    Ok(Workload {
        spec,
        digest,
        spec_hash,
        lifecycle,
    })
}

/// Decodes a plan from the control plane. Plan-level decode errors (not JSON, no
/// cursor) fail the plan; entry errors only reject that entry.
pub fn parse_plan(body: &[u8]) -> Result<Plan, SpecError> {
    let wire: NodePlanWire =
        serde_json::from_slice(body).map_err(|e| SpecError::Decode(e.to_string()))?;
    let mut plan = Plan {
        cursor: wire.cursor_event_id,
        ..Plan::default()
    };
    let mut seen = std::collections::BTreeSet::new();
    for (i, v) in wire.instances.iter().enumerate() {
        match decode_assignment(v, &format!("plan.instances[{i}]")) {
            Ok(a) => {
                if seen.insert(a.instance_id.clone()) {
                    plan.assignments.push(a);
                } else {
                    plan.rejected.push(Rejected {
                        instance_id: None,
                        generation: Some(a.generation),
                        origin: format!("plan.instances[{i}]"),
                        error: invalid(
                            "instance_id",
                            format!("{} appears twice in the plan", a.instance_id),
                        ),
                    });
                }
            }
            Err(r) => plan.rejected.push(r),
        }
    }
    plan.refuse_shared_addresses();
    Ok(plan)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use serde_json::json;

    pub(crate) fn workload_json(id: &str, generation: i32) -> serde_json::Value {
        json!({
            "instance_id": id,
            "generation": generation,
            "image": {"ref": "127.0.0.1:5000/app:v1", "resolved_digest": format!("sha256:{}", "a".repeat(64))},
            "command": ["/bin/app"],
            "resources": {"cpu_request": 0.5, "memory_limit_bytes": 128 * 1024 * 1024},
            "network": {"overlay_ipv6": format!("fd00::{:x}", id.bytes().fold(7u16, |h, b| h.wrapping_mul(31).wrapping_add(u16::from(b)))), "gateway_ipv6": "fe80::1"}
        })
    }

    fn assignment_json(id: &str) -> serde_json::Value {
        json!({"instance_id": id, "generation": 1, "desired_state": "running", "workload": workload_json(id, 1)})
    }

    #[test]
    fn valid_assignment_decodes_with_defaults() {
        let a = decode_assignment(&assignment_json("web-1"), "t").unwrap();
        assert_eq!(a.instance_id.as_str(), "web-1");
        assert_eq!(a.drain_grace, Duration::from_secs(10));
        let w = a.workload.unwrap();
        assert_eq!(w.lifecycle.max_retries, 3);
        assert!(w.spec_hash.starts_with("sha256:"));
    }

    #[test]
    fn instance_ids_with_slash_or_dotdot_are_refused() {
        for bad in ["../../etc", "a/b", "..", ".", "", "x..y", "sp ace", "ü"] {
            assert!(InstanceId::parse(bad).is_err(), "{bad:?} accepted");
        }
        for good in ["web-1", "a.b_c-9", "X"] {
            assert!(InstanceId::parse(good).is_ok(), "{good:?} refused");
        }
    }

    #[test]
    fn traversal_id_is_rejected_without_identifying_an_instance() {
        let mut v = assignment_json("web-1");
        v["instance_id"] = json!("../../etc");
        let r = decode_assignment(&v, "f.json").unwrap_err();
        assert_eq!(r.instance_id, None);
        assert!(r.error.to_string().contains("../../etc"), "{}", r.error);
    }

    #[test]
    fn missing_resolved_digest_fails_that_instance() {
        let mut v = assignment_json("web-1");
        v["workload"]["image"] = json!({"ref": "x/y:z"});
        let r = decode_assignment(&v, "t").unwrap_err();
        assert_eq!(r.instance_id.unwrap().as_str(), "web-1");
        assert_eq!(
            r.error.to_string(),
            "workload.image.resolved_digest is required"
        );
    }

    #[test]
    fn declared_ports_are_validated_and_named() {
        let with_ports = |ports: serde_json::Value| {
            let mut v = assignment_json("web-1");
            v["workload"]["network"]["ports"] = ports;
            decode_assignment(&v, "t")
        };
        let ok = with_ports(json!([{"port": 8080}, {"port": 53, "protocol": "UDP"}, {"port": 8080, "protocol": "tcp"}]))
            .unwrap();
        let ports = ok.workload.unwrap().spec.network.ports.clone().unwrap();
        assert_eq!(
            ingress_ports(&ports),
            [(Transport::Tcp, 8080), (Transport::Udp, 53)]
        );
        let err = |ports| with_ports(ports).unwrap_err().error.to_string();
        assert_eq!(
            err(json!([{"port": 80}, {"port": 81, "protocol": "sctp"}])),
            "workload.network.ports[1].protocol: \"sctp\" is not \"tcp\" or \"udp\""
        );
        assert!(
            err(json!([{"port": 0}])).starts_with("workload.network.ports[0].port"),
            "{}",
            err(json!([{"port": 0}]))
        );
        let many: Vec<serde_json::Value> = (1..=65).map(|p| json!({"port": p})).collect();
        assert!(err(json!(many)).contains("65 ports; at most 64"));
    }

    #[test]
    fn bad_digest_is_named() {
        let mut v = assignment_json("web-1");
        v["workload"]["image"]["resolved_digest"] = json!("sha256:xyz");
        let r = decode_assignment(&v, "t").unwrap_err();
        assert!(r.error.to_string().contains("sha256:xyz"));
    }

    #[test]
    fn health_timings_past_their_bounds_are_refused_not_overflowed() {
        for (field, value) in [
            ("interval_seconds", json!(1u64 << 62)),
            ("timeout_seconds", json!(3601)),
            ("grace_period_seconds", json!(u64::MAX)),
            ("failure_threshold", json!(1_000_000)),
        ] {
            let mut v = assignment_json("web-1");
            v["workload"]["health"] = json!({"type": "http", "port": 8080});
            v["workload"]["health"][field] = value;
            let r = decode_assignment(&v, "t").unwrap_err();
            let e = r.error.to_string();
            assert!(e.contains(&format!("workload.health.{field}")), "{e}");
            assert!(e.contains("exceeds the limit"), "{e}");
        }
        let mut v = assignment_json("web-1");
        v["workload"]["health"] =
            json!({"type": "tcp", "port": 8080, "interval_seconds": 3600, "timeout_seconds": 3600});
        assert!(decode_assignment(&v, "t").is_ok());
    }

    #[test]
    fn special_overlay_addresses_are_refused() {
        for (addr, class) in [
            ("::1", "loopback"),
            ("::", "unspecified"),
            ("ff02::1", "multicast"),
            ("fe80::1", "link-local"),
        ] {
            let mut v = assignment_json("web-1");
            v["workload"]["network"]["overlay_ipv6"] = json!(addr);
            let e = decode_assignment(&v, "t").unwrap_err().error.to_string();
            assert!(
                e.contains("overlay_ipv6") && e.contains(class),
                "{addr}: {e}"
            );
        }
    }

    #[test]
    fn an_address_taken_by_another_instance_is_refused_for_the_second() {
        let mut a = assignment_json("a-1");
        let mut b = assignment_json("b-1");
        let c = assignment_json("c-1");
        a["workload"]["network"]["overlay_ipv6"] = json!("fd00::7");
        b["workload"]["network"]["overlay_ipv6"] = json!("fd00:0::0:7");
        let body = json!({"spec_version": "v1", "node_id": "n", "plan_id": "p", "created_at": "2026-11-29T00:00:00Z",
                          "cursor_event_id": 3, "instances": [b, c, a]});
        let plan = parse_plan(body.to_string().as_bytes()).unwrap();
        let ids: Vec<&str> = plan
            .assignments
            .iter()
            .map(|a| a.instance_id.as_str())
            .collect();
        assert_eq!(ids, ["c-1", "a-1"], "a-1 keeps fd00::7 (first in id order)");
        let r = &plan.rejected[0];
        assert_eq!(r.instance_id.as_ref().map(|i| i.as_str()), Some("b-1"));
        let e = r.error.to_string();
        assert!(e.contains("fd00::7") && e.contains("instance a-1"), "{e}");
        assert!(e.contains("workload.network.overlay_ipv6"), "{e}");
    }

    #[test]
    fn memory_below_64_mib_is_refused() {
        let mut v = assignment_json("web-1");
        v["workload"]["resources"]["memory_limit_bytes"] = json!(1024);
        let r = decode_assignment(&v, "t").unwrap_err();
        assert!(
            r.error.to_string().contains("memory_limit_bytes"),
            "{}",
            r.error
        );
    }

    #[test]
    fn reserved_and_relative_mount_paths_are_refused() {
        for (path, needle) in [
            ("/proc", "reserved"),
            ("/run/secrets", "reserved"),
            ("/dev/shm", "reserved"),
            ("/", "reserved"),
            ("data", "not absolute"),
            ("/data/../etc", "'..'"),
        ] {
            let mut v = assignment_json("web-1");
            v["workload"]["mounts"] = json!([{"volume_id": "vol1", "mount_path": path, "read_only": false, "filesystem": "ext4"}]);
            let r = decode_assignment(&v, "t").unwrap_err();
            assert!(r.error.to_string().contains(needle), "{path}: {}", r.error);
        }
        let mut v = assignment_json("web-1");
        v["workload"]["mounts"] = json!([{"volume_id": "vol1", "mount_path": "/data", "read_only": false, "filesystem": "ext4"}]);
        decode_assignment(&v, "t").unwrap();
    }

    #[test]
    fn huge_argv_is_refused_with_its_size() {
        let mut v = assignment_json("web-1");
        v["workload"]["command"] = json!(["/bin/app", "x".repeat(10 * 1024 * 1024)]);
        let r = decode_assignment(&v, "t").unwrap_err();
        assert!(
            r.error.to_string().contains("exceed the limit"),
            "{}",
            r.error
        );
        assert!(
            r.error.to_string().len() < 200,
            "message must stay one short line"
        );
    }

    #[test]
    fn unknown_desired_state_names_the_variant() {
        let mut v = assignment_json("web-1");
        v["desired_state"] = json!("paused");
        let r = decode_assignment(&v, "t").unwrap_err();
        assert_eq!(r.instance_id.unwrap().as_str(), "web-1");
        assert!(r.error.to_string().contains("paused"), "{}", r.error);
    }

    #[test]
    fn unknown_fields_are_ignored() {
        let mut v = assignment_json("web-1");
        v["future_field"] = json!(42);
        v["workload"]["another"] = json!({"x": 1});
        decode_assignment(&v, "t").unwrap();
    }

    #[test]
    fn workload_required_unless_stopped() {
        let v = json!({"instance_id": "a", "generation": 1, "desired_state": "running"});
        assert!(decode_assignment(&v, "t").is_err());
        let v = json!({"instance_id": "a", "generation": 1, "desired_state": "stopped"});
        assert!(decode_assignment(&v, "t").unwrap().workload.is_none());
    }

    #[test]
    fn one_bad_entry_does_not_fail_the_plan() {
        let body = json!({
            "node_id": "n1", "cursor_event_id": 7,
            "instances": [assignment_json("a"), {"instance_id": "b"}, assignment_json("c")]
        });
        let plan = parse_plan(&serde_json::to_vec(&body).unwrap()).unwrap();
        assert_eq!(plan.cursor, 7);
        assert_eq!(plan.assignments.len(), 2);
        assert_eq!(plan.rejected.len(), 1);
        assert_eq!(plan.rejected[0].instance_id.as_ref().unwrap().as_str(), "b");
    }

    #[test]
    fn spec_hash_changes_with_the_spec_and_means_replace() {
        let a = decode_assignment(&assignment_json("a"), "t").unwrap();
        let mut v = assignment_json("a");
        v["workload"]["command"] = json!(["/bin/other"]);
        let b = decode_assignment(&v, "t").unwrap();
        assert_ne!(a.spec_hash(), b.spec_hash());
        assert!(a.needs_replace(&b));
        assert!(!a.needs_replace(&a.clone()));
    }

    #[test]
    fn reserved_path_check_is_component_wise() {
        assert!(is_reserved_mount_path("/proc/x"));
        assert!(is_reserved_mount_path("/tmp/"));
        assert!(!is_reserved_mount_path("/procfs"));
        assert!(!is_reserved_mount_path("/data"));
    }
}
