//! VMM processes: identity (pid + start time), detached spawn into the instance's host
//! cgroup, waits (socket, exit, gone) and the meaning of an exit status.
//!
//! The contract: a [`ProcessId`] is only ever signalled after [`ProcessId::is_alive`]
//! confirmed that the same process (pid *and* start time) still runs, so a recycled pid
//! is never killed. The caller records a spawned process in the resource ledger right
//! after [`spawn_detached`] returns and before using it. This module does not decide
//! when to stop a VMM and knows no VMM's dialect (the runtimes pass their own exit-code
//! meanings to [`ExitStatus::describe`]).

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::runtime::Cause;

/// A process identified by pid and start time (`/proc/<pid>/stat` field 22).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessId {
    /// Pid.
    pub pid: u32,
    /// Start time in clock ticks since boot.
    pub start_time: u64,
}

impl ProcessId {
    /// Reads the identity of a running pid.
    pub fn of(pid: u32) -> Option<ProcessId> {
        read_stat(pid).map(|(_, start_time)| ProcessId { pid, start_time })
    }

    /// The same process (pid and start time) still exists and is not a zombie.
    pub fn is_alive(&self) -> bool {
        match read_stat(self.pid) {
            Some((state, st)) => st == self.start_time && state != 'Z' && state != 'X',
            None => false,
        }
    }

    /// Sends `signal` if the process is still this one; whether it was sent.
    pub fn signal(&self, signal: rustix::process::Signal) -> bool {
        if !self.is_alive() {
            return false;
        }
        let Some(pid) = rustix::process::Pid::from_raw(self.pid as i32) else {
            return false;
        };
        rustix::process::kill_process(pid, signal).is_ok()
    }

    /// Waits (polling `/proc`) until the process is gone; `false` if it still runs at
    /// `within`.
    pub async fn wait_gone(&self, within: Duration) -> bool {
        let end = tokio::time::Instant::now() + within;
        while self.is_alive() {
            if tokio::time::Instant::now() >= end {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        true
    }

    /// SIGKILL, then waits up to `within` until it is gone.
    pub async fn kill(&self, within: Duration) -> bool {
        self.signal(rustix::process::Signal::KILL);
        self.wait_gone(within).await
    }
}

/// `(state, start_time)` from `/proc/<pid>/stat`.
fn read_stat(pid: u32) -> Option<(char, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // comm may contain spaces and parentheses: the fields after it follow the last ')'.
    let rest = &text[text.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    // After `state` (field 3) comes field 4; start time is field 22.
    let start = fields.nth(18)?.parse().ok()?;
    Some((state, start))
}

/// How a VMM process ended: its exit code, or the signal that killed it; neither when
/// it was not our child (adopted after an agent restart).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExitStatus {
    /// Exit code.
    pub code: Option<i32>,
    /// Killing signal.
    pub signal: Option<i32>,
}

impl ExitStatus {
    /// From a child's status.
    pub fn of(status: std::process::ExitStatus) -> ExitStatus {
        use std::os::unix::process::ExitStatusExt;
        ExitStatus {
            code: status.code(),
            signal: status.signal(),
        }
    }

    /// `exit code N (meaning)`, `killed by signal S` or `exit status unknown`; the
    /// meaning of a code comes from the VMM (`meaning` returns `None` for codes it
    /// gives no meaning).
    pub fn describe(&self, meaning: fn(i32) -> Option<&'static str>) -> String {
        match (self.code, self.signal) {
            (Some(c), _) => match meaning(c) {
                Some(m) => format!("exit code {c} ({m})"),
                None => format!("exit code {c}"),
            },
            (None, Some(s)) => format!("killed by signal {s}"),
            (None, None) => "exit status unknown (not our child)".to_string(),
        }
    }
}

/// How the end of a VMM process is observed.
pub enum Watch {
    /// Our child: waited on (and reaped), so its exit status is known.
    Child(tokio::process::Child),
    /// Adopted after an agent restart: polled through `/proc`.
    Adopted(ProcessId),
}

impl Watch {
    /// Resolves when the process has exited.
    pub async fn exited(&mut self) -> ExitStatus {
        match self {
            Watch::Child(c) => match c.wait().await {
                Ok(st) => ExitStatus::of(st),
                Err(_) => ExitStatus::default(),
            },
            Watch::Adopted(p) => {
                while p.is_alive() {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                ExitStatus::default()
            }
        }
    }

    /// Our child's status if it has exited already (never for an adopted process).
    pub fn try_exited(&mut self) -> Option<ExitStatus> {
        match self {
            Watch::Child(c) => c.try_wait().ok().flatten().map(ExitStatus::of),
            Watch::Adopted(p) => (!p.is_alive()).then(ExitStatus::default),
        }
    }

    /// Kills our child (or the adopted process) and waits for it (bounded).
    pub async fn kill(&mut self) {
        match self {
            Watch::Child(c) => {
                let _ = c.start_kill();
                let _ = tokio::time::timeout(Duration::from_secs(5), c.wait()).await;
            }
            Watch::Adopted(p) => {
                p.kill(Duration::from_secs(5)).await;
            }
        }
    }
}

/// A spawned VMM process: its identity and its child handle.
pub struct Spawned {
    /// Identity (pid + start time).
    pub id: ProcessId,
    /// The child (dropping it does not kill the process).
    pub child: tokio::process::Child,
}

/// Environment variable of a test fault: when `1`, the agent aborts right after it
/// spawned a VMM process and before the caller could record it (the "agent died
/// between spawn and record" case the conformance suite causes). Never set in
/// production; read only here.
pub const FAULT_ABORT_AFTER_SPAWN: &str = "PLFM_FAULT_ABORT_AFTER_VMM_SPAWN";

/// Spawns `program` detached: its own session (`setsid`), stdin from /dev/null,
/// stdout and stderr appended to `log`, not killed when the agent exits, and placed in
/// the host cgroup `cgroup` (if any: every directory of it, so memory, pids and cpu
/// limits apply) before its first instruction.
#[cfg(target_os = "linux")]
pub fn spawn_detached(
    program: &Path,
    args: &[String],
    log: &Path,
    cgroup: Option<&crate::cgroup::Entry>,
) -> Result<Spawned, Cause> {
    spawn_detached_as(program, args, log, cgroup, None)
}

/// [`spawn_detached`], running as `identity` (uid, gid; no supplementary groups) when
/// given: the child joins the cgroup as root, then drops to the identity before exec.
/// Needs root to change identity.
#[cfg(target_os = "linux")]
pub fn spawn_detached_as(
    program: &Path,
    args: &[String],
    log: &Path,
    cgroup: Option<&crate::cgroup::Entry>,
    identity: Option<(u32, u32)>,
) -> Result<Spawned, Cause> {
    let cgroup = cgroup
        .map(crate::cgroup::Entry::try_clone)
        .transpose()
        .map_err(|e| {
            Cause::because(
                format!("cannot start {}: cgroup.procs", program.display()),
                e,
            )
        })?;
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|e| Cause::because(format!("cannot open {}", log.display()), e))?;
    let err = out
        .try_clone()
        .map_err(|e| Cause::because(format!("cannot open {}", log.display()), e))?;
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .stdin(std::process::Stdio::null())
        .stdout(out)
        .stderr(err)
        .kill_on_drop(false);
    // SAFETY: the closure runs in the forked child before exec and only calls setsid(2),
    // write(2) of a static buffer to each descriptor opened before the fork
    // (`Entry::join`: one per cgroup hierarchy, iterated without allocating), and setgroups(2)/setgid(2)/setuid(2) with plain integers; all are
    // async-signal-safe system calls (std's own `uid()` makes the same calls in the
    // child), allocate nothing and touch no memory of the parent.
    unsafe {
        cmd.pre_exec(move || {
            rustix::process::setsid().map_err(std::io::Error::from)?;
            if let Some(c) = &cgroup {
                c.join()?;
            }
            if let Some((uid, gid)) = identity {
                if nix::libc::setgroups(0, std::ptr::null()) != 0
                    || nix::libc::setgid(gid) != 0
                    || nix::libc::setuid(uid) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let child = cmd.spawn().map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            Cause::because(
                format!("{}: not found (is it installed?)", program.display()),
                e,
            )
        } else {
            Cause::because(format!("cannot execute {}", program.display()), e)
        }
    })?;
    let pid = child
        .id()
        .ok_or_else(|| Cause::new(format!("{} exited at once", program.display())))?;
    if std::env::var(FAULT_ABORT_AFTER_SPAWN).as_deref() == Ok("1") {
        tracing::error!(
            pid,
            "{FAULT_ABORT_AFTER_SPAWN}=1: aborting before the VMM is recorded"
        );
        std::process::abort();
    }
    let id = ProcessId::of(pid).unwrap_or(ProcessId { pid, start_time: 0 });
    Ok(Spawned { id, child })
}

/// Where `program` (a name looked up in `PATH`, or a path) is for a process that runs
/// as an unprivileged user: the first candidate that others may execute, the file and
/// every directory above it (a copy under `/root`, mode 0700, is skipped). The error
/// names what was found and why it cannot be used.
pub fn resolve_for_others(program: &str) -> Result<PathBuf, String> {
    use std::os::unix::fs::PermissionsExt;
    let open_to_others = |p: &Path| {
        let exec =
            std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o001 != 0);
        exec && p
            .ancestors()
            .skip(1)
            .all(|d| std::fs::metadata(d).is_ok_and(|m| m.permissions().mode() & 0o001 != 0))
    };
    let candidates: Vec<PathBuf> = if program.contains('/') {
        vec![PathBuf::from(program)]
    } else {
        std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).map(|d| d.join(program)).collect())
            .unwrap_or_default()
    };
    let found: Vec<&PathBuf> = candidates.iter().filter(|c| c.is_file()).collect();
    if let Some(p) = found.iter().find(|c| open_to_others(c)) {
        return Ok((*p).clone());
    }
    match found.first() {
        Some(p) => Err(format!(
            "{} cannot be executed by the unprivileged VMM user (the file or a directory above it is closed to other users); install it where others may run it, e.g. /usr/local/bin",
            p.display()
        )),
        None => Err(format!("{program}: not found (is it installed?)")),
    }
}

/// VMMs run only on Linux; elsewhere every spawn fails with a clear message.
#[cfg(not(target_os = "linux"))]
pub fn spawn_detached(
    program: &Path,
    _args: &[String],
    _log: &Path,
    _cgroup: Option<&()>,
) -> Result<Spawned, Cause> {
    Err(Cause::new(format!(
        "{}: VMMs run only on Linux",
        program.display()
    )))
}

/// Why a socket did not appear.
#[derive(Debug)]
pub enum SocketWait {
    /// The deadline passed.
    Timeout,
    /// The process exited first.
    Exited(ExitStatus),
}

/// Whether a Unix socket is bound at `path` and listening, from `/proc/net/unix` of
/// this network namespace (a server binds, then listens: in between, a client's
/// connect is refused). `None` when that table cannot be read.
pub fn unix_listening(path: &Path) -> Option<bool> {
    /// `__SO_ACCEPTCON` in the table's Flags column: the socket listens.
    const ACCEPTCON: u32 = 1 << 16;
    let table = std::fs::read_to_string("/proc/net/unix").ok()?;
    let want = path.to_str()?;
    Some(table.lines().skip(1).any(|l| {
        let cols: Vec<&str> = l.split_whitespace().collect();
        cols.len() >= 8
            && cols[7] == want
            && u32::from_str_radix(cols[3], 16).is_ok_and(|f| f & ACCEPTCON != 0)
    }))
}

/// Waits until `socket` exists and listens (or, with `connect`, accepts a
/// connection), the process exits, or `within` passes. Polls every 2 ms: the socket
/// usually appears a few ms after the spawn, and this wait is on every boot's critical
/// path. Without `connect`, a socket that exists but does not listen yet is waited for
/// (QEMU's connect to vhost-device-vsock's socket was refused in that window, under
/// load); where `/proc/net/unix` cannot be read, existing is enough.
pub async fn wait_for_socket(
    socket: &Path,
    process: &mut Watch,
    within: Duration,
    connect: bool,
) -> Result<(), SocketWait> {
    let until = tokio::time::Instant::now() + within;
    loop {
        let ready = socket.exists()
            && if connect {
                tokio::net::UnixStream::connect(socket).await.is_ok()
            } else {
                unix_listening(socket).unwrap_or(true)
            };
        if ready {
            return Ok(());
        }
        if let Some(status) = process.try_exited() {
            return Err(SocketWait::Exited(status));
        }
        if tokio::time::Instant::now() >= until {
            return Err(SocketWait::Timeout);
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(target_os = "linux")]
    #[test]
    fn a_bound_socket_counts_as_ready_only_once_it_listens() {
        use std::os::fd::AsRawFd;
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("s.sock");
        assert_eq!(unix_listening(&path), Some(false));
        // Bound, not listening: what a server looks like between bind(2) and listen(2).
        let fd = nix::sys::socket::socket(
            nix::sys::socket::AddressFamily::Unix,
            nix::sys::socket::SockType::Stream,
            nix::sys::socket::SockFlag::empty(),
            None,
        )
        .unwrap();
        let addr = nix::sys::socket::UnixAddr::new(&path).unwrap();
        nix::sys::socket::bind(fd.as_raw_fd(), &addr).unwrap();
        assert!(path.exists());
        assert_eq!(unix_listening(&path), Some(false));
        nix::sys::socket::listen(&fd, nix::sys::socket::Backlog::new(1).unwrap()).unwrap();
        assert_eq!(unix_listening(&path), Some(true));
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn own_process_is_alive_and_a_wrong_start_time_is_not() {
        let me = ProcessId::of(std::process::id()).expect("own stat");
        assert!(me.is_alive());
        let other = ProcessId {
            start_time: me.start_time + 1,
            ..me
        };
        assert!(
            !other.is_alive(),
            "a recycled pid must not count as the same process"
        );
        assert!(!other.signal(rustix::process::Signal::CONT));
    }

    #[test]
    fn exit_statuses_are_described_with_the_vmms_meanings() {
        let m = |c: i32| (c == 152).then_some("bad configuration");
        let s = |code, signal| ExitStatus { code, signal };
        assert_eq!(
            s(Some(152), None).describe(m),
            "exit code 152 (bad configuration)"
        );
        assert_eq!(s(Some(3), None).describe(m), "exit code 3");
        assert_eq!(s(None, Some(9)).describe(m), "killed by signal 9");
        assert_eq!(
            s(None, None).describe(m),
            "exit status unknown (not our child)"
        );
    }

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn a_socket_wait_ends_when_the_process_exits_first() {
        let d = tempfile::tempdir().unwrap();
        let spawned = spawn_detached(
            Path::new("/bin/sh"),
            &["-c".into(), "exit 7".into()],
            &d.path().join("log"),
            None,
        )
        .unwrap();
        let mut w = Watch::Child(spawned.child);
        let r = wait_for_socket(
            &d.path().join("none.sock"),
            &mut w,
            Duration::from_secs(10),
            false,
        )
        .await;
        assert!(
            matches!(r, Err(SocketWait::Exited(ExitStatus { code: Some(7), .. }))),
            "{r:?}"
        );
        let spawned = spawn_detached(
            Path::new("/bin/sleep"),
            &["5".into()],
            &d.path().join("log"),
            None,
        )
        .unwrap();
        let id = spawned.id;
        let mut w = Watch::Child(spawned.child);
        let r = wait_for_socket(
            &d.path().join("none.sock"),
            &mut w,
            Duration::from_millis(50),
            false,
        )
        .await;
        assert!(matches!(r, Err(SocketWait::Timeout)), "{r:?}");
        assert!(id.kill(Duration::from_secs(5)).await || !id.is_alive());
        w.kill().await;
        let missing = spawn_detached(
            Path::new("/nonexistent/vmm"),
            &[],
            &d.path().join("log"),
            None,
        );
        let e = missing.err().unwrap();
        assert!(e.to_string().contains("/nonexistent/vmm: not found"), "{e}");
        let io = std::error::Error::source(&e).expect("the spawn's I/O error is the source");
        assert!(io.to_string().contains("No such file"), "{io}");
    }
}
