//! The workload's output on its way to the host: pipes for the workload's stdout and
//! stderr, guest init's console lines, a bounded ring, and a sender thread that turns
//! what the ring holds into stamped lines and ships them on the log port (vsock
//! [`LOG_PORT`], see `plfm_guest_protocol::LogMessage`).
//!
//! The contract: the workload is never blocked on its output, and pays for it as
//! little as possible. Reader threads drain the pipes (enlarged to 1 MiB) and only move
//! what each `read` returned into the ring, stamped with the time of the read, under a
//! short lock; splitting into lines, cutting long ones and encoding are the sender's
//! work, and the sender runs at nice 19 (on a one-vCPU VM, every cycle spent on the
//! output is taken from the workload). When the ring is full (the host is slow or
//! absent), the oldest reads are dropped and the lines they held counted, and the host
//! is told how many ([`LogMessage::Dropped`], shown as a marker line); a line cut by a
//! drop comes out marked `truncated`. The sender reconnects every
//! [`RECONNECT_INTERVAL`] when the connection is lost (agent restart). The workload's
//! output is not copied to the serial console (slow under emulation). This module must
//! not talk on the host channel (port 5161) and must not block PID 1: everything here
//! runs in its own threads, except [`flush`], which waits with a deadline.
//!
//! Hand-written: the ring of raw reads and the line splitting are this protocol's own
//! (no crate splits a pipe into bounded, stamped lines that drop the oldest).

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nix::sys::socket::{self, sockopt};
use nix::sys::time::TimeVal;
use plfm_guest_protocol::{
    cut_line, LogLine, LogMessage, LogStream, GUEST_PORT, LOG_PORT, MAX_LINE_BYTES,
    MAX_LOG_LINE_BYTES,
};

use crate::settings::HostChannel;

/// Bytes the ring holds at most (capacity of the buffers it keeps).
pub const RING_BYTES: usize = 1024 * 1024;
/// Entries (reads or console lines) the ring holds at most.
pub const RING_ENTRIES: usize = 4096;
/// Pause between connection attempts.
pub const RECONNECT_INTERVAL: Duration = Duration::from_secs(1);
/// Longest one write to the host may block before the connection is given up.
pub const SEND_TIMEOUT: Duration = Duration::from_secs(5);
/// Most bytes of workload output the sender takes from the ring at once.
const BATCH_BYTES: usize = 256 * 1024;
/// Size of a reader's buffer: one `read` takes at most this much from a pipe.
const READ_BYTES: usize = 256 * 1024;
/// A reader's pause after a read that did not fill its buffer (see [`drain`]).
const READ_PAUSE: Duration = Duration::from_millis(20);
/// A read that filled less than this is copied into a buffer of its own size (so the
/// ring's bound counts what it really holds); a fuller one is moved as it is.
const MOVE_AT: usize = READ_BYTES / 2;
/// Capacity asked for the workload's pipes (`F_SETPIPE_SZ`): the workload writes on
/// while its reader waits for the CPU, and the reader wakes up less often.
const PIPE_BYTES: libc::c_int = 1024 * 1024;

/// Index of a workload stream in per-stream tables.
fn stream_index(s: LogStream) -> usize {
    match s {
        LogStream::Stdout => 0,
        LogStream::Stderr => 1,
        LogStream::Console => 2,
    }
}

/// One entry of the ring.
#[derive(Debug)]
enum Entry {
    /// What one `read` returned from a workload pipe, stamped when it was read.
    /// `seq` counts the stream's reads (a gap means reads were dropped), and
    /// `starts_mid_line` says the stream's previous read did not end a line.
    Bytes {
        stream: LogStream,
        seq: u64,
        ts_ms: u64,
        starts_mid_line: bool,
        data: Vec<u8>,
    },
    /// A line already made (guest init's console).
    Line(LogLine),
}

impl Entry {
    /// Memory the entry holds, for the byte bound.
    fn weight(&self) -> usize {
        match self {
            Entry::Bytes { data, .. } => data.capacity(),
            Entry::Line(l) => l.line.len(),
        }
    }

    /// Lines lost when the entry is dropped: for raw bytes, the lines they end. (A
    /// line they begin without ending is counted by the sender, which skips its rest.)
    fn lines(&self) -> u64 {
        match self {
            Entry::Bytes { data, .. } => memchr::memchr_iter(b'\n', data).count() as u64,
            Entry::Line(_) => 1,
        }
    }
}

/// What the sender takes from the ring at once.
#[derive(Debug, Default)]
pub struct Taken {
    /// Lines dropped since the previous take.
    pub dropped: u64,
    entries: Vec<Entry>,
}

/// Bounded buffer between the pipe readers and the sender. The readers only move the
/// bytes a `read` returned into it, whole: splitting them into lines, stamping and
/// encoding are the sender's work, which runs at the lowest priority. So a workload
/// that floods its output pays for the pipe and little else. Pushing never waits;
/// past either bound the oldest entries go and the lines they held are counted, and the
/// count goes out as a [`LogMessage::Dropped`] before the lines that follow. Dropping
/// the oldest (not the newest) keeps what a workload printed last, which is what an
/// operator reads when it died.
#[derive(Debug)]
pub struct Ring {
    entries: VecDeque<Entry>,
    bytes: usize,
    max_bytes: usize,
    max_entries: usize,
    /// Per workload stream: the next read's number, and whether the last read left a
    /// line open.
    next_seq: [u64; 3],
    mid_line: [bool; 3],
    dropped: u64,
    dropped_total: u64,
}

impl Ring {
    /// An empty ring of at most `max_bytes` held and `max_entries` entries.
    pub fn new(max_bytes: usize, max_entries: usize) -> Ring {
        Ring {
            entries: VecDeque::new(),
            bytes: 0,
            max_bytes,
            max_entries: max_entries.max(1),
            next_seq: [0; 3],
            mid_line: [false; 3],
            dropped: 0,
            dropped_total: 0,
        }
    }

    /// Adds what one read of `stream` returned (not empty), stamped `ts_ms`.
    pub fn push_bytes(&mut self, stream: LogStream, ts_ms: u64, data: Vec<u8>) {
        let Some(last) = data.last() else { return };
        let i = stream_index(stream);
        let seq = self.next_seq[i];
        self.next_seq[i] += 1;
        let starts_mid_line = std::mem::replace(&mut self.mid_line[i], *last != b'\n');
        self.push(Entry::Bytes {
            stream,
            seq,
            ts_ms,
            starts_mid_line,
            data,
        });
    }

    /// Ends `stream`'s open line, if it has one (its pipe closed): the rest becomes a
    /// line of its own.
    pub fn end_stream(&mut self, stream: LogStream, ts_ms: u64) {
        if self.mid_line[stream_index(stream)] {
            self.push_bytes(stream, ts_ms, b"\n".to_vec());
        }
    }

    /// Adds a finished line.
    pub fn push_line(&mut self, l: LogLine) {
        self.push(Entry::Line(l));
    }

    fn push(&mut self, e: Entry) {
        self.bytes += e.weight();
        self.entries.push_back(e);
        while self.entries.len() > self.max_entries
            || (self.bytes > self.max_bytes && self.entries.len() > 1)
        {
            if let Some(old) = self.entries.pop_front() {
                self.bytes -= old.weight();
                let n = old.lines();
                self.dropped += n;
                self.dropped_total += n;
            }
        }
    }

    /// Counts `n` lines lost on the way out (a failed write).
    pub fn lost(&mut self, n: u64) {
        self.dropped += n;
        self.dropped_total += n;
    }

    /// Takes entries holding up to about `max_bytes` (at least one), with the count
    /// of lines dropped since the last take.
    pub fn take(&mut self, max_bytes: usize) -> Taken {
        let mut out = Taken {
            dropped: std::mem::take(&mut self.dropped),
            entries: Vec::new(),
        };
        let mut size = 0;
        while let Some(e) = self.entries.front() {
            if size > 0 && size + e.weight() > max_bytes {
                break;
            }
            let Some(e) = self.entries.pop_front() else {
                break;
            };
            size += e.weight();
            self.bytes -= e.weight();
            out.entries.push(e);
        }
        out
    }

    /// Entries waiting.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Nothing waiting (neither entries nor a drop count).
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty() && self.dropped == 0
    }

    /// Lines dropped since the start.
    pub fn dropped_total(&self) -> u64 {
        self.dropped_total
    }
}

/// The sender's side of the ring: turns taken entries into messages, with one line
/// splitter per workload stream that carries an open line from one read to the next
/// and notices reads dropped in between.
#[derive(Debug)]
pub struct Lines {
    splitters: [LineSplitter; 2],
    next_seq: [u64; 2],
}

impl Default for Lines {
    fn default() -> Self {
        Lines {
            splitters: [
                LineSplitter::new(LogStream::Stdout),
                LineSplitter::new(LogStream::Stderr),
            ],
            next_seq: [0; 2],
        }
    }
}

impl Lines {
    /// The messages of `taken`, in order: the drop count first (when lines were
    /// dropped), then the lines. Returns them and how many lines they hold.
    pub fn messages(&mut self, taken: Taken, now_ms: u64) -> (Vec<LogMessage>, usize) {
        let mut lines = Vec::new();
        let mut dropped = taken.dropped;
        for e in taken.entries {
            match e {
                Entry::Line(l) => lines.push(l),
                Entry::Bytes {
                    stream,
                    seq,
                    ts_ms,
                    starts_mid_line,
                    data,
                } => {
                    let i = stream_index(stream).min(1);
                    let split = &mut self.splitters[i];
                    if seq != self.next_seq[i] {
                        // Reads were dropped: the open line lost its end, and this
                        // read begins with the end of a line whose start is lost.
                        lines.extend(split.finish(ts_ms).map(|mut l| {
                            l.truncated = true;
                            l
                        }));
                        if starts_mid_line {
                            split.skip_to_next_line();
                            dropped += 1;
                        }
                    }
                    self.next_seq[i] = seq + 1;
                    split.feed(&data, ts_ms, |l| lines.push(l));
                }
            }
        }
        let mut out = Vec::with_capacity(lines.len() + 1);
        if dropped > 0 {
            out.push(LogMessage::Dropped {
                ts_ms: now_ms,
                count: dropped,
            });
        }
        let n = lines.len();
        out.extend(lines.into_iter().map(LogMessage::Line));
        (out, n)
    }
}

/// Splits a byte stream into stamped lines of at most [`MAX_LOG_LINE_BYTES`]: the
/// rest of a longer line is skipped up to its newline.
#[derive(Debug)]
pub struct LineSplitter {
    stream: LogStream,
    pending: Vec<u8>,
    skipping: bool,
}

impl LineSplitter {
    /// A splitter for `stream`.
    pub fn new(stream: LogStream) -> LineSplitter {
        LineSplitter {
            stream,
            pending: Vec::new(),
            skipping: false,
        }
    }

    /// Skips what comes up to the next newline (the end of a line whose start is lost).
    pub fn skip_to_next_line(&mut self) {
        self.pending.clear();
        self.skipping = true;
    }

    /// Feeds bytes; calls `emit` for each complete (or cut) line.
    pub fn feed(&mut self, mut data: &[u8], ts_ms: u64, mut emit: impl FnMut(LogLine)) {
        while !data.is_empty() {
            let (chunk, rest, ends) = match memchr::memchr(b'\n', data) {
                Some(i) => (&data[..i], &data[i + 1..], true),
                None => (data, &data[data.len()..], false),
            };
            data = rest;
            if self.skipping {
                self.skipping = !ends;
                continue;
            }
            if self.pending.is_empty() && ends && chunk.len() <= MAX_LOG_LINE_BYTES {
                // The whole line is in this read (the usual case): no staging copy.
                let (line, truncated) = match std::str::from_utf8(chunk) {
                    Ok(text) => (text.to_owned(), false),
                    Err(_) => cut_line(chunk),
                };
                emit(self.line(line, truncated, ts_ms));
                continue;
            }
            let room = (MAX_LOG_LINE_BYTES + 1).saturating_sub(self.pending.len());
            self.pending
                .extend_from_slice(&chunk[..chunk.len().min(room)]);
            if self.pending.len() > MAX_LOG_LINE_BYTES {
                let (line, _) = cut_line(&self.pending);
                self.pending.clear();
                self.skipping = !ends;
                emit(self.line(line, true, ts_ms));
            } else if ends {
                let raw = std::mem::take(&mut self.pending);
                // Valid UTF-8 (the usual case) becomes the line without a copy.
                let (line, truncated) = match String::from_utf8(raw) {
                    Ok(text) => (text, false),
                    Err(e) => cut_line(e.as_bytes()),
                };
                emit(self.line(line, truncated, ts_ms));
            }
        }
    }

    /// The unterminated rest at end of stream, if any.
    pub fn finish(&mut self, ts_ms: u64) -> Option<LogLine> {
        if self.pending.is_empty() {
            return None;
        }
        let raw = std::mem::take(&mut self.pending);
        let (line, truncated) = cut_line(&raw);
        Some(self.line(line, truncated, ts_ms))
    }

    fn line(&self, line: String, truncated: bool, ts_ms: u64) -> LogLine {
        let mut line = line;
        if line.ends_with('\r') {
            line.pop();
        }
        LogLine {
            ts_ms,
            stream: self.stream,
            line,
            truncated,
        }
    }
}

/// Guest wall clock in ms since the epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

struct Shared {
    ring: Mutex<Ring>,
    ready: Condvar,
    readers: AtomicUsize,
    in_flight: AtomicBool,
    connected: AtomicBool,
}

impl Shared {
    fn ring(&self) -> MutexGuard<'_, Ring> {
        self.ring.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn push_line(&self, l: LogLine) {
        self.ring().push_line(l);
        self.ready.notify_one();
    }
}

static LOGS: OnceLock<Arc<Shared>> = OnceLock::new();

/// The log port's address next to the host channel `target`: vsock port [`LOG_PORT`],
/// or in test mode the Unix socket `<uds>_5163` beside `<uds>_5161`.
pub fn log_target(target: &HostChannel) -> HostChannel {
    match target {
        HostChannel::Vsock { cid, .. } => HostChannel::Vsock {
            cid: *cid,
            port: LOG_PORT,
        },
        HostChannel::Unix(p) => {
            let s = p.to_string_lossy();
            let suffix = format!("_{GUEST_PORT}");
            let base = s.strip_suffix(&suffix).unwrap_or(&s);
            HostChannel::Unix(PathBuf::from(format!("{base}_{LOG_PORT}")))
        }
    }
}

/// Starts shipping logs to `target` (once; later calls do nothing). From now on
/// console lines and the workload's pipes go to the ring.
pub fn start(target: HostChannel, instance_id: String, boot_id: String) {
    let shared = Arc::new(Shared {
        ring: Mutex::new(Ring::new(RING_BYTES, RING_ENTRIES)),
        ready: Condvar::new(),
        readers: AtomicUsize::new(0),
        in_flight: AtomicBool::new(false),
        connected: AtomicBool::new(false),
    });
    if LOGS.set(shared.clone()).is_err() {
        return;
    }
    let hello = LogMessage::Hello {
        instance_id,
        boot_id,
    };
    let spawned = std::thread::Builder::new()
        .name("log-sender".into())
        .spawn(move || sender(&shared, &target, &hello));
    if let Err(e) = spawned {
        crate::console::line(&format!("cannot start the log sender: {e}"));
    }
}

/// Records one of guest init's console lines (a no-op before [`start`]).
pub fn console(msg: &str) {
    if let Some(s) = LOGS.get() {
        let (line, truncated) = cut_line(msg.as_bytes());
        s.push_line(LogLine {
            ts_ms: now_ms(),
            stream: LogStream::Console,
            line,
            truncated,
        });
    }
}

/// A pipe whose read end is drained into the ring as `stream`; the write end is for
/// the workload. `None` before [`start`] (the workload then inherits the console).
pub fn capture(stream: LogStream) -> Option<OwnedFd> {
    let shared = LOGS.get()?.clone();
    let (r, w) = match nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC) {
        Ok(p) => p,
        Err(e) => {
            crate::console::line(&format!("log pipe for {}: {e}", stream.as_str()));
            return None;
        }
    };
    enlarge_pipe(&w);
    shared.readers.fetch_add(1, Ordering::SeqCst);
    let reader_shared = shared.clone();
    let spawned = std::thread::Builder::new()
        .name(format!("log-{}", stream.as_str()))
        .spawn(move || {
            drain(std::fs::File::from(r), stream, &reader_shared, READ_PAUSE);
            reader_shared.readers.fetch_sub(1, Ordering::SeqCst);
            reader_shared.ready.notify_all();
        });
    if let Err(e) = spawned {
        shared.readers.fetch_sub(1, Ordering::SeqCst);
        crate::console::line(&format!("cannot start the {} reader: {e}", stream.as_str()));
        return None;
    }
    Some(w)
}

/// A reader: moves what each `read` returns into the ring, whole, and nothing more
/// (see [`Ring`]); at the end of the pipe, closes the stream's open line. After a
/// read that did not fill its buffer it pauses for `pause` (the pipe holds what the
/// workload writes meanwhile): a flood is read in a few large reads instead of one
/// wake-up per write, and every wake-up is a context switch taken from the workload.
/// A quiet workload's line is read at once; only the next read waits.
fn drain(mut r: impl Read, stream: LogStream, shared: &Shared, pause: Duration) {
    let mut buf = vec![0u8; READ_BYTES];
    loop {
        match r.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                let full = n == buf.len();
                let data = if n >= MOVE_AT {
                    buf.truncate(n);
                    std::mem::replace(&mut buf, vec![0u8; READ_BYTES])
                } else {
                    buf[..n].to_vec()
                };
                let was_empty = {
                    let mut ring = shared.ring();
                    let was_empty = ring.is_empty();
                    ring.push_bytes(stream, now_ms(), data);
                    was_empty
                };
                // The sender waits only on an empty ring: wake it only then (a
                // futex call per read is a cost to the workload too).
                if was_empty {
                    shared.ready.notify_all();
                }
                if !full && !pause.is_zero() {
                    std::thread::sleep(pause);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    shared.ring().end_stream(stream, now_ms());
    shared.ready.notify_one();
}

/// Asks for a larger pipe (best effort: the default 64 KiB works, only slower).
fn enlarge_pipe(fd: &OwnedFd) {
    use std::os::fd::AsRawFd;
    // SAFETY: fcntl(F_SETPIPE_SZ) on a pipe descriptor this function borrows changes
    // the pipe's capacity only; it touches no memory of this process.
    let _ = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETPIPE_SZ, PIPE_BYTES) };
}

fn connect(target: &HostChannel) -> io::Result<Box<dyn Write + Send>> {
    let fd: OwnedFd = crate::channel::connect_once(target)?;
    let tv = TimeVal::new(SEND_TIMEOUT.as_secs() as libc::time_t, 0);
    socket::setsockopt(&fd, sockopt::SendTimeout, &tv)?;
    Ok(Box::new(std::fs::File::from(fd)))
}

/// One buffer of newline-terminated messages. Log lines carry no secrets, so this
/// skips the zeroing writer of the host channel (`encode_line`), which costs an
/// allocation and a wipe per line: with a chatty workload on one vCPU, every cycle
/// spent here is taken from the workload.
fn encode(msgs: &[LogMessage], out: &mut Vec<u8>) {
    out.clear();
    for m in msgs {
        let start = out.len();
        if serde_json::to_writer(&mut *out, m).is_ok() && out.len() - start <= MAX_LINE_BYTES {
            out.push(b'\n');
        } else {
            out.truncate(start);
        }
    }
}

/// Lowers the calling thread's CPU priority to nice 19: shipping lines must not take
/// the CPU from the workload (on a one-vCPU VM it would); when the sender falls behind,
/// the ring drops the oldest lines instead.
fn lower_priority() {
    // SAFETY: setpriority(2) with `who` 0 changes the nice value of the calling thread
    // only (Linux threads have their own); it touches no memory.
    let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS as _, 0, 19) };
    if rc != 0 {
        crate::console::line(&format!(
            "log sender: cannot lower its priority: {}",
            io::Error::last_os_error()
        ));
    }
}

/// The sender: connect, say hello, ship batches; on any error count what was lost,
/// wait and reconnect. Runs for the life of the VM, at the lowest CPU priority.
fn sender(shared: &Shared, target: &HostChannel, hello: &LogMessage) {
    lower_priority();
    let mut lines = Lines::default();
    loop {
        let mut conn = match connect(target) {
            Ok(c) => c,
            Err(_) => {
                std::thread::sleep(RECONNECT_INTERVAL);
                continue;
            }
        };
        let mut buf = Vec::with_capacity(256 * 1024);
        encode(std::slice::from_ref(hello), &mut buf);
        if conn.write_all(&buf).is_err() {
            std::thread::sleep(RECONNECT_INTERVAL);
            continue;
        }
        shared.connected.store(true, Ordering::SeqCst);
        loop {
            let taken = {
                let mut ring = shared.ring();
                while ring.is_empty() {
                    ring = shared
                        .ready
                        .wait_timeout(ring, Duration::from_secs(1))
                        .map(|(g, _)| g)
                        .unwrap_or_else(|e| e.into_inner().0);
                }
                shared.in_flight.store(true, Ordering::SeqCst);
                ring.take(BATCH_BYTES)
            };
            let (batch, n) = lines.messages(taken, now_ms());
            encode(&batch, &mut buf);
            let sent = conn.write_all(&buf);
            shared.in_flight.store(false, Ordering::SeqCst);
            shared.ready.notify_all();
            if sent.is_err() {
                shared.ring().lost(n as u64);
                break;
            }
        }
        shared.connected.store(false, Ordering::SeqCst);
        std::thread::sleep(RECONNECT_INTERVAL);
    }
}

/// Waits (at most until `deadline`) until what the workload wrote has been handed to
/// the host: the pipes are closed, the ring is empty and no write is in flight.
/// Returns at once when no host is connected (nothing would drain the ring).
pub fn flush(deadline: Instant) {
    let Some(s) = LOGS.get() else { return };
    let mut ring = s.ring();
    loop {
        let done = ring.is_empty()
            && !s.in_flight.load(Ordering::SeqCst)
            && s.readers.load(Ordering::SeqCst) == 0;
        let left = deadline.saturating_duration_since(Instant::now());
        if done || left.is_zero() || !s.connected.load(Ordering::SeqCst) {
            return;
        }
        ring = s
            .ready
            .wait_timeout(ring, left.min(Duration::from_millis(50)))
            .map(|(g, _)| g)
            .unwrap_or_else(|e| e.into_inner().0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(i: usize, len: usize) -> LogLine {
        LogLine {
            ts_ms: i as u64,
            stream: LogStream::Stdout,
            line: format!("{i:0len$}"),
            truncated: false,
        }
    }

    fn texts(msgs: &[LogMessage]) -> Vec<String> {
        msgs.iter()
            .map(|m| match m {
                LogMessage::Line(l) => l.line.clone(),
                LogMessage::Dropped { count, .. } => format!("dropped {count}"),
                LogMessage::Hello { .. } => "hello".into(),
            })
            .collect()
    }

    fn take_all(r: &mut Ring, lines: &mut Lines) -> Vec<String> {
        texts(&lines.messages(r.take(usize::MAX), 99).0)
    }

    #[test]
    fn a_full_ring_drops_the_oldest_lines_counts_them_and_says_so_first() {
        let mut r = Ring::new(1 << 20, 3);
        let mut lines = Lines::default();
        for i in 0..5 {
            r.push_line(line(i, 1));
        }
        assert_eq!(r.len(), 3);
        assert_eq!(r.dropped_total(), 2);
        assert_eq!(take_all(&mut r, &mut lines), ["dropped 2", "2", "3", "4"]);
        // The count goes out once.
        assert!(r.is_empty());
        r.push_line(line(5, 1));
        assert_eq!(take_all(&mut r, &mut lines), ["5"]);
    }

    #[test]
    fn the_byte_bound_holds_too_and_counts_the_lines_of_dropped_reads() {
        let mut r = Ring::new(1000, 1_000_000);
        for i in 0..100 {
            // Each read: two lines of 49 bytes and their newlines.
            let data = format!("{i:049}\n{i:049}\n").as_bytes().to_vec();
            r.push_bytes(LogStream::Stdout, i, data);
        }
        assert!(r.bytes <= 1000, "{} bytes kept", r.bytes);
        assert_eq!(r.len(), 10);
        assert_eq!(r.dropped_total(), 180);
        let mut lines = Lines::default();
        let taken = take_all(&mut r, &mut lines);
        assert_eq!(taken.len(), 21);
        assert_eq!(taken[0], "dropped 180");
        assert_eq!(taken[1], format!("{:049}", 90));
        assert_eq!(taken[20], format!("{:049}", 99));
    }

    #[test]
    fn lines_continue_across_reads_and_the_stream_end_closes_the_open_one() {
        let mut r = Ring::new(1 << 20, 100);
        let mut lines = Lines::default();
        r.push_bytes(LogStream::Stdout, 1, b"one\ntw".to_vec());
        r.push_bytes(LogStream::Stderr, 2, b"err\n".to_vec());
        r.push_bytes(LogStream::Stdout, 3, b"o\nthr".to_vec());
        r.end_stream(LogStream::Stderr, 4);
        r.end_stream(LogStream::Stdout, 5);
        let (msgs, n) = lines.messages(r.take(usize::MAX), 9);
        assert_eq!(n, 4);
        let got: Vec<(String, LogStream, u64)> = msgs
            .iter()
            .filter_map(|m| match m {
                LogMessage::Line(l) => Some((l.line.clone(), l.stream, l.ts_ms)),
                _ => None,
            })
            .collect();
        assert_eq!(
            got,
            [
                ("one".into(), LogStream::Stdout, 1),
                ("err".into(), LogStream::Stderr, 2),
                ("two".into(), LogStream::Stdout, 3),
                ("thr".into(), LogStream::Stdout, 5),
            ]
        );
    }

    /// Reads dropped in the middle of a line: the line they cut is shown as
    /// truncated, the line whose start they took is skipped, and the count says how
    /// many lines were lost or cut.
    #[test]
    fn dropped_reads_cut_the_open_line_and_skip_the_headless_one() {
        let mut r = Ring::new(1 << 20, 2);
        let mut lines = Lines::default();
        r.push_bytes(LogStream::Stdout, 1, b"AAAA\nBB".to_vec());
        assert_eq!(take_all(&mut r, &mut lines), ["AAAA"]);
        // "BB|BB\nCC|CC\nDD\n": the middle read is pushed out by the next two.
        r.push_bytes(LogStream::Stdout, 2, b"BB\nCC".to_vec());
        r.push_bytes(LogStream::Stdout, 3, b"CC\nDD\n".to_vec());
        r.push_line(line(7, 1));
        assert_eq!(r.dropped_total(), 1);
        let (msgs, _) = lines.messages(r.take(usize::MAX), 99);
        assert_eq!(texts(&msgs), ["dropped 2", "BB", "DD", "7"]);
        assert!(matches!(&msgs[1], LogMessage::Line(l) if l.truncated));
        assert!(matches!(&msgs[2], LogMessage::Line(l) if !l.truncated));
    }

    #[test]
    fn failed_writes_count_as_drops() {
        let mut r = Ring::new(1000, 10);
        r.lost(4);
        assert!(!r.is_empty());
        assert_eq!(take_all(&mut r, &mut Lines::default()), ["dropped 4"]);
    }

    /// A producer pushing a million lines with nobody reading finishes quickly: the
    /// writer side never waits for the reader, and every line is either held or
    /// counted as dropped.
    #[test]
    fn pushing_never_blocks_without_a_reader() {
        let shared = Shared {
            ring: Mutex::new(Ring::new(RING_BYTES, RING_ENTRIES)),
            ready: Condvar::new(),
            readers: AtomicUsize::new(0),
            in_flight: AtomicBool::new(false),
            connected: AtomicBool::new(false),
        };
        let data = "some output line of a chatty workload\n".repeat(1000);
        let start = Instant::now();
        for _ in 0..1000 {
            drain(data.as_bytes(), LogStream::Stdout, &shared, Duration::ZERO);
        }
        assert!(start.elapsed() < Duration::from_secs(30));
        let ring = shared.ring();
        assert!(ring.bytes <= RING_BYTES);
        let held: u64 = ring.entries.iter().map(Entry::lines).sum();
        assert!(held > 0);
        assert_eq!(ring.dropped_total() + held, 1_000_000);
    }

    #[test]
    fn lines_are_split_cut_and_stamped() {
        let mut s = LineSplitter::new(LogStream::Stderr);
        let mut got = Vec::new();
        s.feed(b"one\ntw", 7, |l| got.push(l));
        s.feed(b"o\r\n", 8, |l| got.push(l));
        let long = vec![b'x'; MAX_LOG_LINE_BYTES + 10];
        s.feed(&long, 9, |l| got.push(l));
        s.feed(b"yyy\nafter", 10, |l| got.push(l));
        got.extend(s.finish(11));
        let shown: Vec<(String, bool, u64)> = got
            .iter()
            .map(|l| (l.line.chars().take(5).collect(), l.truncated, l.ts_ms))
            .collect();
        assert_eq!(
            shown,
            [
                ("one".into(), false, 7),
                ("two".into(), false, 8),
                ("xxxxx".into(), true, 9),
                ("after".into(), false, 11)
            ]
        );
        assert_eq!(got[2].line.len(), MAX_LOG_LINE_BYTES);
        assert!(got.iter().all(|l| l.stream == LogStream::Stderr));
    }

    #[test]
    fn the_log_socket_sits_next_to_the_host_channel() {
        assert_eq!(
            log_target(&HostChannel::Vsock { cid: 2, port: 5161 }),
            HostChannel::Vsock {
                cid: 2,
                port: LOG_PORT
            }
        );
        assert_eq!(
            log_target(&HostChannel::Unix("/proc/self/fd/3/v.sock_5161".into())),
            HostChannel::Unix("/proc/self/fd/3/v.sock_5163".into())
        );
    }
}
