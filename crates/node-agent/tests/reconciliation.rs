//! Supervisor lifecycle with the mock runtime: start/stop, scaling, replacement on a new
//! generation, plan removal, coalescing of desired-state bursts, actor panics, adoption.

mod common;

use std::time::Duration;

use common::*;
use plfm_node_agent::config::ShutdownMode;
use plfm_node_agent::instance::{ReasonCode, Status};
use plfm_node_agent::runtime::mock::{MockConfig, MockFault};

const STEP: Duration = Duration::from_millis(100);

fn ready(t: &TestNode, ids: &[&str]) -> bool {
    ids.iter().all(|i| t.status(i) == Some(Status::Ready))
}

#[tokio::test]
async fn supervisor_start_and_detach_keeps_vms_for_the_next_agent() {
    let mut t = TestNode::start(MockConfig::instant()).await;
    t.apply(plan(1, vec![assignment("a", 1), assignment("b", 1)]))
        .await;
    t.wait_for("a, b ready", STEP, |t| ready(t, &["a", "b"]))
        .await;
    t.wait_delivered().await;
    let before = t.report_count();
    assert_eq!(before, 4, "booting + ready for each");

    t.restart().await; // detach, then a new agent on the same state and runtime
    assert_eq!(
        t.mock.running(),
        vec![id("a"), id("b")],
        "detach must leave VMs running"
    );
    t.apply(plan(2, vec![assignment("a", 1), assignment("b", 1)]))
        .await;
    // Give the adopted actors many chances to (wrongly) act: 50 steps of clock time,
    // each followed by running the node until it is idle.
    t.settle().await;
    for _ in 0..50 {
        t.clock.advance(STEP);
        t.settle().await;
    }
    assert!(ready(&t, &["a", "b"]));
    assert_eq!(t.mock.starts(&id("a")), 1, "adopted, not restarted");
    assert_eq!(t.mock.starts(&id("b")), 1);
    t.wait_delivered().await;
    assert_eq!(t.report_count(), before, "adoption sends no report");
}

#[tokio::test]
async fn supervisor_shutdown_with_drain_stops_every_vm() {
    let mut t = TestNode::start(MockConfig::instant()).await;
    t.apply(plan(1, vec![assignment("a", 1), assignment("b", 1)]))
        .await;
    t.wait_for("ready", STEP, |t| ready(t, &["a", "b"])).await;
    let node = t.node.take().unwrap();
    node.shutdown(ShutdownMode::Drain).await;
    assert!(t.mock.running().is_empty(), "drain shutdown must stop VMs");
    t.restart().await;
    assert_eq!(
        t.statuses_of("a"),
        vec![
            Status::Booting,
            Status::Ready,
            Status::Draining,
            Status::Stopped
        ]
    );
}

/// A node with `failed` instances (their workload exited 3, restart policy `never`) and
/// `ready` ones.
async fn failed_and_ready(failed: &[&str], ready: &[&str]) -> TestNode {
    let t = TestNode::start(MockConfig::instant()).await;
    let mut assignments = Vec::new();
    for i in failed {
        t.mock.inject(
            &id(i),
            MockFault::Exit {
                code: 3,
                after_ms: 0,
            },
        );
        let mut v = assignment_json(i, 1);
        v["workload"]["lifecycle"]["restart_policy"] = "never".into();
        assignments.push(decode(&v));
    }
    assignments.extend(ready.iter().map(|i| assignment(i, 1)));
    t.apply(plan(1, assignments)).await;
    t.wait_for("instances failed and ready", STEP, |t| {
        failed.iter().all(|i| t.status(i) == Some(Status::Failed))
            && ready.iter().all(|i| t.status(i) == Some(Status::Ready))
    })
    .await;
    t
}

/// The last report of an instance: status and reason.
fn last_report(t: &TestNode, i: &str) -> Option<(Status, Option<ReasonCode>)> {
    t.reports(i).last().map(|r| (r.status, r.reason_code))
}

const DRAINED: Option<(Status, Option<ReasonCode>)> =
    Some((Status::Stopped, Some(ReasonCode::NodeDraining)));

/// `on_shutdown = "drain"` ends only once every instance is stopped: the ready one
/// drained, the failed one marked stopped with `node_draining` (as the API drain does).
#[tokio::test]
async fn shutdown_drain_marks_failed_instances_stopped_node_draining() {
    for (failed, ready) in [(&["f"][..], &["r"][..]), (&["f", "g"][..], &[][..])] {
        let mut t = failed_and_ready(failed, ready).await;
        let node = t.node.take().unwrap();
        tokio::time::timeout(Duration::from_secs(20), node.shutdown(ShutdownMode::Drain))
            .await
            .expect("the drain shutdown ends once every instance is stopped");
        assert!(t.mock.running().is_empty());
        t.restart().await;
        for i in failed.iter().chain(ready) {
            assert_eq!(last_report(&t, i), DRAINED, "{i} (failed: {failed:?})");
            assert_eq!(t.status(i), Some(Status::Stopped), "{i}");
        }
    }
}

/// `POST /v1/node/drain` (the supervisor's node drain) does the same.
#[tokio::test]
async fn api_drain_marks_failed_instances_stopped_node_draining() {
    let t = failed_and_ready(&["f"], &["r"]).await;
    t.node().supervisor.drain_node().await.unwrap();
    t.wait_for("f and r stopped by the drain", STEP, |t| {
        t.node().store.outbox_depth().unwrap() == 0
            && ["f", "r"].iter().all(|i| last_report(t, i) == DRAINED)
    })
    .await;
    assert!(t.mock.running().is_empty());
}

#[tokio::test]
async fn scale_zero_three_one_zero() {
    let t = TestNode::start(MockConfig::instant()).await;
    t.apply(plan(1, vec![])).await;
    assert!(t.node().status.list().is_empty());

    let three: Vec<_> = ["s1", "s2", "s3"]
        .iter()
        .map(|i| assignment(i, 1))
        .collect();
    t.apply(plan(2, three)).await;
    t.wait_for("3 ready", STEP, |t| ready(t, &["s1", "s2", "s3"]))
        .await;
    assert_eq!(t.mock.running().len(), 3);

    t.apply(plan(3, vec![assignment("s1", 1)])).await;
    t.wait_for("scaled to 1", STEP, |t| {
        t.node().status.list().len() == 1 && t.mock.running().len() == 1
    })
    .await;
    assert_eq!(t.mock.running(), vec![id("s1")]);
    assert_eq!(t.status("s1"), Some(Status::Ready));

    t.apply(plan(4, vec![])).await;
    t.wait_for("scaled to 0", STEP, |t| {
        t.node().status.list().is_empty() && t.mock.running().is_empty()
    })
    .await;
    t.wait_delivered().await;
    for i in ["s1", "s2", "s3"] {
        assert_eq!(
            t.statuses_of(i),
            vec![
                Status::Booting,
                Status::Ready,
                Status::Draining,
                Status::Stopped
            ],
            "{i}"
        );
    }
    assert_eq!(
        t.mock.starts(&id("s1")),
        1,
        "scaling down others must not touch s1"
    );
}

#[tokio::test]
async fn new_generation_replaces_by_draining_the_old_vm_first() {
    let t = TestNode::start(MockConfig::instant()).await;
    t.apply(plan(1, vec![assignment("r", 1)])).await;
    t.wait_for("gen 1 ready", STEP, |t| ready(t, &["r"])).await;
    t.apply(plan(2, vec![assignment("r", 2)])).await;
    t.wait_for("gen 2 ready", STEP, |t| {
        t.node()
            .status
            .get(&id("r"))
            .is_some_and(|v| v.status == Status::Ready && v.generation == 2)
    })
    .await;
    t.wait_delivered().await;
    let seen: Vec<_> = t
        .reports("r")
        .iter()
        .map(|r| (r.status, r.generation))
        .collect();
    assert_eq!(
        seen,
        vec![
            (Status::Booting, 1),
            (Status::Ready, 1),
            (Status::Draining, 1),
            (Status::Stopped, 1),
            (Status::Booting, 2),
            (Status::Ready, 2)
        ]
    );
    assert_eq!(t.mock.starts(&id("r")), 2);
    let vm = t.mock.vm(&id("r")).unwrap();
    assert_eq!(vm.generation, 2);
}

#[tokio::test]
async fn plan_removal_drains_before_stop_and_cleans_up() {
    let t = TestNode::start(MockConfig {
        stop_ms: 3000,
        ..MockConfig::instant()
    })
    .await;
    t.apply(plan(1, vec![assignment("gone", 1)])).await;
    t.wait_for("ready", STEP, |t| ready(t, &["gone"])).await;
    t.apply(plan(2, vec![])).await;
    // The stop takes 3 s of (manual) time: the instance is draining, the VM still there.
    t.wait_for("draining", Duration::ZERO, |t| {
        t.status("gone") == Some(Status::Draining)
    })
    .await;
    assert_eq!(t.mock.running(), vec![id("gone")]);
    t.wait_for("removed", STEP, |t| t.status("gone").is_none())
        .await;
    assert!(t.mock.running().is_empty());
    t.wait_delivered().await;
    let r = t.reports("gone");
    assert_eq!(
        r.iter().map(|r| r.status).collect::<Vec<_>>(),
        vec![
            Status::Booting,
            Status::Ready,
            Status::Draining,
            Status::Stopped
        ]
    );
    assert_eq!(r[3].error_message.as_deref(), Some("removed from the plan"));
}

#[tokio::test]
async fn desired_draining_then_running_again() {
    let t = TestNode::start(MockConfig::instant()).await;
    t.apply(plan(1, vec![assignment("d", 1)])).await;
    t.wait_for("ready", STEP, |t| ready(t, &["d"])).await;
    let mut v = assignment_json("d", 1);
    v["desired_state"] = "draining".into();
    t.apply(plan(2, vec![decode(&v)])).await;
    t.wait_for("stopped", STEP, |t| t.status("d") == Some(Status::Stopped))
        .await;
    assert!(t.mock.running().is_empty());
    assert_eq!(
        t.status("d"),
        Some(Status::Stopped),
        "still listed while assigned"
    );
    t.apply(plan(3, vec![assignment("d", 1)])).await;
    t.wait_for("ready again", STEP, |t| ready(t, &["d"])).await;
}

#[tokio::test]
async fn burst_of_updates_coalesces_into_the_latest_spec() {
    // Stopping takes 5 s of manual time, so the burst arrives while gen 1 drains.
    let t = TestNode::start(MockConfig {
        stop_ms: 5000,
        ..MockConfig::instant()
    })
    .await;
    t.apply(plan(1, vec![assignment("c", 1)])).await;
    t.wait_for("gen 1 ready", STEP, |t| ready(t, &["c"])).await;
    for g in 2..=40 {
        t.apply(plan(g as i64, vec![assignment("c", g)])).await;
    }
    t.wait_for("gen 40 ready", STEP, |t| {
        t.node()
            .status
            .get(&id("c"))
            .is_some_and(|v| v.status == Status::Ready && v.generation == 40)
    })
    .await;
    assert_eq!(t.mock.starts(&id("c")), 2, "gen 1 and gen 40 only");
    t.wait_delivered().await;
    let gens: Vec<i32> = t.reports("c").iter().map(|r| r.generation).collect();
    assert!(gens.iter().all(|g| *g == 1 || *g == 40), "{gens:?}");
}

#[tokio::test]
async fn panicking_actor_is_restarted_with_backoff_and_the_supervisor_survives() {
    let t = TestNode::start(MockConfig::instant()).await;
    t.mock.inject(&id("p"), MockFault::PanicAtPrepare);
    t.apply(plan(1, vec![assignment("p", 1), assignment("q", 1)]))
        .await;
    // The node runs until idle after every clock step (none needed for q: it is ready
    // at clock 0), so the clock moves only as far as the test says: the second panic
    // came during the last step, at most 100 ms ago.
    t.step_until("q ready", STEP, |t| ready(t, &["q"])).await;
    t.step_until("p panicked twice", STEP, |t| {
        t.node().metrics.actor_panics.get() >= 2
    })
    .await;
    assert_eq!(t.node().metrics.actor_panics.get(), 2);
    // Backoff: the second respawn waits 2 s of clock time after the second panic. 1.8 s
    // on, with the node idle, none yet; at 2 s it comes (and panics again, the fault
    // still being there).
    t.clock.advance(Duration::from_millis(1800));
    t.settle().await;
    assert_eq!(
        t.node().metrics.actor_panics.get(),
        2,
        "no respawn before the backoff"
    );
    t.clock.advance(Duration::from_millis(200));
    t.settle().await;
    assert_eq!(
        t.node().metrics.actor_panics.get(),
        3,
        "the respawn comes when the backoff is over"
    );
    assert_eq!(t.mock.starts(&id("p")), 0, "p never got past prepare");
    t.mock.clear_fault(&id("p"));
    t.wait_for("p ready after the fault is gone", STEP, |t| {
        ready(t, &["p"])
    })
    .await;
    // The supervisor still takes plans.
    t.apply(plan(2, vec![assignment("p", 1)])).await;
    t.wait_for("q removed", STEP, |t| t.status("q").is_none())
        .await;
}

#[tokio::test]
async fn orphan_vm_without_assignment_is_stopped_after_restart() {
    let mut t = TestNode::start(MockConfig::instant()).await;
    t.apply(plan(
        1,
        vec![assignment("keep", 1), assignment("orphan", 1)],
    ))
    .await;
    t.wait_for("ready", STEP, |t| ready(t, &["keep", "orphan"]))
        .await;
    t.restart().await;
    // Nothing happens before the first plan: once the restarted node is idle, both VMs
    // still run.
    t.settle().await;
    assert_eq!(t.mock.running().len(), 2);
    assert_eq!(t.mock.starts(&id("orphan")), 1);
    t.apply(plan(2, vec![assignment("keep", 1)])).await;
    t.wait_for("orphan stopped", STEP, |t| {
        t.mock.running() == vec![id("keep")] && t.status("orphan").is_none()
    })
    .await;
    assert_eq!(t.mock.starts(&id("keep")), 1);
}
