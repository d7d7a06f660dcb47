//! Exec session framing: the one wire format of an exec session, spoken by the
//! platform's exec gateway to the agent (TCP), by the CLI to the agent (after an HTTP
//! upgrade on the local API), and by the agent to guest init (vsock port [`EXEC_PORT`]).
//!
//! A frame is a 4-byte big-endian length `n`, then `n` bytes: one type byte and the
//! payload (so `n ≥ 1`). Types:
//!
//! ```text
//! 0x20 init     JSON ExecInit       client → guest, first frame, once
//! 0x01 stdin    bytes               client → guest (an empty payload is ignored)
//! 0x02 stdout   bytes               guest → client
//! 0x03 stderr   bytes               guest → client
//! 0x10 control  JSON ExecControl    client → guest: resize | signal | close
//! 0x11 exit     JSON ExecExit       guest → client, last frame
//! ```
//!
//! `close` closes the command's standard input (end of file); a client ends a session
//! early by closing its connection (guest init then sends SIGHUP, SIGTERM after 5 s and
//! SIGKILL after 30 s). The framing is hand-written: it is five lines over `Read`/`Write`
//! and no crate implements this particular format.
//!
//! This module owns the frame format and the JSON bodies; it must not do I/O policy.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};

use serde::{Deserialize, Serialize};

/// The vsock port guest init serves exec sessions on.
pub const EXEC_PORT: u32 = 5162;

/// Largest accepted frame (type byte + payload). Data frames are written in chunks of
/// at most [`MAX_DATA`] bytes; init and control bodies are small.
pub const MAX_FRAME: usize = 1024 * 1024;

/// Largest payload a side puts in one stdin/stdout/stderr frame.
pub const MAX_DATA: usize = 32 * 1024;

/// Frame types.
pub mod kind {
    /// Standard input bytes.
    pub const STDIN: u8 = 0x01;
    /// Standard output bytes.
    pub const STDOUT: u8 = 0x02;
    /// Standard error bytes.
    pub const STDERR: u8 = 0x03;
    /// JSON control message.
    pub const CONTROL: u8 = 0x10;
    /// JSON exit message; last frame.
    pub const EXIT: u8 = 0x11;
    /// JSON session init; first frame.
    pub const INIT: u8 = 0x20;
}

/// The first frame of a session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecInit {
    /// Chosen by the client; appears in the audit log.
    #[serde(default)]
    pub session_id: String,
    /// The instance the client means (checked by the agent and by guest init).
    pub instance_id: String,
    /// Program and arguments (no shell is added).
    pub command: Vec<String>,
    /// Run under a pseudo-terminal.
    #[serde(default)]
    pub tty: bool,
    /// Terminal width (with `tty`).
    #[serde(default)]
    pub cols: u16,
    /// Terminal height (with `tty`).
    #[serde(default)]
    pub rows: u16,
    /// Extra environment, on top of the workload's.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// The client sends standard input; without it the command's stdin is empty.
    #[serde(default)]
    pub stdin: bool,
}

/// A control message (frame `0x10`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ExecControl {
    /// The terminal changed size.
    Resize {
        /// Width.
        cols: u16,
        /// Height.
        rows: u16,
    },
    /// Deliver a signal to the command (`INT`, `TERM`, `KILL`, `HUP`).
    Signal {
        /// Signal name without `SIG`.
        signal: String,
    },
    /// Close the command's standard input.
    Close,
}

/// Why a session ended (frame `0x11`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EndReason {
    /// The command exited by itself.
    Exited,
    /// The command was killed by a signal.
    Killed,
    /// The session reached its time limit.
    Timeout,
    /// The guest could not be reached.
    ConnectTimeout,
    /// The client went away.
    ClientDisconnect,
    /// An operator (or the instance stopping) ended it.
    OperatorRevoked,
    /// Refused: the instance has its maximum of sessions already.
    Limit,
    /// Refused before it started: instance unknown or not ready, bad init, no guest.
    Refused,
}

impl EndReason {
    /// Every end reason.
    pub const ALL: [EndReason; 8] = [
        EndReason::Exited,
        EndReason::Killed,
        EndReason::Timeout,
        EndReason::ConnectTimeout,
        EndReason::ClientDisconnect,
        EndReason::OperatorRevoked,
        EndReason::Limit,
        EndReason::Refused,
    ];

    /// The snake_case name on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            EndReason::Exited => "exited",
            EndReason::Killed => "killed",
            EndReason::Timeout => "timeout",
            EndReason::ConnectTimeout => "connect_timeout",
            EndReason::ClientDisconnect => "client_disconnect",
            EndReason::OperatorRevoked => "operator_revoked",
            EndReason::Limit => "limit",
            EndReason::Refused => "refused",
        }
    }
}

/// The last frame of a session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecExit {
    /// The command's exit code (128 + signal when killed); `None` when it never ran.
    pub exit_code: Option<i32>,
    /// Why the session ended.
    pub reason: EndReason,
    /// A sentence for the user when the session was refused or failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

impl ExecExit {
    /// A refusal with its message.
    pub fn refused(message: impl Into<String>) -> ExecExit {
        ExecExit {
            exit_code: None,
            reason: EndReason::Refused,
            message: Some(message.into()),
        }
    }

    /// A refusal for the session limit.
    pub fn limit(message: impl Into<String>) -> ExecExit {
        ExecExit {
            exit_code: None,
            reason: EndReason::Limit,
            message: Some(message.into()),
        }
    }
}

/// One frame: type byte and payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// See [`kind`].
    pub kind: u8,
    /// Bytes or JSON.
    pub payload: Vec<u8>,
}

impl Frame {
    /// A frame with a JSON body.
    pub fn json<T: Serialize>(kind: u8, body: &T) -> Frame {
        Frame {
            kind,
            // Serializing these plain structs cannot fail.
            payload: serde_json::to_vec(body).unwrap_or_default(),
        }
    }

    /// The JSON body of this frame.
    pub fn parse<T: for<'de> Deserialize<'de>>(&self) -> Result<T, io::Error> {
        serde_json::from_slice(&self.payload).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("exec frame 0x{:02x}: bad JSON body: {e}", self.kind),
            )
        })
    }

    /// The encoded bytes (length, type, payload).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(5 + self.payload.len());
        out.extend_from_slice(&((self.payload.len() + 1) as u32).to_be_bytes());
        out.push(self.kind);
        out.extend_from_slice(&self.payload);
        out
    }
}

fn check_len(n: u32) -> io::Result<usize> {
    let n = n as usize;
    if n == 0 || n > MAX_FRAME {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("exec frame length {n} outside 1..={MAX_FRAME}"),
        ));
    }
    Ok(n)
}

/// Reads one frame; `Ok(None)` on a clean end of stream before a frame starts.
pub fn read_frame<R: Read>(r: &mut R) -> io::Result<Option<Frame>> {
    let mut len = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        match r.read(&mut len[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    let n = check_len(u32::from_be_bytes(len))?;
    let mut body = vec![0u8; n];
    r.read_exact(&mut body)?;
    let kind = body.remove(0);
    Ok(Some(Frame {
        kind,
        payload: body,
    }))
}

/// Writes one frame.
pub fn write_frame<W: Write>(w: &mut W, frame: &Frame) -> io::Result<()> {
    w.write_all(&frame.encode())?;
    w.flush()
}

/// Async reading and writing of frames (host side).
#[cfg(feature = "tokio")]
pub mod nonblocking {
    use super::{check_len, Frame};
    use std::io;
    use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

    /// Reads one frame; `Ok(None)` on a clean end of stream before a frame starts.
    /// Not cancel-safe: use it from one task that owns the reader.
    pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> io::Result<Option<Frame>> {
        let mut len = [0u8; 4];
        let mut got = 0;
        while got < 4 {
            match r.read(&mut len[got..]).await? {
                0 if got == 0 => return Ok(None),
                0 => return Err(io::ErrorKind::UnexpectedEof.into()),
                n => got += n,
            }
        }
        let n = check_len(u32::from_be_bytes(len))?;
        let mut body = vec![0u8; n];
        r.read_exact(&mut body).await?;
        let kind = body.remove(0);
        Ok(Some(Frame {
            kind,
            payload: body,
        }))
    }

    /// Writes one frame.
    pub async fn write_frame<W: AsyncWrite + Unpin>(w: &mut W, frame: &Frame) -> io::Result<()> {
        w.write_all(&frame.encode()).await?;
        w.flush().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_frame_round_trips_and_its_length_counts_the_type_byte() {
        let f = Frame {
            kind: kind::STDOUT,
            payload: b"hello".to_vec(),
        };
        let bytes = f.encode();
        assert_eq!(&bytes[..4], &6u32.to_be_bytes());
        assert_eq!(bytes[4], 0x02);
        let back = read_frame(&mut &bytes[..]).unwrap().unwrap();
        assert_eq!(back, f);
    }

    #[test]
    fn end_of_stream_before_a_frame_is_clean_and_inside_one_is_an_error() {
        assert!(read_frame(&mut &b""[..]).unwrap().is_none());
        assert!(read_frame(&mut &[0u8, 0][..]).is_err());
        let mut cut = Frame::json(kind::INIT, &serde_json::json!({"a": 1})).encode();
        cut.pop();
        assert!(read_frame(&mut &cut[..]).is_err());
    }

    #[test]
    fn zero_and_oversized_lengths_are_refused_without_allocating() {
        assert!(read_frame(&mut &[0u8, 0, 0, 0][..]).is_err());
        let huge = ((MAX_FRAME + 1) as u32).to_be_bytes();
        let err = read_frame(&mut &huge[..]).unwrap_err();
        assert!(err.to_string().contains("outside"), "{err}");
    }

    #[test]
    fn the_json_bodies_match_the_gateway_wire_format() {
        let init: ExecInit = serde_json::from_str(
            r#"{"session_id":"s1","instance_id":"i1","command":["sh"],"tty":true,"cols":80,"rows":24,"env":{},"stdin":true}"#,
        )
        .unwrap();
        assert!(init.tty && init.stdin);
        assert_eq!((init.cols, init.rows), (80, 24));
        let c: ExecControl =
            serde_json::from_str(r#"{"type":"resize","cols":100,"rows":40}"#).unwrap();
        assert_eq!(
            c,
            ExecControl::Resize {
                cols: 100,
                rows: 40
            }
        );
        let c: ExecControl = serde_json::from_str(r#"{"type":"signal","signal":"INT"}"#).unwrap();
        assert_eq!(
            c,
            ExecControl::Signal {
                signal: "INT".into()
            }
        );
        let c: ExecControl = serde_json::from_str(r#"{"type":"close"}"#).unwrap();
        assert_eq!(c, ExecControl::Close);
        let exit = serde_json::to_value(ExecExit {
            exit_code: Some(7),
            reason: EndReason::Exited,
            message: None,
        })
        .unwrap();
        assert_eq!(
            exit,
            serde_json::json!({"exit_code": 7, "reason": "exited"})
        );
        for r in EndReason::ALL {
            assert_eq!(serde_json::to_value(r).unwrap(), r.as_str());
        }
    }
}
