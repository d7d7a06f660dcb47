//! The guest end of the host channel: connect (vsock, or a Unix socket in test mode)
//! with a deadline and retries, then blocking message exchange. Reads during the
//! handshake are bounded by the socket receive timeout; after it, [`Channel::poll_message`]
//! never blocks, so the supervision loop can poll the socket next to its signals.
//!
//! When the channel is lost while the workload runs (the agent restarted),
//! [`spawn_reconnect`] keeps trying in a background thread to connect again, says
//! `hello {resumed: true}`, accepts (and ignores) the config, answers `ack` and reports
//! `workload_started` again, then hands the channel back to the supervision loop.

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use nix::sys::socket::{self, sockopt, AddressFamily, MsgFlags, SockFlag, SockType, VsockAddr};
use nix::sys::time::TimeVal;
use plfm_guest_protocol::{
    GuestMessage, Hello, HostMessage, MessageReader, MessageWriter, ProtocolError, StatusEvent,
};

use crate::settings::HostChannel;

/// Longest a single message write may block.
pub const SEND_TIMEOUT: Duration = Duration::from_secs(5);

/// Pause between reconnection attempts after the channel was lost.
pub const RECONNECT_INTERVAL: Duration = Duration::from_secs(1);

/// Deadline of a reconnection handshake (connect to config).
pub const RECONNECT_HANDSHAKE: Duration = Duration::from_secs(5);

/// Pause between connection attempts.
pub const RETRY_INTERVAL: Duration = Duration::from_millis(50);

/// Socket reader that can switch between blocking and non-blocking receives without
/// changing the descriptor's flags (writes stay blocking).
#[derive(Debug)]
pub struct SocketReader {
    fd: OwnedFd,
    nonblocking: bool,
}

impl Read for SocketReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let flags = if self.nonblocking {
            MsgFlags::MSG_DONTWAIT
        } else {
            MsgFlags::empty()
        };
        socket::recv(self.fd.as_raw_fd(), buf, flags).map_err(io::Error::from)
    }
}

/// A connected channel.
#[derive(Debug)]
pub struct Channel {
    reader: MessageReader<SocketReader>,
    writer: MessageWriter<File>,
}

/// One connection attempt to `target` (vsock, or a Unix socket in test mode).
pub fn connect_once(target: &HostChannel) -> io::Result<OwnedFd> {
    match target {
        HostChannel::Unix(path) => Ok(OwnedFd::from(UnixStream::connect(path)?)),
        HostChannel::Vsock { cid, port } => {
            let fd = socket::socket(
                AddressFamily::Vsock,
                SockType::Stream,
                SockFlag::SOCK_CLOEXEC,
                None,
            )?;
            socket::connect(fd.as_raw_fd(), &VsockAddr::new(*cid, *port))?;
            Ok(fd)
        }
    }
}

impl Channel {
    /// Connects, retrying every [`RETRY_INTERVAL`] until `deadline`.
    pub fn connect(target: &HostChannel, deadline: Instant) -> Result<Channel, String> {
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            match connect_once(target) {
                Ok(fd) => return Channel::from_fd(fd).map_err(|e| format!("host channel: {e}")),
                Err(e) => {
                    if Instant::now() + RETRY_INTERVAL >= deadline {
                        return Err(format!(
                            "no connection to the host at {} after {attempts} attempts (last error: {e})",
                            describe(target)
                        ));
                    }
                    std::thread::sleep(RETRY_INTERVAL);
                }
            }
        }
    }

    fn from_fd(fd: OwnedFd) -> io::Result<Channel> {
        // Writes are small, but a host that stops reading must not hang PID 1.
        let tv = TimeVal::new(SEND_TIMEOUT.as_secs() as libc::time_t, 0);
        socket::setsockopt(&fd, sockopt::SendTimeout, &tv)?;
        let write_fd = fd.try_clone()?;
        Ok(Channel {
            reader: MessageReader::new(SocketReader {
                fd,
                nonblocking: false,
            }),
            writer: MessageWriter::new(File::from(write_fd)),
        })
    }

    /// Sends a message.
    pub fn send(&mut self, msg: &GuestMessage) -> Result<(), ProtocolError> {
        self.writer.write_message(msg)
    }

    /// Blocks for the next host message until `deadline`. `Ok(None)`: the host closed.
    pub fn recv_until(&mut self, deadline: Instant) -> Result<Option<HostMessage>, String> {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err("timed out waiting for the host".into());
            }
            let tv = TimeVal::new(
                left.as_secs() as libc::time_t,
                (left.subsec_micros().max(1)) as libc::suseconds_t,
            );
            socket::setsockopt(&self.reader.get_ref().fd, sockopt::ReceiveTimeout, &tv)
                .map_err(|e| format!("set receive timeout: {e}"))?;
            match self.reader.read_message::<HostMessage>() {
                Ok(m) => return Ok(m),
                Err(e) if e.is_timeout() => continue,
                Err(e) => return Err(e.to_string()),
            }
        }
    }

    /// Ends the channel after the last message (the workload's end): waits until
    /// `deadline` for the host to close its end, reading and ignoring whatever it
    /// still sends, then closes. The host closes once it has read a terminal status,
    /// and it reads in order, so a close means the status arrived. Without this wait
    /// the VM could end while the status was still inside the VMM's vsock device
    /// (seen with QEMU's vhost-user vsock: the host got the VMM's exit, not the
    /// workload's exit code). Returns whether the host closed in time.
    pub fn close_after_delivery(mut self, deadline: Instant) -> bool {
        self.reader.get_mut().nonblocking = false;
        loop {
            match self.recv_until(deadline) {
                Ok(Some(_)) => continue,
                Ok(None) => return true,
                // Past the deadline it timed out; before it, the error is a reset:
                // the host (or its vsock device) closing too.
                Err(_) => return Instant::now() < deadline,
            }
        }
    }

    /// Switches reads to non-blocking mode for [`Channel::poll_message`].
    pub fn set_nonblocking_reads(&mut self) {
        self.reader.get_mut().nonblocking = true;
    }

    /// The next message if a complete one is available, without blocking.
    /// `Ok(Some(None))` means the host closed the channel.
    pub fn poll_message(&mut self) -> Result<Option<Option<HostMessage>>, ProtocolError> {
        match self.reader.read_message::<HostMessage>() {
            Ok(m) => Ok(Some(m)),
            Err(e) if e.is_timeout() => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// True when a complete message is buffered (poll would not report it).
    pub fn has_buffered_message(&self) -> bool {
        self.reader.has_buffered_line()
    }

    /// The socket, for poll(2).
    pub fn as_fd(&self) -> BorrowedFd<'_> {
        self.reader.get_ref().fd.as_fd()
    }
}

/// Human name of a channel target for console lines.
pub fn describe(target: &HostChannel) -> String {
    match target {
        HostChannel::Vsock { cid, port } => format!("vsock CID {cid} port {port}"),
        HostChannel::Unix(p) => format!("unix socket {}", p.display()),
    }
}

/// Starts a thread that reconnects to the host every [`RECONNECT_INTERVAL`] until one
/// resumed handshake succeeds, and delivers that channel on the returned receiver. The
/// thread ends after delivering (or with the process). `hello` is sent with
/// `resumed: true`; `workload_pid` is reported in the repeated `workload_started`.
pub fn spawn_reconnect(
    target: HostChannel,
    mut hello: Hello,
    workload_pid: u32,
) -> mpsc::Receiver<Channel> {
    hello.resumed = true;
    let (tx, rx) = mpsc::channel();
    let spawned = std::thread::Builder::new()
        .name("reconnect".into())
        .spawn(move || loop {
            std::thread::sleep(RECONNECT_INTERVAL);
            let Ok(mut ch) = Channel::connect(&target, Instant::now()) else {
                continue;
            };
            if ch.send(&GuestMessage::Hello(hello.clone())).is_err() {
                continue;
            }
            match ch.recv_until(Instant::now() + RECONNECT_HANDSHAKE) {
                Ok(Some(HostMessage::Config(c))) if c.instance_id == hello.instance_id => {}
                _ => continue,
            }
            let started = GuestMessage::Status(StatusEvent::WorkloadStarted {
                pid: workload_pid,
                init_us: None,
                handshake_wait_us: None,
            });
            if ch.send(&GuestMessage::Ack).is_err() || ch.send(&started).is_err() {
                continue;
            }
            let _ = tx.send(ch);
            return;
        });
    if let Err(e) = spawned {
        crate::console::line(&format!("cannot start the reconnect thread: {e}"));
    }
    rx
}
