//! The plfm guest protocol: the one definition of the wire between the node agent (host)
//! and `plfm-guest-init` (PID 1 in the microVM), DESIGN §6.
//!
//! The guest connects to the host (vsock CID 2, port [`GUEST_PORT`]; on the host this is
//! the hybrid-vsock Unix socket `<uds>_5161`) and the two sides exchange newline-delimited
//! JSON messages, each at most [`MAX_LINE_BYTES`] long:
//!
//! ```text
//! guest → host  hello {guest_init_version, protocol: 1, instance_id, boot_id}
//! host → guest  config {config_version: "v1", instance_id, generation, workload, network, mounts, root_layers, secrets}
//! guest → host  ack                       (or status/failed when the config is refused)
//! guest → host  status {event: config_applied | workload_started | exited | failed}
//! host → guest  stop {deadline_ms}        (any time after ack)
//! ```
//!
//! The workload's output travels on a second connection, to port [`LOG_PORT`]
//! (see [`LogMessage`]).
//!
//! Every message is a JSON object with a `type` field. Unknown fields are ignored so
//! that either side may add optional fields; a `hello` with another `protocol` number or
//! a `config` with another `config_version` is refused ([`ProtocolError::UnsupportedProtocol`],
//! [`ProtocolError::UnsupportedConfigVersion`]).
//!
//! The crate owns the message types and the framing. It must not do I/O policy
//! (deadlines, retries, what to do with an event): that belongs to the two ends. Secret
//! material is carried in [`SecretsData`], whose `Debug` never shows the value, and
//! decoding errors never echo message content.
#![warn(missing_docs)]
#![warn(clippy::undocumented_unsafe_blocks)]

pub mod disks;
pub mod exec;
mod frame;
mod logs;
mod message;
mod reason;

#[cfg(feature = "tokio")]
mod async_frame;

pub use disks::{disk_name, MAX_ROOT_LAYERS, MAX_VOLUMES};
pub use frame::{decode_line, encode_line, MessageReader, MessageWriter, ProtocolError};
pub use logs::{
    cut_line, dropped_marker, LogLine, LogMessage, LogStream, LOG_PORT, MAX_LOG_LINE_BYTES,
};
pub use message::{
    Config, GuestMessage, Hello, HostMessage, Ipv4Config, MountConfig, NetworkConfig,
    SecretsConfig, SecretsData, StatusEvent, WorkloadConfig, DEFAULT_SECRETS_PATH,
    LISTEN_WATCH_LIMIT_SECS,
};
pub use reason::FailureReason;

#[cfg(feature = "tokio")]
pub use async_frame::{AsyncMessageReader, AsyncMessageWriter};

/// Version of the handshake carried in `hello.protocol`.
pub const PROTOCOL_VERSION: u32 = 1;

/// Bytes guest init carries in its binary naming the handshake versions it speaks
/// (`plfm-guest-protocols:` then comma-separated numbers, then `;`), so the host can
/// tell what a guest init binary speaks without running it (it is an `/init`: running
/// it on the host is not an option). Read with [`protocols_in`].
pub const PROTOCOL_MARKER: [u8; 24] = *b"plfm-guest-protocols:1;\0";

/// The handshake versions named by the first [`PROTOCOL_MARKER`]-shaped marker in
/// `binary`, `None` when it has none (a guest init from before the marker, or not a
/// guest init at all).
pub fn protocols_in(binary: &[u8]) -> Option<Vec<u32>> {
    const PREFIX: &[u8] = b"plfm-guest-protocols:";
    let at = binary.windows(PREFIX.len()).position(|w| w == PREFIX)?;
    let rest = &binary[at + PREFIX.len()..];
    let end = rest.iter().take(64).position(|&b| b == b';')?;
    let list = std::str::from_utf8(&rest[..end]).ok()?;
    list.split(',').map(|n| n.parse().ok()).collect()
}

/// Version of the configuration carried in `config.config_version`.
pub const CONFIG_VERSION: &str = "v1";

/// The vsock port the guest connects to on the host.
pub const GUEST_PORT: u32 = 5161;

/// The vsock CID of the host.
pub const HOST_CID: u32 = 2;

/// Longest accepted message line in bytes, excluding the newline. Large enough for a
/// config carrying a 256 KiB secrets file after JSON escaping, small enough that a
/// misbehaving peer cannot make the other side buffer without bound.
pub const MAX_LINE_BYTES: usize = 1024 * 1024;

#[cfg(test)]
mod marker_tests {
    use super::*;

    #[test]
    fn the_marker_names_this_protocol_version() {
        assert_eq!(protocols_in(&PROTOCOL_MARKER), Some(vec![PROTOCOL_VERSION]));
        let mut bin = vec![0x7f, b'E', b'L', b'F', 0, 1];
        bin.extend_from_slice(b"plfm-guest-protocols:1,2;");
        assert_eq!(protocols_in(&bin), Some(vec![1, 2]));
        assert_eq!(protocols_in(b"no marker here"), None);
        assert_eq!(protocols_in(b"plfm-guest-protocols:x;"), None);
        assert_eq!(protocols_in(b"plfm-guest-protocols:1"), None);
    }
}

#[cfg(test)]
mod tests;
