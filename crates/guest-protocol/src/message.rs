//! Message types of the guest protocol. Plain serde data: validation of the contents
//! (paths, secrets format, addresses usable on eth0) is the job of the side that acts on
//! them, not of this module.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr};

use serde::{Deserialize, Serialize};
use zeroize::Zeroize;

use crate::{FailureReason, ProtocolError, CONFIG_VERSION, PROTOCOL_VERSION};

/// Where the secrets file lands in the guest unless the config says otherwise.
pub const DEFAULT_SECRETS_PATH: &str = "/run/secrets/platform.env";

/// A message sent by the guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum GuestMessage {
    /// First message on a new connection.
    Hello(Hello),
    /// The config was received and validated; status events follow.
    Ack,
    /// Something happened to the guest or its workload.
    Status(StatusEvent),
}

/// A message sent by the host.
// One config per connection, short-lived: boxing it would only make matching clumsier.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum HostMessage {
    /// The instance's configuration, answer to `hello`.
    Config(Config),
    /// Graceful stop: the guest forwards SIGTERM to the workload and kills everything
    /// still running `deadline_ms` milliseconds later.
    Stop {
        /// Grace period in milliseconds.
        deadline_ms: u64,
    },
}

/// The guest introduces itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// Version of the guest init binary (free-form, for logs).
    pub guest_init_version: String,
    /// Handshake version; must be [`PROTOCOL_VERSION`].
    pub protocol: u32,
    /// The instance the guest believes it is (`platform.instance_id=` on the kernel
    /// command line).
    pub instance_id: String,
    /// The guest kernel's boot id.
    pub boot_id: String,
    /// The guest reconnects after losing the channel (e.g. the agent restarted) while its
    /// workload runs: it ignores the config it gets, answers `ack`, and reports
    /// `workload_started` again for the running workload.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub resumed: bool,
}

impl Hello {
    /// Refuses a hello of another protocol version.
    pub fn check_protocol(&self) -> Result<(), ProtocolError> {
        if self.protocol == PROTOCOL_VERSION {
            Ok(())
        } else {
            Err(ProtocolError::UnsupportedProtocol {
                got: self.protocol,
                supported: PROTOCOL_VERSION,
            })
        }
    }
}

/// Events the guest reports after `ack`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum StatusEvent {
    /// Disks, overlay root, network, secrets and volumes are in place.
    ConfigApplied,
    /// The workload process was executed.
    WorkloadStarted {
        /// Its pid in the guest.
        pid: u32,
        /// Microseconds from guest init's start to the workload's exec, handshake wait
        /// included.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        init_us: Option<u64>,
        /// Microseconds of `init_us` spent waiting for the host (connect and config).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        handshake_wait_us: Option<u64>,
    },
    /// The workload ended. Exactly one of `code` and `signal` is set.
    Exited {
        /// Exit status when the workload exited normally.
        code: Option<i32>,
        /// Terminating signal when it was killed.
        signal: Option<i32>,
        /// The guest kernel OOM-killed a process while the workload ran.
        oom_killed: bool,
    },
    /// The guest could not bring the workload up (or lost it); the VM ends next.
    Failed {
        /// Reason code from the closed set of DESIGN §2.
        reason: FailureReason,
        /// One line naming the thing and the cause; never a secret value.
        detail: String,
    },
    /// A TCP socket listens on the port the host asked to watch
    /// ([`WorkloadConfig::listen_port`]); sent once. The host probes at once instead of
    /// waiting for its next retry.
    Listening {
        /// The port.
        port: u16,
    },
    /// An event of a newer guest init that this side does not know: ignored, so a
    /// newer guest never breaks an older host's channel.
    #[serde(other)]
    Unknown,
}

/// The instance's configuration, sent by the host after `hello`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Config {
    /// Must be [`CONFIG_VERSION`].
    pub config_version: String,
    /// The instance this config is for; the guest refuses a config for another one.
    pub instance_id: String,
    /// The spec generation.
    pub generation: i64,
    /// What to run.
    pub workload: WorkloadConfig,
    /// eth0 configuration; `None` leaves eth0 down (only `lo` is brought up).
    #[serde(default)]
    pub network: Option<NetworkConfig>,
    /// Volumes; the guest assigns them to `vdc`, `vdd`, … in `volume_id` order
    /// ([`crate::disks`]).
    #[serde(default)]
    pub mounts: Vec<MountConfig>,
    /// How many read-only root layer disks the image's root is stacked from (1 ..=
    /// [`crate::MAX_ROOT_LAYERS`]): layer 0 (the bottom) is `vda`, layers 1 … N-1 follow
    /// the volumes ([`crate::disks`]). Absent (a host from before layer stacks): 1, the
    /// single flattened root disk. The guest refuses 0 and more than the maximum.
    #[serde(default = "default_root_layers")]
    pub root_layers: u32,
    /// Secrets file; `None` when no secrets are bound.
    #[serde(default)]
    pub secrets: Option<SecretsConfig>,
}

fn default_root_layers() -> u32 {
    1
}

impl Config {
    /// Refuses a config of another version.
    pub fn check_version(&self) -> Result<(), ProtocolError> {
        if self.config_version == CONFIG_VERSION {
            Ok(())
        } else {
            Err(ProtocolError::UnsupportedConfigVersion {
                got: self.config_version.clone(),
            })
        }
    }
}

/// The workload process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkloadConfig {
    /// Program and arguments; `argv[0]` is looked up in the workload's `PATH` when it
    /// has no `/`.
    pub argv: Vec<String>,
    /// Working directory; `/` when absent.
    #[serde(default)]
    pub cwd: Option<String>,
    /// Environment (image env merged with the spec's `env_vars` by the host).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// User id to run as.
    #[serde(default)]
    pub uid: u32,
    /// Group id to run as.
    #[serde(default)]
    pub gid: u32,
    /// Tell the host ([`StatusEvent::Listening`]) when a TCP socket starts listening
    /// on this port (the health check's), watched from the workload's start for at
    /// most [`LISTEN_WATCH_LIMIT_SECS`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listen_port: Option<u16>,
}

/// How long guest init watches for [`WorkloadConfig::listen_port`] after the workload
/// started.
pub const LISTEN_WATCH_LIMIT_SECS: u64 = 120;

fn default_mtu() -> u32 {
    1420
}

/// eth0 configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkConfig {
    /// The instance's primary address (the overlay IPv6 address).
    pub address: IpAddr,
    /// Its prefix length.
    pub prefix_len: u8,
    /// Default gateway of the address's family (often `fe80::1`, reached on eth0).
    #[serde(default)]
    pub gateway: Option<IpAddr>,
    /// MTU of eth0.
    #[serde(default = "default_mtu")]
    pub mtu: u32,
    /// Name servers; `/etc/resolv.conf` is written only when this is not empty.
    #[serde(default)]
    pub dns: Vec<IpAddr>,
    /// Optional IPv4 link address for hosts without IPv6 routing (extension of DESIGN §6,
    /// see docs/guest.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv4: Option<Ipv4Config>,
}

/// An IPv4 address on eth0 with its default route.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ipv4Config {
    /// The address.
    pub address: Ipv4Addr,
    /// Its prefix length.
    pub prefix_len: u8,
    /// IPv4 default gateway.
    #[serde(default)]
    pub gateway: Option<Ipv4Addr>,
}

fn default_filesystem() -> String {
    "ext4".to_string()
}

/// One volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MountConfig {
    /// Volume id; the sort key that fixes the device order.
    pub volume_id: String,
    /// Absolute path in the guest.
    pub mount_path: String,
    /// Mount read-only.
    #[serde(default)]
    pub read_only: bool,
    /// Filesystem; only `ext4` is supported.
    #[serde(default = "default_filesystem")]
    pub filesystem: String,
}

fn default_secrets_path() -> String {
    DEFAULT_SECRETS_PATH.to_string()
}

fn default_secrets_mode() -> u32 {
    0o400
}

/// The secrets file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretsConfig {
    /// The spec requires secrets: the guest fails if `data` is absent.
    #[serde(default)]
    pub required: bool,
    /// Where the file goes; must be under `/run/secrets/`.
    #[serde(default = "default_secrets_path")]
    pub path: String,
    /// File mode (a number, e.g. 256 = 0o400).
    #[serde(default = "default_secrets_mode")]
    pub mode: u32,
    /// Owner; the workload's uid when absent.
    #[serde(default)]
    pub uid: Option<u32>,
    /// Group; the workload's gid when absent.
    #[serde(default)]
    pub gid: Option<u32>,
    /// The file's content in secrets format v1 (DESIGN §6).
    #[serde(default)]
    pub data: Option<SecretsData>,
}

/// Secret material. `Debug` prints a redaction marker and the length, never the value;
/// the buffer is zeroed on drop.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SecretsData(String);

impl SecretsData {
    /// Wraps secret material.
    pub fn new(value: String) -> Self {
        SecretsData(value)
    }

    /// The secret text. Callers must not log it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for SecretsData {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretsData(<redacted, {} bytes>)", self.0.len())
    }
}

impl Drop for SecretsData {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}
