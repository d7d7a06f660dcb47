//! The overlay owner in connected mode, against the in-test control plane, without
//! root: the overlay source is `GET /v1/nodes/{node_id}/overlay`.
//! - A 404 (no overlay service) turns the overlay off, logged once and not asked again
//!   at the plan's pace; the public key is served and sent in heartbeats with the
//!   `overlay` extra all the same.
//! - A document is taken (a refused peer listed, the rest wanted), kept in
//!   `<data_dir>/overlay/last-good.json`, and, with the control plane down, applied
//!   again by a restarted agent before any answer.
//!
//! The device cannot start here (`userspace_command` names no program), so no interface
//! is made on the host: the apply error is shown and counted, and the configuration is
//! still the one the owner holds.

mod common;
#[path = "support/control_plane.rs"]
mod support;

use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use base64::Engine as _;
use common::agent::AgentProcess;
use common::free_port;
use serde_json::{json, Value};
use support::{new_state, FakeCp};

const NODE: &str = "node-ov";

fn spawn_agent(cp: &FakeCp, dir: &Path, port: u16) -> AgentProcess {
    let cfg = format!(
        "node_id = \"{NODE}\"\ndata_dir = \"data\"\n[api]\nlisten = \"127.0.0.1:{port}\"\n[control_plane]\nmode = \"http\"\nurl = \"http://{}\"\npoll_interval_ms = 200\nheartbeat_interval_secs = 1\n[runtime]\nkind = \"mock\"\n[overlay]\ninterface = \"plfmct{}\"\nuserspace_command = \"/nonexistent/plfm-test-wireguard-go\"\ndrift_check_seconds = 1\n",
        cp.addr,
        std::process::id() % 1_000_000
    );
    let config = dir.join("agent.toml");
    std::fs::write(&config, cfg).unwrap();
    AgentProcess::spawn(&config, &dir.join("agent.log"))
}

/// `GET /v1/overlay` once `cond` holds, within `within`.
async fn overlay_where(
    agent: &AgentProcess,
    what: &str,
    within: Duration,
    cond: impl Fn(&Value) -> bool,
) -> Value {
    let end = Instant::now() + within;
    let mut last = String::new();
    while Instant::now() < end {
        agent.assert_running();
        if let Ok((200, body)) = agent.api_get("/v1/overlay") {
            if let Ok(v) = serde_json::from_str::<Value>(&body) {
                if cond(&v) {
                    return v;
                }
            }
            last = body;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!(
        "timed out after {within:?} waiting for {what}; last /v1/overlay: {last}\n{}",
        agent.diagnostics()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_404_turns_the_overlay_off_and_a_kept_config_survives_a_control_plane_outage() {
    let cp = FakeCp::start(new_state(NODE, 1, None)).await;
    let tmp = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut agent = spawn_agent(&cp, tmp.path(), port);

    // 404: off, with the public key shown and sent.
    let off = overlay_where(&agent, "the overlay off", Duration::from_secs(20), |v| {
        v["state"] == "off" && v["off_reason"].as_str().is_some_and(|r| r.contains("404"))
    })
    .await;
    let public_key = off["public_key"].as_str().unwrap().to_string();
    let end = Instant::now() + Duration::from_secs(20);
    let hb = loop {
        let found = cp
            .state
            .heartbeats
            .lock()
            .unwrap()
            .iter()
            .find(|h| h.get("overlay").is_some())
            .cloned();
        if let Some(h) = found {
            break h;
        }
        assert!(Instant::now() < end, "no heartbeat with an overlay extra");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(hb["wireguard_public_key"], public_key.as_str(), "{hb}");
    // The 404 is an answer, not a refusal: the node is healthy.
    let (code, health) = agent.api_get("/healthz").unwrap();
    assert_eq!(code, 200, "{health}");
    assert_eq!(hb["overlay"]["peers"], 0, "{hb}");
    assert!(
        hb["overlay"]["last_handshake_max_age_secs"].is_null(),
        "{hb}"
    );
    // Not asked again at the plan's pace (every 200 ms): plans keep coming, the
    // overlay waits for its slow retry.
    let plans_before = plan_gets(&agent);
    let end = Instant::now() + Duration::from_secs(20);
    while plan_gets(&agent) < plans_before + 5.0 {
        assert!(Instant::now() < end, "the agent stopped polling plans");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(cp.state.overlay_gets.load(Ordering::SeqCst), 1);
    assert_eq!(
        agent.log().matches("overlay off").count(),
        1,
        "{}",
        agent.log()
    );

    // A document (restart: the slow retry is minutes away): taken, the bad peer listed.
    let good_key = base64::engine::general_purpose::STANDARD.encode([2u8; 32]);
    let bad_key = base64::engine::general_purpose::STANDARD.encode([3u8; 32]);
    *cp.state.overlay.lock().unwrap() = Some(json!({
        "generation": 4,
        "node": {"overlay_ipv6": "fd00:1::1", "listen_port": 51820, "mtu": 1420},
        "peers": [
            {"node_id": "node-2", "public_key": good_key, "endpoint": "[fd00:ffff::2]:51820", "allowed_ips": ["fd00:1::2/128"]},
            {"node_id": "node-3", "public_key": bad_key, "allowed_ips": ["::/0"]}
        ]
    }));
    agent.kill9();
    let agent = spawn_agent(&cp, tmp.path(), port);
    let on = overlay_where(&agent, "generation 4", Duration::from_secs(20), |v| {
        v["generation"] == 4 && v["last_apply_error"].is_string()
    })
    .await;
    assert_eq!(on["state"], "on", "{on:#}");
    assert_eq!(on["public_key"], public_key.as_str(), "the key is kept");
    assert_eq!(on["source"], "control plane");
    assert_eq!(on["peers"].as_array().unwrap().len(), 1, "{on:#}");
    assert_eq!(on["peers"][0]["node_id"], "node-2");
    assert_eq!(on["refused"][0]["index"], 1, "{on:#}");
    assert!(on["refused"][0]["reason"]
        .as_str()
        .unwrap()
        .contains("too broad"));
    assert!(
        on["last_apply_error"]
            .as_str()
            .unwrap()
            .contains("/nonexistent/plfm-test-wireguard-go"),
        "{on:#}"
    );
    let kept = tmp.path().join("data/overlay/last-good.json");
    let kept_doc: Value = serde_json::from_slice(&std::fs::read(&kept).unwrap()).unwrap();
    assert_eq!(kept_doc["generation"], 4);
    assert!(
        agent.log().contains("overlay peer refused"),
        "{}",
        agent.log()
    );

    // The control plane down: a restarted agent applies the kept config before any
    // answer, and keeps it.
    cp.state.down.store(true, Ordering::SeqCst);
    let mut agent = agent;
    agent.kill9();
    let agent = spawn_agent(&cp, tmp.path(), port);
    let kept = overlay_where(
        &agent,
        "the kept config with the control plane down",
        Duration::from_secs(20),
        |v| {
            v["generation"] == 4
                && v["last_source_error"]
                    .as_str()
                    .is_some_and(|e| e.contains("503"))
        },
    )
    .await;
    assert!(
        kept["source"].as_str().unwrap().starts_with("last good"),
        "{kept:#}"
    );
    assert_eq!(kept["state"], "on");
    let (_, metrics) = agent.api_get("/metrics").unwrap();
    assert!(
        metrics.contains("plfm_agent_cp_requests_total{endpoint=\"overlay\",outcome=\"http_5xx\"}"),
        "{metrics}"
    );
    let errors = metrics
        .lines()
        .find(|l| l.starts_with("plfm_overlay_apply_total{outcome=\"error\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0);
    assert!(errors >= 1.0, "{metrics}");
}

/// `plan` requests the agent made so far (its metrics).
fn plan_gets(agent: &AgentProcess) -> f64 {
    let Ok((200, metrics)) = agent.api_get("/metrics") else {
        return 0.0;
    };
    metrics
        .lines()
        .filter(|l| l.starts_with("plfm_agent_cp_requests_total{endpoint=\"plan\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
