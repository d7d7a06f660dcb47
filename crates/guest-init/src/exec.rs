//! Exec sessions inside the VM: guest init listens on vsock port 5162 (a Unix socket in
//! test mode) and runs one command per connection in the workload's root, with its
//! environment, uid/gid and working directory, under a pseudo-terminal when asked.
//!
//! Framing is the shared exec format ([`plfm_guest_protocol::exec`]). Limits:
//! [`MAX_SESSIONS`] at once (a further session is refused with an exit frame saying
//! so); a session lasts at most [`SESSION_LIMIT`]; when the host side goes away the
//! command's process group gets SIGHUP, SIGTERM after [`TERM_AFTER`] and SIGKILL after
//! [`KILL_AFTER`].
//!
//! Guest init is PID 1 and reaps every child with `waitpid(-1)` in its supervision loop,
//! so a session cannot wait for its own child: it registers the pid in [`CHILDREN`]
//! (holding the lock across the fork, so the reaper cannot see the pid before it is
//! registered) and the reaper hands the status over through [`reaped`].
//!
//! This module must not touch the workload or the host channel.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixListener;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use nix::sys::signal::{killpg, SigSet, SigmaskHow, Signal};
use nix::sys::socket::{self, sockopt, AddressFamily, SockFlag, SockType, VsockAddr};
use nix::sys::time::TimeVal;
use nix::unistd::Pid;
use plfm_guest_protocol::exec::{
    kind, read_frame, write_frame, EndReason, ExecControl, ExecExit, ExecInit, Frame, MAX_DATA,
};
use plfm_guest_protocol::WorkloadConfig;

use crate::console;
use crate::settings::HostChannel;
use crate::workload::Ended;

/// Sessions served at once.
pub const MAX_SESSIONS: usize = 2;
/// Longest session.
pub const SESSION_LIMIT: Duration = Duration::from_secs(3600);
/// After the host side went away: SIGTERM this long after the SIGHUP.
pub const TERM_AFTER: Duration = Duration::from_secs(5);
/// After the host side went away: SIGKILL this long after the SIGHUP.
pub const KILL_AFTER: Duration = Duration::from_secs(30);
/// Longest wait for the init frame of a new connection.
const INIT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long output still drains after the command ended (a background process may
/// keep the terminal open).
const DRAIN_AFTER_EXIT: Duration = Duration::from_secs(1);

/// What an exec session runs with: the workload's identity and environment.
#[derive(Debug, Clone)]
pub struct Context {
    /// This VM's instance id (a session for another one is refused).
    pub instance_id: String,
    /// The workload's config (uid, gid, cwd).
    pub workload: WorkloadConfig,
    /// The workload's environment.
    pub env: BTreeMap<String, String>,
}

/// Sessions' children by pid, waiting for their exit status.
static CHILDREN: Mutex<Option<HashMap<i32, Sender<Event>>>> = Mutex::new(None);
static ACTIVE: AtomicUsize = AtomicUsize::new(0);

fn children() -> MutexGuard<'static, Option<HashMap<i32, Sender<Event>>>> {
    CHILDREN.lock().unwrap_or_else(|p| p.into_inner())
}

/// Hands the exit of a child that is not the workload to its session, if it has one.
/// Called by the supervision loop's reaper.
pub fn reaped(pid: Pid, ended: Ended) {
    let tx = children().as_mut().and_then(|m| m.remove(&pid.as_raw()));
    if let Some(tx) = tx {
        let _ = tx.send(Event::Exited(ended));
    }
}

enum Event {
    Exited(Ended),
    Disconnected,
}

/// A bound listener, ready to serve once the workload runs.
pub struct Listener(OwnedFd);

/// Binds the exec listener (before the root switch, so a test-mode Unix path is still
/// reachable).
pub fn bind(at: &HostChannel) -> Result<Listener, String> {
    match at {
        HostChannel::Unix(path) => {
            let _ = std::fs::remove_file(path);
            UnixListener::bind(path)
                .map(|l| Listener(OwnedFd::from(l)))
                .map_err(|e| format!("exec listener {}: {e}", path.display()))
        }
        HostChannel::Vsock { cid, port } => {
            let fd = socket::socket(
                AddressFamily::Vsock,
                SockType::Stream,
                SockFlag::SOCK_CLOEXEC,
                None,
            )
            .map_err(|e| format!("exec listener: socket: {e}"))?;
            socket::bind(fd.as_raw_fd(), &VsockAddr::new(*cid, *port))
                .map_err(|e| format!("exec listener: bind vsock port {port}: {e}"))?;
            socket::listen(
                &fd,
                socket::Backlog::new(8).unwrap_or(socket::Backlog::MAXCONN),
            )
            .map_err(|e| format!("exec listener: listen: {e}"))?;
            Ok(Listener(fd))
        }
    }
}

/// Serves sessions from `listener` in a background thread for the life of guest init.
pub fn serve(listener: Listener, ctx: Context) {
    let ctx = Arc::new(ctx);
    let spawned = std::thread::Builder::new()
        .name("exec".into())
        .spawn(move || loop {
            match socket::accept4(listener.0.as_raw_fd(), SockFlag::SOCK_CLOEXEC) {
                Ok(fd) => {
                    // SAFETY: accept4 returned a new descriptor that nothing else owns.
                    let conn = unsafe { OwnedFd::from_raw_fd(fd) };
                    let ctx = ctx.clone();
                    let _ = std::thread::Builder::new()
                        .name("exec-session".into())
                        .spawn(move || session(conn, &ctx));
                }
                Err(nix::errno::Errno::EINTR) | Err(nix::errno::Errno::ECONNABORTED) => {}
                Err(e) => {
                    console::line(&format!("exec listener: accept: {e}; exec is off"));
                    return;
                }
            }
        });
    if let Err(e) = spawned {
        console::line(&format!("cannot start the exec listener thread: {e}"));
    }
}

/// Frames to the host, shared by the output pumps and the session; closed after the
/// exit frame so that nothing follows it.
#[derive(Clone)]
struct Out(Arc<Mutex<Option<File>>>);

impl Out {
    fn send(&self, frame: &Frame) -> bool {
        let mut g = self.0.lock().unwrap_or_else(|p| p.into_inner());
        match g.as_mut() {
            Some(f) => {
                if write_frame(f, frame).is_err() {
                    *g = None;
                    false
                } else {
                    true
                }
            }
            None => false,
        }
    }

    fn finish(&self, exit: &ExecExit) {
        self.send(&Frame::json(kind::EXIT, exit));
        let mut g = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(f) = g.take() {
            let _ = socket::shutdown(f.as_raw_fd(), socket::Shutdown::Both);
        }
    }
}

struct Slot;

impl Slot {
    fn take() -> Option<Slot> {
        ACTIVE
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < MAX_SESSIONS).then_some(n + 1)
            })
            .ok()
            .map(|_| Slot)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        ACTIVE.fetch_sub(1, Ordering::SeqCst);
    }
}

fn session(conn: OwnedFd, ctx: &Context) {
    let Ok(write_fd) = conn.try_clone() else {
        return;
    };
    let out = Out(Arc::new(Mutex::new(Some(File::from(write_fd)))));
    let mut input = File::from(conn);
    let tv = TimeVal::new(INIT_TIMEOUT.as_secs() as libc::time_t, 0);
    let _ = socket::setsockopt(&input, sockopt::ReceiveTimeout, &tv);
    let init: ExecInit = match read_frame(&mut input) {
        Ok(Some(f)) if f.kind == kind::INIT => match f.parse() {
            Ok(i) => i,
            Err(e) => return out.finish(&ExecExit::refused(e.to_string())),
        },
        Ok(Some(f)) => {
            return out.finish(&ExecExit::refused(format!(
                "the first frame must be init (0x20), got 0x{:02x}",
                f.kind
            )))
        }
        Ok(None) | Err(_) => return,
    };
    let _ = socket::setsockopt(&input, sockopt::ReceiveTimeout, &TimeVal::new(0, 0));
    if init.instance_id != ctx.instance_id {
        return out.finish(&ExecExit::refused(format!(
            "this is instance {}, not {}",
            ctx.instance_id, init.instance_id
        )));
    }
    if init.command.is_empty() {
        return out.finish(&ExecExit::refused("the command is empty"));
    }
    let Some(_slot) = Slot::take() else {
        return out.finish(&ExecExit::limit(format!(
            "too many exec sessions: at most {MAX_SESSIONS} at once per instance"
        )));
    };
    let (tx, rx) = mpsc::channel();
    let started = match start(&init, ctx, tx.clone()) {
        Ok(s) => s,
        Err((code, message)) => {
            return out.finish(&ExecExit {
                exit_code: Some(code),
                reason: EndReason::Exited,
                message: Some(message),
            })
        }
    };
    console::line(&format!(
        "exec session {:?}: pid {} runs {:?}",
        init.session_id, started.pid, init.command[0]
    ));
    let pumps: Vec<_> = started
        .outputs
        .into_iter()
        .map(|(k, f)| {
            let out = out.clone();
            std::thread::spawn(move || pump(f, k, &out))
        })
        .collect();
    {
        let stdin = started.stdin;
        let master = started.master;
        let pid = started.pid;
        let _ = std::thread::Builder::new()
            .name("exec-input".into())
            .spawn(move || relay_input(input, stdin, master, pid, tx));
    }
    let (ended, reason) = wait(started.pid, &rx);
    let drain_until = Instant::now() + DRAIN_AFTER_EXIT;
    for p in pumps {
        while !p.is_finished() && Instant::now() < drain_until {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    let exit_code = match ended {
        Some(Ended::Exited(c)) => Some(c),
        Some(Ended::Signaled(s)) => Some(128 + s),
        None => None,
    };
    let reason = match (reason, ended) {
        (EndReason::Exited, Some(Ended::Signaled(_))) => EndReason::Killed,
        (r, _) => r,
    };
    console::line(&format!(
        "exec session {:?} ended: {} (exit code {exit_code:?})",
        init.session_id,
        reason.as_str()
    ));
    out.finish(&ExecExit {
        exit_code,
        reason,
        message: None,
    });
}

struct Started {
    pid: Pid,
    /// Where stdin bytes go (the PTY master or the stdin pipe).
    stdin: Option<File>,
    /// The PTY master, for resizes.
    master: Option<Arc<OwnedFd>>,
    outputs: Vec<(u8, File)>,
}

fn start(init: &ExecInit, ctx: &Context, tx: Sender<Event>) -> Result<Started, (i32, String)> {
    let (program, args) = init
        .command
        .split_first()
        .ok_or((127, "empty command".to_string()))?;
    let mut cmd = Command::new(program);
    let mut env = ctx.env.clone();
    if init.tty {
        env.entry("TERM".into()).or_insert_with(|| "xterm".into());
    }
    env.extend(init.env.clone());
    cmd.args(args)
        .env_clear()
        .envs(&env)
        .current_dir(ctx.workload.cwd.as_deref().unwrap_or("/"))
        .uid(ctx.workload.uid)
        .gid(ctx.workload.gid);
    let io_err = |e: nix::errno::Errno| (126, format!("exec: {e}"));
    let mut master = None;
    if init.tty {
        let ws = nix::pty::Winsize {
            ws_row: init.rows.max(1),
            ws_col: init.cols.max(1),
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        let pty = nix::pty::openpty(Some(&ws), None).map_err(io_err)?;
        let slave = pty.slave;
        cmd.stdin(Stdio::from(
            slave.try_clone().map_err(|e| (126, e.to_string()))?,
        ))
        .stdout(Stdio::from(
            slave.try_clone().map_err(|e| (126, e.to_string()))?,
        ))
        .stderr(Stdio::from(slave));
        master = Some(Arc::new(pty.master));
    } else {
        cmd.stdin(if init.stdin {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    }
    let tty = init.tty;
    // SAFETY: the closure runs in the forked child before exec and only calls
    // sigprocmask(2), setsid(2) and ioctl(TIOCSCTTY), which are async-signal-safe and
    // touch no memory of the parent. The signal mask is cleared because guest init blocks
    // the signals it handles through its signalfd and a blocked mask survives exec.
    unsafe {
        cmd.pre_exec(move || {
            nix::sys::signal::sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None)
                .map_err(io::Error::from)?;
            nix::unistd::setsid().map_err(io::Error::from)?;
            if tty && libc::ioctl(0, libc::TIOCSCTTY, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    // Hold the registry across the fork: the reaper looks the pid up only after we
    // registered it.
    let mut reg = children();
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.kind() == io::ErrorKind::NotFound {
                127
            } else {
                126
            };
            return Err((code, format!("cannot start {program:?}: {e}")));
        }
    };
    let pid = Pid::from_raw(child.id() as i32);
    reg.get_or_insert_with(HashMap::new)
        .insert(pid.as_raw(), tx);
    drop(reg);
    // The Child is dropped without waiting: the supervision loop reaps it.
    let mut outputs = Vec::new();
    let stdin = match &master {
        Some(m) => {
            let dup = m.try_clone().map_err(|e| (126, e.to_string()))?;
            outputs.push((kind::STDOUT, File::from(dup)));
            Some(File::from(m.try_clone().map_err(|e| (126, e.to_string()))?))
        }
        None => {
            if let Some(o) = child.stdout.take() {
                outputs.push((kind::STDOUT, File::from(OwnedFd::from(o))));
            }
            if let Some(e) = child.stderr.take() {
                outputs.push((kind::STDERR, File::from(OwnedFd::from(e))));
            }
            child.stdin.take().map(|i| File::from(OwnedFd::from(i)))
        }
    };
    Ok(Started {
        pid,
        stdin,
        master,
        outputs,
    })
}

/// Copies one output of the command into frames until it ends (EOF, or EIO once
/// every holder of a PTY's other side has exited).
fn pump(mut from: File, k: u8, out: &Out) {
    let mut buf = vec![0u8; MAX_DATA];
    loop {
        match from.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                if !out.send(&Frame {
                    kind: k,
                    payload: buf[..n].to_vec(),
                }) {
                    return;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

fn set_size(master: &OwnedFd, cols: u16, rows: u16) {
    let ws = libc::winsize {
        ws_row: rows.max(1),
        ws_col: cols.max(1),
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one winsize from the pointer, which outlives the call;
    // the descriptor is the PTY master this session owns.
    unsafe {
        libc::ioctl(master.as_raw_fd() as RawFd, libc::TIOCSWINSZ, &ws);
    }
}

fn signal_named(name: &str) -> Option<Signal> {
    match name.trim_start_matches("SIG") {
        "INT" => Some(Signal::SIGINT),
        "TERM" => Some(Signal::SIGTERM),
        "KILL" => Some(Signal::SIGKILL),
        "HUP" => Some(Signal::SIGHUP),
        "QUIT" => Some(Signal::SIGQUIT),
        "WINCH" => Some(Signal::SIGWINCH),
        _ => None,
    }
}

/// Reads frames from the host: stdin bytes, resizes, signals, close. Tells the session
/// when the host side is gone.
fn relay_input(
    mut conn: File,
    mut stdin: Option<File>,
    master: Option<Arc<OwnedFd>>,
    pid: Pid,
    tx: Sender<Event>,
) {
    loop {
        match read_frame(&mut conn) {
            Ok(Some(f)) => match f.kind {
                kind::STDIN => {
                    if let Some(w) = stdin.as_mut() {
                        if !f.payload.is_empty() && w.write_all(&f.payload).is_err() {
                            stdin = None;
                        }
                    }
                }
                kind::CONTROL => match f.parse::<ExecControl>() {
                    Ok(ExecControl::Resize { cols, rows }) => {
                        if let Some(m) = &master {
                            set_size(m, cols, rows);
                        }
                    }
                    Ok(ExecControl::Signal { signal }) => match signal_named(&signal) {
                        Some(sig) => {
                            let _ = killpg(pid, sig);
                        }
                        None => console::line(&format!("exec: unknown signal {signal:?} ignored")),
                    },
                    Ok(ExecControl::Close) => {
                        if master.is_some() {
                            // End of file on a terminal is its EOF character (^D).
                            if let Some(w) = stdin.as_mut() {
                                let _ = w.write_all(&[4]);
                            }
                        }
                        stdin = None;
                    }
                    Err(e) => console::line(&format!("exec: {e}")),
                },
                other => console::line(&format!("exec: frame 0x{other:02x} ignored")),
            },
            Ok(None) | Err(_) => {
                let _ = tx.send(Event::Disconnected);
                return;
            }
        }
    }
}

/// Waits for the command to end, applying the session limit and the disconnect
/// escalation. Returns how it ended (`None`: never seen) and why.
fn wait(pid: Pid, rx: &mpsc::Receiver<Event>) -> (Option<Ended>, EndReason) {
    let limit = Instant::now() + SESSION_LIMIT;
    let mut reason = EndReason::Exited;
    // (when, signal) still to send after a disconnect or the time limit.
    let mut escalation: Vec<(Instant, Signal)> = Vec::new();
    loop {
        let next = escalation
            .first()
            .map(|(t, _)| *t)
            .unwrap_or(limit)
            .min(limit);
        match rx.recv_timeout(next.saturating_duration_since(Instant::now())) {
            Ok(Event::Exited(e)) => return (Some(e), reason),
            Ok(Event::Disconnected) => {
                if reason == EndReason::Exited {
                    reason = EndReason::ClientDisconnect;
                    let now = Instant::now();
                    let _ = killpg(pid, Signal::SIGHUP);
                    escalation = vec![
                        (now + TERM_AFTER, Signal::SIGTERM),
                        (now + KILL_AFTER, Signal::SIGKILL),
                    ];
                }
            }
            Err(RecvTimeoutError::Timeout) => {
                let now = Instant::now();
                if now >= limit && reason != EndReason::Timeout {
                    reason = EndReason::Timeout;
                    let _ = killpg(pid, Signal::SIGKILL);
                    // Once more, then give up waiting for the reap.
                    escalation = vec![(now + Duration::from_secs(5), Signal::SIGKILL)];
                    continue;
                }
                if let Some((t, sig)) = escalation.first().copied() {
                    if now >= t {
                        let _ = killpg(pid, sig);
                        escalation.remove(0);
                    }
                } else if now >= limit {
                    // Killed and still not reaped: give up waiting.
                    return (None, reason);
                }
            }
            Err(RecvTimeoutError::Disconnected) => return (None, reason),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_two_sessions_take_a_slot_and_a_released_slot_is_free_again() {
        let a = Slot::take().expect("first");
        let b = Slot::take().expect("second");
        assert!(Slot::take().is_none(), "a third session must be refused");
        drop(a);
        let c = Slot::take().expect("a freed slot is reusable");
        drop((b, c));
    }

    #[test]
    fn signal_names_map_with_or_without_the_sig_prefix() {
        assert_eq!(signal_named("INT"), Some(Signal::SIGINT));
        assert_eq!(signal_named("SIGTERM"), Some(Signal::SIGTERM));
        assert_eq!(signal_named("BOGUS"), None);
    }
}
