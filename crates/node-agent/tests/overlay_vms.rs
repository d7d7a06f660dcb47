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
//!   which serves host A itself, is unreachable from B, and the refused packets are
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
//!   namespace, which sees host A's uplink address, not the guest's.
//!
//! The test sets no forwarding sysctl: agent A turns IPv6 forwarding on itself (egress
//! on, overlay interface up).
//!
//! Needs root, QEMU, `wireguard-go` and what the conformance lab needs (registry,
//! kernel, guest init); skips without them, fails under `PLFM_REQUIRE_SYSTEM_TESTS=1`.
//! Prints `TIMING` lines.
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

use std::net::{IpAddr, SocketAddr, TcpListener};
use std::os::fd::AsFd;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::agent::http_get;
use common::gate::skip_or_fail;
use common::wait::{poll_until, Poll};
use lab::{overlay_ipv6, Behaviour, Health, Inst, Kind, Lab};
use overlay::{connects_with, overlay_where, wireguard_go_pid, Peer};
use plfm_node_agent::instance::Status;
use serde_json::Value;

const NODE_A: &str = "fd00:a::1";
const NODE_B: &str = "fd00:b::1";
const UNDERLAY_A: &str = "169.254.98.1";
const UNDERLAY_B: &str = "169.254.98.2";
/// Host A's side of the link to the outside namespace, and the outside server.
const UPLINK_A: &str = "fd01::1";
const OUTSIDE: &str = "fd01::2";
const UPLINK_IFACE: &str = "ovout";
const DECLARED: u16 = 8087;
const UNDECLARED: u16 = 8088;
const OUTSIDE_PORT: u16 = 8099;
/// The second address `ov-client` gives itself (not its own to the host).
const SPOOFED: &str = "fd00::5:5";

fn sh(args: &[&str]) {
    let st = Command::new(args[0]).args(&args[1..]).status().unwrap();
    assert!(st.success(), "{args:?}: {st}");
}

/// Runs `f` on a thread inside the network namespace `ns` (`/run/netns/<name>`).
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

/// Deletes the namespaces and stops the `wireguard-go`s when the test ends (after the
/// labs, declared later, stopped their agents and VMs).
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

/// The overlay interfaces are named `ovwga<pid>` and `ovwgb<pid>`: not `plfm…`, see
/// the next test.
#[test]
fn vms_reach_each_other_over_the_overlay_on_declared_ports_only() {
    scenario("v", "ovwg");
}

/// The same with the overlay interfaces named like the default `plfm-wg0`
/// (`plfm-wga<pid>`). It fails at the guest's flow to host B over the overlay: the
/// nftables rules of `network.rs` match taps as `iifname`/`oifname "plfm*"`, which
/// matches the overlay interface too, so the forward chain's counted drop "to taps"
/// takes the guest's packets to the overlay before the overlay accept rule, and the
/// receiving host's input chain treats what comes from the overlay as coming from a
/// tap. Run it with `--ignored` once that is fixed.
#[test]
#[ignore = "fails until network.rs stops matching the overlay interface plfm-wg* as a tap (plfm*)"]
fn vms_reach_each_other_over_an_overlay_interface_named_like_the_default() {
    scenario("d", "plfm-wg");
}

/// The whole story, with namespaces tagged `tag` and overlay interfaces
/// `<if_prefix>a<pid>`, `<if_prefix>b<pid>`.
fn scenario(tag: &str, if_prefix: &str) {
    if !rustix::process::geteuid().is_root() {
        return skip_or_fail("root (network namespaces, taps, nftables, tun devices)");
    }
    if !vm_host::which("wireguard-go") {
        return skip_or_fail("wireguard-go (Debian package wireguard-go)");
    }
    if let Err(why) = lab::prerequisites(Kind::Qemu) {
        return skip_or_fail(&why);
    }
    let t0 = Instant::now();
    let pid = std::process::id();
    let (ns_a, ns_b, ns_out) = (
        format!("plfm-ov{tag}a{pid}"),
        format!("plfm-ov{tag}b{pid}"),
        format!("plfm-ov{tag}o{pid}"),
    );
    let (if_a, if_b) = (format!("{if_prefix}a{pid}"), format!("{if_prefix}b{pid}"));
    let _cleanup = Cleanup {
        namespaces: vec![ns_a.clone(), ns_b.clone(), ns_out.clone()],
        ifaces: vec![if_a.clone(), if_b.clone()],
    };
    for ns in [&ns_a, &ns_b, &ns_out] {
        sh(&["ip", "netns", "add", ns]);
        sh(&["ip", "-n", ns, "link", "set", "lo", "up"]);
    }
    // The underlay A <-> B, and A's uplink to the outside.
    sh(&[
        "ip", "-n", &ns_a, "link", "add", "ovu", "type", "veth", "peer", "name", "ovu", "netns",
        &ns_b,
    ]);
    sh(&[
        "ip",
        "-n",
        &ns_a,
        "link",
        "add",
        UPLINK_IFACE,
        "type",
        "veth",
        "peer",
        "name",
        UPLINK_IFACE,
        "netns",
        &ns_out,
    ]);
    for (ns, dev, addr) in [
        (&ns_a, "ovu", format!("{UNDERLAY_A}/30")),
        (&ns_b, "ovu", format!("{UNDERLAY_B}/30")),
        (&ns_a, UPLINK_IFACE, format!("{UPLINK_A}/64")),
        (&ns_out, UPLINK_IFACE, format!("{OUTSIDE}/64")),
    ] {
        sh(&["ip", "-n", ns, "addr", "add", &addr, "dev", dev, "nodad"]);
        sh(&["ip", "-n", ns, "link", "set", dev, "up"]);
    }
    // The outside knows its way back to the overlay prefix: only the masquerade keeps
    // a guest's address from it.
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

    // The hosts' agents (the lab makes each its registry with the busybox image).
    let overlay_table = |iface: &str| {
        format!(
            "[overlay]\ninterface = \"{iface}\"\nbackend = \"userspace\"\nuserspace_command = \"wireguard-go\"\ndrift_check_seconds = 1\n"
        )
    };
    let Some(lab_b) = Lab::own_in(Kind::Qemu, Path::new(&format!("/run/netns/{ns_b}"))) else {
        return;
    };
    lab_b.config_tables(&overlay_table(&if_b));
    let Some(lab_a) = Lab::own_in(Kind::Qemu, Path::new(&format!("/run/netns/{ns_a}"))) else {
        return;
    };
    lab_a.config_tables(&overlay_table(&if_a));
    lab_a.config_tables(&format!(
        "[network]\negress = \"nat\"\nuplink = \"{UPLINK_IFACE}\"\noverlay_prefix = \"fd00::/16\"\n"
    ));

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
    lab_b.start(&[]);
    lab_a.start(&[]);
    // Back in A's namespace for the rest (start entered it last; explicit all the same).
    lab_a.enter();
    let (agent_a, agent_b) = (lab_a.agent(), lab_b.agent());
    for agent in [&agent_a, &agent_b] {
        poll_until("the overlay's public key", Duration::from_secs(30), || {
            overlay_where(agent, |v| v["public_key"].is_string())
        });
    }
    let pub_a = overlay::public_key_of(&lab_a.data().join("overlay/private.key"));
    let pub_b = overlay::public_key_of(&lab_b.data().join("overlay/private.key"));
    let peer_b = Peer {
        node_id: "node-b".into(),
        public_key: pub_b.clone(),
        endpoint: format!("{UNDERLAY_B}:51820"),
        allowed_ips: vec![format!("{NODE_B}/128")],
    };
    let peer_a = Peer {
        node_id: "node-a".into(),
        public_key: pub_a.clone(),
        endpoint: format!("{UNDERLAY_A}:51820"),
        allowed_ips: vec![
            format!("{NODE_A}/128"),
            format!("{web_ip}/128"),
            format!("{client_ip}/128"),
        ],
    };
    let desired_a = lab_a.root.join("desired");
    overlay::write_overlay(
        &desired_a,
        &overlay::overlay_doc(1, NODE_A, std::slice::from_ref(&peer_b)),
    );
    overlay::write_overlay(
        &lab_b.root.join("desired"),
        &overlay::overlay_doc(1, NODE_B, &[peer_a]),
    );

    ready(&lab_a, &web.id);
    ready(&lab_a, &client.id);
    eprintln!(
        "TIMING namespaces made -> both VMs ready: {:?}",
        t0.elapsed()
    );

    // (a) B reaches the declared port through the overlay.
    let web_addr = |port: u16| format!("[{web_ip}]:{port}");
    let web_sock = |port: u16| -> SocketAddr { web_addr(port).parse().unwrap() };
    let from_b = |what: &str, within: Duration| -> (u16, String) {
        let addr = web_addr(DECLARED);
        on(&ns_b, || {
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
    // The undeclared port serves (host A itself reaches it: the host's own connections
    // are not limited), but not B: its SYNs are dropped and counted on A.
    let (code, _) = poll_until(
        "host A's GET of the undeclared port",
        Duration::from_secs(30),
        || http_get(&web_addr(UNDECLARED), "/"),
    );
    assert_eq!(code, 200, "ov-web serves {UNDECLARED} too");
    let dropped_before = chain_drops("forward", true);
    let reached = on(&ns_b, || {
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
        &lab_a,
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
    overlay::write_overlay(&desired_a, &overlay::overlay_doc(2, NODE_A, &[]));
    poll_until("A applied generation 2", Duration::from_secs(15), || {
        overlay_where(&agent_a, |v| {
            v["generation"] == 2 && v["peers"].as_array().is_some_and(|p| p.is_empty())
        })
    });
    eprintln!(
        "TIMING B removed from A's file -> A applied it: {:?}",
        t.elapsed()
    );
    let reached = on(&ns_b, || {
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
    overlay::write_overlay(&desired_a, &overlay::overlay_doc(3, NODE_A, &[peer_b]));
    from_b("healed after B was restored", Duration::from_secs(30));
    eprintln!(
        "TIMING B restored in A's file -> B's HTTP answer: {:?}",
        t.elapsed()
    );

    // (d) A's wireguard-go killed: the drift check starts it again.
    let wg_pid = wireguard_go_pid(&if_a).expect("A's wireguard-go serves its socket");
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
            || match wireguard_go_pid(&if_a) {
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
    let index = ifindex(&if_a);
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
    assert_eq!(ifindex(&if_a), index, "A's WireGuard interface was rebuilt");
    assert_eq!(
        wireguard_go_pid(&if_a),
        Some(new_wg),
        "A's wireguard-go was restarted"
    );
    ready(&lab_a, &web.id);
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
    let server = one_shot_server(&ns_out, outside, Duration::from_secs(60));
    let (code, out) = exec_sh(
        &lab_a,
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
    let server = one_shot_server(&ns_b, on_b, Duration::from_secs(60));
    let (code, out) = exec_sh(
        &lab_a,
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
