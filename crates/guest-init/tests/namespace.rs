//! `plfm-guest-init` for real as PID 1 of new PID + mount (+ network) namespaces in
//! container test mode: loop devices of ext4 images built here (root with static busybox,
//! empty scratch, one volume), the host side of the handshake served by the agent's own
//! `guest` module over a Unix socket.
//!
//! Proves: the overlay root (a write lands in scratch, the root image is unchanged), the
//! secrets file (mode 0400, right content), the volume at its path, eth0 configured over
//! netlink (in a network namespace with a tap as eth0), uid/gid/env/cwd of the workload,
//! the workload's exit code reaching the host, SIGTERM forwarding, the host's stop
//! request, config refusal, and a handshake that never comes failing within 5 s with a
//! clear console line. Also prints the exec → workload-exec time (the benchmark of
//! issue 5).
//!
//! Needs root, loop devices, overlayfs, `unshare`, `losetup`, `mkfs.ext4`, `debugfs`,
//! `ip` and a static `/bin/busybox` (Debian: util-linux, mount, e2fsprogs, iproute2,
//! busybox-static). Missing prerequisites skip with a message, or fail when
//! `PLFM_REQUIRE_SYSTEM_TESTS=1`. Everything is cleaned up by Drop guards: processes
//! killed (`unshare --kill-child`), loop devices detached, network namespaces deleted;
//! mounts live only in the namespaces and vanish with them.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use plfm_guest_protocol::{
    Config, Ipv4Config, MountConfig, NetworkConfig, SecretsConfig, SecretsData, WorkloadConfig,
};
use plfm_node_agent::guest::{
    accept_guest, bind_guest_listener, guest_socket_path, GuestError, GuestEvent,
};
use plfm_node_agent::instance::ReasonCode;

// The workspace's one system-test gate. The node agent's test support is not part of
// any library, so it is shared by path (the file uses `std` only).
#[path = "../../node-agent/tests/common/gate.rs"]
mod gate;

const GUEST_INIT: &str = env!("CARGO_BIN_EXE_plfm-guest-init");
const SECRETS: &str = "# TRC_SECRETS_V1\nDB_PASSWORD=s3cr3t-value\nAPI_KEY=base64:aGVsbG8=\n";
static COUNTER: AtomicU32 = AtomicU32::new(0);

fn guest_init_binary() -> PathBuf {
    std::env::var("PLFM_GUEST_INIT_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|_| GUEST_INIT.into())
}

fn run(cmd: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .map_err(|e| format!("{cmd}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{cmd} {}: {}: {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Checks the prerequisites; `Err` says which is missing.
fn prerequisites() -> Result<(), String> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Err("root".into());
    }
    for tool in ["unshare", "losetup", "mkfs.ext4", "debugfs", "ip"] {
        if Command::new(tool).arg("--help").output().is_err()
            && Command::new(tool).arg("-V").output().is_err()
        {
            return Err(format!("{tool} binary"));
        }
    }
    if !Path::new("/dev/loop-control").exists() {
        return Err("/dev/loop-control (loop devices)".into());
    }
    let busybox =
        std::fs::read("/bin/busybox").map_err(|_| "/bin/busybox (busybox-static)".to_string())?;
    if run("readelf", &["-l", "/bin/busybox"]).is_ok_and(|o| o.contains("program interpreter"))
        || busybox.len() < 64
    {
        return Err("a statically linked /bin/busybox (busybox-static)".into());
    }
    let fs = std::fs::read_to_string("/proc/filesystems").unwrap_or_default();
    if !fs.contains("overlay") && run("modprobe", &["overlay"]).is_err() {
        return Err("overlayfs in the host kernel".into());
    }
    Ok(())
}

/// `true` when the test should run; skips (or fails under the gate) otherwise.
fn ready() -> bool {
    gate::require(prerequisites()).is_some()
}

/// A loop device, detached on drop (retrying while the namespace's mounts go away).
struct Loop(String);

impl Drop for Loop {
    fn drop(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while run("losetup", &["-d", &self.0]).is_err() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// A network namespace with a tap `eth0`, deleted on drop.
struct NetNs(String);

impl NetNs {
    fn new() -> NetNs {
        let name = format!(
            "plfm-gi-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        );
        run("ip", &["netns", "add", &name]).unwrap();
        let ns = NetNs(name);
        // A tap (no dummy/veth modules needed); without a reader it has no carrier,
        // which does not matter for configuring it.
        run(
            "ip",
            &["-n", &ns.0, "tuntap", "add", "dev", "eth0", "mode", "tap"],
        )
        .unwrap();
        ns
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = run("ip", &["-n", &self.0, "link", "del", "eth0"]);
        let _ = run("ip", &["netns", "del", &self.0]);
    }
}

/// Disk images and their loop devices.
/// Fields drop in order: the loop devices are detached before the images are deleted.
struct Disks {
    root: Loop,
    scratch: Loop,
    volume: Loop,
    /// Root layers 1, 2, … above `root` (empty: a flattened root).
    layers: Vec<Loop>,
    root_img: PathBuf,
    scratch_img: PathBuf,
    volume_img: PathBuf,
    dir: tempfile::TempDir,
}

fn mkfs(img: &Path, size_mb: u64, content: Option<&Path>) {
    std::fs::File::create(img)
        .unwrap()
        .set_len(size_mb << 20)
        .unwrap();
    // No journal: after guest init's sync the images can be read with debugfs, without
    // a journal replay.
    let mut args = vec!["-q", "-F", "-O", "^has_journal", "-E", "root_owner=0:0"];
    let c;
    if let Some(dir) = content {
        c = dir.to_string_lossy().into_owned();
        args.extend(["-d", c.as_str()]);
    }
    let i = img.to_string_lossy().into_owned();
    args.push(i.as_str());
    run("mkfs.ext4", &args).unwrap();
}

fn attach(img: &Path, read_only: bool) -> Loop {
    let mut args = vec!["--find", "--show"];
    if read_only {
        args.push("--read-only");
    }
    let i = img.to_string_lossy().into_owned();
    args.push(&i);
    Loop(run("losetup", &args).unwrap().trim().to_string())
}

/// A minimal root tree with static busybox in `tree`.
fn rootfs_tree(tree: &Path) {
    {
        for d in ["bin", "etc", "proc", "sys", "dev", "run", "tmp", "home/app"] {
            std::fs::create_dir_all(tree.join(d)).unwrap();
        }
        std::fs::copy("/bin/busybox", tree.join("bin/busybox")).unwrap();
        for applet in [
            "sh", "cat", "stat", "sleep", "echo", "id", "pwd", "grep", "true", "ls", "rm",
        ] {
            std::os::unix::fs::symlink("busybox", tree.join("bin").join(applet)).unwrap();
        }
        std::fs::write(tree.join("etc/marker"), "from the root image\n").unwrap();
        std::os::unix::fs::chown(tree.join("home/app"), Some(1000), Some(1000)).unwrap();
        std::fs::set_permissions(tree.join("tmp"), std::fs::Permissions::from_mode(0o1777))
            .unwrap();
    }
}

impl Disks {
    fn new() -> Disks {
        let dir = tempfile::tempdir().unwrap();
        let tree = dir.path().join("rootfs");
        rootfs_tree(&tree);
        let vol_tree = dir.path().join("voltree");
        std::fs::create_dir_all(&vol_tree).unwrap();
        std::fs::write(vol_tree.join("pre-existing"), "volume data\n").unwrap();

        let root_img = dir.path().join("root.ext4");
        let scratch_img = dir.path().join("scratch.ext4");
        let volume_img = dir.path().join("volume.ext4");
        mkfs(&root_img, 16, Some(&tree));
        mkfs(&scratch_img, 16, None);
        mkfs(&volume_img, 8, Some(&vol_tree));
        let root = attach(&root_img, true);
        let scratch = attach(&scratch_img, false);
        let volume = attach(&volume_img, false);
        Disks {
            root,
            scratch,
            volume,
            layers: Vec::new(),
            root_img,
            scratch_img,
            volume_img,
            dir,
        }
    }
}

/// Reads a file from an ext4 image without mounting it.
fn debugfs_cat(img: &Path, path: &str) -> Option<String> {
    let out = Command::new("debugfs")
        .args(["-R", &format!("cat {path}")])
        .arg(img)
        .stderr(Stdio::piped())
        .output()
        .ok()?;
    let err = String::from_utf8_lossy(&out.stderr);
    if err.contains("File not found") {
        return None;
    }
    Some(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A running guest init: its `unshare` parent (killed with the whole namespace on drop)
/// and its console output.
struct Guest {
    child: Child,
    console: Arc<Mutex<String>>,
    started: Instant,
}

impl Drop for Guest {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct GuestOpts<'a> {
    socket: PathBuf,
    disks: Option<&'a Disks>,
    netns: Option<&'a NetNs>,
    staging: PathBuf,
}

fn start_guest(o: &GuestOpts) -> Guest {
    std::fs::create_dir_all(&o.staging).unwrap();
    let mut cmd = match o.netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args([
                "netns",
                "exec",
                &ns.0,
                "unshare",
                "--pid",
                "--mount",
                "--fork",
                "--kill-child",
            ]);
            c
        }
        None => {
            let mut c = Command::new("unshare");
            c.args(["--pid", "--mount", "--net", "--fork", "--kill-child"]);
            c
        }
    };
    cmd.arg(guest_init_binary())
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("PLFM_GUEST_TEST_MODE", "1")
        .env("PLFM_GUEST_HOST_SOCKET", &o.socket)
        .env("PLFM_GUEST_STAGING", &o.staging)
        .env("PLFM_GUEST_INSTANCE_ID", "ns-test")
        .env("PLFM_GUEST_MODULES_DIR", "/nonexistent");
    if let Some(d) = o.disks {
        cmd.env("PLFM_GUEST_ROOT_DEVICE", &d.root.0)
            .env("PLFM_GUEST_SCRATCH_DEVICE", &d.scratch.0)
            .env("PLFM_GUEST_VOLUME_DEVICES", &d.volume.0);
        if !d.layers.is_empty() {
            let list: Vec<&str> = d.layers.iter().map(|l| l.0.as_str()).collect();
            cmd.env("PLFM_GUEST_LAYER_DEVICES", list.join(","));
        }
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let started = Instant::now();
    let mut child = cmd.spawn().expect("spawn unshare");
    let console = Arc::new(Mutex::new(String::new()));
    for stream in [
        Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
        Box::new(child.stderr.take().unwrap()),
    ] {
        let console = console.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines().map_while(Result::ok) {
                let mut c = console.lock().unwrap();
                c.push_str(&line);
                c.push('\n');
            }
        });
    }
    collect_workload_logs(&o.socket, console.clone());
    Guest {
        child,
        console,
        started,
    }
}

/// Serves the log port next to the host channel (`<uds>_5163`): the workload's lines
/// (and guest init's) arrive there, not on the console; they are added to `console` so
/// that the tests can wait for them in one place.
fn collect_workload_logs(host_socket: &Path, console: Arc<Mutex<String>>) {
    let s = host_socket.to_string_lossy();
    let path = PathBuf::from(format!("{}_5163", s.strip_suffix("_5161").unwrap_or(&s)));
    let _ = std::fs::remove_file(&path);
    let listener = std::os::unix::net::UnixListener::bind(&path).expect("bind the log socket");
    std::thread::spawn(move || {
        for conn in listener.incoming().map_while(Result::ok) {
            let console = console.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(conn).lines().map_while(Result::ok) {
                    if let Ok(plfm_guest_protocol::LogMessage::Line(l)) =
                        plfm_guest_protocol::decode_line(line.as_bytes())
                    {
                        if l.stream == plfm_guest_protocol::LogStream::Console {
                            continue;
                        }
                        let mut c = console.lock().unwrap();
                        c.push_str(&format!("[{}] {}\n", l.stream.as_str(), l.line));
                    }
                }
            });
        }
    });
}

impl Guest {
    fn console(&self) -> String {
        self.console.lock().unwrap().clone()
    }

    fn wait_console(&self, needle: &str, within: Duration) {
        let deadline = Instant::now() + within;
        while !self.console().contains(needle) {
            assert!(
                Instant::now() < deadline,
                "no {needle:?} on the console; console:\n{}",
                self.console()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits for the process to exit; returns its exit code.
    fn wait_exit(&mut self, within: Duration) -> i32 {
        let deadline = Instant::now() + within;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                // Give the console readers a moment to drain the pipes (they end at EOF).
                let drain = Instant::now() + Duration::from_secs(1);
                while !self.console().contains("exiting (test mode)") && Instant::now() < drain {
                    std::thread::sleep(Duration::from_millis(5));
                }
                return s.code().unwrap_or(-1);
            }
            assert!(
                Instant::now() < deadline,
                "guest init still running; console:\n{}",
                self.console()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Pid (in the host's namespace) of guest init, the child of `unshare`.
    fn init_pid(&self) -> i32 {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let pid = self.child.id();
            if let Ok(children) =
                std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
            {
                if let Some(c) = children.split_whitespace().next() {
                    return c.parse().unwrap();
                }
            }
            assert!(Instant::now() < deadline, "no child of unshare");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

fn config(argv: &[&str], uid: u32) -> Config {
    Config {
        config_version: "v1".into(),
        instance_id: "ns-test".into(),
        generation: 1,
        workload: WorkloadConfig {
            argv: argv.iter().map(|s| s.to_string()).collect(),
            cwd: None,
            env: BTreeMap::new(),
            uid,
            gid: uid,
            listen_port: None,
        },
        network: None,
        mounts: vec![],
        root_layers: 1,
        secrets: None,
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn guest_init_runs_the_workload_on_an_overlay_root_with_secrets_volume_and_network() {
    if !ready() {
        return;
    }
    let disks = Disks::new();
    let root_before = std::fs::read(&disks.root_img).unwrap();
    let netns = NetNs::new();
    let uds = disks.dir.path().join("v.sock");
    let rt = runtime();
    let listener = rt.block_on(async { bind_guest_listener(&uds) }).unwrap();

    let script = "set -e
echo 'written by the workload' > /written-by-workload
stat -c '%a %u %g' /run/secrets/platform.env > /data/secrets.stat
cat /run/secrets/platform.env > /data/secrets.copy
echo \"$GREETING $HOME\" > /data/env.txt
pwd > /data/cwd.txt
cat /etc/marker > /data/marker.txt
cat /data/pre-existing > /data/pre.txt
grep ' /data ' /proc/mounts > /data/mounts.txt
grep ' /run ' /proc/mounts >> /data/mounts.txt
cat /etc/resolv.conf > /data/resolv.txt
exit 7";
    let mut cfg = config(&["/bin/sh", "-c", script], 0);
    cfg.workload.cwd = Some("/data".into());
    cfg.workload.env.insert("GREETING".into(), "hello".into());
    cfg.mounts.push(MountConfig {
        volume_id: "vol-1".into(),
        mount_path: "/data".into(),
        read_only: false,
        filesystem: "ext4".into(),
    });
    cfg.secrets = Some(SecretsConfig {
        required: true,
        path: "/run/secrets/platform.env".into(),
        mode: 0o400,
        uid: None,
        gid: None,
        data: Some(SecretsData::new(SECRETS.into())),
    });
    cfg.network = Some(NetworkConfig {
        address: "fd00::2".parse().unwrap(),
        prefix_len: 128,
        gateway: Some("fe80::1".parse().unwrap()),
        mtu: 1400,
        dns: vec!["fd00::53".parse().unwrap()],
        ipv4: Some(Ipv4Config {
            address: "169.254.0.2".parse().unwrap(),
            prefix_len: 30,
            gateway: Some("169.254.0.1".parse().unwrap()),
        }),
    });

    let mut guest = start_guest(&GuestOpts {
        socket: guest_socket_path(&uds),
        disks: Some(&disks),
        netns: Some(&netns),
        staging: disks.dir.path().join("staging"),
    });
    let events = rt.block_on(async {
        let mut s = accept_guest(&listener, "ns-test", cfg, Duration::from_secs(5)).await?;
        let mut events = Vec::new();
        loop {
            let ev = tokio::time::timeout(Duration::from_secs(20), s.next_event())
                .await
                .map_err(|_| GuestError::Closed {
                    when: "test timeout",
                })??;
            let last = matches!(ev, GuestEvent::Exited { .. } | GuestEvent::Failed { .. });
            events.push(ev);
            if last {
                return Ok::<_, GuestError>(events);
            }
        }
    });
    let code = guest.wait_exit(Duration::from_secs(10));
    let console = guest.console();
    eprintln!("--- console ---\n{console}---");
    let events = events.unwrap_or_else(|e| panic!("{e}; console:\n{console}"));
    assert_eq!(code, 0, "guest init exit code");
    assert!(!console.contains("s3cr3t"), "secret value on the console");

    // The workload's exit code reached the host.
    assert_eq!(events[0], GuestEvent::ConfigApplied);
    let GuestEvent::WorkloadStarted {
        init_time,
        handshake_wait,
        ..
    } = events[1]
    else {
        panic!("{events:?}")
    };
    assert_eq!(
        events[2],
        GuestEvent::Exited {
            code: Some(7),
            signal: None,
            oom_killed: false
        },
        "{events:?}"
    );
    let (init, wait) = (init_time.unwrap(), handshake_wait.unwrap());
    eprintln!(
        "BENCH guest-init exec -> workload exec: {:.2} ms total, {:.2} ms waiting for the host, {:.2} ms own work ({})",
        init.as_secs_f64() * 1e3,
        wait.as_secs_f64() * 1e3,
        (init - wait).as_secs_f64() * 1e3,
        guest_init_binary().display()
    );

    // Overlay: the write landed in scratch, the root image is unchanged.
    assert_eq!(
        debugfs_cat(&disks.scratch_img, "/upper/written-by-workload").as_deref(),
        Some("written by the workload\n")
    );
    assert!(debugfs_cat(&disks.root_img, "/written-by-workload").is_none());
    assert!(
        std::fs::read(&disks.root_img).unwrap() == root_before,
        "root image changed"
    );

    // Secrets: 0400, owned by the workload, exact content; volume mounted at /data (rw);
    // env, cwd, root image content visible through the overlay; /run is tmpfs.
    let vol = |p: &str| {
        debugfs_cat(&disks.volume_img, p).unwrap_or_else(|| panic!("{p} not on the volume"))
    };
    assert_eq!(vol("/secrets.stat"), "400 0 0\n");
    assert_eq!(vol("/secrets.copy"), SECRETS);
    assert_eq!(vol("/env.txt"), "hello /root\n");
    assert_eq!(vol("/cwd.txt"), "/data\n");
    assert_eq!(vol("/marker.txt"), "from the root image\n");
    assert_eq!(vol("/pre.txt"), "volume data\n");
    let mounts = vol("/mounts.txt");
    assert!(mounts.contains(" /data ext4 rw"), "{mounts}");
    assert!(mounts.contains(" /run tmpfs "), "{mounts}");
    assert_eq!(vol("/resolv.txt"), "nameserver fd00::53\n");

    // eth0: MTU, both addresses, default routes.
    let link = run("ip", &["-n", &netns.0, "link", "show", "eth0"]).unwrap();
    assert!(link.contains("mtu 1400") && link.contains(",UP"), "{link}");
    let addrs = run("ip", &["-n", &netns.0, "addr", "show", "eth0"]).unwrap();
    assert!(
        addrs.contains("inet6 fd00::2/128") && addrs.contains("inet 169.254.0.2/30"),
        "{addrs}"
    );
    let r6 = run("ip", &["-n", &netns.0, "-6", "route", "show", "default"]).unwrap();
    assert!(r6.contains("via fe80::1 dev eth0"), "{r6}");
    let r4 = run("ip", &["-n", &netns.0, "-4", "route", "show", "default"]).unwrap();
    assert!(r4.contains("via 169.254.0.1 dev eth0"), "{r4}");
    drop(guest);
}

#[test]
fn sigterm_is_forwarded_to_the_workload_running_as_its_uid() {
    if !ready() {
        return;
    }
    let disks = Disks::new();
    let uds = disks.dir.path().join("v.sock");
    let rt = runtime();
    let listener = rt.block_on(async { bind_guest_listener(&uds) }).unwrap();
    let script = "id -u > /home/app/id.txt; id -g >> /home/app/id.txt
trap 'echo got-term > /home/app/term.txt; exit 42' TERM
echo workload-ready
while :; do sleep 0.05; done";
    let cfg = config(&["/bin/sh", "-c", script], 1000);
    let mut guest = start_guest(&GuestOpts {
        socket: guest_socket_path(&uds),
        disks: Some(&disks),
        netns: None,
        staging: disks.dir.path().join("staging"),
    });
    let mut session = rt
        .block_on(accept_guest(
            &listener,
            "ns-test",
            cfg,
            Duration::from_secs(5),
        ))
        .unwrap_or_else(|e| panic!("{e}; console:\n{}", guest.console()));
    guest.wait_console("workload-ready", Duration::from_secs(10));
    // SIGTERM to guest init (PID 1 of the namespace) from outside.
    let pid = guest.init_pid();
    // SAFETY: kill with a valid pid and signal number has no memory-safety preconditions.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let ended = rt.block_on(async {
        loop {
            match tokio::time::timeout(Duration::from_secs(10), session.next_event()).await {
                Ok(Ok(ev @ GuestEvent::Exited { .. })) => return ev,
                Ok(Ok(_)) => continue,
                other => panic!("{other:?}; console:\n{}", guest.console()),
            }
        }
    });
    assert_eq!(
        ended,
        GuestEvent::Exited {
            code: Some(42),
            signal: None,
            oom_killed: false
        }
    );
    // Guest init does not end the VM while the host has not confirmed the final
    // status by closing the channel (it waits up to 2 s), and ends it once it has.
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        guest.child.try_wait().unwrap().is_none(),
        "guest init ended before the host closed the channel; console:\n{}",
        guest.console()
    );
    assert!(!guest.console().contains("exiting (test mode)"));
    drop(session);
    assert_eq!(guest.wait_exit(Duration::from_secs(10)), 0);
    let console = guest.console();
    assert!(
        !console.contains("did not confirm the final status"),
        "the close was not seen: {console}"
    );
    assert!(
        console.contains("forwarding SIGTERM to the workload"),
        "{console}"
    );
    assert_eq!(
        debugfs_cat(&disks.scratch_img, "/upper/home/app/id.txt").as_deref(),
        Some("1000\n1000\n")
    );
    assert_eq!(
        debugfs_cat(&disks.scratch_img, "/upper/home/app/term.txt").as_deref(),
        Some("got-term\n")
    );
}

#[test]
fn host_stop_request_terms_then_kills_at_the_deadline() {
    if !ready() {
        return;
    }
    let disks = Disks::new();
    let uds = disks.dir.path().join("v.sock");
    let rt = runtime();
    let listener = rt.block_on(async { bind_guest_listener(&uds) }).unwrap();
    let script = "trap '' TERM; echo workload-ready; while :; do sleep 0.05; done";
    let cfg = config(&["/bin/sh", "-c", script], 0);
    let mut guest = start_guest(&GuestOpts {
        socket: guest_socket_path(&uds),
        disks: Some(&disks),
        netns: None,
        staging: disks.dir.path().join("staging"),
    });
    let mut session = rt
        .block_on(accept_guest(
            &listener,
            "ns-test",
            cfg,
            Duration::from_secs(5),
        ))
        .unwrap_or_else(|e| panic!("{e}; console:\n{}", guest.console()));
    guest.wait_console("workload-ready", Duration::from_secs(10));
    let asked = Instant::now();
    let ended = rt.block_on(async {
        session
            .request_stop(Duration::from_millis(300))
            .await
            .unwrap();
        loop {
            match tokio::time::timeout(Duration::from_secs(10), session.next_event()).await {
                Ok(Ok(ev @ GuestEvent::Exited { .. })) => return ev,
                Ok(Ok(_)) => continue,
                other => panic!("{other:?}; console:\n{}", guest.console()),
            }
        }
    });
    let took = asked.elapsed();
    assert_eq!(
        ended,
        GuestEvent::Exited {
            code: None,
            signal: Some(libc::SIGKILL),
            oom_killed: false
        }
    );
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_secs(5),
        "{took:?}"
    );
    assert_eq!(guest.wait_exit(Duration::from_secs(10)), 0);
    assert!(guest.console().contains("stop deadline reached"));
}

#[test]
fn reserved_volume_path_is_refused_instead_of_acknowledged() {
    if !ready() {
        return;
    }
    let disks = Disks::new();
    let uds = disks.dir.path().join("v.sock");
    let rt = runtime();
    let listener = rt.block_on(async { bind_guest_listener(&uds) }).unwrap();
    let mut cfg = config(&["/bin/true"], 0);
    cfg.mounts.push(MountConfig {
        volume_id: "vol-1".into(),
        mount_path: "/run/secrets".into(),
        read_only: true,
        filesystem: "ext4".into(),
    });
    let mut guest = start_guest(&GuestOpts {
        socket: guest_socket_path(&uds),
        disks: Some(&disks),
        netns: None,
        staging: disks.dir.path().join("staging"),
    });
    let err = rt
        .block_on(accept_guest(
            &listener,
            "ns-test",
            cfg,
            Duration::from_secs(5),
        ))
        .unwrap_err();
    assert_eq!(err.reason(), ReasonCode::VolumeAttachFailed, "{err}");
    assert_eq!(guest.wait_exit(Duration::from_secs(10)), 1);
    let console = guest.console();
    assert!(
        console.contains(
            "FAILED (volume_attach_failed): volume vol-1: mount path /run/secrets is reserved"
        ),
        "{console}"
    );
}

#[test]
fn handshake_that_never_comes_fails_within_five_seconds() {
    if !ready() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // A host socket that accepts connections (backlog) but never answers.
    let sock = dir.path().join("v.sock_5161");
    let _silent = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let mut guest = start_guest(&GuestOpts {
        socket: sock,
        disks: None,
        netns: None,
        staging: dir.path().join("staging"),
    });
    let code = guest.wait_exit(Duration::from_secs(8));
    let took = guest.started.elapsed();
    let console = guest.console();
    eprintln!("--- console ---\n{console}---");
    assert_ne!(code, 0);
    assert!(took < Duration::from_millis(6500), "{took:?}");
    assert!(took >= Duration::from_secs(5), "{took:?}");
    let line = console
        .lines()
        .find(|l| l.contains("FAILED"))
        .unwrap_or_else(|| panic!("no failure line:\n{console}"));
    assert!(
        line.contains(
            "FAILED (firecracker_start_failed): handshake failed: no config from unix socket"
        ) && line.contains("within 5000 ms"),
        "{line}"
    );

    // Nobody listening at all: the same deadline.
    let mut guest = start_guest(&GuestOpts {
        socket: dir.path().join("nobody.sock_5161"),
        disks: None,
        netns: None,
        staging: dir.path().join("staging2"),
    });
    assert_ne!(guest.wait_exit(Duration::from_secs(8)), 0);
    assert!(guest.started.elapsed() < Duration::from_millis(6500));
    assert!(guest.console().contains(
        "FAILED (firecracker_start_failed): handshake failed: no connection to the host"
    ));
}

/// Benchmark of issue 5 (printed, not asserted): guest init's own time from its exec to
/// the workload's exec, excluding the wait for the host, with the full config (overlay
/// root, secrets, one volume, eth0 with two addresses), over several runs. Use
/// `PLFM_GUEST_INIT_BIN` to measure the static release binary and
/// `PLFM_GUEST_BENCH_RUNS` for the number of runs (default 10).
#[test]
fn guest_init_startup_benchmark() {
    if !ready() {
        return;
    }
    let runs: usize = std::env::var("PLFM_GUEST_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    let disks = Disks::new();
    let netns = NetNs::new();
    let uds = disks.dir.path().join("v.sock");
    let rt = runtime();
    let listener = rt.block_on(async { bind_guest_listener(&uds) }).unwrap();
    let mut own = Vec::new();
    let mut total = Vec::new();
    // A rare broken pipe during the handshake (seen once in ~100 runs on a loaded CI
    // machine, not yet diagnosed) skips that sample; more than two fail the benchmark.
    let mut skipped = 0;
    for i in 0..runs {
        let mut cfg = config(&["/bin/true"], 0);
        cfg.mounts.push(MountConfig {
            volume_id: "vol-1".into(),
            mount_path: "/data".into(),
            read_only: false,
            filesystem: "ext4".into(),
        });
        cfg.secrets = Some(SecretsConfig {
            required: true,
            path: "/run/secrets/platform.env".into(),
            mode: 0o400,
            uid: None,
            gid: None,
            data: Some(SecretsData::new(SECRETS.into())),
        });
        cfg.network = Some(NetworkConfig {
            address: "fd00::2".parse().unwrap(),
            prefix_len: 128,
            gateway: Some("fe80::1".parse().unwrap()),
            mtu: 1400,
            dns: vec!["fd00::53".parse().unwrap()],
            ipv4: Some(Ipv4Config {
                address: "169.254.0.2".parse().unwrap(),
                prefix_len: 30,
                gateway: Some("169.254.0.1".parse().unwrap()),
            }),
        });
        let mut guest = start_guest(&GuestOpts {
            socket: guest_socket_path(&uds),
            disks: Some(&disks),
            netns: Some(&netns),
            staging: disks.dir.path().join(format!("staging-{i}")),
        });
        let started = rt.block_on(async {
            let mut s = accept_guest(&listener, "ns-test", cfg, Duration::from_secs(5)).await?;
            loop {
                match tokio::time::timeout(Duration::from_secs(10), s.next_event()).await {
                    Ok(Ok(GuestEvent::WorkloadStarted {
                        init_time,
                        handshake_wait,
                        ..
                    })) => return Ok::<_, GuestError>((init_time, handshake_wait)),
                    Ok(Ok(_)) => continue,
                    Ok(Err(e)) => return Err(e),
                    Err(_) => {
                        return Err(GuestError::Closed {
                            when: "bench timeout",
                        })
                    }
                }
            }
        });
        let (init, wait) = match started {
            Ok((Some(i), Some(w))) => (i, w),
            Err(e) if skipped < 2 => {
                skipped += 1;
                eprintln!(
                    "guest init benchmark: run {i} skipped ({skipped} so far): {e:?}; console:\n{}",
                    guest.console()
                );
                continue;
            }
            other => panic!("{other:?}; console:\n{}", guest.console()),
        };
        assert_eq!(guest.wait_exit(Duration::from_secs(10)), 0);
        let phases = guest
            .console()
            .lines()
            .find_map(|l| {
                l.strip_prefix("plfm-guest-init: timings (ms): ")
                    .map(str::to_string)
            })
            .unwrap_or_default();
        own.push(((init - wait).as_secs_f64() * 1e3, phases));
        total.push(init.as_secs_f64() * 1e3);
    }
    own.sort_by(|a, b| a.0.total_cmp(&b.0));
    total.sort_by(f64::total_cmp);
    let bin = guest_init_binary();
    let size = std::fs::metadata(&bin).map(|m| m.len()).unwrap_or(0);
    eprintln!(
        "BENCH guest-init exec -> workload exec, own work (handshake wait excluded), {runs} runs: \
         min {:.2} ms, median {:.2} ms, max {:.2} ms; including the handshake: median {:.2} ms; \
         binary {} ({size} bytes)",
        own[0].0,
        own[own.len() / 2].0,
        own[own.len() - 1].0,
        total[total.len() / 2],
        bin.display()
    );
    for (label, run) in [
        ("min", &own[0]),
        ("median", &own[own.len() / 2]),
        ("max", &own[own.len() - 1]),
    ] {
        eprintln!("BENCH phases of the {label} run (ms): {}", run.1);
    }
}

/// An agent restart closes the channel: the workload keeps running, guest init
/// reconnects with `hello {resumed: true}`, reports the running workload again, and the
/// new host side can stop it and gets its exit.
#[test]
fn guest_reconnects_after_the_host_channel_is_lost() {
    if !ready() {
        return;
    }
    let disks = Disks::new();
    let uds = disks.dir.path().join("v.sock");
    let rt = runtime();
    let listener = rt.block_on(async { bind_guest_listener(&uds) }).unwrap();
    let script = "trap 'exit 5' TERM; echo workload-ready; while :; do sleep 0.05; done";
    let mut guest = start_guest(&GuestOpts {
        socket: guest_socket_path(&uds),
        disks: Some(&disks),
        netns: None,
        staging: disks.dir.path().join("staging"),
    });
    let first_pid = rt.block_on(async {
        let mut s = accept_guest(
            &listener,
            "ns-test",
            config(&["/bin/sh", "-c", script], 0),
            Duration::from_secs(5),
        )
        .await
        .unwrap();
        assert!(!s.hello().resumed);
        loop {
            match tokio::time::timeout(Duration::from_secs(10), s.next_event()).await {
                Ok(Ok(GuestEvent::WorkloadStarted { pid, .. })) => return pid,
                Ok(Ok(_)) => continue,
                other => panic!("{other:?}"),
            }
        }
        // The session is dropped here: the "agent" goes away.
    });
    guest.wait_console("workload-ready", Duration::from_secs(10));
    guest.wait_console("reconnecting in the background", Duration::from_secs(10));

    let mut s = rt
        .block_on(accept_guest(
            &listener,
            "ns-test",
            config(&["/bin/ignored"], 0),
            Duration::from_secs(10),
        ))
        .unwrap_or_else(|e| panic!("{e}; console:\n{}", guest.console()));
    assert!(s.hello().resumed);
    let ended = rt.block_on(async {
        let ev = tokio::time::timeout(Duration::from_secs(10), s.next_event()).await;
        assert!(
            matches!(ev, Ok(Ok(GuestEvent::WorkloadStarted { pid, init_time: None, .. })) if pid == first_pid),
            "{ev:?}"
        );
        s.request_stop(Duration::from_secs(5)).await.unwrap();
        tokio::time::timeout(Duration::from_secs(10), s.next_event()).await
    });
    assert!(
        matches!(ended, Ok(Ok(GuestEvent::Exited { code: Some(5), .. }))),
        "{ended:?}; console:\n{}",
        guest.console()
    );
    assert_eq!(guest.wait_exit(Duration::from_secs(10)), 0);
    assert!(guest.console().contains("reconnected to the host"));
}

/// `debugfs -R <request> <img>`'s standard output.
fn debugfs(img: &Path, request: &str) -> String {
    let out = Command::new("debugfs")
        .args(["-R", request])
        .arg(img)
        .stderr(Stdio::null())
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Makes `path` an overlayfs whiteout: a character device 0:0.
fn whiteout(path: &Path) {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: `c` is a valid NUL-terminated path; mknod has no memory preconditions.
    let rc = unsafe { libc::mknod(c.as_ptr(), libc::S_IFCHR | 0o644, libc::makedev(0, 0)) };
    assert_eq!(
        rc,
        0,
        "mknod {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
}

/// Marks `dir` opaque for overlayfs (`trusted.overlay.opaque=y`): the layers below
/// it contribute nothing to it.
fn opaque(dir: &Path) {
    let c = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: both strings are valid and NUL-terminated; the value is a 1-byte buffer
    // whose length is passed.
    let rc = unsafe {
        libc::setxattr(
            c.as_ptr(),
            c"trusted.overlay.opaque".as_ptr(),
            b"y".as_ptr().cast(),
            1,
            0,
        )
    };
    assert_eq!(
        rc,
        0,
        "setxattr {}: {}",
        dir.display(),
        std::io::Error::last_os_error()
    );
}

/// The image format of the layer disks, for real: three ext4 disks built with
/// `mkfs.ext4 -d` (bottom: busybox root, `/a`, `/d/x`, `/keep`; middle: a whiteout of
/// `/a` and `/d` opaque with `/d/y`; top: `/b`) carry the whiteout and the opaque
/// xattr (checked with debugfs), and guest init, given them as root layers 0, 1, 2,
/// mounts each read-only and stacks them so the workload sees `/a` gone, `/d` holding
/// `y` but not `x`, and `/keep` and `/b` present. A deletion by the workload lands on
/// the scratch disk as a whiteout, and no layer disk changes.
#[test]
fn guest_init_stacks_three_layer_disks_with_a_whiteout_and_an_opaque_dir() {
    if !ready() {
        return;
    }
    let mut disks = Disks::new();
    let dir = disks.dir.path().to_path_buf();
    let bottom = dir.join("bottom");
    rootfs_tree(&bottom);
    std::fs::write(bottom.join("a"), "a from the bottom\n").unwrap();
    std::fs::create_dir_all(bottom.join("d")).unwrap();
    std::fs::write(bottom.join("d/x"), "x from the bottom\n").unwrap();
    std::fs::write(bottom.join("keep"), "kept\n").unwrap();
    let middle = dir.join("middle");
    std::fs::create_dir_all(middle.join("d")).unwrap();
    whiteout(&middle.join("a"));
    opaque(&middle.join("d"));
    std::fs::write(middle.join("d/y"), "y from the middle\n").unwrap();
    let top = dir.join("top");
    std::fs::create_dir_all(&top).unwrap();
    std::fs::write(top.join("b"), "b from the top\n").unwrap();
    let imgs: Vec<PathBuf> = ["bottom", "middle", "top"]
        .iter()
        .map(|n| dir.join(format!("{n}.ext4")))
        .collect();
    for (img, tree) in imgs.iter().zip([&bottom, &middle, &top]) {
        mkfs(img, 16, Some(tree));
    }
    // mkfs.ext4 -d (e2fsprogs 1.47.0) copies the whiteout and the trusted xattr.
    let a = debugfs(&imgs[1], "stat /a");
    assert!(a.contains("Type: character special"), "{a}");
    assert!(a.contains("Device major/minor number: 00:00"), "{a}");
    let d = debugfs(&imgs[1], "ea_list /d");
    assert!(d.contains("trusted.overlay.opaque (1) = \"y\""), "{d}");
    let before: Vec<Vec<u8>> = imgs.iter().map(|i| std::fs::read(i).unwrap()).collect();

    // The stack replaces the flat root: layer 0 is PLFM_GUEST_ROOT_DEVICE.
    disks.layers = vec![attach(&imgs[1], true), attach(&imgs[2], true)];
    disks.root = attach(&imgs[0], true);
    let uds = dir.join("v.sock");
    let rt = runtime();
    let listener = rt.block_on(async { bind_guest_listener(&uds) }).unwrap();
    let script = "set -e
echo \"merged: a=$(test -e /a && echo present || echo gone) d=$(ls /d) keep=$(cat /keep) b=$(cat /b)\"
rm /keep
echo \"after rm: keep=$(test -e /keep && echo present || echo gone)\"";
    let mut cfg = config(&["/bin/sh", "-c", script], 0);
    cfg.root_layers = 3;
    let mut guest = start_guest(&GuestOpts {
        socket: guest_socket_path(&uds),
        disks: Some(&disks),
        netns: None,
        staging: dir.join("staging"),
    });
    let ended = rt.block_on(async {
        let mut s = accept_guest(&listener, "ns-test", cfg, Duration::from_secs(5)).await?;
        loop {
            match tokio::time::timeout(Duration::from_secs(20), s.next_event()).await {
                Ok(Ok(ev @ (GuestEvent::Exited { .. } | GuestEvent::Failed { .. }))) => {
                    return Ok::<_, GuestError>(ev)
                }
                Ok(Ok(_)) => continue,
                Ok(Err(e)) => return Err(e),
                Err(_) => {
                    return Err(GuestError::Closed {
                        when: "test timeout",
                    })
                }
            }
        }
    });
    let code = guest.wait_exit(Duration::from_secs(10));
    let console = guest.console();
    eprintln!("--- console ---\n{console}---");
    let ended = ended.unwrap_or_else(|e| panic!("{e}; console:\n{console}"));
    assert_eq!(
        ended,
        GuestEvent::Exited {
            code: Some(0),
            signal: None,
            oom_killed: false
        },
        "{console}"
    );
    assert_eq!(code, 0);
    assert!(
        console.contains("[stdout] merged: a=gone d=y keep=kept b=b from the top"),
        "{console}"
    );
    assert!(
        console.contains("[stdout] after rm: keep=gone"),
        "{console}"
    );
    // Guest init names the stack top first, as overlayfs does.
    let (l0, l1, l2) = (&disks.root.0, &disks.layers[0].0, &disks.layers[1].0);
    assert!(
        console.contains(&format!("on {l2} on {l1} on {l0}")),
        "{console}"
    );
    // The deletion is a whiteout in the scratch disk's upper dir; the layers are intact.
    let keep = debugfs(&disks.scratch_img, "stat /upper/keep");
    assert!(keep.contains("Type: character special"), "{keep}");
    for (img, bytes) in imgs.iter().zip(before) {
        assert!(
            std::fs::read(img).unwrap() == bytes,
            "{} changed",
            img.display()
        );
    }
}

/// A config asking for more root layers than the VM has devices for is refused before
/// `ack` with `rootfs_build_failed` naming the layer without a device, and so are 0
/// layers and more than the maximum, naming the count.
#[test]
fn a_stack_without_its_devices_or_outside_the_limits_is_refused() {
    if !ready() {
        return;
    }
    let mut disks = Disks::new();
    // Two root layers on hand: the root and (read-only again) the same image.
    disks.layers = vec![attach(&disks.root_img, true)];
    for (layers, want) in [
        (3, "no device for root layer 2 of 3"),
        (0, "root_layers is 0"),
        (17, "root_layers is 17: at most 16"),
    ] {
        let uds = disks.dir.path().join(format!("r{layers}.sock"));
        let rt = runtime();
        let listener = rt.block_on(async { bind_guest_listener(&uds) }).unwrap();
        let mut cfg = config(&["/bin/true"], 0);
        cfg.root_layers = layers;
        let mut guest = start_guest(&GuestOpts {
            socket: guest_socket_path(&uds),
            disks: Some(&disks),
            netns: None,
            staging: disks.dir.path().join(format!("staging{layers}")),
        });
        let err = rt
            .block_on(accept_guest(
                &listener,
                "ns-test",
                cfg,
                Duration::from_secs(5),
            ))
            .err()
            .unwrap_or_else(|| panic!("{layers} layers accepted; console:\n{}", guest.console()));
        assert_eq!(err.reason(), ReasonCode::RootfsBuildFailed, "{err}");
        assert_eq!(guest.wait_exit(Duration::from_secs(10)), 1);
        let console = guest.console();
        assert!(
            console.contains(&format!("FAILED (rootfs_build_failed): {want}")),
            "{console}"
        );
    }
}
