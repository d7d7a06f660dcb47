//! The node's WireGuard overlay (DESIGN §8a), being built (issue 14): so far the
//! configuration (parsed and validated peer by peer, diffed against what is applied),
//! the userspace API text protocol (requests to apply a diff, answers read back for
//! the drift check and the overlay table) and the userspace device (`wireguard-go`,
//! its UAPI socket, the interface's address and routes). The kernel backend, the owner
//! task with its drift timer, ingress and egress are not here yet, and the daemon does
//! not call this module.
//!
//! This module must never log or return the private key.

pub mod config;
#[cfg(target_os = "linux")]
pub mod device;
pub mod uapi;
