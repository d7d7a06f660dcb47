//! Contract tests: every request the Firecracker runtime sends validates against the
//! official API description `shared/firecracker/firecracker-api-v1.16.1.yaml`, loaded
//! here (swagger 2.0): path template and method exist, path parameters match the body's
//! id, `$ref`s resolved, required fields present, types, enums and bounds respected,
//! and no property the schema does not declare (Firecracker rejects unknown fields).
//! Nothing is hand-copied from the API file.
#![cfg(target_os = "linux")]

mod common;
mod fc_standin;

use std::path::{Path, PathBuf};
use std::time::Duration;

use fc_standin::{realistic_workload, FcEnv, TestHost};
use plfm_node_agent::runtime::firecracker::api::ApiRequest;
use plfm_node_agent::runtime::firecracker::FirecrackerRuntime;
use plfm_node_agent::runtime::{BootContext, Runtime, VmEvent};
use plfm_node_agent::spec::InstanceId;
use serde_json::Value;

fn api_file() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/firecracker/firecracker-api-v1.16.1.yaml")
}

fn yaml_to_json(v: serde_yaml::Value) -> Value {
    match v {
        serde_yaml::Value::Null => Value::Null,
        serde_yaml::Value::Bool(b) => Value::Bool(b),
        serde_yaml::Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                Value::from(i)
            } else if let Some(u) = n.as_u64() {
                Value::from(u)
            } else {
                Value::from(n.as_f64().unwrap_or(0.0))
            }
        }
        serde_yaml::Value::String(s) => Value::String(s),
        serde_yaml::Value::Sequence(s) => Value::Array(s.into_iter().map(yaml_to_json).collect()),
        serde_yaml::Value::Mapping(m) => Value::Object(
            m.into_iter()
                .map(|(k, v)| {
                    let key = match k {
                        serde_yaml::Value::String(s) => s,
                        other => serde_yaml::to_string(&other)
                            .unwrap_or_default()
                            .trim()
                            .to_string(),
                    };
                    (key, yaml_to_json(v))
                })
                .collect(),
        ),
        serde_yaml::Value::Tagged(t) => yaml_to_json(t.value),
    }
}

/// The API description, or None (skip) when `shared/` is not beside the repository.
fn load_api() -> Option<Value> {
    let p = api_file();
    match std::fs::read_to_string(&p) {
        Ok(text) => Some(yaml_to_json(
            serde_yaml::from_str(&text).expect("the API file is valid YAML"),
        )),
        Err(e) => {
            common::gate::skip_or_fail(&format!("{} (cannot be read: {e})", p.display()));
            None
        }
    }
}

struct Spec<'a> {
    doc: &'a Value,
}

impl Spec<'_> {
    fn resolve<'b>(&'b self, schema: &'b Value) -> &'b Value {
        match schema.get("$ref").and_then(Value::as_str) {
            Some(r) => {
                let name = r
                    .strip_prefix("#/definitions/")
                    .unwrap_or_else(|| panic!("unsupported $ref {r}"));
                let target = &self.doc["definitions"][name];
                assert!(!target.is_null(), "dangling $ref {r}");
                self.resolve(target)
            }
            None => schema,
        }
    }

    fn validate(&self, schema: &Value, v: &Value, at: &str, errs: &mut Vec<String>) {
        let schema = self.resolve(schema);
        if let Some(allowed) = schema.get("enum").and_then(Value::as_array) {
            if !allowed.contains(v) {
                errs.push(format!("{at}: {v} is not one of {allowed:?}"));
            }
        }
        let ty = schema.get("type").and_then(Value::as_str);
        let type_ok = match ty {
            Some("object") => v.is_object(),
            Some("string") => v.is_string(),
            Some("integer") => v.is_i64() || v.is_u64(),
            Some("number") => v.is_number(),
            Some("boolean") => v.is_boolean(),
            Some("array") => v.is_array(),
            Some(other) => panic!("{at}: unsupported schema type {other}"),
            // No type: an object when it has properties, else anything.
            None => schema.get("properties").is_none() || v.is_object(),
        };
        if !type_ok {
            errs.push(format!("{at}: {v} is not of type {ty:?}"));
            return;
        }
        if let Some(n) = v.as_f64() {
            if let Some(min) = schema.get("minimum").and_then(Value::as_f64) {
                if n < min {
                    errs.push(format!("{at}: {n} < minimum {min}"));
                }
            }
            if let Some(max) = schema.get("maximum").and_then(Value::as_f64) {
                if n > max {
                    errs.push(format!("{at}: {n} > maximum {max}"));
                }
            }
        }
        if let Some(items) = schema.get("items") {
            for (i, item) in v.as_array().into_iter().flatten().enumerate() {
                self.validate(items, item, &format!("{at}[{i}]"), errs);
            }
        }
        if let Some(obj) = v.as_object() {
            let props = schema.get("properties").and_then(Value::as_object);
            for req in schema
                .get("required")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let req = req.as_str().unwrap_or_default();
                if !obj.contains_key(req) {
                    errs.push(format!("{at}: required property {req:?} missing"));
                }
            }
            let additional = schema.get("additionalProperties");
            for (k, val) in obj {
                match props.and_then(|p| p.get(k)) {
                    Some(s) => self.validate(s, val, &format!("{at}.{k}"), errs),
                    None => match additional {
                        Some(Value::Bool(true)) => {}
                        Some(s) if s.is_object() => {
                            self.validate(s, val, &format!("{at}.{k}"), errs)
                        }
                        // Firecracker's models deny unknown fields.
                        _ => errs.push(format!("{at}: unknown property {k:?}")),
                    },
                }
            }
        }
    }

    /// Validates one request; returns the errors.
    fn check(&self, method: &str, path: &str, body: Option<&Value>) -> Vec<String> {
        let mut errs = Vec::new();
        let paths = self.doc["paths"].as_object().expect("paths");
        let mut matched = None;
        for (template, item) in paths {
            if let Some(params) = match_template(template, path) {
                matched = Some((template.clone(), item, params));
                break;
            }
        }
        let Some((template, item, params)) = matched else {
            return vec![format!("{method} {path}: no such path in the API file")];
        };
        let Some(op) = item.get(method.to_ascii_lowercase()) else {
            return vec![format!("{method} {path}: {template} has no {method}")];
        };
        let parameters = op
            .get("parameters")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        let body_param = parameters
            .iter()
            .find(|p| p.get("in").and_then(Value::as_str) == Some("body"));
        match (body_param, body) {
            (Some(p), Some(b)) => {
                self.validate(&p["schema"], b, &format!("{method} {path} body"), &mut errs);
                for (name, value) in &params {
                    // Path id and body id must agree (Firecracker checks it).
                    if let Some(bv) = b.get(name).and_then(Value::as_str) {
                        if bv != value {
                            errs.push(format!("{method} {path}: body {name}={bv} != path {value}"));
                        }
                    }
                    let declared = parameters.iter().any(|p| {
                        p.get("in").and_then(Value::as_str) == Some("path")
                            && p.get("name").and_then(Value::as_str) == Some(name)
                    });
                    if !declared {
                        errs.push(format!(
                            "{method} {path}: path parameter {name} not declared"
                        ));
                    }
                }
            }
            (Some(p), None) if p.get("required").and_then(Value::as_bool) == Some(true) => {
                errs.push(format!("{method} {path}: body required"));
            }
            (None, Some(_)) => errs.push(format!("{method} {path}: takes no body")),
            _ => {}
        }
        errs
    }
}

/// Matches `/drives/{drive_id}` against `/drives/vda` → [("drive_id", "vda")].
fn match_template(template: &str, path: &str) -> Option<Vec<(String, String)>> {
    let t: Vec<&str> = template.split('/').collect();
    let p: Vec<&str> = path.split('/').collect();
    if t.len() != p.len() {
        return None;
    }
    let mut params = Vec::new();
    for (a, b) in t.iter().zip(&p) {
        if let Some(name) = a.strip_prefix('{').and_then(|x| x.strip_suffix('}')) {
            if b.is_empty() {
                return None;
            }
            params.push((name.to_string(), b.to_string()));
        } else if a != b {
            return None;
        }
    }
    Some(params)
}

fn assert_valid(spec: &Spec<'_>, reqs: &[ApiRequest]) {
    let mut errs = Vec::new();
    for r in reqs {
        errs.extend(spec.check(r.method, &r.path, r.body.as_ref()));
    }
    assert!(
        errs.is_empty(),
        "requests violate the API file:\n{}",
        errs.join("\n")
    );
}

fn runtime(env: &FcEnv) -> FirecrackerRuntime {
    env.runtime(5)
}

#[tokio::test]
async fn realistic_configuration_validates_against_the_api_file_plain_and_jailed() {
    let Some(doc) = load_api() else { return };
    let spec = Spec { doc: &doc };
    let Some(env) = FcEnv::new("run") else { return };
    let rt = runtime(&env);
    let i = InstanceId::parse("i-contract").unwrap();
    let w = realistic_workload("i-contract");
    let host = {
        use plfm_node_agent::runtime::firecracker::HostResources;
        let dir = env.data_dir().join("instances/i-contract");
        std::fs::create_dir_all(&dir).unwrap();
        TestHost::new(env.root.path(), Some("plfmtest0"))
            .with_layers(3)
            .prepare(&i, &w, &dir, None)
            .await
            .unwrap()
    };
    for jailed in [false, true] {
        let cfg = rt.vm_configuration(&i, &w, &host, jailed).unwrap();
        let reqs = cfg.requests();
        // Realistic: a root of three layer disks, scratch, two volumes, tap, vsock,
        // logger, metrics.
        let paths: Vec<&str> = reqs.iter().map(|r| r.path.as_str()).collect();
        for p in [
            "/logger",
            "/metrics",
            "/machine-config",
            "/boot-source",
            "/drives/vda",
            "/drives/vdb",
            "/drives/vdc",
            "/drives/vdd",
            "/drives/vde",
            "/drives/vdf",
            "/network-interfaces/eth0",
            "/vsock",
            "/actions",
        ] {
            assert!(paths.contains(&p), "{p} missing from {paths:?}");
        }
        // The drives in the shared order: bottom layer, scratch, the volumes, then the
        // upper layers; every layer read-only; configured (so attached) in that order.
        let drives: Vec<(String, String, bool)> = reqs
            .iter()
            .filter(|r| r.path.starts_with("/drives/"))
            .map(|r| {
                let b = r.body.as_ref().unwrap();
                let file = b["path_on_host"].as_str().unwrap();
                let name = file.rsplit('/').next().unwrap().to_string();
                (
                    b["drive_id"].as_str().unwrap().to_string(),
                    name,
                    b["is_read_only"].as_bool().unwrap(),
                )
            })
            .collect();
        let want = [
            ("vda", "root.ext4", true),
            ("vdb", "scratch.ext4", false),
            ("vdc", "vol-a.ext4", true),
            ("vdd", "vol-b.ext4", false),
            ("vde", "layer-1.ext4", true),
            ("vdf", "layer-2.ext4", true),
        ]
        .map(|(d, f, ro)| (d.to_string(), f.to_string(), ro));
        assert_eq!(drives, want, "jailed: {jailed}");
        assert_valid(&spec, &reqs);
    }
    let stop = plfm_node_agent::runtime::firecracker::api::action(
        plfm_node_agent::runtime::firecracker::api::ActionType::SendCtrlAltDel,
    );
    assert_valid(&spec, &[stop]);
    for get in ["/", "/machine-config"] {
        assert!(spec.check("GET", get, None).is_empty());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_sent_to_a_vmm_validates_against_the_api_file() {
    let Some(doc) = load_api() else { return };
    let spec = Spec { doc: &doc };
    let Some(env) = FcEnv::new("run,ignore_stop") else {
        return;
    };
    let rt = runtime(&env);
    let i = InstanceId::parse("i-wire").unwrap();
    let w = realistic_workload("i-wire");
    rt.prepare(&i, &w).await.unwrap();
    let vm = rt
        .start(
            &i,
            &w,
            BootContext {
                boot_id: "b".into(),
                secrets: None,
            },
        )
        .await
        .unwrap();
    assert_eq!(
        tokio::time::timeout(Duration::from_secs(10), rt.next_event(&vm))
            .await
            .ok(),
        Some(VmEvent::WorkloadStarted)
    );
    // Recovery probes `GET /` on a running VMM; the stop sends SendCtrlAltDel.
    let client = plfm_node_agent::runtime::firecracker::api::ApiClient::new(
        &env.data_dir().join("instances/i-wire/api.sock"),
        Duration::from_secs(2),
    );
    let info = client.instance_info().await.unwrap();
    assert_eq!(info.id, "i-wire");
    client.machine_config().await.unwrap();
    rt.stop(&vm, Duration::from_secs(1)).await;
    rt.cleanup(&i).await.unwrap();

    let sent = env.requests();
    assert!(sent.len() >= 13, "{sent:?}");
    assert!(sent.iter().any(|(_, p, b)| p == "/actions"
        && b.as_ref().and_then(|b| b["action_type"].as_str()) == Some("SendCtrlAltDel")));
    let mut errs = Vec::new();
    for (m, p, b) in &sent {
        errs.extend(spec.check(m, p, b.as_ref()));
    }
    assert!(errs.is_empty(), "{}", errs.join("\n"));
}

#[test]
fn validator_rejects_unknown_fields_bad_enums_missing_required_and_wrong_types() {
    let Some(doc) = load_api() else { return };
    let spec = Spec { doc: &doc };
    let bad = [
        (
            "PUT",
            "/actions",
            serde_json::json!({"action_type": "Reboot"}),
        ),
        ("PUT", "/vsock", serde_json::json!({"guest_cid": 3})),
        (
            "PUT",
            "/vsock",
            serde_json::json!({"guest_cid": "3", "uds_path": "/v"}),
        ),
        (
            "PUT",
            "/metrics",
            serde_json::json!({"metrics_path": "/m", "extra": 1}),
        ),
        (
            "PUT",
            "/drives/vda",
            serde_json::json!({"drive_id": "vdb", "is_root_device": false}),
        ),
        ("PUT", "/nonexistent", serde_json::json!({})),
    ];
    for (m, p, b) in bad {
        assert!(
            !spec.check(m, p, Some(&b)).is_empty(),
            "{m} {p} {b} must be rejected"
        );
    }
    assert!(spec
        .check(
            "PUT",
            "/actions",
            Some(&serde_json::json!({"action_type": "InstanceStart"}))
        )
        .is_empty());
}
