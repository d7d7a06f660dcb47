//! The agent with `runtime.kind = "firecracker"`: with no binary installed it starts,
//! fails each instance with `firecracker_start_failed` naming the binary and stays
//! healthy; a VMM that accepts its configuration and `InstanceStart` and then exits
//! before the guest handshake fails the instance with the exit code's meaning and the
//! VMM log tail, its files are removed, and the restart policy applies.
#![cfg(target_os = "linux")]

mod common;
mod fc_standin;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use fc_standin::{standin_alive, wait_until, FcEnv, TestHost};
use plfm_node_agent::agent::{build_runtime, Node, NodeOptions};
use plfm_node_agent::clock::SystemClock;
use plfm_node_agent::config::{Config, ShutdownMode};
use plfm_node_agent::instance::Status;
use plfm_node_agent::logs::LogHandle;
use plfm_node_agent::runtime::firecracker::FirecrackerRuntime;
use plfm_node_agent::runtime::Runtime;
use plfm_node_agent::secrets::DirSecrets;
use plfm_node_agent::spec::{decode_assignment, Plan};
use plfm_node_agent::status::outbox::LocalSink;
use plfm_node_agent::status::StatusReport;

fn assignment(instance: &str) -> serde_json::Value {
    serde_json::json!({
        "instance_id": instance, "generation": 1, "desired_state": "running",
        "workload": {
            "spec_version": "v1", "instance_id": instance, "generation": 1,
            "image": {"ref": "127.0.0.1:9/app:v1",
                      "digest": "sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
                      "resolved_digest": "sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"},
            "command": ["/app"],
            "resources": {"cpu_request": 1.0, "memory_limit_bytes": 268435456_i64},
            "network": {"overlay_ipv6": common::overlay_of(instance), "gateway_ipv6": "fe80::1"},
            "lifecycle": {"termination_grace_seconds": 2, "restart_policy": "always", "max_retries": 5}
        }
    })
}

fn plan(cursor: i64, instances: &[&str]) -> Plan {
    Plan {
        cursor,
        assignments: instances
            .iter()
            .map(|i| decode_assignment(&assignment(i), "test").unwrap())
            .collect(),
        rejected: vec![],
    }
}

async fn start_node(data_dir: &Path, runtime: Arc<dyn Runtime>) -> Node {
    Node::start(NodeOptions {
        data_dir: data_dir.to_path_buf(),
        runtime,
        clock: Arc::new(SystemClock::new()),
        secrets: Arc::new(DirSecrets::new(data_dir.join("secrets"))),
        sink: Arc::new(LocalSink),
        boot_timeout: Duration::from_secs(30),
        max_instances: 100,
        metrics: Arc::new(plfm_node_agent::metrics::Metrics::new()),
    })
    .await
    .expect("the agent starts")
}

fn reports(node: &Node, instance: &str) -> Vec<StatusReport> {
    node.store
        .delivered_reports(Some(instance))
        .unwrap()
        .into_iter()
        .map(|(_, _, j)| serde_json::from_str(&j).unwrap())
        .collect()
}

fn failed(node: &Node, instance: &str) -> Option<StatusReport> {
    reports(node, instance)
        .into_iter()
        .find(|r| r.status == Status::Failed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_firecracker_binary_fails_instances_and_the_agent_stays_healthy() {
    let tmp = tempfile::tempdir().unwrap();
    let toml = r#"
node_id = "n1"
data_dir = "data"
[control_plane]
mode = "standalone"
desired_dir = "desired"
[runtime]
kind = "firecracker"
[runtime.firecracker]
binary = "/nonexistent/bin/firecracker"
kernel = "/nonexistent/vmlinux"
"#;
    let config = Config::from_toml(toml, "test", tmp.path(), std::iter::empty())
        .expect("config with a missing binary still loads");
    std::fs::create_dir_all(&config.data_dir).unwrap();
    let ledger = plfm_node_agent::state::Store::open(&config.state_db()).unwrap();
    let runtime = build_runtime(
        &config,
        Arc::new(SystemClock::new()),
        Some(ledger),
        LogHandle::default(),
        None,
    )
    .expect("the firecracker runtime builds even without its binary");
    assert_eq!(runtime.kind(), "firecracker");
    let node = start_node(&config.data_dir, runtime).await;
    node.supervisor.apply(plan(1, &["i-a", "i-b"])).await;
    for i in ["i-a", "i-b"] {
        wait_until("failed report", Duration::from_secs(20), || {
            failed(&node, i).is_some()
        })
        .await;
        let r = failed(&node, i).unwrap();
        assert_eq!(
            r.reason_code.map(|c| c.as_str()),
            Some("firecracker_start_failed")
        );
        let msg = r.error_message.unwrap_or_default();
        assert!(msg.contains("/nonexistent/bin/firecracker"), "{msg}");
    }
    // Still healthy: it takes a new plan and reports for it.
    node.supervisor.apply(plan(2, &["i-a", "i-b", "i-c"])).await;
    wait_until("i-c fails the same way", Duration::from_secs(20), || {
        failed(&node, "i-c").is_some()
    })
    .await;
    assert_eq!(node.status.list().len(), 3);
    node.shutdown(ShutdownMode::Drain).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vmm_exit_before_the_handshake_fails_cleans_up_and_restarts() {
    let Some(env) = FcEnv::new("exit_after_start:152") else {
        return;
    };
    let runtime: Arc<dyn Runtime> = Arc::new(FirecrackerRuntime::new(
        env.config(5),
        &env.data_dir(),
        None,
        Arc::new(TestHost::new(env.root.path(), Some("plfmtest0"))),
    ));
    let node = start_node(&env.data_dir(), runtime).await;
    node.supervisor.apply(plan(1, &["i-crash"])).await;
    let dir = env.data_dir().join("instances/i-crash");
    wait_until("failed report", Duration::from_secs(20), || {
        failed(&node, "i-crash").is_some()
    })
    .await;
    // Clean-up ran before the failure was reported (and the restart backs off 1 s).
    let leftovers: Vec<_> = ["api.sock", "v.sock", "v.sock_5161", "scratch.ext4"]
        .iter()
        .filter(|f| dir.join(f).exists())
        .collect();
    assert!(leftovers.is_empty(), "left behind: {leftovers:?}");
    let r = failed(&node, "i-crash").unwrap();
    assert_eq!(
        r.reason_code.map(|c| c.as_str()),
        Some("firecracker_start_failed")
    );
    let msg = r.error_message.unwrap_or_default();
    assert!(msg.contains("exit code 152 (bad configuration)"), "{msg}");
    assert!(msg.contains("simulated crash, exit 152"), "{msg}");
    // One meaning of `exit_code`: the workload's. The VMM's own exit (152) is in the
    // message above, never in `exit_code`.
    assert_eq!(r.exit_code, None, "{msg}");
    // The whole configuration and InstanceStart were accepted first.
    assert!(env.requests().iter().any(|(_, p, b)| p == "/actions"
        && b.as_ref().and_then(|b| b["action_type"].as_str()) == Some("InstanceStart")));
    // Restart policy `always`: it boots again after the backoff.
    wait_until("second boot", Duration::from_secs(20), || {
        reports(&node, "i-crash")
            .iter()
            .filter(|r| r.status == Status::Booting)
            .count()
            >= 2
    })
    .await;
    node.shutdown(ShutdownMode::Drain).await;
    for pid in env.pids() {
        wait_until("stand-in gone", Duration::from_secs(5), || {
            !standin_alive(pid)
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_binary_with_firecracker_kind_and_no_binary_stays_healthy() {
    let tmp = tempfile::tempdir().unwrap();
    let port = common::free_port();
    std::fs::create_dir_all(tmp.path().join("desired")).unwrap();
    std::fs::write(
        tmp.path().join("desired/i-bin.json"),
        serde_json::to_vec(&assignment("i-bin")).unwrap(),
    )
    .unwrap();
    std::fs::write(
        tmp.path().join("agent.toml"),
        format!(
            r#"node_id = "n1"
data_dir = "data"
[api]
listen = "127.0.0.1:{port}"
[control_plane]
mode = "standalone"
desired_dir = "desired"
rescan_interval_ms = 200
[runtime]
kind = "firecracker"
[runtime.firecracker]
binary = "/nonexistent/bin/firecracker"
"#
        ),
    )
    .unwrap();
    let _agent = common::agent::AgentProcess::spawn(
        &tmp.path().join("agent.toml"),
        &tmp.path().join("agent.log"),
    );
    plfm_node_agent::control_plane::http::ensure_crypto_provider();
    let view = common::wait::Poll::within(Duration::from_secs(30))
        .every(Duration::from_millis(100))
        .until_async("i-bin failed at the API", || {
            let got = common::agent::http_get(&format!("127.0.0.1:{port}"), "/v1/instances/i-bin");
            match got {
                Ok((200, body)) => match serde_json::from_str::<serde_json::Value>(&body) {
                    Ok(v) if v["status"] == "failed" => Ok(v),
                    other => Err(format!("{other:?}")),
                },
                other => Err(format!(
                    "{other:?}; agent log:\n{}",
                    std::fs::read_to_string(tmp.path().join("agent.log")).unwrap_or_default()
                )),
            }
        })
        .await;
    assert_eq!(view["reason_code"], "firecracker_start_failed");
    let msg = view["error_message"].as_str().unwrap_or_default();
    assert!(msg.contains("/nonexistent/bin/firecracker"), "{msg}");
    // Still healthy after the failure.
    plfm_node_agent::control_plane::http::ensure_crypto_provider();
    let health = reqwest::Client::new()
        .get(format!("http://127.0.0.1:{port}/healthz"))
        .bearer_auth(common::agent::TEST_TOKEN)
        .send()
        .await
        .expect("healthz answers");
    assert!(health.status().is_success(), "{}", health.status());
    let log = std::fs::read_to_string(tmp.path().join("agent.log")).unwrap_or_default();
    assert!(
        log.contains("/nonexistent/bin/firecracker"),
        "the start-up log names the binary"
    );
}
