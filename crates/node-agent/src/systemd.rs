//! systemd integration: the `sd_notify` protocol (`READY=1`, `STATUS=`, `WATCHDOG=1`,
//! `STOPPING=1` over `$NOTIFY_SOCKET`) and the choice of the journal as log sink.
//!
//! The contract: `READY=1` is sent once, after state recovery and the adoption of the
//! VMs found running (the daemon decides when; see `agent::run_daemon`). `WATCHDOG=1`
//! is sent every half `WATCHDOG_USEC` only while the supervisor's main loop answers a
//! ping within that half period: a main loop stuck in a reconcile pass (or anywhere
//! else) stops the pings and systemd's `WatchdogSec=` restarts the agent (VMs survive:
//! `KillMode=process`). `STATUS=` carries the instance counts by status, sent when they
//! change. Without `$NOTIFY_SOCKET` every call here does nothing. This module sends
//! notifications; it must not decide anything about instances.
//!
//! The protocol is written here (about 30 lines) rather than taken from the
//! `sd-notify` crate: its 0.5 release connects to `$NOTIFY_SOCKET` as a file path, so
//! the abstract-namespace sockets systemd may hand out (`@…`) fail, and it opens a
//! socket per message.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::instance::Status;
use crate::status::StatusManager;
use crate::supervisor::Supervisor;

/// Least time between two `STATUS=` lines.
const STATUS_EVERY: Duration = Duration::from_millis(250);

/// Environment variable of the test-only stall hook (see [`crate::supervisor`]).
pub const TESTING_STALL_ENV: &str = "PLFM_TESTING_STALL_RECONCILE_FILE";

/// A connection to the service manager's notification socket (none outside systemd).
#[derive(Debug, Default)]
pub struct Notifier {
    #[cfg(target_os = "linux")]
    socket: Option<std::os::unix::net::UnixDatagram>,
    watchdog: Option<Duration>,
}

impl Notifier {
    /// Connects to `$NOTIFY_SOCKET` (a path, or an abstract name starting with `@`) and
    /// reads `$WATCHDOG_USEC` (honoured only when `$WATCHDOG_PID` is unset or this
    /// process). Call it before starting threads: it removes the three variables so
    /// that the VMM processes the agent spawns do not inherit them.
    pub fn from_env() -> Notifier {
        let socket_var = std::env::var_os("NOTIFY_SOCKET");
        let usec = std::env::var("WATCHDOG_USEC").ok();
        let pid = std::env::var("WATCHDOG_PID").ok();
        for v in ["NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"] {
            std::env::remove_var(v);
        }
        let watchdog = watchdog_period(usec.as_deref(), pid.as_deref(), std::process::id());
        #[cfg(target_os = "linux")]
        {
            let socket = socket_var.and_then(|path| match connect(&path) {
                Ok(s) => Some(s),
                Err(e) => {
                    eprintln!(
                        "plfm-node-agent: NOTIFY_SOCKET {}: {e}; not notifying systemd",
                        path.to_string_lossy()
                    );
                    None
                }
            });
            let watchdog = watchdog.filter(|_| socket.is_some());
            Notifier { socket, watchdog }
        }
        #[cfg(not(target_os = "linux"))]
        {
            let _ = socket_var;
            Notifier { watchdog }
        }
    }

    /// Whether a service manager listens.
    pub fn enabled(&self) -> bool {
        #[cfg(target_os = "linux")]
        {
            self.socket.is_some()
        }
        #[cfg(not(target_os = "linux"))]
        {
            false
        }
    }

    /// The watchdog period (`WATCHDOG_USEC`), when systemd expects pings.
    pub fn watchdog(&self) -> Option<Duration> {
        self.watchdog
    }

    /// Sends one message (`KEY=VALUE` lines); a failure is logged, never fatal.
    pub fn notify(&self, message: &str) {
        #[cfg(target_os = "linux")]
        if let Some(s) = &self.socket {
            if let Err(e) = s.send(message.as_bytes()) {
                tracing::warn!(error = %e, "cannot notify systemd");
            }
        }
        #[cfg(not(target_os = "linux"))]
        let _ = message;
    }
}

#[cfg(target_os = "linux")]
fn connect(path: &std::ffi::OsStr) -> std::io::Result<std::os::unix::net::UnixDatagram> {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::net::{SocketAddr, UnixDatagram};
    let bytes = path.as_bytes();
    let sock = UnixDatagram::unbound()?;
    match bytes.split_first() {
        Some((b'@', name)) => sock.connect_addr(&SocketAddr::from_abstract_name(name)?)?,
        Some((b'/', _)) => sock.connect(path)?,
        _ => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "neither an absolute path nor an abstract name (@…)",
            ))
        }
    }
    Ok(sock)
}

/// The watchdog period from `WATCHDOG_USEC`, if it is meant for process `me`.
pub fn watchdog_period(usec: Option<&str>, pid: Option<&str>, me: u32) -> Option<Duration> {
    if let Some(p) = pid {
        if p.trim().parse::<u32>().ok() != Some(me) {
            return None;
        }
    }
    let us: u64 = usec?.trim().parse().ok()?;
    (us > 0).then(|| Duration::from_micros(us))
}

/// `STATUS=` text: `12 instances: 10 ready, 1 booting, 1 failed` (statuses with a count
/// of zero left out).
pub fn status_line(statuses: impl IntoIterator<Item = Status>) -> String {
    let mut counts = [0usize; Status::ALL.len()];
    let mut total = 0;
    for s in statuses {
        if let Some(i) = Status::ALL.iter().position(|x| *x == s) {
            counts[i] += 1;
            total += 1;
        }
    }
    let parts: Vec<String> = Status::ALL
        .iter()
        .zip(counts)
        .filter(|(_, n)| *n > 0)
        .map(|(s, n)| format!("{n} {}", s.as_str()))
        .collect();
    let noun = if total == 1 { "instance" } else { "instances" };
    if parts.is_empty() {
        format!("{total} {noun}")
    } else {
        format!("{total} {noun}: {}", parts.join(", "))
    }
}

/// Runs the notifications: waits for `ready` (recovery and adoption done), sends
/// `READY=1` with the first `STATUS=`, then updates `STATUS=` on every status change
/// and pings the watchdog while the supervisor's main loop answers, until `shutdown`.
pub async fn run(
    notifier: Arc<Notifier>,
    supervisor: Supervisor,
    status: Arc<StatusManager>,
    ready: impl std::future::Future<Output = ()>,
    mut shutdown: watch::Receiver<bool>,
) {
    if !notifier.enabled() {
        return;
    }
    let changes = status.subscribe_changes();
    let line = || status_line(status.list().into_iter().map(|v| v.status));
    tokio::select! {
        _ = ready => {}
        _ = shutdown.changed() => return,
    }
    let mut last = line();
    notifier.notify(&format!("READY=1\nSTATUS={last}\n"));
    tracing::info!(status = %last, "told systemd the agent is ready");
    // Without a watchdog the tick only drives nothing; an hour keeps it quiet.
    let half = notifier
        .watchdog()
        .map(|w| w / 2)
        .unwrap_or(Duration::from_secs(3600));
    let mut tick = tokio::time::interval(half);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut stalled = false;
    loop {
        tokio::select! {
            _ = changes.notified() => {
                // At most a few lines a second, however many instances change: a
                // burst of transitions ends in one line with the counts after it.
                tokio::time::sleep(STATUS_EVERY).await;
                let now = line();
                if now != last {
                    notifier.notify(&format!("STATUS={now}\n"));
                    last = now;
                }
            }
            _ = tick.tick(), if notifier.watchdog().is_some() => {
                // The ping waits at most half a period: a main loop that answers later
                // than that is not healthy enough to vouch for.
                let alive = tokio::time::timeout(half, supervisor.ping()).await;
                match alive {
                    Ok(true) => {
                        notifier.notify("WATCHDOG=1\n");
                        if stalled {
                            tracing::info!("supervisor main loop answers again; watchdog pings resume");
                            stalled = false;
                        }
                    }
                    _ => {
                        if !stalled {
                            tracing::error!(waited_ms = half.as_millis() as u64, "supervisor main loop does not answer; not pinging the systemd watchdog");
                            stalled = true;
                        }
                    }
                }
            }
            _ = shutdown.changed() => return,
        }
    }
}

/// Whether stderr is the journal: `$JOURNAL_STREAM` (`<dev>:<inode>`, set by systemd
/// for a unit whose output goes to the journal) names stderr's device and inode.
pub fn stderr_is_journal() -> bool {
    use std::os::unix::fs::MetadataExt;
    let Some(var) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = parse_journal_stream(&var.to_string_lossy()) else {
        return false;
    };
    use std::os::fd::AsFd;
    let Ok(fd) = std::io::stderr().as_fd().try_clone_to_owned() else {
        return false;
    };
    let Ok(meta) = std::fs::File::from(fd).metadata() else {
        return false;
    };
    meta.dev() == dev && meta.ino() == ino
}

/// `<dev>:<inode>` of `$JOURNAL_STREAM`.
pub fn parse_journal_stream(s: &str) -> Option<(u64, u64)> {
    let (d, i) = s.trim().split_once(':')?;
    Some((d.parse().ok()?, i.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_line_counts_by_status_and_leaves_out_zeros() {
        use Status::*;
        let mut s = vec![Ready; 10];
        s.push(Booting);
        s.push(Failed);
        assert_eq!(
            status_line(s),
            "12 instances: 1 booting, 10 ready, 1 failed"
        );
        assert_eq!(status_line([]), "0 instances");
        assert_eq!(status_line([Ready]), "1 instance: 1 ready");
    }

    #[test]
    fn watchdog_usec_is_honoured_only_for_this_process() {
        assert_eq!(
            watchdog_period(Some("30000000"), None, 7),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            watchdog_period(Some("30000000"), Some("7"), 7),
            Some(Duration::from_secs(30))
        );
        assert_eq!(watchdog_period(Some("30000000"), Some("8"), 7), None);
        assert_eq!(watchdog_period(Some("0"), None, 7), None);
        assert_eq!(watchdog_period(Some("x"), None, 7), None);
        assert_eq!(watchdog_period(None, None, 7), None);
    }

    #[test]
    fn journal_stream_is_dev_colon_inode() {
        assert_eq!(parse_journal_stream("8:12345\n"), Some((8, 12345)));
        assert_eq!(parse_journal_stream("8"), None);
        assert_eq!(parse_journal_stream("a:b"), None);
    }
}
