//! The workload process: start it as its uid/gid with its env and cwd, forward
//! SIGTERM/SIGINT/SIGHUP to it, honour host `stop` requests, reap every zombie, and
//! tell how it ended (with the OOM-kill count from `/proc/vmstat`).
//!
//! Guest init blocks the handled signals at start ([`block_signals`]) and receives them
//! through a signalfd here; the workload starts with an empty signal mask (reset in the
//! child before exec). This module must not talk to the host except for reading `stop`
//! requests; reporting is [`crate::init`]'s job.

use std::collections::BTreeMap;
use std::io;
use std::os::fd::AsFd;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{kill, SigSet, SigmaskHow, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use plfm_guest_protocol::{
    GuestMessage, Hello, HostMessage, LogStream, StatusEvent, WorkloadConfig,
    LISTEN_WATCH_LIMIT_SECS,
};

use crate::channel::{spawn_reconnect, Channel};
use crate::console;
use crate::settings::HostChannel;

/// Signals forwarded to the workload.
pub const FORWARDED: [Signal; 3] = [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP];

/// The signals guest init handles through its signalfd.
pub fn handled_signals() -> SigSet {
    let mut set = SigSet::empty();
    set.add(Signal::SIGCHLD);
    for s in FORWARDED {
        set.add(s);
    }
    set
}

/// Blocks the handled signals in guest init (call first thing, before any child exists).
pub fn block_signals() -> Result<(), String> {
    nix::sys::signal::sigprocmask(SigmaskHow::SIG_BLOCK, Some(&handled_signals()), None)
        .map_err(|e| format!("block signals: {e}"))
}

/// How the workload ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// Exit status.
    Exited(i32),
    /// Terminating signal number.
    Signaled(i32),
}

/// Starts the workload. On failure returns the exit code a shell would give (127 for a
/// missing program or cwd, 126 otherwise) and the reason. Its stdout and stderr are
/// pipes drained into the log stream ([`crate::logs::capture`]) once that runs; before,
/// it inherits the console.
pub fn spawn(cfg: &WorkloadConfig, env: &BTreeMap<String, String>) -> Result<Pid, (i32, String)> {
    let Some((program, args)) = cfg.argv.split_first() else {
        return Err((127, "workload argv is empty".to_string()));
    };
    let mut cmd = Command::new(program);
    cmd.args(args)
        .env_clear()
        .envs(env)
        .current_dir(cfg.cwd.as_deref().unwrap_or("/"))
        .uid(cfg.uid)
        .gid(cfg.gid);
    if let (Some(out), Some(err)) = (
        crate::logs::capture(LogStream::Stdout),
        crate::logs::capture(LogStream::Stderr),
    ) {
        // stdin stays the console's (reads of it block, as before).
        cmd.stdout(Stdio::from(out)).stderr(Stdio::from(err));
    }
    // SAFETY: the closure runs in the forked child before exec and only calls
    // sigprocmask(2) and setsid(2), which are async-signal-safe and touch no memory of
    // the parent. The mask is cleared explicitly because guest init blocks the signals
    // it receives through its signalfd, and a blocked mask survives exec.
    unsafe {
        cmd.pre_exec(|| {
            nix::sys::signal::sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None)
                .map_err(io::Error::from)?;
            nix::unistd::setsid().map_err(io::Error::from)?;
            Ok(())
        });
    }
    match cmd.spawn() {
        // std waits for the exec to succeed (CLOEXEC pipe), so the workload is running.
        // The Child handle is dropped on purpose: reaping is done with waitpid(-1).
        Ok(child) => Ok(Pid::from_raw(child.id() as i32)),
        Err(e) => {
            let code = if e.kind() == io::ErrorKind::NotFound {
                127
            } else {
                126
            };
            Err((code, format!("cannot start workload {program:?}: {e}")))
        }
    }
}

/// `oom_kill` counter of a `/proc/vmstat` text.
pub fn parse_oom_kill(vmstat: &str) -> Option<u64> {
    vmstat
        .lines()
        .find_map(|l| l.strip_prefix("oom_kill "))
        .and_then(|v| v.trim().parse().ok())
}

/// Current kernel OOM-kill count, if readable.
pub fn oom_kills() -> Option<u64> {
    std::fs::read_to_string("/proc/vmstat")
        .ok()
        .as_deref()
        .and_then(parse_oom_kill)
}

/// Reaps every exited child without blocking; returns the workload's end if it was
/// among them.
fn reap(workload: Pid) -> Option<Ended> {
    let mut ended = None;
    loop {
        match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(pid, code)) if pid == workload => {
                ended = Some(Ended::Exited(code))
            }
            Ok(WaitStatus::Signaled(pid, sig, _)) if pid == workload => {
                ended = Some(Ended::Signaled(sig as i32))
            }
            Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => return ended,
            // Not the workload: an exec session's command waits for it, or an orphan.
            Ok(WaitStatus::Exited(pid, code)) => crate::exec::reaped(pid, Ended::Exited(code)),
            Ok(WaitStatus::Signaled(pid, sig, _)) => {
                crate::exec::reaped(pid, Ended::Signaled(sig as i32))
            }
            Ok(_) => continue,
            Err(Errno::EINTR) => continue,
            Err(e) => {
                console::line(&format!("waitpid: {e}"));
                return ended;
            }
        }
    }
}

/// How to find the host again after losing the channel.
#[derive(Debug, Clone)]
pub struct Reconnect {
    /// Where the host listens.
    pub target: HostChannel,
    /// The hello of the first handshake (sent again with `resumed: true`).
    pub hello: Hello,
}

/// Waits for the workload, forwarding signals and honouring `stop` from the host, and
/// reaping every zombie meanwhile. A `stop {deadline_ms}` sends SIGTERM to the workload
/// and SIGKILL to every process at the deadline. A closed or broken host channel is
/// dropped (the workload keeps running) and, with `reconnect`, re-established in the
/// background (see [`spawn_reconnect`]).
pub fn supervise(
    workload: Pid,
    channel: &mut Option<Channel>,
    reconnect: Option<&Reconnect>,
    listen_port: Option<u16>,
) -> Result<Ended, String> {
    let mut listen = listen_port.map(ListenWatch::new);
    let sfd = SignalFd::with_flags(
        &handled_signals(),
        SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK,
    )
    .map_err(|e| format!("signalfd: {e}"))?;
    if let Some(ch) = channel.as_mut() {
        ch.set_nonblocking_reads();
    }
    let mut kill_at: Option<Instant> = None;
    let start_reconnect = |what: &str| {
        reconnect.map(|r| {
            console::line(&format!(
                "{what}; the workload keeps running, reconnecting in the background"
            ));
            spawn_reconnect(r.target.clone(), r.hello.clone(), workload.as_raw() as u32)
        })
    };
    let mut pending = if channel.is_none() {
        start_reconnect("no host channel")
    } else {
        None
    };
    // Reap anything that ended before the signalfd existed.
    if let Some(end) = reap(workload) {
        return Ok(end);
    }
    loop {
        if let Some(rx) = &pending {
            match rx.try_recv() {
                Ok(mut ch) => {
                    ch.set_nonblocking_reads();
                    *channel = Some(ch);
                    pending = None;
                    console::line("reconnected to the host");
                }
                Err(std::sync::mpsc::TryRecvError::Empty) => {}
                Err(std::sync::mpsc::TryRecvError::Disconnected) => pending = None,
            }
        }
        // Wake up for the kill deadline, and every 250 ms while reconnecting.
        if let Some(w) = listen.as_mut() {
            match w.check() {
                Watch::Waiting => {}
                Watch::Listening => {
                    let port = w.port;
                    if let Some(ch) = channel.as_mut() {
                        let _ = ch.send(&GuestMessage::Status(StatusEvent::Listening { port }));
                    }
                    console::line(&format!("the workload listens on port {port}"));
                    listen = None;
                }
                Watch::GaveUp => listen = None,
            }
        }
        let wake = [
            kill_at.map(|t| t.saturating_duration_since(Instant::now())),
            pending.as_ref().map(|_| Duration::from_millis(250)),
            listen
                .as_ref()
                .map(|w| w.next.saturating_duration_since(Instant::now())),
        ]
        .into_iter()
        .flatten()
        .min();
        let timeout = match wake {
            Some(d) => {
                PollTimeout::try_from(d.as_millis().min(60_000) as i32).unwrap_or(PollTimeout::MAX)
            }
            None => PollTimeout::NONE,
        };
        let (sig_ready, ch_ready) = {
            let mut fds = vec![PollFd::new(sfd.as_fd(), PollFlags::POLLIN)];
            if let Some(ch) = channel.as_ref() {
                fds.push(PollFd::new(ch.as_fd(), PollFlags::POLLIN));
            }
            let buffered = channel.as_ref().is_some_and(Channel::has_buffered_message);
            let timeout = if buffered { PollTimeout::ZERO } else { timeout };
            match poll(&mut fds, timeout) {
                Ok(_) | Err(Errno::EINTR) => {}
                Err(e) => return Err(format!("poll: {e}")),
            }
            let ready = |f: &PollFd| f.revents().is_some_and(|r| !r.is_empty());
            (ready(&fds[0]), buffered || fds.get(1).is_some_and(ready))
        };
        if sig_ready {
            while let Ok(Some(info)) = sfd.read_signal() {
                match Signal::try_from(info.ssi_signo as i32) {
                    Ok(Signal::SIGCHLD) => {}
                    Ok(sig) => {
                        console::line(&format!(
                            "forwarding {sig} to the workload (pid {workload})"
                        ));
                        let _ = kill(workload, sig);
                    }
                    Err(_) => {}
                }
            }
            if let Some(end) = reap(workload) {
                return Ok(end);
            }
        }
        if ch_ready {
            if let Some(ch) = channel.as_mut() {
                loop {
                    match ch.poll_message() {
                        Ok(None) => break,
                        Ok(Some(Some(HostMessage::Stop { deadline_ms }))) => {
                            console::line(&format!(
                                "stop requested: SIGTERM to the workload, SIGKILL in {deadline_ms} ms"
                            ));
                            let _ = kill(workload, Signal::SIGTERM);
                            let at = Instant::now() + Duration::from_millis(deadline_ms);
                            kill_at = Some(kill_at.map_or(at, |k| k.min(at)));
                        }
                        Ok(Some(Some(HostMessage::Config(_)))) => {
                            console::line("ignoring a second config from the host");
                        }
                        Ok(Some(None)) => {
                            *channel = None;
                            pending = start_reconnect("host closed the channel");
                            break;
                        }
                        Err(e) => {
                            *channel = None;
                            pending = start_reconnect(&format!("host channel dropped: {e}"));
                            break;
                        }
                    }
                }
            }
        }
        if kill_at.is_some_and(|t| Instant::now() >= t) {
            console::line("stop deadline reached: killing every process");
            let _ = kill(Pid::from_raw(-1), Signal::SIGKILL);
            kill_at = None;
        }
    }
}

/// Watches the socket tables for a TCP socket listening on the health check's port,
/// so the host can probe the moment the workload can answer instead of at its next
/// retry. Polling `/proc/net/tcp{,6}` (every 10 ms for 5 s, then every 100 ms, for
/// [`LISTEN_WATCH_LIMIT_SECS`] at most) is hand-written: it is two small reads, and a
/// netlink `sock_diag` client or a procfs crate would add more to the static init than
/// the few lines here.
struct ListenWatch {
    port: u16,
    started: Instant,
    next: Instant,
}

enum Watch {
    Waiting,
    Listening,
    GaveUp,
}

impl ListenWatch {
    fn new(port: u16) -> Self {
        let now = Instant::now();
        ListenWatch {
            port,
            started: now,
            next: now,
        }
    }

    fn check(&mut self) -> Watch {
        let now = Instant::now();
        if now < self.next {
            return Watch::Waiting;
        }
        let listening = ["/proc/net/tcp", "/proc/net/tcp6"]
            .iter()
            .any(|t| std::fs::read_to_string(t).is_ok_and(|table| listening_in(&table, self.port)));
        if listening {
            return Watch::Listening;
        }
        let age = now.duration_since(self.started);
        if age > Duration::from_secs(LISTEN_WATCH_LIMIT_SECS) {
            return Watch::GaveUp;
        }
        let pace = if age < Duration::from_secs(5) {
            10
        } else {
            100
        };
        self.next = now + Duration::from_millis(pace);
        Watch::Waiting
    }
}

/// Whether a `/proc/net/tcp`-format table has a socket in state LISTEN (`0A`) on
/// `port` (any local address).
pub(crate) fn listening_in(table: &str, port: u16) -> bool {
    table.lines().skip(1).any(|line| {
        let mut cols = line.split_whitespace();
        let local = cols.nth(1);
        let state = cols.nth(1);
        let local_port = local
            .and_then(|l| l.rsplit(':').next())
            .and_then(|p| u16::from_str_radix(p, 16).ok());
        state == Some("0A") && local_port == Some(port)
    })
}

/// Kills every remaining process and reaps them, for at most `grace`.
pub fn kill_and_reap_all(grace: Duration) {
    let _ = kill(Pid::from_raw(-1), Signal::SIGKILL);
    let deadline = Instant::now() + grace;
    loop {
        match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            Err(Errno::ECHILD) => return,
            Ok(WaitStatus::StillAlive) => {
                if Instant::now() >= deadline {
                    console::line("some processes did not exit after SIGKILL");
                    return;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_listening_socket_is_found_by_port_in_either_table() {
        let tcp = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1234 1 0000000000000000 100 0 0 10 0
   1: 0100007F:0050 0100007F:9C40 01 00000000:00000000 00:00000000 00000000     0        0 1235 1 0000000000000000 20 4 30 10 -1
";
        assert!(listening_in(tcp, 8080), "0x1F90 = 8080 in LISTEN");
        assert!(
            !listening_in(tcp, 80),
            "port 80 only has an established socket"
        );
        assert!(!listening_in(tcp, 9000));
        let tcp6 = "  sl  local_address                         remote_address                        st
   0: 00000000000000000000000000000000:1F90 00000000000000000000000000000000:0000 0A 00000000:00000000
";
        assert!(listening_in(tcp6, 8080));
        assert!(!listening_in("", 8080));
        assert!(!listening_in("header\ngarbage line\n", 8080));
    }

    #[test]
    fn oom_kill_counter_is_read_from_vmstat() {
        assert_eq!(
            parse_oom_kill("nr_free_pages 5\noom_kill 3\npgfault 9\n"),
            Some(3)
        );
        assert_eq!(parse_oom_kill("nr_free_pages 5\n"), None);
    }

    #[test]
    fn empty_argv_is_refused() {
        let cfg = WorkloadConfig {
            argv: vec![],
            cwd: None,
            env: BTreeMap::new(),
            uid: 0,
            gid: 0,
            listen_port: None,
        };
        assert_eq!(spawn(&cfg, &BTreeMap::new()).unwrap_err().0, 127);
    }
}
