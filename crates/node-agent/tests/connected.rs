//! Connected mode against an in-test control plane on loopback: plans to `ready`,
//! delivery in order and exactly once, an outage, `kill -9` with reports pending, TLS
//! with client certificates, secrets, heartbeats and workload logs.

mod common;
#[path = "support/control_plane.rs"]
mod support;

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use common::agent::AgentProcess;
use common::wait::wait_until_async as wait;
use common::{assignment_json, free_port, id, tree};
use plfm_node_agent::agent::{Node, NodeOptions};
use plfm_node_agent::clock::{SharedClock, SystemClock};
use plfm_node_agent::config::{Config, ControlPlaneConfig, ShutdownMode};
use plfm_node_agent::control_plane::http::{
    run_heartbeat, run_plan_poller, ControlPlaneClient, GuestAdvert, HttpSink,
};
use plfm_node_agent::control_plane::secrets::http_secrets;
use plfm_node_agent::instance::{ReasonCode, Status};
use plfm_node_agent::metrics::{Metrics, RequestLabels};
use plfm_node_agent::runtime::mock::{MockConfig, MockFault, MockRuntime};
use plfm_node_agent::state::Store;
use serde_json::{json, Value};
use support::{new_state, FakeCp};
use tokio::sync::watch;

const NODE: &str = "node-1";

fn cp_config(url: &str, extra: &str) -> ControlPlaneConfig {
    let text = format!(
        "node_id = \"{NODE}\"\ndata_dir = \"/tmp/unused\"\n[control_plane]\nmode = \"http\"\nurl = \"{url}\"\npoll_interval_ms = 100\nheartbeat_interval_secs = 1\nrequest_timeout_ms = 2000\n{extra}\n[runtime]\nkind = \"mock\"\n"
    );
    Config::from_toml(&text, "test", Path::new("/"), std::iter::empty())
        .unwrap()
        .control_plane
}

struct Connected {
    node: Option<Node>,
    mock: Arc<MockRuntime>,
    metrics: Arc<Metrics>,
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    _tmp: tempfile::TempDir,
}

impl Connected {
    async fn start(cp: &FakeCp, mock: MockConfig) -> Connected {
        let tmp = tempfile::tempdir().unwrap();
        let clock: SharedClock = Arc::new(SystemClock::new());
        let metrics = Arc::new(Metrics::new());
        let client = Arc::new(
            ControlPlaneClient::new(&cp_config(&cp.url("http"), ""), NODE, metrics.clone())
                .unwrap(),
        );
        let mock = Arc::new(MockRuntime::new(mock, clock.clone(), None, None));
        let node = Node::start(NodeOptions {
            data_dir: tmp.path().join("data"),
            runtime: mock.clone(),
            clock: clock.clone(),
            secrets: Arc::new(http_secrets(client.clone(), clock.clone())),
            sink: Arc::new(HttpSink::new(client.clone(), metrics.clone())),
            boot_timeout: Duration::from_secs(30),
            max_instances: 10_000,
            metrics: metrics.clone(),
        })
        .await
        .unwrap();
        let (stop, rx) = watch::channel(false);
        let tasks = vec![
            tokio::spawn(run_plan_poller(
                client.clone(),
                node.supervisor.clone(),
                node.store.clone(),
                clock.clone(),
                Duration::from_millis(100),
                node.status.subscribe_changes(),
                metrics.clone(),
                rx.clone(),
            )),
            tokio::spawn(run_heartbeat(
                client,
                node.supervisor.clone(),
                node.store.clone(),
                clock,
                NODE.into(),
                Duration::from_secs(1),
                0,
                GuestAdvert {
                    kernel_versions: vec!["6.1.0-99-test-amd64".into()],
                    guest_init_protocols: vec![1],
                },
                rx,
            )),
        ];
        Connected {
            node: Some(node),
            mock,
            metrics,
            stop,
            tasks,
            _tmp: tmp,
        }
    }

    fn node(&self) -> &Node {
        self.node.as_ref().unwrap()
    }

    /// Plan fetches answered 200: the poller applies (or ignores) each one before it
    /// sends the next, so this count is the poller's progress.
    fn plan_polls(&self) -> u64 {
        self.metrics
            .cp_requests
            .get_or_create(&RequestLabels {
                endpoint: "plan",
                outcome: "ok",
            })
            .get()
    }

    async fn stop(mut self) {
        let _ = self.stop.send(true);
        for t in self.tasks.drain(..) {
            let _ = t.await;
        }
        self.node
            .take()
            .unwrap()
            .shutdown(ShutdownMode::Detach)
            .await;
    }
}

fn statuses(cp: &FakeCp, i: &str) -> Vec<String> {
    cp.accepted_for(i).into_iter().map(|r| r.status).collect()
}

fn with_policy(mut v: Value, policy: &str, max_retries: u32) -> Value {
    v["workload"]["lifecycle"] = json!({"termination_grace_seconds": 1, "restart_policy": policy, "max_retries": max_retries});
    v
}

#[tokio::test]
async fn plan_instances_reach_ready_and_every_transition_arrives_once_in_order() {
    let cp = FakeCp::start(new_state(NODE, 1, None)).await;
    let ids = ["p1", "p2", "p3", "p4", "p5"];
    cp.set_plan(1, ids.iter().map(|i| assignment_json(i, 1)).collect());
    let agent = Connected::start(
        &cp,
        MockConfig {
            prepare_ms: 10,
            boot_ms: 50,
            stop_ms: 10,
            ..MockConfig::default()
        },
    )
    .await;
    wait(
        "all ready at the control plane",
        Duration::from_secs(15),
        || ids.iter().all(|i| statuses(&cp, i) == ["booting", "ready"]),
    )
    .await;
    let by = cp.check_delivery_log();
    for i in ids {
        let r = &by[i];
        assert_eq!(r[0].body["generation"], 1);
        assert!(r[1].body["boot_duration_ms"].as_u64().is_some());
        assert!(r[1].body["observed_at"].as_str().is_some());
        assert_eq!(r[0].body["boot_id"], r[1].body["boot_id"]);
    }
    wait(
        "a heartbeat counting 5 instances",
        Duration::from_secs(5),
        || {
            cp.state
                .heartbeats
                .lock()
                .unwrap()
                .iter()
                .any(|h| h["instance_count"] == 5 && h["state"] == "active")
        },
    )
    .await;
    let hb = cp.state.heartbeats.lock().unwrap().last().cloned().unwrap();
    assert!(hb["available_cpu_cores"].is_i64() && hb["available_memory_bytes"].as_i64().is_some());
    assert_eq!(
        hb["kernel_versions"],
        serde_json::json!(["6.1.0-99-test-amd64"])
    );
    assert_eq!(hb["guest_init_protocols"], serde_json::json!([1]));

    // An older or equal cursor is ignored; a newer one scales down.
    cp.set_plan(1, vec![]);
    // The fetch in flight when the plan changed may have got the old one; the next one
    // got the empty plan, and the one after it starts only once the poller has applied
    // or ignored it.
    let polls = agent.plan_polls();
    wait(
        "the poller to handle a fetch of the empty plan with cursor 1",
        Duration::from_secs(10),
        || agent.plan_polls() >= polls + 3,
    )
    .await;
    assert_eq!(
        agent.mock.running().len(),
        5,
        "a plan with an old cursor must be ignored"
    );
    cp.set_plan(2, ids[..2].iter().map(|i| assignment_json(i, 1)).collect());
    wait("p3..p5 stopped", Duration::from_secs(10), || {
        ids[2..]
            .iter()
            .all(|i| statuses(&cp, i).last().map(String::as_str) == Some("stopped"))
    })
    .await;
    cp.check_delivery_log();
    // Had the empty plan been applied, p1 and p2 would have drained before plan 2 (or
    // at least reported draining): they kept their first VM and report nothing new.
    for i in &ids[..2] {
        assert_eq!(statuses(&cp, i), ["booting", "ready"], "{i}");
        assert_eq!(agent.mock.starts(&id(i)), 1, "{i}");
    }
    agent.stop().await;
}

#[tokio::test]
async fn outage_loses_nothing_and_stops_no_workload() {
    let cp = FakeCp::start(new_state(NODE, 1, None)).await;
    let plan: Vec<Value> = vec![
        with_policy(assignment_json("crashy", 1), "always", 2),
        assignment_json("steady", 1),
        assignment_json("operator", 1),
    ];
    cp.set_plan(1, plan);
    let agent = Connected::start(
        &cp,
        MockConfig {
            prepare_ms: 10,
            boot_ms: 50,
            stop_ms: 10,
            ..MockConfig::default()
        },
    )
    .await;
    wait("ready", Duration::from_secs(15), || {
        ["crashy", "steady", "operator"]
            .iter()
            .all(|i| statuses(&cp, i) == ["booting", "ready"])
    })
    .await;

    // The control plane stops answering; meanwhile one instance crash-loops and an
    // operator stops another.
    cp.state.down.store(true, Ordering::SeqCst);
    agent.mock.inject(
        &id("crashy"),
        MockFault::Exit {
            code: 4,
            after_ms: 100,
        },
    );
    agent
        .node()
        .supervisor
        .stop_instance(id("operator"))
        .await
        .unwrap();
    // crashy: ready → failed; restart after 1 s and 2 s; then crash_loop_backoff.
    wait(
        "crash loop while the control plane is down",
        Duration::from_secs(20),
        || {
            agent
                .node()
                .status
                .get(&id("crashy"))
                .is_some_and(|v| v.reason_code == Some(ReasonCode::CrashLoopBackoff))
        },
    )
    .await;
    let attempts_during = cp.posts().iter().filter(|r| !r.accepted).count();
    assert!(
        attempts_during > 0,
        "delivery must keep trying during the outage"
    );
    assert!(
        agent.node().store.outbox_depth().unwrap() > 0,
        "reports wait in the outbox"
    );
    assert_eq!(agent.mock.starts(&id("steady")), 1);
    assert!(
        agent.mock.running().contains(&id("steady")),
        "a control-plane outage never stops a workload"
    );

    cp.state.down.store(false, Ordering::SeqCst);
    wait("everything delivered", Duration::from_secs(40), || {
        agent.node().store.outbox_depth().unwrap() == 0 && statuses(&cp, "crashy").len() == 9
    })
    .await;
    cp.check_delivery_log();
    assert_eq!(
        statuses(&cp, "crashy"),
        [
            "booting", "ready", "failed", "booting", "ready", "failed", "booting", "ready",
            "failed"
        ]
    );
    let crashy = cp.accepted_for("crashy");
    assert_eq!(
        crashy.last().unwrap().body["reason_code"],
        "crash_loop_backoff"
    );
    assert_eq!(
        statuses(&cp, "operator"),
        ["booting", "ready", "draining", "stopped"]
    );
    assert_eq!(
        cp.accepted_for("operator")[3].body["reason_code"],
        "terminated_by_operator"
    );
    assert_eq!(statuses(&cp, "steady"), ["booting", "ready"]);
    agent.stop().await;
}

fn write_agent_config(dir: &Path, url: &str, extra_cp: &str) -> std::path::PathBuf {
    let cfg = format!(
        "node_id = \"{NODE}\"\ndata_dir = \"data\"\n[api]\nlisten = \"127.0.0.1:{}\"\n[control_plane]\nmode = \"http\"\nurl = \"{url}\"\npoll_interval_ms = 200\nheartbeat_interval_secs = 1\n{extra_cp}\n[runtime]\nkind = \"mock\"\n[runtime.mock]\nprepare_ms = 10\nboot_ms = 50\nstop_ms = 10\n",
        free_port()
    );
    let p = dir.join("agent.toml");
    std::fs::write(&p, cfg).unwrap();
    p
}

/// The agent binary on `config`, logging at debug level to `log` (the secrets test
/// checks that even that log holds no secret).
fn spawn_agent(config: &Path, log: &Path) -> AgentProcess {
    AgentProcess::spawn_with(config, log, &[("RUST_LOG", "debug")])
}

#[tokio::test]
async fn kill_dash_nine_with_pending_reports_delivers_them_after_restart_and_resends_nothing_acked()
{
    let cp = FakeCp::start(new_state(NODE, 1, None)).await;
    let tmp = tempfile::tempdir().unwrap();
    let config = write_agent_config(tmp.path(), &cp.url("http"), "");
    let first = ["a1", "a2", "a3"];
    let second = ["b1", "b2", "b3"];
    cp.set_plan(1, first.iter().map(|i| assignment_json(i, 1)).collect());
    let mut agent = spawn_agent(&config, &tmp.path().join("agent1.log"));
    wait("first wave acknowledged", Duration::from_secs(15), || {
        first
            .iter()
            .all(|i| statuses(&cp, i) == ["booting", "ready"])
    })
    .await;

    // Reports stop being accepted; a second wave boots; its reports pile up.
    cp.state.status_down.store(true, Ordering::SeqCst);
    cp.set_plan(
        2,
        first
            .iter()
            .chain(second.iter())
            .map(|i| assignment_json(i, 1))
            .collect(),
    );
    wait(
        "second wave ready, its reports refused",
        Duration::from_secs(15),
        || {
            let list = agent.instances().unwrap_or_default();
            second.iter().all(|i| {
                list.iter()
                    .any(|v| v.instance_id == *i && v.status == Status::Ready)
            }) && second.iter().all(|i| {
                cp.posts()
                    .iter()
                    .any(|r| r.instance_id == *i && !r.accepted)
            })
        },
    )
    .await;
    agent.kill9();
    let posts_before = cp.posts().len();

    cp.state.status_down.store(false, Ordering::SeqCst);
    let mut agent = spawn_agent(&config, &tmp.path().join("agent2.log"));
    // Once the API answers, recovery is done: whatever the new agent would (wrongly)
    // send again is in its outbox by then. An empty outbox after that means every
    // report it queued has been sent and acknowledged; with every instance ready and
    // steady, nothing new gets queued.
    common::wait::poll_until_async("the new agent's API", Duration::from_secs(20), || {
        agent.api_up()
    })
    .await;
    let store = Store::open(&tmp.path().join("data/state.db")).unwrap();
    wait(
        "pending reports delivered, the new agent's outbox empty",
        Duration::from_secs(20),
        || {
            second
                .iter()
                .all(|i| statuses(&cp, i) == ["booting", "ready"])
                && store.outbox_depth().unwrap() == 0
        },
    )
    .await;
    agent.kill9();

    // A second-wave report can be in flight when the first agent is killed and
    // reach the control plane once it answers again: acknowledged to a dead
    // process, sent again by the new agent, dropped by its seq. Nothing the first
    // agent saw acknowledged is sent again.
    cp.check_delivery_log_after_a_crash();
    for r in cp.duplicates() {
        assert!(
            second.contains(&r.instance_id.as_str()),
            "acknowledged report re-sent after restart: {r:?}"
        );
    }
    let after: Vec<_> = cp.posts().into_iter().skip(posts_before).collect();
    for r in &after {
        assert!(
            !first.contains(&r.instance_id.as_str()),
            "acknowledged report re-sent after restart: {r:?}"
        );
    }
    for i in first.iter().chain(second.iter()) {
        assert_eq!(statuses(&cp, i), ["booting", "ready"], "{i}");
    }
}

// ---- TLS ----

struct Pki {
    ca_pem: String,
    server_cert: rustls_pki_types::CertificateDer<'static>,
    server_key: rustls_pki_types::PrivateKeyDer<'static>,
    client_cert_pem: String,
    client_key_pem: String,
    ca_der: rustls_pki_types::CertificateDer<'static>,
}

fn pki() -> Pki {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, SanType};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "plfm test CA");
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);

    let server_key = KeyPair::generate().unwrap();
    let mut sp = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    sp.subject_alt_names
        .push(SanType::IpAddress("127.0.0.1".parse().unwrap()));
    let server = sp.signed_by(&server_key, &issuer).unwrap();

    let client_key = KeyPair::generate().unwrap();
    let mut cparams = CertificateParams::new(Vec::<String>::new()).unwrap();
    cparams.distinguished_name.push(DnType::CommonName, NODE);
    let client = cparams.signed_by(&client_key, &issuer).unwrap();
    Pki {
        ca_pem: ca.pem(),
        ca_der: ca.der().clone(),
        server_cert: server.der().clone(),
        server_key: rustls_pki_types::PrivateKeyDer::Pkcs8(server_key.serialize_der().into()),
        client_cert_pem: client.pem(),
        client_key_pem: client_key.serialize_pem(),
    }
}

fn server_config(p: &Pki) -> rustls::ServerConfig {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(p.ca_der.clone()).unwrap();
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .unwrap();
    rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(vec![p.server_cert.clone()], p.server_key.clone_key())
        .unwrap()
}

#[tokio::test]
async fn mtls_with_the_right_ca_works_and_a_wrong_ca_names_the_certificate_problem() {
    let good = pki();
    let other = pki();
    let cp = FakeCp::start_tls(new_state(NODE, 10, Some("t0ken")), server_config(&good)).await;
    cp.set_plan(7, vec![assignment_json("tls-1", 1)]);
    let dir = tempfile::tempdir().unwrap();
    let w = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p.display().to_string()
    };
    let (ca, wrong_ca) = (w("ca.pem", &good.ca_pem), w("wrong-ca.pem", &other.ca_pem));
    let (cert, key, token) = (
        w("client.pem", &good.client_cert_pem),
        w("client.key", &good.client_key_pem),
        w("token", "t0ken\n"),
    );
    let url = format!("https://localhost:{}", cp.addr.port());
    let metrics = Arc::new(Metrics::new());

    let ok = cp_config(&url, &format!("ca_file = \"{ca}\"\nclient_cert_file = \"{cert}\"\nclient_key_file = \"{key}\"\ntoken_file = \"{token}\""));
    let client = ControlPlaneClient::new(&ok, NODE, metrics.clone()).unwrap();
    let (plan, _) = client.get_plan().await.unwrap();
    assert_eq!(plan.cursor, 7);
    assert_eq!(plan.assignments[0].instance_id.as_str(), "tls-1");

    let wrong = cp_config(
        &url,
        &format!(
            "ca_file = \"{wrong_ca}\"\nclient_cert_file = \"{cert}\"\nclient_key_file = \"{key}\""
        ),
    );
    let err = ControlPlaneClient::new(&wrong, NODE, metrics.clone())
        .unwrap()
        .get_plan()
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("invalid peer certificate"),
        "error must name the certificate problem: {err}"
    );

    // Without a client certificate the server refuses the handshake.
    let anon = cp_config(
        &url,
        &format!("ca_file = \"{ca}\"\ntoken_file = \"{token}\""),
    );
    let err = ControlPlaneClient::new(&anon, NODE, metrics.clone())
        .unwrap()
        .get_plan()
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.to_lowercase().contains("certificate")
            || err.contains("handshake")
            || err.contains("alert"),
        "{err}"
    );

    // A https URL without a CA is a config error; so is an unreadable CA.
    let text = format!("node_id = \"n\"\ndata_dir = \"d\"\n[control_plane]\nmode = \"http\"\nurl = \"{url}\"\n[runtime]\nkind = \"mock\"\n");
    let e = Config::from_toml(&text, "t", Path::new("/"), std::iter::empty())
        .unwrap_err()
        .to_string();
    assert!(e.contains("ca_file"), "{e}");
    let bad = w("bad-ca.pem", "not a certificate");
    let e = Config::from_toml(
        &text.replace("[runtime]", &format!("ca_file = \"{bad}\"\n[runtime]")),
        "t",
        Path::new("/"),
        std::iter::empty(),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("bad-ca.pem"), "{e}");
}

// ---- secrets ----

fn secret_bundle(version: &str, data: &str, hash: Option<&str>) -> Value {
    use sha2::Digest;
    let h = hash.map(str::to_string).unwrap_or_else(|| {
        format!(
            "sha256:{}",
            hex::encode(sha2::Sha256::digest(data.as_bytes()))
        )
    });
    json!({"version_id": version, "format": "env", "data_hash": h, "data": data})
}

#[tokio::test]
async fn secrets_missing_malformed_and_never_leaked() {
    let secret = "S3CR3T-Value-9731";
    let cp = FakeCp::start(new_state(NODE, 1, None)).await;
    {
        let mut s = cp.state.secrets.lock().unwrap();
        s.insert(
            "good".into(),
            (
                200,
                secret_bundle(
                    "good",
                    &format!("# TRC_SECRETS_V1\nDB_PASSWORD={secret}\n"),
                    None,
                ),
            ),
        );
        s.insert(
            "malformed".into(),
            (
                200,
                secret_bundle("malformed", &format!("DB_PASSWORD={secret}\n"), None),
            ),
        );
        s.insert(
            "badkey".into(),
            (
                200,
                secret_bundle(
                    "badkey",
                    &format!("# TRC_SECRETS_V1\nlower={secret}\n"),
                    None,
                ),
            ),
        );
        s.insert(
            "badhash".into(),
            (
                200,
                secret_bundle(
                    "badhash",
                    &format!("# TRC_SECRETS_V1\nA={secret}\n"),
                    Some("sha256:00"),
                ),
            ),
        );
        s.insert(
            "flaky".into(),
            (500, json!({"error": format!("internal {secret}")})),
        );
    }
    let with = |i: &str, v: &str| {
        let mut a = with_policy(assignment_json(i, 1), "never", 0);
        a["workload"]["secrets"] = json!({"required": true, "secret_version_id": v});
        a
    };
    cp.set_plan(
        1,
        vec![
            with("s-good", "good"),
            with("s-missing", "absent"),
            with("s-malformed", "malformed"),
            with("s-badkey", "badkey"),
            with("s-badhash", "badhash"),
            with("s-flaky", "flaky"),
        ],
    );
    let tmp = tempfile::tempdir().unwrap();
    let config = write_agent_config(tmp.path(), &cp.url("http"), "");
    let log = tmp.path().join("agent.log");
    let mut agent = spawn_agent(&config, &log);
    let last = |i: &str| cp.accepted_for(i).last().map(|r| r.body.clone());
    let reason = |i: &str| last(i).and_then(|b| b["reason_code"].as_str().map(str::to_string));
    wait("secrets outcomes", Duration::from_secs(20), || {
        statuses(&cp, "s-good").last().map(String::as_str) == Some("ready")
            && [
                "s-missing",
                "s-malformed",
                "s-badkey",
                "s-badhash",
                "s-flaky",
            ]
            .iter()
            .all(|i| last(i).is_some())
    })
    .await;
    assert_eq!(reason("s-missing").as_deref(), Some("secrets_missing"));
    for i in ["s-malformed", "s-badkey", "s-badhash", "s-flaky"] {
        assert_eq!(
            reason(i).as_deref(),
            Some("secrets_injection_failed"),
            "{i}: {:?}",
            last(i)
        );
    }
    assert!(last("s-badhash").unwrap()["error_message"]
        .as_str()
        .unwrap()
        .contains("data_hash"));
    assert!(
        cp.state.secret_gets.load(Ordering::SeqCst) >= 3 + 5,
        "the 500 is retried"
    );
    agent.kill9();

    // Nowhere: reports, the agent's (debug) log, the state store, the data dir.
    let reports = serde_json::to_string(
        &cp.posts()
            .iter()
            .map(|r| r.body.clone())
            .collect::<Vec<_>>(),
    )
    .unwrap();
    assert!(!reports.contains(secret), "secret in a status report");
    let log_text = std::fs::read_to_string(&log).unwrap();
    assert!(log_text.contains("s-malformed"), "log captured");
    assert!(!log_text.contains(secret), "secret in the agent's log");
    for f in tree(&tmp.path().join("data")) {
        let p = tmp.path().join("data").join(&f);
        if p.is_file() {
            let bytes = std::fs::read(&p).unwrap();
            assert!(
                !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
                "secret found in {f}"
            );
        }
    }
}

#[tokio::test]
async fn workload_logs_reach_the_control_plane() {
    let cp = FakeCp::start(new_state(NODE, 1, None)).await;
    cp.set_plan(1, vec![assignment_json("logger", 1)]);
    let tmp = tempfile::tempdir().unwrap();
    let config = write_agent_config(tmp.path(), &cp.url("http"), "");
    let mut agent = spawn_agent(&config, &tmp.path().join("agent.log"));
    wait("console lines shipped", Duration::from_secs(15), || {
        cp.state.logs.lock().unwrap().iter().any(|b| {
            b["entries"].as_array().is_some_and(|e| {
                e.iter().any(|l| {
                    l["instance_id"] == "logger"
                        && l["line"]
                            .as_str()
                            .unwrap_or("")
                            .contains("workload started")
                })
            })
        })
    })
    .await;
    let batch = cp.state.logs.lock().unwrap()[0].clone();
    let e = &batch["entries"][0];
    assert!(e["ts"].is_string() && e["stream"] == "console" && e["truncated"] == false);
    agent.kill9();
}

// ---- answer size ----

/// A raw HTTP/1.1 server on loopback that answers one request with 200 and a chunked
/// body of `total` bytes of JSON whitespace (no Content-Length), counting the bytes it
/// managed to write. Its task ends `true` if it wrote the whole body, `false` if the
/// client closed the connection first.
struct ChunkedServer {
    url: String,
    written: Arc<std::sync::atomic::AtomicU64>,
    task: tokio::task::JoinHandle<bool>,
}

async fn serve_chunked_once(total: u64) -> ChunkedServer {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let written = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let count = written.clone();
    let task = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut head = Vec::new();
        let mut buf = [0u8; 4096];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
        }
        let start = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n";
        if s.write_all(start).await.is_err() {
            return false;
        }
        const CHUNK: usize = 16 * 1024;
        let mut framed = format!("{CHUNK:x}\r\n").into_bytes();
        framed.extend(std::iter::repeat_n(b' ', CHUNK));
        framed.extend_from_slice(b"\r\n");
        while count.load(Ordering::SeqCst) < total {
            if s.write_all(&framed).await.is_err() {
                return false;
            }
            count.fetch_add(CHUNK as u64, Ordering::SeqCst);
        }
        s.write_all(b"0\r\n\r\n").await.is_ok()
    });
    ChunkedServer { url, written, task }
}

#[tokio::test]
async fn an_endless_chunked_answer_is_cut_off_at_the_body_limit() {
    const LIMIT: usize = 64 * 1024;
    // Far more than the limit, and more than loopback socket buffers hold (a few MiB),
    // so a client that reads on would make the server finish.
    const SERVED: u64 = 64 * 1024 * 1024;
    for endpoint in ["plan", "secrets"] {
        let server = serve_chunked_once(SERVED).await;
        let metrics = Arc::new(Metrics::new());
        let client = ControlPlaneClient::new(&cp_config(&server.url, ""), NODE, metrics.clone())
            .unwrap()
            .with_max_body_bytes(LIMIT);
        let err = match endpoint {
            "plan" => client.get_plan().await.map(|_| ()).unwrap_err().to_string(),
            _ => client
                .get_secret("v1")
                .await
                .map(|_| ())
                .unwrap_err()
                .to_string(),
        };
        assert!(
            err.contains(&format!("answer larger than the limit of {LIMIT} bytes")),
            "{endpoint}: error must name the limit: {err}"
        );
        // The agent stopped reading and closed the connection: the server's writes fail
        // long before the whole body is out. What it wrote beyond what the agent read
        // sits in the kernel's socket buffers, not in the agent.
        let finished = tokio::time::timeout(Duration::from_secs(20), server.task)
            .await
            .expect("the server notices the closed connection")
            .expect("server task");
        let written = server.written.load(Ordering::SeqCst);
        assert!(
            !finished && written < SERVED / 2,
            "{endpoint}: the agent read on: server finished={finished}, wrote {written} bytes"
        );
        let errors = metrics
            .cp_requests
            .get_or_create(&RequestLabels {
                endpoint,
                outcome: "error",
            })
            .get();
        assert_eq!(errors, 1, "{endpoint}: counted as an error");
    }
}
