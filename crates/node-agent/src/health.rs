//! Health probes from the host to an instance address (DESIGN §2, §8): a TCP connect, or
//! an HTTP/1.1 `GET` whose status must be 2xx or 3xx. One probe per call, bounded by a
//! timeout.
//!
//! The contract: this module only probes. Intervals, grace periods and thresholds belong
//! to the instance actor; it must not retry or sleep.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Most bytes of a response read to find the status line.
const MAX_HEAD: usize = 8192;

/// One probe of `check` against `addr` (the kind, port, path and timeout come from the
/// spec; a timeout below 1 s counts as 1 s).
pub async fn probe(addr: IpAddr, check: &crate::spec::HealthSpec) -> Result<(), String> {
    let timeout = Duration::from_secs(check.timeout_seconds.max(1));
    match check.kind {
        crate::spec::HealthKind::Tcp => probe_tcp(addr, check.port, timeout).await,
        crate::spec::HealthKind::Http => {
            let path = check.path.as_deref().unwrap_or("/");
            probe_http(addr, check.port, path, timeout).await
        }
    }
}

/// A TCP connect to `addr:port` within `timeout`.
pub async fn probe_tcp(addr: IpAddr, port: u16, timeout: Duration) -> Result<(), String> {
    let target = SocketAddr::new(addr, port);
    match tokio::time::timeout(timeout, TcpStream::connect(target)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(format!("tcp connect to {target}: {e}")),
        Err(_) => Err(format!(
            "tcp connect to {target}: no answer within {timeout:?}"
        )),
    }
}

/// An HTTP `GET path` to `addr:port` within `timeout`; passes on a 2xx or 3xx status.
pub async fn probe_http(
    addr: IpAddr,
    port: u16,
    path: &str,
    timeout: Duration,
) -> Result<(), String> {
    let target = SocketAddr::new(addr, port);
    let path = if path.starts_with('/') { path } else { "/" };
    let what = format!("http GET {path} on {target}");
    let fut = async {
        let mut s = TcpStream::connect(target)
            .await
            .map_err(|e| format!("{what}: connect: {e}"))?;
        let host = match addr {
            IpAddr::V6(a) => format!("[{a}]"),
            IpAddr::V4(a) => a.to_string(),
        };
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: plfm-node-agent-health\r\nConnection: close\r\n\r\n"
        );
        s.write_all(req.as_bytes())
            .await
            .map_err(|e| format!("{what}: send: {e}"))?;
        let mut buf = Vec::with_capacity(256);
        let mut chunk = [0u8; 1024];
        while !buf.windows(2).any(|w| w == b"\r\n") && buf.len() < MAX_HEAD {
            let n = s
                .read(&mut chunk)
                .await
                .map_err(|e| format!("{what}: read: {e}"))?;
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        let code = status_code(&buf).ok_or_else(|| format!("{what}: no HTTP status line"))?;
        if (200..400).contains(&code) {
            Ok(())
        } else {
            Err(format!("{what}: status {code}"))
        }
    };
    match tokio::time::timeout(timeout, fut).await {
        Ok(r) => r,
        Err(_) => Err(format!("{what}: no answer within {timeout:?}")),
    }
}

/// The status code of an HTTP/1.x status line at the start of `head`.
fn status_code(head: &[u8]) -> Option<u16> {
    let line = head.split(|b| *b == b'\n').next()?;
    let line = std::str::from_utf8(line).ok()?;
    let mut parts = line.split_whitespace();
    if !parts.next()?.starts_with("HTTP/1.") {
        return None;
    }
    parts.next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    #[test]
    fn status_lines_parse() {
        assert_eq!(status_code(b"HTTP/1.1 204 No Content\r\n"), Some(204));
        assert_eq!(status_code(b"HTTP/1.0 302 Found\r\n"), Some(302));
        assert_eq!(status_code(b"SSH-2.0\r\n"), None);
    }

    async fn serve_once(response: &'static str) -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            if let Ok((mut s, _)) = l.accept().await {
                let mut b = [0u8; 1024];
                let _ = s.read(&mut b).await;
                let _ = s.write_all(response.as_bytes()).await;
            }
        });
        addr
    }

    #[tokio::test]
    async fn http_probe_passes_on_2xx_and_fails_on_5xx() {
        let a = serve_once("HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n").await;
        probe_http(a.ip(), a.port(), "/", Duration::from_secs(2))
            .await
            .unwrap();
        let a = serve_once("HTTP/1.1 503 Unavailable\r\n\r\n").await;
        let e = probe_http(a.ip(), a.port(), "/h", Duration::from_secs(2))
            .await
            .unwrap_err();
        assert!(e.contains("status 503"), "{e}");
    }

    #[tokio::test]
    async fn tcp_probe_fails_on_a_closed_port() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        probe_tcp("127.0.0.1".parse().unwrap(), port, Duration::from_secs(2))
            .await
            .unwrap();
        drop(l);
        assert!(
            probe_tcp("127.0.0.1".parse().unwrap(), port, Duration::from_secs(2))
                .await
                .is_err()
        );
    }
}
