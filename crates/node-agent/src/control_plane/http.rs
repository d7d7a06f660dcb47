//! Connected mode: the plfm node API v1 client (DESIGN §3) and the loops that use it:
//! plan polling, status delivery, heartbeats, secrets and workload logs.
//!
//! The contract: every request has a timeout and is counted by endpoint and outcome;
//! nothing here blocks the agent while the control plane is down. Plans are applied in
//! `cursor_event_id` order and persisted before they are applied, so after a restart
//! the agent runs the last applied plan and never guesses. Reports leave the outbox only
//! after a 2xx (or a 4xx that will never be accepted, which is logged and counted).
//! Secret material is never logged; errors name the version, never a value.
//! Plain `http` is used only to a loopback host (config validation and
//! [`ControlPlaneClient::new`] refuse anything else). An answer's body is read as a
//! stream and the request fails as soon as it exceeds the client's limit
//! ([`MAX_BODY_BYTES`] unless [`ControlPlaneClient::with_max_body_bytes`]), so at most
//! the limit plus one chunk is ever held, whatever Content-Length said.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use reqwest::StatusCode;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use tokio::sync::{watch, Notify};
use zeroize::Zeroizing;

use crate::clock::SharedClock;
use crate::config::ControlPlaneConfig;
use crate::logs::{LogDestination, LogEntry};
use crate::metrics::{EndpointLabel, Metrics, RequestLabels};
use crate::secrets::{SecretMaterial, SecretsError};
use crate::spec::{parse_plan, Plan};
use crate::state::{OutboxRow, Store};
use crate::status::outbox::{Delivery, ReportSink};
use crate::supervisor::Supervisor;

/// Largest response body read (plans of thousands of instances fit easily). The body is
/// read as a stream and the request fails as soon as more arrived, whatever
/// Content-Length said (or without one), so at most this plus one chunk is held.
pub const MAX_BODY_BYTES: usize = 64 * 1024 * 1024;
/// Reports of different instances sent at the same time.
pub const DELIVERY_CONCURRENCY: usize = 32;

/// A control-plane failure, naming the endpoint and the cause.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CpError {
    /// TLS files or client set-up.
    #[error("{0}")]
    Setup(String),
    /// No answer: connection, TLS or timeout (the message carries the whole cause chain,
    /// e.g. the certificate problem).
    #[error("{endpoint}: {message}")]
    Transport {
        /// Endpoint.
        endpoint: &'static str,
        /// Cause chain.
        message: String,
    },
    /// A non-2xx answer.
    #[error("{endpoint}: HTTP {code}: {body}")]
    Status {
        /// Endpoint.
        endpoint: &'static str,
        /// Status code.
        code: u16,
        /// Start of the body.
        body: String,
    },
    /// An answer whose body is larger than the client's limit (read no further).
    #[error("{endpoint}: answer larger than the limit of {limit} bytes")]
    TooLarge {
        /// Endpoint.
        endpoint: &'static str,
        /// The limit, in bytes.
        limit: usize,
    },
    /// A 2xx answer that does not decode.
    #[error("{endpoint}: {message}")]
    Decode {
        /// Endpoint.
        endpoint: &'static str,
        /// What is wrong.
        message: String,
    },
}

/// Joins an error and its sources into one line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s
}

/// Installs ring as the process's TLS crypto provider (idempotent).
pub fn ensure_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// The TLS files of the config.
#[derive(Debug, Clone, Default)]
pub struct TlsFiles {
    /// CA bundle (PEM).
    pub ca: Option<PathBuf>,
    /// Client certificate chain (PEM).
    pub cert: Option<PathBuf>,
    /// Client key (PEM).
    pub key: Option<PathBuf>,
}

impl TlsFiles {
    /// The files named in `[control_plane]`.
    pub fn from_config(cp: &ControlPlaneConfig) -> TlsFiles {
        TlsFiles {
            ca: cp.ca_file.clone(),
            cert: cp.client_cert_file.clone(),
            key: cp.client_key_file.clone(),
        }
    }

    /// Reads and parses the files into a rustls client config (`None` without a CA).
    pub fn load(&self) -> Result<Option<rustls::ClientConfig>, CpError> {
        use rustls_pki_types::pem::PemObject;
        use rustls_pki_types::{CertificateDer, PrivateKeyDer};
        let Some(ca) = &self.ca else {
            return Ok(None);
        };
        let setup = |what: &str, p: &Path, e: &dyn std::fmt::Display| {
            CpError::Setup(format!("control_plane.{what} {}: {e}", p.display()))
        };
        let mut roots = rustls::RootCertStore::empty();
        let certs = CertificateDer::pem_file_iter(ca).map_err(|e| setup("ca_file", ca, &e))?;
        for c in certs {
            let c = c.map_err(|e| setup("ca_file", ca, &e))?;
            roots.add(c).map_err(|e| setup("ca_file", ca, &e))?;
        }
        if roots.is_empty() {
            return Err(setup("ca_file", ca, &"contains no certificate"));
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| CpError::Setup(format!("TLS: {e}")))?
            .with_root_certificates(roots);
        let config = match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => {
                let chain = CertificateDer::pem_file_iter(cert)
                    .map_err(|e| setup("client_cert_file", cert, &e))?
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| setup("client_cert_file", cert, &e))?;
                if chain.is_empty() {
                    return Err(setup("client_cert_file", cert, &"contains no certificate"));
                }
                // A PEM block that is not a certificate is the certificate file's fault;
                // rustls would only notice it when matching the key.
                for c in &chain {
                    x509_parser::parse_x509_certificate(c).map_err(|e| {
                        setup(
                            "client_cert_file",
                            cert,
                            &format!("not an X.509 certificate: {e}"),
                        )
                    })?;
                }
                let key_der = PrivateKeyDer::from_pem_file(key)
                    .map_err(|e| setup("client_key_file", key, &e))?;
                builder
                    .with_client_auth_cert(chain, key_der)
                    .map_err(|e| setup("client_key_file", key, &e))?
            }
            _ => builder.with_no_client_auth(),
        };
        Ok(Some(config))
    }
}

/// The agent's HTTP client with `tls` (none: plain http to loopback).
fn build_http(
    tls: Option<rustls::ClientConfig>,
    request_timeout_ms: u64,
) -> Result<reqwest::Client, CpError> {
    let mut b = reqwest::Client::builder()
        .timeout(Duration::from_millis(request_timeout_ms))
        .connect_timeout(Duration::from_millis(request_timeout_ms.min(5000)))
        .pool_max_idle_per_host(DELIVERY_CONCURRENCY)
        // A redirect is an error: followed, it could lead to a clear-text or other
        // host that `control_plane.url`'s checks never saw.
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy();
    if let Some(tls) = tls {
        b = b.tls_backend_preconfigured(tls);
    }
    b.build()
        .map_err(|e| CpError::Setup(format!("HTTP client: {}", error_chain(&e))))
}

/// Reads a bearer token file (trimmed, must not be empty).
pub fn read_token(path: &Path) -> Result<Zeroizing<String>, CpError> {
    let raw = Zeroizing::new(std::fs::read_to_string(path).map_err(|e| {
        CpError::Setup(format!("control_plane.token_file {}: {e}", path.display()))
    })?);
    let t = Zeroizing::new(raw.trim().to_string());
    if t.is_empty() {
        return Err(CpError::Setup(format!(
            "control_plane.token_file {}: empty",
            path.display()
        )));
    }
    Ok(t)
}

/// Answer to a status report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Posted {
    /// 2xx.
    Accepted,
    /// 4xx other than 408/429: it will never be accepted.
    Refused(u16, String),
}

/// `POST …/heartbeat` body.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// Node.
    pub node_id: String,
    /// `active`, `draining` or `degraded`.
    pub state: String,
    /// Whole cores not reserved by instances (rounded down: plfm's node API types it
    /// `i32` and answers 422 to a float).
    pub available_cpu_cores: i32,
    /// Memory not reserved by instances.
    pub available_memory_bytes: i64,
    /// Instances assigned and not stopped (`i32` in plfm's node API).
    pub instance_count: i32,
    /// Reports waiting for delivery.
    pub outbox_depth: i64,
    /// Agent version.
    pub agent_version: String,
    /// The node's WireGuard public key (base64), a heartbeat extra of DESIGN §3.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wireguard_public_key: Option<String>,
    /// Releases of the guest kernels this node keeps (agent-built artifacts; empty when
    /// the operator configures the initramfs).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub kernel_versions: Vec<String>,
    /// Guest handshake versions the node's guest init speaks.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub guest_init_protocols: Vec<u32>,
    /// The overlay's peers and oldest handshake, a heartbeat extra of DESIGN §3.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overlay: Option<crate::overlay::status::HeartbeatOverlay>,
}

/// What the heartbeat says of the node's guest artifacts.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GuestAdvert {
    /// See [`Heartbeat::kernel_versions`].
    pub kernel_versions: Vec<String>,
    /// See [`Heartbeat::guest_init_protocols`].
    pub guest_init_protocols: Vec<u32>,
}

/// `POST …/heartbeat` answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HeartbeatAnswer {
    /// Accepted.
    #[serde(default)]
    pub accepted: bool,
    /// When to send the next one.
    #[serde(default)]
    pub next_heartbeat_secs: Option<u64>,
}

#[derive(Deserialize)]
struct SecretBundle {
    version_id: String,
    #[serde(default)]
    format: Option<String>,
    #[serde(default)]
    data_hash: Option<String>,
    data: Zeroizing<String>,
}

/// The node API v1 client.
///
/// Its TLS material and token can change while it runs ([`super::reload`]): the HTTP
/// client is swapped atomically, so a request uses the client current when it was
/// built and finishes on it, and the next one connects with the new material.
pub struct ControlPlaneClient {
    http: arc_swap::ArcSwap<reqwest::Client>,
    base: String,
    node_id: String,
    token: arc_swap::ArcSwapOption<Zeroizing<String>>,
    request_timeout_ms: u64,
    files: TlsFiles,
    token_file: Option<PathBuf>,
    pub(crate) reload: Arc<super::reload::ReloadStatus>,
    metrics: Arc<Metrics>,
    refusals: Arc<Refusals>,
    max_body_bytes: usize,
    wireguard_public_key: Option<String>,
    overlay: Option<Arc<crate::overlay::status::OverlayHandle>>,
}

/// The control plane's latest refusal (a 4xx answer) of one endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refusal {
    /// `plan`, `status`, `heartbeat`, `logs`, `secrets` or `overlay`.
    pub endpoint: String,
    /// HTTP status code of the latest refusal.
    pub code: u16,
    /// Start of the latest answer's body (one line).
    pub message: String,
    /// When the endpoint started refusing (RFC 3339).
    pub since: String,
    /// Refusals since the endpoint last answered 2xx.
    pub count: u64,
}

/// Which endpoints the control plane currently refuses: set on a 4xx answer, cleared
/// by the next 2xx of the same endpoint. Shown by `/healthz` and `status`, so an agent
/// whose heartbeats or reports are rejected (a contract mismatch, a revoked token) is
/// visible beyond a log line.
#[derive(Debug, Default)]
pub struct Refusals {
    by_endpoint: std::sync::Mutex<BTreeMap<&'static str, Refusal>>,
}

impl Refusals {
    fn record(&self, endpoint: &'static str, code: u16, body: &[u8]) {
        let mut m = self.by_endpoint.lock().unwrap_or_else(|e| e.into_inner());
        if (200..300).contains(&code) {
            m.remove(endpoint);
            return;
        }
        if !(400..500).contains(&code) {
            return;
        }
        let message =
            String::from_utf8_lossy(&body[..body.len().min(300)]).replace(['\n', '\r'], " ");
        let e = m.entry(endpoint).or_insert_with(|| Refusal {
            endpoint: endpoint.to_string(),
            code,
            message: String::new(),
            since: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            count: 0,
        });
        e.code = code;
        e.message = message;
        e.count += 1;
    }

    /// The endpoints refused right now, by name.
    pub fn current(&self) -> Vec<Refusal> {
        let m = self.by_endpoint.lock().unwrap_or_else(|e| e.into_inner());
        m.values().cloned().collect()
    }
}

impl ControlPlaneClient {
    /// A client for `[control_plane]` (TLS, token and timeouts from the config).
    pub fn new(
        cp: &ControlPlaneConfig,
        node_id: &str,
        metrics: Arc<Metrics>,
    ) -> Result<Self, CpError> {
        ensure_crypto_provider();
        let url = cp
            .url
            .as_deref()
            .ok_or_else(|| CpError::Setup("control_plane.url is required".into()))?;
        // Config validation refuses this too; checked again here because a
        // `ControlPlaneConfig` can be built without it.
        let parsed = url::Url::parse(url)
            .map_err(|e| CpError::Setup(format!("control_plane.url {url:?}: {e}")))?;
        if parsed.scheme() == "http" && !crate::config::is_loopback_host(&parsed) {
            return Err(CpError::Setup(format!(
                "control_plane.url {url:?}: plain http is allowed only to a loopback host"
            )));
        }
        let files = TlsFiles::from_config(cp);
        let tls = files.load()?;
        let token = cp.token_file.as_deref().map(read_token).transpose()?;
        let http = build_http(tls, cp.request_timeout_ms)?;
        let reload = Arc::new(super::reload::ReloadStatus::default());
        if let Some(cert) = &files.cert {
            // Parsed already by `load`; the expiry is what is new here.
            match super::reload::cert_not_after(cert) {
                Ok(info) => reload.set_cert(info, &metrics),
                Err(e) => {
                    tracing::warn!(file = %cert.display(), error = %e, "cannot read the client certificate's expiry")
                }
            }
        }
        Ok(ControlPlaneClient {
            http: arc_swap::ArcSwap::from_pointee(http),
            base: url.trim_end_matches('/').to_string(),
            node_id: node_id.to_string(),
            token: arc_swap::ArcSwapOption::from(token.map(Arc::new)),
            request_timeout_ms: cp.request_timeout_ms,
            files,
            token_file: cp.token_file.clone(),
            reload,
            metrics,
            refusals: Arc::default(),
            max_body_bytes: MAX_BODY_BYTES,
            wireguard_public_key: None,
            overlay: None,
        })
    }

    /// The same client, advertising the node's WireGuard public key in heartbeats.
    pub fn with_wireguard_public_key(mut self, key: Option<String>) -> Self {
        self.wireguard_public_key = key;
        self
    }

    /// The same client, reporting the overlay's peers and handshakes in heartbeats.
    pub fn with_overlay(mut self, overlay: Arc<crate::overlay::status::OverlayHandle>) -> Self {
        self.overlay = Some(overlay);
        self
    }

    /// The HTTP client in use now (new requests are built on it).
    fn http(&self) -> Arc<reqwest::Client> {
        self.http.load_full()
    }

    /// The files the client's material comes from: the TLS files and the token file.
    pub(crate) fn material_files(&self) -> (&TlsFiles, Option<&Path>) {
        (&self.files, self.token_file.as_deref())
    }

    /// Swaps in a new TLS configuration and token: requests built from now on use them;
    /// requests in flight finish on the previous client.
    pub(crate) fn install(
        &self,
        tls: Option<rustls::ClientConfig>,
        token: Option<Zeroizing<String>>,
    ) -> Result<(), CpError> {
        let http = build_http(tls, self.request_timeout_ms)?;
        self.http.store(Arc::new(http));
        self.token.store(token.map(Arc::new));
        Ok(())
    }

    /// What the reloader last did (shown by `status` and `/healthz`).
    pub fn reload_status(&self) -> Arc<super::reload::ReloadStatus> {
        self.reload.clone()
    }

    /// The metrics registry's handle (for the reloader).
    pub(crate) fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The same client with another answer-size limit than [`MAX_BODY_BYTES`] (tests
    /// use a small one so that they need not send 64 MiB).
    pub fn with_max_body_bytes(mut self, limit: usize) -> Self {
        self.max_body_bytes = limit;
        self
    }

    /// The endpoints the control plane refuses right now.
    pub fn refusals(&self) -> Arc<Refusals> {
        self.refusals.clone()
    }

    fn url(&self, tail: &str) -> String {
        format!("{}/v1/nodes/{}/{tail}", self.base, self.node_id)
    }

    async fn send(
        &self,
        endpoint: &'static str,
        mut req: reqwest::RequestBuilder,
    ) -> Result<(StatusCode, Vec<u8>), CpError> {
        if let Some(t) = self.token.load_full() {
            req = req.bearer_auth(t.as_str());
        }
        let started = Instant::now();
        let result = async {
            let transport = |e: reqwest::Error| CpError::Transport {
                endpoint,
                message: error_chain(&e),
            };
            let mut resp = req.send().await.map_err(transport)?;
            let code = resp.status();
            let limit = self.max_body_bytes;
            let too_large = CpError::TooLarge { endpoint, limit };
            // Content-Length is only a hint: refused early when it is too big, and then
            // the body is counted as it arrives (chunked, or a lying length).
            let announced = resp.content_length().unwrap_or(0);
            if announced > limit as u64 {
                return Err(too_large);
            }
            let mut body = Vec::with_capacity(announced as usize);
            while let Some(chunk) = resp.chunk().await.map_err(transport)? {
                if chunk.len() > limit - body.len() {
                    // Dropping the response closes the connection: nothing more is read.
                    return Err(too_large);
                }
                body.extend_from_slice(&chunk);
            }
            Ok((code, body))
        }
        .await;
        self.metrics
            .cp_latency
            .get_or_create(&EndpointLabel { endpoint })
            .observe(started.elapsed().as_secs_f64());
        if let Ok((c, body)) = &result {
            // A 404 of the overlay endpoint is an answer (the control plane has no
            // overlay service: the overlay is off), not a refusal of the agent.
            let overlay_off = endpoint == "overlay" && *c == StatusCode::NOT_FOUND;
            if !overlay_off {
                self.refusals.record(endpoint, c.as_u16(), body);
            }
        }
        let outcome = match &result {
            Ok((c, _)) if c.is_success() => "ok",
            Ok((c, _)) if c.is_client_error() => "http_4xx",
            Ok(_) => "http_5xx",
            Err(_) => "error",
        };
        self.metrics
            .cp_requests
            .get_or_create(&RequestLabels { endpoint, outcome })
            .inc();
        result
    }

    fn status_error(endpoint: &'static str, code: StatusCode, body: &[u8]) -> CpError {
        let text = String::from_utf8_lossy(&body[..body.len().min(200)]).replace(['\n', '\r'], " ");
        CpError::Status {
            endpoint,
            code: code.as_u16(),
            body: text,
        }
    }

    /// `GET /v1/nodes/{node_id}/plan`: the decoded plan and its raw JSON.
    pub async fn get_plan(&self) -> Result<(Plan, Vec<u8>), CpError> {
        let (code, body) = self.send("plan", self.http().get(self.url("plan"))).await?;
        if !code.is_success() {
            return Err(Self::status_error("plan", code, &body));
        }
        let plan = parse_plan(&body).map_err(|e| CpError::Decode {
            endpoint: "plan",
            message: e.to_string(),
        })?;
        let node = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| {
                v.get("node_id")
                    .and_then(|n| n.as_str())
                    .map(str::to_string)
            });
        if node.as_deref() != Some(self.node_id.as_str()) {
            return Err(CpError::Decode {
                endpoint: "plan",
                message: format!(
                    "plan is for node {:?}, this node is {}",
                    node.unwrap_or_default(),
                    self.node_id
                ),
            });
        }
        Ok((plan, body))
    }

    /// `GET /v1/nodes/{node_id}/overlay`: the overlay document (parsed by the overlay
    /// owner), `None` on 404 (the control plane has no overlay service).
    pub async fn get_overlay(&self) -> Result<Option<Vec<u8>>, CpError> {
        let (code, body) = self
            .send("overlay", self.http().get(self.url("overlay")))
            .await?;
        if code == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        if !code.is_success() {
            return Err(Self::status_error("overlay", code, &body));
        }
        Ok(Some(body))
    }

    /// `POST …/instances/{id}/status`. `Err` means "retry later".
    pub async fn post_status(
        &self,
        instance_id: &str,
        report_json: &str,
    ) -> Result<Posted, CpError> {
        let req = self
            .http()
            .post(self.url(&format!("instances/{instance_id}/status")))
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(report_json.to_string());
        let (code, body) = self.send("status", req).await?;
        if code.is_success() {
            Ok(Posted::Accepted)
        } else if code.is_client_error()
            && code != StatusCode::REQUEST_TIMEOUT
            && code != StatusCode::TOO_MANY_REQUESTS
        {
            let e = Self::status_error("status", code, &body);
            Ok(Posted::Refused(code.as_u16(), e.to_string()))
        } else {
            Err(Self::status_error("status", code, &body))
        }
    }

    /// `POST …/heartbeat`.
    pub async fn heartbeat(&self, hb: &Heartbeat) -> Result<HeartbeatAnswer, CpError> {
        let (code, body) = self
            .send(
                "heartbeat",
                self.http().post(self.url("heartbeat")).json(hb),
            )
            .await?;
        if !code.is_success() {
            return Err(Self::status_error("heartbeat", code, &body));
        }
        serde_json::from_slice(&body).map_err(|e| CpError::Decode {
            endpoint: "heartbeat",
            message: e.to_string(),
        })
    }

    /// `POST …/logs`.
    pub async fn post_logs(&self, entries: &[LogEntry]) -> Result<(), CpError> {
        #[derive(Serialize)]
        struct Body<'a> {
            entries: &'a [LogEntry],
        }
        let (code, body) = self
            .send(
                "logs",
                self.http().post(self.url("logs")).json(&Body { entries }),
            )
            .await?;
        if !code.is_success() {
            return Err(Self::status_error("logs", code, &body));
        }
        Ok(())
    }

    /// `GET …/secrets/{version_id}`, validated (format, hash, version). One attempt.
    pub async fn get_secret(&self, version_id: &str) -> Result<SecretMaterial, SecretsError> {
        let fetch = |detail: String| SecretsError::Fetch {
            version_id: version_id.to_string(),
            detail,
        };
        let (code, body) = self
            .send(
                "secrets",
                self.http().get(self.url(&format!("secrets/{version_id}"))),
            )
            .await
            .map_err(|e| fetch(e.to_string()))?;
        let body = Zeroizing::new(body);
        if code == StatusCode::NOT_FOUND {
            return Err(SecretsError::Missing {
                version_id: version_id.to_string(),
                detail: "the control plane answered 404".into(),
            });
        }
        if !code.is_success() {
            // The body of an error answer is not echoed: it might quote material.
            return Err(fetch(format!("HTTP {}", code.as_u16())));
        }
        let invalid = |detail: String| SecretsError::Invalid {
            version_id: version_id.to_string(),
            detail,
        };
        let bundle: SecretBundle = serde_json::from_slice(&body).map_err(|e| {
            invalid(format!(
                "answer is not a secrets bundle (line {}, column {})",
                e.line(),
                e.column()
            ))
        })?;
        if bundle.version_id != version_id {
            return Err(invalid(format!(
                "answer is for version {:?}",
                bundle.version_id
            )));
        }
        if let Some(f) = bundle.format.as_deref() {
            if !matches!(f, "env" | "dotenv" | "trc_secrets_v1" | "v1") {
                return Err(invalid(format!("format {f:?} is not supported")));
            }
        }
        if let Some(h) = bundle.data_hash.as_deref() {
            let got = hex::encode(Sha256::digest(bundle.data.as_bytes()));
            if h.strip_prefix("sha256:").unwrap_or(h) != got {
                return Err(invalid(format!(
                    "data_hash {h} does not match the data (sha256:{got})"
                )));
            }
        }
        SecretMaterial::new(version_id, bundle.data.as_bytes().to_vec())
    }
}

/// Status delivery to the control plane.
pub struct HttpSink {
    client: Arc<ControlPlaneClient>,
    metrics: Arc<Metrics>,
}

impl HttpSink {
    /// A sink posting through `client`.
    pub fn new(client: Arc<ControlPlaneClient>, metrics: Arc<Metrics>) -> Self {
        HttpSink { client, metrics }
    }
}

#[async_trait]
impl ReportSink for HttpSink {
    async fn deliver(&self, _store: &Store, rows: Vec<OutboxRow>) -> Delivery {
        // Per instance in outbox order; instances side by side.
        let mut by: BTreeMap<String, Vec<OutboxRow>> = BTreeMap::new();
        for r in rows {
            by.entry(r.instance_id.clone()).or_default().push(r);
        }
        let sem = Arc::new(tokio::sync::Semaphore::new(DELIVERY_CONCURRENCY));
        let mut set = tokio::task::JoinSet::new();
        for (instance, rows) in by {
            let (client, metrics, sem) = (self.client.clone(), self.metrics.clone(), sem.clone());
            set.spawn(async move {
                let _permit = sem.acquire_owned().await;
                let mut done = Vec::new();
                for r in rows {
                    match client.post_status(&instance, &r.report_json).await {
                        Ok(Posted::Accepted) => done.push(r.id),
                        Ok(Posted::Refused(code, msg)) => {
                            metrics.reports_dropped.inc();
                            tracing::error!(instance = %instance, seq = r.seq, code, error = %msg, "control plane refused a status report for good; dropping it");
                            done.push(r.id);
                        }
                        Err(e) => {
                            tracing::debug!(instance = %instance, seq = r.seq, error = %e, "status report not delivered");
                            return (done, true);
                        }
                    }
                }
                (done, false)
            });
        }
        let mut out = Delivery::default();
        while let Some(r) = set.join_next().await {
            match r {
                Ok((done, retry)) => {
                    out.done.extend(done);
                    out.retry |= retry;
                }
                Err(e) => {
                    tracing::error!(error = %e, "status delivery task failed");
                    out.retry = true;
                }
            }
        }
        out
    }
}

#[async_trait]
impl LogDestination for ControlPlaneClient {
    async fn send(&self, entries: &[LogEntry]) -> Result<(), String> {
        self.post_logs(entries).await.map_err(|e| e.to_string())
    }
}

const META_CURSOR: &str = "plan_cursor";
const META_PLAN: &str = "last_plan";

/// The last applied plan, if one was persisted.
pub fn load_persisted_plan(store: &Store) -> Option<Plan> {
    let raw = store.meta_get(META_PLAN).ok()??;
    match parse_plan(raw.as_bytes()) {
        Ok(p) => Some(p),
        Err(e) => {
            tracing::error!(error = %e, "persisted plan is unreadable; waiting for the control plane");
            None
        }
    }
}

/// Polls the plan on an interval (±10 % jitter) and soon after every status change;
/// applies only plans with a newer cursor, persisting each before applying it.
#[allow(clippy::too_many_arguments)]
pub async fn run_plan_poller(
    client: Arc<ControlPlaneClient>,
    supervisor: Supervisor,
    store: Store,
    clock: SharedClock,
    interval: Duration,
    changes: Arc<Notify>,
    metrics: Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut last_cursor: i64 = store
        .meta_get(META_CURSOR)
        .ok()
        .flatten()
        .and_then(|c| c.parse().ok())
        .unwrap_or(i64::MIN);
    let mut last_ok = clock.now();
    loop {
        match client.get_plan().await {
            Ok((plan, raw)) => {
                last_ok = clock.now();
                if plan.cursor > last_cursor {
                    let cursor = plan.cursor;
                    let text = String::from_utf8_lossy(&raw).into_owned();
                    let persisted = store
                        .call(move |s| {
                            s.meta_set(META_PLAN, &text)?;
                            s.meta_set(META_CURSOR, &cursor.to_string())
                        })
                        .await;
                    if let Err(e) = persisted {
                        tracing::error!(error = %e, "cannot persist the plan; applying it anyway");
                    }
                    tracing::info!(
                        cursor,
                        assignments = plan.assignments.len(),
                        rejected = plan.rejected.len(),
                        "applying plan"
                    );
                    supervisor.apply(plan).await;
                    last_cursor = cursor;
                } else {
                    tracing::debug!(
                        cursor = plan.cursor,
                        last_cursor,
                        "plan not newer than the applied one; ignored"
                    );
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "plan fetch failed; the last applied plan keeps running")
            }
        }
        metrics
            .plan_age_seconds
            .set(clock.now().since(last_ok).as_secs_f64());
        let jitter = 0.9 + rand::random::<f64>() * 0.2;
        let pause = clock.sleep(interval.mul_f64(jitter));
        tokio::select! {
            _ = pause => {}
            _ = changes.notified() => {
                // Let a burst of transitions settle into one poll.
                clock.sleep(Duration::from_millis(200)).await;
            }
            _ = shutdown.changed() => return,
        }
    }
}

/// Whole cores left after reservations: rounded down (a scheduler must not place a
/// 1-core instance on 0.5 free cores), never negative.
pub fn available_cores(cores: f64, reserved: f64) -> i32 {
    let free = (cores - reserved).floor();
    if free.is_nan() || free <= 0.0 {
        0
    } else {
        free.min(f64::from(i32::MAX)) as i32
    }
}

/// Reads MemTotal from /proc/meminfo (0 elsewhere).
pub fn total_memory_bytes() -> i64 {
    #[cfg(target_os = "linux")]
    {
        if let Ok(s) = std::fs::read_to_string("/proc/meminfo") {
            if let Some(kb) = s
                .lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<i64>().ok())
            {
                return kb * 1024;
            }
        }
    }
    0
}

/// Sends heartbeats at the rate the control plane asks for (`next_heartbeat_secs`,
/// clamped to 1..=300 s), with the node's real capacity.
#[allow(clippy::too_many_arguments)]
pub async fn run_heartbeat(
    client: Arc<ControlPlaneClient>,
    supervisor: Supervisor,
    store: Store,
    clock: SharedClock,
    node_id: String,
    initial: Duration,
    reserved_memory_bytes: i64,
    guest: GuestAdvert,
    mut shutdown: watch::Receiver<bool>,
) {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get() as f64)
        .unwrap_or(1.0);
    let memory = total_memory_bytes();
    let mut interval = initial;
    // Fixed rate: the next beat is due one interval after the previous one was due, so
    // the time a request takes does not stretch the period.
    let mut due = clock.now();
    loop {
        let usage = supervisor.usage().await.unwrap_or_default();
        let outbox_depth = store.call(|s| s.outbox_depth()).await.unwrap_or(-1);
        let state = if usage.node_draining {
            "draining"
        } else if usage.degraded.is_some() {
            "degraded"
        } else {
            "active"
        };
        let hb = Heartbeat {
            node_id: node_id.clone(),
            state: state.into(),
            available_cpu_cores: available_cores(cores, usage.cpu_reserved),
            available_memory_bytes: (memory - reserved_memory_bytes - usage.memory_reserved).max(0),
            instance_count: i32::try_from(usage.instances).unwrap_or(i32::MAX),
            outbox_depth,
            agent_version: env!("CARGO_PKG_VERSION").into(),
            kernel_versions: guest.kernel_versions.clone(),
            guest_init_protocols: guest.guest_init_protocols.clone(),
            wireguard_public_key: client.wireguard_public_key.clone(),
            overlay: client.overlay.as_ref().map(|o| o.heartbeat()),
        };
        match client.heartbeat(&hb).await {
            Ok(a) => {
                if let Some(s) = a.next_heartbeat_secs {
                    interval = Duration::from_secs(s.clamp(1, 300));
                }
            }
            Err(e) => tracing::warn!(error = %e, "heartbeat failed"),
        }
        due = due.plus(interval);
        let now = clock.now();
        if due.plus(interval) < now {
            // Fell behind by more than a period (a long outage): do not burst.
            due = now;
        }
        tokio::select! {
            _ = clock.sleep_until(due) => {}
            _ = shutdown.changed() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn available_cores_are_whole_and_never_negative() {
        assert_eq!(available_cores(2.0, 0.0), 2);
        assert_eq!(available_cores(2.0, 0.5), 1);
        assert_eq!(available_cores(2.0, 2.5), 0);
        assert_eq!(available_cores(64.0, f64::NAN), 0);
    }

    fn http_config(url: &str) -> ControlPlaneConfig {
        ControlPlaneConfig {
            mode: crate::config::ControlPlaneMode::Http,
            desired_dir: None,
            rescan_interval_ms: 2000,
            url: Some(url.into()),
            ca_file: None,
            client_cert_file: None,
            client_key_file: None,
            token_file: None,
            request_timeout_ms: 1000,
            poll_interval_ms: 1000,
            heartbeat_interval_secs: 10,
            reload_interval_ms: 5000,
        }
    }

    #[test]
    fn a_client_built_without_config_validation_refuses_plain_http_off_loopback() {
        let metrics = Arc::new(Metrics::new());
        for url in ["http://10.1.2.3:8080", "http://cp.example", "not a url"] {
            let e = ControlPlaneClient::new(&http_config(url), "n", metrics.clone())
                .err()
                .unwrap_or_else(|| panic!("{url} accepted"));
            assert!(e.to_string().contains("control_plane.url"), "{url}: {e}");
        }
        for url in ["http://127.0.0.1:9", "http://[::1]:9", "http://localhost:9"] {
            ControlPlaneClient::new(&http_config(url), "n", metrics.clone())
                .unwrap_or_else(|e| panic!("{url}: {e}"));
        }
    }

    /// An https control plane's redirect to elsewhere (here: a second loopback server
    /// standing in for a clear-text host) is not followed: the request fails on the
    /// 3xx and the second server is never contacted.
    #[tokio::test]
    async fn a_redirect_from_the_control_plane_is_not_followed() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let elsewhere = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let target = format!("http://{}/v1/plan", elsewhere.local_addr().unwrap());
        let cp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", cp.local_addr().unwrap());
        tokio::spawn(async move {
            while let Ok((mut s, _)) = cp.accept().await {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let answer = format!(
                    "HTTP/1.1 302 Found\r\nLocation: {target}\r\nContent-Length: 0\r\n\r\n"
                );
                let _ = s.write_all(answer.as_bytes()).await;
            }
        });
        let client =
            ControlPlaneClient::new(&http_config(&url), "n", Arc::new(Metrics::new())).unwrap();
        let e = client.get_plan().await.expect_err("a 302 is not a plan");
        assert!(e.to_string().contains("302"), "{e}");
        let contacted = tokio::time::timeout(Duration::from_millis(300), elsewhere.accept()).await;
        assert!(contacted.is_err(), "the redirect target was contacted");
    }

    /// `GET …/overlay`: 404 is "no overlay service" (`None`), 200 the document, any
    /// other answer an error.
    #[tokio::test]
    async fn the_overlay_endpoint_maps_404_to_none() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let cp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", cp.local_addr().unwrap());
        let answers = [
            "HTTP/1.1 404 Not Found\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
            "HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\n{}",
            "HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\nContent-Length: 4\r\n\r\ndown",
        ];
        tokio::spawn(async move {
            for a in answers {
                let Ok((mut s, _)) = cp.accept().await else {
                    return;
                };
                let mut buf = [0u8; 4096];
                let n = s.read(&mut buf).await.unwrap_or(0);
                assert!(String::from_utf8_lossy(&buf[..n]).starts_with("GET /v1/nodes/n/overlay "));
                let _ = s.write_all(a.as_bytes()).await;
            }
        });
        let client =
            ControlPlaneClient::new(&http_config(&url), "n", Arc::new(Metrics::new())).unwrap();
        assert_eq!(client.get_overlay().await.unwrap(), None);
        assert!(
            client.refusals().current().is_empty(),
            "a 404 of the overlay is no refusal (healthz stays ok)"
        );
        assert_eq!(client.get_overlay().await.unwrap(), Some(b"{}".to_vec()));
        let e = client.get_overlay().await.unwrap_err().to_string();
        assert!(e.contains("overlay") && e.contains("503"), "{e}");
    }

    #[test]
    fn a_refusal_is_kept_until_the_endpoint_answers_2xx() {
        let r = Refusals::default();
        r.record("heartbeat", 422, b"available_cpu_cores: invalid type\n");
        r.record("heartbeat", 422, b"again");
        r.record("plan", 503, b"down");
        let now = r.current();
        assert_eq!(now.len(), 1, "{now:?}");
        assert_eq!(
            (now[0].endpoint.as_str(), now[0].code, now[0].count),
            ("heartbeat", 422, 2)
        );
        assert_eq!(now[0].message, "again");
        r.record("heartbeat", 200, b"{}");
        assert!(r.current().is_empty());
    }
}
