//! Overlay helpers shared by the tests and benchmarks that run real agents with the
//! userspace WireGuard backend (`overlay_agent.rs`, `overlay_vms.rs`, `benches/overlay.rs`):
//! the `wireguard-go` serving an interface's UAPI socket, `overlay.json` documents, the
//! agent's `overlay --json` view as a probe, and TCP reachability with a deadline.
//! The including crate has `mod common`.
#![allow(dead_code)]

use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{json, Value};

use crate::common::agent::AgentProcess;

/// Where the userspace implementations put their UAPI sockets.
pub const SOCKET_DIR: &str = "/var/run/wireguard";

/// Connects to `addr` within `within`, retrying (a handshake takes a moment); each
/// attempt waits at most `attempt` for the connection.
pub fn connects_with(addr: SocketAddr, within: Duration, attempt: Duration) -> bool {
    let end = Instant::now() + within;
    loop {
        if TcpStream::connect_timeout(&addr, attempt).is_ok() {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// [`connects_with`] with 500 ms attempts.
pub fn connects(addr: SocketAddr, within: Duration) -> bool {
    connects_with(addr, within, Duration::from_millis(500))
}

/// The pid of the process serving the UAPI socket of `iface` (its `SO_PEERCRED`), when
/// it is a `wireguard-go` for that interface.
pub fn wireguard_go_pid(iface: &str) -> Option<i32> {
    let sock = Path::new(SOCKET_DIR).join(format!("{iface}.sock"));
    let s = std::os::unix::net::UnixStream::connect(sock).ok()?;
    let cred = nix::sys::socket::getsockopt(&s, nix::sys::socket::sockopt::PeerCredentials).ok()?;
    let cmd = std::fs::read(format!("/proc/{}/cmdline", cred.pid())).ok()?;
    let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
    (cmd.contains("wireguard-go") && cmd.contains(iface)).then_some(cred.pid())
}

/// SIGKILLs the `wireguard-go` of `iface` (if one serves its socket) and removes the
/// socket file: the cleanup of a test's interfaces.
pub fn kill_wireguard_go(iface: &str) {
    if let Some(pid) = wireguard_go_pid(iface) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    let _ = std::fs::remove_file(Path::new(SOCKET_DIR).join(format!("{iface}.sock")));
}

/// The base64 public key of the base64 private key in `key_file`, as `wg pubkey`
/// prints it.
pub fn public_key_of(key_file: &Path) -> String {
    let text = std::fs::read_to_string(key_file).unwrap();
    let bytes: [u8; 32] = base64::engine::general_purpose::STANDARD
        .decode(text.trim())
        .unwrap()
        .try_into()
        .unwrap();
    let secret = x25519_dalek::StaticSecret::from(bytes);
    base64::engine::general_purpose::STANDARD
        .encode(x25519_dalek::PublicKey::from(&secret).as_bytes())
}

/// One peer of an `overlay.json`.
#[derive(Debug, Clone)]
pub struct Peer {
    pub node_id: String,
    /// Base64.
    pub public_key: String,
    /// `ip:port` on the underlay.
    pub endpoint: String,
    /// Prefixes (`fd00::1/128`...).
    pub allowed_ips: Vec<String>,
}

/// An overlay document (`overlay.json`, the control plane's answer): this node at
/// `me` on port 51820, MTU 1420, and `peers` with a 1 s keepalive.
pub fn overlay_doc(generation: i64, me: &str, peers: &[Peer]) -> Value {
    let peers: Vec<Value> = peers
        .iter()
        .map(|p| {
            json!({"node_id": p.node_id, "public_key": p.public_key, "endpoint": p.endpoint,
                   "allowed_ips": p.allowed_ips, "keepalive_secs": 1})
        })
        .collect();
    json!({"generation": generation, "node": {"overlay_ipv6": me, "listen_port": 51820, "mtu": 1420}, "peers": peers})
}

/// Writes `<desired_dir>/overlay.json` atomically (a reader never sees half of it).
pub fn write_overlay(desired_dir: &Path, doc: &Value) {
    let tmp = desired_dir.join(".overlay.json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(doc).unwrap()).unwrap();
    std::fs::rename(&tmp, desired_dir.join("overlay.json")).unwrap();
}

/// `overlay --json` of `agent`.
pub fn overlay_json(agent: &AgentProcess) -> Result<Value, String> {
    agent.assert_running();
    let out = agent.cli(&["overlay", "--json"]);
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())
}

/// Probe: `overlay --json` once `cond` holds for it.
pub fn overlay_where(agent: &AgentProcess, cond: impl Fn(&Value) -> bool) -> Result<Value, String> {
    match overlay_json(agent) {
        Ok(v) if cond(&v) => Ok(v),
        Ok(v) => Err(format!("overlay --json: {v:#}\n{}", agent.diagnostics())),
        Err(e) => Err(format!("{e}\n{}", agent.diagnostics())),
    }
}

/// A counter of the agent's `/metrics` (`name` with its labels, as printed), 0 when
/// absent.
pub fn metric(agent: &AgentProcess, name: &str) -> f64 {
    let (_, body) = agent.api_get("/metrics").unwrap_or_default();
    body.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}
