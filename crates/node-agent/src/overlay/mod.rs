//! The node's WireGuard overlay (DESIGN §8a, issue 14): the configuration (parsed and
//! validated peer by peer, diffed against what is applied), the userspace API text
//! protocol (requests to apply a diff, answers read back for the drift check and the
//! overlay table), the device with its two backends on one configuration path
//! (`wireguard-go` over its UAPI socket, [`kernel`] WireGuard over generic netlink; the
//! interface's address and routes), the `[overlay]` config section, and the daemon's
//! one owner of the interface ([`owner`]: sources, last good configuration, drift
//! check) with the snapshot it publishes ([`status`]: local API, CLI, heartbeat,
//! metrics). The daemon starts the owner (`crate::agent`). Ingress and egress are not
//! here (`crate::network`).
//!
//! This module must never log or return the private key.

pub mod config;
#[cfg(target_os = "linux")]
pub mod device;
pub mod kernel;
pub mod owner;
pub mod settings;
pub mod status;
pub mod uapi;
