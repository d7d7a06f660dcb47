//! `plfm-node-agent enroll`: registers this host with the control plane
//! (`POST /v1/nodes/enroll`, DESIGN §3) and persists the node id and overlay address it
//! answers ([`crate::identity`]).
//!
//! The contract: enrolling is done once per host. An enrolled node (an identity file
//! exists) sends nothing and changes nothing. The enrollment token is a single-use
//! secret: its file must not be readable by group or others, and the token appears in
//! no log line, error or output (an answer that quotes it is redacted). The request has
//! a timeout, and the same transport rules as the daemon's client (https with
//! `control_plane.ca_file`, plain http to loopback only). This module never writes the
//! identity unless the control plane accepted the enrollment.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::config::Config;
use crate::identity::{self, Identity};

/// `plfm-node-agent enroll` arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct EnrollArgs {
    /// Base URL of the control plane (e.g. https://cp.example:8443). `https` uses
    /// `[control_plane] ca_file` (and the client certificate, if configured); plain
    /// `http` is accepted only to a loopback host.
    #[arg(long)]
    pub url: String,
    /// File holding the single-use enrollment token from the control plane. It must be
    /// readable by its owner only (mode 0600 or stricter); the token is never printed
    /// or logged.
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// Region of this host (overrides `[node] region`).
    #[arg(long)]
    pub region: Option<String>,
    /// A label `key=value` (repeatable; added to `[node] labels`).
    #[arg(long = "label", value_name = "KEY=VALUE")]
    pub labels: Vec<String>,
    /// Public IPv6 address (overrides `[node] public_ipv6`; default: the source address
    /// of the route to the IPv6 internet, if global).
    #[arg(long)]
    pub public_ipv6: Option<Ipv6Addr>,
    /// Public IPv4 address (overrides `[node] public_ipv4`; default: the source address
    /// of the route to the IPv4 internet, if public).
    #[arg(long)]
    pub public_ipv4: Option<Ipv4Addr>,
    /// Give up on the control plane's answer after this many seconds.
    #[arg(long, default_value_t = 30)]
    pub timeout_secs: u64,
}

/// `POST /v1/nodes/enroll` body (DESIGN §3).
#[derive(Serialize)]
struct EnrollRequest<'a> {
    hostname: String,
    region: String,
    wireguard_public_key: String,
    agent_mtls_subject: String,
    public_ipv6: Ipv6Addr,
    #[serde(skip_serializing_if = "Option::is_none")]
    public_ipv4: Option<Ipv4Addr>,
    cpu_cores: i32,
    memory_bytes: i64,
    labels: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    enrollment_token: Option<&'a str>,
}

/// The node record the control plane answers (fields the agent uses).
#[derive(Deserialize)]
struct NodeRecord {
    id: String,
    #[serde(default)]
    overlay_ipv6: Option<String>,
}

/// What `enroll` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Enrolled {
    /// The node enrolled now.
    New(Identity),
    /// It had enrolled before; nothing was sent.
    Already(Identity),
}

/// Runs the enrollment; returns what happened (the caller prints it).
pub async fn run(config: &Config, args: &EnrollArgs) -> anyhow::Result<Enrolled> {
    if let Some(existing) = identity::load(&config.data_dir)? {
        return Ok(Enrolled::Already(existing));
    }
    let url = check_url(&args.url)?;
    let token = args
        .token_file
        .as_deref()
        .map(read_token_file)
        .transpose()?;
    let region = args
        .region
        .clone()
        .or_else(|| config.node.region.clone())
        .filter(|r| !r.trim().is_empty())
        .ok_or_else(|| {
            anyhow::anyhow!("no region: set [node] region in the config or pass --region")
        })?;
    let mut labels = config.node.labels.clone();
    for l in &args.labels {
        let (k, v) = l
            .split_once('=')
            .ok_or_else(|| anyhow::anyhow!("--label {l:?}: expected KEY=VALUE"))?;
        labels.insert(k.to_string(), v.to_string());
    }
    let public_ipv6 = args
        .public_ipv6
        .or(config.node.public_ipv6)
        .or_else(detect_public_ipv6)
        .ok_or_else(|| {
            anyhow::anyhow!(
                "no public IPv6 address: none configured ([node] public_ipv6 or --public-ipv6) and the host's route to the IPv6 internet has no global source address"
            )
        })?;
    let public_ipv4 = args
        .public_ipv4
        .or(config.node.public_ipv4)
        .or_else(detect_public_ipv4);
    // The data dir's lock: no enrollment beside a running agent on the same state.
    let _lock = crate::agent::lock_data_dir(&config.data_dir)?;
    if let Some(existing) = identity::load(&config.data_dir)? {
        return Ok(Enrolled::Already(existing));
    }
    let wg = match &config.overlay.private_key_file {
        None => identity::ensure_wireguard_key(&config.data_dir)?,
        Some(path) => identity::ensure_wireguard_key_at(path)?,
    };
    let subject = match &config.control_plane.client_cert_file {
        Some(f) => cert_subject(f)?,
        None => String::new(),
    };
    let body = EnrollRequest {
        hostname: hostname()?,
        region,
        wireguard_public_key: wg.public_base64(),
        agent_mtls_subject: subject,
        public_ipv6,
        public_ipv4,
        cpu_cores: i32::try_from(
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
        )
        .unwrap_or(i32::MAX),
        memory_bytes: crate::control_plane::http::total_memory_bytes(),
        labels,
        enrollment_token: token.as_ref().map(|t| t.as_str()),
    };
    let client = build_client(config, &url, Duration::from_secs(args.timeout_secs.max(1)))?;
    let endpoint = format!("{}/v1/nodes/enroll", url.as_str().trim_end_matches('/'));
    let redact = |s: String| match &token {
        Some(t) => s.replace(t.as_str(), "<token>"),
        None => s,
    };
    let resp = client
        .post(&endpoint)
        .json(&body)
        .send()
        .await
        .map_err(|e| {
            anyhow::anyhow!(redact(format!(
                "POST {endpoint}: {}",
                crate::control_plane::http::error_chain(&e)
            )))
        })?;
    let code = resp.status();
    let raw = resp.bytes().await.map_err(|e| {
        anyhow::anyhow!(redact(format!(
            "POST {endpoint}: reading the answer: {}",
            crate::control_plane::http::error_chain(&e)
        )))
    })?;
    if !code.is_success() {
        let text = String::from_utf8_lossy(&raw[..raw.len().min(300)]).replace(['\n', '\r'], " ");
        anyhow::bail!(redact(format!(
            "the control plane refused the enrollment: POST {endpoint}: HTTP {}: {text}",
            code.as_u16()
        )));
    }
    let record: NodeRecord = serde_json::from_slice(&raw).map_err(|e| {
        anyhow::anyhow!(
            "POST {endpoint}: the answer is not a node record ({{id, overlay_ipv6, …}}): {e}"
        )
    })?;
    crate::spec::InstanceId::parse(&record.id)
        .map_err(|e| anyhow::anyhow!("POST {endpoint}: the answer's node id: {e}"))?;
    if let Some(o) = &record.overlay_ipv6 {
        let addr = o.split('/').next().unwrap_or(o);
        addr.parse::<Ipv6Addr>().map_err(|_| {
            anyhow::anyhow!("POST {endpoint}: overlay_ipv6 {o:?} is not an IPv6 address")
        })?;
    }
    let id = Identity {
        node_id: record.id,
        overlay_ipv6: record.overlay_ipv6,
        control_plane_url: url.as_str().trim_end_matches('/').to_string(),
        enrolled_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
    };
    identity::store(&config.data_dir, &id)?;
    Ok(Enrolled::New(id))
}

/// The operator's one-line account of [`run`]'s result.
pub fn describe(result: &Enrolled, data_dir: &Path) -> String {
    let path = identity::identity_path(data_dir);
    match result {
        Enrolled::New(i) => format!(
            "enrolled with {} as node {} (overlay {}); identity saved in {}",
            i.control_plane_url,
            i.node_id,
            i.overlay_ipv6.as_deref().unwrap_or("none"),
            path.display()
        ),
        Enrolled::Already(i) => format!(
            "already enrolled as node {} with {} on {} ({}); nothing sent, nothing changed",
            i.node_id,
            i.control_plane_url,
            i.enrolled_at,
            path.display()
        ),
    }
}

fn check_url(raw: &str) -> anyhow::Result<url::Url> {
    let url = url::Url::parse(raw).map_err(|e| anyhow::anyhow!("--url {raw:?}: {e}"))?;
    match url.scheme() {
        "https" => {}
        "http" if crate::config::is_loopback_host(&url) => {}
        "http" => anyhow::bail!(
            "--url {raw:?}: plain http is allowed only to a loopback host (the token and the node's keys would cross the network in clear text)"
        ),
        other => anyhow::bail!("--url {raw:?}: scheme {other:?} is not http or https"),
    }
    Ok(url)
}

/// Reads the token file, refusing one that group or others may read (named with its
/// mode). The token is returned zeroized-on-drop and never formatted into an error.
pub fn read_token_file(path: &Path) -> anyhow::Result<Zeroizing<String>> {
    let meta = std::fs::metadata(path)
        .map_err(|e| anyhow::anyhow!("token file {}: {e}", path.display()))?;
    let mode = meta.mode() & 0o7777;
    if mode & 0o077 != 0 {
        anyhow::bail!(
            "token file {}: mode {mode:04o} lets group or others read it; a token is a secret: chmod 600 it (and get a new token if others may have read this one)",
            path.display()
        );
    }
    let raw = Zeroizing::new(
        std::fs::read(path).map_err(|e| anyhow::anyhow!("token file {}: {e}", path.display()))?,
    );
    let text = std::str::from_utf8(&raw)
        .map_err(|_| anyhow::anyhow!("token file {}: not UTF-8 text", path.display()))?;
    let token = Zeroizing::new(text.trim().to_string());
    if token.is_empty() {
        anyhow::bail!("token file {}: empty", path.display());
    }
    Ok(token)
}

/// The subject of the client certificate (the first in the file), as a string such
/// as `CN=node-1, O=plfm`.
pub fn cert_subject(path: &Path) -> anyhow::Result<String> {
    use rustls_pki_types::pem::PemObject;
    let der = rustls_pki_types::CertificateDer::from_pem_file(path)
        .map_err(|e| anyhow::anyhow!("control_plane.client_cert_file {}: {e}", path.display()))?;
    let (_, cert) = x509_parser::parse_x509_certificate(&der)
        .map_err(|e| anyhow::anyhow!("control_plane.client_cert_file {}: {e}", path.display()))?;
    Ok(cert.subject().to_string())
}

fn build_client(
    config: &Config,
    url: &url::Url,
    timeout: Duration,
) -> anyhow::Result<reqwest::Client> {
    crate::control_plane::http::ensure_crypto_provider();
    let mut b = reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(timeout.min(Duration::from_secs(10)))
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy();
    if url.scheme() == "https" {
        let files = crate::control_plane::http::TlsFiles::from_config(&config.control_plane);
        let tls = files.load()?.ok_or_else(|| {
            anyhow::anyhow!(
                "control_plane.ca_file: required to enroll over https (the CA that signs the control plane's certificate)"
            )
        })?;
        b = b.tls_backend_preconfigured(tls);
    }
    b.build().map_err(|e| {
        anyhow::anyhow!(
            "HTTP client: {}",
            crate::control_plane::http::error_chain(&e)
        )
    })
}

fn hostname() -> anyhow::Result<String> {
    let mut buf = [0u8; 256];
    // SAFETY: `buf` is a valid writable buffer of the length passed; gethostname writes
    // at most that many bytes and we read only up to the first NUL within it.
    let r = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if r != 0 {
        anyhow::bail!("hostname: {}", std::io::Error::last_os_error());
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    let name = String::from_utf8_lossy(&buf[..end]).into_owned();
    if name.is_empty() {
        anyhow::bail!("hostname: the host has none");
    }
    Ok(name)
}

/// The source address the kernel picks for a route to `target`: a UDP `connect` only
/// selects the route and sends nothing.
fn route_source(
    target: std::net::SocketAddr,
    bind: std::net::SocketAddr,
) -> Option<std::net::IpAddr> {
    let s = std::net::UdpSocket::bind(bind).ok()?;
    s.connect(target).ok()?;
    s.local_addr().ok().map(|a| a.ip())
}

fn detect_public_ipv6() -> Option<Ipv6Addr> {
    let target = "[2001:4860:4860::8888]:53".parse().ok()?;
    match route_source(target, "[::]:0".parse().ok()?)? {
        std::net::IpAddr::V6(a) if is_global_v6(a) => Some(a),
        _ => None,
    }
}

fn detect_public_ipv4() -> Option<Ipv4Addr> {
    let target = "8.8.8.8:53".parse().ok()?;
    match route_source(target, "0.0.0.0:0".parse().ok()?)? {
        std::net::IpAddr::V4(a) if is_public_v4(a) => Some(a),
        _ => None,
    }
}

fn is_global_v6(a: Ipv6Addr) -> bool {
    let s = a.segments();
    let unique_local = (s[0] & 0xfe00) == 0xfc00; // fc00::/7
    let link_local = (s[0] & 0xffc0) == 0xfe80; // fe80::/10
    let documentation = s[0] == 0x2001 && s[1] == 0x0db8; // 2001:db8::/32
    !(a.is_loopback()
        || a.is_unspecified()
        || a.is_multicast()
        || unique_local
        || link_local
        || documentation)
}

fn is_public_v4(a: Ipv4Addr) -> bool {
    let o = a.octets();
    !(a.is_private()
        || a.is_loopback()
        || a.is_link_local()
        || a.is_unspecified()
        || a.is_broadcast()
        || a.is_multicast()
        || (o[0] == 100 && (o[1] & 0xc0) == 64)) // shared address space 100.64/10
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_global_addresses_count_as_public() {
        assert!(is_global_v6("2a01:4f8::1".parse().unwrap()));
        for a in ["::1", "fd00::1", "fe80::1", "2001:db8::1", "::"] {
            assert!(!is_global_v6(a.parse().unwrap()), "{a}");
        }
        assert!(is_public_v4("203.0.114.1".parse().unwrap()));
        for a in [
            "10.0.0.1",
            "192.168.1.1",
            "127.0.0.1",
            "169.254.1.1",
            "100.64.0.1",
        ] {
            assert!(!is_public_v4(a.parse().unwrap()), "{a}");
        }
    }

    #[test]
    fn a_token_file_others_can_read_is_refused_naming_file_and_mode() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let f = tmp.path().join("token");
        std::fs::write(&f, "s3cret-token\n").unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o640)).unwrap();
        let e = read_token_file(&f).unwrap_err().to_string();
        assert!(
            e.contains(&f.display().to_string()) && e.contains("0640"),
            "{e}"
        );
        assert!(!e.contains("s3cret"), "{e}");
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(read_token_file(&f).unwrap().as_str(), "s3cret-token");
    }
}
