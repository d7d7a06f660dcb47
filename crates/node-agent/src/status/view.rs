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
