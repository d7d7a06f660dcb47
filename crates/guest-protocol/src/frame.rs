//! Line framing: one JSON object per line, at most [`MAX_LINE_BYTES`] bytes before the
//! newline. The blocking [`MessageReader`]/[`MessageWriter`] are for the guest; the
//! async ones (feature `tokio`) share [`LineBuffer`] and [`decode_line`]/[`encode_line`]
//! so both sides frame identically.
//!
//! Readers keep partially received lines in their own buffer, so a read that fails with
//! `WouldBlock`/`TimedOut` (or an async read that is cancelled) loses nothing and can be
//! retried. A line longer than the limit is an error and the stream is then unusable.

use std::io::{self, Read, Write};

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::MAX_LINE_BYTES;

/// Errors of framing and decoding. Messages never contain message content (a config
/// may carry secrets).
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    /// Reading or writing the channel failed.
    #[error("guest channel i/o: {0}")]
    Io(#[from] io::Error),
    /// A line exceeded the limit.
    #[error("message line longer than {limit} bytes refused")]
    LineTooLong {
        /// The limit in bytes.
        limit: usize,
    },
    /// The peer closed the channel in the middle of a line.
    #[error("channel closed in the middle of a message ({pending} bytes pending)")]
    TruncatedLine {
        /// Bytes received without a newline.
        pending: usize,
    },
    /// The line is not valid JSON or not a known message.
    #[error("malformed message: {category} error at line {line} column {column}")]
    Malformed {
        /// serde_json's error category (syntax, data, eof).
        category: &'static str,
        /// Line within the message.
        line: usize,
        /// Column within the message.
        column: usize,
    },
    /// `hello.protocol` is not ours.
    #[error("unsupported guest protocol version {got} (supported: {supported})")]
    UnsupportedProtocol {
        /// Version received.
        got: u32,
        /// Version spoken here.
        supported: u32,
    },
    /// `config.config_version` is not ours.
    #[error("unsupported config version {got:?} (supported: \"v1\")")]
    UnsupportedConfigVersion {
        /// Version received.
        got: String,
    },
}

impl ProtocolError {
    /// True for a read that timed out or would block: the reader's state is intact and
    /// the read may be retried.
    pub fn is_timeout(&self) -> bool {
        matches!(self, ProtocolError::Io(e)
            if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut))
    }
}

fn malformed(e: serde_json::Error) -> ProtocolError {
    let category = match e.classify() {
        serde_json::error::Category::Io => "i/o",
        serde_json::error::Category::Syntax => "syntax",
        serde_json::error::Category::Data => "data",
        serde_json::error::Category::Eof => "eof",
    };
    ProtocolError::Malformed {
        category,
        line: e.line(),
        column: e.column(),
    }
}

/// Serializes `msg` as one line including the trailing newline; refuses messages over
/// `limit` bytes.
///
/// The line may carry secrets (the config): it is zeroed when dropped, and so is every
/// smaller buffer it outgrew while being written ([`ZeroingBuf`]).
pub fn encode_line<T: Serialize>(
    msg: &T,
    limit: usize,
) -> Result<zeroize::Zeroizing<Vec<u8>>, ProtocolError> {
    let mut buf = ZeroingBuf::default();
    serde_json::to_writer(&mut buf, msg).map_err(malformed)?;
    if buf.0.len() > limit {
        return Err(ProtocolError::LineTooLong { limit });
    }
    buf.write_all(b"\n")?;
    Ok(std::mem::take(&mut buf.0))
}

/// A byte buffer that zeroes its old allocation whenever it grows (a plain `Vec` frees
/// outgrown buffers with their contents) and its last one when dropped. Hand-written:
/// `zeroize` zeroes a buffer it is given, not the ones a `Vec` leaves behind.
#[derive(Default)]
struct ZeroingBuf(zeroize::Zeroizing<Vec<u8>>);

impl Write for ZeroingBuf {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let need = self.0.len() + data.len();
        if need > self.0.capacity() {
            let mut bigger = Vec::with_capacity(need.max(self.0.capacity() * 2).max(256));
            bigger.extend_from_slice(&self.0);
            // The old allocation is zeroed when it drops here.
            self.0 = zeroize::Zeroizing::new(bigger);
        }
        self.0.extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Parses one line (without its newline). Unknown fields are ignored.
pub fn decode_line<T: DeserializeOwned>(line: &[u8]) -> Result<T, ProtocolError> {
    serde_json::from_slice(line).map_err(malformed)
}

/// Bytes received but not yet returned as lines. Taking a line only advances an
/// offset; consumed bytes are dropped in one move when the buffer holds no further
/// line, so a peer sending a flood of (blank) lines costs O(n), not O(n²).
#[derive(Debug)]
pub(crate) struct LineBuffer {
    pending: Vec<u8>,
    /// Start of the bytes not yet returned (everything before is consumed).
    start: usize,
    /// Bytes of `pending` already searched for a newline (absolute index, >= start).
    scanned: usize,
    limit: usize,
}

impl LineBuffer {
    pub(crate) fn new(limit: usize) -> Self {
        LineBuffer {
            pending: Vec::new(),
            start: 0,
            scanned: 0,
            limit,
        }
    }

    /// Drops the consumed prefix (one move of the unconsumed rest).
    fn compact(&mut self) {
        if self.start > 0 {
            self.pending.drain(..self.start);
            self.scanned -= self.start;
            self.start = 0;
        }
    }

    /// Takes the next complete non-empty line out of the buffer (without the newline).
    pub(crate) fn take_line(&mut self) -> Result<Option<Vec<u8>>, ProtocolError> {
        loop {
            let Some(rel) = self.pending[self.scanned..]
                .iter()
                .position(|&b| b == b'\n')
            else {
                self.scanned = self.pending.len();
                self.compact();
                if self.pending.len() > self.limit {
                    return Err(ProtocolError::LineTooLong { limit: self.limit });
                }
                return Ok(None);
            };
            let end = self.scanned + rel;
            if end - self.start > self.limit {
                return Err(ProtocolError::LineTooLong { limit: self.limit });
            }
            let mut line = &self.pending[self.start..end];
            self.start = end + 1;
            self.scanned = self.start;
            if line.last() == Some(&b'\r') {
                line = &line[..line.len() - 1];
            }
            if line.iter().all(|b| b.is_ascii_whitespace()) {
                continue;
            }
            return Ok(Some(line.to_vec()));
        }
    }

    /// True when a newline is buffered.
    pub(crate) fn has_line(&self) -> bool {
        self.pending[self.start..].contains(&b'\n')
    }

    /// Appends received bytes.
    pub(crate) fn extend(&mut self, bytes: &[u8]) {
        self.pending.extend_from_slice(bytes);
    }

    /// Bytes waiting without a newline yet.
    pub(crate) fn pending(&self) -> usize {
        self.pending.len() - self.start
    }

    /// How many bytes to ask the transport for next (never far past the limit).
    pub(crate) fn chunk_len(&self) -> usize {
        (self.limit + 1)
            .saturating_sub(self.pending())
            .clamp(1, 16 * 1024)
    }
}

#[cfg(test)]
mod line_buffer_tests {
    use super::*;

    /// A peer flooding the channel with newlines (a hostile guest) is consumed in
    /// linear time: 8 MiB of blank lines in one buffer take well under a second (the
    /// old one-line-at-a-time removal moved the whole rest per line: ~10^13 bytes).
    #[test]
    fn a_flood_of_blank_lines_is_consumed_in_linear_time() {
        let mut b = LineBuffer::new(1 << 20);
        let mut flood = vec![b'\n'; 8 << 20];
        flood.extend_from_slice(b"{\"type\":\"ack\"}\npartial");
        b.extend(&flood);
        let started = std::time::Instant::now();
        let line = b.take_line().unwrap().expect("the line after the flood");
        assert_eq!(line, b"{\"type\":\"ack\"}");
        assert_eq!(b.take_line().unwrap(), None);
        assert_eq!(b.pending(), b"partial".len());
        assert!(
            started.elapsed() < std::time::Duration::from_secs(10),
            "{:?}",
            started.elapsed()
        );
    }

    #[test]
    fn lines_are_returned_in_order_across_extends_and_the_limit_holds() {
        let mut b = LineBuffer::new(8);
        b.extend(b"ab\r\n\n  \ncd");
        assert_eq!(b.take_line().unwrap().as_deref(), Some(&b"ab"[..]));
        assert_eq!(b.take_line().unwrap(), None);
        assert!(!b.has_line());
        b.extend(b"e\nfg");
        assert!(b.has_line());
        assert_eq!(b.take_line().unwrap().as_deref(), Some(&b"cde"[..]));
        assert_eq!(b.take_line().unwrap(), None);
        assert_eq!(b.pending(), 2);
        b.extend(b"123456789");
        assert!(matches!(
            b.take_line(),
            Err(ProtocolError::LineTooLong { limit: 8 })
        ));
    }
}

/// Blocking message reader.
#[derive(Debug)]
pub struct MessageReader<R> {
    inner: R,
    buf: LineBuffer,
}

impl<R: Read> MessageReader<R> {
    /// A reader with the default [`MAX_LINE_BYTES`] limit.
    pub fn new(inner: R) -> Self {
        Self::with_limit(inner, MAX_LINE_BYTES)
    }

    /// A reader with a custom line limit.
    pub fn with_limit(inner: R, limit: usize) -> Self {
        MessageReader {
            inner,
            buf: LineBuffer::new(limit),
        }
    }

    /// Reads the next message; `Ok(None)` on a clean end of stream. A timeout of the
    /// underlying reader surfaces as an error for which
    /// [`ProtocolError::is_timeout`] is true and loses no data.
    pub fn read_message<T: DeserializeOwned>(&mut self) -> Result<Option<T>, ProtocolError> {
        let mut chunk = vec![0u8; 16 * 1024];
        loop {
            if let Some(line) = self.buf.take_line()? {
                return decode_line(&line).map(Some);
            }
            let want = self.buf.chunk_len();
            let n = match self.inner.read(&mut chunk[..want]) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.into()),
            };
            if n == 0 {
                return match self.buf.pending() {
                    0 => Ok(None),
                    pending => Err(ProtocolError::TruncatedLine { pending }),
                };
            }
            self.buf.extend(&chunk[..n]);
        }
    }

    /// The underlying reader.
    pub fn get_ref(&self) -> &R {
        &self.inner
    }

    /// The underlying reader, mutably (e.g. to switch it to non-blocking reads).
    pub fn get_mut(&mut self) -> &mut R {
        &mut self.inner
    }

    /// True when a complete line is already buffered, so the next
    /// [`MessageReader::read_message`] will not touch the transport.
    pub fn has_buffered_line(&self) -> bool {
        self.buf.has_line()
    }
}

/// Blocking message writer; each message is written with one `write_all` and flushed.
#[derive(Debug)]
pub struct MessageWriter<W> {
    inner: W,
    limit: usize,
}

impl<W: Write> MessageWriter<W> {
    /// A writer with the default [`MAX_LINE_BYTES`] limit.
    pub fn new(inner: W) -> Self {
        MessageWriter {
            inner,
            limit: MAX_LINE_BYTES,
        }
    }

    /// Writes one message line.
    pub fn write_message<T: Serialize>(&mut self, msg: &T) -> Result<(), ProtocolError> {
        let line = encode_line(msg, self.limit)?;
        self.inner.write_all(&line)?;
        self.inner.flush()?;
        Ok(())
    }

    /// The underlying writer.
    pub fn get_ref(&self) -> &W {
        &self.inner
    }
}
