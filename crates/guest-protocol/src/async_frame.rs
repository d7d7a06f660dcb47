//! Async (tokio) reader and writer for the host side; same framing as the blocking ones.

use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::frame::{decode_line, encode_line, LineBuffer, ProtocolError};
use crate::MAX_LINE_BYTES;

/// Async message reader. [`AsyncMessageReader::read_message`] is cancel-safe: bytes of
/// a partly received line stay in the reader when the future is dropped.
#[derive(Debug)]
pub struct AsyncMessageReader<R> {
    inner: R,
    buf: LineBuffer,
}

impl<R: AsyncRead + Unpin> AsyncMessageReader<R> {
    /// A reader with the default [`MAX_LINE_BYTES`] limit.
    pub fn new(inner: R) -> Self {
        Self::with_limit(inner, MAX_LINE_BYTES)
    }

    /// A reader with a custom line limit.
    pub fn with_limit(inner: R, limit: usize) -> Self {
        AsyncMessageReader {
            inner,
            buf: LineBuffer::new(limit),
        }
    }

    /// Reads the next message; `Ok(None)` on a clean end of stream.
    pub async fn read_message<T: DeserializeOwned>(&mut self) -> Result<Option<T>, ProtocolError> {
        let mut chunk = [0u8; 16 * 1024];
        loop {
            if let Some(line) = self.buf.take_line()? {
                return decode_line(&line).map(Some);
            }
            let want = self.buf.chunk_len();
            // Cancel safety: `read` reads nothing when cancelled, and the bytes it
            // returns are stored before the next await point.
            let n = self.inner.read(&mut chunk[..want]).await?;
            if n == 0 {
                return match self.buf.pending() {
                    0 => Ok(None),
                    pending => Err(ProtocolError::TruncatedLine { pending }),
                };
            }
            self.buf.extend(&chunk[..n]);
        }
    }
}

/// Async message writer. Not cancel-safe: a cancelled write may leave half a line.
#[derive(Debug)]
pub struct AsyncMessageWriter<W> {
    inner: W,
    limit: usize,
}

impl<W: AsyncWrite + Unpin> AsyncMessageWriter<W> {
    /// A writer with the default [`MAX_LINE_BYTES`] limit.
    pub fn new(inner: W) -> Self {
        AsyncMessageWriter {
            inner,
            limit: MAX_LINE_BYTES,
        }
    }

    /// Writes one message line and flushes.
    pub async fn write_message<T: Serialize>(&mut self, msg: &T) -> Result<(), ProtocolError> {
        let line = encode_line(msg, self.limit)?;
        self.inner.write_all(&line).await?;
        self.inner.flush().await?;
        Ok(())
    }

    /// Shuts the write half down.
    pub async fn shutdown(&mut self) -> Result<(), ProtocolError> {
        self.inner.shutdown().await?;
        Ok(())
    }
}
