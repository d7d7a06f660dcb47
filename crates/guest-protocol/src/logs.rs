//! The log stream (DESIGN §6a): the workload's stdout and stderr and guest init's own
//! console lines, from guest init to the node agent.
//!
//! The guest connects to the host on vsock port [`LOG_PORT`] (on the host: the
//! hybrid-vsock Unix socket `<uds>_5163`) and sends newline-delimited JSON messages,
//! each a [`LogMessage`]:
//!
//! ```text
//! guest → host  hello   {instance_id, boot_id}                       (first, once per connection)
//! guest → host  line    {ts_ms, stream, line, truncated}             (any number)
//! guest → host  dropped {ts_ms, count}                               (lines lost in the guest)
//! ```
//!
//! The host sends nothing back. A line is at most [`MAX_LOG_LINE_BYTES`] bytes of text;
//! a longer one is cut (on a character boundary) and carries `truncated: true`.
//! `ts_ms` is the guest's wall clock (milliseconds since the Unix epoch) when guest init
//! read the line. This module owns the types and the cut; it does no I/O.

use serde::{Deserialize, Serialize};

/// The vsock port of the log stream on the host.
pub const LOG_PORT: u32 = 5163;

/// Longest line text in bytes; longer lines are cut and marked `truncated`.
pub const MAX_LOG_LINE_BYTES: usize = 16 * 1024;

/// Where a line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogStream {
    /// The workload's standard output.
    Stdout,
    /// The workload's standard error.
    Stderr,
    /// Guest init's own lines.
    Console,
}

impl LogStream {
    /// The stream's name on the wire, on disk and in the API.
    pub fn as_str(self) -> &'static str {
        match self {
            LogStream::Stdout => "stdout",
            LogStream::Stderr => "stderr",
            LogStream::Console => "console",
        }
    }

    /// The stream named `s`.
    pub fn parse(s: &str) -> Option<LogStream> {
        match s {
            "stdout" => Some(LogStream::Stdout),
            "stderr" => Some(LogStream::Stderr),
            "console" => Some(LogStream::Console),
            _ => None,
        }
    }
}

/// One line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogLine {
    /// Guest wall clock, milliseconds since the Unix epoch.
    pub ts_ms: u64,
    /// Stream.
    pub stream: LogStream,
    /// The text, without its newline.
    pub line: String,
    /// The line was longer than [`MAX_LOG_LINE_BYTES`] and was cut.
    #[serde(default)]
    pub truncated: bool,
}

/// A message of the log stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum LogMessage {
    /// Who is speaking (first message of every connection).
    Hello {
        /// The instance (from the kernel command line).
        instance_id: String,
        /// The guest kernel's boot id.
        #[serde(default)]
        boot_id: String,
    },
    /// A line.
    Line(LogLine),
    /// `count` lines were dropped in the guest (the host was slow or absent) before
    /// the lines that follow.
    Dropped {
        /// When the drop was noticed (guest clock, ms since the epoch).
        ts_ms: u64,
        /// Lines lost.
        count: u64,
    },
}

/// Cuts raw bytes into a line of at most [`MAX_LOG_LINE_BYTES`] bytes of text (invalid
/// UTF-8 is replaced); `true` when something was cut.
pub fn cut_line(raw: &[u8]) -> (String, bool) {
    let text = String::from_utf8_lossy(raw);
    if text.len() <= MAX_LOG_LINE_BYTES {
        return (text.into_owned(), false);
    }
    let mut end = MAX_LOG_LINE_BYTES;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    (text[..end].to_string(), true)
}

/// The text of the marker line the host shows for a [`LogMessage::Dropped`].
pub fn dropped_marker(count: u64) -> String {
    format!("plfm: {count} lines dropped (the host did not read them in time)")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{decode_line, encode_line};
    use crate::MAX_LINE_BYTES;

    #[test]
    fn messages_have_a_stable_wire_form() {
        let m = LogMessage::Line(LogLine {
            ts_ms: 1_700_000_000_123,
            stream: LogStream::Stderr,
            line: "oops".into(),
            truncated: false,
        });
        let wire = encode_line(&m, MAX_LINE_BYTES).unwrap();
        assert_eq!(
            std::str::from_utf8(&wire).unwrap(),
            "{\"type\":\"line\",\"ts_ms\":1700000000123,\"stream\":\"stderr\",\"line\":\"oops\",\"truncated\":false}\n"
        );
        let back: LogMessage = decode_line(&wire[..wire.len() - 1]).unwrap();
        assert_eq!(back, m);
        let d: LogMessage =
            decode_line(br#"{"type":"dropped","ts_ms":5,"count":12,"extra":1}"#).unwrap();
        assert_eq!(
            d,
            LogMessage::Dropped {
                ts_ms: 5,
                count: 12
            }
        );
        let h: LogMessage = decode_line(br#"{"type":"hello","instance_id":"a"}"#).unwrap();
        assert_eq!(
            h,
            LogMessage::Hello {
                instance_id: "a".into(),
                boot_id: String::new()
            }
        );
        assert!(decode_line::<LogMessage>(
            br#"{"type":"line","ts_ms":1,"stream":"video","line":""}"#
        )
        .is_err());
    }

    #[test]
    fn long_lines_are_cut_on_a_character_boundary_and_marked() {
        let (l, t) = cut_line("é".repeat(MAX_LOG_LINE_BYTES).as_bytes());
        assert!(t);
        assert!(l.len() <= MAX_LOG_LINE_BYTES && l.len() >= MAX_LOG_LINE_BYTES - 1);
        assert_eq!(cut_line(b"short"), ("short".to_string(), false));
        assert_eq!(cut_line(b"bad \xff byte").0, "bad \u{fffd} byte");
        // The longest line still fits a protocol line after JSON escaping.
        let worst = LogMessage::Line(LogLine {
            ts_ms: u64::MAX,
            stream: LogStream::Stdout,
            line: "\u{1}".repeat(MAX_LOG_LINE_BYTES),
            truncated: true,
        });
        assert!(encode_line(&worst, MAX_LINE_BYTES).is_ok());
    }

    #[test]
    fn stream_names_round_trip() {
        for s in [LogStream::Stdout, LogStream::Stderr, LogStream::Console] {
            assert_eq!(LogStream::parse(s.as_str()), Some(s));
        }
        assert_eq!(LogStream::parse("video"), None);
    }
}
