//! The Firecracker process: the command line (plain or under `jailer`), spawning it
//! detached in its own session, waiting for its API socket, identifying it by pid and
//! start time, signalling it, and the meaning of its exit codes.
//!
//! The contract: the caller records the process in the resource ledger right after
//! [`spawn`] returns its [`ProcessId`] and before configuring it; a [`ProcessId`] is
//! only ever signalled after [`ProcessId::is_alive`] confirmed that the same process
//! (pid *and* start time) still runs, so a recycled pid is never killed. This module
//! does not talk HTTP and does not decide when to stop.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The meaning of a Firecracker exit code (v1.x `FcExitCode`).
pub fn exit_code_meaning(code: i32) -> &'static str {
    match code {
        0 => "ok",
        1 => "generic error",
        148 => "seccomp violation (bad syscall)",
        149 => "SIGBUS",
        150 => "SIGSEGV",
        151 => "SIGXFSZ (file size limit exceeded)",
        152 => "bad configuration",
        153 => "argument parsing failed",
        154 => "SIGXCPU (CPU time limit exceeded)",
        155 => "SIGPIPE",
        156 => "SIGHUP",
        157 => "SIGILL",
        _ => "unknown exit code",
    }
}

/// `exit code N (meaning)` or `killed by signal S`.
pub fn describe_exit(code: Option<i32>, signal: Option<i32>) -> String {
    match (code, signal) {
        (Some(c), _) => format!("exit code {c} ({})", exit_code_meaning(c)),
        (None, Some(s)) => format!("killed by signal {s}"),
        (None, None) => "exit status unknown (not our child)".to_string(),
    }
}

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
        start_time(pid).map(|start_time| ProcessId { pid, start_time })
    }

    /// The same process (pid and start time) still exists and is not a zombie.
    pub fn is_alive(&self) -> bool {
        match read_stat(self.pid) {
            Some((state, st)) => st == self.start_time && state != 'Z' && state != 'X',
            None => false,
        }
    }

    /// Sends `signal` if the process is still this one.
    pub fn signal(&self, signal: rustix::process::Signal) -> bool {
        if !self.is_alive() {
            return false;
        }
        let Some(pid) = rustix::process::Pid::from_raw(self.pid as i32) else {
            return false;
        };
        rustix::process::kill_process(pid, signal).is_ok()
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

fn start_time(pid: u32) -> Option<u64> {
    read_stat(pid).map(|(_, st)| st)
}

/// How one VMM is launched.
#[derive(Debug, Clone)]
pub struct Launch {
    /// Program to execute (firecracker or jailer).
    pub program: PathBuf,
    /// Its arguments.
    pub args: Vec<String>,
    /// File receiving stdout and stderr (the guest console).
    pub console_log: PathBuf,
}

/// Arguments of `firecracker` itself.
pub fn firecracker_args(api_sock: &Path, id: &str) -> Vec<String> {
    vec![
        "--api-sock".into(),
        api_sock.display().to_string(),
        "--id".into(),
        id.to_string(),
    ]
}

/// The jailer's settings for one VMM.
#[derive(Debug, Clone)]
pub struct JailerArgs<'a> {
    /// The firecracker binary (`--exec-file`).
    pub exec_file: &'a Path,
    /// Instance id (`--id`).
    pub id: &'a str,
    /// Uid the VMM runs as.
    pub uid: u32,
    /// Gid the VMM runs as.
    pub gid: u32,
    /// `--chroot-base-dir`.
    pub chroot_base_dir: &'a Path,
    /// `memory.max` of the VMM's cgroup (guest memory plus overhead).
    pub memory_max: u64,
    /// `cpu.weight` of the VMM's cgroup (1..=10000).
    pub cpu_weight: u32,
}

/// Arguments of `jailer … -- <firecracker args>`; the API socket path is relative to
/// the chroot (`/run/firecracker.socket`).
pub fn jailer_args(j: &JailerArgs<'_>) -> Vec<String> {
    vec![
        "--id".into(),
        j.id.to_string(),
        "--exec-file".into(),
        j.exec_file.display().to_string(),
        "--uid".into(),
        j.uid.to_string(),
        "--gid".into(),
        j.gid.to_string(),
        "--chroot-base-dir".into(),
        j.chroot_base_dir.display().to_string(),
        "--cgroup-version".into(),
        "2".into(),
        "--cgroup".into(),
        format!("memory.max={}", j.memory_max),
        "--cgroup".into(),
        format!("cpu.weight={}", j.cpu_weight),
        "--".into(),
        "--api-sock".into(),
        JAILED_API_SOCK.into(),
        "--id".into(),
        j.id.to_string(),
    ]
}

/// The API socket path as the jailed firecracker sees it.
pub const JAILED_API_SOCK: &str = "/run/firecracker.socket";

/// The chroot of a jailed VMM: `<base>/<exec file name>/<id>/root`.
pub fn chroot_dir(chroot_base_dir: &Path, exec_file: &Path, id: &str) -> PathBuf {
    let name = exec_file
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_else(|| "firecracker".into());
    chroot_base_dir.join(name).join(id).join("root")
}

/// A spawned VMM: its identity and the child handle (to reap it and learn its exit
/// status while this agent runs).
#[derive(Debug)]
pub struct Spawned {
    /// Identity.
    pub id: ProcessId,
    /// The child (dropping it does not kill the process).
    pub child: tokio::process::Child,
}

/// Spawns the VMM detached: own session (`setsid`), stdin from /dev/null, stdout and
/// stderr appended to the console log, not killed when the agent exits.
#[cfg(target_os = "linux")]
pub fn spawn(launch: &Launch) -> Result<Spawned, String> {
    use std::process::Stdio;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&launch.console_log)
        .map_err(|e| format!("cannot open {}: {e}", launch.console_log.display()))?;
    let log2 = log
        .try_clone()
        .map_err(|e| format!("cannot open {}: {e}", launch.console_log.display()))?;
    let mut cmd = tokio::process::Command::new(&launch.program);
    cmd.args(&launch.args)
        .stdin(Stdio::null())
        .stdout(Stdio::from(log))
        .stderr(Stdio::from(log2))
        .kill_on_drop(false);
    // SAFETY: the closure runs in the forked child before exec and only calls
    // setsid(2), which is async-signal-safe; it touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            rustix::process::setsid().map_err(std::io::Error::from)?;
            Ok(())
        });
    }
    let child = cmd.spawn().map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            format!(
                "{}: not found (is Firecracker installed?)",
                launch.program.display()
            )
        } else {
            format!("cannot execute {}: {e}", launch.program.display())
        }
    })?;
    let pid = child
        .id()
        .ok_or_else(|| format!("{} exited at once", launch.program.display()))?;
    let id = ProcessId::of(pid).unwrap_or(ProcessId { pid, start_time: 0 });
    Ok(Spawned { id, child })
}

/// Firecracker runs on Linux only; elsewhere every spawn fails with a clear message.
#[cfg(not(target_os = "linux"))]
pub fn spawn(launch: &Launch) -> Result<Spawned, String> {
    Err(format!(
        "{}: the firecracker runtime runs only on Linux",
        launch.program.display()
    ))
}

/// Waits until `socket` accepts connections, the child exits, or `deadline` passes.
pub async fn wait_for_socket(
    socket: &Path,
    child: &mut tokio::process::Child,
    deadline: Duration,
) -> Result<(), SocketWait> {
    let until = tokio::time::Instant::now() + deadline;
    loop {
        if tokio::net::UnixStream::connect(socket).await.is_ok() {
            return Ok(());
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(SocketWait::Exited(status));
        }
        if tokio::time::Instant::now() >= until {
            return Err(SocketWait::Timeout);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Why the API socket did not appear.
#[derive(Debug)]
pub enum SocketWait {
    /// The deadline passed.
    Timeout,
    /// The process exited first.
    Exited(std::process::ExitStatus),
}

/// Code and signal of an exit status.
pub fn split_status(status: std::process::ExitStatus) -> (Option<i32>, Option<i32>) {
    use std::os::unix::process::ExitStatusExt;
    (status.code(), status.signal())
}

/// The last `n` non-empty lines of a log file, joined with ` | ` (at most 1 KiB).
pub fn last_lines(path: &Path, n: usize) -> Option<String> {
    let text = std::fs::read(path).ok()?;
    let text = String::from_utf8_lossy(&text[text.len().saturating_sub(64 * 1024)..]);
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    if lines.is_empty() {
        return None;
    }
    let joined = lines[lines.len().saturating_sub(n)..].join(" | ");
    let mut s: String = joined.chars().rev().take(1024).collect();
    s = s.chars().rev().collect();
    Some(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_firecracker_exit_code_has_its_meaning() {
        let want = [
            (148, "seccomp"),
            (149, "SIGBUS"),
            (150, "SIGSEGV"),
            (151, "SIGXFSZ"),
            (152, "bad configuration"),
            (153, "argument parsing"),
            (154, "SIGXCPU"),
            (155, "SIGPIPE"),
            (156, "SIGHUP"),
            (157, "SIGILL"),
        ];
        for (code, word) in want {
            assert!(
                exit_code_meaning(code).contains(word),
                "{code}: {}",
                exit_code_meaning(code)
            );
        }
    }

    #[test]
    fn jailer_command_line_has_cgroup_v2_limits_and_the_firecracker_args() {
        let a = jailer_args(&JailerArgs {
            exec_file: Path::new("/usr/bin/firecracker"),
            id: "i-1",
            uid: 123,
            gid: 100,
            chroot_base_dir: Path::new("/srv/jailer"),
            memory_max: 1 << 30,
            cpu_weight: 100,
        });
        let s = a.join(" ");
        assert!(s.starts_with("--id i-1 --exec-file /usr/bin/firecracker --uid 123 --gid 100 --chroot-base-dir /srv/jailer --cgroup-version 2"));
        assert!(s.contains("--cgroup memory.max=1073741824 --cgroup cpu.weight=100 -- --api-sock /run/firecracker.socket --id i-1"));
        assert_eq!(
            chroot_dir(
                Path::new("/srv/jailer"),
                Path::new("/usr/bin/firecracker"),
                "i-1"
            ),
            PathBuf::from("/srv/jailer/firecracker/i-1/root")
        );
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
        assert!(!other.is_alive());
    }

    #[test]
    fn last_lines_keeps_the_tail() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("log");
        std::fs::write(&p, "a\nb\n\nc\nd\n").unwrap();
        assert_eq!(last_lines(&p, 2).as_deref(), Some("c | d"));
        assert_eq!(last_lines(&d.path().join("none"), 2), None);
    }
}
