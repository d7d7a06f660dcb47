//! The agent binary as a child process, for the tests and benches that run it as
//! operators do: spawn it with a config (stderr appended to a log file), wait for its
//! API, read statuses through `status --json` or GET its API, stop it with SIGTERM or
//! SIGKILL. It is SIGKILLed and reaped when dropped, also when a test panics, and every
//! wait that times out prints the agent's log (plus any [`AgentProcess::diagnose`]
//! text).
//!
//! Waits are probes for [`super::wait::poll_until`] / `poll_until_async`: they return
//! `Ok(value)` when the condition holds, or `Err(Seen)`, which prints what was seen and
//! the log only if the wait gives up. A probe panics at once if the agent has exited.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use plfm_node_agent::status::view::InstanceView;

use super::wait::poll_until;

/// The agent binary cargo built for this test or bench.
pub const BIN: &str = env!("CARGO_BIN_EXE_plfm-node-agent");

/// The bearer token of test agents that serve their API on TCP too.
pub const TEST_TOKEN: &str = "plfm-test-token-0123456789";

/// Makes a test config safe to run beside others: its API socket goes next to the
/// config (not to the shared default `/run/plfm/agent.sock`), and a TCP `listen` gets
/// a token file with [`TEST_TOKEN`]. A config that is not TOML is left alone (tests of
/// config errors).
pub fn prepare_api(config: &Path) {
    let Ok(text) = std::fs::read_to_string(config) else {
        return;
    };
    let Ok(mut doc) = toml::from_str::<toml::Table>(&text) else {
        return;
    };
    let dir = config
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .map(|d| std::fs::canonicalize(d).unwrap_or_else(|_| d.to_path_buf()))
        .unwrap_or_else(|| std::env::current_dir().unwrap());
    let Some(api) = doc
        .entry("api")
        .or_insert_with(|| toml::Value::Table(toml::Table::new()))
        .as_table_mut()
    else {
        return;
    };
    let mut changed = false;
    if !api.contains_key("socket") {
        api.insert(
            "socket".into(),
            dir.join("agent.sock").display().to_string().into(),
        );
        changed = true;
    }
    if api.contains_key("listen") && !api.contains_key("token_file") {
        let token = dir.join("api.token");
        std::fs::write(&token, format!("{TEST_TOKEN}\n")).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).unwrap();
        api.insert("token_file".into(), token.display().to_string().into());
        changed = true;
    }
    if changed {
        std::fs::write(config, toml::to_string(&doc).unwrap()).unwrap();
    }
}

/// Runs `plfm-node-agent --config <config> <args>` to completion.
pub fn cli(config: &Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .arg("--config")
        .arg(config)
        .args(args)
        .output()
        .expect("run the agent CLI")
}

/// `status --json`: the agent's instances, `None` while its API does not answer.
pub fn instances(config: &Path) -> Option<Vec<InstanceView>> {
    let out = cli(config, &["status", "--json"]);
    out.status
        .success()
        .then(|| serde_json::from_slice(&out.stdout).ok())
        .flatten()
}

/// `GET path` from `addr` (`ip:port`) over plain HTTP/1.0: (status code, body).
pub fn http_get(addr: &str, path: &str) -> Result<(u16, String), String> {
    let sock: std::net::SocketAddr = addr.parse().map_err(|e| format!("{addr}: {e}"))?;
    let mut s = std::net::TcpStream::connect_timeout(&sock, Duration::from_secs(5))
        .map_err(|e| format!("{addr}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    // One write: `write!` sends each fragment separately, and a server that answered
    // after the first would break the next (EPIPE).
    s.write_all(
        format!(
            "GET {path} HTTP/1.0\r\nHost: {host}\r\nAuthorization: Bearer {TEST_TOKEN}\r\n\r\n"
        )
        .as_bytes(),
    )
    .map_err(|e| e.to_string())?;
    let mut out = String::new();
    s.read_to_string(&mut out).map_err(|e| e.to_string())?;
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("no HTTP status line from {addr}: {head:?}"))?;
    Ok((code, body.to_string()))
}

/// What a probe saw instead of what it waited for; its `Debug` (printed only when a
/// wait gives up) adds the agent's log.
pub struct Seen<'a> {
    pub instances: Option<Vec<InstanceView>>,
    agent: &'a AgentProcess,
}

impl std::fmt::Debug for Seen<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "instances (status --json): {:#?}\n{}",
            self.instances,
            self.agent.diagnostics()
        )
    }
}

/// A new temp dir with `agent.toml` for a standalone agent on the mock runtime: node
/// `node_id`, data in `data/`, the API on a free loopback port, desired state in
/// `desired/` (with `secrets/`) rescanned every `rescan_ms`, and `mock` as the body of
/// `[runtime.mock]` (its timings and faults).
pub fn mock_agent_dir(node_id: &str, rescan_ms: u64, mock: &str) -> tempfile::TempDir {
    let root = tempfile::tempdir().expect("a temp dir");
    std::fs::create_dir_all(root.path().join("desired/secrets")).expect("the desired dir");
    let cfg = format!(
        r#"node_id = "{node_id}"
data_dir = "data"
[api]
listen = "127.0.0.1:{}"
[control_plane]
mode = "standalone"
desired_dir = "desired"
rescan_interval_ms = {rescan_ms}
[runtime]
kind = "mock"
[runtime.mock]
{mock}
"#,
        super::free_port()
    );
    std::fs::write(root.path().join("agent.toml"), cfg).expect("write agent.toml");
    root
}

/// A running agent process.
pub struct AgentProcess {
    child: Mutex<Child>,
    config: PathBuf,
    log: PathBuf,
    api: Option<String>,
    diagnose: Option<Box<dyn Fn() -> String + Send + Sync>>,
}

impl AgentProcess {
    /// `plfm-node-agent --config <config>` (the daemon), without `RUST_LOG` (the
    /// config's log level applies), stderr appended to `log`.
    pub fn spawn(config: &Path, log: &Path) -> AgentProcess {
        AgentProcess::spawn_with(config, log, &[])
    }

    /// As [`AgentProcess::spawn`], with these environment variables set.
    pub fn spawn_with(config: &Path, log: &Path, env: &[(&str, &str)]) -> AgentProcess {
        AgentProcess::spawn_bin(Path::new(BIN), config, log, env)
    }

    /// As [`AgentProcess::spawn_with`], running the executable `bin` (another build).
    pub fn spawn_bin(bin: &Path, config: &Path, log: &Path, env: &[(&str, &str)]) -> AgentProcess {
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("open the agent log");
        prepare_api(config);
        let mut cmd = Command::new(bin);
        cmd.arg("--config")
            .arg(config)
            .env_remove("RUST_LOG")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(stderr);
        if let Some(dir) = config.parent().filter(|d| !d.as_os_str().is_empty()) {
            cmd.current_dir(dir);
        }
        let child = cmd.spawn().expect("spawn the agent");
        AgentProcess {
            child: Mutex::new(child),
            config: config.to_path_buf(),
            log: log.to_path_buf(),
            api: api_listen(config),
            diagnose: None,
        }
    }

    /// Adds `f()` to what a failed wait prints after the agent log (VM consoles...).
    pub fn diagnose(mut self, f: impl Fn() -> String + Send + Sync + 'static) -> Self {
        self.diagnose = Some(Box::new(f));
        self
    }

    pub fn pid(&self) -> u32 {
        self.child().id()
    }

    pub fn config(&self) -> &Path {
        &self.config
    }

    /// The agent's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The log and the extra diagnostics, as a failed wait prints them.
    pub fn diagnostics(&self) -> String {
        let extra = self.diagnose.as_ref().map(|f| f()).unwrap_or_default();
        format!(
            "agent log ({}):\n{}\n{extra}",
            self.log.display(),
            self.log()
        )
    }

    fn child(&self) -> std::sync::MutexGuard<'_, Child> {
        self.child.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Panics (with the log) if the agent is no longer running.
    pub fn assert_running(&self) {
        let exited = self.child().try_wait().expect("try_wait on the agent");
        if let Some(status) = exited {
            panic!("the agent exited ({status}); {}", self.diagnostics());
        }
    }

    /// This agent's CLI (`plfm-node-agent --config <its config> <args>`).
    pub fn cli(&self, args: &[&str]) -> Output {
        cli(&self.config, args)
    }

    /// `status --json`, `None` while the API does not answer.
    pub fn instances(&self) -> Option<Vec<InstanceView>> {
        instances(&self.config)
    }

    /// Probe: the instance list once `cond` holds for it.
    pub fn instances_where(
        &self,
        cond: impl Fn(&[InstanceView]) -> bool,
    ) -> Result<Vec<InstanceView>, Seen<'_>> {
        self.assert_running();
        match self.instances() {
            Some(list) if cond(&list) => Ok(list),
            instances => Err(Seen {
                instances,
                agent: self,
            }),
        }
    }

    /// Probe: the first instance for which `cond` holds.
    pub fn instance_where(
        &self,
        cond: impl Fn(&InstanceView) -> bool,
    ) -> Result<InstanceView, Seen<'_>> {
        let list = self.instances_where(|l| l.iter().any(&cond))?;
        Ok(list.into_iter().find(|v| cond(v)).expect("just seen"))
    }

    /// Probe: the API answers (the daemon finished starting, recovery included).
    pub fn api_up(&self) -> Result<Vec<InstanceView>, Seen<'_>> {
        self.instances_where(|_| true)
    }

    /// Blocks until the API answers.
    pub fn wait_api(&self, within: Duration) -> Vec<InstanceView> {
        poll_until("the agent's API", within, || self.api_up())
    }

    /// The API address from the config (`[api] listen`).
    pub fn api_addr(&self) -> &str {
        self.api
            .as_deref()
            .expect("the agent config has no [api] listen")
    }

    /// `GET path` from the agent's API: (status code, body).
    pub fn api_get(&self, path: &str) -> Result<(u16, String), String> {
        http_get(self.api_addr(), path)
    }

    /// SIGKILL, then reap.
    pub fn kill9(&mut self) {
        let mut c = self.child();
        let _ = c.kill();
        let _ = c.wait();
    }

    /// Waits up to `within` for the agent to exit on its own (say, refusing its
    /// config); panics with its log if it is still running then.
    pub fn exit_within(&self, within: Duration) -> ExitStatus {
        poll_until("the agent to exit on its own", within, || {
            match self.child().try_wait().expect("try_wait on the agent") {
                Some(status) => Ok(status),
                None => Err(self.diagnostics()),
            }
        })
    }

    /// SIGTERM (a graceful stop: the agent detaches or drains as configured), then
    /// waits up to `within` for the exit.
    pub fn terminate(&mut self, within: Duration) -> ExitStatus {
        let pid = rustix::process::Pid::from_raw(self.pid() as i32).expect("a pid");
        rustix::process::kill_process(pid, rustix::process::Signal::TERM)
            .expect("SIGTERM the agent");
        poll_until("the agent to exit after SIGTERM", within, || {
            match self.child().try_wait().expect("try_wait on the agent") {
                Some(status) => Ok(status),
                None => Err(self.diagnostics()),
            }
        })
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// `[api] listen` of an agent config, or the default when the config has none.
fn api_listen(config: &Path) -> Option<String> {
    let text = std::fs::read_to_string(config).ok()?;
    let v: toml::Value = toml::from_str(&text).ok()?;
    v.get("api")
        .and_then(|a| a.get("listen"))
        .and_then(|l| l.as_str())
        .map(str::to_string)
}
