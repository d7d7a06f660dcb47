//! The agent binary as operators run it: the dev config reaching `ready`, the CLI,
//! config errors, bad desired-state input, and `kill -9` in the middle of a reconcile.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::agent::{AgentProcess, BIN};
use common::wait::{poll_until_async, wait_until_async, Poll};
use common::{assignment_json, tree};
use plfm_node_agent::instance::Status;
use plfm_node_agent::state::Store;
use plfm_node_agent::status::view::InstanceView;
use plfm_node_agent::status::StatusReport;
use serde_json::json;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A temp workspace: config, desired dir, data dir, captured log.
struct Env {
    root: tempfile::TempDir,
}

impl Env {
    fn new(mock: &str) -> Env {
        let root = common::agent::mock_agent_dir("test-node", 200, mock);
        Env { root }
    }
    fn path(&self, p: &str) -> PathBuf {
        self.root.path().join(p)
    }
    fn config(&self) -> PathBuf {
        self.path("agent.toml")
    }
    fn write_assignment(&self, name: &str, v: &serde_json::Value) {
        std::fs::write(
            self.path("desired").join(name),
            serde_json::to_vec(v).unwrap(),
        )
        .unwrap();
    }
    fn spawn(&self) -> AgentProcess {
        AgentProcess::spawn(&self.config(), &self.path("agent.log"))
    }
    fn cli(&self, args: &[&str]) -> std::process::Output {
        common::agent::cli(&self.config(), args)
    }
    fn log(&self) -> String {
        std::fs::read_to_string(self.path("agent.log")).unwrap_or_default()
    }
    fn store(&self) -> Store {
        Store::open(&self.path("data/state.db")).unwrap()
    }
}

/// Waits until the agent's `status --json` satisfies `cond`.
async fn wait_statuses(
    agent: &AgentProcess,
    what: &str,
    timeout: Duration,
    cond: impl Fn(&[InstanceView]) -> bool,
) -> Vec<InstanceView> {
    Poll::within(timeout)
        .every(Duration::from_millis(50))
        .until_async(what, || agent.instances_where(&cond))
        .await
}

fn api_get(agent: &AgentProcess, path: &str) -> (u16, String) {
    agent.api_get(path).unwrap()
}

fn all_ready(list: &[InstanceView], n: usize) -> bool {
    list.len() == n && list.iter().all(|v| v.status == Status::Ready)
}

#[tokio::test]
async fn dev_config_instances_reach_ready_within_ten_seconds() {
    // The shipped dev config, with a private port and data dir so tests can run in
    // parallel; the instance files are the shipped ones.
    let env = Env::new("");
    let dev = std::fs::read_to_string(repo_root().join("config/dev.toml")).unwrap();
    let instances = repo_root().join("config/instances").canonicalize().unwrap();
    let cfg = dev
        .replace(
            "\"../.plfm-dev/agent.sock\"",
            &format!("{:?}", env.path("agent.sock").display().to_string()),
        )
        .replace("\"../.plfm-dev\"", "\"data\"")
        .replace(
            "desired_dir = \"instances\"",
            &format!("desired_dir = {:?}", instances.display().to_string()),
        );
    std::fs::write(env.config(), cfg).unwrap();
    let started = Instant::now();
    let mut agent = env.spawn();
    let list = wait_statuses(
        &agent,
        "example instances ready",
        Duration::from_secs(10),
        |l| all_ready(l, 2),
    )
    .await;
    let ids: Vec<_> = list.iter().map(|v| v.instance_id.as_str()).collect();
    assert_eq!(ids, vec!["web-1", "worker-1"]);
    eprintln!("ready after {:?}", started.elapsed());
    let table = String::from_utf8(env.cli(&["status"]).stdout).unwrap();
    assert!(
        table.contains("web-1") && table.contains("ready"),
        "{table}"
    );
    assert!(agent.terminate(Duration::from_secs(20)).success());
}

#[tokio::test]
async fn cli_stop_and_drain_carry_their_reason_codes() {
    let env = Env::new("prepare_ms = 0\nboot_ms = 50\nstop_ms = 10");
    for i in ["a", "b"] {
        env.write_assignment(&format!("{i}.json"), &assignment_json(i, 1));
    }
    let agent = env.spawn();
    wait_statuses(&agent, "ready", Duration::from_secs(10), |l| {
        all_ready(l, 2)
    })
    .await;
    let out = env.cli(&["stop", "a"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_statuses(
        &agent,
        "a stopped by operator",
        Duration::from_secs(10),
        |l| {
            l.iter().any(|v| {
                v.instance_id == "a"
                    && v.status == Status::Stopped
                    && v.reason_code.map(|r| r.as_str()) == Some("terminated_by_operator")
            })
        },
    )
    .await;
    let out = env.cli(&["stop", "nope"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("nope is not assigned"));
    assert!(env.cli(&["drain"]).status.success());
    wait_statuses(&agent, "b drained", Duration::from_secs(10), |l| {
        l.iter().any(|v| {
            v.instance_id == "b"
                && v.status == Status::Stopped
                && v.reason_code.map(|r| r.as_str()) == Some("node_draining")
        })
    })
    .await;
    let (_, metrics) = api_get(&agent, "/metrics");
    assert!(
        metrics.contains(
            "plfm_agent_status_transitions_total{status=\"stopped\",reason=\"node_draining\"} 1"
        ),
        "{metrics}"
    );
}

/// `start` lifts an operator stop and `undrain` ends a node drain: the instances run
/// again, and an agent restart keeps both decisions (nothing is stopped again).
#[tokio::test]
async fn start_lifts_an_operator_stop_and_undrain_ends_a_drain_across_a_restart() {
    let env = Env::new("prepare_ms = 0\nboot_ms = 50\nstop_ms = 10");
    for i in ["a", "b"] {
        env.write_assignment(&format!("{i}.json"), &assignment_json(i, 1));
    }
    let mut agent = env.spawn();
    wait_statuses(&agent, "ready", Duration::from_secs(10), |l| {
        all_ready(l, 2)
    })
    .await;
    let stopped = |id: &'static str| {
        move |l: &[InstanceView]| {
            l.iter()
                .any(|v| v.instance_id == id && v.status == Status::Stopped)
        }
    };
    // Nothing to start while a runs.
    let out = env.cli(&["start", "a"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not stopped by an operator"),
        "{out:?}"
    );
    assert!(env.cli(&["stop", "a"]).status.success());
    wait_statuses(&agent, "a stopped", Duration::from_secs(10), stopped("a")).await;
    let out = env.cli(&["start", "a"]);
    assert!(out.status.success(), "{out:?}");
    wait_statuses(&agent, "a ready again", Duration::from_secs(10), |l| {
        all_ready(l, 2)
    })
    .await;
    assert!(env.cli(&["drain"]).status.success());
    wait_statuses(&agent, "drained", Duration::from_secs(10), |l| {
        l.len() == 2 && l.iter().all(|v| v.status == Status::Stopped)
    })
    .await;
    assert!(env.cli(&["undrain"]).status.success());
    wait_statuses(
        &agent,
        "ready after undrain",
        Duration::from_secs(10),
        |l| all_ready(l, 2),
    )
    .await;
    // A stop lifted and a drain ended stay so after a restart.
    assert!(env.cli(&["stop", "b"]).status.success());
    wait_statuses(&agent, "b stopped", Duration::from_secs(10), stopped("b")).await;
    assert!(env.cli(&["start", "b"]).status.success());
    wait_statuses(&agent, "b ready", Duration::from_secs(10), |l| {
        all_ready(l, 2)
    })
    .await;
    assert!(agent.terminate(Duration::from_secs(20)).success());
    let agent = env.spawn();
    wait_statuses(
        &agent,
        "ready after the restart",
        Duration::from_secs(10),
        |l| all_ready(l, 2),
    )
    .await;
    let row = |id: &str| {
        env.store()
            .load_instances()
            .unwrap()
            .into_iter()
            .find(|r| r.instance_id == id)
            .unwrap()
    };
    assert_eq!(row("b").operator_stopped_generation, None);
    assert_eq!(
        env.store().meta_get("node_state").unwrap().as_deref(),
        Some("active")
    );
}

#[test]
fn config_errors_name_the_key_and_exit_non_zero() {
    let env = Env::new("");
    let text = std::fs::read_to_string(env.config())
        .unwrap()
        .replace("[api]", "[api]\nlisten_addr = 1");
    std::fs::write(env.config(), text).unwrap();
    let out = Command::new(BIN)
        .arg("--config")
        .arg(env.config())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("listen_addr"), "{err}");
    let out = Command::new(BIN)
        .arg("--config")
        .arg(env.path("missing.toml"))
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("missing.toml"));
    let help = Command::new(BIN).arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    for word in ["status", "stop", "drain", "--config", "PLFM_"] {
        assert!(help.contains(word), "--help should mention {word}: {help}");
    }
}

/// `overlay.backend = "kernel"` on a kernel without WireGuard: the agent does not start,
/// and says why (the operator asked for the kernel backend; silently running another
/// one would hide it).
#[test]
fn the_kernel_overlay_backend_without_kernel_wireguard_stops_the_agent_with_the_reason() {
    if let Ok(()) = plfm_node_agent::overlay::settings::kernel_wireguard() {
        eprintln!("SKIP: this host's kernel has WireGuard, so the refusal cannot happen here");
        return;
    }
    let env = Env::new("");
    let mut text = std::fs::read_to_string(env.config()).unwrap();
    text.push_str("\n[overlay]\nbackend = \"kernel\"\n");
    std::fs::write(env.config(), text).unwrap();
    let agent = env.spawn();
    let status = agent.exit_within(Duration::from_secs(20));
    let err = env.log();
    assert!(!status.success(), "{err}");
    assert!(
        err.contains("overlay.backend") && err.contains("has no WireGuard"),
        "{err}"
    );
}

#[test]
fn plain_http_control_plane_off_loopback_is_refused_at_start() {
    let env = Env::new("");
    let text = std::fs::read_to_string(env.config()).unwrap().replace(
        "mode = \"standalone\"\ndesired_dir = \"desired\"",
        "mode = \"http\"\nurl = \"http://10.1.2.3:8080\"",
    );
    assert!(text.contains("10.1.2.3"), "config rewritten: {text}");
    std::fs::write(env.config(), text).unwrap();
    // Spawned with a deadline: an agent that accepts the url runs (and is killed when
    // `agent` drops) instead of hanging the test.
    let agent = env.spawn();
    let status = agent.exit_within(Duration::from_secs(20));
    let err = env.log();
    assert_eq!(status.code(), Some(2), "{err}");
    assert!(
        err.contains("control_plane.url") && err.contains("clear text"),
        "{err}"
    );
    assert!(
        !env.path("data").exists(),
        "nothing is created before the config is valid"
    );
}

#[tokio::test]
async fn bad_input_fails_identifiable_instances_and_writes_nothing_outside_data_dir() {
    let env = Env::new("prepare_ms = 0\nboot_ms = 20\nstop_ms = 0");
    env.write_assignment("good.json", &assignment_json("good", 1));
    std::fs::write(
        env.path("desired/malformed.json"),
        "{ \"instance_id\": \"m\", nope",
    )
    .unwrap();
    let mut state = assignment_json("bad-state", 1);
    state["desired_state"] = json!("paused");
    env.write_assignment("state.json", &state);
    let mut huge = assignment_json("huge-argv", 1);
    huge["workload"]["command"] = json!(["/app", "A".repeat(10 * 1024 * 1024)]);
    env.write_assignment("huge.json", &huge);
    let mut trav = assignment_json("x", 1);
    trav["instance_id"] = json!("../../etc");
    trav["workload"]["instance_id"] = json!("../../etc");
    env.write_assignment("traversal.json", &trav);
    // The test rig's own files (API socket path, token) are made before the snapshot.
    common::agent::prepare_api(&env.config());
    let before: Vec<_> = tree(env.root.path())
        .into_iter()
        .filter(|p| !p.starts_with("data") && p != "agent.log")
        .collect();

    let mut agent = env.spawn();
    let list = wait_statuses(
        &agent,
        "good ready, bad ones failed",
        Duration::from_secs(15),
        |l| {
            let st = |i: &str| l.iter().find(|v| v.instance_id == i).map(|v| v.status);
            st("good") == Some(Status::Ready)
                && st("bad-state") == Some(Status::Failed)
                && st("huge-argv") == Some(Status::Failed)
        },
    )
    .await;
    let msg = |i: &str| {
        list.iter()
            .find(|v| v.instance_id == i)
            .unwrap()
            .error_message
            .clone()
            .unwrap()
    };
    assert!(msg("bad-state").contains("paused"), "{}", msg("bad-state"));
    assert!(
        msg("huge-argv").contains("exceed the limit"),
        "{}",
        msg("huge-argv")
    );
    assert!(msg("huge-argv").len() < 300);
    assert_eq!(
        list.len(),
        3,
        "the traversal id and the malformed file identify no instance: {list:#?}"
    );

    let log = env.log();
    assert!(
        log.contains("malformed.json"),
        "log must name the malformed file:\n{log}"
    );
    assert!(
        log.contains("../../etc"),
        "log must name the refused id:\n{log}"
    );
    // Still healthy, and nothing written outside data_dir.
    let (health, _) = api_get(&agent, "/healthz");
    assert_eq!(health, 200);
    assert!(agent.terminate(Duration::from_secs(20)).success());
    let after: Vec<_> = tree(env.root.path())
        .into_iter()
        .filter(|p| !p.starts_with("data") && p != "agent.log")
        .collect();
    assert_eq!(before, after);
    let data = tree(&env.path("data"));
    assert!(data.iter().all(|p| !p.contains("etc")), "{data:?}");
    assert!(!env.root.path().parent().unwrap().join("etc").exists());
}

/// Checks, per instance, that delivered reports are numbered 1..n without gaps or
/// repeats and follow legal transitions.
fn check_report_log(store: &Store) -> std::collections::BTreeMap<String, Vec<StatusReport>> {
    let mut by: std::collections::BTreeMap<String, Vec<StatusReport>> = Default::default();
    for (i, _, j) in store.delivered_reports(None).unwrap() {
        by.entry(i)
            .or_default()
            .push(serde_json::from_str(&j).unwrap());
    }
    for (i, reps) in &by {
        let seqs: Vec<i64> = reps.iter().map(|r| r.seq).collect();
        let want: Vec<i64> = (1..=reps.len() as i64).collect();
        assert_eq!(seqs, want, "{i}: seqs must be 1..n, no gap, no duplicate");
        for w in reps.windows(2) {
            assert!(
                w[0].status.can_transition_to(w[1].status),
                "{i}: {} -> {}",
                w[0].status,
                w[1].status
            );
        }
    }
    by
}

#[tokio::test]
async fn kill_dash_nine_mid_reconcile_converges_without_duplicates_or_losses() {
    let env = Env::new("prepare_ms = 30\nboot_ms = 200\nboot_jitter_ms = 3000\nstop_ms = 10");
    let n = 30;
    for i in 0..n {
        env.write_assignment(
            &format!("k{i:02}.json"),
            &assignment_json(&format!("k{i:02}"), 1),
        );
    }
    let mut agent = env.spawn();
    // Kill when some, but not all, instances are ready.
    let db = env.path("data/state.db");
    wait_until_async("state store created", Duration::from_secs(10), || {
        db.exists()
    })
    .await;
    let store = env.store();
    let mut seen = Vec::new();
    poll_until_async(
        &format!("3..{n} instances ready"),
        Duration::from_secs(15),
        || {
            let ready = match store.load_instances() {
                Ok(rows) => rows.iter().filter(|r| r.status == "ready").count(),
                Err(e) => panic!("cannot read the state store: {e}"),
            };
            seen.push(ready);
            if (3..n).contains(&ready) {
                Ok(())
            } else {
                Err(format!("ready counts seen: {seen:?}\nlog:\n{}", env.log()))
            }
        },
    )
    .await;
    agent.kill9();
    let ready_before: Vec<String> = store
        .load_instances()
        .unwrap()
        .into_iter()
        .filter(|r| r.status == "ready")
        .map(|r| r.instance_id)
        .collect();
    assert!(!ready_before.is_empty() && ready_before.len() < n);

    let mut agent = env.spawn();
    wait_statuses(
        &agent,
        "all ready after restart",
        Duration::from_secs(20),
        |l| all_ready(l, n),
    )
    .await;
    assert!(agent.terminate(Duration::from_secs(20)).success());

    let by = check_report_log(&store);
    assert_eq!(by.len(), n);
    for (i, reps) in &by {
        let statuses: Vec<_> = reps.iter().map(|r| r.status).collect();
        assert_eq!(
            statuses,
            vec![Status::Booting, Status::Ready],
            "{i}: no restart, no lost or repeated report"
        );
    }
    for i in &ready_before {
        let reps = &by[i];
        assert_eq!(
            reps[0].boot_id, reps[1].boot_id,
            "{i} was ready before the kill: its VM must be adopted"
        );
    }
    // Exactly one (mock) VM per instance.
    let vms: Vec<_> = tree(&env.path("data/instances"))
        .into_iter()
        .filter(|p| p.ends_with("mock-vm.json"))
        .collect();
    assert_eq!(vms.len(), n, "{vms:?}");
    assert_eq!(store.outbox_depth().unwrap(), 0);
}

/// Sends one raw HTTP/1.0 request over the Unix socket `sock`: (status code, body).
fn raw_unix(sock: &Path, request: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(sock).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let code = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (
        code,
        out.split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default(),
    )
}

/// The local API is not for every local user: on its Unix socket, a user outside
/// `api.socket_group` cannot read statuses, stop an instance or drain the node (the
/// instance keeps running); a member of the group can; root can. A request with an
/// `Origin` header (a web page in a browser on the host) is refused even from root,
/// and the TCP listener refuses a request without the bearer token.
#[tokio::test]
async fn a_local_user_outside_the_api_group_is_refused_every_call() {
    if !common::gate::present(
        rustix::process::geteuid().is_root()
            && Command::new("setpriv").arg("--version").output().is_ok(),
        "root and setpriv (util-linux) to run the CLI as another user",
    ) {
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let env = Env::new("prepare_ms = 0\nboot_ms = 50\nstop_ms = 10");
    // Other users must reach the config and a copy of the CLI (not the data dir).
    std::fs::set_permissions(env.root.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let cfg = std::fs::read_to_string(env.config())
        .unwrap()
        .replace("[api]\n", "[api]\nsocket_group = \"4242\"\n");
    std::fs::write(env.config(), cfg).unwrap();
    let bin = env.path("plfm-node-agent");
    std::fs::copy(BIN, &bin).unwrap();
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    env.write_assignment("a.json", &assignment_json("a", 1));
    let agent = env.spawn();
    std::fs::set_permissions(env.config(), std::fs::Permissions::from_mode(0o644)).unwrap();
    wait_statuses(&agent, "a ready", Duration::from_secs(20), |l| {
        all_ready(l, 1)
    })
    .await;
    let sock = env.path("agent.sock");
    let meta = std::fs::metadata(&sock).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!((meta.mode() & 0o777, meta.gid()), (0o660, 4242));

    let as_user = |groups: &str, args: &[&str]| {
        let mut c = Command::new("setpriv");
        c.args(["--reuid", "65534", "--regid", "65534"]);
        match groups {
            "" => c.arg("--clear-groups"),
            g => c.args(["--groups", g]),
        };
        c.arg(&bin).arg("--config").arg(env.config()).args(args);
        c.output().unwrap()
    };
    for args in [&["status"][..], &["stop", "a"], &["drain"]] {
        let out = as_user("", args);
        assert!(!out.status.success(), "uid 65534 ran {args:?}: {out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("agent.sock"), "{args:?}: {err}");
    }
    // With the socket opened to everyone (an operator's mistake), the agent still
    // refuses them: it checks the caller's credentials (SO_PEERCRED), not only the mode.
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o666)).unwrap();
    for args in [&["status"][..], &["stop", "a"], &["drain"]] {
        let out = as_user("", args);
        assert!(!out.status.success(), "uid 65534 ran {args:?}: {out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("403") && err.contains("uid 65534 may not use"),
            "{args:?}: {err}"
        );
    }
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o660)).unwrap();
    // Nothing happened: the instance still runs, the node is not draining.
    let list = agent.instances_where(|_| true).ok().unwrap();
    assert!(all_ready(&list, 1), "{list:?}");
    // A member of the group may.
    let out = as_user("4242", &["status", "--json"]);
    assert!(out.status.success(), "{out:?}");
    // A web page cannot, even when the browser runs as root.
    let (code, body) = raw_unix(
        &sock,
        "POST /v1/node/drain HTTP/1.0\r\nOrigin: http://evil.example\r\nContent-Length: 0\r\n\r\n",
    );
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("Origin"), "{body}");
    // TCP needs the bearer token.
    let addr = agent.api_addr().to_string();
    let mut tcp = std::net::TcpStream::connect(&addr).unwrap();
    use std::io::{Read, Write};
    tcp.write_all(b"POST /v1/instances/a/stop HTTP/1.0\r\nContent-Length: 0\r\n\r\n")
        .unwrap();
    let mut answer = String::new();
    tcp.read_to_string(&mut answer).unwrap();
    assert!(
        answer.starts_with("HTTP/1.0 401") || answer.starts_with("HTTP/1.1 401"),
        "{answer}"
    );
    assert!(!answer.contains(common::agent::TEST_TOKEN));
    assert_eq!(agent.api_get("/healthz").unwrap().0, 200);
    let list = agent.instances_where(|_| true).ok().unwrap();
    assert!(all_ready(&list, 1), "{list:?}");
    // Root may.
    let out = env.cli(&["stop", "a"]);
    assert!(out.status.success(), "{out:?}");
    wait_statuses(&agent, "a stopped", Duration::from_secs(20), |l| {
        l.iter()
            .any(|v| v.instance_id == "a" && v.status == Status::Stopped)
    })
    .await;
}
