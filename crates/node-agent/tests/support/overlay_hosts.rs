//! Two "hosts" for the overlay with real VMs (`tests/overlay_vms.rs`,
//! `benches/overlay.rs`): network namespaces A and B joined by a veth underlay
//! (169.254.98.0/30), an "outside" namespace hanging off A (`fd01::/64`, A's side
//! `fd01::1`, which routes `fd00::/16` back to A), and one conformance [`Lab`] per host:
//! an agent with the qemu runtime (TCG), its own loopback registry with the busybox
//! image, and `[overlay]` with the userspace backend (`wireguard-go`,
//! `drift_check_seconds = 1`). Agent A also has egress (`[network] egress = "nat"`, the
//! uplink the veth to the outside, `overlay_prefix = "fd00::/16"`). Everything is
//! removed when [`Hosts`] is dropped: agents and VMs first, then the `wireguard-go`s
//! and the namespaces. The including crate has `mod common`, `mod lab` (the
//! conformance lab), `mod overlay`, `mod vm_host`, `mod image_support` and
//! `mod fc_standin`.
#![allow(dead_code)]

use std::os::fd::AsFd;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use crate::common::wait::poll_until;
use crate::lab::{Kind, Lab};
use crate::overlay::{self, overlay_where, Peer};
use crate::vm_host;

pub const NODE_A: &str = "fd00:a::1";
pub const NODE_B: &str = "fd00:b::1";
pub const UNDERLAY_A: &str = "169.254.98.1";
pub const UNDERLAY_B: &str = "169.254.98.2";
/// Host A's side of the link to the outside namespace, and the outside's.
pub const UPLINK_A: &str = "fd01::1";
pub const OUTSIDE: &str = "fd01::2";
pub const UPLINK_IFACE: &str = "ovout";

pub fn sh(args: &[&str]) {
    let st = Command::new(args[0]).args(&args[1..]).status().unwrap();
    assert!(st.success(), "{args:?}: {st}");
}

/// Runs `f` on a thread inside the network namespace `ns` (`/run/netns/<name>`).
pub fn on<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    let file = std::fs::File::open(format!("/run/netns/{ns}")).unwrap();
    std::thread::scope(|s| {
        s.spawn(move || {
            nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            f()
        })
        .join()
        .unwrap()
    })
}

/// What the two hosts need: `Err(why)` when something is missing.
pub fn prerequisites() -> Result<(), String> {
    if !rustix::process::geteuid().is_root() {
        return Err("root (network namespaces, taps, nftables, tun devices)".into());
    }
    if !vm_host::which("wireguard-go") {
        return Err("wireguard-go (Debian package wireguard-go)".into());
    }
    crate::lab::prerequisites(Kind::Qemu)
}

/// Stops the `wireguard-go`s and deletes the namespaces.
struct Cleanup {
    namespaces: Vec<String>,
    ifaces: Vec<String>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for i in &self.ifaces {
            overlay::kill_wireguard_go(i);
        }
        for ns in &self.namespaces {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// The two hosts and the outside. Fields drop in order: the labs (agents, VMs) before
/// the cleanup of the overlay processes and namespaces.
pub struct Hosts {
    pub lab_a: Lab,
    pub lab_b: Lab,
    pub ns_a: String,
    pub ns_b: String,
    pub ns_out: String,
    /// The overlay interfaces.
    pub if_a: String,
    pub if_b: String,
    cleanup: Cleanup,
}

impl Hosts {
    /// Namespaces tagged `tag` (several sets may exist in one process), overlay
    /// interfaces `<if_prefix>a<pid>` and `<if_prefix>b<pid>` (at most 15 bytes). The
    /// agents are not started ([`Hosts::start`]); add instances first. `None`: a lab
    /// could not be made (the gate said why).
    pub fn new(tag: &str, if_prefix: &str) -> Option<Hosts> {
        let pid = std::process::id();
        let (ns_a, ns_b, ns_out) = (
            format!("plfm-ov{tag}a{pid}"),
            format!("plfm-ov{tag}b{pid}"),
            format!("plfm-ov{tag}o{pid}"),
        );
        let (if_a, if_b) = (format!("{if_prefix}a{pid}"), format!("{if_prefix}b{pid}"));
        let cleanup = Cleanup {
            namespaces: vec![ns_a.clone(), ns_b.clone(), ns_out.clone()],
            ifaces: vec![if_a.clone(), if_b.clone()],
        };
        for ns in [&ns_a, &ns_b, &ns_out] {
            sh(&["ip", "netns", "add", ns]);
            sh(&["ip", "-n", ns, "link", "set", "lo", "up"]);
        }
        // The underlay A <-> B, and A's uplink to the outside.
        for (dev, other) in [("ovu", &ns_b), (UPLINK_IFACE, &ns_out)] {
            sh(&[
                "ip", "-n", &ns_a, "link", "add", dev, "type", "veth", "peer", "name", dev,
                "netns", other,
            ]);
        }
        for (ns, dev, addr) in [
            (&ns_a, "ovu", format!("{UNDERLAY_A}/30")),
            (&ns_b, "ovu", format!("{UNDERLAY_B}/30")),
            (&ns_a, UPLINK_IFACE, format!("{UPLINK_A}/64")),
            (&ns_out, UPLINK_IFACE, format!("{OUTSIDE}/64")),
        ] {
            let mut add = vec!["ip", "-n", ns, "addr", "add", &addr, "dev", dev];
            if addr.contains(':') {
                add.push("nodad");
            }
            sh(&add);
            sh(&["ip", "-n", ns, "link", "set", dev, "up"]);
        }
        // The outside knows its way back to the overlay prefix: only the masquerade
        // keeps a guest's address from it.
        sh(&[
            "ip",
            "-n",
            &ns_out,
            "-6",
            "route",
            "add",
            "fd00::/16",
            "via",
            UPLINK_A,
        ]);
        let overlay_table = |iface: &str| {
            format!(
                "[overlay]\ninterface = \"{iface}\"\nbackend = \"userspace\"\nuserspace_command = \"wireguard-go\"\ndrift_check_seconds = 1\n"
            )
        };
        let lab_b = Lab::own_in(Kind::Qemu, &PathBuf::from(format!("/run/netns/{ns_b}")))?;
        lab_b.config_tables(&overlay_table(&if_b));
        let lab_a = Lab::own_in(Kind::Qemu, &PathBuf::from(format!("/run/netns/{ns_a}")))?;
        lab_a.config_tables(&overlay_table(&if_a));
        lab_a.config_tables(&format!(
            "[network]\negress = \"nat\"\nuplink = \"{UPLINK_IFACE}\"\noverlay_prefix = \"fd00::/16\"\n"
        ));
        Some(Hosts {
            lab_a,
            lab_b,
            ns_a,
            ns_b,
            ns_out,
            if_a,
            if_b,
            cleanup,
        })
    }

    /// Starts both agents and waits for their public keys; the calling thread is in A's
    /// namespace afterwards.
    pub fn start(&self) {
        self.lab_b.start(&[]);
        self.lab_a.start(&[]);
        self.lab_a.enter();
        for lab in [&self.lab_a, &self.lab_b] {
            let agent = lab.agent();
            poll_until("the overlay's public key", Duration::from_secs(30), || {
                overlay_where(&agent, |v| v["public_key"].is_string())
            });
        }
    }

    fn public_key(lab: &Lab) -> String {
        overlay::public_key_of(&lab.data().join("overlay/private.key"))
    }

    /// Host A as B's peer: its node address and `instances` (overlay addresses).
    pub fn peer_a(&self, instances: &[&str]) -> Peer {
        Peer {
            node_id: "node-a".into(),
            public_key: Hosts::public_key(&self.lab_a),
            endpoint: format!("{UNDERLAY_A}:51820"),
            allowed_ips: std::iter::once(NODE_A)
                .chain(instances.iter().copied())
                .map(|ip| format!("{ip}/128"))
                .collect(),
        }
    }

    /// Host B as A's peer: its node address and `instances`.
    pub fn peer_b(&self, instances: &[&str]) -> Peer {
        Peer {
            node_id: "node-b".into(),
            public_key: Hosts::public_key(&self.lab_b),
            endpoint: format!("{UNDERLAY_B}:51820"),
            allowed_ips: std::iter::once(NODE_B)
                .chain(instances.iter().copied())
                .map(|ip| format!("{ip}/128"))
                .collect(),
        }
    }

    /// Writes A's `overlay.json`: generation `generation`, `peers`.
    pub fn overlay_a(&self, generation: i64, peers: &[Peer]) {
        overlay::write_overlay(
            &self.lab_a.root.join("desired"),
            &overlay::overlay_doc(generation, NODE_A, peers),
        );
    }

    /// Writes B's `overlay.json`.
    pub fn overlay_b(&self, generation: i64, peers: &[Peer]) {
        overlay::write_overlay(
            &self.lab_b.root.join("desired"),
            &overlay::overlay_doc(generation, NODE_B, peers),
        );
    }
}
