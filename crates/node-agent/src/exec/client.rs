//! `plfm-node-agent exec [-i] [-t] <id> -- <cmd> [args]`: the client end of a local exec
//! session, like `docker exec`. It upgrades a request on the agent's Unix socket
//! (`GET /v1/instances/{id}/exec`, `Upgrade: plfm-exec`) and then speaks the exec frames:
//! stdin (with `-i`) out, stdout/stderr in, the terminal in raw mode and resizes on
//! SIGWINCH (with `-t` on a terminal), and the command's exit code as its own.
//!
//! The HTTP upgrade is written by hand: reqwest does not expose upgraded connections
//! over a Unix socket, and the exchange is one request head and one response head.
//! This module must not decide anything about sessions; the agent and guest init do.

use std::io::Write;
use std::os::fd::AsFd;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context};
use plfm_guest_protocol::exec::nonblocking::{read_frame, write_frame};
use plfm_guest_protocol::exec::{kind, ExecControl, ExecExit, ExecInit, Frame, MAX_DATA};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Exit code of `exec` when the session could not run the command (like docker's 125).
pub const EXIT_NOT_RUN: i32 = 125;

/// Options of `exec`.
#[derive(Debug, Clone)]
pub struct ExecArgs {
    /// Instance.
    pub instance_id: String,
    /// Program and arguments.
    pub command: Vec<String>,
    /// Send standard input.
    pub interactive: bool,
    /// Allocate a terminal.
    pub tty: bool,
}

/// The terminal in raw mode until dropped.
struct RawMode {
    saved: Option<nix::sys::termios::Termios>,
}

impl RawMode {
    fn enter() -> RawMode {
        use nix::sys::termios::{cfmakeraw, tcgetattr, tcsetattr, SetArg};
        let stdin = std::io::stdin();
        let Ok(saved) = tcgetattr(stdin.as_fd()) else {
            return RawMode { saved: None };
        };
        let mut raw = saved.clone();
        cfmakeraw(&mut raw);
        if tcsetattr(stdin.as_fd(), SetArg::TCSANOW, &raw).is_err() {
            return RawMode { saved: None };
        }
        RawMode { saved: Some(saved) }
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        if let Some(saved) = &self.saved {
            let _ = nix::sys::termios::tcsetattr(
                std::io::stdin().as_fd(),
                nix::sys::termios::SetArg::TCSANOW,
                saved,
            );
        }
    }
}

fn is_terminal() -> bool {
    use std::io::IsTerminal;
    std::io::stdin().is_terminal()
}

/// The terminal's (cols, rows), if stdin or stdout is one.
fn window_size() -> Option<(u16, u16)> {
    for fd in [0, 1] {
        let mut ws = libc::winsize {
            ws_row: 0,
            ws_col: 0,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCGWINSZ writes one winsize into the pointer, which outlives the
        // call; fds 0 and 1 are this process's standard streams.
        let r = unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut ws) };
        if r == 0 && ws.ws_col > 0 && ws.ws_row > 0 {
            return Some((ws.ws_col, ws.ws_row));
        }
    }
    None
}

/// Sends the upgrade request and reads the response head; on a refusal, the agent's
/// message.
async fn upgrade(stream: &mut tokio::net::UnixStream, id: &str) -> anyhow::Result<()> {
    let req = format!(
        "GET /v1/instances/{id}/exec HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\nUpgrade: plfm-exec\r\n\r\n"
    );
    stream.write_all(req.as_bytes()).await?;
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() > 16 * 1024 {
            bail!("the agent's answer head is too long");
        }
        let b = stream
            .read_u8()
            .await
            .context("the agent closed the connection during the upgrade")?;
        head.push(b);
    }
    let text = String::from_utf8_lossy(&head).to_string();
    let status: u16 = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    if status == 101 {
        return Ok(());
    }
    let len: usize = text
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0)
        .min(64 * 1024);
    let mut body = vec![0u8; len];
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut body)).await;
    let msg = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v["error"].as_str().map(str::to_string))
        .unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned());
    bail!("exec {id}: HTTP {status}: {msg}")
}

/// Runs a session; returns the exit code to exit with.
pub async fn run(socket: &Path, args: ExecArgs) -> anyhow::Result<i32> {
    crate::spec::InstanceId::parse(&args.instance_id)?;
    if args.command.is_empty() {
        bail!("exec: no command given (plfm-node-agent exec <id> -- <cmd> [args])");
    }
    let mut stream = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::net::UnixStream::connect(socket),
    )
    .await
    .map_err(|_| anyhow::anyhow!("the agent's API at {} does not answer", socket.display()))?
    .with_context(|| {
        format!(
            "cannot reach the agent's API at {} (is the agent running with this config, and may this user use it: root or api.socket_group?)",
            socket.display()
        )
    })?;
    upgrade(&mut stream, &args.instance_id).await?;
    let terminal = args.tty && is_terminal();
    let (cols, rows) = if args.tty {
        window_size().unwrap_or((80, 24))
    } else {
        (0, 0)
    };
    let init = ExecInit {
        session_id: format!("cli-{:016x}", rand::random::<u64>()),
        instance_id: args.instance_id.clone(),
        command: args.command.clone(),
        tty: args.tty,
        cols,
        rows,
        env: Default::default(),
        stdin: args.interactive,
    };
    let (mut rd, mut wr) = stream.into_split();
    write_frame(&mut wr, &Frame::json(kind::INIT, &init)).await?;
    let _raw = terminal.then(RawMode::enter);

    // Everything the client sends goes through one task that owns the write half.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Frame>(64);
    let writer = tokio::spawn(async move {
        while let Some(f) = rx.recv().await {
            if write_frame(&mut wr, &f).await.is_err() {
                return;
            }
        }
        // Keep the connection open until the session ends: dropping the write half
        // would tell the agent the client left.
        std::future::pending::<()>().await;
    });
    if args.interactive {
        let tx = tx.clone();
        tokio::spawn(async move {
            let mut stdin = tokio::io::stdin();
            let mut buf = vec![0u8; MAX_DATA];
            loop {
                match stdin.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        let f = Frame {
                            kind: kind::STDIN,
                            payload: buf[..n].to_vec(),
                        };
                        if tx.send(f).await.is_err() {
                            return;
                        }
                    }
                }
            }
            let _ = tx
                .send(Frame::json(kind::CONTROL, &ExecControl::Close))
                .await;
        });
    }
    if terminal {
        let tx = tx.clone();
        tokio::spawn(async move {
            use tokio::signal::unix::{signal, SignalKind};
            let Ok(mut winch) = signal(SignalKind::window_change()) else {
                return;
            };
            while winch.recv().await.is_some() {
                if let Some((cols, rows)) = window_size() {
                    let f = Frame::json(kind::CONTROL, &ExecControl::Resize { cols, rows });
                    if tx.send(f).await.is_err() {
                        return;
                    }
                }
            }
        });
    }
    drop(tx);
    let mut stdout = std::io::stdout();
    let mut stderr = std::io::stderr();
    let exit = loop {
        match read_frame(&mut rd).await {
            Ok(Some(f)) => match f.kind {
                kind::STDOUT => {
                    let _ = stdout.write_all(&f.payload);
                    let _ = stdout.flush();
                }
                kind::STDERR => {
                    let _ = stderr.write_all(&f.payload);
                    let _ = stderr.flush();
                }
                kind::EXIT => break f.parse::<ExecExit>().ok(),
                _ => {}
            },
            Ok(None) | Err(_) => break None,
        }
    };
    writer.abort();
    drop(_raw);
    match exit {
        Some(ExecExit {
            exit_code: Some(code),
            message,
            ..
        }) => {
            if let Some(m) = message {
                eprintln!("plfm-node-agent: exec {}: {m}", args.instance_id);
            }
            Ok(code)
        }
        Some(ExecExit {
            exit_code: None,
            reason,
            message,
        }) => {
            eprintln!(
                "plfm-node-agent: exec {}: {}: {}",
                args.instance_id,
                reason.as_str(),
                message.as_deref().unwrap_or("the command did not run")
            );
            Ok(EXIT_NOT_RUN)
        }
        None => {
            eprintln!(
                "plfm-node-agent: exec {}: the connection ended without an exit code",
                args.instance_id
            );
            Ok(EXIT_NOT_RUN)
        }
    }
}
