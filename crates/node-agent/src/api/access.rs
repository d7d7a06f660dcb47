//! Who may use the local API, and how its listeners are made.
//!
//! What it owns: the Unix socket (`api.socket`: created in a directory only the agent
//! may write, `0660 root:<api.socket_group>` or `0600`, a stale socket replaced, a live
//! one never), the caller's identity from the connection (`SO_PEERCRED` on the socket,
//! the address on TCP), and one check in front of every route: a request carrying an
//! `Origin` header (a web page) is refused; on the socket, root and members of
//! `api.socket_group` pass and everybody else is refused; on TCP (`api.listen`) only a
//! request with the bearer token from `api.token_file` passes. What it must not do:
//! answer any route itself, or log a token.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::extract::connect_info::Connected;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::Response;
use axum::serve::IncomingStream;
use zeroize::Zeroizing;

/// Who is calling, as the listener saw it.
#[derive(Debug, Clone)]
pub enum Caller {
    /// A peer on the Unix socket, from `SO_PEERCRED`.
    Local {
        /// Its uid.
        uid: u32,
        /// Its primary gid.
        gid: u32,
        /// Its pid (for its supplementary groups), when the kernel gave it.
        pid: Option<i32>,
    },
    /// A peer on the TCP listener.
    Tcp(std::net::SocketAddr),
    /// The peer's identity could not be read (refused).
    Unknown,
}

impl Connected<IncomingStream<'_, tokio::net::UnixListener>> for Caller {
    fn connect_info(stream: IncomingStream<'_, tokio::net::UnixListener>) -> Self {
        match stream.io().peer_cred() {
            Ok(c) => Caller::Local {
                uid: c.uid(),
                gid: c.gid(),
                pid: c.pid(),
            },
            Err(_) => Caller::Unknown,
        }
    }
}

impl Connected<IncomingStream<'_, tokio::net::TcpListener>> for Caller {
    fn connect_info(stream: IncomingStream<'_, tokio::net::TcpListener>) -> Self {
        Caller::Tcp(*stream.remote_addr())
    }
}

/// The rules the check applies.
#[derive(Clone, Default)]
pub struct Access {
    /// `api.socket_group`: its members may use the socket besides root.
    pub group: Option<u32>,
    /// The TCP listener's bearer token (`api.token_file`).
    pub token: Option<Arc<Zeroizing<String>>>,
}

impl Access {
    /// Whether `caller` may make the request whose `Authorization` header is
    /// `authorization`; the error says why not.
    pub fn allows(&self, caller: &Caller, authorization: Option<&str>) -> Result<(), String> {
        match caller {
            Caller::Local { uid, gid, pid } => {
                if *uid == 0 || self.group.is_some_and(|g| g == *gid || in_group(*pid, g)) {
                    return Ok(());
                }
                Err(format!(
                    "uid {uid} may not use the agent's API (root{} only)",
                    self.group
                        .map(|g| format!(" and members of group {g} (api.socket_group)"))
                        .unwrap_or_default()
                ))
            }
            Caller::Tcp(_) => {
                let Some(token) = &self.token else {
                    return Err("the TCP API has no token configured".into());
                };
                let given = authorization.and_then(|a| a.strip_prefix("Bearer "));
                match given {
                    Some(t) if same(t.as_bytes(), token.as_bytes()) => Ok(()),
                    Some(_) => Err("wrong bearer token".into()),
                    None => Err(
                        "a bearer token is required (Authorization: Bearer <api.token_file>)"
                            .into(),
                    ),
                }
            }
            Caller::Unknown => Err("the caller's identity cannot be read".into()),
        }
    }
}

/// Compares two secrets in time independent of where they differ (hand-written: a
/// dozen lines do not need a crate).
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Whether process `pid` has `group` among its supplementary groups (Linux: the
/// `Groups:` line of `/proc/<pid>/status`).
fn in_group(pid: Option<i32>, group: u32) -> bool {
    #[cfg(target_os = "linux")]
    {
        let Some(pid) = pid else { return false };
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .ok()
            .and_then(|s| {
                s.lines().find_map(|l| {
                    l.strip_prefix("Groups:").map(|g| {
                        g.split_whitespace()
                            .any(|x| x.parse::<u32>().ok() == Some(group))
                    })
                })
            })
            .unwrap_or(false)
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = (pid, group);
        false
    }
}

/// The check in front of every route.
pub async fn authorize(
    State(access): State<Access>,
    ConnectInfo(caller): ConnectInfo<Caller>,
    req: Request,
    next: Next,
) -> Response {
    if req.headers().contains_key(header::ORIGIN) {
        return refuse(
            StatusCode::FORBIDDEN,
            "requests from a web page (an Origin header) are refused".into(),
        );
    }
    let authorization = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    match access.allows(&caller, authorization) {
        Ok(()) => next.run(req).await,
        Err(why) if matches!(caller, Caller::Tcp(_)) => refuse(StatusCode::UNAUTHORIZED, why),
        Err(why) => refuse(StatusCode::FORBIDDEN, why),
    }
}

fn refuse(code: StatusCode, message: String) -> Response {
    use axum::response::IntoResponse;
    (code, axum::Json(serde_json::json!({ "error": message }))).into_response()
}

/// `api.socket_group` as a gid: a number, or a group name from the system's group
/// database.
pub fn resolve_group(group: &str) -> Result<u32, String> {
    if let Ok(n) = group.parse::<u32>() {
        return Ok(n);
    }
    match nix::unistd::Group::from_name(group) {
        Ok(Some(g)) => Ok(g.gid.as_raw()),
        Ok(None) => Err(format!("api.socket_group: no group named {group:?}")),
        Err(e) => Err(format!("api.socket_group: cannot look up {group:?}: {e}")),
    }
}

/// Reads the TCP listener's bearer token: a non-empty first line of a file that only
/// its owner (the agent's user) may read.
pub fn read_token(path: &Path) -> Result<Zeroizing<String>, String> {
    let meta =
        std::fs::metadata(path).map_err(|e| format!("api.token_file {}: {e}", path.display()))?;
    if meta.mode() & 0o077 != 0 {
        return Err(format!(
            "api.token_file {}: mode {:o} lets other users read it (chmod 600)",
            path.display(),
            meta.mode() & 0o777
        ));
    }
    if meta.uid() != rustix::process::geteuid().as_raw() {
        return Err(format!(
            "api.token_file {}: owned by uid {}, not the agent's",
            path.display(),
            meta.uid()
        ));
    }
    let text = Zeroizing::new(
        std::fs::read_to_string(path)
            .map_err(|e| format!("api.token_file {}: {e}", path.display()))?,
    );
    let token = Zeroizing::new(text.lines().next().unwrap_or("").trim().to_string());
    if token.len() < 16 {
        return Err(format!(
            "api.token_file {}: the token must be at least 16 characters",
            path.display()
        ));
    }
    Ok(token)
}

/// Binds the API's Unix socket at `path`, for root and `group` (0660) or root alone
/// (0600). Its directory is created (0755) when missing and must be the agent's and
/// writable by nobody else, or another user could put their own socket there. A
/// socket left by an agent that is gone is replaced; one that answers is another
/// agent's, and the start fails. Needs to own the path's directory (root in
/// production).
pub fn bind_socket(path: &Path, group: Option<u32>) -> Result<tokio::net::UnixListener, String> {
    let bad = |what: String| format!("api.socket {}: {what}", path.display());
    let dir: PathBuf = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    if !dir.exists() {
        std::fs::create_dir_all(&dir)
            .and_then(|()| std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)))
            .map_err(|e| bad(format!("cannot create {}: {e}", dir.display())))?;
    }
    let meta = std::fs::metadata(&dir).map_err(|e| bad(format!("{}: {e}", dir.display())))?;
    let me = rustix::process::geteuid().as_raw();
    if meta.uid() != me || meta.mode() & 0o022 != 0 {
        return Err(bad(format!(
            "its directory {} must be owned by the agent (uid {me}) and writable by nobody else (owner {}, mode {:o})",
            dir.display(),
            meta.uid(),
            meta.mode() & 0o777
        )));
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) => {
            use std::os::unix::fs::FileTypeExt;
            if !m.file_type().is_socket() {
                return Err(bad("exists and is not a socket".into()));
            }
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(bad(
                    "another process is serving it (is another agent running with this socket?)"
                        .into(),
                ));
            }
            std::fs::remove_file(path)
                .map_err(|e| bad(format!("cannot remove the stale socket: {e}")))?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(bad(e.to_string())),
    }
    let listener = tokio::net::UnixListener::bind(path).map_err(|e| bad(e.to_string()))?;
    let mode = match group {
        Some(g) => {
            std::os::unix::fs::chown(path, Some(me), Some(g))
                .map_err(|e| bad(format!("chown to group {g}: {e}")))?;
            0o660
        }
        None => 0o600,
    };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| bad(format!("chmod {mode:o}: {e}")))?;
    Ok(listener)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn local(uid: u32, gid: u32) -> Caller {
        Caller::Local {
            uid,
            gid,
            pid: None,
        }
    }

    #[test]
    fn root_and_the_group_pass_the_socket_and_others_are_refused() {
        let a = Access {
            group: Some(4242),
            token: None,
        };
        assert!(a.allows(&local(0, 0), None).is_ok());
        assert!(a.allows(&local(1000, 4242), None).is_ok());
        let e = a.allows(&local(65534, 65534), None).unwrap_err();
        assert!(e.contains("uid 65534") && e.contains("4242"), "{e}");
        assert!(Access::default().allows(&local(1000, 4242), None).is_err());
        assert!(a.allows(&Caller::Unknown, None).is_err());
    }

    #[test]
    fn tcp_needs_the_exact_bearer_token() {
        let a = Access {
            group: None,
            token: Some(Arc::new(Zeroizing::new("0123456789abcdef".into()))),
        };
        let tcp = Caller::Tcp("127.0.0.1:1".parse().unwrap());
        assert!(a.allows(&tcp, Some("Bearer 0123456789abcdef")).is_ok());
        for bad in [
            None,
            Some("Bearer 0123456789abcdeF"),
            Some("0123456789abcdef"),
            Some("Bearer "),
        ] {
            assert!(a.allows(&tcp, bad).is_err(), "{bad:?}");
        }
        // The error never carries the token.
        let e = a.allows(&tcp, Some("Bearer nope")).unwrap_err();
        assert!(!e.contains("0123456789abcdef"), "{e}");
        assert!(Access::default().allows(&tcp, Some("Bearer x")).is_err());
    }

    #[test]
    fn a_token_file_others_can_read_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("token");
        std::fs::write(&f, "0123456789abcdef\n").unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(read_token(&f).unwrap_err().contains("chmod 600"));
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(read_token(&f).unwrap().as_str(), "0123456789abcdef");
        std::fs::write(&f, "short\n").unwrap();
        assert!(read_token(&f).unwrap_err().contains("16 characters"));
    }

    #[tokio::test]
    async fn a_socket_in_a_directory_others_can_write_is_refused_and_a_live_one_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let open = dir.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = bind_socket(&open.join("a.sock"), None).unwrap_err();
        assert!(e.contains("writable by nobody else"), "{e}");
        let sock = dir.path().join("run/a.sock");
        let first = bind_socket(&sock, None).unwrap();
        let mode = std::fs::metadata(&sock).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let e = bind_socket(&sock, None).unwrap_err();
        assert!(e.contains("another process is serving it"), "{e}");
        drop(first);
        // Stale: replaced.
        bind_socket(&sock, Some(0)).unwrap();
        assert_eq!(std::fs::metadata(&sock).unwrap().mode() & 0o777, 0o660);
    }
}
