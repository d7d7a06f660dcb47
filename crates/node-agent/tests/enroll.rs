//! `plfm-node-agent enroll` and the node identity, through the agent binary against
//! the in-test control plane (`support/control_plane.rs`, which deserializes the
//! enrollment body into plfm's `EnrollNodeRequest` as the real one does).

mod common;
#[path = "support/control_plane.rs"]
mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use common::agent::{cli, AgentProcess};
use common::assignment_json;
use common::wait::poll_until_async;
use plfm_node_agent::instance::Status;
use serde_json::{json, Value};
use support::{new_state, FakeCp};

/// The node id the control plane hands out.
const ENROLLED: &str = "enrolled-7";
/// The enrollment token: it must never show in any output or log.
const TOKEN: &str = "enroll-secret-5f3a9c";

struct Env {
    root: tempfile::TempDir,
}

impl Env {
    fn new(url: &str, node_id_line: &str) -> Env {
        let root = tempfile::tempdir().unwrap();
        let cfg = format!(
            r#"{node_id_line}
data_dir = "data"
[api]
listen = "127.0.0.1:{}"
[node]
region = "test-region"
public_ipv6 = "2001:db8:7::10"
labels = {{ rack = "r1" }}
[control_plane]
mode = "http"
url = "{url}"
poll_interval_ms = 200
heartbeat_interval_secs = 1
[runtime]
kind = "mock"
[runtime.mock]
prepare_ms = 10
boot_ms = 50
stop_ms = 10
"#,
            common::free_port()
        );
        std::fs::write(root.path().join("agent.toml"), cfg).unwrap();
        // The API socket next to the config, the TCP API's token file.
        common::agent::prepare_api(&root.path().join("agent.toml"));
        Env { root }
    }

    fn path(&self, p: &str) -> PathBuf {
        self.root.path().join(p)
    }

    fn config(&self) -> PathBuf {
        self.path("agent.toml")
    }

    fn token_file(&self, mode: u32) -> PathBuf {
        let p = self.path("enroll.token");
        std::fs::write(&p, format!("{TOKEN}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        p
    }

    fn enroll(&self, url: &str, token: Option<&Path>) -> Output {
        let mut args = vec!["enroll", "--url", url, "--timeout-secs", "10"];
        let t;
        if let Some(p) = token {
            t = p.display().to_string();
            args.extend(["--token-file", t.as_str()]);
        }
        let out = cli(&self.config(), &args);
        let all = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!all.contains(TOKEN), "the token leaked: {all}");
        out
    }

    fn identity(&self) -> Option<Vec<u8>> {
        std::fs::read(self.path("data/identity.json")).ok()
    }
}

fn text(o: &Output) -> String {
    format!(
        "status {:?}\nstdout: {}\nstderr: {}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn heartbeats_of(cp: &FakeCp) -> Vec<Value> {
    cp.state.heartbeats.lock().unwrap().clone()
}

/// enroll → identity persisted (0600) → the daemon runs as that id (plan, heartbeat
/// with the WireGuard public key) → restart → same id; a second enroll sends nothing;
/// a token file others can read is refused; the token shows nowhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enroll_persists_the_id_the_daemon_keeps_it_and_a_second_enroll_is_a_no_op() {
    let cp = FakeCp::start(new_state(ENROLLED, 1, None)).await;
    let url = cp.url("http");
    let env = Env::new(&url, "");

    // Not enrolled and no node_id: the daemon refuses to start, saying what to do.
    let out = cli(&env.config(), &["run"]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("enroll"),
        "{}",
        text(&out)
    );

    // A token file readable by others: refused, naming file and mode; nothing sent.
    let loose = env.token_file(0o644);
    let out = env.enroll(&url, Some(&loose));
    assert!(!out.status.success(), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&loose.display().to_string()) && err.contains("0644"),
        "{}",
        text(&out)
    );
    assert!(cp.state.enrolls.lock().unwrap().is_empty());
    assert!(env.identity().is_none());

    let token = env.token_file(0o600);
    let out = env.enroll(&url, Some(&token));
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&format!("as node {ENROLLED}")),
        "{}",
        text(&out)
    );
    let bodies = cp.state.enrolls.lock().unwrap().clone();
    assert_eq!(bodies.len(), 1);
    assert!(
        cp.state.rejected.lock().unwrap().is_empty(),
        "the body fits plfm's EnrollNodeRequest"
    );
    let body = &bodies[0];
    let wg = plfm_node_agent::identity::load_wireguard_key(&env.path("data"))
        .unwrap()
        .expect("the WireGuard key was created")
        .public_base64();
    assert_eq!(body["wireguard_public_key"], json!(wg));
    assert_eq!(body["region"], json!("test-region"));
    assert_eq!(body["labels"], json!({"rack": "r1"}));
    assert_eq!(body["public_ipv6"], json!("2001:db8:7::10"));
    assert_eq!(
        body["enrollment_token"],
        json!(TOKEN),
        "the token is sent once, in the body"
    );
    assert!(body["cpu_cores"].as_i64().unwrap() >= 1);
    assert!(body["memory_bytes"].as_i64().unwrap() > 0);
    assert!(!body["hostname"].as_str().unwrap().is_empty());
    let key_mode = std::fs::metadata(env.path("data/overlay/private.key"))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(key_mode, 0o600);

    let identity = env.identity().expect("identity persisted");
    let v: Value = serde_json::from_slice(&identity).unwrap();
    assert_eq!(v["node_id"], json!(ENROLLED));
    assert_eq!(v["overlay_ipv6"], json!("fd00:1::1"));
    let mode = std::fs::metadata(env.path("data/identity.json"))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);

    // Again: says so, sends nothing, changes nothing.
    let out = env.enroll(&url, Some(&token));
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("already enrolled as node enrolled-7"),
        "{}",
        text(&out)
    );
    assert_eq!(
        cp.state.enrolls.lock().unwrap().len(),
        1,
        "no second request"
    );
    assert_eq!(env.identity().unwrap(), identity);

    // The daemon runs as the enrolled id: the plan (404 for any other node) is applied
    // and heartbeats carry the id and the WireGuard public key.
    cp.set_plan(3, vec![assignment_json("enr-1", 1)]);
    let log = env.path("agent.log");
    let mut agent = AgentProcess::spawn_with(&env.config(), &log, &[("RUST_LOG", "debug")]);
    poll_until_async("enr-1 ready", Duration::from_secs(20), || {
        agent.instance_where(|v| v.instance_id == "enr-1" && v.status == Status::Ready)
    })
    .await;
    poll_until_async(
        "a heartbeat",
        Duration::from_secs(10),
        || match heartbeats_of(&cp).last() {
            Some(h) => Ok(h.clone()),
            None => Err("none"),
        },
    )
    .await;
    for h in heartbeats_of(&cp) {
        assert_eq!(h["node_id"], json!(ENROLLED), "{h}");
        assert_eq!(h["wireguard_public_key"], json!(wg), "{h}");
        assert!(h["agent_version"].is_string(), "{h}");
    }
    let out = agent.cli(&["status", "--json", "--node"]);
    assert!(out.status.success(), "{}", text(&out));
    let status: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["node"]["node_id"], json!(ENROLLED));
    assert_eq!(status["node"]["wireguard_public_key"], json!(wg));
    assert_eq!(status["instances"][0]["instance_id"], json!("enr-1"));
    assert!(agent.terminate(Duration::from_secs(20)).success());
    drop(agent);

    // Restarted: the same id.
    cp.state.heartbeats.lock().unwrap().clear();
    let mut agent = AgentProcess::spawn_with(&env.config(), &log, &[("RUST_LOG", "debug")]);
    poll_until_async(
        "a heartbeat after the restart",
        Duration::from_secs(20),
        || {
            agent.assert_running();
            match heartbeats_of(&cp).last() {
                Some(h) => Ok(h.clone()),
                None => Err(agent.log()),
            }
        },
    )
    .await;
    assert!(heartbeats_of(&cp)
        .iter()
        .all(|h| h["node_id"] == json!(ENROLLED)));
    assert!(agent.terminate(Duration::from_secs(20)).success());
    let agent_log = std::fs::read_to_string(&log).unwrap();
    assert!(
        !agent_log.contains(TOKEN),
        "the token is in the agent's log"
    );
    assert_eq!(
        env.identity().unwrap(),
        identity,
        "the identity never changes"
    );

    // A config naming another node id than the enrolled one: refused, naming both.
    let text_cfg = std::fs::read_to_string(env.config()).unwrap();
    std::fs::write(
        env.config(),
        format!("node_id = \"other-node\"\n{text_cfg}"),
    )
    .unwrap();
    let out = cli(&env.config(), &["run"]);
    assert!(!out.status.success(), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("\"other-node\"") && err.contains("\"enrolled-7\""),
        "{}",
        text(&out)
    );
}

/// A control plane that refuses the enrollment: a clear error with its code and
/// message (the token redacted if the answer quotes it), and no identity.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_enrollment_is_a_clear_error_and_persists_nothing() {
    let cp = FakeCp::start(new_state(ENROLLED, 1, None)).await;
    let url = cp.url("http");
    let env = Env::new(&url, "");
    let token = env.token_file(0o600);

    *cp.state.enroll_answer.lock().unwrap() =
        Some((409, json!({"error": "hostname already enrolled"})));
    let out = env.enroll(&url, Some(&token));
    assert!(!out.status.success(), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("refused the enrollment")
            && err.contains("HTTP 409")
            && err.contains("hostname already enrolled"),
        "{}",
        text(&out)
    );
    assert!(env.identity().is_none());

    // An answer quoting the token: the token is redacted (Env::enroll checks it).
    *cp.state.enroll_answer.lock().unwrap() =
        Some((400, json!({"error": format!("token {TOKEN} is spent")})));
    let out = env.enroll(&url, Some(&token));
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("<token>"),
        "{}",
        text(&out)
    );

    // A 2xx that is not a node record.
    *cp.state.enroll_answer.lock().unwrap() = Some((200, json!({"ok": true})));
    let out = env.enroll(&url, Some(&token));
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not a node record"),
        "{}",
        text(&out)
    );
    assert!(env.identity().is_none());

    // Nobody listening: the error names the URL, within the timeout.
    let dead = format!("http://127.0.0.1:{}", common::free_port());
    let out = env.enroll(&dead, None);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(&dead),
        "{}",
        text(&out)
    );
    assert!(env.identity().is_none());

    // Plain http off loopback is refused before anything is sent.
    let out = env.enroll("http://10.1.2.3:8080", Some(&token));
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("loopback"),
        "{}",
        text(&out)
    );
}

#[test]
fn enroll_help_explains_the_identity_and_the_token() {
    let out = std::process::Command::new(common::agent::BIN)
        .args(["enroll", "--help"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let help = String::from_utf8_lossy(&out.stdout);
    for needle in [
        "identity.json",
        "--token-file",
        "--url",
        "owner only",
        "never changes",
    ] {
        assert!(help.contains(needle), "--help lacks {needle:?}:\n{help}");
    }
}
