//! The local HTTP API (DESIGN §4): health, metrics, instance statuses, workload logs,
//! the report history, exec sessions, operator stop and node drain, the overlay, on
//! the agent's Unix socket (and, when configured, a TCP address with a bearer token).
//! Who may call it is [`access`]'s to decide, in front of every route.
//!
//! This module maps each request to one call on the status manager or the supervisor
//! and shapes the answer; it holds no state and makes no lifecycle decisions.

pub mod access;
pub mod detail;

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;

use crate::metrics::Metrics;
use crate::spec::InstanceId;
use crate::state::Store;
use crate::status::{StatusManager, StatusReport};
use crate::supervisor::{OperatorError, Supervisor};

/// What the handlers need.
#[derive(Clone)]
pub struct ApiState {
    /// Statuses.
    pub status: Arc<StatusManager>,
    /// Operator requests.
    pub supervisor: Supervisor,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Delivered reports (standalone sink).
    pub store: Store,
    /// Connected mode: the endpoints the control plane refuses right now.
    pub cp_refusals: Option<Arc<crate::control_plane::http::Refusals>>,
    /// What the runtime says about how it runs VMs here ([`crate::runtime::Runtime::notices`]).
    pub notices: Vec<String>,
    /// The agent's data dir (where the image cache keeps root disks).
    pub data_dir: std::path::PathBuf,
    /// Exec sessions (absent: the API answers 501).
    pub exec: Option<Arc<crate::exec::ExecService>>,
    /// `<data_dir>/instances`, where the instances' logs are (`None`: no logs served).
    pub instances_dir: Option<std::path::PathBuf>,
    /// This node's identity and control-plane credentials' state (`GET /v1/node`).
    pub node: Option<Arc<NodeFacts>>,
    /// The overlay owner's snapshot (`GET /v1/overlay`; absent: 404).
    pub overlay: Option<Arc<crate::overlay::status::OverlayHandle>>,
}

/// What `GET /v1/node` shows: the node's identity and the state of its control-plane
/// TLS material. Never a secret (no private key, no token).
#[derive(Debug, Clone, Default)]
pub struct NodeFacts {
    /// The id the agent runs as.
    pub node_id: String,
    /// The overlay address from enrollment, if enrolled.
    pub overlay_ipv6: Option<String>,
    /// The node's WireGuard public key (base64), if it has a key.
    pub wireguard_public_key: Option<String>,
    /// Connected mode: the certificate in use and the last reload and its error.
    pub control_plane_tls: Option<Arc<crate::control_plane::reload::ReloadStatus>>,
}

/// The router, every route behind [`access::authorize`]. Serve it with
/// `into_make_service_with_connect_info::<access::Caller>()`.
pub fn router(state: ApiState, rules: access::Access) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/v1/node", get(node))
        .route("/v1/overlay", get(overlay))
        .route("/metrics", get(metrics))
        .route("/v1/instances", get(list))
        .route("/v1/instances/{id}", get(one))
        .route("/v1/instances/{id}/reports", get(reports))
        .route("/v1/reports", get(history))
        .route("/v1/instances/{id}/logs", get(logs))
        .route("/v1/instances/{id}/stop", post(stop))
        .route("/v1/instances/{id}/start", post(start))
        .route("/v1/instances/{id}/exec", get(exec))
        .route("/v1/node/drain", post(drain))
        .route("/v1/node/undrain", post(undrain))
        .with_state(state)
        .layer(axum::middleware::from_fn_with_state(
            rules,
            access::authorize,
        ))
}

fn error(code: StatusCode, message: String) -> Response {
    (code, Json(json!({ "error": message }))).into_response()
}

/// A request error: status code and message.
struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        error(self.0, self.1)
    }
}

fn parse_id(id: &str) -> Result<InstanceId, ApiError> {
    InstanceId::parse(id).map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.to_string()))
}

/// `ok`, or `degraded` (503) with the reason: the state store cannot commit (disk
/// full), or the control plane refuses the agent's requests (its reports or
/// heartbeats are rejected, so the platform does not learn what this node does).
async fn healthz(State(s): State<ApiState>) -> Response {
    let refused = s
        .cp_refusals
        .as_ref()
        .map(|r| r.current())
        .unwrap_or_default();
    let reason = s.status.degraded().or_else(|| {
        refused.first().map(|r| {
            format!(
                "the control plane refuses the agent's {} requests: HTTP {}: {}",
                r.endpoint, r.code, r.message
            )
        })
    });
    let instances = s.status.list().len();
    match reason {
        None => Json(json!({ "status": "ok", "instances": instances, "notices": s.notices }))
            .into_response(),
        Some(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({
                "status": "degraded",
                "reason": reason,
                "instances": instances,
                "control_plane_refusals": refused,
                "notices": s.notices,
            })),
        )
            .into_response(),
    }
}

/// The node's identity, WireGuard public key and control-plane TLS state.
async fn node(State(s): State<ApiState>) -> Response {
    let Some(n) = s.node.as_ref() else {
        return error(StatusCode::NOT_FOUND, "no node facts in this API".into());
    };
    Json(json!({
        "node_id": n.node_id,
        "overlay_ipv6": n.overlay_ipv6,
        "wireguard_public_key": n.wireguard_public_key,
        "agent_version": env!("CARGO_PKG_VERSION"),
        "control_plane_tls": n.control_plane_tls.as_ref().map(|r| r.view()),
    }))
    .into_response()
}

/// The overlay as its owner last saw it (DESIGN §8a fields; never the private key).
async fn overlay(State(s): State<ApiState>) -> Response {
    match s.overlay.as_ref() {
        Some(o) => Json(o.view()).into_response(),
        None => error(StatusCode::NOT_FOUND, "no overlay in this API".into()),
    }
}

async fn metrics(State(s): State<ApiState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.metrics.encode(),
    )
        .into_response()
}

async fn list(State(s): State<ApiState>) -> Response {
    let mut list = s.status.list();
    with_network(&s.store, &mut list).await;
    Json(list).into_response()
}

/// Adds each instance's tap and addresses from the resource ledger (`tap` rows, whose
/// detail the qemu runtime writes as `{"ipv6", "ipv4"}`).
async fn with_network(store: &Store, views: &mut [crate::status::view::InstanceView]) {
    let Ok(rows) = store.call(|s| s.resources()).await else {
        return;
    };
    for r in rows.into_iter().filter(|r| r.kind == "tap") {
        let Some(v) = views.iter_mut().find(|v| v.instance_id == r.instance_id) else {
            continue;
        };
        let d: serde_json::Value = r
            .detail
            .as_deref()
            .and_then(|d| serde_json::from_str(d).ok())
            .unwrap_or_default();
        v.addresses = d["ipv6"]
            .as_str()
            .map(|ipv6| crate::status::view::InstanceAddresses {
                ipv6: ipv6.to_string(),
                ipv4: d["ipv4"].as_str().map(str::to_string),
            });
        v.tap = Some(r.name);
    }
}

async fn one(State(s): State<ApiState>, Path(id): Path<String>) -> Response {
    let id = match parse_id(&id) {
        Ok(id) => id,
        Err(r) => return r.into_response(),
    };
    match s.status.get(&id) {
        Some(v) => {
            let mut one = [v];
            with_network(&s.store, &mut one).await;
            let [mut v] = one;
            match detail::instance_detail(&s.store, &id, &s.data_dir).await {
                Ok(d) => v.detail = Some(d),
                Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
            }
            Json(v).into_response()
        }
        None => error(
            StatusCode::NOT_FOUND,
            format!("instance {id} is not known on this node"),
        ),
    }
}

async fn reports(State(s): State<ApiState>, Path(id): Path<String>) -> Response {
    let id = match parse_id(&id) {
        Ok(id) => id,
        Err(r) => return r.into_response(),
    };
    let iid = id.to_string();
    match s
        .store
        .call(move |st| st.delivered_reports(Some(&iid)))
        .await
    {
        Ok(rows) => {
            let reports: Vec<StatusReport> = rows
                .into_iter()
                .filter_map(|(_, _, j)| serde_json::from_str(&j).ok())
                .collect();
            Json(reports).into_response()
        }
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// Query of `GET /v1/reports`.
#[derive(serde::Deserialize)]
struct HistoryQuery {
    /// One instance only.
    instance_id: Option<String>,
    /// At most this many (the newest), default 100, at most 10 000.
    limit: Option<usize>,
}

/// `GET /v1/reports[?instance_id=&limit=]`: the report history of the node (or one
/// instance), oldest first, with the reports still queued for delivery marked
/// `pending`.
async fn history(State(s): State<ApiState>, Query(q): Query<HistoryQuery>) -> Response {
    let instance = match q.instance_id.as_deref().map(parse_id).transpose() {
        Ok(id) => id.map(|i| i.to_string()),
        Err(r) => return r.into_response(),
    };
    let limit = q.limit.unwrap_or(100).clamp(1, 10_000);
    match detail::history(&s.store, instance, limit).await {
        Ok(events) => Json(events).into_response(),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

async fn stop(State(s): State<ApiState>, Path(id): Path<String>) -> Response {
    let id = match parse_id(&id) {
        Ok(id) => id,
        Err(r) => return r.into_response(),
    };
    match s.supervisor.stop_instance(id.clone()).await {
        Ok(()) => (StatusCode::ACCEPTED, Json(json!({ "instance_id": id, "stopping": true, "reason_code": "terminated_by_operator" }))).into_response(),
        Err(e @ OperatorError::UnknownInstance(_)) => error(StatusCode::NOT_FOUND, e.to_string()),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

async fn start(State(s): State<ApiState>, Path(id): Path<String>) -> Response {
    let id = match parse_id(&id) {
        Ok(id) => id,
        Err(r) => return r.into_response(),
    };
    match s.supervisor.start_instance(id.clone()).await {
        Ok(()) => (
            StatusCode::ACCEPTED,
            Json(json!({ "instance_id": id, "starting": true })),
        )
            .into_response(),
        Err(e @ OperatorError::UnknownInstance(_)) => error(StatusCode::NOT_FOUND, e.to_string()),
        Err(e @ OperatorError::NotStopped(_)) => error(StatusCode::CONFLICT, e.to_string()),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

/// `GET /v1/instances/{id}/exec` with `Upgrade: plfm-exec`: after `101 Switching
/// Protocols` the connection carries exec frames ([`crate::exec`]). Refusals that need
/// no frame (unknown instance, not ready, too many sessions) are plain HTTP errors.
async fn exec(
    State(s): State<ApiState>,
    axum::extract::ConnectInfo(caller): axum::extract::ConnectInfo<access::Caller>,
    Path(id): Path<String>,
    req: axum::extract::Request,
) -> Response {
    let Some(svc) = s.exec.clone() else {
        return error(
            StatusCode::NOT_IMPLEMENTED,
            "exec is not available on this agent".into(),
        );
    };
    let id = match parse_id(&id) {
        Ok(id) => id,
        Err(r) => return r.into_response(),
    };
    let wants = req
        .headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("plfm-exec"));
    if !wants {
        return error(
            StatusCode::UPGRADE_REQUIRED,
            "exec needs `Connection: Upgrade` and `Upgrade: plfm-exec`, then exec frames".into(),
        );
    }
    if let Err(r) = svc.check(&id) {
        let code = StatusCode::from_u16(r.http).unwrap_or(StatusCode::CONFLICT);
        return error(code, r.message);
    }
    let who = match caller {
        access::Caller::Local { uid, pid, .. } => match pid {
            Some(pid) => format!("local uid {uid} (pid {pid})"),
            None => format!("local uid {uid}"),
        },
        access::Caller::Tcp(addr) => format!("api token holder at {addr}"),
        access::Caller::Unknown => "unknown".into(),
    };
    let on_upgrade = hyper::upgrade::on(req);
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => {
                svc.serve(hyper_util::rt::TokioIo::new(upgraded), &who, Some(&id))
                    .await
            }
            Err(e) => tracing::warn!(instance = %id, error = %e, "exec: the upgrade failed"),
        }
    });
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "upgrade")
        .header(header::UPGRADE, "plfm-exec")
        .body(axum::body::Body::empty())
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

async fn undrain(State(s): State<ApiState>) -> Response {
    match s.supervisor.undrain_node().await {
        Ok(()) => (
            StatusCode::ACCEPTED,
            Json(json!({ "node_state": "active" })),
        )
            .into_response(),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

async fn drain(State(s): State<ApiState>) -> Response {
    match s.supervisor.drain_node().await {
        Ok(()) => (
            StatusCode::ACCEPTED,
            Json(json!({ "node_state": "draining", "reason_code": "node_draining" })),
        )
            .into_response(),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

/// Query of `GET /v1/instances/{id}/logs`.
#[derive(Debug, Default, serde::Deserialize)]
pub struct LogsQuery {
    /// Keep the response open and send new lines until the instance stops.
    #[serde(default)]
    pub follow: bool,
    /// Only lines at or after this time: RFC 3339, or a duration back from now (`10m`).
    pub since: Option<String>,
    /// Only the last N lines.
    pub tail: Option<usize>,
    /// Only `stdout`, `stderr` or `console`.
    pub stream: Option<String>,
}

/// Most lines `tail` may ask for (the tail is held in memory).
pub const MAX_TAIL: usize = 100_000;
/// How often a followed log is looked at.
const FOLLOW_POLL: std::time::Duration = std::time::Duration::from_millis(200);

/// Parses `since`: RFC 3339, or a duration back from `now`.
pub fn parse_since(
    s: &str,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<chrono::DateTime<chrono::Utc>, String> {
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(s) {
        return Ok(t.with_timezone(&chrono::Utc));
    }
    let d = crate::logstore::parse_duration(s).map_err(|_| {
        format!("since: {s:?} is neither an RFC 3339 time nor a duration (10m, 2h)")
    })?;
    Ok(now - chrono::Duration::from_std(d).unwrap_or(chrono::Duration::zero()))
}

/// The instance's workload log as JSON lines (`{ts, stream, line, truncated}`), oldest
/// first; with `follow`, new lines as they come until the instance is stopped, failed
/// or removed, or the client goes. Memory stays bounded: lines are streamed through a
/// small channel, and `tail` keeps at most [`MAX_TAIL`] lines.
async fn logs(
    State(s): State<ApiState>,
    Path(id): Path<String>,
    axum::extract::Query(q): axum::extract::Query<LogsQuery>,
) -> Response {
    use crate::instance::Status;
    let id = match parse_id(&id) {
        Ok(id) => id,
        Err(r) => return r.into_response(),
    };
    let Some(dir) = s.instances_dir.as_ref().map(|d| d.join(id.as_str())) else {
        return error(
            StatusCode::NOT_FOUND,
            format!("no logs are kept for instance {id} on this node"),
        );
    };
    let known = s.status.get(&id).is_some();
    if !known && !dir.join(crate::logstore::LOG_FILE).exists() {
        return error(
            StatusCode::NOT_FOUND,
            format!("no instance {id} on this node (and no logs kept for it)"),
        );
    }
    if let Some(st) = q.stream.as_deref() {
        if plfm_guest_protocol::LogStream::parse(st).is_none() {
            return error(
                StatusCode::BAD_REQUEST,
                format!("stream: {st:?} is not stdout, stderr or console"),
            );
        }
    }
    let since = match q
        .since
        .as_deref()
        .map(|v| parse_since(v, chrono::Utc::now()))
    {
        None => None,
        Some(Ok(t)) => Some(t),
        Some(Err(e)) => return error(StatusCode::BAD_REQUEST, e),
    };
    if q.tail.is_some_and(|t| t > MAX_TAIL) {
        return error(StatusCode::BAD_REQUEST, format!("tail: at most {MAX_TAIL}"));
    }
    let query = crate::logstore::Query {
        since,
        tail: q.tail,
        stream: q.stream.clone(),
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<bytes::Bytes, std::io::Error>>(64);
    let encode = |l: &crate::logstore::StoredLine| {
        let mut v = serde_json::to_vec(l).unwrap_or_default();
        v.push(b'\n');
        bytes::Bytes::from(v)
    };
    let mut follower = crate::logstore::Follower::at_end(&dir);
    let end = follower.position();
    let (first_dir, first_q, first_tx) = (dir.clone(), query.clone(), tx.clone());
    let status = s.status.clone();
    tokio::spawn(async move {
        let done = tokio::task::spawn_blocking(move || {
            crate::logstore::read_upto(&first_dir, &first_q, end, |l| {
                let _ = first_tx.blocking_send(Ok(encode(&l)));
            });
        })
        .await;
        if done.is_err() || !q.follow {
            return;
        }
        let only = crate::logstore::Query {
            since: query.since,
            tail: None,
            stream: query.stream,
        };
        let mut last_round = false;
        loop {
            let mut out = Vec::new();
            follower.poll(|l| {
                if only.matches(&l) {
                    out.push(encode(&l));
                }
            });
            for b in out {
                if tx.send(Ok(b)).await.is_err() {
                    return;
                }
            }
            if last_round {
                return;
            }
            let ended = status
                .get(&id)
                .is_none_or(|v| matches!(v.status, Status::Stopped | Status::Failed));
            if ended {
                // One more look for the last lines in flight.
                last_round = true;
            }
            tokio::select! {
                _ = tokio::time::sleep(FOLLOW_POLL) => {}
                _ = tx.closed() => return,
            }
        }
    });
    let body = axum::body::Body::from_stream(tokio_stream_from(rx));
    ([(header::CONTENT_TYPE, "application/x-ndjson")], body).into_response()
}

/// A stream of the channel's items.
fn tokio_stream_from<T: Send + 'static>(
    rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures_util::Stream<Item = T> + Send {
    futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|v| (v, rx)) })
}
