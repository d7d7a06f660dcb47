//! Where guest init finds its devices, its host channel and its instance id.
//!
//! In a VM everything is fixed: devices `/dev/vda` (bottom root layer), `/dev/vdb`
//! (scratch), `/dev/vdc…` (volumes), then the upper root layers
//! ([`plfm_guest_protocol::disks`]), the host at
//! vsock CID 2 port 5161, the instance id from `platform.instance_id=` on the kernel
//! command line, and the VM ends with `reboot(RB_AUTOBOOT)`.
//!
//! **Container test mode** (`PLFM_GUEST_TEST_MODE=1` in the environment; on a VM's kernel
//! command line such dot-less `NAME=value` words reach init's environment too) runs the same sequence as PID 1 of a PID + mount namespace:
//! - `PLFM_GUEST_HOST_SOCKET=<path>`: the host channel is this Unix socket (else vsock);
//! - `PLFM_GUEST_ROOT_DEVICE`, `PLFM_GUEST_SCRATCH_DEVICE`: root (bottom root layer)
//!   and scratch devices;
//! - `PLFM_GUEST_VOLUME_DEVICES=<dev>,<dev>…`: volume devices in `volume_id` order;
//! - `PLFM_GUEST_LAYER_DEVICES=<dev>,<dev>…`: the devices of root layers 1, 2, … (bottom
//!   to top; layer 0 is `PLFM_GUEST_ROOT_DEVICE`);
//! - `PLFM_GUEST_STAGING=<dir>`: an existing directory where guest init mounts a tmpfs
//!   and builds its `/proc`, `/mnt/lower`, … instead of in `/` (required);
//! - `PLFM_GUEST_INSTANCE_ID=<id>`: the instance id (else the kernel command line);
//! - `PLFM_GUEST_NET_IFACE=<name>`: the interface to configure (default `eth0`);
//! - `PLFM_GUEST_MODULES_DIR=<dir>`: module directory (default `/lib/modules/plfm`);
//! - `PLFM_GUEST_HANDSHAKE_TIMEOUT_MS=<ms>`: handshake deadline (default 5000);
//! - `PLFM_GUEST_EXEC_SOCKET=<path>`: serve exec sessions on this Unix socket (else vsock 5162).
//!
//! In test mode guest init exits (0 after reporting the workload's exit, 1 after a failure)
//! instead of rebooting. Outside test mode the overrides are ignored.
//!
//! This module only parses; it must not touch the system.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use plfm_guest_protocol::exec::EXEC_PORT;
use plfm_guest_protocol::{GUEST_PORT, HOST_CID};

/// Kernel command-line key carrying the instance id.
pub const CMDLINE_INSTANCE_ID: &str = "platform.instance_id";
/// Default module directory inside the initramfs.
pub const DEFAULT_MODULES_DIR: &str = "/lib/modules/plfm";
/// Default handshake deadline (DESIGN §6).
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// How guest init reaches the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostChannel {
    /// AF_VSOCK to `cid:port`.
    Vsock {
        /// Host CID (2).
        cid: u32,
        /// Port (5161).
        port: u32,
    },
    /// A Unix stream socket (test mode).
    Unix(PathBuf),
}

/// Resolved settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// Container test mode: exit instead of reboot, overrides honoured.
    pub test_mode: bool,
    /// Host channel.
    pub host: HostChannel,
    /// Root disk device.
    pub root_device: PathBuf,
    /// Scratch disk device.
    pub scratch_device: PathBuf,
    /// Explicit volume devices (test mode); `None` means `/dev/vdc`, `/dev/vdd`, ….
    pub volume_devices: Option<Vec<PathBuf>>,
    /// Explicit devices of root layers 1, 2, … (test mode); `None` means the disks after
    /// the volumes.
    pub layer_devices: Option<Vec<PathBuf>>,
    /// Directory under which `/proc`, `/mnt/…` are built before the root switch.
    pub staging: PathBuf,
    /// Instance id, if known.
    pub instance_id: Option<String>,
    /// Interface to configure.
    pub net_iface: String,
    /// Module directory.
    pub modules_dir: PathBuf,
    /// Handshake deadline.
    pub handshake_timeout: Duration,
    /// Where guest init serves exec sessions: vsock port 5162 of any CID, or (test
    /// mode, `PLFM_GUEST_EXEC_SOCKET=<path>`) a Unix socket.
    pub exec: HostChannel,
}

/// Value of `key=value` on a kernel command line (last one wins, like the kernel).
pub fn cmdline_value<'a>(cmdline: &'a str, key: &str) -> Option<&'a str> {
    cmdline
        .split_ascii_whitespace()
        .filter_map(|w| w.split_once('='))
        .filter(|(k, _)| *k == key)
        .map(|(_, v)| v)
        .next_back()
}

impl Settings {
    /// Builds settings from the environment and the kernel command line.
    pub fn from_sources(env: &BTreeMap<String, String>, cmdline: &str) -> Result<Settings, String> {
        let get = |k: &str| {
            env.get(k)
                .map(String::as_str)
                .or_else(|| cmdline_value(cmdline, k))
        };
        let test_mode = get("PLFM_GUEST_TEST_MODE") == Some("1");
        let mut s = Settings {
            test_mode,
            host: HostChannel::Vsock {
                cid: HOST_CID,
                port: GUEST_PORT,
            },
            root_device: "/dev/vda".into(),
            scratch_device: "/dev/vdb".into(),
            volume_devices: None,
            layer_devices: None,
            staging: "/".into(),
            instance_id: cmdline_value(cmdline, CMDLINE_INSTANCE_ID).map(str::to_string),
            net_iface: "eth0".into(),
            modules_dir: DEFAULT_MODULES_DIR.into(),
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            exec: HostChannel::Vsock {
                cid: libc::VMADDR_CID_ANY,
                port: EXEC_PORT,
            },
        };
        if !test_mode {
            return Ok(s);
        }
        if let Some(p) = get("PLFM_GUEST_HOST_SOCKET") {
            s.host = HostChannel::Unix(p.into());
        }
        if let Some(p) = get("PLFM_GUEST_EXEC_SOCKET") {
            s.exec = HostChannel::Unix(p.into());
        }
        if let Some(p) = get("PLFM_GUEST_ROOT_DEVICE") {
            s.root_device = p.into();
        }
        if let Some(p) = get("PLFM_GUEST_SCRATCH_DEVICE") {
            s.scratch_device = p.into();
        }
        if let Some(list) = get("PLFM_GUEST_VOLUME_DEVICES") {
            s.volume_devices = Some(
                list.split(',')
                    .filter(|d| !d.is_empty())
                    .map(PathBuf::from)
                    .collect(),
            );
        }
        if let Some(list) = get("PLFM_GUEST_LAYER_DEVICES") {
            s.layer_devices = Some(
                list.split(',')
                    .filter(|d| !d.is_empty())
                    .map(PathBuf::from)
                    .collect(),
            );
        }
        match get("PLFM_GUEST_STAGING") {
            Some(p) if p.starts_with('/') && p != "/" => s.staging = p.into(),
            _ => {
                return Err("test mode needs PLFM_GUEST_STAGING=<absolute dir other than />".into())
            }
        }
        if let Some(id) = get("PLFM_GUEST_INSTANCE_ID") {
            s.instance_id = Some(id.to_string());
        }
        if let Some(i) = get("PLFM_GUEST_NET_IFACE") {
            s.net_iface = i.to_string();
        }
        if let Some(d) = get("PLFM_GUEST_MODULES_DIR") {
            s.modules_dir = d.into();
        }
        if let Some(ms) = get("PLFM_GUEST_HANDSHAKE_TIMEOUT_MS") {
            let ms: u64 = ms
                .parse()
                .map_err(|_| format!("PLFM_GUEST_HANDSHAKE_TIMEOUT_MS={ms:?} is not a number"))?;
            s.handshake_timeout = Duration::from_millis(ms);
        }
        Ok(s)
    }

    /// Devices of the `layers` root layers, bottom first, in a VM with `volumes`
    /// volumes: the root device, then the disks after the volumes (or the test mode's
    /// list). `Err` names the first layer without a device.
    pub fn layer_devices(&self, layers: usize, volumes: usize) -> Result<Vec<PathBuf>, String> {
        let mut out = Vec::with_capacity(layers);
        for i in 0..layers {
            let dev = match (i, &self.layer_devices) {
                (0, _) => Some(self.root_device.clone()),
                (i, Some(list)) => list.get(i - 1).cloned(),
                (i, None) => Some(PathBuf::from(format!(
                    "/dev/{}",
                    crate::mounts::layer_device_name(i, volumes)
                ))),
            };
            out.push(dev.ok_or_else(|| {
                format!("no device for root layer {i} of {layers} (PLFM_GUEST_LAYER_DEVICES)")
            })?);
        }
        Ok(out)
    }

    /// Device of the `index`-th volume in `volume_id` order.
    pub fn volume_device(&self, index: usize) -> Option<PathBuf> {
        match &self.volume_devices {
            Some(list) => list.get(index).cloned(),
            None => {
                crate::mounts::volume_device_name(index).map(|n| PathBuf::from(format!("/dev/{n}")))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn vm_defaults_come_from_the_kernel_command_line() {
        let s = Settings::from_sources(
            &env(&[("PLFM_GUEST_ROOT_DEVICE", "/dev/evil")]),
            "console=ttyS0 panic=1 platform.instance_id=inst-42 reboot=k",
        )
        .unwrap();
        assert!(!s.test_mode);
        assert_eq!(s.instance_id.as_deref(), Some("inst-42"));
        assert_eq!(
            s.root_device,
            PathBuf::from("/dev/vda"),
            "override ignored outside test mode"
        );
        assert_eq!(s.host, HostChannel::Vsock { cid: 2, port: 5161 });
        assert_eq!(s.staging, PathBuf::from("/"));
        assert_eq!(s.volume_device(0), Some("/dev/vdc".into()));
        assert_eq!(s.volume_device(1), Some("/dev/vdd".into()));
        assert_eq!(
            s.layer_devices(1, 2).unwrap(),
            vec![PathBuf::from("/dev/vda")]
        );
        assert_eq!(
            s.layer_devices(3, 2).unwrap(),
            ["/dev/vda", "/dev/vde", "/dev/vdf"].map(PathBuf::from)
        );
        assert_eq!(
            s.layer_devices(3, 24).unwrap(),
            ["/dev/vda", "/dev/vdaa", "/dev/vdab"].map(PathBuf::from)
        );
    }

    #[test]
    fn test_mode_takes_overrides() {
        let s = Settings::from_sources(
            &env(&[
                ("PLFM_GUEST_TEST_MODE", "1"),
                ("PLFM_GUEST_HOST_SOCKET", "/tmp/x.sock_5161"),
                ("PLFM_GUEST_ROOT_DEVICE", "/dev/loop3"),
                ("PLFM_GUEST_SCRATCH_DEVICE", "/dev/loop4"),
                ("PLFM_GUEST_VOLUME_DEVICES", "/dev/loop5,/dev/loop6"),
                ("PLFM_GUEST_LAYER_DEVICES", "/dev/loop7,/dev/loop8"),
                ("PLFM_GUEST_STAGING", "/tmp/stage"),
                ("PLFM_GUEST_INSTANCE_ID", "t1"),
                ("PLFM_GUEST_HANDSHAKE_TIMEOUT_MS", "700"),
            ]),
            "",
        )
        .unwrap();
        assert!(s.test_mode);
        assert_eq!(s.host, HostChannel::Unix("/tmp/x.sock_5161".into()));
        assert_eq!(s.volume_device(1), Some("/dev/loop6".into()));
        assert_eq!(s.volume_device(2), None);
        assert_eq!(
            s.layer_devices(3, 2).unwrap(),
            ["/dev/loop3", "/dev/loop7", "/dev/loop8"].map(PathBuf::from)
        );
        let err = s.layer_devices(4, 2).unwrap_err();
        assert!(err.contains("root layer 3 of 4"), "{err}");
        assert_eq!(s.handshake_timeout, Duration::from_millis(700));
        assert_eq!(s.instance_id.as_deref(), Some("t1"));
    }

    #[test]
    fn test_mode_requires_a_staging_dir() {
        let err = Settings::from_sources(&env(&[("PLFM_GUEST_TEST_MODE", "1")]), "").unwrap_err();
        assert!(err.contains("PLFM_GUEST_STAGING"));
        let s = Settings::from_sources(&env(&[]), "PLFM_GUEST_TEST_MODE=1 PLFM_GUEST_STAGING=/s");
        assert!(
            s.unwrap().test_mode,
            "test mode may come from the kernel command line"
        );
    }
}
