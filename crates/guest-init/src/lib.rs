//! plfm guest init: PID 1 of every plfm microVM (DESIGN §6).
//!
//! It turns a bare VM into a running workload: pseudo-filesystems, kernel modules from
//! the initramfs, the handshake with the node agent over vsock, the overlay root on the
//! read-only root disk and the scratch disk, tmpfs, eth0, the secrets file, volumes, and
//! finally the workload, whose signals it forwards and whose exit it reports before
//! ending the VM with `reboot(RB_AUTOBOOT)`.
//!
//! The pure decisions (what to mount where, which paths are reserved, the environment,
//! the secrets file, the module order, netlink messages, settings) live in their own
//! modules and are unit-tested; [`sys`] holds the few raw system calls; [`init`] runs the
//! sequence. A *container test mode* (see [`settings`]) runs the same sequence as PID 1 of
//! a PID + mount namespace with loop devices and a Unix socket instead of a VM.
#![warn(missing_docs)]
#![warn(clippy::undocumented_unsafe_blocks)]

pub mod channel;
pub mod console;
pub mod env;
pub mod exec;
pub mod init;
pub mod logs;
pub mod modules;
pub mod mounts;
pub mod netlink;
pub mod secrets;
pub mod settings;
pub mod sys;
pub mod workload;

/// Version reported in `hello.guest_init_version`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
