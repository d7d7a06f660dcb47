//! What a VM is given, the same for every VMM: the guest config of the handshake
//! (DESIGN §6) and the VM's size (memory, vCPUs, CPU weight, the VMM cgroup's limit).
//!
//! One builder, one sizing rule: the runtimes turn the result into their own dialect
//! (QEMU's argv, Firecracker's `/machine-config`) but never re-derive it. This module
//! must not log the config it builds: it carries secret material.

use std::net::IpAddr;

use plfm_guest_protocol as gp;

use crate::image::MergedProcess;
use crate::runtime::RuntimeError;
use crate::secrets::SecretMaterial;
use crate::spec::Workload;

/// MTU of eth0 when the spec gives none (DESIGN §3).
pub const DEFAULT_MTU: u32 = 1420;
/// Mode of the secrets file when the spec gives none.
pub const DEFAULT_SECRETS_MODE: u32 = 0o400;
/// Smallest guest memory, MiB: a platform kernel and guest init need about this much.
pub const MIN_GUEST_MIB: u64 = 128;
/// Most vCPUs a VM gets.
pub const MAX_VCPUS: u32 = 32;

/// Guest memory in MiB: the spec's `memory_limit_bytes` rounded up to whole MiB, at
/// least [`MIN_GUEST_MIB`].
pub fn guest_mem_mib(w: &Workload) -> u64 {
    (w.spec.resources.memory_limit_bytes.max(0) as u64)
        .div_ceil(1 << 20)
        .max(MIN_GUEST_MIB)
}

/// vCPUs: the spec's `vcpu_count`, else `cpu_request` rounded up, within 1..=32.
pub fn vcpus(w: &Workload) -> u32 {
    let r = &w.spec.resources;
    r.vcpu_count
        .unwrap_or_else(|| r.cpu_request.ceil().clamp(1.0, f64::from(MAX_VCPUS)) as u32)
        .clamp(1, MAX_VCPUS)
}

/// CPU weight of the VMM's cgroup (DESIGN §5): the spec's `cpu_weight`, else
/// `cpu_request × 100`, within 1..=10000.
pub fn cpu_weight(w: &Workload) -> u32 {
    let r = &w.spec.resources;
    r.cpu_weight
        .unwrap_or_else(|| (r.cpu_request * 100.0).round().clamp(1.0, 10_000.0) as u32)
        .clamp(1, 10_000)
}

/// Memory limit of the VMM processes' host cgroup, bytes: guest memory plus the VMM's
/// own overhead.
pub fn vmm_memory_limit(w: &Workload, overhead_mib: u64) -> u64 {
    (guest_mem_mib(w) + overhead_mib) << 20
}

/// `uid[:gid]` numbers from the image's `User` (root when unset); user names cannot be
/// resolved on the host, so they are refused.
pub fn parse_user(user: Option<&str>) -> Result<(u32, u32), RuntimeError> {
    let Some(u) = user.filter(|u| !u.is_empty()) else {
        return Ok((0, 0));
    };
    let bad = || {
        RuntimeError::VmmStart(
            format!("image user {u:?}: only a numeric uid[:gid] is supported").into(),
        )
    };
    let (a, b) = u.split_once(':').unwrap_or((u, ""));
    let uid: u32 = a.parse().map_err(|_| bad())?;
    let gid = if b.is_empty() {
        uid
    } else {
        b.parse().map_err(|_| bad())?
    };
    Ok((uid, gid))
}

/// The guest's network when the host made none (a runtime without host networking):
/// the spec's overlay address as a /128 with its gateway, MTU and DNS.
fn spec_network(w: &Workload) -> Result<Option<gp::NetworkConfig>, RuntimeError> {
    let n = &w.spec.network;
    let Ok(address) = n.overlay_ipv6.parse::<IpAddr>() else {
        return Ok(None);
    };
    let mut dns = Vec::new();
    for d in n.dns.iter().flatten() {
        dns.push(d.parse::<IpAddr>().map_err(|_| {
            RuntimeError::Network(format!("network.dns {d:?} is not an IP address").into())
        })?);
    }
    Ok(Some(gp::NetworkConfig {
        address,
        prefix_len: 128,
        gateway: n.gateway_ipv6.parse().ok(),
        mtu: n.mtu.unwrap_or(DEFAULT_MTU),
        dns,
        ipv4: None,
    }))
}

/// The guest config of the handshake (DESIGN §6). `process` is the image's defaults
/// merged under the spec (argv, env, cwd, user); without it the spec's own command,
/// env and workdir are used as they are. `root_layers` is how many layer disks the
/// root is stacked from (the VMM attached them in the order of
/// `plfm_guest_protocol::disks`). `network` is what host networking made
/// (else the spec's overlay address). Secret material must be UTF-8 (secrets format
/// v1): other bytes fail with `secrets_injection_failed`, never reach the guest mangled.
pub fn guest_config(
    w: &Workload,
    process: Option<&MergedProcess>,
    root_layers: u32,
    network: Option<gp::NetworkConfig>,
    secrets: Option<&SecretMaterial>,
) -> Result<gp::Config, RuntimeError> {
    let s = &w.spec;
    let (argv, env, cwd, user) = match process {
        Some(p) => (
            p.argv.clone(),
            p.env.clone(),
            Some(p.cwd.clone()),
            p.user.as_deref(),
        ),
        None => (
            s.command.clone(),
            s.env_vars.clone().unwrap_or_default().into_iter().collect(),
            s.workdir.clone(),
            None,
        ),
    };
    let (uid, gid) = parse_user(user)?;
    let network = match network {
        Some(n) => Some(n),
        None => spec_network(w)?,
    };
    let mut mounts: Vec<gp::MountConfig> = s
        .mounts
        .iter()
        .flatten()
        .map(|m| gp::MountConfig {
            volume_id: m.volume_id.clone(),
            mount_path: m.mount_path.clone(),
            read_only: m.read_only,
            filesystem: m.filesystem.clone(),
        })
        .collect();
    mounts.sort_by(|a, b| a.volume_id.cmp(&b.volume_id));
    let secrets = match &s.secrets {
        None => None,
        Some(sec) => Some(gp::SecretsConfig {
            required: sec.required,
            path: sec.mount_path.clone(),
            mode: sec.mode.unwrap_or(DEFAULT_SECRETS_MODE),
            uid: sec.uid,
            gid: sec.gid,
            data: secrets.map(secrets_data).transpose()?,
        }),
    };
    Ok(gp::Config {
        config_version: gp::CONFIG_VERSION.to_string(),
        instance_id: s.instance_id.clone(),
        generation: i64::from(s.generation),
        workload: gp::WorkloadConfig {
            argv,
            cwd,
            env,
            uid,
            gid,
            // Both kinds of health check need a listening TCP socket first.
            listen_port: s.health.as_ref().map(|h| h.port),
        },
        network,
        mounts,
        root_layers,
        secrets,
    })
}

fn secrets_data(m: &SecretMaterial) -> Result<gp::SecretsData, RuntimeError> {
    match std::str::from_utf8(m.bytes()) {
        Ok(text) => Ok(gp::SecretsData::new(text.to_string())),
        Err(_) => Err(RuntimeError::SecretsInjection(
            format!(
                "secrets version {} is not UTF-8 (secrets format v1 is UTF-8 text)",
                m.version_id
            )
            .into(),
        )),
    }
}

/// The config sent to a guest that reconnects after an agent restart (`hello
/// {resumed: true}`): the running guest does not apply it, so it carries nothing,
/// secrets least of all.
pub fn resumed_config(instance_id: &str, generation: i32) -> gp::Config {
    gp::Config {
        config_version: gp::CONFIG_VERSION.to_string(),
        instance_id: instance_id.to_string(),
        generation: i64::from(generation),
        workload: gp::WorkloadConfig {
            argv: vec![],
            cwd: None,
            env: Default::default(),
            uid: 0,
            gid: 0,
            listen_port: None,
        },
        network: None,
        mounts: vec![],
        root_layers: 1,
        secrets: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn workload(extra: serde_json::Value) -> std::sync::Arc<Workload> {
        let mut w = serde_json::json!({
            "spec_version": "v1", "instance_id": "i-1", "generation": 2,
            "image": {"digest": "sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
                      "resolved_digest": "sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"},
            "command": ["/app"],
            "resources": {"cpu_request": 1.5, "memory_limit_bytes": 200_000_000_i64},
            "network": {"overlay_ipv6": "fd00::1", "gateway_ipv6": "fe80::1"},
            "mounts": [
                {"volume_id": "vol-b", "mount_path": "/b", "read_only": false, "filesystem": "ext4"},
                {"volume_id": "vol-a", "mount_path": "/a", "read_only": true, "filesystem": "ext4"}
            ],
            "secrets": {"required": true, "secret_version_id": "v1", "mount_path": "/run/secrets/platform.env"}
        });
        if let (Some(w), Some(e)) = (w.as_object_mut(), extra.as_object()) {
            for (k, v) in e {
                w.insert(k.clone(), v.clone());
            }
        }
        let a = serde_json::json!({"instance_id": "i-1", "generation": 2, "desired_state": "running", "workload": w});
        crate::spec::decode_assignment(&a, "test")
            .unwrap()
            .workload
            .unwrap()
    }

    #[test]
    fn sizing_is_one_rule_for_every_vmm() {
        let w = workload(serde_json::json!({}));
        assert_eq!(guest_mem_mib(&w), 191, "200 MB rounded up to whole MiB");
        assert_eq!(vcpus(&w), 2);
        assert_eq!(cpu_weight(&w), 150);
        assert_eq!(vmm_memory_limit(&w, 64), (191 + 64) << 20);
        let small = workload(
            serde_json::json!({"resources": {"cpu_request": 0.001, "memory_limit_bytes": 67108864_i64, "vcpu_count": 4, "cpu_weight": 10000}}),
        );
        assert_eq!(guest_mem_mib(&small), MIN_GUEST_MIB);
        assert_eq!((vcpus(&small), cpu_weight(&small)), (4, 10_000));
    }

    #[test]
    fn the_config_resolves_defaults_once() {
        let w = workload(serde_json::json!({}));
        let p = MergedProcess {
            argv: vec!["/app".into(), "--x".into()],
            env: [("A".to_string(), "1".to_string())].into(),
            cwd: "/srv".into(),
            user: Some("1000:50".into()),
        };
        let c = guest_config(&w, Some(&p), 3, None, None).unwrap();
        assert_eq!(c.root_layers, 3);
        assert_eq!((c.workload.uid, c.workload.gid), (1000, 50));
        assert_eq!(c.workload.cwd.as_deref(), Some("/srv"));
        let n = c.network.unwrap();
        assert_eq!((n.prefix_len, n.mtu), (128, DEFAULT_MTU));
        let ids: Vec<_> = c.mounts.iter().map(|m| m.volume_id.as_str()).collect();
        assert_eq!(ids, ["vol-a", "vol-b"]);
        let s = c.secrets.unwrap();
        assert_eq!((s.mode, s.data.is_none()), (DEFAULT_SECRETS_MODE, true));
        let named = MergedProcess {
            user: Some("nobody".into()),
            ..p
        };
        let e = guest_config(&w, Some(&named), 1, None, None).unwrap_err();
        assert!(e.to_string().contains("numeric"), "{e}");
    }

    #[test]
    fn secrets_that_are_not_utf8_are_refused_not_mangled() {
        let w = workload(serde_json::json!({}));
        let ok = SecretMaterial::new("v1", b"# TRC_SECRETS_V1\nA=b\n".to_vec()).unwrap();
        let c = guest_config(&w, None, 1, None, Some(&ok)).unwrap();
        let data = c.secrets.unwrap().data.unwrap();
        assert_eq!(data.expose(), "# TRC_SECRETS_V1\nA=b\n");
        // Material is validated as UTF-8 when it is fetched: bytes that are not never
        // become material, so no runtime can pass them on mangled.
        let e = SecretMaterial::new("v1", vec![b'#', 0xff, 0xfe, b'\n'])
            .err()
            .unwrap();
        assert_eq!(
            e.reason(),
            crate::instance::ReasonCode::SecretsInjectionFailed
        );
        assert!(e.to_string().contains("not UTF-8"), "{e}");
    }
}
