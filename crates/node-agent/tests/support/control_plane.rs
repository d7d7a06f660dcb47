//! An in-test control plane speaking the plfm node API v1 JSON of DESIGN §3 on
//! loopback (plain HTTP or TLS with optional client certificates). It serves a plan
//! the test sets, records every request it gets, and can be told to fail.
//!
//! It is as strict as the real one: every request body is deserialized into the types
//! of [`plfm`], which mirror plfm's node API (`services/control-plane/src/api/v1/
//! nodes.rs` of plfm-vt: integers where plfm has integers, unknown fields ignored), and
//! a body that does not fit is answered 422 with serde's message, as axum's `Json`
//! extractor in the real control plane answers.
#![allow(dead_code)]

/// Request types of plfm's node API v1, as the real control plane deserializes them
/// (plfm-vt `services/control-plane/src/api/v1/nodes.rs` at commit 92b3c5f, and
/// `libs/events/src/types.rs` for `NodeState`). Field types follow plfm's exactly
/// (`i32`, `i64`, `Option`); serde ignores fields plfm does not declare.
pub mod plfm {
    use serde::Deserialize;

    /// `NodeState` (snake_case on the wire).
    #[derive(Debug, Deserialize, PartialEq, Eq)]
    #[serde(rename_all = "snake_case")]
    pub enum NodeState {
        Active,
        Draining,
        Disabled,
        Degraded,
        Offline,
    }

    /// `POST /v1/nodes/{node_id}/heartbeat`.
    #[derive(Debug, Deserialize)]
    pub struct HeartbeatRequest {
        pub state: NodeState,
        pub available_cpu_cores: i32,
        pub available_memory_bytes: i64,
        pub instance_count: i32,
        #[serde(default)]
        pub instance_statuses: serde_json::Value,
    }

    /// `POST /v1/nodes/{node_id}/instances/{instance_id}/status`.
    #[derive(Debug, Deserialize)]
    pub struct ReportInstanceStatusRequest {
        pub status: String,
        #[serde(default)]
        pub boot_id: Option<String>,
        #[serde(default)]
        pub error_message: Option<String>,
        #[serde(default)]
        pub exit_code: Option<i32>,
    }

    /// `POST /v1/nodes/{node_id}/logs`.
    #[derive(Debug, Deserialize)]
    pub struct WorkloadLogIngestRequest {
        pub entries: Vec<WorkloadLogIngestEntry>,
    }

    /// One log line.
    #[derive(Debug, Deserialize)]
    pub struct WorkloadLogIngestEntry {
        pub ts: chrono::DateTime<chrono::Utc>,
        pub instance_id: String,
        #[serde(default)]
        pub stream: Option<String>,
        pub line: String,
        #[serde(default)]
        pub truncated: Option<bool>,
    }

    /// `POST /v1/nodes/enroll`.
    #[derive(Debug, Deserialize)]
    pub struct EnrollNodeRequest {
        pub hostname: String,
        pub region: String,
        pub wireguard_public_key: String,
        pub agent_mtls_subject: String,
        pub public_ipv6: std::net::Ipv6Addr,
        #[serde(default)]
        pub public_ipv4: Option<std::net::Ipv4Addr>,
        pub cpu_cores: i32,
        pub memory_bytes: i64,
        #[serde(default)]
        pub mtu: Option<i32>,
        #[serde(default)]
        pub labels: serde_json::Value,
    }

    /// Statuses plfm accepts (`report_instance_status` answers 400 otherwise).
    pub const STATUSES: [&str; 5] = ["booting", "ready", "draining", "stopped", "failed"];

    /// Deserializes `body` as plfm does; the error text is what its 422 carries.
    pub fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, String> {
        let de = &mut serde_json::Deserializer::from_slice(body);
        serde_path_to_error::deserialize(de)
            .map_err(|e| format!("Failed to deserialize the JSON body into the target type: {e}"))
    }
}

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};

use super::common::reported_move_is_legal;

/// One status POST as received.
#[derive(Debug, Clone)]
pub struct Received {
    pub instance_id: String,
    pub seq: i64,
    pub status: String,
    pub body: Value,
    pub accepted: bool,
    /// Accepted, but the control plane had already accepted this instance's report
    /// of the same `seq`: answered 2xx and dropped, as the protocol lets a control
    /// plane do (`seq` exists so that duplicates can be dropped). Not in
    /// [`FakeCp::accepted`].
    pub duplicate: bool,
}

#[derive(Default)]
pub struct CpState {
    pub node_id: String,
    pub plan: Mutex<Value>,
    pub statuses: Mutex<Vec<Received>>,
    pub heartbeats: Mutex<Vec<Value>>,
    pub logs: Mutex<Vec<Value>>,
    /// version id → (HTTP code, body)
    pub secrets: Mutex<HashMap<String, (u16, Value)>>,
    pub secret_gets: AtomicU64,
    /// Every endpoint answers 503.
    pub down: AtomicBool,
    /// Only the status endpoint answers 503.
    pub status_down: AtomicBool,
    pub token: Option<String>,
    pub next_heartbeat_secs: u64,
    /// Bodies refused with 422 (they do not fit plfm's types).
    pub rejected: Mutex<Vec<Rejected>>,
    /// Answer 422 to every heartbeat (as a control plane with other types would).
    pub refuse_heartbeats: AtomicBool,
    /// Every `POST /v1/nodes/enroll` body as received.
    pub enrolls: Mutex<Vec<Value>>,
    /// The answer to an enrollment: (HTTP code, body); `None`: 201 with a node record
    /// of `node_id` and `overlay_ipv6` `fd00:1::1`.
    pub enroll_answer: Mutex<Option<(u16, Value)>>,
    /// `start_tls_recording`: (request path, serial of the client certificate of its
    /// connection, lower-case hex) for every request.
    pub client_certs: Mutex<Vec<(String, Option<String>)>>,
    /// `start_tls_recording`: the Authorization header of every request.
    pub authorizations: Mutex<Vec<Option<String>>>,
    /// The answer to `GET …/overlay`; `None`: 404 (no overlay service, as the real
    /// control plane without one answers).
    pub overlay: Mutex<Option<Value>>,
    /// `GET …/overlay` requests received.
    pub overlay_gets: AtomicU64,
}

pub struct FakeCp {
    pub addr: SocketAddr,
    pub state: Arc<CpState>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeCp {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn authorized(s: &CpState, h: &HeaderMap) -> bool {
    match &s.token {
        None => true,
        Some(t) => {
            h.get("authorization").and_then(|v| v.to_str().ok()) == Some(&format!("Bearer {t}"))
        }
    }
}

macro_rules! guard {
    ($s:expr, $h:expr) => {
        if $s.down.load(Ordering::SeqCst) {
            return (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"error": "down"})));
        }
        if !authorized(&$s, &$h) {
            return (StatusCode::UNAUTHORIZED, Json(json!({"error": "bad token"})));
        }
    };
}

async fn plan(
    State(s): State<Arc<CpState>>,
    h: HeaderMap,
    Path(node): Path<String>,
) -> (StatusCode, Json<Value>) {
    guard!(s, h);
    if node != s.node_id {
        return (
            StatusCode::NOT_FOUND,
            Json(json!({"error": "unknown node"})),
        );
    }
    (StatusCode::OK, Json(s.plan.lock().unwrap().clone()))
}

/// A body refused by the typed check (422), by endpoint.
#[derive(Debug, Clone)]
pub struct Rejected {
    pub endpoint: &'static str,
    pub body: Value,
    pub error: String,
}

fn unprocessable(
    s: &CpState,
    endpoint: &'static str,
    raw: &[u8],
    error: String,
) -> (StatusCode, Json<Value>) {
    s.rejected.lock().unwrap().push(Rejected {
        endpoint,
        body: serde_json::from_slice(raw).unwrap_or(Value::Null),
        error: error.clone(),
    });
    (
        StatusCode::UNPROCESSABLE_ENTITY,
        Json(json!({"error": error})),
    )
}

async fn status(
    State(s): State<Arc<CpState>>,
    h: HeaderMap,
    Path((_node, id)): Path<(String, String)>,
    raw: axum::body::Bytes,
) -> (StatusCode, Json<Value>) {
    let typed = plfm::parse::<plfm::ReportInstanceStatusRequest>(&raw);
    let body: Value = serde_json::from_slice(&raw).unwrap_or(Value::Null);
    let valid = match &typed {
        Ok(r) => plfm::STATUSES.contains(&r.status.as_str()),
        Err(_) => false,
    };
    let accepted = valid
        && !s.down.load(Ordering::SeqCst)
        && !s.status_down.load(Ordering::SeqCst)
        && authorized(&s, &h);
    {
        let mut log = s.statuses.lock().unwrap();
        let seq = body["seq"].as_i64().unwrap_or(-1);
        let duplicate = accepted
            && log
                .iter()
                .any(|r| r.accepted && !r.duplicate && r.instance_id == id && r.seq == seq);
        log.push(Received {
            instance_id: id,
            seq,
            status: body["status"].as_str().unwrap_or("").to_string(),
            body: body.clone(),
            accepted,
            duplicate,
        });
    }
    match typed {
        Err(e) => unprocessable(&s, "status", &raw, e),
        Ok(_) if !valid => (
            StatusCode::BAD_REQUEST,
            Json(
                json!({"code": "invalid_status", "message": format!("Status must be one of: {:?}", plfm::STATUSES)}),
            ),
        ),
        Ok(_) if accepted => (StatusCode::OK, Json(json!({"accepted": true}))),
        Ok(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"error": "unavailable"})),
        ),
    }
}

async fn heartbeat(
    State(s): State<Arc<CpState>>,
    h: HeaderMap,
    raw: axum::body::Bytes,
) -> (StatusCode, Json<Value>) {
    guard!(s, h);
    if let Err(e) = plfm::parse::<plfm::HeartbeatRequest>(&raw) {
        return unprocessable(&s, "heartbeat", &raw, e);
    }
    if s.refuse_heartbeats.load(Ordering::SeqCst) {
        return unprocessable(&s, "heartbeat", &raw, "refused by the test".into());
    }
    s.heartbeats
        .lock()
        .unwrap()
        .push(serde_json::from_slice(&raw).unwrap_or(Value::Null));
    (
        StatusCode::OK,
        Json(json!({"accepted": true, "next_heartbeat_secs": s.next_heartbeat_secs})),
    )
}

async fn secrets(
    State(s): State<Arc<CpState>>,
    h: HeaderMap,
    Path((_node, v)): Path<(String, String)>,
) -> (StatusCode, Json<Value>) {
    guard!(s, h);
    s.secret_gets.fetch_add(1, Ordering::SeqCst);
    match s.secrets.lock().unwrap().get(&v) {
        Some((code, body)) => (StatusCode::from_u16(*code).unwrap(), Json(body.clone())),
        None => (
            StatusCode::NOT_FOUND,
            Json(json!({"error": "no such version"})),
        ),
    }
}

async fn logs(
    State(s): State<Arc<CpState>>,
    h: HeaderMap,
    raw: axum::body::Bytes,
) -> (StatusCode, Json<Value>) {
    guard!(s, h);
    if let Err(e) = plfm::parse::<plfm::WorkloadLogIngestRequest>(&raw) {
        return unprocessable(&s, "logs", &raw, e);
    }
    s.logs
        .lock()
        .unwrap()
        .push(serde_json::from_slice(&raw).unwrap_or(Value::Null));
    (StatusCode::OK, Json(json!({"accepted": true})))
}

async fn enroll(
    State(s): State<Arc<CpState>>,
    raw: axum::body::Bytes,
) -> (StatusCode, Json<Value>) {
    s.enrolls
        .lock()
        .unwrap()
        .push(serde_json::from_slice(&raw).unwrap_or(Value::Null));
    if let Err(e) = plfm::parse::<plfm::EnrollNodeRequest>(&raw) {
        return unprocessable(&s, "enroll", &raw, e);
    }
    match s.enroll_answer.lock().unwrap().clone() {
        Some((code, body)) => (StatusCode::from_u16(code).unwrap(), Json(body)),
        None => (
            StatusCode::CREATED,
            Json(
                json!({"id": s.node_id, "state": "active", "overlay_ipv6": "fd00:1::1", "region": "test"}),
            ),
        ),
    }
}

async fn overlay(
    State(s): State<Arc<CpState>>,
    h: HeaderMap,
    Path(node): Path<String>,
) -> (StatusCode, Json<Value>) {
    guard!(s, h);
    s.overlay_gets.fetch_add(1, Ordering::SeqCst);
    match s.overlay.lock().unwrap().clone() {
        Some(doc) if node == s.node_id => (StatusCode::OK, Json(doc)),
        _ => (StatusCode::NOT_FOUND, Json(json!({"error": "not found"}))),
    }
}

fn router(state: Arc<CpState>) -> Router {
    Router::new()
        .route("/v1/nodes/enroll", post(enroll))
        .route("/v1/nodes/{node}/plan", get(plan))
        .route("/v1/nodes/{node}/instances/{id}/status", post(status))
        .route("/v1/nodes/{node}/heartbeat", post(heartbeat))
        .route("/v1/nodes/{node}/secrets/{version}", get(secrets))
        .route("/v1/nodes/{node}/logs", post(logs))
        .route("/v1/nodes/{node}/overlay", get(overlay))
        .with_state(state)
}

pub fn new_state(node_id: &str, next_heartbeat_secs: u64, token: Option<&str>) -> CpState {
    CpState {
        node_id: node_id.to_string(),
        plan: Mutex::new(
            json!({"spec_version": "v1", "node_id": node_id, "plan_id": "p0", "created_at": "2026-11-26T00:00:00Z", "cursor_event_id": 0, "instances": []}),
        ),
        token: token.map(str::to_string),
        next_heartbeat_secs,
        ..CpState::default()
    }
}

impl FakeCp {
    /// Plain HTTP on a free loopback port.
    pub async fn start(state: CpState) -> FakeCp {
        let state = Arc::new(state);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = router(state.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        FakeCp { addr, state, task }
    }

    /// TLS (rustls) with the given server config.
    pub async fn start_tls(state: CpState, config: rustls::ServerConfig) -> FakeCp {
        let state = Arc::new(state);
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        std_listener.set_nonblocking(true).unwrap();
        let addr = std_listener.local_addr().unwrap();
        let tls = axum_server::tls_rustls::RustlsConfig::from_config(Arc::new(config));
        let app = router(state.clone());
        let task = tokio::spawn(async move {
            let _ = axum_server::from_tcp_rustls(std_listener, tls)
                .unwrap()
                .serve(app.into_make_service())
                .await;
        });
        FakeCp { addr, state, task }
    }

    /// TLS (rustls) with the given server config, recording for every request the
    /// serial of the client certificate its connection presented
    /// ([`CpState::client_certs`]).
    pub async fn start_tls_recording(state: CpState, config: rustls::ServerConfig) -> FakeCp {
        let state = Arc::new(state);
        let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = tcp.local_addr().unwrap();
        let listener = recording::TlsListener {
            tcp,
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
        };
        let app = router(state.clone()).layer(axum::middleware::from_fn_with_state(
            state.clone(),
            recording::record,
        ));
        let task = tokio::spawn(async move {
            let _ = axum::serve(
                listener,
                app.into_make_service_with_connect_info::<recording::PeerCert>(),
            )
            .await;
        });
        FakeCp { addr, state, task }
    }

    /// Serials of the client certificates seen, in request order.
    pub fn client_serials(&self) -> Vec<Option<String>> {
        self.state
            .client_certs
            .lock()
            .unwrap()
            .iter()
            .map(|(_, s)| s.clone())
            .collect()
    }

    pub fn url(&self, scheme: &str) -> String {
        format!("{scheme}://{}", self.addr)
    }

    /// Replaces the plan (full snapshot) with these assignments and a new cursor.
    pub fn set_plan(&self, cursor: i64, instances: Vec<Value>) {
        *self.state.plan.lock().unwrap() = json!({
            "spec_version": "v1", "node_id": self.state.node_id, "plan_id": format!("p{cursor}"),
            "created_at": "2026-11-26T00:00:00Z", "cursor_event_id": cursor, "instances": instances
        });
    }

    pub fn accepted(&self) -> Vec<Received> {
        self.state
            .statuses
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.accepted && !r.duplicate)
            .cloned()
            .collect()
    }

    /// Reports accepted a second time under the same `seq` (and dropped).
    pub fn duplicates(&self) -> Vec<Received> {
        self.state
            .statuses
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.duplicate)
            .cloned()
            .collect()
    }

    pub fn accepted_for(&self, id: &str) -> Vec<Received> {
        self.accepted()
            .into_iter()
            .filter(|r| r.instance_id == id)
            .collect()
    }

    pub fn posts(&self) -> Vec<Received> {
        self.state.statuses.lock().unwrap().clone()
    }

    /// Checks every instance's accepted reports: seq 1..n, once each, legal
    /// transitions, and no report sent again after it was acknowledged.
    pub fn check_delivery_log(&self) -> HashMap<String, Vec<Received>> {
        let dups = self.duplicates();
        assert!(
            dups.is_empty(),
            "reports sent again after they were acknowledged: {dups:?}"
        );
        self.check_delivery_log_after_a_crash()
    }

    /// [`Self::check_delivery_log`] for a test that kills an agent: a report in
    /// flight at the kill can reach the control plane and be acknowledged to a dead
    /// process, so the next agent rightly sends it again and the control plane
    /// drops it by its `seq`. The test checks which duplicates it allows.
    pub fn check_delivery_log_after_a_crash(&self) -> HashMap<String, Vec<Received>> {
        let mut by: HashMap<String, Vec<Received>> = HashMap::new();
        for r in self.accepted() {
            by.entry(r.instance_id.clone()).or_default().push(r);
        }
        for (id, reps) in &by {
            let seqs: Vec<i64> = reps.iter().map(|r| r.seq).collect();
            let want: Vec<i64> = (1..=reps.len() as i64).collect();
            assert_eq!(
                seqs, want,
                "{id}: accepted seqs must be 1..n in order, each once"
            );
            for w in reps.windows(2) {
                let a = plfm_node_agent::instance::Status::parse(&w[0].status).unwrap();
                let b = plfm_node_agent::instance::Status::parse(&w[1].status).unwrap();
                assert!(reported_move_is_legal(a, b), "{id}: {a} -> {b}");
            }
        }
        by
    }
}

/// A TLS listener for axum that hands each connection's client-certificate serial to
/// the handlers (`ConnectInfo<PeerCert>`).
mod recording {
    use std::sync::Arc;
    use std::time::Duration;

    use axum::extract::{ConnectInfo, Request, State};
    use axum::middleware::Next;
    use axum::response::Response;

    use super::CpState;

    pub struct TlsListener {
        pub tcp: tokio::net::TcpListener,
        pub acceptor: tokio_rustls::TlsAcceptor,
    }

    /// The serial (lower-case hex) of the client certificate of a connection.
    #[derive(Clone, Debug)]
    pub struct PeerCert(pub Option<String>);

    impl axum::serve::Listener for TlsListener {
        type Io = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;
        type Addr = PeerCert;

        async fn accept(&mut self) -> (Self::Io, PeerCert) {
            loop {
                let Ok((tcp, _)) = self.tcp.accept().await else {
                    continue;
                };
                let handshake =
                    tokio::time::timeout(Duration::from_secs(5), self.acceptor.accept(tcp)).await;
                let Ok(Ok(tls)) = handshake else {
                    continue;
                };
                let serial = tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .and_then(|der| {
                        x509_parser::parse_x509_certificate(der)
                            .ok()
                            .map(|(_, c)| c.raw_serial_as_string().replace(':', ""))
                    });
                return (tls, PeerCert(serial));
            }
        }

        fn local_addr(&self) -> std::io::Result<PeerCert> {
            Ok(PeerCert(None))
        }
    }

    impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, TlsListener>>
        for PeerCert
    {
        fn connect_info(stream: axum::serve::IncomingStream<'_, TlsListener>) -> Self {
            stream.remote_addr().clone()
        }
    }

    pub async fn record(
        State(s): State<Arc<CpState>>,
        ConnectInfo(peer): ConnectInfo<PeerCert>,
        req: Request,
        next: Next,
    ) -> Response {
        s.client_certs
            .lock()
            .unwrap()
            .push((req.uri().path().to_string(), peer.0));
        s.authorizations.lock().unwrap().push(
            req.headers()
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string),
        );
        next.run(req).await
    }
}
