//! The workload's output on its way to the host: pipes for the workload's stdout and
//! stderr, guest init's console lines, a bounded ring of stamped lines, and a sender
//! thread that ships them on the log port (vsock [`LOG_PORT`], see
//! `plfm_guest_protocol::LogMessage`).
//!
//! The contract: the workload is never blocked on its output. Reader threads drain the
//! pipes as fast as the workload writes and only ever take a short lock on the ring;
//! when the ring is full (the host is slow or absent), the oldest lines are dropped and
//! counted, and the host is told how many ([`LogMessage::Dropped`], shown as a marker
//! line). The sender runs at nice 19 (a flood of output costs the workload the pipe
//! readers' work, not the shipping's) and reconnects every [`RECONNECT_INTERVAL`] when
//! the connection is lost (agent restart). The workload's output is not copied to the serial console
//! (slow under emulation). This module must not talk on the host channel (port 5161)
//! and must not block PID 1: everything here runs in its own threads, except
//! [`flush`], which waits with a deadline.

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

/// Bytes of line text the ring holds at most.
pub const RING_BYTES: usize = 1024 * 1024;
/// Lines the ring holds at most.
pub const RING_LINES: usize = 4096;
/// Pause between connection attempts.
pub const RECONNECT_INTERVAL: Duration = Duration::from_secs(1);
/// Longest one write to the host may block before the connection is given up.
pub const SEND_TIMEOUT: Duration = Duration::from_secs(5);
/// Most lines per write.
const BATCH: usize = 1024;

/// Bounded buffer of lines: pushing never waits; past either bound the oldest lines go
/// and are counted, and the count goes out as a [`LogMessage::Dropped`] before the
/// lines that follow.
#[derive(Debug)]
pub struct Ring {
    lines: VecDeque<LogLine>,
    bytes: usize,
    max_bytes: usize,
    max_lines: usize,
    dropped: u64,
    dropped_total: u64,
}

impl Ring {
    /// An empty ring of at most `max_bytes` of text and `max_lines` lines.
    pub fn new(max_bytes: usize, max_lines: usize) -> Ring {
        Ring {
            lines: VecDeque::new(),
            bytes: 0,
            max_bytes,
            max_lines: max_lines.max(1),
            dropped: 0,
            dropped_total: 0,
        }
    }

    /// Adds a line, dropping the oldest ones while over a bound.
    pub fn push(&mut self, l: LogLine) {
        self.bytes += l.line.len();
        self.lines.push_back(l);
        while self.lines.len() > self.max_lines
            || (self.bytes > self.max_bytes && self.lines.len() > 1)
        {
            if let Some(old) = self.lines.pop_front() {
                self.bytes -= old.line.len();
                self.dropped += 1;
                self.dropped_total += 1;
            }
        }
    }

    /// Counts `n` lines lost on the way out (a failed write).
    pub fn lost(&mut self, n: u64) {
        self.dropped += n;
        self.dropped_total += n;
    }

    /// Takes up to `max` lines to send, preceded by the drop count when lines were
    /// dropped since the last take. Returns the messages and how many lines they hold.
    pub fn take(&mut self, max: usize, now_ms: u64) -> (Vec<LogMessage>, usize) {
        let mut out = Vec::new();
        if self.dropped > 0 {
            out.push(LogMessage::Dropped {
                ts_ms: now_ms,
                count: std::mem::take(&mut self.dropped),
            });
        }
        let n = self.lines.len().min(max);
        for l in self.lines.drain(..n) {
            self.bytes -= l.line.len();
            out.push(LogMessage::Line(l));
        }
        (out, n)
    }

    /// Lines waiting.
    pub fn len(&self) -> usize {
        self.lines.len()
    }

    /// Nothing waiting (neither lines nor a drop count).
    pub fn is_empty(&self) -> bool {
        self.lines.is_empty() && self.dropped == 0
    }

    /// Lines dropped since the start.
    pub fn dropped_total(&self) -> u64 {
        self.dropped_total
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

    /// Feeds bytes; calls `emit` for each complete (or cut) line.
    pub fn feed(&mut self, mut data: &[u8], ts_ms: u64, mut emit: impl FnMut(LogLine)) {
        while !data.is_empty() {
            let nl = data.iter().position(|b| *b == b'\n');
            let (chunk, rest, ends) = match nl {
                Some(i) => (&data[..i], &data[i + 1..], true),
                None => (data, &data[data.len()..], false),
            };
            data = rest;
            if self.skipping {
                self.skipping = !ends;
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

    fn push(&self, l: LogLine) {
        self.ring().push(l);
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
        ring: Mutex::new(Ring::new(RING_BYTES, RING_LINES)),
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
        s.push(LogLine {
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
    shared.readers.fetch_add(1, Ordering::SeqCst);
    let reader_shared = shared.clone();
    let spawned = std::thread::Builder::new()
        .name(format!("log-{}", stream.as_str()))
        .spawn(move || {
            drain(std::fs::File::from(r), stream, &reader_shared);
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

fn drain(mut r: impl Read, stream: LogStream, shared: &Shared) {
    let mut split = LineSplitter::new(stream);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match r.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                let ts = now_ms();
                let mut got = Vec::new();
                split.feed(&buf[..n], ts, |l| got.push(l));
                if !got.is_empty() {
                    let mut ring = shared.ring();
                    for l in got {
                        ring.push(l);
                    }
                    drop(ring);
                    shared.ready.notify_one();
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    if let Some(l) = split.finish(now_ms()) {
        shared.push(l);
    }
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
            let (batch, n) = {
                let mut ring = shared.ring();
                while ring.is_empty() {
                    ring = shared
                        .ready
                        .wait_timeout(ring, Duration::from_secs(1))
                        .map(|(g, _)| g)
                        .unwrap_or_else(|e| e.into_inner().0);
                }
                shared.in_flight.store(true, Ordering::SeqCst);
                ring.take(BATCH, now_ms())
            };
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

    #[test]
    fn a_full_ring_drops_the_oldest_lines_counts_them_and_says_so_first() {
        let mut r = Ring::new(1 << 20, 3);
        for i in 0..5 {
            r.push(line(i, 1));
        }
        assert_eq!(r.len(), 3);
        assert_eq!(r.dropped_total(), 2);
        let (msgs, n) = r.take(10, 99);
        assert_eq!(n, 3);
        assert_eq!(texts(&msgs), ["dropped 2", "2", "3", "4"]);
        // The count goes out once.
        assert!(r.is_empty());
        r.push(line(5, 1));
        assert_eq!(texts(&r.take(10, 99).0), ["5"]);
    }

    #[test]
    fn the_byte_bound_holds_too() {
        let mut r = Ring::new(1000, 1_000_000);
        for i in 0..100 {
            r.push(line(i, 100));
        }
        assert!(r.bytes <= 1000, "{} bytes kept", r.bytes);
        assert_eq!(r.len(), 10);
        assert_eq!(r.dropped_total(), 90);
        let (msgs, _) = r.take(3, 0);
        assert_eq!(texts(&msgs)[0], "dropped 90");
        assert_eq!(r.len(), 7);
    }

    #[test]
    fn failed_writes_count_as_drops() {
        let mut r = Ring::new(1000, 10);
        r.lost(4);
        assert!(!r.is_empty());
        assert_eq!(texts(&r.take(10, 0).0), ["dropped 4"]);
    }

    /// A producer pushing a million lines with nobody reading finishes quickly: the
    /// writer side never waits for the reader.
    #[test]
    fn pushing_never_blocks_without_a_reader() {
        let shared = Shared {
            ring: Mutex::new(Ring::new(RING_BYTES, RING_LINES)),
            ready: Condvar::new(),
            readers: AtomicUsize::new(0),
            in_flight: AtomicBool::new(false),
            connected: AtomicBool::new(false),
        };
        let data = "some output line of a chatty workload\n".repeat(1000);
        let start = Instant::now();
        for _ in 0..1000 {
            drain(data.as_bytes(), LogStream::Stdout, &shared);
        }
        assert!(start.elapsed() < Duration::from_secs(30));
        let ring = shared.ring();
        assert_eq!(ring.len(), RING_LINES);
        assert_eq!(ring.dropped_total(), 1_000_000 - RING_LINES as u64);
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
