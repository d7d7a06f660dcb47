//! Fuzz target for the guest protocol's framing and decoding: arbitrary bytes arrive in
//! arbitrary chunk splits (with interrupted, would-block and cancelled reads in between)
//! at the readers both ends use, the async one of the host (decoding `GuestMessage`, as
//! the node agent does) and the blocking one of the guest (decoding `HostMessage`, and
//! `GuestMessage` too).
//!
//! Input: byte 0 picks the line limit, byte 1 seeds the chunking, the rest is the
//! stream. Checked on every execution:
//! - no panic, whatever the bytes and the splits;
//! - every reader returns exactly what a straightforward model of the framing says
//!   (split at `\n`, strip one `\r`, skip blank lines, a line over the limit ends the
//!   stream with `LineTooLong`, an unfinished line at the end is `TruncatedLine`), so no
//!   split, retry or cancellation loses, duplicates or reorders bytes;
//! - the buffer stays bounded: when a reader asks the transport for bytes, what it holds
//!   without a newline is at most the limit, and it asks for at most `limit + 1` minus
//!   that (never more than 16 KiB);
//! - every decoded message re-encodes to one line that decodes (directly and through a
//!   reader) to the same value.
#![no_main]

use std::fmt::Debug;
use std::future::Future;
use std::io::{self, Read};
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use libfuzzer_sys::fuzz_target;
use plfm_guest_protocol::{
    decode_line, encode_line, AsyncMessageReader, GuestMessage, HostMessage, MessageReader,
    ProtocolError, MAX_LINE_BYTES,
};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::{AsyncRead, ReadBuf};

/// Line limits to fuzz with: tiny ones reach `LineTooLong` cheaply, the real one is
/// what both ends use.
const LIMITS: [usize; 8] = [1, 2, 7, 16, 64, 300, 4096, MAX_LINE_BYTES];

/// Largest read a reader may ask for (its chunk buffer).
const MAX_CHUNK: usize = 16 * 1024;

/// What a reader returned, in comparable form.
#[derive(Debug, PartialEq)]
enum Outcome<T> {
    Msg(T),
    /// A line that does not decode (the error's text: category, line, column).
    Malformed(String),
    TooLong,
    Truncated(usize),
    End,
}

/// The framing as specified, on the whole stream at once.
fn model<T: DeserializeOwned>(stream: &[u8], limit: usize) -> Vec<Outcome<T>> {
    let mut out = Vec::new();
    let mut rest = stream;
    loop {
        let Some(i) = rest.iter().position(|&b| b == b'\n') else {
            out.push(if rest.len() > limit {
                Outcome::TooLong
            } else if rest.is_empty() {
                Outcome::End
            } else {
                Outcome::Truncated(rest.len())
            });
            return out;
        };
        let mut line = &rest[..i];
        rest = &rest[i + 1..];
        if line.len() > limit {
            out.push(Outcome::TooLong);
            return out;
        }
        if line.last() == Some(&b'\r') {
            line = &line[..line.len() - 1];
        }
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        out.push(match decode_line::<T>(line) {
            Ok(m) => Outcome::Msg(m),
            Err(e @ ProtocolError::Malformed { .. }) => Outcome::Malformed(e.to_string()),
            Err(e) => panic!("decode_line returned a non-decoding error: {e}"),
        });
    }
}

/// A small xorshift generator: the chunking is a function of the input.
struct Rng(u64);

impl Rng {
    fn new(seed: u8) -> Self {
        Rng(0x9E37_79B9_7F4A_7C15 ^ (u64::from(seed) << 17 | 1))
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
}

/// The transport: hands out `data` in pseudo-random chunks, with interruptions, and
/// checks the bounded-buffer invariant on every read.
struct Chunked<'a> {
    data: &'a [u8],
    pos: usize,
    /// Index after the last newline handed out.
    line_start: usize,
    limit: usize,
    max_chunk: usize,
    rng: Rng,
    reads: usize,
}

impl<'a> Chunked<'a> {
    fn new(data: &'a [u8], limit: usize, seed: u8) -> Self {
        let max_chunk = [1, 2, 3, 5, 16, 100, 4096, MAX_CHUNK][usize::from(seed >> 5)];
        Chunked {
            data,
            pos: 0,
            line_start: 0,
            limit,
            max_chunk,
            rng: Rng::new(seed),
            reads: 0,
        }
    }

    /// Gives the reader the next chunk; `None` means "fail this read (no data)".
    fn give(&mut self, buf: &mut [u8]) -> Option<usize> {
        // When a reader reads, every complete line it was given has been taken out of
        // its buffer, so it holds exactly the bytes after the last newline handed out.
        let held = self.pos - self.line_start;
        assert!(
            held <= self.limit,
            "reader holds {held} bytes without a newline (limit {})",
            self.limit
        );
        assert!(!buf.is_empty(), "zero-length read");
        assert!(
            buf.len() <= (self.limit + 1 - held).min(MAX_CHUNK),
            "reader asks for {} bytes while holding {held} (limit {})",
            buf.len(),
            self.limit
        );
        self.reads += 1;
        assert!(
            self.reads <= 16 * (self.data.len() + 16),
            "reader makes no progress"
        );
        let r = self.rng.next();
        if r % 8 == 0 {
            return None;
        }
        let n = (1 + (r >> 8) as usize % self.max_chunk)
            .min(buf.len())
            .min(self.data.len() - self.pos);
        let chunk = &self.data[self.pos..self.pos + n];
        buf[..n].copy_from_slice(chunk);
        if let Some(i) = chunk.iter().rposition(|&b| b == b'\n') {
            self.line_start = self.pos + i + 1;
        }
        self.pos += n;
        Some(n)
    }
}

impl Read for Chunked<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.give(buf) {
            Some(n) => Ok(n),
            // Interrupted is retried inside the reader, WouldBlock surfaces as a timeout.
            None if self.rng.next() % 2 == 0 => Err(io::ErrorKind::Interrupted.into()),
            None => Err(io::ErrorKind::WouldBlock.into()),
        }
    }
}

impl AsyncRead for Chunked<'_> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match this.give(buf.initialize_unfilled()) {
            Some(n) => {
                buf.advance(n);
                Poll::Ready(Ok(()))
            }
            None if this.rng.next() % 4 == 0 => Poll::Ready(Err(io::ErrorKind::WouldBlock.into())),
            None => {
                cx.waker().wake_by_ref();
                Poll::Pending
            }
        }
    }
}

/// Maps one reader result; `None` for a retryable transport error.
fn outcome<T>(r: Result<Option<T>, ProtocolError>, limit: usize) -> Option<Outcome<T>> {
    Some(match r {
        Ok(Some(m)) => Outcome::Msg(m),
        Ok(None) => Outcome::End,
        Err(ProtocolError::Io(e)) => {
            assert!(
                matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ),
                "unexpected i/o error {e}"
            );
            return None;
        }
        Err(ProtocolError::LineTooLong { limit: l }) => {
            assert_eq!(l, limit);
            Outcome::TooLong
        }
        Err(ProtocolError::TruncatedLine { pending }) => Outcome::Truncated(pending),
        Err(e @ ProtocolError::Malformed { .. }) => Outcome::Malformed(e.to_string()),
        Err(e) => panic!("a reader returned a validation error: {e}"),
    })
}

fn is_last<T>(o: &Outcome<T>) -> bool {
    matches!(o, Outcome::TooLong | Outcome::Truncated(_) | Outcome::End)
}

/// The guest's blocking reader.
fn blocking<T: DeserializeOwned>(stream: &[u8], limit: usize, seed: u8) -> Vec<Outcome<T>> {
    let mut r = MessageReader::with_limit(Chunked::new(stream, limit, seed), limit);
    let mut out = Vec::new();
    loop {
        let Some(o) = outcome(r.read_message::<T>(), limit) else {
            continue;
        };
        let last = is_last(&o);
        out.push(o);
        if last {
            return out;
        }
    }
}

/// The host's async reader; a read that is pending is sometimes polled again and
/// sometimes cancelled (the future dropped), which must lose nothing.
fn asynchronous<T: DeserializeOwned>(stream: &[u8], limit: usize, seed: u8) -> Vec<Outcome<T>> {
    let mut r = AsyncMessageReader::with_limit(Chunked::new(stream, limit, seed), limit);
    let mut cx = Context::from_waker(Waker::noop());
    let mut out = Vec::new();
    let mut polls = 0u64;
    loop {
        let res = {
            let mut fut = std::pin::pin!(r.read_message::<T>());
            loop {
                match fut.as_mut().poll(&mut cx) {
                    Poll::Ready(res) => break Some(res),
                    Poll::Pending => {
                        polls += 1;
                        if polls % 3 != 0 {
                            break None; // cancelled
                        }
                    }
                }
            }
        };
        let Some(o) = res.and_then(|res| outcome(res, limit)) else {
            continue;
        };
        let last = is_last(&o);
        out.push(o);
        if last {
            return out;
        }
    }
}

/// A decoded message survives encoding and decoding unchanged, as one line.
fn round_trip<T: Serialize + DeserializeOwned + PartialEq + Debug>(outcomes: &[Outcome<T>]) {
    for o in outcomes {
        let Outcome::Msg(m) = o else { continue };
        let line = encode_line(m, usize::MAX).expect("a decoded message encodes");
        assert_eq!(line.last(), Some(&b'\n'));
        let body = &line[..line.len() - 1];
        assert!(!body.contains(&b'\n'), "an encoded message spans lines");
        let back: T = decode_line(body).expect("a re-encoded message decodes");
        assert_eq!(&back, m);
        let mut r = MessageReader::new(&line[..]);
        assert_eq!(r.read_message::<T>().expect("frame").as_ref(), Some(m));
        assert!(r.read_message::<T>().expect("end").is_none());
    }
}

fuzz_target!(|data: &[u8]| {
    let (limit, seed, stream) = match data {
        [l, s, rest @ ..] => (LIMITS[usize::from(l % 8)], *s, rest),
        _ => return,
    };

    // Host side: the node agent reads guest messages with the async reader.
    let want = model::<GuestMessage>(stream, limit);
    assert_eq!(asynchronous::<GuestMessage>(stream, limit, seed), want);
    assert_eq!(blocking::<GuestMessage>(stream, limit, seed), want);
    round_trip(&want);
    for o in &want {
        if let Outcome::Msg(GuestMessage::Hello(h)) = o {
            let _ = h.check_protocol();
        }
    }

    // Guest side: guest init reads host messages with the blocking reader.
    let want = model::<HostMessage>(stream, limit);
    assert_eq!(blocking::<HostMessage>(stream, limit, seed), want);
    round_trip(&want);
    for o in &want {
        if let Outcome::Msg(HostMessage::Config(c)) = o {
            let _ = c.check_version();
        }
    }
});
