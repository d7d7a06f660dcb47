//! Exec sessions (a shell or a command in a running instance): one service behind the
//! local API's `GET /v1/instances/{id}/exec` upgrade and the platform gateway's listener
//! ([`gateway`]), relaying the shared exec frames to guest init on vsock port 5162.
//!
//! The service decides whether a session may start (the instance is known and `ready`,
//! fewer than [`MAX_SESSIONS`] run in it, the init frame is sound), connects to the
//! guest through the runtime's hybrid-vsock socket, relays frames both ways, and writes
//! one audit line when a session starts and one when it ends (who, instance, command,
//! start, end, exit code, end reason), plus metrics. It must not run anything itself:
//! the command runs in the guest, under guest init's own limits (2 sessions, 1 hour,
//! HUP → TERM → KILL after a disconnect).

#[cfg(unix)]
pub mod client;
pub mod gateway;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use plfm_guest_protocol::exec::nonblocking::{read_frame, write_frame};
use plfm_guest_protocol::exec::{kind, EndReason, ExecExit, ExecInit, Frame, EXEC_PORT};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::instance::Status;
use crate::metrics::Metrics;
use crate::runtime::Runtime;
use crate::spec::InstanceId;
use crate::status::StatusManager;

/// Sessions at once per instance (guest init enforces the same limit).
pub const MAX_SESSIONS: usize = 2;
/// Longest wait for a client's init frame.
pub const INIT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest wait for the guest to accept the connection.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Upper bound of a session on the host side: guest init ends sessions at 1 hour and
/// kills a disconnected one within 30 s; this only frees the host if the guest hangs.
pub const SESSION_BOUND: Duration = Duration::from_secs(3600 + 120);

/// Label: how a session ended.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    /// An end reason (`exited`, `killed`, `timeout`, `refused`, …).
    pub outcome: &'static str,
}

/// Exec sessions of this node.
pub struct ExecService {
    runtime: Arc<dyn Runtime>,
    status: Arc<StatusManager>,
    active: Mutex<HashMap<InstanceId, usize>>,
    sessions: Family<OutcomeLabel, Counter>,
    open: Gauge,
}

/// Why a session cannot start, before any frame is exchanged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// HTTP status for the local API (404 unknown, 409 not ready, 429 too many).
    pub http: u16,
    /// What to tell the user.
    pub message: String,
}

struct SessionGuard<'a> {
    svc: &'a ExecService,
    id: InstanceId,
}

impl Drop for SessionGuard<'_> {
    fn drop(&mut self) {
        let mut a = self.svc.active.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = a.get_mut(&self.id) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                a.remove(&self.id);
            }
        }
        self.svc.open.dec();
    }
}

impl ExecService {
    /// The service, its metrics registered (`plfm_exec_sessions_total{outcome}`,
    /// `plfm_exec_sessions_active`).
    pub fn new(
        runtime: Arc<dyn Runtime>,
        status: Arc<StatusManager>,
        metrics: &Metrics,
    ) -> Arc<ExecService> {
        let svc = ExecService {
            runtime,
            status,
            active: Mutex::new(HashMap::new()),
            sessions: Family::default(),
            open: Gauge::default(),
        };
        // Every outcome starts at 0 (docs/metrics.md): a family without samples is
        // left out of /metrics.
        for reason in EndReason::ALL {
            let _ = svc.sessions.get_or_create(&OutcomeLabel {
                outcome: reason.as_str(),
            });
        }
        metrics.with_registry(|r| {
            let r = r.sub_registry_with_prefix("plfm_exec");
            r.register(
                "sessions",
                "Exec sessions by how they ended (refused ones included)",
                svc.sessions.clone(),
            );
            r.register(
                "sessions_active",
                "Exec sessions running now",
                svc.open.clone(),
            );
        });
        Arc::new(svc)
    }

    /// Whether a session into `id` may start now; on success, the instance's vsock
    /// socket.
    pub fn check(&self, id: &InstanceId) -> Result<PathBuf, Refusal> {
        let Some(view) = self.status.get(id) else {
            return Err(Refusal {
                http: 404,
                message: format!("instance {id} is not known on this node"),
            });
        };
        if view.status != Status::Ready {
            return Err(Refusal {
                http: 409,
                message: format!(
                    "instance {id} is {}, not ready: exec is offered only while an instance is ready",
                    view.status.as_str()
                ),
            });
        }
        let active = self
            .active
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .copied()
            .unwrap_or(0);
        if active >= MAX_SESSIONS {
            return Err(Refusal {
                http: 429,
                message: format!(
                    "instance {id} already has {active} exec sessions: at most {MAX_SESSIONS} at once"
                ),
            });
        }
        self.runtime.guest_vsock(id).ok_or_else(|| Refusal {
            http: 409,
            message: format!(
                "instance {id}: the {} runtime offers no exec (no guest vsock device)",
                self.runtime.kind()
            ),
        })
    }

    fn take_slot(&self, id: &InstanceId) -> Option<SessionGuard<'_>> {
        let mut a = self.active.lock().unwrap_or_else(|p| p.into_inner());
        let n = a.entry(id.clone()).or_insert(0);
        if *n >= MAX_SESSIONS {
            return None;
        }
        *n += 1;
        self.open.inc();
        Some(SessionGuard {
            svc: self,
            id: id.clone(),
        })
    }

    fn count(&self, reason: EndReason) {
        self.sessions
            .get_or_create(&OutcomeLabel {
                outcome: reason.as_str(),
            })
            .inc();
    }

    /// Runs one session on `client`, which speaks the exec frames (first the init
    /// frame). `who` names the peer in the audit log; `expect` is the instance the
    /// request was addressed to (the local API's path), which the init frame must name.
    pub async fn serve<S>(&self, client: S, who: &str, expect: Option<&InstanceId>)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        let (mut cr, mut cw) = tokio::io::split(client);
        let refuse = |message: String| ExecExit::refused(message);
        let init = match tokio::time::timeout(INIT_TIMEOUT, read_frame(&mut cr)).await {
            Ok(Ok(Some(f))) if f.kind == kind::INIT => f,
            Ok(Ok(Some(f))) => {
                let exit = refuse(format!(
                    "the first frame must be init (0x20), got 0x{:02x}",
                    f.kind
                ));
                return self.end_early(&mut cw, who, None, exit).await;
            }
            Ok(Ok(None)) | Ok(Err(_)) => return,
            Err(_) => {
                let exit = refuse(format!("no init frame within {INIT_TIMEOUT:?}"));
                return self.end_early(&mut cw, who, None, exit).await;
            }
        };
        let parsed: ExecInit = match init.parse() {
            Ok(i) => i,
            Err(e) => {
                return self
                    .end_early(&mut cw, who, None, refuse(e.to_string()))
                    .await
            }
        };
        let id = match InstanceId::parse(&parsed.instance_id) {
            Ok(id) => id,
            Err(e) => {
                let exit = refuse(format!("instance_id: {e}"));
                return self.end_early(&mut cw, who, Some(&parsed), exit).await;
            }
        };
        if let Some(expect) = expect {
            if *expect != id {
                let exit = refuse(format!(
                    "the session was opened for instance {expect} but its init names {id}"
                ));
                return self.end_early(&mut cw, who, Some(&parsed), exit).await;
            }
        }
        if parsed.command.is_empty() {
            let exit = refuse("the command is empty".into());
            return self.end_early(&mut cw, who, Some(&parsed), exit).await;
        }
        let uds = match self.check(&id) {
            Ok(p) => p,
            Err(r) => {
                let exit = if r.http == 429 {
                    ExecExit::limit(r.message)
                } else {
                    refuse(r.message)
                };
                return self.end_early(&mut cw, who, Some(&parsed), exit).await;
            }
        };
        let Some(_slot) = self.take_slot(&id) else {
            let exit = ExecExit::limit(format!(
                "instance {id} already has {MAX_SESSIONS} exec sessions: at most {MAX_SESSIONS} at once"
            ));
            return self.end_early(&mut cw, who, Some(&parsed), exit).await;
        };
        let started = Instant::now();
        let started_at = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        tracing::info!(
            target: "plfm::audit",
            who,
            instance = %id,
            session = %parsed.session_id,
            command = ?parsed.command,
            tty = parsed.tty,
            start = %started_at,
            "exec session started"
        );
        let guest = match connect_guest(&uds, EXEC_PORT, CONNECT_TIMEOUT).await {
            Ok(g) => g,
            Err(e) => {
                let exit = ExecExit {
                    exit_code: None,
                    reason: EndReason::ConnectTimeout,
                    message: Some(format!(
                        "instance {id}: cannot reach guest init's exec port: {e}"
                    )),
                };
                let _ = write_frame(&mut cw, &Frame::json(kind::EXIT, &exit)).await;
                return self.audit_end(who, &id, &parsed, &started_at, started, &exit);
            }
        };
        let exit = relay(&mut cr, &mut cw, guest, &init).await;
        let _ = cw.shutdown().await;
        self.audit_end(who, &id, &parsed, &started_at, started, &exit);
    }

    async fn end_early<W: AsyncWrite + Unpin>(
        &self,
        cw: &mut W,
        who: &str,
        init: Option<&ExecInit>,
        exit: ExecExit,
    ) {
        let _ = write_frame(cw, &Frame::json(kind::EXIT, &exit)).await;
        let _ = cw.shutdown().await;
        self.count(exit.reason);
        tracing::info!(
            target: "plfm::audit",
            who,
            instance = init.map(|i| i.instance_id.as_str()).unwrap_or("-"),
            session = init.map(|i| i.session_id.as_str()).unwrap_or("-"),
            command = ?init.map(|i| &i.command),
            reason = exit.reason.as_str(),
            message = exit.message.as_deref().unwrap_or(""),
            "exec session refused"
        );
    }

    fn audit_end(
        &self,
        who: &str,
        id: &InstanceId,
        init: &ExecInit,
        started_at: &str,
        started: Instant,
        exit: &ExecExit,
    ) {
        self.count(exit.reason);
        tracing::info!(
            target: "plfm::audit",
            who,
            instance = %id,
            session = %init.session_id,
            command = ?init.command,
            start = %started_at,
            end = %chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            duration_ms = started.elapsed().as_millis() as u64,
            exit_code = ?exit.exit_code,
            reason = exit.reason.as_str(),
            "exec session ended"
        );
    }
}

/// Relays frames until the guest's exit frame (returned) or the guest goes away.
async fn relay<CR, CW>(
    cr: &mut CR,
    cw: &mut CW,
    guest: tokio::net::UnixStream,
    init: &Frame,
) -> ExecExit
where
    CR: AsyncRead + Unpin,
    CW: AsyncWrite + Unpin,
{
    let gone = |message: &str| ExecExit {
        exit_code: None,
        reason: EndReason::OperatorRevoked,
        message: Some(message.to_string()),
    };
    let (mut gr, mut gw) = guest.into_split();
    if write_frame(&mut gw, init).await.is_err() {
        return gone("guest init closed the exec connection");
    }
    let up = async {
        loop {
            match read_frame(cr).await {
                Ok(Some(f)) if f.kind == kind::STDIN || f.kind == kind::CONTROL => {
                    if write_frame(&mut gw, &f).await.is_err() {
                        break;
                    }
                }
                // A second init or an output frame from a client is ignored.
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => break,
            }
        }
        // The client is gone: tell guest init (it hangs up the command).
        let _ = gw.shutdown().await;
    };
    let down = async {
        let mut client_open = true;
        loop {
            match read_frame(&mut gr).await {
                Ok(Some(f)) => {
                    if client_open && write_frame(cw, &f).await.is_err() {
                        client_open = false;
                    }
                    if f.kind == kind::EXIT {
                        return f
                            .parse::<ExecExit>()
                            .unwrap_or_else(|e| gone(&e.to_string()));
                    }
                }
                Ok(None) | Err(_) => {
                    let exit = gone(
                        "the instance's exec connection ended without an exit (the VM stopped?)",
                    );
                    if client_open {
                        let _ = write_frame(cw, &Frame::json(kind::EXIT, &exit)).await;
                    }
                    return exit;
                }
            }
        }
    };
    tokio::pin!(up);
    tokio::pin!(down);
    let bounded = async {
        tokio::select! {
            exit = &mut down => exit,
            _ = &mut up => {
                let mut exit = (&mut down).await;
                if exit.reason == EndReason::Exited || exit.reason == EndReason::Killed {
                    // The command ended because the client left, or just then.
                    exit.reason = EndReason::ClientDisconnect;
                }
                exit
            }
        }
    };
    match tokio::time::timeout(SESSION_BOUND, bounded).await {
        Ok(exit) => exit,
        Err(_) => ExecExit {
            exit_code: None,
            reason: EndReason::Timeout,
            message: Some("the session outlived its limit".into()),
        },
    }
}

/// Connects to guest port `port` through a hybrid-vsock Unix socket (Firecracker's and
/// vhost-device-vsock's protocol: `CONNECT <port>\n`, answered `OK <host port>\n`).
pub async fn connect_guest(
    uds: &Path,
    port: u32,
    within: Duration,
) -> Result<tokio::net::UnixStream, String> {
    let attempt = async {
        let mut s = tokio::net::UnixStream::connect(uds)
            .await
            .map_err(|e| format!("connect {}: {e}", uds.display()))?;
        s.write_all(format!("CONNECT {port}\n").as_bytes())
            .await
            .map_err(|e| format!("CONNECT {port}: {e}"))?;
        // Read the answer byte by byte: what follows the newline is the guest's.
        let mut line = Vec::new();
        loop {
            let b = s
                .read_u8()
                .await
                .map_err(|_| format!("port {port}: the guest did not accept (nothing listens?)"))?;
            if b == b'\n' {
                break;
            }
            if line.len() >= 64 {
                return Err(format!("port {port}: answer too long"));
            }
            line.push(b);
        }
        let line = String::from_utf8_lossy(&line);
        if !line.starts_with("OK ") {
            return Err(format!("port {port}: unexpected answer {line:?}"));
        }
        Ok(s)
    };
    tokio::time::timeout(within, attempt)
        .await
        .map_err(|_| format!("no answer within {within:?}"))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn connect_guest_speaks_the_hybrid_vsock_handshake() {
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("v.sock");
        let l = tokio::net::UnixListener::bind(&uds).unwrap();
        let server = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut buf = [0u8; 13];
            s.read_exact(&mut buf).await.unwrap();
            assert_eq!(&buf, b"CONNECT 5162\n");
            s.write_all(b"OK 1073741824\nguest").await.unwrap();
            s
        });
        let mut s = connect_guest(&uds, 5162, Duration::from_secs(5))
            .await
            .unwrap();
        let mut rest = [0u8; 5];
        s.read_exact(&mut rest).await.unwrap();
        assert_eq!(
            &rest, b"guest",
            "bytes after the OK line belong to the guest"
        );
        drop(server.await.unwrap());
    }

    #[tokio::test]
    async fn a_guest_port_nobody_listens_on_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("v.sock");
        let l = tokio::net::UnixListener::bind(&uds).unwrap();
        tokio::spawn(async move {
            // Firecracker closes the connection when the guest refuses the port.
            let (mut s, _) = l.accept().await.unwrap();
            let mut buf = [0u8; 13];
            let _ = s.read_exact(&mut buf).await;
        });
        let err = connect_guest(&uds, 5162, Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(err.contains("did not accept"), "{err}");
        let err = connect_guest(&dir.path().join("none"), 5162, Duration::from_secs(1))
            .await
            .unwrap_err();
        assert!(err.contains("none"), "names the socket: {err}");
    }
}
