//! The overlay with real VMs (issue 14): two "hosts" as two network namespaces joined
//! by a veth underlay (169.254.98.0/30), and an "outside" namespace joined to host A
//! by another veth (`fd01::/64`: inside fd00::/8, outside the overlay prefix
//! `fd00::/16` of the test). One agent per host with the qemu runtime (TCG) and the
//! userspace WireGuard backend (`wireguard-go`), standalone mode, each with an
//! `overlay.json` naming the other (`drift_check_seconds = 1`). Host A runs two VMs
//! (busybox): `ov-web` serves HTTP on 8087 (declared in `network.ports`) and on 8088
//! (not declared); `ov-client` idles, and the test runs commands in it with `exec`.
//! Host B runs no VM: its client is this test, on a thread inside B's namespace.
//! Shown, in order:
//! - (a) B reaches `ov-web`'s declared port through the overlay; the undeclared port,
//!   which `ov-web` itself reaches, is unreachable from B, and the refused packets are
//!   counted by A's forward chain;
//! - (b) `ov-client` reaches `ov-web`'s declared port but not the undeclared one, and
//!   what it sends from a second address it gives itself (`ip addr add`, a route
//!   with that source; TCP and echo) is counted as dropped by its tap's chain
//!   (`nft -j list chain inet plfm <tap>`);
//! - (c) B removed from A's `overlay.json` cuts the path once A applied it; restored,
//!   the path heals;
//! - (d) A's `wireguard-go` killed with SIGKILL is started again by the drift check and
//!   the path heals (counted as `drift_repaired`, or as `error` then `applied` when a
//!   check met the dying device first);
//! - (e) agent A killed with SIGKILL: B still reaches `ov-web` while no agent runs; a
//!   new agent A keeps the overlay (same ifindex, same `wireguard-go`) and the VM (same
//!   QEMU process), and traffic flows;
//! - (f) egress (`[network] egress = "nat"`, `uplink` the veth to the outside,
//!   `overlay_prefix = "fd00::/16"`): `ov-client` reaches an HTTP server in the outside
//!   namespace, which sees host A's uplink address, not the guest's; its flow to host
//!   B's overlay address goes through the overlay with the guest's own address.
//!
//! The test sets no forwarding sysctl: agent A turns IPv6 forwarding on itself (egress
//! on, overlay interface up).
//!
//! Needs root, QEMU, `wireguard-go` and what the conformance lab needs (registry,
//! kernel, guest init); skips without them, fails under `PLFM_REQUIRE_SYSTEM_TESTS=1`.
//! The labs' data dirs are under `TMPDIR`, where the qemu runtime keeps 5 % of the file
//! system free (on a fuller disk: `TMPDIR=/dev/shm`). Prints `TIMING` and `COUNT` lines.
#![cfg(target_os = "linux")]

mod common;
mod fc_standin;
mod image_support;
#[path = "support/overlay.rs"]
mod overlay;
#[path = "support/vm_host.rs"]
mod vm_host;

/// The conformance suite's lab (not its scenarios).
#[path = "conformance/lab.rs"]
mod lab;
#[path = "support/overlay_hosts.rs"]
mod overlay_hosts;

use std::net::{IpAddr, SocketAddr, TcpListener};
use std::os::fd::AsFd;
use std::process::Command;
use std::time::{Duration, Instant};

use common::agent::http_get;
use common::gate::skip_or_fail;
use common::wait::{poll_until, Poll};
use lab::{overlay_ipv6, Behaviour, Health, Inst, Lab};
use overlay::{connects_with, overlay_where, wireguard_go_pid};
use overlay_hosts::{on, Hosts, NODE_B, OUTSIDE, UPLINK_A};
use plfm_node_agent::instance::Status;
use serde_json::Value;

const DECLARED: u16 = 8087;
const UNDECLARED: u16 = 8088;
const OUTSIDE_PORT: u16 = 8099;
/// The second address `ov-client` gives itself (not its own to the host).
const SPOOFED: &str = "fd00::5:5";

fn ready(lab: &Lab, id: &str) {
    let v = lab.wait(id, "ready", lab.kind.boot_within(), |v| {
        matches!(v.status, Status::Ready | Status::Failed | Status::Stopped)
    });
    assert_eq!(v.status, Status::Ready, "{v:#?}\n{}", lab.log());
}

/// `exec <id> -- /bin/sh -c <script>` in lab's agent: (exit code, stdout).
fn exec_sh(lab: &Lab, id: &str, script: &str) -> (Option<i32>, String) {
    let out = Command::new(common::agent::BIN)
        .arg("--config")
        .arg(lab.config_path())
        .args(["exec", id, "--", "/bin/sh", "-c", script])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    eprintln!(
        "exec {id}: {:?}\n{stdout}{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code(), stdout)
}

/// Packets counted by the drop rules of chain `chain` of table `inet plfm` (this
/// thread's namespace); `only_oif` keeps the rules matching `oifname "plfm*"`.
fn chain_drops(chain: &str, only_oif: bool) -> u64 {
    let (ok, out) = Lab::run("nft", &["-j", "list", "chain", "inet", "plfm", chain]);
    assert!(ok, "nft list chain inet plfm {chain}: {out}");
    let doc: Value = serde_json::from_str(&out).unwrap_or_default();
    doc["nftables"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|o| o["rule"]["expr"].as_array())
        .filter(|e| e.iter().any(|x| x.get("drop").is_some()))
        .filter(|e| {
            !only_oif
                || e.iter().any(|x| {
                    x["match"]["left"]["meta"]["key"] == "oifname" && x["match"]["right"] == "plfm*"
                })
        })
        .filter_map(|e| e.iter().find_map(|x| x["counter"]["packets"].as_u64()))
        .sum()
}

/// An HTTP server in namespace `ns` on `addr` for one request, which it answers with
/// `from <client address>`; the handle gives that address (`None` if no request came
/// within `within`).
fn one_shot_server(
    ns: &str,
    addr: SocketAddr,
    within: Duration,
) -> std::thread::JoinHandle<Option<IpAddr>> {
    use std::io::{Read, Write};
    let file = std::fs::File::open(format!("/run/netns/{ns}")).unwrap();
    let (bound, is_bound) = std::sync::mpsc::channel();
    let handle = std::thread::spawn(move || {
        nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        let l = TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind {addr}: {e}"));
        l.set_nonblocking(true).unwrap();
        bound.send(()).unwrap();
        let (mut s, peer) = Poll::within(within)
            .every(Duration::from_millis(20))
            .try_until(|| l.accept())
            .ok()?;
        s.set_nonblocking(false).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut buf = [0u8; 1024];
        let _ = s.read(&mut buf);
        let body = format!("from {}\n", peer.ip());
        let _ = s.write_all(
            format!(
                "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
        );
        Some(peer.ip())
    });
    is_bound.recv().unwrap();
    handle
}

fn ifindex(iface: &str) -> u32 {
    nix::net::if_::if_nametoindex(iface).unwrap_or_else(|e| panic!("{iface}: {e}"))
}

/// The overlay interfaces are named like the default `plfm-wg0` (`plfm-wga<pid>`,
/// `plfm-wgb<pid>`): they match the taps' wildcard `plfm*`, which the nftables rules
/// must not take for a tap. (With the rules that did, host B's own connection into the
/// overlay was dropped by B's `output` chain as a host connection to a tap, and a
/// guest's flow to the overlay by the forward chain's drop "to taps".)
#[test]
fn vms_reach_each_other_over_the_overlay_on_declared_ports_only() {
    scenario("d", "plfm-wg");
}

/// The whole story, with namespaces tagged `tag` and overlay interfaces
/// `<if_prefix>a<pid>`, `<if_prefix>b<pid>`.
fn scenario(tag: &str, if_prefix: &str) {
    if let Err(why) = overlay_hosts::prerequisites() {
        return skip_or_fail(&why);
    }
    let t0 = Instant::now();
    let Some(hosts) = Hosts::new(tag, if_prefix) else {
        return;
    };
    let Hosts {
        lab_a,
        ns_b,
        ns_out,
        if_a,
        ..
    } = &hosts;

    let web = Inst::new("ov-web", Behaviour::Serve(DECLARED))
        .shell(&format!(
            "mkdir -p /www && echo ok > /www/index.html && httpd -p {UNDECLARED} -h /www && exec httpd -f -p {DECLARED} -h /www"
        ))
        .ports(&[DECLARED])
        .health(Health::Http(DECLARED));
    let client = Inst::new("ov-client", Behaviour::Idle);
    let (web_ip, client_ip) = (overlay_ipv6(&web.id), overlay_ipv6(&client.id));
    lab_a.add(&web);
    lab_a.add(&client);
    hosts.start();
    let agent_a = lab_a.agent();
    let peer_b = hosts.peer_b(&[]);
    hosts.overlay_a(1, std::slice::from_ref(&peer_b));
    hosts.overlay_b(1, &[hosts.peer_a(&[&web_ip, &client_ip])]);

    ready(lab_a, &web.id);
    ready(lab_a, &client.id);
    eprintln!(
        "TIMING namespaces made -> both VMs ready: {:?}",
        t0.elapsed()
    );

    // (a) B reaches the declared port through the overlay.
    let web_addr = |port: u16| format!("[{web_ip}]:{port}");
    let web_sock = |port: u16| -> SocketAddr { web_addr(port).parse().unwrap() };
    let from_b = |what: &str, within: Duration| -> (u16, String) {
        let addr = web_addr(DECLARED);
        on(ns_b, || {
            Poll::within(within)
                .every(Duration::from_millis(200))
                .until(what, || http_get(&addr, "/"))
        })
    };
    let t = Instant::now();
    let (code, body) = from_b(
        "B's HTTP GET of ov-web's declared port over the overlay",
        Duration::from_secs(60),
    );
    assert_eq!((code, body.trim()), (200, "ok"));
    eprintln!(
        "TIMING VMs ready -> B's first HTTP answer from ov-web over the overlay: {:?}",
        t.elapsed()
    );
    // The undeclared port serves (ov-web reaches it itself), but not B: its SYNs are
    // dropped and counted on A.
    let (code, out) = exec_sh(
        lab_a,
        &web.id,
        &format!("printf 'GET / HTTP/1.0\\r\\n\\r\\n' | busybox nc -w 5 127.0.0.1 {UNDECLARED}"),
    );
    assert!(
        code == Some(0) && out.ends_with("\r\n\r\nok\n"),
        "ov-web serves {UNDECLARED} too: {code:?} {out:?}"
    );
    let dropped_before = chain_drops("forward", true);
    let reached = on(ns_b, || {
        connects_with(
            web_sock(UNDECLARED),
            Duration::from_secs(3),
            Duration::from_secs(2),
        )
    });
    assert!(!reached, "B reached ov-web's undeclared port {UNDECLARED}");
    let dropped_after = chain_drops("forward", true);
    eprintln!("COUNT forward drops to taps: {dropped_before} -> {dropped_after}");
    assert!(
        dropped_after > dropped_before,
        "A's forward drop to taps counted {dropped_before} packets before and {dropped_after} after"
    );

    // (b) The other VM of host A: declared yes, undeclared no, spoofed counted.
    let tap = agent_a
        .instances()
        .and_then(|l| l.into_iter().find(|v| v.instance_id == client.id))
        .and_then(|v| v.tap)
        .expect("ov-client's tap");
    let spoofed_before = chain_drops(&tap, false);
    let (code, out) = exec_sh(
        lab_a,
        &client.id,
        &format!(
            r#"bb=busybox
r=0
echo | $bb nc -w 5 {web_ip} {DECLARED} >/dev/null 2>&1 && echo declared-open || r=$((r+1))
echo | $bb nc -w 5 {web_ip} {UNDECLARED} >/dev/null 2>&1 && r=$((r+2))
echo 0 > /proc/sys/net/ipv6/conf/eth0/accept_dad
$bb ip -6 addr add {SPOOFED}/128 dev eth0 || r=$((r+4))
$bb ip -6 route add {web_ip}/128 via fe80::1 dev eth0 src {SPOOFED} || r=$((r+4))
echo | $bb nc -w 3 {web_ip} {DECLARED} >/dev/null 2>&1 && r=$((r+8))
$bb ping6 -c 2 -W 1 -I {SPOOFED} {web_ip} >/dev/null 2>&1 && r=$((r+8))
$bb ip -6 route del {web_ip}/128
$bb ip -6 addr del {SPOOFED}/128 dev eth0
echo "result $r"
exit $r"#
        ),
    );
    assert_eq!(
        code,
        Some(0),
        "ov-client (1: declared port closed, 2: undeclared open, 4: no second address or route from it, 8: spoofed source got through): {out}\n{}",
        lab_a.log()
    );
    let spoofed_after = chain_drops(&tap, false);
    eprintln!("COUNT {tap} drops: {spoofed_before} -> {spoofed_after}");
    assert!(
        spoofed_after > spoofed_before,
        "the chain of ov-client's tap {tap} counted {spoofed_before} dropped packets before and {spoofed_after} after the spoofed connection"
    );

    // (c) B removed from A's overlay: cut once A applied it; restored: healed.
    let t = Instant::now();
    hosts.overlay_a(2, &[]);
    poll_until("A applied generation 2", Duration::from_secs(15), || {
        overlay_where(&agent_a, |v| {
            v["generation"] == 2 && v["peers"].as_array().is_some_and(|p| p.is_empty())
        })
    });
    eprintln!(
        "TIMING B removed from A's file -> A applied it: {:?}",
        t.elapsed()
    );
    let reached = on(ns_b, || {
        connects_with(
            web_sock(DECLARED),
            Duration::from_secs(3),
            Duration::from_secs(1),
        )
    });
    assert!(
        !reached,
        "B still reaches ov-web with B removed from A's overlay"
    );
    let t = Instant::now();
    hosts.overlay_a(3, &[peer_b]);
    from_b("healed after B was restored", Duration::from_secs(30));
    eprintln!(
        "TIMING B restored in A's file -> B's HTTP answer: {:?}",
        t.elapsed()
    );

    // (d) A's wireguard-go killed: the drift check starts it again.
    let wg_pid = wireguard_go_pid(if_a).expect("A's wireguard-go serves its socket");
    let outcome = |o: &str| {
        overlay::metric(
            &agent_a,
            &format!("plfm_overlay_apply_total{{outcome=\"{o}\"}}"),
        )
    };
    let (repaired_before, applied_before) = (outcome("drift_repaired"), outcome("applied"));
    let t = Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(wg_pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let new_wg =
        poll_until(
            "a new wireguard-go for A",
            Duration::from_secs(20),
            || match wireguard_go_pid(if_a) {
                Some(p) if p != wg_pid => Ok(p),
                other => Err(format!("serving: {other:?}")),
            },
        );
    from_b(
        "healed after the drift check restarted wireguard-go",
        Duration::from_secs(30),
    );
    eprintln!(
        "TIMING A's wireguard-go SIGKILLed -> B's HTTP answer (drift check every 1 s): {:?}",
        t.elapsed()
    );
    // Counted as `drift_repaired`, or, when a check met the dying device first (an
    // `error`), as `applied` by the next check's retry: no file changed meanwhile, so
    // either count comes from the drift check.
    let (repaired, applied, errors) = (
        outcome("drift_repaired") - repaired_before,
        outcome("applied") - applied_before,
        outcome("error"),
    );
    eprintln!(
        "COUNT after the kill: drift_repaired +{repaired}, applied +{applied}, error {errors}"
    );
    assert!(
        repaired + applied >= 1.0,
        "the repair was not counted (drift_repaired +{repaired}, applied +{applied})"
    );

    // (e) Agent A killed: the overlay and the VM keep working without it, and the next
    // agent keeps both.
    let index = ifindex(if_a);
    let vm = lab_a.vm_identity(&web.id).expect("ov-web's QEMU");
    drop(agent_a);
    lab_a.kill_agent();
    from_b(
        "B's HTTP answer while no agent runs on A",
        Duration::from_secs(15),
    );
    let t = Instant::now();
    lab_a.start(&[]);
    let agent_a = lab_a.agent();
    poll_until(
        "the new agent A applied its overlay",
        Duration::from_secs(30),
        || overlay_where(&agent_a, |v| v["state"] == "on" && v["generation"] == 3),
    );
    assert_eq!(ifindex(if_a), index, "A's WireGuard interface was rebuilt");
    assert_eq!(
        wireguard_go_pid(if_a),
        Some(new_wg),
        "A's wireguard-go was restarted"
    );
    ready(lab_a, &web.id);
    assert_eq!(
        lab_a.vm_identity(&web.id),
        Some(vm),
        "ov-web's VM was replaced"
    );
    from_b(
        "B's HTTP answer after agent A's restart",
        Duration::from_secs(15),
    );
    eprintln!(
        "TIMING agent A restarted -> overlay adopted, VM ready, B's HTTP answer: {:?}",
        t.elapsed()
    );

    // (f) Egress to the outside namespace, masqueraded to A's uplink address; and, for
    // contrast, the guest's flow to host B over the overlay keeps the guest's address.
    let outside: SocketAddr = format!("[{OUTSIDE}]:{OUTSIDE_PORT}").parse().unwrap();
    let server = one_shot_server(ns_out, outside, Duration::from_secs(60));
    let (code, out) = exec_sh(
        lab_a,
        &client.id,
        &format!("printf 'GET / HTTP/1.0\\r\\n\\r\\n' | busybox nc -w 10 {OUTSIDE} {OUTSIDE_PORT}"),
    );
    let seen = server.join().unwrap();
    assert_eq!(
        code,
        Some(0),
        "ov-client's GET of the outside server: {out}\n{}",
        lab_a.log()
    );
    let uplink: IpAddr = UPLINK_A.parse().unwrap();
    assert_eq!(
        seen,
        Some(uplink),
        "the outside server saw {seen:?}, not A's uplink {UPLINK_A} (guest {client_ip})"
    );
    assert!(
        out.ends_with(&format!("\r\n\r\nfrom {UPLINK_A}\n")),
        "{out:?}"
    );
    let on_b: SocketAddr = format!("[{NODE_B}]:{OUTSIDE_PORT}").parse().unwrap();
    let server = one_shot_server(ns_b, on_b, Duration::from_secs(60));
    let (code, out) = exec_sh(
        lab_a,
        &client.id,
        &format!("printf 'GET / HTTP/1.0\\r\\n\\r\\n' | busybox nc -w 10 {NODE_B} {OUTSIDE_PORT}"),
    );
    let seen = server.join().unwrap();
    assert_eq!(
        code,
        Some(0),
        "ov-client's GET of host B over the overlay: {out}"
    );
    let guest: IpAddr = client_ip.parse().unwrap();
    assert_eq!(
        seen,
        Some(guest),
        "host B saw {seen:?}, not the guest {client_ip}"
    );
    eprintln!("TIMING whole test: {:?}", t0.elapsed());
}
