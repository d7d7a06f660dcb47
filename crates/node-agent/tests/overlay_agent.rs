//! The overlay owner in the real agent (issue 14, items 1, 2 and 5): two "hosts" as two
//! network namespaces joined by a veth pair (underlay 169.254.99.0/30, overlay
//! addresses in fd00::/8), one agent process per namespace in standalone mode (mock
//! runtime, no VMs), each with `<desired_dir>/overlay.json` naming the other as its
//! peer. Shown, in order:
//! - the public key is served from the first start on, with the overlay off, and is the
//!   one derived from the key file;
//! - (a) a TCP connection from host A to B's overlay address through the tunnel;
//! - (b) `overlay --json` shows the peer with a handshake and bytes;
//! - (c) the peer removed from B's file cuts the path once B applied it, and restoring
//!   it heals the path;
//! - (d) a `wireguard-go` killed with SIGKILL is restarted by the drift check
//!   (`drift_check_seconds = 1`) and the path heals; counted as `drift_repaired`;
//! - (e) the agent killed with SIGKILL and started again keeps the interface (same
//!   ifindex, same `wireguard-go`) and traffic flows;
//! - B's `overlay.json` removed: B's overlay is off, its interface, `wireguard-go` and
//!   kept configuration are gone;
//! - (f) the private key appears nowhere in the agents' output (stdout and stderr, at
//!   debug level), in `overlay`, `status` or `/metrics`.
//!
//! Needs root, `ip` and `wireguard-go` (Debian packages iproute2, wireguard-go); skips
//! without them, fails under `PLFM_REQUIRE_SYSTEM_TESTS=1`.

mod common;
#[path = "support/overlay.rs"]
mod overlay;
#[path = "support/vm_host.rs"]
mod vm_host;

use std::net::{Ipv6Addr, SocketAddr, TcpListener};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use common::agent::{mock_agent_dir, AgentProcess, BIN};
use common::gate::skip_or_fail;
use common::wait::poll_until;
use overlay::{connects, overlay_where, wireguard_go_pid};
use serde_json::{json, Value};

const NETNS_ENV: &str = "PLFM_OVERLAY_AGENT_TEST_NETNS";
const IP_A: &str = "fd00:a::1";
const IP_B: &str = "fd00:b::1";
const UNDERLAY_A: &str = "169.254.99.1";
const UNDERLAY_B: &str = "169.254.99.2";

fn sh(args: &[&str]) {
    let st = Command::new(args[0]).args(&args[1..]).status().unwrap();
    assert!(st.success(), "{args:?}: {st}");
}

/// One host: its agent's directory and launcher.
struct Host {
    dir: tempfile::TempDir,
    /// A script running the agent (in its namespace, stdout into the log too).
    launcher: PathBuf,
}

impl Host {
    fn new(name: &str, iface: &str, netns: Option<&str>) -> Host {
        let dir = mock_agent_dir(&format!("node-{name}"), 100, "");
        let cfg = dir.path().join("agent.toml");
        let mut text = std::fs::read_to_string(&cfg).unwrap();
        text.push_str(&format!(
            "\n[log]\nlevel = \"info,plfm_node_agent=debug\"\n\n[overlay]\ninterface = \"{iface}\"\nuserspace_command = \"wireguard-go\"\ndrift_check_seconds = 1\n"
        ));
        std::fs::write(&cfg, text).unwrap();
        let launcher = dir.path().join("run-agent.sh");
        let exec = match netns {
            Some(ns) => format!("exec ip netns exec {ns} {BIN} \"$@\" 1>&2\n"),
            None => format!("exec {BIN} \"$@\" 1>&2\n"),
        };
        std::fs::write(&launcher, format!("#!/bin/sh\n{exec}")).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&launcher, std::fs::Permissions::from_mode(0o755)).unwrap();
        Host { dir, launcher }
    }

    fn spawn(&self) -> AgentProcess {
        AgentProcess::spawn_bin(
            &self.launcher,
            &self.dir.path().join("agent.toml"),
            &self.dir.path().join("agent.log"),
            &[],
        )
    }

    fn key_text(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("data/overlay/private.key"))
            .unwrap()
            .trim()
            .to_string()
    }

    /// The public key derived from the key file, as `wg pubkey` would print it.
    fn derived_public_key(&self) -> String {
        overlay::public_key_of(&self.dir.path().join("data/overlay/private.key"))
    }

    /// Writes `overlay.json` atomically (a reader never sees half of it).
    fn write_overlay(&self, doc: &Value) {
        overlay::write_overlay(&self.dir.path().join("desired"), doc);
    }
}

fn doc(generation: i64, me: &str, peer: Option<(&str, &str, &str, &str)>) -> Value {
    let peers: Vec<overlay::Peer> = peer
        .into_iter()
        .map(|(node_id, public_key, ip, endpoint)| overlay::Peer {
            node_id: node_id.to_string(),
            public_key: public_key.to_string(),
            endpoint: format!("{endpoint}:51820"),
            allowed_ips: vec![format!("{ip}/128")],
        })
        .collect();
    overlay::overlay_doc(generation, me, &peers)
}

struct Cleanup {
    ns: String,
    ifaces: Vec<String>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for i in &self.ifaces {
            overlay::kill_wireguard_go(i);
        }
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
    }
}

#[test]
fn two_agents_build_the_overlay_repair_drift_and_keep_it_across_a_restart() {
    let test = "two_agents_build_the_overlay_repair_drift_and_keep_it_across_a_restart";
    if std::env::var_os(NETNS_ENV).is_none() {
        if !rustix::process::geteuid().is_root() {
            return skip_or_fail("root (network namespaces, tun devices)");
        }
        for tool in ["ip", "wireguard-go"] {
            if !vm_host::which(tool) {
                return skip_or_fail(&format!("{tool} (Debian packages iproute2, wireguard-go)"));
            }
        }
        vm_host::reexec_in_netns(test, NETNS_ENV, "oa");
        return;
    }
    let pid = std::process::id();
    let ns_b = format!("plfm-oab{pid}");
    let (if_a, if_b) = (format!("plfmoa{pid}"), format!("plfmob{pid}"));
    let _cleanup = Cleanup {
        ns: ns_b.clone(),
        ifaces: vec![if_a.clone(), if_b.clone()],
    };
    sh(&["ip", "netns", "add", &ns_b]);
    sh(&[
        "ip", "link", "add", "oaA", "type", "veth", "peer", "name", "oaB", "netns", &ns_b,
    ]);
    sh(&[
        "ip",
        "addr",
        "add",
        &format!("{UNDERLAY_A}/30"),
        "dev",
        "oaA",
    ]);
    sh(&["ip", "link", "set", "oaA", "up"]);
    sh(&[
        "ip",
        "-n",
        &ns_b,
        "addr",
        "add",
        &format!("{UNDERLAY_B}/30"),
        "dev",
        "oaB",
    ]);
    sh(&["ip", "-n", &ns_b, "link", "set", "oaB", "up"]);
    sh(&["ip", "-n", &ns_b, "link", "set", "lo", "up"]);

    let host_a = Host::new("a", &if_a, None);
    let host_b = Host::new("b", &if_b, Some(&ns_b));
    let mut agent_a = host_a.spawn();
    let agent_b = host_b.spawn();
    agent_a.wait_api(Duration::from_secs(30));
    agent_b.wait_api(Duration::from_secs(30));

    // The public key from the first start on, with the overlay off.
    let first_a = poll_until("A's overlay view", Duration::from_secs(10), || {
        overlay_where(&agent_a, |v| v["public_key"].is_string())
    });
    assert_eq!(first_a["state"], "off", "{first_a:#}");
    assert_eq!(first_a["interface"], if_a.as_str());
    assert_eq!(first_a["backend"], "userspace");
    assert_eq!(first_a["public_key"], host_a.derived_public_key().as_str());
    assert!(first_a["peers"].as_array().unwrap().is_empty());
    assert!(
        nix::net::if_::if_nametoindex(if_a.as_str()).is_err(),
        "no interface while the overlay is off"
    );
    let pub_a = host_a.derived_public_key();
    let pub_b = host_b.derived_public_key();

    // Host B's server on its overlay address, from a thread inside its namespace.
    let stop = Arc::new(AtomicBool::new(false));
    let server = {
        let ns_file = std::fs::File::open(format!("/run/netns/{ns_b}")).unwrap();
        let stop = stop.clone();
        std::thread::spawn(move || {
            nix::sched::setns(ns_file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            let addr: Ipv6Addr = IP_B.parse().unwrap();
            let end = Instant::now() + Duration::from_secs(300);
            // The address exists once agent B applied its overlay.
            let listener = loop {
                match TcpListener::bind((addr, 8080)) {
                    Ok(l) => break l,
                    Err(_) if Instant::now() < end && !stop.load(Ordering::Relaxed) => {
                        std::thread::sleep(Duration::from_millis(50))
                    }
                    Err(e) => panic!("bind [{IP_B}]:8080: {e}"),
                }
            };
            listener.set_nonblocking(true).unwrap();
            while !stop.load(Ordering::Relaxed) && Instant::now() < end {
                if listener.accept().is_err() {
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        })
    };

    let t = Instant::now();
    host_a.write_overlay(&doc(1, IP_A, Some(("node-b", &pub_b, IP_B, UNDERLAY_B))));
    host_b.write_overlay(&doc(1, IP_B, Some(("node-a", &pub_a, IP_A, UNDERLAY_A))));

    // (a) A reaches B's overlay address through the tunnel.
    let target: SocketAddr = format!("[{IP_B}]:8080").parse().unwrap();
    assert!(
        connects(target, Duration::from_secs(30)),
        "A cannot reach B over the overlay\n{}\n{}",
        agent_a.diagnostics(),
        agent_b.diagnostics()
    );
    eprintln!(
        "TIMING overlay.json written -> first TCP connection A->B: {:?}",
        t.elapsed()
    );

    // (b) The peer with a handshake and bytes, and A's own key.
    let seen = poll_until("A's peer with a handshake", Duration::from_secs(15), || {
        overlay_where(&agent_a, |v| {
            v["peers"][0]["last_handshake_age_secs"].is_u64()
                && v["peers"][0]["rx_bytes"].as_u64() > Some(0)
                && v["peers"][0]["tx_bytes"].as_u64() > Some(0)
        })
    });
    assert_eq!(seen["state"], "on");
    assert_eq!(seen["generation"], 1);
    assert_eq!(seen["public_key"], pub_a.as_str());
    assert_eq!(seen["listen_port"], 51820);
    assert_eq!(seen["node_overlay_ipv6"], IP_A);
    let peer = &seen["peers"][0];
    assert_eq!(peer["node_id"], "node-b");
    assert_eq!(peer["public_key"], pub_b.as_str());
    assert_eq!(peer["endpoint"], format!("{UNDERLAY_B}:51820").as_str());
    assert_eq!(peer["allowed_ips"], json!([format!("{IP_B}/128")]));
    let table = agent_a.cli(&["overlay"]);
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(
        table.contains("node-b") && table.contains(&pub_b) && table.contains("ago"),
        "{table}"
    );

    // (c) B drops A: the path is cut once B applied it; restored: healed.
    let t = Instant::now();
    host_b.write_overlay(&doc(2, IP_B, None));
    poll_until("B applied generation 2", Duration::from_secs(15), || {
        overlay_where(&agent_b, |v| {
            v["generation"] == 2 && v["peers"].as_array().is_some_and(|p| p.is_empty())
        })
    });
    eprintln!(
        "TIMING peer removed from B's file -> B applied it: {:?}",
        t.elapsed()
    );
    assert!(
        !connects(target, Duration::from_secs(3)),
        "B still answers A without A as its peer"
    );
    let t = Instant::now();
    host_b.write_overlay(&doc(3, IP_B, Some(("node-a", &pub_a, IP_A, UNDERLAY_A))));
    assert!(
        connects(target, Duration::from_secs(30)),
        "not healed after B restored A\n{}",
        agent_b.diagnostics()
    );
    eprintln!(
        "TIMING peer restored in B's file -> TCP connection: {:?}",
        t.elapsed()
    );

    // (d) wireguard-go of A killed: the drift check starts it again.
    let wg_pid = wireguard_go_pid(&if_a).expect("A's wireguard-go serves its socket");
    let t = Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(wg_pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let new_pid =
        poll_until(
            "a new wireguard-go for A",
            Duration::from_secs(20),
            || match wireguard_go_pid(&if_a) {
                Some(p) if p != wg_pid => Ok(p),
                other => Err(format!("serving: {other:?}\n{}", agent_a.diagnostics())),
            },
        );
    assert!(
        connects(target, Duration::from_secs(30)),
        "not healed after the drift check restarted wireguard-go\n{}",
        agent_a.diagnostics()
    );
    eprintln!(
        "TIMING wireguard-go SIGKILLed -> traffic again (drift check every 1 s): {:?}",
        t.elapsed()
    );
    let (code, metrics) = agent_a.api_get("/metrics").unwrap();
    assert_eq!(code, 200);
    let drift_repaired = metrics
        .lines()
        .find(|l| l.starts_with("plfm_overlay_apply_total{outcome=\"drift_repaired\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0);
    assert!(drift_repaired >= 1.0, "{metrics}");
    assert!(metrics.contains("plfm_overlay_peers 1"), "{metrics}");
    assert!(
        metrics.contains("plfm_overlay_last_handshake_seconds{peer=\"node-b\"}"),
        "{metrics}"
    );

    // (e) The agent killed and started again: the interface is kept, not rebuilt.
    let ifindex = nix::net::if_::if_nametoindex(if_a.as_str()).unwrap();
    agent_a.kill9();
    assert_eq!(
        wireguard_go_pid(&if_a),
        Some(new_pid),
        "wireguard-go outlives the agent"
    );
    let t = Instant::now();
    let agent_a = host_a.spawn();
    agent_a.wait_api(Duration::from_secs(30));
    poll_until(
        "the restarted A applied its overlay",
        Duration::from_secs(15),
        || overlay_where(&agent_a, |v| v["state"] == "on" && v["generation"] == 1),
    );
    assert_eq!(
        nix::net::if_::if_nametoindex(if_a.as_str()).unwrap(),
        ifindex,
        "the interface was rebuilt"
    );
    assert_eq!(
        wireguard_go_pid(&if_a),
        Some(new_pid),
        "wireguard-go was restarted"
    );
    assert!(
        connects(target, Duration::from_secs(15)),
        "no traffic after the agent restart\n{}",
        agent_a.diagnostics()
    );
    eprintln!(
        "TIMING agent A restarted -> overlay adopted and TCP connection: {:?}",
        t.elapsed()
    );

    let status = agent_a.cli(&["status", "--json", "--node"]);
    let status: Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(status["overlay"]["generation"], 1, "{status:#}");
    assert_eq!(status["overlay"]["peers"][0]["node_id"], "node-b");
    assert_eq!(status["node"]["wireguard_public_key"], pub_a.as_str());

    // Off: B's file removed: B's interface, its wireguard-go and its kept config go.
    let b_last_good = host_b.dir.path().join("data/overlay/last-good.json");
    assert!(b_last_good.exists());
    let b_wg = wireguard_go_pid(&if_b).expect("B's wireguard-go");
    std::fs::remove_file(host_b.dir.path().join("desired/overlay.json")).unwrap();
    let off = poll_until("B's overlay off", Duration::from_secs(15), || {
        overlay_where(&agent_b, |v| v["state"] == "off")
    });
    assert!(
        off["off_reason"]
            .as_str()
            .is_some_and(|r| r.contains("does not exist")),
        "{off:#}"
    );
    assert!(off["public_key"].is_string());
    assert!(!b_last_good.exists(), "the kept config stayed");
    assert_eq!(
        wireguard_go_pid(&if_b),
        None,
        "B's wireguard-go still serves"
    );
    assert!(
        !Path::new(&format!("/proc/{b_wg}/cmdline")).exists()
            || std::fs::read(format!("/proc/{b_wg}/cmdline")).is_ok_and(|c| c.is_empty()),
        "B's wireguard-go still runs"
    );
    let b_link = Command::new("ip")
        .args(["-n", &ns_b, "link", "show", &if_b])
        .output()
        .unwrap();
    assert!(!b_link.status.success(), "B's interface stayed");
    assert!(
        !connects(target, Duration::from_secs(2)),
        "A still reaches B with B's overlay off"
    );

    // (f) The private key appears nowhere the agent writes or answers.
    let mut seen_text = vec![
        ("A's log".to_string(), agent_a.log()),
        ("B's log".to_string(), agent_b.log()),
    ];
    for (name, agent) in [("A", &agent_a), ("B", &agent_b)] {
        for args in [
            &["overlay", "--json"][..],
            &["overlay"][..],
            &["status"][..],
            &["status", "--json", "--node"][..],
        ] {
            let out = agent.cli(args);
            assert!(out.status.success(), "{name} {args:?}");
            seen_text.push((
                format!("{name} {args:?}"),
                String::from_utf8_lossy(&out.stdout).into_owned()
                    + &String::from_utf8_lossy(&out.stderr),
            ));
        }
    }
    seen_text.push((
        "A's /metrics".into(),
        agent_a.api_get("/metrics").unwrap().1,
    ));
    seen_text.push((
        "A's /v1/overlay".into(),
        agent_a.api_get("/v1/overlay").unwrap().1,
    ));
    for host in [&host_a, &host_b] {
        let b64 = host.key_text();
        let raw = base64::engine::general_purpose::STANDARD
            .decode(&b64)
            .unwrap();
        for (name, text) in &seen_text {
            assert!(!text.is_empty() || name.contains("log"), "{name} is empty");
            assert!(!text.contains(&b64), "{name} shows a private key (base64)");
            assert!(
                !text.contains(&hex::encode(&raw)),
                "{name} shows a private key (hex)"
            );
        }
    }
    assert!(
        seen_text[0].1.contains("overlay configuration applied"),
        "A's log has the owner's lines (debug level on)"
    );

    stop.store(true, Ordering::Relaxed);
    let _ = server.join();
}
