//! The operator CLI and the metrics reference, through the real agent binary with the
//! mock runtime: `describe` and `events` after a lifecycle, the generated shell
//! completions and man pages, and `/metrics` against `docs/metrics.md` (every
//! documented metric is served, every served `plfm_` metric is documented, with its
//! type).

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use common::agent::{AgentProcess, BIN};
use common::assignment_json;
use common::wait::{holds, poll_until};
use plfm_node_agent::instance::Status;
use plfm_node_agent::status::view::InstanceView;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A temp workspace: config (mock runtime, standalone), desired dir, data dir, log.
struct Env {
    root: tempfile::TempDir,
}

impl Env {
    fn new() -> Env {
        let root = common::agent::mock_agent_dir(
            "test-node",
            100,
            "prepare_ms = 0\nboot_ms = 50\nstop_ms = 10",
        );
        Env { root }
    }
    fn path(&self, p: &str) -> PathBuf {
        self.root.path().join(p)
    }
    fn config(&self) -> PathBuf {
        self.path("agent.toml")
    }
    fn assign(&self, id: &str, generation: i32) {
        std::fs::write(
            self.path("desired").join(format!("{id}.json")),
            serde_json::to_vec(&assignment_json(id, generation)).unwrap(),
        )
        .unwrap();
    }
    fn spawn(&self) -> AgentProcess {
        AgentProcess::spawn(&self.config(), &self.path("agent.log"))
    }
    fn cli_ok(&self, args: &[&str]) -> String {
        let out = common::agent::cli(&self.config(), args);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }
}

fn wait_status(agent: &AgentProcess, id: &str, status: Status) -> InstanceView {
    poll_until(&format!("{id} {status:?}"), Duration::from_secs(20), || {
        agent.instance_where(|v| v.instance_id == id && v.status == status)
    })
}

/// Line index of the first row of an events table (`TIME AGO [INSTANCE] GEN STATUS
/// …`) whose status column is `status` (and instance column `instance`, when given).
fn event_row(table: &str, instance: Option<&str>, status: &str) -> usize {
    table
        .lines()
        .position(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            match instance {
                Some(i) => f.get(3) == Some(&i) && f.get(5) == Some(&status),
                None => f.get(4) == Some(&status),
            }
        })
        .unwrap_or_else(|| panic!("no {instance:?} {status} row in:\n{table}"))
}

/// Line index of the first line of `text` after `from` that contains every `part`.
fn line_with(text: &str, from: usize, parts: &[&str]) -> usize {
    text.lines()
        .enumerate()
        .skip(from)
        .find(|(_, l)| parts.iter().all(|p| l.contains(p)))
        .map(|(i, _)| i)
        .unwrap_or_else(|| panic!("no line with {parts:?} after line {from} in:\n{text}"))
}

#[test]
fn describe_and_events_tell_an_instances_life_newest_last() {
    let env = Env::new();
    env.assign("web-1", 1);
    env.assign("worker-1", 1);
    let mut agent = env.spawn();
    wait_status(&agent, "web-1", Status::Ready);
    wait_status(&agent, "worker-1", Status::Ready);
    env.cli_ok(&["stop", "web-1"]);
    wait_status(&agent, "web-1", Status::Stopped);
    // The stop's report is in the history (the standalone sink took it).
    poll_until(
        "the stop in web-1's history",
        Duration::from_secs(10),
        || {
            let out = env.cli_ok(&["events", "web-1", "--json"]);
            let v: serde_json::Value = serde_json::from_str(&out).unwrap();
            holds(v.as_array().is_some_and(|a| {
                a.iter()
                    .any(|e| e["reason_code"] == "terminated_by_operator" && e["pending"] == false)
            }))
        },
    );

    let text = env.cli_ok(&["describe", "web-1"]);
    let status = line_with(&text, 0, &["Status:", "stopped (for "]);
    line_with(&text, status, &["Reason:", "terminated_by_operator"]);
    line_with(&text, 0, &["Operator stop:", "generation 1"]);
    line_with(&text, 0, &["Digest:", common::DIGEST]);
    line_with(&text, 0, &["Resources:", "128.0 MiB memory"]);
    line_with(&text, 0, &["Restart policy:", "always (at most 3 retries"]);
    line_with(&text, 0, &["Overlay IPv6:", &common::overlay_of("web-1")]);
    // A running instance shows the host resources its runtime recorded (the mock
    // runtime: its directory and VM record), and the image cache's disk of its digest
    // once there is one (the mock builds none: the test puts it where the cache would).
    let root = plfm_node_agent::image::store::CachePaths::new(&env.path("data"))
        .disk(&plfm_node_agent::image::Digest::parse(common::DIGEST).unwrap());
    assert!(!env.cli_ok(&["describe", "worker-1"]).contains("Root (ro):"));
    std::fs::create_dir_all(root.parent().unwrap()).unwrap();
    std::fs::write(&root, b"").unwrap();
    let worker = env.cli_ok(&["describe", "worker-1"]);
    line_with(&worker, 0, &["Root (ro):", &root.display().to_string()]);
    let resources = line_with(&worker, 0, &["Resources:"]);
    line_with(&worker, resources, &["instance_dir", "worker-1"]);
    line_with(&worker, resources, &["process", "mock-vm.json"]);
    let recent = line_with(&text, 0, &["Recent reports:"]);
    let reports: String = text.lines().skip(recent + 1).collect::<Vec<_>>().join("\n");
    let ready = event_row(&reports, None, "ready");
    let stopped = event_row(&reports, None, "stopped");
    assert!(ready < stopped, "{text}");
    assert!(reports
        .lines()
        .nth(stopped)
        .unwrap()
        .contains("terminated_by_operator"));
    assert!(!text.contains("worker-1"), "{text}");

    let json: serde_json::Value =
        serde_json::from_str(&env.cli_ok(&["describe", "web-1", "--json"])).unwrap();
    assert_eq!(json["instance_id"], "web-1");
    assert_eq!(json["detail"]["spec"]["image_digest"], common::DIGEST);
    assert_eq!(json["detail"]["desired_state"], "running");
    assert_eq!(json["detail"]["operator_stopped_generation"], 1);
    let reports = json["detail"]["recent_reports"].as_array().unwrap();
    assert_eq!(reports.last().unwrap()["status"], "stopped");

    // Node-wide: both instances, newest last.
    let table = env.cli_ok(&["events"]);
    let header = line_with(&table, 0, &["TIME (UTC)", "INSTANCE", "STATUS", "REASON"]);
    assert_eq!(header, 0, "{table}");
    event_row(&table, Some("worker-1"), "ready");
    let web_ready = event_row(&table, Some("web-1"), "ready");
    let web_stopped = event_row(&table, Some("web-1"), "stopped");
    assert!(web_ready < web_stopped, "{table}");
    assert!(table
        .lines()
        .nth(web_stopped)
        .unwrap()
        .contains("terminated_by_operator"));
    assert_eq!(
        web_stopped,
        table.lines().count() - 1,
        "newest last:\n{table}"
    );
    let all: Vec<serde_json::Value> =
        serde_json::from_str(&env.cli_ok(&["events", "--json"])).unwrap();
    let seqs: Vec<(String, i64)> = all
        .iter()
        .filter(|e| e["instance_id"] == "web-1")
        .map(|e| {
            (
                e["status"].as_str().unwrap().to_string(),
                e["seq"].as_i64().unwrap(),
            )
        })
        .collect();
    assert!(seqs.windows(2).all(|w| w[0].1 < w[1].1), "{seqs:?}");
    let limited: Vec<serde_json::Value> =
        serde_json::from_str(&env.cli_ok(&["events", "--limit", "1", "--json"])).unwrap();
    assert_eq!(limited.len(), 1);
    assert_eq!(&limited[0], all.last().unwrap());

    // Unknown instance: describe fails and names it; events has nothing.
    let out = common::agent::cli(&env.config(), &["describe", "nope"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("nope is not known"));
    assert!(env
        .cli_ok(&["events", "nope"])
        .contains("no reports for nope"));
    assert!(agent.terminate(Duration::from_secs(20)).success());
}

/// The subcommands `help` lists (the clap definitions, as the binary sees them).
fn subcommands() -> Vec<String> {
    let out = Command::new(BIN).arg("help").output().unwrap();
    let help = String::from_utf8(out.stdout).unwrap();
    let names: Vec<String> = help
        .lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .filter(|n| n != "help")
        .collect();
    for expected in [
        "status",
        "describe",
        "events",
        "completions",
        "man",
        "image",
    ] {
        assert!(names.iter().any(|n| n == expected), "{names:?}");
    }
    names
}

fn run(args: &[&str]) -> Output {
    let out = Command::new(BIN).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

#[test]
fn completion_scripts_name_every_subcommand() {
    let names = subcommands();
    for shell in ["bash", "zsh", "fish"] {
        let script = String::from_utf8(run(&["completions", shell]).stdout).unwrap();
        for n in &names {
            assert!(script.contains(n.as_str()), "{shell} completion lacks {n}");
        }
    }
    // bash: each subcommand is a completion word of the top level, and the script
    // parses.
    let bash = String::from_utf8(run(&["completions", "bash"]).stdout).unwrap();
    assert!(bash.contains("complete -F"), "{bash}");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("c.bash"), &bash).unwrap();
    let check = Command::new("bash")
        .arg("-n")
        .arg(dir.path().join("c.bash"))
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
    for n in &names {
        assert!(
            bash.contains(&format!("plfm__node__agent__{}", n.replace('-', "__")))
                || bash.contains(&format!(",{n})")),
            "bash completion has no case for {n}"
        );
    }
}

#[test]
fn man_pages_render_and_cover_every_subcommand() {
    let names = subcommands();
    let page = String::from_utf8(run(&["man"]).stdout).unwrap();
    assert!(page.contains(".TH plfm-node-agent 1"), "{page}");
    assert!(page.contains(".SH SUBCOMMANDS"), "{page}");
    for n in &names {
        assert!(
            page.contains(&format!("plfm\\-node\\-agent\\-{}", n.replace('-', "\\-"))),
            "man page lacks {n}"
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let listed =
        String::from_utf8(run(&["man", "--out-dir", &dir.path().display().to_string()]).stdout)
            .unwrap();
    for n in &names {
        let file = dir.path().join(format!("plfm-node-agent-{n}.1"));
        assert!(file.is_file(), "no {}", file.display());
        assert!(listed.contains(&file.display().to_string()), "{listed}");
    }
    // Rendered by man(1) when the host has it: a formatting error would show.
    if Path::new("/usr/bin/man").exists() {
        let out = Command::new("man")
            .arg("-l")
            .arg(dir.path().join("plfm-node-agent-describe.1"))
            .env("MANPAGER", "cat")
            .env("MANWIDTH", "80")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(text.contains("NAME") && text.contains("--json"), "{text}");
        assert!(
            !String::from_utf8_lossy(&out.stderr).contains("warning"),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// The metrics table of `docs/metrics.md`: name → type.
fn documented_metrics() -> BTreeMap<String, String> {
    let doc = std::fs::read_to_string(repo_root().join("docs/metrics.md")).unwrap();
    let mut out = BTreeMap::new();
    for line in doc.lines().filter(|l| l.starts_with("| `plfm_")) {
        let cells: Vec<&str> = line.trim_matches('|').split('|').map(str::trim).collect();
        assert!(
            cells.len() >= 4,
            "metrics table row needs name, type, labels, meaning: {line}"
        );
        let name = cells[0].trim_matches('`').to_string();
        assert!(
            out.insert(name.clone(), cells[1].to_string()).is_none(),
            "{name} documented twice"
        );
    }
    assert!(!out.is_empty(), "no metrics table in docs/metrics.md");
    out
}

/// The `plfm_` metrics of a scrape: the names to query (counters with `_total`, as
/// their samples are named) → type, from the `# TYPE` lines.
fn scraped_metrics(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_once(' '))
        .filter(|(name, _)| name.starts_with("plfm_"))
        .map(|(name, kind)| {
            let name = if kind == "counter" && !name.ends_with("_total") {
                format!("{name}_total")
            } else {
                name.to_string()
            };
            (name, kind.to_string())
        })
        .collect()
}

#[test]
fn every_documented_metric_is_served_after_a_lifecycle_and_every_served_one_is_documented() {
    let env = Env::new();
    env.assign("m-1", 1);
    let mut agent = env.spawn();
    // A full lifecycle: boot, ready, operator stop and start, a new generation,
    // removal from the desired state.
    wait_status(&agent, "m-1", Status::Ready);
    env.cli_ok(&["stop", "m-1"]);
    wait_status(&agent, "m-1", Status::Stopped);
    env.cli_ok(&["start", "m-1"]);
    wait_status(&agent, "m-1", Status::Ready);
    env.assign("m-1", 2);
    poll_until("m-1 generation 2 ready", Duration::from_secs(20), || {
        agent.instance_where(|v| {
            v.instance_id == "m-1" && v.generation == 2 && v.status == Status::Ready
        })
    });
    std::fs::remove_file(env.path("desired/m-1.json")).unwrap();
    poll_until("m-1 removed", Duration::from_secs(20), || {
        agent.instances_where(|l| {
            !l.iter()
                .any(|v| v.instance_id == "m-1" && v.status == Status::Ready)
        })
    });

    let (code, scrape) = agent.api_get("/metrics").unwrap();
    assert_eq!(code, 200, "{scrape}");
    let served = scraped_metrics(&scrape);
    let documented = documented_metrics();
    for (name, kind) in &documented {
        match served.get(name) {
            Some(k) => assert_eq!(k, kind, "{name}: served as {k}, documented as {kind}"),
            None => panic!("{name} is documented but not served; served:\n{scrape}"),
        }
    }
    for name in served.keys() {
        assert!(
            documented.contains_key(name),
            "{name} is served but not in docs/metrics.md"
        );
    }
    // The lifecycle moved the metrics it should have.
    let sample = |prefix: &str| {
        scrape
            .lines()
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or_else(|| panic!("no sample {prefix} in:\n{scrape}"))
    };
    assert!(
        sample("plfm_agent_reports_delivered_total") >= 4.0,
        "{scrape}"
    );
    assert!(
        sample("plfm_agent_status_transitions_total{status=\"ready\"") >= 2.0,
        "{scrape}"
    );
    assert!(
        sample("plfm_agent_boot_duration_seconds_count") >= 2.0,
        "{scrape}"
    );
    assert_eq!(sample("plfm_agent_reports_dropped_total"), 0.0);
    assert!(agent.terminate(Duration::from_secs(20)).success());
}
