//! Issue 16 (retention): a removed instance keeps only its logs, they can still be
//! read, and they are deleted once `logs.retention` has passed on the agent's clock
//! (a manual clock here), by the same sweeper the daemon runs.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{assignment, id, plan};
use plfm_node_agent::agent::{Node, NodeOptions};
use plfm_node_agent::clock::{Clock, ManualClock};
use plfm_node_agent::instance::Status;
use plfm_node_agent::logstore::{self, LogFile, Query, StoredLine};
use plfm_node_agent::runtime::mock::{MockConfig, MockRuntime};
use plfm_node_agent::secrets::DirSecrets;
use plfm_node_agent::status::outbox::LocalSink;

/// Waits (real time, 20 s) for `cond`, advancing the clock by `step` between checks.
async fn wait_for(clock: &ManualClock, what: &str, step: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        clock.advance(step);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn names(dir: &std::path::Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_instance_keeps_only_its_logs_until_the_retention_ends() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let clock = Arc::new(ManualClock::new());
    let mock = Arc::new(MockRuntime::new(
        MockConfig::default(),
        clock.clone(),
        Some(data.clone()),
        None,
    ));
    let node = Node::start(NodeOptions {
        data_dir: data.clone(),
        runtime: mock.clone(),
        clock: clock.clone(),
        secrets: Arc::new(DirSecrets::new(tmp.path().join("secrets"))),
        sink: Arc::new(LocalSink),
        boot_timeout: Duration::from_secs(30),
        max_instances: 100,
        metrics: Arc::new(plfm_node_agent::metrics::Metrics::new()),
    })
    .await
    .unwrap();
    node.supervisor
        .apply(plan(1, vec![assignment("ret-a", 1)]))
        .await;
    let ready = || node.status.get(&id("ret-a")).map(|v| v.status) == Some(Status::Ready);
    wait_for(&clock, "ret-a ready", Duration::from_millis(200), ready).await;

    // What the VMM layer leaves in a running instance's directory: its workload log
    // (written as the log listener writes it), a console log, a disk.
    let dir = data.join("instances/ret-a");
    std::fs::create_dir_all(&dir).unwrap();
    let mut log = LogFile::open(&dir.join(logstore::LOG_FILE), 1 << 20).unwrap();
    for (stream, line) in [("stdout", "hello"), ("stderr", "oops")] {
        log.append(&StoredLine {
            ts: logstore::ts_of_ms(1_700_000_000_000),
            stream: stream.into(),
            line: line.into(),
            truncated: false,
        })
        .unwrap();
    }
    log.flush().unwrap();
    std::fs::write(dir.join("console.log"), "boot\n").unwrap();
    std::fs::write(dir.join("scratch.ext4"), vec![0u8; 4096]).unwrap();

    // Removal: only the logs (and the removal mark) stay, and they read back.
    node.supervisor.apply(plan(2, vec![])).await;
    wait_for(&clock, "ret-a retired", Duration::from_millis(200), || {
        dir.join(logstore::REMOVED_MARKER).exists()
    })
    .await;
    assert_eq!(names(&dir), ["console.log", "removed", "workload.log"]);
    let mut lines = Vec::new();
    logstore::read(&dir, &Query::default(), |l| lines.push((l.stream, l.line)));
    // The mock runtime's own console lines come first (it writes them as the real
    // runtimes' guests do), then what was appended here.
    assert!(
        lines.contains(&(
            "console".to_string(),
            "[mock] guest-init: workload started".to_string()
        )),
        "{lines:?}"
    );
    let workload: Vec<_> = lines.into_iter().filter(|(s, _)| s != "console").collect();
    assert_eq!(
        workload,
        [
            ("stdout".to_string(), "hello".to_string()),
            ("stderr".into(), "oops".into())
        ]
    );

    // Before the retention ends a sweep keeps them; the daemon's sweeper deletes them
    // once the clock passed it.
    let day = Duration::from_secs(86_400);
    let removed = logstore::removed_at(&dir).unwrap();
    let almost = removed + chrono::Duration::hours(23);
    assert!(logstore::sweep(&data.join("instances"), almost, day, 1 << 30).is_empty());
    assert!(dir.join("workload.log").exists());
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let sweeper = tokio::spawn(logstore::run_sweeper(
        data.join("instances"),
        clock.clone(),
        day,
        1 << 30,
        stop_rx,
    ));
    clock.advance(Duration::from_secs(23 * 3600));
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(dir.exists(), "deleted before the retention ended");
    assert!(clock.wall() < removed + chrono::Duration::hours(24));
    wait_for(
        &clock,
        "the logs to go after 24 h",
        Duration::from_secs(60),
        || !dir.exists(),
    )
    .await;
    assert!(clock.wall() >= removed + chrono::Duration::hours(24));
    stop_tx.send(true).unwrap();
    sweeper.await.unwrap();
    node.shutdown(plfm_node_agent::config::ShutdownMode::Drain)
        .await;
}
