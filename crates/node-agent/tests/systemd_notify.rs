//! systemd integration through the agent binary: a fake `$NOTIFY_SOCKET` (a Unix
//! datagram socket this test binds) and `$WATCHDOG_USEC`, as systemd sets them for a
//! `Type=notify` unit with `WatchdogSec=`.
//!
//! The main loop is stalled honestly with the test-only hook
//! `PLFM_TESTING_STALL_RECONCILE_FILE`: while that file exists, every reconcile pass
//! (plan apply) of the supervisor waits, so the supervisor's loop is stuck in it.

mod common;

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::agent::AgentProcess;
use common::assignment_json;
use common::wait::poll_until;
use plfm_node_agent::instance::Status;

struct Env {
    root: tempfile::TempDir,
}

impl Env {
    fn new() -> Env {
        let root = common::agent::mock_agent_dir(
            "sd-node",
            100,
            "prepare_ms = 10\nboot_ms = 50\nstop_ms = 10",
        );
        Env { root }
    }

    fn path(&self, p: &str) -> PathBuf {
        self.root.path().join(p)
    }

    fn assign(&self, id: &str) {
        std::fs::write(
            self.path("desired").join(format!("{id}.json")),
            serde_json::to_vec(&assignment_json(id, 1)).unwrap(),
        )
        .unwrap();
    }
}

/// The fake service manager's end of `$NOTIFY_SOCKET`.
struct Manager {
    sock: UnixDatagram,
    path: PathBuf,
}

impl Manager {
    fn bind(dir: &Path) -> Manager {
        let path = dir.join("notify.sock");
        let sock = UnixDatagram::bind(&path).unwrap();
        Manager { sock, path }
    }

    /// The next datagram, or `None` when none comes within `within`.
    fn recv(&self, within: Duration) -> Option<String> {
        self.sock
            .set_read_timeout(Some(within.max(Duration::from_millis(1))))
            .unwrap();
        let mut buf = [0u8; 4096];
        match self.sock.recv(&mut buf) {
            Ok(n) => Some(String::from_utf8_lossy(&buf[..n]).into_owned()),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                None
            }
            Err(e) => panic!("notify socket: {e}"),
        }
    }

    /// Every datagram that arrives during `period`.
    fn collect(&self, period: Duration) -> Vec<String> {
        let end = Instant::now() + period;
        let mut out = Vec::new();
        while let Some(left) = end.checked_duration_since(Instant::now()) {
            match self.recv(left) {
                Some(m) => out.push(m),
                None => break,
            }
        }
        out
    }

    /// Waits up to `within` for a datagram containing `line`; returns it and what
    /// came before it.
    fn wait_for(
        &self,
        line: &str,
        within: Duration,
        agent: &AgentProcess,
    ) -> (String, Vec<String>) {
        let end = Instant::now() + within;
        let mut before = Vec::new();
        while let Some(left) = end.checked_duration_since(Instant::now()) {
            match self.recv(left) {
                Some(m) if m.lines().any(|l| l == line) => return (m, before),
                Some(m) => before.push(m),
                None => break,
            }
        }
        panic!(
            "no {line} within {within:?}; got {before:?}\n{}",
            agent.diagnostics()
        );
    }
}

fn is_watchdog(m: &str) -> bool {
    m.lines().any(|l| l == "WATCHDOG=1")
}

/// READY=1 comes only after the VM found running at start was adopted (the first
/// reconcile pass, held back here by the stall hook, adopts it), with the instance
/// counts in STATUS=; WATCHDOG=1 comes every half WATCHDOG_USEC while the main loop
/// answers, stops while a reconcile pass is stuck, and resumes after; SIGTERM sends
/// STOPPING=1.
#[test]
fn ready_follows_adoption_and_the_watchdog_stops_while_the_main_loop_is_stalled() {
    let env = Env::new();
    env.assign("adopt-1");
    let config = env.path("agent.toml");

    // A first agent boots the instance and leaves its VM running (detach).
    let mut first = AgentProcess::spawn(&config, &env.path("agent-1.log"));
    poll_until("adopt-1 ready", Duration::from_secs(20), || {
        first.instance_where(|v| v.instance_id == "adopt-1" && v.status == Status::Ready)
    });
    assert!(first.terminate(Duration::from_secs(20)).success());
    drop(first);

    // The second one starts under a fake systemd, its first reconcile pass stalled.
    let manager = Manager::bind(env.root.path());
    let stall = env.path("stall");
    std::fs::write(&stall, "").unwrap();
    let log = env.path("agent-2.log");
    let mut agent = AgentProcess::spawn_with(
        &config,
        &log,
        &[
            ("NOTIFY_SOCKET", manager.path.to_str().unwrap()),
            ("WATCHDOG_USEC", "1000000"),
            (
                plfm_node_agent::systemd::TESTING_STALL_ENV,
                stall.to_str().unwrap(),
            ),
        ],
    );
    agent.wait_api(Duration::from_secs(20));
    let adopted = |log: &str| {
        log.lines()
            .any(|l| l.contains("adopted running VM") && l.contains("adopt-1"))
    };
    // Recovered, API up, but the pass that adopts is held: no READY yet.
    let early = manager.collect(Duration::from_millis(1500));
    assert!(
        !early.iter().any(|m| m.contains("READY=1")),
        "READY=1 before adoption: {early:?}"
    );
    assert!(
        !adopted(&agent.log()),
        "adopted while stalled?\n{}",
        agent.log()
    );

    std::fs::remove_file(&stall).unwrap();
    let (ready, _) = manager.wait_for("READY=1", Duration::from_secs(10), &agent);
    // The adoption was logged before READY=1 was sent.
    assert!(
        adopted(&agent.log()),
        "READY=1 came before the adoption was logged\n{}",
        agent.log()
    );
    assert!(
        ready.contains("STATUS=1 instance: 1 ready"),
        "STATUS with the counts: {ready:?}"
    );

    // Healthy: pings every ~0.5 s.
    let pings = manager
        .collect(Duration::from_millis(1600))
        .into_iter()
        .filter(|m| is_watchdog(m))
        .count();
    assert!(pings >= 2, "{pings} pings in 1.6 s with WATCHDOG_USEC=1s");

    // Stall the next reconcile pass: a new assignment makes the rescan apply a plan.
    std::fs::write(&stall, "").unwrap();
    env.assign("adopt-2");
    // The pings stop: within a deadline, a window of 5 half-periods passes without one
    // (the first window may still hold pings from before the pass got stuck).
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut windows = Vec::new();
    loop {
        agent.assert_running();
        let window = manager.collect(Duration::from_millis(2500));
        let pings = window.iter().filter(|m| is_watchdog(m)).count();
        windows.push(pings);
        if pings == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "WATCHDOG=1 kept coming while the main loop is stalled (pings per 2.5 s window: {windows:?})\n{}",
            agent.log()
        );
    }
    assert!(
        agent
            .log()
            .contains("supervisor main loop does not answer; not pinging the systemd watchdog"),
        "the agent says why it stopped pinging\n{}",
        agent.log()
    );

    // Released: the pings resume (and the new instance is applied).
    std::fs::remove_file(&stall).unwrap();
    manager.wait_for("WATCHDOG=1", Duration::from_secs(10), &agent);
    poll_until("adopt-2 ready", Duration::from_secs(20), || {
        agent.instance_where(|v| v.instance_id == "adopt-2" && v.status == Status::Ready)
    });

    // STATUS follows the counts.
    let (status, _) = {
        let end = Instant::now() + Duration::from_secs(10);
        let mut seen = Vec::new();
        loop {
            let left = end
                .checked_duration_since(Instant::now())
                .unwrap_or_else(|| panic!("no STATUS with 2 ready: {seen:?}"));
            if let Some(m) = manager.recv(left) {
                if m.contains("STATUS=2 instances: 2 ready") {
                    break (m, seen);
                }
                seen.push(m);
            }
        }
    };
    assert!(status.contains("2 ready"));

    let pid = agent.pid();
    assert!(
        agent.terminate(Duration::from_secs(20)).success(),
        "pid {pid}"
    );
    let rest = manager.collect(Duration::from_millis(300));
    assert!(
        rest.iter().any(|m| m.lines().any(|l| l == "STOPPING=1")),
        "STOPPING=1 on SIGTERM: {rest:?}"
    );
}

/// When `$JOURNAL_STREAM` names the agent's stderr (as systemd sets it for a unit
/// logging to the journal) the agent logs with structured fields: to the journal's
/// socket when there is one, else JSON lines on stderr with the same fields. Here
/// there is no journal (checked), so the fallback is what can be seen.
#[test]
fn logs_are_structured_when_stderr_is_the_journal() {
    use std::os::unix::fs::MetadataExt;
    if Path::new("/run/systemd/journal/socket").exists() {
        // The lines would go to this host's real journal: nothing to read back here,
        // and no missing prerequisite either (so no gate failure).
        eprintln!("skipped: a journal runs on this host; the JSON fallback is not reachable");
        return;
    }
    let env = Env::new();
    env.assign("j-1");
    let log = env.path("agent.log");
    std::fs::write(&log, "").unwrap();
    let meta = std::fs::metadata(&log).unwrap();
    let stream = format!("{}:{}", meta.dev(), meta.ino());
    let agent = AgentProcess::spawn_with(
        &env.path("agent.toml"),
        &log,
        &[("JOURNAL_STREAM", &stream)],
    );
    poll_until("j-1 ready", Duration::from_secs(20), || {
        agent.instance_where(|v| v.instance_id == "j-1" && v.status == Status::Ready)
    });
    let text = agent.log();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(
        lines.iter().any(|v| v["fields"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("journal"))),
        "says why it falls back:\n{text}"
    );
    assert!(
        lines.iter().any(|v| v["fields"]["instance"] == "j-1"),
        "structured instance field:\n{text}"
    );

    // A JOURNAL_STREAM that is not stderr (another file) changes nothing: text lines.
    drop(agent);
    let other = env.path("other");
    std::fs::write(&other, "").unwrap();
    let m = std::fs::metadata(&other).unwrap();
    let log2 = env.path("agent-2.log");
    let agent = AgentProcess::spawn_with(
        &env.path("agent.toml"),
        &log2,
        &[("JOURNAL_STREAM", &format!("{}:{}", m.dev(), m.ino()))],
    );
    agent.wait_api(Duration::from_secs(20));
    let text = agent.log();
    assert!(
        text.lines()
            .next()
            .is_some_and(|l| serde_json::from_str::<serde_json::Value>(l).is_err()),
        "text lines:\n{text}"
    );
}
