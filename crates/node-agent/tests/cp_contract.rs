//! Contract tests for the control-plane direction, like the Firecracker ones: every
//! request body the agent sends to the control plane (status reports, heartbeats,
//! workload logs) fits plfm's node API types, kept as a JSON schema in
//! `tests/data/plfm-node-api-v1.schema.json` (its `$comment` says where each type comes
//! from). The agent binary runs in connected mode against the in-test control plane,
//! which itself deserializes every body into mirrors of plfm's types and answers 422
//! as the real one does. Also: a refused heartbeat shows in `/healthz`, `status` and
//! the metrics.

mod common;
#[path = "support/control_plane.rs"]
mod support;

use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::agent::AgentProcess;
use common::wait::wait_until_async;
use common::{assignment_json, free_port};
use serde_json::{json, Value};
use support::{new_state, FakeCp};

const NODE: &str = "node-1";

fn schema() -> Value {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/plfm-node-api-v1.schema.json");
    serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap()
}

/// Why `body` does not fit the definition `name`: the JSON schema's errors, plus the
/// integer fields (`x-rust-type` i32/i64) written with a fraction or out of range,
/// which plfm's serde refuses while JSON Schema's `integer` allows `2.0`.
fn violations(schema: &Value, name: &str, body: &Value) -> Vec<String> {
    let root = json!({"$schema": schema["$schema"], "definitions": schema["definitions"], "$ref": format!("#/definitions/{name}")});
    let v = jsonschema::validator_for(&root).expect("the schema compiles");
    let mut out: Vec<String> = v
        .iter_errors(body)
        .map(|e| format!("{}: {e}", e.instance_path()))
        .collect();
    strict_integers(schema, &schema["definitions"][name], body, name, &mut out);
    out
}

fn strict_integers(schema: &Value, def: &Value, body: &Value, at: &str, out: &mut Vec<String>) {
    if let Some(r) = def["$ref"].as_str() {
        let name = r.trim_start_matches("#/definitions/");
        return strict_integers(schema, &schema["definitions"][name], body, at, out);
    }
    if let (Some(items), Some(arr)) = (def.get("items"), body.as_array()) {
        for (i, b) in arr.iter().enumerate() {
            strict_integers(schema, items, b, &format!("{at}[{i}]"), out);
        }
    }
    for (k, p) in def["properties"].as_object().into_iter().flatten() {
        let Some(b) = body.get(k) else { continue };
        let path = format!("{at}.{k}");
        let fits = match p["x-rust-type"].as_str() {
            Some("i32") => b.is_null() || b.as_i64().is_some_and(|v| i32::try_from(v).is_ok()),
            Some("i64") => b.is_null() || b.is_i64(),
            _ => true,
        };
        if !fits {
            out.push(format!(
                "{path}: {b} is not a JSON integer of Rust type {}",
                p["x-rust-type"]
            ));
        }
        strict_integers(schema, p, b, &path, out);
    }
}

/// The agent binary in connected mode against `cp`, with mock runtime faults; its API
/// as a base URL.
fn spawn_agent(cp: &FakeCp, faults: &str) -> (AgentProcess, String, tempfile::TempDir) {
    let tmp = tempfile::tempdir().unwrap();
    let port = free_port();
    let cfg = format!(
        "node_id = \"{NODE}\"\ndata_dir = \"data\"\n[api]\nlisten = \"127.0.0.1:{port}\"\n[control_plane]\nmode = \"http\"\nurl = \"{}\"\npoll_interval_ms = 200\nheartbeat_interval_secs = 1\n[runtime]\nkind = \"mock\"\n[runtime.mock]\nprepare_ms = 10\nboot_ms = 50\nstop_ms = 10\n[runtime.mock.faults]\n{faults}\n",
        cp.url("http")
    );
    let config = tmp.path().join("agent.toml");
    std::fs::write(&config, cfg).unwrap();
    let agent = AgentProcess::spawn(&config, &tmp.path().join("agent.log"));
    (agent, format!("http://127.0.0.1:{port}"), tmp)
}

#[tokio::test]
async fn every_request_body_the_agent_sends_fits_plfms_node_api() {
    let cp = FakeCp::start(new_state(NODE, 1, None)).await;
    let mut exits = assignment_json("exit-3", 1);
    exits["workload"]["lifecycle"] =
        json!({"termination_grace_seconds": 1, "restart_policy": "never", "max_retries": 0});
    cp.set_plan(1, vec![assignment_json("ok-1", 1), exits]);
    let _agent = spawn_agent(
        &cp,
        "\"exit-3\" = { kind = \"exit\", code = 3, after_ms = 100 }",
    );
    // Every kind of body: reports (booting, ready, failed with an exit code),
    // heartbeats counting the instances, and console log lines.
    wait_until_async(
        "reports, a heartbeat and logs",
        Duration::from_secs(20),
        || {
            let posts = cp.posts();
            let failed = posts
                .iter()
                .any(|r| r.status == "failed" && r.body["exit_code"] == 3);
            let ready = posts.iter().any(|r| r.status == "ready");
            let hb = cp
                .state
                .heartbeats
                .lock()
                .unwrap()
                .iter()
                .any(|h| h["instance_count"].as_i64() >= Some(1));
            let logs = !cp.state.logs.lock().unwrap().is_empty();
            (failed && ready && hb && logs) || !cp.state.rejected.lock().unwrap().is_empty()
        },
    )
    .await;
    let rejected = cp.state.rejected.lock().unwrap().clone();
    assert!(
        rejected.is_empty(),
        "the control plane refused bodies: {rejected:#?}"
    );
    let schema = schema();
    let mut bodies: Vec<(&str, Value)> = cp
        .posts()
        .into_iter()
        .map(|r| ("ReportInstanceStatusRequest", r.body))
        .collect();
    bodies.extend(
        cp.state
            .heartbeats
            .lock()
            .unwrap()
            .iter()
            .map(|h| ("HeartbeatRequest", h.clone())),
    );
    bodies.extend(
        cp.state
            .logs
            .lock()
            .unwrap()
            .iter()
            .map(|l| ("WorkloadLogIngestRequest", l.clone())),
    );
    for (name, body) in &bodies {
        let v = violations(&schema, name, body);
        assert!(v.is_empty(), "{name} {body}: {v:#?}");
    }
    // Heartbeat figures are whole numbers (plfm types them i32/i64).
    let hb = cp.state.heartbeats.lock().unwrap()[0].clone();
    assert!(hb["available_cpu_cores"].is_i64(), "{hb}");
    assert!(hb["instance_count"].is_i64(), "{hb}");
    // Enrollment has no agent code yet (the node is configured with its id); the
    // schema keeps plfm's type for it.
    assert!(schema["definitions"]["EnrollNodeRequest"].is_object());
}

#[test]
fn the_contract_refuses_what_plfm_refuses() {
    let schema = schema();
    let good = json!({"state": "active", "available_cpu_cores": 2, "available_memory_bytes": 1_i64 << 30, "instance_count": 0, "outbox_depth": 0});
    assert!(violations(&schema, "HeartbeatRequest", &good).is_empty());
    // What the agent sent before: a float core count (plfm: HTTP 422).
    let mut float = good.clone();
    float["available_cpu_cores"] = json!(2.0);
    let v = violations(&schema, "HeartbeatRequest", &float);
    assert!(v.iter().any(|e| e.contains("available_cpu_cores")), "{v:?}");
    let mut big = good.clone();
    big["instance_count"] = json!(1_i64 << 40);
    assert!(!violations(&schema, "HeartbeatRequest", &big).is_empty());
    let mut missing = good.clone();
    missing
        .as_object_mut()
        .unwrap()
        .remove("available_memory_bytes");
    assert!(!violations(&schema, "HeartbeatRequest", &missing).is_empty());
    let mut state = good;
    state["state"] = json!("busy");
    assert!(!violations(&schema, "HeartbeatRequest", &state).is_empty());
    let report = json!({"status": "failed", "exit_code": 3, "reason_code": "oom_killed"});
    assert!(violations(&schema, "ReportInstanceStatusRequest", &report).is_empty());
    assert!(!violations(
        &schema,
        "ReportInstanceStatusRequest",
        &json!({"status": "running"})
    )
    .is_empty());
    assert!(!violations(
        &schema,
        "WorkloadLogIngestRequest",
        &json!({"entries": [{"ts": "yesterday", "instance_id": "a", "line": "x"}]})
    )
    .is_empty());
}

#[tokio::test]
async fn the_in_test_control_plane_answers_422_like_plfm() {
    let cp = FakeCp::start(new_state(NODE, 1, None)).await;
    plfm_node_agent::control_plane::http::ensure_crypto_provider();
    let http = reqwest::Client::new();
    let post = |body: Value| {
        http.post(format!("{}/v1/nodes/{NODE}/heartbeat", cp.url("http")))
            .json(&body)
            .send()
    };
    let r = post(json!({"state": "active", "available_cpu_cores": 2.0, "available_memory_bytes": 1, "instance_count": 0}))
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 422);
    let text = r.text().await.unwrap();
    assert!(
        text.contains("available_cpu_cores: invalid type: floating point"),
        "{text}"
    );
    let r = post(json!({"state": "active", "available_cpu_cores": 2, "available_memory_bytes": 1, "instance_count": 0, "unknown": true}))
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200, "unknown fields are ignored");
}

#[tokio::test]
async fn a_refused_heartbeat_shows_in_healthz_status_and_metrics_until_accepted() {
    let cp = FakeCp::start(new_state(NODE, 1, None)).await;
    cp.state.refuse_heartbeats.store(true, Ordering::SeqCst);
    let (agent, api, _tmp) = spawn_agent(&cp, "");
    plfm_node_agent::control_plane::http::ensure_crypto_provider();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let healthz = || async {
        let r = http
            .get(format!("{api}/healthz"))
            .bearer_auth(common::agent::TEST_TOKEN)
            .send()
            .await
            .ok()?;
        let code = r.status().as_u16();
        Some((code, r.json::<Value>().await.ok()?))
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut last = None;
    let (code, h) = loop {
        agent.assert_running();
        if let Some((code, h)) = healthz().await {
            if h["status"] == "degraded" {
                break (code, h);
            }
            last = Some((code, h));
        }
        assert!(
            Instant::now() < deadline,
            "healthz never said degraded; its last answer: {last:?}; heartbeats refused by \
             the control plane: {}\n{}",
            cp.state.rejected.lock().unwrap().len(),
            agent.diagnostics()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(code, 503, "{h}");
    let refusal = &h["control_plane_refusals"][0];
    assert_eq!(refusal["endpoint"], "heartbeat", "{h}");
    assert_eq!(refusal["code"], 422, "{h}");
    assert!(h["reason"].as_str().unwrap().contains("refuses"), "{h}");
    // `status` says so below the table.
    let out = agent.cli(&["status"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("NODE DEGRADED")
            && text.contains("control plane refuses heartbeat: HTTP 422"),
        "{text}"
    );
    let metrics = http
        .get(format!("{api}/metrics"))
        .bearer_auth(common::agent::TEST_TOKEN)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("plfm_agent_cp_requests_total{")
                && l.contains("endpoint=\"heartbeat\"")
                && l.contains("outcome=\"http_4xx\"")
                // every series starts at 0: the refusal must have counted
                && l
                    .rsplit(' ')
                    .next()
                    .and_then(|v| v.parse::<f64>().ok())
                    .is_some_and(|v| v >= 1.0)),
        "{metrics}"
    );
    assert!(
        metrics.contains("plfm_agent_reports_dropped_total"),
        "{metrics}"
    );
    // Accepted again: the node is healthy again.
    cp.state.refuse_heartbeats.store(false, Ordering::SeqCst);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some((200, h)) = healthz().await {
            assert_eq!(h["status"], "ok");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "healthz stayed degraded\n{}",
            agent.diagnostics()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
