//! The host end of a VM's log stream (guest port 5163, see
//! `plfm_guest_protocol::LogMessage`), the same for every VMM: a per-VM listener on
//! `<vsock uds>_5163` (the hybrid-vsock socket that guest connections to port 5163
//! arrive on), bound before the VMM starts and again when a running VM is adopted.
//!
//! Each line goes to the instance's `workload.log` ([`crate::logstore::LogFile`],
//! capped and rotated) and to the agent's [`LogHandle`] (shipped to the control plane
//! in connected mode). A `dropped` message becomes a marker line on stream `console`.
//! What it must not do: block on the guest (reads are the only waits), hold more than
//! one protocol line per connection in memory, or trust the guest's text (lines are
//! cut again at 16 KiB).

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use plfm_guest_protocol::{self as gp, LogMessage, LOG_PORT};
use tokio::io::AsyncReadExt;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;

use super::process::ExitStatus;
use crate::logs::LogHandle;
use crate::logstore::{ts_of_ms, LogFile, StoredLine, LOG_FILE};

/// Default cap of `workload.log` before it rotates.
pub const DEFAULT_FILE_MAX_BYTES: u64 = 10 * 1024 * 1024;

/// How long the stream is read after the VMM exited, for lines still in flight.
const DRAIN: Duration = Duration::from_secs(2);

/// Where a runtime's VMs send their lines.
#[derive(Clone)]
pub struct LogSink {
    /// The agent's shipper (a default handle discards).
    pub handle: LogHandle,
    /// Cap of each `workload.log` before rotation.
    pub file_max_bytes: u64,
}

impl Default for LogSink {
    fn default() -> Self {
        LogSink {
            handle: LogHandle::default(),
            file_max_bytes: DEFAULT_FILE_MAX_BYTES,
        }
    }
}

/// The Unix socket guest connections to the log port arrive on.
pub fn log_socket_path(vsock_uds: &Path) -> PathBuf {
    let mut s = vsock_uds.as_os_str().to_owned();
    s.push(format!("_{LOG_PORT}"));
    PathBuf::from(s)
}

/// Binds the log listener of a VM whose vsock device uses `vsock_uds` (a stale socket
/// file is replaced). Must be called inside a tokio runtime.
pub fn bind_log_listener(vsock_uds: &Path) -> io::Result<UnixListener> {
    let path = log_socket_path(vsock_uds);
    match std::fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    UnixListener::bind(&path)
}

/// One VM's log stream, ready to serve.
pub struct WorkloadLogs {
    /// Instance id (the guest's hello must name it).
    pub instance: String,
    /// The listener from [`bind_log_listener`].
    pub listener: UnixListener,
    /// The instance directory (`workload.log` goes there).
    pub dir: PathBuf,
    /// Where lines go.
    pub sink: LogSink,
}

/// Most connections served at once (the guest opens one; a reconnect may overlap the
/// end of the previous one).
const MAX_CONNECTIONS: usize = 4;

type SharedFile = std::sync::Arc<std::sync::Mutex<Option<LogFile>>>;

/// Binds the log listener of `instance` and lets `give` hand the socket to the VMM's
/// user (sandboxed VMMs connect as their own uid); the error names the socket.
pub fn listen(
    instance: &str,
    vsock_uds: &Path,
    dir: &Path,
    sink: &LogSink,
    give: impl FnOnce(&Path) -> Result<(), String>,
) -> Result<WorkloadLogs, String> {
    let sock = log_socket_path(vsock_uds);
    let listener =
        bind_log_listener(vsock_uds).map_err(|e| format!("log socket {}: {e}", sock.display()))?;
    give(&sock).map_err(|e| format!("log socket {}: {e}", sock.display()))?;
    Ok(WorkloadLogs {
        instance: instance.to_string(),
        listener,
        dir: dir.to_path_buf(),
        sink: sink.clone(),
    })
}

/// Serves the stream until the VMM has exited (`exited` turns `Some` or its sender
/// goes) and the open connections have been read for at most [`DRAIN`] more.
pub async fn serve(w: WorkloadLogs, mut exited: watch::Receiver<Option<ExitStatus>>) {
    let file = match LogFile::open(&w.dir.join(LOG_FILE), w.sink.file_max_bytes) {
        Ok(f) => Some(f),
        Err(e) => {
            tracing::warn!(instance = %w.instance, error = %e, "cannot open the workload log; lines are shipped only");
            None
        }
    };
    let file: SharedFile = std::sync::Arc::new(std::sync::Mutex::new(file));
    let target = std::sync::Arc::new((w.instance.clone(), w.sink.clone()));
    let mut conns = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            _ = async { exited.wait_for(|s| s.is_some()).await.map(|_| ()) } => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            a = w.listener.accept() => match a {
                Ok((s, _)) if conns.len() < MAX_CONNECTIONS => {
                    let (file, target) = (file.clone(), target.clone());
                    conns.spawn(async move { Conn::new(s).run(&target.0, &target.1, &file).await });
                }
                Ok(_) => tracing::warn!(instance = %w.instance, "too many log connections; one refused"),
                Err(e) => {
                    tracing::debug!(instance = %w.instance, error = %e, "log accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
    let _ = tokio::time::timeout(DRAIN, async { while conns.join_next().await.is_some() {} }).await;
    conns.abort_all();
    let mut f = lock(&file);
    if let Some(f) = f.as_mut() {
        let _ = f.flush();
    }
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

struct Conn {
    stream: UnixStream,
    pending: Vec<u8>,
    hello: bool,
}

impl Conn {
    fn new(stream: UnixStream) -> Conn {
        Conn {
            stream,
            pending: Vec::new(),
            hello: false,
        }
    }

    /// Reads until the connection ends or breaks the protocol.
    async fn run(&mut self, instance: &str, sink: &LogSink, file: &SharedFile) {
        let mut chunk = vec![0u8; 64 * 1024];
        loop {
            let n = match self.stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            self.pending.extend_from_slice(&chunk[..n]);
            let mut start = 0;
            while let Some(i) = self.pending[start..].iter().position(|b| *b == b'\n') {
                let line = &self.pending[start..start + i];
                start += i + 1;
                match gp::decode_line::<LogMessage>(line) {
                    Ok(m) => {
                        if !self.handle(m, instance, sink, &mut lock(file)) {
                            return;
                        }
                    }
                    Err(e) => {
                        tracing::debug!(instance, error = %e, "bad log message skipped");
                    }
                }
            }
            self.pending.drain(..start);
            if self.pending.len() > gp::MAX_LINE_BYTES {
                tracing::warn!(
                    instance,
                    "log message over the line limit; connection dropped"
                );
                return;
            }
            if let Some(f) = lock(file).as_mut() {
                let _ = f.flush();
            }
        }
    }

    /// Handles one message; false ends the connection.
    fn handle(
        &mut self,
        m: LogMessage,
        instance: &str,
        sink: &LogSink,
        file: &mut Option<LogFile>,
    ) -> bool {
        let stored = match m {
            LogMessage::Hello { instance_id, .. } => {
                if instance_id != instance {
                    tracing::warn!(instance, claimed = %instance_id, "log stream of another instance refused");
                    return false;
                }
                self.hello = true;
                return true;
            }
            _ if !self.hello => return false,
            LogMessage::Line(l) => {
                let (line, cut) = gp::cut_line(l.line.as_bytes());
                StoredLine {
                    ts: ts_of_ms(l.ts_ms),
                    stream: l.stream.as_str().to_string(),
                    line,
                    truncated: l.truncated || cut,
                }
            }
            LogMessage::Dropped { ts_ms, count } => StoredLine {
                ts: ts_of_ms(ts_ms),
                stream: "console".into(),
                line: gp::dropped_marker(count),
                truncated: false,
            },
        };
        if let Some(f) = file.as_mut() {
            if let Err(e) = f.append(&stored) {
                tracing::warn!(instance, error = %e, "cannot write the workload log");
                *file = None;
            }
        }
        sink.handle.push_entry(
            instance,
            &stored.stream,
            &stored.line,
            stored.truncated,
            stored.ts,
        );
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::logstore::{read, Query};
    use std::io::Write;

    /// A guest that says hello and sends lines and a drop count: each lands in
    /// `workload.log` with its stream, the drop as a console marker; a stream naming
    /// another instance is refused.
    #[tokio::test]
    async fn lines_from_the_guest_land_in_the_workload_log() {
        let d = tempfile::tempdir().unwrap();
        let uds = d.path().join("v.sock");
        let listener = bind_log_listener(&uds).unwrap();
        let (tx, rx) = watch::channel(None);
        let task = tokio::spawn(serve(
            WorkloadLogs {
                instance: "a".into(),
                listener,
                dir: d.path().to_path_buf(),
                sink: LogSink::default(),
            },
            rx,
        ));
        let sock = log_socket_path(&uds);
        let send = |msgs: Vec<String>| {
            let sock = sock.clone();
            std::thread::spawn(move || {
                let mut s = std::os::unix::net::UnixStream::connect(&sock).unwrap();
                for m in msgs {
                    s.write_all(m.as_bytes()).unwrap();
                }
            })
            .join()
            .unwrap()
        };
        send(vec![
            "{\"type\":\"hello\",\"instance_id\":\"a\"}\n".into(),
            "{\"type\":\"line\",\"ts_ms\":1000,\"stream\":\"stdout\",\"line\":\"out\"}\n".into(),
            "{\"type\":\"dropped\",\"ts_ms\":2000,\"count\":7}\n".into(),
            "{\"type\":\"line\",\"ts_ms\":3000,\"stream\":\"stderr\",\"line\":\"err\"}\n".into(),
        ]);
        send(vec![
            "{\"type\":\"hello\",\"instance_id\":\"b\"}\n".into(),
            "{\"type\":\"line\",\"ts_ms\":4000,\"stream\":\"stdout\",\"line\":\"intruder\"}\n"
                .into(),
        ]);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let got = loop {
            let mut got = Vec::new();
            read(d.path(), &Query::default(), |l| {
                got.push((l.stream, l.line))
            });
            if got.len() >= 3 || std::time::Instant::now() > deadline {
                break got;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert_eq!(
            got,
            [
                ("stdout".to_string(), "out".to_string()),
                ("console".into(), gp::dropped_marker(7)),
                ("stderr".into(), "err".into())
            ]
        );
        tx.send(Some(ExitStatus {
            code: Some(0),
            signal: None,
        }))
        .unwrap();
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .unwrap()
            .unwrap();
        let mut all = Vec::new();
        read(d.path(), &Query::default(), |l| all.push(l.line));
        assert!(!all.iter().any(|l| l == "intruder"));
    }

    struct Collect(std::sync::Mutex<Vec<crate::logs::LogEntry>>);

    #[async_trait::async_trait]
    impl crate::logs::LogDestination for Collect {
        async fn send(&self, e: &[crate::logs::LogEntry]) -> Result<(), String> {
            self.0.lock().unwrap().extend_from_slice(e);
            Ok(())
        }
    }

    /// The lines also go to the agent's shipper (connected mode: the control plane),
    /// with the guest's time, their stream and the instance.
    #[tokio::test]
    async fn lines_are_pushed_to_the_shipper_with_the_guest_time() {
        let d = tempfile::tempdir().unwrap();
        let uds = d.path().join("v.sock");
        let dest = std::sync::Arc::new(Collect(Default::default()));
        let clock: crate::clock::SharedClock =
            std::sync::Arc::new(crate::clock::SystemClock::new());
        let (_stop, stop_rx) = watch::channel(false);
        let handle = crate::logs::start(
            dest.clone(),
            clock,
            std::sync::Arc::new(crate::metrics::Metrics::new()),
            stop_rx,
        );
        let logs = listen(
            "a",
            &uds,
            d.path(),
            &LogSink {
                handle,
                file_max_bytes: 1 << 20,
            },
            |_| Ok(()),
        )
        .unwrap();
        let (_tx, rx) = watch::channel(None);
        tokio::spawn(serve(logs, rx));
        let mut s = std::os::unix::net::UnixStream::connect(log_socket_path(&uds)).unwrap();
        s.write_all(b"{\"type\":\"hello\",\"instance_id\":\"a\"}\n{\"type\":\"line\",\"ts_ms\":1700000000123,\"stream\":\"stderr\",\"line\":\"shipped\"}\n").unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while dest.0.lock().unwrap().is_empty() {
            assert!(std::time::Instant::now() < deadline, "nothing shipped");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let got = dest.0.lock().unwrap()[0].clone();
        assert_eq!(
            (
                got.instance_id.as_str(),
                got.stream.as_str(),
                got.line.as_str(),
                got.ts.as_str()
            ),
            ("a", "stderr", "shipped", "2023-11-14T22:13:20.123Z")
        );
    }
}
