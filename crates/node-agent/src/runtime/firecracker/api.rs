//! Typed client of Firecracker's HTTP API on the instance's `--api-sock` Unix socket
//! (`shared/firecracker/firecracker-api-v1.16.1.yaml`).
//!
//! The contract: each call opens one connection, sends one request and reads one
//! response within [`ApiClient::timeout`]; a non-2xx answer becomes
//! [`ApiError::Fault`] carrying Firecracker's `fault_message`. The request models are
//! plain serde types whose field names and optional fields follow the API file exactly
//! (tests validate every body against it). This module speaks HTTP only; it does not
//! spawn, stop or decide anything.
//!
//! Client: `hyper` 1 (`client::conn::http1`) over a tokio `UnixStream`, wrapped by
//! `hyper_util::rt::TokioIo`. hyper is already in the dependency tree (reqwest), the
//! handful of calls needs no pooling, and a Unix-socket client crate would add a
//! dependency for twenty lines of glue.

use std::path::{Path, PathBuf};
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode};
use serde::{Deserialize, Serialize};

/// Errors of one API call.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The socket could not be reached.
    #[error("firecracker API {socket}: connect: {source}")]
    Connect {
        /// Socket path.
        socket: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// HTTP-level failure (handshake, write, read).
    #[error("firecracker API {method} {path}: {message}")]
    Http {
        /// Method.
        method: &'static str,
        /// Path.
        path: String,
        /// Cause.
        message: String,
    },
    /// No answer within the timeout.
    #[error("firecracker API {method} {path}: no answer within {after:?}")]
    Timeout {
        /// Method.
        method: &'static str,
        /// Path.
        path: String,
        /// The timeout.
        after: Duration,
    },
    /// Firecracker refused the request.
    #[error("firecracker API {method} {path}: {status}: {fault_message}")]
    Fault {
        /// Method.
        method: &'static str,
        /// Path.
        path: String,
        /// HTTP status.
        status: u16,
        /// Firecracker's `fault_message` (or the raw body).
        fault_message: String,
    },
    /// The answer could not be decoded.
    #[error("firecracker API {method} {path}: cannot decode the answer: {message}")]
    Decode {
        /// Method.
        method: &'static str,
        /// Path.
        path: String,
        /// Cause.
        message: String,
    },
}

/// `PUT /machine-config` (`MachineConfiguration`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineConfig {
    /// Number of vCPUs.
    pub vcpu_count: u32,
    /// Memory in MiB.
    pub mem_size_mib: u64,
    /// Simultaneous multithreading.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub smt: Option<bool>,
    /// Dirty page tracking.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub track_dirty_pages: Option<bool>,
    /// `None` or `2M`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub huge_pages: Option<String>,
}

/// `PUT /boot-source` (`BootSource`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootSource {
    /// Kernel (uncompressed ELF on x86_64).
    pub kernel_image_path: String,
    /// Initramfs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub initrd_path: Option<String>,
    /// Kernel command line.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub boot_args: Option<String>,
}

/// `PUT /drives/{drive_id}` (`Drive`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Drive {
    /// Id (also the path segment).
    pub drive_id: String,
    /// Host path of the backing file.
    pub path_on_host: String,
    /// Boot from it (we boot from the initramfs: always false).
    pub is_root_device: bool,
    /// Read-only.
    pub is_read_only: bool,
    /// `Unsafe` or `Writeback`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cache_type: Option<String>,
}

/// `PUT /network-interfaces/{iface_id}` (`NetworkInterface`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkInterface {
    /// Id (also the path segment).
    pub iface_id: String,
    /// Host tap name.
    pub host_dev_name: String,
    /// Guest MAC.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guest_mac: Option<String>,
}

/// `PUT /vsock` (`Vsock`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vsock {
    /// Guest CID (≥ 3).
    pub guest_cid: u32,
    /// Host Unix socket of the hybrid vsock.
    pub uds_path: String,
}

/// `PUT /logger` (`Logger`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Logger {
    /// Log file (must exist).
    pub log_path: String,
    /// `Error`, `Warning`, `Info`, `Debug`, `Trace` or `Off`.
    pub level: String,
    /// Prefix lines with their level.
    pub show_level: bool,
    /// Prefix lines with file:line.
    pub show_log_origin: bool,
}

/// `PUT /metrics` (`Metrics`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Metrics {
    /// Metrics file (must exist).
    pub metrics_path: String,
}

/// `PUT /actions` action types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ActionType {
    /// Boot the configured VM.
    InstanceStart,
    /// Ctrl+Alt+Del on the guest's i8042 (x86_64 only).
    SendCtrlAltDel,
    /// Flush metrics now.
    FlushMetrics,
}

/// `PUT /actions` (`InstanceActionInfo`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceActionInfo {
    /// The action.
    pub action_type: ActionType,
}

/// `GET /` (`InstanceInfo`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceInfo {
    /// The `--id` the VMM was started with.
    pub id: String,
    /// `Not started`, `Running` or `Paused`.
    pub state: String,
    /// Firecracker version.
    pub vmm_version: String,
    /// Application name.
    pub app_name: String,
}

#[derive(Deserialize)]
struct FaultBody {
    fault_message: Option<String>,
}

/// One request as sent: what contract tests check against the API file.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiRequest {
    /// `PUT` or `GET`.
    pub method: &'static str,
    /// Path, e.g. `/drives/vda`.
    pub path: String,
    /// JSON body.
    pub body: Option<serde_json::Value>,
}

impl ApiRequest {
    fn put<T: Serialize>(path: impl Into<String>, body: &T) -> ApiRequest {
        ApiRequest {
            method: "PUT",
            path: path.into(),
            // Serializing these plain structs cannot fail.
            body: Some(serde_json::to_value(body).unwrap_or(serde_json::Value::Null)),
        }
    }
}

/// Everything `PUT` before `InstanceStart`, in order.
#[derive(Debug, Clone, PartialEq)]
pub struct VmConfiguration {
    /// Logger (first, so configuration errors are logged).
    pub logger: Logger,
    /// Metrics.
    pub metrics: Metrics,
    /// Machine.
    pub machine: MachineConfig,
    /// Kernel, initramfs, command line.
    pub boot: BootSource,
    /// Drives in order (vda, vdb, vdc…).
    pub drives: Vec<Drive>,
    /// Network interfaces.
    pub interfaces: Vec<NetworkInterface>,
    /// Vsock device.
    pub vsock: Vsock,
}

impl VmConfiguration {
    /// The requests that apply this configuration, followed by `InstanceStart`.
    pub fn requests(&self) -> Vec<ApiRequest> {
        let mut v = vec![
            ApiRequest::put("/logger", &self.logger),
            ApiRequest::put("/metrics", &self.metrics),
            ApiRequest::put("/machine-config", &self.machine),
            ApiRequest::put("/boot-source", &self.boot),
        ];
        for d in &self.drives {
            v.push(ApiRequest::put(format!("/drives/{}", d.drive_id), d));
        }
        for n in &self.interfaces {
            v.push(ApiRequest::put(
                format!("/network-interfaces/{}", n.iface_id),
                n,
            ));
        }
        v.push(ApiRequest::put("/vsock", &self.vsock));
        v.push(action(ActionType::InstanceStart));
        v
    }
}

/// The `PUT /actions` request of an action.
pub fn action(action_type: ActionType) -> ApiRequest {
    ApiRequest::put("/actions", &InstanceActionInfo { action_type })
}

/// Client of one VMM's API socket.
#[derive(Debug, Clone)]
pub struct ApiClient {
    socket: PathBuf,
    timeout: Duration,
}

impl ApiClient {
    /// A client of `socket`; every call is bounded by `timeout`.
    pub fn new(socket: &Path, timeout: Duration) -> ApiClient {
        ApiClient {
            socket: socket.to_path_buf(),
            timeout,
        }
    }

    /// The per-call timeout.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Sends `req`; returns the response body of a 2xx answer.
    pub async fn send(&self, req: &ApiRequest) -> Result<Bytes, ApiError> {
        let path = req.path.clone();
        match tokio::time::timeout(self.timeout, self.send_inner(req)).await {
            Ok(r) => r,
            Err(_) => Err(ApiError::Timeout {
                method: req.method,
                path,
                after: self.timeout,
            }),
        }
    }

    async fn send_inner(&self, req: &ApiRequest) -> Result<Bytes, ApiError> {
        let http = |message: String| ApiError::Http {
            method: req.method,
            path: req.path.clone(),
            message,
        };
        let stream = tokio::net::UnixStream::connect(&self.socket)
            .await
            .map_err(|source| ApiError::Connect {
                socket: self.socket.clone(),
                source,
            })?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .map_err(|e| http(format!("handshake: {e}")))?;
        let conn = tokio::spawn(conn);
        let body = match &req.body {
            Some(v) => Bytes::from(serde_json::to_vec(v).map_err(|e| http(e.to_string()))?),
            None => Bytes::new(),
        };
        let method = if req.method == "GET" {
            Method::GET
        } else {
            Method::PUT
        };
        let mut builder = Request::builder()
            .method(method)
            .uri(req.path.as_str())
            .header("host", "localhost")
            .header("accept", "application/json");
        if req.body.is_some() {
            builder = builder.header("content-type", "application/json");
        }
        let request = builder
            .body(Full::new(body))
            .map_err(|e| http(e.to_string()))?;
        let resp = sender
            .send_request(request)
            .await
            .map_err(|e| http(e.to_string()))?;
        let status = resp.status();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| http(format!("reading the answer: {e}")))?
            .to_bytes();
        conn.abort();
        if status.is_success() {
            return Ok(bytes);
        }
        Err(fault(req, status, &bytes))
    }

    /// `GET /`.
    pub async fn instance_info(&self) -> Result<InstanceInfo, ApiError> {
        self.get_json("/").await
    }

    /// `GET /machine-config`.
    pub async fn machine_config(&self) -> Result<MachineConfig, ApiError> {
        self.get_json("/machine-config").await
    }

    /// `PUT /actions`.
    pub async fn action(&self, action_type: ActionType) -> Result<(), ApiError> {
        self.send(&action(action_type)).await.map(|_| ())
    }

    async fn get_json<T: serde::de::DeserializeOwned>(&self, path: &str) -> Result<T, ApiError> {
        let bytes = self
            .send(&ApiRequest {
                method: "GET",
                path: path.to_string(),
                body: None,
            })
            .await?;
        serde_json::from_slice(&bytes).map_err(|e| ApiError::Decode {
            method: "GET",
            path: path.to_string(),
            message: e.to_string(),
        })
    }
}

fn fault(req: &ApiRequest, status: StatusCode, body: &[u8]) -> ApiError {
    let fault_message = serde_json::from_slice::<FaultBody>(body)
        .ok()
        .and_then(|b| b.fault_message)
        .unwrap_or_else(|| {
            String::from_utf8_lossy(body)
                .trim()
                .chars()
                .take(500)
                .collect()
        });
    ApiError::Fault {
        method: req.method,
        path: req.path.clone(),
        status: status.as_u16(),
        fault_message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fault_message_is_carried_into_the_error() {
        let req = action(ActionType::InstanceStart);
        let e = fault(
            &req,
            StatusCode::BAD_REQUEST,
            br#"{"fault_message":"Cannot start microvm without kernel configuration."}"#,
        );
        assert_eq!(
            e.to_string(),
            "firecracker API PUT /actions: 400: Cannot start microvm without kernel configuration."
        );
    }

    #[test]
    fn action_body_names_the_action() {
        let r = action(ActionType::SendCtrlAltDel);
        assert_eq!(
            r.body,
            Some(serde_json::json!({"action_type": "SendCtrlAltDel"}))
        );
    }
}
