//! Transient failures (the control plane or a registry unreachable) are retried with
//! a short backoff and never spend the crash-loop budget, so an outage of any length
//! ends with the instance ready; content failures still spend it. Mock runtime, manual
//! clock: ten minutes of outage take a second of real time.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::*;
use plfm_node_agent::instance::{ReasonCode, Status};
use plfm_node_agent::runtime::mock::MockConfig;
use serde_json::json;

fn with_secrets(
    instance: &str,
    version: &str,
    policy: &str,
    max_retries: u32,
) -> serde_json::Value {
    let mut v = assignment_json(instance, 1);
    v["workload"]["lifecycle"] = json!({"termination_grace_seconds": 1, "restart_policy": policy, "max_retries": max_retries});
    v["workload"]["secrets"] = json!({"required": true, "secret_version_id": version});
    v
}

#[tokio::test]
async fn control_plane_outage_of_ten_minutes_during_boot_ends_ready_without_crash_loop() {
    let t = TestNode::start(MockConfig::instant()).await;
    std::fs::write(
        t.secrets_dir().join("v1.env"),
        "# TRC_SECRETS_V1\nDB_PASSWORD=hunter2\n",
    )
    .unwrap();
    t.secrets.down.store(true, Ordering::SeqCst);
    // `never` and a budget of 1: one counted failure would park it for good.
    t.apply(plan(1, vec![decode(&with_secrets("s", "v1", "never", 1))]))
        .await;
    let start = t.now_secs();
    t.wait_for("ten minutes of outage", Duration::from_secs(1), |t| {
        t.now_secs() - start >= 600.0
    })
    .await;
    let v = t.node().status.get(&id("s")).expect("instance s");
    assert_eq!(v.status, Status::Failed, "{v:#?}");
    assert_eq!(v.reason_code, Some(ReasonCode::SecretsInjectionFailed));
    let msg = v.error_message.clone().unwrap_or_default();
    assert!(
        msg.contains("transient") && msg.contains("not counted against max_retries"),
        "{msg}"
    );
    assert_eq!(
        t.mock.starts(&id("s")),
        0,
        "no VM boots without its secrets"
    );

    t.secrets.down.store(false, Ordering::SeqCst);
    let back = t.now_secs();
    t.wait_for("ready after the outage", Duration::from_secs(1), |t| {
        t.status("s") == Some(Status::Ready)
    })
    .await;
    let waited = t.now_secs() - back;
    assert!(
        waited <= 62.0,
        "ready {waited} s after the control plane returned (backoff caps at 60 s)"
    );
    t.wait_delivered().await;
    let reports = t.reports("s");
    assert!(
        reports
            .iter()
            .all(|r| r.reason_code != Some(ReasonCode::CrashLoopBackoff)),
        "{reports:#?}"
    );
    let failed = reports
        .iter()
        .filter(|r| r.status == Status::Failed)
        .count();
    assert!(
        failed >= 10,
        "retried all along the outage (1, 2, 4 … 60 s): {failed} failed reports"
    );
    assert_eq!(reports.last().map(|r| r.status), Some(Status::Ready));
}

#[tokio::test]
async fn a_missing_secrets_version_still_spends_the_restart_budget() {
    let t = TestNode::start(MockConfig::instant()).await;
    t.apply(plan(
        1,
        vec![decode(&with_secrets("m", "absent", "on-failure", 2))],
    ))
    .await;
    t.wait_for("crash loop", Duration::from_millis(500), |t| {
        t.node()
            .status
            .get(&id("m"))
            .is_some_and(|v| v.reason_code == Some(ReasonCode::CrashLoopBackoff))
    })
    .await;
    let v = t.node().status.get(&id("m")).unwrap();
    let msg = v.error_message.unwrap_or_default();
    assert!(msg.contains("secrets_missing"), "{msg}");
}

/// An agent restart while a `never` instance retries a transient failure does not turn
/// that failure into its last word: the restarted agent retries too, and the instance
/// becomes ready once the control plane is back.
#[tokio::test]
async fn a_never_instance_retrying_an_outage_keeps_retrying_after_an_agent_restart() {
    let mut t = TestNode::start(MockConfig::instant()).await;
    std::fs::write(
        t.secrets_dir().join("v1.env"),
        "# TRC_SECRETS_V1\nDB_PASSWORD=hunter2\n",
    )
    .unwrap();
    t.secrets.down.store(true, Ordering::SeqCst);
    let p = || plan(1, vec![decode(&with_secrets("s", "v1", "never", 1))]);
    t.apply(p()).await;
    t.wait_for("failed, retrying", Duration::from_secs(1), |t| {
        t.status("s") == Some(Status::Failed)
    })
    .await;
    t.restart().await;
    t.apply(p()).await;
    t.secrets.down.store(false, Ordering::SeqCst);
    t.wait_for("ready after the restart", Duration::from_secs(1), |t| {
        t.status("s") == Some(Status::Ready)
    })
    .await;
    assert_eq!(t.mock.starts(&id("s")), 1);
}
