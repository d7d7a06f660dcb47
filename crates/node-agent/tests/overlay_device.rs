//! The userspace WireGuard device (issue 14, item 1) between two "hosts": the test's
//! own network namespace (host A) and a second one it creates (host B), joined by a
//! veth pair (the underlay, 169.254.99.0/30). Each host's device is configured by
//! `overlay::device::UserspaceDevice::apply` running inside that host's namespace (host
//! B's on a thread that entered it), with `wireguard-go`. Shown: a TCP connection
//! from A to B's overlay address; a second apply changes nothing; removing the peer
//! cuts the path within that apply, restoring it heals it; a killed `wireguard-go` is
//! restarted by the next apply and the path heals.
//!
//! Needs root, `ip` and `wireguard-go` (Debian package wireguard-go); skips without
//! them, fails under `PLFM_REQUIRE_SYSTEM_TESTS=1`.

mod common;
#[path = "support/vm_host.rs"]
mod vm_host;

use std::net::{Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use base64::Engine as _;
use common::gate::skip_or_fail;
use plfm_node_agent::overlay::config::{parse, OverlayConfig, PublicKey};
use plfm_node_agent::overlay::device::UserspaceDevice;
use serde_json::json;

const NETNS_ENV: &str = "PLFM_OVERLAY_TEST_NETNS";

fn public_of(private: &[u8; 32]) -> String {
    let secret = x25519_dalek::StaticSecret::from(*private);
    base64::engine::general_purpose::STANDARD
        .encode(x25519_dalek::PublicKey::from(&secret).as_bytes())
}

fn config(me: &str, peer_key: Option<&str>, peer_ip: &str, endpoint: &str) -> OverlayConfig {
    let peers = match peer_key {
        Some(k) => {
            json!([{"node_id": "peer", "public_key": k, "endpoint": endpoint, "allowed_ips": [format!("{peer_ip}/128")], "keepalive_secs": 1}])
        }
        None => json!([]),
    };
    let doc = json!({"generation": 1, "node": {"overlay_ipv6": me, "listen_port": 51820, "mtu": 1420}, "peers": peers});
    let (c, refused) = parse(&serde_json::to_vec(&doc).unwrap(), None).unwrap();
    assert!(refused.is_empty(), "{refused:?}");
    c
}

fn sh(args: &[&str]) {
    let st = Command::new(args[0]).args(&args[1..]).status().unwrap();
    assert!(st.success(), "{args:?}: {st}");
}

/// Connects to `addr` within `within`, retrying (the first handshake takes a moment).
fn connects(addr: SocketAddr, within: Duration) -> bool {
    let end = Instant::now() + within;
    while Instant::now() < end {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(300)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

struct Cleanup {
    ns: String,
    ifaces: Vec<String>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for i in &self.ifaces {
            let _ = Command::new("pkill")
                .args(["-f", &format!("wireguard-go -f {i}$")])
                .status();
            let _ = std::fs::remove_file(Path::new("/var/run/wireguard").join(format!("{i}.sock")));
        }
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
    }
}

#[test]
fn two_hosts_reach_each_other_over_the_userspace_device_and_a_peer_change_cuts_and_heals() {
    let test =
        "two_hosts_reach_each_other_over_the_userspace_device_and_a_peer_change_cuts_and_heals";
    if std::env::var_os(NETNS_ENV).is_none() {
        if !rustix::process::geteuid().is_root() {
            return skip_or_fail("root (network namespaces, tun devices)");
        }
        for tool in ["ip", "wireguard-go", "pkill"] {
            if !vm_host::which(tool) {
                return skip_or_fail(&format!(
                    "{tool} (Debian packages iproute2, wireguard-go, procps)"
                ));
            }
        }
        vm_host::reexec_in_netns(test, NETNS_ENV, "ov");
        return;
    }
    let pid = std::process::id();
    let ns_b = format!("plfm-ovb{pid}");
    let (if_a, if_b) = (format!("plfmwa{pid}"), format!("plfmwb{pid}"));
    let _cleanup = Cleanup {
        ns: ns_b.clone(),
        ifaces: vec![if_a.clone(), if_b.clone()],
    };
    sh(&["ip", "netns", "add", &ns_b]);
    sh(&[
        "ip", "link", "add", "ovA", "type", "veth", "peer", "name", "ovB", "netns", &ns_b,
    ]);
    sh(&["ip", "addr", "add", "169.254.99.1/30", "dev", "ovA"]);
    sh(&["ip", "link", "set", "ovA", "up"]);
    sh(&[
        "ip",
        "-n",
        &ns_b,
        "addr",
        "add",
        "169.254.99.2/30",
        "dev",
        "ovB",
    ]);
    sh(&["ip", "-n", &ns_b, "link", "set", "ovB", "up"]);
    sh(&["ip", "-n", &ns_b, "link", "set", "lo", "up"]);

    let (key_a, key_b) = ([0x11u8; 32], [0x22u8; 32]);
    let (pub_a, pub_b) = (public_of(&key_a), public_of(&key_b));
    let (ip_a, ip_b) = ("fd00:a::1", "fd00:b::1");
    let tmp = tempfile::tempdir().unwrap();
    let dev_a = UserspaceDevice::new(
        &if_a,
        Path::new("wireguard-go"),
        &tmp.path().join("wg-a.log"),
    );
    let dev_b = UserspaceDevice::new(
        &if_b,
        Path::new("wireguard-go"),
        &tmp.path().join("wg-b.log"),
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();

    // Host B: its device and a TCP server on its overlay address, from a thread inside
    // its namespace.
    let ns_file = std::fs::File::open(format!("/run/netns/{ns_b}")).unwrap();
    let cfg_b = config(ip_b, Some(&pub_a), ip_a, "169.254.99.1:51820");
    let (tx, rx) = std::sync::mpsc::channel();
    let b = std::thread::spawn(move || {
        nix::sched::setns(ns_file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let applied = rt.block_on(dev_b.apply(&cfg_b, &key_b));
        let listener = TcpListener::bind((ip_b.parse::<Ipv6Addr>().unwrap(), 8080)).unwrap();
        tx.send(applied.map_err(|e| e.to_string())).unwrap();
        listener.set_nonblocking(true).unwrap();
        let end = Instant::now() + Duration::from_secs(120);
        while Instant::now() < end {
            match listener.accept() {
                Ok(_) => {}
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    });
    let applied_b = rx.recv().unwrap().expect("host B's device");
    assert!(applied_b.started && applied_b.changes == 1, "{applied_b:?}");

    let cfg_a = config(ip_a, Some(&pub_b), ip_b, "169.254.99.2:51820");
    let first = rt
        .block_on(dev_a.apply(&cfg_a, &key_a))
        .expect("host A's device");
    assert!(
        first.started && first.interface_set && first.changes == 1,
        "{first:?}"
    );
    let target: SocketAddr = format!("[{ip_b}]:8080").parse().unwrap();
    assert!(
        connects(target, Duration::from_secs(15)),
        "A cannot reach B over the overlay"
    );
    let state = rt.block_on(dev_a.state()).unwrap().unwrap();
    assert!(
        state.peers[0].last_handshake_secs > 0 && state.peers[0].rx_bytes > 0,
        "{state:?}"
    );
    assert_eq!(
        state.peers[0].public_key,
        Some(PublicKey::parse(&pub_b).unwrap())
    );

    // The same configuration again: nothing sent.
    let again = rt.block_on(dev_a.apply(&cfg_a, &key_a)).unwrap();
    assert_eq!(
        (again.started, again.interface_set, again.changes),
        (false, false, 0),
        "{again:?}"
    );

    // The peer removed: cut within the apply; restored: healed.
    let removed = rt
        .block_on(dev_a.apply(&config(ip_a, None, ip_b, ""), &key_a))
        .unwrap();
    assert_eq!(removed.changes, 1);
    assert!(
        !connects(target, Duration::from_secs(2)),
        "still reachable without the peer"
    );
    let routes = |iface: &str| {
        let out = Command::new("ip")
            .args(["-6", "route", "show", "dev", iface])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert!(
        !routes(&if_a).contains(ip_b),
        "the removed peer's route stayed: {}",
        routes(&if_a)
    );
    let restored = rt.block_on(dev_a.apply(&cfg_a, &key_a)).unwrap();
    assert_eq!(restored.changes, 1);
    assert!(
        routes(&if_a).contains(ip_b),
        "no route back: {}",
        routes(&if_a)
    );
    assert!(
        connects(target, Duration::from_secs(15)),
        "not healed after restoring the peer"
    );

    // wireguard-go killed: the next apply (the drift check's) starts it again.
    sh(&["pkill", "-9", "-f", &format!("wireguard-go -f {if_a}$")]);
    let gone = Instant::now() + Duration::from_secs(5);
    while rt.block_on(dev_a.state()).ok().flatten().is_some() && Instant::now() < gone {
        std::thread::sleep(Duration::from_millis(50));
    }
    let repaired = rt.block_on(dev_a.apply(&cfg_a, &key_a)).unwrap();
    assert!(
        repaired.started && repaired.interface_set && repaired.changes == 1,
        "{repaired:?}"
    );
    assert!(
        connects(target, Duration::from_secs(15)),
        "not healed after the restart"
    );
    drop(b);
}
