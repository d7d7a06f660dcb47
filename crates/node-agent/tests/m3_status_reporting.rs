//! Status reporting with the mock runtime: reports only on transitions, every reason
//! code reaching the sink with its message, restart backoff and crash loop, exit codes,
//! seq and report fields, and secrets kept out of reports and the state store.

mod common;

use std::time::Duration;

use common::*;
use plfm_node_agent::instance::{ReasonCode, Status};
use plfm_node_agent::runtime::mock::{MockConfig, MockFault};
use plfm_node_agent::status::StatusReport;
use serde_json::json;

const STEP: Duration = Duration::from_millis(100);

fn with_health(mut v: serde_json::Value) -> serde_json::Value {
    v["workload"]["health"] = json!({"type": "http", "port": 8080, "path": "/healthz", "interval_seconds": 1, "timeout_seconds": 1, "grace_period_seconds": 2, "success_threshold": 2, "failure_threshold": 3});
    v
}

fn policy(mut v: serde_json::Value, policy: &str, max_retries: u32) -> serde_json::Value {
    v["workload"]["lifecycle"] = json!({"termination_grace_seconds": 1, "restart_policy": policy, "max_retries": max_retries});
    v
}

fn last(t: &TestNode, i: &str) -> Option<StatusReport> {
    t.reports(i).pop()
}

#[tokio::test]
async fn steady_state_sends_zero_reports_over_many_reconcile_ticks() {
    let t = TestNode::start(MockConfig::instant()).await;
    let plan_of = |c| {
        plan(
            c,
            (0..50)
                .map(|i| decode(&with_health(assignment_json(&format!("i{i}"), 1))))
                .collect(),
        )
    };
    t.apply(plan_of(1)).await;
    t.wait_for("50 ready", STEP, |t| {
        t.node().status.counts().get(&Status::Ready) == Some(&50)
    })
    .await;
    t.wait_delivered().await;
    let before = t.report_count();
    assert_eq!(before, 100);
    for tick in 0..60 {
        t.apply(plan_of(2 + tick)).await;
        t.clock.advance(Duration::from_secs(1)); // one health interval per tick
                                                 // Every actor has taken the plan and run its health check before the next tick.
        t.settle().await;
    }
    t.wait_delivered().await;
    assert_eq!(
        t.report_count(),
        before,
        "no report without a status change"
    );
    assert_eq!(t.node().status.counts().get(&Status::Ready), Some(&50));
}

#[tokio::test]
async fn reports_carry_seq_generation_boot_duration_and_time() {
    let t = TestNode::start(MockConfig {
        boot_ms: 1500,
        ..MockConfig::instant()
    })
    .await;
    t.apply(plan(1, vec![assignment("f", 3)])).await;
    t.wait_for("ready", STEP, |t| t.status("f") == Some(Status::Ready))
        .await;
    t.wait_delivered().await;
    let r = t.reports("f");
    assert_eq!(r.len(), 2);
    assert_eq!((r[0].seq, r[1].seq), (1, 2));
    assert!(r.iter().all(|r| r.generation == 3 && r.instance_id == "f"));
    assert_eq!(r[0].boot_id, r[1].boot_id);
    assert!(r[0].boot_id.as_ref().is_some_and(|b| b.len() == 32));
    let ms = r[1].boot_duration_ms.unwrap();
    assert!(
        (1500..1700).contains(&ms),
        "boot_duration_ms {ms} measured on the injected clock"
    );
    assert!(chrono::DateTime::parse_from_rfc3339(&r[1].observed_at).is_ok());
    let wire = serde_json::to_value(&r[1]).unwrap();
    assert_eq!(wire["status"], "ready");
    assert!(
        wire.get("reason_code").is_none(),
        "absent fields are omitted"
    );
}

/// Each of the twelve reason codes, produced by the code path that raises it.
#[tokio::test]
async fn every_reason_code_reaches_the_sink_with_its_message() {
    let t = TestNode::start(MockConfig::instant()).await;
    let never = |i: &str| decode(&policy(assignment_json(i, 1), "never", 0));
    for (i, reason) in [
        ("pull", ReasonCode::ImagePullFailed),
        ("rootfs", ReasonCode::RootfsBuildFailed),
        ("net", ReasonCode::NetworkSetupFailed),
        ("vol", ReasonCode::VolumeAttachFailed),
    ] {
        t.mock.inject(&id(i), MockFault::PrepareFails { reason });
    }
    t.mock.inject(&id("vmm"), MockFault::StartFails);
    t.mock.inject(&id("handshake"), MockFault::NoHandshake);
    t.mock.inject(
        &id("guestnet"),
        MockFault::GuestFails {
            reason: ReasonCode::NetworkSetupFailed,
            after_ms: 0,
        },
    );
    t.mock.inject(
        &id("health"),
        MockFault::HealthFails {
            after_ms: 5000,
            repeat_start_ms: 0,
        },
    );
    t.mock.inject(&id("oom"), MockFault::Oom { after_ms: 1000 });
    t.mock.inject(
        &id("loop"),
        MockFault::Exit {
            code: 2,
            after_ms: 0,
        },
    );
    std::fs::write(t.secrets_dir().join("bad.env"), "DB_PASSWORD=hunter2\n").unwrap();
    let secrets = |i: &str, version: &str| {
        let mut v = policy(assignment_json(i, 1), "never", 0);
        v["workload"]["secrets"] = json!({"required": true, "secret_version_id": version});
        decode(&v)
    };
    let mut assignments: Vec<_> = [
        "pull",
        "rootfs",
        "net",
        "vol",
        "vmm",
        "handshake",
        "guestnet",
        "health",
        "oom",
    ]
    .iter()
    .map(|i| never(i))
    .collect();
    assignments.push(decode(&with_health(policy(
        assignment_json("health", 1),
        "never",
        0,
    ))));
    assignments.retain(|a| {
        a.instance_id.as_str() != "health" || a.workload.as_ref().unwrap().spec.health.is_some()
    });
    assignments.push(decode(&policy(assignment_json("loop", 1), "always", 1)));
    assignments.push(secrets("nosecret", "v-absent"));
    assignments.push(secrets("badsecret", "bad"));
    assignments.push(assignment("op", 1));
    assignments.push(assignment("drained", 1));
    t.apply(plan(1, assignments)).await;

    t.wait_for("op ready", STEP, |t| t.status("op") == Some(Status::Ready))
        .await;
    t.node().supervisor.stop_instance(id("op")).await.unwrap();
    let expected = [
        ("pull", ReasonCode::ImagePullFailed, "digest mismatch"),
        ("rootfs", ReasonCode::RootfsBuildFailed, "no space"),
        ("net", ReasonCode::NetworkSetupFailed, "tap"),
        ("vol", ReasonCode::VolumeAttachFailed, "vol-1"),
        ("vmm", ReasonCode::FirecrackerStartFailed, "152"),
        (
            "handshake",
            ReasonCode::FirecrackerStartFailed,
            "handshake did not complete within 30 s",
        ),
        ("guestnet", ReasonCode::NetworkSetupFailed, "guest"),
        ("nosecret", ReasonCode::SecretsMissing, "v-absent"),
        (
            "badsecret",
            ReasonCode::SecretsInjectionFailed,
            "TRC_SECRETS_V1",
        ),
        ("health", ReasonCode::HealthcheckFailed, "3 times in a row"),
        ("oom", ReasonCode::OomKilled, "OOM"),
        ("loop", ReasonCode::CrashLoopBackoff, "exited with code 2"),
        ("op", ReasonCode::TerminatedByOperator, "operator"),
    ];
    t.wait_for("all failures reported", STEP, |t| {
        t.node().store.outbox_depth().unwrap() == 0
            && expected
                .iter()
                .all(|(i, r, _)| last(t, i).is_some_and(|rep| rep.reason_code == Some(*r)))
    })
    .await;
    t.node().supervisor.drain_node().await.unwrap();
    t.wait_for("node drained", STEP, |t| {
        t.node().store.outbox_depth().unwrap() == 0
            && last(t, "drained").is_some_and(|r| r.status == Status::Stopped)
    })
    .await;

    let mut seen = std::collections::BTreeSet::new();
    for (i, reason, needle) in expected {
        let rep = t
            .reports(i)
            .into_iter()
            .rev()
            .find(|r| r.reason_code == Some(reason))
            .unwrap();
        let msg = rep.error_message.clone().unwrap_or_default();
        assert!(
            msg.contains(needle),
            "{i}: message {msg:?} should contain {needle:?}"
        );
        let want = if reason.is_deliberate_stop() {
            Status::Stopped
        } else {
            Status::Failed
        };
        assert_eq!(rep.status, want, "{i}");
        seen.insert(reason);
    }
    let drained = t.reports("drained");
    let statuses: Vec<_> = drained.iter().map(|r| (r.status, r.reason_code)).collect();
    assert_eq!(
        &statuses[statuses.len() - 2..],
        &[
            (Status::Draining, Some(ReasonCode::NodeDraining)),
            (Status::Stopped, Some(ReasonCode::NodeDraining))
        ]
    );
    seen.insert(ReasonCode::NodeDraining);
    assert_eq!(seen.len(), 12, "all twelve reason codes: {seen:?}");
    // The oom report carries the exit code, the crash loop the last one.
    let by_reason = |i: &str, r: ReasonCode| {
        t.reports(i)
            .into_iter()
            .find(|rep| rep.reason_code == Some(r))
            .unwrap()
    };
    assert_eq!(by_reason("oom", ReasonCode::OomKilled).exit_code, Some(137));
    assert_eq!(
        by_reason("loop", ReasonCode::CrashLoopBackoff).exit_code,
        Some(2)
    );
    // Instances that had already failed are marked stopped for the node drain.
    assert_eq!(
        last(&t, "oom").unwrap().reason_code,
        Some(ReasonCode::NodeDraining)
    );
}

#[tokio::test]
async fn crash_backs_off_restarts_then_enters_crash_loop_backoff() {
    let t = TestNode::start(MockConfig::instant()).await;
    t.mock.inject(
        &id("c"),
        MockFault::Exit {
            code: 1,
            after_ms: 0,
        },
    );
    t.apply(plan(
        1,
        vec![decode(&policy(assignment_json("c", 1), "always", 3))],
    ))
    .await;
    // Every crash is followed by a boot only after 1 s, 2 s, 4 s of (manual) time.
    let mut boots_at = Vec::new();
    let mut last_starts = 0;
    t.wait_for("crash loop", Duration::from_millis(250), |t| {
        let s = t.mock.starts(&id("c"));
        if s != last_starts {
            boots_at.push(t.now_secs());
            last_starts = s;
        }
        t.node()
            .status
            .get(&id("c"))
            .is_some_and(|v| v.reason_code == Some(ReasonCode::CrashLoopBackoff))
    })
    .await;
    assert_eq!(
        t.mock.starts(&id("c")),
        4,
        "first boot + max_retries restarts"
    );
    let gaps: Vec<f64> = boots_at.windows(2).map(|w| w[1] - w[0]).collect();
    assert_eq!(gaps.len(), 3, "{boots_at:?}");
    for (gap, min) in gaps.iter().zip([1.0, 2.0, 4.0]) {
        // Never earlier than the backoff; the manual clock may run a little past it
        // while the actor is scheduled.
        assert!(
            *gap >= min,
            "restart after {gap} s, backoff is {min} s: {gaps:?}"
        );
    }
    t.wait_delivered().await;
    let r = t.reports("c");
    let statuses: Vec<_> = r.iter().map(|r| r.status).collect();
    assert_eq!(
        statuses,
        [[Status::Booting, Status::Ready, Status::Failed]; 4].concat(),
        "each crash is one failed report"
    );
    assert!(r.windows(2).all(|w| w[1].seq == w[0].seq + 1));
    let v = t.node().status.get(&id("c")).unwrap();
    assert_eq!(v.restarts, 3);
    assert_eq!(v.exit_code, Some(1));
    // Parked: no more boots, however long we wait. After an hour of clock time, the
    // node runs until idle: a boot it would make is made by then.
    t.clock.advance(Duration::from_secs(3600));
    t.settle().await;
    assert_eq!(t.mock.starts(&id("c")), 4);
    assert_eq!(t.reports("c").len(), 12, "no report while parked");
    // A new spec gets a fresh budget.
    t.mock.clear_fault(&id("c"));
    t.apply(plan(
        2,
        vec![decode(&policy(assignment_json("c", 2), "always", 3))],
    ))
    .await;
    t.wait_for("gen 2 ready", STEP, |t| {
        t.status("c") == Some(Status::Ready)
    })
    .await;
}

#[tokio::test]
async fn workload_exit_with_restart_never_is_failed_with_its_exit_code() {
    let t = TestNode::start(MockConfig::instant()).await;
    t.mock.inject(
        &id("x"),
        MockFault::Exit {
            code: 3,
            after_ms: 500,
        },
    );
    t.mock.inject(
        &id("z"),
        MockFault::Exit {
            code: 0,
            after_ms: 500,
        },
    );
    t.apply(plan(
        1,
        vec![
            decode(&policy(assignment_json("x", 1), "never", 3)),
            decode(&policy(assignment_json("z", 1), "on-failure", 3)),
        ],
    ))
    .await;
    t.wait_for("x failed, z stopped", STEP, |t| {
        t.status("x") == Some(Status::Failed)
            && t.status("z") == Some(Status::Stopped)
            && t.node().store.outbox_depth().unwrap() == 0
    })
    .await;
    let x = last(&t, "x").unwrap();
    assert_eq!((x.exit_code, x.reason_code), (Some(3), None));
    assert_eq!(
        x.error_message.as_deref(),
        Some("workload exited with code 3")
    );
    let z = last(&t, "z").unwrap();
    assert_eq!((z.status, z.exit_code), (Status::Stopped, Some(0)));
    // Ten minutes of clock time, then until the node is idle: a restart it would make
    // is made by then.
    t.clock.advance(Duration::from_secs(600));
    t.settle().await;
    assert_eq!(
        (t.mock.starts(&id("x")), t.mock.starts(&id("z"))),
        (1, 1),
        "policies say no restart"
    );
}

#[tokio::test]
async fn health_check_gates_ready_and_counts_only_after_the_grace_period() {
    let t = TestNode::start(MockConfig::instant()).await;
    t.apply(plan(1, vec![decode(&with_health(assignment_json("h", 1)))]))
        .await;
    // success_threshold 2 with a 1 s interval: ready only after the second pass.
    t.wait_for("booting", Duration::ZERO, |t| {
        t.status("h") == Some(Status::Booting)
    })
    .await;
    // Without clock time no check runs: once the node is idle, still booting.
    t.settle().await;
    assert_eq!(t.status("h"), Some(Status::Booting));
    t.wait_for("ready", STEP, |t| t.status("h") == Some(Status::Ready))
        .await;
    assert!(t.now_secs() >= 1.0);
}

#[tokio::test]
async fn invalid_spec_fails_that_instance_only() {
    let t = TestNode::start(MockConfig::instant()).await;
    let mut bad = assignment_json("bad", 1);
    bad["workload"]["mounts"] = json!([{"volume_id": "v1", "mount_path": "/proc", "read_only": false, "filesystem": "ext4"}]);
    let mut p = plan(1, vec![assignment("good", 1)]);
    p.rejected
        .push(plfm_node_agent::spec::decode_assignment(&bad, "plan.instances[1]").unwrap_err());
    t.apply(p).await;
    t.wait_for("good ready, bad failed", STEP, |t| {
        t.status("good") == Some(Status::Ready)
            && t.status("bad") == Some(Status::Failed)
            && t.node().store.outbox_depth().unwrap() == 0
    })
    .await;
    let r = last(&t, "bad").unwrap();
    assert_eq!(r.reason_code, Some(ReasonCode::VolumeAttachFailed));
    assert!(r.error_message.unwrap().contains("/proc is reserved"));
}

#[tokio::test]
async fn secret_values_never_reach_reports_logs_or_the_state_store() {
    let t = TestNode::start(MockConfig::instant()).await;
    let secret = "s3cr3t-VALUE-4242";
    std::fs::write(
        t.secrets_dir().join("good.env"),
        format!("# TRC_SECRETS_V1\nDB_PASSWORD={secret}\n"),
    )
    .unwrap();
    std::fs::write(
        t.secrets_dir().join("bad.env"),
        format!("# TRC_SECRETS_V1\nlower_key={secret}\n"),
    )
    .unwrap();
    let with = |i: &str, v: &str| {
        let mut a = policy(assignment_json(i, 1), "never", 0);
        a["workload"]["secrets"] = json!({"required": true, "secret_version_id": v});
        decode(&a)
    };
    t.apply(plan(1, vec![with("ok", "good"), with("bad", "bad")]))
        .await;
    t.wait_for("settled", STEP, |t| {
        t.status("ok") == Some(Status::Ready)
            && t.status("bad") == Some(Status::Failed)
            && t.node().store.outbox_depth().unwrap() == 0
    })
    .await;
    let all = serde_json::to_string(&t.all_reports()).unwrap();
    assert!(!all.contains(secret));
    assert!(all.contains("secrets_injection_failed"));
    let listed = serde_json::to_string(&t.node().status.list()).unwrap();
    assert!(!listed.contains(secret));
    let mut db = Vec::new();
    for f in ["state.db", "state.db-wal"] {
        if let Ok(b) = std::fs::read(t.dir.join("data").join(f)) {
            db.extend(b);
        }
    }
    assert!(!db.is_empty());
    assert!(
        !db.windows(secret.len()).any(|w| w == secret.as_bytes()),
        "secret found in the state store"
    );
}

#[tokio::test]
async fn disk_full_fails_rootfs_build_and_degrades_the_node_until_a_prepare_succeeds() {
    let t = TestNode::start(MockConfig::instant()).await;
    t.mock.inject(
        &id("full"),
        MockFault::PrepareFails {
            reason: ReasonCode::RootfsBuildFailed,
        },
    );
    t.apply(plan(
        1,
        vec![decode(&policy(assignment_json("full", 1), "never", 0))],
    ))
    .await;
    t.wait_for("failed", STEP, |t| t.status("full") == Some(Status::Failed))
        .await;
    let v = t.node().status.get(&id("full")).unwrap();
    assert_eq!(v.reason_code, Some(ReasonCode::RootfsBuildFailed));
    assert!(v.error_message.unwrap().contains("no space"));
    let degraded = t
        .node()
        .status
        .degraded()
        .expect("a full disk degrades the node");
    assert!(degraded.contains("disk full"), "{degraded}");
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
    t.mock.clear_fault(&id("full"));
    t.apply(plan(
        2,
        vec![decode(&policy(assignment_json("full", 2), "never", 0))],
    ))
    .await;
    t.wait_for("ready after space is back", STEP, |t| {
        t.status("full") == Some(Status::Ready)
    })
    .await;
    assert_eq!(t.node().status.degraded(), None);
}

#[tokio::test]
async fn the_crash_loop_budget_and_restart_count_survive_an_agent_restart() {
    let mut t = TestNode::start(MockConfig::instant()).await;
    t.mock.inject(
        &id("r"),
        MockFault::Exit {
            code: 1,
            after_ms: 0,
        },
    );
    let p = || {
        plan(
            1,
            vec![decode(&policy(assignment_json("r", 1), "always", 3))],
        )
    };
    t.apply(p()).await;
    // Two crashes (first boot + one restart), then the agent restarts while the
    // instance waits in its backoff.
    t.wait_for("second crash", Duration::from_millis(250), |t| {
        t.mock.starts(&id("r")) == 2 && t.status("r") == Some(Status::Failed)
    })
    .await;
    assert_eq!(t.node().status.get(&id("r")).unwrap().restarts, 1);
    t.restart().await;
    t.apply(p()).await;
    t.wait_for("crash loop", Duration::from_millis(250), |t| {
        t.node()
            .status
            .get(&id("r"))
            .is_some_and(|v| v.reason_code == Some(ReasonCode::CrashLoopBackoff))
    })
    .await;
    // The budget is first boot + max_retries restarts in all, not per agent run.
    assert_eq!(
        t.mock.starts(&id("r")),
        4,
        "the budget restarted with the agent"
    );
    let v = t.node().status.get(&id("r")).unwrap();
    assert_eq!(v.restarts, 3);
    let msg = v.error_message.unwrap_or_default();
    assert!(msg.contains("4 failures in a row"), "{msg}");
}

/// A guest that keeps repeating `workload_started` (every 200 ms) while its health
/// check fails cannot reset the failure count: the instance still fails with
/// `healthcheck_failed` after `failure_threshold` failures in a row.
#[tokio::test]
async fn a_guest_repeating_workload_started_cannot_hold_off_a_failing_health_check() {
    let t = TestNode::start(MockConfig::instant()).await;
    t.mock.inject(
        &id("hostile"),
        MockFault::HealthFails {
            after_ms: 5000,
            repeat_start_ms: 200,
        },
    );
    t.apply(plan(
        1,
        vec![decode(&with_health(policy(
            assignment_json("hostile", 1),
            "never",
            0,
        )))],
    ))
    .await;
    t.wait_for("ready", STEP, |t| {
        t.status("hostile") == Some(Status::Ready)
    })
    .await;
    t.wait_for("healthcheck_failed", STEP, |t| {
        t.node()
            .status
            .get(&id("hostile"))
            .is_some_and(|v| v.reason_code == Some(ReasonCode::HealthcheckFailed))
    })
    .await;
}

/// `ready` follows the workload's first passing probe closely: until then probes retry
/// 20 ms after a failure, doubling up to `interval_seconds` (here 10 s), instead of a
/// whole interval later; and those fast failures count at most once per interval, so
/// three of them do not make `healthcheck_failed` with a grace period of 0.
#[tokio::test]
async fn ready_comes_when_the_guest_says_the_port_listens_not_at_the_next_retry() {
    // Probes at 0, 20, 60, 140, 300, 620 ms: without the guest's signal the workload
    // answering from 450 ms would be seen at 620 ms.
    let t = TestNode::start(MockConfig::instant()).await;
    t.mock
        .inject(&id("sig"), MockFault::ListensAfter { ms: 450 });
    let mut v = assignment_json("sig", 1);
    v["workload"]["health"] = json!({"type": "tcp", "port": 8080, "interval_seconds": 10, "timeout_seconds": 1, "grace_period_seconds": 0, "success_threshold": 1, "failure_threshold": 3});
    t.apply(plan(1, vec![decode(&v)])).await;
    t.settle().await;
    let mut elapsed = Duration::ZERO;
    while t.status("sig") != Some(Status::Ready) {
        assert_ne!(
            t.status("sig"),
            Some(Status::Failed),
            "{:?}",
            last(&t, "sig")
        );
        assert!(
            elapsed < Duration::from_secs(30),
            "never ready: {:?}",
            last(&t, "sig")
        );
        t.clock.advance(Duration::from_millis(10));
        t.settle().await;
        elapsed += Duration::from_millis(10);
    }
    assert!(
        (450..=470).contains(&(elapsed.as_millis() as u64)),
        "ready {elapsed:?} after the start, with the port listening from 450 ms"
    );
}

#[tokio::test]
async fn ready_comes_with_the_first_passing_probe_not_an_interval_later() {
    let t = TestNode::start(MockConfig::instant()).await;
    t.mock
        .inject(&id("fast"), MockFault::HealthFailsUntil { ms: 300 });
    let mut v = assignment_json("fast", 1);
    v["workload"]["health"] = json!({"type": "http", "port": 8080, "path": "/", "interval_seconds": 10, "timeout_seconds": 1, "grace_period_seconds": 0, "success_threshold": 1, "failure_threshold": 3});
    t.apply(plan(1, vec![decode(&v)])).await;
    t.settle().await;
    let mut elapsed = Duration::ZERO;
    while t.status("fast") != Some(Status::Ready) {
        assert_ne!(
            t.status("fast"),
            Some(Status::Failed),
            "{:?}",
            last(&t, "fast")
        );
        assert!(
            elapsed < Duration::from_secs(30),
            "never ready: {:?}",
            last(&t, "fast")
        );
        t.clock.advance(Duration::from_millis(10));
        t.settle().await;
        elapsed += Duration::from_millis(10);
    }
    // Probes at 0, 20, 60, 140, 300 ms: the one at 300 ms passes.
    assert!(
        elapsed <= Duration::from_millis(320),
        "ready {elapsed:?} after the start, with the workload answering from 300 ms"
    );
    t.wait_delivered().await;
    let ready = last(&t, "fast").unwrap();
    assert_eq!(ready.status, Status::Ready);
    assert!(
        ready.boot_duration_ms.unwrap() < 1000,
        "boot_duration_ms {:?}",
        ready.boot_duration_ms
    );
}
