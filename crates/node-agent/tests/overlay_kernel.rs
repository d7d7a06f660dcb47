//! The kernel WireGuard backend (issue 14, item 1) against a real kernel WireGuard.
//!
//! This host's kernel has no WireGuard module, so the test boots one: the Debian cloud
//! kernel (the guest kernel of the VM tests, which ships `wireguard.ko`) under QEMU
//! (TCG), with an initramfs whose `/init` is this very test binary (with its shared
//! libraries and the `wireguard` and `veth` modules). Run as PID 1 it is the guest side:
//! it loads the modules, builds two "hosts" (its own network namespace, A, and one a
//! thread makes, B) joined by a veth pair, and configures one kernel WireGuard device
//! on each with `overlay::kernel::KernelDevice::apply`, the agent's code. It shows:
//! - a TCP connection from A to B's overlay address through the two kernel devices;
//! - the device as the kernel reports it (`WG_CMD_GET_DEVICE`) is the configuration:
//!   port, key, peer, endpoint, keepalive, allowed IPs, and a handshake;
//! - a second apply changes nothing;
//! - a peer removed by hand cuts the path, and the next apply (the drift check)
//!   restores it and the path heals;
//! - 300 more peers are applied (split across netlink messages) and read back, a
//!   second apply changes nothing, and the figures are printed;
//! - `remove` deletes the interface;
//! - `auto` picks the kernel backend on this kernel.
//!
//! The guest prints one line per step and `KWG-RESULT ok` (or `fail: why`), then powers
//! off; the host side (run by `cargo test`) boots it and checks the result.
//!
//! Prerequisites: root, `qemu-system-x86_64`, a `/boot/vmlinuz-*-cloud-amd64` kernel
//! whose modules have `wireguard` and `veth` (Debian package linux-image-cloud-amd64),
//! `strip` (binutils). Without them it skips; under `PLFM_REQUIRE_SYSTEM_TESTS=1` it
//! fails.

mod common;
#[path = "support/overlay.rs"]
mod overlay;
#[path = "support/vm_host.rs"]
mod vm_host;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv6Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use plfm_node_agent::initramfs::{add_parents, cpio, init_members, select_modules, Member};
use plfm_node_agent::overlay::config::{parse, OverlayConfig, PeerChange, PublicKey};
use plfm_node_agent::overlay::device::WgControl as _;
use plfm_node_agent::overlay::kernel::KernelDevice;

/// The line the guest ends with.
const RESULT: &str = "KWG-RESULT ";
/// Where the guest finds its modules, and the file with their load order.
const MODULES: &str = "lib/modules/plfm";
const ORDER: &str = "modules.order";
/// The whole VM run, boot included, under TCG.
const VM_DEADLINE: Duration = Duration::from_secs(300);

/// The one test's name, for `--list` and name filters (this binary has no libtest).
const TEST_NAME: &str = "overlay_kernel::the_kernel_backend_in_a_vm";

fn main() {
    if std::process::id() == 1 {
        guest_main();
    }
    // Behave like a libtest binary for the arguments that matter: `--list` lists the
    // test, and a name filter that does not match it runs nothing.
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--list") {
        println!("{TEST_NAME}: test");
        return;
    }
    // libtest options that take a value (`--test-threads 2`): the value is no filter.
    const WITH_VALUE: [&str; 6] = [
        "--test-threads",
        "--skip",
        "--color",
        "--format",
        "--logfile",
        "--shuffle-seed",
    ];
    let mut filters = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == "--skip" {
            if it.next().is_some_and(|v| TEST_NAME.contains(v.as_str())) {
                return;
            }
        } else if WITH_VALUE.contains(&a.as_str()) {
            it.next();
        } else if !a.starts_with('-') {
            filters.push(a.as_str());
        }
    }
    if !filters.is_empty() && !filters.iter().any(|f| TEST_NAME.contains(f)) {
        return;
    }
    host_main();
}

// ---------------------------------------------------------------------------------
// Host side: build the initramfs, boot the VM, read its verdict.

fn host_main() {
    use common::gate::{present, require};
    let name = TEST_NAME;
    eprintln!("test {name} ...");
    if !present(nix::unistd::geteuid().is_root(), "root") {
        return;
    }
    if !present(
        vm_host::which("qemu-system-x86_64"),
        "qemu-system-x86_64 (Debian package qemu-system-x86)",
    ) || !present(vm_host::which("strip"), "strip (Debian package binutils)")
    {
        return;
    }
    let Some((kernel, modules)) = require(vm_host::find_kernel().ok_or(
        "a /boot/vmlinuz-*-cloud-amd64 kernel with modules (Debian package linux-image-cloud-amd64)",
    )) else {
        return;
    };
    let Some(sel) = require(
        select_modules(&modules, &["wireguard", "veth"])
            .map_err(|e| format!("the guest kernel's wireguard and veth modules: {e}")),
    ) else {
        return;
    };

    let tmp = tempfile::tempdir().unwrap();
    let me = std::env::current_exe().unwrap();
    let stripped = tmp.path().join("init");
    let st = Command::new("strip")
        .arg("--strip-debug")
        .arg("-o")
        .arg(&stripped)
        .arg(&me)
        .status()
        .unwrap();
    assert!(st.success(), "strip {}: {st}", me.display());

    let mut members = init_members(std::fs::read(&stripped).unwrap());
    for lib in shared_libraries(&me) {
        let rel = lib.to_string_lossy().trim_start_matches('/').to_string();
        add_parents(&mut members, &rel);
        members.insert(
            rel,
            Member::File {
                mode: 0o755,
                data: std::fs::read(&lib).unwrap(),
            },
        );
    }
    // Modules in load order: every module after its dependencies.
    let mut order: Vec<String> = Vec::new();
    fn visit(m: &str, dep: &BTreeMap<String, Vec<String>>, order: &mut Vec<String>) {
        if order.iter().any(|o| o == m) {
            return;
        }
        for d in dep.get(m).into_iter().flatten() {
            visit(d, dep, order);
        }
        order.push(m.to_string());
    }
    for f in &sel.files {
        visit(f, &sel.dep, &mut order);
    }
    for f in &order {
        let name = format!("{MODULES}/{f}");
        add_parents(&mut members, &name);
        members.insert(
            name,
            Member::File {
                mode: 0o644,
                data: std::fs::read(modules.join(f)).unwrap(),
            },
        );
    }
    members.insert(
        format!("{MODULES}/{ORDER}"),
        Member::File {
            mode: 0o644,
            data: order.join("\n").into_bytes(),
        },
    );
    let initrd = tmp.path().join("initrd.cpio");
    std::fs::write(&initrd, cpio(&members)).unwrap();

    let started = Instant::now();
    let mut qemu = Command::new("qemu-system-x86_64")
        .args(["-accel", "tcg", "-m", "1024", "-smp", "1", "-nodefaults"])
        .args(["-no-reboot", "-display", "none", "-serial", "stdio"])
        .arg("-kernel")
        .arg(&kernel)
        .arg("-initrd")
        .arg(&initrd)
        .args(["-append", "console=ttyS0 panic=-1 quiet"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = qemu.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut console = Vec::new();
    let mut verdict = None;
    while verdict.is_none() {
        let left = VM_DEADLINE.saturating_sub(started.elapsed());
        match rx.recv_timeout(left) {
            Ok(line) => {
                let line = line.trim_end_matches('\r').to_string();
                if line.starts_with("KWG") {
                    eprintln!("  guest: {line}");
                }
                if let Some(v) = line.strip_prefix(RESULT) {
                    verdict = Some(v.to_string());
                }
                console.push(line);
            }
            Err(_) => break,
        }
    }
    let _ = qemu.kill();
    let _ = qemu.wait();
    let mut err = String::new();
    if let Some(mut e) = qemu.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    let tail = console[console.len().saturating_sub(40)..].join("\n");
    match verdict.as_deref() {
        Some("ok") => eprintln!(
            "test {name} ... ok (VM run {:.1} s)",
            started.elapsed().as_secs_f64()
        ),
        Some(v) => panic!("the guest failed: {v}\n--- console tail ---\n{tail}\n{err}"),
        None => panic!(
            "no verdict from the guest within {VM_DEADLINE:?}\n--- console tail ---\n{tail}\n{err}"
        ),
    }
}

/// The shared libraries `exe` loads, with the program interpreter (from `ldd`).
fn shared_libraries(exe: &Path) -> Vec<PathBuf> {
    let out = Command::new("ldd").arg(exe).output().unwrap();
    assert!(out.status.success(), "ldd {}", exe.display());
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or
            // "/lib64/ld-linux-x86-64.so.2 (0x...)"; the vdso has no file.
            let l = l.trim();
            let path = match l.split_once("=>") {
                Some((_, right)) => right.split_whitespace().next()?,
                None => l.split_whitespace().next()?,
            };
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect()
}

// ---------------------------------------------------------------------------------
// Guest side: PID 1 in the VM.

fn guest_main() -> ! {
    let outcome = std::panic::catch_unwind(guest_checks);
    let verdict = match outcome {
        Ok(Ok(())) => "ok".to_string(),
        Ok(Err(e)) => format!("fail: {e}"),
        Err(p) => format!(
            "fail: panicked: {}",
            p.downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default()
        ),
    };
    println!("{RESULT}{verdict}");
    let _ = std::io::stdout().flush();
    // SAFETY: sync and reboot take no pointers; as PID 1 there is nothing to return to.
    unsafe {
        libc::sync();
        libc::reboot(libc::RB_POWER_OFF);
    }
    std::process::exit(0)
}

fn step(what: &str, detail: impl std::fmt::Display) {
    println!("KWG {what}: {detail}");
}

fn mount(fstype: &str, target: &str) -> Result<(), String> {
    let src = std::ffi::CString::new(fstype).unwrap();
    let dst = std::ffi::CString::new(target).unwrap();
    // SAFETY: all pointers are NUL-terminated strings that outlive the call; no data.
    let rc = unsafe {
        libc::mount(
            src.as_ptr(),
            dst.as_ptr(),
            src.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(format!(
            "mount {fstype} on {target}: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

fn load_modules() -> Result<(), String> {
    let order = std::fs::read_to_string(format!("/{MODULES}/{ORDER}"))
        .map_err(|e| format!("read the module order: {e}"))?;
    for m in order.lines().filter(|l| !l.is_empty()) {
        let path = format!("/{MODULES}/{m}");
        let f = std::fs::File::open(&path).map_err(|e| format!("{path}: {e}"))?;
        let params = std::ffi::CString::new("").unwrap();
        // SAFETY: finit_module reads the open file and the empty parameter string,
        // both alive for the call.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_finit_module,
                std::os::fd::AsRawFd::as_raw_fd(&f),
                params.as_ptr(),
                0,
            )
        };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EEXIST) {
                return Err(format!("load {m}: {e}"));
            }
        }
    }
    Ok(())
}

fn key_pair(seed: u8) -> ([u8; 32], String) {
    let private = [seed; 32];
    let secret = x25519_dalek::StaticSecret::from(private);
    let public = base64::engine::general_purpose::STANDARD
        .encode(x25519_dalek::PublicKey::from(&secret).as_bytes());
    (private, public)
}

fn overlay_config(me: &str, peers: &[overlay::Peer]) -> OverlayConfig {
    let doc = overlay::overlay_doc(1, me, peers);
    let (cfg, refused) = parse(&serde_json::to_vec(&doc).unwrap(), None).unwrap();
    assert!(
        refused.is_empty(),
        "{} peers refused, the first: {:?}",
        refused.len(),
        refused.first()
    );
    cfg
}

const A_IP: &str = "fd00:a::1";
const B_IP: &str = "fd00:b::1";
const A_UNDERLAY: &str = "169.254.7.1";
const B_UNDERLAY: &str = "169.254.7.2";

fn peer(node: &str, public: &str, endpoint_ip: &str, ip: &str) -> overlay::Peer {
    overlay::Peer {
        node_id: node.into(),
        public_key: public.into(),
        endpoint: format!("{endpoint_ip}:51820"),
        allowed_ips: vec![format!("{ip}/128")],
    }
}

/// rtnetlink calls of the guest's own setup (the agent's code under test is
/// `KernelDevice`; links the test needs around it are made here).
mod links {
    use futures_util::TryStreamExt as _;
    use std::net::{IpAddr, Ipv4Addr};

    async fn handle() -> rtnetlink::Handle {
        let (conn, handle, _) = rtnetlink::new_connection().expect("netlink socket");
        tokio::spawn(conn);
        handle
    }

    async fn index(h: &rtnetlink::Handle, name: &str) -> Result<u32, String> {
        let link = h
            .link()
            .get()
            .match_name(name.to_string())
            .execute()
            .try_next()
            .await
            .map_err(|e| format!("link {name}: {e}"))?
            .ok_or(format!("no link {name}"))?;
        Ok(link.header.index)
    }

    pub async fn up(name: &str, addr: Option<(Ipv4Addr, u8)>) -> Result<(), String> {
        let h = handle().await;
        let i = index(&h, name).await?;
        if let Some((a, len)) = addr {
            h.address()
                .add(i, IpAddr::V4(a), len)
                .execute()
                .await
                .map_err(|e| format!("address {a}/{len} on {name}: {e}"))?;
        }
        h.link()
            .set(rtnetlink::LinkUnspec::new_with_index(i).up().build())
            .execute()
            .await
            .map_err(|e| format!("{name} up: {e}"))
    }

    /// A veth pair `a`–`b`, with `b` moved into the network namespace at `ns`.
    pub async fn veth_into(a: &str, b: &str, ns: &std::fs::File) -> Result<(), String> {
        let h = handle().await;
        h.link()
            .add(rtnetlink::LinkVeth::new(a, b).build())
            .execute()
            .await
            .map_err(|e| format!("veth {a}/{b}: {e}"))?;
        let i = index(&h, b).await?;
        h.link()
            .set(
                rtnetlink::LinkUnspec::new_with_index(i)
                    .setns_by_fd(std::os::fd::AsRawFd::as_raw_fd(ns))
                    .build(),
            )
            .execute()
            .await
            .map_err(|e| format!("move {b}: {e}"))
    }
}

/// Host B: a thread in a network namespace of its own, with its kernel WireGuard
/// device, serving `hello from b` on its overlay address.
fn host_b(
    to_a: mpsc::Sender<Result<String, String>>,
    from_a: mpsc::Receiver<()>,
    b_private: [u8; 32],
    cfg: OverlayConfig,
) {
    let run = || -> Result<(), String> {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(|e| format!("unshare: {e}"))?;
        // SAFETY: gettid has no arguments and cannot fail.
        let tid = unsafe { libc::gettid() };
        to_a.send(Ok(format!("/proc/1/task/{tid}/ns/net")))
            .map_err(|e| e.to_string())?;
        from_a.recv().map_err(|e| e.to_string())?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        rt.block_on(async {
            links::up("lo", None).await?;
            links::up("ub", Some((B_UNDERLAY.parse().unwrap(), 30))).await?;
            KernelDevice::new("wgb")
                .apply(&cfg, &b_private)
                .await
                .map_err(|e| e.to_string())
        })?;
        let listener = std::net::TcpListener::bind((B_IP.parse::<Ipv6Addr>().unwrap(), 8080))
            .map_err(|e| format!("listen on B: {e}"))?;
        to_a.send(Ok("ready".into())).map_err(|e| e.to_string())?;
        for mut conn in listener.incoming().map_while(Result::ok) {
            let _ = conn.write_all(b"hello from b\n");
        }
        Ok(())
    };
    if let Err(e) = run() {
        let _ = to_a.send(Err(e));
    }
}

/// Connects to B's server and reads its greeting within `within`.
fn greets(within: Duration) -> bool {
    let addr = SocketAddr::from((B_IP.parse::<Ipv6Addr>().unwrap(), 8080));
    let end = Instant::now() + within;
    loop {
        if let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(500)) {
            let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
            let mut got = String::new();
            if s.read_to_string(&mut got).is_ok() && got == "hello from b\n" {
                return true;
            }
        }
        if Instant::now() >= end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn guest_checks() -> Result<(), String> {
    mount("proc", "/proc")?;
    mount("sysfs", "/sys")?;
    load_modules()?;
    step("modules", "wireguard and veth loaded");
    // What the agent's `auto` picks on this kernel.
    let picked = plfm_node_agent::overlay::settings::resolve_backend(
        plfm_node_agent::overlay::settings::Backend::Auto,
        plfm_node_agent::overlay::settings::kernel_wireguard(),
    )?;
    if picked.0 != "kernel" {
        return Err(format!("auto picked {picked:?} on a kernel with WireGuard"));
    }
    step("auto", "picks the kernel backend");
    let (a_private, a_public) = key_pair(0x11);
    let (b_private, b_public) = key_pair(0x22);
    let cfg_a = overlay_config(A_IP, &[peer("b", &b_public, B_UNDERLAY, B_IP)]);
    let cfg_b = overlay_config(B_IP, &[peer("a", &a_public, A_UNDERLAY, A_IP)]);

    let (to_a, from_b) = mpsc::channel();
    let (to_b, from_a) = mpsc::channel();
    std::thread::spawn(move || host_b(to_a, from_a, b_private, cfg_b));
    let b_ns = from_b.recv().map_err(|e| e.to_string())??;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let dev = KernelDevice::new("wga");
    rt.block_on(async {
        let ns = std::fs::File::open(&b_ns).map_err(|e| format!("{b_ns}: {e}"))?;
        links::up("lo", None).await?;
        links::veth_into("ua", "ub", &ns).await?;
        links::up("ua", Some((A_UNDERLAY.parse().unwrap(), 30))).await
    })?;
    to_b.send(()).map_err(|e| e.to_string())?;
    let ready = from_b.recv().map_err(|e| e.to_string())??;
    step("host B", ready);

    // 1. Apply on A: the interface is made, the key, port and peer set.
    let applied = rt
        .block_on(dev.apply(&cfg_a, &a_private))
        .map_err(|e| e.to_string())?;
    step("first apply", format!("{applied:?}"));
    if !(applied.started && applied.interface_set && applied.changes == 1) {
        return Err(format!("first apply: {applied:?}"));
    }
    if !greets(Duration::from_secs(20)) {
        return Err("A cannot reach B's overlay address through the kernel devices".into());
    }
    step("path", "A reached B's overlay address through wga and wgb");

    // 2. The device as the kernel reports it.
    let state = rt
        .block_on(dev.state())
        .map_err(|e| e.to_string())?
        .ok_or("no device")?;
    let b_key = PublicKey::parse(&b_public).map_err(|e| e.to_string())?;
    let p = state.peers.first().ok_or("no peer on wga")?;
    let checks = [
        ("listen port", state.listen_port == Some(51820)),
        ("a private key", state.has_private_key),
        ("one peer", state.peers.len() == 1),
        ("peer key", p.public_key == Some(b_key)),
        (
            "endpoint",
            p.endpoint == Some(format!("{B_UNDERLAY}:51820").parse().unwrap()),
        ),
        ("keepalive", p.keepalive_secs == 1),
        (
            "allowed IPs",
            p.allowed_ips
                .iter()
                .map(|i| i.to_string())
                .collect::<Vec<_>>()
                == [format!("{B_IP}/128")],
        ),
        ("handshake", p.last_handshake_secs > 0),
        ("bytes", p.rx_bytes > 0 && p.tx_bytes > 0),
    ];
    if let Some((what, _)) = checks.iter().find(|(_, ok)| !ok) {
        return Err(format!("the kernel's device differs in {what}: {state:?}"));
    }
    step(
        "kernel state",
        format!(
            "port 51820, 1 peer, handshake, rx {} tx {} bytes",
            p.rx_bytes, p.tx_bytes
        ),
    );

    // 3. Idempotent.
    let again = rt
        .block_on(dev.apply(&cfg_a, &a_private))
        .map_err(|e| e.to_string())?;
    if again.started || again.interface_set || again.changes != 0 {
        return Err(format!("a second apply changed something: {again:?}"));
    }
    step("second apply", "nothing changed");

    // 4. Drift: the peer removed by hand cuts the path; apply repairs it.
    rt.block_on(dev.set(None, None, &[PeerChange::Remove(b_key)]))
        .map_err(|e| e.to_string())?;
    if greets(Duration::from_secs(2)) {
        return Err("B is still reachable with its peer removed".into());
    }
    let repaired = rt
        .block_on(dev.apply(&cfg_a, &a_private))
        .map_err(|e| e.to_string())?;
    if repaired.changes != 1 || repaired.started {
        return Err(format!("the repair: {repaired:?}"));
    }
    if !greets(Duration::from_secs(20)) {
        return Err("the path did not heal after the repair".into());
    }
    step(
        "drift",
        "peer removed by hand: path cut; apply repaired it; path healed",
    );

    // 5. Many peers: split across messages, read back whole.
    let mut peers = vec![peer("b", &b_public, B_UNDERLAY, B_IP)];
    for i in 0..300u16 {
        let (_, public) = key_pair_u16(i);
        peers.push(overlay::Peer {
            node_id: format!("n{i}"),
            public_key: public,
            endpoint: format!("169.254.8.{}:51820", i % 250 + 1),
            allowed_ips: vec![format!("fd00:1:{i:x}::1/128"), format!("fd00:2:{i:x}::/64")],
        });
    }
    let big = overlay_config(A_IP, &peers);
    let t = Instant::now();
    let applied = rt
        .block_on(dev.apply(&big, &a_private))
        .map_err(|e| e.to_string())?;
    let apply_ms = t.elapsed().as_millis();
    let t = Instant::now();
    let again = rt
        .block_on(dev.apply(&big, &a_private))
        .map_err(|e| e.to_string())?;
    let check_ms = t.elapsed().as_millis();
    let state = rt
        .block_on(dev.state())
        .map_err(|e| e.to_string())?
        .ok_or("no device")?;
    if applied.changes != 300 || again.changes != 0 || state.peers.len() != 301 {
        return Err(format!(
            "300 more peers: applied {} changes, then {}, device has {} peers",
            applied.changes,
            again.changes,
            state.peers.len()
        ));
    }
    if state
        .peers
        .iter()
        .any(|p| p.public_key != Some(b_key) && p.allowed_ips.len() != 2)
    {
        return Err("a peer's allowed IPs were not read back whole".into());
    }
    if !greets(Duration::from_secs(10)) {
        return Err("B unreachable after 300 more peers".into());
    }
    step(
        "301 peers",
        format!("applied in {apply_ms} ms, checked unchanged in {check_ms} ms (TCG)"),
    );

    // 6. Remove.
    let existed = rt.block_on(dev.remove()).map_err(|e| e.to_string())?;
    let after = rt.block_on(dev.state()).map_err(|e| e.to_string())?;
    if !existed || after.is_some() || nix::net::if_::if_nametoindex("wga").is_ok() {
        return Err(format!("remove: existed {existed}, state after {after:?}"));
    }
    step("remove", "interface deleted");
    Ok(())
}

fn key_pair_u16(i: u16) -> ([u8; 32], String) {
    // Bytes 1 and 2: X25519 clears the low bits of byte 0, which would make keys equal.
    let mut private = [0x33u8; 32];
    private[1..3].copy_from_slice(&i.to_le_bytes());
    let secret = x25519_dalek::StaticSecret::from(private);
    let public = base64::engine::general_purpose::STANDARD
        .encode(x25519_dalek::PublicKey::from(&secret).as_bytes());
    (private, public)
}
