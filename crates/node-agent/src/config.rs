//! Agent configuration: a TOML file plus `PLFM_` environment overrides, validated once
//! at start-up so that a bad key or value stops the agent with a message naming it.
//!
//! Environment overrides: `PLFM_<KEY>` for top-level keys and `PLFM_<TABLE>__<KEY>` for
//! nested ones (`PLFM_API__LISTEN=127.0.0.1:7171`, `PLFM_RUNTIME__MOCK__BOOT_MS=0`).
//! Only variables whose first segment names a known top-level key are treated as
//! configuration, so unrelated `PLFM_*` variables (such as `PLFM_REQUIRE_SYSTEM_TESTS`)
//! are left alone. This module only parses and validates; it starts nothing.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::runtime::mock::MockConfig;

/// Top-level configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// This node's id, as the control plane knows it. Optional once the node is
    /// enrolled (`<data_dir>/identity.json` holds the id the control plane gave it);
    /// when both exist they must agree (see [`crate::identity`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_id: Option<String>,
    /// Where the agent keeps its state (state.db, images, instances, volumes).
    pub data_dir: PathBuf,
    /// Logging.
    #[serde(default)]
    pub log: LogConfig,
    /// Local API.
    #[serde(default)]
    pub api: ApiConfig,
    /// Where desired state comes from.
    pub control_plane: ControlPlaneConfig,
    /// Which VMM runs instances.
    pub runtime: RuntimeConfig,
    /// Agent behaviour.
    #[serde(default)]
    pub agent: AgentConfig,
    /// Image pipeline (pull, unpack, root disks, cache).
    #[serde(default)]
    pub images: crate::image::ImageConfig,
    /// Exec sessions from the platform's exec gateway.
    #[serde(default)]
    pub exec: ExecConfig,
    /// Workload logs on disk: size cap, retention after removal.
    #[serde(default)]
    pub logs: WorkloadLogsConfig,
    /// Guest artifacts the agent builds itself (when `runtime.qemu.initramfs` is not
    /// set).
    #[serde(default)]
    pub guest: GuestConfig,
    /// What `enroll` tells the control plane about this host (region, labels, public
    /// addresses).
    #[serde(default)]
    pub node: NodeConfig,
    /// The node's WireGuard overlay interface (DESIGN §8a).
    #[serde(default)]
    pub overlay: crate::overlay::settings::OverlaySettings,
    /// What instances may reach beyond their node: egress, the uplink, the overlay
    /// prefix (DESIGN §8a).
    #[serde(default)]
    pub network: NetworkSettings,
}

/// Egress of instances to the world beyond the overlay.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum EgressMode {
    /// Masqueraded to the uplink (IPv6 from the instance's /128, IPv4 from its /30).
    Nat,
    /// No egress: a guest starts no flow beyond its node, except to the overlay.
    #[default]
    Off,
}

/// `[network]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkSettings {
    /// `nat` or `off` (the default; the dev and demo configs say `nat`).
    #[serde(default)]
    pub egress: EgressMode,
    /// The interface egress leaves by; default: the interface of the default route
    /// (IPv6 first, then IPv4) at start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uplink: Option<String>,
    /// The overlay's prefix: instances' and nodes' overlay addresses. Never reachable
    /// through egress; a guest's traffic to it goes to the overlay interface only.
    #[serde(default = "default_overlay_prefix")]
    pub overlay_prefix: String,
}

impl Default for NetworkSettings {
    fn default() -> Self {
        NetworkSettings {
            egress: EgressMode::default(),
            uplink: None,
            overlay_prefix: default_overlay_prefix(),
        }
    }
}

fn default_overlay_prefix() -> String {
    "fd00::/8".into()
}

impl NetworkSettings {
    /// The overlay prefix as an address and a length (8..=64).
    pub fn overlay_prefix(&self) -> Result<(std::net::Ipv6Addr, u8), String> {
        let bad = || {
            format!(
                "network.overlay_prefix: {:?} is not an IPv6 prefix of length 8..=64 (e.g. \"fd00::/8\")",
                self.overlay_prefix
            )
        };
        let (addr, len) = self.overlay_prefix.split_once('/').ok_or_else(bad)?;
        let addr: std::net::Ipv6Addr = addr.parse().map_err(|_| bad())?;
        let len: u8 = len
            .parse()
            .ok()
            .filter(|l| (8..=64).contains(l))
            .ok_or_else(bad)?;
        let mask = u128::MAX << (128 - u32::from(len));
        Ok((std::net::Ipv6Addr::from(u128::from(addr) & mask), len))
    }

    fn validate(&self) -> Result<(), String> {
        self.overlay_prefix()?;
        if let Some(u) = &self.uplink {
            let ok = !u.is_empty()
                && u.len() <= 15
                && u.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-@".contains(&b));
            if !ok {
                return Err(format!(
                    "network.uplink: {u:?} is not an interface name (1-15 bytes of letters, digits, '.', '_', '-', '@')"
                ));
            }
        }
        Ok(())
    }
}

/// This host as `plfm-node-agent enroll` describes it to the control plane (DESIGN §3,
/// `POST /v1/nodes/enroll`). Command-line flags of `enroll` override these keys.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// Region (e.g. `eu-west-1`); required to enroll (here or `--region`).
    #[serde(default)]
    pub region: Option<String>,
    /// Free-form labels sent with the enrollment.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// The host's public IPv6 address; when unset, `enroll` uses the source address of
    /// the host's route to the IPv6 internet if it is a global unicast address.
    #[serde(default)]
    pub public_ipv6: Option<std::net::Ipv6Addr>,
    /// The host's public IPv4 address; when unset, the source address of the host's
    /// route to the IPv4 internet if it is not private, loopback or link-local.
    #[serde(default)]
    pub public_ipv4: Option<std::net::Ipv4Addr>,
}

/// `[guest]`: what the agent builds the guest initramfs from when
/// `runtime.qemu.initramfs` is not set (`crate::guest_artifacts`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuestConfig {
    /// The static guest init binary (the package installs it here).
    #[serde(default = "default_guest_init")]
    pub init: PathBuf,
    /// Root of the kernels' module trees; the kernel's own are `<modules_dir>/<release>`.
    #[serde(default = "default_modules_dir")]
    pub modules_dir: PathBuf,
    /// How many built sets (kernel + initramfs) to keep, the current one included; a
    /// set a running VM booted from is kept besides.
    #[serde(default = "default_guest_keep")]
    pub keep: usize,
}

impl Default for GuestConfig {
    fn default() -> Self {
        GuestConfig {
            init: default_guest_init(),
            modules_dir: default_modules_dir(),
            keep: default_guest_keep(),
        }
    }
}

fn default_guest_init() -> PathBuf {
    PathBuf::from("/usr/lib/plfm/plfm-guest-init")
}
fn default_modules_dir() -> PathBuf {
    PathBuf::from("/lib/modules")
}
fn default_guest_keep() -> usize {
    3
}

/// The exec gateway listener (DESIGN §4a). Local `exec` through the API needs none of
/// this; without `listen` there is no gateway listener.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecConfig {
    /// Where the gateway connects (the plfm gateway dials port 5090); off when unset.
    #[serde(default)]
    pub listen: Option<SocketAddr>,
    /// CA bundle that signs the gateway's client certificate (mTLS).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// This node's certificate for the gateway listener (mTLS).
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    /// Its private key (mTLS).
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// Subjects (common name or DNS name) of gateway certificates allowed to open
    /// sessions; empty: any certificate the CA signed.
    #[serde(default)]
    pub allowed_subjects: Vec<String>,
    /// Addresses allowed to connect without TLS (plaintext).
    #[serde(default)]
    pub allow_plaintext_from: Vec<std::net::IpAddr>,
}

impl ExecConfig {
    /// Whether mTLS is configured (all three files).
    pub fn tls(&self) -> bool {
        self.ca_file.is_some() && self.cert_file.is_some() && self.key_file.is_some()
    }

    fn validate(&self) -> Result<(), String> {
        let set = [&self.ca_file, &self.cert_file, &self.key_file]
            .iter()
            .filter(|f| f.is_some())
            .count();
        if set != 0 && set != 3 {
            return Err(
                "exec.ca_file, exec.cert_file, exec.key_file: set all three for mTLS, or none"
                    .into(),
            );
        }
        if let Some(listen) = self.listen {
            if !self.tls() && self.allow_plaintext_from.is_empty() {
                return Err(format!(
                    "exec.listen: {listen} needs mTLS (exec.ca_file, exec.cert_file, exec.key_file) or exec.allow_plaintext_from; otherwise nobody could open a session"
                ));
            }
        }
        Ok(())
    }
}

/// Workload logs on disk (`<data_dir>/instances/<id>/workload.log`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkloadLogsConfig {
    /// How long a removed instance's logs stay (`30m`, `24h`, `7d`, or seconds).
    #[serde(default = "default_logs_retention")]
    pub retention: String,
    /// Total size of the logs of all removed instances; past it the oldest removals go
    /// first.
    #[serde(default = "default_logs_retained_bytes")]
    pub retained_bytes: u64,
    /// Size at which an instance's `workload.log` rotates to `workload.log.1`.
    #[serde(default = "default_logs_file_max_bytes")]
    pub file_max_bytes: u64,
}

impl Default for WorkloadLogsConfig {
    fn default() -> Self {
        WorkloadLogsConfig {
            retention: default_logs_retention(),
            retained_bytes: default_logs_retained_bytes(),
            file_max_bytes: default_logs_file_max_bytes(),
        }
    }
}

impl WorkloadLogsConfig {
    /// The retention as a duration (validated at load).
    pub fn retention(&self) -> std::time::Duration {
        crate::logstore::parse_duration(&self.retention)
            .unwrap_or(std::time::Duration::from_secs(86_400))
    }

    fn validate(&self) -> Result<(), String> {
        crate::logstore::parse_duration(&self.retention)
            .map_err(|e| format!("logs.retention: {e}"))?;
        if self.file_max_bytes < 64 * 1024 {
            return Err(format!(
                "logs.file_max_bytes: {} is below 65536",
                self.file_max_bytes
            ));
        }
        Ok(())
    }
}

fn default_logs_retention() -> String {
    "24h".into()
}
fn default_logs_retained_bytes() -> u64 {
    1 << 30
}
fn default_logs_file_max_bytes() -> u64 {
    crate::runtime::vmm::workload_logs::DEFAULT_FILE_MAX_BYTES
}

/// Logging.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// `text` or `json`.
    #[serde(default = "default_log_format")]
    pub format: LogFormat,
    /// `tracing` filter directive (e.g. `info`, `plfm_node_agent=debug`).
    #[serde(default = "default_log_level")]
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: default_log_format(),
            level: default_log_level(),
        }
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// Human-readable.
    Text,
    /// One JSON object per line.
    Json,
}

fn default_log_format() -> LogFormat {
    LogFormat::Text
}
fn default_log_level() -> String {
    "info".into()
}

/// Local API.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    /// The local API's Unix socket (always served): root, and members of
    /// `socket_group`, may use it; its directory must be the agent's and not writable by
    /// others.
    #[serde(default = "default_socket")]
    pub socket: PathBuf,
    /// Group (name or number) whose members may use the API besides root: the socket is
    /// then `0660 root:<group>`; without it, `0600` (root only).
    #[serde(default)]
    pub socket_group: Option<String>,
    /// A TCP address to serve the API on as well (off by default); every request there
    /// needs `Authorization: Bearer <token>` from `token_file`.
    #[serde(default)]
    pub listen: Option<SocketAddr>,
    /// The bearer token of the TCP listener: a file only its owner may read.
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// Allow a non-loopback `listen` address.
    #[serde(default)]
    pub allow_non_loopback: bool,
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            socket: default_socket(),
            socket_group: None,
            listen: None,
            token_file: None,
            allow_non_loopback: false,
        }
    }
}

fn default_socket() -> PathBuf {
    PathBuf::from("/run/plfm/agent.sock")
}

/// Control plane connection.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlPlaneConfig {
    /// `standalone` (desired state from a directory).
    pub mode: ControlPlaneMode,
    /// Standalone: the directory of assignment files (relative paths are relative to
    /// the config file).
    #[serde(default)]
    pub desired_dir: Option<PathBuf>,
    /// Standalone: periodic rescan in addition to file notifications.
    #[serde(default = "default_rescan_ms")]
    pub rescan_interval_ms: u64,
    /// HTTP: base URL of the control plane (`https://…`). `http://` is refused unless
    /// the host is loopback (127.0.0.0/8, `::1`, `localhost`): credentials, plans and
    /// secrets must not cross the network in clear text.
    #[serde(default)]
    pub url: Option<String>,
    /// HTTP: PEM file of the CA that signs the control plane's certificate (required for
    /// `https`).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// HTTP: client certificate (PEM) for mTLS; needs `client_key_file`.
    #[serde(default)]
    pub client_cert_file: Option<PathBuf>,
    /// HTTP: client private key (PEM) for mTLS.
    #[serde(default)]
    pub client_key_file: Option<PathBuf>,
    /// HTTP: file holding a bearer token.
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// HTTP: timeout of one request.
    #[serde(default = "default_request_timeout_ms")]
    pub request_timeout_ms: u64,
    /// HTTP: plan polling interval (±10 % jitter); a status change also triggers a poll.
    #[serde(default = "default_poll_ms")]
    pub poll_interval_ms: u64,
    /// HTTP: heartbeat interval until the control plane answers `next_heartbeat_secs`.
    #[serde(default = "default_heartbeat_secs")]
    pub heartbeat_interval_secs: u64,
    /// HTTP: how often the CA bundle, client certificate and key and the token file are
    /// checked for a change (a new inode, size or mtime at the path); a changed set is
    /// reloaded without a restart (`docs/operations.md`).
    #[serde(default = "default_reload_interval_ms")]
    pub reload_interval_ms: u64,
}

fn default_reload_interval_ms() -> u64 {
    5_000
}

fn default_request_timeout_ms() -> u64 {
    10_000
}
fn default_poll_ms() -> u64 {
    5_000
}
fn default_heartbeat_secs() -> u64 {
    10
}

fn default_rescan_ms() -> u64 {
    2000
}

/// Where desired state comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ControlPlaneMode {
    /// Local directory.
    Standalone,
    /// plfm node API v1 over HTTP(S).
    Http,
}

/// Runtime selection.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimeConfig {
    /// Which runtime.
    pub kind: RuntimeKind,
    /// Mock runtime settings.
    #[serde(default)]
    pub mock: MockConfig,
    /// Firecracker runtime settings (`[runtime.firecracker]`).
    #[serde(default)]
    pub firecracker: crate::runtime::firecracker::FirecrackerConfig,
    /// QEMU runtime settings (`[runtime.qemu]`).
    #[serde(default)]
    pub qemu: crate::runtime::qemu::QemuConfig,
}

/// Runtime kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RuntimeKind {
    /// In-process simulation.
    Mock,
    /// One Firecracker microVM per instance.
    Firecracker,
    /// `qemu-system-x86_64 -M microvm` (DESIGN §5).
    Qemu,
}

/// Agent behaviour.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// Seconds between reconcile ticks.
    #[serde(default = "default_tick")]
    pub reconcile_interval_ms: u64,
    /// Deadline for the VMM to report the workload started.
    #[serde(default = "default_boot_timeout")]
    pub boot_timeout_seconds: u64,
    /// On SIGTERM/SIGINT: `detach` leaves VMs running for the next agent to adopt;
    /// `drain` drains and stops every instance first.
    #[serde(default)]
    pub on_shutdown: ShutdownMode,
    /// Most instances this node accepts; further assignments fail.
    #[serde(default = "default_max_instances")]
    pub max_instances: usize,
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            reconcile_interval_ms: default_tick(),
            boot_timeout_seconds: default_boot_timeout(),
            on_shutdown: ShutdownMode::default(),
            max_instances: default_max_instances(),
        }
    }
}

fn default_tick() -> u64 {
    1000
}
fn default_boot_timeout() -> u64 {
    120
}
fn default_max_instances() -> usize {
    20_000
}

/// What the agent does with running VMs when it exits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ShutdownMode {
    /// Leave VMs running; the next agent adopts them.
    #[default]
    Detach,
    /// Drain and stop every instance, then exit.
    Drain,
}

/// A configuration problem; the message names the key and the file or variable.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// Path.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// TOML syntax or a key/value the schema refuses.
    #[error("config {origin}: {message}")]
    Invalid {
        /// File path (and env variables applied).
        origin: String,
        /// What is wrong, naming the key.
        message: String,
    },
    /// An environment override does not fit.
    #[error("environment variable {var}: {message}")]
    Env {
        /// Variable name.
        var: String,
        /// What is wrong.
        message: String,
    },
}

const TOP_LEVEL_KEYS: [&str; 11] = [
    "overlay",
    "node",
    "images",
    "logs",
    "node_id",
    "data_dir",
    "log",
    "api",
    "control_plane",
    "runtime",
    "agent",
];

impl Config {
    /// Loads `path`, applies `PLFM_` overrides from `env`, validates.
    pub fn load(
        path: &Path,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        Config::from_toml(&text, &path.display().to_string(), base, env)
    }

    /// As [`Config::load`], without reading the control plane's TLS and token files:
    /// for the operator commands that only talk to the local API, which must keep
    /// working while a bad certificate waits to be replaced (the running agent keeps
    /// its previous one and reports the bad file, `docs/operations.md`).
    pub fn load_for_operator(
        path: &Path,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        Config::parse(&text, &path.display().to_string(), base, env, false)
    }

    /// Parses TOML text; relative paths are resolved against `base_dir`.
    pub fn from_toml(
        text: &str,
        origin: &str,
        base_dir: &Path,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        Config::parse(text, origin, base_dir, env, true)
    }

    fn parse(
        text: &str,
        origin: &str,
        base_dir: &Path,
        env: impl IntoIterator<Item = (String, String)>,
        read_files: bool,
    ) -> Result<Config, ConfigError> {
        let mut value: toml::Table = toml::from_str(text).map_err(|e| ConfigError::Invalid {
            origin: origin.to_string(),
            message: e.message().to_string() + &span_hint(text, e.span()),
        })?;
        let mut applied = Vec::new();
        let env: BTreeMap<String, String> = env.into_iter().collect();
        for (var, raw) in &env {
            let Some(rest) = var.strip_prefix("PLFM_") else {
                continue;
            };
            let path: Vec<String> = rest.split("__").map(|s| s.to_ascii_lowercase()).collect();
            if !TOP_LEVEL_KEYS.contains(&path[0].as_str()) {
                continue;
            }
            set_path(&mut value, &path, parse_env_value(raw)).map_err(|message| {
                ConfigError::Env {
                    var: var.clone(),
                    message,
                }
            })?;
            applied.push(var.clone());
        }
        let origin = if applied.is_empty() {
            origin.to_string()
        } else {
            format!("{origin} (with {})", applied.join(", "))
        };
        let mut cfg: Config =
            toml::Value::Table(value)
                .try_into()
                .map_err(|e: toml::de::Error| ConfigError::Invalid {
                    origin: origin.clone(),
                    message: e.message().to_string(),
                })?;
        cfg.resolve_paths(base_dir);
        cfg.validate(read_files)
            .map_err(|message| ConfigError::Invalid { origin, message })?;
        Ok(cfg)
    }

    fn resolve_paths(&mut self, base: &Path) {
        let abs = |p: &Path| {
            if p.is_absolute() {
                p.to_path_buf()
            } else {
                base.join(p)
            }
        };
        self.data_dir = abs(&self.data_dir);
        self.api.socket = abs(&self.api.socket);
        self.guest.init = abs(&self.guest.init);
        self.guest.modules_dir = abs(&self.guest.modules_dir);
        if let Some(t) = self.api.token_file.as_ref() {
            self.api.token_file = Some(abs(t));
        }
        if let Some(k) = self.overlay.private_key_file.as_ref() {
            self.overlay.private_key_file = Some(abs(k));
        }
        let cp = &mut self.control_plane;
        for p in [
            &mut cp.desired_dir,
            &mut cp.ca_file,
            &mut cp.client_cert_file,
            &mut cp.client_key_file,
            &mut cp.token_file,
        ] {
            if let Some(d) = p.as_ref() {
                *p = Some(abs(d));
            }
        }
        let q = &mut self.runtime.qemu;
        for p in [&mut q.kernel, &mut q.initramfs] {
            if let Some(d) = p.as_ref() {
                *p = Some(abs(d));
            }
        }
    }

    fn validate(&self, read_files: bool) -> Result<(), String> {
        if let Some(id) = &self.node_id {
            crate::spec::InstanceId::parse(id).map_err(|e| format!("node_id: {e}"))?;
        }
        if let Some(r) = &self.node.region {
            if r.trim().is_empty() {
                return Err("node.region: must not be empty".into());
            }
        }
        if self.data_dir.as_os_str().is_empty() {
            return Err("data_dir: must not be empty".into());
        }
        if let Some(listen) = self.api.listen {
            if self.api.token_file.is_none() {
                return Err(format!(
                    "api.token_file: required with api.listen ({listen}): the TCP API accepts only requests with that bearer token"
                ));
            }
            if !self.api.allow_non_loopback && !listen.ip().is_loopback() {
                return Err(format!(
                    "api.listen: {listen} is not a loopback address (set api.allow_non_loopback = true to override)"
                ));
            }
        }
        self.exec.validate()?;
        if self.api.socket.file_name().is_none() {
            return Err(format!(
                "api.socket: {} names no file",
                self.api.socket.display()
            ));
        }
        match self.control_plane.mode {
            ControlPlaneMode::Standalone => {
                if self.control_plane.desired_dir.is_none() {
                    return Err("control_plane.desired_dir: required in standalone mode".into());
                }
            }
            ControlPlaneMode::Http => self.validate_http(read_files)?,
        }
        if self.control_plane.rescan_interval_ms < 50 {
            return Err("control_plane.rescan_interval_ms: must be at least 50".into());
        }
        if self.agent.reconcile_interval_ms < 10 {
            return Err("agent.reconcile_interval_ms: must be at least 10".into());
        }
        if self.agent.boot_timeout_seconds == 0 {
            return Err("agent.boot_timeout_seconds: must be at least 1".into());
        }
        self.runtime
            .mock
            .validate()
            .map_err(|e| format!("runtime.mock.{e}"))?;
        self.runtime.firecracker.validate()?;
        if self.runtime.kind == RuntimeKind::Qemu {
            self.runtime
                .qemu
                .validate()
                .map_err(|e| format!("runtime.qemu.{e}"))?;
        }
        self.logs.validate()?;
        self.overlay.validate()?;
        self.network.validate()?;
        if !(1..=20).contains(&self.guest.keep) {
            return Err(format!("guest.keep: {} is not in 1..=20", self.guest.keep));
        }
        tracing_subscriber::EnvFilter::try_new(&self.log.level)
            .map_err(|e| format!("log.level: {:?} is not a valid filter: {e}", self.log.level))?;
        Ok(())
    }

    fn validate_http(&self, read_files: bool) -> Result<(), String> {
        let cp = &self.control_plane;
        let raw = cp
            .url
            .as_deref()
            .ok_or("control_plane.url: required in http mode")?;
        let url = url::Url::parse(raw)
            .map_err(|e| format!("control_plane.url: {raw:?} is not a URL: {e}"))?;
        match url.scheme() {
            "https" => {
                if cp.ca_file.is_none() {
                    return Err("control_plane.ca_file: required for an https url (the CA that signs the control plane's certificate)".into());
                }
            }
            "http" => {
                if !is_loopback_host(&url) {
                    return Err(format!(
                        "control_plane.url: {raw:?} is plain http to a host that is not loopback; node credentials, plans and secrets would cross the network in clear text (use https with ca_file; http is accepted only for 127.0.0.0/8, ::1 and localhost)"
                    ));
                }
            }
            other => {
                return Err(format!(
                    "control_plane.url: scheme {other:?} is not http or https"
                ))
            }
        }
        if url.host_str().is_none() {
            return Err(format!("control_plane.url: {raw:?} has no host"));
        }
        if cp.client_cert_file.is_some() != cp.client_key_file.is_some() {
            return Err(
                "control_plane.client_cert_file and client_key_file: give both or neither".into(),
            );
        }
        if cp.request_timeout_ms < 100 {
            return Err("control_plane.request_timeout_ms: must be at least 100".into());
        }
        if cp.poll_interval_ms < 100 {
            return Err("control_plane.poll_interval_ms: must be at least 100".into());
        }
        if !(100..=3_600_000).contains(&cp.reload_interval_ms) {
            return Err("control_plane.reload_interval_ms: must be 100..=3600000".into());
        }
        if !(1..=3600).contains(&cp.heartbeat_interval_secs) {
            return Err("control_plane.heartbeat_interval_secs: must be 1..=3600".into());
        }
        if !read_files {
            return Ok(());
        }
        // Files are read (and certificates parsed) now, so a bad one stops the start.
        crate::control_plane::http::TlsFiles::from_config(cp)
            .load()
            .map_err(|e| e.to_string())?;
        if let Some(t) = &cp.token_file {
            crate::control_plane::http::read_token(t).map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    /// `<data_dir>/state.db`.
    pub fn state_db(&self) -> PathBuf {
        self.data_dir.join("state.db")
    }
}

/// Whether `url`'s host is this machine: an address in 127.0.0.0/8, `::1`, or the name
/// `localhost`. Other names are not resolved (a name can point anywhere).
pub fn is_loopback_host(url: &url::Url) -> bool {
    match url.host() {
        Some(url::Host::Ipv4(a)) => a.is_loopback(),
        Some(url::Host::Ipv6(a)) => a.is_loopback(),
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        None => false,
    }
}

fn span_hint(text: &str, span: Option<std::ops::Range<usize>>) -> String {
    match span {
        Some(s) => {
            let line = text[..s.start.min(text.len())].matches('\n').count() + 1;
            format!(" (line {line})")
        }
        None => String::new(),
    }
}

fn parse_env_value(raw: &str) -> toml::Value {
    // A TOML scalar when it is one (numbers, booleans, quoted strings), else a string.
    let doc = format!("v = {raw}");
    match toml::from_str::<toml::Table>(&doc) {
        Ok(mut t) => t
            .remove("v")
            .unwrap_or_else(|| toml::Value::String(raw.to_string())),
        Err(_) => toml::Value::String(raw.to_string()),
    }
}

fn set_path(table: &mut toml::Table, path: &[String], v: toml::Value) -> Result<(), String> {
    let (last, parents) = path.split_last().ok_or("empty key")?;
    let mut cur = table;
    for p in parents {
        let entry = cur
            .entry(p.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        cur = entry
            .as_table_mut()
            .ok_or_else(|| format!("{p} is not a table"))?;
    }
    cur.insert(last.clone(), v);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: &str = r#"
node_id = "n1"
data_dir = "data"
[control_plane]
mode = "standalone"
desired_dir = "instances"
[runtime]
kind = "mock"
"#;

    fn load(text: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        Config::from_toml(
            text,
            "test.toml",
            Path::new("/etc/plfm"),
            env.iter().map(|(a, b)| (a.to_string(), b.to_string())),
        )
    }

    #[test]
    fn minimal_config_resolves_relative_paths() {
        let c = load(MIN, &[]).unwrap();
        assert_eq!(c.data_dir, PathBuf::from("/etc/plfm/data"));
        assert_eq!(
            c.control_plane.desired_dir.unwrap(),
            PathBuf::from("/etc/plfm/instances")
        );
        assert_eq!(c.api.listen, None);
        assert_eq!(c.api.socket, PathBuf::from("/run/plfm/agent.sock"));
    }

    #[test]
    fn qemu_runtime_table_is_validated_with_the_key_named() {
        let qemu = MIN.replace("\"mock\"", "\"qemu\"");
        let err = load(&qemu, &[]).unwrap_err().to_string();
        assert!(err.contains("runtime.qemu.kernel"), "{err}");
        let ok = format!("{qemu}\n[runtime.qemu]\nkernel = \"vmlinuz\"\ninitramfs = \"/i.img\"\naccel = \"tcg\"\n");
        let c = load(&ok, &[]).unwrap();
        assert_eq!(c.runtime.kind, RuntimeKind::Qemu);
        assert_eq!(
            c.runtime.qemu.kernel,
            Some(PathBuf::from("/etc/plfm/vmlinuz"))
        );
        let err = load(&format!("{ok}ipv4_pool = \"10.0.0.0/8\"\n"), &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("runtime.qemu.ipv4_pool"), "{err}");
        let err = load(&format!("{ok}kernal = \"x\"\n"), &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("kernal"), "{err}");
        let err = load(&ok.replace("\"tcg\"", "\"hvf\""), &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("hvf"), "{err}");
    }

    #[test]
    fn workload_log_keys_default_and_are_validated_with_the_key_named() {
        let c = load(MIN, &[]).unwrap();
        assert_eq!(c.logs.retention(), std::time::Duration::from_secs(86_400));
        assert_eq!(c.logs.retained_bytes, 1 << 30);
        let c = load(&format!("{MIN}\n[logs]\nretention = \"30m\"\n"), &[]).unwrap();
        assert_eq!(c.logs.retention(), std::time::Duration::from_secs(1800));
        let err = load(&format!("{MIN}\n[logs]\nretention = \"a day\"\n"), &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("logs.retention"), "{err}");
        let err = load(&format!("{MIN}\n[logs]\nfile_max_bytes = 10\n"), &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("logs.file_max_bytes"), "{err}");
        let err = load(&format!("{MIN}\n[logs]\nkeep = 1\n"), &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("keep"), "{err}");
        let c = load(MIN, &[("PLFM_LOGS__RETENTION", "2h")]).unwrap();
        assert_eq!(c.logs.retention(), std::time::Duration::from_secs(7200));
    }

    #[test]
    fn network_keys_default_and_are_validated_with_the_key_named() {
        let c = load(MIN, &[]).unwrap();
        assert_eq!(c.network.egress, EgressMode::Off);
        assert_eq!(c.network.uplink, None);
        assert_eq!(
            c.network.overlay_prefix().unwrap(),
            ("fd00::".parse().unwrap(), 8)
        );
        let c = load(
            &format!("{MIN}\n[network]\negress = \"nat\"\nuplink = \"eth0\"\noverlay_prefix = \"fd00:1:2::7/48\"\n"),
            &[],
        )
        .unwrap();
        assert_eq!(c.network.egress, EgressMode::Nat);
        assert_eq!(c.network.uplink.as_deref(), Some("eth0"));
        assert_eq!(
            c.network.overlay_prefix().unwrap(),
            ("fd00:1:2::".parse().unwrap(), 48)
        );
        for (extra, key) in [
            ("egress = \"open\"", "open"),
            ("uplink = \"a/b\"", "network.uplink"),
            ("uplink = \"abcdefghijklmnop\"", "network.uplink"),
            ("overlay_prefix = \"10.0.0.0/8\"", "network.overlay_prefix"),
            ("overlay_prefix = \"fd00::/4\"", "network.overlay_prefix"),
            ("nat = true", "nat"),
        ] {
            let err = load(&format!("{MIN}\n[network]\n{extra}\n"), &[])
                .unwrap_err()
                .to_string();
            assert!(err.contains(key), "{extra}: {err}");
        }
    }

    #[test]
    fn overlay_keys_default_and_are_validated_with_the_key_named() {
        use crate::overlay::settings::Backend;
        let c = load(MIN, &[]).unwrap();
        assert!(c.overlay.enabled);
        assert_eq!(c.overlay.interface, "plfm-wg0");
        assert_eq!(c.overlay.backend, Backend::Auto);
        assert_eq!(c.overlay.userspace_command, PathBuf::from("wireguard-go"));
        assert_eq!(c.overlay.drift_check_seconds, 30);
        assert_eq!(
            c.overlay.private_key_path(&c.data_dir),
            PathBuf::from("/etc/plfm/data/overlay/private.key")
        );
        let c = load(
            &format!("{MIN}\n[overlay]\ninterface = \"wg7\"\nbackend = \"userspace\"\nprivate_key_file = \"keys/wg.key\"\ndrift_check_seconds = 1\nenabled = false\n"),
            &[],
        )
        .unwrap();
        assert_eq!(
            (
                c.overlay.interface.as_str(),
                c.overlay.backend,
                c.overlay.drift_check_seconds,
                c.overlay.enabled
            ),
            ("wg7", Backend::Userspace, 1, false)
        );
        assert_eq!(
            c.overlay.private_key_path(&c.data_dir),
            PathBuf::from("/etc/plfm/keys/wg.key")
        );
        let bad = |extra: &str, key: &str| {
            let err = load(&format!("{MIN}\n[overlay]\n{extra}\n"), &[])
                .unwrap_err()
                .to_string();
            assert!(err.contains(key), "{extra}: {err}");
        };
        bad("interface = \"sixteen-bytes-16\"", "overlay.interface");
        bad("interface = \"wg/0\"", "overlay.interface");
        let c = load(&format!("{MIN}\n[overlay]\nbackend = \"kernel\"\n"), &[]).unwrap();
        assert_eq!(c.overlay.backend, crate::overlay::settings::Backend::Kernel);
        bad("backend = \"boringtun\"", "boringtun");
        bad("drift_check_seconds = 0", "overlay.drift_check_seconds");
        bad("drift_check_seconds = 3601", "overlay.drift_check_seconds");
        bad("userspace_command = \"\"", "overlay.userspace_command");
        bad("drift = 3", "drift");
        let c = load(MIN, &[("PLFM_OVERLAY__DRIFT_CHECK_SECONDS", "5")]).unwrap();
        assert_eq!(c.overlay.drift_check_seconds, 5);
    }

    #[test]
    fn unknown_key_is_named() {
        let err = load(&format!("{MIN}\n[api]\nlisten_port = 3\n"), &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("listen_port"), "{err}");
        let err = load(&format!("datadir = 'x'\n{MIN}"), &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("datadir"), "{err}");
    }

    #[test]
    fn bad_value_is_named() {
        let err = load(&MIN.replace("\"mock\"", "\"vmware\""), &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("vmware"), "{err}");
    }

    #[test]
    fn env_overrides_nested_keys() {
        let c = load(
            MIN,
            &[
                ("PLFM_API__LISTEN", "127.0.0.1:9999"),
                ("PLFM_API__TOKEN_FILE", "/etc/plfm/api.token"),
                ("PLFM_RUNTIME__MOCK__BOOT_MS", "0"),
            ],
        )
        .unwrap();
        assert_eq!(c.api.listen.map(|l| l.port()), Some(9999));
        assert_eq!(c.runtime.mock.boot_ms, 0);
    }

    #[test]
    fn unrelated_plfm_variables_are_ignored() {
        load(MIN, &[("PLFM_REQUIRE_SYSTEM_TESTS", "1")]).unwrap();
    }

    #[test]
    fn bad_env_override_names_the_variable() {
        let err = load(MIN, &[("PLFM_API__NOPE", "1")])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("PLFM_API__NOPE") && err.contains("nope"),
            "{err}"
        );
    }

    #[test]
    fn public_listen_address_is_refused() {
        let err = load(
            &format!("{MIN}\n[api]\nlisten = \"0.0.0.0:7070\"\ntoken_file = \"t\"\n"),
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("api.listen"), "{err}");
        // TCP without a token is refused, naming the key.
        let err = load(&format!("{MIN}\n[api]\nlisten = \"127.0.0.1:7070\"\n"), &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("api.token_file"), "{err}");
    }

    #[test]
    fn http_mode_is_validated() {
        let http = |extra: &str| {
            let text = MIN.replace(
                "mode = \"standalone\"\ndesired_dir = \"instances\"",
                &format!("mode = \"http\"\n{extra}"),
            );
            load(&text, &[]).map(|_| ()).map_err(|e| e.to_string())
        };
        assert!(http("").unwrap_err().contains("control_plane.url"));
        assert!(http("url = \"https://cp.example:8443\"")
            .unwrap_err()
            .contains("control_plane.ca_file"));
        assert!(http("url = \"ftp://x\"").unwrap_err().contains("ftp"));
        let e = http("url = \"https://cp:1\"\nca_file = \"/nonexistent/ca.pem\"").unwrap_err();
        assert!(e.contains("/nonexistent/ca.pem"), "{e}");
        assert!(
            http("url = \"http://127.0.0.1:9\"\nclient_cert_file = \"c.pem\"")
                .unwrap_err()
                .contains("both or neither")
        );
        http("url = \"http://127.0.0.1:9\"").unwrap();
    }

    fn http_url(url: &str) -> Result<(), String> {
        let text = MIN.replace(
            "mode = \"standalone\"\ndesired_dir = \"instances\"",
            &format!("mode = \"http\"\nurl = \"{url}\""),
        );
        load(&text, &[]).map(|_| ()).map_err(|e| e.to_string())
    }

    #[test]
    fn plain_http_to_a_network_control_plane_is_refused() {
        for url in [
            "http://10.1.2.3:8080",
            "http://cp.example.com",
            "http://[2001:db8::1]:8080/",
            "http://0.0.0.0:8080",
            "http://[::]:8080",
            "http://[::ffff:127.0.0.1]:8080",
            "http://localhost.example:8080",
            "http://127.0.0.1.nip.io",
            "HTTP://192.168.1.1",
            "http://127.0.0.1@10.1.2.3:8080",
        ] {
            let e = http_url(url).unwrap_err();
            assert!(
                e.contains("control_plane.url") && e.contains("clear text"),
                "{url}: {e}"
            );
        }
    }

    #[test]
    fn plain_http_to_loopback_is_accepted() {
        for url in [
            "http://127.0.0.1:9",
            "http://127.0.0.1",
            "http://127.9.8.7:8080/base/",
            "http://[::1]:8080",
            "http://localhost:8080",
            "http://LocalHost",
        ] {
            http_url(url).unwrap_or_else(|e| panic!("{url}: {e}"));
        }
    }

    #[test]
    fn standalone_needs_desired_dir() {
        let err = load(&MIN.replace("desired_dir = \"instances\"", ""), &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("control_plane.desired_dir"), "{err}");
    }
}
