//! The node's WireGuard overlay (DESIGN §8a), being built (issue 14): so far the
//! configuration (parsed and validated peer by peer, diffed against what is applied)
//! and the userspace API text protocol (requests to apply a diff, answers read back for
//! the drift check and the overlay table). The interface owner, the backends, ingress
//! and egress are not here yet, and nothing in the agent calls this module.
//!
//! This module must never log or return the private key.

pub mod config;
pub mod uapi;
