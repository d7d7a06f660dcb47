//! `describe <id>`: everything the agent knows of one instance (`GET
//! /v1/instances/{id}`), laid out like `kubectl describe`, or the full object with
//! `--json`.
//!
//! Formatting only: what is shown is the API's; nothing is computed here beyond
//! human-friendly durations and sizes.

use std::fmt::Write as _;

use anyhow::Context;
use chrono::{DateTime, Utc};

use super::{human, Api};
use crate::status::view::InstanceView;

/// `describe <id> [--json]`.
pub async fn describe(api: &Api, id: &str, json: bool) -> anyhow::Result<()> {
    crate::spec::InstanceId::parse(id)?;
    let body = api
        .send(
            api.get(&format!("/v1/instances/{id}")),
            &format!("describe {id}"),
        )
        .await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&body)?);
        return Ok(());
    }
    let v: InstanceView = serde_json::from_value(body).context("unexpected instance view")?;
    print!("{}", render(&v, Utc::now()));
    Ok(())
}

/// Renders one instance as labelled sections.
pub fn render(v: &InstanceView, now: DateTime<Utc>) -> String {
    let mut o = String::new();
    let dash = |s: Option<&str>| s.filter(|s| !s.is_empty()).unwrap_or("-").to_string();
    // Writing into a String cannot fail.
    let line = |o: &mut String, indent: usize, label: &str, value: &str| {
        let _ = writeln!(
            o,
            "{:indent$}{:<width$}{value}",
            "",
            format!("{label}:"),
            width = 16 - indent.min(8) + 2
        );
    };
    line(&mut o, 0, "Instance", &v.instance_id);
    line(&mut o, 0, "Generation", &v.generation.to_string());
    line(
        &mut o,
        0,
        "Status",
        &format!(
            "{} (for {}, since {})",
            v.status.as_str(),
            human::age(&v.updated_at, now),
            human::time(&v.updated_at)
        ),
    );
    line(
        &mut o,
        0,
        "Reason",
        &dash(v.reason_code.map(|r| r.as_str())),
    );
    line(&mut o, 0, "Message", &dash(v.error_message.as_deref()));
    line(
        &mut o,
        0,
        "Exit code",
        &dash(v.exit_code.map(|c| c.to_string()).as_deref()),
    );
    line(&mut o, 0, "Restarts", &v.restarts.to_string());
    line(&mut o, 0, "Boot id", &dash(v.boot_id.as_deref()));
    let d = v.detail.as_ref();
    if let Some(d) = d {
        line(&mut o, 0, "Desired", &dash(d.desired_state.as_deref()));
        if let Some(g) = d.operator_stopped_generation {
            line(
                &mut o,
                0,
                "Operator stop",
                &format!(
                    "generation {g} (lifted by `start {}` or a new spec)",
                    v.instance_id
                ),
            );
        }
    }
    if let Some(s) = d.and_then(|d| d.spec.as_ref()) {
        o.push_str("Spec:\n");
        line(&mut o, 2, "Image", &dash(s.image.as_deref()));
        line(&mut o, 2, "Digest", &dash(s.image_digest.as_deref()));
        line(&mut o, 2, "Release", &dash(s.release_id.as_deref()));
        let cmd = if s.command.is_empty() {
            "(the image's)".to_string()
        } else {
            s.command.join(" ")
        };
        line(&mut o, 2, "Command", &cmd);
        line(
            &mut o,
            2,
            "Env",
            &if s.env_names.is_empty() {
                "-".into()
            } else {
                s.env_names.join(", ")
            },
        );
        let mut res = Vec::new();
        if let Some(n) = s.vcpu_count {
            res.push(format!("{n} vCPU"));
        }
        res.push(format!("{} CPU request", s.cpu_request));
        res.push(format!(
            "{} memory",
            human::bytes(s.memory_limit_bytes.max(0) as u64)
        ));
        if let Some(b) = s.ephemeral_disk_bytes {
            res.push(format!("{} scratch disk", human::bytes(b.max(0) as u64)));
        }
        line(&mut o, 2, "Resources", &res.join(", "));
        line(
            &mut o,
            2,
            "Ports",
            &if s.ports.is_empty() {
                "-".into()
            } else {
                s.ports.join(", ")
            },
        );
        for (i, m) in s.mounts.iter().enumerate() {
            line(&mut o, 2, if i == 0 { "Volumes" } else { "" }, m);
        }
        line(&mut o, 2, "Health check", &dash(s.health.as_deref()));
        line(
            &mut o,
            2,
            "Restart policy",
            &format!(
                "{} (at most {} retries before crash_loop_backoff), termination grace {}",
                s.restart_policy,
                s.max_retries,
                human::duration(std::time::Duration::from_secs(s.termination_grace_seconds))
            ),
        );
        line(&mut o, 2, "Spec hash", &dash(s.spec_hash.as_deref()));
    }
    o.push_str("Network:\n");
    let overlay = v.addresses.as_ref().map(|a| a.ipv6.clone()).or_else(|| {
        d.and_then(|d| d.spec.as_ref())
            .and_then(|s| s.overlay_ipv6.clone())
    });
    line(&mut o, 2, "Overlay IPv6", &dash(overlay.as_deref()));
    line(
        &mut o,
        2,
        "IPv4 link",
        &dash(v.addresses.as_ref().and_then(|a| a.ipv4.as_deref())),
    );
    line(&mut o, 2, "Tap", &dash(v.tap.as_deref()));
    let Some(d) = d else {
        return o;
    };
    o.push_str("Processes:\n");
    if d.processes.is_empty() {
        o.push_str("  (none recorded)\n");
    }
    for p in &d.processes {
        line(&mut o, 2, &p.role, &format!("pid {}", p.pid));
    }
    let disks: Vec<_> = d
        .resources
        .iter()
        .filter(|r| r.kind == "disk" || r.kind == "volume")
        .collect();
    o.push_str("Disks:\n");
    match d.root_layers.len() {
        0 | 1 => {
            if let Some(root) = d.root_disk.as_ref().or(d.root_layers.first()) {
                line(&mut o, 2, "Root (ro)", root);
            }
        }
        n => {
            // Bottom first, as the guest stacks them (vda is the bottom).
            line(&mut o, 2, "Root (ro)", &format!("{n} layers, bottom first"));
            for (i, layer) in d.root_layers.iter().enumerate() {
                line(&mut o, 4, &format!("Layer {i}"), layer);
            }
        }
    }
    if disks.is_empty() && d.root_disk.is_none() && d.root_layers.is_empty() {
        o.push_str("  (none recorded)\n");
    }
    for r in disks {
        let label = if r.kind == "disk" {
            "Scratch"
        } else {
            "Volume"
        };
        line(&mut o, 2, label, &r.name);
    }
    o.push_str("Resources:\n");
    if d.resources.is_empty() {
        o.push_str("  (none recorded)\n");
    }
    for r in &d.resources {
        let _ = writeln!(o, "  {:<13} {}", r.kind, r.name);
    }
    o.push_str("Recent reports:\n");
    if d.recent_reports.is_empty() {
        o.push_str("  (none)\n");
    } else {
        for l in super::events::table(&d.recent_reports, false, now).lines() {
            let _ = writeln!(o, "  {l}");
        }
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_section_is_shown_with_human_units() {
        let now = DateTime::parse_from_rfc3339("2026-11-29T23:40:00Z")
            .expect("time")
            .with_timezone(&Utc);
        let v: InstanceView = serde_json::from_value(serde_json::json!({
            "instance_id": "web-1", "generation": 2, "status": "ready", "restarts": 1,
            "seq": 3, "updated_at": "2026-11-29T23:36:48Z", "boot_id": "b-1",
            "reason_code": null, "error_message": null, "exit_code": null,
            "addresses": {"ipv6": "fd00::5", "ipv4": "169.254.0.2"}, "tap": "plfm-ab12",
            "detail": {
                "desired_state": "running",
                "root_disk": "/var/lib/plfm/images/disks/sha256/aa.v1.ext4",
                "spec": {"generation": 2, "image": "r/app:1", "image_digest": "sha256:aa",
                         "command": [], "env_names": ["A"], "vcpu_count": 2, "cpu_request": 1.0,
                         "memory_limit_bytes": 536870912, "ephemeral_disk_bytes": 4294967296u64,
                         "ports": ["web:8080/tcp"], "mounts": [], "health": "tcp :8080 every 10s",
                         "restart_policy": "always", "max_retries": 3, "termination_grace_seconds": 10},
                "resources": [{"kind": "disk", "name": "/var/lib/plfm/disks/web-1.ext4"},
                              {"kind": "tap", "name": "plfm-ab12"}],
                "processes": [{"role": "qemu", "pid": 4242}],
                "recent_reports": [{"instance_id": "web-1", "status": "ready", "generation": 2,
                                    "observed_at": "2026-11-29T23:36:48Z", "seq": 3}]
            }
        }))
        .expect("view");
        let out = render(&v, now);
        for want in [
            "Instance:",
            "web-1",
            "ready (for 3m12s, since 2026-11-29 23:36:48)",
            "Restarts:",
            "r/app:1",
            "sha256:aa",
            "2 vCPU, 1 CPU request, 512.0 MiB memory, 4.0 GiB scratch disk",
            "web:8080/tcp",
            "tcp :8080 every 10s",
            "always (at most 3 retries",
            "fd00::5",
            "169.254.0.2",
            "plfm-ab12",
            "qemu:",
            "pid 4242",
            "Root (ro):",
            "/var/lib/plfm/images/disks/sha256/aa.v1.ext4",
            "Scratch:",
            "/var/lib/plfm/disks/web-1.ext4",
            "Recent reports:",
        ] {
            assert!(out.contains(want), "missing {want:?} in\n{out}");
        }
    }

    #[test]
    fn a_stacked_root_lists_its_layers_bottom_first() {
        let now = Utc::now();
        let v: InstanceView = serde_json::from_value(serde_json::json!({
            "instance_id": "web-1", "generation": 2, "status": "ready", "restarts": 0,
            "seq": 3, "updated_at": "2026-11-29T23:36:48Z",
            "detail": {
                "root_disk": "/c/l0.ext4",
                "root_layers": ["/c/l0.ext4", "/c/l1.ext4", "/c/l2.ext4"]
            }
        }))
        .expect("view");
        let out = render(&v, now);
        let at = |s: &str| out.find(s).unwrap_or_else(|| panic!("no {s:?} in\n{out}"));
        assert!(out.contains("Root (ro):"), "{out}");
        assert!(out.contains("3 layers, bottom first"), "{out}");
        assert!(at("Layer 0:") < at("/c/l0.ext4"));
        assert!(at("/c/l0.ext4") < at("/c/l1.ext4") && at("/c/l1.ext4") < at("/c/l2.ext4"));
        assert!(out.contains("Layer 2:"), "{out}");
    }
}
