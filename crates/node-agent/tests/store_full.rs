//! The state store's filesystem fills up: status commits fail, the node is `degraded`
//! (what `/healthz` and heartbeats report) and no new status becomes visible; once
//! space is back the held statuses commit in order and nothing is lost. An operator
//! stop meanwhile stops the VM at once; its statuses and the stop itself are recorded
//! once space is back.
//!
//! The data dir is a small tmpfs, mounted inside a private mount namespace the test
//! re-runs itself in (`unshare -m`), so nothing is mounted on the host. Needs root and
//! `unshare` (util-linux); skips with a message otherwise, or fails with
//! `PLFM_REQUIRE_SYSTEM_TESTS=1`.

#![cfg(target_os = "linux")]

mod common;

use std::io::Write;
use std::process::Command;
use std::time::Duration;

use common::*;
use plfm_node_agent::instance::Status;
use plfm_node_agent::runtime::mock::MockConfig;

const INSIDE: &str = "PLFM_STORE_FULL_TEST_MOUNTNS";
const STEP: Duration = Duration::from_millis(100);

/// Re-runs `test` inside a private mount namespace; true when already inside.
fn inside_mount_ns(test: &str) -> bool {
    if std::env::var_os(INSIDE).is_some() {
        return true;
    }
    let root = rustix::process::geteuid().is_root();
    let unshare = Command::new("unshare").arg("--version").output().is_ok();
    if !root || !unshare {
        gate::skip_or_fail(
            "root and unshare (util-linux) to mount a small tmpfs in a mount namespace",
        );
        return false;
    }
    let status = Command::new("unshare")
        .args(["--mount", "--propagation", "private"])
        .arg(std::env::current_exe().unwrap())
        .args(["--exact", test, "--nocapture", "--test-threads", "1"])
        .env(INSIDE, "1")
        .status()
        .expect("run the test in a mount namespace");
    assert!(status.success(), "{test} failed inside its mount namespace");
    false
}

#[test]
fn a_full_store_degrades_the_node_holds_statuses_and_loses_nothing_once_space_is_back() {
    if !inside_mount_ns(
        "a_full_store_degrades_the_node_holds_statuses_and_loses_nothing_once_space_is_back",
    ) {
        return;
    }
    on_small_tmpfs(body);
}

#[test]
fn an_operator_stop_on_a_full_store_stops_the_vm_at_once_and_is_recorded_once_space_is_back() {
    if !inside_mount_ns(
        "an_operator_stop_on_a_full_store_stops_the_vm_at_once_and_is_recorded_once_space_is_back",
    ) {
        return;
    }
    on_small_tmpfs(operator_stop_body);
}

/// Runs `body` with `<dir>/data` on an 8 MiB tmpfs (inside the test's mount namespace).
fn on_small_tmpfs<F: std::future::Future<Output = ()>>(body: impl FnOnce(std::path::PathBuf) -> F) {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let ok = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=8m", "plfm-store-full"])
        .arg(&data)
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "cannot mount a tmpfs on {}", data.display());
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(body(tmp.path().to_path_buf()));
    let _ = Command::new("umount").arg(&data).status();
}

/// Fills the file system of `<dir>/data` with one file; dropping it and removing the
/// file gives the space back.
fn fill(dir: &std::path::Path) -> (std::fs::File, std::path::PathBuf) {
    let filler = dir.join("data/filler");
    let mut f = std::fs::File::create(&filler).unwrap();
    let chunk = vec![0u8; 64 << 10];
    loop {
        match f.write_all(&chunk) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
            Err(e) => panic!("filling the tmpfs: {e}"),
        }
    }
    let _ = f.sync_all();
    (f, filler)
}

async fn operator_stop_body(dir: std::path::PathBuf) {
    let t = TestNode::start_at(MockConfig::instant(), dir.clone()).await;
    t.apply(plan(1, vec![assignment("a", 1)])).await;
    t.wait_for("a ready", STEP, |t| t.status("a") == Some(Status::Ready))
        .await;
    let (f, filler) = fill(&dir);

    // The stop is accepted at once and the VM stops although nothing can be recorded.
    let started = std::time::Instant::now();
    let accepted = tokio::time::timeout(
        Duration::from_secs(5),
        t.node().supervisor.stop_instance(id("a")),
    )
    .await;
    assert_eq!(accepted, Ok(Ok(())), "the stop was not accepted in time");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    t.wait_for("a's VM stopped", STEP, |t| {
        t.mock.running().iter().all(|i| i.as_str() != "a")
    })
    .await;
    t.wait_for("degraded", STEP, |t| t.node().status.degraded().is_some())
        .await;
    assert_eq!(
        t.status("a"),
        Some(Status::Ready),
        "a status visible before it is durable"
    );

    // Space is back: draining and stopped are recorded in order, with the reason, and
    // the operator stop itself (it outlives an agent restart).
    drop(f);
    std::fs::remove_file(&filler).unwrap();
    t.wait_for("a stopped", STEP, |t| {
        t.status("a") == Some(Status::Stopped)
    })
    .await;
    delivered(&t).await;
    assert_eq!(
        t.statuses_of("a"),
        vec![
            Status::Booting,
            Status::Ready,
            Status::Draining,
            Status::Stopped
        ]
    );
    let last = t.reports("a").pop().unwrap();
    assert_eq!(
        last.reason_code,
        Some(plfm_node_agent::instance::ReasonCode::TerminatedByOperator)
    );
    t.wait_for("the operator stop recorded", STEP, |t| {
        t.node()
            .store
            .load_instances()
            .unwrap()
            .iter()
            .any(|r| r.instance_id == "a" && r.operator_stopped_generation == Some(1))
    })
    .await;
    assert_eq!(
        t.mock.starts(&id("a")),
        1,
        "the stopped instance was started again"
    );
}

async fn body(dir: std::path::PathBuf) {
    let t = TestNode::start_at(MockConfig::instant(), dir.clone()).await;
    t.apply(plan(1, vec![assignment("a", 1)])).await;
    t.wait_for("a ready", STEP, |t| t.status("a") == Some(Status::Ready))
        .await;
    assert_eq!(t.node().status.degraded(), None);

    let (f, filler) = fill(&dir);

    // A new instance: its `booting` cannot be persisted, so the node is degraded and
    // the status is not visible.
    t.apply(plan(2, vec![assignment("a", 1), assignment("b", 1)]))
        .await;
    t.wait_for("degraded", STEP, |t| t.node().status.degraded().is_some())
        .await;
    let why = t.node().status.degraded().unwrap();
    assert!(why.contains("state store"), "{why}");
    assert!(
        t.node()
            .supervisor
            .usage()
            .await
            .unwrap()
            .degraded
            .is_some(),
        "heartbeats say degraded"
    );
    assert_eq!(t.status("b"), None, "a status visible before it is durable");
    assert_eq!(t.status("a"), Some(Status::Ready));

    // Space is back: the held statuses commit, in order, and the node recovers.
    drop(f);
    std::fs::remove_file(&filler).unwrap();
    t.wait_for("b ready", STEP, |t| t.status("b") == Some(Status::Ready))
        .await;
    t.wait_for("not degraded", STEP, |t| {
        t.node().status.degraded().is_none()
    })
    .await;
    delivered(&t).await;
    assert_eq!(t.statuses_of("b"), vec![Status::Booting, Status::Ready]);
    assert_eq!(t.statuses_of("a"), vec![Status::Booting, Status::Ready]);
}

/// Waits until every report is delivered, moving the clock: reports that failed while
/// the disk was full wait in the outbox's retry backoff (up to 30 s on the node's
/// clock), which only a moving clock ends.
async fn delivered(t: &TestNode) {
    t.wait_for("outbox to drain", STEP, |t| {
        t.node().store.outbox_depth().unwrap() == 0
    })
    .await;
}
