//! Operator subcommands that talk to a running agent's local API (`status`, `logs`,
//! `stop`, `start`, `drain`, `undrain`, and in their own modules `describe`, `events`
//! and `overlay`) and print a table, or JSON with `--json`; and the generated shell
//! completions and man pages ([`generate`]).
//!
//! This module formats and calls; it holds no logic of its own. Every request has a
//! timeout, and a daemon that does not answer is named in the error.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};

use crate::status::view::InstanceView;

pub mod describe;
pub mod events;
pub mod generate;
pub mod human;
pub mod overlay;
pub mod pull_progress;

/// The agent's local API as the CLI reaches it: its Unix socket (`api.socket`).
pub struct Api {
    socket: PathBuf,
    client: reqwest::Client,
    /// For streamed answers (`logs -f`): a connect timeout, no total one.
    streaming: reqwest::Client,
}

impl Api {
    /// A client of the API served on `socket`.
    pub fn new(socket: &Path) -> anyhow::Result<Api> {
        crate::control_plane::http::ensure_crypto_provider();
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .no_proxy()
            .unix_socket(socket)
            .build()
            .context("cannot build the HTTP client")?;
        let streaming = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .read_timeout(Duration::from_secs(3600))
            .no_proxy()
            .unix_socket(socket)
            .build()
            .context("cannot build the HTTP client")?;
        Ok(Api {
            socket: socket.to_path_buf(),
            client,
            streaming,
        })
    }

    pub(crate) fn get(&self, path: &str) -> reqwest::RequestBuilder {
        self.client.get(format!("http://localhost{path}"))
    }

    fn post(&self, path: &str) -> reqwest::RequestBuilder {
        self.client.post(format!("http://localhost{path}"))
    }

    pub(crate) async fn send(
        &self,
        req: reqwest::RequestBuilder,
        what: &str,
    ) -> anyhow::Result<serde_json::Value> {
        let resp = req.send().await.with_context(|| {
            format!(
                "cannot reach the agent's API at {} (is the agent running with this config, and may this user use it: root or api.socket_group?)",
                self.socket.display()
            )
        })?;
        let code = resp.status();
        let body: serde_json::Value = resp
            .json()
            .await
            .with_context(|| format!("{what}: the agent's answer is not JSON"))?;
        if !code.is_success() {
            let msg = body
                .get("error")
                .and_then(|e| e.as_str())
                .unwrap_or("no detail");
            bail!("{what}: {code}: {msg}");
        }
        Ok(body)
    }
}

/// `status [--json]`.
pub async fn status(api: &Api, json: bool, with_node: bool) -> anyhow::Result<()> {
    let body = api.send(api.get("/v1/instances"), "status").await?;
    // The node's facts (identity, WireGuard key, control-plane TLS state); an older
    // agent without `/v1/node` shows none.
    let node = match api.get("/v1/node").send().await {
        Ok(r) if r.status().is_success() => r.json::<serde_json::Value>().await.ok(),
        _ => None,
    };
    // The overlay as its owner last saw it; an older agent has none.
    let overlay = match api.get("/v1/overlay").send().await {
        Ok(r) if r.status().is_success() => r.json::<serde_json::Value>().await.ok(),
        _ => None,
    };
    if json {
        // `status --json` stays the instance list scripts parse; `--node` wraps it
        // with the node's facts and the overlay.
        let out = if with_node {
            serde_json::json!({ "node": node, "overlay": overlay, "instances": body })
        } else {
            body
        };
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    let list: Vec<InstanceView> =
        serde_json::from_value(body).context("unexpected instance list")?;
    print!("{}", table(&list, chrono::Utc::now()));
    if let Some(n) = &node {
        print!("{}", node_lines(n));
    }
    if let Some(o) = &overlay {
        print!("{}", overlay::status_line(o));
    }
    // A degraded node (disk full, control plane refusing its requests) is said below
    // the table: the statuses above may not be what the platform sees.
    if let Ok(resp) = api.get("/healthz").send().await {
        if let Ok(h) = resp.json::<serde_json::Value>().await {
            for n in h["notices"].as_array().into_iter().flatten() {
                println!("\nNOTICE: {}", n.as_str().unwrap_or(""));
            }
            if h["status"] == "degraded" {
                println!(
                    "\nNODE DEGRADED: {}",
                    h["reason"].as_str().unwrap_or("no reason given")
                );
                for r in h["control_plane_refusals"].as_array().into_iter().flatten() {
                    println!(
                        "  control plane refuses {}: HTTP {} since {} ({} times): {}",
                        r["endpoint"].as_str().unwrap_or("?"),
                        r["code"],
                        r["since"].as_str().unwrap_or("?"),
                        r["count"],
                        r["message"].as_str().unwrap_or("")
                    );
                }
            }
        }
    }
    Ok(())
}

/// The node's facts below the status table: id, WireGuard key, client certificate and
/// the last reload error of the control-plane TLS material.
pub fn node_lines(n: &serde_json::Value) -> String {
    let mut out = format!("\nNODE {}", n["node_id"].as_str().unwrap_or("?"));
    if let Some(o) = n["overlay_ipv6"].as_str() {
        out.push_str(&format!("  overlay {o}"));
    }
    if let Some(k) = n["wireguard_public_key"].as_str() {
        out.push_str(&format!("  wireguard {k}"));
    }
    out.push('\n');
    let tls = &n["control_plane_tls"];
    if let Some(c) = tls["client_cert"].as_object() {
        out.push_str(&format!(
            "  client certificate {} serial {} expires {}\n",
            c.get("subject").and_then(|v| v.as_str()).unwrap_or("?"),
            c.get("serial").and_then(|v| v.as_str()).unwrap_or("?"),
            c.get("not_after").and_then(|v| v.as_str()).unwrap_or("?"),
        ));
    }
    if let Some(e) = tls["last_error"].as_object() {
        out.push_str(&format!(
            "  CERTIFICATE RELOAD FAILED at {} (the previous material stays in use): {}\n",
            e.get("at").and_then(|v| v.as_str()).unwrap_or("?"),
            e.get("message").and_then(|v| v.as_str()).unwrap_or("?"),
        ));
    }
    out
}

/// Renders instances as a fixed-width table; `SINCE` is how long each has had its
/// status (from `updated_at`, relative to `now`).
pub fn table(list: &[InstanceView], now: chrono::DateTime<chrono::Utc>) -> String {
    let mut out = format!(
        "{:<24} {:>4} {:<9} {:>7} {:<24} {:>5} {:>8}  {}\n",
        "INSTANCE", "GEN", "STATUS", "SINCE", "REASON", "EXIT", "RESTARTS", "MESSAGE"
    );
    for v in list {
        out.push_str(&format!(
            "{:<24} {:>4} {:<9} {:>7} {:<24} {:>5} {:>8}  {}\n",
            v.instance_id,
            v.generation,
            v.status.as_str(),
            human::age(&v.updated_at, now),
            v.reason_code.map(|r| r.as_str()).unwrap_or("-"),
            v.exit_code
                .map(|c| c.to_string())
                .unwrap_or_else(|| "-".into()),
            v.restarts,
            v.error_message.as_deref().unwrap_or("")
        ));
    }
    out
}

/// `stop <id>`.
pub async fn stop(api: &Api, id: &str, json: bool) -> anyhow::Result<()> {
    crate::spec::InstanceId::parse(id)?;
    let body = api
        .send(
            api.post(&format!("/v1/instances/{id}/stop")),
            &format!("stop {id}"),
        )
        .await?;
    if json {
        println!("{body}");
    } else {
        println!("stopping {id} (terminated_by_operator)");
    }
    Ok(())
}

/// `drain`.
pub async fn drain(api: &Api, json: bool) -> anyhow::Result<()> {
    let body = api.send(api.post("/v1/node/drain"), "drain").await?;
    if json {
        println!("{body}");
    } else {
        println!("node draining: every instance stops with node_draining");
    }
    Ok(())
}

/// `start <id>`: undoes an operator stop.
pub async fn start(api: &Api, id: &str, json: bool) -> anyhow::Result<()> {
    crate::spec::InstanceId::parse(id)?;
    let body = api
        .send(
            api.post(&format!("/v1/instances/{id}/start")),
            &format!("start {id}"),
        )
        .await?;
    if json {
        println!("{body}");
    } else {
        println!("starting {id} (the operator stop is lifted)");
    }
    Ok(())
}

/// `undrain`: ends a node drain.
pub async fn undrain(api: &Api, json: bool) -> anyhow::Result<()> {
    let body = api.send(api.post("/v1/node/undrain"), "undrain").await?;
    if json {
        println!("{body}");
    } else {
        println!("node active again: instances run and new ones boot");
    }
    Ok(())
}

/// What `logs` asks for.
#[derive(Debug, Clone, Default)]
pub struct LogsArgs {
    /// Keep printing new lines until the instance stops.
    pub follow: bool,
    /// RFC 3339 time or a duration back from now (`10m`).
    pub since: Option<String>,
    /// Only the last N lines.
    pub tail: Option<usize>,
    /// Only `stdout`, `stderr` or `console`.
    pub stream: Option<String>,
    /// Print the JSON lines as the API sends them.
    pub json: bool,
}

/// How a stored line is printed without `--json`: `<ts> <stream> <line>`, with
/// ` [truncated]` when the line was cut.
pub fn render_line(l: &crate::logstore::StoredLine) -> String {
    format!(
        "{} {:<7} {}{}",
        l.ts,
        l.stream,
        l.line,
        if l.truncated { " [truncated]" } else { "" }
    )
}

/// `logs [-f] [--since] [--tail N] [--stream S] [--json] <id>`.
pub async fn logs(api: &Api, id: &str, a: &LogsArgs) -> anyhow::Result<()> {
    use std::io::Write;
    crate::spec::InstanceId::parse(id)?;
    if let Some(s) = a.stream.as_deref() {
        if plfm_guest_protocol::LogStream::parse(s).is_none() {
            bail!("--stream: {s:?} is not stdout, stderr or console");
        }
    }
    let mut query: Vec<(&str, String)> = vec![("follow", a.follow.to_string())];
    if let Some(s) = &a.since {
        // Checked here for a clear message; the agent parses it again.
        crate::api::parse_since(s, chrono::Utc::now()).map_err(|e| anyhow::anyhow!("--{e}"))?;
        query.push(("since", s.clone()));
    }
    if let Some(t) = a.tail {
        query.push(("tail", t.to_string()));
    }
    if let Some(s) = &a.stream {
        query.push(("stream", s.clone()));
    }
    let client = if a.follow {
        &api.streaming
    } else {
        &api.client
    };
    let mut resp = client
        .get(format!("http://localhost/v1/instances/{id}/logs"))
        .query(&query)
        .send()
        .await
        .with_context(|| {
            format!(
                "cannot reach the agent's API at {} (is the agent running with this config, and may this user use it: root or api.socket_group?)",
                api.socket.display()
            )
        })?;
    let code = resp.status();
    if !code.is_success() {
        let body: serde_json::Value = resp.json().await.unwrap_or_default();
        let msg = body
            .get("error")
            .and_then(|e| e.as_str())
            .unwrap_or("no detail");
        bail!("logs {id}: {code}: {msg}");
    }
    let mut pending: Vec<u8> = Vec::new();
    let stdout = std::io::stdout();
    while let Some(chunk) = resp
        .chunk()
        .await
        .with_context(|| format!("logs {id}: the stream broke"))?
    {
        pending.extend_from_slice(&chunk);
        let mut out = stdout.lock();
        let mut start = 0;
        while let Some(i) = pending[start..].iter().position(|b| *b == b'\n') {
            let line = &pending[start..start + i];
            start += i + 1;
            if a.json {
                out.write_all(line)?;
                out.write_all(b"\n")?;
            } else if let Ok(l) = serde_json::from_slice::<crate::logstore::StoredLine>(line) {
                writeln!(out, "{}", render_line(&l))?;
            }
        }
        pending.drain(..start);
        out.flush()?;
    }
    Ok(())
}
