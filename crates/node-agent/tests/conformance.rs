//! The runtime conformance suite: one list of scenarios, run against the mock, qemu
//! and Firecracker (stand-in) runtimes through the agent binary. See
//! `tests/conformance/mod.rs`.
#![cfg(target_os = "linux")]

mod common;
mod fc_standin;
mod image_support;
#[path = "support/vm_host.rs"]
mod vm_host;

#[path = "conformance/mod.rs"]
mod conformance;
