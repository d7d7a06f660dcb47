//! The node's WireGuard device, the same configuration path for both backends
//! ([`apply_with`] over [`WgControl`]; [`AnyDevice`] is the one chosen at start), and
//! the userspace backend: a `wireguard-go` process
//! (Debian package `wireguard-go`; chosen because the distribution ships and maintains
//! it, and it serves the standard UAPI socket) that owns the interface, configured over
//! `/var/run/wireguard/<iface>.sock`, plus the interface's MTU, address and routes over
//! rtnetlink.
//!
//! The process runs in its own session, so it outlives an agent restart; a new agent
//! finds its socket and adopts it (nothing rebuilt when the configuration matches).
//! Every exchange on the socket is bounded by [`UAPI_TIMEOUT`].
//!
//! Needs root (it creates a tun device and sets addresses and routes). This module
//! applies what it is given; deciding what the overlay should be is not its job, and
//! it never logs or returns the private key.

use std::net::Ipv6Addr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::config::{diff, OverlayConfig, PeerChange};
use super::uapi::{parse_get, parse_set_answer, set_document, DeviceState};

/// Bound of one UAPI exchange.
pub const UAPI_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a started `wireguard-go` may take to open its socket.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest UAPI answer read (a 4096-peer mesh with its allowed IPs fits).
const MAX_ANSWER: u64 = 64 << 20;

/// Where the userspace implementations put their UAPI sockets.
pub const SOCKET_DIR: &str = "/var/run/wireguard";

/// An overlay device failure; the message names the interface and the step.
#[derive(Debug, thiserror::Error)]
#[error("overlay interface {iface}: {step}: {message}")]
pub struct DeviceError {
    /// Interface.
    pub iface: String,
    /// What was being done.
    pub step: String,
    /// Why it failed.
    pub message: String,
}

/// What one [`UserspaceDevice::apply`] changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Applied {
    /// Whether the `wireguard-go` process was (re)started.
    pub started: bool,
    /// Peer changes sent.
    pub changes: usize,
    /// Whether the private key or listen port were (re)set.
    pub interface_set: bool,
}

/// The userspace WireGuard device of one interface.
#[derive(Debug, Clone)]
pub struct UserspaceDevice {
    iface: String,
    command: PathBuf,
    log: PathBuf,
}

impl UserspaceDevice {
    /// `command` is the implementation to run (`wireguard-go`), `log` where its output
    /// goes.
    pub fn new(iface: &str, command: &Path, log: &Path) -> UserspaceDevice {
        UserspaceDevice {
            iface: iface.to_string(),
            command: command.to_path_buf(),
            log: log.to_path_buf(),
        }
    }

    fn err(&self, step: &str, message: impl std::fmt::Display) -> DeviceError {
        DeviceError {
            iface: self.iface.clone(),
            step: step.to_string(),
            message: message.to_string(),
        }
    }

    /// The UAPI socket.
    pub fn socket(&self) -> PathBuf {
        Path::new(SOCKET_DIR).join(format!("{}.sock", self.iface))
    }

    /// One request/answer on the UAPI socket.
    async fn exchange(&self, request: &str) -> Result<String, DeviceError> {
        let step = if request.starts_with("get=") {
            "UAPI get"
        } else {
            "UAPI set"
        };
        let work = async {
            let mut s = tokio::net::UnixStream::connect(self.socket())
                .await
                .map_err(|e| format!("connect {}: {e}", self.socket().display()))?;
            s.write_all(request.as_bytes())
                .await
                .map_err(|e| format!("write: {e}"))?;
            let mut out = Vec::new();
            let mut buf = [0u8; 16 * 1024];
            let mut limited = (&mut s).take(MAX_ANSWER);
            loop {
                let n = limited
                    .read(&mut buf)
                    .await
                    .map_err(|e| format!("read: {e}"))?;
                if n == 0 {
                    break;
                }
                out.extend_from_slice(&buf[..n]);
                // An answer ends with `errno=N` and an empty line.
                if out.ends_with(b"\n\n") && out.windows(6).any(|w| w == b"errno=") {
                    break;
                }
            }
            String::from_utf8(out).map_err(|_| "answer is not UTF-8".to_string())
        };
        match tokio::time::timeout(UAPI_TIMEOUT, work).await {
            Ok(r) => r.map_err(|m| self.err(step, m)),
            Err(_) => Err(self.err(step, format!("no answer within {UAPI_TIMEOUT:?}"))),
        }
    }

    /// The device's state, `None` when no implementation serves the socket.
    pub async fn state(&self) -> Result<Option<DeviceState>, DeviceError> {
        if tokio::net::UnixStream::connect(self.socket())
            .await
            .is_err()
        {
            return Ok(None);
        }
        let answer = self.exchange("get=1\n\n").await?;
        parse_get(&answer)
            .map(Some)
            .map_err(|m| self.err("UAPI get", m))
    }

    /// Starts `wireguard-go` for the interface when nothing serves its socket (first
    /// start, or the process died: the drift check calls this too). Returns whether it
    /// started one.
    pub async fn ensure_running(&self) -> Result<bool, DeviceError> {
        if tokio::net::UnixStream::connect(self.socket()).await.is_ok() {
            return Ok(false);
        }
        // A stale socket of a dead process would make the new one fail to bind.
        let _ = std::fs::remove_file(self.socket());
        // A kernel WireGuard link of the same name (the backend changed) holds the name.
        if let Ok(Some(Some(kind))) = crate::network::link_kind(&self.iface).await {
            if kind == "wireguard" {
                tracing::warn!(interface = %self.iface, "the overlay interface is a kernel WireGuard link; replacing it with the userspace backend's");
                crate::network::delete_link(&self.iface)
                    .await
                    .map_err(|e| self.err("replace the interface", e))?;
            }
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(|e| self.err("open its log", format!("{}: {e}", self.log.display())))?;
        let log2 = log.try_clone().map_err(|e| self.err("open its log", e))?;
        let mut cmd = std::process::Command::new(&self.command);
        cmd.args(["-f", &self.iface])
            .env("WG_PROCESS_FOREGROUND", "1")
            .stdin(std::process::Stdio::null())
            .stdout(log)
            .stderr(log2);
        // Its own session: an agent restart (systemd KillMode=process) leaves it up.
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let mut child = cmd.spawn().map_err(|e| {
            self.err(
                "start the userspace WireGuard",
                format!("{}: {e}", self.command.display()),
            )
        })?;
        let deadline = tokio::time::Instant::now() + START_TIMEOUT;
        loop {
            if tokio::net::UnixStream::connect(self.socket()).await.is_ok() {
                // Reaped by a thread so it never lingers as a zombie of the agent.
                std::thread::spawn(move || {
                    let _ = child.wait();
                });
                return Ok(true);
            }
            if let Ok(Some(status)) = child.try_wait() {
                return Err(self.err(
                    "start the userspace WireGuard",
                    format!(
                        "{} exited ({status}); see {}",
                        self.command.display(),
                        self.log.display()
                    ),
                ));
            }
            if tokio::time::Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(self.err(
                    "start the userspace WireGuard",
                    format!(
                        "no socket {} within {START_TIMEOUT:?}",
                        self.socket().display()
                    ),
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Removes the interface (the overlay is off). `wireguard-go` exits when its
    /// interface goes and removes its socket; a socket still served after
    /// [`START_TIMEOUT`] is an error. Returns whether the interface existed.
    pub async fn remove(&self) -> Result<bool, DeviceError> {
        let existed = nix::net::if_::if_nametoindex(self.iface.as_str()).is_ok();
        crate::network::delete_link(&self.iface)
            .await
            .map_err(|e| self.err("delete the interface", e))?;
        let deadline = tokio::time::Instant::now() + START_TIMEOUT;
        while tokio::net::UnixStream::connect(self.socket()).await.is_ok() {
            if tokio::time::Instant::now() >= deadline {
                return Err(self.err(
                    "stop the userspace WireGuard",
                    format!(
                        "{} is still served {START_TIMEOUT:?} after the interface was deleted",
                        self.socket().display()
                    ),
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // A dead implementation's socket file.
        let _ = std::fs::remove_file(self.socket());
        Ok(existed)
    }

    /// Brings the device to `cfg` (see [`apply_with`]).
    pub async fn apply(
        &self,
        cfg: &OverlayConfig,
        private_key: &[u8; 32],
    ) -> Result<Applied, DeviceError> {
        apply_with(self, cfg, private_key).await
    }

    /// Sends key, port and peer changes as one UAPI `set=1`.
    pub async fn set(
        &self,
        private_key: Option<&[u8; 32]>,
        listen_port: Option<u16>,
        changes: &[PeerChange],
    ) -> Result<(), DeviceError> {
        let doc = zeroize::Zeroizing::new(set_document(private_key, listen_port, changes));
        let answer = self.exchange(doc.as_str()).await?;
        parse_set_answer(&answer).map_err(|m| self.err("UAPI set", m))
    }
}

/// What a backend does for [`apply_with`]: make the interface exist, report its state,
/// send changes. The userspace backend speaks UAPI; the kernel backend
/// (`super::kernel`) generic netlink.
#[async_trait::async_trait]
pub trait WgControl: Send + Sync {
    /// The interface's name.
    fn iface(&self) -> &str;
    /// Makes the device exist (starts `wireguard-go`, creates the kernel link);
    /// whether it had to.
    async fn ensure(&self) -> Result<bool, DeviceError>;
    /// The device's state, `None` when there is none.
    async fn state(&self) -> Result<Option<DeviceState>, DeviceError>;
    /// Sets the key and port when given, and sends the peer changes.
    async fn set(
        &self,
        private_key: Option<&[u8; 32]>,
        listen_port: Option<u16>,
        changes: &[PeerChange],
    ) -> Result<(), DeviceError>;
}

#[async_trait::async_trait]
impl WgControl for UserspaceDevice {
    fn iface(&self) -> &str {
        &self.iface
    }
    async fn ensure(&self) -> Result<bool, DeviceError> {
        self.ensure_running().await
    }
    async fn state(&self) -> Result<Option<DeviceState>, DeviceError> {
        UserspaceDevice::state(self).await
    }
    async fn set(
        &self,
        private_key: Option<&[u8; 32]>,
        listen_port: Option<u16>,
        changes: &[PeerChange],
    ) -> Result<(), DeviceError> {
        UserspaceDevice::set(self, private_key, listen_port, changes).await
    }
}

/// Brings a device to `cfg`, the same way for every backend: makes it exist, sets the
/// key and port when they differ, sends only the peer changes, then sets the
/// interface's MTU, address and routes. Idempotent: a second call with the same
/// configuration sends no change.
pub async fn apply_with<W: WgControl + ?Sized>(
    dev: &W,
    cfg: &OverlayConfig,
    private_key: &[u8; 32],
) -> Result<Applied, DeviceError> {
    let started = dev.ensure().await?;
    let state = dev.state().await?.ok_or_else(|| DeviceError {
        iface: dev.iface().to_string(),
        step: "read the device".into(),
        message: "the device went away".into(),
    })?;
    // Implementations keep (and report) the key clamped as X25519 uses it.
    let mut clamped = zeroize::Zeroizing::new(*private_key);
    clamped[0] &= 248;
    clamped[31] = (clamped[31] & 127) | 64;
    let key_ok = state.private_key_sha256 == Some(super::uapi::sha256(&clamped[..]));
    let port_ok = state.listen_port == Some(cfg.node.listen_port);
    let changes: Vec<PeerChange> = diff(&state.as_peers(&cfg.peers), &cfg.peers);
    let interface_set = !(key_ok && port_ok);
    if interface_set || !changes.is_empty() {
        dev.set(
            (!key_ok).then_some(private_key),
            (!port_ok).then_some(cfg.node.listen_port),
            &changes,
        )
        .await?;
    }
    let routes: Vec<(Ipv6Addr, u8)> = cfg
        .peers
        .iter()
        .flat_map(|p| p.allowed_ips.iter().map(|ip| (ip.addr, ip.len)))
        .collect();
    crate::network::configure_overlay_link(
        dev.iface(),
        cfg.node.mtu,
        cfg.node.overlay_ipv6,
        &routes,
    )
    .await
    .map_err(|e| DeviceError {
        iface: dev.iface().to_string(),
        step: "interface address and routes".into(),
        message: e,
    })?;
    Ok(Applied {
        started,
        changes: changes.len(),
        interface_set,
    })
}

/// The node's device with the backend chosen at start (`overlay.backend`).
#[derive(Debug, Clone)]
pub enum AnyDevice {
    /// `wireguard-go` over UAPI.
    Userspace(UserspaceDevice),
    /// Kernel WireGuard over generic netlink.
    Kernel(super::kernel::KernelDevice),
}

impl AnyDevice {
    /// Brings the device to `cfg`.
    pub async fn apply(
        &self,
        cfg: &OverlayConfig,
        private_key: &[u8; 32],
    ) -> Result<Applied, DeviceError> {
        match self {
            AnyDevice::Userspace(d) => d.apply(cfg, private_key).await,
            AnyDevice::Kernel(d) => d.apply(cfg, private_key).await,
        }
    }

    /// The device's state, `None` when there is none.
    pub async fn state(&self) -> Result<Option<DeviceState>, DeviceError> {
        match self {
            AnyDevice::Userspace(d) => d.state().await,
            AnyDevice::Kernel(d) => d.state().await,
        }
    }

    /// Removes the interface; whether it existed.
    pub async fn remove(&self) -> Result<bool, DeviceError> {
        match self {
            AnyDevice::Userspace(d) => d.remove().await,
            AnyDevice::Kernel(d) => d.remove().await,
        }
    }
}
