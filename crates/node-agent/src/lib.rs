//! The plfm node agent: the daemon on every host of the microVM platform that takes the
//! instances the control plane assigns to this host and runs each as a microVM, reporting
//! every status transition back (see `shared/DESIGN.md`).
//!
//! The library does the work; the `plfm-node-agent` binary parses arguments and calls it.
#![warn(missing_docs)]
#![warn(clippy::undocumented_unsafe_blocks)]

pub mod image;
pub mod instance;
