//! The detail of one instance for `GET /v1/instances/{id}` and the node-wide report
//! history for `GET /v1/reports`: read from the state store (desired assignment,
//! resource ledger, reports and outbox) and shaped into [`crate::status::view`] types.
//!
//! Read-only: this module never writes the store, and it never shows environment
//! values (only their names), which may hold credentials.

use std::path::Path;

use crate::spec::{AssignmentWire, HealthKind, InstanceId, RestartPolicy};
use crate::state::{ResourceRow, Store, StoreError};
use crate::status::view::{EventView, InstanceDetail, ProcessView, ResourceView, SpecSummary};

/// How many reports the instance detail carries.
pub const RECENT_REPORTS: usize = 10;

/// Reads everything the store knows of `id` beyond its status.
pub async fn instance_detail(
    store: &Store,
    id: &InstanceId,
    data_dir: &Path,
) -> Result<InstanceDetail, StoreError> {
    let iid = id.to_string();
    let cache = crate::image::store::CachePaths::new(data_dir);
    store
        .call(move |s| {
            let row = s
                .load_instances()?
                .into_iter()
                .find(|r| r.instance_id == iid);
            let wire: Option<AssignmentWire> = row
                .as_ref()
                .and_then(|r| r.desired_json.as_deref())
                .and_then(|j| serde_json::from_str(j).ok());
            let rows: Vec<ResourceRow> = s
                .resources()?
                .into_iter()
                .filter(|r| r.instance_id == iid)
                .collect();
            let recent_reports = events(s.report_history(Some(&iid), RECENT_REPORTS)?);
            let spec = wire.as_ref().and_then(summarize);
            // The root layers the VM's runtime recorded, else the image cache's disk of
            // the spec's digest, when it exists: the VM boots from them read-only (the
            // mock runtime builds none).
            let root_layers = recorded_root_layers(&rows).unwrap_or_else(|| {
                spec.as_ref()
                    .and_then(|s| s.image_digest.as_deref())
                    .and_then(|d| crate::image::Digest::parse(d).ok())
                    .map(|d| cache.disk(&d))
                    .filter(|p| p.is_file())
                    .map(|p| p.display().to_string())
                    .into_iter()
                    .collect()
            });
            let root_disk = root_layers.first().cloned();
            Ok(InstanceDetail {
                desired_state: wire.as_ref().and_then(|w| {
                    serde_json::to_value(w.desired_state)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_string))
                }),
                operator_stopped_generation: row.and_then(|r| r.operator_stopped_generation),
                spec,
                root_disk,
                root_layers,
                processes: processes(&rows),
                resources: rows
                    .into_iter()
                    .map(|r| ResourceView {
                        detail: r
                            .detail
                            .as_deref()
                            .and_then(|d| serde_json::from_str(d).ok()),
                        kind: r.kind,
                        name: r.name,
                    })
                    .collect(),
                recent_reports,
            })
        })
        .await
}

/// The last `limit` reports of one instance or of all, oldest first.
pub async fn history(
    store: &Store,
    instance: Option<String>,
    limit: usize,
) -> Result<Vec<EventView>, StoreError> {
    store
        .call(move |s| Ok(events(s.report_history(instance.as_deref(), limit)?)))
        .await
}

fn events(rows: Vec<(String, bool)>) -> Vec<EventView> {
    rows.into_iter()
        .filter_map(|(json, pending)| {
            serde_json::from_str(&json)
                .ok()
                .map(|report| EventView { report, pending })
        })
        .collect()
}

/// The desired workload in brief, or `None` when the assignment has none.
pub fn summarize(w: &AssignmentWire) -> Option<SpecSummary> {
    let spec = w.workload.as_ref()?;
    let lifecycle = spec.lifecycle.clone().unwrap_or_default();
    let mut env_names: Vec<String> = spec
        .env_vars
        .as_ref()
        .map(|e| e.keys().cloned().collect())
        .unwrap_or_default();
    env_names.sort();
    Some(SpecSummary {
        generation: spec.generation,
        image: spec.image.reference.clone(),
        image_digest: spec
            .image
            .resolved_digest
            .clone()
            .or_else(|| spec.image.digest.clone()),
        release_id: spec.release_id.clone(),
        command: spec.command.clone(),
        env_names,
        vcpu_count: spec.resources.vcpu_count,
        cpu_request: spec.resources.cpu_request,
        memory_limit_bytes: spec.resources.memory_limit_bytes,
        ephemeral_disk_bytes: spec.resources.ephemeral_disk_bytes,
        overlay_ipv6: Some(spec.network.overlay_ipv6.clone()),
        ports: spec
            .network
            .ports
            .iter()
            .flatten()
            .map(|p| {
                let proto = p.protocol.as_deref().unwrap_or("tcp");
                match &p.name {
                    Some(n) => format!("{n}:{}/{proto}", p.port),
                    None => format!("{}/{proto}", p.port),
                }
            })
            .collect(),
        mounts: spec
            .mounts
            .iter()
            .flatten()
            .map(|m| {
                let mode = if m.read_only { "ro" } else { "rw" };
                format!("{} → {} ({mode}, {})", m.volume_id, m.mount_path, m.filesystem)
            })
            .collect(),
        health: spec.health.as_ref().map(|h| {
            let target = match (h.kind, &h.path) {
                (HealthKind::Http, Some(p)) => format!("http :{}{p}", h.port),
                (HealthKind::Http, None) => format!("http :{}/", h.port),
                (HealthKind::Tcp, _) => format!("tcp :{}", h.port),
            };
            format!(
                "{target} every {}s, timeout {}s, grace {}s, ready after {} pass(es), failed after {} failure(s)",
                h.interval_seconds,
                h.timeout_seconds,
                h.grace_period_seconds,
                h.success_threshold,
                h.failure_threshold
            )
        }),
        restart_policy: match lifecycle.restart_policy {
            RestartPolicy::Always => "always",
            RestartPolicy::OnFailure => "on-failure",
            RestartPolicy::Never => "never",
        }
        .to_string(),
        max_retries: lifecycle.max_retries,
        termination_grace_seconds: lifecycle.termination_grace_seconds,
        spec_hash: spec.spec_hash.clone(),
    })
}

/// The root layer disks (bottom first) a runtime recorded in a `process` row's detail
/// (`"root_layers": [...]`), when one did.
fn recorded_root_layers(rows: &[ResourceRow]) -> Option<Vec<String>> {
    rows.iter()
        .filter(|r| r.kind == "process")
        .filter_map(|r| r.detail.as_deref())
        .filter_map(|d| serde_json::from_str::<serde_json::Value>(d).ok())
        .find_map(|v| {
            let layers: Vec<String> = v
                .get("root_layers")?
                .as_array()?
                .iter()
                .filter_map(|l| l.as_str().map(str::to_string))
                .collect();
            (!layers.is_empty()).then_some(layers)
        })
}

/// The VMM pids in the `process` rows: a row's detail is either one process identity
/// (`{"pid", "start_time"}`: Firecracker) or a record whose fields hold several
/// (`{"qemu": {"pid", …}, "vhost": {"pid", …}}`: qemu).
fn processes(rows: &[ResourceRow]) -> Vec<ProcessView> {
    let mut out = Vec::new();
    for r in rows.iter().filter(|r| r.kind == "process") {
        let Some(d) = r
            .detail
            .as_deref()
            .and_then(|d| serde_json::from_str::<serde_json::Value>(d).ok())
        else {
            continue;
        };
        let pid = |v: &serde_json::Value| {
            v.get("pid")
                .and_then(|p| p.as_u64())
                .and_then(|p| u32::try_from(p).ok())
        };
        if let Some(p) = pid(&d) {
            out.push(ProcessView {
                role: "vmm".into(),
                pid: p,
            });
        } else if let Some(fields) = d.as_object() {
            for (role, v) in fields {
                if let Some(p) = pid(v) {
                    out.push(ProcessView {
                        role: role.clone(),
                        pid: p,
                    });
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(detail: &str) -> ResourceRow {
        ResourceRow {
            kind: "process".into(),
            name: "x".into(),
            instance_id: "i".into(),
            detail: Some(detail.into()),
        }
    }

    #[test]
    fn root_layers_are_read_from_both_runtimes_records() {
        let fc = row(r#"{"pid": 41, "start_time": 7, "root_layers": ["/c/l0", "/c/l1"]}"#);
        assert_eq!(
            recorded_root_layers(std::slice::from_ref(&fc)),
            Some(vec!["/c/l0".to_string(), "/c/l1".to_string()])
        );
        assert_eq!(processes(&[fc]).len(), 1, "the list is not a process");
        let qemu = row(
            r#"{"instance_id":"i","qemu":{"pid":10,"start_time":1},"root_layers":["/c/flat"]}"#,
        );
        assert_eq!(
            recorded_root_layers(&[qemu]),
            Some(vec!["/c/flat".to_string()])
        );
        assert_eq!(recorded_root_layers(&[row(r#"{"pid": 41}"#)]), None);
    }

    #[test]
    fn vmm_pids_are_read_from_both_runtimes_records() {
        let fc = processes(&[row(r#"{"pid": 41, "start_time": 7}"#)]);
        assert_eq!(
            fc,
            vec![ProcessView {
                role: "vmm".into(),
                pid: 41
            }]
        );
        let qemu = processes(&[row(
            r#"{"instance_id":"i","qemu":{"pid":10,"start_time":1},"vhost":{"pid":11,"start_time":2},"address":null}"#,
        )]);
        assert_eq!(
            qemu,
            vec![
                ProcessView {
                    role: "qemu".into(),
                    pid: 10
                },
                ProcessView {
                    role: "vhost".into(),
                    pid: 11
                }
            ]
        );
    }

    #[test]
    fn summary_lists_env_names_but_never_values() {
        let wire: AssignmentWire = serde_json::from_value(serde_json::json!({
            "instance_id": "i1", "generation": 3, "desired_state": "running",
            "workload": {
                "instance_id": "i1", "generation": 3,
                "image": {"ref": "r/app:1", "resolved_digest": format!("sha256:{}", "a".repeat(64))},
                "env_vars": {"B": "secret-b", "A": "secret-a"},
                "resources": {"cpu_request": 1.0, "memory_limit_bytes": 268435456},
                "network": {"overlay_ipv6": "fd00::5", "gateway_ipv6": "fd00::1",
                            "ports": [{"name": "web", "port": 8080}]},
                "health": {"type": "http", "port": 8080, "path": "/healthz"},
                "lifecycle": {"restart_policy": "on-failure"}
            }
        }))
        .expect("assignment");
        let s = summarize(&wire).expect("summary");
        assert_eq!(s.env_names, ["A", "B"]);
        let json = serde_json::to_string(&s).expect("json");
        assert!(!json.contains("secret"), "{json}");
        assert_eq!(s.ports, ["web:8080/tcp"]);
        assert_eq!(s.restart_policy, "on-failure");
        assert!(
            s.health
                .as_deref()
                .is_some_and(|h| h.starts_with("http :8080/healthz every 10s")),
            "{:?}",
            s.health
        );
    }
}
