//! Benchmark: the overlay (issue 14), with `wireguard-go` (the userspace backend).
//! Root only; it runs in network namespaces of its own and sends traffic only inside
//! them (underlay 169.254.97.0/30, overlay fd00:97::/64; the 50 peers' endpoints are
//! 169.254.200.x, which no route reaches: nothing leaves the namespace).
//!
//! Prints:
//! - (a) a 50-peer configuration (4 prefixes each: 200 routes) applied on a fresh
//!   interface, through the real agent (standalone mode, mock runtime): from
//!   `overlay.json` written to `overlay --json` showing the generation applied. The
//!   agent looks at the file every 50 ms (`rescan_interval_ms`), which is part of the
//!   figure. Target (plfm-vt): under 5 s;
//! - (b) one peer changed in that 50-peer configuration (a new key for one node):
//!   written to applied, the same way;
//! - the same two through `UserspaceDevice::apply` in-process (the owner's device call
//!   alone, no file scan, no CLI);
//! - (c) TCP throughput host to host (two network namespaces, not VMs) over the
//!   underlay veth directly and through the WireGuard overlay on top of it;
//! - (d) TCP throughput VM to VM under QEMU/TCG: a guest on host A sends 32 MiB with
//!   busybox `nc` to a guest on host B across the overlay, and to a guest on its own
//!   host (no overlay), on the two-host rig of `tests/overlay_vms.rs`
//!   (`tests/support/overlay_hosts.rs`), and the same paths over HTTP (busybox `wget`
//!   of a 32 MiB file from busybox `httpd`). Timed on the host around `exec`, minus the
//!   time of an empty `exec` (the guests' clocks run on TCG's instruction count).
//!   Skipped with a message without QEMU and what the conformance lab needs.
//!
//! Run (root): `cargo bench -p plfm-node-agent --bench overlay`. Env:
//! `PLFM_OVERLAY_BENCH_RUNS` (runs of (a) and (b), default 5),
//! `PLFM_OVERLAY_BENCH_SECS` (seconds per throughput run, default 5).

#[cfg(target_os = "linux")]
#[path = "../tests/common/mod.rs"]
mod common;

#[cfg(target_os = "linux")]
#[path = "../tests/support/overlay.rs"]
mod overlay;

#[cfg(target_os = "linux")]
#[path = "../tests/support/vm_host.rs"]
mod vm_host;

#[cfg(target_os = "linux")]
#[path = "../tests/image_support/mod.rs"]
#[allow(unused_imports)]
mod image_support;

#[cfg(target_os = "linux")]
#[path = "../tests/fc_standin/mod.rs"]
mod fc_standin;

/// The conformance suite's lab: one agent with the qemu runtime per host of (d).
#[cfg(target_os = "linux")]
#[path = "../tests/conformance/lab.rs"]
mod lab;

#[cfg(target_os = "linux")]
#[path = "../tests/support/overlay_hosts.rs"]
mod overlay_hosts;

#[cfg(not(target_os = "linux"))]
fn main() {
    eprintln!("overlay bench: linux only");
}

#[cfg(target_os = "linux")]
fn main() {
    linux::main();
}

#[cfg(target_os = "linux")]
mod linux {
    use std::io::{Read, Write};
    use std::net::{SocketAddr, TcpListener, TcpStream};
    use std::os::fd::AsFd;
    use std::path::Path;
    use std::process::Command;
    use std::time::{Duration, Instant};

    use base64::Engine as _;
    use plfm_node_agent::overlay::config::parse;
    use plfm_node_agent::overlay::device::UserspaceDevice;
    use serde_json::Value;

    use crate::common::agent::{mock_agent_dir, AgentProcess};
    use crate::common::wait::Poll;
    use crate::overlay::{self, overlay_where, Peer};
    use crate::vm_host;

    const PEERS: usize = 50;

    fn sh(args: &[&str]) {
        let st = Command::new(args[0]).args(&args[1..]).status().unwrap();
        assert!(st.success(), "{args:?}: {st}");
    }

    fn public_of(private: [u8; 32]) -> String {
        let secret = x25519_dalek::StaticSecret::from(private);
        base64::engine::general_purpose::STANDARD
            .encode(x25519_dalek::PublicKey::from(&secret).as_bytes())
    }

    /// The 50 peers; `variant` changes the key of peer 7 (a node re-keyed).
    fn peer_keys(variant: u8) -> Vec<String> {
        (0..PEERS)
            .map(|i| {
                // Bytes X25519 clamping leaves alone (not 0 and 31).
                let mut k = [0x11u8; 32];
                k[4] = i as u8;
                if i == 7 {
                    k[6] = variant;
                }
                public_of(k)
            })
            .collect()
    }

    fn peers(keys: &[String]) -> Vec<Peer> {
        keys.iter()
            .enumerate()
            .map(|(i, key)| Peer {
                node_id: format!("peer-{i}"),
                public_key: key.clone(),
                endpoint: format!("169.254.200.{}:51820", i + 1),
                allowed_ips: (1..=4).map(|h| format!("fd00:1:{i:x}::{h}/128")).collect(),
            })
            .collect()
    }

    fn routes_on(iface: &str) -> usize {
        let out = Command::new("ip")
            .args(["-6", "route", "show", "dev", iface])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.starts_with("fd00:1:"))
            .count()
    }

    fn stats(name: &str, v: &[Duration]) {
        let mut s = v.to_vec();
        s.sort();
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        println!(
            "{name}: median {:.0} ms, min {:.0} ms, max {:.0} ms over {} runs",
            ms(s[s.len() / 2]),
            ms(s[0]),
            ms(s[s.len() - 1]),
            s.len()
        );
    }

    fn env_num(name: &str, default: u64) -> u64 {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    }

    pub fn main() {
        if !rustix::process::geteuid().is_root() {
            println!("overlay bench: SKIP (needs root: network namespaces, tun devices)");
            return;
        }
        if !vm_host::which("wireguard-go") || !vm_host::which("ip") {
            println!("overlay bench: SKIP (needs wireguard-go and ip: Debian packages wireguard-go, iproute2)");
            return;
        }
        // This process (every thread spawned from here on) in a namespace of its own.
        // SAFETY: unshare(2) with a constant flag, before any other thread exists.
        let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "unshare: {}", std::io::Error::last_os_error());
        sh(&["ip", "link", "set", "lo", "up"]);
        let runs = env_num("PLFM_OVERLAY_BENCH_RUNS", 5) as usize;
        let pid = std::process::id();
        let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
        println!("overlay bench: {PEERS} peers x 4 prefixes, {runs} runs, {cpus} CPUs");
        let iface = format!("plfmbo{pid}");
        let result = std::panic::catch_unwind(|| {
            agent_path(&iface, runs);
            device_path(&format!("plfmbd{pid}"), runs);
            throughput(pid, env_num("PLFM_OVERLAY_BENCH_SECS", 5));
            match crate::overlay_hosts::prerequisites() {
                Ok(()) => vm_to_vm(),
                Err(why) => println!("(d) VM to VM: SKIP ({why})"),
            }
        });
        for i in [
            iface,
            format!("plfmbd{pid}"),
            format!("plfmt1{pid}"),
            format!("plfmt2{pid}"),
        ] {
            overlay::kill_wireguard_go(&i);
        }
        for ns in [format!("plfm-obt1{pid}"), format!("plfm-obt2{pid}")] {
            let _ = Command::new("ip").args(["netns", "del", &ns]).status();
        }
        if let Err(e) = result {
            std::panic::resume_unwind(e);
        }
    }

    /// (a) and (b) through the agent binary.
    fn agent_path(iface: &str, runs: usize) {
        let dir = mock_agent_dir("bench-overlay", 50, "");
        let cfg = dir.path().join("agent.toml");
        let mut text = std::fs::read_to_string(&cfg).unwrap();
        text.push_str(&format!(
            "\n[overlay]\ninterface = \"{iface}\"\nbackend = \"userspace\"\nuserspace_command = \"wireguard-go\"\ndrift_check_seconds = 3600\n"
        ));
        std::fs::write(&cfg, text).unwrap();
        let agent = AgentProcess::spawn(&cfg, &dir.path().join("agent.log"));
        agent.wait_api(Duration::from_secs(30));
        let desired = dir.path().join("desired");
        let poll = Poll::within(Duration::from_secs(60)).every(Duration::from_millis(5));
        let (keys, rekeyed) = (peer_keys(0), peer_keys(1));
        let (fresh, changed) = (peers(&keys), peers(&rekeyed));
        let mut t_fresh = Vec::new();
        let mut t_one = Vec::new();
        for r in 0..runs {
            // Off first: the interface is gone, the next apply makes a fresh one.
            let _ = std::fs::remove_file(desired.join("overlay.json"));
            poll.until("the overlay off", || {
                overlay_where(&agent, |v| v["state"] == "off")
            });
            assert!(nix::net::if_::if_nametoindex(iface).is_err());
            let generation = 10 * r as i64 + 1;
            let t = Instant::now();
            overlay::write_overlay(
                &desired,
                &overlay::overlay_doc(generation, "fd00::1", &fresh),
            );
            poll.until("50 peers applied", || {
                overlay_where(&agent, |v| applied(v, generation))
            });
            t_fresh.push(t.elapsed());
            assert_eq!(routes_on(iface), PEERS * 4, "routes of the 50 peers");
            let t = Instant::now();
            overlay::write_overlay(
                &desired,
                &overlay::overlay_doc(generation + 1, "fd00::1", &changed),
            );
            poll.until("one peer changed", || {
                overlay_where(&agent, |v| {
                    applied(v, generation + 1)
                        && v["peers"]
                            .as_array()
                            .is_some_and(|p| p.iter().any(|p| p["public_key"] == rekeyed[7]))
                })
            });
            t_one.push(t.elapsed());
        }
        stats(
            "(a) agent: overlay.json with 50 peers written -> applied on a fresh interface",
            &t_fresh,
        );
        stats(
            "(b) agent: one peer re-keyed in the 50-peer overlay.json -> applied",
            &t_one,
        );
        let _ = std::fs::remove_file(desired.join("overlay.json"));
        poll.until("the overlay off", || {
            overlay_where(&agent, |v| v["state"] == "off")
        });
    }

    fn applied(v: &Value, generation: i64) -> bool {
        v["state"] == "on"
            && v["generation"] == generation
            && v["peers"].as_array().is_some_and(|p| p.len() == PEERS)
            && v["last_apply_error"].is_null()
    }

    fn device_path(iface: &str, runs: usize) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let log = tempfile::NamedTempFile::new().unwrap();
        let dev = UserspaceDevice::new(iface, Path::new("wireguard-go"), log.path());
        let key = [9u8; 32];
        let (keys, rekeyed) = (peer_keys(0), peer_keys(1));
        let cfg = |g: i64, keys: &[String]| {
            let doc = overlay::overlay_doc(g, "fd00::1", &peers(keys));
            let (c, refused) = parse(&serde_json::to_vec(&doc).unwrap(), None).unwrap();
            assert!(refused.is_empty(), "{refused:?}");
            c
        };
        let (fresh, changed) = (cfg(1, &keys), cfg(2, &rekeyed));
        let mut t_fresh = Vec::new();
        let mut t_one = Vec::new();
        rt.block_on(async {
            for _ in 0..runs {
                dev.remove().await.unwrap();
                let t = Instant::now();
                let a = dev.apply(&fresh, &key).await.unwrap();
                t_fresh.push(t.elapsed());
                assert!(a.started && a.changes == PEERS, "{a:?}");
                let t = Instant::now();
                let a = dev.apply(&changed, &key).await.unwrap();
                t_one.push(t.elapsed());
                // The re-keyed node: the old key removed, the new one added.
                assert_eq!(a.changes, 2, "{a:?}");
            }
            dev.remove().await.unwrap();
        });
        stats(
            "(a) device: UserspaceDevice::apply of 50 peers on a fresh interface (wireguard-go started)",
            &t_fresh,
        );
        stats(
            "(b) device: UserspaceDevice::apply with one peer re-keyed",
            &t_one,
        );
    }

    /// Runs `f` on a thread inside the namespace `/run/netns/<ns>`.
    fn on<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
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

    /// (c) host-to-host TCP throughput, underlay alone and through the overlay.
    fn throughput(pid: u32, secs: u64) {
        let (ns1, ns2) = (format!("plfm-obt1{pid}"), format!("plfm-obt2{pid}"));
        let (if1, if2) = (format!("plfmt1{pid}"), format!("plfmt2{pid}"));
        for ns in [&ns1, &ns2] {
            sh(&["ip", "netns", "add", ns]);
            sh(&["ip", "-n", ns, "link", "set", "lo", "up"]);
        }
        sh(&[
            "ip", "-n", &ns1, "link", "add", "obt", "type", "veth", "peer", "name", "obt", "netns",
            &ns2,
        ]);
        for (ns, addr) in [(&ns1, "169.254.97.1/30"), (&ns2, "169.254.97.2/30")] {
            sh(&["ip", "-n", ns, "addr", "add", addr, "dev", "obt"]);
            sh(&["ip", "-n", ns, "link", "set", "obt", "up"]);
        }
        let (k1, k2) = ([1u8; 32], [2u8; 32]);
        let doc = |me: &str, peer_key: &str, peer_ip: &str, endpoint: &str| {
            let p = Peer {
                node_id: "peer".into(),
                public_key: peer_key.to_string(),
                endpoint: endpoint.to_string(),
                allowed_ips: vec![format!("{peer_ip}/128")],
            };
            let (c, _) = parse(
                &serde_json::to_vec(&overlay::overlay_doc(1, me, &[p])).unwrap(),
                None,
            )
            .unwrap();
            c
        };
        let log = tempfile::NamedTempFile::new().unwrap();
        for (ns, iface, key, me, peer_key, peer_ip, endpoint) in [
            (
                &ns1,
                &if1,
                k1,
                "fd00:97::1",
                public_of(k2),
                "fd00:97::2",
                "169.254.97.2:51820",
            ),
            (
                &ns2,
                &if2,
                k2,
                "fd00:97::2",
                public_of(k1),
                "fd00:97::1",
                "169.254.97.1:51820",
            ),
        ] {
            let cfg = doc(me, &peer_key, peer_ip, endpoint);
            let log = log.path().to_path_buf();
            on(ns, move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                let dev = UserspaceDevice::new(iface, Path::new("wireguard-go"), &log);
                rt.block_on(dev.apply(&cfg, &key)).unwrap();
            });
        }
        for (label, addr) in [
            ("underlay veth alone (169.254.97.2)", "169.254.97.2:5201"),
            (
                "through the overlay (fd00:97::2, wireguard-go)",
                "[fd00:97::2]:5201",
            ),
            ("underlay veth alone, again", "169.254.97.2:5201"),
            ("through the overlay, again", "[fd00:97::2]:5201"),
        ] {
            let addr: SocketAddr = addr.parse().unwrap();
            let mbps = measure(&ns1, &ns2, addr, Duration::from_secs(secs));
            println!("(c) TCP host to host (namespaces, not VMs), {label}: {mbps:.0} Mbit/s over {secs} s");
        }
    }

    /// Sends for `dur` from `client_ns` to a sink listening on `addr` in `server_ns`;
    /// Mbit/s received.
    fn measure(client_ns: &str, server_ns: &str, addr: SocketAddr, dur: Duration) -> f64 {
        let (tx, rx) = std::sync::mpsc::channel();
        let server_ns = server_ns.to_string();
        let server = std::thread::spawn(move || {
            on(&server_ns, || {
                let l = TcpListener::bind(addr).unwrap();
                tx.send(()).unwrap();
                let (mut s, _) = l.accept().unwrap();
                let mut buf = vec![0u8; 1 << 16];
                let mut total = 0u64;
                let t = Instant::now();
                loop {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => total += n as u64,
                    }
                }
                (total, t.elapsed())
            })
        });
        rx.recv().unwrap();
        on(client_ns, || {
            // The overlay's first handshake: retry the connection for a while.
            let mut s = Poll::within(Duration::from_secs(20))
                .every(Duration::from_millis(100))
                .until("a connection to the sink", || {
                    TcpStream::connect_timeout(&addr, Duration::from_secs(1))
                        .map_err(|e| e.to_string())
                });
            let buf = vec![0x5au8; 1 << 16];
            let end = Instant::now() + dur;
            while Instant::now() < end {
                s.write_all(&buf).unwrap();
            }
        });
        let (total, took) = server.join().unwrap();
        total as f64 * 8.0 / took.as_secs_f64() / 1e6
    }

    /// Wall time of `exec <id> -- /bin/sh -c <script>` in `lab`'s agent; panics unless
    /// it exits 0.
    fn timed_exec(lab: &crate::lab::Lab, id: &str, script: &str) -> Duration {
        let t = Instant::now();
        let out = Command::new(crate::common::agent::BIN)
            .arg("--config")
            .arg(lab.config_path())
            .args(["exec", id, "--", "/bin/sh", "-c", script])
            .output()
            .unwrap();
        let took = t.elapsed();
        assert!(
            out.status.success(),
            "exec {id} {script:?}: {:?}\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        took
    }

    /// (d) VM to VM under TCG, across the overlay and on one host.
    fn vm_to_vm() {
        use crate::lab::{overlay_ipv6, Behaviour, Inst, Lab};
        use crate::overlay_hosts::Hosts;
        use plfm_node_agent::instance::Status;
        const MIB: u64 = 32;
        let Some(hosts) = Hosts::new("t", "ovwt") else {
            println!("(d) VM to VM: SKIP (a lab could not be made)");
            return;
        };
        // Each sink serves a 32 MiB file over HTTP (busybox httpd, port 8080) and
        // swallows raw TCP (port 5201).
        let sink = |id: &str| {
            Inst::new(id, Behaviour::Idle)
                .shell(&format!(
                    "mkdir -p /tmp/www && busybox dd if=/dev/zero of=/tmp/www/big bs=65536 count={} 2>/dev/null; \
                     busybox httpd -p 8080 -h /tmp/www; \
                     while true; do busybox nc -l -p 5201 > /dev/null; done",
                    MIB * 16
                ))
                .ports(&[5201, 8080])
        };
        let (remote, local) = (sink("ov-sink-b"), sink("ov-sink-a"));
        let sender = Inst::new("ov-sender", Behaviour::Idle);
        hosts.lab_b.add(&remote);
        hosts.lab_a.add(&local);
        hosts.lab_a.add(&sender);
        hosts.start();
        let (remote_ip, local_ip, sender_ip) = (
            overlay_ipv6(&remote.id),
            overlay_ipv6(&local.id),
            overlay_ipv6(&sender.id),
        );
        hosts.overlay_a(1, &[hosts.peer_b(&[&remote_ip])]);
        hosts.overlay_b(1, &[hosts.peer_a(&[&sender_ip, &local_ip])]);
        let ready = |lab: &Lab, id: &str| {
            let v = lab.wait(id, "ready", lab.kind.boot_within(), |v| {
                matches!(v.status, Status::Ready | Status::Failed | Status::Stopped)
            });
            assert_eq!(v.status, Status::Ready, "{v:#?}\n{}", lab.log());
        };
        ready(&hosts.lab_b, &remote.id);
        ready(&hosts.lab_a, &local.id);
        ready(&hosts.lab_a, &sender.id);
        let lab = &hosts.lab_a;
        // The sinks listen once their shell runs: wait for a connection to each.
        for ip in [&remote_ip, &local_ip] {
            Poll::within(Duration::from_secs(60))
                .every(Duration::from_millis(500))
                .until("a sink listening", || {
                    let out = Command::new(crate::common::agent::BIN)
                        .arg("--config")
                        .arg(lab.config_path())
                        .args(["exec", &sender.id, "--", "/bin/sh", "-c"])
                        .arg(format!("busybox nc -w 5 {ip} 5201 < /dev/null"))
                        .output()
                        .unwrap();
                    if out.status.success() {
                        Ok(())
                    } else {
                        Err(String::from_utf8_lossy(&out.stderr).into_owned())
                    }
                });
        }
        let empty = (0..3)
            .map(|_| timed_exec(lab, &sender.id, "true"))
            .min()
            .unwrap();
        for (label, ip) in [
            ("across the overlay (guest on A -> guest on B)", &remote_ip),
            (
                "on one host, no overlay (guest on A -> guest on A)",
                &local_ip,
            ),
            ("across the overlay, again", &remote_ip),
            ("on one host, again", &local_ip),
        ] {
            let took = timed_exec(
                lab,
                &sender.id,
                &format!(
                    "busybox dd if=/dev/zero bs=65536 count={} 2>/dev/null | busybox nc -w 5 {ip} 5201",
                    MIB * 16
                ),
            );
            let net = took.saturating_sub(empty).as_secs_f64();
            println!(
                "(d) TCP VM to VM under TCG, {label}: {:.0} Mbit/s ({MIB} MiB in {:.2} s; an empty exec takes {:.2} s)",
                (MIB * 8 * 1024 * 1024) as f64 / net / 1e6,
                took.as_secs_f64(),
                empty.as_secs_f64()
            );
            // The same path over HTTP: the sender fetches the sink's file; the
            // command fails unless the whole file arrived.
            let took = timed_exec(
                lab,
                &sender.id,
                &format!(
                    "test \"$(busybox wget -q -O - http://[{ip}]:8080/big | busybox wc -c)\" -eq {}",
                    MIB * 1024 * 1024
                ),
            );
            let net = took.saturating_sub(empty).as_secs_f64();
            println!(
                "(d) HTTP VM to VM under TCG, {label}: {:.0} Mbit/s ({MIB} MiB in {:.2} s)",
                (MIB * 8 * 1024 * 1024) as f64 / net / 1e6,
                took.as_secs_f64(),
            );
        }
    }
}
