//! The plfm node agent: the daemon on every host of the microVM platform that takes the
//! instances the control plane assigns to this host and runs each as a microVM, reporting
//! every status transition back (see `shared/DESIGN.md`).
//!
//! The library does the work; the `plfm-node-agent` binary parses arguments and calls it.
//! Map of the crate: [`spec`] and [`config`] are the boundary types; [`reconciler`]
//! decides; [`supervisor`] runs one actor per instance; [`runtime`] is the VMM seam;
//! [`status`] owns statuses (delivery in [`status::outbox`], the API's view in
//! [`status::view`]); [`state`] is the SQLite store;
//! [`control_plane`] brings desired state in; [`api`] and [`cli`] face operators.
#![warn(missing_docs)]
#![warn(clippy::undocumented_unsafe_blocks)]

pub mod agent;
pub mod api;
pub mod cgroup;
pub mod cli;
pub mod clock;
pub mod config;
pub mod control_plane;
pub mod enroll;
pub mod exec;
pub mod guest;
pub mod guest_artifacts;
pub mod health;
pub mod identity;
pub mod image;
pub mod initramfs;
pub mod instance;
pub mod logs;
pub mod logstore;
pub mod metrics;
#[cfg(target_os = "linux")]
pub mod network;
pub mod overlay;
pub mod reconciler;
pub mod restart;
pub mod runtime;
pub mod secrets;
pub mod spec;
pub mod state;
pub mod status;
pub mod supervisor;
pub mod systemd;
#[cfg(test)]
mod testing;
pub mod vmlinux;
