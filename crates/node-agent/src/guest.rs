//! Host side of the guest handshake (DESIGN §6): one listener per VM on the VM's
//! hybrid-vsock Unix socket `<uds>_5161` (guest-initiated connections, Firecracker's
//! convention, also used by `vhost-device-vsock`), the `hello → config → ack` exchange,
//! and the guest's status events afterwards.
//!
//! The contract: the caller binds the listener with [`bind_guest_listener`] before it
//! starts the VMM (the guest connects once, early, and retries only for 5 s), calls
//! [`accept_guest`] with the instance id the VM must announce and its config, and then
//! polls [`GuestSession::next_event`] (cancel-safe, so it can sit in a `select!` next to
//! a stop request, a VMM exit or a timer). Every error carries its reason code through
//! [`GuestError::reason`], the one place that maps guest-channel errors to reason codes.
//!
//! This module must not start or stop VMMs, change instance statuses or log the config:
//! the config carries secrets ([`plfm_guest_protocol::SecretsData`] redacts itself in
//! `Debug`, and nothing here formats the config anyway).

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use plfm_guest_protocol::{
    AsyncMessageReader, AsyncMessageWriter, Config, FailureReason, GuestMessage, Hello,
    HostMessage, ProtocolError, StatusEvent, GUEST_PORT,
};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixListener;
use tokio::time::{timeout, timeout_at, Instant};

use crate::instance::ReasonCode;

/// How long [`GuestSession::request_stop`] may take to hand the request to the socket.
pub const STOP_SEND_TIMEOUT: Duration = Duration::from_secs(2);

/// The Unix socket path on which guest-initiated vsock connections to port 5161 arrive,
/// for a VM whose vsock device uses `vsock_uds` (`<vsock_uds>_5161`).
pub fn guest_socket_path(vsock_uds: &Path) -> PathBuf {
    let mut s = vsock_uds.as_os_str().to_owned();
    s.push(format!("_{GUEST_PORT}"));
    PathBuf::from(s)
}

/// Binds the guest listener for a VM whose vsock device uses `vsock_uds`, removing a
/// stale socket file left by an earlier run. Must be called inside a tokio runtime.
pub fn bind_guest_listener(vsock_uds: &Path) -> io::Result<UnixListener> {
    let path = guest_socket_path(vsock_uds);
    match std::fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    UnixListener::bind(&path)
}

/// Errors of the guest channel.
#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    /// The handshake did not complete before its deadline.
    #[error("guest handshake did not complete within {after:?} (no {waiting_for} from the guest)")]
    HandshakeTimeout {
        /// What was awaited.
        waiting_for: &'static str,
        /// The deadline.
        after: Duration,
    },
    /// Accepting on the guest socket failed.
    #[error("accept on the guest socket: {0}")]
    Accept(#[source] io::Error),
    /// The guest closed the channel.
    #[error("guest closed the channel {when}")]
    Closed {
        /// When it happened ("before hello", "before ack", "after ack").
        when: &'static str,
    },
    /// Framing, decoding or protocol version error (also i/o on the socket).
    #[error("guest channel: {0}")]
    Protocol(#[from] ProtocolError),
    /// The guest announced another instance.
    #[error("guest hello for instance {got:?} refused: this VM runs instance {expected:?}")]
    WrongInstance {
        /// The instance this VM runs.
        expected: String,
        /// The instance the guest announced.
        got: String,
    },
    /// A message out of sequence.
    #[error("guest sent {got} while {expected} was expected")]
    Unexpected {
        /// What was expected.
        expected: &'static str,
        /// What arrived.
        got: &'static str,
    },
    /// The guest refused the config or could not apply it.
    #[error("guest failed ({reason}): {detail}")]
    GuestFailed {
        /// The guest's reason.
        reason: FailureReason,
        /// The guest's one-line detail.
        detail: String,
    },
    /// Writing the stop request did not finish in time.
    #[error("stop request not accepted by the guest socket within {0:?}")]
    StopTimeout(Duration),
}

impl GuestError {
    /// The reason code of this error: the one mapping from guest-channel errors to the
    /// closed set of DESIGN §2. Everything that keeps the VM from reaching (or keeping)
    /// its handshake is `firecracker_start_failed` (used for every VMM kind); a failure
    /// reported by the guest carries its own reason.
    pub fn reason(&self) -> ReasonCode {
        match self {
            GuestError::HandshakeTimeout { .. }
            | GuestError::Accept(_)
            | GuestError::Closed { .. }
            | GuestError::Protocol(_)
            | GuestError::WrongInstance { .. }
            | GuestError::Unexpected { .. }
            | GuestError::StopTimeout(_) => ReasonCode::FirecrackerStartFailed,
            GuestError::GuestFailed { reason, .. } => failure_reason_code(*reason),
        }
    }
}

/// The agent's reason code for a guest failure reason (same wire name).
pub fn failure_reason_code(reason: FailureReason) -> ReasonCode {
    match reason {
        FailureReason::FirecrackerStartFailed => ReasonCode::FirecrackerStartFailed,
        FailureReason::RootfsBuildFailed => ReasonCode::RootfsBuildFailed,
        FailureReason::NetworkSetupFailed => ReasonCode::NetworkSetupFailed,
        FailureReason::VolumeAttachFailed => ReasonCode::VolumeAttachFailed,
        FailureReason::SecretsMissing => ReasonCode::SecretsMissing,
        FailureReason::SecretsInjectionFailed => ReasonCode::SecretsInjectionFailed,
        FailureReason::OomKilled => ReasonCode::OomKilled,
    }
}

/// A status event from the guest, after `ack`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestEvent {
    /// Disks, network, secrets and volumes are in place.
    ConfigApplied,
    /// The workload runs (health checks may begin).
    WorkloadStarted {
        /// Its pid in the guest.
        pid: u32,
        /// Guest init start → workload exec, when reported.
        init_time: Option<Duration>,
        /// Part of `init_time` spent waiting for the host.
        handshake_wait: Option<Duration>,
    },
    /// The workload ended; the VM ends next.
    Exited {
        /// Exit status.
        code: Option<i32>,
        /// Terminating signal.
        signal: Option<i32>,
        /// The guest kernel OOM-killed a process meanwhile.
        oom_killed: bool,
    },
    /// The guest failed; the VM ends next.
    Failed {
        /// Reason code.
        reason: ReasonCode,
        /// One-line detail from the guest.
        detail: String,
    },
    /// A TCP socket listens on the health check's port (the workload can answer).
    Listening {
        /// The port.
        port: u16,
    },
    /// An event this agent does not know (a newer guest init): ignored.
    Unknown,
}

impl GuestEvent {
    /// The reason code the event implies, if any: `oom_killed` for an OOM exit, the
    /// guest's reason for a failure. A plain exit has none (its exit code and the restart
    /// policy decide).
    pub fn reason(&self) -> Option<ReasonCode> {
        match self {
            GuestEvent::Exited {
                oom_killed: true, ..
            } => Some(ReasonCode::OomKilled),
            GuestEvent::Failed { reason, .. } => Some(*reason),
            _ => None,
        }
    }

    fn from_status(ev: StatusEvent) -> GuestEvent {
        match ev {
            StatusEvent::ConfigApplied => GuestEvent::ConfigApplied,
            StatusEvent::WorkloadStarted {
                pid,
                init_us,
                handshake_wait_us,
            } => GuestEvent::WorkloadStarted {
                pid,
                init_time: init_us.map(Duration::from_micros),
                handshake_wait: handshake_wait_us.map(Duration::from_micros),
            },
            StatusEvent::Exited {
                code,
                signal,
                oom_killed,
            } => GuestEvent::Exited {
                code,
                signal,
                oom_killed,
            },
            StatusEvent::Failed { reason, detail } => GuestEvent::Failed {
                reason: failure_reason_code(reason),
                detail: guest_text(&detail),
            },
            StatusEvent::Listening { port } => GuestEvent::Listening { port },
            StatusEvent::Unknown => GuestEvent::Unknown,
        }
    }
}

/// Longest guest-supplied text the host keeps (in logs, errors, status messages).
pub const GUEST_TEXT_MAX: usize = 256;

/// A guest-supplied string as the host may log or store it: at most
/// [`GUEST_TEXT_MAX`] characters, control characters escaped, and the original
/// length said when it was cut. A guest controls these strings (up to a frame's size).
pub fn guest_text(s: &str) -> String {
    let mut out: String = s
        .chars()
        .take(GUEST_TEXT_MAX)
        .flat_map(|c| {
            let esc: Vec<char> = if c.is_control() {
                c.escape_default().collect()
            } else {
                vec![c]
            };
            esc
        })
        .collect();
    if s.chars().count() > GUEST_TEXT_MAX {
        out.push_str(&format!("… ({} bytes)", s.len()));
    }
    out
}

fn kind(msg: &GuestMessage) -> &'static str {
    match msg {
        GuestMessage::Hello(_) => "hello",
        GuestMessage::Ack => "ack",
        GuestMessage::Status(StatusEvent::ConfigApplied) => "status/config_applied",
        GuestMessage::Status(StatusEvent::WorkloadStarted { .. }) => "status/workload_started",
        GuestMessage::Status(StatusEvent::Exited { .. }) => "status/exited",
        GuestMessage::Status(StatusEvent::Failed { .. }) => "status/failed",
        GuestMessage::Status(StatusEvent::Listening { .. }) => "status/listening",
        GuestMessage::Status(StatusEvent::Unknown) => "status/unknown",
    }
}

/// An established guest channel (after `ack`).
#[derive(Debug)]
pub struct GuestSession {
    reader: AsyncMessageReader<OwnedReadHalf>,
    writer: AsyncMessageWriter<OwnedWriteHalf>,
    hello: Hello,
}

/// Accepts the VM's guest connection and runs the handshake: waits for `hello`, refuses
/// another instance id or protocol version, sends `config`, waits for `ack`. The whole
/// exchange must finish within `handshake_deadline`. A guest that answers the config
/// with `status/failed` yields [`GuestError::GuestFailed`] with the guest's reason.
pub async fn accept_guest(
    listener: &UnixListener,
    expected_instance_id: &str,
    config: Config,
    handshake_deadline: Duration,
) -> Result<GuestSession, GuestError> {
    let deadline = Instant::now() + handshake_deadline;
    let timed_out = |waiting_for| GuestError::HandshakeTimeout {
        waiting_for,
        after: handshake_deadline,
    };
    let (stream, _) = timeout_at(deadline, listener.accept())
        .await
        .map_err(|_| timed_out("connection"))?
        .map_err(GuestError::Accept)?;
    let (r, w) = stream.into_split();
    let mut reader = AsyncMessageReader::new(r);
    let mut writer = AsyncMessageWriter::new(w);

    let hello = match timeout_at(deadline, reader.read_message::<GuestMessage>())
        .await
        .map_err(|_| timed_out("hello"))??
    {
        Some(GuestMessage::Hello(h)) => h,
        Some(other) => {
            return Err(GuestError::Unexpected {
                expected: "hello",
                got: kind(&other),
            })
        }
        None => {
            return Err(GuestError::Closed {
                when: "before hello",
            })
        }
    };
    if let Err(e) = hello.check_protocol() {
        tracing::warn!(instance_id = expected_instance_id, error = %e, "refusing guest hello");
        return Err(e.into());
    }
    if hello.instance_id != expected_instance_id {
        let got = guest_text(&hello.instance_id);
        tracing::warn!(
            instance_id = expected_instance_id,
            announced = %got,
            "refusing guest hello for another instance"
        );
        return Err(GuestError::WrongInstance {
            expected: expected_instance_id.to_string(),
            got,
        });
    }

    timeout_at(deadline, writer.write_message(&HostMessage::Config(config)))
        .await
        .map_err(|_| timed_out("read of the config"))??;

    match timeout_at(deadline, reader.read_message::<GuestMessage>())
        .await
        .map_err(|_| timed_out("ack"))??
    {
        Some(GuestMessage::Ack) => {}
        Some(GuestMessage::Status(StatusEvent::Failed { reason, detail })) => {
            return Err(GuestError::GuestFailed {
                reason,
                detail: guest_text(&detail),
            })
        }
        Some(other) => {
            return Err(GuestError::Unexpected {
                expected: "ack",
                got: kind(&other),
            })
        }
        None => return Err(GuestError::Closed { when: "before ack" }),
    }
    tracing::info!(
        instance_id = expected_instance_id,
        boot_id = %guest_text(&hello.boot_id),
        guest_init_version = %guest_text(&hello.guest_init_version),
        "guest handshake complete"
    );
    Ok(GuestSession {
        reader,
        writer,
        hello,
    })
}

impl GuestSession {
    /// The guest's `hello`. `hello().resumed` is true when a running guest reconnected
    /// (e.g. after an agent restart): its config was not applied again, and its first
    /// event is `WorkloadStarted` for the workload that is already running.
    pub fn hello(&self) -> &Hello {
        &self.hello
    }

    /// The next status event. Cancel-safe: dropping the future loses no event. It has no
    /// deadline of its own (a workload may run for months); callers bound it with their
    /// own timers. The end of the channel is [`GuestError::Closed`].
    pub async fn next_event(&mut self) -> Result<GuestEvent, GuestError> {
        match self.reader.read_message::<GuestMessage>().await? {
            Some(GuestMessage::Status(ev)) => Ok(GuestEvent::from_status(ev)),
            Some(other) => Err(GuestError::Unexpected {
                expected: "status",
                got: kind(&other),
            }),
            None => Err(GuestError::Closed { when: "after ack" }),
        }
    }

    /// Asks the guest to stop: SIGTERM to the workload now, SIGKILL to everything after
    /// `deadline`. The outcome arrives as an [`GuestEvent::Exited`] event. Takes at most
    /// [`STOP_SEND_TIMEOUT`].
    pub async fn request_stop(&mut self, deadline: Duration) -> Result<(), GuestError> {
        let msg = HostMessage::Stop {
            deadline_ms: u64::try_from(deadline.as_millis()).unwrap_or(u64::MAX),
        };
        timeout(STOP_SEND_TIMEOUT, self.writer.write_message(&msg))
            .await
            .map_err(|_| GuestError::StopTimeout(STOP_SEND_TIMEOUT))??;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn guest_text_is_cut_and_escaped() {
        let long = "x".repeat(1 << 20);
        let t = super::guest_text(&long);
        assert!(t.len() < super::GUEST_TEXT_MAX + 32, "{}", t.len());
        assert!(t.ends_with("(1048576 bytes)"), "{t}");
        assert_eq!(super::guest_text("a\nb\x1b[2J"), "a\\nb\\u{1b}[2J");
        assert_eq!(super::guest_text("ok"), "ok");
    }

    use super::*;

    #[test]
    fn guest_socket_is_the_hybrid_vsock_port_path() {
        assert_eq!(
            guest_socket_path(Path::new("/var/lib/plfm/instances/i/v.sock")),
            PathBuf::from("/var/lib/plfm/instances/i/v.sock_5161")
        );
    }

    #[test]
    fn every_guest_failure_reason_maps_to_the_same_named_reason_code() {
        for r in FailureReason::ALL {
            assert_eq!(failure_reason_code(r).as_str(), r.as_str());
        }
    }

    #[test]
    fn handshake_errors_are_vmm_start_failures() {
        let e = GuestError::HandshakeTimeout {
            waiting_for: "hello",
            after: Duration::from_secs(5),
        };
        assert_eq!(e.reason(), ReasonCode::FirecrackerStartFailed);
        assert_eq!(
            GuestError::Closed { when: "before ack" }.reason(),
            ReasonCode::FirecrackerStartFailed
        );
        let e = GuestError::GuestFailed {
            reason: FailureReason::VolumeAttachFailed,
            detail: "x".into(),
        };
        assert_eq!(e.reason(), ReasonCode::VolumeAttachFailed);
    }

    #[test]
    fn oom_exit_implies_oom_killed() {
        let ev = GuestEvent::Exited {
            code: None,
            signal: Some(9),
            oom_killed: true,
        };
        assert_eq!(ev.reason(), Some(ReasonCode::OomKilled));
        let ev = GuestEvent::Exited {
            code: Some(3),
            signal: None,
            oom_killed: false,
        };
        assert_eq!(ev.reason(), None);
    }
}
